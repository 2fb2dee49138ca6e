"""The plain-torch reference every kernel is tested against: dequantize, then matmul.

    W[n, k] = scales[g_idx[k], n] · (q[k, n] − z[g_idx[k], n])        y = x Wᵀ + bias
"""

from __future__ import annotations

import torch

from gptq.core.pack import dequantize_packed


def dequant_matmul_reference(x: torch.Tensor, qweight, qzeros, scales, g_idx, bits: int,
                             checkpoint_format: str = "gptq", bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] → [..., out], computed in float32 and returned in x's dtype."""
    W = dequantize_packed(qweight, qzeros, scales, g_idx, bits, checkpoint_format)  # [out, in] fp32
    y = x.float() @ W.T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def int16_group_round(x: torch.Tensor, group: int) -> torch.Tensor:
    """x [M, K] rounded as the AVX2 kernel rounds its activations: per group of ``group`` columns,
    to a multiple of absmax/32767 (round half to even), returned in fp64."""
    M, K = x.shape
    xg = x.double().view(M, K // group, group)
    amax = xg.abs().amax(-1, keepdim=True).float()
    scale = torch.where(amax > 0, amax / 32767, torch.ones_like(amax))  # fp32, as the kernel
    q = torch.round(xg.float() * (1 / scale)).clamp(-32767, 32767)
    return (q.double() * scale.double()).view(M, K)


def int4_rows_matmul_reference(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                               group: int) -> torch.Tensor:
    """What ``kernels.cpu_int4.int4_matmul`` computes, in fp64: x̂ [M, K] · Ŵᵀ with x̂ the
    int16-rounded activations and Ŵ[n, k] = scale[n, k/group]·(codes[n, k] − zero[n, k/group]);
    codes [N, K] unpacked."""
    s, z = scale.double().repeat_interleave(group, 1), zero.double().repeat_interleave(group, 1)
    return (int16_group_round(x, group) @ (s * (codes.double() - z)).T).float()

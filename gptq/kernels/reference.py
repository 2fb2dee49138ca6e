"""The plain-torch reference every kernel is tested against: dequantize, then matmul.

    W[n, k] = scales[g_idx[k], n] · (q[k, n] − z[g_idx[k], n])        y = x Wᵀ + bias
"""

from __future__ import annotations

import torch

from ..pack import dequantize_packed


def dequant_matmul_reference(x: torch.Tensor, qweight, qzeros, scales, g_idx, bits: int,
                             checkpoint_format: str = "gptq", bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] → [..., out], computed in float32 and returned in x's dtype."""
    W = dequantize_packed(qweight, qzeros, scales, g_idx, bits, checkpoint_format)  # [out, in] fp32
    y = x.float() @ W.T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)

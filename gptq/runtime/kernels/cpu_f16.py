"""float16 weights × fp32 activations for a few rows (``cpu_f16.c``): the output head while decoding.

Exact weights (fp16 → fp32 conversion), fp32 products and sums; the activations are not rounded
to fp16 as torch's fp16 matmul would need. Reference: ``x.double() @ w.double().T``.
"""

from __future__ import annotations

import torch

from gptq.runtime.kernels.cpu_build import available, function

__all__ = ["available", "f16_matmul"]


def f16_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [..., K] (any float dtype) · w [N, K] float16 ᵀ → float32 [..., N]."""
    if w.dtype != torch.float16 or w.dim() != 2 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"f16_matmul: x [..., K] and float16 w [N, K] expected; got {tuple(x.shape)}, "
                         f"{w.dtype} {tuple(w.shape)}")
    if x.dtype != torch.float32 or not x.is_contiguous():
        x = x.float().contiguous()
    w = w.contiguous()
    N, K = w.shape
    y = torch.empty(*x.shape[:-1], N, dtype=torch.float32)
    function("gptq_f16_matmul")(x.data_ptr(), w.data_ptr(), y.data_ptr(), x.numel() // K, K, N,
                                torch.get_num_threads())
    return y

"""Uniform quantization grids: one (scale, zero) per output row of a column group.

    q    = clamp(round(w / scale) + zero, 0, maxq)          # integer code
    w_hat = scale * (q - zero)                               # what the checkpoint dequantizes to

Scales are rounded to float16 here, because that is how the checkpoint stores them: the
solver then measures and compensates exactly the error the deployed model will have.
Zeros are kept in [1, maxq] for the "gptq" (v1) format, which stores ``zero - 1`` and so
cannot hold a zero of 0 (see the checkpoint format document).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MSE_GRID = 100  # shrink factors tried by the clipping search: 1.0, 0.99, ..., 0.21
MSE_MAX_SHRINK = 0.8
MSE_NORM = 2.4  # the error exponent of the reference implementation's search


@dataclass(frozen=True)
class Grid:
    scale: torch.Tensor  # [out] float32, exactly representable in float16
    zero: torch.Tensor  # [out] float32 holding integers in [0, maxq]


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer codes for ``w``; scale and zero broadcast against w."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (q - zero)


def _range_to_grid(xmin, xmax, maxq: int, sym: bool, min_zero: int):
    # xmin <= 0 <= xmax, both [out] (or [P, out] in the search)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    both_zero = (xmin == 0) & (xmax == 0)
    xmin = torch.where(both_zero, -torch.ones_like(xmin), xmin)
    xmax = torch.where(both_zero, torch.ones_like(xmax), xmax)
    scale = ((xmax - xmin) / maxq).clamp(max=65504.0).to(torch.float16).to(xmin.dtype)
    scale = torch.where(scale == 0, torch.full_like(scale, 2.0**-24), scale)  # fp16 underflow
    if sym:
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        zero = torch.clamp(torch.round(-xmin / scale), min_zero, maxq)
    return scale, zero


def find_grid(
    w: torch.Tensor,  # [out, k] columns of one group
    bits: int,
    sym: bool,
    mse: bool = False,
    col_weight: torch.Tensor | None = None,  # [k] importance of each column (diag H)
    min_zero: int = 1,
) -> Grid:
    """Per-row min/max grid; with ``mse`` the range is shrunk to minimise the weighted error
    sum_k col_weight[k] * |w - w_hat|^2.4 (col_weight = diag H makes it output-aware)."""
    maxq = 2**bits - 1
    w = w if w.dtype == torch.float64 else w.float()
    xmin = torch.clamp(w.min(dim=1).values, max=0)  # [out]
    xmax = torch.clamp(w.max(dim=1).values, min=0)  # [out]
    scale, zero = _range_to_grid(xmin, xmax, maxq, sym, min_zero)
    if not mse:
        return Grid(scale, zero)
    shrink = 1.0 - torch.arange(int(MSE_MAX_SHRINK * MSE_GRID), device=w.device) / MSE_GRID  # [P]
    s, z = _range_to_grid(shrink[:, None] * xmin, shrink[:, None] * xmax, maxq, sym, min_zero)  # [P, out]
    losses = []
    step = max(1, (1 << 24) // w.numel())  # bound the [p, out, k] temporary to ~64 MB
    for p0 in range(0, len(shrink), step):
        sp, zp = s[p0 : p0 + step, :, None], z[p0 : p0 + step, :, None]  # [p, out, 1]
        err = (dequantize(quantize(w[None], sp, zp, maxq), sp, zp) - w[None]).abs().pow(MSE_NORM)
        if col_weight is not None:
            err = err * col_weight.to(w.dtype)[None, None, :]
        losses.append(err.sum(dim=2))  # [p, out]
    best = torch.cat(losses).argmin(dim=0)  # [out]
    rows = torch.arange(w.shape[0], device=w.device)
    return Grid(s[best, rows], z[best, rows])

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

MSE_COARSE = torch.arange(0, 21) * 0.04  # shrink the range by 0 %, 4 %, ..., 80 %
MSE_FINE = torch.arange(-3, 4) * 0.01  # then ±3 % around each row's best, in 1 % steps

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
    col_weight: torch.Tensor | None = None,  # [k] importance of each column (diag H), or [out, k] per row
    min_zero: int = 1,
) -> Grid:
    """Per-row min/max grid; with ``mse`` the range is shrunk (clipped) to minimise the weighted
    error Σ_k col_weight[k]·(w − ŵ)², searched coarse (4 % steps) then fine (1 % steps).
    The solver passes col_weight = 1/U[k,k]², GPTQ's own cost of an error in column k."""
    maxq = 2**bits - 1
    w = w if w.dtype == torch.float64 else w.float()
    xmin = torch.clamp(w.min(dim=1).values, max=0)  # [out]
    xmax = torch.clamp(w.max(dim=1).values, min=0)  # [out]
    scale, zero = _range_to_grid(xmin, xmax, maxq, sym, min_zero)
    if not mse:
        return Grid(scale, zero)
    coarse = (1.0 - MSE_COARSE.to(w))[:, None].expand(-1, w.shape[0])  # [P, out]
    best = _best_shrink(w, xmin, xmax, coarse, maxq, sym, min_zero, col_weight)  # [out]
    fine = torch.clamp(best[None, :] + MSE_FINE.to(w)[:, None], 1.0 - float(MSE_COARSE[-1]), 1.0)  # [F, out]
    best = _best_shrink(w, xmin, xmax, fine, maxq, sym, min_zero, col_weight)
    return Grid(*_range_to_grid(best * xmin, best * xmax, maxq, sym, min_zero))


def _best_shrink(w, xmin, xmax, shrink, maxq, sym, min_zero, col_weight):
    """For each row, the candidate shrink factor (shrink [P, out]) with the least weighted squared error."""
    s, z = _range_to_grid(shrink * xmin, shrink * xmax, maxq, sym, min_zero)  # [P, out]
    cw = torch.ones(w.shape[1], dtype=w.dtype, device=w.device) if col_weight is None else col_weight.to(w.dtype)
    P, out = s.shape
    # rows are independent: work on row chunks whose [P, rows, k] temporary stays in cache on a
    # CPU (~4 MB) and bounded on a GPU (~256 MB)
    budget = 1 << 20 if w.device.type == "cpu" else 1 << 26
    step = max(1, budget // (P * w.shape[1]))
    picks = []
    for r0 in range(0, out, step):
        wr = w[None, r0 : r0 + step]  # [1, rows, k]
        sp, zp = s[:, r0 : r0 + step, None], z[:, r0 : r0 + step, None]  # [P, rows, 1]
        # ŵ − w, computed in place on one temporary
        e = (wr / sp).round_().add_(zp).clamp_(0, maxq).sub_(zp).mul_(sp).sub_(wr)  # [P, rows, k]
        # one weight per column, or per row and column (rows of several matrices solved as a batch)
        cost = e.square_() @ cw if cw.ndim == 1 else e.square_().mul_(cw[r0 : r0 + step]).sum(dim=-1)
        picks.append(cost.argmin(dim=0))  # [rows]
    pick = torch.cat(picks)  # [out]
    return shrink[pick, torch.arange(out, device=w.device)]


class UniformFamily:
    """The integer grids as a grid family (the interface ``codebook.CodebookFamily`` shares):
    fit a (scale, zero) per row of a column group, quantize to codes, dequantize."""

    scale_dtype = torch.float16  # the GPTQ checkpoint stores scales in float16
    zero_dtype = torch.int32
    groups_per_fit = 1

    def __init__(self, bits: int, sym: bool, mse: bool, min_zero: int):
        self.bits, self.sym, self.mse, self.min_zero = bits, sym, mse, min_zero
        self.maxq = 2**bits - 1

    def prepare(self, W: torch.Tensor, group_size: int) -> None:
        """Nothing to fix before the solve (codebook.CodebookFamily fixes its double quantization)."""

    def state(self):
        """How the grids themselves are stored beyond scale/zero: nothing here."""
        return None

    def fit(self, w: torch.Tensor, col_weight: torch.Tensor | None = None, group: int | None = None) -> Grid:
        return find_grid(w, self.bits, self.sym, self.mse, col_weight, self.min_zero)

    def quantize(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        return quantize(w, scale, zero, self.maxq)

    def dequantize(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        return dequantize(codes, scale, zero)

    def dequantize_into(self, codes, scale, zero, out: torch.Tensor) -> torch.Tensor:
        return torch.sub(codes, zero, out=out).mul_(scale)

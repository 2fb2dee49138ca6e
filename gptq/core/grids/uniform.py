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

from gptq.core.grids.search import by_rows, shrink_search


@dataclass(frozen=True)
class Grid:
    scale: torch.Tensor  # [out] float32, exactly representable in float16
    zero: torch.Tensor  # [out] float32 holding integers in [0, maxq]


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer codes for ``w``; scale and zero broadcast against w."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (q - zero)


def _range_to_grid(xmin, xmax, maxq: int, sym: bool, min_zero: int, scale_dtype=torch.float16):
    # xmin <= 0 <= xmax, both [out] (or [P, out] in the search)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    both_zero = (xmin == 0) & (xmax == 0)
    xmin = torch.where(both_zero, -torch.ones_like(xmin), xmin)
    xmax = torch.where(both_zero, torch.ones_like(xmax), xmax)
    scale = ((xmax - xmin) / maxq).clamp(max=torch.finfo(scale_dtype).max).to(scale_dtype).to(xmin.dtype)
    tiny = torch.finfo(scale_dtype).smallest_normal if scale_dtype != torch.float16 else 2.0**-24
    scale = torch.where(scale == 0, torch.full_like(scale, tiny), scale)  # underflow
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
    scale_dtype: torch.dtype = torch.float16,
) -> Grid:
    """Per-row min/max grid; with ``mse`` the range is shrunk (clipped) to minimise the weighted
    error Σ_k col_weight[k]·(w − ŵ)², searched coarse (4 % steps) then fine (1 % steps).
    The solver passes col_weight = 1/U[k,k]², GPTQ's own cost of an error in column k."""
    maxq = 2**bits - 1
    w = w if w.dtype == torch.float64 else w.float()
    xmin = torch.clamp(w.min(dim=1).values, max=0)  # [out]
    xmax = torch.clamp(w.max(dim=1).values, min=0)  # [out]
    if not mse:
        return Grid(*_range_to_grid(xmin, xmax, maxq, sym, min_zero, scale_dtype))
    cw = torch.ones(w.shape[1], dtype=w.dtype, device=w.device) if col_weight is None else col_weight.to(w.dtype)
    # rows are independent: chunks whose [P, rows, k] temporary stays in cache on a CPU (~4 MB) and
    # bounded on a GPU (~256 MB)
    budget = 1 << 20 if w.device.type == "cpu" else 1 << 26

    def cost(shrink: torch.Tensor) -> torch.Tensor:  # [P, out] → weighted squared errors [P, out]
        s, z = _range_to_grid(shrink * xmin, shrink * xmax, maxq, sym, min_zero, scale_dtype)  # [P, out]

        def rows(r0: int, r1: int) -> torch.Tensor:
            wr = w[None, r0:r1]  # [1, rows, k]
            sp, zp = s[:, r0:r1, None], z[:, r0:r1, None]  # [P, rows, 1]
            # ŵ − w, computed in place on one temporary
            e = (wr / sp).round_().add_(zp).clamp_(0, maxq).sub_(zp).mul_(sp).sub_(wr)  # [P, rows, k]
            # one weight per column, or per row and column (rows of several matrices solved as a batch)
            return e.square_() @ cw if cw.ndim == 1 else e.square_().mul_(cw[r0:r1]).sum(dim=-1)

        return by_rows(rows, w.shape[0], shrink.shape[0] * w.shape[1], budget)

    best, _ = shrink_search(cost, (w.shape[0],), w)  # [out]
    return Grid(*_range_to_grid(best * xmin, best * xmax, maxq, sym, min_zero, scale_dtype))


class UniformFamily:
    """The integer grids as a grid family (the interface ``codebook.CodebookFamily`` shares):
    fit a (scale, zero) per row of a column group, quantize to codes, dequantize."""

    zero_dtype = torch.int32
    groups_per_fit = 1

    def __init__(self, bits: int, sym: bool, mse: bool, min_zero: int, scale_dtype: torch.dtype = torch.float16):
        self.bits, self.sym, self.mse, self.min_zero = bits, sym, mse, min_zero
        self.scale_dtype = scale_dtype  # as the format stores scales (GPTQ: float16)
        self.maxq = 2**bits - 1

    def prepare(self, W: torch.Tensor, group_size: int) -> None:
        """Nothing to fix before the solve (codebook.CodebookFamily fixes its double quantization)."""

    def state(self):
        """How the grids themselves are stored beyond scale/zero: nothing here."""
        return None

    def fit(self, w: torch.Tensor, col_weight: torch.Tensor | None = None, group: int | None = None,
            cols: torch.Tensor | None = None) -> Grid:
        """The grid of each row of ``w`` [out, k] (``group`` and ``cols``, where the columns sit, are
        for the families that need them)."""
        return find_grid(w, self.bits, self.sym, self.mse, col_weight, self.min_zero, self.scale_dtype)

    def quantize(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        return quantize(w, scale, zero, self.maxq)

    def dequantize(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        return dequantize(codes, scale, zero)

    def dequantize_into(self, codes, scale, zero, out: torch.Tensor) -> torch.Tensor:
        return torch.sub(codes, zero, out=out).mul_(scale)

"""Codebook grids: a fixed table of 16 values times one absmax per group (bitsandbytes NF4/FP4).

    code  = the index of the table value nearest to w / absmax        (0..15, bitsandbytes' order)
    w_hat = table[code] * absmax

The tables are bitsandbytes' own (``bitsandbytes.functional.get_4bit_type``, 0.50): NF4 is the
QLoRA normal-float grid, FP4 its 1-sign/2-exponent/1-mantissa float grid, both scaled to [-1, 1].
absmax is stored in float32 there, so the solver rounds against it as it is. With ``mse`` the
absmax is shrunk (clipped) per row to minimise GPTQ's weighted error, as for the uniform grids.

The family object is what the solver asks for a grid, a code, and a value; ``grid.UniformFamily``
is the same interface for the integer grids.
"""

from __future__ import annotations

import torch

from .grid import MSE_COARSE, MSE_FINE, Grid

TABLES = {
    "nf4": (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
            0.7229568362236023, 1.0),
    # listed in code order (bit patterns), values 0, 0.0625, 8, 12, 4, 6, 2, 3 and negatives, / 12
    "fp4": tuple(v / 12 for v in (0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0,
                                  -2.0, -3.0)),
}


class CodebookFamily:
    """Grids of one codebook (``TABLES[name]``): fit an absmax per row, round to the nearest value."""

    scale_dtype = torch.float32  # bitsandbytes stores absmax in float32

    def __init__(self, name: str, mse: bool = True):
        if name not in TABLES:
            raise ValueError(f"unknown codebook {name!r}; choose one of {sorted(TABLES)}")
        self.name, self.mse = name, mse
        self.table = torch.tensor(TABLES[name], dtype=torch.float64)  # [16] code → value
        values, order = torch.sort(self.table, stable=True)
        self.order = order  # [16] sorted position → code
        self.mid = (values[1:] + values[:-1]) / 2  # [15] decision boundaries
        self._cast: dict[tuple, tuple] = {}  # (device, dtype) → (table, order, mid): the column loop asks often

    def _to(self, like: torch.Tensor):
        key = (like.device, like.dtype)
        if key not in self._cast:
            self._cast[key] = (self.table.to(like.device, like.dtype), self.order.to(like.device),
                               self.mid.to(like.device, like.dtype))
        return self._cast[key]

    def quantize(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None) -> torch.Tensor:
        """Codes (as w's float dtype, 0..15) of w against absmax ``scale`` (broadcast)."""
        _, order, mid = self._to(w)
        return order[torch.bucketize(w / scale, mid)].to(w.dtype)

    def dequantize(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None) -> torch.Tensor:
        table, _, _ = self._to(scale)
        return table[codes.long()] * scale

    def dequantize_into(self, codes, scale, zero, out: torch.Tensor) -> torch.Tensor:
        table, _, _ = self._to(scale)
        return torch.mul(table[codes.long()], scale, out=out)

    def fit(self, w: torch.Tensor, col_weight: torch.Tensor | None = None) -> Grid:
        """absmax per row of ``w`` [out, k]; with mse the shrink factor (coarse 4 %, then 1 % steps)
        that minimises Σ_k col_weight[k]·(w − ŵ)²."""
        w = w if w.dtype == torch.float64 else w.float()
        absmax = w.abs().amax(dim=1)  # [out]
        absmax = torch.where(absmax == 0, torch.ones_like(absmax), absmax)
        zero = torch.zeros_like(absmax)
        if not self.mse:
            return Grid(absmax.float().to(w.dtype), zero)
        cw = torch.ones(w.shape[1], dtype=w.dtype, device=w.device) if col_weight is None else col_weight.to(w.dtype)

        def best(shrinks: torch.Tensor) -> torch.Tensor:  # shrinks [P, out] → best per row [out]
            P, out = shrinks.shape
            step = max(1, (1 << 20) // (P * w.shape[1]))  # row chunks: the [P, rows, k] temporaries stay small
            picks = []
            for r0 in range(0, out, step):
                wr = w[None, r0 : r0 + step]  # [1, rows, k]
                s = (shrinks[:, r0 : r0 + step] * absmax[r0 : r0 + step])[:, :, None]  # [P, rows, 1]
                err = self.dequantize(self.quantize(wr, s), s).sub_(wr).square_()  # [P, rows, k]
                picks.append((err @ cw).argmin(dim=0))
            return shrinks[torch.cat(picks), torch.arange(out, device=w.device)]

        coarse = (1.0 - MSE_COARSE.to(w))[:, None].expand(-1, w.shape[0])
        b = best(coarse)
        fine = torch.clamp(b[None, :] + MSE_FINE.to(w)[:, None], 1.0 - float(MSE_COARSE[-1]), 1.0)
        b = best(fine)
        # the absmax as stored (float32), so the solver rounds against exactly what is written
        return Grid((b * absmax).float().to(w.dtype), zero)

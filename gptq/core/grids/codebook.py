"""Codebook grids: a fixed table of 16 values times one absmax per group (bitsandbytes NF4/FP4).

    code  = the index of the table value nearest to w / absmax        (0..15, bitsandbytes' order)
    w_hat = table[code] * absmax

The tables are bitsandbytes' own (``bitsandbytes.functional.get_4bit_type``, 0.50): NF4 is the
QLoRA normal-float grid, FP4 its 1-sign/2-exponent/1-mantissa float grid, both scaled to [-1, 1].
absmax is stored in float32 there, so the solver rounds against it as it is. With ``mse`` the
absmax is shrunk (clipped) per row to minimise GPTQ's weighted error, as for the uniform grids.

Double quantization (bitsandbytes' ``compress_statistics``): the absmax values of one matrix, in
row-major order of (row, group), are stored as 8-bit codes of bitsandbytes' signed dynamic map in
blocks of 256, with one float32 scale per block and one float32 offset for the matrix:

    absmax = dynamic[code] * nested_absmax[(row * groups + group) // 256] + offset     (float32)

The offset and the block scales are fixed before the solve from the matrix's plain absmax values
(offset = their mean, a block's scale = its largest |absmax − offset|), as bitsandbytes computes
them; each group's absmax is then fitted as usual and *snapped* to the nearest positive stored
value, so the solver rounds against exactly the scale bitsandbytes will dequantize.

The family object is what the solver asks for a grid, a code, and a value; ``grid.UniformFamily``
is the same interface for the integer grids.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from gptq.core.grids.search import by_rows, chunk, shrink_search
from gptq.core.grids.uniform import Grid

TABLES = {
    "nf4": (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
            0.7229568362236023, 1.0),
    # listed in code order (bit patterns), values 0, 0.0625, 8, 12, 4, 6, 2, 3 and negatives, / 12
    "fp4": tuple(v / 12 for v in (0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0,
                                  -2.0, -3.0)),
}


NESTED_BLOCK = 256  # absmax values per double-quantization block (bitsandbytes' fixed choice)


@functools.lru_cache(maxsize=None)
def dynamic_map() -> torch.Tensor:
    """[256] float32: bitsandbytes' signed 8-bit dynamic map (``create_dynamic_map()``), sorted.

    For e = 0..6 there are 2**e values per sign: 10**(e − 6) times the midpoints of 2**e equal
    steps on [0.1, 1] (float32 arithmetic, as there); then 0 and 1."""
    values = [0.0, 1.0]
    for e in range(7):
        edges = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        values += (mids * 10 ** (e - 6)).tolist() + (mids * -(10 ** (e - 6))).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


@dataclass(frozen=True)
class NestedAbsmax:
    """One matrix's double-quantization state: per (group, row) the block scale [groups, out] and
    the offset (a float32 scalar), both fixed before the solve."""

    block_scale: torch.Tensor  # [groups, out] float32: nested_absmax of the block holding (row, group)
    offset: torch.Tensor  # [] float32

    @staticmethod
    def from_absmax(absmax: torch.Tensor) -> "NestedAbsmax":
        """From the matrix's plain absmax [out, groups] (float32), as bitsandbytes quantizes them."""
        flat = absmax.float().reshape(-1)
        offset = flat.mean()
        dev = (flat - offset).abs()
        pad = (-dev.numel()) % NESTED_BLOCK
        blocks = torch.nn.functional.pad(dev, (0, pad)).view(-1, NESTED_BLOCK).amax(dim=1)  # [blocks]
        blocks = torch.where(blocks == 0, torch.ones_like(blocks), blocks)
        idx = torch.arange(flat.numel(), device=flat.device) // NESTED_BLOCK
        return NestedAbsmax(blocks[idx].view(absmax.shape).T.contiguous(), offset)

    def to(self, device) -> "NestedAbsmax":
        return NestedAbsmax(self.block_scale.to(device), self.offset.to(device))

    def rows(self, start: int, stop: int):
        raise ValueError("double-quantized absmax belongs to the whole matrix: solve each linear alone")

    def blocks(self) -> torch.Tensor:
        """[ceil(n / 256)] the stored nested_absmax (one per block of the flattened absmax)."""
        return self.block_scale.T.reshape(-1)[::NESTED_BLOCK].contiguous()

    def values(self, g: int, table: torch.Tensor) -> torch.Tensor:
        """[out, 256] every absmax representable for group g of each row, in table order (float32)."""
        return table[None, :] * self.block_scale[g][:, None] + self.offset

    def codes(self, absmax: torch.Tensor) -> torch.Tensor:
        """[groups, out] uint8 codes storing the snapped absmax [groups, out] exactly (checked)."""
        table = dynamic_map().to(absmax.device)
        cand = table[None, None, :] * self.block_scale[:, :, None] + self.offset  # [groups, out, 256]
        codes = (cand - absmax.float()[:, :, None]).abs().argmin(dim=2)
        got = table[codes] * self.block_scale + self.offset
        if not torch.equal(got, absmax.float()):
            raise ValueError("an absmax is not one the double-quantized scales can store")
        return codes.to(torch.uint8)


class TableGrid:
    """Rounding onto a fixed, possibly non-uniform table of values times a scale: a code is the index
    of the table value nearest to w / scale, and dequantizes to table[code] · scale. What a
    codebook family and GGML's iq4_nl share; each adds its own way of fitting the scale."""

    def __init__(self, table: tuple[float, ...]):
        self.table = torch.tensor(table, dtype=torch.float64)  # [16] code → value
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
        """Codes (as w's float dtype) of w against ``scale`` (broadcast)."""
        _, order, mid = self._to(w)
        return order[torch.bucketize(w / scale, mid)].to(w.dtype)

    def dequantize(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None) -> torch.Tensor:
        table, _, _ = self._to(scale)
        return table[codes.long()] * scale

    def dequantize_into(self, codes, scale, zero, out: torch.Tensor) -> torch.Tensor:
        table, _, _ = self._to(scale)
        return torch.mul(table[codes.long()], scale, out=out)


class CodebookFamily(TableGrid):
    """Grids of one codebook (``TABLES[name]``): fit an absmax per row, round to the nearest value."""

    scale_dtype = torch.float32  # bitsandbytes stores absmax in float32
    zero_dtype = torch.int32  # unused (zeros)
    groups_per_fit = 1

    def __init__(self, name: str, mse: bool = True, double_quant: bool = False):
        if name not in TABLES:
            raise ValueError(f"unknown codebook {name!r}; choose one of {sorted(TABLES)}")
        super().__init__(TABLES[name])
        self.name, self.mse, self.double_quant = name, mse, double_quant
        self.nested: NestedAbsmax | None = None  # set by prepare() when double_quant

    def prepare(self, W: torch.Tensor, group_size: int) -> None:
        """Fix the double-quantization state from the unquantized matrix W [out, in] (no-op without
        double_quant). Called once per solve, before any fit."""
        if self.double_quant:
            if W.shape[1] % group_size:
                raise ValueError(f"double quantization needs blocks of {group_size} that do not straddle rows; "
                                 f"the input size {W.shape[1]} is not a multiple")
            absmax = W.float().abs().view(W.shape[0], -1, group_size).amax(dim=2)  # [out, groups]
            self.nested = NestedAbsmax.from_absmax(absmax)

    def state(self) -> "NestedAbsmax | None":
        return self.nested

    def _snap(self, a: torch.Tensor, g: int | None) -> torch.Tensor:
        """absmax a [..., out] as stored: float32, and with double quantization the nearest positive
        value the 8-bit code of group g can hold."""
        a = a.float()
        if self.nested is None:
            return a
        vals = self.nested.values(g, dynamic_map().to(a.device))  # [out, 256] ascending per row
        # never a zero or negative absmax: those entries become the row's smallest positive value
        # (the rows stay sorted)
        lowest = torch.where(vals > 0, vals, torch.full_like(vals, torch.inf)).amin(dim=1, keepdim=True)
        vals = torch.maximum(vals, lowest)
        lead = a.shape[:-1]
        x = a.reshape(-1, a.shape[-1]).T.contiguous()  # [out, P]
        hi = torch.searchsorted(vals, x).clamp(max=vals.shape[1] - 1)
        lo = (hi - 1).clamp(min=0)
        vhi, vlo = vals.gather(1, hi), vals.gather(1, lo)
        pick = torch.where((x - vlo).abs() <= (vhi - x).abs(), vlo, vhi)
        return pick.T.reshape(*lead, a.shape[-1]).contiguous()

    def fit(self, w: torch.Tensor, col_weight: torch.Tensor | None = None, group: int | None = None,
            cols: torch.Tensor | None = None) -> Grid:
        """absmax per row of ``w`` [out, k] (group ``group`` of the matrix); with mse the shrink factor
        (coarse 4 %, then 1 % steps: ``search``) that minimises Σ_k col_weight[k]·(w − ŵ)²."""
        w = w if w.dtype == torch.float64 else w.float()
        absmax = w.abs().amax(dim=1)  # [out]
        absmax = torch.where(absmax == 0, torch.ones_like(absmax), absmax)
        zero = torch.zeros_like(absmax)
        if not self.mse:
            return Grid(self._snap(absmax, group).to(w.dtype), zero)
        cw = torch.ones(w.shape[1], dtype=w.dtype, device=w.device) if col_weight is None else col_weight.to(w.dtype)

        table, order, mid = self._to(w)
        values = table[order]  # the table sorted: values[i] = table[order[i]], the code's value

        def cost(shrinks: torch.Tensor) -> torch.Tensor:  # [P, out] → weighted squared errors [P, out]
            stored = self._snap(shrinks * absmax, group).to(w.dtype)  # [P, out] candidate absmax as stored

            def rows(r0: int, r1: int) -> torch.Tensor:
                wr = w[None, r0:r1]  # [1, rows, k]
                s = stored[:, r0:r1, None]  # [P, rows, 1]
                # ŵ − w as quantize/dequantize compute it: the sorted table's value at w's bucket, times s
                return values[torch.bucketize(wr / s, mid)].mul_(s).sub_(wr).square_() @ cw

            return by_rows(rows, w.shape[0], shrinks.shape[0] * w.shape[1], chunk(w))

        best, _ = shrink_search(cost, (w.shape[0],), w)
        # the absmax as stored, so the solver rounds against exactly what is written
        return Grid(self._snap(best * absmax, group).to(w.dtype), zero)

"""GGML block types (llama.cpp's GGUF tensors) as grid families, and their byte layouts.

Every type quantizes runs of weights along a row (the input dimension), so a GGML block is one of
the solver's groups (or, for the K-quants, a super-block of 8 or 16 groups):

    type   group  stored per group / super-block                 value
    q4_0    32    d fp16                                         d·(q − 8)        q 0..15
    q5_0    32    d fp16                                         d·(q − 16)       q 0..31
    q8_0    32    d fp16                                         d·(q − 128)      stored as int8 q − 128
    q4_1    32    d, m fp16                                      d·q + m          q 0..15
    q5_1    32    d, m fp16                                      d·q + m          q 0..31
    q4_k    32    super-block of 8: d, dmin fp16; 6-bit sc, mn   (d·sc)·q − dmin·mn   q 0..15
    q5_k    32    the same                                       (d·sc)·q − dmin·mn   q 0..31
    q6_k    16    super-block of 16: d fp16; int8 sc             (d·sc)·(q − 32)      q 0..63

(layouts and arithmetic: ggml's ``ggml-common.h`` block structs and the ``gguf`` package's
``quants`` module, whose dequantizers are the reference in the tests). The K-quants store their
group scales quantized, so the solver must round against the stored ones: ``KQuantFamily`` fits a
whole super-block when its first column comes up (the solver asks it for ``groups_per_fit``
groups at once), quantizes the 8 or 16 scales, and the columns are then rounded against exactly
``float32(d)·sc`` and ``float32(dmin)·mn``, the products the dequantizer computes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType, quants

from gptq.core.grids.search import best_of, shrink_search
from gptq.core.grids.uniform import Grid


@dataclass(frozen=True)
class BlockType:
    name: str
    bits: int
    group: int  # weights per scale
    kind: str  # "sym" | "min" | "kquant" | "kquant6"
    per_fit: int = 1  # groups per super-block
    block_bytes: int = 0  # bytes per 32 (or 256) weights

    @property
    def block_weights(self) -> int:
        return self.group * self.per_fit


TYPES = {t.name: t for t in (
    BlockType("q4_0", 4, 32, "sym", 1, 18),
    BlockType("q4_1", 4, 32, "min", 1, 20),
    BlockType("q5_0", 5, 32, "sym", 1, 22),
    BlockType("q5_1", 5, 32, "min", 1, 24),
    BlockType("q8_0", 8, 32, "sym", 1, 34),
    BlockType("q4_k", 4, 32, "kquant", 8, 144),
    BlockType("q5_k", 5, 32, "kquant", 8, 176),
    BlockType("q6_k", 6, 16, "kquant6", 16, 210),
)}


def bits_per_weight(name: str) -> float:
    t = TYPES[name]
    return 8 * t.block_bytes / t.block_weights


def _fp16(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-65504.0, 65504.0).to(torch.float16).to(x.dtype)


class SignedFamily:
    """q4_0 / q5_0 / q8_0: w = d·(q − z), z = 2**(bits−1), d float16 of either sign.

    ggml's blocks store d with a sign, so the grid [−z·d, (z − 1)·d] can put its extra level on
    either side: the solver tries both orientations (and, with mse, shrunk ranges) per row."""

    scale_dtype = torch.float16
    zero_dtype = torch.int32
    groups_per_fit = 1

    def __init__(self, bits: int, mse: bool):
        self.maxq, self.z, self.mse = 2**bits - 1, 2 ** (bits - 1), mse

    def prepare(self, W, group_size):
        pass

    def state(self):
        return None

    def _d(self, amax, shrink, sign):  # [P, out]
        d = _fp16(sign * shrink * amax / self.z)
        return torch.where(d == 0, torch.full_like(d, 2.0**-24), d)

    def fit(self, w, col_weight=None, group=None, cols=None) -> Grid:
        w = w if w.dtype == torch.float64 else w.float()
        out = w.shape[0]
        amax = w.abs().amax(dim=1)  # [out]
        cw = torch.ones(w.shape[1], dtype=w.dtype, device=w.device) if col_weight is None else col_weight.to(w.dtype)

        def cost(shrink):  # [P, out] → weighted squared errors [2P, out]: every shrink with d < 0, then d > 0
            d = torch.cat([self._d(amax, shrink, -1.0), self._d(amax, shrink, 1.0)])[..., None]  # [2P, out, 1]
            return self.dequantize(self.quantize(w[None], d, self.z), d, self.z).sub_(w[None]).square_() @ cw

        if self.mse:
            shrink, negative = shrink_search(cost, (out,), w)
        else:  # the sign is chosen all the same
            shrink, negative = best_of(cost, torch.ones(1, out, dtype=w.dtype, device=w.device))
        sign = torch.where(negative == 0, -1.0, 1.0).to(w.dtype)  # variant 0: d < 0
        return Grid(self._d(amax, shrink, sign), torch.full((out,), float(self.z), dtype=w.dtype, device=w.device))

    def quantize(self, w, scale, zero):
        return torch.clamp(torch.round(w / scale) + zero, 0, self.maxq)

    def dequantize(self, codes, scale, zero):
        return scale * (codes - zero)

    def dequantize_into(self, codes, scale, zero, out):
        return torch.sub(codes, zero, out=out).mul_(scale)


class MinFamily:
    """q4_1 / q5_1: w = d·q + m per group, d and m in float16 (m is not tied to an integer zero)."""

    scale_dtype = torch.float16
    zero_dtype = torch.float32
    groups_per_fit = 1

    def __init__(self, bits: int, mse: bool):
        self.maxq, self.mse = 2**bits - 1, mse

    def prepare(self, W, group_size):
        pass

    def state(self):
        return None

    def _grid(self, lo, hi):
        d = _fp16((hi - lo) / self.maxq)
        d = torch.where(d == 0, torch.full_like(d, 2.0**-24), d)
        return d, _fp16(lo)

    def fit(self, w, col_weight=None, group=None, cols=None) -> Grid:
        w = w if w.dtype == torch.float64 else w.float()
        lo, hi = w.min(dim=1).values, w.max(dim=1).values  # [out]
        if not self.mse:
            return Grid(*self._grid(lo, hi))
        cw = torch.ones(w.shape[1], dtype=w.dtype, device=w.device) if col_weight is None else col_weight.to(w.dtype)

        def cost(shrink):  # [P, out] → weighted squared errors [P, out]
            d, m = (t[..., None] for t in self._grid(shrink * lo, shrink * hi))  # [P, out, 1]
            return self.dequantize(self.quantize(w[None], d, m), d, m).sub_(w[None]).square_() @ cw

        b, _ = shrink_search(cost, (w.shape[0],), w)
        return Grid(*self._grid(b * lo, b * hi))

    def quantize(self, w, scale, zero):
        return torch.clamp(torch.round((w - zero) / scale), 0, self.maxq)

    def dequantize(self, codes, scale, zero):
        return scale * codes + zero

    def dequantize_into(self, codes, scale, zero, out):
        return torch.mul(codes, scale, out=out).add_(zero)


@dataclass(frozen=True)
class KScales:
    """The stored scales of a K-quant matrix: per super-block (unit) and row."""

    d: torch.Tensor  # [units, out] float32 holding float16 values
    sc: torch.Tensor  # [units, groups_per_fit, out] int16: 6-bit (q4_k/q5_k) or int8 (q6_k) scales
    dmin: torch.Tensor  # [units, out] (zeros for q6_k)
    mn: torch.Tensor  # [units, groups_per_fit, out] 6-bit minimums (zeros for q6_k)

    def rows(self, start: int, stop: int) -> KScales:
        return KScales(self.d[:, start:stop], self.sc[:, :, start:stop], self.dmin[:, start:stop],
                       self.mn[:, :, start:stop])

    def to(self, device) -> KScales:
        return KScales(self.d.to(device), self.sc.to(device), self.dmin.to(device), self.mn.to(device))

    def permute_rows(self, perm: torch.Tensor) -> KScales:
        return KScales(self.d[:, perm], self.sc[:, :, perm], self.dmin[:, perm], self.mn[:, :, perm])


class KQuantFamily:
    """q4_k / q5_k (affine, 8 groups of 32 with 6-bit scales and minimums under fp16 d, dmin) and
    q6_k (symmetric, 16 groups of 16 with int8 scales under fp16 d), one super-block per fit.

    Each group's (scale, min) is searched for the least col_weight-weighted error as for our own
    grids; the super-block's scales are then quantized (d = max/63 or max/127 in float16, codes
    rounded) and the group grids become the stored products, which the solver rounds against."""

    scale_dtype = torch.float32
    zero_dtype = torch.float32

    def __init__(self, t: BlockType, mse: bool):
        self.t, self.mse = t, mse
        self.maxq = 2**t.bits - 1
        self.groups_per_fit = t.per_fit
        self.sym = t.kind == "kquant6"
        self.scale_max = 127 if self.sym else 63
        self.units: dict[int, tuple] = {}

    def prepare(self, W, group_size):
        self.units = {}
        self.n_units = W.shape[1] // self.t.block_weights

    def state(self) -> KScales:
        parts = [self.units[u] for u in range(self.n_units)]
        return KScales(*(torch.stack([p[i] for p in parts]) for i in range(4)))

    def _raw(self, x, shrink):
        """Unquantized group grids for shrink factors [P, out, G]: scale, min (≥ 0, subtracted)."""
        if self.sym:
            amax = x.abs().amax(dim=-1)  # [out, G]
            s = 2 * shrink * amax / self.maxq
            return torch.where(s == 0, torch.ones_like(s), s), torch.zeros_like(s)
        lo = torch.clamp(x.amin(dim=-1), max=0)
        hi = torch.clamp(x.amax(dim=-1), min=0)
        s = shrink * (hi - lo) / self.maxq
        return torch.where(s == 0, torch.ones_like(s), s), -shrink * lo

    def _err(self, x, s, m, cw):
        """Weighted error of each group [..., out, G] for grids s, m [..., out, G]."""
        z = self._zero(m, s)
        e = self.dequantize(self.quantize(x, s[..., None], z[..., None]), s[..., None], z[..., None]).sub_(x)
        return (e.square_() * cw).sum(dim=-1)

    def _zero(self, m, s):
        return torch.full_like(s, 32.0) if self.sym else m

    def fit(self, w, col_weight=None, group=None, cols=None) -> Grid:
        G, gs = self.t.per_fit, self.t.group
        w = w if w.dtype == torch.float64 else w.float()
        out = w.shape[0]
        x = torch.empty_like(w)
        x[:, cols] = w  # back to input order inside the super-block
        cw = torch.ones(w.shape[1], dtype=w.dtype, device=w.device)
        if col_weight is not None:
            cw[cols] = col_weight.to(w.dtype)
        x, cw = x.view(out, G, gs), cw.view(G, gs)
        if self.mse:  # a shrink per group of each row
            shrink, _ = shrink_search(lambda cands: self._err(x[None], *self._raw(x, cands), cw), (out, G), w)
        else:
            shrink = torch.ones(out, G, dtype=w.dtype, device=w.device)
        s, m = self._raw(x, shrink)  # [out, G]
        # quantize the super-block's scales (and minimums) as stored
        d = _fp16(s.amax(dim=1) / self.scale_max)  # [out]
        d = torch.where(d == 0, torch.full_like(d, 2.0**-24), d)
        sc = torch.clamp(torch.round(s / d[:, None]), 1, self.scale_max)
        if self.sym:
            dmin, mn = torch.zeros_like(d), torch.zeros_like(sc)
        else:
            dmin = _fp16(m.amax(dim=1) / self.scale_max)
            mn = torch.where(dmin[:, None] > 0, torch.round(m / dmin[:, None].clamp(min=2.0**-24)), 0).clamp(0, 63)
        self.units[group] = (d.float(), sc.T.to(torch.int16), dmin.float(), mn.T.to(torch.int16))
        scale = d.float()[:, None] * sc.float()  # [out, G] float32 products, as the dequantizer forms them
        minimum = dmin.float()[:, None] * mn.float()
        return Grid(scale.T.to(w.dtype), self._zero(minimum, scale).T.to(w.dtype))

    def quantize(self, w, scale, zero):
        if self.sym:
            return torch.clamp(torch.round(w / scale) + zero, 0, self.maxq)
        return torch.clamp(torch.round((w + zero) / scale), 0, self.maxq)

    def dequantize(self, codes, scale, zero):
        return scale * (codes - zero) if self.sym else scale * codes - zero

    def dequantize_into(self, codes, scale, zero, out):
        if self.sym:
            return torch.sub(codes, zero, out=out).mul_(scale)
        return torch.mul(codes, scale, out=out).sub_(zero)


def ggml_family(name: str, mse: bool = True):
    t = TYPES[name]
    if t.kind == "sym":
        return SignedFamily(t.bits, mse)
    if t.kind == "min":
        return MinFamily(t.bits, mse)
    return KQuantFamily(t, mse)


# ---- byte layouts -----------------------------------------------------------------------------


def _f16_bytes(x: torch.Tensor) -> np.ndarray:
    """[..., n] float values exactly representable in float16 → [..., 2n] uint8 (little endian)."""
    return x.to(torch.float16).numpy().view(np.uint8)


def _nibbles(q: np.ndarray) -> np.ndarray:
    """[..., 32] codes → [..., 16] bytes: q[j] in the low nibble, q[j + 16] in the high one."""
    return (q[..., :16] & 15) | ((q[..., 16:] & 15) << 4)


def _high_bits32(q: np.ndarray) -> np.ndarray:
    """[..., 32] 5-bit codes → [..., 4] bytes: bit j of a little-endian uint32 is q[j]'s bit 4."""
    bits = ((q >> 4) & 1).astype(np.uint32) << np.arange(32, dtype=np.uint32)
    return bits.sum(axis=-1, dtype=np.uint32)[..., None].view(np.uint8)


def pack_blocks(name: str, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                state: KScales | None) -> torch.Tensor:
    """A solved matrix as GGML blocks: uint8 [out, in / block_weights * block_bytes].

    codes [out, in] (the solver's codes), scales / zeros [groups, out] (the solver's grids),
    state: the K-quant stored scales."""
    t = TYPES[name]
    out, n = codes.shape
    if n % t.block_weights:
        raise ValueError(f"{name} needs rows that are a multiple of {t.block_weights} weights, got {n}")
    q = codes.to(torch.uint8).numpy().reshape(out, n // t.block_weights, t.block_weights)  # [out, blocks, bw]
    parts: list[np.ndarray] = []
    if t.kind in ("sym", "min"):
        parts.append(_f16_bytes(scales.T.contiguous().float()).reshape(out, -1, 2))
        if t.kind == "min":
            parts.append(_f16_bytes(zeros.T.contiguous().float()).reshape(out, -1, 2))
        if t.bits == 8:
            parts.append((q.astype(np.int16) - 128).astype(np.int8).view(np.uint8))
        else:
            if t.bits == 5:
                parts.append(_high_bits32(q))
            parts.append(_nibbles(q))
        return torch.from_numpy(np.concatenate(parts, axis=-1).reshape(out, -1).copy())
    d = _f16_bytes(state.d.T.contiguous())[..., None].reshape(out, -1, 2)  # [out, units, 2]
    sc = state.sc.permute(2, 0, 1).numpy()  # [out, units, G]
    if t.kind == "kquant6":
        ql = q & 15
        ql = ql.reshape(out, -1, 2, 2, 64)  # [.., half, shift, 64]: values 0-63 low nibble, 64-127 high
        ql = (ql[..., 0, :] | (ql[..., 1, :] << 4)).reshape(out, -1, 128)
        qh = (q >> 4).reshape(out, -1, 2, 4, 32)  # [.., half, quarter, 32]
        qh = (qh[..., 0, :] | (qh[..., 1, :] << 2) | (qh[..., 2, :] << 4) | (qh[..., 3, :] << 6)).reshape(out, -1, 64)
        blocks = [ql, qh, sc.astype(np.int8).view(np.uint8), d]
    else:
        mn = state.mn.permute(2, 0, 1).numpy().astype(np.uint8)
        sc = sc.astype(np.uint8)
        packed = np.concatenate([
            (sc[..., :4] & 63) | ((sc[..., 4:] >> 4) << 6),
            (mn[..., :4] & 63) | ((mn[..., 4:] >> 4) << 6),
            (sc[..., 4:] & 15) | ((mn[..., 4:] & 15) << 4)], axis=-1)  # [out, units, 12]
        dmin = _f16_bytes(state.dmin.T.contiguous())[..., None].reshape(out, -1, 2)
        pairs = q.reshape(out, -1, 4, 2, 32)  # [.., 64-chunk, low/high, 32]
        qs = ((pairs[..., 0, :] & 15) | ((pairs[..., 1, :] & 15) << 4)).reshape(out, -1, 128)
        blocks = [d, dmin, packed]
        if t.bits == 5:
            hb = ((q >> 4) & 1).reshape(out, -1, 8, 32)  # bit s of qh[l] = high bit of group s, position l
            blocks.append((hb << np.arange(8, dtype=np.uint8)[:, None]).sum(axis=2, dtype=np.uint8))
        blocks.append(qs)
    return torch.from_numpy(np.concatenate(blocks, axis=-1).reshape(out, -1).copy())


def dequantize_blocks(name: str, blocks: torch.Tensor, n: int) -> torch.Tensor:
    """[out, n] float32 through the ``gguf`` package's reference dequantizer."""

    w = quants.dequantize(blocks.numpy(), GGMLQuantizationType[name.upper()])
    return torch.from_numpy(np.ascontiguousarray(w)).reshape(blocks.shape[0], n)

"""GGML block types (llama.cpp's GGUF tensors) as grid families (their byte layouts:
``gptq.formats.gguf.blocks``).

Every type quantizes runs of weights along a row (the input dimension), so a GGML block is one of
the solver's groups (or, for the K-quants, a super-block of 8 or 16 groups):

    type    group  stored per group / super-block                 value
    q4_0     32    d fp16                                         d·(q − 8)        q 0..15
    q5_0     32    d fp16                                         d·(q − 16)       q 0..31
    q8_0     32    d fp16                                         d·(q − 128)      stored as int8 q − 128
    q4_1     32    d, m fp16                                      d·q + m          q 0..15
    q5_1     32    d, m fp16                                      d·q + m          q 0..31
    iq4_nl   32    d fp16                                         d·K[q]           q 0..15, K the 16-value table
    q2_k     16    super-block of 16: d, dmin fp16; 4-bit sc, mn  (d·sc)·q − dmin·mn   q 0..3
    q3_k     16    super-block of 16: d fp16; 6-bit sc            (d·(sc − 32))·(q − 4)  q 0..7
    q4_k     32    super-block of 8: d, dmin fp16; 6-bit sc, mn   (d·sc)·q − dmin·mn   q 0..15
    q5_k     32    the same                                       (d·sc)·q − dmin·mn   q 0..31
    q6_k     16    super-block of 16: d fp16; int8 sc             (d·sc)·(q − 32)      q 0..63

(layouts and arithmetic: ggml's ``ggml-common.h`` block structs and the ``gguf`` package's
``quants`` module, whose dequantizers are the reference in the tests). The K-quants store their
group scales quantized, so the solver must round against the stored ones: ``KQuantFamily`` fits a
whole super-block when its first column comes up (the solver asks it for ``groups_per_fit``
groups at once), quantizes the 8 or 16 scales, and the columns are then rounded against exactly
``float32(d)·sc`` and ``float32(dmin)·mn``, the products the dequantizer computes.

iq4_nl is a codebook grid (``codebook.TableGrid``): K is ggml's ``kvalues_iq4nl``, a non-uniform
table from −127 to 113, and d carries a sign, so either end of the table can take a row's extreme.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gptq.core.grids.codebook import TableGrid
from gptq.core.grids.search import best_of, by_rows, chunk, shrink_search
from gptq.core.grids.uniform import Grid


@dataclass(frozen=True)
class BlockType:
    name: str
    bits: int
    group: int  # weights per scale
    kind: str  # "sym" | "min" | "table" | "kquant" | "kquant6" | "kquant3"
    per_fit: int = 1  # groups per super-block
    block_bytes: int = 0  # bytes per 32 (or 256) weights
    scale_bits: int = 0  # K-quants: bits of each stored group scale (and minimum)

    @property
    def block_weights(self) -> int:
        return self.group * self.per_fit


TYPES = {t.name: t for t in (
    BlockType("q4_0", 4, 32, "sym", 1, 18),
    BlockType("q4_1", 4, 32, "min", 1, 20),
    BlockType("q5_0", 5, 32, "sym", 1, 22),
    BlockType("q5_1", 5, 32, "min", 1, 24),
    BlockType("q8_0", 8, 32, "sym", 1, 34),
    BlockType("iq4_nl", 4, 32, "table", 1, 18),
    BlockType("q2_k", 2, 16, "kquant", 16, 84, 4),
    BlockType("q3_k", 3, 16, "kquant3", 16, 110, 6),
    BlockType("q4_k", 4, 32, "kquant", 8, 144, 6),
    BlockType("q5_k", 5, 32, "kquant", 8, 176, 6),
    BlockType("q6_k", 6, 16, "kquant6", 16, 210, 8),
)}

# ggml-common.h's kvalues_iq4nl: iq4_nl's code → value (times d)
KVALUES_IQ4NL = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


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
            def rows(r0, r1):
                a, s, wr = amax[r0:r1], shrink[:, r0:r1], w[None, r0:r1]
                d = torch.cat([self._d(a, s, -1.0), self._d(a, s, 1.0)])[..., None]  # [2P, rows, 1]
                # ŵ − w as quantize/dequantize compute it, in place on one temporary
                e = torch.div(wr, d).round_().add_(self.z).clamp_(0, self.maxq).sub_(self.z).mul_(d).sub_(wr)
                return e.square_() @ cw

            return by_rows(rows, out, 2 * shrink.shape[0] * w.shape[1], chunk(w))

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
            def rows(r0, r1):
                d, m = (t[..., None] for t in self._grid(shrink[:, r0:r1] * lo[r0:r1], shrink[:, r0:r1] * hi[r0:r1]))
                wr = w[None, r0:r1]
                # ŵ − w as quantize/dequantize compute it, in place on one temporary
                e = torch.sub(wr, m).div_(d).round_().clamp_(0, self.maxq).mul_(d).add_(m).sub_(wr)
                return e.square_() @ cw

            return by_rows(rows, w.shape[0], shrink.shape[0] * w.shape[1], chunk(w))

        b, _ = shrink_search(cost, (w.shape[0],), w)
        return Grid(*self._grid(b * lo, b * hi))

    def quantize(self, w, scale, zero):
        return torch.clamp(torch.round((w - zero) / scale), 0, self.maxq)

    def dequantize(self, codes, scale, zero):
        return scale * codes + zero

    def dequantize_into(self, codes, scale, zero, out):
        return torch.mul(codes, scale, out=out).add_(zero)


class TableFamily(TableGrid):
    """iq4_nl: w = d·K[q] with K = ``KVALUES_IQ4NL`` (−127 .. 113), d float16 of either sign.

    The table is asymmetric, so the sign of d decides which side of a group reaches 127·|d|: the
    solver tries both per row (d < 0 puts it on the positive side), and with mse shrunk ranges,
    as SignedFamily does. Worked example: a group whose largest weight is 0.254 and whose most
    negative is −0.2: d = −0.254/127 = −0.002 maps 0.254 exactly to K[0] = −127 (and −0.2 to
    K[14] = 89, −0.178), where d = +0.002 would reach only 113·0.002 = 0.226 above zero."""

    scale_dtype = torch.float16
    zero_dtype = torch.int32  # unused (zeros)
    groups_per_fit = 1

    def __init__(self, mse: bool):
        super().__init__(KVALUES_IQ4NL)
        self.mse = mse
        self.reach = float(max(abs(v) for v in KVALUES_IQ4NL))

    def prepare(self, W, group_size):
        pass

    def state(self):
        return None

    def _d(self, amax, shrink, sign):  # [P, out]
        d = _fp16(sign * shrink * amax / self.reach)
        # the table has no 0: an all-zero group is stored with d = 0 (as llama.cpp does), a tiny one not
        return torch.where(amax == 0, 0.0, torch.where(d == 0, torch.full_like(d, 2.0**-24), d))

    def quantize(self, w, scale, zero=None):
        # a zero d holds an all-zero group, which every code dequantizes to 0: divide by 1 there
        return super().quantize(w, torch.where(scale == 0, torch.ones_like(scale), scale))

    def fit(self, w, col_weight=None, group=None, cols=None) -> Grid:
        w = w if w.dtype == torch.float64 else w.float()
        out, k = w.shape
        amax = w.abs().amax(dim=1)  # [out]
        cw = torch.ones(k, dtype=w.dtype, device=w.device) if col_weight is None else col_weight.to(w.dtype)
        table, order, mid = self._to(w)
        values = table[order]  # the table sorted: values[i] = table[order[i]], the code's value

        def cost(shrink):  # [P, out] → weighted squared errors [2P, out]: every shrink with d < 0, then d > 0
            def rows(r0, r1):
                a, s, wr = amax[r0:r1], shrink[:, r0:r1], w[None, r0:r1]
                d = torch.cat([self._d(a, s, -1.0), self._d(a, s, 1.0)])[..., None]  # [2P, rows, 1]
                # ŵ − w as quantize/dequantize compute it: the sorted table's value at w's bucket, times d
                pos = torch.bucketize(wr / torch.where(d == 0, torch.ones_like(d), d), mid)
                return values[pos].mul_(d).sub_(wr).square_() @ cw

            return by_rows(rows, out, 2 * shrink.shape[0] * k, chunk(w))

        if self.mse:
            shrink, negative = shrink_search(cost, (out,), w)
        else:  # the sign is chosen all the same
            shrink, negative = best_of(cost, torch.ones(1, out, dtype=w.dtype, device=w.device))
        sign = torch.where(negative == 0, -1.0, 1.0).to(w.dtype)  # variant 0: d < 0
        return Grid(self._d(amax, shrink, sign), torch.zeros(out, dtype=w.dtype, device=w.device))


@dataclass(frozen=True)
class KScales:
    """The stored scales of a K-quant matrix: per super-block (unit) and row."""

    d: torch.Tensor  # [units, out] float32 holding float16 values
    sc: torch.Tensor  # [units, groups_per_fit, out] int16: 4-bit (q2_k), 6-bit (q4_k/q5_k), sc − 32 in
    #                   [−32, 31] (q3_k) or int8 (q6_k) scales
    dmin: torch.Tensor  # [units, out] (zeros for q3_k, q6_k)
    mn: torch.Tensor  # [units, groups_per_fit, out] 4-bit (q2_k) or 6-bit minimums (zeros for q3_k, q6_k)

    def rows(self, start: int, stop: int) -> KScales:
        return KScales(self.d[:, start:stop], self.sc[:, :, start:stop], self.dmin[:, start:stop],
                       self.mn[:, :, start:stop])

    def to(self, device) -> KScales:
        return KScales(self.d.to(device), self.sc.to(device), self.dmin.to(device), self.mn.to(device))

    def permute_rows(self, perm: torch.Tensor) -> KScales:
        return KScales(self.d[:, perm], self.sc[:, :, perm], self.dmin[:, perm], self.mn[:, :, perm])


class KQuantFamily:
    """The K-quants, one super-block per fit:

        q2_k          affine, 16 groups of 16, 4-bit scales and minimums under fp16 d, dmin
        q4_k / q5_k   affine, 8 groups of 32, 6-bit scales and minimums under fp16 d, dmin
        q3_k          signed, 16 groups of 16, 6-bit scales sc − 32 in [−32, 31] under fp16 d
        q6_k          signed, 16 groups of 16, int8 scales under fp16 d

    Each group's (scale, min) is searched for the least col_weight-weighted error as for our own
    grids (q3_k's scale with either sign, its 8 levels −4..3 being asymmetric, as SignedFamily
    does); the super-block's scales are then quantized (d from the largest one, the codes rounded)
    and the group grids become the stored products, which the solver rounds against. A group whose
    weights are all zero takes no part in d: any stored scale rounds it exactly."""

    scale_dtype = torch.float32
    zero_dtype = torch.float32

    def __init__(self, t: BlockType, mse: bool):
        self.t, self.mse = t, mse
        self.maxq = 2**t.bits - 1
        self.groups_per_fit = t.per_fit
        self.sym = t.kind in ("kquant6", "kquant3")  # w = s·(q − z), no minimum
        self.z = 2 ** (t.bits - 1)  # the zero of a symmetric grid: 32 for q6_k, 4 for q3_k
        self.signed = t.kind == "kquant3"  # both signs searched; d stores the largest scale as −32
        self.variants = 2 if self.signed else 1
        self.scale_max = 2 ** (t.scale_bits - 1) - 1 if t.kind == "kquant6" else 2**t.scale_bits - 1
        self.units: dict[int, tuple] = {}

    def prepare(self, W, group_size):
        self.units = {}
        self.n_units = W.shape[1] // self.t.block_weights

    def state(self) -> KScales:
        parts = [self.units[u] for u in range(self.n_units)]
        return KScales(*(torch.stack([p[i] for p in parts]) for i in range(4)))

    def _candidates(self, x, shrink):
        """Unquantized group grids of x [out, G, gs] for shrink factors [P, out, G]: scale, min (≥ 0,
        subtracted), each [V·P, out, G] (q3_k: every shrink with a negative scale, then positive)."""
        if self.signed:
            s = shrink * x.abs().amax(dim=-1) / self.z  # the level −4·s reaches the group's extreme
            s = torch.where(s == 0, torch.ones_like(s), s)
            s = torch.cat([-s, s])
            return s, torch.zeros_like(s)
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
        s = s[..., None]
        if self.sym:  # ŵ − w as quantize/dequantize compute it, in place on one temporary
            e = torch.div(x, s).round_().add_(self.z).clamp_(0, self.maxq).sub_(self.z).mul_(s).sub_(x)
        else:
            m = m[..., None]
            e = torch.add(x, m).div_(s).round_().clamp_(0, self.maxq).mul_(s).sub_(m).sub_(x)
        return e.square_().mul_(cw).sum(dim=-1)

    def _zero(self, m, s):
        return torch.full_like(s, float(self.z)) if self.sym else m

    def _store(self, s, m, live):
        """The super-block's stored scales for group grids s, m [out, G] (``live``: groups with a
        non-zero weight): d, dmin [out] and the codes sc, mn [out, G]."""
        if self.signed:  # q3_k, as quantize_row_q3_K_ref: the largest scale (with its sign) stored as −32
            ref = torch.where(live, s, torch.zeros_like(s))
            ref = ref.gather(1, ref.abs().argmax(dim=1, keepdim=True))[:, 0]  # [out]
            d = _fp16(ref / -32)
            d = torch.where(d == 0, torch.full_like(d, 2.0**-24), d)
            r = s / d[:, None]
            sc = torch.clamp(torch.round(r), -32, 31)
            sc = torch.where(sc == 0, torch.sign(r), sc)  # never a zero scale: codes are w / scale
            return d, sc, torch.zeros_like(d), torch.zeros_like(sc)
        d = _fp16(torch.where(live, s, torch.zeros_like(s)).amax(dim=1) / self.scale_max)  # [out]
        d = torch.where(d == 0, torch.full_like(d, 2.0**-24), d)
        sc = torch.clamp(torch.round(s / d[:, None]), 1, self.scale_max)
        if self.sym:
            return d, sc, torch.zeros_like(d), torch.zeros_like(sc)
        dmin = _fp16(m.amax(dim=1) / self.scale_max)
        mn = torch.where(dmin[:, None] > 0, torch.round(m / dmin[:, None].clamp(min=2.0**-24)), 0)
        return d, sc, dmin, mn.clamp(0, self.scale_max)

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

        def cost(shrinks):  # [P, out, G] → weighted errors [V·P, out, G], a chunk of rows at a time
            def rows(r0, r1):
                xr = x[r0:r1]
                return self._err(xr[None], *self._candidates(xr, shrinks[:, r0:r1]), cw)

            return by_rows(rows, out, self.variants * shrinks.shape[0] * G * gs, chunk(w))

        ones = torch.ones(out, G, dtype=w.dtype, device=w.device)
        if self.mse:  # a shrink (and for q3_k a sign) per group of each row
            shrink, variant = shrink_search(cost, (out, G), w)
        elif self.signed:  # the sign is chosen all the same
            shrink, variant = best_of(cost, ones[None])
        else:
            shrink, variant = ones, torch.zeros(out, G, dtype=torch.int64, device=w.device)
        s, m = (t.gather(0, variant[None])[0] for t in self._candidates(x, shrink[None]))  # [out, G]
        d, sc, dmin, mn = self._store(s, m, x.abs().amax(dim=-1) > 0)
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
    if t.kind == "table":
        return TableFamily(mse)
    return KQuantFamily(t, mse)

"""The cpu backend's two 4-bit kernels (``build_cpu`` picks one per layer) and the fused siblings.

Both keep the codes in their own layout and let the layer release its GPTQ-layout qweight,
qzeros and scales (left as shape-only meta tensors), so a layer is resident at ~28 % of its bf16
size instead of ~55 %.

  Int4PackBackend  torch's packed-int4 CPU matmul (``_weight_int4pack_mm_for_cpu``), scales and
                   zero offsets in bf16: fast batch-1 decoding where the CPU has native bf16. From
                   DEQUANT_MIN_ROWS rows on, the int4 weight is dequantized into the model's shared
                   buffer and multiplied densely in the activation dtype (on CPUs without native
                   bf16 the int4 kernel's bf16 arithmetic is slower than the fp32 dense matmul).
  Rows64Backend    CPUs without fast bf16 (``cpu.fast_dtype()`` is fp32; AVX2 + FMA + F16C and a C
                   compiler): our kernel (kernels/cpu_int4.c), codes one row per output, the
                   checkpoint's fp16 scales and integer zeros, activations rounded to int16 per
                   group, exact int32 dot products; siblings reading one input (q/k/v, up/gate)
                   fused into one call (``FusedSiblings``); from ROWS64_MAX_ROWS rows on, an exact
                   fp32 dequantization into the shared buffer + matmul.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from gptq.core.pack import unpack_qweight, unpack_qzeros
from gptq.runtime import cpu
from gptq.runtime.backends import Backend
from gptq.runtime.kernels import cpu_int4
from gptq.runtime.shared import InputCache

if TYPE_CHECKING:
    from gptq.runtime.qlinear import QuantLinear

INT4_CPU_GROUPS = (256, 128, 64, 32)
ROWS64_MAX_ROWS = 16  # AVX2 kernel below this many rows, else exact dequantization + fp32 matmul (bench cpu-kernel:
# at 8-15 rows the kernel is 1.2-2.6x faster on SmolLM2 and 1.3B shapes; the two meet at ~18-30 rows)
DEQUANT_MIN_ROWS = 256  # cpu backend: from this many rows on, dequantize + dense matmul (bench cpu-kernel)
CPU_KERNELS = ("auto", "avx2", "torch")


def build_cpu(layer: QuantLinear, perm: torch.Tensor | None, G: int, cpu_kernel: str = "auto") -> Backend | None:
    """The cpu backend for a 4-bit layer whose sorted groups are runs of G rows; None where neither
    kernel can serve it (the caller keeps a dense copy). cpu_kernel "auto": our AVX2 kernel where
    the CPU has no fast bf16 and it can serve this layer, else torch's int4 kernel; "avx2" /
    "torch" ask for one (benchmarks compare them)."""
    if cpu_kernel not in CPU_KERNELS:
        raise ValueError(f"cpu_kernel must be 'auto', 'avx2' or 'torch', not {cpu_kernel!r}")
    fits = G % 32 == 0 and G <= 32768 and layer.in_features % 64 == 0 and cpu_int4.available()
    if cpu_kernel == "avx2" and not fits:
        raise ValueError(f"the AVX2 kernel cannot serve this layer (group {G}, {layer.in_features} inputs; "
                         f"kernel: {cpu_int4.unavailable_reason() or 'available'})")
    if fits and (cpu_kernel == "avx2" or (cpu_kernel == "auto" and cpu.fast_dtype() == torch.float32)):
        return Rows64Backend.build(layer, perm, G)
    sub = next((s for s in INT4_CPU_GROUPS if G % s == 0 and layer.in_features % s == 0), None)
    return None if sub is None else Int4PackBackend.build(layer, perm, sub)


def _sorted_codes(layer: QuantLinear, perm: torch.Tensor | None) -> torch.Tensor:
    """The layer's 4-bit codes [in, out], input rows in g_idx order."""
    codes = unpack_qweight(layer.qweight, 4)
    return codes if perm is None else codes[perm]


@dataclass(eq=False, kw_only=True)
class CpuBackend(Backend):
    name = "cpu"
    owns_codes = True
    in_features: int
    out_features: int


@dataclass(eq=False, kw_only=True)
class Int4PackBackend(CpuBackend):
    """torch's packed-int4 CPU kernel (see the module docstring)."""

    kernel = "torch int4"
    packed: torch.Tensor  # torch's int4pack layout of the codes [out, in]
    scale_offset: torch.Tensor  # [in / sub, out, 2] bf16: scale and offset per sub-group of ``sub`` inputs
    sub: int
    layout: tuple[int, str] | None  # lets long prompts dequantize the int4 weight (None: always the kernel)

    @classmethod
    def build(cls, layer: QuantLinear, perm: torch.Tensor | None, sub: int) -> Int4PackBackend:
        zeros = unpack_qzeros(layer.qzeros, 4, layer.checkpoint_format).float()  # [ng, out]
        g_sorted = layer.g_idx.long() if perm is None else layer.g_idx.long()[perm]
        g_of_sub = g_sorted[::sub]  # [in / sub] group of each sub-group of `sub` rows
        s = layer.scales.float()[g_of_sub]  # [n_sub, out]
        # int4pack computes w = (q − 8)·s + offset; GPTQ's w = s·(q − z) ⇒ offset = s·(8 − z)
        offset = s * (8 - zeros[g_of_sub])
        layout = cpu.int4pack_layout()
        return cls(
            perm=perm, in_features=layer.in_features, out_features=layer.out_features, sub=sub,
            packed=torch.ops.aten._convert_weight_to_int4pack_for_cpu(_sorted_codes(layer, perm).T.contiguous(), 1),
            scale_offset=torch.stack([s, offset], dim=-1).to(torch.bfloat16).contiguous(),
            layout=layout if layout is not None and layer.out_features % layout[0] == 0 else None,
        )

    def product(self, layer: QuantLinear, x: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        dense = x2.shape[0] >= DEQUANT_MIN_ROWS and self.layout is not None
        xp = self.permuted(x, x2)
        if dense:
            y = xp @ self.dequantized_t(xp.dtype)
        else:
            xb = xp.to(torch.bfloat16).contiguous()
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, self.packed, self.sub, self.scale_offset)
        return y.to(x.dtype)

    def dequantized_t(self, dtype: torch.dtype) -> torch.Tensor:
        """Ŵᵀ [in, out] (sorted input order) from the int4 weight, in the shared buffer."""
        K, N = self.in_features, self.out_features

        def write(buf):
            s = self.scale_offset[..., 0].float()  # [n_sub, out]
            off = self.scale_offset[..., 1].float() - 8 * s  # w = (q − 8)·s + offset = q·s + off
            cpu.int4pack_dequantize_t(self.packed, N, K, self.layout, self.sub, s.to(dtype), off.to(dtype), buf)

        return self.scratch((K, N), dtype, write)


@dataclass(eq=False, kw_only=True)
class Rows64Backend(CpuBackend):
    """Our AVX2 kernel on fp32 activations (see the module docstring): inputs of fewer than
    ``decode_below`` elements take the per-token path, longer ones the exact dequantization."""

    kernel = "rows64"
    group: int
    packed: torch.Tensor  # [out, in / 2] in the kernel's chunk layout (``pack_rows64``)
    scale: torch.Tensor  # [out, ng] fp16; sorted inputs: group i is rows iG..(i+1)G
    zero: torch.Tensor  # [out, ng] uint8
    decode_below: int
    matmul: cpu_int4.Int4Rows | None = None  # bound to packed/scale/zero (built if not given)
    fused: tuple[FusedSiblings, int] | None = None  # the siblings this layer runs with, and its index

    def __post_init__(self):
        if self.matmul is None:
            self.matmul = cpu_int4.Int4Rows(self.packed, self.scale, self.zero, self.group)

    @classmethod
    def build(cls, layer: QuantLinear, perm: torch.Tensor | None, G: int) -> Rows64Backend:
        return cls(perm=perm, in_features=layer.in_features, out_features=layer.out_features, group=G,
                   packed=cpu_int4.pack_rows64(_sorted_codes(layer, perm).T), scale=layer.scales.T.contiguous(),
                   zero=unpack_qzeros(layer.qzeros, 4, layer.checkpoint_format).T.to(torch.uint8).contiguous(),
                   decode_below=ROWS64_MAX_ROWS * layer.in_features)

    def fuses_with(self, other: Rows64Backend) -> bool:
        """Whether the two layers can run in one kernel call (same inputs, groups and permutation)."""
        return (other.in_features == self.in_features and other.group == self.group
                and (other.perm is None) == (self.perm is None)
                and (other.perm is None or torch.equal(other.perm, self.perm)))

    def use_rows(self, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> None:
        """Take these (views into the siblings' stacked tensors) for this layer's own rows."""
        self.packed, self.scale, self.zero = packed, scale, zero
        self.matmul = cpu_int4.Int4Rows(packed, scale, zero, self.group)

    def __call__(self, layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
        if x.numel() < self.decode_below:
            return self.decode(layer, x)
        return super().__call__(layer, x)

    def decode(self, layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
        """Fewer than ROWS64_MAX_ROWS rows (decoding): the per-token path, kept short (the kernel
        writes the output in its final shape; fused siblings each get their own)."""
        xs = x if self.perm is None else self.permuted(x, x.reshape(-1, self.in_features)).view(x.shape)
        fused = self.fused
        y = self.matmul(xs)[0] if fused is None else fused[0].outputs(x, xs)[fused[1]]
        if layer.bias is not None:
            y = y + layer.bias
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def product(self, layer: QuantLinear, x: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """Many rows: exact dequantization into the shared buffer, fp32 matmul."""
        xs = self.permuted(x, x2)

        def write(buf):
            cpu_int4.int4_dequantize(self.packed, self.scale, self.zero, self.group, out=buf)

        w = self.scratch((self.out_features, self.in_features), torch.float32, write)
        return nn.functional.linear(xs.float(), w).to(x2.dtype)


class FusedSiblings:
    """Linears that read the same input (q/k/v; up/gate) on the AVX2 kernel: their codes, scales
    and zeros live in one tensor each (the layers keep views of their rows), and a small batch
    runs all of them in one kernel call, which writes each layer's own output."""

    def __init__(self, backends: list[Rows64Backend]):
        self.group = backends[0].group
        self.packed = torch.cat([b.packed for b in backends])
        self.scale = torch.cat([b.scale for b in backends])
        self.zero = torch.cat([b.zero for b in backends])
        widths = tuple(b.out_features for b in backends)
        self.matmul = cpu_int4.Int4Rows(self.packed, self.scale, self.zero, self.group, widths)
        self.cache = InputCache()
        start = 0
        for index, b in enumerate(backends):
            end = start + b.out_features
            b.use_rows(self.packed[start:end], self.scale[start:end], self.zero[start:end])  # views: no copy
            b.fused = (self, index)  # this layer's entry of ``outputs``
            start = end

    def outputs(self, x: torch.Tensor, xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Every sibling's output for the module input x (the cache key), computed from xs."""
        return self.cache(x, lambda: self.matmul(xs))

"""4-bit × fp32 matmul for x86 CPUs without native bf16 (AVX2 + FMA): ``cpu_int4.c``.

Why: torch's packed-int4 CPU kernel computes in bf16, which CPUs without AVX-512 BF16 emulate,
so there it decodes no faster than a dense bf16 matrix-vector product (issue #10). This kernel
multiplies the 4-bit codes with int16-rounded activations in exact integer arithmetic. Built and
loaded by ``cpu_build`` (``available()`` / ``unavailable_reason()`` say whether it can run).

Layout: ``pack_rows64(codes)`` turns [N, K] codes (0..15) into [N, K/2] bytes, each 64-column chunk
as 16 little-endian 16-bit words, word j holding columns j, j + 16, j + 32, j + 48 in its four
nibbles (so a shift and a mask give 16 codes in column order). Reference:
``kernels.reference.int4_rows_matmul_reference``.
"""

from __future__ import annotations

import ctypes

import torch

from gptq.runtime.kernels.cpu_build import available, function, unavailable_reason

__all__ = ["available", "unavailable_reason", "pack_rows64", "unpack_rows64", "int4_matmul", "Int4Rows",
           "int4_dequantize", "MAX_OUTPUTS"]


def pack_rows64(codes: torch.Tensor) -> torch.Tensor:
    """[N, K] codes (0..15, K a multiple of 64) → [N, K/2] uint8 in the kernel's chunk layout."""
    N, K = codes.shape
    c = codes.to(torch.uint8).view(N, K // 64, 4, 16)  # [row, chunk, nibble t, word j]
    low, high = c[:, :, 0] | (c[:, :, 1] << 4), c[:, :, 2] | (c[:, :, 3] << 4)  # bytes of word j
    return torch.stack([low, high], dim=-1).reshape(N, K // 2).contiguous()


def unpack_rows64(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_rows64``: [N, K/2] uint8 → [N, K] codes (uint8)."""
    N, half = packed.shape
    b = packed.view(N, half // 32, 16, 2)  # [row, chunk, word j, byte]
    nibbles = torch.stack([b[..., 0] & 15, b[..., 0] >> 4, b[..., 1] & 15, b[..., 1] >> 4], dim=2)
    return nibbles.reshape(N, 2 * half)


def _check(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int) -> None:
    N, half = packed.shape
    K = 2 * half
    if packed.dtype != torch.uint8 or scale.dtype != torch.float16 or zero.dtype != torch.uint8:
        raise ValueError(f"int4 kernel: packed uint8, scale float16, zero uint8 expected; got {packed.dtype}, "
                         f"{scale.dtype}, {zero.dtype}")
    if group % 32 or K % 64 or K % group or scale.shape != (N, K // group) or zero.shape != scale.shape:
        raise ValueError(f"int4 kernel: K={K} must be a multiple of 64, group {group} a multiple of 32 dividing "
                         f"K, and scale/zero shaped [N, K/group] = {(N, K // max(group, 1))}; got {tuple(scale.shape)}")
    for t in (packed, scale, zero):
        if not t.is_contiguous():
            raise ValueError("int4 kernel: packed, scale and zero must be contiguous")


def int4_matmul(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                group: int) -> torch.Tensor:
    """y = x̂ Ŵᵀ with Ŵ[n, k] = scale[n, k/group]·(code[n, k] − zero[n, k/group]) and x̂ the
    activations rounded to int16 per group (see cpu_int4.c).

    x [M, K] float; packed [N, K/2] from ``pack_rows64``; scale [N, K/group] float16; zero
    [N, K/group] uint8; group a multiple of 32 dividing K, K a multiple of 64. Returns [M, N] float32."""
    return Int4Rows(packed, scale, zero, group)(x)[0]


MAX_OUTPUTS = 4  # GPTQ_MAX_OUTPUTS in cpu_int4.c


class _Plan(ctypes.Structure):  # gptq_int4_plan in cpu_int4.c
    _fields_ = [("w", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("zero", ctypes.c_void_p),
                ("K", ctypes.c_int64), ("N", ctypes.c_int64), ("G", ctypes.c_int64), ("nout", ctypes.c_int64),
                ("ends", ctypes.c_int64 * MAX_OUTPUTS)]


class Int4Rows:
    """Packed codes, scales and zeros of one layer, or of up to MAX_OUTPUTS layers reading the same
    input with their rows stacked (``widths``: each layer's rows). Checked and bound once; calling
    it multiplies and returns one output per layer (the decoding path: no per-call validation)."""

    def __init__(self, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int,
                 widths: tuple[int, ...] | None = None):
        _check(packed, scale, zero, group)
        self.packed, self.scale, self.zero, self.group = packed, scale, zero, group
        self.N, self.K = packed.shape[0], packed.shape[1] * 2
        self.widths = tuple(widths) if widths is not None else (self.N,)
        if sum(self.widths) != self.N or not 1 <= len(self.widths) <= MAX_OUTPUTS or min(self.widths) < 1:
            raise ValueError(f"widths {self.widths}: 1 to {MAX_OUTPUTS} positive row counts summing to N={self.N}")
        ends = [sum(self.widths[: i + 1]) for i in range(len(self.widths))]
        ends += [self.N] * (MAX_OUTPUTS - len(ends))
        self._plan = _Plan(packed.data_ptr(), scale.data_ptr(), zero.data_ptr(), self.K, self.N, group,
                           len(self.widths), (ctypes.c_int64 * MAX_OUTPUTS)(*ends))
        self._plan_ref = ctypes.byref(self._plan)
        self._fn = function("gptq_int4_matmul")

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x [..., K] (any float dtype) → one float32 [..., width] per layer."""
        if x.dtype != torch.float32 or not x.is_contiguous():
            x = x.float().contiguous()
        if x.shape[-1] != self.K:
            raise ValueError(f"expected activations [..., {self.K}], got {tuple(x.shape)}")
        lead = x.shape[:-1]
        ys = [torch.empty(*lead, w, dtype=torch.float32) for w in self.widths]
        ptrs = [y.data_ptr() for y in ys] + [None] * (MAX_OUTPUTS - len(ys))
        self._fn(self._plan_ref, x.data_ptr(), x.numel() // self.K, torch.get_num_threads(), *ptrs)
        return tuple(ys)


def int4_dequantize(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Ŵ [N, K] float32 (into ``out`` if given), for long prompts: one dense matmul after it."""
    _check(packed, scale, zero, group)
    N, K = packed.shape[0], packed.shape[1] * 2
    if out is None:
        out = torch.empty(N, K, dtype=torch.float32)
    elif out.shape != (N, K) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"int4_dequantize: out must be a contiguous float32 [{N}, {K}]")
    function("gptq_int4_dequant")(packed.data_ptr(), scale.data_ptr(), zero.data_ptr(), out.data_ptr(), K, N, group,
                             torch.get_num_threads())
    return out

"""4-bit × fp32 matmul for x86 CPUs without native bf16 (AVX2 + FMA): ``cpu_int4.c``, compiled once.

Why: torch's packed-int4 CPU kernel computes in bf16, which CPUs without AVX-512 BF16 emulate,
so there it decodes no faster than a dense bf16 matrix-vector product (issue #10). This kernel
converts the codes to fp32 and multiplies with FMA, so a decoding step reads ¼ of a bf16 weight's
bytes at memory speed.

Build: the C source is compiled with the system's C compiler (``$CC`` or ``cc``; ``-O3 -mavx2
-mfma -mf16c -fopenmp``) into ``$GPTQ_CACHE`` (default ``~/.cache/gptq``)/kernels/<hash>/ on first use,
a second or two, written under a temporary name and renamed, then loaded with ctypes. No compiler,
no AVX2/FMA, or a failed build: ``available()`` is False, the reason is in ``unavailable_reason()``
and callers keep torch's kernel. ``GPTQ_CPU_KERNEL=0`` turns it off.

Layout: ``pack_rows64(codes)`` turns [N, K] codes (0..15) into [N, K/2] bytes, each 64-column chunk
as 16 little-endian 16-bit words, word j holding columns j, j + 16, j + 32, j + 48 in its four
nibbles (so a shift and a mask give 16 codes in column order). Reference:
``kernels.reference.int4_rows_matmul_reference``.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_int4.c")
FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC", "-std=c11")
LIBS = ("-lm",)  # after the source: linkers that drop unneeded libraries resolve it in order


def cache_dir() -> Path:
    return Path(os.environ.get("GPTQ_CACHE", Path.home() / ".cache" / "gptq")) / "kernels"


def _compiler() -> str | None:
    cc = os.environ.get("CC", "cc")
    return shutil.which(cc) or shutil.which("gcc")


def _build() -> Path:
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC or install gcc)")
    src = SOURCE.read_bytes()
    tag = hashlib.sha256(src + " ".join((cc, *FLAGS, *LIBS)).encode()).hexdigest()[:16]
    lib = cache_dir() / tag / "libgptq_int4.so"
    if lib.is_file():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
    os.close(fd)
    try:
        r = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp, *LIBS], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{cc} failed: {r.stderr.strip()[-500:]}")
        os.replace(tmp, lib)  # atomic: a concurrent process sees the whole library or none
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


@functools.lru_cache(maxsize=1)
def _load() -> tuple[ctypes.CDLL | None, str]:
    """(the library, "") or (None, why not): decided once per process."""
    if os.environ.get("GPTQ_CPU_KERNEL", "1") == "0":
        return None, "turned off by GPTQ_CPU_KERNEL=0"
    from ..cpu import cpu_flags

    flags = set(cpu_flags())
    if not {"avx2", "fma", "f16c"} <= flags:
        return None, f"this CPU lacks AVX2/FMA/F16C (flags: {sorted(flags)})"
    try:
        lib = ctypes.CDLL(str(_build()))
    except (OSError, RuntimeError) as e:
        return None, f"build failed: {e}"
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.gptq_int4_matmul.argtypes = [p, p, i64, i32, p, p, p, p]
    lib.gptq_int4_dequant.argtypes = [p, p, p, p, i64, i64, i64, i32]
    lib.gptq_int4_matmul.restype = lib.gptq_int4_dequant.restype = None
    return lib, ""


def available() -> bool:
    return _load()[0] is not None


def unavailable_reason() -> str:
    return _load()[1]


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


def _fn(name: str):
    lib = _load()[0]
    if lib is None:
        raise RuntimeError(f"the AVX2 int4 kernel is unavailable: {unavailable_reason()}")
    return getattr(lib, name)


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
        self._fn = _fn("gptq_int4_matmul")

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
    _fn("gptq_int4_dequant")(packed.data_ptr(), scale.data_ptr(), zero.data_ptr(), out.data_ptr(), K, N, group,
                             torch.get_num_threads())
    return out

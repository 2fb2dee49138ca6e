"""Builds and loads the C kernels for CPUs without native bf16 (AVX2 + FMA + F16C), once.

Why C: torch's CPU kernels for packed int4 compute in bf16, which such CPUs emulate (issue #10);
and a decoding step of a small model spends much of its time in per-operation overhead, which a
single C call per layer (or per norm) avoids. Sources: ``cpu_int4.c`` (4-bit weights × fp32
activations, exact dequantization), ``cpu_rmsnorm.c`` (RMSNorm rows) and ``cpu_f16.c`` (float16
weights × fp32 activations: the output head while decoding).

Build: the sources are compiled with the system's C compiler (``$CC`` or ``cc``; ``-O3 -mavx2
-mfma -mf16c -fopenmp``) into ``$GPTQ_CACHE`` (default ``~/.cache/gptq``)/kernels/<hash>/ on first
use, a second or two, written under a temporary name and renamed, then loaded with ctypes (the
OpenMP runtime is the one torch already loaded). No compiler, no AVX2/FMA/F16C, or a failed
build: ``available()`` is False, the reason is in ``unavailable_reason()`` (and in a one-time
warning), and callers keep torch's kernels. ``GPTQ_CPU_KERNEL=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

from gptq.runtime import cpu

SOURCES = tuple(Path(__file__).with_name(n) for n in ("cpu_int4.c", "cpu_rmsnorm.c", "cpu_f16.c"))
FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC", "-std=c11")
LIBS = ("-lm",)  # after the sources: linkers that drop unneeded libraries resolve it in order
LIBRARY = "libgptq_cpu.so"


def cache_dir() -> Path:
    return Path(os.environ.get("GPTQ_CACHE", Path.home() / ".cache" / "gptq")) / "kernels"


def _compiler() -> str | None:
    cc = os.environ.get("CC", "cc")
    return shutil.which(cc) or shutil.which("gcc")


def build() -> Path:
    """The compiled library for the current sources and flags (built now if not cached)."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC or install gcc)")
    tag = hashlib.sha256(b"".join(s.read_bytes() for s in SOURCES) + " ".join((cc, *FLAGS, *LIBS)).encode())
    lib = cache_dir() / tag.hexdigest()[:16] / LIBRARY
    if lib.is_file():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
    os.close(fd)
    try:
        r = subprocess.run([cc, *FLAGS, *map(str, SOURCES), "-o", tmp, *LIBS], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{cc} failed: {r.stderr.strip()[-500:]}")
        os.replace(tmp, lib)  # atomic: a concurrent process sees the whole library or none
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    signatures = {
        "gptq_int4_matmul": [p, p, i64, i32, p, p, p, p],
        "gptq_int4_dequant": [p, p, p, p, i64, i64, i64, i32],
        "gptq_rms_norm": [p, p, p, i64, i64, f32, i32],
        "gptq_f16_matmul": [p, p, p, i64, i64, i64, i32],
    }
    for name, argtypes in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, None


@functools.lru_cache(maxsize=1)
def library() -> tuple[ctypes.CDLL | None, str]:
    """(the library, "") or (None, why not): decided once per process."""
    if os.environ.get("GPTQ_CPU_KERNEL", "1") == "0":
        return None, "turned off by GPTQ_CPU_KERNEL=0"
    flags = set(cpu.cpu_flags())
    if not {"avx2", "fma", "f16c"} <= flags:
        return None, f"this CPU lacks AVX2/FMA/F16C (flags: {sorted(flags)})"
    try:
        lib = ctypes.CDLL(str(build()))
        _declare(lib)
    except (OSError, RuntimeError, AttributeError) as e:
        reason = f"build failed: {e}"
        if cpu.fast_dtype() == torch.float32:  # the CPUs this library is for: say so once
            warnings.warn(f"gptq: the AVX2 CPU kernels are unavailable ({reason}); 4-bit layers use torch's "
                          "int4 kernel, which is slower on this CPU", RuntimeWarning, stacklevel=2)
        return None, reason
    return lib, ""


def available() -> bool:
    return library()[0] is not None


def unavailable_reason() -> str:
    return library()[1]


def function(name: str):
    lib = library()[0]
    if lib is None:
        raise RuntimeError(f"the AVX2 CPU kernels are unavailable: {unavailable_reason()}")
    return getattr(lib, name)

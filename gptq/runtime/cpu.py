"""What this CPU does fast, and the int4 CPU weight layout.

Some CPUs multiply bf16 natively (x86 AVX-512 BF16 or AMX, Arm's BF16 extension); on the others
(AVX2-only AMD EPYC / Ryzen, older Intel) torch runs a bf16 matmul several times slower than fp32
(8.6 against 56 GFLOPS on a 2-core EPYC). So the CPU compute dtype follows what the CPU *is*:

    fast_dtype()  →  torch.bfloat16 if the CPU has native bf16 instructions, else float32

decided from its instruction-set flags, never from a timing: a timing flips with the machine's
load, and with it the calibration dtype and the checkpoint's bytes. ``GPTQ_CPU_DTYPE`` (float32 or
bfloat16) overrides it. ``cpu_info()`` gives torch's capability, the flags, a measured fp32/bf16
matmul speed (for reports only) and the choice with its reason.

The second half reads torch's packed-int4 CPU weight (``_convert_weight_to_int4pack_for_cpu``)
back into a dense matrix, so long prompts can run as "dequantize into a reused buffer, then one
dense matmul" without a second copy of the weights. The layout depends on the kernel torch
dispatches to (blocks of 64 output rows on AVX-512, 32 on AVX2, interleaved nibbles otherwise);
``int4pack_layout()`` recognises it by packing a known matrix, and returns None for a layout it
does not know (the caller then keeps the kernel for every shape).
"""

from __future__ import annotations

import functools
import os
import platform
import time
from pathlib import Path

import torch

PROBE_SHAPE = (256, 512, 512)  # M, K, N
CPU_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "amx_bf16", "avx512_fp16", "amx_fp16", "bf16")
NATIVE_BF16 = ("avx512_bf16", "amx_bf16", "bf16")  # x86 (/proc/cpuinfo "flags") and Arm ("Features")


def _gflops(dtype: torch.dtype, repeats: int = 3) -> float:
    M, K, N = PROBE_SHAPE
    g = torch.Generator().manual_seed(0)
    a = torch.randn(M, K, generator=g).to(dtype)
    b = torch.randn(K, N, generator=g).to(dtype)
    a @ b  # warm-up: first-call dispatch and allocation
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * M * K * N / best / 1e9


@functools.lru_cache(maxsize=1)
def probe() -> dict:
    """Measured fp32 and bf16 matmul speed on this CPU (GFLOPS, best of 3, the current threads)."""
    return {"fp32_gflops": round(_gflops(torch.float32), 1), "bf16_gflops": round(_gflops(torch.bfloat16), 1)}


def dtype_choice() -> tuple[torch.dtype, str]:
    """(the CPU compute dtype, why): from ``GPTQ_CPU_DTYPE``, else from the instruction-set flags."""
    forced = os.environ.get("GPTQ_CPU_DTYPE", "").strip().lower()
    if forced:
        if forced not in ("float32", "bfloat16"):
            raise ValueError(f"GPTQ_CPU_DTYPE={forced!r}; use float32 or bfloat16")
        return getattr(torch, forced), f"GPTQ_CPU_DTYPE={forced}"
    native = [f for f in cpu_flags() if f in NATIVE_BF16]
    if native:
        return torch.bfloat16, f"native bf16 instructions ({', '.join(native)})"
    return torch.float32, "no native bf16 instructions (bf16 would be emulated, several times slower)"


def fast_dtype() -> torch.dtype:
    """bf16 where this CPU has native bf16 instructions, else fp32 (``dtype_choice``)."""
    return dtype_choice()[0]


def cpu_flags() -> list[str]:
    """The flags of CPU_FLAGS this CPU reports (/proc/cpuinfo: x86 "flags", Arm "Features")."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    line = next((ln for ln in text.splitlines() if ln.startswith(("flags", "Features"))), "")
    have = set(line.split(":", 1)[-1].split())
    return [f for f in CPU_FLAGS if f in have]


def cpu_info() -> dict:
    """Capability, flags, probe figures and the chosen dtype: recorded beside every timing."""
    dtype, reason = dtype_choice()
    return {"capability": torch.backends.cpu.get_cpu_capability(), "flags": cpu_flags(),
            "processor": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            **probe(), "fast_dtype": str(dtype).removeprefix("torch."), "fast_dtype_reason": reason}


# -- torch's packed-int4 CPU layout ----------------------------------------------------------
def _layouts():
    """Candidate layouts: (rows per block, how a byte pairs two rows)."""
    return ((64, "halves"), (32, "halves"), (16, "halves"), (32, "pairs"), (64, "pairs"), (16, "pairs"))


def _pack_guess(codes: torch.Tensor, block: int, pairing: str) -> torch.Tensor:
    N, K = codes.shape
    c = codes.view(N // block, block, K).permute(0, 2, 1)  # [N/block, K, block]
    if pairing == "halves":  # byte i: row i (low nibble) and row i + block/2 (high)
        lo, hi = c[..., : block // 2], c[..., block // 2 :]
    else:  # byte i: rows 2i (low) and 2i + 1 (high)
        lo, hi = c[..., 0::2], c[..., 1::2]
    return (lo | (hi << 4)).to(torch.uint8).contiguous()


@functools.lru_cache(maxsize=1)
def int4pack_layout() -> tuple[int, str] | None:
    """The (block, pairing) of the packed int4 weight on this CPU's kernel, or None if unknown."""
    N, K = 128, 64
    codes = torch.randint(0, 16, (N, K), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1).view(torch.uint8).flatten()
    for block, pairing in _layouts():
        if torch.equal(_pack_guess(codes, block, pairing).flatten(), packed):
            return block, pairing
    return None


def _codes_blocked(packed: torch.Tensor, N: int, K: int, layout: tuple[int, str]) -> torch.Tensor:
    """[N/block, K, block] uint8 codes: element [b, k, i] is the code of row b·block + i, column k."""
    block, pairing = layout
    u = packed.view(torch.uint8).view(N // block, K, block // 2)
    lo, hi = u & 15, u >> 4  # [N/block, K, block/2]
    if pairing == "halves":
        return torch.cat([lo, hi], dim=-1)
    return torch.stack([lo, hi], dim=-1).view(N // block, K, block)


def int4pack_codes_t(packed: torch.Tensor, N: int, K: int, layout: tuple[int, str],
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """The codes of a packed int4 CPU weight as a [K, N] matrix (Wᵀ's layout), into ``out``
    (any float dtype) if given. Inverse of the packing for the layout ``int4pack_layout()``."""
    c = _codes_blocked(packed, N, K, layout).permute(1, 0, 2)  # [K, N/block, block]
    if out is None:
        return c.reshape(K, N)
    out.view(K, N // layout[0], layout[0]).copy_(c)
    return out


def int4pack_dequantize_t(packed: torch.Tensor, N: int, K: int, layout: tuple[int, str], sub: int,
                          scale: torch.Tensor, offset: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Ŵᵀ [K, N] = codes·scale + offset into ``out``: the codes are converted in place, then one
    fused multiply-add per element (the fastest of the orders timed in bench cpu-kernel's shapes).

    scale, offset: [K/sub, N] per sub-group of ``sub`` input rows, in out's dtype."""
    int4pack_codes_t(packed, N, K, layout, out=out)
    grouped = out.view(K // sub, sub, N)
    torch.addcmul(offset[:, None, :], grouped, scale[:, None, :], out=grouped)
    return out

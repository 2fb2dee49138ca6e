"""What this CPU does fast, measured once per process, and the int4 CPU weight layout.

Some x86 CPUs multiply bf16 natively (AVX-512 BF16, AMX); on the others (AVX2-only AMD EPYC /
Ryzen, older Intel) torch runs a bf16 matmul several times slower than fp32 (issue #10: 8.6
against 56 GFLOPS on a 2-core EPYC). So the CPU compute dtype is chosen by measuring:

    fast_dtype()  →  torch.bfloat16 if a bf16 matmul is at least as fast as fp32, else float32

The probe multiplies a [256, 512] by a [512, 512] matrix a few times in each dtype (a few ms in
all) and is cached for the process. ``cpu_info()`` gives the figures plus torch's reported
capability and the /proc/cpuinfo flags, for reports and benchmarks.

The second half reads torch's packed-int4 CPU weight (``_convert_weight_to_int4pack_for_cpu``)
back into a dense matrix, so long prompts can run as "dequantize into a reused buffer, then one
dense matmul" without a second copy of the weights. The layout depends on the kernel torch
dispatches to (blocks of 64 output rows on AVX-512, 32 on AVX2, interleaved nibbles otherwise);
``int4pack_layout()`` recognises it by packing a known matrix, and returns None for a layout it
does not know (the caller then keeps the kernel for every shape).
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import torch

PROBE_SHAPE = (256, 512, 512)  # M, K, N
CPU_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "amx_bf16", "avx512_fp16", "amx_fp16")


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


def fast_dtype() -> torch.dtype:
    """bf16 where this CPU multiplies it at least as fast as fp32, else fp32."""
    p = probe()
    return torch.bfloat16 if p["bf16_gflops"] >= p["fp32_gflops"] else torch.float32


def cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    have = set(line.split(":", 1)[-1].split())
    return [f for f in CPU_FLAGS if f in have]


def cpu_info() -> dict:
    """Capability, flags, probe figures and the chosen dtype: recorded beside every timing."""
    import platform

    return {"capability": torch.backends.cpu.get_cpu_capability(), "flags": cpu_flags(),
            "processor": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            **probe(), "fast_dtype": str(fast_dtype()).removeprefix("torch.")}


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

"""Fused dequantize-matmul for packed GPTQ weights, in Triton.

    y[m, n] = Σ_k x[m, k] · s[k // G, n] · (q[k, n] − z[k // G, n])

The packed weights stay packed in global memory: each program loads int32 words, unpacks
2/4/8-bit codes in registers, applies its group's scale and zero, and accumulates in fp32.
Act-order checkpoints are handled at load time (``QuantLinear``): input rows are sorted by
g_idx and the activations permuted once per call, so groups are contiguous runs of G rows and
a K-tile never straddles two groups (BLOCK_K divides G) — one scale/zero load per tile, no
per-element gather in the hot loop.

Two shapes of launch:
  * ``gemm``  (M > 8): [BLOCK_M, BLOCK_K] × [BLOCK_K, BLOCK_N] tiles through ``tl.dot``.
  * ``gemv``  (M ≤ 8): one row of x per program, split-K across programs (fp32 atomics), so a
                        batch-1 decode keeps every SM busy while reading the weights once.

Configs are autotuned on real GPUs (H100-class first); ``autotune=False`` or the Triton
interpreter (TRITON_INTERPRET=1, used by the CPU tests) run one fixed config instead.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _dequant_tile(qw_ptr, qz_ptr, s_ptr, offs_k, offs_n, mask_k, mask_n, g, N, ZN,
                  BITS: tl.constexpr, ZERO_OFFSET: tl.constexpr):
    """[BLOCK_K, BLOCK_N] float32 weights for rows offs_k (all in group g) and columns offs_n."""
    PER: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    words = tl.load(qw_ptr + (offs_k // PER)[:, None] * N + offs_n[None, :],
                    mask=mask_k[:, None] & mask_n[None, :], other=0)  # [BK, BN] int32
    q = (words >> ((offs_k % PER) * BITS)[:, None]) & MASK
    zw = tl.load(qz_ptr + g * ZN + offs_n // PER, mask=mask_n, other=0)  # [BN]
    z = ((zw >> ((offs_n % PER) * BITS)) & MASK) + ZERO_OFFSET
    s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)  # [BN]
    return (q - z[None, :]).to(tl.float32) * s[None, :]


@triton.jit
def _gemm_kernel(x_ptr, qw_ptr, qz_ptr, s_ptr, y_ptr, M, N, K, ZN, G,
                 BITS: tl.constexpr, ZERO_OFFSET: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # [BM, BK]
        w = _dequant_tile(qw_ptr, qz_ptr, s_ptr, offs_k, offs_n, mask_k, mask_n, k0 // G, N, ZN,
                          BITS, ZERO_OFFSET)  # [BK, BN]
        acc += tl.dot(a, w.to(a.dtype))
    tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _gemv_kernel(x_ptr, qw_ptr, qz_ptr, s_ptr, y_ptr, M, N, K, ZN, G, K_PER_SPLIT,
                 BITS: tl.constexpr, ZERO_OFFSET: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)  # never a tile wholly past K: its group would not exist
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(x_ptr + m * K + offs_k, mask=mask_k, other=0.0).to(tl.float32)  # [BK]
        w = _dequant_tile(qw_ptr, qz_ptr, s_ptr, offs_k, offs_n, mask_k, mask_n, k0 // G, N, ZN,
                          BITS, ZERO_OFFSET)
        acc += tl.sum(a[:, None] * w, axis=0)
    tl.atomic_add(y_ptr + m * N + offs_n, acc, mask=mask_n)


GEMM_CONFIGS = [  # tuned for H100-class GPUs: large N tiles for bandwidth, 3-4 stages of pipelining
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 256, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 32}, num_warps=8, num_stages=3),
]
GEMV_CONFIGS = [
    triton.Config({"BLOCK_N": 64, "BLOCK_K": 32}, num_warps=2),
    triton.Config({"BLOCK_N": 128, "BLOCK_K": 32}, num_warps=4),
    triton.Config({"BLOCK_N": 256, "BLOCK_K": 32}, num_warps=4),
    triton.Config({"BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4),
]


def _prune_k(configs, named_args, **kwargs):
    """BLOCK_K must divide the group size G so a tile never straddles two groups."""
    G = named_args["G"]
    ok = [c for c in configs if G % c.kwargs["BLOCK_K"] == 0]
    return ok or configs[:1]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_TUNED: dict = {}


def _autotuned(kind: str):
    if kind not in _TUNED:
        if kind == "gemm":
            _TUNED[kind] = triton.autotune(GEMM_CONFIGS, key=["N", "K", "BITS", "G"],
                                           prune_configs_by={"early_config_prune": _prune_k})(_gemm_kernel)
        else:
            _TUNED[kind] = triton.autotune(GEMV_CONFIGS, key=["N", "K", "BITS", "G"],
                                           prune_configs_by={"early_config_prune": _prune_k},
                                           reset_to_zero=["y_ptr"])(_gemv_kernel)
    return _TUNED[kind]


def _block_k(G: int, want: int) -> int:
    bk = want
    while bk > 16 and G % bk:
        bk //= 2
    if G % bk:
        raise ValueError(f"group size {G} must be a multiple of 16 for the Triton kernel")
    return bk


def dequant_matmul(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                   group_size: int, bits: int, zero_offset: int = 1, autotune: bool = True) -> torch.Tensor:
    """x [M, K] (rows of K sorted so group g is rows [g·G, (g+1)·G)) → [M, N] in x's dtype.

    group_size: G, or -1 for one group over all of K. zero_offset: 1 for checkpoint_format
    "gptq" (v1 stores zero − 1), 0 for "gptq_v2".
    """
    if bits not in (2, 4, 8):
        raise ValueError(f"the Triton kernel handles 2, 4 and 8 bits, not {bits}")
    M, K = x.shape
    N = qweight.shape[1]
    per = 32 // bits
    G = (1 << 30) if group_size == -1 else group_size  # -1: every tile is in group 0
    if qweight.shape != (K // per, N) or K % per:
        raise ValueError(f"qweight has shape {tuple(qweight.shape)}, expected ({K // per}, {N}) for K={K}")
    n_groups = 1 if group_size == -1 else -(-K // G)
    if scales.shape != (n_groups, N) or qzeros.shape != (n_groups, N // per):
        raise ValueError(f"scales {tuple(scales.shape)} / qzeros {tuple(qzeros.shape)} do not match "
                         f"{n_groups} groups × {N} columns")
    x = x.contiguous()
    tune = autotune and not _interpreting()
    args = (qweight, qzeros, scales)
    if M <= 8:
        y = torch.zeros(M, N, device=x.device, dtype=torch.float32)
        if tune:
            k_split = 256 if K >= 1024 else K
            fn = _autotuned("gemv")
            grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(K, k_split), M)  # noqa: E731
            fn[grid](x, *args, y, M, N, K, N // per, G, k_split, BITS=bits, ZERO_OFFSET=zero_offset)
        else:
            bk = _block_k(G, 32)
            bn = 64
            k_split = max(bk, (min(K, 256) // bk) * bk)
            grid = (triton.cdiv(N, bn), triton.cdiv(K, k_split), M)
            _gemv_kernel[grid](x, *args, y, M, N, K, N // per, G, k_split, BITS=bits, ZERO_OFFSET=zero_offset,
                               BLOCK_N=bn, BLOCK_K=bk)
        return y.to(x.dtype)
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    if tune:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))  # noqa: E731
        _autotuned("gemm")[grid](x, *args, y, M, N, K, N // per, G, BITS=bits, ZERO_OFFSET=zero_offset)
    else:
        bm, bn, bk = 16, 64, _block_k(G, 32)
        grid = (triton.cdiv(M, bm), triton.cdiv(N, bn))
        _gemm_kernel[grid](x, *args, y, M, N, K, N // per, G, BITS=bits, ZERO_OFFSET=zero_offset,
                           BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    return y

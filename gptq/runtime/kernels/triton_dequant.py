"""Fused dequantize-matmul for packed GPTQ weights, in Triton.

    y[m, n] = Σ_k x[m, k] · s[k // G, n] · (q[k, n] − z[k // G, n])

The packed weights stay packed in global memory: each program loads int32 words, unpacks
2/4/8-bit codes in registers, applies its group's scale and zero, and accumulates in fp32.
Act-order checkpoints are handled at load time (``QuantLinear``): input rows are sorted by
g_idx and the activations permuted once per call, so groups are contiguous runs of G rows and
a K-tile never straddles two groups (BLOCK_K divides G) — one scale/zero load per tile, no
per-element gather in the hot loop.

Three shapes of launch:
  * ``gemv``  (M ≤ 8): one row of x per program, split-K across programs (fp32 atomics), so a
                        batch-1 decode keeps every SM busy while reading the weights once; each
                        int32 word is loaded once and unpacked in registers, and the zero point
                        is applied once per group (s·(Σ a·q − z·Σ a)).
  * ``gemm``  (8 < M < DEQUANT_MIN_ROWS): [BLOCK_M, BLOCK_K] × [BLOCK_K, BLOCK_N] tiles through ``tl.dot``,
                        K split across programs (fp32 atomics) on a GPU: few rows make few tiles.
  * dequantize + cuBLAS (M ≥ DEQUANT_MIN_ROWS, on a GPU): the weight is dequantized once into
                        the activations' dtype and multiplied by torch; for many rows the matmul
                        dominates and the fused tiles would dequantize it once per row tile.

Configs are autotuned on real GPUs (H100-class first); ``autotune=False`` or the Triton
interpreter (TRITON_INTERPRET=1, used by the CPU tests) run one fixed config instead.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _tile_range(AXIS: tl.constexpr, size, BLOCK: tl.constexpr):
    """This program's BLOCK indices along launch-grid axis AXIS, and which of them are below size."""
    offs = tl.program_id(AXIS) * BLOCK + tl.arange(0, BLOCK)
    return offs, offs < size


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
def _gemm_splitk_kernel(x_ptr, qw_ptr, qz_ptr, s_ptr, y_ptr, M, N, K, ZN, G,
                        BITS: tl.constexpr, ZERO_OFFSET: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K_SPLIT: tl.constexpr):
    """[BLOCK_M, BLOCK_K] × [BLOCK_K, BLOCK_N] tiles through ``tl.dot``, K split across programs
    (fp32 atomics into y): for a few rows (9..63) the M × N tiles alone would be too few programs
    to keep every SM reading the weight."""
    offs_m, mask_m = _tile_range(0, M, BLOCK_M)
    offs_n, mask_n = _tile_range(1, N, BLOCK_N)
    pid_k = tl.program_id(2)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * K_SPLIT
    k_end = tl.minimum(k_start + K_SPLIT, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = _dequant_tile(qw_ptr, qz_ptr, s_ptr, offs_k, offs_n, mask_k, mask_n, k0 // G, N, ZN, BITS, ZERO_OFFSET)
        acc += tl.dot(a, w.to(a.dtype))
    tl.atomic_add(y_ptr + offs_m[:, None] * N + offs_n[None, :], acc, mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _gemv_words_kernel(x_ptr, qw_ptr, qz_ptr, s_ptr, y_ptr, M, N, K, ZN, G,
                       BITS: tl.constexpr, ZERO_OFFSET: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K_SPLIT: tl.constexpr):
    """The batch-1..8 kernel: each int32 word is loaded once ([BLOCK_K / PER, BLOCK_N] per tile)
    and unpacked into its PER codes in registers, instead of loading every word PER times."""
    PER: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    WK: tl.constexpr = BLOCK_K // PER  # words per column per tile
    offs_n, mask_n = _tile_range(0, N, BLOCK_N)
    pid_k = tl.program_id(1)
    m = tl.program_id(2)
    shifts = tl.arange(0, PER) * BITS  # [PER]
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    k_start = pid_k * K_SPLIT
    k_end = tl.minimum(k_start + K_SPLIT, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_w = k0 // PER + tl.arange(0, WK)  # [WK] word rows
        mask_w = offs_w < K // PER
        words = tl.load(qw_ptr + offs_w[:, None] * N + offs_n[None, :], mask=mask_w[:, None] & mask_n[None, :],
                        other=0)  # [WK, BN]
        q = (words[:, None, :] >> shifts[None, :, None]) & MASK  # [WK, PER, BN]
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x_ptr + m * K + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)  # [BK]
        a3 = tl.reshape(a, (WK, PER))  # row k = word·PER + position, as packed
        g = k0 // G
        zw = tl.load(qz_ptr + g * ZN + offs_n // PER, mask=mask_n, other=0)
        z = (((zw >> ((offs_n % PER) * BITS)) & MASK) + ZERO_OFFSET).to(tl.float32)  # [BN]
        s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)  # [BN]
        # Σ_k a_k·s·(q_k − z) = s·(Σ_k a_k q_k − z·Σ_k a_k): one multiply-add per weight
        dot = tl.sum(tl.sum(a3[:, :, None] * q.to(tl.float32), axis=1), axis=0)  # [BN]
        acc += s * (dot - z * tl.sum(a, axis=0))
    tl.atomic_add(y_ptr + m * N + offs_n, acc, mask=mask_n)


@triton.jit
def _dequant_kernel(qw_ptr, qz_ptr, s_ptr, w_ptr, N, K, ZN, G,
                    BITS: tl.constexpr, ZERO_OFFSET: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """W [K, N] in the activations' dtype, for the large-batch path (dequantize, then cuBLAS)."""
    offs_k, mask_k = _tile_range(0, K, BLOCK_K)
    offs_n, mask_n = _tile_range(1, N, BLOCK_N)
    w = _dequant_tile(qw_ptr, qz_ptr, s_ptr, offs_k, offs_n, mask_k, mask_n, (tl.program_id(0) * BLOCK_K) // G, N, ZN,
                      BITS, ZERO_OFFSET)
    tl.store(w_ptr + offs_k[:, None] * N + offs_n[None, :], w.to(w_ptr.dtype.element_ty),
             mask=mask_k[:, None] & mask_n[None, :])


GEMV_CONFIGS = [  # (N tile, K tile, K per program) × warps × pipeline stages; K_SPLIT sets the atomics' split
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "K_SPLIT": ks}, num_warps=w, num_stages=st)
    for bn, bk, ks, w, st in [
        (64, 128, 512, 4, 3), (128, 128, 512, 4, 3), (128, 64, 512, 4, 4), (256, 64, 512, 8, 3),
        (64, 128, 1024, 4, 4), (128, 128, 1024, 4, 4), (128, 128, 256, 4, 3), (64, 64, 256, 2, 4),
        (256, 128, 1024, 8, 4), (32, 256, 1024, 4, 3), (64, 256, 2048, 4, 3), (128, 32, 256, 4, 3),
    ]
]
SPLITK_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "K_SPLIT": ks}, num_warps=w, num_stages=st)
    for bm, bn, bk, ks, w, st in [
        (16, 64, 64, 512, 4, 3), (16, 128, 64, 512, 4, 3), (16, 64, 128, 1024, 4, 3), (16, 128, 128, 1024, 8, 3),
        (32, 64, 64, 512, 4, 3), (32, 128, 64, 1024, 4, 3), (64, 64, 64, 512, 4, 3), (64, 128, 64, 1024, 8, 3),
        (16, 64, 64, 256, 4, 4), (32, 64, 128, 2048, 4, 3),
    ]
]
# from this many rows on, dequantize the weight once (one pass over it) and let cuBLAS multiply:
# the fused GEMM re-dequantizes the weight for every row tile (H100: slower than fp16 from 16 rows)
DEQUANT_MIN_ROWS = int(os.environ.get("GPTQ_TRITON_DEQUANT_ROWS", "64"))
GEMV_MAX_ROWS = 8


def _prune_k(configs, named_args, **kwargs):
    """BLOCK_K must divide the group size G so a tile never straddles two groups (and a program's
    share of K, K_SPLIT, must be whole tiles): a config whose tile does not fit G gets the largest
    tile that does (G = 32 keeps 32-wide tiles, for example)."""
    G = named_args["G"]
    out, seen = [], set()
    for c in configs:
        kw = dict(c.kwargs)
        if G % kw["BLOCK_K"]:
            kw["BLOCK_K"] = _block_k(G, kw["BLOCK_K"])
        if kw.get("K_SPLIT", kw["BLOCK_K"]) % kw["BLOCK_K"]:
            continue
        key = (tuple(sorted(kw.items())), c.num_warps, c.num_stages)
        if key not in seen:
            seen.add(key)
            out.append(triton.Config(kw, num_warps=c.num_warps, num_stages=c.num_stages))
    return out


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_TUNED: dict = {}


def _autotuned(kind: str):
    if kind not in _TUNED:
        if kind == "splitk":
            _TUNED[kind] = triton.autotune(SPLITK_CONFIGS, key=["M", "N", "K", "BITS", "G"],
                                           prune_configs_by={"early_config_prune": _prune_k},
                                           reset_to_zero=["y_ptr"])(_gemm_splitk_kernel)
        else:
            _TUNED[kind] = triton.autotune(GEMV_CONFIGS, key=["N", "K", "BITS", "G"],
                                           prune_configs_by={"early_config_prune": _prune_k},
                                           reset_to_zero=["y_ptr"])(_gemv_words_kernel)
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
    if M >= DEQUANT_MIN_ROWS:
        W = torch.empty(K, N, device=x.device, dtype=x.dtype)
        bk = _block_k(G, 64)
        _dequant_kernel[(triton.cdiv(K, bk), triton.cdiv(N, 128))](*args, W, N, K, N // per, G, BITS=bits,
                                                                   ZERO_OFFSET=zero_offset, BLOCK_N=128, BLOCK_K=bk)
        return x @ W
    if M <= GEMV_MAX_ROWS:
        y = torch.zeros(M, N, device=x.device, dtype=torch.float32)
        if tune:
            fn = _autotuned("gemv")
            grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(K, meta["K_SPLIT"]), M)  # noqa: E731
            fn[grid](x, *args, y, M, N, K, N // per, G, BITS=bits, ZERO_OFFSET=zero_offset)
        else:
            bk = _block_k(G, 32)
            bn = 64
            k_split = max(bk, (min(K, 256) // bk) * bk)
            grid = (triton.cdiv(N, bn), triton.cdiv(K, k_split), M)
            _gemv_words_kernel[grid](x, *args, y, M, N, K, N // per, G, BITS=bits, ZERO_OFFSET=zero_offset,
                                     BLOCK_N=bn, BLOCK_K=bk, K_SPLIT=k_split)
        return y.to(x.dtype)
    # a few rows: split-K tiles (M rows per program), fp32 atomics
    y = torch.zeros(M, N, device=x.device, dtype=torch.float32)
    if tune:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]),  # noqa: E731
                             triton.cdiv(K, meta["K_SPLIT"]))
        _autotuned("splitk")[grid](x, *args, y, M, N, K, N // per, G, BITS=bits, ZERO_OFFSET=zero_offset)
    else:
        bm, bn, bk = 16, 64, _block_k(G, 32)
        k_split = max(bk, (min(K, 256) // bk) * bk)
        grid = (triton.cdiv(M, bm), triton.cdiv(N, bn), triton.cdiv(K, k_split))
        _gemm_splitk_kernel[grid](x, *args, y, M, N, K, N // per, G, BITS=bits, ZERO_OFFSET=zero_offset,
                                  BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, K_SPLIT=k_split)
    return y.to(x.dtype)

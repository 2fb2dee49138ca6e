"""The GGML block types' byte layouts: a solved matrix (codes, group scales and zeros, the
K-quants' stored scales) as the blocks a .gguf file holds, and back through the ``gguf`` package's
reference dequantizer. Layouts: ggml's ``ggml-common.h`` block structs (``block_q4_0`` ...
``block_q6_K``); the types and their arithmetic: ``gptq.core.grids.ggml``.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType, quants

from gptq.core.grids.ggml import TYPES, KScales


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


def _bit_planes(b: np.ndarray) -> np.ndarray:
    """[..., 256] bits → [..., 32] bytes: bit s of byte l is b[32·s + l] (q5_k's qh, q3_k's hmask)."""
    planes = b.reshape(*b.shape[:-1], 8, 32)
    return (planes << np.arange(8, dtype=np.uint8)[:, None]).sum(axis=-2, dtype=np.uint8)


def _crumbs(q: np.ndarray) -> np.ndarray:
    """[..., 256] codes → [..., 64] bytes of their low 2 bits: in each half of 128, byte l holds
    q[l], q[l + 32], q[l + 64], q[l + 96] at bits 0, 2, 4, 6 (q2_k's and q3_k's qs)."""
    c = (q & 3).reshape(*q.shape[:-1], 2, 4, 32)  # [.., half, shift, 32]
    return (c << (2 * np.arange(4, dtype=np.uint8))[:, None]).sum(axis=-2, dtype=np.uint8).reshape(*q.shape[:-1], 64)


def _q3_k_scales(sc: np.ndarray) -> np.ndarray:
    """[..., 16] scales in [−32, 31] → q3_k's 12 bytes of l = sc + 32: byte j < 8 holds the low
    nibbles of l[j] and l[j + 8]; byte 8 + i holds the top 2 bits of l[i], l[i + 4], l[i + 8],
    l[i + 12] at bits 0, 2, 4, 6."""
    u = (sc + 32).astype(np.uint8)
    low = (u[..., :8] & 15) | ((u[..., 8:] & 15) << 4)  # [.., 8]
    top = (u >> 4).reshape(*u.shape[:-1], 4, 4)  # [.., j // 4, j % 4]
    high = (top << (2 * np.arange(4, dtype=np.uint8))[:, None]).sum(axis=-2, dtype=np.uint8)  # [.., 4]
    return np.concatenate([low, high], axis=-1)


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
    if t.kind in ("sym", "min", "table"):  # (iq4_nl: q4_0's layout, its codes index the table)
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
    elif t.kind == "kquant3":  # hmask (bit 2 of each code), qs (bits 0-1), scales, d
        blocks = [_bit_planes((q >> 2) & 1), _crumbs(q), _q3_k_scales(sc), d]
    else:
        mn = state.mn.permute(2, 0, 1).numpy().astype(np.uint8)
        sc = sc.astype(np.uint8)
        dmin = _f16_bytes(state.dmin.T.contiguous())[..., None].reshape(out, -1, 2)
        if t.bits == 2:  # scales (sc | mn << 4), qs, d, dmin
            blocks = [(sc & 15) | (mn << 4), _crumbs(q), d, dmin]
        else:
            packed = np.concatenate([
                (sc[..., :4] & 63) | ((sc[..., 4:] >> 4) << 6),
                (mn[..., :4] & 63) | ((mn[..., 4:] >> 4) << 6),
                (sc[..., 4:] & 15) | ((mn[..., 4:] & 15) << 4)], axis=-1)  # [out, units, 12]
            pairs = q.reshape(out, -1, 4, 2, 32)  # [.., 64-chunk, low/high, 32]
            qs = ((pairs[..., 0, :] & 15) | ((pairs[..., 1, :] & 15) << 4)).reshape(out, -1, 128)
            blocks = [d, dmin, packed]
            if t.bits == 5:
                blocks.append(_bit_planes((q >> 4) & 1))  # bit s of qh[l] = high bit of group s, position l
            blocks.append(qs)
    return torch.from_numpy(np.concatenate(blocks, axis=-1).reshape(out, -1).copy())


def dequantize_blocks(name: str, blocks: torch.Tensor, n: int) -> torch.Tensor:
    """[out, n] float32 through the ``gguf`` package's reference dequantizer."""

    w = quants.dequantize(blocks.numpy(), GGMLQuantizationType[name.upper()])
    return torch.from_numpy(np.ascontiguousarray(w)).reshape(blocks.shape[0], n)

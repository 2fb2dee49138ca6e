"""Bit packing of integer codes into int32 words, in the layout GPTQ loaders read.

Every width is the same little-endian bit stream: value i of a run occupies stream bits
``bits*i .. bits*i + bits - 1``, and stream bit p lives in word p // 32 at bit p % 32.
For 2/4/8 bits that is "32/bits values per word, lowest bits first"; for 3 bits it is the
3-words-per-32-values scheme of the format document (value 10 straddles words 0 and 1).

    qweight [in·bits/32, out]  packs codes along the input dim   (codes given as [in, out])
    qzeros  [groups, out·bits/32] packs zeros along the output dim
"""

from __future__ import annotations

import math
import sys

import torch


def _check(n: int, bits: int, what: str) -> None:
    if (n * bits) % 32:
        per = 32 // math.gcd(bits, 32)
        raise ValueError(f"{what}: {n} values of {bits} bits do not fill whole int32 words; "
                         f"the size must be a multiple of {per}")


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack along dim 0: [n, m] ints in [0, 2**bits) → [n·bits/32, m] int32."""
    n, m = values.shape
    _check(n, bits, "pack")
    if values.numel() and (int(values.min()) < 0 or int(values.max()) >= 2**bits):  # ints: no uint8 wrap-around
        raise ValueError(f"pack: values outside [0, {2**bits - 1}] for {bits}-bit packing")
    if 8 % bits == 0 and sys.byteorder == "little":
        return _pack_bytes(values, bits)
    return _pack_stream(values, bits)


def _pack_stream(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Any width, bit by bit along the stream (the definition; used for 3 bits)."""
    n, m = values.shape
    v = values.to(torch.int64)
    words = torch.zeros(n * bits // 32, m, dtype=torch.int64, device=values.device)
    for b in range(bits):
        pos = torch.arange(n, device=values.device) * bits + b  # stream bit of bit b of each value
        bit = (v >> b) & 1  # [n, m]
        words.index_add_(0, pos // 32, bit << (pos % 32)[:, None])
    return (words - ((words >> 31) << 32)).to(torch.int32)  # wrap into signed int32


def _pack_bytes(values: torch.Tensor, bits: int) -> torch.Tensor:
    """2/4/8 bits: whole values per byte, then 4 little-endian bytes viewed as one int32 word.
    Works in uint8 throughout (an [in, out] layer never has an int64 copy)."""
    n, m = values.shape
    per = 8 // bits  # values per byte
    v = values.T.to(torch.uint8).reshape(m, n // per, per)  # [out, bytes, per]
    byte = v[:, :, 0].clone(memory_format=torch.contiguous_format)
    for j in range(1, per):
        byte |= v[:, :, j] << (bits * j)
    return byte.view(torch.int32).T.contiguous()  # [out, words] → [words, out]


def unpack_rows(words: torch.Tensor, bits: int, n: int | None = None) -> torch.Tensor:
    """Inverse of ``pack_rows``: [w, m] int32 → [w·32/bits, m] int32 codes."""
    nw, m = words.shape
    n = nw * 32 // bits if n is None else n
    if 8 % bits == 0 and sys.byteorder == "little":
        per, mask = 8 // bits, (1 << bits) - 1
        b = words.T.contiguous().view(torch.uint8)  # [m, nw·4] bytes, lowest first
        codes = torch.stack([(b >> (bits * j)) & mask for j in range(per)], dim=2)  # [m, bytes, per]
        return codes.reshape(m, -1)[:, :n].T.to(torch.int32)
    return _unpack_stream(words, bits, n)


def _unpack_stream(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    m = words.shape[1]
    w = words.to(torch.int64) & 0xFFFFFFFF  # [nw, m] unsigned
    out = torch.zeros(n, m, dtype=torch.int64, device=words.device)
    for b in range(bits):
        pos = torch.arange(n, device=words.device) * bits + b
        out |= ((w[pos // 32] >> (pos % 32)[:, None]) & 1) << b
    return out.to(torch.int32)


def pack_qweight(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [out, in] → qweight [in·bits/32, out]."""
    return pack_rows(codes.T.contiguous(), bits)


def unpack_qweight(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """qweight [in·bits/32, out] → codes [in, out]."""
    return unpack_rows(qweight, bits)


def pack_qzeros(zeros: torch.Tensor, bits: int, checkpoint_format: str = "gptq") -> torch.Tensor:
    """zeros [groups, out] → qzeros [groups, out·bits/32]; v1 ("gptq") stores zero − 1."""
    z = zeros.to(torch.int64) - (1 if checkpoint_format == "gptq" else 0)
    if z.numel() and z.min() < 0:
        raise ValueError("pack_qzeros: a zero point of 0 cannot be stored in checkpoint_format 'gptq' "
                         "(v1 stores zero - 1); write 'gptq_v2' instead")
    return pack_rows(z.T.contiguous(), bits).T.contiguous()


def unpack_qzeros(qzeros: torch.Tensor, bits: int, checkpoint_format: str = "gptq") -> torch.Tensor:
    """qzeros [groups, out·bits/32] → zeros [groups, out] (v1 adds the 1 back)."""
    z = unpack_rows(qzeros.T.contiguous(), bits).T
    return (z + (1 if checkpoint_format == "gptq" else 0)).to(torch.int32)


def dequantize_packed(qweight, qzeros, scales, g_idx, bits: int, checkpoint_format: str = "gptq") -> torch.Tensor:
    """W [out, in] in float32 from packed tensors:  W[n, k] = s[g_idx[k], n]·(q[k, n] − z[g_idx[k], n])."""
    q = unpack_qweight(qweight, bits).float()  # [in, out]
    z = unpack_qzeros(qzeros, bits, checkpoint_format).float()  # [groups, out]
    g = g_idx.long()
    return (scales.float()[g] * (q - z[g])).T.contiguous()  # [out, in]

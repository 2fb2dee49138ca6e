"""Packing against the format document, bit for bit."""

import pytest
import torch

from gptq.core.pack import (
    _pack_stream,
    _unpack_stream,
    dequantize_packed,
    pack_qweight,
    pack_qzeros,
    pack_rows,
    unpack_qweight,
    unpack_qzeros,
    unpack_rows,
)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_round_trip(bits):
    codes = torch.randint(0, 2**bits, (64, 96), generator=torch.Generator().manual_seed(bits), dtype=torch.int32)
    q = pack_qweight(codes, bits)  # codes [out=64, in=96]
    assert q.shape == (96 * bits // 32, 64) and q.dtype == torch.int32
    assert torch.equal(unpack_qweight(q, bits), codes.T)
    zeros = torch.randint(1, 2**bits, (3, 64), dtype=torch.int32)
    qz = pack_qzeros(zeros, bits)
    assert qz.shape == (3, 64 * bits // 32)
    assert torch.equal(unpack_qzeros(qz, bits), zeros)
    assert torch.equal(unpack_qzeros(pack_qzeros(zeros - 1, bits, "gptq_v2"), bits, "gptq_v2"), zeros - 1)


def test_known_words():
    sym4 = pack_qzeros(torch.full((2, 16), 8), 4)
    assert (sym4 == 0x77777777).all()
    sym8 = pack_qzeros(torch.full((1, 8), 128), 8)
    assert (sym8 == 0x7F7F7F7F).all()
    # 4-bit: row 8r+j in bits 4j..4j+3 of qweight[r]
    codes = torch.arange(8, dtype=torch.int32).reshape(8, 1)  # in = 8, out = 1
    assert pack_rows(codes, 4).item() == 0x76543210
    # 2-bit: 16 per word, lowest first
    assert pack_rows(torch.tensor([[1]] + [[0]] * 15), 2).item() == 1
    assert pack_rows(torch.tensor([[0]] * 15 + [[3]]), 2).item() == 0xC0000000 - (1 << 32)  # bits 30-31, as int32


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_byte_fast_path_equals_the_bit_stream_definition(bits):
    g = torch.Generator().manual_seed(bits)
    v = torch.randint(0, 2**bits, (96, 40), generator=g, dtype=torch.int32)
    v[0], v[-1] = 2**bits - 1, 0  # top bits set: the word's sign bit
    words = pack_rows(v, bits)
    assert words.dtype == torch.int32 and words.shape == (96 * bits // 32, 40)
    assert torch.equal(words, _pack_stream(v, bits))
    assert torch.equal(unpack_rows(words, bits), v)
    assert torch.equal(_unpack_stream(words, bits, 96), v)
    # the solver hands over uint8 codes: 255 is a valid 8-bit code, not an overflow
    assert torch.equal(pack_rows(v.to(torch.uint8), bits), words)


def test_three_bit_layout_from_the_document():
    # value 10 straddles words 0 and 1; value 21 straddles words 1 and 2
    v = torch.zeros(32, 1, dtype=torch.int64)
    v[10] = 0b111
    w = pack_rows(v, 3).flatten().tolist()
    assert (w[0] & 0xFFFFFFFF) == 0b11 << 30 and w[1] == 1 and w[2] == 0
    v = torch.zeros(32, 1, dtype=torch.int64)
    v[21] = 0b111
    w = pack_rows(v, 3).flatten().tolist()
    assert w[0] == 0 and (w[1] & 0xFFFFFFFF) == 1 << 31 and w[2] == 0b11
    v = torch.zeros(32, 1, dtype=torch.int64)
    v[0], v[11], v[22] = 5, 5, 5
    w = pack_rows(v, 3).flatten().tolist()
    assert w == [5, 5 << 1, 5 << 2]


def test_v1_cannot_store_zero_point_zero():
    with pytest.raises(ValueError, match="gptq_v2"):
        pack_qzeros(torch.zeros(1, 8, dtype=torch.int32), 4, "gptq")


def test_pack_rejects_bad_sizes_and_values():
    with pytest.raises(ValueError, match="multiple of 32"):
        pack_rows(torch.zeros(16, 2, dtype=torch.int32), 3)
    with pytest.raises(ValueError, match="outside"):
        pack_rows(torch.full((8, 1), 16), 4)


def test_dequantize_packed_formula():
    codes = torch.randint(0, 16, (8, 64), dtype=torch.int32)  # [out, in]
    zeros = torch.randint(1, 16, (2, 8), dtype=torch.int32)
    scales = torch.rand(2, 8).half()
    g_idx = (torch.arange(64) // 32).int()
    W = dequantize_packed(pack_qweight(codes, 4), pack_qzeros(zeros, 4), scales, g_idx, 4)
    for n in range(8):
        for k in (0, 31, 32, 63):
            g = k // 32
            assert W[n, k] == scales[g, n].float() * (codes[n, k] - zeros[g, n])

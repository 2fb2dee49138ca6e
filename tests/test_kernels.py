"""Triton kernel (under TRITON_INTERPRET=1 on CPU) and the CPU int4 path against the reference."""

import os

import pytest
import torch

from gptq.core.pack import pack_qweight, pack_qzeros
from gptq.runtime.kernels.reference import dequant_matmul_reference
from gptq.runtime.qlinear import QuantLinear

triton = pytest.importorskip("triton")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET or not torch.cuda.is_available() else "cuda"


def make_layer(K, N, bits, group_size, act_order, sym=False, fmt="gptq", bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    G = K if group_size == -1 else group_size
    ng = -(-K // G)
    codes = torch.randint(0, 2**bits, (N, K), generator=g, dtype=torch.int32)
    lo = 1 if fmt == "gptq" else 0
    zeros = (torch.full((ng, N), 2 ** (bits - 1), dtype=torch.int32) if sym else
             torch.randint(lo, 2**bits, (ng, N), generator=g, dtype=torch.int32))
    scales = (torch.rand(ng, N, generator=g) * 0.02 + 0.005).half()
    g_idx = torch.arange(K) // G
    if act_order:
        g_idx = g_idx[torch.randperm(K, generator=g)]
    layer = QuantLinear(K, N, bits, group_size, bias, fmt)
    layer.qweight = pack_qweight(codes, bits)
    layer.qzeros = pack_qzeros(zeros, bits, fmt)
    layer.scales = scales
    layer.g_idx = g_idx.to(torch.int32)
    if bias:
        layer.bias = (torch.randn(N, generator=g) * 0.1).half()
    return layer


@pytest.fixture
def fast_bf16(monkeypatch):
    """This CPU as one with native bf16, whatever it is: the cpu backend takes torch's int4 kernel
    (tests/test_cpu_kernel.py covers the AVX2 kernel that CPUs without it get)."""
    from gptq.runtime import cpu

    monkeypatch.setattr(cpu, "fast_dtype", lambda: torch.bfloat16)


def reference(layer, x):
    return dequant_matmul_reference(x.float(), layer.qweight, layer.qzeros, layer.scales, layer.g_idx, layer.bits,
                                    layer.checkpoint_format, layer.bias)


CASES = [(4, gs, ao) for gs in (-1, 32, 64, 128) for ao in (False, True)] + \
        [(2, 64, True), (2, -1, False), (8, 32, True), (8, 128, False)]


@pytest.mark.parametrize("bits,group_size,act_order", CASES)
@pytest.mark.parametrize("batch", [1, 3, 16, 33, 70])  # 70: dequantize, then torch's matmul
def test_triton_matches_reference(bits, group_size, act_order, batch):
    K, N = 320, 80  # neither a multiple of the 64-wide N tiles; K = 2.5 groups of 128
    layer = make_layer(K, N, bits, group_size, act_order, seed=batch)
    x = torch.randn(batch, K, generator=torch.Generator().manual_seed(1)).half()
    ref = reference(layer, x)
    layer.to(DEVICE)
    assert layer.prepare("triton", torch.float16) == "triton"
    y = layer(x.to(DEVICE)).cpu()
    assert y.dtype == torch.float16
    torch.testing.assert_close(y.float(), ref.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("batch", [1, 16])
def test_triton_v2_and_3d_input(batch):
    layer = make_layer(128, 64, 4, 32, True, fmt="gptq_v2")
    x = torch.randn(2, batch, 128).half()
    ref = reference(layer, x)
    layer.to(DEVICE)
    layer.prepare("triton", torch.float16)
    torch.testing.assert_close(layer(x.to(DEVICE)).float().cpu(), ref.float(), rtol=2e-2, atol=2e-2)


def test_triton_bf16_activations():
    layer = make_layer(128, 64, 4, 64, False)
    x = torch.randn(3, 128).bfloat16()
    ref = reference(layer, x)
    layer.to(DEVICE)
    layer.prepare("triton", torch.bfloat16)
    try:
        y = layer(x.to(DEVICE)).cpu()
    except Exception as e:  # the interpreter has no bf16 (numpy lacks it); real GPUs do
        if INTERPRET:
            pytest.skip(f"bf16 not available under TRITON_INTERPRET: {type(e).__name__}")
        raise
    torch.testing.assert_close(y.float(), ref.float(), rtol=3e-2, atol=3e-2)


def test_triton_rejects_bad_shapes():
    from gptq.runtime.kernels.triton_dequant import dequant_matmul

    layer = make_layer(128, 64, 4, 32, False).to(DEVICE)
    with pytest.raises(ValueError, match="qweight has shape"):
        dequant_matmul(torch.randn(1, 96, device=DEVICE).half(), layer.qweight, layer.qzeros, layer.scales, 32, 4)
    with pytest.raises(ValueError, match="2, 4 and 8 bits"):
        dequant_matmul(torch.randn(1, 128, device=DEVICE).half(), layer.qweight, layer.qzeros, layer.scales, 32, 3)


@pytest.mark.parametrize("group_size,act_order", [(32, False), (64, True), (128, False), (-1, True)])
@pytest.mark.parametrize("batch", [1, 5])
def test_cpu_int4_matches_reference(fast_bf16, group_size, act_order, batch):
    layer = make_layer(576, 96, 4, group_size, act_order, seed=3)  # 576: group 128 leaves a 64-row tail
    x = torch.randn(batch, 576)
    ref = reference(layer, x)
    assert layer.prepare("cpu") == "cpu"
    y = layer(x)
    # bf16 activations and scales: relative error of a few 1e-3
    assert ((y - ref).norm() / ref.norm()) < 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act_order", [False, True])
def test_cpu_int4_long_prompts_dequantize_the_same_weight(fast_bf16, dtype, act_order):
    """From DEQUANT_MIN_ROWS rows on, the cpu backend multiplies a dequantized copy of its own int4
    weight: the same weight the kernel uses, so both paths agree with the reference and each other."""
    from gptq.runtime.cpu import int4pack_layout
    from gptq.runtime.qlinear import DEQUANT_MIN_ROWS, SharedBuffers

    layer = make_layer(576, 128, 4, 64, act_order, seed=4)
    x = torch.randn(DEQUANT_MIN_ROWS + 3, 576)
    ref = reference(layer, x)
    assert layer.prepare("cpu") == "cpu"
    if int4pack_layout() is None:
        pytest.skip("this CPU's int4 layout is not one we read back; the kernel serves every shape")
    layer.backend.buffers = SharedBuffers()
    long = layer(x.to(dtype)).float()
    kernel = torch.cat([layer(x[i:i + 1].to(dtype)).float() for i in range(16)])
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert ((long - ref).norm() / ref.norm()) < max(tol, 3e-3)  # scales/offsets are bf16 in both paths
    assert ((long[:16] - kernel).norm() / kernel.norm()) < 1e-2  # the kernel rounds x to bf16
    W_t = layer.backend.dequantized_t(torch.float32)  # [in, out] in the sorted input order
    assert W_t.data_ptr() == layer.backend.buffers.get((576, 128), torch.float32).data_ptr()


@pytest.mark.parametrize("block,pairing", [(64, "halves"), (32, "halves"), (16, "halves"), (32, "pairs")])
def test_int4pack_read_back_inverts_each_layout(block, pairing):
    from gptq.runtime.cpu import _pack_guess, int4pack_codes_t

    codes = torch.randint(0, 16, (128, 96), dtype=torch.int32, generator=torch.Generator().manual_seed(9))
    packed = _pack_guess(codes, block, pairing)
    assert torch.equal(int4pack_codes_t(packed, 128, 96, (block, pairing)), codes.T.to(torch.uint8))
    out = torch.empty(96, 128)
    assert torch.equal(int4pack_codes_t(packed, 128, 96, (block, pairing), out=out), codes.T.float())


def test_int4pack_layout_is_recognised_on_this_cpu():
    from gptq.runtime.cpu import int4pack_codes_t, int4pack_layout

    layout = int4pack_layout()
    assert layout is not None, f"unknown int4 layout on {torch.backends.cpu.get_cpu_capability()}"
    codes = torch.randint(0, 16, (192, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(1))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    assert torch.equal(int4pack_codes_t(packed, 192, 64, layout), codes.T.to(torch.uint8))


def test_cpu_backend_falls_back_for_other_bits():
    layer = make_layer(128, 64, 8, 32, True, seed=5)
    assert layer.prepare("cpu") == "dense"
    x = torch.randn(2, 128)
    torch.testing.assert_close(layer(x), reference(layer, x), rtol=1e-5, atol=1e-5)


def test_shared_buffer_refills_only_for_another_owner():
    from gptq.runtime.qlinear import SharedBuffers

    b, calls = SharedBuffers(), []
    a, c = object(), object()
    for owner in (a, a, c, a):
        b.fill((2, 3), torch.float32, owner, lambda buf, o=owner: (calls.append(o), buf.fill_(len(calls))))
    assert calls == [a, c, a]  # the second call for `a` found its content still there
    assert b.get((2, 3), torch.float32)[0, 0] == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_half_head_matches_a_dense_head_for_short_and_long_inputs(dtype):
    from gptq.runtime.qlinear import HEAD_DENSE_ROWS, HalfHead

    w = torch.randn(300, 64, dtype=dtype)
    head = HalfHead(torch.nn.Parameter(w.half(), requires_grad=False))
    for rows in (1, HEAD_DENSE_ROWS + 5):
        x = torch.randn(rows, 64).to(dtype)
        ref = x.float() @ w.float().half().float().T
        for _ in range(2):  # the second long call reuses the converted weight
            y = head(x)
            assert y.dtype == dtype
            assert ((y.float() - ref).norm() / ref.norm()) < (2e-3 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("G", [16, 32, 64, 128, 1 << 30])
def test_autotune_configs_never_straddle_a_group(G):
    """Every config the GPU autotuner may try has K tiles that divide the group size and whole
    tiles per K split (a group of 32 turns 64-wide tiles into 32-wide ones, not into wrong sums)."""
    from gptq.runtime.kernels.triton_dequant import GEMV_CONFIGS, SPLITK_CONFIGS, _prune_k

    for configs in (GEMV_CONFIGS, SPLITK_CONFIGS):
        kept = _prune_k(configs, {"G": G})
        assert kept and len(kept) >= len(configs) - 1
        assert all(G % c.kwargs["BLOCK_K"] == 0 and c.kwargs["K_SPLIT"] % c.kwargs["BLOCK_K"] == 0 for c in kept)

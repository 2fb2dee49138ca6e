"""The AVX2 kernels (gptq/kernels/cpu_int4.c, cpu_rmsnorm.c) and the cpu backend's path on CPUs
without fast bf16: against the fp64 reference, exact dequantization, fused siblings, RMSNorm rows,
the fallback."""

import warnings

import pytest
import torch
from test_kernels import make_layer, reference

from gptq.runtime import cpu
from gptq.runtime.cpu_backends import Int4PackBackend, Rows64Backend
from gptq.runtime.kernels import cpu_build, cpu_int4, cpu_rmsnorm
from gptq.runtime.kernels.reference import int4_rows_matmul_reference, int16_group_round
from gptq.runtime.qlinear import ROWS64_MAX_ROWS, QuantLinear

needs_kernel = pytest.mark.skipif(not cpu_int4.available(), reason=f"AVX2 kernel: {cpu_int4.unavailable_reason()}")


@pytest.fixture
def no_fast_bf16(monkeypatch):
    """This CPU as one without native bf16: the cpu backend takes the AVX2 kernel."""
    monkeypatch.setattr(cpu, "fast_dtype", lambda: torch.float32)


def random_rows(N, K, G, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8)
    scale = (torch.rand(N, K // G, generator=g) * 0.02 + 0.001).half()
    zero = torch.randint(0, 16, (N, K // G), generator=g, dtype=torch.uint8)
    return codes, scale, zero


def test_rows64_packing_round_trips_and_puts_columns_j_j16_j32_j48_in_word_j():
    codes, _, _ = random_rows(5, 128, 32)
    packed = cpu_int4.pack_rows64(codes)
    assert packed.shape == (5, 64) and packed.dtype == torch.uint8
    assert torch.equal(cpu_int4.unpack_rows64(packed), codes)
    word = packed.view(torch.int16).int() & 0xFFFF  # little-endian 16-bit words, 16 per chunk
    for r, c, j in ((2, 0, 3), (4, 1, 7), (0, 1, 15)):
        expect = sum(int(codes[r, 64 * c + 16 * t + j]) << (4 * t) for t in range(4))
        assert int(word[r, 16 * c + j]) == expect


def test_activations_round_to_int16_per_group():
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(1)) * torch.tensor([1e-3, 1.0, 50.0])[:, None]
    xr = int16_group_round(x, 64)
    err = (xr - x.double()).abs().view(3, 2, 64).amax(-1)
    amax = x.double().abs().view(3, 2, 64).amax(-1)
    assert (err <= amax / 32767 / 2 * 1.01).all()  # half a step of absmax / 32767 (fp32 scale)


@needs_kernel
@pytest.mark.parametrize("K,N,G", [(64, 8, 32), (576, 96, 64), (576, 200, 192), (1024, 64, 1024), (256, 3, 128),
                                   (192, 10, 96), (576, 20, 32)])  # groups ending mid-chunk: 96, 32
@pytest.mark.parametrize("M", [1, 3, 7])
def test_kernel_matches_the_fp64_reference(K, N, G, M):
    codes, scale, zero = random_rows(N, K, G, seed=K + N)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M))
    y = cpu_int4.int4_matmul(x, cpu_int4.pack_rows64(codes), scale, zero, G)
    ref = int4_rows_matmul_reference(x, codes, scale, zero, G)
    assert y.dtype == torch.float32 and y.shape == (M, N)
    assert ((y - ref).abs().max() / ref.abs().max()) < 2e-6  # only the fp32 accumulation differs
    W = scale.double().repeat_interleave(G, 1) * (codes.double() - zero.double().repeat_interleave(G, 1))
    exact = x.double() @ W.T  # unrounded activations: the int16 rounding costs ~1e-5, bf16 ~3e-3
    assert ((y.double() - exact).norm() / exact.norm()) < 1e-4


@needs_kernel
@pytest.mark.parametrize("lead", [(1, 1), (3,), (2, 3)])
def test_one_call_writes_each_stacked_layers_output_in_its_final_shape(lead):
    codes, scale, zero = random_rows(70, 192, 64, seed=3)
    packed = cpu_int4.pack_rows64(codes)
    x = torch.randn(*lead, 192, generator=torch.Generator().manual_seed(4))
    whole = cpu_int4.int4_matmul(x.reshape(-1, 192), packed, scale, zero, 64)
    outs = cpu_int4.Int4Rows(packed, scale, zero, 64, widths=(40, 24, 6))(x)
    assert [tuple(y.shape) for y in outs] == [(*lead, 40), (*lead, 24), (*lead, 6)]
    assert all(y.is_contiguous() for y in outs)
    assert torch.equal(torch.cat([y.reshape(-1, y.shape[-1]) for y in outs], 1), whole)  # same rows, same sums
    for bad in ((40, 24), (70, 0), (10,) * 7):
        with pytest.raises(ValueError, match="widths"):
            cpu_int4.Int4Rows(packed, scale, zero, 64, widths=bad)


@needs_kernel
@pytest.mark.parametrize("G", [32, 96, 192])
def test_dequantization_is_exact_where_groups_end_mid_chunk(G):
    codes, scale, zero = random_rows(7, 192, G, seed=G)
    W = scale.float().repeat_interleave(G, 1) * (codes.float() - zero.float().repeat_interleave(G, 1))
    assert torch.equal(cpu_int4.int4_dequantize(cpu_int4.pack_rows64(codes), scale, zero, G), W)


@needs_kernel
def test_kernel_dequantizes_exactly_and_rejects_bad_shapes():
    codes, scale, zero = random_rows(40, 256, 64, seed=5)
    packed = cpu_int4.pack_rows64(codes)
    W = scale.float().repeat_interleave(64, 1) * (codes.float() - zero.float().repeat_interleave(64, 1))
    assert torch.equal(cpu_int4.int4_dequantize(packed, scale, zero, 64), W)
    out = torch.empty(40, 256)
    assert cpu_int4.int4_dequantize(packed, scale, zero, 64, out=out).data_ptr() == out.data_ptr()
    with pytest.raises(ValueError, match="multiple of 32"):
        cpu_int4.int4_matmul(torch.randn(1, 256), packed, scale, zero, 48)
    with pytest.raises(ValueError, match="multiple of 64"):
        cpu_int4.int4_matmul(torch.randn(1, 96), packed[:, :48].contiguous(), scale[:, :3].contiguous(),
                             zero[:, :3].contiguous(), 32)
    with pytest.raises(ValueError, match="float16"):
        cpu_int4.int4_matmul(torch.randn(1, 256), packed, scale.float(), zero, 64)
    with pytest.raises(ValueError, match=r"activations \[\.\.\., 256\]"):
        cpu_int4.int4_matmul(torch.randn(1, 128), packed, scale, zero, 64)


@needs_kernel
@pytest.mark.parametrize("group_size,act_order,fmt", [(32, False, "gptq"), (64, True, "gptq"),
                                                      (-1, True, "gptq_v2"), (128, False, "gptq_v2")])
def test_cpu_backend_without_fast_bf16_takes_the_kernel(no_fast_bf16, group_size, act_order, fmt):
    from gptq.runtime.qlinear import SharedBuffers

    layer = make_layer(512, 96, 4, group_size, act_order, fmt=fmt, seed=7)
    xs = torch.randn(ROWS64_MAX_ROWS + 5, 512, generator=torch.Generator().manual_seed(2))
    ref = reference(layer, xs)
    assert layer.prepare("cpu", torch.float32) == "cpu" and isinstance(layer.backend, Rows64Backend)
    assert layer.qweight.is_meta  # the GPTQ-layout copies are released
    layer.backend.buffers = SharedBuffers()
    for rows in (1, 3, ROWS64_MAX_ROWS - 1):  # the kernel
        y = layer(xs[:rows])
        assert ((y - ref[:rows]).norm() / ref[:rows].norm()) < 1e-4
    long = layer(xs)  # dequantize + fp32 matmul: the reference's own arithmetic
    assert ((long - ref).norm() / ref.norm()) < 1e-6
    assert layer(xs.bfloat16()[:1]).dtype == torch.bfloat16  # output in the activations' dtype


@needs_kernel
def test_groups_the_kernel_cannot_serve_stay_on_torch_int4(no_fast_bf16):
    layer = make_layer(576, 64, 4, 16, False, seed=1)  # groups of 16
    assert layer.prepare("cpu", torch.float32) in ("cpu", "dense")
    assert not isinstance(layer.backend, Rows64Backend)


@needs_kernel
def test_fused_siblings_equal_separate_layers_and_never_reuse_a_stale_input(no_fast_bf16, tmp_path):
    from test_load import build_checkpoint

    from gptq import load
    from gptq.runtime.qlinear import fuse_siblings

    d, _ = build_checkpoint(tmp_path, 4, 32, False, False, "gptq")  # (its act-order perms differ per layer)
    fused, _ = load(d, device="cpu", backend="cpu", dtype="float32")
    attn = fused.model.layers[0].self_attn
    assert isinstance(attn.q_proj.backend, Rows64Backend) and attn.q_proj.backend.fused is not None
    k_codes, q_codes = attn.k_proj.backend.packed, attn.q_proj.backend.packed
    assert k_codes.data_ptr() != q_codes.data_ptr()
    assert k_codes.untyped_storage().data_ptr() == q_codes.untyped_storage().data_ptr()
    assert fused.model.layers[1].mlp.up_proj.backend.fused is not None and attn.o_proj.backend.fused is None
    assert isinstance(fused.model.layers[0].input_layernorm, cpu_rmsnorm.RMSNormRows)
    plain, _ = load(d, device="cpu", backend="cpu", dtype="float32")
    for m in plain.modules():
        if isinstance(m, QuantLinear) and isinstance(m.backend, Rows64Backend):
            m.backend.fused = None
    assert fuse_siblings(fused) == 2 * len(fused.model.layers)  # q/k/v and up/gate (again: rebuilt the same)
    ids = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = fused(ids).logits
        b = plain(ids).logits
        assert torch.allclose(a, b, rtol=0, atol=1e-5)
        out_f = fused.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        out_p = plain.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(out_f, out_p)
    # a new input at the same address as a freed one is recomputed, not served from the cache
    x = torch.randn(1, 1, 64)
    q1 = attn.q_proj(x).clone()
    x.copy_(torch.randn(1, 1, 64))  # same tensor, new version
    assert not torch.allclose(attn.q_proj(x), q1)
    assert torch.allclose(attn.k_proj(x), plain.model.layers[0].self_attn.k_proj(x), atol=1e-6)
    siblings = attn.q_proj.backend.fused[0]
    assert siblings.cache.input is x
    del x  # the cache does not keep its input alive, so a freed input can never match again
    assert siblings.cache.input is None
    x2 = torch.randn(1, 1, 64)
    assert torch.allclose(attn.v_proj(x2), plain.model.layers[0].self_attn.v_proj(x2), atol=1e-6)


def test_kernel_off_or_unbuildable_leaves_torch_int4_and_says_so_once(monkeypatch):
    cpu_build.library.cache_clear()
    try:
        monkeypatch.setenv("GPTQ_CPU_KERNEL", "0")
        assert not cpu_int4.available() and "GPTQ_CPU_KERNEL=0" in cpu_int4.unavailable_reason()
        cpu_build.library.cache_clear()
        monkeypatch.delenv("GPTQ_CPU_KERNEL")
        monkeypatch.setattr(cpu_build, "_compiler", lambda: None)
        monkeypatch.setattr(cpu_build, "cache_dir", lambda: __import__("pathlib").Path("/nonexistent-gptq-cache"))
        monkeypatch.setattr(cpu, "fast_dtype", lambda: torch.float32)
        if {"avx2", "fma", "f16c"} <= set(cpu.cpu_flags()):
            with pytest.warns(RuntimeWarning, match="AVX2 CPU kernels are unavailable.*no C compiler"):
                assert not cpu_int4.available()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            assert not cpu_int4.available()
        assert not seen  # decided once per process: no second warning
        reason = cpu_int4.unavailable_reason()
        assert "compiler" in reason or "AVX2" in reason
        layer = make_layer(256, 64, 4, 64, False, seed=2)
        x = torch.randn(2, 256)
        ref = reference(layer, x)
        assert layer.prepare("cpu", torch.float32) == "cpu" and not isinstance(layer.backend, Rows64Backend)
        assert ((layer(x) - ref).norm() / ref.norm()) < 1e-2  # torch's int4 kernel: bf16 activations
        assert cpu_rmsnorm.replace_rms_norms(torch.nn.Sequential()) == 0
    finally:
        cpu_build.library.cache_clear()


@needs_kernel
@pytest.mark.parametrize("D", [576, 100, 2048])
@pytest.mark.parametrize("M", [1, 3, 70])
def test_rms_norm_rows_match_the_fp64_formula(D, M):
    g = torch.Generator().manual_seed(D + M)
    x = torch.randn(M, D, generator=g) * torch.logspace(-3, 2, M)[:, None]
    w = torch.randn(D, generator=g)
    y = cpu_rmsnorm.rms_norm(x, w, 1e-5)
    xd = x.double()
    ref = w.double() * xd / torch.sqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5)
    assert ((y.double() - ref).abs().max() / ref.abs().max()) < 1e-6
    assert torch.equal(cpu_rmsnorm.rms_norm(x.view(M, 1, D), w, 1e-5).view(M, D), y)
    with pytest.raises(ValueError, match="fp32"):
        cpu_rmsnorm.rms_norm(x.bfloat16(), w, 1e-5)


class OnePlusWeightRMSNorm(torch.nn.Module):  # Gemma's variant: must not be taken for Llama's
    def __init__(self, d):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(d))
        self.eps = 1e-6

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1 + self.weight)


@needs_kernel
def test_rms_norms_are_swapped_only_where_they_compute_llamas_formula():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256)
    model = LlamaForCausalLM(cfg).eval()
    for m in model.modules():
        if type(m).__name__ == "LlamaRMSNorm":
            m.weight.data.normal_()
    model.model.layers[1].post_attention_layernorm = OnePlusWeightRMSNorm(64)
    names = list(model.state_dict())
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids).logits
        assert cpu_rmsnorm.replace_rms_norms(model) == 2 * 2  # the Gemma-style norm stays
        assert isinstance(model.model.norm, cpu_rmsnorm.RMSNormRows)
        assert isinstance(model.model.layers[1].post_attention_layernorm, OnePlusWeightRMSNorm)
        assert list(model.state_dict()) == names  # parameter names unchanged
        after = model(ids).logits
        assert ((after - before).abs().max() / before.abs().max()) < 1e-5
        x = torch.randn(1, 3, 64).bfloat16()  # other dtypes: the original module
        norm = model.model.norm
        assert torch.equal(norm(x), norm._original[0](x))


@needs_kernel
def test_the_library_is_built_once_under_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTQ_CACHE", str(tmp_path))
    lib = cpu_build.build()
    assert lib.is_file() and lib.parent.parent == tmp_path / "kernels"
    mtime = lib.stat().st_mtime_ns
    assert cpu_build.build() == lib and lib.stat().st_mtime_ns == mtime  # reused, not rebuilt
    assert [p.name for p in lib.parent.iterdir()] == [cpu_build.LIBRARY]  # no temporary left behind


@needs_kernel
@pytest.mark.parametrize("K", [64, 100, 576])
@pytest.mark.parametrize("M", [1, 3])
def test_f16_weights_times_fp32_rows_match_fp64(K, M):
    from gptq.runtime.kernels.cpu_f16 import f16_matmul

    g = torch.Generator().manual_seed(K + M)
    w = torch.randn(300, K, generator=g).half()
    x = torch.randn(1, M, K, generator=g)
    y = f16_matmul(x, w)
    ref = x.double() @ w.double().T
    assert y.shape == (1, M, 300) and y.dtype == torch.float32
    assert ((y.double() - ref).abs().max() / ref.abs().max()) < 1e-6  # fp16 rounding of x would be ~1e-4
    with pytest.raises(ValueError, match="float16"):
        f16_matmul(x, w.float())


@needs_kernel
def test_half_head_decodes_with_fp32_activations_and_keeps_torch_as_fallback():
    from gptq.runtime.qlinear import HalfHead

    g = torch.Generator().manual_seed(3)
    w = torch.randn(500, 96, generator=g).half()
    bias = torch.randn(500, generator=g).half()
    head = HalfHead(torch.nn.Parameter(w, requires_grad=False), bias)
    x = torch.randn(1, 2, 96, generator=g)
    ref = x.double() @ w.double().T + bias.double()
    assert head.f16_matmul is not None
    y = head(x)
    assert y.shape == (1, 2, 500) and ((y.double() - ref).abs().max() / ref.abs().max()) < 1e-6
    head.f16_matmul = None  # no kernel: torch's fp16 matmul, fp16-rounded activations
    y16 = head(x)
    assert 1e-6 < ((y16.double() - ref).abs().max() / ref.abs().max()) < 5e-3


@needs_kernel
def test_cpu_kernel_can_be_asked_for_by_name():
    layer = make_layer(256, 64, 4, 64, False, seed=4)
    x = torch.randn(3, 256)
    ref = reference(layer, x)
    assert layer.prepare("cpu", torch.float32, cpu_kernel="avx2") == "cpu"
    assert isinstance(layer.backend, Rows64Backend)
    assert ((layer(x) - ref).norm() / ref.norm()) < 1e-4
    layer = make_layer(256, 64, 4, 64, False, seed=4)
    layer.prepare("cpu", torch.float32, cpu_kernel="torch")
    assert isinstance(layer.backend, Int4PackBackend)
    with pytest.raises(ValueError, match="cpu_kernel must be"):
        make_layer(256, 64, 4, 64, False).prepare("cpu", torch.float32, cpu_kernel="fast")
    with pytest.raises(ValueError, match="cannot serve this layer"):
        make_layer(96, 64, 4, 32, False).prepare("cpu", torch.float32, cpu_kernel="avx2")  # 96 inputs: not 64k

"""GGUF output: GGML block grids in the solver, their byte layouts, llama.cpp's per-tensor types,
and whole files (read back with the gguf package). llama.cpp itself runs them in tests/interop."""

import json

import numpy as np
import pytest
import torch
from conftest import BPE_VOCAB
from test_stream import calib_text, quantize_cmd, run

from gptq import QuantConfig, quantize_model, save_checkpoint, solve
from gptq.core.grids import GridSpec
from gptq.core.grids.ggml import TYPES
from gptq.formats.gguf.blocks import dequantize_blocks, pack_blocks
from gptq.core.solver import round_to_nearest
from gptq.formats.gguf.rules import layer_type, output_type, plan
from gptq.formats.gguf.writer import rope_permute, write_gguf
from gptq.formats.registry import get


def problem(out=64, n=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(1024, n, generator=g) @ torch.randn(n, n, generator=g) * 0.1
    return torch.randn(out, n, generator=g) * 0.05, 2 * X.T @ X / 1024


CFG = QuantConfig()  # the solver's settings; the GGML type is the grid (its bits and group fixed by the type)


def grid_for(t):
    return GridSpec.ggml(t)


@pytest.mark.parametrize("t", sorted(TYPES))
def test_blocks_dequantize_to_the_solved_weight_exactly(t):
    W, H = problem()
    r = solve(W, H, CFG, grid=grid_for(t))
    blocks = pack_blocks(t, r.codes, r.scales, r.zeros, r.scale_state)
    assert blocks.shape == (64, 512 // TYPES[t].block_weights * TYPES[t].block_bytes)
    assert torch.equal(dequantize_blocks(t, blocks, 512), r.weight)

    def err(Q):
        D = W - Q
        return float(torch.einsum("ij,jk,ik->", D, H, D))

    assert err(r.weight) < 0.6 * err(round_to_nearest(W, CFG, grid_for(t)).weight)


def test_q4_0_block_is_bit_exact_to_a_hand_built_one():
    """Symmetric g32 codes and a float16 d: byte j = q[j] | q[j + 16] << 4 after d (little endian)."""
    codes = torch.arange(32, dtype=torch.uint8)[None] % 16  # [1, 32]
    scales = torch.tensor([[-0.0125]]).to(torch.float16).float()  # [groups, out], a negative d
    zeros = torch.full((1, 1), 8, dtype=torch.int32)
    b = pack_blocks("q4_0", codes, scales, zeros, None)
    d = np.array([-0.0125], dtype=np.float16).tobytes()
    qs = bytes((j % 16) | (((j + 16) % 16) << 4) for j in range(16))
    assert bytes(b.numpy().tobytes()) == d + qs
    w = dequantize_blocks("q4_0", b, 32)
    assert torch.equal(w, scales[0, 0] * (codes.float() - 8))


def test_q4_0_from_a_symmetric_g32_solve_is_bit_exact():
    W, H = problem(8, 64)
    r = solve(W, H, CFG, grid=grid_for("q4_0"))
    b = pack_blocks("q4_0", r.codes, r.scales, r.zeros, None).numpy()
    for row in range(8):
        for g in range(2):
            q = r.codes[row, 32 * g : 32 * g + 32].numpy()
            expect = np.float16(r.scales[g, row]).tobytes() + bytes(int(q[j]) | int(q[j + 16]) << 4 for j in range(16))
            assert b[row, 18 * g : 18 * g + 18].tobytes() == expect


@pytest.mark.parametrize("t", ["q4_k", "q5_k"])
def test_superblock_stored_scales_are_the_ones_the_solver_rounded_against(t):
    from gguf import quants

    W, H = problem(16, 512, seed=3)
    r = solve(W, H, CFG, grid=grid_for(t))
    blocks = pack_blocks(t, r.codes, r.scales, r.zeros, r.scale_state).numpy()
    nb = blocks.reshape(-1, TYPES[t].block_bytes)  # [out * 2, bytes] one row of blocks per super-block
    d = nb[:, 0:2].copy().view(np.float16).astype(np.float32)
    dmin = nb[:, 2:4].copy().view(np.float16).astype(np.float32)
    sc, mn = quants.Q4_K.get_scale_min(nb[:, 4:16].copy())  # [out * 2, 8] 6-bit
    assert sc.max() <= 63 and mn.max() <= 63 and sc.min() >= 1
    stored_scale = torch.from_numpy(d * sc.astype(np.float32)).view(16, 2, 8).permute(1, 2, 0).reshape(16, 16)
    stored_min = torch.from_numpy(dmin * mn.astype(np.float32)).view(16, 2, 8).permute(1, 2, 0).reshape(16, 16)
    assert torch.equal(stored_scale, r.scales)  # [groups, out]
    assert torch.equal(stored_min, r.zeros)


def test_q6_k_int8_scales_are_the_stored_ones():
    W, H = problem(8, 256, seed=4)
    r = solve(W, H, CFG, grid=grid_for("q6_k"))
    nb = pack_blocks("q6_k", r.codes, r.scales, r.zeros, r.scale_state).numpy()  # [8, 210]
    sc = nb[:, 192:208].copy().view(np.int8).astype(np.float32)
    d = nb[:, 208:210].copy().view(np.float16).astype(np.float32)
    assert torch.equal(torch.from_numpy(d * sc).T, r.scales)


def test_types_follow_llama_quantize_for_smollm2_shapes():
    """SmolLM2-135M: 30 layers, rows of 576 (and 1536 for ffn_down). The per-tensor types llama-quantize
    0.3.36 wrote (read from its files): Q4_K_M gives attn_v Q8_0 where it wants Q6_K (use_more_bits
    layers) and Q5_0 elsewhere, ffn_down Q6_K / Q4_K, every other 576-wide tensor Q5_0."""
    names = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
             "mlp.up_proj", "mlp.down_proj")
    linears = {f"model.layers.{i}.{n}": 1536 if n == "mlp.down_proj" else 576 for i in range(30) for n in names}
    default, per = plan("q4_k_m", "llama", linears)
    types = {**{n: default for n in linears}, **dict(per)}
    count = {}
    for t in types.values():
        count[t] = count.get(t, 0) + 1
    assert count == {"q5_0": 166, "q8_0": 14, "q6_k": 14, "q4_k": 16}
    more = [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
    assert [i for i in range(30) if types[f"model.layers.{i}.mlp.down_proj"] == "q6_k"] == more
    assert [i for i in range(30) if types[f"model.layers.{i}.self_attn.v_proj"] == "q8_0"] == more
    # Q4_0: a calibrated file takes llama-quantize's importance-matrix choice (read from its imatrix
    # file of SmolLM2): Q4_1 for the first 30 // 8 = 3 ffn_down tensors; uncalibrated, all Q4_0
    default, per = plan("q4_0", "llama", linears)
    assert default == "q4_0" and dict(per) == {f"model.layers.{i}.mlp.down_proj": "q4_1" for i in range(3)}
    assert layer_type("q4_0", "ffn_down", 0, 30, 1536, calibrated=False) == "q4_0"
    assert layer_type("q5_0", "ffn_down", 2, 30, 1536) == "q5_1" and layer_type("q5_0", "ffn_down", 3, 30, 1536) == "q5_0"
    assert output_type("q4_k_m", 576) == "q8_0" and output_type("q4_k_m", 512) == "q6_k"
    assert output_type("q8_0", 512) == "q8_0"
    assert plan("q8_0", "llama", linears) == ("q8_0", ())  # no per-layer types: every linear Q8_0
    assert layer_type("q4_k_s", "attn_v", 3, 30, 512) == "q5_k" and layer_type("q4_k_s", "attn_v", 4, 30, 512) == "q4_k"
    with pytest.raises(ValueError, match="families"):
        plan("q4_0", "opt", linears)  # (llama.cpp has no OPT architecture)


def test_fused_qkv_takes_attn_v_rules_in_the_k_mixes():
    """Fused q/k/v (attn_qkv) gets attn_v's types: llama-quant.cpp's llama_tensor_get_type_impl tests
    category_is_attn_v (attn_v and attn_qkv) ahead of its ATTENTION_QKV branch, so in Q4_K_M / Q5_K_M
    the use_more_bits blocks (i_attention_wv of n_attention_wv, one attn_qkv per block) get Q6_K and
    the others the file's type, not a flat Q5_K / Q6_K. 12 blocks: use_more_bits differs across them."""
    more = [0, 3, 6, 9, 10, 11]  # use_more_bits(i, 12): i < 1, i >= 10, (i - 1) % 3 == 2
    for family, blocks, qkv in (("phi3", "model.layers", "self_attn.qkv_proj"),
                                ("gpt2", "transformer.h", "attn.c_attn"),
                                ("gpt_neox", "gpt_neox.layers", "attention.query_key_value")):
        linears = {f"{blocks}.{i}.{qkv}": 256 for i in range(12)}
        for ftype, base in (("q4_k_m", "q4_k"), ("q5_k_m", "q5_k")):
            default, per = plan(ftype, family, linears, blocks)
            assert default == base and dict(per) == {f"{blocks}.{i}.{qkv}": "q6_k" for i in more}, (family, ftype)
    # Q4_K_S: Q5_K for the first four, as attn_v; Q5_K_S, Q6_K, Q4_0 ... keep the file's type; 8 experts Q8_0
    assert [layer_type("q4_k_s", "attn_qkv", i, 12, 256) for i in (3, 4)] == ["q5_k", "q4_k"]
    assert [layer_type(f, "attn_qkv", 0, 12, 256) for f in ("q5_k_s", "q6_k", "q4_0")] == ["q5_k", "q6_k", "q4_0"]
    assert layer_type("q4_k_m", "attn_qkv", 1, 12, 256, n_expert=8) == "q8_0"
    # rows not a multiple of 256 (GPT-2 XL's 1600): tensor_type_fallback, Q6_K → Q8_0 and Q4_K → Q5_0
    assert [layer_type("q4_k_m", "attn_qkv", i, 12, 1600) for i in (0, 1)] == ["q8_0", "q5_0"]


def test_rope_permutation_interleaves_the_halves_of_each_head():
    x = torch.arange(8)[:, None]  # 2 heads of 4 rows: halves [0 1 | 2 3], [4 5 | 6 7]
    assert rope_permute(x, 2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]



@pytest.fixture
def small_vocab(bpe_dir, monkeypatch):
    """conftest's 320-token byte-level BPE, for the family tests: what they check does not depend on
    the vocabulary's size, and a 49,152-token one costs each of them about 10 s (the embeddings'
    K-quant rounding, gguf's reader of the vocabulary). SmolLM2's own vocabulary and pre-tokenizer
    are checked by test_gguf_file_holds_exactly_the_solved_weights."""
    monkeypatch.setenv("GPTQ_GGUF_PRE", "default")  # a vocabulary llama.cpp does not know by name
    return bpe_dir

def synthetic_llama(tmp_path, tokenizer_dir, family="llama"):
    """A small Llama (or Qwen2 / Qwen3 / Phi) whose rows are multiples of 256 (real K-quants
    everywhere) with the tokenizer of ``tokenizer_dir`` (its vocabulary size)."""
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        LlamaConfig,
        Phi3Config,
        PhiConfig,
        Qwen2Config,
        Qwen3Config,
    )

    torch.manual_seed(0)
    kw = dict(vocab_size=len(AutoTokenizer.from_pretrained(tokenizer_dir)), hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)
    if family == "phi3":  # Phi-3's default ids (32000...) lie outside a small vocabulary
        kw.update(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "phi":  # Phi-1/2: LayerNorms, biases everywhere, partial rotary, an untied head with a bias
        kw.update(tie_word_embeddings=False, partial_rotary_factor=0.5, num_key_value_heads=4)
    cfg = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config, "phi3": Phi3Config,
           "phi": PhiConfig}[family](**kw)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    for name, p in model.named_parameters():  # random biases and norms, so that a lost one shows
        if name.endswith("bias") or name.endswith("norm.weight"):
            p.data.normal_(1.0 if name.endswith("norm.weight") else 0.0, 0.1)
    d = tmp_path / f"synth-{family}"
    model.save_pretrained(d)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(d)
    return model, d


def solved_gguf(tmp_path, model, d, family, ftype="q4_k_m", n_expert=0):
    """Quantize ``model`` (saved at ``d``) with llama.cpp's type mix for ``ftype``, stage it, write
    the .gguf; returns (the plan's per-layer types, the file's reader, its tensors by name)."""
    from gguf import GGUFReader

    from gptq.formats.gguf.rules import plan as gguf_plan
    from gptq.io.modules import get_module, in_features
    from gptq.models.architectures import for_config

    arch = for_config(model.config)
    linears = {f"{arch.blocks}.{i}.{n}": in_features(get_module(b, n))
               for i, b in enumerate(get_module(model, arch.blocks)) for n in arch.block_linears(b)}
    default, per = gguf_plan(ftype, family, linears, arch.blocks, n_expert=n_expert)
    cfg = QuantConfig(format=f"gguf:{ftype}")
    fmt = get(cfg).bind(model, d)  # the format's own plan: the one above
    assert (fmt.default, fmt.types) == (default, dict(per))
    ids = torch.randint(0, model.config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(1))
    packed, _ = quantize_model(model, ids, cfg, device="cpu", progress=False, fmt=fmt)
    stage = save_checkpoint(tmp_path / "stage", model, packed, cfg, source_dir=d)
    write_gguf(stage, tmp_path / "m.gguf", ftype, d)
    reader = GGUFReader(tmp_path / "m.gguf")
    return dict(per), reader, {x.name: x for x in reader.tensors}


def test_gguf_file_holds_exactly_the_solved_weights(tmp_path, smollm2_dir):
    """In memory: quantize with the q4_k_m mix, stage, write the .gguf; every decoder linear read
    back through gguf's reader and dequantizer equals the solved weight (q/k after llama.cpp's
    rotary permutation); norms are F32; the tied embeddings are Q6_K (rows of 256)."""
    from gguf import GGUFReader, quants

    from gptq.formats.gguf.rules import plan as gguf_plan

    model, d = synthetic_llama(tmp_path, smollm2_dir)
    linears = {f"model.layers.{i}.{n}": m.in_features for i, layer in enumerate(model.model.layers)
               for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    default, per = gguf_plan("q4_k_m", "llama", linears)
    assert dict(per) == {"model.layers.1.mlp.down_proj": "q6_k", "model.layers.1.self_attn.v_proj": "q6_k"}
    assert default == "q4_k"
    cfg = QuantConfig(bits=4, group_size=32, format="gguf:q4_k_m")
    ids = torch.randint(0, 49152, (8, 64), generator=torch.Generator().manual_seed(1))
    packed, _ = quantize_model(model, ids, cfg, device="cpu", progress=False)
    stage = save_checkpoint(tmp_path / "stage", model, packed, cfg, source_dir=d)
    info = write_gguf(stage, tmp_path / "m.gguf", "q4_k_m", d)
    assert info["tensor_types"] == {"f32": 5, "q4_k": 12, "q6_k": 3}
    reader = GGUFReader(tmp_path / "m.gguf")
    got = {t.name: t for t in reader.tensors}
    for i in range(2):
        for hf, gg, heads in (("self_attn.q_proj", "attn_q", 4), ("self_attn.k_proj", "attn_k", 2),
                              ("self_attn.v_proj", "attn_v", None), ("mlp.down_proj", "ffn_down", None)):
            t = got[f"blk.{i}.{gg}.weight"]
            w = torch.from_numpy(np.ascontiguousarray(quants.dequantize(t.data, t.tensor_type)))
            ref = model.get_submodule(f"model.layers.{i}.{hf}").weight.float()
            if heads:
                ref = rope_permute(ref, heads)
            assert torch.equal(w.reshape(ref.shape), ref), (i, hf)
    assert got["blk.0.attn_norm.weight"].tensor_type.name == "F32"
    assert got["token_embd.weight"].tensor_type.name == "Q6_K"
    assert reader.fields["tokenizer.ggml.pre"].contents() == "smollm"
    assert reader.fields["general.file_type"].contents() == 15


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_qwen_families_keep_hf_row_order_with_their_biases_and_norms(tmp_path, small_vocab, family):
    """Qwen2 / Qwen3 as convert_hf_to_gguf writes them: architecture qwen2 / qwen3, q/k rows in
    Hugging Face's order (NEOX rotary: no permutation), Qwen2's q/k/v biases and Qwen3's per-head
    q/k norms in F32, every solved block equal to the solved weight."""
    from gguf import quants

    model, d = synthetic_llama(tmp_path, small_vocab, family)
    _, reader, got = solved_gguf(tmp_path, model, d, family)
    assert reader.fields["general.architecture"].contents() == family
    assert reader.fields[f"{family}.attention.head_count_kv"].contents() == 2
    for i in range(2):
        for hf, gg in (("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("mlp.up_proj", "ffn_up")):
            t = got[f"blk.{i}.{gg}.weight"]
            w = torch.from_numpy(np.ascontiguousarray(quants.dequantize(t.data, t.tensor_type)))
            ref = model.get_submodule(f"model.layers.{i}.{hf}").weight.float()
            assert torch.equal(w.reshape(ref.shape), ref), (i, hf)
        extra = (["attn_q.bias", "attn_k.bias", "attn_v.bias"] if family == "qwen2" else
                 ["attn_q_norm.weight", "attn_k_norm.weight"])
        for name in extra:
            hf = {"attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",
                  "attn_v.bias": "self_attn.v_proj.bias", "attn_q_norm.weight": "self_attn.q_norm.weight",
                  "attn_k_norm.weight": "self_attn.k_norm.weight"}[name]
            t = got[f"blk.{i}.{name}"]
            assert t.tensor_type.name == "F32"
            assert torch.equal(torch.from_numpy(np.array(t.data)).float(),
                               model.get_parameter(f"model.layers.{i}.{hf}").float()), name


def test_cli_gguf_writes_one_file_and_the_report(tmp_path, tiny_model_dir, monkeypatch):
    d = tiny_model_dir("llama")
    text = calib_text(tmp_path)
    out = tmp_path / "g"
    monkeypatch.setenv("GPTQ_GGUF_PRE", "default")  # the tiny test tokenizer is none llama.cpp knows
    r = run(quantize_cmd(d, out, "--format", "gguf:q4_0", group_size=None), text)
    assert r.returncode == 0, r.stderr
    files = sorted(p.name for p in out.iterdir())
    assert files == ["quantize_report.json", "tiny-llama-q4_0.gguf"]
    assert not (tmp_path / "g.stage").exists()
    g = json.loads((out / "quantize_report.json").read_text())["gguf"]
    # 14 decoder linears and the untied token embeddings (the output head: Q8_0, as llama.cpp types it)
    assert g["tensor_types"]["q4_0"] == 15 and g["tensor_types"]["q8_0"] == 1 and g["bytes"] == (out / "tiny-llama-q4_0.gguf").stat().st_size
    assert "GGUF q4_0" in r.stdout
    r = run(quantize_cmd(d, tmp_path / "h", "--format", "gguf:q4_0", "--act-order", "dynamic"), text)
    assert r.returncode == 2 and "act-order" in r.stderr
    monkeypatch.delenv("GPTQ_GGUF_PRE")  # an unknown vocabulary is refused before any work
    r = run(quantize_cmd(d, tmp_path / "u", "--format", "gguf:q4_0"), text)
    assert r.returncode == 2 and "GPTQ_GGUF_PRE" in r.stderr
    assert not any(p.name.startswith("u") for p in tmp_path.iterdir())


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_moe_experts_are_merged_per_layer_into_3d_tensors_of_the_solved_weights(tmp_path, small_vocab, family):
    """Mixtral (llama architecture) and Qwen3-MoE (qwen3moe), as convert_hf_to_gguf merges them: one
    [n_expert, rows, cols] tensor per layer and role whose expert e dequantizes to expert e's solved
    weight, the router in F32, the expert counts in the metadata; 8-expert models take llama.cpp's
    Q8_0 attn_k / attn_v."""
    from conftest import moe_config
    from gguf import GGUFReader, quants
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gptq.formats.gguf.rules import plan as gguf_plan
    from gptq.io.modules import get_module
    from gptq.models.architectures import for_config
    from gptq.models.moe import unfuse

    cfg = moe_config(family, experts=4, hidden=64, inter=64)
    cfg.vocab_size, cfg.norm_topk_prob = BPE_VOCAB, True
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    d = tmp_path / family
    model.save_pretrained(d)
    AutoTokenizer.from_pretrained(small_vocab).save_pretrained(d)
    arch = for_config(model.config)
    unfuse(model, arch)
    linears = {f"model.layers.{i}.{n}": get_module(b, n).in_features for i, b in enumerate(model.model.layers)
               for n in arch.block_linears(b)}
    default, per = gguf_plan("q4_0", family, linears, n_expert=4)
    assert default == "q4_0" and per == ()  # 2 layers: n_layers // 8 == 0 calibrated ffn_down upgrades
    _, per8 = gguf_plan("q4_k_m", family, {k: 256 for k in linears}, n_expert=8)
    assert {n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1]: t for n, t in per8
            if "self_attn" in n} == {"self_attn.k_proj": "q8_0", "self_attn.v_proj": "q8_0", "self_attn.o_proj": "q5_k"}
    cfgq = QuantConfig(bits=4, group_size=32, format="gguf:q4_0")
    ids = torch.randint(0, BPE_VOCAB, (4, 64), generator=torch.Generator().manual_seed(1))
    packed, _ = quantize_model(model, ids, cfgq, device="cpu", progress=False)
    stage = save_checkpoint(tmp_path / "stage", model, packed, cfgq, source_dir=d)
    info = write_gguf(stage, tmp_path / "m.gguf", "q4_0", d)
    # per layer q, k, v, o and three merged expert tensors; the untied token embeddings (the head: Q8_0)
    assert info["tensor_types"]["q4_0"] == 2 * (4 + 3) + 1 and info["tensor_types"]["q8_0"] == 1
    reader = GGUFReader(tmp_path / "m.gguf")
    got = {t.name: t for t in reader.tensors}
    gguf_arch = {"mixtral": "llama", "qwen3_moe": "qwen3moe"}[family]
    assert reader.fields["general.architecture"].contents() == gguf_arch
    assert reader.fields[f"{gguf_arch}.expert_count"].contents() == 4
    assert reader.fields[f"{gguf_arch}.expert_used_count"].contents() == 2
    if family == "qwen3_moe":
        assert reader.fields["qwen3moe.expert_feed_forward_length"].contents() == 64
    for i in range(2):
        router = got[f"blk.{i}.ffn_gate_inp.weight"]
        assert router.tensor_type.name == "F32"
        assert torch.equal(torch.from_numpy(np.array(router.data)).reshape(4, 64),
                           model.get_parameter(f"model.layers.{i}.mlp.gate.weight").float())
        for role, hf in (("ffn_gate_exps", "gate_proj"), ("ffn_up_exps", "up_proj"), ("ffn_down_exps", "down_proj")):
            t = got[f"blk.{i}.{role}.weight"]
            assert list(t.shape) == [64, 64, 4]  # ggml order: cols, rows, experts
            w = torch.from_numpy(np.ascontiguousarray(quants.dequantize(t.data, t.tensor_type))).reshape(4, 64, 64)
            for e in range(4):
                ref = model.get_submodule(f"model.layers.{i}.mlp.experts.{e}.{hf}").weight.float()
                assert torch.equal(w[e], ref), (i, role, e)


def test_moe_models_llama_cpp_would_run_differently_are_refused():
    from gptq.formats.gguf.rules import check_moe

    check_moe({"model_type": "qwen3_moe", "norm_topk_prob": True})
    with pytest.raises(ValueError, match="norm_topk_prob"):
        check_moe({"model_type": "qwen3_moe", "norm_topk_prob": False})
    with pytest.raises(ValueError, match="mlp_only_layers"):
        check_moe({"model_type": "qwen3_moe", "norm_topk_prob": True, "mlp_only_layers": [0]})
    check_moe({"model_type": "mixtral"})  # Hugging Face's Mixtral always renormalises, as llama.cpp


def test_sentencepiece_style_tokenizers_are_written_as_llamas(tmp_path):
    """A SentencePiece-style BPE tokenizer (byte fallback, ▁ for spaces: Llama 2, Mistral, Mixtral,
    Phi-3 as transformers converts them) is written as convert_hf_to_gguf writes a llama vocabulary:
    model "llama", every token in id order, byte / control / unknown types, merge order as scores
    (llama.cpp's tokenizer merges the best-scored pair first), a space prefix."""
    from conftest import spm_style_tokenizer
    from gguf import GGUFReader
    from test_stream import SAMPLE_TEXT
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path / "spm-llama"
    tok = spm_style_tokenizer(SAMPLE_TEXT * 3, d)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                         bos_token_id=1, eos_token_id=2)).eval()
    model.save_pretrained(d)
    cfg = QuantConfig(bits=8, group_size=32, format="gguf:q8_0")
    packed, _ = quantize_model(model, torch.randint(0, len(tok), (2, 32)), cfg, device="cpu", progress=False)
    stage = save_checkpoint(tmp_path / "stage", model, packed, cfg, source_dir=d)
    write_gguf(stage, tmp_path / "m.gguf", "q8_0", d)
    f = GGUFReader(tmp_path / "m.gguf").fields
    assert f["tokenizer.ggml.model"].contents() == "llama" and f["tokenizer.ggml.pre"].contents() == "default"
    tokens, types, scores = (f[k].contents() for k in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                                                        "tokenizer.ggml.scores"))
    vocab = tok.get_vocab()
    assert tokens == sorted(vocab, key=vocab.get)
    assert (types[0], types[1], types[2], types[3 + 0x41]) == (2, 3, 3, 6)  # UNKNOWN, CONTROL x2, BYTE
    merges = json.loads((d / "tokenizer.json").read_text())["model"]["merges"]
    first, later = ("".join(m) if isinstance(m, list) else m.replace(" ", "") for m in (merges[0], merges[-1]))
    assert scores[vocab[first]] == 0.0 and scores[vocab[later]] == -(len(merges) - 1)
    assert f["tokenizer.ggml.add_space_prefix"].contents() is True
    assert f["tokenizer.ggml.bos_token_id"].contents() == 1


def test_tokenizers_gguf_cannot_express_are_refused_before_any_work(tmp_path, tiny_model_dir):
    from tokenizers import Tokenizer, models

    from gptq.formats.gguf.tokenizer import check_tokenizer

    d = tiny_model_dir("llama")
    Tokenizer(models.Unigram([("<unk>", 0.0), ("a", -1.0)], unk_id=0)).save(str(d / "tokenizer.json"))
    with pytest.raises(ValueError, match="Unigram"):
        check_tokenizer(d)
    (d / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="tokenizer.json"):
        check_tokenizer(d)


def test_phi3_keeps_its_fused_linears_in_hf_row_order(tmp_path, small_vocab):
    """Phi-3 as conversion/phi.py writes it: architecture phi3, fused qkv_proj as attn_qkv (in Q4_K_M
    attn_v's rule, as llama-quant.cpp applies it to fused q/k/v: Q6_K in the use_more_bits block 1 of
    2, Q4_K in block 0) and gate_up_proj as ffn_up, both in Hugging Face's row order (NEOX rotary;
    llama.cpp's SwiGLU takes the first half as the gate, as Phi-3 does), every block equal to the
    solved weight; the original context and the sliding window written."""
    from gguf import quants

    model, d = synthetic_llama(tmp_path, small_vocab, "phi3")
    per, reader, got = solved_gguf(tmp_path, model, d, "phi3")
    assert {n: t for n, t in per.items() if "qkv" in n} == {"model.layers.1.self_attn.qkv_proj": "q6_k"}
    assert reader.fields["general.architecture"].contents() == "phi3"
    orig = model.config.original_max_position_embeddings  # (what conversion/phi.py reads too)
    assert reader.fields["phi3.rope.scaling.original_context_length"].contents() == orig
    assert reader.fields["phi3.attention.sliding_window"].contents() == 0
    assert reader.fields["phi3.rope.dimension_count"].contents() == 64
    for i in range(2):
        qkv_type = ("Q4_K", "Q6_K")[i]
        for hf, gg, t in (("self_attn.qkv_proj", "attn_qkv", qkv_type), ("mlp.gate_up_proj", "ffn_up", "Q4_K")):
            g = got[f"blk.{i}.{gg}.weight"]
            assert g.tensor_type.name == t
            w = torch.from_numpy(np.ascontiguousarray(quants.dequantize(g.data, g.tensor_type)))
            ref = model.get_submodule(f"model.layers.{i}.{hf}").weight.float()
            assert torch.equal(w.reshape(ref.shape), ref), (i, hf)


def assert_stored_linear(got, name: str, weight: torch.Tensor, bias: torch.Tensor):
    """GGUF tensor ``name`` (blk.N.role) dequantizes to ``weight`` [out, in] exactly, and its bias is
    ``bias`` in F32."""
    from gguf import quants

    t = got[f"{name}.weight"]
    w = torch.from_numpy(np.ascontiguousarray(quants.dequantize(t.data, t.tensor_type)))
    assert torch.equal(w.reshape(weight.shape), weight.float()), name
    b = got[f"{name}.bias"]
    assert b.tensor_type.name == "F32" and torch.equal(torch.from_numpy(np.array(b.data)), bias.float()), name


def test_phi2_writes_its_biases_layernorms_and_partial_rotary(tmp_path, small_vocab):
    """Phi-1/2 as conversion/phi.py writes them (architecture phi2): q/k/v, dense, fc1, fc2 as attn_q/
    k/v, attn_output, ffn_up, ffn_down with their biases in F32, LayerNorm weights and biases, the
    untied head with its bias, the rotary dimensions of the partial rotary factor, no BOS."""
    model, d = synthetic_llama(tmp_path, small_vocab, "phi")
    _, reader, got = solved_gguf(tmp_path, model, d, "phi")
    f = reader.fields
    assert f["general.architecture"].contents() == "phi2"
    assert f["phi2.rope.dimension_count"].contents() == 32  # 0.5 x 256 / 4 heads
    assert abs(f["phi2.attention.layer_norm_epsilon"].contents() - model.config.layer_norm_eps) < 1e-12
    assert f["tokenizer.ggml.add_bos_token"].contents() is False
    for i in range(2):
        for hf, gg in (("self_attn.q_proj", "attn_q"), ("self_attn.dense", "attn_output"), ("mlp.fc1", "ffn_up"),
                       ("mlp.fc2", "ffn_down")):
            ref = model.get_submodule(f"model.layers.{i}.{hf}")
            assert_stored_linear(got, f"blk.{i}.{gg}", ref.weight, ref.bias)
        for suffix in ("weight", "bias"):
            t = got[f"blk.{i}.attn_norm.{suffix}"]
            ref = model.get_parameter(f"model.layers.{i}.input_layernorm.{suffix}").float()
            assert t.tensor_type.name == "F32" and torch.equal(torch.from_numpy(np.array(t.data)), ref)
    for name in ("output_norm.weight", "output_norm.bias", "output.bias"):
        assert got[name].tensor_type.name == "F32"
    assert got["output.weight"].tensor_type.name == "Q6_K"


def test_gpt2_writes_its_fused_conv1d_linears_biases_and_position_embeddings(tmp_path, small_vocab):
    """GPT-2 as convert_hf_to_gguf writes it (architecture gpt2): its blocks under transformer.h,
    c_attn / c_proj / c_fc / mlp.c_proj as attn_qkv / attn_output / ffn_up / ffn_down (Conv1D
    weights stored [in, out]: the blocks hold their transpose, one row per output), biases and
    LayerNorms in F32, the learned position embeddings in F32, the hyperparameters from GPT-2's own
    config names (n_layer, n_positions, ...)."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=BPE_VOCAB, n_embd=256, n_layer=2, n_head=4, n_positions=256)).eval()
    for name, p in model.named_parameters():
        if name.endswith("bias") or ".ln_" in name:
            p.data.normal_(1.0 if name.endswith("weight") else 0.0, 0.1)
    d = tmp_path / "synth-gpt2"
    model.save_pretrained(d)
    AutoTokenizer.from_pretrained(small_vocab).save_pretrained(d)
    per, reader, got = solved_gguf(tmp_path, model, d, "gpt2")
    # fused q/k/v takes attn_v's Q4_K_M rule in llama-quant.cpp: Q6_K in the use_more_bits block 1 of 2
    assert {n: t for n, t in per.items() if "c_attn" in n} == {"transformer.h.1.attn.c_attn": "q6_k"}
    assert [got[f"blk.{i}.attn_qkv.weight"].tensor_type.name for i in range(2)] == ["Q4_K", "Q6_K"]
    f = reader.fields
    assert f["general.architecture"].contents() == "gpt2"
    assert f["gpt2.block_count"].contents() == 2 and f["gpt2.context_length"].contents() == 256
    assert f["gpt2.feed_forward_length"].contents() == 1024  # n_inner None: 4 x n_embd
    for i in range(2):
        for hf, gg in (("attn.c_attn", "attn_qkv"), ("attn.c_proj", "attn_output"), ("mlp.c_fc", "ffn_up"),
                       ("mlp.c_proj", "ffn_down")):
            conv = model.get_submodule(f"transformer.h.{i}.{hf}")
            assert_stored_linear(got, f"blk.{i}.{gg}", conv.weight.T, conv.bias)  # Conv1D: [in, out]
        assert torch.equal(torch.from_numpy(np.array(got[f"blk.{i}.attn_norm.bias"].data)),
                           model.get_parameter(f"transformer.h.{i}.ln_1.bias").float())
    pos = got["position_embd.weight"]
    assert pos.tensor_type.name == "F32"
    assert torch.equal(torch.from_numpy(np.array(pos.data)).reshape(256, 256), model.transformer.wpe.weight.float())
    assert got["output_norm.bias"].tensor_type.name == "F32"


def test_gpt_neox_reorders_its_fused_qkv_rows_as_the_converter_does(tmp_path, small_vocab):
    """GPT-NeoX (architecture gptneox): query_key_value's rows and bias go from Hugging Face's
    per-head [q, k, v] to all q, all k, all v (conversion/gptneox.py), exactly, since block rows are
    independent; dense / dense_h_to_4h / dense_4h_to_h with their biases; the rotary fraction and
    the parallel residual in the metadata."""
    from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM

    from gptq.formats.gguf.writer import neox_qkv_rows

    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=BPE_VOCAB, hidden_size=256, num_attention_heads=4,
                                             num_hidden_layers=2, intermediate_size=1024,
                                             max_position_embeddings=256)).eval()
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            p.data.normal_(0.0, 0.1)
    d = tmp_path / "synth-neox"
    model.save_pretrained(d)
    AutoTokenizer.from_pretrained(small_vocab).save_pretrained(d)
    assert torch.equal(neox_qkv_rows(torch.arange(12), 2), torch.tensor([0, 1, 6, 7, 2, 3, 8, 9, 4, 5, 10, 11]))
    _, reader, got = solved_gguf(tmp_path, model, d, "gpt_neox")
    f = reader.fields
    assert f["general.architecture"].contents() == "gptneox"
    assert f["gptneox.rope.dimension_count"].contents() == 16  # 0.25 x 64
    assert f["gptneox.use_parallel_residual"].contents() is True
    for i in range(2):
        qkv = model.get_submodule(f"gpt_neox.layers.{i}.attention.query_key_value")
        assert_stored_linear(got, f"blk.{i}.attn_qkv", neox_qkv_rows(qkv.weight, 4), neox_qkv_rows(qkv.bias, 4))
        for hf, gg in (("attention.dense", "attn_output"), ("mlp.dense_h_to_4h", "ffn_up"),
                       ("mlp.dense_4h_to_h", "ffn_down")):
            ref = model.get_submodule(f"gpt_neox.layers.{i}.{hf}")
            assert_stored_linear(got, f"blk.{i}.{gg}", ref.weight, ref.bias)


def test_an_untied_head_of_another_name_leaves_the_embeddings_their_own_type(tmp_path, small_vocab):
    """GPT-NeoX's head is ``embed_out``, not ``lm_head``: through the command (the streamed stage
    keeps the source's names) the embeddings still count as untied and take the file's type, as
    llama-quantize gives them, and the head Q6_K."""
    from gguf import GGUFReader
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    d = tmp_path / "neox"
    GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=BPE_VOCAB, hidden_size=256, num_attention_heads=4, num_hidden_layers=2,
                                     intermediate_size=512, max_position_embeddings=256)).save_pretrained(d)
    for f in small_vocab.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    r = run(quantize_cmd(d, tmp_path / "g", "--format", "gguf:q4_k_m", group_size=None), calib_text(tmp_path))
    assert r.returncode == 0, r.stderr
    types = {t.name: t.tensor_type.name for t in GGUFReader(next((tmp_path / "g").glob("*.gguf"))).tensors}
    assert (types["token_embd.weight"], types["output.weight"]) == ("Q4_K", "Q6_K")


def test_resume_after_the_solve_writes_the_gguf_from_the_finished_stage(tmp_path, tiny_model_dir, monkeypatch):
    """Killed while the .gguf was being written (the solve done, OUT.stage complete): --resume writes
    the file from the stage without solving again, the same bytes as an uninterrupted run; a stage
    made by another command is refused."""
    from gptq.formats.gguf import GGUF
    from gptq.quantize import main

    d = tiny_model_dir("llama")
    text = calib_text(tmp_path)
    monkeypatch.setenv("GPTQ_GGUF_PRE", "default")
    args = [str(d), "--dataset", str(text), "--nsamples", "4", "--seqlen", "32", "--format", "gguf:q4_0", "--quiet"]
    assert main(args + ["--out", str(tmp_path / "ref")]) == 0
    real_finish = GGUF.finish

    def killed(self, *a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(GGUF, "finish", killed)
    assert main(args + ["--out", str(tmp_path / "g")]) == 130
    assert (tmp_path / "g.stage" / "quantize_report.json").is_file() and not (tmp_path / "g").exists()
    monkeypatch.setattr(GGUF, "finish", real_finish)
    with pytest.raises(SystemExit):  # another command's stage
        main(args + ["--out", str(tmp_path / "g"), "--resume", "--seed", "1"])
    solved = []
    monkeypatch.setattr("gptq.quantize.quantize_streaming", lambda *a, **kw: solved.append(1))
    assert main(args + ["--out", str(tmp_path / "g"), "--resume"]) == 0
    assert not solved and not (tmp_path / "g.stage").exists()
    name = "tiny-llama-q4_0.gguf"
    assert (tmp_path / "g" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()

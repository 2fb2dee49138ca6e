"""Rotations before solving (gptq.core.hadamard, gptq.models.rotation): the matrices are exactly
orthogonal, the rotated float model computes what the original did, for every family."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from gptq.core.hadamard import _base, hadamard, hadamard_factors, has_hadamard, orthogonal
from gptq.models.architectures import for_config
from gptq.models.moe import unfuse
from gptq.models.rotation import RotationError, Rotator
from tests.conftest import BPE_VOCAB, TINY, moe_config, tiny_config

# -- matrices -----------------------------------------------------------------------------------


@pytest.mark.parametrize("m", [12, 20, 24, 28, 36, 44, 48, 60, 72, 180])
def test_paley_matrices_are_hadamard(m):
    H = _base(m)
    assert set(H.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(H @ H.T, m * torch.eye(m, dtype=torch.float64))


@pytest.mark.parametrize("n,factors", [(64, (1, 64)), (576, (36, 16)), (1536, (12, 128)), (2880, (180, 16)),
                                       (5120, (20, 256)), (14336, (28, 512)), (896, (28, 32))])
def test_hidden_sizes_of_real_models_have_a_hadamard_matrix(n, factors):
    assert hadamard_factors(n) == factors
    if n <= 1536:  # larger ones are Kronecker products of the two checked kinds
        H = hadamard(n)
        assert torch.equal(H @ H.T, n * torch.eye(n, dtype=torch.float64))


def test_orders_without_a_construction_fall_back_to_a_random_orthogonal_matrix():
    assert not has_hadamard(52) and not has_hadamard(10)
    with pytest.raises(ValueError, match="no Hadamard matrix of order 52"):
        hadamard(52)
    Q, how = orthogonal(52, "hadamard", 0)
    assert how == "random (no Hadamard matrix of order 52)"
    assert torch.allclose(Q @ Q.T, torch.eye(52, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("kind", ["hadamard", "random"])
def test_rotations_are_orthogonal_and_reproducible(kind):
    Q, _ = orthogonal(576, kind, 3)
    assert torch.allclose(Q @ Q.T, torch.eye(576, dtype=torch.float64), atol=1e-12)
    assert torch.equal(Q, orthogonal(576, kind, 3)[0])
    assert not torch.equal(Q, orthogonal(576, kind, 4)[0])
    if kind == "hadamard":  # every entry ±1/√n: no direction favoured
        assert torch.allclose(Q.abs(), torch.full_like(Q, 576**-0.5))


# -- the rotated model computes what the original did ----------------------------------------


def family_config(family: str):
    from transformers import GemmaConfig, GraniteConfig, LlamaConfig, Qwen2Config, Qwen3Config

    base = dict(TINY, intermediate_size=128, num_key_value_heads=2)
    if family == "llama-tied":
        return LlamaConfig(**base, tie_word_embeddings=True)
    if family == "llama-bias":  # biases on o_proj and down_proj: the writers' biases rotate too
        return LlamaConfig(**base, attention_bias=True, mlp_bias=True)
    if family == "llama-48":  # hidden 48 = 12 · 4 (Paley), head_dim 12 (Paley)
        return LlamaConfig(**dict(base, hidden_size=48))
    if family == "llama-40":  # hidden 40 = 20 · 2, head_dim 10: no Hadamard matrix, random fallback
        return LlamaConfig(**dict(base, hidden_size=40))
    if family == "qwen2":  # q/k/v biases
        return Qwen2Config(**base)
    if family == "qwen3":  # q/k norms
        return Qwen3Config(**base, head_dim=16)
    if family == "gemma":  # 1 + w norms, tied head, scaled embeddings
        return GemmaConfig(**base, head_dim=16)
    if family == "granite":
        return GraniteConfig(**base, embedding_multiplier=2.0, residual_multiplier=0.5, logits_scaling=4.0)
    if family in ("mixtral", "qwen3_moe", "qwen2_moe", "olmoe"):
        return moe_config(family)
    return tiny_config(family)


def random_model(config, seed=0, fused=False):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # norms away from ones, so folding them matters
                p.copy_(torch.rand_like(p) + 0.5 - (1.0 if config.model_type == "gemma" else 0.0))
    return model if fused else unfuse(model, for_config(config))


ROTATED_FAMILIES = ["llama", "llama-tied", "llama-bias", "llama-48", "llama-40", "mistral", "qwen2", "qwen3",
                    "gemma", "granite", "phi3", "mixtral", "qwen3_moe", "qwen2_moe", "olmoe"]


@pytest.mark.parametrize("family", ROTATED_FAMILIES)
@pytest.mark.parametrize("kind", ["hadamard", "random"])
def test_rotated_model_gives_the_same_logits(family, kind):
    config = family_config(family)
    model = random_model(config)
    tied = bool(config.tie_word_embeddings)
    ids = torch.randint(0, config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids).logits
        W_before = model.model.layers[0].self_attn.o_proj.weight.clone()
        record = Rotator(model.config, kind, seed=5).rotate_model(model)
        after = model(ids).logits
    # float32 forward of a 2-block model: rotated weights differ from the original by float32 rounding only
    assert (after - before).abs().max().item() < 2e-5 * before.abs().max().item() + 1e-6
    assert not torch.allclose(model.model.layers[0].self_attn.o_proj.weight, W_before)  # it did rotate
    offset = 1.0 if config.model_type == "gemma" else 0.0
    for layer in model.model.layers:
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            assert torch.equal(norm.weight, torch.full_like(norm.weight, 1.0 - offset))
    assert torch.equal(model.model.norm.weight, torch.full_like(model.model.norm.weight, 1.0 - offset))
    assert record.kind == kind and record.residual and record.heads
    assert record.untied == tied and model.config.tie_word_embeddings is False
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert model.config.gptq_rotation == record.as_dict()


def test_hadamard_rotation_flattens_outlier_channels():
    """What the rotation is for: a few input channels with a large scale stand out in W; after WQ
    no column does."""
    model = random_model(family_config("llama"))
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[:3] = 40.0  # three outlier channels
        Rotator(model.config, "hadamard").rotate_model(model)
    W = model.model.layers[0].self_attn.q_proj.weight
    col = W.abs().amax(0)
    assert col.max() / col.median() < 4  # before: ≥ 40 / 1.5


def test_heads_only_keeps_the_tie_and_the_edges():
    config = family_config("llama-tied")
    model = random_model(config)
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model(ids).logits
        emb = model.model.embed_tokens.weight.clone()
        record = Rotator(model.config, "hadamard", residual=False).rotate_model(model)
        after = model(ids).logits
    assert (after - before).abs().max().item() < 1e-5
    assert not record.untied and record.residual == "" and record.heads
    assert torch.equal(model.model.embed_tokens.weight, emb)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("family", ["llama-tied", "llama"])
@pytest.mark.parametrize("inplace", [False, True])
def test_edges_from_checkpoint_tensors_match_the_in_memory_rotation(family, inplace):
    """The streaming path rotates the embeddings, head and final norm from the stored tensors; in
    place (the tensors it read are its own) the embeddings and an untied head are overwritten with
    the same values, and a tied head is still made from the embeddings before they are rotated."""
    config = family_config(family)
    model = random_model(config)
    tensors = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("model.layers.")}
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight")  # tied: not stored
    ptrs = {k: v.data_ptr() for k, v in tensors.items()}
    rot = Rotator(config, "hadamard", seed=1)
    edges = rot.edges(tensors, inplace=inplace)
    rot.rotate_model(model)
    assert set(edges) == {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for k, v in edges.items():
        assert torch.equal(v, model.state_dict()[k]), k
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        if k in ptrs:
            assert (edges[k].data_ptr() == ptrs[k]) == inplace, k


@pytest.mark.parametrize("family,reason", [("opt", "LayerNorms subtract the mean"), ("gpt2", "LayerNorms"),
                                           ("gpt_neox", "LayerNorms"), ("phi", "LayerNorms"),
                                           ("gemma2", "norms after the attention"), ("olmo2", "norms after")])
def test_families_a_rotation_would_change_are_refused(family, reason):
    if family == "gemma2":
        from transformers import Gemma2Config
        config = Gemma2Config(**TINY, intermediate_size=128, num_key_value_heads=2, head_dim=16)
    elif family == "olmo2":
        from transformers import Olmo2Config
        config = Olmo2Config(**TINY, intermediate_size=128, num_key_value_heads=2)
    else:
        config = tiny_config(family)
    with pytest.raises(RotationError, match=reason) as e:
        Rotator(config, "hadamard")
    assert "--rotate none" in str(e.value)


def test_an_unknown_module_on_the_stream_is_refused_before_anything_changes():
    model = random_model(family_config("llama"))
    block = model.model.layers[1]
    block.extra = torch.nn.Linear(64, 8)  # reads the stream through a path the table does not know
    W0 = model.model.layers[0].self_attn.q_proj.weight.clone()
    with pytest.raises(RotationError, match=r"model\.layers\.1\.extra"):
        Rotator(model.config, "hadamard").rotate_model(model)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, W0)


def test_unknown_kind_is_refused():
    with pytest.raises(RotationError, match="choose one of"):
        Rotator(family_config("llama"), "spin")


# -- the pipeline: every path, every format ----------------------------------------------------


def saved_model(tmp_path, tiny_tokenizer_dir, config, name="src"):
    import shutil

    d = tmp_path / name
    random_model(config, fused=True).save_pretrained(d)  # experts as transformers stores them
    for f in tiny_tokenizer_dir.iterdir():
        shutil.copy(f, d / f.name)
    return d


def tensors_of(d):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("family,kind", [("llama-tied", "hadamard"), ("mixtral", "hadamard"),
                                         ("llama-tied", "learned")])
def test_streaming_rotates_block_by_block_to_the_in_memory_bytes(tmp_path, tiny_tokenizer_dir, family, kind):
    """Each block rotated as it is loaded, the edges at the end from the stored tensors: the same
    checkpoint as rotating the whole model in memory; a tied head is stored untied. A learned rotation
    is learned from a first pass that loads the blocks one at a time: the same Q as in memory."""
    from gptq import QuantConfig, quantize_model, save_checkpoint
    from gptq.pipeline.streaming import quantize_streaming

    d = saved_model(tmp_path, tiny_tokenizer_dir, family_config(family))
    windows = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    cfg = QuantConfig(bits=3, group_size=32, rotate=kind, rotate_seed=7, rotate_steps=10)
    out_s, _, _ = quantize_streaming(d, tmp_path / "s", cfg, windows, torch.float32, device="cpu", progress=False)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    model = unfuse(model, for_config(model.config))
    packed, _ = quantize_model(model, windows, cfg, device="cpu", progress=False)
    out_m = save_checkpoint(tmp_path / "m", model, packed, cfg)
    a, b = tensors_of(out_s), tensors_of(out_m)
    assert sorted(a) == sorted(b) and "lm_head.weight" in a
    for k in a:
        assert torch.equal(a[k], b[k]), k
    import json

    for out in (out_s, out_m):
        saved = json.loads((out / "config.json").read_text())
        assert saved["tie_word_embeddings"] is False
        assert saved["gptq_rotation"]["kind"] == kind and saved["gptq_rotation"]["seed"] == 7
        assert (saved["gptq_rotation"]["objective"] is None) == (kind != "learned")


@pytest.mark.parametrize("fmt,bits", [("gptq", 8), ("compressed-tensors", 8), ("bnb-nf4", 4), ("gguf:q8_0", 8)])
def test_every_format_stores_a_rotated_model_that_loads_back(tmp_path, bpe_dir, fmt, bits, monkeypatch):
    """Through the command line (streaming), rotated (Hadamard, learned) and not: each checkpoint loads
    back through our loader (the GGUF through its reader) and computes what the source does, the rotated
    ones about as closely as the unrotated one (the rotation itself is exact; only the rounding differs)."""
    from gptq.inspect import describe, format_description
    from gptq.quantize import main
    from gptq.runtime.load import load_any

    monkeypatch.setenv("GPTQ_GGUF_PRE", "default")  # the tiny test tokenizer is none llama.cpp knows
    config = family_config("llama-tied")
    config.vocab_size = BPE_VOCAB  # a BPE with merges, as GGUF's byte-level vocabularies need
    d = saved_model(tmp_path, bpe_dir, config)
    text = tmp_path / "calib.txt"
    from tests.conftest import SAMPLE_TEXT

    text.write_text(SAMPLE_TEXT)
    ids = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = torch.log_softmax(AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)(ids).logits, -1)
    kl = {}
    for rotate in ("none", "hadamard", "learned"):
        out = tmp_path / f"q-{rotate}"
        args = [str(d), "--dataset", str(text), "--nsamples", "4", "--seqlen", "32", "--bits", str(bits),
                "--group-size", "64" if fmt.startswith("bnb") else "32", "--format", fmt, "--rotate", rotate,
                "--rotate-steps", "20", "--out", str(out), "--quiet"]
        assert main(args) == 0
        path = next(out.glob("*.gguf")) if fmt.startswith("gguf") else out
        model, _ = load_any(str(path), device="cpu", dtype="float32")
        with torch.no_grad():
            lp = torch.log_softmax(model(ids).logits.float(), -1)
        kl[rotate] = (ref.exp() * (ref - lp)).sum(-1).mean().item()
        rot = describe(path)["rotation"]
        assert (rot is None) if rotate == "none" else (rot["kind"] == rotate and rot["untied"])
    for rotate in ("hadamard", "learned"):
        assert kl[rotate] < 3 * kl["none"] + 1e-4, kl
        assert kl[rotate] < (1e-2 if bits == 8 else 0.1), kl
    assert "rotated before solving (--rotate learned, seed 0)" in format_description(describe(path))


def test_resume_refuses_another_rotation(tmp_path, tiny_tokenizer_dir):
    from gptq import QuantConfig
    from gptq.io.safetensors_io import TensorSource
    from gptq.pipeline.streaming import _fingerprint

    d = saved_model(tmp_path, tiny_tokenizer_dir, family_config("llama"))
    w = torch.zeros(2, 8, dtype=torch.long)
    fp = {(r, s): _fingerprint(d, TensorSource(d), QuantConfig(rotate=r, rotate_seed=s), w, torch.float32, 8)
          for r, s in (("none", 0), ("hadamard", 0), ("hadamard", 1))}
    assert len(set(fp.values())) == 3


def test_cli_refuses_a_rotation_the_family_cannot_take_before_any_work(tmp_path, tiny_tokenizer_dir, capsys):
    import shutil

    from gptq.quantize import main
    from tests.conftest import tiny_model

    d = tmp_path / "opt"
    tiny_model("opt").save_pretrained(d)
    for f in tiny_tokenizer_dir.iterdir():
        shutil.copy(f, d / f.name)
    with pytest.raises(SystemExit):
        main([str(d), "--dataset", "no-such-file.txt", "--rotate", "hadamard", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert "cannot be rotated" in err and "--rotate none" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("family,expected", [("llama", "hadamard"), ("llama-tied", "none"), ("opt", "none"),
                                             ("mixtral", "hadamard")])
def test_auto_rotates_where_it_costs_no_bytes(family, expected):
    from gptq.models.rotation import auto_rotation

    chosen, note = auto_rotation(family_config(family))
    assert chosen == expected
    if family == "llama-tied":  # says what --rotate hadamard would cost: vocab x hidden at 16 bits
        assert f"+{256 * 64 * 2 / 1e6:.1f} MB" in note and "--rotate hadamard" in note
    else:
        assert note is None


def test_cli_default_rotates_an_untied_model_and_notes_a_tied_one(tmp_path, tiny_tokenizer_dir, capsys):
    import json

    from gptq.quantize import main
    from tests.conftest import SAMPLE_TEXT

    text = tmp_path / "calib.txt"
    text.write_text(SAMPLE_TEXT)
    for family, rotated in (("llama", True), ("llama-tied", False)):
        d = saved_model(tmp_path, tiny_tokenizer_dir, family_config(family), name=family)
        out = tmp_path / f"q-{family}"
        assert main([str(d), "--dataset", str(text), "--nsamples", "2", "--seqlen", "32", "--group-size", "32",
                     "--out", str(out), "--quiet"]) == 0
        cfg = json.loads((out / "config.json").read_text())
        report = json.loads((out / "quantize_report.json").read_text())
        assert ("gptq_rotation" in cfg) == rotated and ("rotation" in report) == rotated
        assert report["quant_config"]["rotate"] == ("hadamard" if rotated else "none")
        err = capsys.readouterr().err
        assert ("its head is tied to the embeddings" in err) == (not rotated)


def test_row_chunked_rotation_is_the_whole_product():
    """Weights taller than the chunk are rotated ROWS rows at a time: the same (w · diag(s)) @ Q as one
    float64 product, in the weight's dtype, with the float64 temporaries bounded by ROWS rows."""
    from gptq.models.rotation import ROWS, _rows_times

    g = torch.Generator().manual_seed(0)
    Q = torch.linalg.qr(torch.randn(64, 64, dtype=torch.float64, generator=g))[0]
    s = torch.rand(64, dtype=torch.float64, generator=g) + 0.5
    w = torch.randn(2 * ROWS + 5, 64, dtype=torch.float64, generator=g)
    got = _rows_times(w, Q, s)
    assert got.dtype == torch.float64 and got.shape == w.shape
    torch.testing.assert_close(got, (w * s[None, :]) @ Q, rtol=1e-12, atol=1e-12)
    wb = w.bfloat16()
    got_b = _rows_times(wb, Q)
    assert got_b.dtype == torch.bfloat16
    torch.testing.assert_close(got_b.double(), (wb.double() @ Q).bfloat16().double(), rtol=2 ** -7, atol=0)


# -- the learned rotation (--rotate learned) ---------------------------------------------------


def test_straight_rounding_lands_on_the_grid():
    """Every value on one of its group's 2^bits levels, within half a step, each level a whole number of
    steps from 0 (the zero point is a code); a last group shorter than the group size (40 = 32 + 8 columns) is rounded on its own range."""
    from gptq.core.learned_rotation import straight_round

    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 40, generator=g)
    for sym in (False, True):
        q = straight_round(w, 3, 32, sym)
        for cols in (slice(0, 32), slice(32, 40)):
            wg, qg = w[:, cols], q[:, cols]
            for r in range(6):
                levels = torch.unique(qg[r])
                assert len(levels) <= 8
                lo, hi = min(wg[r].min().item(), 0.0), max(wg[r].max().item(), 0.0)
                step = (2 * max(-lo, hi) if sym else hi - lo) / 7
                assert (qg[r] - wg[r]).abs().max().item() <= step / 2 + 1e-6
                k = levels / step  # whole steps from 0: the zero point is a whole number of steps
                assert torch.allclose(k, k.round(), atol=1e-4)
    assert torch.equal(straight_round(torch.zeros(2, 8), 3, 4, False), torch.zeros(2, 8))


def test_a_free_minimum_rounds_on_each_group_own_range():
    """q4_1/q5_1's levels d·q + m span each group's own min to max: a group far from 0 (here [1, 2])
    keeps its whole 2^bits levels (an error within half of (max − min)/maxq), where a range stretched to
    0 spends half of them below it; a last short group (40 = 32 + 8 columns) ignores its padding. The
    levels match the q4_1 grid the solver fits (``MinFamily`` without the search) to float16's rounding
    of d and m."""
    from gptq.core.grids.ggml import MinFamily
    from gptq.core.learned_rotation import straight_round

    w = 1 + torch.rand(6, 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    q = straight_round(w, 4, 32, False, free_min=True)
    stretched = straight_round(w, 4, 32, False)
    for cols in (slice(0, 32), slice(32, 40)):
        wg = w[:, cols]
        half = (wg.amax(1) - wg.amin(1)) / 15 / 2  # [rows]
        assert ((q[:, cols] - wg).abs().amax(1) <= half + 1e-12).all()
        assert ((stretched[:, cols] - wg).abs().amax(1) > half * 1.5).all()  # step 2/15, not ≈1/15
    fam = MinFamily(4, mse=False)
    grid = fam.fit(w[:, :32])
    d, m = grid.scale[:, None].double(), grid.zero[:, None].double()
    solver = fam.dequantize(fam.quantize(w[:, :32], d, m), d, m)
    assert (solver - q[:, :32]).abs().max().item() <= 1e-2  # d and m in float16
    x = w.clone().requires_grad_(True)
    straight_round(x, 4, 32, False, free_min=True).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_table_rounding_lands_on_the_nearest_table_value_times_the_absmax():
    from gptq.core.grids.codebook import TABLES
    from gptq.core.learned_rotation import table_round

    table = torch.tensor(sorted(set(TABLES["nf4"])))
    w = torch.randn(5, 40, generator=torch.Generator().manual_seed(0), requires_grad=True)
    q = table_round(w, TABLES["nf4"], 32)
    for cols in (slice(0, 32), slice(32, 40)):
        amax = w[:, cols].detach().abs().amax(1, keepdim=True)
        x = w[:, cols].detach() / amax
        nearest = table[(x[..., None] - table).abs().argmin(-1)]
        assert torch.allclose(q[:, cols].detach(), nearest * amax, atol=1e-6)
    q.sum().backward()  # the gradient passes: through the absmax (each group's largest entry) and straight
    assert w.grad is not None and torch.isfinite(w.grad).all()


def test_the_objective_rounds_onto_each_format_grid():
    """``Rounding.of``: the grid itself for integers; NF4/FP4 as tables times the absmax; iq4_nl and the GGML
    types without a minimum as their levels times a scale of either sign; those with a minimum as the
    asymmetric uniform grid of their bits and group."""
    from gptq.core.grids import GridSpec
    from gptq.core.grids.codebook import TABLES
    from gptq.core.learned_rotation import Rounding, straight_round

    assert Rounding.of(GridSpec("int", 3, 64, False)) == Rounding(3, 64, False)
    assert Rounding.of(GridSpec("int", 4, 128, True)) == Rounding(4, 128, True)
    assert Rounding.of(GridSpec("nf4", 4, 64, True)) == Rounding(4, 64, True, TABLES["nf4"])
    assert Rounding.of(GridSpec("fp4", 4, 32, True)).table == TABLES["fp4"]
    for name, (bits, group) in {"q4_0": (4, 32), "q5_0": (5, 32), "q8_0": (8, 32), "q3_k": (3, 16),
                                "q6_k": (6, 16)}.items():
        r = Rounding.of(GridSpec.ggml(name))
        half = 2 ** (bits - 1)
        assert (r.group, r.signed, len(r.table)) == (group, True, 2**bits), name
        assert min(r.table) == -1.0 and max(r.table) == (half - 1) / half, name
    for name, (bits, group) in {"q2_k": (2, 16), "q4_k": (4, 32), "q5_k": (5, 32)}.items():
        assert Rounding.of(GridSpec.ggml(name)) == Rounding(bits, group, False), name
    for name, bits in {"q4_1": 4, "q5_1": 5}.items():  # a free minimum, as the format stores it
        assert Rounding.of(GridSpec.ggml(name)) == Rounding(bits, 32, False, free_min=True), name
    iq = Rounding.of(GridSpec.ggml("iq4_nl"))
    assert iq.group == 32 and iq.signed and min(iq.table) == -1.0 and max(iq.table) == pytest.approx(113 / 127)
    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(Rounding(3, 32, False)(w), straight_round(w, 3, 32, False))


@pytest.mark.parametrize("name", ["q4_0", "q5_0", "q8_0", "iq4_nl"])
def test_the_objective_rounds_as_the_ggml_grid_does(name):
    """Against the solver's own GGML family (no clipping search): the same values but where its float16
    scale moves a weight across a rounding boundary; the sign of the scale chosen alike (a group whose
    largest weight is positive reaches it: iq4_nl's table runs from −127 to 113 only)."""
    from gptq.core.grids import GridSpec
    from gptq.core.learned_rotation import Rounding

    spec = GridSpec.ggml(name)
    w = torch.randn(400, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    w[::2] *= -1  # half the rows' extremes on each side
    fam = spec.family(False)
    grid = fam.fit(w)
    scale, zero = grid.scale[:, None], grid.zero[:, None]
    theirs = fam.dequantize(fam.quantize(w, scale, zero), scale, zero)
    rounding = Rounding.of(spec)
    ours = rounding(w)
    amax = w.abs().amax(1, keepdim=True)
    levels = sorted(rounding.table)
    gap = min(b - a for a, b in zip(levels, levels[1:]))
    off = (ours - theirs).abs() > 0.4 * gap * amax  # another level, not the float16 scale's last digits
    assert off.float().mean().item() < 0.02, off.float().mean().item()
    err_ours, err_theirs = (ours - w).pow(2).sum().item(), (theirs - w).pow(2).sum().item()
    assert err_ours == pytest.approx(err_theirs, rel=0.02)


def test_stacked_readers_round_each_on_its_own_grid():
    """``by_rows``: each linear's rows on its own rounding, a linear left unquantized (None) exact; runs
    that agree merged into one ``Rounding``."""
    from gptq.core.learned_rotation import Rounding, by_rows

    a, b = Rounding(3, 16), Rounding(8, 16)
    assert by_rows([(4, a), (6, a)]) == a
    w = torch.randn(12, 32, generator=torch.Generator().manual_seed(0))
    r = by_rows([(4, a), (3, None), (5, b)])
    out = r(w)
    assert torch.equal(out[:4], a(w[:4])) and torch.equal(out[4:7], w[4:7]) and torch.equal(out[7:], b(w[7:]))


def test_the_learning_rounds_each_reader_on_the_grid_its_format_gives_it():
    """``pipeline.learned.roundings``: per term, the readers' rows on the grids the bound format gives
    them (here q6_k for v_proj as llama-quantize's mixes do, q4_k elsewhere); a MoE router exact."""
    from gptq.core.grids import GridSpec
    from gptq.core.learned_rotation import Rounding
    from gptq.pipeline.learned import roundings

    model = random_model(family_config("llama"))
    grid = lambda name: GridSpec.ggml("q6_k" if name.endswith("v_proj") else "q4_k")  # noqa: E731
    r = roundings(model, grid)
    assert len(r) == 2 * model.config.num_hidden_layers
    attn = model.model.layers[0].self_attn
    w = torch.randn(attn.q_proj.weight.shape[0] + attn.k_proj.weight.shape[0] + attn.v_proj.weight.shape[0], 64)
    qk = attn.q_proj.weight.shape[0] + attn.k_proj.weight.shape[0]
    out = r[0](w)
    q4k, q6k = Rounding.of(GridSpec.ggml("q4_k")), Rounding.of(GridSpec.ggml("q6_k"))
    assert q4k != q6k and torch.equal(out[:qk], q4k(w[:qk])) and torch.equal(out[qk:], q6k(w[qk:]))
    assert r[1] == q4k

    moe = random_model(family_config("qwen3_moe"))
    r = roundings(moe, lambda name: GridSpec("int", 8 if name.endswith("up_proj") else 3, 32, False))
    mlp = moe.model.layers[0].mlp
    # stacked as Rotator.readers stacks them: the router, every expert's gate, then every expert's up
    router = mlp.gate.weight.shape[0]
    gates = sum(e.gate_proj.weight.shape[0] for e in mlp.experts)
    ups = sum(e.up_proj.weight.shape[0] for e in mlp.experts)
    w = torch.randn(router + gates + ups, 64)
    out = r[1](w)
    assert torch.equal(out[:router], w[:router])  # the router is not quantized: no error counted
    assert torch.equal(out[router:router + gates], Rounding(3, 32, False)(w[router:router + gates]))
    assert torch.equal(out[router + gates:], Rounding(8, 32, False)(w[router + gates:]))


def _learning_problem(n=64, terms=4):
    from gptq.core.learned_rotation import damped_inverse

    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(terms):
        spread = torch.logspace(0, 1.5, n)[torch.randperm(n, generator=g)]  # channels of unequal energy
        X = torch.randn(512, n, generator=g) * spread
        W = torch.randn(48, n, generator=g)
        W[:, :2] *= 8  # two outlier columns
        out.append((W, damped_inverse(X.T @ X / 512, 0.01)))
    return out


def test_learned_rotation_lowers_its_objective_and_stays_orthogonal_and_reproducible():
    from gptq.core.hadamard import orthogonal
    from gptq.core.learned_rotation import Rounding, learn_rotation, reader_error

    terms = _learning_problem()
    Q0 = orthogonal(64, "hadamard", 0)[0]
    kw = dict(steps=60, per_step=2, seed=1)
    Q, info = learn_rotation(lambda j: terms[j][0], [h for _, h in terms], Q0, Rounding(3, 32), **kw)
    assert Q.dtype == torch.float64
    assert (Q.T @ Q - torch.eye(64, dtype=torch.float64)).abs().max().item() < 1e-12
    assert (Q - Q0).abs().max().item() > 0.05  # it moved
    ratios = [(reader_error(W, Hi, Q.float(), Rounding(3, 32)) / reader_error(W, Hi, Q0.float(), Rounding(3, 32))).item()
              for W, Hi in terms]
    assert info["objective"] == pytest.approx(sum(ratios) / len(ratios), abs=1e-4)
    assert info["objective"] < 0.9, info  # Hadamard = 1
    Q2, info2 = learn_rotation(lambda j: terms[j][0], [h for _, h in terms], Q0, Rounding(3, 32), **kw)
    assert torch.equal(Q, Q2) and info2["objective"] == info["objective"]


def test_learning_shared_out_over_processes_is_one_process_learning_bit_for_bit():
    """Four workers (threads standing for ranks), three holding some of the terms, one none, summing through a
    ``combine`` as all_reduce does: the Q and the objective one process learns from all the terms."""
    import threading

    from gptq.core.hadamard import orthogonal
    from gptq.core.learned_rotation import Rounding, learn_rotation

    terms = _learning_problem(terms=5)
    Q0 = orthogonal(64, "hadamard", 0)[0]
    kw = dict(steps=25, per_step=3, seed=2)
    Q, info = learn_rotation(lambda j: terms[j][0], [h for _, h in terms], Q0, Rounding(3, 32), **kw)

    size, owner = 4, [0, 1, 2, 1, 0]  # rank 3 holds no term and still takes every step
    slots: list = [None] * size
    gate = threading.Barrier(size)

    def summer(rank):
        def combine(t):
            slots[rank] = t
            gate.wait()
            total = slots[0].clone()
            for other in slots[1:]:
                total += other
            gate.wait()  # every worker has read the slots before any overwrites its own
            return total
        return combine

    out: list = [None] * size
    called = [0] * size

    def work(rank):
        def weights(j):
            assert owner[j] == rank, "a worker asked for a term it does not hold"
            called[rank] += 1
            return terms[j][0]

        mine = {j: terms[j][1] for j in range(5) if owner[j] == rank}
        out[rank] = learn_rotation(weights, mine, Q0, Rounding(3, 32), n_terms=5, combine=summer(rank), device="cpu",
                                   **kw)

    workers = [threading.Thread(target=work, args=(r,)) for r in range(size)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    for Qr, inf in out:
        assert torch.equal(Qr, Q) and inf["objective"] == info["objective"]
    assert called[:3] == [c for c in called[:3] if c] and called[3] == 0


def test_learning_spills_its_terms_under_a_memory_budget(tmp_path):
    """--max-memory 0: every term (readers and inverse Hessian) written to the spill folder and read back
    when drawn, once for both; the same Q as in memory, and the files and folder removed. The learning loads no
    block: the readers were taken during the statistics pass."""
    from gptq import QuantConfig
    from gptq.pipeline.activations import Activations
    from gptq.pipeline.learned import Terms, learn_residual
    from gptq.pipeline.loop import capture_block_inputs

    config = family_config("llama")
    model = random_model(config)
    ids = torch.randint(0, config.vocab_size, (4, 24), generator=torch.Generator().manual_seed(1))
    cfg = QuantConfig(bits=3, group_size=32, rotate="learned", rotate_steps=8)
    seen, loads = [], []
    put = Terms.put

    spill = tmp_path / "terms"

    def spy(self, j, readers, hinv):
        put(self, j, readers, hinv)
        seen.append((self.dir, sorted(p.name for p in spill.glob("*"))))

    from gptq.pipeline import learned

    load_item = learned.load_item

    def counted(path, device):
        loads.append(path.name)
        return load_item(path, device)

    Qs, blocks_loaded = [], []
    for budget in (None, 0):
        rot = Rotator(model.config, "learned", 0, steps=8)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(Terms, "put", spy)
            mp.setattr(learned, "load_item", counted)
            learn_residual(rot, model, capture_block_inputs(model, ids, 2, "cpu"), cfg, torch.device("cpu"),
                           Activations(), progress=False, spill_dir=spill, max_memory=budget,
                           before_block=lambda i, b: blocks_loaded.append(i))
        Qs.append(rot.Q)
    assert torch.equal(Qs[0], Qs[1])
    n = 2 * config.num_hidden_layers
    assert [d for d, _ in seen] == [None] * n + [spill] * n
    assert seen[-1][1] == [f"term-{j:05d}.safetensors" for j in range(n)]
    assert not spill.exists()  # the files and their folder removed
    assert blocks_loaded == list(range(config.num_hidden_layers)) * 2  # the statistics pass only
    assert 0 < len(loads) <= n + 8 * min(8, n) + n  # base, ≤ one read per draw, final


def test_an_explicit_memory_budget_is_shared_between_activations_and_terms():
    from gptq.pipeline.learned import left_for_terms, term_rows, terms_bytes

    assert left_for_terms(None, 10, False) is None  # auto: measured when the terms are stored
    assert left_for_terms(100, 30, False) == 70  # the activations in memory have their share first
    assert left_for_terms(100, 30, True) == 100  # spilled: the whole budget
    assert left_for_terms(20, 30, False) == 0
    model = random_model(family_config("llama"))
    h = model.config.hidden_size
    assert terms_bytes(model) == [sum((h + r) * h * 4 for r in term_rows(model))]


def test_each_rank_spills_by_the_bytes_of_its_own_terms():
    from gptq.pipeline.distributed import World
    from gptq.pipeline.learned import term_owners, term_rows, terms_bytes

    model = random_model(family_config("llama"))  # 2 blocks: 4 terms, two sizes
    rows, h = term_rows(model), model.config.hidden_size
    for size in (2, 3):
        by_rank = terms_bytes(model, World(0, size, True))
        owner = term_owners(rows, h, World(0, size, True))
        assert by_rank == [sum((h + r) * h * 4 for r, o in zip(rows, owner) if o == k) for k in range(size)]
        assert sum(by_rank) == terms_bytes(model)[0]
    # 4 terms on 3 ranks: one rank holds two, so an even share (the total // 3) understates its bytes
    assert max(terms_bytes(model, World(0, 3, True))) > terms_bytes(model)[0] // 3


def test_the_learning_terms_are_dealt_to_the_ranks_by_cost():
    from gptq.pipeline.distributed import World
    from gptq.pipeline.learned import term_owners, term_rows

    model = random_model(family_config("llama"))  # 2 blocks: 4 terms
    rows = term_rows(model)
    attn = model.model.layers[0].self_attn
    mlp = model.model.layers[0].mlp
    assert rows == [sum(m.weight.shape[0] for m in (attn.q_proj, attn.k_proj, attn.v_proj)),
                    mlp.gate_proj.weight.shape[0] + mlp.up_proj.weight.shape[0]] * 2
    hidden = model.config.hidden_size
    assert term_owners(rows, hidden, World()) == [0, 0, 0, 0]
    two = term_owners(rows, hidden, World(1, 2, True))
    assert sorted(two) == [0, 0, 1, 1] and two[0] != two[2]  # each rank one attention, one MLP term
    many = term_owners(rows * 15, hidden, World(1, 4, True))
    assert [many.count(r) for r in range(4)] == [15, 15, 15, 15]


@pytest.mark.parametrize("family", ["llama", "llama-tied", "phi3", "gemma", "qwen3_moe"])
def test_learned_rotation_keeps_the_logits(family):
    """Learned from the model's own statistics (the model untouched meanwhile), then applied as every
    rotation is: the same logits; the record carries the objective, below the Hadamard start's 1."""
    from gptq import QuantConfig
    from gptq.pipeline.activations import Activations
    from gptq.pipeline.learned import learn_residual
    from gptq.pipeline.loop import capture_block_inputs

    config = family_config(family)
    model = random_model(config)
    ids = torch.randint(0, config.vocab_size, (4, 24), generator=torch.Generator().manual_seed(1))
    cfg = QuantConfig(bits=3, group_size=32, rotate="learned", rotate_steps=20)
    rot = Rotator(model.config, "learned", 0, steps=20)
    Q0 = rot.Q.clone()
    with torch.no_grad():
        before = model(ids).logits
        info = learn_residual(rot, model, capture_block_inputs(model, ids, 2, "cpu"), cfg, torch.device("cpu"),
                              Activations(), progress=False)
        assert torch.equal(model(ids).logits, before)  # learning leaves the model as it was
        record = rot.rotate_model(model)
        after = model(ids).logits
    assert (after - before).abs().max().item() < 2e-5 * before.abs().max().item() + 1e-6
    assert (rot.Q - Q0).abs().max().item() > 0.05
    assert record.kind == "learned" and record.residual.startswith("learned from hadamard 64 in 20 steps")
    assert record.objective == info["objective"] < 1.0
    assert model.config.gptq_rotation == record.as_dict()


@pytest.mark.parametrize("stream", [True, False])
def test_both_paths_learn_on_the_output_format_grid(stream, tmp_path, tiny_tokenizer_dir, monkeypatch):
    """--format bnb-nf4 --rotate learned, streaming and in memory: the objective rounds every reader onto
    the NF4 table at group 64, the grid the solver then uses."""
    from gptq import QuantConfig
    from gptq.core.grids import GridSpec
    from gptq.core.learned_rotation import Rounding
    from gptq.pipeline import learned, run, streaming

    seen = []
    real = learned.learn_rotation

    def spy(weights, hinv, Q0, rounding, **kw):
        seen.extend(rounding(j) for j in range(kw["n_terms"]))
        return real(weights, hinv, Q0, rounding, **kw)

    monkeypatch.setattr(learned, "learn_rotation", spy)
    cfg = QuantConfig(bits=4, group_size=64, rotate="learned", rotate_steps=2, format="bnb-nf4")
    windows = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    config = family_config("llama")
    if stream:
        d = saved_model(tmp_path, tiny_tokenizer_dir, config)
        streaming.quantize_streaming(d, tmp_path / "out", cfg, windows, torch.float32, device="cpu", progress=False)
    else:
        run.quantize_model(random_model(config), windows, cfg, device="cpu", progress=False)
    nf4 = Rounding.of(GridSpec("nf4", 4, 64, True))
    assert nf4.table is not None and seen == [nf4] * (2 * config.num_hidden_layers)


def test_in_memory_learning_spilled_to_tmpdir_writes_what_it_writes_in_memory(tmp_path, monkeypatch):
    """--no-stream --rotate learned --max-memory 0: activations and terms spilled under TMPDIR, the same
    stored tensors as in memory, and nothing left behind."""
    from gptq import QuantConfig
    from gptq.pipeline import run

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    cfg = QuantConfig(bits=3, group_size=32, rotate="learned", rotate_steps=6)
    windows = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    from gptq.pipeline.learned import Terms

    put, dirs = Terms.put, []

    def spy(self, j, readers, hinv):
        dirs.append(self.dir)
        put(self, j, readers, hinv)

    monkeypatch.setattr(Terms, "put", spy)
    outs = []
    for budget in (None, 0):
        packed, _ = run.quantize_model(random_model(family_config("llama")), windows, cfg, device="cpu",
                                       progress=False, max_memory=budget)
        outs.append({k: v.tensors(k) for k, v in packed.items()})
    n = len(dirs) // 2
    assert dirs[:n] == [None] * n and all(d is not None and d.is_relative_to(tmp_path) for d in dirs[n:])
    assert outs[0].keys() == outs[1].keys()
    for k in outs[0]:
        for name, t in outs[0][k].items():
            assert torch.equal(t, outs[1][k][name]), (k, name)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("gptq-")]  # (torch's own caches aside)


def test_a_learned_rotation_is_not_applied_before_it_is_learned():
    config = family_config("llama")
    model = random_model(config)
    w = model.model.layers[0].self_attn.q_proj.weight.clone()
    rot = Rotator(model.config, "learned")
    with pytest.raises(RuntimeError, match="learned from the calibration data"):
        rot.rotate_model(model)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, w)
    with pytest.raises(ValueError, match="not orthogonal"):
        rot.set_learned(2 * torch.eye(64, dtype=torch.float64), 1.0)


def test_resume_reads_the_learned_rotation_back(tmp_path, tiny_tokenizer_dir, monkeypatch):
    """Interrupted after block 0: --resume takes Q from the run folder (learning again is not possible:
    it is made to fail) and writes the bytes an uninterrupted run writes."""
    from gptq import QuantConfig
    from gptq.pipeline import streaming
    from tests.test_distributed import same_checkpoint

    d = saved_model(tmp_path, tiny_tokenizer_dir, family_config("llama"))
    windows = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    cfg = QuantConfig(bits=3, group_size=32, rotate="learned", rotate_steps=10)
    kw = dict(device="cpu", progress=False)
    streaming.quantize_streaming(d, tmp_path / "full", cfg, windows, torch.float32, **kw)

    def stop(event, _rank):
        if event == "saved:0":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        streaming.quantize_streaming(d, tmp_path / "r", cfg, windows, torch.float32, on_event=stop, **kw)
    assert (tmp_path / "r.partial" / streaming.ROTATION).is_file()

    def fail(*a, **k):
        raise AssertionError("learned again on --resume")

    monkeypatch.setattr(streaming, "learn_residual", fail)
    streaming.quantize_streaming(d, tmp_path / "r", cfg, windows, torch.float32, resume=True, **kw)
    same_checkpoint(tmp_path / "full", tmp_path / "r")
    other = QuantConfig(bits=3, group_size=32, rotate="learned", rotate_steps=11)
    from gptq.io.safetensors_io import TensorSource

    fps = {_fp(d, TensorSource(d), c, windows) for c in (cfg, other, QuantConfig(bits=3, group_size=32,
                                                                                    rotate="hadamard"))}
    assert len(fps) == 3  # the steps and the kind are part of what --resume checks


def _fp(d, source, cfg, windows):
    from gptq.pipeline.streaming import _fingerprint

    return _fingerprint(d, source, cfg, windows, torch.float32, 8)


def test_cli_learned_rotation_is_recorded_and_inspected(tmp_path, tiny_tokenizer_dir):
    import json

    from gptq.inspect import describe, format_description
    from gptq.quantize import main
    from tests.conftest import SAMPLE_TEXT

    text = tmp_path / "calib.txt"
    text.write_text(SAMPLE_TEXT)
    d = saved_model(tmp_path, tiny_tokenizer_dir, family_config("llama"))
    base = [str(d), "--dataset", str(text), "--nsamples", "2", "--seqlen", "32", "--group-size", "32", "--quiet",
            "--bits", "3", "--rotate", "learned"]
    with pytest.raises(SystemExit):
        main(base + ["--rotate-steps", "0", "--out", str(tmp_path / "bad")])
    assert not (tmp_path / "bad").exists()
    for stream in ("--stream", "--no-stream"):
        out = tmp_path / f"q{stream}"
        assert main(base + ["--rotate-steps", "5", stream, "--out", str(out)]) == 0
        cfg = json.loads((out / "config.json").read_text())["gptq_rotation"]
        report = json.loads((out / "quantize_report.json").read_text())
        assert cfg["kind"] == "learned" and 0 < cfg["objective"] < 1.5
        assert report["rotation"] == cfg and report["quant_config"]["rotate_steps"] == 5
        text_out = format_description(describe(out))
        assert "rotated before solving (--rotate learned, seed 0)" in text_out
        assert "learned from hadamard 64 in 5 steps" in text_out


def test_rotate_steps_without_a_learned_rotation_is_noted(tmp_path, tiny_tokenizer_dir, capsys):
    from gptq.quantize import main
    from tests.conftest import SAMPLE_TEXT

    text = tmp_path / "calib.txt"
    text.write_text(SAMPLE_TEXT)
    d = saved_model(tmp_path, tiny_tokenizer_dir, family_config("llama"))
    assert main([str(d), "--dataset", str(text), "--nsamples", "2", "--seqlen", "32", "--group-size", "32",
                 "--rotate", "none", "--rotate-steps", "5", "--out", str(tmp_path / "o"), "--quiet"]) == 0
    assert "--rotate-steps is for --rotate learned" in capsys.readouterr().err

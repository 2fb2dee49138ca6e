"""GGML's Q2_K, Q3_K and IQ4_NL: their grids in the solver, their byte layouts (checked against the
``gguf`` package's dequantizers, bit for bit), llama-quantize's Q2_K / Q3_K_S/M/L / IQ4_NL type
rules, and whole files read back through our loader. llama.cpp itself runs them in tests/interop."""

import numpy as np
import pytest
import torch
from conftest import BPE_VOCAB

from gptq import QuantConfig, quantize_model, save_checkpoint, solve
from gptq.core.grids import GridSpec
from gptq.core.grids import ggml
from gptq.core.grids.ggml import KVALUES_IQ4NL, TYPES, KQuantFamily, MinFamily, ggml_family
from gptq.core.grids.search import shrink_search
from gptq.formats.gguf.blocks import dequantize_blocks, pack_blocks
from gptq.core.solver import round_to_nearest
from gptq.formats.gguf.rules import FILE_TYPES, layer_type, n_gqa, output_type, plan

NEW = ["q2_k", "q3_k", "iq4_nl"]
CFG = QuantConfig()


def problem(out=64, n=512, seed=0, dead=()):
    """W [out, n] and H = 2XᵀX/m from correlated inputs; the inputs in ``dead`` always zero."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(1024, n, generator=g) @ torch.randn(n, n, generator=g) * 0.1
    X[:, list(dead)] = 0
    return torch.randn(out, n, generator=g) * 0.05, 2 * X.T @ X / 1024


def output_error(W, Q, H) -> float:
    D = W - Q
    return float(torch.einsum("ij,jk,ik->", D, H, D))


@pytest.mark.parametrize("t", NEW)
def test_blocks_dequantize_to_the_solved_weight_with_zero_blocks(t):
    """GPTQ and round-to-nearest: gguf's dequantizer of the packed blocks gives the solver's Ŵ bit for
    bit. Inputs 256..511 are dead (the solver zeroes W there: whole zero blocks, stored with d = 0 in
    IQ4_NL) and so are 32..47 (a zero group inside a Q2_K/Q3_K super-block, which takes no part in
    its d): they come back exactly 0. IQ4_NL's table has no 0, so in its half-dead block 32..63 the
    dead weights become d·1 (harmless: their inputs are always zero)."""
    dead = [*range(32, 48), *range(256, 512)]
    W, H = problem(dead=dead)
    W[:, dead] = 0  # (GPTQ zeroes them itself; round-to-nearest sees them so)
    exact = dead if t != "iq4_nl" else list(range(256, 512))
    for r in (solve(W, H, CFG, grid=GridSpec.ggml(t)), round_to_nearest(W, CFG, GridSpec.ggml(t)),
              round_to_nearest(W, QuantConfig(mse=False), GridSpec.ggml(t))):
        blocks = pack_blocks(t, r.codes, r.scales, r.zeros, r.scale_state)
        assert blocks.shape == (64, 512 // TYPES[t].block_weights * TYPES[t].block_bytes)
        w = dequantize_blocks(t, blocks, 512)
        assert w.dtype == torch.float32 and torch.equal(w, r.weight)
        assert torch.equal(r.weight[:, exact], torch.zeros(64, len(exact)))
        assert (r.weight[:, 48:256] != 0).any(dim=1).all()


@pytest.mark.parametrize("t", ["q2_k", "q3_k", "q6_k"])
def test_a_zero_group_takes_no_part_in_its_super_blocks_scale(t):
    """Round-to-nearest of rows whose group 2 is zero equals, in every other group, that of the same rows
    with group 2 holding tiny weights instead: d comes from the live groups (a zero group's grid is a
    placeholder, which must not set d and coarsen the rest of its super-block)."""
    W = torch.randn(8, 256, generator=torch.Generator().manual_seed(3)) * 0.05
    W[:, 32:48] = 0
    tiny = W.clone()
    tiny[:, 32:48] = 1e-6
    live = [*range(32), *range(48, 256)]
    a, b = (round_to_nearest(x, CFG, GridSpec.ggml(t)) for x in (W, tiny))
    assert torch.equal(a.weight[:, live], b.weight[:, live]) and torch.equal(a.scale_state.d, b.scale_state.d)
    assert torch.equal(a.weight[:, 32:48], torch.zeros(8, 16))


def _explicit_errors(fam, w, cw, shrink):
    """The clipping search's errors [V·P, out(, G)] for ``shrink`` computed the plain way: the family's
    own quantize then dequantize (what the search's in-place arithmetic must equal)."""
    if isinstance(fam, KQuantFamily):
        x = w.view(w.shape[0], fam.t.per_fit, fam.t.group)
        s, m = fam._candidates(x, shrink)
        z = fam._zero(m, s)[..., None]
        e = fam.dequantize(fam.quantize(x, s[..., None], z), s[..., None], z) - x
        return (e.square() * cw.view(fam.t.per_fit, fam.t.group)).sum(dim=-1)
    if isinstance(fam, MinFamily):
        lo, hi = w.min(dim=1).values, w.max(dim=1).values
        d, m = (t[..., None] for t in fam._grid(shrink * lo, shrink * hi))
        return (fam.dequantize(fam.quantize(w, d, m), d, m) - w).square() @ cw
    amax = w.abs().amax(dim=1)
    z = getattr(fam, "z", None)
    d = torch.cat([fam._d(amax, shrink, -1.0), fam._d(amax, shrink, 1.0)])[..., None]  # d < 0 first
    return (fam.dequantize(fam.quantize(w, d, z), d, z) - w).square() @ cw


@pytest.mark.parametrize("t", sorted(TYPES))
def test_the_clipping_search_scores_each_candidate_as_quantize_then_dequantize(t, monkeypatch):
    """The search computes each candidate's error in place on one temporary, a chunk of rows at a time
    (several times faster than the family's quantize/dequantize on the whole matrix); its errors equal
    the plain computation's exactly, for every type, with column weights, a zero group and an outlier."""
    g = torch.Generator().manual_seed(4)
    fam = ggml_family(t)
    unit = TYPES[t].block_weights
    w = torch.randn(40, unit, generator=g) * 0.05
    w[3, :16] = 0
    w[5, 7] = 2.0
    cw = torch.rand(unit, generator=g) + 0.1
    seen = []

    def spy(cost, shape, like):
        seen.append((cost, shape))
        return shrink_search(cost, shape, like)

    monkeypatch.setattr(ggml, "shrink_search", spy)
    fam.prepare(w, TYPES[t].group)
    fam.fit(w, cw, group=0, cols=torch.arange(unit))
    (cost, shape), = seen
    shrink = 0.2 + 0.8 * torch.rand(5, *shape, generator=g)
    assert torch.equal(cost(shrink), _explicit_errors(fam, w, cw, shrink))


@pytest.mark.parametrize("t, most", [("q2_k", 0.6), ("q3_k", 0.55), ("iq4_nl", 0.5)])
def test_gptq_beats_round_to_nearest_on_the_same_grid(t, most):
    """The output error (W − Ŵ) H (W − Ŵ)ᵀ of GPTQ against round-to-nearest, both with the MSE search,
    on correlated inputs: measured 0.54 (Q2_K), 0.50 (Q3_K), 0.43 (IQ4_NL) of it."""
    W, H = problem()
    gptq = output_error(W, solve(W, H, CFG, grid=GridSpec.ggml(t)).weight, H)
    rtn = output_error(W, round_to_nearest(W, CFG, GridSpec.ggml(t)).weight, H)
    assert gptq < most * rtn
    # and the types rank by their bits: more bits, less error (IQ4_NL below Q3_K below Q2_K)
    if t == "q3_k":
        q2 = output_error(W, solve(W, H, CFG, grid=GridSpec.ggml("q2_k")).weight, H)
        q4 = output_error(W, solve(W, H, CFG, grid=GridSpec.ggml("iq4_nl")).weight, H)
        assert q4 < gptq < q2


def test_hand_built_blocks_dequantize_by_the_documented_formulas():
    """Codes and stored scales chosen here (negative d, negative Q3_K scales, every code), packed, then
    gguf's dequantizer: Q2_K d·(sc & 15)·q − dmin·(sc >> 4), Q3_K d·(sc − 32)·(q − 4), IQ4_NL d·K[q]."""
    from gptq.core.grids.ggml import KScales

    g = torch.Generator().manual_seed(5)
    out, n = 3, 512  # two super-blocks a row
    units = n // 256
    q3 = torch.randint(0, 8, (out, n), generator=g)
    sc3 = torch.randint(-32, 32, (units, 16, out), generator=g)
    d3 = torch.tensor([-0.0125, 0.5, -3.0])[None].expand(units, out).to(torch.float16).float()
    state3 = KScales(d3, sc3.to(torch.int16), torch.zeros_like(d3), torch.zeros_like(sc3, dtype=torch.int16))
    w3 = dequantize_blocks("q3_k", pack_blocks("q3_k", q3, None, None, state3), n)
    scale3 = (d3[:, None, :] * sc3.float()).repeat_interleave(16, dim=1).permute(2, 0, 1).reshape(out, n)
    assert torch.equal(w3, scale3 * (q3.float() - 4))

    q2 = torch.randint(0, 4, (out, n), generator=g)
    sc2, mn2 = (torch.randint(0, 16, (units, 16, out), generator=g) for _ in range(2))
    d2 = torch.tensor([0.02, 1.5, 0.001])[None].expand(units, out).to(torch.float16).float()
    dmin2 = (d2 / 3).to(torch.float16).float()
    state2 = KScales(d2, sc2.to(torch.int16), dmin2, mn2.to(torch.int16))
    w2 = dequantize_blocks("q2_k", pack_blocks("q2_k", q2, None, None, state2), n)

    def per_weight(d, c):  # [units, out], [units, 16, out] → [out, n]
        return (d[:, None, :] * c.float()).repeat_interleave(16, dim=1).permute(2, 0, 1).reshape(out, n)

    assert torch.equal(w2, per_weight(d2, sc2) * q2.float() - per_weight(dmin2, mn2))

    qn = torch.arange(32 * 4).remainder(16).reshape(1, 128).expand(out, 128)
    dn = torch.tensor([[-0.25, 0.125, 0.0, -1.0]]).expand(out, 4).T.to(torch.float16).float()  # [groups, out]
    wn = dequantize_blocks("iq4_nl", pack_blocks("iq4_nl", qn, dn, torch.zeros_like(dn), None), 128)
    table = torch.tensor(KVALUES_IQ4NL, dtype=torch.float32)
    assert torch.equal(wn, dn.T.repeat_interleave(32, dim=1) * table[qn])


def test_q3_k_and_iq4_nl_take_either_sign_q2_k_a_positive_d():
    """Q3_K's 8 levels −4..3 and IQ4_NL's table −127..113 are asymmetric: the search gives each group
    the sign that puts the longer reach on its extreme weight. A group whose largest weight is
    positive gets a negative scale, and the other way round."""
    W = torch.randn(2, 256, generator=torch.Generator().manual_seed(2)) * 0.01
    W[0, ::16], W[1, ::16] = 0.2, -0.2  # one extreme per group of 16, positive in row 0, negative in row 1
    for t in ("q3_k", "iq4_nl"):
        r = round_to_nearest(W, QuantConfig(mse=False), GridSpec.ggml(t))
        assert (r.scales[:, 0] < 0).all() and (r.scales[:, 1] > 0).all(), t
    st = round_to_nearest(W, CFG, GridSpec.ggml("q3_k")).scale_state
    assert (st.sc.amin(dim=1) == -32).all()  # each super-block's largest scale is stored as −32
    st = round_to_nearest(W, CFG, GridSpec.ggml("q2_k")).scale_state
    assert (st.d > 0).all() and (st.dmin >= 0).all() and int(st.sc.max()) <= 15 and int(st.mn.max()) <= 15


LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


def counts(ftype, n_layers, hidden, inter, gqa):
    """{(GGUF role, type): layers} of llama-quantize's choice for a Llama of that shape."""
    from gptq.formats.gguf.names import BLOCK_NAMES

    linears = {f"model.layers.{i}.{n}": inter if n == "mlp.down_proj" else hidden
               for i in range(n_layers) for n in LINEARS}
    default, per = plan(ftype, "llama", linears, n_gqa=gqa)
    types = {**{n: default for n in linears}, **dict(per)}
    out: dict = {}
    for name, t in types.items():
        i, rest = name.removeprefix("model.layers.").split(".", 1)
        out.setdefault((BLOCK_NAMES[rest], t), []).append(int(i))
    return {k: sorted(v) for k, v in out.items()}


def all_layers(n, **roles):
    return {(role, t): list(range(n)) for role, t in roles.items()}


def test_types_follow_llama_quantize_for_a_32_layer_llama():
    """As llama-quantize 0.3.36 wrote them for a 32-layer Llama of rows 256 / 512 (its files read
    back), with one key/value head per attention head (n_gqa 1) and one per four (n_gqa 4)."""
    k3 = {"attn_q": "q3_k", "attn_k": "q3_k", "ffn_gate": "q3_k", "ffn_up": "q3_k"}
    assert counts("q3_k_m", 32, 256, 512, 1) == {
        **all_layers(32, **k3, attn_output="q4_k"), ("attn_v", "q5_k"): [0, 1], ("attn_v", "q4_k"): list(range(2, 32)),
        ("ffn_down", "q5_k"): [0, 1], ("ffn_down", "q4_k"): list(range(2, 32))}
    assert counts("q3_k_l", 32, 256, 512, 1) == all_layers(32, **k3, attn_v="q5_k", attn_output="q5_k",
                                                           ffn_down="q5_k")
    assert counts("q3_k_s", 32, 256, 512, 4) == all_layers(32, **k3, attn_v="q3_k", attn_output="q3_k",
                                                           ffn_down="q3_k")
    k2 = {"attn_q": "q2_k", "attn_k": "q2_k", "ffn_gate": "q2_k", "ffn_up": "q2_k", "attn_output": "q3_k",
          "ffn_down": "q3_k"}
    assert counts("q2_k", 32, 256, 512, 1) == all_layers(32, **k2, attn_v="q3_k")
    assert counts("q2_k", 32, 256, 512, 4) == all_layers(32, **k2, attn_v="q4_k")
    # IQ4_NL: attn_v Q5_K from n_gqa 4; a calibrated file keeps ffn_down IQ4_NL (without an importance
    # matrix llama-quantize gives the first eighth Q5_K)
    nl = {"attn_q": "iq4_nl", "attn_k": "iq4_nl", "attn_output": "iq4_nl", "ffn_gate": "iq4_nl",
          "ffn_up": "iq4_nl", "ffn_down": "iq4_nl"}
    assert counts("iq4_nl", 32, 256, 512, 4) == all_layers(32, **nl, attn_v="q5_k")
    assert counts("iq4_nl", 32, 256, 512, 1) == all_layers(32, **nl, attn_v="iq4_nl")
    assert [layer_type("iq4_nl", "ffn_down", i, 32, 512, calibrated=False) for i in (3, 4)] == ["q5_k", "iq4_nl"]
    # the edges: an untied head Q6_K, untied token embeddings the file's type
    assert output_type("q3_k_m", 256) == "q6_k" and layer_type("q3_k_m", "token_embd", 0, 32, 256) == "q3_k"
    assert layer_type("q2_k", "token_embd", 0, 32, 256) == "q2_k" and output_type("iq4_nl", 256) == "q6_k"
    assert {t: FILE_TYPES[t][0] for t in ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "iq4_nl")} == {
        "q2_k": 10, "q3_k_s": 11, "q3_k_m": 12, "q3_k_l": 13, "iq4_nl": 25}


def test_types_follow_llama_quantize_for_smollm2_shapes():
    """SmolLM2-135M: 30 layers, rows of 576 (1536 for ffn_down), 9 heads on 3 key/value heads. Q2_K and
    Q3_K fall back to Q4_0 where a row is not a multiple of 256 (``tensor_type_fallback``), Q4_K to
    Q5_0, Q5_K to Q5_1; the tied embeddings Q8_0. As llama-quantize 0.3.36 wrote them."""
    assert counts("q3_k_m", 30, 576, 1536, 3) == {
        **all_layers(30, attn_q="q4_0", attn_k="q4_0", ffn_gate="q4_0", ffn_up="q4_0", attn_output="q5_0"),
        ("attn_v", "q5_1"): [0, 1], ("attn_v", "q5_0"): list(range(2, 30)),
        ("ffn_down", "q5_k"): [0], ("ffn_down", "q4_k"): list(range(1, 30))}
    assert counts("q2_k", 30, 576, 1536, 3) == all_layers(
        30, attn_q="q4_0", attn_k="q4_0", attn_v="q4_0", attn_output="q4_0", ffn_gate="q4_0", ffn_up="q4_0",
        ffn_down="q3_k")
    assert counts("q3_k_l", 30, 576, 1536, 3)[("attn_output", "q5_1")] == list(range(30))
    assert counts("iq4_nl", 30, 576, 1536, 3) == all_layers(
        30, attn_q="iq4_nl", attn_k="iq4_nl", attn_v="iq4_nl", attn_output="iq4_nl", ffn_gate="iq4_nl",
        ffn_up="iq4_nl", ffn_down="iq4_nl")
    for ftype in ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "iq4_nl"):
        assert output_type(ftype, 576) == "q8_0"


def test_fused_qkv_and_eight_experts_take_llama_cpps_rules():
    """Fused q/k/v (GPT-2, Phi-3) takes attn_v's rules in these files (llama-quantize's Q3_K_M file of an
    8-layer GPT-2: Q5_K for the first two, Q4_K after); 8-expert models Q8_0 attn_k / attn_v and Q5_K
    attn_output, except Q3_K_L's attn_output, which llama.cpp leaves."""
    assert [layer_type("q3_k_m", "attn_qkv", i, 8, 256) for i in range(4)] == ["q5_k", "q5_k", "q4_k", "q4_k"]
    assert layer_type("q2_k", "attn_qkv", 5, 8, 256) == "q3_k" and layer_type("q3_k_l", "attn_qkv", 5, 8, 256) == "q5_k"
    for ftype in ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "iq4_nl"):
        assert layer_type(ftype, "attn_v", 5, 8, 256, n_expert=8) == "q8_0"
        assert layer_type(ftype, "attn_k", 5, 8, 256, n_expert=8) == "q8_0"
        want = "q3_k" if ftype == "q3_k_l" else "q5_k"
        assert layer_type(ftype, "attn_output", 5, 8, 256, n_expert=8) == want
    assert layer_type("q3_k_m", "ffn_down_exps", 0, 32, 256, n_expert=8) == "q5_k"
    assert n_gqa({"num_attention_heads": 32, "num_key_value_heads": 8}, "llama") == 4
    assert n_gqa({"n_head": 12}, "gpt2") == 1 and n_gqa({"num_attention_heads": 9, "num_key_value_heads": 3}, "llama") == 3


def llama_256(tmp_path, bpe_dir):
    """A 2-layer Llama with rows of 256 and 512 (4 heads on 2 key/value heads, an untied head) and the
    test BPE tokenizer, saved: (model, directory)."""
    import shutil

    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=BPE_VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False), dtype=torch.float32).eval()
    d = tmp_path / "tiny"
    model.save_pretrained(d)
    for f in bpe_dir.iterdir():
        shutil.copy(f, d / f.name)
    return model, d


@pytest.mark.parametrize("ftype, want", [
    ("q3_k_m", {"f32": 5, "q3_k": 9, "q4_k": 4, "q5_k": 2, "q6_k": 1}),
    ("q2_k", {"f32": 5, "q2_k": 9, "q3_k": 6, "q6_k": 1}),
])
def test_tiny_llama_file_reads_back_through_our_loader_with_the_solved_weights(tmp_path, bpe_dir, monkeypatch,
                                                                              ftype, want):
    """A 2-layer Llama (rows of 256 and 512, 4 heads on 2 key/value heads, an untied head) solved for a
    Q3_K_M / Q2_K file and written: llama-quantize's types (Q3_K_M: attn_v Q5_K in both layers,
    attn_output and ffn_down Q4_K; Q2_K: attn_v, attn_output, ffn_down Q3_K; the token embeddings the
    file's type, rounded; the head Q6_K); our loader reads it back with every linear equal to the solved
    weight and, with the file's embeddings and head, the logits of our dequantized model."""
    from gguf import GGUFReader, quants

    from gptq.formats.gguf.writer import write_gguf
    from gptq.runtime.gguf_reader import load_gguf

    monkeypatch.setenv("GPTQ_GGUF_PRE", "default")  # the test tokenizer is none llama.cpp knows
    model, d = llama_256(tmp_path, bpe_dir)
    cfg = QuantConfig(format=f"gguf:{ftype}")
    ids = torch.randint(0, BPE_VOCAB, (4, 64), generator=torch.Generator().manual_seed(1))
    packed, _ = quantize_model(model, ids, cfg, device="cpu", progress=False)
    stage = save_checkpoint(tmp_path / "stage", model, packed, cfg, source_dir=d)
    info = write_gguf(stage, tmp_path / f"m-{ftype}.gguf", ftype, d)
    assert info["tensor_types"] == want
    got = {t.name: t for t in GGUFReader(tmp_path / f"m-{ftype}.gguf").tensors}
    assert got["token_embd.weight"].tensor_type.name == FILE_TYPES[ftype][1].upper() and got["output.weight"].tensor_type.name == "Q6_K"

    loaded, _ = load_gguf(tmp_path / f"m-{ftype}.gguf", "cpu", torch.float32)
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name != "lm_head":
            assert torch.equal(loaded.get_submodule(name).weight, m.weight), name
    with torch.no_grad():
        for ours, gg in ((model.model.embed_tokens, "token_embd.weight"), (model.lm_head, "output.weight")):
            t = got[gg]
            ours.weight.copy_(torch.from_numpy(np.ascontiguousarray(quants.dequantize(t.data, t.tensor_type))))
        x = torch.randint(0, BPE_VOCAB, (2, 32), generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=1e-5, atol=1e-5)


def test_a_budget_over_the_new_types_is_stored_at_the_planned_size(tmp_path, bpe_dir, monkeypatch, capsys):
    """--format gguf --max-size choosing between Q2_K, Q3_K and IQ4_NL: the .gguf's bytes are the plan's
    to the byte (fixed bytes from a dry run of the writer, each linear's blocks), each linear of the
    type chosen, and more than one type chosen."""
    import json
    import re

    from conftest import SAMPLE_TEXT
    from gguf import GGUFReader

    from gptq.formats.gguf.names import BLOCK_NAMES
    from gptq.quantize import main

    monkeypatch.setenv("GPTQ_GGUF_PRE", "default")
    _, d = llama_256(tmp_path, bpe_dir)
    calib = tmp_path / "calib.txt"
    calib.write_text(SAMPLE_TEXT)
    args = [str(d), "--dataset", str(calib), "--nsamples", "4", "--seqlen", "32", "--quiet", "--format", "gguf",
            "--candidates", "q2_k,q3_k,iq4_nl", "--min-bits", "0"]  # no floor: Q2_K stays a choice
    with pytest.raises(SystemExit):
        main(args + ["--out", str(tmp_path / "o"), "--max-size", "1"])
    lo, hi = map(int, re.search(r"\((\d+) to (\d+) bytes\)", capsys.readouterr().err).groups())
    budget = (lo + hi) // 2
    assert main(args + ["--out", str(tmp_path / "o"), "--max-size", str(budget)]) == 0
    file = next((tmp_path / "o").glob("*.gguf"))
    rec = json.loads((tmp_path / "o" / "quantize_report.json").read_text())["mix"]
    assert file.stat().st_size == rec["fixed_bytes"] + rec["linear_bytes"] <= budget
    types = {t.name: t.tensor_type.name.lower() for t in GGUFReader(file).tensors}
    chosen = {n: u["choice"] for u in rec["units"] for n in u["linears"]}
    assert len(set(chosen.values())) > 1
    for name, t in chosen.items():
        i, rest = name.removeprefix("model.layers.").split(".", 1)
        assert types[f"blk.{i}.{BLOCK_NAMES[rest]}.weight"] == t, name

"""Mixture-of-experts models (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE): experts unfused into linears,
each solved from its own Hessian, saved under per-expert names, loaded back, streamed and resumed."""

import json
import shutil

import pytest
import torch
from conftest import MOE_FAMILIES, moe_config
from safetensors.torch import load_file
from faults import KILL as KILL_HOOK
from test_stream import calib_text, quantize_cmd, run

from gptq import QuantConfig, quantize_model, save_checkpoint
from gptq.pipeline import loop as pipeline
from gptq.core.solver import round_to_nearest
from gptq.io.modules import get_module
from gptq.models.architectures import for_config
from gptq.models.moe import RoutedExperts, unfuse
from gptq.runtime.load import load


def moe_model(family: str, seed: int = 0, **kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(moe_config(family, **kw), dtype=torch.float32).eval()


def windows(n=4, seq=32, seed=1):
    return torch.randint(0, 256, (n, seq), generator=torch.Generator().manual_seed(seed))


def starve(model, expert: int):
    """Make the router of every block never choose ``expert`` (Mixtral's router with that logit at -inf)."""
    for block in model.model.layers:
        gate = block.mlp.gate

        def forward(h, gate=gate):
            logits = torch.nn.functional.linear(h.reshape(-1, gate.hidden_dim), gate.weight)
            logits[:, expert] = -torch.inf
            top, idx = torch.topk(torch.softmax(logits.float(), dim=-1), gate.top_k, dim=-1)
            return logits, top / top.sum(dim=-1, keepdim=True), idx

        gate.forward = forward


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_unfused_experts_compute_what_the_fused_ones_did(family):
    model = moe_model(family)
    ids = windows()
    with torch.no_grad():
        ref = model(ids).logits
        arch = for_config(model.config)
        fused = get_module(model.model.layers[0], "mlp.experts")
        unfuse(model, arch)
        experts = get_module(model.model.layers[0], "mlp.experts")
        assert isinstance(experts, RoutedExperts) and len(experts) == 8
        inter = fused.gate_up_proj.shape[1] // 2
        assert torch.equal(experts[3].gate_proj.weight, fused.gate_up_proj[3, :inter])
        assert torch.equal(experts[3].up_proj.weight, fused.gate_up_proj[3, inter:])
        assert torch.equal(experts[3].down_proj.weight, fused.down_proj[3])
        torch.testing.assert_close(model(ids).logits, ref, rtol=0, atol=1e-5)
        assert unfuse(model, arch) is model  # twice is a no-op


def test_checkpoint_names_follow_each_family():
    mixtral, qwen = for_config(moe_config("mixtral")), for_config(moe_config("qwen3_moe"))
    pairs = [("model.layers.3.mlp.experts.12.gate_proj.qweight", "model.layers.3.block_sparse_moe.experts.12.w1.qweight"),
             ("model.layers.0.mlp.experts.0.up_proj.scales", "model.layers.0.block_sparse_moe.experts.0.w3.scales"),
             ("model.layers.0.mlp.experts.7.down_proj.g_idx", "model.layers.0.block_sparse_moe.experts.7.w2.g_idx"),
             ("model.layers.1.mlp.gate.weight", "model.layers.1.block_sparse_moe.gate.weight")]
    for ours, stored in pairs:
        assert mixtral.checkpoint_name(ours) == stored and mixtral.model_name(stored) == ours
    for same in ("model.layers.0.self_attn.q_proj.qweight", "model.embed_tokens.weight", "lm_head.weight"):
        assert mixtral.checkpoint_name(same) == same == mixtral.model_name(same)
    assert qwen.checkpoint_name(pairs[0][0]) == pairs[0][0]  # Qwen stores what transformers names
    assert qwen.producers_of("mlp.experts.11.down_proj") == ("mlp.experts.11.gate_proj", "mlp.experts.11.up_proj")
    assert qwen.expand(("mlp.experts.{e}.gate_proj", "self_attn.o_proj"), 2) == (
        "self_attn.o_proj", "mlp.experts.0.gate_proj", "mlp.experts.1.gate_proj")


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_quantize_save_load_every_expert(tmp_path, family):
    """Every expert's three linears are quantized and stored under the names transformers itself
    saves (per expert); the router and the shared expert's gate stay float; the loaded model's
    logits are the in-memory quantized model's."""
    model = moe_model(family)
    float_dir = tmp_path / "float"
    model.save_pretrained(float_dir)
    stored_float = load_file(float_dir / "model.safetensors")
    router = {k: v for k, v in stored_float.items() if k.endswith("gate.weight") and "gate_proj" not in k}
    unfuse(model, for_config(model.config))
    qc = QuantConfig(bits=4, group_size=32)
    packed, report = quantize_model(model, windows(), qc, device="cpu", progress=False)
    shared = 3 if family == "qwen2_moe" else 0
    assert len(packed) == len(report) == 2 * (4 + 8 * 3 + shared)
    assert all(torch.isfinite(p.scales.float()).all() for p in packed.values())
    with torch.no_grad():
        logits = model(windows(seed=2)).logits
    out = save_checkpoint(tmp_path / "q", model, packed, qc)
    stored = load_file(out / "model.safetensors")
    linears = {k[: -len(".weight")] for k in stored_float if k.endswith(".weight")} - {
        k[: -len(".weight")] for k in router} - {"model.embed_tokens", "lm_head"}
    linears = {k for k in linears if not k.endswith("norm")}
    assert linears == {k[: -len(".qweight")] for k in stored if k.endswith(".qweight")}
    for k, v in router.items():  # routers (and Qwen2-MoE's shared-expert gate) kept as they were
        assert torch.equal(stored[k], v), k
    loaded, _ = load(out, device="cpu", backend="torch", dtype="float32")
    with torch.no_grad():
        torch.testing.assert_close(loaded(windows(seed=2)).logits, logits, rtol=0, atol=1e-4)


def capture_hessians(monkeypatch):
    """{linear: the H it was solved against}, whether solved alone, stacked or as a batch."""
    from gptq.pipeline import experts

    seen = {}
    one, many = experts.solve_group, experts.solve_groups

    def spy(modules, H, config, prefix, *rest, **kw):
        seen.update({f"{prefix}.{name}": H.clone() for name in modules})
        yield from one(modules, H, config, prefix, *rest, **kw)

    def spy_many(groups, Hs, config, prefix, *rest, **kw):
        for modules, H in zip(groups, Hs):
            seen.update({f"{prefix}.{name}": H.clone() for name in modules})
        yield from many(groups, Hs, config, prefix, *rest, **kw)

    # where they are looked up: the block loop (dense groups) and the routed experts' solver
    monkeypatch.setattr(pipeline, "solve_group", spy)
    monkeypatch.setattr(experts, "solve_group", spy)
    monkeypatch.setattr(experts, "solve_groups", spy_many)
    return seen


@pytest.mark.parametrize("mode", ["routed", "all"])
def test_each_expert_hessian_comes_from_its_own_rows(monkeypatch, mode):
    """Block 0's experts see the block's quantized attention: their inputs (and routing) are
    recorded from the quantized model afterwards and H is rebuilt by hand: 2·XᵀX/n over the
    routed tokens (or all tokens), for gate/up; over act(gate x)·up x for down."""
    from gptq.models.moe import record_routing

    seen = capture_hessians(monkeypatch)
    model = unfuse(moe_model("mixtral"), for_config(moe_config("mixtral")))
    ids = windows()
    quantize_model(model, ids, QuantConfig(bits=4, group_size=32, expert_tokens=mode, expert_min_tokens=0),
                   device="cpu", progress=False, batch_size=2)
    experts = model.model.layers[0].mlp.experts
    routing = []
    with torch.no_grad(), record_routing(experts, routing, stop=False):
        for batch in ids.split(2):
            model(batch)
    x = torch.cat([r[0] for r in routing])
    idx = torch.cat([r[1] for r in routing])
    for e in range(8):
        rows = x if mode == "all" else x[(idx == e).any(-1)]
        H = 2 * rows.T @ rows / rows.shape[0]
        torch.testing.assert_close(seen[f"model.layers.0.mlp.experts.{e}.gate_proj"], H, rtol=1e-5, atol=1e-5)
        # down: from the quantized gate/up (whose rows, like down's columns, are now in sorted channel order)
        h = experts[e].hidden(rows)
        torch.testing.assert_close(seen[f"model.layers.0.mlp.experts.{e}.down_proj"], 2 * h.T @ h / h.shape[0],
                                   rtol=1e-4, atol=1e-6)


def test_a_starved_expert_is_rounded_to_nearest_and_named(monkeypatch):
    """Expert 7 is never routed to. With routed-token Hessians it falls back to the identity
    Hessian (= round-to-nearest on the MSE grids), is quantized all the same (never NaN, never left
    float) and the report names it with its token count; with all-token Hessians it is solved."""
    seen = capture_hessians(monkeypatch)
    model = moe_model("mixtral")
    unfuse(model, for_config(model.config))
    starve(model, 7)
    W7 = model.model.layers[1].mlp.experts[7].gate_proj.weight.detach().clone()
    qc = QuantConfig(bits=4, group_size=32, expert_tokens="routed", expert_min_tokens=1)
    packed, report = quantize_model(model, windows(), qc, device="cpu", progress=False)
    rows = {r.name: r for r in report}
    for lin in ("gate_proj", "up_proj", "down_proj"):
        r = rows[f"model.layers.1.mlp.experts.7.{lin}"]
        assert (r.routed, r.tokens, r.rule) == (0, 0, "identity-hessian")
        assert f"model.layers.1.mlp.experts.7.{lin}" in packed
    assert torch.equal(seen["model.layers.1.mlp.experts.7.gate_proj"], torch.eye(64))
    rtn = round_to_nearest(W7, qc)
    assert torch.equal(model.model.layers[1].mlp.experts[7].gate_proj.weight, rtn.weight)
    assert all(r.rule == "gptq" and r.tokens == r.routed > 0 for r in report if ".experts.0." in r.name)
    assert sum(r.routed for r in report if r.name.endswith("gate_proj") and ".layers.0." in r.name) == 4 * 32 * 2

    model = moe_model("mixtral")
    unfuse(model, for_config(model.config))
    starve(model, 7)
    _, report = quantize_model(model, windows(), QuantConfig(bits=4, group_size=32), device="cpu", progress=False)
    r = {r.name: r for r in report}["model.layers.1.mlp.experts.7.down_proj"]
    assert (r.routed, r.tokens, r.rule) == (0, 4 * 32, "gptq")


def test_the_token_threshold_applies_to_every_expert():
    model = unfuse(moe_model("qwen3_moe"), for_config(moe_config("qwen3_moe")))
    _, report = quantize_model(model, windows(), QuantConfig(bits=4, group_size=32, expert_min_tokens=10**6),
                               device="cpu", progress=False)
    experts = [r for r in report if ".experts." in r.name]
    assert len(experts) == 2 * 8 * 3 and all(r.rule == "identity-hessian" for r in experts)
    assert all(r.rule == "gptq" and r.tokens is None for r in report if ".experts." not in r.name)


def moe_dir(tmp_path, tiny_tokenizer_dir, family="mixtral", layers=3):
    model = moe_model(family, layers=layers)
    d = tmp_path / f"tiny-{family}"
    model.save_pretrained(d, max_shard_size="100KB")  # several shards, per-expert names
    for f in tiny_tokenizer_dir.iterdir():
        shutil.copy(f, d / f.name)
    return d, calib_text(tmp_path)


def test_streaming_resume_and_in_memory_agree_byte_for_byte(tmp_path, tiny_tokenizer_dir):
    """The streaming CLI reads the per-expert tensors from the shards; a run killed after block 0
    and resumed writes the same bytes, and so does a run whose activations (the experts' recorded
    inputs and routing included) are all spilled to disk; the in-memory path writes the same tensors."""
    d, text = moe_dir(tmp_path, tiny_tokenizer_dir)
    r = run(quantize_cmd(d, tmp_path / "full"), text)
    assert r.returncode == 0, r.stderr
    killed = run(quantize_cmd(d, tmp_path / "resumed"), text, env={KILL_HOOK: "0"})
    assert killed.returncode == -9
    r = run(quantize_cmd(d, tmp_path / "resumed", "--resume"), text)
    assert r.returncode == 0, r.stderr
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    for n in sorted(p.name for p in full.iterdir()):
        if n != "quantize_report.json":
            assert (full / n).read_bytes() == (resumed / n).read_bytes(), n
    r = run(quantize_cmd(d, tmp_path / "spilled", "--max-memory", "0"), text)  # routing records spilled too
    assert r.returncode == 0, r.stderr
    for n in sorted(p.name for p in full.iterdir()):
        if n != "quantize_report.json":
            assert (full / n).read_bytes() == (tmp_path / "spilled" / n).read_bytes(), n
    r = run(quantize_cmd(d, tmp_path / "mem", "--no-stream"), text)
    assert r.returncode == 0, r.stderr
    a, b = load_file(full / "model.safetensors"), load_file(tmp_path / "mem" / "model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert "model.layers.2.block_sparse_moe.experts.7.w2.qweight" in a
    layers = json.loads((full / "quantize_report.json").read_text())["layers"]
    assert sum(".experts." in r["name"] for r in layers) == 3 * 8 * 3
    assert all(r["tokens"] == 4 * 32 for r in layers if ".experts." in r["name"])


def test_bitsandbytes_format_is_refused_for_moe_models(tmp_path, tiny_tokenizer_dir):
    d, text = moe_dir(tmp_path, tiny_tokenizer_dir, layers=1)
    r = run(quantize_cmd(d, tmp_path / "o", "--format", "bnb-nf4", "--group-size", "64"), text)
    assert r.returncode == 2 and "mixture-of-experts" in r.stderr and "--format gptq" in r.stderr  # the way out
    assert not (tmp_path / "o").exists()


def test_gguf_is_refused_for_moe_families_llama_cpp_output_does_not_cover(tmp_path, tiny_tokenizer_dir):
    d, text = moe_dir(tmp_path, tiny_tokenizer_dir, family="qwen2_moe", layers=1)  # shared experts: not yet
    r = run(quantize_cmd(d, tmp_path / "o", "--format", "gguf:q4_0"), text)
    assert r.returncode == 2 and "GGUF output supports" in r.stderr and "qwen2_moe" in r.stderr
    assert not (tmp_path / "o").exists()

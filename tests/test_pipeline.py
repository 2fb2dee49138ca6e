"""End to end on tiny random models of every supported family: quantize, save, load, compare."""

import json

import pytest
import torch
from safetensors import safe_open

from conftest import FAMILIES, tiny_model
from gptq import QuantConfig, load, quantize_model, save_checkpoint
from gptq.architectures import UnsupportedModelError, for_config


def windows(n=8, seqlen=32, seed=0):
    return torch.randint(0, 256, (n, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_family_end_to_end(family, tmp_path):
    model = tiny_model(family)
    ids = windows(2, 16, seed=9)
    with torch.no_grad():
        before = model(ids).logits
    cfg = QuantConfig(bits=4, group_size=32)
    packed, report = quantize_model(model, windows(), cfg, device="cpu", batch_size=4, progress=False)
    arch = for_config(model.config)
    assert len(report) == len(arch.linears) * model.config.num_hidden_layers
    assert all(r.loss >= 0 for r in report)
    with torch.no_grad():
        after = model(ids).logits
    # quantization changed the model, but not beyond recognition
    assert not torch.equal(before, after)
    assert torch.nn.functional.cosine_similarity(before.flatten(), after.flatten(), dim=0) > 0.9
    out = save_checkpoint(tmp_path / "ck", model, packed, cfg)
    loaded, _ = load(out, device="cpu", backend="torch", dtype="float32")
    with torch.no_grad():
        reloaded = loaded(ids).logits
    torch.testing.assert_close(reloaded, after, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_true_sequential_replay_is_exact(family):
    """Replaying finished sub-modules (and rebuilding them from their last linear's inputs)
    must give exactly the result of recomputing them."""
    import gptq.pipeline as pl

    a, b = tiny_model(family), tiny_model(family)
    cfg = QuantConfig(bits=3, group_size=32)
    pa, _ = quantize_model(a, windows(), cfg, device="cpu", progress=False)
    originals = pl._replayable_children, pl._closing_linear
    pl._replayable_children = lambda arch, solved: []
    pl._closing_linear = lambda arch, solved, groups: None
    try:
        pb, _ = quantize_model(b, windows(), cfg, device="cpu", progress=False)
    finally:
        pl._replayable_children, pl._closing_linear = originals
    for k in pa:
        assert torch.equal(pa[k].qweight, pb[k].qweight), k
        assert torch.equal(pa[k].scales, pb[k].scales), k


def test_stacked_solve_equals_separate():
    from gptq.pipeline import solve_group
    from gptq.solver import solve

    lin = {n: torch.nn.Linear(64, o, bias=False) for n, o in (("q", 64), ("k", 32), ("v", 32))}
    X = torch.randn(512, 64) @ torch.randn(64, 64)
    H = 2 * X.T @ X / 512
    cfg = QuantConfig(bits=4, group_size=16)
    for name, module, r, _ in solve_group(lin, H, cfg, "blk"):
        alone = solve(module.weight.float(), H, cfg)
        assert torch.equal(r.codes, alone.codes), name
        assert torch.equal(r.scales, alone.scales), name


def test_same_inputs_same_bytes(tmp_path):
    outs = []
    for k in range(2):
        model = tiny_model("llama")
        cfg = QuantConfig(bits=4, group_size=32)
        packed, _ = quantize_model(model, windows(), cfg, device="cpu", progress=False)
        outs.append(save_checkpoint(tmp_path / f"ck{k}", model, packed, cfg))
    assert (outs[0] / "model.safetensors").read_bytes() == (outs[1] / "model.safetensors").read_bytes()


def test_checkpoint_format_matches_document(tmp_path):
    model = tiny_model("llama")
    cfg = QuantConfig(bits=4, group_size=32, sym=True)
    packed, _ = quantize_model(model, windows(), cfg, device="cpu", progress=False)
    out = save_checkpoint(tmp_path / "ck", model, packed, cfg, max_shard_bytes=100_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all(s.startswith("model-0000") for s in shards)
    cfgj = json.loads((out / "config.json").read_text())
    qc = cfgj["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["bits"] == 4 and qc["group_size"] == 32 and qc["sym"] is True
    # the default (group-aware act-order) is servable by vLLM >= 0.32: desc_act false, g_idx = k // group
    assert qc["checkpoint_format"] == "gptq" and qc["desc_act"] is False and qc["act_order"] == "group-aware"
    assert json.loads((out / "quantize_config.json").read_text()) == qc
    name = "model.layers.0.self_attn.q_proj"
    f = out / index["weight_map"][f"{name}.qweight"]
    with safe_open(f, "pt") as sf:
        assert sf.metadata() == {"format": "pt"}
        qweight = sf.get_tensor(f"{name}.qweight")
        qzeros = sf.get_tensor(f"{name}.qzeros")
    assert qweight.dtype == torch.int32 and qweight.shape == (64 * 4 // 32, 64)
    assert (qzeros == 0x77777777).all()  # symmetric 4-bit: zero 8 stored as 7
    with safe_open(f, "pt") as sf:
        g_idx = sf.get_tensor(f"{name}.g_idx")
    assert g_idx.tolist() == [k // 32 for k in range(64)]
    assert f"{name}.weight" not in index["weight_map"]
    assert "model.embed_tokens.weight" in index["weight_map"]
    assert not list(tmp_path.glob("*.partial-*"))


def test_unsupported_family_is_named():
    from transformers import BertConfig, T5Config

    with pytest.raises(UnsupportedModelError, match="model_type 'bert' is not supported.*llama"):
        for_config(BertConfig())
    with pytest.raises(UnsupportedModelError, match="encoder-decoder"):
        for_config(T5Config())


def test_nan_activation_names_layer():
    from gptq.hessian import NonFiniteError

    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].input_layernorm.weight[3] = float("nan")
    with pytest.raises(NonFiniteError, match="model.layers.1.self_attn"):
        quantize_model(model, windows(), QuantConfig(), device="cpu", progress=False)

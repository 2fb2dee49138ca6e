"""End to end on tiny random models of every supported family: quantize, save, load, compare."""

import json

import pytest
import torch
from conftest import FAMILIES, tiny_model
from safetensors import safe_open

from gptq import QuantConfig, load, quantize_model, save_checkpoint
from gptq.models.architectures import UnsupportedModelError, for_config


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
def test_true_sequential_replay_is_exact(family, monkeypatch):
    """Replaying finished sub-modules (and rebuilding them from their last linear's inputs)
    must give exactly the result of recomputing them."""
    import gptq.pipeline.loop as pl

    a, b = tiny_model(family), tiny_model(family)
    cfg = QuantConfig(bits=3, group_size=32)
    pa, _ = quantize_model(a, windows(), cfg, device="cpu", progress=False)
    with monkeypatch.context() as mp:  # raises if the loop no longer looks these up: the test would be void
        mp.setattr(pl, "replayable_children", lambda arch, solved: [])
        mp.setattr(pl, "closing_linear", lambda arch, solved, groups: None)
        pb, _ = quantize_model(b, windows(), cfg, device="cpu", progress=False)
    for k in pa:
        assert torch.equal(pa[k].qweight, pb[k].qweight), k
        assert torch.equal(pa[k].scales, pb[k].scales), k


def test_stacked_solve_equals_separate():
    from gptq.core.solver import solve
    from gptq.pipeline.loop import solve_group

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


def test_the_default_grid_is_symmetric_at_4_and_8_bits_and_asymmetric_below(tmp_path):
    assert [QuantConfig(bits=b).grid().sym for b in (2, 3, 4, 8)] == [False, False, True, True]
    assert QuantConfig(bits=3, sym=True).grid().sym and not QuantConfig(bits=4, sym=False).grid().sym
    model = tiny_model("llama")
    cfg = QuantConfig(bits=3, group_size=32)
    packed, _ = quantize_model(model, windows(), cfg, device="cpu", progress=False)
    out = save_checkpoint(tmp_path / "ck", model, packed, cfg)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qc["bits"], qc["sym"], qc["checkpoint_format"]) == (3, False, "gptq")
    with safe_open(out / "model.safetensors", "pt") as sf:
        zeros = sf.get_tensor("model.layers.0.self_attn.q_proj.qzeros")
    # a symmetric grid's zero is 2^(bits−1) = 4 everywhere; these vary per group, and stay ≥ 1 (v1 stores zero − 1)
    from gptq.core.pack import unpack_qzeros
    z = unpack_qzeros(zeros, 3, "gptq")
    assert z.unique().numel() > 1 and int(z.min()) >= 1
    # and it loads back: our loader reads the stored zero points
    q, _ = load(out, device="cpu", backend="torch", dtype="float32")
    x = windows(2, 16)
    with torch.no_grad():
        assert torch.isfinite(q(x).logits).all()


def test_unsupported_family_is_named():
    from transformers import BertConfig, T5Config

    with pytest.raises(UnsupportedModelError, match="model_type 'bert' is not supported.*llama"):
        for_config(BertConfig())
    with pytest.raises(UnsupportedModelError, match="encoder-decoder"):
        for_config(T5Config())


def test_nan_activation_names_layer():
    from gptq.core.hessian import NonFiniteError

    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].input_layernorm.weight[3] = float("nan")
    with pytest.raises(NonFiniteError, match="model.layers.1.self_attn"):
        quantize_model(model, windows(), QuantConfig(), device="cpu", progress=False)


@pytest.mark.parametrize("family", ["llama", "opt", "gpt_neox", "gpt2", "phi"])
def test_sorting_mlp_channels_keeps_the_function_and_gives_act_order_with_trivial_g_idx(family):
    """sort_channels permutes the producers' output rows and the consumer's input columns alike: the
    block computes the same function, the producers' packed tensors follow, and solving the consumer
    on sorted columns (group-aware, g_idx = k // group) equals the dynamic act-order solve of the
    original columns, permuted."""
    from gptq.core.pack import dequantize_packed
    from gptq.core.solver import solve
    from gptq.formats.registry import get
    from gptq.io.modules import weight_matrix
    from gptq.pipeline.loop import sort_channels

    model = tiny_model(family)
    arch = for_config(model.config)
    block = model.get_submodule(arch.blocks)[0]
    consumer, producers = arch.channels[0]
    cfg = QuantConfig(bits=4, group_size=32)
    fmt = get(cfg)
    results = {}
    for name in producers:  # stand-ins for the solved producers: their round-to-nearest results
        m = block.get_submodule(name)
        from gptq.core.solver import round_to_nearest
        results[f"b.{name}"] = round_to_nearest(weight_matrix(m).detach().float(), cfg, fmt.grid(f"b.{name}"))

    def pack(n, r):
        bias = getattr(block.get_submodule(n[2:]), "bias", None)
        return fmt.pack(r, None if bias is None else bias.detach().clone())

    mlp = block.get_submodule(consumer.rsplit(".", 1)[0]) if "." in consumer else block
    x = torch.randn(2, 5, model.config.hidden_size)
    with torch.no_grad():
        before = mlp(x) if "." in consumer else None
    cons = block.get_submodule(consumer)
    W = weight_matrix(cons).detach().clone()
    X = torch.randn(512, W.shape[1]) * torch.linspace(0.1, 3, W.shape[1])  # unequal channel importance
    H = 2 * X.T @ X / 512
    old = {n: pack(n, r).qweight.clone() for n, r in results.items()}
    perm = sort_channels(block, arch, consumer, H, results, "b", cfg)
    assert perm is not None and not torch.equal(perm, torch.arange(len(perm)))
    with torch.no_grad():
        if before is not None:
            torch.testing.assert_close(mlp(x), before, rtol=1e-5, atol=1e-5)
    packed = {n: pack(n, r) for n, r in results.items()}  # the permuted results, packed
    for n, p in packed.items():
        assert torch.equal(p.qweight, old[n][:, perm.cpu()])
        Wq = dequantize_packed(p.qweight, p.qzeros, p.scales, p.g_idx, 4, cfg.format)
        assert Wq.shape[0] == len(perm)
    Hp = H[perm][:, perm]
    sorted_solve = solve(weight_matrix(cons).detach(), Hp, QuantConfig(bits=4, group_size=32))
    assert sorted_solve.g_idx.tolist() == [k // 32 for k in range(W.shape[1])]
    dynamic = solve(W, H, QuantConfig(bits=4, group_size=32, act_order="dynamic"))
    assert torch.equal(sorted_solve.weight, dynamic.weight[:, perm])
    assert sort_channels(block, arch, consumer, H, results, "b", QuantConfig(act_order="static")) is None
    assert sort_channels(block, arch, consumer, H, results, "b", QuantConfig(sort_channels=False)) is None


@pytest.mark.parametrize("grid,dtype", [("nf4", torch.float32), ("int", torch.float16), ("q4_0", torch.float32)])
def test_a_sorted_producers_stored_bias_is_the_modules_own(grid, dtype):
    """sort_channels permutes a producer's rows (fc1 of OPT here) in the module and in the packed
    layer; the packed bias must be a copy, or the in-place permutation of the module's bias is
    applied to it a second time (it was, for bitsandbytes and GGUF layers and fp16 CPU models)."""
    model = tiny_model("opt").to(dtype)
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and m.bias is not None:
            m.bias.data.normal_()
    from gptq.formats.registry import get

    gguf = {"q4_0": "q4_0"}.get(grid, "")
    fmt_name = {"nf4": "bnb-nf4", "int": "gptq", "q4_0": "gguf:q4_0"}[grid]
    cfg = QuantConfig(bits=4, group_size=32 if gguf else 64, format=fmt_name)
    # the format unbound: GGUF's per-model plan refuses OPT, but its layers (every one q4_0) are what is tested
    fmt = get(cfg) if gguf else None
    packed, _ = quantize_model(model, windows(n=2), cfg, device="cpu", progress=False, fmt=fmt)
    name = "model.decoder.layers.0.fc1"
    stored, own = packed[name].bias, model.get_submodule(name).bias.detach()
    assert torch.equal(stored.float(), own.to(stored.dtype).float())

"""Mixed precision under a size budget: the allocation (greedy against exact and brute force), the bytes
(the plan's accounting against the files written), the GPTQ ``dynamic`` overrides as engines match
them, our loader on a mix, refusals, and --resume / --no-stream giving the same bytes."""

from __future__ import annotations

import itertools
import json
import math
import random
import re

import pytest
import torch
from conftest import BPE_VOCAB, SAMPLE_TEXT, tiny_config
from safetensors import safe_open

from gptq.core.config import ConfigError, QuantConfig
from gptq.core.mix import BudgetError, Unit, allocate, allocate_exact, bounds, floor_bits, greedy, total
from gptq.formats.compat import marlin_setting, module_setting, module_settings, settings_used, verdicts
from gptq.formats.gptq import GPTQ
from gptq.quantize import main as quantize_main

# ---- the allocation -------------------------------------------------------------------------------


def test_worked_example():
    a = Unit(("a",), (0, 1), (3, 4), (10.0, 4.0))
    b = Unit(("b",), (0, 1), (3, 4), (9.0, 8.0))
    assert allocate([a, b], 7) == [1, 0]
    assert total([a, b], [1, 0]) == (7, 13.0)


def _random_units(rng: random.Random, n: int, k: int) -> list[Unit]:
    """Units whose error falls roughly 4x per extra bit and whose bytes grow with the bits, with noise."""
    units = []
    for i in range(n):
        size, sens = rng.randint(50, 400), rng.lognormvariate(0, 1.5)
        bits = sorted(rng.sample(range(2, 9), k))
        units.append(Unit((f"u{i}",), tuple(range(k)), tuple(size * b + rng.randint(0, 20) for b in bits),
                          tuple(sens * 4.0 ** -b * rng.uniform(0.8, 1.25) for b in bits)))
    return units


def test_allocation_is_the_brute_force_optimum_on_small_problems():
    """A few coarse steps: greedy alone can miss the optimum by a factor (one indivisible step), so
    ``allocate`` also runs the exact programme (1-byte resolution under 20000 bytes) and keeps the better."""
    rng = random.Random(0)
    missed = 0
    for _ in range(40):
        units = _random_units(rng, 5, 3)
        lo, hi = bounds(units)
        budget = rng.randint(lo, hi)
        best = min((total(units, list(c)) for c in itertools.product(range(3), repeat=5)
                    if total(units, list(c))[0] <= budget), key=lambda t: t[1])
        chosen = total(units, allocate(units, budget))
        g = total(units, greedy(units, budget))
        assert chosen[0] <= budget and g[0] <= budget
        assert chosen[1] == pytest.approx(best[1])
        missed += g[1] > 1.01 * best[1]
    assert missed  # the reason allocate does not rest on greedy alone


def test_greedy_is_within_a_few_percent_of_exact_at_model_sizes():
    rng = random.Random(1)
    ratios = []
    for _ in range(5):
        units = _random_units(rng, 120, 4)  # SmolLM2: 30 blocks x 4 units
        lo, hi = bounds(units)
        budget = (lo + hi) // 2
        g = total(units, greedy(units, budget))
        e = total(units, allocate_exact(units, budget, resolution=budget // 4))
        assert g[0] <= budget and e[0] <= budget
        ratios.append(g[1] / e[1])
    assert max(ratios) < 1.03, ratios


def test_allocation_leaves_no_affordable_improvement():
    units = _random_units(random.Random(2), 30, 4)
    lo, hi = bounds(units)
    budget = lo + (hi - lo) // 3
    choice = allocate(units, budget)
    used, _ = total(units, choice)
    for i, u in enumerate(units):
        for k in range(len(u.options)):
            if u.errors[k] < u.errors[choice[i]]:
                assert used - u.bytes[choice[i]] + u.bytes[k] > budget


def test_floor_is_the_widest_uniform_width_that_fits():
    # the docstring's worked example
    units = [(3, 4, 8), (3, 4, 8)]
    bits = [(3, 4, 8), (3, 4, 8)]
    assert floor_bits(units, bits, 9) == 4
    assert floor_bits(units, bits, 7) == 3
    assert floor_bits(units, bits, 16) == 8
    assert floor_bits(units, bits, 5) == 0  # below every uniform file
    # a unit that cannot take a width rules that width out; its cheapest option of at least b counts
    assert floor_bits([(3, 4, 8), (5, 9)], [(3, 4, 8), (4, 8)], 9) == 4
    assert floor_bits([(3, 4, 8), (5, 9)], [(3, 4, 8), (4, 8)], 8) == 3
    assert floor_bits([(3, 8), (5,)], [(3, 8), (4,)], 100) == 4  # no 8-bit option for the second unit
    # against brute force: the widest b whose uniform file fits; the next wider one does not
    rng = random.Random(3)
    for _ in range(200):
        n = rng.randint(1, 5)
        ub, uw = [], []
        for _ in range(n):
            ws = sorted(rng.sample([2, 3, 4, 5, 6, 8], rng.randint(1, 4)))
            ub.append(tuple(w * rng.randint(8, 12) for w in ws))
            uw.append(tuple(ws))
        budget = rng.randint(10, 400)

        def uniform(b):
            opts = [[x for x, w in zip(bb, ww) if w >= b] for bb, ww in zip(ub, uw)]
            return sum(min(o) for o in opts) if all(opts) else math.inf

        fits = [b for b in {w for ww in uw for w in ww} if uniform(b) <= budget]
        assert floor_bits(ub, uw, budget) == max(fits, default=0)


def test_budget_below_the_smallest_is_refused():
    units = _random_units(random.Random(3), 4, 2)
    with pytest.raises(BudgetError, match="below the smallest possible"):
        allocate(units, bounds(units)[0] - 1)
    with pytest.raises(BudgetError, match="below the smallest possible"):
        allocate_exact(units, bounds(units)[0] - 1)


# ---- the GPTQ format's overrides -------------------------------------------------------------------


def test_the_base_of_a_mix_of_marlin_settings_is_the_most_common_and_vllm_refuses_a_marlin_base_with_others():
    fmt = GPTQ(QuantConfig(bits_per_weight=4), "gptq")
    four, eight = fmt.candidates("4g128,8g32")
    names = [f"model.layers.0.self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    fmt.set_plan({n: (eight if n.endswith("o_proj") else four) for n in names})
    qc = fmt.quantization_config()
    assert (qc["bits"], qc["group_size"], qc["sym"]) == (4, 128, True)
    assert list(qc["dynamic"].values()) == [{"bits": 8, "group_size": 32}]
    v = {v.engine: v for v in verdicts(qc, [(512, 512)])}["vLLM (GPU)"]
    assert v.status == "serves", v
    # a checkpoint from elsewhere: a Marlin base with a 3-bit override (gptq_utils.override_config raises)
    other = qc | {"dynamic": {"+:^model\\.layers\\.0\\.self_attn\\.o_proj$": {"bits": 3, "group_size": 64}}}
    v = {v.engine: v for v in verdicts(other, [(512, 512)])}["vLLM (GPU)"]
    assert v.status == "refuses" and any('quantization="gptq"' in r for r in v.reasons), v
    # the same with the symmetry overridden: Marlin's TYPE_MAP has no asymmetric 4-bit
    other = qc | {"dynamic": {"+:^model\\.layers\\.0\\.self_attn\\.o_proj$": {"bits": 4, "group_size": 128,
                                                                               "sym": False}}}
    v = {v.engine: v for v in verdicts(other, [(512, 512)])}["vLLM (GPU)"]
    assert v.status == "refuses", v


def test_dynamic_overrides_match_fused_and_unfused_names():
    fmt = GPTQ(QuantConfig(bits_per_weight=4), "gptq")
    three, four, eight = fmt.candidates("3g64,4g128,8g32")
    plan = {f"model.layers.{i}.{n}": four for i in range(2) for n in
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
             "mlp.up_proj", "mlp.down_proj")}
    plan |= {f"model.layers.1.self_attn.{n}": three for n in ("q_proj", "k_proj", "v_proj")}
    plan |= {"model.layers.0.mlp.down_proj": eight, "model.layers.0.mlp.gate_proj": three,
             "model.layers.0.mlp.up_proj": three}
    fmt.set_plan(plan)
    qc = fmt.quantization_config()
    # 3 bits is asymmetric by default and no Marlin setting: vLLM would pick Marlin from a 4-bit base and
    # then refuse the 3-bit layers, so the base is the most common setting Marlin does not take
    assert (three.sym, four.sym, eight.sym) == (False, True, True)
    assert (qc["bits"], qc["group_size"], qc["sym"]) == (3, 64, False)
    overrides = {tuple(sorted(o.items())) for o in qc["dynamic"].values()}
    assert overrides == {(("bits", 4), ("group_size", 128), ("sym", True)), (("bits", 8), ("group_size", 32), ("sym", True))}
    for name, g in plan.items():
        assert module_settings(qc, name) == (g.bits, g.group_size), name
    # vLLM matches the fused layers' names (gptq_utils.get_dynamic_override on qkv_proj / gate_up_proj)
    assert module_settings(qc, "model.layers.1.self_attn.qkv_proj") == (3, 64)
    assert module_settings(qc, "model.layers.0.self_attn.qkv_proj") == (4, 128)
    assert module_settings(qc, "model.layers.0.mlp.gate_up_proj") == (3, 64)
    assert module_settings(qc, "model.layers.10.mlp.down_proj") == (3, 64)  # the base: layer 1's 4g128 is anchored
    assert sorted(settings_used(qc)) == [(3, 64), (4, 128), (8, 32)]
    vs = {v.engine: v for v in verdicts(qc, [(512, 512)])}
    assert vs["vLLM (GPU)"].status == "slower" and any("3-bit g64 asym layers" in r for r in vs["vLLM (GPU)"].reasons)
    assert any("every layer runs on vLLM's GPTQ kernel" in r for r in vs["vLLM (GPU)"].reasons)
    assert vs["vLLM (CPU)"].status == "refuses"
    # GPTQModel loads asymmetric v1 files from its own producer only; in v2 it serves the mix, with its
    # torch kernel on CPU (the automatic one is 4-bit only)
    assert vs["transformers + GPTQModel"].status == "refuses"
    assert any("gptq_v2" in r for r in vs["transformers + GPTQModel"].reasons)
    v2 = GPTQ(QuantConfig(bits_per_weight=4), "gptq_v2")
    v2.set_plan({n: v2.candidates(f"{g.bits}g{g.group_size}")[0] for n, g in plan.items()})
    vs = {v.engine: v for v in verdicts(v2.quantization_config(), [(512, 512)])}
    assert vs["transformers + GPTQModel"].status == "slower"
    assert any("BACKEND.TORCH" in r for r in vs["transformers + GPTQModel"].reasons)


def test_candidate_lists():
    fmt = GPTQ(QuantConfig(group_size=64, bits_per_weight=4), "gptq")
    assert [(g.bits, g.group_size) for g in fmt.candidates("3,4g128,8g-1")] == [(3, 64), (4, 128), (8, -1)]
    assert [(g.bits, g.group_size) for g in fmt.candidates("auto")] == [(4, 128), (4, 64), (4, 32), (8, 128)]
    for bad in ("5g64", "4g0", "four"):
        with pytest.raises(ConfigError, match="--candidates"):
            fmt.candidates(bad)


def test_linear_bytes_are_what_packing_stores():
    from gptq.core.grids import GridSpec
    from gptq.core.solver import round_to_nearest

    cfg = QuantConfig()
    fmt = GPTQ(cfg, "gptq")
    W = torch.randn(96, 320)
    for bits, group in ((2, 64), (3, 64), (3, 128), (4, 32), (8, -1)):
        grid = GridSpec("int", bits, group, True)
        packed = fmt.pack(round_to_nearest(W, cfg, grid), None)
        stored = sum(t.numel() * t.element_size() for t in packed.tensors("m").values())
        assert stored == fmt.linear_bytes(96, 320, grid), (bits, group)


# ---- end to end -----------------------------------------------------------------------------------


@pytest.fixture
def calib(tmp_path):
    p = tmp_path / "calib.txt"
    p.write_text(SAMPLE_TEXT)
    return p


def _run(model, calib, out, *flags):
    return quantize_main([str(model), "--dataset", str(calib), "--nsamples", "8", "--seqlen", "32", "--out", str(out),
                          "--quiet", "--candidates", "2g32,3g32,4g32,8g32", *flags])


def _linear_bytes(d):
    n = 0
    for f in d.glob("*.safetensors"):
        with safe_open(f, "pt") as h:
            for k in h.keys():
                if k.endswith((".qweight", ".qzeros", ".scales", ".g_idx")):
                    t = h.get_tensor(k)
                    n += t.numel() * t.element_size()
    return n


def _file_bytes(d):
    return sum(f.stat().st_size for f in d.glob("*.safetensors"))


def test_max_size_is_met_exactly_and_loads(tmp_path, tiny_model_dir, calib):
    from gptq.runtime.load import load

    model = tiny_model_dir("llama")
    budget = 170_000
    assert _run(model, calib, tmp_path / "o", "--max-size", str(budget)) == 0
    out = tmp_path / "o"
    rec = json.loads((out / "quantize_report.json").read_text())["mix"]
    size = _file_bytes(out)
    # the plan's accounting is the files' bytes, to the byte: linears, the rest, the headers
    assert _linear_bytes(out) == rec["linear_bytes"]
    assert size == rec["fixed_bytes"] + rec["linear_bytes"]
    assert size <= budget
    # nothing better was affordable: no unit's cheaper-error option fits in what is left
    left = budget - size
    for u in rec["units"]:
        for o in u["options"]:
            if o["error"] < u["error"]:
                assert o["bytes"] - u["bytes"] > left
    chosen = {n: u["choice"] for u in rec["units"] for n in u["linears"]}
    assert len(set(chosen.values())) > 1  # a real mix
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    m, _ = load(out, device="cpu", backend="torch", dtype="float32")
    for name, label in chosen.items():
        layer = m.get_submodule(name)
        assert f"{layer.bits}g{layer.group_size}" == label
        assert module_settings(qc, name) == (layer.bits, layer.group_size)
        # each candidate's own default symmetry (asymmetric below 4 bits), as the overrides say
        assert module_setting(qc, name)[2] is (layer.bits >= 4), name
    assert not marlin_setting(qc["bits"], qc["group_size"], qc["sym"])  # 2/3-bit layers: a non-Marlin base
    from gptq.inspect import describe
    mix = describe(out)["mix"]
    assert sum(mix.values()) == len(chosen)
    assert all(k.endswith(" asym") == (int(k.split("-")[0]) < 4) for k in mix), mix
    logits = m(torch.randint(0, 256, (1, 16))).logits
    assert torch.isfinite(logits).all()


def test_bits_per_weight_budget(tmp_path, tiny_model_dir, calib):
    model = tiny_model_dir("llama")
    assert _run(model, calib, tmp_path / "o", "--bits-per-weight", "3.6") == 0
    rec = json.loads((tmp_path / "o" / "quantize_report.json").read_text())["mix"]
    weights = 2 * (64 * 64 + 2 * 32 * 64 + 64 * 64 + 3 * 128 * 64)  # 2 layers: q, k and v (2 kv heads), o, mlp
    assert rec["linear_bytes"] == _linear_bytes(tmp_path / "o")
    assert 8 * rec["linear_bytes"] / weights <= 3.6
    assert 8 * rec["linear_bytes"] / weights > 3.3


@pytest.mark.parametrize("flags, msg", [
    (["--max-size", "1000"], "below the smallest file"),
    (["--max-size", "10GB"], "at or above what the largest candidate"),
    (["--bits-per-weight", "1.5"], "the feasible range is 3.007 to 9.194 bits per weight"),
    (["--bits-per-weight", "3", "--max-size", "1MB"], "give one budget"),
    (["--bits-per-weight", "3", "--format", "bnb-nf4"], "cannot store a different grid per linear"),
    (["--max-size", "lots"], "--max-size"),
    (["--bits-per-weight", "5.5", "--min-bits", "9"], "--min-bits 9: give a bit width from 0"),
    (["--bits-per-weight", "5.5", "--min-bits", "four"], "give auto or a bit width"),
    # a floor the budget cannot meet: the range named is the one above the floor
    (["--bits-per-weight", "5.5", "--min-bits", "8"], "the feasible range is 9.194 to 9.194 bits per weight; lower "
                                                      "--min-bits"),
    (["--bits-per-weight", "4.5", "--min-bits", "5", "--candidates", "3g32,4g32"], "--min-bits 5: no candidate of "
                                                                                  "3g32,4g32 with at least 5 bits"),
])
def test_bad_budgets_are_refused_before_any_work(tmp_path, tiny_model_dir, calib, capsys, flags, msg):
    model = tiny_model_dir("llama")
    with pytest.raises(SystemExit) as e:
        _run(model, calib, tmp_path / "o", *flags)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert msg in err, err
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob("o.partial*"))


def test_a_budget_above_a_uniform_width_stores_nothing_below_it(tmp_path, tiny_model_dir, calib, capsys):
    model = tiny_model_dir("llama")
    # --bits-per-weight 5.5 on these candidates (2g32 ... 8g32 at 3.0, 4.0, 5.0, 9.2 here): a uniform 4g32 file fits
    assert _run(model, calib, tmp_path / "o", "--bits-per-weight", "5.5") == 0
    err = capsys.readouterr().err
    assert "no linear below 4 bits" in err and "2g32, 3g32 will not be used" in err, err
    rec = json.loads((tmp_path / "o" / "quantize_report.json").read_text())["mix"]
    assert rec["min_bits"] == 4
    assert all(int(o["grid"].split("g")[0]) >= 4 for u in rec["units"] for o in u["options"])
    assert {u["choice"] for u in rec["units"]} == {"4g32", "8g32"}  # a mix, every unit at 4 bits or more
    # a floor given by hand: applied, with no note claiming a uniform file fits
    assert _run(model, calib, tmp_path / "g", "--bits-per-weight", "5.5", "--min-bits", "4") == 0
    assert "fits the budget" not in capsys.readouterr().err
    assert json.loads((tmp_path / "g" / "quantize_report.json").read_text())["mix"]["min_bits"] == 4
    # --min-bits 0: every candidate is measured and may be chosen
    assert _run(model, calib, tmp_path / "z", "--bits-per-weight", "5.5", "--min-bits", "0") == 0
    assert "will not be used" not in capsys.readouterr().err
    rec0 = json.loads((tmp_path / "z" / "quantize_report.json").read_text())["mix"]
    assert rec0["min_bits"] == 0
    assert {o["grid"] for o in rec0["units"][0]["options"]} == {"2g32", "3g32", "4g32", "8g32"}
    # the floor only removes options: each unit's kept estimates stand in the same ratios (the /block
    # estimate's per-unit scale comes from the coarsest candidate measured, so it differs)
    for u, u0 in zip(rec["units"], rec0["units"]):
        kept = {o["grid"]: o["error"] for o in u["options"]}
        before = {o["grid"]: o["error"] for o in u0["options"] if o["grid"] in kept}
        assert before.keys() == kept.keys()
        assert kept["8g32"] / kept["4g32"] == pytest.approx(before["8g32"] / before["4g32"], rel=1e-6)


def test_a_max_size_floor_keeps_room_for_the_headers(tiny_model_dir):
    """--max-size: a uniform width counts as fitting only with 0.1 % to spare, since the headers are
    counted exactly only once the grids are chosen."""
    from gptq.formats.registry import get
    from gptq.pipeline import mix
    from gptq.pipeline.streaming import skeleton

    d = tiny_model_dir("llama")
    skel = skeleton(d, torch.float32)

    def setup(size, floor=None):
        q = QuantConfig(bits=4, group_size=32, candidates="2g32,3g32,4g32,8g32", max_size=size, min_bits=floor)
        return mix.setup(skel, get(q).bind(skel, d), q, d, None)

    probe = setup(200_000, 0)  # no floor: every unit's bytes on every candidate, and the fixed bytes
    four = probe.fixed + sum(b[o.index(2)] for o, b in zip(probe.options, probe.bytes))  # uniform 4g32
    assert setup(four).min_bits == 3
    assert setup(four + four // 500).min_bits == 4
    assert setup(four + four // 500).dropped == ("2g32", "3g32")


def test_moe_budget_is_refused_where_the_format_cannot_mix_expert_layers(tmp_path, tiny_model_dir, calib, capsys):
    model = tiny_model_dir("mixtral")
    with pytest.raises(SystemExit) as e:
        _run(model, calib, tmp_path / "o", "--bits-per-weight", "3.5", "--format", "compressed-tensors")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "mixture-of-experts" in err and "--format gptq" in err, err
    assert not (tmp_path / "o").exists()


# ---- mixture-of-experts: one choice per block's experts ------------------------------------------


def _experts_layer(arch, i: int) -> str:
    """The name a block's experts layer has in the checkpoint (vLLM's fused MoE layer's prefix)."""
    return arch.checkpoint_name(f"{arch.blocks}.{i}.{arch.experts.path}.0.gate_proj").rsplit(".", 2)[0]


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_moe_budget_mixes_whole_expert_layers_and_loads(tmp_path, family):
    """A block's routed experts are one unit (every expert's gate, up and down on one grid, as vLLM's
    fused MoE layer and GGUF's expert tensors need); the mix is real, the bytes are the plan's, the
    overrides give every stored expert linear and the experts layer itself its grid, and the loaded
    checkpoint computes what the solved model in memory does."""
    from test_moe import moe_model, windows

    from gptq import quantize_model, save_checkpoint
    from gptq.formats.registry import get
    from gptq.models.architectures import for_config
    from gptq.models.moe import unfuse
    from gptq.runtime.load import load

    model = moe_model(family)
    arch = for_config(model.config)
    unfuse(model, arch)
    qc = QuantConfig(bits_per_weight=4.5, candidates="2g32,4g32,8g32")
    fmt = get(qc).bind(model)
    packed, _ = quantize_model(model, windows(), qc, device="cpu", progress=False, fmt=fmt)
    rec = fmt.mix
    experts = [u for u in rec["units"] if ".experts." in u["linears"][0]]
    assert len(experts) == 2 and all(len(u["linears"]) == 8 * 3 for u in experts)
    assert all(".experts." not in n for u in rec["units"] if u not in experts for n in u["linears"])
    assert len({u["choice"] for u in rec["units"]}) > 1  # a real mix
    for u in rec["units"]:  # every linear of a unit (every expert of a block) on the unit's grid
        assert {f"{packed[n].grid.bits}g{packed[n].grid.group_size}" for n in u["linears"]} == {u["choice"]}
    weights = sum(math.prod(p.scales.shape[1:]) * p.g_idx.numel() for p in packed.values())
    assert rec["linear_bytes"] <= rec["budget_bytes"] == int(4.5 * weights // 8)
    with torch.no_grad():
        logits = model(windows(seed=2)).logits
    out = save_checkpoint(tmp_path / "q", model, packed, qc)
    assert _linear_bytes(out) == rec["linear_bytes"]
    qc_json = json.loads((out / "config.json").read_text())["quantization_config"]
    for i, u in enumerate(experts):  # vLLM looks a fused MoE layer up by its own name: one setting
        assert "{}g{}".format(*module_settings(qc_json, _experts_layer(arch, i))) == u["choice"]
    loaded, _ = load(out, device="cpu", backend="torch", dtype="float32")
    for u in rec["units"]:
        for n in u["linears"]:
            layer = loaded.get_submodule(n)
            assert f"{layer.bits}g{layer.group_size}" == u["choice"], n
            assert module_settings(qc_json, arch.checkpoint_name(n)) == (layer.bits, layer.group_size)
    with torch.no_grad():
        got = loaded(windows(seed=2)).logits
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, logits, rtol=0, atol=1e-4)


def test_moe_max_size_is_met_exactly_streaming_and_in_memory(tmp_path, tiny_model_dir, calib):
    """--max-size on a Mixtral: the files are the plan's bytes to the byte, under the budget, and the
    streaming and in-memory runs write the same tensors and overrides."""
    model = tiny_model_dir("mixtral")
    budget = 330_000  # candidates span 247,952 to 419,024 bytes for this model
    assert _run(model, calib, tmp_path / "s", "--max-size", str(budget)) == 0
    assert _run(model, calib, tmp_path / "m", "--max-size", str(budget), "--no-stream") == 0
    for d in ("s", "m"):
        rec = json.loads((tmp_path / d / "quantize_report.json").read_text())["mix"]
        assert _linear_bytes(tmp_path / d) == rec["linear_bytes"]
        assert _file_bytes(tmp_path / d) == rec["fixed_bytes"] + rec["linear_bytes"] <= budget
        assert len({u["choice"] for u in rec["units"]}) > 1
    a, b = _tensors(tmp_path / "s"), _tensors(tmp_path / "m")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert "model.layers.1.block_sparse_moe.experts.7.w2.qweight" in a
    qs = [json.loads((tmp_path / d / "config.json").read_text())["quantization_config"] for d in ("s", "m")]
    assert qs[0] == qs[1] and qs[0]["dynamic"]


def _tensors(d):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_resume_and_no_stream_give_the_same_bytes(tmp_path, tiny_model_dir, calib, monkeypatch):
    from gptq.pipeline import streaming

    model = tiny_model_dir("llama")
    flags = ("--max-size", "170000")
    assert _run(model, calib, tmp_path / "full", *flags) == 0
    assert _run(model, calib, tmp_path / "mem", *flags, "--no-stream") == 0
    real = streaming.quantize_streaming

    def interrupted(*a, **k):
        def stop(event, rank):
            if event == "saved:0":
                raise KeyboardInterrupt
        return real(*a, **k, on_event=stop)

    monkeypatch.setattr("gptq.quantize.quantize_streaming", interrupted)
    assert _run(model, calib, tmp_path / "res", *flags) == 130
    assert (tmp_path / "res.partial" / streaming.MIX).is_file()
    monkeypatch.setattr("gptq.quantize.quantize_streaming", real)
    # the resumed run reads the saved plan: measuring again is not needed (and would fail here)
    monkeypatch.setattr("gptq.pipeline.mix.measure", lambda *a, **k: pytest.fail("measured again on --resume"))
    assert _run(model, calib, tmp_path / "res", *flags, "--resume") == 0
    full = _tensors(tmp_path / "full")
    for other in ("mem", "res"):
        t = _tensors(tmp_path / other)
        assert sorted(t) == sorted(full)
        for k in full:
            assert torch.equal(full[k], t[k]), (other, k)
    configs = [json.loads((tmp_path / d / "config.json").read_text())["quantization_config"]
               for d in ("full", "mem", "res")]
    assert configs[0] == configs[1] == configs[2] and configs[0]["dynamic"]
    assert re.match(r"\+:\^model", next(iter(configs[0]["dynamic"])))


def gguf_budget_run(cfg, model, bpe_dir, calib, monkeypatch, capsys):
    """A random model of ``cfg`` saved at ``model`` with conftest's BPE, quantized to ``tmp/o`` (beside
    ``model``) as GGUF over q4_0/q5_0/q8_0 at the middle of the feasible range that a refused
    budget names; returns (model, budget)."""
    import shutil

    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("GPTQ_GGUF_PRE", "default")  # the tiny test tokenizer is none llama.cpp knows
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(model)
    for f in bpe_dir.iterdir():
        shutil.copy(f, model / f.name)
    out = model.parent / "o"
    flags = ("--format", "gguf", "--candidates", "q4_0,q5_0,q8_0")
    with pytest.raises(SystemExit):
        _run(model, calib, out, *flags, "--max-size", "1")
    lo, hi = map(int, re.search(r"\((\d+) to (\d+) bytes\)", capsys.readouterr().err).groups())
    budget = (lo + hi) // 2
    assert _run(model, calib, out, *flags, "--max-size", str(budget)) == 0
    return model, budget


def test_gguf_budget_file_is_the_planned_size_with_the_planned_types(tmp_path, bpe_dir, calib, monkeypatch, capsys):
    """--format gguf with --max-size: the .gguf's bytes are the plan's (header, metadata, tokenizer and
    the edges from a dry run of the writer, the linears' blocks), each linear of the type chosen; the file
    loads. The tiny model is rotated (--rotate auto), so the rotation record is in the metadata too."""
    from gguf import GGUFReader

    from gptq.formats.gguf.names import BLOCK_NAMES
    from gptq.runtime.load import load_any

    cfg = tiny_config("llama")
    cfg.vocab_size = BPE_VOCAB  # a byte-level BPE with merges, as GGUF needs to be read back
    model, budget = gguf_budget_run(cfg, tmp_path / "tiny-llama", bpe_dir, calib, monkeypatch, capsys)
    files = list((tmp_path / "o").glob("*.gguf"))
    assert [f.name for f in files] == [f"{model.name}-mixed-{budget}B.gguf"]
    rec = json.loads((tmp_path / "o" / "quantize_report.json").read_text())["mix"]
    size = files[0].stat().st_size
    assert size == rec["fixed_bytes"] + rec["linear_bytes"] <= budget
    types = {t.name: t.tensor_type.name.lower() for t in GGUFReader(files[0]).tensors}
    chosen = {n: u["choice"] for u in rec["units"] for n in u["linears"]}
    assert len(set(chosen.values())) > 1
    for name, t in chosen.items():
        i, rest = name.removeprefix("model.layers.").split(".", 1)
        assert types[f"blk.{i}.{BLOCK_NAMES[rest]}.weight"] == t, name
    m, _ = load_any(files[0], device="cpu")
    assert torch.isfinite(m(torch.randint(0, BPE_VOCAB, (1, 8))).logits).all()


def test_compressed_tensors_budget_writes_one_config_group_per_setting(tmp_path, tiny_model_dir, calib):
    """compressed-tensors stores a mix as config groups whose ``re:`` targets name the linears; the bytes
    are the plan's, and our loader reads each linear with its group's scheme."""
    from gptq.formats.compressed_tensors import scheme_of
    from gptq.runtime.load import load_any

    model = tiny_model_dir("llama")
    assert quantize_main([str(model), "--dataset", str(calib), "--nsamples", "8", "--seqlen", "32", "--quiet",
                          "--out", str(tmp_path / "o"), "--format", "compressed-tensors", "--bits-per-weight", "6",
                          "--candidates", "4g32,8g32"]) == 0
    out = tmp_path / "o"
    rec = json.loads((out / "quantize_report.json").read_text())["mix"]
    stored = 0
    with safe_open(out / "model.safetensors", "pt") as h:
        for k in h.keys():
            if k.rsplit(".", 1)[1] in ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point"):
                t = h.get_tensor(k)
                stored += t.numel() * t.element_size()
    assert stored == rec["linear_bytes"]
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert len(qc["config_groups"]) == 2
    assert all(t.startswith("re:^") for g in qc["config_groups"].values() for t in g["targets"])
    m, _ = load_any(out, device="cpu", backend="torch", dtype="float32")
    for u in rec["units"]:
        for name in u["linears"]:
            s = scheme_of(qc, name)
            assert f"{s['bits']}g{s['group_size']}" == u["choice"]
            layer = m.get_submodule(name)
            assert (layer.bits, layer.group_size) == (s["bits"], s["group_size"])
    assert torch.isfinite(m(torch.randint(0, 256, (1, 8))).logits).all()


def test_sensitivities_scale_the_same_per_unit_errors():
    """/residual and /block rescale each unit's round-to-nearest errors by one factor per unit (the
    residual energy; what the coarsest option does to the block's output over its error), so the order
    of a unit's options never changes; the block factor of a writer (o_proj, down_proj) is its own error
    reaching the block's output, so it is positive and finite."""
    from conftest import tiny_model

    from gptq.formats.registry import get
    from gptq.pipeline import mix
    from gptq.pipeline.loop import capture_block_inputs

    model = tiny_model("llama").float()
    cfg = QuantConfig(bits_per_weight=4)
    fmt = get(cfg).bind(model)
    grids = fmt.candidates("2g32,4g32,8g32")
    shapes = mix.unit_shapes(model)
    opts = [mix.options(fmt, s, grids, False)[0] for s in shapes]
    inputs = capture_block_inputs(model, torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0)), 2)
    errs = {s: mix.measure(model, inputs, QuantConfig(sensitivity=s), shapes, opts, grids, "cpu", progress=False)
            for s in ("hessian", "hessian/residual", "hessian/block")}
    for k in range(len(shapes)):
        base = errs["hessian"][k]
        assert base[0] > base[1] > base[2] > 0  # more bits, less error
        for s in ("hessian/residual", "hessian/block"):
            ratios = [e / b for e, b in zip(errs[s][k], base)]
            assert max(ratios) == pytest.approx(min(ratios), rel=1e-9) and ratios[0] > 0 and math.isfinite(ratios[0])
    # the model is unchanged by the measurement (weights restored after each block pass)
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, tiny_model("llama").float().model.layers[0].mlp.down_proj.weight)


def test_moe_expert_unit_estimates_weigh_experts_by_their_routed_rows():
    """The experts' unit under each estimate: more bits, less error; an expert the router never
    picks adds nothing (its weights scaled up change no error), and with --sensitivity gptq it is
    solved on the identity like the main pass's starved experts."""
    from test_moe import moe_model, starve, windows

    from gptq.formats.registry import get
    from gptq.models.architectures import for_config
    from gptq.models.moe import unfuse
    from gptq.pipeline import mix
    from gptq.pipeline.loop import capture_block_inputs

    model = moe_model("mixtral", layers=1)
    unfuse(model, for_config(model.config))
    starve(model, 3)
    grids = get(QuantConfig(bits_per_weight=4)).bind(model).candidates("2g32,4g32,8g32")
    shapes = mix.unit_shapes(model)
    opts = [tuple(range(3)) for _ in shapes]
    k = next(j for j, s in enumerate(shapes) if ".experts." in s.names[0])
    assert shapes[k].names[:3] == tuple(f"model.layers.0.mlp.experts.0.{n}" for n in ("gate_proj", "up_proj",
                                                                                        "down_proj"))
    inputs = capture_block_inputs(model, windows(), 2)
    cfgs = {s: QuantConfig(sensitivity=s, expert_tokens="routed", expert_min_tokens=8)
            for s in ("hessian", "gptq", "hessian/block")}
    errs = {s: mix.measure(model, inputs, c, shapes, opts, grids, "cpu", progress=False) for s, c in cfgs.items()}
    for s, e in errs.items():
        assert e[k][0] > e[k][1] > e[k][2] > 0, s
    with torch.no_grad():
        model.model.layers[0].mlp.experts[3].down_proj.weight.mul_(100)
    again = mix.measure(model, inputs, cfgs["hessian"], shapes, opts, grids, "cpu", progress=False)
    assert again == errs["hessian"]


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_moe_gguf_budget_is_the_planned_size_with_one_type_per_expert_tensor(tmp_path, bpe_dir, calib, monkeypatch,
                                                                            capsys, family):
    """--format gguf with --max-size on a mixture-of-experts model: a block's experts take one type, so
    each merged [n_expert, rows, cols] tensor (ffn_gate_exps, ffn_up_exps, ffn_down_exps) is of the
    unit's choice, and the file's bytes are the plan's (each merged tensor padded once)."""
    from conftest import moe_config
    from gguf import GGUFReader

    from gptq.formats.gguf.names import BLOCK_NAMES

    cfg = moe_config(family, experts=4)
    cfg.vocab_size, cfg.norm_topk_prob = BPE_VOCAB, True
    model, budget = gguf_budget_run(cfg, tmp_path / family, bpe_dir, calib, monkeypatch, capsys)
    (file,) = (tmp_path / "o").glob("*.gguf")
    rec = json.loads((tmp_path / "o" / "quantize_report.json").read_text())["mix"]
    assert file.stat().st_size == rec["fixed_bytes"] + rec["linear_bytes"] <= budget
    types = {t.name: t.tensor_type.name.lower() for t in GGUFReader(file).tensors}
    assert len({u["choice"] for u in rec["units"]}) > 1
    roles = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps"}
    for u in rec["units"]:
        for name in u["linears"]:
            i, rest = name.removeprefix("model.layers.").split(".", 1)
            tensor = f"blk.{i}.{roles[rest.rsplit('.', 1)[1]]}" if ".experts." in rest else f"blk.{i}.{BLOCK_NAMES[rest]}"
            assert types[f"{tensor}.weight"] == u["choice"], name

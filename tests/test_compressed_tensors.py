"""compressed-tensors (pack-quantized) checkpoints: layout, round trip through our loader, refusals.

vLLM's CPU build and transformers + compressed-tensors loading them are checked in tests/interop
(make interop)."""

import json
import sys

import pytest
import torch
from safetensors.torch import load_file
from test_pipeline import tiny_model, windows
from test_stream import calib_text, quantize_cmd, run

from gptq import QuantConfig, quantize_model, save_checkpoint
from gptq.core.config import ConfigError
from gptq.core.pack import dequantize_packed
from gptq.core.solver import solve
from gptq.formats.compat import verdicts_ct
from gptq.formats.compressed_tensors import CompressedTensors, as_gptq, read_scheme
from gptq.formats.registry import get
from gptq.io.safetensors_io import CheckpointError
from gptq.runtime.load import load_any


def test_codes_pack_as_compressed_tensors_documents():
    """int4 [1..7, -8] (signed) is stored as u = q + 8 = [9..15, 0], element 0 in the low bits:
    0x0FEDCBA9 (compressed-tensors' pack_to_int32); int8 [-128, -1, 0, 127] → 0xFF807F00."""
    fmt = CompressedTensors(QuantConfig(bits=4, group_size=-1))
    r = solve(torch.zeros(1, 8), torch.eye(8), QuantConfig(bits=4, group_size=-1), grid=fmt.grid("m"))
    codes = torch.tensor([[9, 10, 11, 12, 13, 14, 15, 0]], dtype=torch.uint8)
    packed = fmt.pack(type(r)(None, codes, r.scales, r.zeros, r.g_idx, r.row_loss, None, r.grid), None)
    assert packed.weight_packed.tolist() == [[0x0FEDCBA9]]
    fmt8 = CompressedTensors(QuantConfig(bits=8, group_size=-1))
    r8 = solve(torch.zeros(1, 4), torch.eye(4), QuantConfig(bits=8, group_size=-1), grid=fmt8.grid("m"))
    codes8 = torch.tensor([[0, 127, 128, 255]], dtype=torch.uint8)
    packed8 = fmt8.pack(type(r8)(None, codes8, r8.scales, r8.zeros, r8.g_idx, r8.row_loss, None, r8.grid), None)
    assert packed8.weight_packed.view(torch.uint32).tolist() == [[0xFF807F00]]


@pytest.mark.parametrize("bits,group,sym", [(4, 32, True), (4, -1, True), (4, 32, False), (8, 64, True),
                                            (8, 64, False)])
def test_layout_round_trips_to_the_solved_weight(bits, group, sym):
    """Stored tensors → our GPTQ view → dequantized: exactly the solver's Ŵ, with scales in the model's
    dtype (bf16 here) rounded during the solve."""
    g = torch.Generator().manual_seed(0)
    W, X = torch.randn(64, 128, generator=g), torch.randn(128, 512, generator=g)
    cfg = QuantConfig(bits=bits, group_size=group, sym=sym, format="compressed-tensors")
    fmt = get(cfg)
    fmt.dtype = torch.bfloat16
    r = solve(W, X @ X.T / 512, cfg, grid=fmt.grid("m"))
    stored = fmt.pack(r, None).tensors("m")
    assert stored["m.weight_packed"].shape == (64, 128 * bits // 32)
    assert stored["m.weight_scale"].dtype == torch.bfloat16
    assert stored["m.weight_scale"].shape == (64, 1 if group == -1 else 128 // group)
    assert stored["m.weight_shape"].tolist() == [64, 128]
    assert ("m.weight_zero_point" in stored) is (not sym)
    if not sym:
        assert stored["m.weight_zero_point"].shape == (64 * bits // 32, stored["m.weight_scale"].shape[1])
    t = as_gptq(stored, fmt.quantization_config())
    W_hat = dequantize_packed(t["m.qweight"], t["m.qzeros"], t["m.scales"].float(), t["m.g_idx"], bits, "gptq_v2")
    assert torch.equal(W_hat, r.weight.float())


def test_checkpoint_loads_back_with_the_same_logits(tmp_path):
    model = tiny_model("llama")
    cfg = QuantConfig(bits=4, group_size=32, format="compressed-tensors")
    packed, _ = quantize_model(model, windows(), cfg, device="cpu", progress=False)
    out = save_checkpoint(tmp_path / "ct", model, packed, cfg)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["quantization_status"] == "compressed" and qc["ignore"] == ["lm_head"]
    w = qc["config_groups"]["group_0"]["weights"]
    assert (w["num_bits"], w["group_size"], w["strategy"], w["symmetric"], w["actorder"]) == (4, 32, "group", True,
                                                                                             "weight")
    assert read_scheme(qc) == {"bits": 4, "group_size": 32, "sym": True}
    tensors = load_file(out / "model.safetensors")
    assert not any(k.endswith((".qweight", ".g_idx", ".weight_g_idx")) for k in tensors)
    assert "model.layers.0.mlp.down_proj.weight_packed" in tensors
    loaded, _ = load_any(out, device="cpu", backend="torch", dtype="float32")
    ids = windows(2, 16, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=1e-5)


def test_refusals_name_the_setting():
    with pytest.raises(ConfigError, match="--bits 3"):
        get(QuantConfig(bits=3, format="compressed-tensors"))
    with pytest.raises(ConfigError, match="dynamic"):
        get(QuantConfig(act_order="dynamic", format="compressed-tensors"))
    with pytest.raises(ConfigError, match="does not divide"):
        get(QuantConfig(group_size=48, format="compressed-tensors")).bind(tiny_model("llama"))
    with pytest.raises(CheckpointError, match="actorder 'group'"):
        read_scheme({"config_groups": {"g": {"format": "pack-quantized", "targets": ["Linear"],
                                             "weights": {"num_bits": 4, "strategy": "group", "group_size": 128,
                                                         "actorder": "group"}}}})


def test_engine_verdicts():
    v = {x.engine: x.status for x in verdicts_ct({"bits": 4, "group_size": 128, "sym": True}, [(4096, 4096)])}
    assert v["vLLM (GPU)"] == "serves" and v["vLLM (CPU)"] == "serves"
    v = {x.engine: x.status for x in verdicts_ct({"bits": 8, "group_size": 128, "sym": True}, [(4096, 4096)])}
    assert v["vLLM (CPU)"] == "refuses"
    v = {x.engine: x.status for x in verdicts_ct({"bits": 4, "group_size": 128, "sym": True}, [(576, 1536)], moe=True)}
    assert v["vLLM (CPU)"] == "refuses"


def test_cli_streaming_and_inspect(tmp_path, tiny_model_dir):
    d = tiny_model_dir("llama")
    text = calib_text(tmp_path)
    out = tmp_path / "ct"
    r = run(quantize_cmd(d, out, "--format", "compressed-tensors"), text)
    assert r.returncode == 0, r.stderr
    assert "vLLM (CPU)" in r.stdout
    r = run([sys.executable, "-m", "gptq.inspect", str(out)], text)
    assert r.returncode == 0, r.stderr
    assert "compressed-tensors" in r.stdout and "vLLM (CPU)" in r.stdout
    r = run(quantize_cmd(d, tmp_path / "bad", "--format", "compressed-tensors", "--bits", "3"), text)
    assert r.returncode != 0 and "--bits 3" in r.stderr and not (tmp_path / "bad").exists()


def test_scales_take_the_source_dtype(tmp_path):
    """A skeleton is built in float32: the stored scales' dtype comes from the source's config.json."""
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16"}))
    fmt = get(QuantConfig(format="compressed-tensors", group_size=32)).bind(tiny_model("llama"), tmp_path)
    assert fmt.dtype == torch.bfloat16 and fmt.grid("x").scale_dtype == torch.bfloat16
    fmt = get(QuantConfig(format="compressed-tensors", group_size=32)).bind(tiny_model("llama"))
    assert fmt.dtype == torch.float32 and fmt.grid("x").scale_dtype == torch.float16

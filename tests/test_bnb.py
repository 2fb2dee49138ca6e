"""bitsandbytes 4-bit checkpoints of GPTQ-solved NF4/FP4 weights: layout, round trip, our loader.

The check with transformers + bitsandbytes themselves is in tests/interop (make interop)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import SAMPLE_TEXT
from gptq import QuantConfig, quantize_model, save_checkpoint
from gptq.bnb import Bnb4bitLinear, dequantize
from gptq.codebook import TABLES
from test_pipeline import tiny_model, windows
from test_stream import quantize_cmd, run


def test_layout_round_trips_codes_and_absmax_exactly():
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (6, 128), generator=g, dtype=torch.uint8)
    absmax = torch.rand(6, 2, generator=g) + 0.1
    t = Bnb4bitLinear(codes, absmax, "nf4", None).tensors("m")
    assert t["m.weight"].dtype == torch.uint8 and t["m.weight"].shape == (6 * 128 // 2, 1)
    assert int(t["m.weight"][0, 0]) == (int(codes[0, 0]) << 4) | int(codes[0, 1])  # element 0 high nibble
    state = json.loads(bytes(t["m.weight.quant_state.bitsandbytes__nf4"].tolist()).decode())
    assert state == {"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [6, 128]}
    table = torch.tensor(TABLES["nf4"])
    expected = (table[codes.long()].view(6, 2, 64) * absmax[:, :, None]).view(6, 128)
    assert torch.equal(dequantize(t, "m"), expected)


@pytest.mark.parametrize("grid", ["nf4", "fp4"])
def test_saved_checkpoint_dequantizes_to_the_solved_weights(tmp_path, grid):
    """The stored layer is exactly the weight the solver reports (left in the in-memory model)."""
    from gptq.load import load_any

    model = tiny_model("llama")
    cfg = QuantConfig(bits=4, group_size=64, grid=grid)
    packed, _ = quantize_model(model, windows(), cfg, device="cpu", progress=False)
    out = save_checkpoint(tmp_path / "ck", model, packed, cfg)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc["load_in_4bit"] and qc["bnb_4bit_quant_type"] == grid
    assert not (out / "quantize_config.json").exists()
    tensors = load_file(out / "model.safetensors")
    for name in packed:
        assert torch.equal(dequantize(tensors, name), model.get_submodule(name).weight.float())
    loaded, _ = load_any(out, device="cpu", dtype="float32")
    ids = windows(2, 16, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_cli_writes_bnb_format_streaming(tmp_path, tiny_model_dir):
    d = tiny_model_dir("llama")
    text = tmp_path / "calib.txt"
    text.write_text(SAMPLE_TEXT)
    out = tmp_path / "nf4"
    cmd = quantize_cmd(d, out, "--format", "bnb-nf4")
    i = cmd.index("--group-size")
    del cmd[i:i + 2]  # the bnb default, 64
    r = run(cmd, text)
    assert r.returncode == 0, r.stderr
    tensors = load_file(out / "model.safetensors")
    assert tensors["model.layers.0.mlp.down_proj.weight.absmax"].numel() == 64 * 128 // 64  # group 64 by default
    assert "bitsandbytes 4-bit" in r.stdout
    from gptq.eval import main as eval_main

    assert eval_main([str(out), "--dataset", str(text), "--seqlen", "32", "--max-windows", "2", "--json"]) == 0


def test_bnb_group_that_does_not_divide_the_inputs_is_refused_before_any_work(tmp_path, tiny_model_dir):
    d = tiny_model_dir("llama")  # inputs 64 and 128
    text = tmp_path / "calib.txt"
    text.write_text(SAMPLE_TEXT)
    out = tmp_path / "nf4"
    cmd = quantize_cmd(d, out, "--format", "bnb-nf4")
    cmd[cmd.index("--group-size") + 1] = "128"
    r = run(cmd, text)
    assert r.returncode == 2 and "does not divide the input size(s) [64]" in r.stderr
    assert not out.exists() and not (tmp_path / "nf4.partial").exists()

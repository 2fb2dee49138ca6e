"""bitsandbytes 4-bit checkpoints of GPTQ-solved NF4/FP4 weights: layout, round trip, our loader.

The check with transformers + bitsandbytes themselves is in tests/interop (make interop)."""

import json

import pytest
import torch
from safetensors.torch import load_file
from test_pipeline import tiny_model, windows
from test_stream import calib_text, quantize_cmd, run

from gptq import QuantConfig, quantize_model, save_checkpoint
from gptq.core.grids import GridSpec
from gptq.core.grids.codebook import TABLES
from gptq.formats.bnb import Bnb4bitLinear, dequantize
from gptq.formats.registry import get


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


@pytest.mark.parametrize("grid,double_quant", [("nf4", False), ("fp4", False), ("nf4", True)])
def test_saved_checkpoint_dequantizes_to_the_solved_weights(tmp_path, grid, double_quant):
    """The stored layer is exactly the weight the solver reports (left in the in-memory model)."""
    from gptq.runtime.load import load_any

    model = tiny_model("llama")
    cfg = QuantConfig(bits=4, group_size=64, format=f"bnb-{grid}" + ("+dq" if double_quant else ""))
    packed, _ = quantize_model(model, windows(), cfg, device="cpu", progress=False)
    out = save_checkpoint(tmp_path / "ck", model, packed, cfg)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc["load_in_4bit"] and qc["bnb_4bit_quant_type"] == grid
    assert qc["bnb_4bit_use_double_quant"] is double_quant
    assert not (out / "quantize_config.json").exists()
    tensors = load_file(out / "model.safetensors")
    absmax = tensors["model.layers.0.self_attn.q_proj.weight.absmax"]
    assert absmax.dtype == (torch.uint8 if double_quant else torch.float32)
    for name in packed:
        assert torch.equal(dequantize(tensors, name), model.get_submodule(name).weight.float())
    loaded, _ = load_any(out, device="cpu", dtype="float32")
    ids = windows(2, 16, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_cli_writes_bnb_format_streaming(tmp_path, tiny_model_dir):
    d = tiny_model_dir("llama")
    text = calib_text(tmp_path)
    out = tmp_path / "nf4"
    r = run(quantize_cmd(d, out, "--format", "bnb-nf4", group_size=None), text)  # the bnb default, 64
    assert r.returncode == 0, r.stderr
    tensors = load_file(out / "model.safetensors")
    assert tensors["model.layers.0.mlp.down_proj.weight.absmax"].numel() == 64 * 128 // 64  # group 64 by default
    assert "bitsandbytes 4-bit" in r.stdout
    from gptq.eval import main as eval_main

    assert eval_main([str(out), "--dataset", str(text), "--seqlen", "32", "--max-windows", "2", "--json"]) == 0


def test_bnb_group_that_does_not_divide_the_inputs_is_refused_before_any_work(tmp_path, tiny_model_dir):
    d = tiny_model_dir("llama")  # inputs 64 and 128
    text = calib_text(tmp_path)
    out = tmp_path / "nf4"
    r = run(quantize_cmd(d, out, "--format", "bnb-nf4", group_size=128), text)
    assert r.returncode == 2 and "does not divide the input size(s) [64]" in r.stderr
    assert not out.exists() and not (tmp_path / "nf4.partial").exists()


def test_dynamic_map_is_bitsandbytes_signed_8bit_map():
    """Values checked against bitsandbytes 0.50 create_dynamic_map() in make interop; here its shape:
    sorted, 0 and ±1-ish ends, 2**e values per decade e and sign."""
    from gptq.core.grids.codebook import dynamic_map

    m = dynamic_map()
    assert m.shape == (256,) and torch.equal(m, m.sort().values)
    assert float(m[-1]) == 1.0 and (m == 0).sum() == 1 and float(m[0]) == pytest.approx(-0.99297, abs=1e-5)
    assert ((m > 0.1) & (m < 1)).sum() == 64 and ((m > 1e-6) & (m < 1e-5)).sum() == 2
    assert ((m > 0) & (m < 1e-6)).sum() == 1


def test_nested_absmax_codes_store_snapped_values_exactly():
    from gptq.core.grids.codebook import CodebookFamily, NestedAbsmax, dynamic_map

    g = torch.Generator().manual_seed(1)
    absmax = torch.rand(40, 9, generator=g) * 0.2 + 0.01  # [out, groups]: 360 values, two 256-blocks
    nested = NestedAbsmax.from_absmax(absmax)
    assert nested.blocks().shape == (2,) and float(nested.offset) == pytest.approx(float(absmax.mean()), rel=1e-6)
    fam = CodebookFamily("nf4", mse=False, double_quant=True)
    fam.nested = nested
    snapped = torch.stack([fam._snap(absmax[:, k], k) for k in range(9)])  # [groups, out]
    assert (snapped > 0).all()
    # every snapped value is the nearest representable one, and within the block's step of the input
    assert (snapped - absmax.T).abs().max() < 0.01 * float(nested.blocks().max())
    codes = nested.codes(snapped)
    flat_blocks = nested.blocks()[torch.arange(360) // 256].view(40, 9).T
    assert torch.equal(dynamic_map()[codes.long()] * flat_blocks + nested.offset, snapped)
    with pytest.raises(ValueError, match="scales can store"):
        nested.codes(snapped + 1e-4)


@pytest.mark.parametrize("mse", [False, True])
def test_double_quant_solve_rounds_against_the_stored_absmax(mse):
    """The weight the solver reports is exactly what the double-quantized checkpoint dequantizes to,
    and GPTQ still beats plain rounding on the same (double-quantized) grid."""
    from gptq import solve
    from gptq.core.solver import round_to_nearest

    g = torch.Generator().manual_seed(2)
    X = torch.randn(512, 128, generator=g) @ torch.randn(128, 128, generator=g)
    H = 2 * X.T @ X / 512
    W = torch.randn(96, 128, generator=g) * 0.05
    cfg = QuantConfig(bits=4, group_size=64, mse=mse)
    grid = GridSpec("nf4", 4, 64, double_quant=True, scale_dtype=torch.float32)
    r = solve(W, H, cfg, grid=grid)
    assert r.scale_state is not None
    lin = Bnb4bitLinear(r.codes, r.scales.T.float().contiguous(), "nf4", None, nested=r.scale_state)
    t = lin.tensors("m")
    assert t["m.weight.absmax"].dtype == torch.uint8 and t["m.weight.nested_absmax"].shape == (1,)
    state = json.loads(bytes(t["m.weight.quant_state.bitsandbytes__nf4"].tolist()).decode())
    assert state["nested_blocksize"] == 256 and state["nested_dtype"] == "float32"
    assert torch.equal(dequantize(t, "m"), r.weight)
    rtn = round_to_nearest(W, cfg, grid)
    plain = solve(W, H, QuantConfig(bits=4, group_size=64, mse=mse),
                  grid=GridSpec("nf4", 4, 64, scale_dtype=torch.float32))

    def err(Q):
        D = W - Q
        return float(torch.einsum("ij,jk,ik->", D, H, D))

    assert err(r.weight) < 0.8 * err(rtn.weight)
    assert err(r.weight) < 1.1 * err(plain.weight)  # 8-bit absmax costs little


def test_double_quant_needs_a_codebook_grid():
    """Double quantization is part of the format name now ("bnb-nf4+dq"): --double-quant is checked
    where the CLI builds the config, and a "+dq" on another format is an unknown format."""
    from gptq.core.config import ConfigError
    from gptq.quantize import build_parser, quant_config

    with pytest.raises(ConfigError, match="bnb-nf4"):
        quant_config(build_parser().parse_args(["model", "--double-quant"]))
    with pytest.raises(ConfigError, match="bnb-nf4"):
        get(QuantConfig(format="gptq+dq"))


def test_cli_double_quant_streaming_and_refused_without_bnb(tmp_path, tiny_model_dir):
    d = tiny_model_dir("llama")
    text = calib_text(tmp_path)
    out = tmp_path / "nf4dq"
    r = run(quantize_cmd(d, out, "--format", "bnb-nf4", "--double-quant", group_size=64), text)
    assert r.returncode == 0, r.stderr
    tensors = load_file(out / "model.safetensors")
    assert tensors["model.layers.1.mlp.down_proj.weight.absmax"].dtype == torch.uint8
    assert tensors["model.layers.1.mlp.down_proj.weight.nested_absmax"].dtype == torch.float32
    r = run(quantize_cmd(d, tmp_path / "int", "--double-quant"), text)
    assert r.returncode == 2 and "bnb-nf4" in r.stderr and not (tmp_path / "int").exists()

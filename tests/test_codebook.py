"""Codebook grids (bitsandbytes NF4/FP4) in the solver: exact tables, nearest codes, GPTQ's gain."""

import pytest
import torch
from test_solver import correlated, output_error

from gptq.core.config import ConfigError, QuantConfig
from gptq.core.grids import GridSpec
from gptq.core.grids.codebook import TABLES, CodebookFamily
from gptq.core.solver import round_to_nearest, solve
from gptq.formats.registry import get


def codebook(name, group_size=64):
    """The grid ``--format bnb-<name>`` solves every linear on."""
    return GridSpec(name, 4, group_size, scale_dtype=torch.float32)


def test_tables_are_bitsandbytes_own():
    nf4, fp4 = torch.tensor(TABLES["nf4"]), torch.tensor(TABLES["fp4"])
    assert nf4.numel() == fp4.numel() == 16
    assert nf4[0] == -1 and nf4[7] == 0 and nf4[15] == 1 and bool((nf4[1:] > nf4[:-1]).all())
    assert fp4.abs().max() == 1 and fp4[3] == 1 and fp4[11] == -1 and fp4[1] == pytest.approx(0.0625 / 12)


@pytest.mark.parametrize("name", ["nf4", "fp4"])
def test_codes_are_the_nearest_table_values(name):
    fam = CodebookFamily(name, mse=False)
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    grid = fam.fit(w)
    codes = fam.quantize(w, grid.scale[:, None])
    table = torch.tensor(TABLES[name])
    brute = (w[..., None] / grid.scale[:, None, None] - table).abs().min(dim=-1).values
    got = (w / grid.scale[:, None] - table[codes.long()]).abs()
    assert torch.allclose(got, brute, atol=1e-7)  # ties aside, the same distance: the nearest value
    assert torch.equal(grid.scale, w.abs().amax(dim=1))  # absmax, kept in float32
    assert torch.equal(fam.dequantize(codes, grid.scale[:, None]), table[codes.long()] * grid.scale[:, None])


@pytest.mark.parametrize("grid", ["nf4", "fp4"])
def test_diagonal_hessian_is_round_to_nearest_and_block_size_free(grid):
    W = torch.randn(32, 128, generator=torch.Generator().manual_seed(3))
    H = torch.diag(torch.rand(128, generator=torch.Generator().manual_seed(4)) + 0.5)
    cfg = QuantConfig(bits=4, group_size=64, mse=False, act_order="none")
    got, rtn = solve(W, H, cfg, grid=codebook(grid)), round_to_nearest(W, cfg, codebook(grid))
    assert torch.equal(got.weight, rtn.weight) and torch.equal(got.codes, rtn.codes)
    assert got.scales.dtype == torch.float32
    X, Hc = correlated(n_in=128)  # float64: the lazy updates then round alike for every block size
    for mode in ("none", "group-aware", "dynamic"):
        a = solve(W.double(), Hc, QuantConfig(bits=4, group_size=64, act_order=mode, block_size=1), grid=codebook(grid))
        b = solve(W.double(), Hc, QuantConfig(bits=4, group_size=64, act_order=mode, block_size=48), grid=codebook(grid))
        assert torch.equal(a.weight, b.weight)


@pytest.mark.parametrize("grid", ["nf4", "fp4"])
@pytest.mark.parametrize("mse", [False, True])
def test_gptq_on_a_codebook_beats_plain_rounding(grid, mse):
    X, H = correlated(n_in=128)
    W = torch.randn(64, 128, generator=torch.Generator().manual_seed(5))
    cfg = QuantConfig(bits=4, group_size=64, mse=mse)
    e_gptq = output_error(W, solve(W, H.float(), cfg, grid=codebook(grid)).weight, X)
    e_rtn = output_error(W, round_to_nearest(W, QuantConfig(bits=4, group_size=64, mse=False), codebook(grid)).weight, X)
    assert e_gptq < 0.8 * e_rtn, (e_gptq, e_rtn)


def test_codebook_settings_are_checked_and_saved_as_bitsandbytes(tmp_path):
    with pytest.raises(ConfigError, match="block"):
        get(QuantConfig(bits=4, group_size=100, format="bnb-nf4"))
    with pytest.raises(ConfigError, match="4-bit"):
        get(QuantConfig(bits=3, group_size=64, format="bnb-nf4"))
    with pytest.raises(ConfigError, match="format"):
        get(QuantConfig(format="bnb-nf8"))
    with pytest.raises(ValueError, match="grid"):
        GridSpec("nf8")
    from test_pipeline import tiny_model, windows

    from gptq import quantize_model, save_checkpoint

    model = tiny_model("llama")
    cfg = QuantConfig(bits=4, group_size=64, format="bnb-nf4")
    packed, report = quantize_model(model, windows(), cfg, device="cpu", progress=False)
    from gptq.formats.bnb import Bnb4bitLinear

    assert len(report) == 7 * model.config.num_hidden_layers
    assert all(isinstance(p, Bnb4bitLinear) for p in packed.values())
    out = save_checkpoint(tmp_path / "ck", model, packed, cfg)
    assert '"bitsandbytes"' in (out / "config.json").read_text()


@pytest.mark.parametrize("name", sorted(TABLES))
@pytest.mark.parametrize("double_quant", [False, True])
def test_the_clipping_search_scores_each_candidate_as_quantize_then_dequantize(name, double_quant, monkeypatch):
    """The search takes a candidate's value from the sorted table at w's bucket, in place (faster than
    quantize's codes then dequantize's lookup); its errors equal the plain computation's exactly."""
    from gptq.core.grids import codebook, search

    g = torch.Generator().manual_seed(5)
    W = torch.randn(40, 128, generator=g) * 0.05
    W[5, 7] = 2.0
    cw = torch.rand(64, generator=g) + 0.1
    fam = CodebookFamily(name, True, double_quant)
    fam.prepare(W, 64)
    seen = []
    monkeypatch.setattr(codebook, "shrink_search",
                        lambda cost, shape, like: seen.append(cost) or search.shrink_search(cost, shape, like))
    w = W[:, 64:]
    fam.fit(w, cw, group=1)
    shrink = 0.2 + 0.8 * torch.rand(5, 40, generator=g)
    absmax = w.abs().amax(dim=1)
    s = fam._snap(shrink * absmax, 1)[..., None]
    assert torch.equal(seen[0](shrink), (fam.dequantize(fam.quantize(w, s), s) - w).square() @ cw)

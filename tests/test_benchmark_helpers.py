"""Helpers of the benchmarks whose figures rest on them (no model, no timing)."""

import pytest
import torch

from benchmarks.rotation_split import _match_channels


def _mlp(gen, inter=48, hidden=16):
    return {"model.layers.0.mlp.up_proj": torch.randn(inter, hidden, generator=gen),
            "model.layers.0.mlp.gate_proj": torch.randn(inter, hidden, generator=gen),
            "model.layers.0.mlp.down_proj": torch.randn(hidden, inter, generator=gen)}


def test_rotation_split_matches_the_intermediate_channels_of_two_runs():
    gen = torch.Generator().manual_seed(0)
    high = _mlp(gen)
    perm = torch.randperm(48, generator=gen)
    # the low-bit run: its channels in another order, its weights off by rounding-sized noise
    expected = {n: (w[:, perm] if "down" in n else w[perm]) for n, w in high.items()}
    low = {n: w + 0.05 * torch.randn(w.shape, generator=gen) for n, w in expected.items()}
    worst = _match_channels(low, high)
    assert 0.99 < worst <= 1.0
    for n in high:
        assert torch.equal(high[n], expected[n])


def test_rotation_split_refuses_channels_that_do_not_pair_up():
    gen = torch.Generator().manual_seed(1)
    high = _mlp(gen)
    low = {n: w.clone() for n, w in high.items()}
    low["model.layers.0.mlp.up_proj"][1] = low["model.layers.0.mlp.up_proj"][0]  # two rows alike
    low["model.layers.0.mlp.gate_proj"][1] = low["model.layers.0.mlp.gate_proj"][0]
    with pytest.raises(RuntimeError, match="do not pair up"):
        _match_channels(low, high)

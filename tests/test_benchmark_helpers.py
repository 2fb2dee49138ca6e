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


def test_rotation_learned_solver_error_is_the_h_weighted_error_the_solve_leaves():
    from benchmarks.rotation_learned import solver_error
    from gptq.core.config import QuantConfig
    from gptq.core.solver import round_to_nearest, solve

    gen = torch.Generator().manual_seed(2)
    X = torch.randn(512, 128, generator=gen) * torch.linspace(0.1, 4.0, 128)  # uneven channels
    H = 2 * X.T @ X / 512
    W = torch.randn(32, 128, generator=gen)
    Q = torch.linalg.qr(torch.randn(128, 128, generator=gen))[0]
    config = QuantConfig(bits=3, group_size=32, sym=False)
    Wr, Hr = W @ Q, Q.T @ H @ Q
    D = Wr - solve(Wr, Hr, config).weight
    assert solver_error(W, H, Q, config) == pytest.approx((D @ Hr * D).sum().item(), rel=1e-5)
    # a writer ([hidden, in]): its rows rotated, its input not
    V = torch.randn(128, 128, generator=gen)
    D = Q.T @ V - solve(Q.T @ V, H, config).weight
    assert solver_error(V, H, Q, config, reads=False) == pytest.approx((D @ H * D).sum().item(), rel=1e-5)
    # the solve leaves less H-weighted error than rounding each weight to its nearest level
    R = Wr - round_to_nearest(Wr, config).weight
    assert solver_error(W, H, Q, config) < 0.8 * (R @ Hr * R).sum().item()

"""The numerical core against an unblocked float64 reference and round-to-nearest."""

import math

import pytest
import torch

from gptq.core.config import ConfigError, QuantConfig
from gptq.core.grids import GridSpec
from gptq.core.grids.uniform import dequantize, find_grid, quantize
from gptq.core.hessian import CholeskyError, HessianAccumulator, NonFiniteError, inverse_cholesky
from gptq.core.solver import round_to_nearest, solve, solve_order
from gptq.formats.registry import get


def v1(cfg):
    """The grid the GPTQ (v1) format solves a linear on: asymmetric zeros kept >= 1."""
    return get(cfg).grid("layer")


def correlated(n_in=96, n_rows=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n_in, n_in, generator=g, dtype=torch.float64) / math.sqrt(n_in)
    X = torch.randn(n_rows, n_in, generator=g, dtype=torch.float64) @ (torch.eye(n_in, dtype=torch.float64) + 2 * mix)
    X[:, 3] = 0  # a dead input
    acc = HessianAccumulator(n_in)
    acc.add(X)
    return X, acc.hessian().double()


def reference_gptq(W, H, cfg):
    """Algorithm 1 of the paper, one column at a time, in float64, no blocks, no laziness."""
    W = W.double().clone()
    H = H.double().clone()
    n = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    gs = n if cfg.group_size == -1 else cfg.group_size
    perm, group_of = solve_order(torch.diag(H), gs, cfg.act_order)
    static = cfg.act_order == "static" or cfg.group_size == -1
    grids = {}
    if static:
        for g in range(math.ceil(n / gs)):
            grids[g] = find_grid(W[:, g * gs:(g + 1) * gs], cfg.bits, cfg.sym_at(cfg.bits), cfg.mse, None, 0)
    W, H = W[:, perm], H[perm][:, perm]
    Hd = H + cfg.damp * torch.diag(H).mean() * torch.eye(n, dtype=torch.float64)
    U = torch.linalg.cholesky(torch.linalg.inv(Hd), upper=True)
    Q = torch.zeros_like(W)
    for j in range(n):
        if static:
            grid = grids[int(perm[j]) // gs]
        elif j == 0 or group_of[j] != group_of[j - 1]:  # a group's first column in solve order
            end = j + int((group_of[j:] == group_of[j]).sum())  # its columns are consecutive
            grid = find_grid(W[:, j:end], cfg.bits, cfg.sym_at(cfg.bits), cfg.mse, 1 / torch.diag(U)[j:end] ** 2, 0)
        Q[:, j] = dequantize(quantize(W[:, j], grid.scale, grid.zero, cfg.maxq), grid.scale, grid.zero)
        err = (W[:, j] - Q[:, j]) / U[j, j]
        W[:, j:] -= torch.outer(err, U[j, j:])
    return Q[:, torch.argsort(perm)]


def output_error(W, Q, X):
    return float(((X @ W.double().T - X @ Q.double().T) ** 2).sum())


@pytest.mark.parametrize("group_size", [-1, 32, 40])
@pytest.mark.parametrize("act_order", ["none", "dynamic", "group-aware"])
@pytest.mark.parametrize("block_size", [1, 16, 128])
def test_blocked_equals_unblocked_reference(group_size, act_order, block_size):
    X, H = correlated()
    W = torch.randn(24, 96, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cfg = QuantConfig(bits=4, group_size=group_size, act_order=act_order, block_size=block_size,
                      mse=False, sym=False, format="gptq_v2")
    ref = reference_gptq(W, H, cfg)
    got = solve(W, H, cfg)
    assert torch.equal(got.weight, ref)
    # float32 solver agrees with the float64 reference on all but a handful of rounding ties
    got32 = solve(W.float(), H.float(), cfg)
    assert (got32.weight.double() - ref).abs().gt(1e-4).float().mean() < 0.01


@pytest.mark.parametrize("mse", [False, True])
def test_blocked_equals_reference_with_mse_and_static_groups(mse):
    X, H = correlated()
    W = torch.randn(16, 96, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for mode in ("dynamic", "static", "group-aware"):
        cfg = QuantConfig(bits=3, group_size=32, act_order=mode, block_size=24, mse=mse,
                          format="gptq_v2", sym=False)
        assert torch.equal(solve(W, H, cfg).weight, reference_gptq(W, H, cfg))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True])
def test_diagonal_hessian_is_exactly_round_to_nearest(bits, sym):
    W = torch.randn(32, 64, generator=torch.Generator().manual_seed(3))
    H = torch.diag(torch.rand(64, generator=torch.Generator().manual_seed(4)) + 0.5)
    cfg = QuantConfig(bits=bits, group_size=16, sym=sym, mse=False, act_order=False)
    got, rtn = solve(W, H, cfg, grid=v1(cfg)), round_to_nearest(W, cfg, v1(cfg))
    assert torch.equal(got.weight, rtn.weight)
    assert torch.equal(got.codes, rtn.codes)
    assert torch.equal(got.scales, rtn.scales) and torch.equal(got.zeros, rtn.zeros)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("act_order", ["none", "static", "group-aware", "dynamic"])
def test_gptq_beats_round_to_nearest_on_correlated_inputs(bits, act_order):
    X, H = correlated()
    W = torch.randn(64, 96, generator=torch.Generator().manual_seed(5))
    cfg = QuantConfig(bits=bits, group_size=32, act_order=act_order, mse=False)
    e_gptq = output_error(W, solve(W, H, cfg).weight, X)
    e_rtn = output_error(W, round_to_nearest(W, cfg).weight, X)
    assert e_gptq < 0.8 * e_rtn, (e_gptq, e_rtn)


def test_codes_scales_zeros_reproduce_weight_and_g_idx():
    X, H = correlated()
    W = torch.randn(16, 96, generator=torch.Generator().manual_seed(6))
    cfg = QuantConfig(bits=4, group_size=32, act_order="dynamic", sym=False)
    r = solve(W, H, cfg, grid=v1(cfg))
    g = r.g_idx.long()
    rebuilt = r.scales.float()[g].T * (r.codes.float() - r.zeros.float()[g].T)
    assert torch.equal(rebuilt, r.weight)
    assert sorted(torch.bincount(g).tolist()) == [32, 32, 32]  # act-order: non-monotonic, but full groups
    assert r.zeros.min() >= 1  # v1 cannot hold a zero of 0
    assert (r.weight[:, 3] == 0).all()  # dead input zeroed


@pytest.mark.parametrize("mode", ["none", "static", "group-aware"])
@pytest.mark.parametrize("group_size,n", [(32, 96), (32, 72), (40, 96)])  # 72 and 40: a shorter last group
def test_g_idx_is_trivial_except_for_dynamic(mode, group_size, n):
    """Every mode but dynamic writes g_idx = k // group (desc_act false: vLLM >= 0.32 serves it)."""
    X, H = correlated(n_in=n)
    W = torch.randn(16, n, generator=torch.Generator().manual_seed(8))
    r = solve(W, H, QuantConfig(bits=4, group_size=group_size, act_order=mode))
    assert r.g_idx.tolist() == [k // group_size for k in range(n)]
    assert get(QuantConfig(act_order=mode)).quantization_config()["desc_act"] is False
    dyn = solve(W, H, QuantConfig(bits=4, group_size=group_size, act_order="dynamic"))
    assert dyn.g_idx.tolist() != [k // group_size for k in range(n)]
    assert get(QuantConfig(act_order="dynamic")).quantization_config()["desc_act"] is True


def test_group_aware_order_ranks_groups_and_sorts_inside_them():
    diag = torch.tensor([1.0, 9, 2, 5, 7, 3, 8, 0.5])  # groups of 3: [1 9 2] [5 7 3] [8 0.5]
    perm, group_of = solve_order(diag, 3, "group-aware")
    assert perm.tolist() == [1, 2, 0, 6, 7, 4, 3, 5]  # group maxima 9 > 8 > 7; the short group inside
    assert group_of.tolist() == [0, 0, 0, 2, 2, 1, 1, 1]
    # by the sum: 15 > 12 > 8.5, so the middle group comes before the short one
    perm, group_of = solve_order(diag, 3, "group-aware", rank="sum")
    assert perm.tolist() == [4, 3, 5, 1, 2, 0, 6, 7]
    assert group_of.tolist() == [1, 1, 1, 0, 0, 0, 2, 2]
    with pytest.raises(ConfigError, match="group_rank"):
        QuantConfig(group_rank="median")


def test_boolean_act_order_means_the_old_flags():
    assert QuantConfig(act_order=True).act_order == "dynamic"
    assert QuantConfig(act_order=False).act_order == "none"
    with pytest.raises(ConfigError, match="act_order"):
        QuantConfig(act_order="sideways")


def test_shorter_last_group():
    W = torch.randn(8, 72)
    r = solve(W, torch.eye(72), QuantConfig(group_size=32, act_order=False))
    assert r.scales.shape == (3, 8)
    assert r.g_idx.tolist() == [k // 32 for k in range(72)]


def test_solve_does_not_modify_inputs():
    X, H = correlated()
    W = torch.randn(8, 96)
    W0, H0 = W.clone(), H.clone()
    solve(W, H, QuantConfig())
    assert torch.equal(W, W0) and torch.equal(H, H0)


def test_mse_grid_lowers_weighted_error():
    w = torch.randn(64, 128) * torch.linspace(0.1, 3, 128)
    w[:, 0] = 12  # an outlier column stretches the min/max grid
    plain = find_grid(w, 3, False, mse=False)
    clipped = find_grid(w, 3, False, mse=True)
    def err(gr):
        return float((dequantize(quantize(w, gr.scale[:, None], gr.zero[:, None], 7), gr.scale[:, None], gr.zero[:, None]) - w).square().sum())
    assert err(clipped) < err(plain)


def test_scales_are_float16_exact():
    r = solve(torch.randn(8, 64) * 1e3, torch.eye(64), QuantConfig(group_size=32))
    assert torch.isfinite(r.scales).all() and r.scales.dtype == torch.float16


def test_cholesky_failure_names_layer():
    H = -torch.eye(8)
    with pytest.raises(CholeskyError, match="mlp.down_proj.*--damp"):
        inverse_cholesky(H, 0.01, "mlp.down_proj")


def test_cholesky_retry_with_more_damping():
    v = torch.randn(16, 1, dtype=torch.float64)
    H = v @ v.T - 1e-3 * torch.eye(16, dtype=torch.float64)  # slightly indefinite: fails at 1 % damping
    U = inverse_cholesky(H, 1e-4, "x")  # fails at 1e-4 and 1e-3, succeeds at 1e-2
    assert torch.isfinite(U).all()


def test_non_finite_inputs_rejected():
    W = torch.randn(4, 8)
    W[1, 2] = float("nan")
    with pytest.raises(NonFiniteError, match="layer7"):
        solve(W, torch.eye(8), QuantConfig(), name="layer7")
    H = torch.eye(8)
    H[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="activations"):
        solve(torch.randn(4, 8), H, QuantConfig(), name="l")


@pytest.mark.parametrize("kw,msg", [({"bits": 5}, "bits=5"), ({"group_size": 0}, "group_size=0"),
                                    ({"damp": -1}, "damp")])
def test_config_errors(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        QuantConfig(**kw)


def test_unknown_format_is_a_config_error():
    """The output format (formerly checkpoint_format) is checked where it is looked up."""
    with pytest.raises(ConfigError, match="format"):
        get(QuantConfig(format="awq"))


@pytest.mark.parametrize("columns", [7, 300, 1100])
def test_hessian_accumulator_is_2xxt_over_n(columns):
    g = torch.Generator().manual_seed(columns)
    xs = [torch.randn(3, 5, columns, generator=g, dtype=torch.float64) for _ in range(3)]
    acc = HessianAccumulator(columns)
    for x in xs:
        acc.add(x)
    X = torch.cat([x.reshape(-1, columns) for x in xs])  # [45, columns]
    H = acc.hessian()
    assert acc.count == 45
    assert torch.allclose(H.double(), 2 * X.T @ X / 45, rtol=1e-5, atol=1e-4)
    assert torch.allclose(H, H.T, rtol=1e-6, atol=1e-6)


def test_docstring_worked_example():
    """The 2-column example in gptq/solver.py's docstring, with a 1-bit grid {0, 1}."""
    W = torch.tensor([[0.6, 0.6]], dtype=torch.float64)
    H = torch.tensor([[1.0, 0.9], [0.9, 1.0]], dtype=torch.float64)
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    w = W[0].clone()
    q0 = torch.round(w[0]).clamp(0, 1)
    err = (w[0] - q0) / U[0, 0]
    w[1:] -= err * U[0, 1:]
    assert torch.isclose(w[1], torch.tensor(0.24, dtype=torch.float64))
    def out_err(Q):
        e = W - Q
        return float(e @ H @ e.T)
    assert abs(out_err(torch.tensor([[1.0, 1.0]], dtype=torch.float64)) - 0.608) < 1e-9
    assert abs(out_err(torch.tensor([[1.0, 0.0]], dtype=torch.float64)) - 0.088) < 1e-9


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True])
def test_packed_result_dequantizes_to_the_solved_weight(bits, sym):
    """solve → pack (the uint8 codes, every width, the top code included) → dequantize: exact."""
    from gptq.core.pack import dequantize_packed

    X, H = correlated()
    W = torch.randn(32, 96, generator=torch.Generator().manual_seed(7)) * 3
    cfg = QuantConfig(bits=bits, group_size=32, act_order="dynamic", sym=sym)
    fmt = get(cfg)
    r = solve(W, H, cfg, grid=fmt.grid("layer"))
    assert r.codes.dtype == torch.uint8 and int(r.codes.max()) == 2**bits - 1
    p = fmt.pack(r, None)
    W_hat = dequantize_packed(p.qweight, p.qzeros, p.scales, p.g_idx, bits, cfg.format)
    assert torch.equal(W_hat, r.weight)


@pytest.mark.parametrize("act_order", ["none", "static", "group-aware", "dynamic"])
@pytest.mark.parametrize("group_size", [32, -1])
def test_solve_batch_is_solve_per_matrix(act_order, group_size):
    """Same-shape matrices with their own Hessians (a dead input in one) solved as a batch: the
    same codes, grids and g_idx as solving each alone, up to float rounding of batched products."""
    from gptq.core.solver import solve_batch

    g = torch.Generator().manual_seed(0)
    B, out, n = 4, 48, 96
    W = torch.randn(B, out, n, generator=g)
    X = torch.randn(B, 200, n, generator=g) * torch.rand(n, generator=g) * 3
    H = 2 * X.transpose(1, 2) @ X / 200
    H[1, 5, :] = 0
    H[1, :, 5] = 0
    cfg = QuantConfig(bits=4, group_size=group_size, act_order=act_order, block_size=32)
    batch = solve_batch(W, H, cfg, [f"m{b}" for b in range(B)])
    for b in range(B):
        one = solve(W[b], H[b], cfg)
        assert torch.equal(batch[b].g_idx, one.g_idx)
        assert (batch[b].codes != one.codes).float().mean() < 1e-3
        torch.testing.assert_close(batch[b].scales.float(), one.scales.float(), rtol=1e-3, atol=0)
        torch.testing.assert_close(batch[b].weight, one.weight, rtol=0, atol=2 * float(one.scales.max()))
        assert abs(batch[b].loss - one.loss) <= 1e-4 * one.loss
    assert torch.all(batch[1].weight[:, 5] == 0)


def test_solve_batch_falls_back_where_the_loops_do_not_line_up():
    """Codebook grids (and solve orders that start groups at different positions) are solved one
    by one: then the result is exactly ``solve``'s."""
    from gptq.core.solver import solve_batch

    g = torch.Generator().manual_seed(1)
    W = torch.randn(2, 16, 64, generator=g)
    X = torch.randn(2, 100, 64, generator=g)
    H = 2 * X.transpose(1, 2) @ X / 100
    H[1, 48:, 48:] *= 100  # the short last group (48 + 16) ranks first in matrix 1 only
    nf4 = GridSpec("nf4", 4, 64, scale_dtype=torch.float32)
    for cfg, grid in ((QuantConfig(bits=4, group_size=64), nf4), (QuantConfig(bits=4, group_size=48), None)):
        for b, r in enumerate(solve_batch(W, H, cfg, ["a", "b"], grid=grid)):
            one = solve(W[b], H[b], cfg, grid=grid)
            assert torch.equal(r.codes, one.codes) and torch.equal(r.weight, one.weight)


@pytest.mark.parametrize("act_order", ["none", "static", "group-aware", "dynamic"])
@pytest.mark.parametrize("group_size", [16, -1])
@pytest.mark.parametrize("mse", [False, True])
def test_solve_batch_stores_exactly_what_solve_stores_in_float64(act_order, group_size, mse):
    """``solve`` is ``solve_batch``'s column loop with one matrix in it. In float64 the batched products'
    different rounding never reaches the stored result: codes, grids, g_idx and Ŵ are solve's exactly,
    the loss to 1e-12 (float32: the existing test's tolerances). Groups of 16 in blocks of 24 reach past
    the block; matrix 2 has a dead input."""
    from gptq.core.solver import solve_batch

    g = torch.Generator().manual_seed(3)
    B, out, n = 3, 24, 80
    W = torch.randn(B, out, n, generator=g, dtype=torch.float64)
    X = torch.randn(B, 160, n, generator=g, dtype=torch.float64) * torch.rand(n, generator=g, dtype=torch.float64) * 3
    H = 2 * X.transpose(1, 2) @ X / 160
    H[2, 7, :] = 0
    H[2, :, 7] = 0
    cfg = QuantConfig(bits=3, group_size=group_size, act_order=act_order, mse=mse, block_size=24, sym=False,
                      format="gptq_v2")
    for b, r in enumerate(solve_batch(W, H, cfg, ["a", "b", "c"])):
        one = solve(W[b], H[b], cfg)
        for field in ("codes", "scales", "zeros", "g_idx", "weight"):
            assert torch.equal(getattr(r, field), getattr(one, field)), field
        assert abs(r.loss - one.loss) <= 1e-12 * one.loss


def _percent_table(rows, variants, seed):
    """A cost per (variant, row, percent shrunk 0..80): small integers, so that ties are common."""
    return torch.randint(0, 6, (variants, rows, 81), generator=torch.Generator().manual_seed(seed)).double()


def _table_cost(table):
    """cost(shrinks [P, rows]) → [V·P, rows], looked up by the percent each candidate shrinks."""
    def cost(shrinks):
        p = torch.round((1 - shrinks) * 100).long()  # [P, rows]
        rows = torch.arange(shrinks.shape[1]).expand_as(p)
        return torch.cat([table[v][rows, p] for v in range(table.shape[0])])
    return cost


@pytest.mark.parametrize("variants", [1, 2])
def test_shrink_search_picks_what_brute_force_picks(variants):
    """The coarse-then-fine search, written once for every grid family, against trying the candidates
    one at a time for each row: the first of least cost among 0 %, 4 %, ..., 80 % shrunk, then among
    the best ± 3 % in 1 % steps (clamped to [0, 80]), each in every variant (variant-major)."""
    from gptq.core.grids.search import shrink_search

    rows = 64
    table = _percent_table(rows, variants, seed=variants)
    shrink, variant = shrink_search(_table_cost(table), (rows,), torch.zeros((), dtype=torch.float64))
    def first_best(r, percents):  # min keeps the first of equals
        return min(((v, p) for v in range(variants) for p in percents), key=lambda c: table[c[0], r, c[1]])

    for r in range(rows):
        _, coarse = first_best(r, range(0, 81, 4))
        v, p = first_best(r, [min(max(coarse + m, 0), 80) for m in (3, 2, 1, 0, -1, -2, -3)])
        assert round(100 * (1 - float(shrink[r]))) == p and int(variant[r]) == v, r


def test_find_grid_mse_is_brute_force_over_the_shrinks():
    """A real cost: ``find_grid``'s clipped grid per row is the one that trying every candidate shrink
    on that row alone (its own min/max grid, its own weighted error) picks."""
    from gptq.core.grids.search import MSE_COARSE, MSE_FINE
    from gptq.core.grids.uniform import _range_to_grid

    g = torch.Generator().manual_seed(4)
    w = torch.randn(12, 20, generator=g, dtype=torch.float64) * torch.rand(20, generator=g, dtype=torch.float64)
    w[:, 0] = 4  # an outlier column: clipping pays
    cw = torch.rand(20, generator=g, dtype=torch.float64) + 0.5
    got = find_grid(w, 3, False, mse=True, col_weight=cw, min_zero=0)

    def grid(x, s):  # row x's min/max grid shrunk by s
        return _range_to_grid(s * torch.clamp(x.min(), max=0), s * torch.clamp(x.max(), min=0), 7, False, 0)

    def err(x, s):
        scale, zero = grid(x, s)
        return float(((dequantize(quantize(x, scale, zero, 7), scale, zero) - x) ** 2 * cw).sum())

    for r, x in enumerate(w):
        best = min((1.0 - MSE_COARSE.double()).tolist(), key=lambda s: err(x, s))
        fine = torch.clamp(best + MSE_FINE.double(), 1.0 - float(MSE_COARSE[-1]), 1.0)
        best = min(fine.tolist(), key=lambda s: err(x, s))
        scale, zero = grid(x, best)
        assert float(got.scale[r]) == float(scale) and float(got.zero[r]) == float(zero), r

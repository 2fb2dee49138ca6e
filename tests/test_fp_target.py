"""Full-precision targets (GPTAQ's asymmetric calibration): the solver's shifted target, the cross
term's accumulation, and the second (full-precision) stream through the block loop."""

import pytest
import torch
from conftest import FAMILIES, tiny_model

from gptq import QuantConfig, quantize_model
from gptq.core.config import ConfigError
from gptq.core.hessian import CrossAccumulator, HessianAccumulator
from gptq.core.solver import solve


def problem(rows=24, n=64, tokens=512, seed=0):
    """W, the quantized model's inputs X [tokens, n], the full-precision ones X̃ = X + ΔX (ΔX
    partly a linear function of X, partly independent, as accumulated quantization error is)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, n, generator=g, dtype=torch.float64) @ torch.randn(n, n, generator=g, dtype=torch.float64)
    dX = 0.1 * X @ torch.randn(n, n, generator=g, dtype=torch.float64) / n**0.5
    dX += 0.05 * torch.randn(tokens, n, generator=g, dtype=torch.float64)
    W = torch.randn(rows, n, generator=g, dtype=torch.float64)
    H = 2 * X.T @ X / tokens
    C = 2 * dX.T @ X / tokens
    return W, X, X + dX, H, C


def shifted_target(W, H, C, alpha, damp):
    """W′ = W + α·W·C·(H + λI)⁻¹, written out with a dense inverse (the solver uses its Cholesky factor)."""
    Hd = H.clone()
    Hd.diagonal().add_(damp * torch.diag(H).mean())
    return W + alpha * W @ C @ torch.linalg.inv(Hd)


@pytest.mark.parametrize("act_order", ["none", "group-aware", "static"])
@pytest.mark.parametrize("alpha", [0.25, 1.0])
def test_solve_with_the_cross_term_is_gptq_on_the_shifted_target(act_order, alpha):
    """Exactly GPTQ on W′ (float64: the two orders of the same products agree to 1e-12, so every
    rounding decision is the same), for every solve order (C is permuted with H)."""
    W, _, _, H, C = problem()
    cfg = QuantConfig(bits=4, group_size=16, act_order=act_order, fp_target=alpha)
    got = solve(W, H, cfg, C=C)
    ref = solve(shifted_target(W, H, C, alpha, cfg.damp), H,
                QuantConfig(bits=4, group_size=16, act_order=act_order, fp_target=0.0))
    assert torch.equal(got.codes, ref.codes)
    torch.testing.assert_close(got.weight, ref.weight, rtol=0, atol=1e-12)
    torch.testing.assert_close(got.row_loss, ref.row_loss, rtol=1e-10, atol=0)


def test_without_a_cross_term_or_with_alpha_zero_it_is_plain_gptq():
    W, _, _, H, C = problem(seed=1)
    plain = solve(W, H, QuantConfig(bits=4, group_size=16, fp_target=0.0))
    for got in (solve(W, H, QuantConfig(bits=4, group_size=16, fp_target=0.25)),
                solve(W, H, QuantConfig(bits=4, group_size=16, fp_target=0.0), C=C)):
        assert torch.equal(got.codes, plain.codes) and torch.equal(got.weight, plain.weight)


def test_the_shifted_target_is_the_least_squares_answer_to_the_full_precision_outputs():
    """With α = 1 and almost no damping, W′ is argmin ‖WX̃ − W′X‖² (lstsq); an 8-bit solve lands next
    to it and so answers the full-precision outputs far better than plain GPTQ, which answers WX."""
    W, X, Xf, H, C = problem(seed=2)
    best = torch.linalg.lstsq(X, Xf @ W.T).solution.T  # [rows, n]
    torch.testing.assert_close(shifted_target(W, H, C, 1.0, 0.0), best, rtol=1e-8, atol=1e-8)

    def err(Wq):  # the full-precision objective per row, relative to the unquantized layer's own
        return float(((Xf @ W.T - X @ Wq.T) ** 2).sum() / ((Xf @ W.T) ** 2).sum())

    plain = solve(W, H, QuantConfig(bits=8, group_size=16, damp=1e-6, fp_target=0.0))
    ours = solve(W, H, QuantConfig(bits=8, group_size=16, damp=1e-6, fp_target=1.0), C=C)
    assert err(ours.weight) < 1.5 * err(best)  # 8-bit rounding on top of the optimum
    assert err(plain.weight) > 5 * err(ours.weight)


def test_cross_accumulator_is_2_dx_x_over_n_also_when_staged():
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(2, 5, 12, generator=g) for _ in range(3)]
    refs = [x + 0.1 * torch.randn(x.shape, generator=g) for x in xs]
    acc, staged, total = CrossAccumulator(12), CrossAccumulator(12, staged=True), CrossAccumulator(12)
    for r, x in zip(refs, xs):
        acc.add(r, x)
        staged.add(r, x)
        total.add_partial(*staged.take_staged())
    X, Xf = torch.cat([x.reshape(-1, 12) for x in xs]).double(), torch.cat([r.reshape(-1, 12) for r in refs]).double()
    want = (2 * (Xf - X).T @ X / X.shape[0]).float()
    torch.testing.assert_close(acc.matrix(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(total.matrix(), want, rtol=1e-5, atol=1e-6)
    assert refs[0].shape == (2, 5, 12) and not torch.equal(refs[0], xs[0])  # inputs left alone
    with pytest.raises(ValueError, match="same batches"):
        CrossAccumulator(12).add(torch.zeros(3, 12), torch.zeros(4, 12))
    assert HessianAccumulator(12).cross is None
    bf = CrossAccumulator(12)  # bfloat16 activations: multiplied in bf16, summed in fp32
    for r, x in zip(refs, xs):
        bf.add(r.bfloat16(), x.bfloat16())
    Xb, Xfb = X.bfloat16().double(), Xf.bfloat16().double()
    ref = 2 * (Xfb - Xb).T @ Xb / X.shape[0]
    assert float((bf.matrix().double() - ref).norm() / ref.norm()) < 4e-3  # bf16's 8-bit mantissa on each product


def windows(n=8, seqlen=32, seed=0):
    return torch.randint(0, 256, (n, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_the_full_precision_stream_is_the_unquantized_models_own_inputs(family, monkeypatch):
    """Every x̃ the pipeline pairs with a quantized input is what the unquantized model feeds that
    linear on the same batch (recorded from a plain forward of an untouched copy), block after
    block; block 0's first linears get C = 0 (both streams still equal there)."""
    from gptq.io.modules import get_module, hooked
    from gptq.models.architectures import for_config

    model, untouched = tiny_model(family), tiny_model(family)
    arch = for_config(model.config)
    ids = windows()
    seen = []  # x̃ in the order the pipeline adds them
    original = CrossAccumulator.add
    monkeypatch.setattr(CrossAccumulator, "add", lambda self, r, x: (seen.append((r.clone(), x.clone())),
                                                                     original(self, r, x))[1])
    cfg = QuantConfig(bits=4, group_size=32, fp_target=0.25)
    quantize_model(model, ids, cfg, device="cpu", batch_size=4, progress=False)

    # the same sequence from the untouched model: for each block, for each capture pass, each batch
    want = {}
    blocks = get_module(untouched, arch.blocks)
    leads = [next(iter(g)) for g in arch.sequential if not arch.routed(g)]
    with torch.no_grad():
        for i, block in enumerate(blocks):
            for lead in leads:
                rec = []
                with hooked(get_module(block, lead), lambda _m, a, rec=rec: rec.append(a[0].clone()), pre=True):
                    for b in ids.split(4):
                        untouched(b)
                want[(i, lead)] = rec
    expected = [want[(i, lead)][k] for i in range(len(blocks)) for lead in leads for k in range(2)]
    assert len(seen) == len(expected)
    for (r, x), w in zip(seen, expected):
        torch.testing.assert_close(r, w, rtol=1e-5, atol=1e-5)
    assert torch.equal(seen[0][0], seen[0][1])  # block 0, first linear: nothing quantized yet
    assert not torch.equal(seen[-1][0], seen[-1][1])  # last block: the streams have drifted apart


def test_fp_target_brings_the_quantized_model_closer_to_the_full_precision_one():
    """The point of it, on a tiny Llama at 3 bits: the logits on held-out windows end closer to the
    unquantized model's than plain GPTQ's do (deterministic: fixed seeds)."""
    ids, held_out = windows(16, 64), windows(4, 64, seed=7)
    ref = tiny_model("llama")
    with torch.no_grad():
        target = ref(held_out).logits
    errs = {}
    for alpha in (0.0, 0.25):
        m = tiny_model("llama")
        quantize_model(m, ids, QuantConfig(bits=3, group_size=32, fp_target=alpha), device="cpu", progress=False)
        with torch.no_grad():
            errs[alpha] = float(((m(held_out).logits - target) ** 2).mean())
    assert errs[0.25] < 0.95 * errs[0.0], errs


@pytest.mark.parametrize("bad", [-0.1, 1.5])
def test_fp_target_out_of_range_is_refused(bad):
    with pytest.raises(ConfigError, match="fp_target"):
        QuantConfig(fp_target=bad)


def test_fp_target_is_on_by_default_and_recorded():
    assert QuantConfig().fp_target == 0.25 and QuantConfig().as_dict()["fp_target"] == 0.25

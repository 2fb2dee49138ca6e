"""Per-token scores of a model against a reference, and their summary with uncertainties.

One window at a time (memory: a few [positions, vocab] float32 blocks), the scores are

- ``nll``: the model's next-token negative log-likelihood (float32 logits, as ``perplexity``);
- ``kld``: KL(P_ref || P_model) = Σ_v p_ref(v) · (log p_ref(v) − log p_model(v)) over the vocabulary;
- ``top1``: whether both put their highest probability on the same token.

Both distributions enter the KL and the top-1 comparison in one representation, the log-softmax
rounded to float16 and renormalised in float32: the form the reference cache stores. So a run with
the cache and one without give the same figures to the bit, a model against itself scores exactly 0
and 100 %, and the rounding (≤ 2⁻¹¹ relative on each log-probability) is far below the KL of any
quantization.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

CHUNK = 256  # positions per KL block: bounds the float32 temporaries to a few CHUNK x vocab


def reference_logprobs(logits: torch.Tensor) -> torch.Tensor:
    """[T, vocab] logits → the stored form: log-softmax in float16 (positions 0..T-2, which predict
    tokens 1..T-1)."""
    logits = logits[:-1]  # the last position predicts nothing scored
    out = torch.empty(logits.shape, dtype=torch.float16, device=logits.device)
    for s in range(0, out.shape[0], CHUNK):
        out[s : s + CHUNK] = torch.log_softmax(logits[s : s + CHUNK].float(), -1).half()
    return out


def token_nll(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """[T, vocab] logits and [T] tokens → [T-1] float32 next-token NLL (the first token not scored)."""
    return torch.nn.functional.cross_entropy(logits[:-1].float(), tokens[1:].to(logits.device), reduction="none")


@torch.no_grad()
def compare(ref_logprobs: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's stored float16 log-probabilities [T-1, vocab] and a model's logits [T, vocab]
    → (KL(P_ref || P_model) [T-1] float32, top-1 agreement [T-1] bool)."""
    if ref_logprobs.shape[-1] != logits.shape[-1]:
        raise ValueError(f"the reference scores {ref_logprobs.shape[-1]} tokens per position, the model "
                         f"{logits.shape[-1]}: KL divergence needs one vocabulary")
    logits = logits[:-1]
    n = ref_logprobs.shape[0]
    if logits.shape[0] != n:
        raise ValueError(f"the reference holds {n} positions, the model {logits.shape[0]}")
    kld = torch.empty(n, dtype=torch.float32)
    top1 = torch.empty(n, dtype=torch.bool)
    for s in range(0, n, CHUNK):
        r16 = ref_logprobs[s : s + CHUNK].to(logits.device)
        q16 = torch.log_softmax(logits[s : s + CHUNK].float(), -1).half()
        lr = torch.log_softmax(r16.float(), -1)
        lq = torch.log_softmax(q16.float(), -1)
        kld[s : s + CHUNK] = (lr.exp() * (lr - lq)).sum(-1).cpu()
        top1[s : s + CHUNK] = (r16.argmax(-1) == q16.argmax(-1)).cpu()
    return kld, top1


@dataclass
class Scores:
    """Per-token scores, one row per window: [windows, seqlen - 1] each (reference rows optional)."""

    nll: list[torch.Tensor]
    ref_nll: list[torch.Tensor]
    kld: list[torch.Tensor]
    top1: list[torch.Tensor]

    @classmethod
    def empty(cls) -> Scores:
        return cls([], [], [], [])


PERCENTILES = {"kld_median": 50.0, "kld_p90": 90.0, "kld_p99": 99.0, "kld_p99_9": 99.9}
BOOTSTRAP = 200  # resamples of the windows
SEED = 0


def _mean_se(x: np.ndarray) -> tuple[float, float | None]:
    m = float(x.mean())
    return m, (float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else None)


def _ppl_se(nll: np.ndarray) -> tuple[float, float | None]:
    """exp(mean NLL) and its standard error by the delta method (σ_ppl = ppl · σ_mean), as llama.cpp."""
    m, se = _mean_se(nll)
    ppl = math.exp(m)
    return ppl, (None if se is None else ppl * se)


def summarize(s: Scores, bootstrap: int = BOOTSTRAP, seed: int = SEED) -> dict:
    """The figures and their uncertainties.

    Means (perplexity through the delta method, KL mean, top-1 agreement, Δ perplexity with the
    covariance of the paired NLLs) carry the standard error over tokens (``*_stderr``), as
    llama-perplexity reports them. Percentiles carry the standard deviation of a bootstrap over
    windows (``bootstrap`` resamples, fixed ``seed``); every figure also has ``*_stderr_windows``,
    the same bootstrap, which unlike the token error counts the correlation of tokens inside a window
    (None below 2 windows).
    """
    nll = torch.stack(s.nll).double().numpy()  # [W, T-1]
    W = nll.shape[0]
    out: dict = {"tokens": int(nll.size)}
    out["perplexity"], out["perplexity_stderr"] = _ppl_se(nll.ravel())
    ref = kld = top1 = None
    if s.kld:
        ref = torch.stack(s.ref_nll).double().numpy()
        kld = torch.stack(s.kld).double().numpy()
        top1 = torch.stack(s.top1).double().numpy()
        out["reference_perplexity"], out["reference_perplexity_stderr"] = _ppl_se(ref.ravel())
        pq, pr = out["perplexity"], out["reference_perplexity"]
        out["delta_perplexity"] = pq - pr
        n = nll.size
        if n > 1:
            c = np.cov(nll.ravel(), ref.ravel())  # [[var q, cov], [cov, var r]], ddof 1
            var = (pq * pq * c[0, 0] + pr * pr * c[1, 1] - 2 * pq * pr * c[0, 1]) / n
            out["delta_perplexity_stderr"] = math.sqrt(max(var, 0.0))
        else:
            out["delta_perplexity_stderr"] = None
        out["kld_mean"], out["kld_mean_stderr"] = _mean_se(kld.ravel())
        for key, q in zip(PERCENTILES, np.percentile(kld.ravel(), list(PERCENTILES.values()))):
            out[key] = float(q)
        out["kld_max"] = float(kld.max())
        out["top1_agreement"], out["top1_agreement_stderr"] = _mean_se(top1.ravel())

    def figures(rows) -> dict[str, float]:
        f = {"perplexity": math.exp(nll[rows].mean())}
        if kld is not None:
            f["reference_perplexity"] = math.exp(ref[rows].mean())
            f["delta_perplexity"] = f["perplexity"] - f["reference_perplexity"]
            f["kld_mean"] = kld[rows].mean()
            f |= dict(zip(PERCENTILES, np.percentile(kld[rows].ravel(), list(PERCENTILES.values()))))
            f["top1_agreement"] = top1[rows].mean()
        return f

    keys = list(figures(np.arange(W)))
    boot = dict.fromkeys(keys)
    if W > 1 and bootstrap > 0:
        rng = np.random.default_rng(seed)
        draws = [figures(rng.integers(0, W, W)) for _ in range(bootstrap)]
        boot = {k: float(np.std([d[k] for d in draws], ddof=1)) for k in keys}
    for k, v in boot.items():
        out[f"{k}_stderr_windows"] = v
        if k in PERCENTILES:
            out[f"{k}_stderr"] = v
    return out

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

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from gptq.io.safetensors_io import atomic_save

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


# Per-token scores on disk (``gptq.eval --save-scores``): one safetensors file, [windows, seqlen - 1]
# tensors nll, kld, top1 (uint8) and ref_nll (the last three only with a reference), and in its
# metadata the sha256 of the windows' token ids, so that a paired comparison refuses other windows.

def windows_sha(windows: torch.Tensor) -> str:
    """The identity of a set of evaluation windows: sha256 of their token ids (int64)."""
    return hashlib.sha256(windows.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def save_scores(s: Scores, path: str | Path, windows: torch.Tensor, model: str) -> None:
    """Write ``s`` to ``path`` (atomically: the whole file or none)."""
    t = {"nll": torch.stack(s.nll).float()}
    if s.kld:
        t |= {"kld": torch.stack(s.kld).float(), "top1": torch.stack(s.top1).to(torch.uint8),
              "ref_nll": torch.stack(s.ref_nll).float()}
    atomic_save(t, path, metadata={"windows_sha256": windows_sha(windows), "model": model})


def load_scores(path: str | Path) -> tuple[Scores, dict]:
    """Scores written by ``save_scores`` and the file's metadata; ValueError naming the file when it is
    not one."""
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (OSError, SafetensorError) as e:
        raise ValueError(f"{path}: not a scores file written by gptq.eval --save-scores ({e})") from e
    if "windows_sha256" not in meta or "nll" not in t:
        raise ValueError(f"{path}: not a scores file written by gptq.eval --save-scores")
    rows = {k: list(t[k].unbind(0)) if k in t else [] for k in ("nll", "ref_nll", "kld", "top1")}
    rows["top1"] = [r.bool() for r in rows["top1"]]
    return Scores(rows["nll"], rows["ref_nll"], rows["kld"], rows["top1"]), meta


def paired(base: Scores, other: Scores, bootstrap: int = BOOTSTRAP, seed: int = SEED) -> dict:
    """``other`` minus ``base`` on the same windows, token by token: the differences of mean NLL
    (log perplexity), mean KL divergence and top-1 agreement, each with the standard error of the
    paired differences over tokens (``*_stderr``) and a bootstrap over windows (``*_stderr_windows``).
    Pairing removes what the two share (hard tokens are hard for both), so these errors are far
    smaller than either figure's own; a difference more than two of them from 0 is beyond the
    evaluation's noise."""
    keys = ["nll"] + (["kld", "top1"] if base.kld and other.kld else [])
    d = {}
    for k in keys:
        a, b = (torch.stack(getattr(s, k)).double().numpy() for s in (base, other))
        if a.shape != b.shape:
            raise ValueError(f"the two score sets cover {a.shape} and {b.shape} tokens: they must be the same windows")
        d[k] = b - a
    names = {"nll": "delta_nll_mean", "kld": "delta_kld_mean", "top1": "delta_top1_agreement"}
    out: dict = {"tokens": int(d["nll"].size)}
    W = d["nll"].shape[0]
    rng = np.random.default_rng(seed)
    draws = [rng.integers(0, W, W) for _ in range(bootstrap)] if W > 1 and bootstrap > 0 else []
    for k, x in d.items():
        out[names[k]], out[names[k] + "_stderr"] = _mean_se(x.ravel())
        out[names[k] + "_stderr_windows"] = (float(np.std([x[r].mean() for r in draws], ddof=1)) if draws
                                             else None)
    return out

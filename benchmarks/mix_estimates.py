"""Which cheap estimate predicts what a unit's quantization does to the whole model: on SmolLM2 (or,
``--model synthetic``, a random model wider than it: ``SYNTHETIC``) each
unit (q/k/v, o, gate/up, down of a block) alone is solved with GPTQ onto one candidate (3-bit g64),
written into the otherwise full-precision model, and the KL divergence of its next-token
distributions from the full-precision model's is measured on held-out text. Every estimate of
``--sensitivity`` is computed from the same calibration pass; the rank correlation (Spearman) and the
log-log correlation (Pearson) with the measured KL say which predicts best."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from benchmarks.common import smollm2_eval, wiki, write
from calib import load_documents, sample_windows
from gptq.core.config import SENSITIVITIES, QuantConfig
from gptq.core.grids import GridSpec
from gptq.io.modules import set_weight_matrix, weight_matrix
from gptq.pipeline import mix
from gptq.pipeline.loop import capture_block_inputs
from gptq.runtime.cpu import cpu_info

GRID = GridSpec("int", 3, 64, True)


def _ranks(x: list[float]) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64).argsort().argsort().double()


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


# the synthetic model: wider than SmolLM2 (1024 against 576, its MLP 2816 against 1536), grouped-query
# attention 16/4 heads, 8 blocks, SmolLM2's vocabulary; transformers' own initialisation with a larger
# spread than its default 0.02, so that its next-token distributions are peaked (logits of standard
# deviation ~1.6) and a unit's damage is not lost in a near-uniform output
SYNTHETIC = dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=16, num_key_value_heads=4,
                 num_hidden_layers=8, vocab_size=49152, initializer_range=0.05, tie_word_embeddings=False,
                 max_position_embeddings=2048)
MODELS = ("smollm2", "synthetic")


def load_model(which: str, model_dir: Path):
    """The model studied, fp32, and its description."""
    if which == "smollm2":
        return (AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval(),
                "SmolLM2-135M-Instruct fp32")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SYNTHETIC)).eval()
    shape = ", ".join(f"{k} {v}" for k, v in SYNTHETIC.items())
    return model, f"a random Llama ({shape}; seed 0) fp32"


@torch.no_grad()
def mix_estimates(out: Path, which: str = "smollm2", eval_windows: int = 4, eval_len: int = 512) -> dict:
    """The correlations on ``which`` model: SmolLM2, or the synthetic one (``SYNTHETIC``, fed the same
    text through SmolLM2's tokenizer)."""
    model_dir, tok, _ = smollm2_eval()
    model, what = load_model(which, model_dir)
    docs, mode = load_documents(str(wiki("valid.tokens.txt")), "calib")
    windows = sample_windows(docs, tok, 32, 512, 0, mode)
    held_out = sample_windows(load_documents(str(wiki("wiki.test.raw")), "calib")[0], tok, eval_windows, eval_len, 1,
                              "stream")
    shapes = mix.unit_shapes(model)
    inputs = capture_block_inputs(model, windows, 8, "cpu")
    setup = (f"{what}; 32 x 512 WikiText-2 valid calibration; each unit alone GPTQ-solved "
             f"onto {GRID.bits}-bit g{GRID.group_size} (full-precision Hessian), KL of next-token distributions "
             f"against the full-precision model on {eval_windows} x {eval_len} tokens of wiki.test.raw")
    stem = "mix_estimates" if which == "smollm2" else f"mix_estimates_{which}"
    cached = out / f"{stem}_units.json"
    measured = None
    if cached.is_file():  # the per-unit KL does not depend on the estimates: measured once, reused
        old = json.loads(cached.read_text())
        if old.get("setup") == setup and len(old["units"]) == len(shapes):
            measured = [u["kl"] for u in old["units"]]
            print(f"per-unit KL from {cached}", flush=True)
    estimates, solved = {}, {}
    t0 = time.perf_counter()
    for s in SENSITIVITIES:
        cfg = QuantConfig(group_size=64, sensitivity=s)
        keep = (lambda name, _o, Q: solved.__setitem__(name, Q.clone())) if s == "gptq" and measured is None else None
        t = time.perf_counter()
        errs = mix.measure(model, inputs, cfg, shapes, [(0,)] * len(shapes), [GRID], "cpu", progress=False,
                           on_weight=keep)
        estimates[s] = {"errors": [e[0] for e in errs], "seconds": round(time.perf_counter() - t, 1)}
        print(s, estimates[s]["seconds"], "s", flush=True)
    if measured is None:
        measured = _measure_kl(model, shapes, solved, held_out)
    rows = []
    log_m = torch.tensor([math.log(max(m, 1e-12)) for m in measured], dtype=torch.float64)
    for s, e in estimates.items():
        log_e = torch.tensor([math.log(max(x, 1e-30)) for x in e["errors"]], dtype=torch.float64)
        rows.append({"sensitivity": s, "spearman": round(_pearson(_ranks(e["errors"]), _ranks(measured)), 4),
                     "pearson_log": round(_pearson(log_e, log_m), 4), "seconds": e["seconds"]})
    result = {
        "setup": setup,
        "command": f"python -m benchmarks mix-estimates --model {which}", "cpu": cpu_info(), "rows": rows,
        "units": [{"linears": [n.removeprefix("model.layers.") for n in sh.names], "kl": m,
                   **{s: estimates[s]["errors"][k] for s in estimates}} for k, (sh, m) in enumerate(zip(shapes, measured))],
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write(out, stem, {k: v for k, v in result.items() if k != "units"}, show=True)
    write(out, f"{stem}_units", result)
    return result


@torch.no_grad()
def _measure_kl(model, shapes, solved: dict, held_out: torch.Tensor) -> list[float]:
    """KL of the model with one unit at a time replaced by its solved weights, against the model."""
    ref = torch.log_softmax(model(held_out).logits.float(), -1)
    measured = []
    for k, sh in enumerate(shapes):
        old = {}
        for n in sh.names:
            lin = model.get_submodule(n)
            old[n] = weight_matrix(lin).clone()
            set_weight_matrix(lin, solved[n])
        logp = torch.log_softmax(model(held_out).logits.float(), -1)
        measured.append(float((ref.exp() * (ref - logp)).sum(-1).mean()))
        for n, w in old.items():
            set_weight_matrix(model.get_submodule(n), w)
        if k % 10 == 0:
            print(f"unit {k}/{len(shapes)}: KL {measured[-1]:.3g}", flush=True)
    return measured

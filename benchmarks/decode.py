"""Batch-1 decoding and long-prompt (2048-token perplexity window) speed of SmolLM2 on the CPU:
dense fp32, dense bf16, and our 4-bit checkpoint loaded with the defaults (cpu backend, the
activation dtype this CPU is fast in); tokens/s, resident weight memory."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from benchmarks.common import smollm2_eval, write
from benchmarks.quality import quality
from gptq.eval import perplexity
from gptq.generate import resident_bytes
from gptq.runtime.cpu import cpu_info
from gptq.runtime.load import load
from gptq.runtime.qlinear import QuantLinear


def side_by_side_rates(runs: dict, n_new: int, rounds: int = 3) -> dict[str, float]:
    """Tokens per second of each ``runs[name]()`` (one generate call of ``n_new`` tokens), measured
    in interleaved rounds (one warm-up call each first) so that a noisy machine slows every model
    alike; the median per name."""
    with torch.no_grad():
        for run in runs.values():
            run(warm=True)
        rates = {name: [] for name in runs}
        for _ in range(rounds):
            for name, run in runs.items():
                t0 = time.perf_counter()
                run()
                rates[name].append(n_new / (time.perf_counter() - t0))
    return {name: round(statistics.median(r), 2) for name, r in rates.items()}


def generate_run(model, ids: torch.Tensor, n_new: int, **kw):
    def run(warm: bool = False):
        n = 4 if warm else n_new
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kw)

    return run


def decode_speedups(rows: dict, qname: str) -> dict[str, float]:
    """The quantized model's tokens/s over bf16's and fp32's."""
    return {f"decode_speedup_vs_{ref}": round(rows[qname]["tokens_per_s"] / rows[ref]["tokens_per_s"], 2)
            for ref in ("bf16", "fp32")}


def _eval_seconds_per_window(models: dict, windows: torch.Tensor) -> dict[str, float]:
    """Prompt processing: seconds per 2048-token perplexity window of each model, side by side
    (each window runs on every model in turn; the first window warms up)."""
    for m in models.values():
        perplexity(m, windows[:1])
    seconds = {name: 0.0 for name in models}
    for i in range(1, len(windows)):
        for name, m in models.items():
            t0 = time.perf_counter()
            perplexity(m, windows[i:i + 1])
            seconds[name] += time.perf_counter() - t0
    return {name: round(t / (len(windows) - 1), 2) for name, t in seconds.items()}


def decode(out: Path, eval_windows_n: int = 3) -> dict:
    model_dir, tok, windows = smollm2_eval(eval_windows_n)
    ckpt = out / "smollm2-gptq-4bit-g64"
    if not (ckpt / "config.json").is_file():
        quality(out)
    rows = {}
    models = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
        lin = sum(mod.weight.numel() * mod.weight.element_size() for n, mod in m.named_modules()
                  if isinstance(mod, torch.nn.Linear) and ".layers." in n)
        rows[name] = {"weights_gb": round(resident_bytes(m) / 1e9, 3), "decoder_linears_mb": round(lin / 1e6, 1)}
        models[name] = m
    q, _ = load(ckpt, device="cpu")
    # one ModuleList, so storages shared by fused siblings (q/k/v, up/gate) are counted once
    qlin = resident_bytes(torch.nn.ModuleList([mod for mod in q.modules() if isinstance(mod, QuantLinear)]))
    qname = "gptq-4bit-g64 (cpu backend)"
    rows[qname] = {
        "weights_gb": round(resident_bytes(q) / 1e9, 3), "decoder_linears_mb": round(qlin / 1e6, 1),
        "linears_vs_bf16": round(qlin / (rows["bf16"]["decoder_linears_mb"] * 1e6), 3),
        "activation_dtype": str(q.get_input_embeddings()(torch.zeros(1, 1, dtype=torch.long)).dtype)[6:],
    }
    models[qname] = q
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    rates = side_by_side_rates({name: generate_run(m, ids, 64, pad_token_id=tok.eos_token_id)
                                for name, m in models.items()}, 64)
    evals = _eval_seconds_per_window(models, windows)
    for name, rate in rates.items():
        rows[name]["tokens_per_s"] = rate
        rows[name]["eval_s_per_2048_window"] = evals[name]
        print(name, rows[name])
    result = {"setup": "greedy, 64 new tokens, batch 1, 2 threads, median of 3 interleaved rounds; eval: "
                       "perplexity windows of 2048 tokens, each on every model in turn, first one as warm-up",
              "cpu": cpu_info(), "rows": rows, **decode_speedups(rows, qname),
              "eval_time_vs_fp32": round(rows[qname]["eval_s_per_2048_window"]
                                         / rows["fp32"]["eval_s_per_2048_window"], 3)}
    write(out, "decode", result, show=True)
    return result

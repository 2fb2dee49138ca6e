"""SmolLM2 4-bit g64 symmetric: perplexity of fp32, round-to-nearest and our defaults; quantize wall
time and peak RSS (the CLI in a subprocess)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from benchmarks.common import evaluate, quantize_cmd, run_timed, smollm2_eval, write
from gptq.core.config import QuantConfig
from gptq.eval import perplexity
from gptq.pipeline.run import round_to_nearest_model
from gptq.runtime.load import load


def quality(out: Path) -> dict:
    model_dir, _, windows = smollm2_eval()
    ckpt = out / "smollm2-gptq-4bit-g64"
    cmd = quantize_cmd(model_dir, "--sym", "--out", str(ckpt), "--overwrite", "--quiet")
    print("$", " ".join(cmd))
    wall, peak = run_timed(cmd)
    report = json.loads((ckpt / "quantize_report.json").read_text())
    fp = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ppl_fp = perplexity(fp, windows)
    round_to_nearest_model(fp, QuantConfig(bits=4, group_size=64, sym=True, mse=False))
    ppl_rtn = perplexity(fp, windows)
    del fp
    q, _ = load(ckpt, device="cpu", backend="torch", dtype="float32")
    ppl_q = perplexity(q, windows)
    del q
    against_source = evaluate(ckpt, model_dir, out / "reference-cache")  # KL, top-1, with uncertainties
    result = {
        "command": " ".join(cmd[1:]),
        "model": "SmolLM2-135M-Instruct (bf16 weights dequantized from the Q4_1 GGUF)",
        "eval": "wiki.test.raw, first 8 windows x 2048 tokens, fp32 activations",
        "fp32_ppl": round(ppl_fp, 2), "rtn_ppl": round(ppl_rtn, 2), "gptq_ppl": round(ppl_q, 2),
        "gptq_against_source": against_source,
        "quantize_seconds_total": round(wall, 1), "quantize_seconds_loop": report["seconds"],
        "quantize_peak_rss_gib": round(peak, 2), "settings": report["quant_config"],
        "compute": report.get("compute"),
    }
    write(out, "quality", result, show=True)
    return result

"""GPTQ on bitsandbytes' NF4/FP4 grids (absmax per 64 weights, float32: 4.5 bits per weight) against
plain rounding to the same grids (what bitsandbytes does), in memory, fp32 throughout; the same
calibration and evaluation windows as the quality benchmark."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from benchmarks.common import smollm2_eval, wiki, write
from calib import load_documents, sample_windows
from gptq.core.config import QuantConfig
from gptq.eval import perplexity
from gptq.pipeline.run import quantize_model, round_to_nearest_model
from gptq.runtime.cpu import cpu_info


def codebooks(out: Path) -> dict:
    model_dir, tok, test = smollm2_eval()
    docs, mode = load_documents(str(wiki("valid.tokens.txt")), "calib")
    calib = sample_windows(docs, tok, 32, 512, 0, mode)
    rows = {}
    for grid in ("nf4", "fp4"):
        for label, gptq in (("round-to-nearest (bitsandbytes' rounding)", False), ("gptq (defaults)", True)):
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
            t0 = time.perf_counter()
            if gptq:
                quantize_model(model, calib, QuantConfig(bits=4, group_size=64, format=f"bnb-{grid}"), device="cpu",
                               progress=False)
            else:
                round_to_nearest_model(model, QuantConfig(bits=4, group_size=64, format=f"bnb-{grid}", mse=False))
            seconds = time.perf_counter() - t0
            rows[f"{grid} {label}"] = {"ppl": round(perplexity(model, test), 2), "bits_per_weight": 4 + 32 / 64,
                                       "seconds": round(seconds, 1)}
            print(grid, label, rows[f"{grid} {label}"])
            del model
    result = {"setup": "SmolLM2, absmax per 64 weights in float32 (no double quantization), 32 x 512 calibration "
                       "windows of WikiText-2 valid, 8 x 2048 windows of wiki.test.raw, fp32; in memory (no "
                       "checkpoint is written)", "cpu": cpu_info(), "rows": rows}
    write(out, "codebooks", result)
    return result

"""Streaming quantization of a synthetic Qwen3-MoE-shaped model (64 experts per layer): seconds per
block and peak RSS with same-shape experts solved as a batch and one by one, for both ways of
building the experts' Hessians; how far the batched checkpoint is from the one-by-one one (the same
algorithm, different rounding of batched products); and one layer's expert solves timed alone."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Qwen3MoeConfig

from benchmarks.common import write
from benchmarks.stream_child import stream_child
from gptq.core.config import QuantConfig
from gptq.core.solver import solve, solve_batch
from gptq.runtime.cpu import cpu_info

MOE_SHAPE = {"hidden": 1024, "moe_inter": 384, "experts": 64, "active": 8, "layers": 2}  # Qwen3-30B-A3B: 2048/768/128/8
MOE_WINDOWS = (16, 256)


def synthetic_moe(d: Path, hidden: int, moe_inter: int, experts: int, active: int, layers: int) -> Path:
    """A random Qwen3-MoE-shaped bf16 model saved as transformers saves it (per-expert tensors)."""
    cfg = Qwen3MoeConfig(hidden_size=hidden, intermediate_size=3 * hidden, moe_intermediate_size=moe_inter,
                         num_experts=experts, num_experts_per_tok=active, num_hidden_layers=layers,
                         num_attention_heads=16, num_key_value_heads=4, head_dim=hidden // 16, vocab_size=32000,
                         max_position_embeddings=4096, dtype="bfloat16")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(d)
    return d


def _solver_batch_rows(hidden: int, moe_inter: int, experts: int, device: str) -> dict:
    """Seconds to solve every expert's gate/up (stacked, one H each) and down of one layer, one by
    one (``solve``) and as one batch (``solve_batch``), random weights and Hessians."""
    g = torch.Generator().manual_seed(0)
    cfg = QuantConfig(bits=4, group_size=128)
    rows = {}
    for label, (out_f, in_f) in (("gate+up", (2 * moe_inter, hidden)), ("down", (hidden, moe_inter))):
        W = torch.randn(experts, out_f, in_f, generator=g).to(device)
        X = torch.randn(experts, 2 * in_f, in_f, generator=g).to(device)
        H = 2 * X.transpose(1, 2) @ X / X.shape[1]
        del X

        def sync():
            if device.startswith("cuda"):
                torch.cuda.synchronize()

        solve(W[0], H[0], cfg)  # warm-up
        sync()
        t0 = time.perf_counter()
        for e in range(experts):
            solve(W[e], H[e], cfg)
        sync()
        t1 = time.perf_counter()
        solve_batch(W, H, cfg, [label] * experts)
        sync()
        t2 = time.perf_counter()
        rows[label] = {"shape": [out_f, in_f], "experts": experts, "one_by_one_s": round(t1 - t0, 3),
                       "batched_s": round(t2 - t1, 3), "speedup": round((t1 - t0) / (t2 - t1), 2)}
        print(label, rows[label])
    return rows


def moe(out: Path, device: str = "cpu") -> dict:
    d = synthetic_moe(out / "synthetic" / "moe", **MOE_SHAPE)
    n, seq = MOE_WINDOWS
    rows, outs = {}, {}
    for tokens in ("all", "routed"):
        for batch in (False, True):
            label = f"expert_tokens={tokens}, {'batched' if batch else 'one by one'}"
            outs[label] = out / "synthetic" / f"moe-{tokens}-{batch}"
            rows[label] = stream_child(d, outs[label], nsamples=n, seqlen=seq, device=device,
                                       quant={"expert_tokens": tokens, "batch_experts": batch})
            print(label, rows[label])
        a, b = (json.loads((outs[f"expert_tokens={tokens}, {m}"] / "quantize_report.json").read_text())["layers"]
                for m in ("one by one", "batched"))
        loss = [sum(r["loss"] for r in x if ".experts." in r["name"]) for x in (a, b)]
        rows[f"expert_tokens={tokens}, batched"]["expert_loss_vs_one_by_one"] = round(loss[1] / loss[0], 5)
        rows[f"expert_tokens={tokens}, batched"]["speedup"] = round(
            rows[f"expert_tokens={tokens}, one by one"]["seconds_per_block"]
            / rows[f"expert_tokens={tokens}, batched"]["seconds_per_block"], 2)
    shutil.rmtree(out / "synthetic", ignore_errors=True)
    solver = _solver_batch_rows(MOE_SHAPE["hidden"], MOE_SHAPE["moe_inter"], MOE_SHAPE["experts"], device)
    result = {"setup": f"random Qwen3-MoE-shaped bf16 model: {MOE_SHAPE}; {n} x {seq}-token random windows; "
                       "4-bit g128; streaming; 2 threads", "device": device, "cpu": cpu_info(), "rows": rows,
              "solver_one_layer": solver}
    if device.startswith("cuda"):
        result["gpu"] = torch.cuda.get_device_name()
    write(out, "moe", result, show=True)
    return result

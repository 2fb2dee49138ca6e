"""Batch-1 decoding of a TinyLlama-1.1B-shaped model with random weights (speed only), where the
linears, not the framework's per-token overhead, set the pace: dense fp32, dense bf16, and 4-bit
g128 packed with random codes, prepared as ``load`` prepares a checkpoint."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks.common import write
from benchmarks.decode import decode_speedups, generate_run, side_by_side_rates
from gptq.core.pack import pack_qweight, pack_qzeros
from gptq.generate import resident_bytes
from gptq.runtime.cpu import cpu_info
from gptq.runtime.load import prepare_model, resolve_dtype
from gptq.runtime.qlinear import QuantLinear

SYNTH_DECODE = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,  # TinyLlama-1.1B's shape
                "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000,
                "max_position_embeddings": 2048}


def random_packed(model: torch.nn.Module, bits: int = 4, group: int = 128, seed: int = 0) -> torch.nn.Module:
    """Replace every decoder linear of ``model`` by a QuantLinear holding random codes (scales
    ~0.01, zero 8): a packed model of the right shape for speed figures, no solve needed."""
    g = torch.Generator().manual_seed(seed)
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, torch.nn.Linear) or ".layers." not in name:
            continue
        N, K = mod.weight.shape
        q = QuantLinear(K, N, bits, group, mod.bias is not None)
        q.qweight = pack_qweight(torch.randint(0, 2 ** bits, (N, K), dtype=torch.int32, generator=g), bits)
        q.qzeros = pack_qzeros(torch.full((K // group, N), 2 ** (bits - 1), dtype=torch.int32), bits)
        q.scales = (torch.rand(K // group, N, generator=g) * 0.01 + 0.002).half()
        q.g_idx = (torch.arange(K) // group).to(torch.int32)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, q)
    return model


def decode_synthetic(out: Path, n_new: int = 32) -> dict:
    torch.set_num_threads(2)
    cfg = LlamaConfig(**SYNTH_DECODE, tie_word_embeddings=False)
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg).eval()

    rows, models = {}, {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        models[name] = copy.deepcopy(base).to(dtype)
        rows[name] = {"weights_gb": round(resident_bytes(models[name]) / 1e9, 3)}
    act = resolve_dtype("auto", torch.device("cpu"), "cpu")
    q = random_packed(base.to(act))
    prepare_model(q, "cpu", act, torch.device("cpu"))
    qname = "gptq-4bit-g128 (cpu backend)"
    kernel = next(m.backend.kernel for m in q.modules() if isinstance(m, QuantLinear))
    rows[qname] = {"weights_gb": round(resident_bytes(q) / 1e9, 3),
                   "activation_dtype": str(act).removeprefix("torch."), "kernel": kernel}
    models[qname] = q
    ids = torch.randint(0, cfg.vocab_size, (1, 8), generator=torch.Generator().manual_seed(1))
    rates = side_by_side_rates({name: generate_run(m, ids, n_new, pad_token_id=0, eos_token_id=None)
                                for name, m in models.items()}, n_new)
    for name, rate in rates.items():
        rows[name]["tokens_per_s"] = rate
        print(name, rows[name], flush=True)
    result = {"setup": f"TinyLlama-1.1B shape, random weights; greedy, {n_new} new tokens after 8, batch 1, "
                       "2 threads, median of 3 interleaved rounds", "cpu": cpu_info(), "rows": rows,
              **decode_speedups(rows, qname)}
    write(out, "decode_synthetic", result, show=True)
    return result

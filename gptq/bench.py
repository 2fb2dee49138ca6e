"""Benchmarks: ``python -m gptq.bench quality|decode|kernel|scale|spill|ablation|notebook|all [--out DIR]``.

quality  SmolLM2-135M-Instruct, 4-bit g64 symmetric, 32 × 512-token calibration windows from
         WikiText-2 valid; perplexity on the first 8 × 2048-token windows of WikiText-2 test.
         fp32 / round-to-nearest / our defaults; quantize wall time and peak RSS (subprocess).
decode   CPU batch-1 greedy decoding (64 new tokens, 2 threads): fp32, bf16 and our packed
         4-bit checkpoint; tokens/s (median of 3), resident weight memory, and seconds per
         2048-token perplexity window (long prompts).
decode-synthetic  the same on a TinyLlama-1.1B-shaped model with random weights (speed only), where
         the linears, not the framework's per-token overhead, set the pace.
Every result records the CPU (torch's capability, /proc/cpuinfo flags, measured fp32/bf16 GFLOPS).
scale    streaming quantization of synthetic Llama-shaped models of growing depth and width
         (sharded safetensors on disk): peak RSS and seconds per block (``--13b`` adds 13B-shaped).
spill    one synthetic model and a larger calibration set, activations in memory vs spilled to
         disk (--max-memory 0): peak RSS, seconds, identical checkpoints.
moe      streaming quantization of a synthetic Qwen3-MoE-shaped model (64 experts per layer):
         seconds per block and peak RSS, same-shape experts solved as a batch vs one by one.
distributed the streaming CLI as one process and under torchrun with 2 ranks (1 thread each):
         seconds per block, identical checkpoints.
ablation the quality benchmark with act-order, MSE clipping or true-sequential switched off.
act-order the quality benchmark under each --act-order mode (none, static, group-aware, dynamic).
fp-target the quality benchmark under --fp-target 0 (plain GPTQ), 0.1, 0.25 (default), 0.5, 1.
codebooks GPTQ on bitsandbytes' NF4/FP4 grids vs plain rounding to them (in memory; issue #13).
cpu-kernel the CPU matmul paths (int4 kernel, dequantize-then-matmul, dense fp32/bf16, the head)
         per shape and row count, with the CPU's capability: what the cpu backend's choices rest on.
kernel   CUDA only: Triton dequant-matmul vs fp16 torch.matmul on Llama-7B/70B layer shapes at
         batch 1/16/64/256, ratio and achieved GB/s. Without a GPU it says so and exits 0.
Figures are printed and written as JSON under --out (default bench-results/).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

WIKI = Path(os.environ.get("GPTQ_WIKITEXT", "../shared/data/wikitext2"))
MODEL = Path(os.environ.get("GPTQ_CACHE", ".cache")) / "smollm2"


def _wiki(name: str) -> Path:
    p = WIKI / name
    if not p.is_file():
        raise SystemExit(f"benchmark text {p} not found; set GPTQ_WIKITEXT to a folder with valid.tokens.txt "
                         "and wiki.test.raw (WikiText-2)")
    return p


def _write(out: Path, name: str, result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {out / name}.json")


def _run_timed(cmd: list[str]) -> tuple[float, float]:
    """Run a command; return (wall seconds, peak RSS of the child in GiB)."""
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - t0
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return wall, peak_kib / 1024**2


def quality(out: Path) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gptq.assets import smollm2
    from gptq.core.config import QuantConfig
    from gptq.eval import eval_windows, perplexity
    from gptq.pipeline.loop import round_to_nearest_model
    from gptq.runtime.load import load

    torch.set_num_threads(2)
    model_dir = smollm2(MODEL)
    ckpt = out / "smollm2-gptq-4bit-g64"
    cmd = [sys.executable, "-m", "gptq.quantize", str(model_dir), "--dataset", str(_wiki("valid.tokens.txt")),
           "--nsamples", "32", "--seqlen", "512", "--bits", "4", "--group-size", "64", "--sym",
           "--out", str(ckpt), "--overwrite", "--quiet"]
    print("$", " ".join(cmd))
    wall, peak = _run_timed(cmd)
    report = json.loads((ckpt / "quantize_report.json").read_text())
    tok = AutoTokenizer.from_pretrained(model_dir)
    windows = eval_windows(tok, str(_wiki("wiki.test.raw")), 2048, 8)
    fp = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ppl_fp = perplexity(fp, windows)
    round_to_nearest_model(fp, QuantConfig(bits=4, group_size=64, sym=True, mse=False))
    ppl_rtn = perplexity(fp, windows)
    del fp
    q, _ = load(ckpt, device="cpu", backend="torch", dtype="float32")
    ppl_q = perplexity(q, windows)
    result = {
        "command": " ".join(cmd[1:]),
        "model": "SmolLM2-135M-Instruct (bf16 weights dequantized from the Q4_1 GGUF)",
        "eval": "wiki.test.raw, first 8 windows x 2048 tokens, fp32 activations",
        "fp32_ppl": round(ppl_fp, 2), "rtn_ppl": round(ppl_rtn, 2), "gptq_ppl": round(ppl_q, 2),
        "quantize_seconds_total": round(wall, 1), "quantize_seconds_loop": report["seconds"],
        "quantize_peak_rss_gib": round(peak, 2), "settings": report["quant_config"],
        "compute": report.get("compute"),
    }
    print(json.dumps(result, indent=2))
    _write(out, "quality", result)
    return result


ABLATIONS = {  # each row: our defaults with one setting switched off
    "defaults": [],
    "no act-order": ["--act-order", "none"],
    "no MSE clipping": ["--no-mse"],
    "no true-sequential": ["--no-true-sequential"],
    "no full-precision targets": ["--fp-target", "0"],
}
ACT_ORDER_ROWS = {f"--act-order {m}": ["--act-order", m] for m in ("none", "static", "group-aware", "dynamic")}
ACT_ORDER_ROWS["--act-order group-aware --no-sort-channels"] = ["--act-order", "group-aware", "--no-sort-channels"]
FP_TARGET_ROWS = {f"--fp-target {a}": ["--fp-target", a] for a in ("0", "0.1", "0.25", "0.5", "1")}


def ablation(out: Path, rows_flags: dict[str, list[str]] = ABLATIONS, name: str = "ablation") -> dict:
    """Why the defaults are what they are: the quality benchmark with one setting changed at a time."""
    from transformers import AutoTokenizer

    from gptq.assets import smollm2
    from gptq.eval import eval_windows, perplexity
    from gptq.runtime.load import load

    torch.set_num_threads(2)
    model_dir = smollm2(MODEL)
    tok = AutoTokenizer.from_pretrained(model_dir)
    windows = eval_windows(tok, str(_wiki("wiki.test.raw")), 2048, 8)
    rows = {}
    for label, flags in rows_flags.items():
        ckpt = out / f"{name}-ckpt"
        cmd = [sys.executable, "-m", "gptq.quantize", str(model_dir), "--dataset", str(_wiki("valid.tokens.txt")),
               "--nsamples", "32", "--seqlen", "512", "--bits", "4", "--group-size", "64",
               "--out", str(ckpt), "--overwrite", "--quiet", *flags]
        print("$", " ".join(cmd[1:]))
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        seconds = json.loads((ckpt / "quantize_report.json").read_text())["seconds"]
        qc = json.loads((ckpt / "config.json").read_text())["quantization_config"]
        q, _ = load(ckpt, device="cpu", backend="torch", dtype="float32")
        rows[label] = {"flags": " ".join(flags), "ppl": round(perplexity(q, windows), 2), "seconds": seconds,
                       "desc_act": qc["desc_act"]}
        print(label, rows[label])
    result = {"setup": "as the quality benchmark (4-bit g64 sym, 32 x 512 calibration, 8 x 2048 eval)", "rows": rows}
    _write(out, name, result)
    return result


SCALE_SHAPES = {  # name: (hidden, intermediate, heads, kv heads, layers)
    "h1024-L4": (1024, 2816, 16, 4, 4),
    "h1024-L8": (1024, 2816, 16, 4, 8),
    "h1024-L16": (1024, 2816, 16, 4, 16),
    "h2048-L4": (2048, 5632, 16, 4, 4),
    "h2048-L8": (2048, 5632, 16, 4, 8),
}
SCALE_13B = {"13B-shaped": (5120, 13824, 40, 40, 40)}


def synthetic_llama(d: Path, hidden: int, inter: int, heads: int, kv: int, layers: int, vocab: int = 32000) -> Path:
    """A random Llama-shaped model written shard by shard (one per block), never whole in memory."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    d.mkdir(parents=True, exist_ok=True)
    LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads, num_key_value_heads=kv,
                num_hidden_layers=layers, vocab_size=vocab, max_position_embeddings=4096,
                tie_word_embeddings=False, dtype="bfloat16").save_pretrained(d)
    g = torch.Generator().manual_seed(0)
    hd = hidden // heads
    shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (kv * hd, hidden),
              "self_attn.v_proj": (kv * hd, hidden), "self_attn.o_proj": (hidden, hidden),
              "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden), "mlp.down_proj": (hidden, inter)}
    weight_map = {}
    n = layers + 1
    for i in range(layers):
        t = {f"model.layers.{i}.{k}.weight": (torch.randn(*sh, generator=g) / sh[1] ** 0.5).bfloat16()
             for k, sh in shapes.items()}
        t |= {f"model.layers.{i}.{k}.weight": torch.ones(hidden, dtype=torch.bfloat16)
              for k in ("input_layernorm", "post_attention_layernorm")}
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file(t, d / name, metadata={"format": "pt"})
        weight_map |= {k: name for k in t}
    t = {"model.embed_tokens.weight": (torch.randn(vocab, hidden, generator=g) * 0.02).bfloat16(),
         "lm_head.weight": (torch.randn(vocab, hidden, generator=g) * 0.02).bfloat16(),
         "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16)}
    name = f"model-{n:05d}-of-{n:05d}.safetensors"
    save_file(t, d / name, metadata={"format": "pt"})
    weight_map |= {k: name for k in t}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return d


def _scale_one(model_dir: str, out_dir: str, nsamples: int = 8, seqlen: int = 128,
               max_memory: int | None = None, quant: dict | None = None, device: str = "cpu") -> None:
    """Child process: stream-quantize one synthetic model, print one JSON line with its own peak RSS
    (``quant``: QuantConfig settings beside 4-bit g128)."""
    from gptq.core.config import QuantConfig
    from gptq.pipeline.streaming import quantize_streaming

    torch.set_num_threads(2)
    windows = torch.randint(0, 32000, (nsamples, seqlen), generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    qcfg = QuantConfig(**({"bits": 4, "group_size": 128} | (quant or {})))
    _, report, _ = quantize_streaming(model_dir, out_dir, qcfg, windows,
                                      torch.bfloat16, device=device, overwrite=True, progress=False,
                                      max_memory=max_memory)
    secs = time.perf_counter() - t0
    layers = len({r["name"].split(".")[2] for r in report})
    print(json.dumps({"seconds": round(secs, 1), "seconds_per_block": round(secs / layers, 2),
                      "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 2)}))


def _scale_child(model_dir: Path, out_dir: Path, **kw) -> dict:
    r = subprocess.run([sys.executable, "-c", f"from gptq.bench import _scale_one; _scale_one({str(model_dir)!r}, "
                        f"{str(out_dir)!r}, **{kw!r})"], check=True, capture_output=True, text=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def scale(out: Path, include_13b: bool = False) -> dict:
    """Peak RSS and time per block of streaming quantization on synthetic models of growing size."""
    import shutil

    shapes = SCALE_SHAPES | (SCALE_13B if include_13b else {})
    rows = {}
    for name, (h, f, nh, kv, L) in shapes.items():
        d = synthetic_llama(out / "synthetic" / name, h, f, nh, kv, L)
        disk = sum(p.stat().st_size for p in d.glob("*.safetensors"))
        rows[name] = _scale_child(d, out / "synthetic" / (name + "-gptq")) | {"bf16_on_disk_gib": round(disk / 1024**3, 2)}
        print(name, rows[name])
        shutil.rmtree(out / "synthetic", ignore_errors=True)
    result = {"setup": "random Llama-shaped bf16 models, sharded per block; 8 x 128-token random windows; "
                       "4-bit g128; streaming (default) path; 2 threads", "rows": rows}
    _write(out, "scale", result)
    return result


SPILL_SHAPE = (1024, 2816, 16, 4, 4)  # hidden 1024, 4 layers
SPILL_WINDOWS = (64, 512)


def spill(out: Path) -> dict:
    """The same model and calibration set quantized with the activations in memory and spilled to
    disk (``--max-memory 0``): peak RSS, seconds, and whether the checkpoints are identical."""
    import shutil

    from transformers import AutoConfig

    from gptq.pipeline.activations import activation_bytes

    h, f, nh, kv, L = SPILL_SHAPE
    d = synthetic_llama(out / "synthetic" / "spill", h, f, nh, kv, L)
    n, seq = SPILL_WINDOWS
    est = activation_bytes(AutoConfig.from_pretrained(d), n, seq, torch.bfloat16)
    rows, outs = {}, {}
    for label, mm in (("in memory", None), ("spilled (--max-memory 0)", 0)):
        outs[label] = out / "synthetic" / f"spill-{mm}"
        rows[label] = _scale_child(d, outs[label], nsamples=n, seqlen=seq, max_memory=mm)
        print(label, rows[label])
    a, b = (sorted(p.glob("*.safetensors")) for p in outs.values())
    identical = [x.name for x in a] == [y.name for y in b] and all(x.read_bytes() == y.read_bytes()
                                                                   for x, y in zip(a, b))
    shutil.rmtree(out / "synthetic", ignore_errors=True)
    result = {"setup": f"random Llama-shaped bf16 model, hidden {h}, {L} layers; {n} x {seq}-token random windows "
                       "(batch 8); 4-bit g128; streaming; 2 threads",
              "activation_estimate_gib": round(est / 1024**3, 2), "rows": rows,
              "checkpoints_identical": identical}
    print(json.dumps(result, indent=2))
    _write(out, "spill", result)
    return result


MOE_SHAPE = dict(hidden=1024, moe_inter=384, experts=64, active=8, layers=2)  # Qwen3-30B-A3B: 2048/768/128/8
MOE_WINDOWS = (16, 256)


def synthetic_moe(d: Path, hidden: int, moe_inter: int, experts: int, active: int, layers: int) -> Path:
    """A random Qwen3-MoE-shaped bf16 model saved as transformers saves it (per-expert tensors)."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

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
    from gptq.core.config import QuantConfig
    from gptq.core.solver import solve, solve_batch

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
    """Streaming quantization of a synthetic Qwen3-MoE-shaped model (64 experts per layer):
    seconds per block and peak RSS with same-shape experts solved as a batch and one by one,
    for both ways of building the experts' Hessians; how far the batched checkpoint is from the
    one-by-one one (the same algorithm, different rounding of batched products)."""
    import shutil

    d = synthetic_moe(out / "synthetic" / "moe", **MOE_SHAPE)
    n, seq = MOE_WINDOWS
    rows, outs = {}, {}
    for tokens in ("all", "routed"):
        for batch in (False, True):
            label = f"expert_tokens={tokens}, {'batched' if batch else 'one by one'}"
            outs[label] = out / "synthetic" / f"moe-{tokens}-{batch}"
            rows[label] = _scale_child(d, outs[label], nsamples=n, seqlen=seq, device=device,
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
    from gptq.runtime.cpu import cpu_info

    solver = _solver_batch_rows(MOE_SHAPE["hidden"], MOE_SHAPE["moe_inter"], MOE_SHAPE["experts"], device)
    result = {"setup": f"random Qwen3-MoE-shaped bf16 model: {MOE_SHAPE}; {n} x {seq}-token random windows; "
                       "4-bit g128; streaming; 2 threads", "device": device, "cpu": cpu_info(), "rows": rows,
              "solver_one_layer": solver}
    if device.startswith("cuda"):
        result["gpu"] = torch.cuda.get_device_name()
    print(json.dumps(result, indent=2))
    _write(out, "moe", result)
    return result


DIST_SHAPE = (1024, 2816, 16, 4, 4)  # hidden 1024, 4 layers (as the spill benchmark)
DIST_WINDOWS = (32, 256)


def distributed(out: Path, ranks: tuple[int, ...] = (1, 2), threads: int = 1,
                windows: tuple[int, int] = DIST_WINDOWS) -> dict:
    """The streaming CLI on one synthetic model as one process and under ``torchrun`` with N ranks,
    ``threads`` per process (the same in every run, so the bytes must match): seconds per block,
    and whether every rank count wrote the same bytes. On a 2-core CPU this shows the overhead,
    not a speed-up."""
    import shutil

    from gptq.runtime.cpu import cpu_info

    h, f, nh, kv, L = DIST_SHAPE
    d = synthetic_llama(out / "synthetic" / "dist", h, f, nh, kv, L)
    (out / "synthetic" / "calib.txt").write_text(" ".join(f"w{i % 997}" for i in range(200000)))
    tok = out / "synthetic" / "dist"
    _tiny_tokenizer(tok)
    n, seq = windows
    args = ["-m", "gptq.quantize", str(d), "--dataset", str(out / "synthetic" / "calib.txt"), "--nsamples", str(n),
            "--seqlen", str(seq), "--quiet", "--overwrite", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    rows, outs = {}, {}
    for r in ranks:
        outs[r] = out / "synthetic" / f"dist-{r}"
        launcher = [sys.executable] if r == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    "--nproc-per-node", str(r)]
        t0 = time.perf_counter()
        subprocess.run(launcher + args + ["--out", str(outs[r])], check=True, env=env, capture_output=True)
        secs = time.perf_counter() - t0
        label = f"{r} rank{'s' if r > 1 else ''} x {threads} thread{'s' if threads > 1 else ''}"
        inside = json.loads((outs[r] / "quantize_report.json").read_text())["seconds"]  # start-up excluded
        rows[label] = {"command_seconds": round(secs, 1), "quantize_seconds": inside,
                       "seconds_per_block": round(inside / L, 2)}
        print(label, rows[label])
    base = outs[ranks[0]]
    identical = all((base / p.name).read_bytes() == p.read_bytes() for r in ranks[1:] for p in outs[r].iterdir()
                    if p.name != "quantize_report.json")
    shutil.rmtree(out / "synthetic", ignore_errors=True)
    result = {"setup": f"random Llama-shaped bf16 model, hidden {h}, {L} layers; {n} x {seq}-token windows "
                       "(batch 8); 4-bit g128; streaming CLI; command_seconds: the whole command (imports, "
                       "torchrun start-up); quantize_seconds: the report's (loading, solving, writing)",
              "cpu": cpu_info(), "rows": rows, "checkpoints_identical": identical}
    print(json.dumps(result, indent=2))
    _write(out, "distributed", result)
    return result


def _tiny_tokenizer(d: Path) -> None:
    """A word-level tokenizer for the synthetic models (the CLI needs one to cut calibration windows)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0} | {f"w{i}": i + 1 for i in range(997)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(d)


def codebooks(out: Path) -> dict:
    """GPTQ on bitsandbytes' NF4/FP4 grids (absmax per 64 weights, float32: 4.5 bits per weight)
    against plain rounding to the same grids (what bitsandbytes does), in memory, fp32 throughout;
    same calibration and evaluation windows as the quality benchmark."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from calib import load_documents, sample_windows
    from gptq.assets import smollm2
    from gptq.core.config import QuantConfig
    from gptq.eval import eval_windows, perplexity
    from gptq.pipeline.loop import quantize_model, round_to_nearest_model
    from gptq.runtime.cpu import cpu_info

    torch.set_num_threads(2)
    model_dir = smollm2(MODEL)
    tok = AutoTokenizer.from_pretrained(model_dir)
    test = eval_windows(tok, str(_wiki("wiki.test.raw")), 2048, 8)
    docs, mode = load_documents(str(_wiki("valid.tokens.txt")), "calib")
    calib = sample_windows(docs, tok, 32, 512, 0, mode)
    rows = {}
    for grid in ("nf4", "fp4"):
        for label, gptq in (("round-to-nearest (bitsandbytes' rounding)", False), ("gptq (defaults)", True)):
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
            t0 = time.perf_counter()
            if gptq:
                quantize_model(model, calib, QuantConfig(bits=4, group_size=64, grid=grid), device="cpu", progress=False)
            else:
                round_to_nearest_model(model, QuantConfig(bits=4, group_size=64, grid=grid, mse=False))
            seconds = time.perf_counter() - t0
            rows[f"{grid} {label}"] = {"ppl": round(perplexity(model, test), 2), "bits_per_weight": 4 + 32 / 64,
                                       "seconds": round(seconds, 1)}
            print(grid, label, rows[f"{grid} {label}"])
            del model
    result = {"setup": "SmolLM2, absmax per 64 weights in float32 (no double quantization), 32 x 512 calibration "
                       "windows of WikiText-2 valid, 8 x 2048 windows of wiki.test.raw, fp32; in memory (no "
                       "bitsandbytes checkpoint is written yet)", "cpu": cpu_info(), "rows": rows}
    _write(out, "codebooks", result)
    return result


CPU_KERNEL_SHAPES = {"SmolLM2 up/gate": (576, 1536), "SmolLM2 down": (1536, 576), "1.3B up/gate": (2048, 5632)}
CPU_KERNEL_ROWS = (1, 4, 8, 16, 256, 2048)


def _median_ms(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times) * 1e3, 3)


def cpu_kernel(out: Path) -> dict:
    """The CPU matmul paths side by side, per shape and row count, on this CPU: what the cpu
    backend's choices (activation dtype, kernel vs dequantize-then-matmul, the fp16 head) rest on."""
    from gptq.core.pack import pack_qweight, pack_qzeros
    from gptq.runtime.cpu import cpu_info, fast_dtype
    from gptq.runtime.qlinear import (
        DEQUANT_MIN_ROWS,
        HEAD_DENSE_ROWS,
        ROWS64_MAX_ROWS,
        HalfHead,
        QuantLinear,
        SharedBuffers,
    )

    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    act = fast_dtype()
    rows = []
    from gptq.runtime.kernels import cpu_int4

    avx2 = cpu_int4.available()
    for label, (K, N) in CPU_KERNEL_SHAPES.items():
        codes = torch.randint(0, 16, (N, K), generator=g, dtype=torch.int32)
        scales = (torch.rand(K // 64, N, generator=g) * 0.01).half()
        layers = {}
        for kernel in ("torch", "avx2") if avx2 else ("torch",):
            layer = QuantLinear(K, N, 4, 64, False)
            layer.qweight = pack_qweight(codes, 4)
            layer.qzeros = pack_qzeros(torch.full((K // 64, N), 8, dtype=torch.int32), 4)
            layer.scales, layer.g_idx = scales, (torch.arange(K) // 64).to(torch.int32)
            assert layer.prepare("cpu", act, cpu_kernel=kernel) == "cpu"
            layer._state["buffers"] = SharedBuffers()
            layers[kernel] = layer
        st = layers["torch"]._state
        W = torch.randn(N, K, generator=g)
        for M in CPU_KERNEL_ROWS:
            x = torch.randn(M, K, generator=g)
            xb, Wb = x.bfloat16(), W.bfloat16()
            row = {"shape": label, "K": K, "N": N, "rows": M,
                   "int4_kernel_bf16_ms": _median_ms(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(
                       xb, st["w"], st["sub"], st["sz"])),
                   "int4_dequant_fp32_ms": _median_ms(lambda: x @ layers["torch"]._dequantized_t(torch.float32)),
                   # bf16 dequantization only where bf16 is the activation dtype (minutes per row elsewhere)
                   "int4_dequant_bf16_ms": (_median_ms(lambda: xb @ layers["torch"]._dequantized_t(torch.bfloat16))
                                            if act == torch.bfloat16 else None),
                   "dense_fp32_ms": _median_ms(lambda: x @ W.T), "dense_bf16_ms": _median_ms(lambda: xb @ Wb.T)}
            if avx2:  # our kernel and our exact dequantization + fp32 matmul, whichever CPU this is
                st64 = layers["avx2"]._state
                row["avx2_kernel_ms"] = _median_ms(lambda: st64["matmul"](x))
                row["avx2_dequant_fp32_ms"] = _median_ms(lambda: layers["avx2"]._prompt_rows64(x, x))
            chosen = layers["avx2" if avx2 and act == torch.float32 else "torch"]
            xa = x.to(act)
            row["backend_ms"] = _median_ms(lambda: chosen(xa))
            ours = chosen is layers.get("avx2")
            if M >= (ROWS64_MAX_ROWS if ours else DEQUANT_MIN_ROWS):
                row["backend_path"] = "dequantize + dense"
            else:
                row["backend_path"] = "avx2 kernel" if ours else "int4 kernel"
            rows.append(row)
            print(row)
    V, K = 49152, 576
    head_w = torch.randn(V, K, generator=g) * 0.02
    head = HalfHead(torch.nn.Parameter(head_w.half(), requires_grad=False))
    for M in (1, 16, 2048):
        x = torch.randn(M, K, generator=g)
        row = {"shape": f"head {V}x{K}", "rows": M}
        for dt in (torch.float32, torch.bfloat16, torch.float16):
            w, xd = head_w.to(dt), x.to(dt)
            row[f"dense_{str(dt)[6:]}_ms"] = _median_ms(lambda: xd @ w.T, 3)
        xa = x.to(act)
        row["backend_ms"] = _median_ms(lambda: head(xa), 3)
        short = "fp16 weights × fp32 (AVX2)" if head._f16_matmul is not None else "float16"
        row["backend_path"] = short if M < HEAD_DENSE_ROWS else f"float16 → {str(act)[6:]} buffer"
        rows.append(row)
        print(row)
    result = {"cpu": cpu_info(), "activation_dtype": str(act)[6:], "dequant_min_rows": DEQUANT_MIN_ROWS,
              "avx2_kernel_max_rows": ROWS64_MAX_ROWS - 1,
              "setup": "2 threads, median of 5 (head: 3); int4 g64 symmetric", "rows": rows}
    _write(out, "cpu_kernel", result)
    return result


def _side_by_side_rates(runs: dict, n_new: int, rounds: int = 3) -> dict[str, float]:
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


def _generate_run(model, ids: torch.Tensor, n_new: int, **kw):
    def run(warm: bool = False):
        n = 4 if warm else n_new
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kw)

    return run


def _eval_seconds_per_window(models: dict, windows: torch.Tensor) -> dict[str, float]:
    """Prompt processing: seconds per 2048-token perplexity window of each model, side by side
    (each window runs on every model in turn; the first window warms up)."""
    from gptq.eval import perplexity

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
    """Batch-1 decoding and long-prompt (perplexity window) speed: dense fp32, dense bf16, and our
    4-bit checkpoint loaded with the defaults (cpu backend, the activation dtype this CPU is fast in)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gptq.assets import smollm2
    from gptq.eval import eval_windows
    from gptq.generate import resident_bytes
    from gptq.runtime.cpu import cpu_info
    from gptq.runtime.load import load
    from gptq.runtime.qlinear import QuantLinear

    torch.set_num_threads(2)
    model_dir = smollm2(MODEL)
    ckpt = out / "smollm2-gptq-4bit-g64"
    if not (ckpt / "config.json").is_file():
        quality(out)
    tok = AutoTokenizer.from_pretrained(model_dir)
    windows = eval_windows(tok, str(_wiki("wiki.test.raw")), 2048, eval_windows_n)
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
    rates = _side_by_side_rates({name: _generate_run(m, ids, 64, pad_token_id=tok.eos_token_id)
                                 for name, m in models.items()}, 64)
    evals = _eval_seconds_per_window(models, windows)
    for name, rate in rates.items():
        rows[name]["tokens_per_s"] = rate
        rows[name]["eval_s_per_2048_window"] = evals[name]
        print(name, rows[name])
    result = {"setup": "greedy, 64 new tokens, batch 1, 2 threads, median of 3 interleaved rounds; eval: "
                       "perplexity windows of 2048 tokens, each on every model in turn, first one as warm-up",
              "cpu": cpu_info(), "rows": rows,
              "decode_speedup_vs_bf16": round(rows[qname]["tokens_per_s"] / rows["bf16"]["tokens_per_s"], 2),
              "decode_speedup_vs_fp32": round(rows[qname]["tokens_per_s"] / rows["fp32"]["tokens_per_s"], 2),
              "eval_time_vs_fp32": round(rows[qname]["eval_s_per_2048_window"] / rows["fp32"]["eval_s_per_2048_window"], 3)}
    print(json.dumps(result, indent=2))
    _write(out, "decode", result)
    return result


SYNTH_DECODE = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                    num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)  # TinyLlama-1.1B's shape


def random_packed(model: torch.nn.Module, bits: int = 4, group: int = 128, seed: int = 0) -> torch.nn.Module:
    """Replace every decoder linear of ``model`` by a QuantLinear holding random codes (scales
    ~0.01, zero 8): a packed model of the right shape for speed figures, no solve needed."""
    from gptq.core.pack import pack_qweight, pack_qzeros
    from gptq.runtime.qlinear import QuantLinear

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
    """Batch-1 decoding of a TinyLlama-1.1B-shaped model (random weights: speed only): dense fp32,
    dense bf16, and 4-bit g128 packed with random codes, loaded as ``load`` prepares a checkpoint."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from gptq.generate import resident_bytes
    from gptq.runtime.cpu import cpu_info
    from gptq.runtime.load import prepare_model, resolve_dtype

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
    kernel = next(m._state.get("kernel", "torch int4") for m in q.modules() if hasattr(m, "_state"))
    rows[qname] = {"weights_gb": round(resident_bytes(q) / 1e9, 3),
                   "activation_dtype": str(act).removeprefix("torch."), "kernel": kernel}
    models[qname] = q
    ids = torch.randint(0, cfg.vocab_size, (1, 8), generator=torch.Generator().manual_seed(1))
    rates = _side_by_side_rates({name: _generate_run(m, ids, n_new, pad_token_id=0, eos_token_id=None)
                                 for name, m in models.items()}, n_new)
    for name, rate in rates.items():
        rows[name]["tokens_per_s"] = rate
        print(name, rows[name], flush=True)
    result = {"setup": f"TinyLlama-1.1B shape, random weights; greedy, {n_new} new tokens after 8, batch 1, "
                       "2 threads, median of 3 interleaved rounds", "cpu": cpu_info(), "rows": rows,
              "decode_speedup_vs_bf16": round(rows[qname]["tokens_per_s"] / rows["bf16"]["tokens_per_s"], 2),
              "decode_speedup_vs_fp32": round(rows[qname]["tokens_per_s"] / rows["fp32"]["tokens_per_s"], 2)}
    print(json.dumps(result, indent=2))
    _write(out, "decode_synthetic", result)
    return result


LLAMA_SHAPES = {  # (K, N) of the linears in one block
    "7B qkv/o": (4096, 4096), "7B up/gate": (4096, 11008), "7B down": (11008, 4096),
    "70B q/o": (8192, 8192), "70B up/gate": (8192, 28672), "70B down": (28672, 8192),
}


def kernel(out: Path) -> dict | None:
    if not torch.cuda.is_available():
        print("kernel benchmark: no CUDA device here, nothing to time (the Triton kernel is tested on CPU "
              "under TRITON_INTERPRET=1; run this on a GPU machine for figures)")
        return None
    from gptq.core.pack import pack_qweight, pack_qzeros
    from gptq.runtime.kernels.triton_dequant import dequant_matmul

    dev = torch.device("cuda")
    rows = []
    for label, (K, N) in LLAMA_SHAPES.items():
        codes = torch.randint(0, 16, (N, K), dtype=torch.int32)
        qw = pack_qweight(codes, 4).to(dev)
        qz = pack_qzeros(torch.full((K // 128, N), 8, dtype=torch.int32), 4).to(dev)
        sc = (torch.rand(K // 128, N) * 0.01).half().to(dev)
        W = torch.randn(K, N, dtype=torch.float16, device=dev)
        for M in (1, 16, 64, 256):
            x = torch.randn(M, K, dtype=torch.float16, device=dev)
            t_q = _cuda_time(lambda: dequant_matmul(x, qw, qz, sc, 128, 4))
            t_f = _cuda_time(lambda: x @ W)
            g_q = _cuda_graph_time(lambda: dequant_matmul(x, qw, qz, sc, 128, 4))
            g_f = _cuda_graph_time(lambda: x @ W)
            gbytes = (qw.numel() * 4 + sc.numel() * 2 + qz.numel() * 4 + x.numel() * 2 + M * N * 2) / 1e9
            rows.append({"shape": label, "K": K, "N": N, "batch": M, "triton_us": round(t_q * 1e6, 1),
                         "fp16_us": round(t_f * 1e6, 1), "speedup": round(t_f / t_q, 2),
                         "graph_triton_us": round(g_q * 1e6, 1), "graph_fp16_us": round(g_f * 1e6, 1),
                         "graph_speedup": round(g_f / g_q, 2), "triton_GBps": round(gbytes / g_q, 1)})
            print(rows[-1])
    result = {"device": torch.cuda.get_device_name(), "rows": rows}
    _write(out, "kernel", result)
    return result


def _cuda_time(fn, iters: int = 50) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def _cuda_graph_time(fn, iters: int = 50) -> float:
    """GPU time per call with the launches recorded once in a CUDA graph (as decoding engines run
    them), so the host's launch overhead is not what is measured."""
    for _ in range(5):  # autotuning and allocation happen here, outside the graph
        fn()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def notebook(quick: bool = False):
    """Execute notebooks/walkthrough.ipynb in place (GPTQ_NOTEBOOK_QUICK=1 for the test's quick mode)."""
    import nbformat
    from nbclient import NotebookClient

    path = Path(__file__).resolve().parents[1] / "notebooks" / "walkthrough.ipynb"
    nb = nbformat.read(path, as_version=4)
    env_quick = os.environ.get("GPTQ_NOTEBOOK_QUICK")
    os.environ["GPTQ_NOTEBOOK_QUICK"] = "1" if quick else "0"
    try:
        NotebookClient(nb, timeout=3600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    finally:
        if env_quick is None:
            os.environ.pop("GPTQ_NOTEBOOK_QUICK", None)
        else:
            os.environ["GPTQ_NOTEBOOK_QUICK"] = env_quick
    if not quick:
        nbformat.write(nb, path)
    return nb


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gptq.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["quality", "decode", "decode-synthetic", "kernel", "cpu-kernel", "ablation", "act-order", "fp-target", "codebooks",
                                    "scale", "spill", "moe", "distributed", "notebook", "all"])
    p.add_argument("--13b", dest="with_13b", action="store_true",
                   help="scale: also the 13B-shaped model (about 26 GB on disk, hours on 2 cores)")
    p.add_argument("--device", default="cpu", help="moe: where the solves run (cpu, cuda)")
    p.add_argument("--ranks", default="1,2", help="distributed: rank counts to compare (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="distributed: threads per process (default: %(default)s)")
    p.add_argument("--windows", default=f"{DIST_WINDOWS[0]},{DIST_WINDOWS[1]}",
                   help="distributed: calibration windows,tokens (default: %(default)s)")
    p.add_argument("--out", default="bench-results", help="folder for JSON results and the checkpoint")
    a = p.parse_args(argv)
    out = Path(a.out)
    if a.what in ("quality", "all"):
        quality(out)
    if a.what in ("decode", "all"):
        decode(out)
    if a.what in ("decode-synthetic", "all"):
        decode_synthetic(out)
    if a.what in ("kernel", "all"):
        kernel(out)
    if a.what in ("cpu-kernel", "all"):
        cpu_kernel(out)
    if a.what == "scale":
        scale(out, a.with_13b)
    if a.what == "spill":
        spill(out)
    if a.what == "codebooks":
        codebooks(out)
    if a.what == "moe":
        moe(out, a.device)
    if a.what == "distributed":
        distributed(out, tuple(int(r) for r in a.ranks.split(",")), a.threads,
                    tuple(int(v) for v in a.windows.split(",")))
    if a.what == "ablation":
        ablation(out)
    if a.what == "act-order":
        ablation(out, ACT_ORDER_ROWS, "act_order")
    if a.what == "fp-target":
        ablation(out, FP_TARGET_ROWS, "fp_target")
    if a.what == "notebook":
        notebook()
    return 0


if __name__ == "__main__":
    sys.exit(main())

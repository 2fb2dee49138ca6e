"""python -m gptq.quantize MODEL [--dataset c4] [--bits 4] [--group-size 128] [--out DIR] ...

Quantize a Hugging Face causal LM with GPTQ and write a packed checkpoint that transformers,
vLLM and TGI load. Streams the model block by block from its safetensors shards, keeps
resumable progress (--resume), and spills calibration activations to disk above --max-memory.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from calib import load_documents, sample_windows
from gptq.cli import plain_warnings
from gptq.core.config import ACT_ORDERS, EXPERT_TOKENS, GROUP_RANKS, ROTATIONS, SENSITIVITIES, CalibConfig, ConfigError, QuantConfig
from gptq.formats.checkpoint import save_checkpoint
from gptq.formats.registry import GGUF_TYPES, NAMES, get
from gptq.io.modules import resolve_device
from gptq.io.safetensors_io import TensorSource, parse_size, prepare_output, source_dtype_name
from gptq.models.architectures import for_config
from gptq.models.moe import unfuse
from gptq.models.rotation import auto_rotation, rotator
from gptq.pipeline import mix
from gptq.pipeline.distributed import SINGLE, init, launched
from gptq.pipeline.loop import LayerReport
from gptq.pipeline.run import quantize_model
from gptq.pipeline.streaming import ResumeError, quantize_streaming, skeleton
from gptq.runtime.cpu import cpu_info, fast_dtype

EPILOG = """defaults: 4-bit, group 128, symmetric (asymmetric at 2 and 3 bits), group-aware act-order, MSE
clipping on, true-sequential on, damp 0.01, 128 windows x 2048 tokens of C4. The act-order mode,
MSE clipping and the symmetry were chosen by measurement (docs/results.md); they add no inference
cost, and the default checkpoint keeps g_idx = k // group (desc_act false), which vLLM, TGI and
GPTQModel all serve (an asymmetric 2- or 3-bit file: GPTQModel and transformers need --format
gptq_v2, vLLM the default v1).

examples:
  python -m gptq.quantize ./Llama-3-8B --dataset c4 --bits 4
  python -m gptq.quantize ./model --dataset my_text.jsonl --nsamples 64 --seqlen 1024 --out ./model-gptq

exit status: 0 done; 2 bad input or settings (one "error: ..." line); 130 Ctrl-C, 143 SIGTERM (e.g. from
`timeout` or a job scheduler): progress is kept in OUT.partial, rerun the same command with --resume.
"""


def build_parser() -> argparse.ArgumentParser:  # one declaration per option: clearer whole than split
    p = argparse.ArgumentParser(prog="python -m gptq.quantize", description=__doc__.split("\n\n")[1].strip(),
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = QuantConfig()
    c = CalibConfig()
    p.add_argument("model", help="local Hugging Face model directory (config.json + safetensors)")
    p.add_argument("--out", help="output directory (default: MODEL-gptq-<bits>bit-g<group>)")
    p.add_argument("--overwrite", action="store_true", help="replace --out (and any interrupted run's state)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run of the same command from its last completed block")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                   help="load one block's weights at a time from the safetensors and write each finished block "
                        "at once (resumable); --no-stream holds the whole model in memory (default: %(default)s)")
    g = p.add_argument_group("calibration data")
    g.add_argument("--dataset", default=c.dataset,
                   help="c4, wikitext2, ptb (through `datasets`), or a local .txt/.jsonl/.json/.parquet file or "
                        "save_to_disk directory (default: %(default)s)")
    g.add_argument("--nsamples", type=int, default=c.nsamples, help="calibration windows (default: %(default)s)")
    g.add_argument("--seqlen", type=int, default=c.seqlen,
                   help="tokens per window, capped at the model's context (default: %(default)s)")
    g.add_argument("--seed", type=int, default=c.seed, help="window sampling seed (default: %(default)s)")
    q = p.add_argument_group("quantization")
    q.add_argument("--bits", type=int, default=d.bits, help="2, 3, 4 or 8 (default: %(default)s)")
    q.add_argument("--group-size", type=int, default=None,
                   help="input columns per (scale, zero); -1 = one per output row (default: 128; 64 with --format "
                        "bnb-*)")
    q.add_argument("--sym", action=argparse.BooleanOptionalAction, default=d.sym,
                   help="symmetric grid; --no-sym for asymmetric (default: symmetric at 4 and 8 bits, the grids vLLM's "
                        "Marlin kernels take; asymmetric at 2 and 3 bits, which Marlin does not serve either way and "
                        "where a free zero point lowers the error a lot; in a size budget each candidate by its bits)")
    q.add_argument("--act-order", choices=ACT_ORDERS, default=d.act_order,
                   help="order the columns are solved in: none (input order), static (by Hessian diagonal, grids "
                        "fixed first), group-aware (groups by importance, columns by diagonal inside each; grids "
                        "fitted as each group comes up), dynamic (by diagonal across groups: permuted g_idx, "
                        "desc_act true, which vLLM >= 0.32 refuses). All but dynamic keep g_idx = k // group "
                        "(default: %(default)s)")
    q.add_argument("--group-rank", choices=GROUP_RANKS, default=d.group_rank,
                   help="group-aware act-order: rank the groups by their largest Hessian diagonal entry (max) or by "
                        "the sum over their columns (sum) (default: %(default)s)")
    q.add_argument("--no-act-order", dest="act_order", action="store_const", const="none",
                   help="same as --act-order none")
    q.add_argument("--static-groups", dest="act_order", action="store_const", const="static",
                   help="same as --act-order static")
    q.add_argument("--sort-channels", action=argparse.BooleanOptionalAction, default=d.sort_channels,
                   help="with group-aware/dynamic act-order, first reorder the MLP's intermediate channels by the "
                        "down projection's Hessian diagonal (exact), giving it act-order with g_idx = k // group "
                        "(default: %(default)s)")
    q.add_argument("--true-sequential", action=argparse.BooleanOptionalAction, default=d.true_sequential,
                   help="quantize q/k/v, o, up/gate, down in turn on already-quantized inputs (default: %(default)s)")
    q.add_argument("--mse", action=argparse.BooleanOptionalAction, default=d.mse,
                   help="search each grid's clipping range for the least weighted error (default: %(default)s)")
    q.add_argument("--damp", type=float, default=d.damp,
                   help="Hessian damping as a fraction of mean(diag H) (default: %(default)s)")
    q.add_argument("--fp-target", type=float, default=d.fp_target, metavar="ALPHA",
                   help="full-precision targets (GPTAQ's asymmetric calibration): fit each linear to what the full-precision model computes "
                        "(its output on full-precision inputs) instead of to its own output on the already "
                        "quantized inputs, the weight target shifted by ALPHA times the exact correction; costs a "
                        "second, full-precision forward stream. 0 = plain GPTQ (default: %(default)s)")
    q.add_argument("--rotate", choices=("auto",) + ROTATIONS, default="auto",
                   help="rotate the model before solving, in its weights only (the checkpoint keeps its architecture "
                        "and loads everywhere): hadamard = the residual stream by a randomised Hadamard matrix (each "
                        "norm's scale folded into the linears that read it; a head tied to the embeddings is stored "
                        "untied) and each attention head's values by another; random = the same with random "
                        "orthogonal matrices; heads = the heads' rotation only (keeps a tie); learned = hadamard, the "
                        "residual matrix then learned to lower the error the solver would leave in the linears "
                        "reading the stream (one more pass over the blocks and --rotate-steps steps: minutes on a "
                        "small model; lower error at 3 bits, docs/results.md); none; auto = hadamard where that "
                        "adds no bytes (a Llama-like or MoE family whose head is not tied), else none "
                        "(default: %(default)s)")
    q.add_argument("--rotate-seed", type=int, default=d.rotate_seed, metavar="N",
                   help="seed of the rotation's random signs (default: %(default)s)")
    q.add_argument("--rotate-steps", type=int, default=d.rotate_steps, metavar="N",
                   help="--rotate learned: the optimizer's steps, 8 groups of linears each (default: %(default)s)")
    q.add_argument("--max-size", default=None, metavar="SIZE",
                   help="mixed precision: the weight files may take at most SIZE in all (e.g. 3.5GB, 97MB, or bytes; "
                        "the .safetensors shards, embeddings and head included): each group of linears sharing an "
                        "input gets one of --candidates, chosen by the error it would cause (a first pass over the "
                        "blocks) under that budget; the plan is printed and kept in quantize_report.json")
    q.add_argument("--bits-per-weight", type=float, default=None, metavar="B",
                   help="mixed precision with the budget as average bits per quantized weight, scales, zeros and "
                        "g_idx included as stored (e.g. 3.5)")
    q.add_argument("--candidates", default=d.candidates, metavar="LIST",
                   help="what a budget chooses between: gptq: BITSgGROUP items such as 3g64,4g64,8g128; auto = "
                        "4g128,4g64,4g32,8g128, what vLLM's Marlin kernels serve (2- and 3-bit layers run on slower "
                        "kernels); gguf: GGML types such as q4_0,q5_0,q4_k,q6_k; auto = every type this project writes "
                        "(default: %(default)s)")
    q.add_argument("--min-bits", type=_min_bits, default="auto", metavar="auto|N",
                   help="a budget stores no linear on a candidate of fewer than N bits; auto = the widest width at "
                        "which a uniform file (each group on its cheapest candidate of that width) fits the budget, "
                        "so a 5-bit budget keeps every linear at 4 bits or more (lower KL divergence than letting "
                        "the estimates keep some at 3: docs/results.md); 0 = no floor (default: %(default)s)")
    q.add_argument("--sensitivity", choices=SENSITIVITIES, default=d.sensitivity,
                   help="how a budget estimates each candidate's error: the output error on the full-precision "
                        "inputs after round-to-nearest (hessian) or the GPTQ solve (gptq); /residual = divided by "
                        "the energy of the residual stream entering the block; /block = scaled by what the unit's "
                        "coarsest candidate does to the block's output, over that output's energy (one more pass of "
                        "the block per unit). The default allocated best across the models measured "
                        "(docs/results.md); hessian makes the first pass cheaper (default: %(default)s)")
    q.add_argument("--block-size", type=int, default=d.block_size,
                   help="columns per lazy-batch block; speed only (default: %(default)s)")
    q.add_argument("--format", default=d.format, choices=[n for n in NAMES if "+" not in n] + ["gguf"], metavar="FORMAT",
                   help="gptq / gptq_v2: a GPTQ checkpoint (checkpoint_format v1 or v2); bnb-nf4 / bnb-fp4: GPTQ solved "
                        "on bitsandbytes' NF4/FP4 grid (absmax per --group-size weights, 64 if not given), written "
                        "as a bitsandbytes 4-bit checkpoint that transformers loads; compressed-tensors: the "
                        "pack-quantized layout llm-compressor writes and vLLM serves natively (4 or 8 bits, scales in "
                        "the model's dtype); gguf:TYPE (TYPE one of "
                        f"{', '.join(GGUF_TYPES)}): one .gguf file for llama.cpp / Ollama, every decoder linear "
                        "solved on its GGML block type, types per tensor as llama-quantize picks them; gguf with "
                        "--max-size / --bits-per-weight: the types chosen per tensor under that budget "
                        "(default: %(default)s)")
    q.add_argument("--expert-tokens", choices=EXPERT_TOKENS, default=d.expert_tokens,
                   help="mixture-of-experts models: which calibration tokens build each routed expert's Hessian. "
                        "all: every token through every expert (no expert starved; the block's output keeps the "
                        "real routing); routed: only the tokens the router sends it (default: %(default)s)")
    q.add_argument("--expert-min-tokens", type=int, default=d.expert_min_tokens, metavar="N",
                   help="an expert whose Hessian would rest on fewer than N tokens is rounded to nearest on "
                        "MSE-fitted grids (identity Hessian) and named in the report (default: %(default)s)")
    q.add_argument("--double-quant", action="store_true",
                   help="bnb-nf4 / bnb-fp4 only: store each absmax as an 8-bit code (blocks of 256 with a float32 "
                        "scale, one offset per matrix; bitsandbytes' double quantization, ~0.37 fewer bits per "
                        "weight at group 64); the solver rounds against the absmax as stored")
    r = p.add_argument_group("runtime")
    r.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    r.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype the blocks run in while calibrating (Hessians and the solve are always float32); "
                        "auto = the model's own dtype on GPU; on CPU bfloat16 only where the CPU has native bf16 "
                        "instructions (AVX-512 BF16, AMX, Arm BF16; GPTQ_CPU_DTYPE overrides), else float32 "
                        "(default: %(default)s)")
    r.add_argument("--batch-size", type=int, default=8, help="calibration windows per forward pass (default: %(default)s)")
    r.add_argument("--max-shard-size", default="5GB",
                   help="largest safetensors shard of the finished checkpoint (one model.safetensors when it fits, "
                        "else shards and an index, as save_pretrained writes them; streaming regroups its per-block "
                        "files at the end) (default: %(default)s)")
    r.add_argument("--max-memory", default="auto", metavar="SIZE",
                   help="memory budget for the calibration activations (e.g. 4GB, 500MB; 0 = always spill): "
                        "above it they are spilled to disk batch by batch, next to the output (or in TMPDIR with "
                        "--no-stream); the result is the same (so are --rotate learned's terms: readers and "
                        "inverse Hessians, one file each). auto = half the memory available at the start, on the "
                        "GPU with --device cuda (default: %(default)s)")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(2)


class Terminated(KeyboardInterrupt):
    """SIGTERM (``timeout``, a job scheduler): handled as Ctrl-C, exit status 143 (128 + 15)."""


_ARRIVED: list[type[KeyboardInterrupt]] = []  # the interruptions our handlers raised, in order


def _raise_terminated(signum, frame):
    _ARRIVED.append(Terminated)
    raise Terminated


def _raise_interrupted(signum, frame):
    _ARRIVED.append(KeyboardInterrupt)
    raise KeyboardInterrupt


def interruption(e: BaseException) -> type[KeyboardInterrupt] | None:
    """The interruption behind ``e``, if any: ``e`` itself, one in its chain, or the last signal our
    handlers raised. A handler's exception is raised wherever Python was, and a library running
    Python code at that moment may catch it and raise its own error instead: that is still the
    user's stop, not bad input."""
    seen = e
    while seen is not None:
        if isinstance(seen, KeyboardInterrupt):
            return type(seen)
        seen = seen.__cause__ or seen.__context__
    return _ARRIVED[-1] if _ARRIVED else None


def catch_sigterm():
    """Turn SIGTERM into ``Terminated`` in this process (its main thread, where the handler is still
    the default), and note Ctrl-C's KeyboardInterrupt as it is raised (where Python's own handler is
    installed). Under torchrun this is how a rank learns that another one failed when the launcher
    notices first: the launcher sends SIGTERM to the survivors, which then say how to resume.
    Returns the handlers to restore, or None when nothing was installed."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL):
        return None
    _ARRIVED.clear()
    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, _raise_terminated)}
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, _raise_interrupted)
    return previous


def _ignore_sigterm(installed) -> None:
    """While the one message is printed, a second SIGTERM (torchrun's launcher stopping this rank
    after another failed) must not cut it short with a traceback."""
    if installed is not None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _interrupted(kind: type[KeyboardInterrupt], args, out) -> int:
    """The one message for a stopped run (what was kept, how to go on) and its exit status."""
    state = Path(out or ".").resolve()
    if not args.stream:
        print("\ninterrupted. Nothing was written (use the default --stream for resumable runs).", file=sys.stderr)
    elif out is not None and state.with_name(state.name + ".partial").is_dir():
        why = ("stopped by torchrun (SIGTERM): another rank has probably failed, see its error above"
               if launched() and issubclass(kind, Terminated) else "interrupted")
        print(f"\n{why}. Progress is kept in {state.name}.partial: rerun the same command with --resume "
              "to continue from the last completed block.", file=sys.stderr)
    else:
        print("\ninterrupted before any work was saved: rerun the same command.", file=sys.stderr)
    return 143 if issubclass(kind, Terminated) else 130


def check_model_dir(path: str):
    """A local model directory → its config. Clear errors for the usual mistakes."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(
            f"model path '{path}' does not exist. Pass a local Hugging Face model directory (with config.json "
            "and *.safetensors); download it first where a hub is reachable, e.g. `huggingface-cli download`."
        )
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"'{path}' has no config.json; it is not a Hugging Face model directory")
    config = AutoConfig.from_pretrained(p)
    for_config(config)  # unsupported families fail here, before any weight is read
    if (p / "model.safetensors.index.json").is_file() or any(p.glob("*.safetensors")):
        TensorSource(p)  # every file's header: a missing, truncated or corrupt shard is named here
    if getattr(config, "quantization_config", None):
        qc = config.quantization_config
        method = qc.get("quant_method", "?") if isinstance(qc, dict) else getattr(qc, "quant_method", "?")
        raise ValueError(f"'{path}' is already quantized ({method}); start from the unquantized model")
    return config


def calib_dtype(config, dtype: str, device: str):
    """auto: the model's own dtype, except on a CPU, where half precision runs in float32 unless the
    CPU has native bf16 instructions (``gptq.runtime.cpu.dtype_choice``: its flags, never a timing);
    float16 → float32 there too."""
    on_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    if dtype == "auto":
        own = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
        own = getattr(torch, own) if isinstance(own, str) else own
        if on_cpu and own in (torch.float16, torch.bfloat16):
            return torch.bfloat16 if (own == torch.bfloat16 and fast_dtype() == torch.bfloat16) else torch.float32
        return own
    return getattr(torch, dtype)


def compute_record(dtype, device: str) -> dict:
    """What the forwards ran in, and on which CPU: recorded in quantize_report.json."""
    dev = "cuda" if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()) else "cpu"
    rec = {"device": dev, "dtype": str(dtype).removeprefix("torch."), "cpu": cpu_info()}
    if dev == "cuda":
        rec["gpu"] = torch.cuda.get_device_name()
    return rec


def load_model(path: str, config, dtype: str, device: str):
    """The whole model in CPU memory (the --no-stream path) and its tokenizer (``config``: the
    directory's, from ``check_model_dir``)."""
    model = AutoModelForCausalLM.from_pretrained(Path(path), dtype=calib_dtype(config, dtype, device))
    return unfuse(model, for_config(config)), AutoTokenizer.from_pretrained(Path(path))


def calibration_windows(tokenizer, model_config, calib: CalibConfig):
    ctx = getattr(model_config, "max_position_embeddings", None) or getattr(model_config, "n_positions", None)
    seqlen = min(calib.seqlen, ctx) if ctx else calib.seqlen
    if seqlen < calib.seqlen:
        print(f"note: --seqlen {calib.seqlen} capped at the model's context of {seqlen} tokens", file=sys.stderr)
    docs, mode = load_documents(calib.dataset, "calib")
    return sample_windows(docs, tokenizer, calib.nsamples, seqlen, calib.seed, mode)


def finished_stage(stage: Path, summary: dict) -> bool:
    """Whether a staged format's solve finished in ``stage`` (it is renamed into place only when
    complete), made by this same command; a stage made by another one is refused."""
    report_file = stage / "quantize_report.json"
    if not report_file.is_file():
        return False
    made = json.loads(report_file.read_text())
    same = all(made.get(k) == summary.get(k) for k in ("model", "quant_config", "rotation"))
    same &= {k: v for k, v in made.get("calibration", {}).items() if k != "windows"} == summary["calibration"]
    if not same:
        raise ResumeError(f"{stage} holds a finished solve made by a different command (model, settings or "
                          "calibration); rerun exactly that command with --resume, or pass --overwrite to start over")
    return True


def quant_config(args) -> QuantConfig:
    """The run's settings from the command line (bitsandbytes formats: group 64 unless given)."""
    bnb = args.format.startswith("bnb-")
    if args.double_quant and not bnb:
        raise ConfigError("--double-quant applies to --format bnb-nf4 / bnb-fp4 (the other formats store their scales "
                          "as they are)")
    return QuantConfig(bits=args.bits, group_size=(args.group_size if args.group_size is not None
                                               else 64 if bnb else QuantConfig().group_size),
                       sym=args.sym, act_order=args.act_order, true_sequential=args.true_sequential, damp=args.damp,
                       sort_channels=args.sort_channels, group_rank=args.group_rank, block_size=args.block_size,
                       mse=args.mse,
                       format=args.format + ("+dq" if args.double_quant else ""), expert_tokens=args.expert_tokens,
                       expert_min_tokens=args.expert_min_tokens, fp_target=args.fp_target,
                       rotate="none" if args.rotate == "auto" else args.rotate, rotate_seed=args.rotate_seed,
                       rotate_steps=args.rotate_steps,
                       max_size=_size_arg(args.max_size), bits_per_weight=args.bits_per_weight or 0.0,
                       candidates=args.candidates, sensitivity=args.sensitivity, min_bits=args.min_bits)


def _min_bits(text: str) -> int | None:
    """--min-bits: "auto" (None) or a bit width."""
    if text == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give auto or a bit width such as 4 (0 = no floor)") from None


def _size_arg(text: str | None) -> int:
    if text is None:
        return 0
    try:
        return parse_size(text)
    except ValueError as e:
        raise ConfigError(f"--max-size: {e}") from None


def _solve(args, config, qcfg: QuantConfig, ccfg: CalibConfig, fmt, out: str, world, summary: dict,
           max_memory: int | None, shard_bytes: int, t0: float):
    """The long work: calibration windows, the solve (streamed, or in memory), the checkpoint in ``out``;
    (checkpoint, report, seconds), or None on a rank other than 0. ``summary`` gains the run's record."""
    if fmt.staged and args.resume and finished_stage(Path(out), summary):
        # the solve had finished; what was left is writing the file from the staged checkpoint
        print(f"note: resuming from the finished solve in {out}", file=sys.stderr)
        final, seconds = Path(out), time.perf_counter() - t0
        layers = json.loads((final / "quantize_report.json").read_text())["layers"]
        report = [LayerReport(**(r | {"shape": tuple(r["shape"])})) for r in layers]
    elif args.stream:
        summary["compute"] = compute_record(calib_dtype(config, args.dtype, args.device), args.device)
        windows = calibration_windows(AutoTokenizer.from_pretrained(args.model), config, ccfg)
        summary["calibration"]["windows"] = list(windows.shape)
        final, layers, _ = quantize_streaming(
            args.model, out, qcfg, windows, calib_dtype(config, args.dtype, args.device), device=args.device,
            batch_size=args.batch_size, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet,
            extra_report=summary, max_memory=max_memory, max_shard_bytes=shard_bytes, world=world, fmt=fmt)
        if not world.main:  # rank 0 writes and reports
            return None
        report = [LayerReport(**(r | {"shape": tuple(r["shape"])})) for r in layers]
        seconds = time.perf_counter() - t0
    else:
        if args.resume:
            print("note: nothing to resume with --no-stream (only streaming runs keep progress); starting from "
                  "the beginning", file=sys.stderr)
        model, tokenizer = load_model(args.model, config, args.dtype, args.device)
        summary["compute"] = compute_record(next(model.parameters()).dtype, args.device)
        windows = calibration_windows(tokenizer, model.config, ccfg)
        packed, report = quantize_model(model, windows, qcfg, device=args.device, batch_size=args.batch_size,
                                        progress=not args.quiet, max_memory=max_memory, fmt=fmt,
                                        source_dir=args.model)
        if fmt.mix is not None:
            summary["mix"] = fmt.mix
        if getattr(model.config, "gptq_rotation", None):  # as done (a learned rotation's objective included)
            summary["rotation"] = model.config.gptq_rotation
        seconds = time.perf_counter() - t0
        summary |= {"seconds": round(seconds, 2), "layers": [asdict(r) for r in report]}
        summary["calibration"]["windows"] = list(windows.shape)
        own = source_dtype_name(args.model)
        final = save_checkpoint(out, model, packed, qcfg, source_dir=args.model, overwrite=args.overwrite,
                                max_shard_bytes=shard_bytes, float_dtype=getattr(torch, own) if own else None,
                                extra_files={"quantize_report.json": json.dumps(summary, indent=2) + "\n"})
    return final, report, seconds


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = None
    plain_warnings()
    previous_sigterm = catch_sigterm()
    try:
        qcfg = quant_config(args)
        fmt = get(qcfg)
        ccfg = CalibConfig(dataset=args.dataset, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed)
        if args.batch_size < 1:
            raise ConfigError(f"--batch-size {args.batch_size} must be at least 1")
        shard_bytes = parse_size(args.max_shard_size)
        try:
            max_memory = None if args.max_memory.strip().lower() == "auto" else parse_size(args.max_memory)
        except ValueError as e:
            raise ConfigError(f"--max-memory: {e}, or auto") from None
        config = check_model_dir(args.model)
        if args.rotate_steps != QuantConfig().rotate_steps and args.rotate != "learned":
            print(f"note: --rotate-steps is for --rotate learned; with --rotate {args.rotate} it changes nothing",
                  file=sys.stderr)
        if args.rotate == "auto":  # per model: where it costs no bytes
            chosen, note = auto_rotation(config)
            qcfg = replace(qcfg, rotate=chosen)
            if note:
                print(f"note: {note}", file=sys.stderr)
        skel = skeleton(args.model, torch.float32)
        fmt = fmt.bind(skel, Path(args.model))  # refuses before any long work
        rot = rotator(config, qcfg)
        if rot is not None:
            rot.check_model(skel)
        if qcfg.mixed:  # an impossible budget is refused now, with the feasible range
            note = mix.setup(skel, fmt, qcfg, args.model, None if rot is None else rot.record).note()
            if note:
                print(f"note: {note}", file=sys.stderr)
        for w in fmt.warnings:
            print(f"warning: {w}", file=sys.stderr)
        final_out = args.out or fmt.default_out(args.model)
        prepare_output(final_out, args.overwrite)  # refuse early, before hours of work
        # a staged format (GGUF) solves into a checkpoint beside OUT, then writes OUT from it
        out = str(Path(final_out).resolve()) + ".stage" if fmt.staged else final_out
        if fmt.staged and not args.resume:
            prepare_output(out, args.overwrite)
        world = SINGLE
        if launched():  # one of several processes started by torchrun: see gptq/pipeline/distributed.py
            if not args.stream:
                raise ConfigError("runs under torchrun use the streaming path: drop --no-stream")
            world = init(resolve_device(args.device))
        resolve_device(args.device)
        t0 = time.perf_counter()
        summary = {"model": str(Path(args.model).resolve()), "quant_config": qcfg.as_dict(),
                   "calibration": asdict(ccfg)}
        if rot is not None:
            summary["rotation"] = rot.record.as_dict()
        solved = _solve(args, config, qcfg, ccfg, fmt, out, world, summary, max_memory, shard_bytes, t0)
        if solved is None:
            return 0
        final, report, seconds = solved
        if fmt.staged:
            final = fmt.finish(Path(final), Path(final_out), Path(args.model), args.overwrite)
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (Terminated)
        _ignore_sigterm(previous_sigterm)
        return _interrupted(type(e), args, out)
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError, RuntimeError, OSError, SafetensorError) as e:
        _ignore_sigterm(previous_sigterm)
        if previous_sigterm is not None and (kind := interruption(e)) is not None:
            return _interrupted(kind, args, out)  # a stop that a library reported as its own error
        fail(str(e))
    finally:
        for signum, handler in (previous_sigterm or {}).items():
            signal.signal(signum, handler)
    print_summary(report, seconds, final, fmt)
    return 0


def print_summary(report, seconds: float, out: Path, fmt) -> None:
    worst = sorted(report, key=lambda r: r.loss, reverse=True)[:5]
    print(f"\nquantized {len(report)} linears in {seconds:.1f} s; highest losses:")
    for r in worst:
        print(f"  {r.name:<40} loss {r.loss:10.4g}  {r.seconds * 1000:6.0f} ms")
    starved = [r for r in report if r.rule != "gptq"]
    if starved:
        print(f"{len(starved)} expert linears had too few calibration tokens for their own Hessian (--expert-min-tokens) "
              "and were rounded to nearest on MSE-fitted grids (identity Hessian):")
        for r in starved[:8]:
            print(f"  {r.name:<40} {r.tokens} tokens")
        if len(starved) > 8:
            print(f"  ... {len(starved) - 8} more in the report")
    print(f"per-layer report: {out / 'quantize_report.json'}")
    print(f"checkpoint: {out}")
    print(fmt.summary(out))


if __name__ == "__main__":
    sys.exit(main())

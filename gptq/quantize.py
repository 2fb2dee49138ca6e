"""python -m gptq.quantize MODEL [--dataset c4] [--bits 4] [--group-size 128] [--out DIR] ...

Quantize a Hugging Face causal LM with GPTQ and write a packed checkpoint that transformers,
vLLM and TGI load. Streams the model block by block from its safetensors shards, keeps
resumable progress (--resume), and spills calibration activations to disk above --max-memory.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path

from gptq.core.config import ACT_ORDERS, EXPERT_TOKENS, CalibConfig, ConfigError, QuantConfig

GGUF_TYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k")

EPILOG = """defaults: 4-bit, group 128, symmetric, group-aware act-order, MSE clipping on, true-sequential
on, damp 0.01, 128 windows x 2048 tokens of C4. The act-order mode and MSE clipping were chosen by
measurement (README, "Choosing the defaults"); they add no inference cost, and the default
checkpoint keeps g_idx = k // group (desc_act false), which vLLM, TGI and GPTQModel all serve.

examples:
  python -m gptq.quantize ./Llama-3-8B --dataset c4 --bits 4
  python -m gptq.quantize ./model --dataset my_text.jsonl --nsamples 64 --seqlen 1024 --out ./model-gptq
"""


def build_parser() -> argparse.ArgumentParser:
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
                   help="symmetric grid; --no-sym for asymmetric (default: %(default)s)")
    q.add_argument("--act-order", choices=ACT_ORDERS, default=d.act_order,
                   help="order the columns are solved in: none (input order), static (by Hessian diagonal, grids "
                        "fixed first), group-aware (groups by importance, columns by diagonal inside each; grids "
                        "fitted as each group comes up), dynamic (by diagonal across groups: permuted g_idx, "
                        "desc_act true, which vLLM >= 0.32 refuses). All but dynamic keep g_idx = k // group "
                        "(default: %(default)s)")
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
    q.add_argument("--block-size", type=int, default=d.block_size,
                   help="columns per lazy-batch block; speed only (default: %(default)s)")
    q.add_argument("--format", dest="checkpoint_format", default=d.checkpoint_format,
                   choices=["gptq", "gptq_v2", "bnb-nf4", "bnb-fp4"] + [f"gguf:{t}" for t in GGUF_TYPES],
                   metavar="FORMAT",
                   help="gptq / gptq_v2: a GPTQ checkpoint (checkpoint_format v1 or v2); bnb-nf4 / bnb-fp4: GPTQ solved "
                        "on bitsandbytes' NF4/FP4 grid (absmax per --group-size weights, 64 if not given), written "
                        "as a bitsandbytes 4-bit checkpoint that transformers loads; gguf:TYPE (TYPE one of "
                        f"{', '.join(GGUF_TYPES)}): one .gguf file for llama.cpp / Ollama, every decoder linear "
                        "solved on its GGML block type, types per tensor as llama-quantize picks them "
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
                        "auto = the model's own dtype on GPU; on CPU bfloat16 only where the CPU multiplies it "
                        "natively (measured), else float32 (default: %(default)s)")
    r.add_argument("--batch-size", type=int, default=8, help="calibration windows per forward pass (default: %(default)s)")
    r.add_argument("--max-shard-size", default="5GB",
                   help="largest safetensors shard of the finished checkpoint (one model.safetensors when it fits, "
                        "else shards and an index, as save_pretrained writes them; streaming regroups its per-block "
                        "files at the end) (default: %(default)s)")
    r.add_argument("--max-memory", default="auto", metavar="SIZE",
                   help="memory budget for the calibration activations (e.g. 4GB, 500MB; 0 = always spill): "
                        "above it they are spilled to disk batch by batch, next to the output (or in TMPDIR with "
                        "--no-stream); the result is the same. auto = half the memory available at the start, on the "
                        "GPU with --device cuda (default: %(default)s)")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def fail(msg: str) -> "None":
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def check_model_dir(path: str, fmt: str = "gptq"):
    """A local model directory → its config. Clear errors for the usual mistakes."""
    from transformers import AutoConfig

    from gptq.models.architectures import for_config

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(
            f"model path '{path}' does not exist. Pass a local Hugging Face model directory (with config.json "
            "and *.safetensors); download it first where a hub is reachable, e.g. `huggingface-cli download`."
        )
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"'{path}' has no config.json; it is not a Hugging Face model directory")
    config = AutoConfig.from_pretrained(p)
    arch = for_config(config)  # unsupported families fail here, before any weight is read
    if arch.experts is not None and fmt not in ("gptq", "gptq_v2") and not fmt.startswith("gguf:"):
        raise ConfigError(f"'{path}' is a mixture-of-experts model ({config.model_type}): it is written in the GPTQ "
                          f"format (per-expert qweight/scales, as vLLM and GPTQModel load them) or as GGUF, not {fmt}; "
                          "drop --format or use --format gptq / gptq_v2 / gguf:TYPE")
    if getattr(config, "quantization_config", None):
        qc = config.quantization_config
        method = qc.get("quant_method", "?") if isinstance(qc, dict) else getattr(qc, "quant_method", "?")
        raise ValueError(f"'{path}' is already quantized ({method}); start from the unquantized model")
    return config


def calib_dtype(config, dtype: str, device: str):
    """auto: the model's own dtype, except on a CPU, where half precision runs in float32 unless the
    CPU multiplies bf16 natively (measured once, ``gptq.runtime.cpu.fast_dtype``); float16 → float32 there too."""
    import torch

    on_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    if dtype == "auto":
        own = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
        own = getattr(torch, own) if isinstance(own, str) else own
        if on_cpu and own in (torch.float16, torch.bfloat16):
            from gptq.runtime.cpu import fast_dtype

            return torch.bfloat16 if (own == torch.bfloat16 and fast_dtype() == torch.bfloat16) else torch.float32
        return own
    return getattr(torch, dtype)


def compute_record(dtype, device: str) -> dict:
    """What the forwards ran in, and on which CPU: recorded in quantize_report.json."""
    import torch

    from gptq.runtime.cpu import cpu_info

    dev = "cuda" if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()) else "cpu"
    rec = {"device": dev, "dtype": str(dtype).removeprefix("torch."), "cpu": cpu_info()}
    if dev == "cuda":
        rec["gpu"] = torch.cuda.get_device_name()
    return rec


def load_model(path: str, config, dtype: str, device: str):
    """The whole model in CPU memory (the --no-stream path) and its tokenizer (``config``: the
    directory's, from ``check_model_dir``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gptq.models.architectures import for_config
    from gptq.models.moe import unfuse

    model = AutoModelForCausalLM.from_pretrained(Path(path), dtype=calib_dtype(config, dtype, device))
    return unfuse(model, for_config(config)), AutoTokenizer.from_pretrained(Path(path))


def calibration_windows(tokenizer, model_config, calib: CalibConfig):
    from calib import load_documents, sample_windows

    ctx = getattr(model_config, "max_position_embeddings", None) or getattr(model_config, "n_positions", None)
    seqlen = min(calib.seqlen, ctx) if ctx else calib.seqlen
    if seqlen < calib.seqlen:
        print(f"note: --seqlen {calib.seqlen} capped at the model's context of {seqlen} tokens", file=sys.stderr)
    docs, mode = load_documents(calib.dataset, "calib")
    return sample_windows(docs, tokenizer, calib.nsamples, seqlen, calib.seed, mode)


def warn_group_divisibility(model, config: QuantConfig) -> None:
    from gptq.io.modules import get_module, in_features
    from gptq.models.architectures import for_config

    if config.group_size == -1:
        return
    arch = for_config(model.config)
    block = get_module(model, arch.blocks)[0]
    bad = sorted({in_features(get_module(block, n)) for n in arch.block_linears(block)} - {0})
    bad = [n for n in bad if n % config.group_size]
    if bad and config.grid != "int":
        raise ConfigError(f"--group-size {config.group_size} does not divide the input size(s) {bad}: bitsandbytes "
                          "blocks would straddle rows. Pick a group size (64, 128, ...) that divides every layer's "
                          "input.")
    if bad:
        warnings.warn(
            f"--group-size {config.group_size} does not divide the input size(s) {bad}: the last group of "
            "those layers is shorter. This project's loader and kernels handle it, and so does the format, "
            "but vLLM's Marlin and the ExLlama kernels need in_features % group_size == 0 (they fall back to "
            "slower kernels or refuse). Pick a group size that divides them (e.g. 32 or 64) to keep them.",
            stacklevel=2,
        )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        bnb = args.checkpoint_format.startswith("bnb-")
        gguf = args.checkpoint_format[5:] if args.checkpoint_format.startswith("gguf:") else ""
        group = args.group_size if args.group_size is not None else (64 if bnb else QuantConfig().group_size)
        config = None
        if gguf:
            config = check_model_dir(args.model, args.checkpoint_format)  # before the skeleton is built
            qcfg = gguf_config(args, gguf)
        else:
            qcfg = QuantConfig(bits=args.bits, group_size=group, sym=args.sym, act_order=args.act_order,
                               true_sequential=args.true_sequential, damp=args.damp,
                               sort_channels=args.sort_channels, block_size=args.block_size, mse=args.mse,
                               checkpoint_format="gptq" if bnb else args.checkpoint_format,
                               grid=args.checkpoint_format[4:] if bnb else "int", double_quant=args.double_quant,
                               expert_tokens=args.expert_tokens, expert_min_tokens=args.expert_min_tokens,
                               fp_target=args.fp_target)
        ccfg = CalibConfig(dataset=args.dataset, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed)
        if args.batch_size < 1:
            raise ConfigError(f"--batch-size {args.batch_size} must be at least 1")
        if qcfg.act_order == "dynamic" and qcfg.group_size != -1:
            warnings.warn("--act-order dynamic writes desc_act: true with a permuted g_idx; vLLM >= 0.32 refuses "
                          "such checkpoints (GPTQ group activation ordering). --act-order group-aware, the default, "
                          "keeps g_idx = k // group at nearly the same quality.", stacklevel=1)
        from gptq.io.checkpoint import parse_size, prepare_output

        shard_bytes = parse_size(args.max_shard_size)
        try:
            max_memory = None if args.max_memory.strip().lower() == "auto" else parse_size(args.max_memory)
        except ValueError as e:
            raise ConfigError(f"--max-memory: {e}, or auto") from None
        out = args.out or (f"{args.model.rstrip('/')}-{args.checkpoint_format}-g{qcfg.group_size}" if bnb else
                           f"{args.model.rstrip('/')}-gguf-{gguf}" if gguf else
                           f"{args.model.rstrip('/')}-gptq-{qcfg.bits}bit-g{qcfg.group_size}")
        if config is None:
            config = check_model_dir(args.model, args.checkpoint_format)
        prepare_output(out, args.overwrite)  # refuse early, before hours of work
        gguf_out = None
        if gguf:  # the solved blocks are staged as a checkpoint beside OUT, then written as one .gguf
            gguf_out, out = Path(out), str(Path(out).resolve()) + ".stage"
            if not args.resume:
                prepare_output(out, args.overwrite)
        import torch

        from gptq.io.checkpoint import save_checkpoint
        from gptq.io.modules import resolve_device
        from gptq.pipeline.distributed import SINGLE, init, launched
        from gptq.pipeline.loop import LayerReport, quantize_model

        world = SINGLE
        if launched():  # one of several processes started by torchrun: see gptq/distributed.py
            if not args.stream:
                raise ConfigError("runs under torchrun use the streaming path: drop --no-stream")
            world = init(resolve_device(args.device))
        resolve_device(args.device)
        t0 = time.perf_counter()
        summary = {"model": str(Path(args.model).resolve()), "quant_config": qcfg.as_dict(),
                   "calibration": asdict(ccfg)}
        if args.stream:
            from transformers import AutoTokenizer

            from gptq.pipeline.streaming import quantize_streaming, skeleton

            summary["compute"] = compute_record(calib_dtype(config, args.dtype, args.device), args.device)
            warn_group_divisibility(skeleton(args.model, torch.float32), qcfg)
            windows = calibration_windows(AutoTokenizer.from_pretrained(args.model), config, ccfg)
            summary["calibration"]["windows"] = list(windows.shape)
            final, layers, _ = quantize_streaming(
                args.model, out, qcfg, windows, calib_dtype(config, args.dtype, args.device), device=args.device,
                batch_size=args.batch_size, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet,
                extra_report=summary, max_memory=max_memory, max_shard_bytes=shard_bytes, world=world)
            if not world.main:  # rank 0 writes and reports
                return 0
            report = [LayerReport(**(r | {"shape": tuple(r["shape"])})) for r in layers]
            seconds = time.perf_counter() - t0
        else:
            model, tokenizer = load_model(args.model, config, args.dtype, args.device)
            summary["compute"] = compute_record(next(model.parameters()).dtype, args.device)
            windows = calibration_windows(tokenizer, model.config, ccfg)
            warn_group_divisibility(model, qcfg)
            packed, report = quantize_model(model, windows, qcfg, device=args.device, batch_size=args.batch_size,
                                            progress=not args.quiet, max_memory=max_memory)
            seconds = time.perf_counter() - t0
            summary |= {"seconds": round(seconds, 2), "layers": [asdict(r) for r in report]}
            summary["calibration"]["windows"] = list(windows.shape)
            from gptq.io.checkpoint import source_dtype_name

            own = source_dtype_name(args.model)
            final = save_checkpoint(out, model, packed, qcfg, source_dir=args.model, overwrite=args.overwrite,
                                    max_shard_bytes=shard_bytes, float_dtype=getattr(torch, own) if own else None,
                                    extra_files={"quantize_report.json": json.dumps(summary, indent=2) + "\n"})
        if gguf_out is not None:
            final = finish_gguf(Path(final), gguf_out, gguf, args.model, args.overwrite)
    except KeyboardInterrupt:
        state = Path(out).resolve()
        print(f"\ninterrupted. " + (f"Progress is kept in {state.name}.partial: rerun the same command with --resume "
                                    "to continue from the last completed block." if args.stream else
                                    "Nothing was written (use the default --stream for resumable runs)."),
              file=sys.stderr)
        return 130
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError, RuntimeError, OSError) as e:
        fail(str(e))
    print_summary(report, seconds, final)
    return 0


def gguf_config(args, ftype: str) -> QuantConfig:
    """The run's config for a GGUF file type: each decoder linear's GGML type as llama.cpp picks it
    (the caller has checked the model directory)."""
    import torch

    from gptq.formats.gguf import plan
    from gptq.io.modules import in_features
    from gptq.pipeline.streaming import skeleton

    if args.double_quant or args.act_order not in ("none", "group-aware"):
        raise ConfigError("--format gguf:* takes --act-order none or group-aware (GGML blocks run along the rows "
                          "in order) and no --double-quant")
    model = skeleton(args.model, torch.float32)
    from gptq.io.modules import get_module
    from gptq.models.architectures import for_config

    arch = for_config(model.config)
    blocks = get_module(model, arch.blocks)
    linears = {f"{arch.blocks}.{i}.{n}": in_features(get_module(b, n)) for i, b in enumerate(blocks)
               for n in arch.block_linears(b)}
    n_expert = getattr(model.config, arch.experts.count) if arch.experts is not None else 0
    try:
        from gptq.formats.gguf import check_moe

        check_moe(model.config.to_dict())
        default, per_layer = plan(ftype, model.config.model_type, linears, arch.blocks, n_expert)
        from gptq.formats.gguf import check_tokenizer

        check_tokenizer(Path(args.model))  # refuse now, not after the solve
    except ValueError as e:
        raise ConfigError(str(e)) from None
    from gptq.core.grids.ggml import TYPES

    t = TYPES[default]
    return QuantConfig(bits=t.bits, group_size=t.group, sym=True, act_order=args.act_order,
                       true_sequential=args.true_sequential, damp=args.damp, sort_channels=args.sort_channels,
                       block_size=args.block_size, mse=args.mse, grid=default, layer_grids=per_layer, gguf=ftype,
                       fp_target=args.fp_target)


def finish_gguf(stage: Path, out: Path, ftype: str, source: str, overwrite: bool) -> Path:
    """Write OUT/<name>-<type>.gguf and the report from the staged checkpoint, then remove the stage."""
    import shutil

    from gptq.formats.gguf import write_gguf
    from gptq.io.checkpoint import prepare_output

    final, tmp = prepare_output(out, overwrite)
    tmp.mkdir()
    try:
        info = write_gguf(stage, tmp / f"{Path(source).name}-{ftype}.gguf", ftype, Path(source))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # the staged checkpoint stays: rerun with --resume
        raise
    report = json.loads((stage / "quantize_report.json").read_text()) if (stage / "quantize_report.json").is_file() \
        else {}
    report["gguf"] = info
    (tmp / "quantize_report.json").write_text(json.dumps(report, indent=2) + "\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    shutil.rmtree(stage)
    return final


def print_summary(report, seconds: float, out: Path) -> None:
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
    from gptq.formats.compat import format_verdicts, is_moe, layer_shapes, verdicts

    if not (out / "config.json").is_file():  # a GGUF file
        g = json.loads((out / "quantize_report.json").read_text())["gguf"]
        print(f"GGUF {g['file_type']}: {g['file']} {g['MiB']} MiB, {g['bits_per_weight']} bits per weight "
              f"({', '.join(f'{k} x{v}' for k, v in g['tensor_types'].items())}); llama.cpp and Ollama load it")
        return
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    if qc.get("quant_method") != "gptq":
        print("format: bitsandbytes 4-bit (transformers + bitsandbytes load it with from_pretrained)")
        return
    print("served by (python -m gptq.inspect CHECKPOINT says the same):")
    print(format_verdicts(verdicts(qc, layer_shapes(out, qc["bits"]), is_moe(cfg))))


if __name__ == "__main__":
    sys.exit(main())

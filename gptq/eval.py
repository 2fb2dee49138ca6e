"""python -m gptq.eval MODEL [--reference SOURCE] --dataset wikitext2|ptb|c4|PATH [--seqlen 2048]

Perplexity with the GPTQ paper's protocol: the evaluation split joined with "\\n\\n", tokenized
once, cut into non-overlapping windows, exp(mean next-token NLL), with its standard error. With
--reference, the source model runs on the same windows and the per-token KL divergence
KL(P_source || P_model) over the vocabulary (mean, median, p90, p99, p99.9), the share of positions
whose top-1 token agrees, and Delta perplexity are reported, each with its uncertainty. MODEL is a
model directory, a GPTQ / bitsandbytes checkpoint or a .gguf file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from calib import CalibrationDataError, eval_tokens, load_documents
from gptq.cli import plain_warnings
from gptq.evaluate.score import (
    BOOTSTRAP,
    SEED,
    Scores,
    compare,
    load_scores,
    paired,
    reference_logprobs,
    save_scores,
    summarize,
    token_nll,
    windows_sha,
)


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, progress: bool = False, batch_size: int = 1) -> float:
    """exp(mean NLL) over [n, seqlen] token windows (the first token of each window is not scored)."""
    device = model.get_input_embeddings().weight.device
    nll, count = 0.0, 0
    for batch in tqdm(windows.split(batch_size), desc="perplexity", unit="window", disable=not progress):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()  # [b, T, vocab]
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        nll += float(loss)
        count += batch[:, 1:].numel()
    return float(torch.exp(torch.tensor(nll / count)))


def eval_windows(tokenizer, dataset: str, seqlen: int, max_windows: int | None) -> torch.Tensor:
    docs, _ = load_documents(dataset, "eval")
    return eval_tokens(docs, tokenizer, seqlen, max_windows)


def _max_windows(text: str) -> int | None:
    if text == "all":
        return None
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number of windows nor 'all'")
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n} must be at least 1")
    return n


@torch.no_grad()
def _logits(model, tokens: torch.Tensor) -> torch.Tensor:
    device = model.get_input_embeddings().weight.device
    return model(input_ids=tokens[None].to(device), use_cache=False).logits[0]


def score(model, windows: torch.Tensor, reference=None, cache=None, progress: bool = False):
    """Per-token scores of ``model`` on ``windows``; against the reference's distributions when a
    reference model or a cache is given (each window from the cache when there, else from the
    reference model, then stored). One window in memory at a time."""
    s = Scores.empty()
    for w in tqdm(windows, desc="eval", unit="window", disable=not progress):
        rec = cache.get(w) if cache is not None else None
        if rec is None and reference is not None:
            ref_logits = _logits(reference, w)
            rec = reference_logprobs(ref_logits), token_nll(ref_logits, w).cpu()
            del ref_logits
            if cache is not None:
                cache.put(w, *rec)
        logits = _logits(model, w)
        s.nll.append(token_nll(logits, w).cpu())
        if rec is not None:
            kld, top1 = compare(rec[0], logits)
            s.kld.append(kld)
            s.top1.append(top1)
            s.ref_nll.append(rec[1])
        del logits
    return s


def _pm(value, err, fmt="{:.4f}") -> str:
    return fmt.format(value) + (" ± " + fmt.replace("+", "").format(err) if err is not None else "")


def report(r: dict) -> str:
    """The human-readable result."""
    head = f"{r['dataset']}: {r['windows']} windows x {r['seqlen']} tokens ({r['tokens']} scored)"
    if "kld_mean" not in r:
        return "\n".join([(f"{r['dataset']} perplexity {_pm(r['perplexity'], r['perplexity_stderr'])} "
                          f"({r['windows']} windows x {r['seqlen']} tokens)")] + _paired_lines(r))
    lines = [head + "; ± is the standard error over tokens, for percentiles a bootstrap over windows",
             f"perplexity            {_pm(r['perplexity'], r['perplexity_stderr'])}",
             f"reference perplexity  {_pm(r['reference_perplexity'], r['reference_perplexity_stderr'])}",
             f"Δ perplexity          {_pm(r['delta_perplexity'], r['delta_perplexity_stderr'], '{:+.4f}')}",
             f"KL divergence  mean   {_pm(r['kld_mean'], r['kld_mean_stderr'], '{:.6f}')}"]
    for key, label in (("kld_median", "median"), ("kld_p90", "p90"), ("kld_p99", "p99"), ("kld_p99_9", "p99.9")):
        lines.append(f"               {label:<6} {_pm(r[key], r[key + '_stderr'], '{:.6f}')}")
    lines.append(f"               max    {r['kld_max']:.6f}")
    err = r["top1_agreement_stderr"]
    lines.append(f"top-1 agreement       {100 * r['top1_agreement']:.3f} %" + (f" ± {100 * err:.3f} %" if err else ""))
    return "\n".join(lines + _paired_lines(r))


def _paired_lines(r: dict) -> list[str]:
    """The --paired comparison, if any: this model minus the saved one, with the paired errors."""
    p = r.get("paired")
    if p is None:
        return []
    lines = [(f"against {p['against']} (this model minus that one; ± is the standard error of the paired "
             "per-token differences):"),
             f"  Δ mean NLL          {_pm(p['delta_nll_mean'], p['delta_nll_mean_stderr'], '{:+.6f}')}"]
    if "delta_kld_mean" in p:
        lines += [f"  Δ KL divergence     {_pm(p['delta_kld_mean'], p['delta_kld_mean_stderr'], '{:+.6f}')}",
                  f"  Δ top-1 agreement   {_pm(100 * p['delta_top1_agreement'], 100 * p['delta_top1_agreement_stderr'], '{:+.3f}')} %"]
    return lines


def _paired_base(path: str, windows: torch.Tensor) -> Scores:
    """The scores saved in ``path``, refused unless they cover exactly these windows."""
    base, meta = load_scores(path)
    if meta["windows_sha256"] != windows_sha(windows):
        raise ValueError(f"--paired {path} was scored on other windows (another dataset, --seqlen or "
                         "--max-windows, or another tokenizer): rerun both with the same options")
    return base


def check_writable_file(path: str) -> None:
    """Refuse, before any long work, a file that could not be written: its folder must exist and be writable."""
    folder = Path(path).resolve().parent
    if not folder.is_dir():
        raise FileNotFoundError(f"{path}: the folder {folder} does not exist; create it or choose another path")
    if not os.access(folder, os.W_OK):
        raise PermissionError(f"{path}: the folder {folder} is not writable; choose another path")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gptq.eval", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a model directory, quantized (GPTQ, bitsandbytes) or not, or a .gguf file")
    p.add_argument("--reference", metavar="MODEL",
                   help="the source model (directory or .gguf) to compare against: KL divergence, top-1 agreement, "
                        "Δ perplexity. It must have the same vocabulary, token for token")
    p.add_argument("--reference-cache", metavar="DIR",
                   help="keep the reference's next-token distributions here, so that comparing more checkpoints "
                        "against one source costs one source pass (later runs need no --reference). Stored per "
                        "window: the full log-softmax in float16 (2 bytes x vocabulary per token: 201 MB per "
                        "2048-token window of a 49152-token vocabulary), not top-k, so that KL stays exact over the "
                        "whole vocabulary, tails included")
    p.add_argument("--dataset", default="wikitext2",
                   help="wikitext2, ptb, c4 (test/validation splits via `datasets`) or a local text file (default: %(default)s)")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per window (default: %(default)s)")
    p.add_argument("--max-windows", type=_max_windows, default=None, metavar="N|all",
                   help="evaluate only the first N windows, or all of the test set (default: all)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (default: %(default)s)")
    p.add_argument("--backend", default="auto", help="kernel backend for GPTQ checkpoints: auto, torch, cpu, triton "
                   "(default: %(default)s)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="activation dtype; auto = float32 on CPU, float16 on CUDA (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    p.add_argument("--save-scores", metavar="FILE",
                   help="also write the per-token scores (NLL, and with a reference KL divergence and top-1 "
                        "agreement) to FILE (safetensors), for a later --paired comparison")
    p.add_argument("--paired", metavar="FILE",
                   help="compare with the scores another checkpoint saved (--save-scores) on the same windows: "
                        "the differences of mean NLL, mean KL divergence and top-1 agreement, with the standard "
                        "errors of the paired per-token differences (far smaller than each figure's own: they "
                        "say whether one checkpoint is better than the other beyond the evaluation's noise)")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.seqlen < 2:
        p.error(f"--seqlen {args.seqlen} must be at least 2")
    # imported here, after the arguments are checked: the loaders pull in transformers and datasets
    # (seconds), which --help and a bad argument need not wait for
    from safetensors import SafetensorError

    from gptq.evaluate.reference import ReferenceCache, check_same_vocabulary, describe, token_table
    from gptq.io.safetensors_io import check_safetensors
    from gptq.runtime.load import CheckpointError, load_any

    plain_warnings()
    try:
        # everything that can refuse the run, before any weight is loaded
        for path in (args.model, args.reference):
            if path:
                check_safetensors(path)  # a missing, truncated or corrupt file is named here
        info = describe(args.model)
        ref_info = describe(args.reference) if args.reference else None
        cache = ReferenceCache(args.reference_cache) if args.reference_cache else None
        meta = cache.bind(ref_info) if cache is not None else None
        if ref_info is not None:
            if ref_info.tokenizer is None:
                raise CheckpointError(f"the reference {args.reference} has no tokenizer")
            check_same_vocabulary(info, ref_info.vocab_size, token_table(ref_info.tokenizer, ref_info.vocab_size),
                                  args.reference)
            tokenizer = ref_info.tokenizer  # the source's tokenizer cuts the windows every candidate sees
        elif cache is not None:
            tokenizer = cache.tokenizer()
            check_same_vocabulary(info, int(meta["vocab_size"]), cache.tokens(), f"cached in {cache.root}")
        else:
            tokenizer = info.tokenizer
        if tokenizer is None:
            raise CheckpointError(f"{args.model} has no tokenizer files")
        windows = eval_windows(tokenizer, args.dataset, args.seqlen, args.max_windows)
        base = _paired_base(args.paired, windows) if args.paired else None
        if args.save_scores:
            check_writable_file(args.save_scores)
        missing = cache.missing(windows) if cache is not None else []
        if missing and ref_info is None:
            raise CheckpointError(f"--reference-cache {cache.root} lacks {len(missing)} of these {len(windows)} windows "
                                  "(another dataset, --seqlen or --max-windows): pass --reference MODEL to add them")
        if missing:
            cache.check_space(len(missing), args.seqlen, ref_info.vocab_size)

        t0 = time.perf_counter()
        reference = None
        if ref_info is not None and (cache is None or missing):
            reference, _ = load_any(args.reference, device=args.device, dtype="auto")
        model, _ = load_any(args.model, device=args.device, backend=args.backend, dtype=args.dtype)
        scores = score(model, windows, reference, cache, progress=not args.json)
    except (CalibrationDataError, CheckpointError, FileNotFoundError, ValueError, OSError, SafetensorError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = {"model": args.model, "dataset": args.dataset, "seqlen": args.seqlen, "windows": len(windows)}
    if args.reference or cache is not None:
        result["reference"] = args.reference or meta.get("reference")
    result |= summarize(scores)
    if base is not None:
        result["paired"] = {"against": args.paired} | paired(base, scores)
    if args.save_scores:
        save_scores(scores, args.save_scores, windows, args.model)
        result["scores"] = args.save_scores
    result["stderr"] = (f"*_stderr: standard error over tokens (perplexity: delta method), for percentiles a "
                        f"bootstrap over windows; *_stderr_windows: bootstrap over windows ({BOOTSTRAP} resamples, "
                        f"seed {SEED})")
    result["seconds"] = round(time.perf_counter() - t0, 2)
    print(json.dumps(result) if args.json else report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

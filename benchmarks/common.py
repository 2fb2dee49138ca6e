"""What the benchmarks share: where WikiText-2 and SmolLM2 are, the quality benchmark's quantize
command and evaluation windows, timing a child process, and writing a result."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from gptq.assets import smollm2
from gptq.eval import eval_windows

ROOT = Path(__file__).resolve().parents[1]
WIKI = Path(os.environ.get("GPTQ_WIKITEXT", "../shared/data/wikitext2"))
MODEL = Path(os.environ.get("GPTQ_CACHE", ".cache")) / "smollm2"


def wiki(name: str) -> Path:
    p = WIKI / name
    if not p.is_file():
        raise SystemExit(f"benchmark text {p} not found; set GPTQ_WIKITEXT to a folder with valid.tokens.txt "
                         "and wiki.test.raw (WikiText-2)")
    return p


def checkpoint_sha(ckpt: Path) -> str:
    """One hash over a checkpoint folder's files, names and bytes, leaving out the run report (its
    seconds differ between runs): two checkpoints are byte-identical when these agree."""
    h = hashlib.sha256()
    for f in sorted(p for p in ckpt.rglob("*") if p.is_file() and p.name != "quantize_report.json"):
        h.update(str(f.relative_to(ckpt)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def write(out: Path, name: str, result: dict, show: bool = False) -> None:
    """Write ``result`` to ``out/name.json`` (printed first with ``show``)."""
    if show:
        print(json.dumps(result, indent=2))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {out / name}.json")


def run_timed(cmd: list[str]) -> tuple[float, float]:
    """Run a command; return (wall seconds, peak RSS of the child in GiB)."""
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - t0
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return wall, peak_kib / 1024**2


def smollm2_eval(max_windows: int = 8):
    """SmolLM2 on 2 threads: its directory (fetched once), tokenizer, and the first ``max_windows``
    2048-token windows of wiki.test.raw."""
    torch.set_num_threads(2)
    model_dir = smollm2(MODEL)
    tok = AutoTokenizer.from_pretrained(model_dir)
    return model_dir, tok, eval_windows(tok, str(wiki("wiki.test.raw")), 2048, max_windows)


def quantize_cmd(model_dir: Path, *flags: str) -> list[str]:
    """The quality benchmark's quantize command: 4-bit g64 on 32 × 512-token windows of WikiText-2
    valid, then ``flags``."""
    return [sys.executable, "-m", "gptq.quantize", str(model_dir), "--dataset", str(wiki("valid.tokens.txt")),
            "--nsamples", "32", "--seqlen", "512", "--bits", "4", "--group-size", "64", *flags]


def evaluate(ckpt: Path, model_dir: Path, cache: Path, save_scores: Path | None = None,
             paired: Path | None = None) -> dict:
    """``gptq.eval --reference`` on the quality benchmark's 8 x 2048 windows (the reference's
    distributions cached in ``cache`` for the next checkpoint): perplexity, Δ perplexity, KL
    divergence and top-1 agreement against the source, each with its standard error. ``save_scores``:
    keep the per-token scores there; ``paired``: also the differences from the scores saved there
    (key "paired", with the paired standard errors)."""
    cmd = [sys.executable, "-m", "gptq.eval", str(ckpt), "--reference", str(model_dir), "--reference-cache",
           str(cache), "--dataset", str(wiki("wiki.test.raw")), "--max-windows", "8", "--json",
           "--backend", "torch", "--dtype", "float32"]
    cmd += ["--save-scores", str(save_scores)] if save_scores else []
    cmd += ["--paired", str(paired)] if paired else []
    r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    keep = ("perplexity", "perplexity_stderr", "delta_perplexity", "delta_perplexity_stderr", "kld_mean",
            "kld_mean_stderr", "kld_p99", "top1_agreement", "top1_agreement_stderr", "paired")
    return {k: r[k] for k in keep if k in r}

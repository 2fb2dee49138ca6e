"""The streaming CLI on one synthetic model as one process and under ``torchrun`` with N ranks,
``threads`` per process (the same in every run, so the bytes must match): seconds per block, and
whether every rank count wrote the same bytes. On a 2-core CPU with 1 thread per process, 2 ranks
use both cores where one process uses one. ``flags`` go to every run (``--flags="--rotate learned
--rotate-steps 20"`` adds the learned rotation's own seconds: its statistics pass and learning are
shared out too)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from benchmarks.common import checkpoint_sha, write
from benchmarks.synthetic import synthetic_llama
from gptq.runtime.cpu import cpu_info

DIST_SHAPE = (1024, 2816, 16, 4, 4)  # hidden 1024, 4 layers (as the spill benchmark)
DIST_WINDOWS = (32, 256)


def distributed(out: Path, ranks: tuple[int, ...] = (1, 2), threads: int = 1,
                windows: tuple[int, int] = DIST_WINDOWS, flags: tuple[str, ...] = ()) -> dict:
    h, f, nh, kv, L = DIST_SHAPE
    d = synthetic_llama(out / "synthetic" / "dist", h, f, nh, kv, L)
    (out / "synthetic" / "calib.txt").write_text(" ".join(f"w{i % 997}" for i in range(200000)))
    tok = out / "synthetic" / "dist"
    _tiny_tokenizer(tok)
    n, seq = windows
    args = ["-m", "gptq.quantize", str(d), "--dataset", str(out / "synthetic" / "calib.txt"), "--nsamples", str(n),
            "--seqlen", str(seq), "--quiet", "--overwrite", "--device", "cpu", *flags]
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
        report = json.loads((outs[r] / "quantize_report.json").read_text())
        inside = report["seconds"]  # start-up excluded
        rows[label] = {"command_seconds": round(secs, 1), "quantize_seconds": inside,
                       "seconds_per_block": round(inside / L, 2)}
        if "rotation_learning" in report:
            rows[label]["learning_seconds"] = report["rotation_learning"]["seconds"]
        print(label, rows[label])
    base = outs[ranks[0]]
    identical = all(checkpoint_sha(outs[r]) == checkpoint_sha(base) for r in ranks[1:])
    shutil.rmtree(out / "synthetic", ignore_errors=True)
    result = {"setup": f"random Llama-shaped bf16 model, hidden {h}, {L} layers; {n} x {seq}-token windows "
                       "(batch 8); 4-bit g128; streaming CLI; command_seconds: the whole command (imports, "
                       "torchrun start-up); quantize_seconds: the report's (loading, solving, writing)"
                       + (f"; flags: {' '.join(flags)}" if flags else ""),
              "cpu": cpu_info(), "rows": rows, "checkpoints_identical": identical}
    write(out, "distributed", result, show=True)
    return result


def _tiny_tokenizer(d: Path) -> None:
    """A word-level tokenizer for the synthetic models (the CLI needs one to cut calibration windows)."""
    vocab = {"<unk>": 0} | {f"w{i}": i + 1 for i in range(997)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(d)

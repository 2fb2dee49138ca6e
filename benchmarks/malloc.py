"""glibc's malloc and the streaming quantization's memory: the 1.3B bar's command on an 8-layer model
of the same width (2048, SmolLM2's 49152-token vocabulary and tokenizer, rotated by --rotate auto),
run with gptq's setting (allocations of 1 MiB and more mapped, so freed ones go back to the system:
gptq/__init__.py) and with glibc's default (a threshold that rises to 32 MiB, so block after block
the freed tensors stay resident as holes in the heap). ``GLIBC_TUNABLES`` set, even empty, is the
user's own malloc setting, which gptq leaves alone: that gives glibc's default here. The runs
alternate (default, gptq, gptq, default, ...) so that a drift in the machine's load falls on both;
each reports its peak RSS (the child's own, ``os.wait4``), its seconds and its checkpoint's hash."""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

from benchmarks.common import MODEL, checkpoint_sha, wiki, write
from benchmarks.scale import BAR_1B3, _run_peak
from benchmarks.synthetic import synthetic_llama
from gptq.assets import smollm2
from gptq.runtime.cpu import cpu_info

SETTINGS = {"glibc-default": {"GLIBC_TUNABLES": ""}, "gptq": {}}
ORDER = ("glibc-default", "gptq", "gptq", "glibc-default")
LAYERS = 8


def malloc(out: Path) -> dict:
    hidden, inter, heads, kv, _ = BAR_1B3["shape"]
    d = synthetic_llama(out / "synthetic" / "malloc", hidden, inter, heads, kv, LAYERS, vocab=BAR_1B3["vocab"],
                        shards=2)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2(MODEL) / f, d / f)
    ckpt = out / "synthetic" / "malloc-gptq"
    cmd = [sys.executable, "-m", "gptq.quantize", str(d), "--dataset", str(wiki("valid.tokens.txt")),
           *BAR_1B3["flags"], "--quiet", "--overwrite", "--out", str(ckpt)]
    base = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "MALLOC_MMAP_THRESHOLD_")}
    runs = {name: [] for name in SETTINGS}
    for name in ORDER:
        t0 = time.perf_counter()
        rc, peak = _run_peak(cmd, env=base | SETTINGS[name])
        secs = time.perf_counter() - t0
        runs[name].append({"exit": rc, "seconds": round(secs, 1), "peak_rss_gib": round(peak, 3),
                           "sha": checkpoint_sha(ckpt) if rc == 0 else None})
        print(name, runs[name][-1], flush=True)
    shas = {r["sha"] for rs in runs.values() for r in rs}
    mean = lambda name, key: sum(r[key] for r in runs[name]) / len(runs[name])
    result = {"setup": f"{LAYERS} layers of the 1.3B bar's shape; python -m gptq.quantize MODEL "
                       + " ".join(BAR_1B3["flags"]),
              "runs": runs, "byte_identical": len(shas) == 1 and None not in shas,
              "peak_ratio_gptq_over_default": round(mean("gptq", "peak_rss_gib") / mean("glibc-default", "peak_rss_gib"), 3),
              "time_ratio_gptq_over_default": round(mean("gptq", "seconds") / mean("glibc-default", "seconds"), 3),
              "cpu": cpu_info()}
    print({k: v for k, v in result.items() if k != "runs"})
    shutil.rmtree(out / "synthetic", ignore_errors=True)
    write(out, "malloc", result)
    return result

"""Stream-quantize one model in a child process, so that its peak RSS is its own (scale, spill, moe).
This module imports only what the child needs: its imports count in the peak it reports."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from gptq.core.config import QuantConfig
from gptq.pipeline.streaming import quantize_streaming


def stream_one(model_dir: str, out_dir: str, nsamples: int = 8, seqlen: int = 128,
               max_memory: int | None = None, quant: dict | None = None, device: str = "cpu") -> None:
    """Child process: stream-quantize one synthetic model, print one JSON line with its own peak RSS
    (``quant``: QuantConfig settings beside 4-bit g128)."""
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


def stream_child(model_dir: Path, out_dir: Path, **kw) -> dict:
    """``stream_one`` in a child process; its JSON line as a dict."""
    code = f"from benchmarks.stream_child import stream_one; stream_one({str(model_dir)!r}, {str(out_dir)!r}, **{kw!r})"
    r = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(r.stdout.strip().splitlines()[-1])

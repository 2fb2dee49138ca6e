"""Peak RSS and seconds per block of streaming quantization on synthetic Llama-shaped models of
growing depth and width (sharded safetensors on disk); ``--13b`` adds a 13B-shaped one."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from safetensors import safe_open

from benchmarks.common import MODEL, checkpoint_sha, wiki, write
from benchmarks.stream_child import stream_child
from benchmarks.synthetic import synthetic_llama
from gptq.assets import smollm2
from gptq.runtime.cpu import cpu_info

SCALE_SHAPES = {  # name: (hidden, intermediate, heads, kv heads, layers)
    "h1024-L4": (1024, 2816, 16, 4, 4),
    "h1024-L8": (1024, 2816, 16, 4, 8),
    "h1024-L16": (1024, 2816, 16, 4, 16),
    "h2048-L4": (2048, 5632, 16, 4, 4),
    "h2048-L8": (2048, 5632, 16, 4, 8),
}
SCALE_13B = {"13B-shaped": (5120, 13824, 40, 40, 40)}
# issue #26's memory bar: a 24-layer, 1.3B-parameter Llama (hidden 2048, 4 kv heads, SmolLM2's 49152-token
# vocabulary and tokenizer: 1.26B parameters) in 5 bf16 shards, quantized by the command with its defaults
# and --bits 4 --group-size 128 --nsamples 8 --seqlen 256 (its untied head makes --rotate auto rotate it);
# peak RSS at most 2.5 GiB, and a run interrupted after a block and resumed writes the same bytes
BAR_1B3 = {"name": "1.3B (5 shards), the command", "shape": (2048, 5632, 16, 4, 24), "vocab": 49152, "shards": 5,
           "flags": ["--bits", "4", "--group-size", "128", "--nsamples", "8", "--seqlen", "256"],
           "stop_after": 11, "bar_gib": 2.5}


def scale(out: Path, include_13b: bool = False) -> dict:
    shapes = SCALE_SHAPES | (SCALE_13B if include_13b else {})
    rows = {}
    for name, (h, f, nh, kv, L) in shapes.items():
        d = synthetic_llama(out / "synthetic" / name, h, f, nh, kv, L)
        disk = sum(p.stat().st_size for p in d.glob("*.safetensors"))
        rows[name] = stream_child(d, out / "synthetic" / (name + "-gptq")) | {
            "bf16_on_disk_gib": round(disk / 1024**3, 2)}
        print(name, rows[name])
        shutil.rmtree(out / "synthetic", ignore_errors=True)
    rows[BAR_1B3["name"]] = bar_1b3(out)
    result = {"setup": "random Llama-shaped bf16 models, sharded per block; 8 x 128-token random windows; "
                       "4-bit g128; streaming (default) path; 2 threads", "rows": rows}
    write(out, "scale", result)
    return result


def bar_1b3(out: Path) -> dict:
    """Issue #26's model through ``python -m gptq.quantize``: the peak RSS of one uninterrupted run
    (``os.wait4``: the child's own), and whether a run stopped (SIGTERM, as a scheduler or ``timeout``
    sends; the command treats it as Ctrl-C) once block ``stop_after`` is saved and then resumed writes
    the same bytes. (Not SIGINT: a job started in the background of a non-interactive shell inherits
    SIGINT ignored, and Python then keeps ignoring it.)"""
    b = BAR_1B3
    d = synthetic_llama(out / "synthetic" / "1b3", *b["shape"], vocab=b["vocab"], shards=b["shards"])
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2(MODEL) / f, d / f)
    params = sum(math.prod(sh) for f in d.glob("*.safetensors") for sh in _shapes(f))
    whole, resumed = out / "synthetic" / "1b3-gptq", out / "synthetic" / "1b3-gptq-resumed"
    cmd = [sys.executable, "-m", "gptq.quantize", str(d), "--dataset", str(wiki("valid.tokens.txt")), *b["flags"],
           "--quiet", "--overwrite"]
    t0 = time.perf_counter()
    rc, peak = _run_peak(cmd + ["--out", str(whole)])
    secs = time.perf_counter() - t0
    print(f"uninterrupted: exit {rc}, {secs:.0f} s, peak RSS {peak:.2f} GiB", flush=True)
    stop_log = out / "scale_1b3-stopped.log"
    rc_int, peak_int = _run_peak(cmd + ["--out", str(resumed)], stop=(resumed, b["stop_after"]), log=stop_log)
    print(f"stopped after block {b['stop_after']}: exit {rc_int}, peak RSS {peak_int:.2f} GiB", flush=True)
    rc_res, peak_res = _run_peak(cmd + ["--out", str(resumed), "--resume"])
    report = json.loads((whole / "quantize_report.json").read_text())
    row = {"parameters": params, "bf16_on_disk_gib": round(sum(f.stat().st_size for f in d.glob("*.safetensors"))
                                                           / 1024**3, 2),
           "command": " ".join(["python -m gptq.quantize", "MODEL", *b["flags"]]),
           "rotate": report["quant_config"]["rotate"], "compute": report.get("compute", {}).get("dtype"),
           "seconds": round(secs, 1), "peak_rss_gib": round(peak, 2), "bar_gib": b["bar_gib"],
           "under_bar": rc == 0 and peak <= b["bar_gib"],
           "stopped_exit_code": rc_int, "resumed_exit_code": rc_res,
           "stopped_message": (stop_log.read_text().strip().splitlines() or [""])[-1],
           "stopped_peak_rss_gib": round(peak_int, 2), "resumed_peak_rss_gib": round(peak_res, 2),
           "resume_byte_identical": rc == rc_res == 0 and rc_int != 0 and checkpoint_sha(whole) == checkpoint_sha(resumed),
           "cpu": cpu_info()}
    print(b["name"], row)
    shutil.rmtree(out / "synthetic", ignore_errors=True)
    return row


def _shapes(f: Path) -> list[tuple[int, ...]]:
    with safe_open(f, "pt") as h:
        return [tuple(h.get_slice(k).get_shape()) for k in h.keys()]  # noqa: SIM118


def _run_peak(cmd: list[str], stop: tuple[Path, int] | None = None, env: dict | None = None,
              log: Path | None = None) -> tuple[int, float]:
    """Run ``cmd`` (in ``env``, default this one's; its stderr into ``log``); its exit code and its
    own peak RSS in GiB. ``stop`` = (OUT, k): send SIGTERM once OUT.partial records block k as saved."""
    err = subprocess.DEVNULL if log is None else log.open("w")
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
    done = None  # (pid, status, usage) once reaped: os.wait4, not Popen.poll, which would reap it unseen
    if stop is not None:
        progress = stop[0].with_name(stop[0].name + ".partial") / "progress.json"
        while (done := os.wait4(p.pid, os.WNOHANG))[0] == 0:
            try:
                if json.loads(progress.read_text())["completed"] > stop[1]:
                    p.send_signal(signal.SIGTERM)
                    done = None
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.2)
    _, status, usage = done or os.wait4(p.pid, 0)
    if log is not None:
        err.close()
    return os.waitstatus_to_exitcode(status), usage.ru_maxrss / 1024**2

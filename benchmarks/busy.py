"""A busy machine: the quality benchmark's quantize command alone, beside a busy-loop process, and
twice side by side; each checkpoint's hash (the three must be byte-identical) and each time over the
lone one. Then ``gptq.generate`` on the lone checkpoint quiet and beside a busy loop (tokens/s).

Run once per OpenMP setting in ``policies``: ``shipped`` is the environment a user has (gptq sets
a short spin, GOMP_SPINCOUNT=2000, see gptq/__init__.py); ``libgomp-default`` sets GOMP_SPINCOUNT to
libgomp's own default spin count (300,000), which is what every run did before; ``passive`` makes
idle threads sleep at once (OMP_WAIT_POLICY=PASSIVE). On a 2-core machine the busy loop takes one core's worth of time; two
quantizations side by side should each take about twice the lone time, not more."""

from __future__ import annotations

import datetime
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import MODEL, checkpoint_sha, quantize_cmd, write
from gptq.assets import smollm2
from gptq.runtime.cpu import cpu_info

POLICIES = {"shipped": {}, "libgomp-default": {"GOMP_SPINCOUNT": "300000"}, "passive": {"OMP_WAIT_POLICY": "PASSIVE"}}
BUSY = [sys.executable, "-c", "while True: pass"]


def _env(extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
    return env | extra


def _quantize(model_dir: Path, out: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(quantize_cmd(model_dir, "--out", str(out), "--overwrite", "--quiet"), env=env,
                            stdout=subprocess.DEVNULL)


def _wait_timed(procs: list[subprocess.Popen], t0: float) -> list[float]:
    """Each process's wall time from ``t0`` to its own end (polled every 0.1 s)."""
    times: dict[int, float] = {}
    while len(times) < len(procs):
        for i, p in enumerate(procs):
            if i not in times and p.poll() is not None:
                if p.returncode != 0:
                    raise SystemExit(f"quantization failed ({p.args})")
                times[i] = time.perf_counter() - t0
        time.sleep(0.1)
    return [times[i] for i in range(len(procs))]


def _tokens_per_s(ckpt: Path, env: dict) -> float:
    r = subprocess.run([sys.executable, "-m", "gptq.generate", str(ckpt), "--max-new-tokens", "64"], env=env,
                       capture_output=True, text=True, check=True)
    return float(re.search(r"([0-9.]+) tokens/sec", r.stdout).group(1))


def _policy(model_dir: Path, out: Path, env: dict) -> dict:
    row = {}
    t0 = time.perf_counter()
    row["alone_s"] = _wait_timed([_quantize(model_dir, out / "alone", env)], t0)[0]
    busy = subprocess.Popen(BUSY)
    try:
        t0 = time.perf_counter()
        row["beside_busy_loop_s"] = _wait_timed([_quantize(model_dir, out / "busy", env)], t0)[0]
    finally:
        busy.kill()
        busy.wait()
    t0 = time.perf_counter()
    row["side_by_side_s"] = _wait_timed([_quantize(model_dir, out / f"pair{i}", env) for i in (0, 1)], t0)
    row["ratio_beside_busy_loop"] = row["beside_busy_loop_s"] / row["alone_s"]
    row["ratio_side_by_side"] = [t / row["alone_s"] for t in row["side_by_side_s"]]
    hashes = {name: checkpoint_sha(out / name) for name in ("alone", "busy", "pair0", "pair1")}
    row["sha256"] = hashes
    row["byte_identical"] = len(set(hashes.values())) == 1
    row["decode_quiet_tokens_per_s"] = _tokens_per_s(out / "alone", env)
    busy = subprocess.Popen(BUSY)
    try:
        row["decode_beside_busy_loop_tokens_per_s"] = _tokens_per_s(out / "alone", env)
    finally:
        busy.kill()
        busy.wait()
    row["decode_kept"] = row["decode_beside_busy_loop_tokens_per_s"] / row["decode_quiet_tokens_per_s"]
    return row


def busy(out: Path, policies: tuple[str, ...] = tuple(POLICIES)) -> dict:
    model_dir = smollm2(MODEL)
    earlier = out / "busy.json"  # rows of the settings not run now are kept, each with its date
    kept = json.loads(earlier.read_text()).get("policies", {}) if earlier.is_file() else {}
    result = {"cpu": cpu_info(), "cores": len(os.sched_getaffinity(0)),
              "command": " ".join(quantize_cmd(model_dir, "--out", "OUT")), "policies": kept}
    for name in policies:
        print(f"busy: OpenMP {name} ...", flush=True)
        row = {"date": datetime.date.today().isoformat()}
        row |= _policy(model_dir, out / "busy-ckpt" / name, _env(POLICIES[name]))
        result["policies"][name] = row
        print(f"  alone {row['alone_s']:.1f} s; beside a busy loop {row['ratio_beside_busy_loop']:.2f}x; "
              f"two side by side {', '.join(f'{r:.2f}x' for r in row['ratio_side_by_side'])}; byte-identical "
              f"{row['byte_identical']}; decode {row['decode_quiet_tokens_per_s']:.1f} tokens/s quiet, "
              f"{row['decode_kept']:.0%} of it beside a busy loop", flush=True)
    write(out, "busy", result)
    return result

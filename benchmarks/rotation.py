"""Rotated against not, in the same run: the quality benchmark's calibration and evaluation at each
bit width (SmolLM2, group 64), perplexity and KL divergence against the source (``gptq.eval
--reference``, one reference pass cached for every row), checkpoint bytes and quantize seconds."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from benchmarks.common import evaluate, quantize_cmd, smollm2_eval, write
from gptq.core.config import QuantConfig
from gptq.models.rotation import rotator
from gptq.runtime.cpu import cpu_info

ROTATION_BITS = (3, 2, 4)
ROTATION_KINDS = ("none", "hadamard")


def _bytes(folder: Path) -> int:
    """The checkpoint's weight files: its safetensors shards, or its .gguf file."""
    return sum(f.stat().st_size for f in folder.iterdir() if f.suffix in (".safetensors", ".gguf"))


def rotation_seconds(model_dir: Path, kind: str) -> float:
    """The rotation alone, on the whole float32 model in memory (not ``learned``, whose learning the
    row's report times)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    t0 = time.perf_counter()
    rotator(model.config, QuantConfig(rotate=kind)).rotate_model(model)
    return round(time.perf_counter() - t0, 2)


def quantize_rotated(model_dir: Path, bits: int, kind: str, extra: tuple[str, ...], ckpt: Path) -> dict:
    """The quality benchmark's quantize command at ``bits`` with ``--rotate kind`` and ``extra``, into
    ``ckpt`` (printed, then run); returns its quantize report."""
    cmd = quantize_cmd(model_dir, "--bits", str(bits), "--rotate", kind, *extra, "--out", str(ckpt),
                       "--overwrite", "--quiet")
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads((ckpt / "quantize_report.json").read_text())


def summary(model_dir: Path, setup: str, extra: tuple[str, ...], rows: list[dict], **more) -> dict:
    """A rotation benchmark's result: its setup, the command of its rows, ``more``, the CPU, the rows."""
    command = " ".join(quantize_cmd(model_dir, "--bits", "B", "--rotate", "KIND", *extra)[1:])
    return {"setup": setup, "command": command, **more, "cpu": cpu_info(), "rows": rows}


def rotation(out: Path, bits=ROTATION_BITS, kinds=ROTATION_KINDS, extra: tuple[str, ...] = ()) -> dict:
    model_dir, _, _ = smollm2_eval()
    cache = out / "reference-cache"
    rows = []
    for b in bits:
        for kind in kinds:
            ckpt = out / "rotation-ckpt"
            report = quantize_rotated(model_dir, b, kind, extra, ckpt)
            row = {"bits": b, "rotate": kind, "bytes": _bytes(ckpt), "quantize_seconds": report["seconds"],
                   **evaluate(ckpt, model_dir, cache)}
            if "rotation_learning" in report:  # --rotate learned: its objective, steps and seconds
                row["rotation_learning"] = report["rotation_learning"]
            print(json.dumps(row), flush=True)
            rows.append(row)
    seconds = {k: rotation_seconds(model_dir, k) for k in kinds if k not in ("none", "learned")}
    result = summary(model_dir, "SmolLM2-135M-Instruct, group 64, 32 x 512 WikiText-2 valid calibration; eval "
                     "wiki.test.raw 8 x 2048, fp32, KL against the bf16 source in fp32", extra, rows,
                     rotation_seconds_fp32_in_memory=seconds)
    write(out, "rotation", result, show=True)
    return result

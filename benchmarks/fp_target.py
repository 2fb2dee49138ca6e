"""The quality benchmark under ``--fp-target`` 0 (plain GPTQ), 0.1, 0.25 (the default, the baseline row), 0.5 and 1."""

from __future__ import annotations

from pathlib import Path

from benchmarks.ablation import ablation

FP_TARGET_ROWS = {f"--fp-target {a}": ["--fp-target", a] for a in ("0.25", "0", "0.1", "0.5", "1")}


def fp_target(out: Path) -> dict:
    return ablation(out, FP_TARGET_ROWS, "fp_target")

"""The quality benchmark under each ``--act-order`` mode (and group-aware without sorting the channels)."""

from __future__ import annotations

from pathlib import Path

from benchmarks.ablation import ablation

ACT_ORDER_ROWS = {f"--act-order {m}": ["--act-order", m] for m in ("none", "static", "group-aware", "dynamic")}
ACT_ORDER_ROWS["--act-order group-aware --no-sort-channels"] = ["--act-order", "group-aware", "--no-sort-channels"]


def act_order(out: Path) -> dict:
    return ablation(out, ACT_ORDER_ROWS, "act_order")

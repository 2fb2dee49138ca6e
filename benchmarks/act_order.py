"""The quality benchmark under each ``--act-order`` mode (and group-aware without sorting the channels, or
with its groups ranked by the sum of their Hessian diagonal rather than its largest entry)."""

from __future__ import annotations

from pathlib import Path

from benchmarks.ablation import ablation

# the default first: every other row is compared with it token by token
ACT_ORDER_ROWS = {f"--act-order {m}": ["--act-order", m] for m in ("group-aware", "none", "static", "dynamic")}
ACT_ORDER_ROWS["--act-order group-aware --no-sort-channels"] = ["--act-order", "group-aware", "--no-sort-channels"]
ACT_ORDER_ROWS["--act-order group-aware --group-rank sum"] = ["--act-order", "group-aware", "--group-rank", "sum"]


def act_order(out: Path) -> dict:
    return ablation(out, ACT_ORDER_ROWS, "act_order")

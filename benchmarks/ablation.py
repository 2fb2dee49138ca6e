"""Why the defaults are what they are: the quality benchmark with one setting changed at a time
(``act_order`` and ``fp_target`` run it over other sets of rows), each checkpoint judged against the
source (KL divergence, top-1 agreement, perplexity, with standard errors) and against the first row
token by token (``gptq.eval --paired``): a difference counts only when it is more than twice its
paired standard error (the larger of the token and the window-bootstrap one) from 0. The row
"calibration seed 1" measures what drawing other calibration windows alone changes."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from benchmarks.common import MODEL, evaluate, quantize_cmd, write
from gptq.assets import smollm2

ABLATIONS = {  # each row: our defaults with one setting switched off; the first row is the baseline
    "defaults": [],
    "calibration seed 1": ["--seed", "1"],
    "no act-order": ["--act-order", "none"],
    "no MSE clipping": ["--no-mse"],
    "no true-sequential": ["--no-true-sequential"],
    "no full-precision targets": ["--fp-target", "0"],
}

RECHECK = {  # the defaults chosen on perplexity differences inside its noise, each against the defaults
    "defaults": [],
    "--act-order static": ["--act-order", "static"],
    "--act-order dynamic": ["--act-order", "dynamic"],
    "--no-sort-channels": ["--no-sort-channels"],
    "--group-rank sum": ["--group-rank", "sum"],
    "--fp-target 0.1": ["--fp-target", "0.1"],
    "--fp-target 0.5": ["--fp-target", "0.5"],
}


def verdict(paired: dict, key: str, higher_is_better: bool) -> str:
    """"better", "worse" or "tie" for one paired difference (this row minus the baseline)."""
    d = paired[key]
    se = max(paired[key + "_stderr"] or 0.0, paired[key + "_stderr_windows"] or 0.0)
    if abs(d) <= 2 * se:
        return "tie"
    return "better" if (d > 0) == higher_is_better else "worse"


def ablation(out: Path, rows_flags: dict[str, list[str]] = ABLATIONS, name: str = "ablation") -> dict:
    model_dir = smollm2(MODEL)  # the evaluation runs in gptq.eval, which cuts its own windows
    scores = out / f"{name}-scores"
    scores.mkdir(parents=True, exist_ok=True)
    rows, base = {}, None
    for i, (label, flags) in enumerate(rows_flags.items()):
        ckpt = out / f"{name}-ckpt"
        cmd = quantize_cmd(model_dir, "--out", str(ckpt), "--overwrite", "--quiet", *flags)
        print("$", " ".join(cmd[1:]))
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        seconds = json.loads((ckpt / "quantize_report.json").read_text())["seconds"]
        qc = json.loads((ckpt / "config.json").read_text())["quantization_config"]
        mine = scores / f"{i}.safetensors"
        r = evaluate(ckpt, model_dir, out / "reference-cache", save_scores=mine, paired=base)
        row = {"flags": " ".join(flags), "seconds": seconds, "desc_act": qc["desc_act"]} | r
        if base is not None:
            p = row["paired"]
            row["verdict_kld"] = verdict(p, "delta_kld_mean", higher_is_better=False)
            row["verdict_top1"] = verdict(p, "delta_top1_agreement", higher_is_better=True)
            row["verdict_nll"] = verdict(p, "delta_nll_mean", higher_is_better=False)
        base = base or mine
        rows[label] = row
        print(label, {k: v for k, v in row.items() if k != "paired"})
    first = next(iter(rows_flags))
    result = {"setup": "as the quality benchmark (4-bit g64 sym, 32 x 512 calibration); eval: 8 x 2048 windows of "
                       "wiki.test.raw against the source (gptq.eval --reference), fp32; 'paired': this row minus "
                       f"the row {first!r} token by token; verdict: beyond 2 paired standard errors or a tie",
              "baseline": first, "rows": rows}
    write(out, name, result)
    return result

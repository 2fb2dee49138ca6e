"""Why the defaults are what they are: the quality benchmark with one setting changed at a time
(``act_order`` and ``fp_target`` run it over other sets of rows)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from benchmarks.common import quantize_cmd, smollm2_eval, write
from gptq.eval import perplexity
from gptq.runtime.load import load

ABLATIONS = {  # each row: our defaults with one setting switched off
    "defaults": [],
    "no act-order": ["--act-order", "none"],
    "no MSE clipping": ["--no-mse"],
    "no true-sequential": ["--no-true-sequential"],
    "no full-precision targets": ["--fp-target", "0"],
}


def ablation(out: Path, rows_flags: dict[str, list[str]] = ABLATIONS, name: str = "ablation") -> dict:
    model_dir, _, windows = smollm2_eval()
    rows = {}
    for label, flags in rows_flags.items():
        ckpt = out / f"{name}-ckpt"
        cmd = quantize_cmd(model_dir, "--out", str(ckpt), "--overwrite", "--quiet", *flags)
        print("$", " ".join(cmd[1:]))
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        seconds = json.loads((ckpt / "quantize_report.json").read_text())["seconds"]
        qc = json.loads((ckpt / "config.json").read_text())["quantization_config"]
        q, _ = load(ckpt, device="cpu", backend="torch", dtype="float32")
        rows[label] = {"flags": " ".join(flags), "ppl": round(perplexity(q, windows), 2), "seconds": seconds,
                       "desc_act": qc["desc_act"]}
        print(label, rows[label])
    result = {"setup": "as the quality benchmark (4-bit g64 sym, 32 x 512 calibration, 8 x 2048 eval)", "rows": rows}
    write(out, name, result)
    return result

"""Mixed precision under a size budget, in one run: SmolLM2 at uniform 3-bit and 4-bit (group 64), then
``--max-size`` at the 3-bit size plus half the difference, for each candidate set and sensitivity
estimate; perplexity and KL divergence against the source (``gptq.eval --reference``), and the
share of the uniform 3→4-bit gap each mixed file recovers (a straight line between the two: 50 %).
The greedy allocation is compared with the exact knapsack on each run's own estimates."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from benchmarks.common import evaluate, quantize_cmd, smollm2_eval, write
from gptq.core.mix import Unit, allocate_exact, total
from gptq.runtime.cpu import cpu_info

MIXES = (("3g64,4g64", "hessian"), ("3g64,4g64", "hessian/block"), ("3g64,4g64", "gptq/block"),
         ("2g64,3g64,3g32,4g64,4g32,8g64", "gptq/block"))


def _bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def _quantize(model_dir: Path, ckpt: Path, *flags: str) -> dict:
    cmd = quantize_cmd(model_dir, *flags, "--out", str(ckpt), "--overwrite", "--quiet")
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads((ckpt / "quantize_report.json").read_text())


def _exact(record: dict) -> float:
    units = [Unit(tuple(u["linears"]), tuple(range(len(u["options"]))), tuple(o["bytes"] for o in u["options"]),
                  tuple(o["error"] for o in u["options"])) for u in record["units"]]
    choice = allocate_exact(units, record["budget_bytes"])
    return total(units, choice)[1]


# on the synthetic model: the cheap estimates and the two that measure the block's output
SYNTHETIC_MIXES = tuple(("3g64,4g64", s) for s in ("hessian", "hessian/residual", "hessian/block", "gptq/block"))


def _synthetic_model(out: Path, tok) -> Path:
    """``mix_estimates.SYNTHETIC`` saved in bf16 with SmolLM2's tokenizer (once)."""
    import torch

    from benchmarks.mix_estimates import load_model

    d = out / "synthetic-model"
    if not (d / "config.json").is_file():
        model, _ = load_model("synthetic", None)
        model.to(torch.bfloat16).save_pretrained(d)
        tok.save_pretrained(d)
    return d


def mix(out: Path, mixes=None, which: str = "smollm2") -> dict:
    """The budget benchmark on SmolLM2, or (``which`` "synthetic") on ``mix_estimates.SYNTHETIC``,
    unrotated (``--rotate none``) as its per-unit study is; ``mixes`` (candidates, sensitivity) pairs,
    by default ``MIXES`` or ``SYNTHETIC_MIXES``."""
    model_dir, tok, _ = smollm2_eval()
    cache = out / "reference-cache"
    ckpt = out / "mix-ckpt"
    extra: tuple[str, ...] = ()
    if which == "synthetic":
        model_dir, extra = _synthetic_model(out, tok), ("--rotate", "none")
        cache, ckpt = out / "reference-cache-synthetic", out / "mix-ckpt-synthetic"
    mixes = mixes or (MIXES if which == "smollm2" else SYNTHETIC_MIXES)
    rows = []
    for bits in (3, 4):
        report = _quantize(model_dir, ckpt, "--bits", str(bits), *extra)
        rows.append({"run": f"uniform {bits}g64", "bytes": _bytes(ckpt), "quantize_seconds": report["seconds"],
                     **evaluate(ckpt, model_dir, cache)})
        print(json.dumps(rows[-1]), flush=True)
    lo, hi = rows[0], rows[1]
    target = lo["bytes"] + (hi["bytes"] - lo["bytes"]) // 2
    for candidates, sensitivity in mixes:
        report = _quantize(model_dir, ckpt, "--max-size", str(target), "--candidates", candidates,
                           "--sensitivity", sensitivity, *extra)
        rec = report["mix"]
        row = {"run": f"mixed {candidates} {sensitivity}", "bytes": _bytes(ckpt), "budget": target,
               "quantize_seconds": report["seconds"], **evaluate(ckpt, model_dir, cache)}
        row["gap_recovered_ppl"] = (lo["perplexity"] - row["perplexity"]) / (lo["perplexity"] - hi["perplexity"])
        row["gap_recovered_kl"] = (lo["kld_mean"] - row["kld_mean"]) / (lo["kld_mean"] - hi["kld_mean"])
        exact = _exact(rec)
        row |= {"estimated_error": rec["estimated_error"], "exact_knapsack_error": exact,
                "greedy_over_exact": rec["estimated_error"] / exact,
                "choices": _counts(rec)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    what = ("SmolLM2-135M-Instruct, --rotate auto (none: tied head)" if which == "smollm2" else
            "the synthetic model of benchmarks/mix_estimates.py (a random Llama, bf16), --rotate none")
    result = {
        "setup": f"{what}, 32 x 512 WikiText-2 valid calibration; "
                 "eval wiki.test.raw 8 x 2048, fp32, KL against the bf16 source in fp32; budget = uniform 3g64 "
                 "bytes + half the difference to uniform 4g64",
        "command": " ".join(quantize_cmd(model_dir, "--max-size", str(target), "--candidates", "C",
                                         "--sensitivity", "S", *extra)[1:]),
        "cpu": cpu_info(), "rows": rows,
    }
    write(out, "mix" if which == "smollm2" else f"mix_{which}", result, show=True)
    return result


def _counts(record: dict) -> dict:
    counts: dict[str, int] = {}
    for u in record["units"]:
        counts[u["choice"]] = counts.get(u["choice"], 0) + len(u["linears"])
    return counts


CURVE_UNIFORM = ("3g64", "4g64", "8g64")
CURVE_BPW = (3.5, 4.0, 5.0, 6.0)
CURVE_CANDIDATES = "3g64,3g32,4g64,4g32,8g64"


def mix_curve(out: Path, uniform=CURVE_UNIFORM, bpw=CURVE_BPW, candidates=CURVE_CANDIDATES) -> dict:
    """Size against quality, uniform and mixed: SmolLM2 at each uniform setting and at each
    --bits-per-weight budget (3 to 6), KL and perplexity against the source; a table and an SVG plot."""
    model_dir, _, _ = smollm2_eval()
    cache = out / "reference-cache"
    ckpt = out / "mix-ckpt"
    rows = []
    for u in uniform:
        bits, group = u.split("g")
        report = _quantize(model_dir, ckpt, "--bits", bits, "--group-size", group)
        rows.append({"kind": "uniform", "setting": u, **_size(ckpt, report), **evaluate(ckpt, model_dir, cache)})
        print(json.dumps(rows[-1]), flush=True)
    for b in bpw:
        report = _quantize(model_dir, ckpt, "--bits-per-weight", str(b), "--candidates", candidates)
        rows.append({"kind": "mixed", "setting": f"{b} bpw", **_size(ckpt, report), "choices": _counts(report["mix"]),
                     **evaluate(ckpt, model_dir, cache)})
        print(json.dumps(rows[-1]), flush=True)
    result = {"setup": "SmolLM2-135M-Instruct, 32 x 512 WikiText-2 valid calibration, the default grids (asymmetric "
                       "at 2-3 bits, symmetric at 4 and 8) and --sensitivity, --rotate auto (none: tied head); "
                       f"mixed: --candidates {candidates}; eval wiki.test.raw 8 x 2048, fp32, KL against the "
                       "bf16 source", "cpu": cpu_info(), "rows": rows}
    write(out, "mix_curve", result, show=True)
    (out / "mix_curve.svg").write_text(svg_plot(rows))
    print(f"-> {out / 'mix_curve.svg'}")
    return result


def _size(ckpt: Path, report: dict) -> dict:
    """Bits per quantized weight as stored (qweight, qzeros, scales, g_idx), and the file bytes."""
    from safetensors import safe_open

    lin = weights = 0
    for f in ckpt.glob("*.safetensors"):
        with safe_open(f, "pt") as h:
            for k in h.keys():
                if k.endswith((".qweight", ".qzeros", ".scales", ".g_idx")):
                    sl = h.get_slice(k)
                    n = 1
                    for d in sl.get_shape():
                        n *= d
                    lin += n * {"I32": 4, "F16": 2, "BF16": 2, "F32": 4}[sl.get_dtype()]
    for r in report["layers"]:
        weights += r["shape"][0] * r["shape"][1]
    return {"bytes": _bytes(ckpt), "bits_per_weight": round(8 * lin / weights, 4), "quantize_seconds": report["seconds"]}


def svg_plot(rows: list[dict], width: int = 560, height: int = 360) -> str:
    """KL divergence (log scale) against bits per weight, one polyline per kind: a plain SVG."""
    import math

    pad = 50
    xs = [r["bits_per_weight"] for r in rows]
    ys = [math.log10(r["kld_mean"]) for r in rows]
    x0, x1, y0, y1 = min(xs) - 0.2, max(xs) + 0.2, min(ys) - 0.1, max(ys) + 0.1

    def px(x, y):
        return pad + (x - x0) / (x1 - x0) * (width - 2 * pad), height - pad - (y - y0) / (y1 - y0) * (height - 2 * pad)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             'font-size="11">', f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="black"/>',
             f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="black"/>',
             f'<text x="{width / 2}" y="{height - 12}" text-anchor="middle">bits per quantized weight (as stored)</text>',
             f'<text x="14" y="{height / 2}" transform="rotate(-90 14 {height / 2})" text-anchor="middle">'
             'KL divergence to the source (log)</text>']
    for b in range(math.ceil(x0), math.floor(x1) + 1):
        x, _ = px(b, y0)
        parts.append(f'<text x="{x:.1f}" y="{height - pad + 14}" text-anchor="middle">{b}</text>')
    for e in range(math.ceil(y0 * 2), math.floor(y1 * 2) + 1):
        _, y = px(x0, e / 2)
        parts.append(f'<text x="{pad - 4}" y="{y + 4:.1f}" text-anchor="end">{10 ** (e / 2):.2g}</text>')
    for kind, colour in (("uniform", "#1f77b4"), ("mixed", "#d62728")):
        pts = sorted((r["bits_per_weight"], math.log10(r["kld_mean"])) for r in rows if r["kind"] == kind)
        if not pts:
            continue
        path = " ".join(f"{px(x, y)[0]:.1f},{px(x, y)[1]:.1f}" for x, y in pts)
        parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        parts += [f'<circle cx="{px(x, y)[0]:.1f}" cy="{px(x, y)[1]:.1f}" r="3" fill="{colour}"/>' for x, y in pts]
        lx, ly = width - pad - 90, pad + (20 if kind == "mixed" else 0)
        parts.append(f'<text x="{lx}" y="{ly}" fill="{colour}">{kind}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"

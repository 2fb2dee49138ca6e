"""``python -m benchmarks NAME [--out bench-results] [options]``: run one benchmark, or ``all``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import benchmarks
from benchmarks.common import write
from benchmarks.ablation import RECHECK, ablation
from benchmarks.act_order import act_order
from benchmarks.busy import POLICIES, busy
from benchmarks.codebooks import codebooks
from benchmarks.cpu_kernel import cpu_kernel
from benchmarks.decode import decode
from benchmarks.decode_synthetic import decode_synthetic
from benchmarks.distributed import DIST_WINDOWS, distributed
from benchmarks.fp_target import fp_target
from benchmarks.kernel import kernel
from benchmarks.malloc import malloc
from benchmarks.mix import mix, mix_curve
from benchmarks.mix_estimates import MODELS, mix_estimates
from benchmarks.moe import moe
from benchmarks.notebook import notebook
from benchmarks.quality import quality
from benchmarks.rotation import ROTATION_BITS, ROTATION_KINDS, rotation
from benchmarks.rotation_learned import rotation_learned
from benchmarks.rotation_split import rotation_split
from benchmarks.scale import bar_1b3, scale
from benchmarks.spill import spill

RUNS = {  # NAME: run it with (--out as a Path, the parsed options)
    "quality": lambda out, a: quality(out),
    "decode": lambda out, a: decode(out),
    "decode-synthetic": lambda out, a: decode_synthetic(out),
    "kernel": lambda out, a: kernel(out),
    "cpu-kernel": lambda out, a: cpu_kernel(out),
    "ablation": lambda out, a: ablation(out),
    "recheck": lambda out, a: ablation(out, RECHECK, "recheck"),
    "act-order": lambda out, a: act_order(out),
    "fp-target": lambda out, a: fp_target(out),
    "codebooks": lambda out, a: codebooks(out),
    "scale": lambda out, a: scale(out, a.with_13b),
    "scale-1b3": lambda out, a: write(out, "scale_1b3", bar_1b3(out)),
    "spill": lambda out, a: spill(out),
    "malloc": lambda out, a: malloc(out),
    "moe": lambda out, a: moe(out, a.device),
    "distributed": lambda out, a: distributed(out, tuple(int(r) for r in a.ranks.split(",")), a.threads,
                                              tuple(int(v) for v in a.windows.split(",")), tuple(a.flags.split())),
    "rotation": lambda out, a: rotation(out, tuple(int(b) for b in a.bits.split(",")), tuple(a.rotate.split(",")),
                                        tuple(a.flags.split())),
    "rotation-learned": lambda out, a: rotation_learned(out, int(a.bits.split(",")[0]), a.steps),
    "rotation-split": lambda out, a: rotation_split(out, int(a.bits.split(",")[0]), tuple(a.rotate.split(",")),
                                                    tuple(a.flags.split())),
    "mix": lambda out, a: mix(out, which=a.model),
    "mix-estimates": lambda out, a: mix_estimates(out, a.model),
    "mix-curve": lambda out, a: mix_curve(out),
    "busy": lambda out, a: busy(out, tuple(a.policies.split(","))),
    "notebook": lambda out, a: notebook(),
}
ALL = ("quality", "decode", "decode-synthetic", "kernel", "cpu-kernel")


def main(argv: list[str] | None = None) -> int:
    intro, _, details = benchmarks.__doc__.partition("\n\n")
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=intro, epilog=details,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=[*RUNS, "all"])
    p.add_argument("--13b", dest="with_13b", action="store_true",
                   help="scale: also the 13B-shaped model (about 26 GB on disk, about an hour on 2 cores)")
    p.add_argument("--device", default="cpu", help="moe: where the solves run (cpu, cuda)")
    p.add_argument("--ranks", default="1,2", help="distributed: rank counts to compare (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="distributed: threads per process (default: %(default)s)")
    p.add_argument("--windows", default=f"{DIST_WINDOWS[0]},{DIST_WINDOWS[1]}",
                   help="distributed: calibration windows,tokens (default: %(default)s)")
    p.add_argument("--bits", default=",".join(map(str, ROTATION_BITS)),
                   help="rotation: bit widths (default: %(default)s); rotation-learned, rotation-split: the first")
    p.add_argument("--rotate", default=",".join(ROTATION_KINDS),
                   help="rotation, rotation-split: --rotate values compared (default: %(default)s)")
    p.add_argument("--steps", type=int, default=400, help="rotation-learned: optimiser steps (default: %(default)s)")
    p.add_argument("--flags", default="",
                   help="rotation, rotation-split, distributed: more gptq.quantize flags for every row, "
                        "e.g. --flags=--sym")
    p.add_argument("--model", choices=MODELS, default=MODELS[0],
                   help="mix, mix-estimates: the model studied (synthetic: a random Llama wider than SmolLM2)")
    p.add_argument("--policies", default=",".join(POLICIES),
                   help="busy: OpenMP settings compared (default: %(default)s)")
    p.add_argument("--out", default="bench-results", help="folder for JSON results and the checkpoint")
    a = p.parse_args(argv)
    for name in ALL if a.what == "all" else (a.what,):
        RUNS[name](Path(a.out), a)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Peak RSS and seconds per block of streaming quantization on synthetic Llama-shaped models of
growing depth and width (sharded safetensors on disk); ``--13b`` adds a 13B-shaped one."""

from __future__ import annotations

import shutil
from pathlib import Path

from benchmarks.common import write
from benchmarks.stream_child import stream_child
from benchmarks.synthetic import synthetic_llama

SCALE_SHAPES = {  # name: (hidden, intermediate, heads, kv heads, layers)
    "h1024-L4": (1024, 2816, 16, 4, 4),
    "h1024-L8": (1024, 2816, 16, 4, 8),
    "h1024-L16": (1024, 2816, 16, 4, 16),
    "h2048-L4": (2048, 5632, 16, 4, 4),
    "h2048-L8": (2048, 5632, 16, 4, 8),
}
SCALE_13B = {"13B-shaped": (5120, 13824, 40, 40, 40)}


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
    result = {"setup": "random Llama-shaped bf16 models, sharded per block; 8 x 128-token random windows; "
                       "4-bit g128; streaming (default) path; 2 threads", "rows": rows}
    write(out, "scale", result)
    return result

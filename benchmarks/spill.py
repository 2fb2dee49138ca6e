"""The same synthetic model and calibration set quantized with the activations in memory and spilled
to disk (``--max-memory 0``): peak RSS, seconds, and whether the checkpoints are identical."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import AutoConfig

from benchmarks.common import write
from benchmarks.stream_child import stream_child
from benchmarks.synthetic import synthetic_llama
from gptq.pipeline.activations import activation_bytes

SPILL_SHAPE = (1024, 2816, 16, 4, 4)  # hidden 1024, 4 layers
SPILL_WINDOWS = (64, 512)


def spill(out: Path) -> dict:
    h, f, nh, kv, L = SPILL_SHAPE
    d = synthetic_llama(out / "synthetic" / "spill", h, f, nh, kv, L)
    n, seq = SPILL_WINDOWS
    est = activation_bytes(AutoConfig.from_pretrained(d), n, seq, torch.bfloat16)
    rows, outs = {}, {}
    for label, mm in (("in memory", None), ("spilled (--max-memory 0)", 0)):
        outs[label] = out / "synthetic" / f"spill-{mm}"
        rows[label] = stream_child(d, outs[label], nsamples=n, seqlen=seq, max_memory=mm)
        print(label, rows[label])
    a, b = (sorted(p.glob("*.safetensors")) for p in outs.values())
    identical = [x.name for x in a] == [y.name for y in b] and all(x.read_bytes() == y.read_bytes()
                                                                   for x, y in zip(a, b))
    shutil.rmtree(out / "synthetic", ignore_errors=True)
    result = {"setup": f"random Llama-shaped bf16 model, hidden {h}, {L} layers; {n} x {seq}-token random windows "
                       "(batch 8); 4-bit g128; streaming; 2 threads",
              "activation_estimate_gib": round(est / 1024**3, 2), "rows": rows,
              "checkpoints_identical": identical}
    write(out, "spill", result, show=True)
    return result

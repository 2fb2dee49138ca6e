"""Which linears carry a low-bit model's loss, with and without a rotation: the linears reading the
residual stream (q/k/v, gate/up) against those writing it (o, down).

For each ``--rotate`` kind the benchmark quantizes SmolLM2 twice with the quality benchmark's settings,
at ``bits`` and at 8 bits, then scores three models against the source (``gptq.eval --reference``):
every linear at ``bits``; the readers taken from the 8-bit checkpoint (all but free of rounding
error), the writers at ``bits``; and the other way round. The hybrids are written as float32 models
(each linear dequantized), so no code of ours runs them but the evaluation.

The two checkpoints must share their rotation (``none``, ``hadamard``, ``random``, ``heads``: the
matrices depend on the seed only; ``learned`` is refused, its matrix depends on the bit width), but
``--sort-channels`` orders each MLP's intermediate channels by what its own run measured: the 8-bit
checkpoint's channels are matched to the low-bit one's by their rows' cosine similarity (asserted to be
a permutation) before they are combined.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from benchmarks.common import evaluate, smollm2_eval, write
from benchmarks.rotation import quantize_rotated, summary
from gptq.runtime.load import load

READERS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
WRITERS = ("o_proj", "down_proj")
HIGH = 8


def _dense(ckpt: Path) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The checkpoint loaded in float32 and every quantized linear's weight as stored, dequantized."""
    model, _ = load(ckpt, device="cpu", backend="torch", dtype=torch.float32)
    weights = {}
    with torch.no_grad():
        for name, mod in model.named_modules():
            if type(mod).__name__ == "QuantLinear":
                eye = torch.eye(mod.in_features)
                out = mod(eye) - (0 if mod.bias is None else mod.bias.float())
                weights[name] = out.T.contiguous()  # [out, in]
    return model, weights


def _match_channels(low: dict[str, torch.Tensor], high: dict[str, torch.Tensor]) -> float:
    """Reorder ``high``'s MLP intermediate channels (gate/up rows, down columns) as ``low`` has them;
    returns the least cosine similarity of a matched pair."""
    worst = 1.0
    for name in [n for n in low if n.endswith("mlp.up_proj")]:
        b = name[: -len("up_proj")]
        rows = [torch.nn.functional.normalize(torch.cat([w[b + "up_proj"], w[b + "gate_proj"]], 1), dim=1)
                for w in (low, high)]
        sim = rows[0] @ rows[1].T
        best, perm = sim.max(1)
        if perm.unique().numel() != perm.numel():
            raise RuntimeError(f"{b}: the intermediate channels of the two checkpoints do not pair up")
        worst = min(worst, best.min().item())
        high[b + "up_proj"], high[b + "gate_proj"] = high[b + "up_proj"][perm], high[b + "gate_proj"][perm]
        high[b + "down_proj"] = high[b + "down_proj"][:, perm]
    return worst


def _hybrid(low_ckpt: Path, low: dict, high: dict, from_high: tuple[str, ...], dest: Path) -> Path:
    """A float32 model: ``low_ckpt``'s other tensors, the linears named in ``from_high`` from ``high``."""
    model, _ = load(low_ckpt, device="cpu", backend="torch", dtype=torch.float32)
    for name, w in low.items():
        q = model.get_submodule(name)
        lin = nn.Linear(w.shape[1], w.shape[0], bias=q.bias is not None)
        lin.weight.data = (high if name.rsplit(".", 1)[-1] in from_high else low)[name]
        if q.bias is not None:
            lin.bias.data = q.bias.float()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, lin)
    del model.config.quantization_config
    model.save_pretrained(dest)
    for f in low_ckpt.glob("*token*"):
        (dest / f.name).write_bytes(f.read_bytes())
    return dest


def rotation_split(out: Path, bits: int = 3, kinds=("none", "hadamard"), extra: tuple[str, ...] = ()) -> dict:
    if "learned" in kinds:
        raise SystemExit("rotation-split: --rotate learned learns a different matrix at each bit width, so its "
                         "8-bit and low-bit checkpoints cannot be combined; compare none, hadamard, random, heads")
    model_dir, _, _ = smollm2_eval()
    cache = out / "reference-cache"
    rows = []
    for kind in kinds:
        ckpts = {}
        for b in (bits, HIGH):
            ckpts[b] = out / f"split-{kind}-{b}bit"
            quantize_rotated(model_dir, b, kind, extra, ckpts[b])
        _, low = _dense(ckpts[bits])
        _, high = _dense(ckpts[HIGH])
        cos = _match_channels(low, high)
        for label, from_high in (("all", ()), ("readers 8-bit", READERS), ("writers 8-bit", WRITERS)):
            ckpt = ckpts[bits] if not from_high else _hybrid(ckpts[bits], low, high, from_high,
                                                              out / f"split-{kind}-{label.split()[0]}")
            row = {"bits": bits, "rotate": kind, "linears": label, **evaluate(ckpt, model_dir, cache)}
            if from_high:
                row["channel_match_min_cos"] = round(cos, 4)
            print(json.dumps(row), flush=True)
            rows.append(row)
    result = summary(model_dir, "SmolLM2-135M-Instruct, group 64, 32 x 512 WikiText-2 valid calibration; readers "
                     "= q/k/v, gate/up; writers = o, down; eval wiki.test.raw 8 x 2048, fp32, KL against the bf16 "
                     "source", extra, rows)
    write(out, "rotation_split", result, show=True)
    return result

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


def _dense(ckpt: Path) -> nn.Module:
    """The checkpoint loaded in float32 with every quantized linear replaced by an ``nn.Linear`` holding
    its weight as stored, dequantized: a plain float model (no quantization config left)."""
    model, _ = load(ckpt, device="cpu", backend="torch", dtype=torch.float32)
    quantized = [(n, m) for n, m in model.named_modules() if type(m).__name__ == "QuantLinear"]
    with torch.no_grad():
        for name, q in quantized:
            lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None)
            bias = 0 if q.bias is None else q.bias.float()
            lin.weight.data = (q(torch.eye(q.in_features)) - bias).T.contiguous()  # [out, in]
            if q.bias is not None:
                lin.bias.data = bias
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, lin)
    del model.config.quantization_config
    return model


def _linears(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights of ``model``'s linears of the decoder blocks, by module name."""
    return {n: m.weight.data for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in READERS + WRITERS}


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


def _hybrid(model: nn.Module, low: dict, high: dict, from_high: tuple[str, ...], tokenizer_from: Path,
            dest: Path) -> Path:
    """``model`` (the low-bit one, float) saved to ``dest`` with the linears named in ``from_high`` taken
    from ``high``, the others from ``low``."""
    for name, w in low.items():
        model.get_submodule(name).weight.data = high[name] if name.rsplit(".", 1)[-1] in from_high else w
    model.save_pretrained(dest)
    for f in tokenizer_from.glob("*token*"):
        (dest / f.name).write_bytes(f.read_bytes())
    return dest


def rotation_split(out: Path, bits: int = 3, kinds=("none", "hadamard"), extra: tuple[str, ...] = ()) -> dict:
    if bits >= HIGH:
        raise SystemExit(f"rotation-split: --bits {bits} leaves nothing to compare with the {HIGH}-bit "
                         "checkpoint; give a lower width (2, 3 or 4)")
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
        model = _dense(ckpts[bits])
        low, high = _linears(model), _linears(_dense(ckpts[HIGH]))
        cos = _match_channels(low, high)
        for label, from_high in (("all", ()), ("readers 8-bit", READERS), ("writers 8-bit", WRITERS)):
            ckpt = ckpts[bits] if not from_high else _hybrid(model, low, high, from_high, ckpts[bits],
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

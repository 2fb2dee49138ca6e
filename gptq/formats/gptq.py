"""The GPTQ checkpoint (``--format gptq`` / ``gptq_v2``): what transformers, vLLM, TGI and GPTQModel load.

Per quantized linear ``<m>`` (layout: docs/formats.md and the checkpoint format document):

    <m>.qweight   int32 [in·bits/32, out]   codes packed along the input dimension
    <m>.qzeros    int32 [groups, out·bits/32] zero points packed along out; v1 stores zero − 1
    <m>.scales    float16 [groups, out]
    <m>.g_idx     int32 [in]                the group of each input column
    <m>.bias      float16 [out]             where the linear has one
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from gptq.core.grids import GridSpec
from gptq.core.pack import pack_qweight, pack_qzeros
from gptq.formats.base import Format, indivisible
from gptq.formats.compat import format_verdicts, is_moe, layer_shapes, verdicts


@dataclass(frozen=True)
class PackedLinear:
    """The tensors a GPTQ checkpoint stores for one quantized linear (all on CPU)."""

    qweight: torch.Tensor  # [in·bits/32, out] int32
    qzeros: torch.Tensor  # [groups, out·bits/32] int32
    scales: torch.Tensor  # [groups, out] float16
    g_idx: torch.Tensor  # [in] int32
    bias: torch.Tensor | None  # [out] float16

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {f"{prefix}.qweight": self.qweight, f"{prefix}.qzeros": self.qzeros,
               f"{prefix}.scales": self.scales, f"{prefix}.g_idx": self.g_idx}
        if self.bias is not None:
            out[f"{prefix}.bias"] = self.bias
        return out


class GPTQ(Format):
    """v1 (``gptq``: zeros stored minus one, so an asymmetric zero of 0 cannot be stored and the
    grids keep zeros ≥ 1) or v2 (``gptq_v2``: zeros as they are)."""

    def __init__(self, config, version: str = "gptq"):
        super().__init__(config)
        self.name = self.version = version

    def grid(self, name: str) -> GridSpec:
        c = self.config
        return GridSpec("int", c.bits, c.group_size, c.sym, min_zero=int(self.version == "gptq" and not c.sym))

    def bind(self, model, model_dir: Path | None = None) -> "GPTQ":
        super().bind(model, model_dir)
        bad = indivisible(model, self.config.group_size)
        if bad:
            self.warnings.append(
                f"--group-size {self.config.group_size} does not divide the input size(s) {bad}: the last group of "
                "those layers is shorter. This project's loader and kernels handle it, and so does the format, "
                "but vLLM's Marlin and the ExLlama kernels need in_features % group_size == 0 (they fall back to "
                "slower kernels or refuse). Pick a group size that divides them (e.g. 32 or 64) to keep them.")
        return self

    def pack(self, r, bias: torch.Tensor | None) -> PackedLinear:
        bits = r.grid.bits
        return PackedLinear(
            qweight=pack_qweight(r.codes.cpu(), bits),
            qzeros=pack_qzeros(r.zeros.cpu(), bits, self.version),
            scales=r.scales.cpu().contiguous(),
            g_idx=r.g_idx.cpu().clone(),  # own storage: linears solved together share one g_idx
            bias=None if bias is None else bias.to(torch.float16).contiguous(),
        )

    def quantization_config(self) -> dict:
        c = self.config
        return {
            "quant_method": "gptq",
            "bits": c.bits,
            "group_size": c.group_size,
            # only the dynamic order leaves a permuted g_idx: every other mode keeps k // group
            "desc_act": c.act_order == "dynamic",
            "sym": c.sym,
            "static_groups": c.act_order == "static",
            "act_order": c.act_order,
            "true_sequential": c.true_sequential,
            "damp_percent": c.damp,
            "checkpoint_format": self.version,
            "lm_head": False,
            "mse": c.mse,
            "sort_channels": c.sort_channels,
        }

    def default_out(self, model: str) -> str:
        return f"{model.rstrip('/')}-gptq-{self.config.bits}bit-g{self.config.group_size}"

    def summary(self, out: Path) -> str:
        cfg = _config_json(out)
        qc = cfg["quantization_config"]
        return ("served by (python -m gptq.inspect CHECKPOINT says the same):\n"
                + format_verdicts(verdicts(qc, layer_shapes(out, qc["bits"]), is_moe(cfg))))

    def check(self) -> None:
        if self.config.act_order == "dynamic" and self.config.group_size != -1:
            self.warnings.append("--act-order dynamic writes desc_act: true with a permuted g_idx; vLLM >= 0.32 refuses "
                             "such checkpoints (GPTQ group activation ordering). --act-order group-aware, the "
                             "default, keeps g_idx = k // group at nearly the same quality.")


def _config_json(out: Path) -> dict:
    return json.loads((Path(out) / "config.json").read_text())

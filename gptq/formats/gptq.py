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
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from gptq.core.config import SUPPORTED_BITS
from gptq.core.grids import GridSpec
from gptq.core.pack import pack_qweight, pack_qzeros
from gptq.formats.base import Format, indivisible, int_candidates
from gptq.formats.compat import format_verdicts, is_moe, layer_shapes, marlin_setting, verdicts


@dataclass(frozen=True)
class PackedLinear:
    """The tensors a GPTQ checkpoint stores for one quantized linear (all on CPU)."""

    qweight: torch.Tensor  # [in·bits/32, out] int32
    qzeros: torch.Tensor  # [groups, out·bits/32] int32
    scales: torch.Tensor  # [groups, out] float16
    g_idx: torch.Tensor  # [in] int32
    bias: torch.Tensor | None  # [out] float16
    grid: GridSpec | None = None  # what it was solved on (not stored: config.json says it)

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {f"{prefix}.qweight": self.qweight, f"{prefix}.qzeros": self.qzeros,
               f"{prefix}.scales": self.scales, f"{prefix}.g_idx": self.g_idx}
        if self.bias is not None:
            out[f"{prefix}.bias"] = self.bias
        return out


class GPTQ(Format):
    """v1 (``gptq``: zeros stored minus one, so an asymmetric zero of 0 cannot be stored and the
    grids keep zeros ≥ 1) or v2 (``gptq_v2``: zeros as they are)."""

    mixed_experts = True  # one setting per block's experts layer, as vLLM's fused MoE layers take it

    def __init__(self, config, version: str = "gptq"):
        super().__init__(config)
        self.name = self.version = version

    def grid(self, name: str) -> GridSpec:
        return self.plan.get(name) or self._grid(self.config.bits, self.config.group_size)

    def _grid(self, bits: int, group: int) -> GridSpec:
        sym = self.config.sym_at(bits)
        return GridSpec("int", bits, group, sym, min_zero=int(self.version == "gptq" and not sym))

    # what vLLM's Marlin kernels serve (gptq_marlin.py TYPE_MAP; MARLIN_SUPPORTED_GROUP_SIZES): the default
    # candidates of a size budget, so a mixed checkpoint keeps the fast kernels everywhere
    AUTO = ((4, 128), (4, 64), (4, 32), (8, 128))

    def candidates(self, spec: str) -> list[GridSpec]:
        """"auto" (4-bit at group 128/64/32 and 8-bit at group 128: what Marlin serves) or a list such as
        "3g64,4g64,8g128" (BITSgGROUP; a plain BITS takes --group-size)."""
        return [self._grid(b, g) for b, g in int_candidates(spec, SUPPORTED_BITS, self.config.group_size, self.AUTO)]

    def allows(self, grid: GridSpec, inputs: int, auto: bool = False) -> bool:
        # packing needs whole int32 words along the input; the default set also keeps Marlin's rule that
        # the group divides the input
        return inputs * grid.bits % 32 == 0 and not (auto and grid.group_size != -1 and inputs % grid.group_size)

    def linear_tensors(self, out: int, inputs: int, grid: GridSpec) -> dict:
        groups = 1 if grid.group_size == -1 else -(-inputs // grid.group_size)
        return {"qweight": (torch.int32, (inputs * grid.bits // 32, out)),
                "qzeros": (torch.int32, (groups, out * grid.bits // 32)),
                "scales": (torch.float16, (groups, out)), "g_idx": (torch.int32, (inputs,))}

    def bind(self, model, model_dir: Path | None = None) -> GPTQ:
        super().bind(model, model_dir)
        bad = [] if self.config.mixed else indivisible(model, self.config.group_size)  # (a budget: per candidate)
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
            grid=r.grid,
        )

    def quantization_config(self) -> dict:
        c = self.config
        return {
            "quant_method": "gptq",
            "bits": c.bits,
            "group_size": c.group_size,
            # only the dynamic order leaves a permuted g_idx: every other mode keeps k // group
            "desc_act": c.act_order == "dynamic",
            "sym": c.sym_at(c.bits),
            "static_groups": c.act_order == "static",
            "act_order": c.act_order,
            "true_sequential": c.true_sequential,
            "damp_percent": c.damp,
            "checkpoint_format": self.version,
            "lm_head": False,
            "mse": c.mse,
            "sort_channels": c.sort_channels,
        } | self._dynamic()

    def _dynamic(self) -> dict:
        """A budget's mix as GPTQModel's ``dynamic`` overrides (which vLLM reads too): the most common
        (bits, group) by number of linears is the base; every other linear matched by an anchored regex that
        also names the layer engines fuse it into (q/k/v → qkv_proj, gate/up → gate_up_proj), under the
        names the checkpoint stores (Mixtral's experts: block_sparse_moe.experts.{e}.w1/w3/w2). A block's
        routed experts on one setting (as a budget chooses them: ``pipeline.mix``) get one pattern that
        also matches the experts layer itself (``model.layers.3.mlp.experts``): the name vLLM looks its
        fused MoE layer up by, one setting for all of its experts."""
        if not self.plan:
            return {}
        weight = Counter((g.bits, g.group_size, g.sym) for g in self.plan.values())
        # vLLM picks its Marlin path or its plain GPTQ one once, from the base, and under Marlin refuses an
        # override Marlin cannot run (compat.verdicts): where some layers are such, the base is the most
        # common of theirs, so every layer loads (on the GPTQ kernel)
        off = Counter({k: n for k, n in weight.items() if not marlin_setting(*k)})
        base = (off or weight).most_common(1)[0][0]
        out: dict = {"bits": base[0], "group_size": base[1], "sym": base[2], "dynamic": {}}

        def override(bits, group, sym) -> dict:
            return {"bits": bits, "group_size": group} | ({} if sym == base[2] else {"sym": sym})

        layers = self._expert_layers()
        leaves: dict[tuple, list[str]] = {}  # (parent module, bits, group, sym) → leaf names
        for name, g in sorted(self.plan.items()):
            if (g.bits, g.group_size, g.sym) != base and layers.get(name, (None, False))[1] is False:
                parent, _, leaf = self._stored(name).rpartition(".")
                leaves.setdefault((parent, g.bits, g.group_size, g.sym), []).append(leaf)
        for (parent, *setting), names in sorted(leaves.items()):
            fused = [f for f, parts in FUSED.items() if set(parts) <= set(names)]
            alt = "|".join(re.escape(n) for n in names + fused)
            out["dynamic"][f"+:^{re.escape(parent)}\\.({alt})$"] = override(*setting)
        for layer, setting, names in sorted(set(v for v in layers.values() if v[1])):
            if setting != base:
                alt = "|".join(re.escape(n) for n in names)
                out["dynamic"][f"+:^{re.escape(layer)}(\\.\\d+\\.({alt}))?$"] = override(*setting)
        return out

    def _stored(self, name: str) -> str:
        return name if self.arch is None else self.arch.checkpoint_name(name)

    def _expert_layers(self) -> dict[str, tuple]:
        """{routed expert linear: (its experts layer as stored, (bits, group, sym) if the whole layer has that one
        setting else False, the stored leaf names)} for the plan's routed experts."""
        if self.arch is None or self.arch.experts is None:
            return {}
        rx = re.compile(rf"{re.escape(self.arch.blocks)}\.\d+\.{re.escape(self.arch.experts.path)}\.\d+\.[^.]+")
        by_layer: dict[str, list[str]] = {}
        for name in self.plan:
            if rx.fullmatch(name):
                by_layer.setdefault(self._stored(name).rsplit(".", 2)[0], []).append(name)
        out = {}
        for layer, names in by_layer.items():
            settings = {(self.plan[n].bits, self.plan[n].group_size, self.plan[n].sym) for n in names}
            leaves = tuple(sorted({self._stored(n).rsplit(".", 1)[1] for n in names}))
            one = next(iter(settings)) if len(settings) == 1 else False
            out.update({n: (layer, one, leaves) for n in names})
        return out

    def default_out(self, model: str) -> str:
        c = self.config
        if c.mixed:
            return f"{model.rstrip('/')}-gptq-mixed-" + (f"{c.bits_per_weight:g}bpw" if c.bits_per_weight
                                                         else f"{c.max_size}B")
        return f"{model.rstrip('/')}-gptq-{c.bits}bit-g{c.group_size}"

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


# the layers vLLM (and SGLang) fuse sibling linears into, by their leaf names: one quantization setting each
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def _config_json(out: Path) -> dict:
    return json.loads((Path(out) / "config.json").read_text())

"""compressed-tensors' ``pack-quantized`` layout (``--format compressed-tensors``): what llm-compressor
writes and vLLM treats as its primary quantized format (weight-only int4/int8, "W4A16").

Per quantized linear ``<m>`` (compressed-tensors' ``compressors/pack_quantized``; vLLM's
``CompressedTensorsWNA16``):

    <m>.weight_packed       int32 [out, in·bits/32]   codes packed along the input, element 0 in the low bits
    <m>.weight_scale        model dtype [out, groups] (channel strategy: groups = 1)
    <m>.weight_shape        int64 [2] = [out, in]
    <m>.weight_zero_point   int32 [out·bits/32, groups] asymmetric only, packed along the output

A stored code ``u`` is the signed value plus 2^(bits−1), so ``w = (u − z)·scale`` with ``z`` the
stored zero point, or 2^(bits−1) when symmetric: exactly our uniform grid's ``scale·(q − zero)``.
For 4 and 8 bits ``weight_packed`` is GPTQ's ``qweight`` transposed. Columns are in input order with
contiguous groups (``g_idx = k // group``): every act-order mode but ``dynamic`` stores that, which
compressed-tensors calls ``actorder: "weight"``; its ``"group"`` order (a permuted ``g_idx``) is
refused by current vLLM, so we do not write it. Scales are stored in the model's dtype and rounded
to it during the solve (float16 values for float16/float32 models), so the solver compensates
exactly the error the stored scales make.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from gptq.core.config import ConfigError
from gptq.core.grids import GridSpec
from gptq.core.pack import pack_qweight, pack_qzeros, unpack_qweight, unpack_qzeros
from gptq.formats.base import Format, indivisible, int_candidates, linear_inputs
from gptq.formats.compat import format_verdicts, is_moe, layer_shapes_ct, merge, packed_shapes, verdicts_ct
from gptq.io.safetensors_io import CheckpointError, source_dtype_name

BITS = (4, 8)  # the widths both compressed-tensors versions pack alike and vLLM serves
SUFFIXES = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")


@dataclass(frozen=True)
class PackedCT:
    """One linear in the pack-quantized layout (all on CPU)."""

    weight_packed: torch.Tensor  # [out, in·bits/32] int32
    weight_scale: torch.Tensor  # [out, groups] model dtype
    weight_shape: torch.Tensor  # [2] int64
    weight_zero_point: torch.Tensor | None  # [out·bits/32, groups] int32, asymmetric only
    bias: torch.Tensor | None

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {f"{prefix}.weight_packed": self.weight_packed, f"{prefix}.weight_scale": self.weight_scale,
               f"{prefix}.weight_shape": self.weight_shape}
        if self.weight_zero_point is not None:
            out[f"{prefix}.weight_zero_point"] = self.weight_zero_point
        if self.bias is not None:
            out[f"{prefix}.bias"] = self.bias
        return out


class CompressedTensors(Format):
    name = "compressed-tensors"

    def __init__(self, config):
        super().__init__(config)
        self.dtype = torch.float16  # the model's dtype, which the scales are stored in (``bind``)
        self.ignore = ["lm_head"]  # linears left in full precision (``bind``)

    def check(self) -> None:
        c = self.config
        if c.bits not in BITS:
            raise ConfigError(f"--format compressed-tensors stores {' or '.join(map(str, BITS))} bits (the widths "
                              f"every compressed-tensors version packs alike and vLLM serves), not --bits {c.bits}; "
                              "use --format gptq for 2 or 3 bits")
        if c.act_order == "dynamic":
            raise ConfigError("--act-order dynamic needs a permuted g_idx, which compressed-tensors calls actorder "
                              "'group' and vLLM no longer loads; use --act-order group-aware (the default)")

    def bind(self, model, model_dir: Path | None = None) -> "CompressedTensors":
        super().bind(model, model_dir)
        c = self.config
        bad = [] if c.mixed else indivisible(model, c.group_size)  # (a budget checks each candidate: ``allows``)
        if bad:
            raise ConfigError(f"--group-size {c.group_size} does not divide the input size(s) {bad}: compressed-tensors "
                              "groups must not straddle rows. Pick a group size that divides every layer's input, or "
                              "-1 (one scale per row)")
        per_word = 32 // c.bits
        odd = [] if c.mixed else sorted({n for n in linear_inputs(model).values() if n % per_word})
        if odd:
            raise ConfigError(f"input size(s) {odd} are not a multiple of {per_word}: {c.bits}-bit codes are packed "
                              f"{per_word} to an int32 word")
        # the source's dtype (a skeleton is built in float32 whatever config.json says)
        own = source_dtype_name(model_dir) if model_dir is not None else None
        self.dtype = getattr(torch, own) if own else next(model.parameters()).dtype
        quantized = set(linear_inputs(model))
        self.ignore = sorted(n for n, m in model.named_modules()
                             if isinstance(m, torch.nn.Linear) and n not in quantized)
        return self

    def grid(self, name: str) -> GridSpec:
        return self.plan.get(name) or self._grid(self.config.bits, self.config.group_size)

    def _grid(self, bits: int, group: int) -> GridSpec:
        # scales rounded to values both the model's dtype and float16 hold (bf16 values are float16 values
        # above 6e-5), so the stored scale, the one vLLM reads and our loader's float16 copy agree
        return GridSpec("int", bits, group, self.config.sym_at(bits),
                        scale_dtype=torch.bfloat16 if self.dtype == torch.bfloat16 else torch.float16)

    # what vLLM serves through Marlin (CompressedTensorsWNA16): 4 bits at group 128/64/32, 8 bits at 128
    AUTO = ((4, 128), (4, 64), (4, 32), (8, 128))

    def candidates(self, spec: str) -> list[GridSpec]:
        """"auto" or BITSgGROUP items with bits 4 or 8 (the widths this layout stores), e.g. 4g64,4g32,8g128."""
        return [self._grid(b, g) for b, g in int_candidates(spec, BITS, self.config.group_size, self.AUTO)]

    def allows(self, grid: GridSpec, inputs: int, auto: bool = False) -> bool:
        # groups must not straddle rows here, and codes fill whole int32 words
        return inputs * grid.bits % 32 == 0 and (grid.group_size == -1 or inputs % grid.group_size == 0)

    def linear_tensors(self, out: int, inputs: int, grid: GridSpec) -> dict:
        groups = 1 if grid.group_size == -1 else inputs // grid.group_size
        t = {"weight_packed": (torch.int32, (out, inputs * grid.bits // 32)), "weight_scale": (self.dtype, (out, groups)),
             "weight_shape": (torch.int64, (2,))}
        if not grid.sym:
            t["weight_zero_point"] = (torch.int32, (out * grid.bits // 32, groups))
        return t

    def pack(self, r, bias: torch.Tensor | None) -> PackedCT:
        bits = r.grid.bits
        out, n = r.codes.shape
        zero = None
        if not r.grid.sym:
            if out % (32 // bits):
                raise ValueError(f"an asymmetric zero point of {out} rows cannot be packed {32 // bits} to a word")
            zero = pack_qzeros(r.zeros.cpu(), bits, "gptq_v2").T.contiguous()  # [out·bits/32, groups]
        return PackedCT(weight_packed=pack_qweight(r.codes.cpu(), bits).T.contiguous(),
                        weight_scale=r.scales.cpu().T.to(self.dtype).contiguous(),
                        weight_shape=torch.tensor([out, n], dtype=torch.int64),
                        weight_zero_point=zero,
                        bias=None if bias is None else bias.to(self.dtype).contiguous())

    def _weights(self, bits: int, group: int) -> dict:
        c = self.config
        return {"num_bits": bits, "type": "int", "symmetric": c.sym_at(bits), "strategy": "channel" if group == -1 else "group",
                "group_size": None if group == -1 else group, "dynamic": False,
                "actorder": None if c.act_order == "none" else "weight", "block_structure": None,
                "observer": "minmax", "observer_kwargs": {}}

    def quantization_config(self) -> dict:
        """One config group targeting every Linear; a budget's mix as one group per setting, each
        targeting its linears by anchored patterns (``re:``), which compressed-tensors and vLLM match
        against every layer's (unfused) name."""
        c = self.config
        settings = {(c.bits, c.group_size): ["Linear"]}
        if self.plan:
            settings = {}
            for name, g in sorted(self.plan.items()):
                settings.setdefault((g.bits, g.group_size), []).append(name)
            settings = {k: _patterns(v) for k, v in sorted(settings.items(), key=lambda kv: -len(kv[1]))}
        groups = {f"group_{k}": {"targets": targets, "weights": self._weights(*setting), "input_activations": None,
                                 "output_activations": None, "format": "pack-quantized"}
                  for k, (setting, targets) in enumerate(settings.items())}
        return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
                "config_groups": groups, "ignore": self.ignore, "kv_cache_scheme": None,
                "global_compression_ratio": None, "sparsity_config": {}, "transform_config": {}}

    def default_out(self, model: str) -> str:
        return f"{model.rstrip('/')}-w{self.config.bits}a16-g{self.config.group_size}"

    def summary(self, out: Path) -> str:
        cfg = json.loads((Path(out) / "config.json").read_text())
        return ("served by (python -m gptq.inspect CHECKPOINT says the same):\n"
                + format_verdicts(checkpoint_verdicts(out, cfg["quantization_config"], is_moe(cfg))))


def checkpoint_verdicts(directory, qc: dict, moe: bool = False) -> list:
    """The engines' verdicts on a pack-quantized checkpoint, each config group's scheme judged on its own
    linears' shapes (``compat.merge`` when there are several)."""
    schemes = read_schemes(qc)
    if len(schemes) == 1:
        scheme = schemes[0][1]
        return verdicts_ct(scheme, layer_shapes_ct(directory, scheme["bits"]), moe)
    shapes: dict[str, list] = {}
    labels: dict[str, dict] = {}
    for name, (out, words) in packed_shapes(directory).items():
        s = scheme_of(qc, name)
        if s is not None:
            label = f"{s['bits']}-bit g{s['group_size']}"
            labels[label] = s
            shapes.setdefault(label, []).append((words * 32 // s["bits"], out))
    return merge({label: verdicts_ct(labels[label], shapes[label], moe) for label in shapes})


def _patterns(names: list[str]) -> list[str]:
    """Anchored ``re:`` targets for linears: one per parent module, its leaves as alternatives."""
    leaves: dict[str, list[str]] = {}
    for n in names:
        parent, _, leaf = n.rpartition(".")
        leaves.setdefault(parent, []).append(leaf)
    return [f"re:^{re.escape(p)}\\.({'|'.join(map(re.escape, ls))})$" for p, ls in leaves.items()]


def read_scheme(qc: dict) -> dict:
    """{bits, group_size, sym} of a pack-quantized checkpoint's first (or only) weight scheme (ours, or
    llm-compressor's W4A16/W8A16); CheckpointError for what we cannot run."""
    return read_schemes(qc)[0][1]


def read_schemes(qc: dict) -> list[tuple[list[str], dict]]:
    """(targets, {bits, group_size, sym}) of every config group, in order."""
    groups = qc.get("config_groups") or {}
    if not groups:
        raise CheckpointError("compressed-tensors: no config groups")
    return [(list(g.get("targets") or []), _scheme(g, qc)) for g in groups.values()]


def scheme_of(qc: dict, name: str) -> dict | None:
    """The scheme of the config group whose targets match module ``name`` (an ``re:`` pattern before the
    class target "Linear", as compressed-tensors prefers a name match), or None."""
    schemes = read_schemes(qc)
    for targets, scheme in schemes:
        if any(t.startswith("re:") and re.match(t[3:], name) for t in targets) or name in targets:
            return scheme
    for targets, scheme in schemes:
        if "Linear" in targets:
            return scheme
    return None


def _scheme(group: dict, qc: dict) -> dict:
    w = group.get("weights") or {}
    fmt = group.get("format") or qc.get("format")
    if fmt != "pack-quantized" or group.get("input_activations") or w.get("type", "int") != "int":
        raise CheckpointError(f"compressed-tensors: format {fmt!r} with input activations "
                              f"{group.get('input_activations')!r}; this loader reads weight-only pack-quantized int")
    if w.get("actorder") in ("group", "dynamic", True):
        raise CheckpointError("compressed-tensors: actorder 'group' (a permuted g_idx) is not read; re-export with "
                              "actorder 'weight'")
    bits, strategy = w.get("num_bits"), w.get("strategy")
    if bits not in (2, 4, 8) or strategy not in ("group", "channel"):
        raise CheckpointError(f"compressed-tensors: num_bits {bits!r}, strategy {strategy!r}; this loader reads "
                              "2, 4 or 8 bits with group or channel scales")
    return {"bits": bits, "group_size": w["group_size"] if strategy == "group" else -1,
            "sym": bool(w.get("symmetric", True))}


def as_gptq(tensors: dict[str, torch.Tensor], qc: dict) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors with every pack-quantized linear rewritten as GPTQ v2 tensors
    (qweight, qzeros, scales, g_idx), which the runtime runs: exact for 2, 4 and 8 bits. ``qc``: the
    quantization_config, whose config group matching each linear gives its scheme."""
    out = dict(tensors)
    for key in [k for k in tensors if k.endswith(".weight_packed")]:
        prefix = key[: -len(".weight_packed")]
        scheme = scheme_of(qc, prefix)
        if scheme is None:
            raise CheckpointError(f"{prefix}: packed, but no config group targets it")
        bits, gs, sym = scheme["bits"], scheme["group_size"], scheme["sym"]
        try:
            rows, n = (int(x) for x in tensors[f"{prefix}.weight_shape"].tolist())
            packed, scale = tensors[key], tensors[f"{prefix}.weight_scale"]
            ng = scale.shape[1]
            codes = unpack_qweight(packed.T.contiguous(), bits)  # [in, out]
            if tuple(codes.shape) != (n, rows) or scale.shape[0] != rows:
                raise ValueError(f"weight_packed {tuple(packed.shape)} / weight_scale {tuple(scale.shape)} do not fit "
                                 f"weight_shape [{rows}, {n}] at {bits} bits")
            if sym:
                zeros = torch.full((ng, rows), 2 ** (bits - 1), dtype=torch.int32)
            else:
                zeros = unpack_qzeros(tensors[f"{prefix}.weight_zero_point"].T.contiguous(), bits, "gptq_v2")[:, :rows]
        except (KeyError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{prefix}: not a readable pack-quantized linear ({e})") from e
        for s in SUFFIXES:
            out.pop(f"{prefix}.{s}", None)
        out[f"{prefix}.qweight"] = packed.T.contiguous()
        out[f"{prefix}.qzeros"] = pack_qzeros(zeros, bits, "gptq_v2")
        out[f"{prefix}.scales"] = scale.T.contiguous()
        out[f"{prefix}.g_idx"] = (torch.arange(n) // (n if gs == -1 else gs)).to(torch.int32)
    return out

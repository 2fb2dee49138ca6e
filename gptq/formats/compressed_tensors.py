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
from dataclasses import dataclass
from pathlib import Path

import torch

from gptq.core.config import ConfigError
from gptq.core.grids import GridSpec
from gptq.core.pack import pack_qweight, pack_qzeros, unpack_qweight, unpack_qzeros
from gptq.formats.base import Format, indivisible, linear_inputs
from gptq.formats.compat import format_verdicts, is_moe, layer_shapes_ct, verdicts_ct
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
        bad = indivisible(model, c.group_size)
        if bad:
            raise ConfigError(f"--group-size {c.group_size} does not divide the input size(s) {bad}: compressed-tensors "
                              "groups must not straddle rows. Pick a group size that divides every layer's input, or "
                              "-1 (one scale per row)")
        per_word = 32 // c.bits
        odd = sorted({n for n in linear_inputs(model).values() if n % per_word})
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
        # scales rounded to values both the model's dtype and float16 hold (bf16 values are float16 values
        # above 6e-5), so the stored scale, the one vLLM reads and our loader's float16 copy agree
        c = self.config
        return GridSpec("int", c.bits, c.group_size, c.sym,
                        scale_dtype=torch.bfloat16 if self.dtype == torch.bfloat16 else torch.float16)

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

    def quantization_config(self) -> dict:
        c = self.config
        weights = {"num_bits": c.bits, "type": "int", "symmetric": c.sym,
                   "strategy": "channel" if c.group_size == -1 else "group",
                   "group_size": None if c.group_size == -1 else c.group_size, "dynamic": False,
                   "actorder": None if c.act_order == "none" else "weight", "block_structure": None,
                   "observer": "minmax", "observer_kwargs": {}}
        return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
                "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                              "output_activations": None, "format": "pack-quantized"}},
                "ignore": self.ignore, "kv_cache_scheme": None, "global_compression_ratio": None,
                "sparsity_config": {}, "transform_config": {}}

    def default_out(self, model: str) -> str:
        return f"{model.rstrip('/')}-w{self.config.bits}a16-g{self.config.group_size}"

    def summary(self, out: Path) -> str:
        cfg = json.loads((Path(out) / "config.json").read_text())
        scheme = read_scheme(cfg["quantization_config"])
        return ("served by (python -m gptq.inspect CHECKPOINT says the same):\n"
                + format_verdicts(verdicts_ct(scheme, layer_shapes_ct(out, scheme["bits"]), is_moe(cfg))))


def read_scheme(qc: dict) -> dict:
    """{bits, group_size, sym} of a pack-quantized checkpoint with one weight scheme (ours, or
    llm-compressor's W4A16/W8A16); CheckpointError for what we cannot run."""
    groups = qc.get("config_groups") or {}
    if len(groups) != 1:
        raise CheckpointError(f"compressed-tensors: {len(groups)} config groups; this loader reads one weight scheme")
    group = next(iter(groups.values()))
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


def as_gptq(tensors: dict[str, torch.Tensor], scheme: dict) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors with every pack-quantized linear rewritten as GPTQ v2 tensors
    (qweight, qzeros, scales, g_idx), which the runtime runs: exact for 2, 4 and 8 bits."""
    bits, gs, sym = scheme["bits"], scheme["group_size"], scheme["sym"]
    out = dict(tensors)
    for key in [k for k in tensors if k.endswith(".weight_packed")]:
        prefix = key[: -len(".weight_packed")]
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

"""The bitsandbytes 4-bit checkpoint layout (NF4/FP4), as transformers' ``save_pretrained`` writes
a model loaded with ``BitsAndBytesConfig(load_in_4bit=True)``, for GPTQ-solved codebook weights.

Per quantized linear ``<m>`` (weight [out, in] flattened row-major, n = out·in, block = 64):

    <m>.weight                                    uint8 [n/2, 1]  two codes per byte, element 2i in the
                                                                  high nibble, 2i+1 in the low one
    <m>.weight.absmax                             float32 [n/block] one per block of the flattened weight
    <m>.weight.quant_map                          float32 [16]    the code table
    <m>.weight.quant_state.bitsandbytes__<type>   uint8           JSON {quant_type, blocksize, dtype, shape}

(``bitsandbytes.functional.QuantState.as_dict(packed=True)`` and ``utils.pack_dict_to_tensor``,
0.50.) With ``in % block == 0`` a block of the flattened weight is a group of ``block`` input
columns of one row, which is exactly the solver's group, so the stored absmax is the one the
solver rounded against.

Double quantization (``--double-quant``, ``codebook.NestedAbsmax``) stores instead

    <m>.weight.absmax                             uint8 [n/block]  codes of the signed 8-bit dynamic map
    <m>.weight.nested_absmax                      float32 [ceil(n/block/256)]  one scale per 256 absmax
    <m>.weight.nested_quant_map                   float32 [256]   the dynamic map
    and in the JSON: nested_blocksize 256, nested_dtype "float32", nested_offset (a float32 value)

and bitsandbytes dequantizes absmax = nested_quant_map[code] * nested_absmax[i // 256] + offset.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from gptq.core.config import ConfigError
from gptq.core.grids import GridSpec
from gptq.core.grids.codebook import NESTED_BLOCK, TABLES, NestedAbsmax, dynamic_map
from gptq.formats.base import Format, indivisible

BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)  # bitsandbytes' 4-bit block sizes


@dataclass(frozen=True)
class Bnb4bitLinear:
    """What the checkpoint stores for one layer solved on a codebook grid (all on CPU)."""

    codes: torch.Tensor  # [out, in] uint8 codes 0..15
    absmax: torch.Tensor  # [out, in / block] float32
    quant_type: str  # "nf4" | "fp4"
    bias: torch.Tensor | None  # [out]
    compute_dtype: str = "bfloat16"
    nested: NestedAbsmax | None = None  # double-quantized absmax (the values above are what it stores)

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        out, inp = self.codes.shape
        block = inp // self.absmax.shape[1]
        flat = self.codes.reshape(-1)
        packed = ((flat[0::2] << 4) | flat[1::2]).to(torch.uint8)[:, None]  # [n/2, 1]
        state = {"quant_type": self.quant_type, "blocksize": block, "dtype": self.compute_dtype, "shape": [out, inp]}
        t = {f"{prefix}.weight": packed.contiguous(),
             f"{prefix}.weight.absmax": self.absmax.reshape(-1).float().contiguous(),
             f"{prefix}.weight.quant_map": torch.tensor(TABLES[self.quant_type], dtype=torch.float64).float()}
        if self.nested is not None:
            t[f"{prefix}.weight.absmax"] = self.nested.codes(self.absmax.T).T.reshape(-1).contiguous()
            t[f"{prefix}.weight.nested_absmax"] = self.nested.blocks()
            t[f"{prefix}.weight.nested_quant_map"] = dynamic_map().clone()
            state |= {"nested_blocksize": NESTED_BLOCK, "nested_dtype": "float32",
                      "nested_offset": float(self.nested.offset)}
        t[f"{prefix}.weight.quant_state.bitsandbytes__{self.quant_type}"] = torch.tensor(
            list(json.dumps(state).encode()), dtype=torch.uint8)
        if self.bias is not None:
            t[f"{prefix}.bias"] = self.bias
        return t


def quantization_config(quant_type: str, compute_dtype: str = "bfloat16", double_quant: bool = False) -> dict:
    """config.json's block for a pre-quantized bitsandbytes 4-bit model (transformers' BitsAndBytesConfig)."""
    return {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
            "bnb_4bit_quant_type": quant_type, "bnb_4bit_use_double_quant": double_quant,
            "bnb_4bit_compute_dtype": compute_dtype, "bnb_4bit_quant_storage": "uint8"}


def dequantize(tensors: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    """[out, in] float32 weight of one stored layer (the inverse of ``Bnb4bitLinear.tensors``)."""
    key = next(k for k in tensors if k.startswith(f"{prefix}.weight.quant_state.bitsandbytes__"))
    state = json.loads(bytes(tensors[key].tolist()).decode())
    packed = tensors[f"{prefix}.weight"].reshape(-1)
    codes = torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1).long()
    table = tensors[f"{prefix}.weight.quant_map"].float()
    absmax = tensors[f"{prefix}.weight.absmax"]
    if f"{prefix}.weight.nested_absmax" in tensors:  # absmax = map[code] * nested_absmax[i // 256] + offset
        nested = tensors[f"{prefix}.weight.nested_absmax"].float()
        nmap = tensors[f"{prefix}.weight.nested_quant_map"].float()
        block = torch.arange(absmax.numel()) // state.get("nested_blocksize", NESTED_BLOCK)
        absmax = nmap[absmax.long()] * nested[block] + torch.tensor(state["nested_offset"], dtype=torch.float32)
    absmax = absmax.float()
    out, inp = state["shape"]
    n = out * inp
    w = (table[codes[:n]].view(-1, state["blocksize"]) * absmax[:, None]).reshape(out, inp)
    return w


class Bnb4bit(Format):
    """``--format bnb-nf4`` / ``bnb-fp4`` (``+dq``: double-quantized absmax): GPTQ solved on
    bitsandbytes' codebook grid, an absmax per ``group_size`` weights of a row."""

    mixture_of_experts = False  # bitsandbytes checkpoints of routed experts: not written

    def __init__(self, config, quant_type: str, double_quant: bool = False):
        super().__init__(config)
        self.quant_type, self.double_quant = quant_type, double_quant
        self.name = f"bnb-{quant_type}" + ("+dq" if double_quant else "")

    def check(self) -> None:
        c = self.config
        if c.bits != 4 or c.group_size not in BLOCKSIZES:
            raise ConfigError(f"--format {self.name} is 4-bit with an absmax per block of {BLOCKSIZES} weights "
                              f"(bitsandbytes' block sizes); got --bits {c.bits}, --group-size {c.group_size}")

    def bind(self, model, model_dir: Path | None = None) -> "Bnb4bit":
        super().bind(model, model_dir)
        bad = indivisible(model, self.config.group_size)
        if bad:
            raise ConfigError(f"--group-size {self.config.group_size} does not divide the input size(s) {bad}: "
                              "bitsandbytes blocks would straddle rows. Pick a group size (64, 128, ...) that divides "
                              "every layer's input.")
        return self

    def grid(self, name: str) -> GridSpec:
        return GridSpec(self.quant_type, 4, self.config.group_size, True, double_quant=self.double_quant,
                        scale_dtype=torch.float32)

    def pack(self, r, bias: torch.Tensor | None) -> Bnb4bitLinear:
        return Bnb4bitLinear(r.codes.cpu().contiguous(), r.scales.T.cpu().float().contiguous(), self.quant_type,
                             None if bias is None else bias.contiguous(),
                             nested=None if r.scale_state is None else r.scale_state.to("cpu"))

    def quantization_config(self) -> dict:
        return quantization_config(self.quant_type, double_quant=self.double_quant)

    def default_out(self, model: str) -> str:
        return f"{model.rstrip('/')}-bnb-{self.quant_type}-g{self.config.group_size}"

    def summary(self, out: Path) -> str:
        return "format: bitsandbytes 4-bit (transformers + bitsandbytes load it with from_pretrained)"

"""GGUF files for llama.cpp / Ollama from GPTQ-solved GGML blocks (``--format gguf:TYPE``).

The run is the usual one with a per-layer GGML type (``plan``), and the solved layers are staged
as an ordinary checkpoint whose linears hold their GGML blocks (``<m>.weight.ggml_<type>``, uint8
[out, bytes per row]). ``write_gguf`` then writes one ``.gguf`` from that stage, tensor by tensor,
with the ``gguf`` package's writer:

- names, metadata and tokenizer (byte-level BPE as ``gpt2``, SentencePiece-style BPE as ``llama``)
  as llama.cpp's ``convert_hf_to_gguf.py`` writes them for the Llama family (Llama, Mistral:
  ``blk.N.attn_q.weight`` …; q/k rows permuted to llama.cpp's rotary layout: within each head the
  two halves are interleaved. Rows are independent in every block type, so permuting the blocks'
  rows is exact) and for Qwen2 (q/k/v biases in F32) and Qwen3 (per-head q/k norms in F32), which
  keep Hugging Face's row order;
- norms in F32; token embeddings (and an untied output head) quantized by rounding to the type
  llama.cpp picks for them (they are not decoder linears), with the same fallbacks;
- Phi-3 (phi3): fused qkv_proj / gate_up_proj as attn_qkv / ffn_up in Hugging Face's row order;
  Phi-1/2 (phi2): biases and LayerNorm biases in F32, an untied head with a bias, partial rotary;
  GPT-2 (gpt2): Conv1D linears as rows per output, biases, LayerNorms and position embeddings in F32;
  GPT-NeoX (gptneox): fused query_key_value rows (and bias) reordered from per-head [q, k, v] to
  q, k, v as conversion/gptneox.py does (rows are independent: exact for blocks), parallel residual;
- mixture-of-experts (Mixtral as the llama architecture, Qwen3-MoE as qwen3moe): each expert is
  solved on its own, and a layer's experts are written as one 3-D tensor per role
  (``blk.N.ffn_gate_exps`` / ``ffn_up_exps`` / ``ffn_down_exps``: [n_expert, rows, blocks], as the
  converter merges them), the router (``ffn_gate_inp``) in F32, with the expert counts.

The per-layer types follow llama.cpp's ``src/llama-quant.cpp`` (``llama_tensor_get_type_impl`` and
``tensor_type_fallback``, llama.cpp as vendored in llama-cpp-python 0.3.36), its 8-expert rules included.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import gguf
import numpy as np
import torch
from safetensors import safe_open

from gptq.core.config import QuantConfig
from gptq.core.grids import GridSpec
from gptq.core.grids.ggml import TYPES, bits_per_weight
from gptq.formats.gguf.blocks import dequantize_blocks, pack_blocks
from gptq.core.solver import round_to_nearest
from gptq.formats.gguf.names import (
    ARCHITECTURES,
    BIASED,
    BLOCK_NAMES,
    EXPERT_NAME,
    EXPERT_ROLES,
    HEADS,
    LAYER_NORM,
    ROPE_PERMUTED,
    STANDARD_NAMES,
    TOP_NAMES,
)
from gptq.formats.gguf.rules import FILE_TYPES, check_moe, layer_type, output_type
from gptq.formats.gguf.tokenizer import vocab
from gptq.models.architectures import for_config


@dataclass(frozen=True)
class GgmlLinear:
    """One solved linear as GGML blocks (CPU): uint8 [out, bytes per row]."""

    blocks: torch.Tensor
    type: str
    bias: torch.Tensor | None

    @staticmethod
    def from_result(r, t: str, bias) -> GgmlLinear:
        blocks = pack_blocks(t, r.codes.cpu(), r.scales.cpu(), r.zeros.cpu(),
                             None if r.scale_state is None else r.scale_state.to("cpu"))
        return GgmlLinear(blocks, t, None if bias is None else bias.detach().to("cpu", torch.float32))

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        t = {f"{prefix}.weight.ggml_{self.type}": self.blocks}
        if self.bias is not None:
            t[f"{prefix}.bias"] = self.bias
        return t


def staged_weight(tensors: dict, prefix: str) -> tuple[str, torch.Tensor] | None:
    """(type, blocks) of a staged linear, or None."""
    for t in TYPES:
        if f"{prefix}.weight.ggml_{t}" in tensors:
            return t, tensors[f"{prefix}.weight.ggml_{t}"]
    return None


def dequantize_staged(t: str, blocks: torch.Tensor) -> torch.Tensor:
    """[out, in] float32 weight of staged blocks (the gguf package's dequantizer)."""
    tt = TYPES[t]
    return dequantize_blocks(t, blocks, blocks.shape[1] // tt.block_bytes * tt.block_weights)


def neox_qkv_rows(x: torch.Tensor, heads: int) -> torch.Tensor:
    """GPT-NeoX's fused query_key_value rows (or bias) from Hugging Face's per-head [q, k, v] order
    to all q rows, then all k, then all v, as conversion/gptneox.py reorders them for llama.cpp."""
    return x.reshape(heads, 3, x.shape[0] // heads // 3, *x.shape[1:]).transpose(0, 1).reshape(x.shape)


def rope_permute(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of q/k (or their blocks) from Hugging Face's rotary layout (two halves per head) to
    llama.cpp's (pairs interleaved)."""
    return x.reshape(heads, 2, x.shape[0] // heads // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def round_tensor(w: torch.Tensor, t: str) -> torch.Tensor:
    """A tensor that is not solved (embeddings, untied head) rounded to GGML type t: blocks."""
    r = round_to_nearest(w.float(), QuantConfig(act_order="none"), GridSpec.ggml(t))
    return pack_blocks(t, r.codes, r.scales, r.zeros, r.scale_state)


def _phi3_rope(w, hf: dict, rope: dict, rope_dims: int) -> None:
    """Phi-3's rotary metadata as conversion/phi.py writes it: the original context, the sliding
    window (0: none), and for the long-context (longrope / su) variants the attention factor and the
    long / short frequency factors, as F32 tensors ``rope_factors_long`` / ``rope_factors_short``."""
    max_pos = hf["max_position_embeddings"]
    orig = rope.get("original_max_position_embeddings") or hf.get("original_max_position_embeddings") or max_pos
    w.add_rope_scaling_orig_ctx_len(orig)
    w.add_sliding_window(hf.get("sliding_window") or 0)
    long, short = rope.get("long_factor"), rope.get("short_factor")
    if not long:
        return
    kind = str(rope.get("rope_type", rope.get("type", ""))).lower()
    scale = max_pos / orig
    if kind in ("su", "longrope"):
        w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1.0 else 1.0)
    else:
        raise ValueError(f"GGUF output: Phi-3 rope scaling {kind!r} is not supported (longrope / su are)")
    if not short or len(long) != len(short) or len(long) != rope_dims // 2:
        raise ValueError(f"GGUF output: Phi-3 rope long/short factors must both have {rope_dims // 2} entries")
    w.add_tensor("rope_factors_long.weight", np.asarray(long, dtype=np.float32))
    w.add_tensor("rope_factors_short.weight", np.asarray(short, dtype=np.float32))


@dataclass
class _Model:
    """What the writer needs to know of the model, read once from its config.json."""

    hf: dict  # config.json, with GPT-2's names also under the usual ones
    arch: str  # llama.cpp's architecture name
    blocks: str  # the block list's prefix in the stage's tensor names
    n_layers: int
    heads: int
    kv: int  # key/value heads
    n_expert: int


def _model(stage: Path, extra: dict | None = None) -> _Model:
    """``stage``'s config.json (and ``extra`` keys over it) as the writer reads it."""
    hf = json.loads((stage / "config.json").read_text()) | (extra or {})
    arch = ARCHITECTURES.get(hf.get("model_type"))
    if arch is None:
        raise ValueError(f"GGUF output supports the {sorted(ARCHITECTURES)} families so far, not {hf.get('model_type')!r}")
    check_moe(hf)
    hf = {**{std: hf[k] for k, std in STANDARD_NAMES.items() if hf.get(k) is not None}, **hf}
    if arch == "gpt2":  # n_inner None means 4 x n_embd (what GPT2MLP builds, whatever else config.json holds)
        hf["intermediate_size"] = hf.get("n_inner") or 4 * hf["hidden_size"]
    heads = hf["num_attention_heads"]
    kv = hf.get("num_key_value_heads") or heads
    if arch in ("gpt2", "gptneox"):  # no grouped-query attention in these families (a stray config key aside)
        kv = heads
    blocks = for_config(SimpleNamespace(model_type=hf["model_type"])).blocks + "."  # the family record's
    return _Model(hf, arch, blocks, hf["num_hidden_layers"], heads, kv,
                  hf.get("num_local_experts") or hf.get("num_experts") or 0)


ROTATION_KEY = "gptq.rotation"


def _write_metadata(w, m: _Model, ftype: str, stage: Path) -> None:
    """The key-value metadata as convert_hf_to_gguf writes it for the architecture, and the tokenizer."""
    hf, arch = m.hf, m.arch
    w.add_block_count(m.n_layers)
    w.add_context_length(hf["max_position_embeddings"])
    w.add_embedding_length(hf["hidden_size"])
    w.add_feed_forward_length(hf["intermediate_size"])
    w.add_head_count(m.heads)
    w.add_head_count_kv(m.kv)
    if m.n_expert:
        w.add_expert_count(m.n_expert)
        w.add_expert_used_count(hf["num_experts_per_tok"])
        if hf.get("moe_intermediate_size"):
            w.add_expert_feed_forward_length(hf["moe_intermediate_size"])
    rope_params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_theta = rope_params.get("rope_theta", hf.get("rope_theta"))
    if rope_theta is not None:
        w.add_rope_freq_base(rope_theta)
    if arch in LAYER_NORM:
        w.add_layer_norm_eps(hf.get("layer_norm_eps", hf.get("layer_norm_epsilon")))
    else:
        w.add_layer_norm_rms_eps(hf["rms_norm_eps"])
    if arch == "gptneox":
        w.add_parallel_residual(hf.get("use_parallel_residual", True))
    w.add_file_type(FILE_TYPES[ftype][0])
    w.add_vocab_size(hf["vocab_size"])
    head_dim = hf.get("head_dim") or hf["hidden_size"] // m.heads
    partial = rope_params.get("partial_rotary_factor", hf.get("partial_rotary_factor", hf.get("rotary_pct", 1.0)))
    # conversion/phi.py rounds the rotary width over the whole embedding, the others per head
    rope_dims = int(partial * hf["hidden_size"]) // m.heads if arch in ("phi2", "phi3") else int(head_dim * partial)
    w.add_type("model")
    if arch != "gpt2":  # (learned position embeddings: no rotary)
        w.add_rope_dimension_count(rope_dims)
    if arch == "phi3":
        _phi3_rope(w, hf, rope_params, rope_dims)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if hf.get("gptq_rotation"):  # the weights were rotated before solving (gptq.models.rotation); engines ignore it
        w.add_string(ROTATION_KEY, json.dumps(hf["gptq_rotation"], sort_keys=True))
    vocab(w, stage, hf, add_bos=False if arch == "phi2" else None)  # conversion/phi.py: Phi2Model, no BOS


class _Tensors:
    """Adds tensors to the writer, counting parameters, bytes and types for the report."""

    def __init__(self, w):
        self.w, self.counts, self.n_params, self.n_bytes = w, {}, 0, 0

    def add(self, name: str, data: np.ndarray, t: str | None, params: int) -> None:
        if t is None:
            self.w.add_tensor(name, data)
        else:
            self.w.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType[t.upper()])
        self.counts[t or "f32"] = self.counts.get(t or "f32", 0) + 1
        self.n_params += params
        self.n_bytes += data.nbytes


def _add_tensor(out: _Tensors, m: _Model, ftype: str, name: str, key: str, x: torch.Tensor, tied: bool) -> None:
    """One stage tensor under its GGUF name: solved blocks as they are (rows reordered where llama.cpp
    lays them out differently), norms/biases/routers in F32, embeddings and an untied head rounded."""
    staged = key.rsplit(".ggml_", 1)
    if len(staged) == 2:  # solved blocks
        t = staged[1]
        if m.arch in ROPE_PERMUTED and name.endswith("attn_q.weight"):
            x = rope_permute(x, m.heads)
        elif m.arch in ROPE_PERMUTED and name.endswith("attn_k.weight"):
            x = rope_permute(x, m.kv)
        elif m.arch == "gptneox" and name.endswith("attn_qkv.weight"):
            x = neox_qkv_rows(x, m.heads)
        out.add(name, x.numpy(), t, x.shape[0] * x.shape[1] // TYPES[t].block_bytes * TYPES[t].block_weights)
    elif _plain(name, x.dim()):
        # norms, biases, MoE routers, GPT-2's position embeddings: F32, as the converter keeps them
        if m.arch == "gptneox" and name.endswith("attn_qkv.bias"):
            x = neox_qkv_rows(x, m.heads)
        out.add(name, x.float().numpy(), None, x.numel())
    else:  # token embeddings / untied head: rounded, as llama.cpp would type them
        t = _edge_type(ftype, name, x.shape[1], tied, m.n_layers)
        out.add(name, round_tensor(x, t).numpy(), t, x.numel())


def _plain(name: str, ndim: int) -> bool:
    """Whether a tensor that is not a solved linear stays F32 (norms, biases, MoE routers, GPT-2's
    position embeddings), as the converter keeps them."""
    return ndim == 1 or name.endswith(("ffn_gate_inp.weight", "position_embd.weight"))


def _edge_type(ftype: str, name: str, cols: int, tied: bool, n_layers: int) -> str:
    """The type of the token embeddings or the head: the head's (also the embeddings' when tied to it),
    else the embeddings' own, as llama-quantize picks them for ``ftype``."""
    if name == "output.weight" or tied:
        return output_type(ftype, cols)
    return layer_type(ftype, "token_embd", 0, n_layers, cols)


def _add_experts(out: _Tensors, m: _Model, experts: dict) -> None:
    """A layer's experts of one role merged into one 3-D tensor [n_expert, rows, bytes per row]."""
    for (i, role), by_expert in sorted(experts.items(), key=lambda kv: (int(kv[0][0]), kv[0][1])):
        types = {t for t, _ in by_expert.values()}
        if sorted(by_expert) != list(range(m.n_expert)) or len(types) != 1:
            raise ValueError(f"layer {i} {role}: experts {sorted(by_expert)} of types {sorted(types)}; expected "
                             f"all {m.n_expert} in one type")
        t = types.pop()
        x = torch.stack([by_expert[e][1] for e in range(m.n_expert)])  # [n_expert, rows, bytes per row]
        out.add(f"blk.{i}.{role}.weight", x.numpy(), t, x.shape[0] * x.shape[1] * x.shape[2] // TYPES[t].block_bytes
                * TYPES[t].block_weights)


def gguf_name(key: str, m: _Model) -> tuple[str | None, tuple | None]:
    """A stage (or source) tensor's GGUF name, or for a routed expert's weight (layer, role, expert)
    of the merged tensor it joins: (name, None) or (None, (layer, role, expert))."""
    if key.endswith(".bias") and m.arch not in BIASED:
        raise ValueError(f"{key}: biases are not written to GGUF for the {m.arch} architecture")
    base = key.split(".weight")[0].removesuffix(".bias")
    suffix = "bias" if key.endswith(".bias") else "weight"
    if base.startswith(m.blocks):
        i, rest = base[len(m.blocks):].split(".", 1)
        expert = EXPERT_NAME.match(rest)
        if expert:
            return None, (i, EXPERT_ROLES[expert.group(2)], int(expert.group(1)))
        return f"blk.{i}.{BLOCK_NAMES[rest]}.{suffix}", None
    if base in TOP_NAMES:
        return f"{TOP_NAMES[base]}.{suffix}", None
    raise ValueError(f"{key}: no GGUF name for this tensor")


def padded(nbytes: int) -> int:
    """A tensor's bytes in the file: its data padded to the writer's alignment."""
    return gguf.GGUFWriter.ggml_pad(nbytes, gguf.GGUF_DEFAULT_ALIGNMENT)


def _has_head(keys) -> bool:
    """Whether a checkpoint's tensors (``keys``, staged ``.ggml_<type>`` ones included) hold an output
    head of their own (``lm_head``, GPT-NeoX's ``embed_out``): if not, the head is tied to the token
    embeddings, which then take the head's type."""
    return any(k.split(".ggml_")[0] in HEADS for k in keys)


def fixed_file_bytes(source: Path, ftype: str, quantized: set[str], extra: dict | None, untied: bool) -> int:
    """The bytes of the .gguf that ``write_gguf`` would write from ``source`` (a model directory) that do
    not depend on the decoder linears' types: the header, metadata and tokenizer, every tensor's info,
    and the data of every tensor that is not a quantized linear (``quantized``: their source names,
    ``<m>.weight``), each padded to the alignment. ``extra``: keys the stage's config.json will add
    (the rotation record); ``untied``: a head will be stored though the source ties it. A dry run of
    the writer (headers only) into a temporary file."""
    m = _model(source, extra)
    shapes = {}
    for f in sorted(source.glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            shapes.update({k: tuple(h.get_slice(k).get_shape()) for k in h.keys()})
    tied = not untied and not _has_head(shapes)
    if untied and not _has_head(shapes):
        shapes["lm_head.weight"] = next(v for k, v in shapes.items() if k.endswith(("embed_tokens.weight", "wte.weight")))
    scratch = Path(tempfile.mkdtemp(prefix="gptq-gguf-size-")) / "dry.gguf"
    w = gguf.GGUFWriter(scratch, m.arch)
    w.add_name(source.name)
    _write_metadata(w, m, ftype, source)
    data = sum(padded(ti.nbytes) for ti in w.tensors[-1].values())  # tensors the metadata adds (Phi-3's rope factors)
    experts: dict[tuple[str, str], tuple] = {}  # (layer, role) → the merged tensor's shape [n_expert, rows, cols]
    for key in sorted(shapes):
        name, expert = gguf_name(key, m)
        shape = shapes[key]
        if expert is not None:  # joins its layer's tensor of that role, on the budget's one type for them
            if key not in quantized:
                raise ValueError(f"{key}: expert tensors are written as solved GGML blocks only")
            experts[expert[:2]] = (m.n_expert, *shape)
            continue
        if key in quantized:  # its type is the budget's choice: the info's size does not depend on it
            w.add_tensor_info(name, shape, np.float32, 0, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            continue
        if _plain(name, len(shape)):
            t, nbytes = None, 4 * math.prod(shape)
        else:
            t = _edge_type(ftype, name, shape[1], tied, m.n_layers)
            nbytes = shape[0] * shape[1] // TYPES[t].block_weights * TYPES[t].block_bytes
        w.add_tensor_info(name, shape, np.float32, nbytes,
                          raw_dtype=None if t is None else gguf.GGMLQuantizationType[t.upper()])
        data += padded(nbytes)
    for (i, role), shape in sorted(experts.items()):
        w.add_tensor_info(f"blk.{i}.{role}.weight", shape, np.float32, 0, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        w.close()
        head = scratch.stat().st_size
    finally:
        shutil.rmtree(scratch.parent, ignore_errors=True)
    return padded(head) + data


def write_gguf(stage: Path, path: Path, ftype: str, source: Path | None = None) -> dict:
    """Write the GGUF file ``path`` from a staged checkpoint (``stage``: config.json, tokenizer,
    safetensors with GGML blocks); written to a temporary name and renamed when complete.
    Returns what llama.cpp's quantizer reports: file size, parameters, bits per weight, types."""
    m = _model(stage)
    tmp = path.with_name(path.name + ".partial")
    w = gguf.GGUFWriter(tmp, m.arch)
    w.add_name(Path(source or stage).name)
    _write_metadata(w, m, ftype, stage)
    handles = [safe_open(f, "pt") for f in sorted(stage.glob("*.safetensors"))]
    where = {k: h for h in handles for k in h.keys()}
    tied = not _has_head(where)
    out = _Tensors(w)
    experts: dict[tuple[str, str], dict[int, tuple[str, torch.Tensor]]] = {}  # (layer, role) → {e: blocks}
    for key in sorted(where):
        name, expert = gguf_name(key, m)
        if expert is not None:
            staged = key.rsplit(".ggml_", 1)
            if not key.split(".ggml_")[0].endswith(".weight") or len(staged) != 2:
                raise ValueError(f"{key}: expert tensors are written as solved GGML blocks only")
            experts.setdefault((expert[0], expert[1]), {})[expert[2]] = (staged[1], where[key].get_tensor(key))
            continue
        _add_tensor(out, m, ftype, name, key, where[key].get_tensor(key), tied)
    _add_experts(out, m, experts)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()
    os.replace(tmp, path)
    size = path.stat().st_size
    return {"file": path.name, "file_type": ftype, "bytes": size, "MiB": round(size / 2**20, 2),
            "parameters": out.n_params, "tensors_MiB": round(out.n_bytes / 2**20, 2),
            "bits_per_weight": round(8 * out.n_bytes / out.n_params, 4),
            "tensor_types": dict(sorted(out.counts.items())),
            "type_bits_per_weight": {t: bits_per_weight(t) for t in out.counts if t != "f32"}}

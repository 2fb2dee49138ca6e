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
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gptq.core.grids.ggml import TYPES, bits_per_weight, dequantize_blocks, pack_blocks

# file type → (llama.cpp's LLAMA_FTYPE_MOSTLY_* number, the default block type)
FILE_TYPES = {"q4_0": (2, "q4_0"), "q4_1": (3, "q4_1"), "q8_0": (7, "q8_0"), "q5_0": (8, "q5_0"),
              "q5_1": (9, "q5_1"), "q4_k_s": (14, "q4_k"), "q4_k_m": (15, "q4_k"), "q5_k_s": (16, "q5_k"),
              "q5_k_m": (17, "q5_k"), "q6_k": (18, "q6_k")}
FALLBACK = {"q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}  # when a row is not a multiple of 256

# Hugging Face Llama names → GGUF names
BLOCK_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
               "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}  # (Qwen3's per-head norms)
TOP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
             "model.final_layernorm": "output_norm",  # (Phi-1/2's final LayerNorm)
             "transformer.wte": "token_embd", "transformer.wpe": "position_embd", "transformer.ln_f": "output_norm",
             "gpt_neox.embed_in": "token_embd", "gpt_neox.final_layer_norm": "output_norm", "embed_out": "output"}
BLOCK_PREFIX = {"gpt2": "transformer.h.", "gptneox": "gpt_neox.layers."}  # where the blocks are (else model.layers.)
# GPT-2's config.json names → the usual ones
STANDARD_NAMES = {"n_layer": "num_hidden_layers", "n_head": "num_attention_heads", "n_embd": "hidden_size",
                  "n_positions": "max_position_embeddings", "n_inner": "intermediate_size"}
BLOCK_NAMES.update({"mlp.gate": "ffn_gate_inp", "block_sparse_moe.gate": "ffn_gate_inp",  # MoE routers
                    "self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up",  # Phi-3's fused linears
                    "self_attn.dense": "attn_output", "mlp.fc1": "ffn_up", "mlp.fc2": "ffn_down",  # Phi-1/2
                    "ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output",  # GPT-2
                    "ln_2": "ffn_norm", "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down",
                    "attention.query_key_value": "attn_qkv", "attention.dense": "attn_output",  # GPT-NeoX
                    "mlp.dense_h_to_4h": "ffn_up", "mlp.dense_4h_to_h": "ffn_down"})
# a routed expert's linear (our names or Mixtral's on disk) → the role of its layer's merged 3-D tensor
EXPERT_ROLES = {"gate_proj": "ffn_gate_exps", "w1": "ffn_gate_exps", "up_proj": "ffn_up_exps", "w3": "ffn_up_exps",
                "down_proj": "ffn_down_exps", "w2": "ffn_down_exps"}
EXPERT_NAME = re.compile(r"^(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w2|w3)$")
# HF model_type → GGUF architecture, as convert_hf_to_gguf.py maps them (conversion/llama.py:
# Mistral and Mixtral → the llama converter, which merges Mixtral's experts; conversion/qwen.py:
# Qwen2Model, Qwen3Model, Qwen3MoeModel)
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "mixtral": "llama",
                 "qwen3_moe": "qwen3moe", "phi3": "phi3", "phi": "phi2", "gpt2": "gpt2", "gpt_neox": "gptneox"}
BIASED = {"qwen2", "phi2", "gpt2", "gptneox"}  # architectures whose linears (and LayerNorms) carry biases (F32)
LAYER_NORM = {"phi2", "gpt2", "gptneox"}  # LayerNorm (epsilon key layer_norm_epsilon), not RMSNorm
# llama.cpp runs the llama architecture's rotary embedding on interleaved pairs, so its converter
# permutes q/k rows (LlamaModel.permute); qwen2/qwen3 use the NEOX layout (halves), as Hugging Face
ROPE_PERMUTED = {"llama"}


def _more_bits(i: int, n: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth of the layers and every third between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _fits(t: str, cols: int) -> str:
    """t, or llama.cpp's fallback when ``cols`` is not a multiple of its block."""
    if cols % TYPES[t].block_weights == 0:
        return t
    t = FALLBACK.get(t, t)
    if cols % TYPES[t].block_weights:
        raise ValueError(f"rows of {cols} weights fit no GGML block type (need a multiple of 32)")
    return t


def role_of(rest: str) -> str:
    """The GGUF role of a block's linear (``self_attn.v_proj`` → attn_v; a routed expert's linear →
    ffn_gate_exps / ffn_up_exps / ffn_down_exps)."""
    m = EXPERT_NAME.match(rest)
    return EXPERT_ROLES[m.group(2)] if m else BLOCK_NAMES[rest]


def layer_type(ftype: str, role: str, i: int, n_layers: int, cols: int, calibrated: bool = True,
               n_expert: int = 0) -> str:
    """The GGML type llama.cpp gives a decoder linear (role: the GGUF name, e.g. "attn_v", or a
    merged expert tensor, e.g. "ffn_down_exps") of layer i.

    calibrated: llama-quantize's choices when it has an importance matrix (``has_imatrix``), as
    every GPTQ file is calibrated: the first eighth of the ffn_down tensors of a Q4_0 / Q5_0 file
    get Q4_1 / Q5_1 ("guard against craziness in the first few ffn_down layers", llama-quant.cpp).
    n_expert: llama-quant.cpp gives 8-expert models (Mixtral-8x7B's kind) Q8_0 attn_k / attn_v
    ("bumping this to Q8_0 trades just ~128MB") and Q5_K attn_output in the K-quant mixes."""
    t = FILE_TYPES[ftype][1]
    if role == "attn_v":
        if ftype in ("q4_k_m", "q5_k_m") and _more_bits(i, n_layers):
            t = "q6_k"
        elif ftype == "q4_k_s" and i < 4:
            t = "q5_k"
        if n_expert == 8:
            t = "q8_0"
    elif role == "attn_qkv" and ftype in ("q4_k_m", "q5_k_m"):  # fused q/k/v (Phi-3)
        t = {"q4_k_m": "q5_k", "q5_k_m": "q6_k"}[ftype]
    elif role == "attn_k" and n_expert == 8:
        t = "q8_0"
    elif role == "attn_output" and n_expert == 8 and ftype in ("q4_k_s", "q4_k_m"):
        t = "q5_k"
    elif role.startswith("ffn_down"):  # llama.cpp matches the name: ffn_down and ffn_down_exps alike
        if ftype in ("q4_k_m", "q5_k_m") and _more_bits(i, n_layers):
            t = "q6_k"
        elif ftype == "q4_k_s" and i < n_layers // 8:
            t = "q5_k"
        elif ftype in ("q4_0", "q5_0") and calibrated and i < n_layers // 8:
            t = {"q4_0": "q4_1", "q5_0": "q5_1"}[ftype]
    return _fits(t, cols)


def output_type(ftype: str, cols: int) -> str:
    """The output head's type (also the token embeddings' when they are tied to it)."""
    base = FILE_TYPES[ftype][1]
    if cols % TYPES[base].block_weights or base == "q8_0":
        return "q8_0"
    return _fits("q6_k", cols)


def plan(ftype: str, model_type: str, linears: dict[str, int], blocks: str = "model.layers",
         n_expert: int = 0) -> tuple[str, tuple]:
    """(default type, ((linear, type), ...)) for the decoder linears {full name: input size}
    (routed experts by their own names, ``mlp.experts.3.down_proj``; n_expert routed per block)."""
    if ftype not in FILE_TYPES:
        raise ValueError(f"unknown GGUF type {ftype!r}; choose one of {sorted(FILE_TYPES)}")
    if model_type not in ARCHITECTURES:
        raise ValueError(f"GGUF output supports the {sorted(ARCHITECTURES)} families so far, not {model_type!r}")
    n_layers = 1 + max(int(n[len(blocks) + 1:].split(".")[0]) for n in linears)
    default = FILE_TYPES[ftype][1]
    per = []
    for name, cols in sorted(linears.items()):
        i, rest = name[len(blocks) + 1:].split(".", 1)
        t = layer_type(ftype, role_of(rest), int(i), n_layers, cols, n_expert=n_expert)
        if t != default:
            per.append((name, t))
    return default, tuple(per)


def check_moe(hf: dict) -> None:
    """Refuse mixture-of-experts models llama.cpp would run differently, or whose layout the GGUF
    writer does not handle yet (dense MLP layers between sparse ones)."""
    if hf.get("model_type") != "qwen3_moe":
        return
    if hf.get("mlp_only_layers") or hf.get("decoder_sparse_step", 1) != 1:
        raise ValueError("GGUF output: Qwen3-MoE models with dense MLP layers (mlp_only_layers / "
                         "decoder_sparse_step) are not supported yet")
    if not hf.get("norm_topk_prob", False):  # llama.cpp's qwen3moe graph renormalises (build_moe_ffn norm_w)
        raise ValueError("GGUF output: this Qwen3-MoE model does not renormalise its top-k router weights "
                         "(norm_topk_prob false), but llama.cpp's qwen3moe always does, so the file would compute "
                         "a different model; released Qwen3-MoE models set norm_topk_prob true")


@dataclass(frozen=True)
class GgmlLinear:
    """One solved linear as GGML blocks (CPU): uint8 [out, bytes per row]."""

    blocks: torch.Tensor
    type: str
    bias: torch.Tensor | None

    @staticmethod
    def from_result(r, t: str, bias) -> "GgmlLinear":
        blocks = pack_blocks(t, r.codes.cpu(), r.scales.cpu(), r.zeros.cpu(),
                             None if r.scale_state is None else r.scale_state.to("cpu"))
        return GgmlLinear(blocks, t, None if bias is None else bias.detach().to("cpu", torch.float32))

    def permute_outputs(self, perm: torch.Tensor, bits: int = 4, checkpoint_format: str = "") -> "GgmlLinear":
        return GgmlLinear(self.blocks[perm].contiguous(), self.type,
                          None if self.bias is None else self.bias[perm].contiguous())

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
    from gptq.core.config import QuantConfig
    from gptq.core.solver import round_to_nearest

    tt = TYPES[t]
    cfg = QuantConfig(bits=tt.bits, group_size=tt.group, grid=t, act_order="none")
    r = round_to_nearest(w.float(), cfg)
    return pack_blocks(t, r.codes, r.scales, r.zeros, r.scale_state)


def _vocab(writer, source: Path, hf: dict, add_bos: bool | None = None) -> None:
    """The tokenizer as convert_hf_to_gguf writes it: a byte-level BPE one as ``gpt2``, a
    SentencePiece-style one (BPE on ▁-joined text with byte-fallback tokens, as transformers
    converts Llama 2 / Mistral / Mixtral / Phi-3 tokenizers) as ``llama``."""
    import gguf
    from transformers import AutoTokenizer

    model = _tokenizer_model(source)
    spm = bool(model.get("byte_fallback"))
    tok = AutoTokenizer.from_pretrained(source)
    vocab_size = hf.get("vocab_size", len(tok.get_vocab()))
    reverse = {i: t for t, i in tok.get_vocab().items()}
    added = tok.added_tokens_decoder
    if spm:  # merge order as scores: llama.cpp's SentencePiece tokenizer merges the best-scored pair first
        rank: dict[str, int] = {}
        for r, m in enumerate(model.get("merges", [])):
            a, b = m.split(" ", 1) if isinstance(m, str) else m
            rank.setdefault(a + b, r)
    tokens, types, scores = [], [], []
    for i in range(vocab_size):
        text = reverse.get(i)
        score = 0.0
        if text is None:
            text, kind = f"[PAD{i}]", gguf.TokenType.UNUSED
        elif spm and i == tok.unk_token_id:
            kind = gguf.TokenType.UNKNOWN
        elif i in added:
            kind = gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED
        elif spm and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text):
            kind = gguf.TokenType.BYTE
        else:
            kind = gguf.TokenType.NORMAL
            if spm:
                score = -float(rank.get(text, len(rank) + i))
        tokens.append(text)
        types.append(kind)
        scores.append(score)
    if spm:
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        first = tok.tokenize("a")
        writer.add_add_space_prefix(bool(first) and first[0].startswith("\u2581"))
        special = gguf.SpecialVocab(source, load_merges=False, n_vocab=len(tokens))
        special.add_to_gguf(writer)
        return
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer(tok, source))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(source, load_merges=True, n_vocab=len(tokens))
    if add_bos is not None:  # the converter's choice for the family (Phi-2: no BOS)
        special.add_special_token["bos"] = add_bos
    special.add_to_gguf(writer)
    if "bos" not in special.add_special_token:  # convert_hf_to_gguf writes it even when false
        writer.add_add_bos_token(False)


def _tokenizer_model(source: Path) -> dict:
    """The ``model`` entry of ``tokenizer.json``, refused unless GGUF can express it (BPE)."""
    if not (source / "tokenizer.json").is_file():
        raise ValueError(f"{source}: GGUF output needs a fast tokenizer (tokenizer.json)")
    model = json.loads((source / "tokenizer.json").read_text())["model"]
    if model["type"] != "BPE":
        raise ValueError(f"{source}: tokenizer model {model['type']!r}; GGUF output supports BPE tokenizers "
                         "(byte-level, or SentencePiece-style with byte fallback) so far")
    return model


def check_tokenizer(source: Path) -> str:
    """Refuse a tokenizer the GGUF writer cannot express, before any work; returns the GGUF
    tokenizer model ("gpt2" or "llama")."""
    from transformers import AutoTokenizer

    if _tokenizer_model(source).get("byte_fallback"):
        return "llama"
    pre_tokenizer(AutoTokenizer.from_pretrained(source), source)
    return "gpt2"


def pre_tokenizer(tok, source: Path) -> str:
    """llama.cpp's name for the pre-tokenizer (``tokenizer.ggml.pre``), which it requires to load a
    BPE vocabulary. Recognised from the vocabulary; ``GPTQ_GGUF_PRE`` overrides."""
    if os.environ.get("GPTQ_GGUF_PRE"):
        return os.environ["GPTQ_GGUF_PRE"]
    v = tok.get_vocab()
    if len(v) == 49152 and "<|im_start|>" in v:
        return "smollm"  # SmolLM / SmolLM2 (HuggingFaceTB)
    if "<|begin_of_text|>" in v:
        return "llama-bpe"  # Llama 3
    if len(v) == 50257 and "<|endoftext|>" in v:
        return "gpt-2"  # GPT-2's own vocabulary
    if len(v) >= 151000 and "<|endoftext|>" in v and "<|im_start|>" in v:
        return "qwen2"  # Qwen2, Qwen2.5, Qwen3 (the same BPE and pre-tokenizer)
    raise ValueError(f"{source}: cannot tell llama.cpp's pre-tokenizer for this BPE vocabulary; set GPTQ_GGUF_PRE "
                     "to the name convert_hf_to_gguf.py would write (e.g. llama-bpe, smollm, qwen2)")


def _phi3_rope(w, hf: dict, rope: dict, rope_dims: int) -> None:
    """Phi-3's rotary metadata as conversion/phi.py writes it: the original context, the sliding
    window (0: none), and for the long-context (longrope / su) variants the attention factor and the
    long / short frequency factors, as F32 tensors ``rope_factors_long`` / ``rope_factors_short``."""
    import math

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


def write_gguf(stage: Path, path: Path, ftype: str, source: Path | None = None) -> dict:
    """Write the GGUF file ``path`` from a staged checkpoint (``stage``: config.json, tokenizer,
    safetensors with GGML blocks); written to a temporary name and renamed when complete.
    Returns what llama.cpp's quantizer reports: file size, parameters, bits per weight, types."""
    import gguf
    from safetensors import safe_open

    hf = json.loads((stage / "config.json").read_text())
    arch = ARCHITECTURES.get(hf.get("model_type"))
    if arch is None:
        raise ValueError(f"GGUF output supports the {sorted(ARCHITECTURES)} families so far, not {hf.get('model_type')!r}")
    check_moe(hf)
    hf = {**{std: hf[k] for k, std in STANDARD_NAMES.items() if hf.get(k) is not None}, **hf}
    if arch == "gpt2":  # n_inner None means 4 x n_embd (what GPT2MLP builds, whatever else config.json holds)
        hf["intermediate_size"] = hf.get("n_inner") or 4 * hf["hidden_size"]
    blocks = BLOCK_PREFIX.get(arch, "model.layers.")
    n_expert = hf.get("num_local_experts") or hf.get("num_experts") or 0
    tmp = path.with_name(path.name + ".partial")
    w = gguf.GGUFWriter(tmp, arch)
    w.add_name(Path(source or stage).name)
    n_layers = hf["num_hidden_layers"]
    heads, kv = hf["num_attention_heads"], hf.get("num_key_value_heads") or hf["num_attention_heads"]
    if arch in ("gpt2", "gptneox"):  # no grouped-query attention in these families (a stray config key aside)
        kv = heads
    w.add_block_count(n_layers)
    w.add_context_length(hf["max_position_embeddings"])
    w.add_embedding_length(hf["hidden_size"])
    w.add_feed_forward_length(hf["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    if n_expert:
        w.add_expert_count(n_expert)
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
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    partial = rope_params.get("partial_rotary_factor", hf.get("partial_rotary_factor", hf.get("rotary_pct", 1.0)))
    # conversion/phi.py rounds the rotary width over the whole embedding, the others per head
    rope_dims = int(partial * hf["hidden_size"]) // heads if arch in ("phi2", "phi3") else int(head_dim * partial)
    w.add_type("model")
    if arch != "gpt2":  # (learned position embeddings: no rotary)
        w.add_rope_dimension_count(rope_dims)
    if arch == "phi3":
        _phi3_rope(w, hf, rope_params, rope_dims)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _vocab(w, stage, hf, add_bos=False if arch == "phi2" else None)  # conversion/phi.py: Phi2Model, no BOS

    files = sorted(stage.glob("*.safetensors"))
    handles = [safe_open(f, "pt") for f in files]
    where = {k: h for h in handles for k in h.keys()}
    tied = "lm_head.weight" not in where and "lm_head.weight.ggml_q8_0" not in where
    counts: dict[str, int] = {}
    n_params = n_bytes = 0
    experts: dict[tuple[str, str], dict[int, tuple[str, torch.Tensor]]] = {}  # (layer, role) → {e: blocks}

    def add(name: str, data: np.ndarray, t: str | None, params: int):
        nonlocal n_params, n_bytes
        if t is None:
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType[t.upper()])
        counts[t or "f32"] = counts.get(t or "f32", 0) + 1
        n_params += params
        n_bytes += data.nbytes

    for key in sorted(where):
        if key.endswith(".bias") and arch not in BIASED:
            raise ValueError(f"{key}: biases are not written to GGUF for the {arch} architecture")
        base = key.split(".weight")[0].removesuffix(".bias")
        suffix = "bias" if key.endswith(".bias") else "weight"
        if base.startswith(blocks):
            i, rest = base[len(blocks):].split(".", 1)
            expert = EXPERT_NAME.match(rest)
            if expert:
                staged = key.rsplit(".ggml_", 1)
                if suffix != "weight" or len(staged) != 2:
                    raise ValueError(f"{key}: expert tensors are written as solved GGML blocks only")
                experts.setdefault((i, EXPERT_ROLES[expert.group(2)]), {})[int(expert.group(1))] = (
                    staged[1], where[key].get_tensor(key))
                continue
            name = f"blk.{i}.{BLOCK_NAMES[rest]}.{suffix}"
        elif base in TOP_NAMES:
            name = f"{TOP_NAMES[base]}.{suffix}"
        else:
            raise ValueError(f"{key}: no GGUF name for this tensor")
        x = where[key].get_tensor(key)
        staged = key.rsplit(".ggml_", 1)
        if len(staged) == 2:  # solved blocks
            t = staged[1]
            if arch in ROPE_PERMUTED and name.endswith("attn_q.weight"):
                x = rope_permute(x, heads)
            elif arch in ROPE_PERMUTED and name.endswith("attn_k.weight"):
                x = rope_permute(x, kv)
            elif arch == "gptneox" and name.endswith("attn_qkv.weight"):
                x = neox_qkv_rows(x, heads)
            params = x.shape[0] * x.shape[1] // TYPES[t].block_bytes * TYPES[t].block_weights
            add(name, x.numpy(), t, params)
        elif x.dim() == 1 or name.endswith(("ffn_gate_inp.weight", "position_embd.weight")):
            # norms, biases, MoE routers, GPT-2's position embeddings: F32, as the converter keeps them
            if arch == "gptneox" and name.endswith("attn_qkv.bias"):
                x = neox_qkv_rows(x, heads)
            add(name, x.float().numpy(), None, x.numel())
        else:  # token embeddings / untied head: rounded, as llama.cpp would type them
            t = output_type(ftype, x.shape[1]) if (name == "output.weight" or tied) else \
                layer_type(ftype, "token_embd", 0, n_layers, x.shape[1])
            add(name, round_tensor(x, t).numpy(), t, x.numel())
    for (i, role), by_expert in sorted(experts.items(), key=lambda kv: (int(kv[0][0]), kv[0][1])):
        types = {t for t, _ in by_expert.values()}
        if sorted(by_expert) != list(range(n_expert)) or len(types) != 1:
            raise ValueError(f"layer {i} {role}: experts {sorted(by_expert)} of types {sorted(types)}; expected "
                             f"all {n_expert} in one type")
        t = types.pop()
        x = torch.stack([by_expert[e][1] for e in range(n_expert)])  # [n_expert, rows, bytes per row]
        add(f"blk.{i}.{role}.weight", x.numpy(), t, x.shape[0] * x.shape[1] * x.shape[2] // TYPES[t].block_bytes
            * TYPES[t].block_weights)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()
    os.replace(tmp, path)
    size = path.stat().st_size
    return {"file": path.name, "file_type": ftype, "bytes": size, "MiB": round(size / 2**20, 2),
            "parameters": n_params, "tensors_MiB": round(n_bytes / 2**20, 2),
            "bits_per_weight": round(8 * n_bytes / n_params, 4),
            "tensor_types": dict(sorted(counts.items())),
            "type_bits_per_weight": {t: bits_per_weight(t) for t in counts if t != "f32"}}

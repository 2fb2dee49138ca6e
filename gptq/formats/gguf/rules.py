"""llama-quantize's choice of GGML type per tensor, as data and small rules.

From llama.cpp's ``src/llama-quant.cpp`` (``llama_tensor_get_type_impl`` and ``tensor_type_fallback``,
llama.cpp as vendored in llama-cpp-python 0.3.36), its 8-expert rules included. Not modelled: the
Falcon rules (no Falcon here) and the bump of attn_v to Q5_K in models llama.cpp classes as 70B.

Fused q/k/v (attn_qkv: Phi-3, GPT-2, GPT-NeoX) takes attn_v's rules in every file type:
``category_is_attn_v`` counts ATTENTION_QKV as attn_v, and ``llama_tensor_get_type_impl`` tests it
ahead of the branch written for ATTENTION_QKV (Q5_K in Q4_K_M, Q6_K in Q5_K_M, Q4_K in Q3_K_M/L),
which is therefore never reached. Its layer counter is attn_v's (``i_attention_wv`` over
``n_attention_wv``, one attn_qkv per block), so ``use_more_bits`` sees the block index and the
block count, as for attn_v.
"""

from __future__ import annotations

from gptq.core.grids.ggml import TYPES
from gptq.formats.gguf.names import ARCHITECTURES, BLOCK_NAMES, EXPERT_NAME, EXPERT_ROLES

# file type → (llama.cpp's LLAMA_FTYPE_MOSTLY_* number, the default block type)
FILE_TYPES = {"q4_0": (2, "q4_0"), "q4_1": (3, "q4_1"), "q8_0": (7, "q8_0"), "q5_0": (8, "q5_0"),
              "q5_1": (9, "q5_1"), "q2_k": (10, "q2_k"), "q3_k_s": (11, "q3_k"), "q3_k_m": (12, "q3_k"),
              "q3_k_l": (13, "q3_k"), "q4_k_s": (14, "q4_k"), "q4_k_m": (15, "q4_k"), "q5_k_s": (16, "q5_k"),
              "q5_k_m": (17, "q5_k"), "q6_k": (18, "q6_k"), "iq4_nl": (25, "iq4_nl")}
# when a row is not a multiple of 256 (iq4_nl's block is 32: it has no fallback)
FALLBACK = {"q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}
LOW_BIT = ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "iq4_nl")  # the file types ``_low_bit_type`` decides
# the roles llama-quant.cpp's ``category_is_attn_v`` takes as attn_v (its ATTENTION_KV_B, MLA's, is not written here)
ATTN_V = ("attn_v", "attn_qkv")


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


def n_gqa(hf: dict, model_type: str) -> int:
    """llama.cpp's ``n_gqa()``: attention heads per key/value head, from config.json's keys as the
    writer stores them (GPT-2 and GPT-NeoX have no grouped-query attention)."""
    heads = hf.get("num_attention_heads") or hf.get("n_head")
    kv = hf.get("num_key_value_heads") or heads
    if not heads or ARCHITECTURES.get(model_type) in ("gpt2", "gptneox"):
        return 1
    return heads // kv


def role_of(rest: str) -> str:
    """The GGUF role of a block's linear (``self_attn.v_proj`` → attn_v; a routed expert's linear →
    ffn_gate_exps / ffn_up_exps / ffn_down_exps)."""
    m = EXPERT_NAME.match(rest)
    return EXPERT_ROLES[m.group(2)] if m else BLOCK_NAMES[rest]


def _low_bit_type(ftype: str, role: str, i: int, n_layers: int, calibrated: bool, n_expert: int, n_gqa: int) -> str:
    """The type in a Q2_K, Q3_K_S/M/L or IQ4_NL file, before the fallback (attn_qkv as attn_v, see the
    module's note; llama-quantize's own Q3_K_M file of an 8-layer GPT-2, whose q/k/v are fused, agrees)."""
    t = FILE_TYPES[ftype][1]
    if n_expert == 8 and role in (*ATTN_V, "attn_k"):
        return "q8_0"
    if role in ATTN_V:
        if ftype == "q2_k":
            return "q4_k" if n_gqa >= 4 else "q3_k"
        if ftype == "q3_k_m":
            return "q5_k" if i < 2 else "q4_k"  # the first two attn_v tensors
        if ftype == "q3_k_l" or (ftype == "iq4_nl" and n_gqa >= 4):
            return "q5_k"
    elif role == "attn_output":
        if n_expert == 8:  # (Q3_K_L is not in llama.cpp's list)
            return t if ftype == "q3_k_l" else "q5_k"
        return {"q2_k": "q3_k", "q3_k_m": "q4_k", "q3_k_l": "q5_k"}.get(ftype, t)
    elif role.startswith("ffn_down"):
        if ftype == "q2_k":
            return "q3_k"
        if ftype == "q3_k_m":
            return "q5_k" if i < n_layers // 16 else "q4_k"
        if ftype == "q3_k_l":
            return "q5_k"
        if ftype == "iq4_nl" and not calibrated and i < n_layers // 8:
            return "q5_k"
    return t


def layer_type(ftype: str, role: str, i: int, n_layers: int, cols: int, calibrated: bool = True,
               n_expert: int = 0, n_gqa: int = 1) -> str:
    """The GGML type llama.cpp gives a decoder linear (role: the GGUF name, e.g. "attn_v", or a
    merged expert tensor, e.g. "ffn_down_exps") of layer i.

    calibrated: llama-quantize's choices when it has an importance matrix (``has_imatrix``), as
    every GPTQ file is calibrated: the first eighth of the ffn_down tensors of a Q4_0 / Q5_0 file
    get Q4_1 / Q5_1 ("guard against craziness in the first few ffn_down layers", llama-quant.cpp).
    n_expert: llama-quant.cpp gives 8-expert models (Mixtral-8x7B's kind) Q8_0 attn_k / attn_v
    ("bumping this to Q8_0 trades just ~128MB") and Q5_K attn_output in the K-quant mixes.
    n_gqa: attention heads per key/value head (Q2_K's and IQ4_NL's attn_v take more bits from 4 up)."""
    if ftype in LOW_BIT:
        return _fits(_low_bit_type(ftype, role, i, n_layers, calibrated, n_expert, n_gqa), cols)
    t = FILE_TYPES[ftype][1]
    if role in ATTN_V:  # attn_v and fused q/k/v alike (i: the block, as llama.cpp's i_attention_wv)
        if ftype in ("q4_k_m", "q5_k_m") and _more_bits(i, n_layers):
            t = "q6_k"
        elif ftype == "q4_k_s" and i < 4:
            t = "q5_k"
        if n_expert == 8:
            t = "q8_0"
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
         n_expert: int = 0, n_gqa: int = 1) -> tuple[str, tuple]:
    """(default type, ((linear, type), ...)) for the decoder linears {full name: input size}
    (routed experts by their own names, ``mlp.experts.3.down_proj``; n_expert routed per block;
    n_gqa attention heads per key/value head)."""
    if ftype not in FILE_TYPES:
        raise ValueError(f"unknown GGUF type {ftype!r}; choose one of {sorted(FILE_TYPES)}")
    if model_type not in ARCHITECTURES:
        raise ValueError(f"GGUF output supports the {sorted(ARCHITECTURES)} families so far, not {model_type!r}")
    n_layers = 1 + max(int(n[len(blocks) + 1:].split(".")[0]) for n in linears)
    default = FILE_TYPES[ftype][1]
    per = []
    for name, cols in sorted(linears.items()):
        i, rest = name[len(blocks) + 1:].split(".", 1)
        t = layer_type(ftype, role_of(rest), int(i), n_layers, cols, n_expert=n_expert, n_gqa=n_gqa)
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

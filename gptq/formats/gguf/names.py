"""GGUF tensor names and per-architecture facts, as convert_hf_to_gguf writes them: llama.cpp's
names and rules, cited data that belongs to the format. Where a family's blocks are comes from its
record in gptq.models.architectures, not from here."""

from __future__ import annotations

import re

# Hugging Face Llama names → GGUF names
BLOCK_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
               "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}  # (Qwen3's per-head norms)
TOP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
             "model.final_layernorm": "output_norm",  # (Phi-1/2's final LayerNorm)
             "transformer.wte": "token_embd", "transformer.wpe": "position_embd", "transformer.ln_f": "output_norm",
             "gpt_neox.embed_in": "token_embd", "gpt_neox.final_layer_norm": "output_norm", "embed_out": "output"}
HEADS = tuple(f"{k}.weight" for k, v in TOP_NAMES.items() if v == "output")  # a head of its own: not tied
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

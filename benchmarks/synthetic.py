"""Random Llama-shaped models written shard by shard, for the streaming benchmarks (scale, spill,
distributed)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig


def synthetic_llama(d: Path, hidden: int, inter: int, heads: int, kv: int, layers: int, vocab: int = 32000,
                    shards: int | None = None) -> Path:
    """A random Llama-shaped model written shard by shard, never whole in memory: one shard per block,
    plus one for the embedding, head and norm; or ``shards`` files in all, the blocks spread evenly
    over them and the last one also holding the embedding, head and norm."""
    d.mkdir(parents=True, exist_ok=True)
    LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads, num_key_value_heads=kv,
                num_hidden_layers=layers, vocab_size=vocab, max_position_embeddings=4096,
                tie_word_embeddings=False, dtype="bfloat16").save_pretrained(d)
    g = torch.Generator().manual_seed(0)
    hd = hidden // heads
    shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (kv * hd, hidden),
              "self_attn.v_proj": (kv * hd, hidden), "self_attn.o_proj": (hidden, hidden),
              "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden), "mlp.down_proj": (hidden, inter)}
    weight_map = {}
    n = shards or layers + 1
    groups = ([c.tolist() for c in torch.arange(layers).tensor_split(n)] if shards
              else [[i] for i in range(layers)] + [[]])
    for j, blocks in enumerate(groups):
        t = {}
        for i in blocks:
            t |= {f"model.layers.{i}.{k}.weight": (torch.randn(*sh, generator=g) / sh[1] ** 0.5).bfloat16()
                  for k, sh in shapes.items()}
            t |= {f"model.layers.{i}.{k}.weight": torch.ones(hidden, dtype=torch.bfloat16)
                  for k in ("input_layernorm", "post_attention_layernorm")}
        if j == n - 1:
            t |= {"model.embed_tokens.weight": (torch.randn(vocab, hidden, generator=g) * 0.02).bfloat16(),
                  "lm_head.weight": (torch.randn(vocab, hidden, generator=g) * 0.02).bfloat16(),
                  "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16)}
        name = f"model-{j + 1:05d}-of-{n:05d}.safetensors"
        save_file(t, d / name, metadata={"format": "pt"})
        weight_map |= {k: name for k in t}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return d

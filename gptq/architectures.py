"""What the generic loop needs to know about each model family, as data.

``blocks``      dotted path of the decoder block list.
``sequential``  the linears of one block, grouped in the order they are solved when
                --true-sequential is on: each group sees inputs produced by the already
                quantized groups before it. Linears in one group share their input.
``channels``    (consumer, producers) pairs whose shared channels may be reordered freely: the
                consumer's inputs are the producers' outputs through element-wise operations
                only (the MLP's intermediate dimension), so permuting the producers' output
                rows and the consumer's input columns alike leaves the block's function as it
                was. The loop uses it to give act-order's column order to the consumer while
                its g_idx stays k // group (see pipeline.sort_channels).
Conv1D layers (GPT-2) store their weight as [in, out]; the loop transposes them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Architecture:
    name: str
    model_types: tuple[str, ...]
    blocks: str
    sequential: tuple[tuple[str, ...], ...]
    channels: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(name for group in self.sequential for name in group)

    def children(self) -> tuple[str, ...]:
        """Direct sub-modules of a block that hold linears (e.g. ``self_attn``, ``mlp``), in order."""
        return tuple(dict.fromkeys(n.split(".")[0] for n in self.linears if "." in n))

    def linears_under(self, child: str) -> tuple[str, ...]:
        return tuple(n for n in self.linears if n.startswith(child + "."))


LLAMA = Architecture(
    "llama",
    ("llama", "mistral", "qwen2", "qwen3", "smollm3", "gemma", "gemma2", "olmo", "olmo2", "granite"),
    "model.layers",
    (
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.up_proj", "mlp.gate_proj"),
        ("mlp.down_proj",),
    ),
    channels=(("mlp.down_proj", ("mlp.gate_proj", "mlp.up_proj")),),  # down(act(gate) * up)
)
OPT = Architecture(
    "opt", ("opt",), "model.decoder.layers",
    (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.out_proj",), ("fc1",), ("fc2",)),
    channels=(("fc2", ("fc1",)),),
)
GPT_NEOX = Architecture(
    "gpt_neox", ("gpt_neox",), "gpt_neox.layers",
    (("attention.query_key_value",), ("attention.dense",), ("mlp.dense_h_to_4h",), ("mlp.dense_4h_to_h",)),
    channels=(("mlp.dense_4h_to_h", ("mlp.dense_h_to_4h",)),),
)
GPT2 = Architecture(
    "gpt2", ("gpt2",), "transformer.h",
    (("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
    channels=(("mlp.c_proj", ("mlp.c_fc",)),),
)
PHI = Architecture(  # attention and MLP read the same normalised input (parallel block)
    "phi", ("phi",), "model.layers",
    (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.fc1"), ("self_attn.dense",), ("mlp.fc2",)),
    channels=(("mlp.fc2", ("mlp.fc1",)),),
)
PHI3 = Architecture(
    "phi3", ("phi3",), "model.layers",
    (("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
)

ARCHITECTURES = (LLAMA, OPT, GPT_NEOX, GPT2, PHI, PHI3)


class UnsupportedModelError(ValueError):
    pass


def supported_model_types() -> list[str]:
    return sorted(t for a in ARCHITECTURES for t in a.model_types)


def for_config(config) -> Architecture:
    """The description for a transformers config, or a clear error listing what is supported."""
    model_type = getattr(config, "model_type", None)
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(
            f"model_type '{model_type}' is an encoder-decoder model; gptq quantizes decoder-only causal "
            f"language models. Supported model types: {', '.join(supported_model_types())}"
        )
    for arch in ARCHITECTURES:
        if model_type in arch.model_types:
            return arch
    raise UnsupportedModelError(
        f"model_type '{model_type}' is not supported. Supported model types: {', '.join(supported_model_types())}. "
        "Adding one is a few lines in gptq/architectures.py (where the blocks are, which linears in which order)."
    )


def get_module(root, dotted: str):
    for part in dotted.split("."):
        root = getattr(root, part)
    return root

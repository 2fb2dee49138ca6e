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
``experts``     mixture-of-experts families: where the routed experts are (``moe.ExpertsSpec``).
                Their linears are written with ``{e}`` for the expert index
                (``mlp.experts.{e}.down_proj``); ``expand`` names them for a block with E experts.
Conv1D layers (GPT-2) store their weight as [in, out]; the loop transposes them.
"""

from __future__ import annotations

from dataclasses import dataclass

from gptq.io.modules import get_module
from gptq.models.moe import ExpertsSpec


@dataclass(frozen=True)
class Architecture:
    name: str
    model_types: tuple[str, ...]
    blocks: str
    sequential: tuple[tuple[str, ...], ...]
    channels: tuple[tuple[str, tuple[str, ...]], ...] = ()
    experts: ExpertsSpec | None = None

    @property
    def linears(self) -> tuple[str, ...]:
        """Every linear GPTQ solves, expert linears as templates (``mlp.experts.{e}.up_proj``)."""
        return tuple(name for group in self.sequential for name in group)

    @staticmethod
    def routed(group) -> bool:
        """Whether a group (or a name) belongs to the routed experts (a ``{e}`` template)."""
        return any("{e}" in n for n in ((group,) if isinstance(group, str) else group))

    def expand(self, names, n_experts: int) -> tuple[str, ...]:
        """Templates named for each of ``n_experts`` experts (expert-major), others as they are."""
        names = tuple(names)
        out = [n for n in names if not self.routed(n)]
        out += [n.format(e=e) for e in range(n_experts) for n in names if self.routed(n)]
        return tuple(out)

    def block_linears(self, block) -> tuple[str, ...]:
        """The concrete linears of one block (experts counted in the block itself)."""
        n = len(get_module(block, self.experts.path)) if self.experts is not None else 0
        return self.expand(self.linears, n)

    def producers_of(self, consumer: str) -> tuple[str, ...] | None:
        """The producers declared free to reorder with ``consumer`` (a concrete expert name
        matches its template: ``mlp.experts.3.down_proj`` → that expert's gate/up)."""
        for cons, producers in self.channels:
            if cons == consumer:
                return producers
            if self.routed(cons):
                head, tail = cons.split("{e}")
                if consumer.startswith(head) and consumer.endswith(tail) and consumer[len(head):-len(tail)].isdigit():
                    e = consumer[len(head):-len(tail)]
                    return tuple(p.replace("{e}", e) for p in producers)
        return None

    def checkpoint_name(self, name: str) -> str:
        """A tensor's name as checkpoints store it (differs for some MoE families: Mixtral's w1/w2/w3)."""
        return name if self.experts is None else self.experts.rename(name, to_checkpoint=True)

    def model_name(self, name: str) -> str:
        """A checkpoint tensor's name in our (unfused) model."""
        return name if self.experts is None else self.experts.rename(name, to_checkpoint=False)

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

_ATTENTION = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",))
_EXPERTS = (("mlp.experts.{e}.gate_proj", "mlp.experts.{e}.up_proj"), ("mlp.experts.{e}.down_proj",))
_EXPERT_CHANNELS = (("mlp.experts.{e}.down_proj", ("mlp.experts.{e}.gate_proj", "mlp.experts.{e}.up_proj")),)
# Mixtral's checkpoints (and vLLM's / GPTQModel's loaders) name the experts w1 (gate), w3 (up), w2 (down)
# under block_sparse_moe; transformers maps them to its fused mlp.experts on load
MIXTRAL = Architecture(
    "mixtral", ("mixtral",), "model.layers", _ATTENTION + _EXPERTS, channels=_EXPERT_CHANNELS,
    experts=ExpertsSpec("mlp.experts", "num_local_experts", (
        ("mlp.experts.{e}.gate_proj", "block_sparse_moe.experts.{e}.w1"),
        ("mlp.experts.{e}.up_proj", "block_sparse_moe.experts.{e}.w3"),
        ("mlp.experts.{e}.down_proj", "block_sparse_moe.experts.{e}.w2"),
        ("mlp.gate", "block_sparse_moe.gate"),
    )),
)
QWEN3_MOE = Architecture(
    "qwen3_moe", ("qwen3_moe", "olmoe"), "model.layers", _ATTENTION + _EXPERTS, channels=_EXPERT_CHANNELS,
    experts=ExpertsSpec("mlp.experts", "num_experts"),
)
# a shared expert beside the routed ones (its sigmoid gate, mlp.shared_expert_gate, stays unquantized)
QWEN2_MOE = Architecture(
    "qwen2_moe", ("qwen2_moe",), "model.layers",
    _ATTENTION + (("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj"), ("mlp.shared_expert.down_proj",))
    + _EXPERTS,
    channels=(("mlp.shared_expert.down_proj", ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj")),)
    + _EXPERT_CHANNELS,
    experts=ExpertsSpec("mlp.experts", "num_experts"),
)

ARCHITECTURES = (LLAMA, OPT, GPT_NEOX, GPT2, PHI, PHI3, MIXTRAL, QWEN3_MOE, QWEN2_MOE)


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


"""Rotate a model before it is solved, in its weights only: the rotated model computes the same
function with the same architecture, so every engine runs the checkpoint unchanged.

Two rotations fold into the weights offline (QuaRot, Ashkboos et al. 2024, §4; SpinQuant's R1 and
R2, Liu et al. 2024):

residual (R1)  one orthogonal Q (hidden × hidden) on the residual stream. First every RMSNorm's
               scale is folded into the linears that read it (W → W diag(w)) and the norm's weight
               stored as ones (Gemma's ``1 + w`` norms: as zeros), because an RMSNorm without a scale
               commutes with Q: rms(xQ) = rms(x). Then the embeddings E → EQ, every linear reading
               the stream W → WQ (q/k/v, gate/up, MoE routers and experts, the head) and every linear
               writing it W → QᵀW, b → bQ (attention output, down projections).
heads (R2)     one orthogonal R (head_dim × head_dim) on every attention head's values: each key/value
               head's rows of v_proj W_h → RᵀW_h (b_h → b_h R), each query head's columns of o_proj
               W → W R. Attention mixes value rows linearly, so the output is unchanged; the same R
               for every head keeps grouped-query attention exact.

``--rotate learned`` starts Q as the Hadamard matrix and learns it from the calibration data before
anything is rotated (``gptq.core.learned_rotation``, ``gptq.pipeline.learned``); ``Rotator.readers`` gives
the learning what each block's readers look like under the folding and R, ``set_learned`` the result.

A model whose head is tied to its embeddings has its head untied: the head becomes W diag(w) Q
while the embeddings become EQ, so the checkpoint stores one more vocab × hidden matrix
(``Rotation.untied``; docs/results.md gives what it costs and what it buys).

Which linears read and write the stream is data (``READERS``, ``WRITERS``): one table for every
pre-norm RMSNorm family we support (Llama, Mistral, Qwen2/3, Phi-3, Gemma, Granite, Mixtral,
Qwen-MoE, OLMoE). Any other module of a block with a parameter of the hidden size refuses the
rotation before any work (nothing silently left unrotated), and LayerNorm or post-norm families are
refused by name with the reason.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from functools import cached_property

import torch
from torch import nn

from gptq.core.config import ROTATIONS
from gptq.core.hadamard import KINDS, construction, orthogonal
from gptq.io.modules import get_module
from gptq.models.architectures import for_config

ATTN_NORM, MLP_NORM = "input_layernorm", "post_attention_layernorm"
# the linears reading each norm's output, for every family below (absent ones are skipped);
# "{e}" is a routed expert's index
READERS = {
    ATTN_NORM: ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.qkv_proj"),
    MLP_NORM: ("mlp.gate_proj", "mlp.up_proj", "mlp.gate_up_proj", "mlp.gate", "mlp.shared_expert.gate_proj",
               "mlp.shared_expert.up_proj", "mlp.shared_expert_gate", "mlp.experts.{e}.gate_proj",
               "mlp.experts.{e}.up_proj"),
}
WRITERS = ("self_attn.o_proj", "mlp.down_proj", "mlp.shared_expert.down_proj", "mlp.experts.{e}.down_proj")
VALUES = (("self_attn.v_proj", "self_attn.o_proj"), ("self_attn.qkv_proj", "self_attn.o_proj"))
UNTOUCHED = ("self_attn.q_norm", "self_attn.k_norm")  # per-head norms on q/k: not on the stream
EMBED, FINAL_NORM, HEAD = "model.embed_tokens", "model.norm", "lm_head"
NORM_OFFSET = {"gemma": 1.0}  # the norm multiplies by (offset + weight)

ROTATABLE = ("llama", "phi3", "mixtral", "qwen3_moe", "qwen2_moe")  # Architecture names
REFUSED = {
    "gemma2": "its norms after the attention and MLP outputs (before the residual add) do not commute with a rotation",
    "olmo2": "its norms after the attention and MLP outputs (before the residual add) do not commute with a rotation",
    "olmo": "its LayerNorm subtracts the mean, which a rotation does not commute with",
}


class RotationError(ValueError):
    """The model cannot be rotated exactly; the message says why and suggests --rotate none."""


@dataclass(frozen=True)
class Rotation:
    """What was done to a model (stored in the report and as ``gptq_rotation`` in config.json)."""

    kind: str
    seed: int
    residual: str  # how Q was built ("hadamard 36x16"), "" when not rotated
    heads: str  # how R was built, "" when not rotated
    untied: bool  # the head was tied to the embeddings and is stored separately now
    objective: float | None = None  # --rotate learned: the readers' estimated error under Q, relative to Q₀

    def as_dict(self) -> dict:
        return asdict(self)


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def check_rotatable(config) -> None:
    """Refuse, before any work, a model whose function a rotation would change."""
    arch = for_config(config)
    if config.model_type in REFUSED:
        raise RotationError(f"model_type '{config.model_type}' cannot be rotated: {REFUSED[config.model_type]}; "
                            "use --rotate none")
    if arch.name not in ROTATABLE:
        raise RotationError(f"model_type '{config.model_type}' cannot be rotated: its LayerNorms subtract the mean, "
                            "which a rotation does not commute with (QuaRot/SliceGPT first fold the mean away; not "
                            "done here); use --rotate none")


def rotator(model_config, qcfg) -> Rotator | None:
    """The rotation a run's settings ask for (``qcfg.rotate``, ``qcfg.rotate_seed``), or None; refuses
    a model it would change."""
    if qcfg.rotate == "none":
        return None
    if qcfg.rotate == "learned":
        return Rotator(model_config, "learned", qcfg.rotate_seed, steps=qcfg.rotate_steps)
    if qcfg.rotate == "heads":
        rot = Rotator(model_config, "hadamard", qcfg.rotate_seed, residual=False)
        rot.record = replace(rot.record, kind="heads")
        return rot
    return Rotator(model_config, qcfg.rotate, qcfg.rotate_seed)


def auto_rotation(config) -> tuple[str, str | None]:
    """The command line's ``--rotate auto`` for a model: ``hadamard`` where it costs no bytes (the family
    can be rotated and its head is not tied to the embeddings), else ``none``, with a note saying what
    ``--rotate hadamard`` would cost (docs/results.md, "Rotations": quality gained at every bit width)."""
    try:
        check_rotatable(config)
    except RotationError:
        return "none", None
    text = config.get_text_config()
    if not getattr(text, "tie_word_embeddings", False):
        return "hadamard", None
    extra = text.vocab_size * text.hidden_size * 2
    return "none", (f"--rotate auto leaves this model unrotated: its head is tied to the embeddings, and a rotated "
                    f"model stores it separately (+{extra / 1e6:.1f} MB at 16 bits); --rotate hadamard trades those "
                    "bytes for quality")


def _expand(block: nn.Module, names) -> list[tuple[str, nn.Module]]:
    """(name, module) for each of ``names`` present in ``block``, routed-expert templates expanded."""
    out = []
    for name in names:
        if "{e}" in name:
            head = name.split(".{e}")[0]
            try:
                n = len(get_module(block, head))
            except (AttributeError, TypeError):
                continue
            out += _expand(block, [name.replace("{e}", str(e)) for e in range(n)])
            continue
        try:
            out.append((name, get_module(block, name)))
        except AttributeError:
            continue
    return out


def _set(param: nn.Parameter, value: torch.Tensor) -> None:
    param.data = value.to(param.dtype).contiguous()


ROWS = 2048  # rows rotated at a time: the float64 temporaries stay at ROWS x hidden (a whole 49152 x 2048
# head in float64 is 0.8 GB, and the product and its scaled input as much again: 2.4 GB at once)


def _rows_times(w: torch.Tensor, Q: torch.Tensor, scale: torch.Tensor | None = None,
                inplace: bool = False) -> torch.Tensor:
    """(w · diag(scale)) @ Q computed in float64, ROWS rows at a time, returned in w's dtype: row by row
    the same products as one whole matmul, with a bounded float64 footprint; ``inplace``: written over
    ``w`` (each chunk is read before it is written), so no second matrix is held."""
    out = w if inplace else torch.empty(w.shape, dtype=w.dtype, device=w.device)
    for s in range(0, w.shape[0], ROWS):
        x = w[s : s + ROWS].double()
        out[s : s + ROWS] = (x if scale is None else x * scale[None, :]) @ Q
    return out


class Rotator:
    """Rotates the blocks and the edges (embeddings, final norm, head) of one model, block by block
    if need be (the streaming path), with the same Q on every call, rank and run."""

    def __init__(self, config, kind: str, seed: int = 0, residual: bool = True, heads: bool = True,
                 steps: int = 0):
        if kind not in KINDS + ("learned",):
            raise RotationError(f"--rotate {kind!r}; choose one of {ROTATIONS}")
        check_rotatable(config)
        self.config = config
        self.hidden = config.hidden_size
        self.head_dim = _head_dim(config)
        self.n_heads = config.num_attention_heads
        self.n_kv = getattr(config, "num_key_value_heads", None) or self.n_heads
        self.offset = NORM_OFFSET.get(config.model_type, 0.0)
        self.kind, self.seed, self.residual, self.heads = kind, seed, residual, heads
        # learned: Q starts as the Hadamard one and is set by ``set_learned`` before anything is rotated
        self.base = "hadamard" if kind == "learned" else kind
        self.pending = kind == "learned"
        tied = bool(getattr(config.get_text_config(), "tie_word_embeddings", False))
        how = construction(self.hidden, self.base)
        self.record = Rotation(kind, seed, (f"learned from {how} in {steps} steps" if self.pending else how)
                               if residual else "", construction(self.head_dim, self.base) if heads else "",
                               untied=tied and residual)

    # the matrices are built on first use: checking a model (the command, before any work) needs neither
    @cached_property
    def Q(self) -> torch.Tensor | None:
        """The residual stream's rotation (hidden × hidden, float64), or None."""
        return orthogonal(self.hidden, self.base, self.seed)[0] if self.residual else None

    @cached_property
    def R(self) -> torch.Tensor | None:
        """Every attention head's value rotation (head_dim × head_dim, float64), or None."""
        return orthogonal(self.head_dim, self.base, self.seed + 1)[0] if self.heads else None

    def set_learned(self, Q: torch.Tensor, objective: float) -> None:
        """The learned residual rotation (``--rotate learned``: ``pipeline.learned``), in place of Q₀."""
        if Q.shape != (self.hidden, self.hidden):
            raise ValueError(f"a learned rotation of shape {tuple(Q.shape)} for hidden size {self.hidden}")
        err = (Q.double().T @ Q.double() - torch.eye(self.hidden, dtype=torch.float64)).abs().max().item()
        if err > 1e-8:
            raise ValueError(f"the learned rotation is not orthogonal (|QᵀQ − I| = {err:.1e})")
        self.__dict__["Q"] = Q.double().cpu()
        self.pending = False
        self.record = replace(self.record, objective=objective)

    def _ready(self) -> None:
        if self.pending:
            raise RuntimeError("--rotate learned: the rotation is learned from the calibration data before "
                               "anything is rotated (gptq.pipeline.learned)")

    @torch.no_grad()
    def readers(self, block: nn.Module) -> dict[str, torch.Tensor]:
        """What the learned rotation's objective sees of one block (not yet rotated): per norm, every linear
        reading it stacked ([out, hidden], float32) with the norm's scale folded in, the values' rows under
        the heads' rotation R as ``rotate_block`` leaves them."""
        out = {}
        for norm_name in (ATTN_NORM, MLP_NORM):
            scale = get_module(block, norm_name).weight.double() + self.offset
            parts = []
            for name, lin in _expand(block, READERS[norm_name]):
                w = lin.weight.double() * scale[None]
                if self.R is not None and name in {v for v, _ in VALUES}:
                    self._rotate_value_rows(w, name)
                parts.append(w.float())
            out[norm_name] = torch.cat(parts)
        return out

    @staticmethod
    def reader_rows(block: nn.Module) -> dict[str, list[tuple[str, int]]]:
        """Per norm, (name, rows) of each linear ``readers`` stacks, in its order (from the modules'
        shapes: a skeleton on the meta device will do)."""
        return {norm: [(name, lin.weight.shape[0]) for name, lin in _expand(block, READERS[norm])]
                for norm in (ATTN_NORM, MLP_NORM)}

    # -- checks -----------------------------------------------------------------------------
    def check_block(self, block: nn.Module, where: str = "block") -> None:
        """Every module of ``block`` with a parameter of the hidden size is one we rotate (or one
        that never sees the stream); anything else is refused by name."""
        known = {n for names in READERS.values() for n, _ in _expand(block, names)}
        known |= {n for n, _ in _expand(block, WRITERS + UNTOUCHED + (ATTN_NORM, MLP_NORM))}
        for name, module in block.named_modules():
            own = list(module.parameters(recurse=False))
            if not own or name in known:
                continue
            if any(self.hidden in p.shape for p in own):
                raise RotationError(f"{where}.{name} ({type(module).__name__}) reads or writes the residual stream "
                                    "in a way the rotation does not know; use --rotate none")
        for norm in (ATTN_NORM, MLP_NORM):
            if not _expand(block, (norm,)) or not _expand(block, READERS[norm]):
                raise RotationError(f"{where}: no {norm} with the linears that read it, as the rotation expects; "
                                    "use --rotate none")

    # -- blocks -----------------------------------------------------------------------------
    @torch.no_grad()
    def rotate_block(self, block: nn.Module) -> None:
        """Fold the block's norms into their readers and rotate it, in place (any dtype; computed in float64).
        The model was checked first (``check_model``, on the skeleton too)."""
        self._ready()
        for norm_name in (ATTN_NORM, MLP_NORM) if self.Q is not None else ():
            norm = get_module(block, norm_name)
            scale = norm.weight.double() + self.offset
            for _, lin in _expand(block, READERS[norm_name]):
                _set(lin.weight, _rows_times(lin.weight, self.Q, scale))
            _set(norm.weight, torch.full_like(norm.weight, 1.0 - self.offset, dtype=torch.float64))
        if self.Q is not None:
            for _, lin in _expand(block, WRITERS):
                _set(lin.weight, self.Q.T @ lin.weight.double())
                if getattr(lin, "bias", None) is not None:
                    _set(lin.bias, lin.bias.double() @ self.Q)
        if self.R is not None:
            self._rotate_values(block)

    def _value_rows(self, v_name: str) -> slice:
        """The value rows of ``v_name`` (v_proj, or the v part of a fused qkv_proj)."""
        start = (self.n_heads + self.n_kv) * self.head_dim if v_name.endswith("qkv_proj") else 0
        return slice(start, start + self.n_kv * self.head_dim)

    def _rotate_value_rows(self, w: torch.Tensor, v_name: str) -> None:
        """Each key/value head's rows of ``v_name``'s weight ``w`` (float64) → Rᵀ W_h, in place."""
        rows = self._value_rows(v_name)
        w[rows] = (self.R.T @ w[rows].view(self.n_kv, self.head_dim, -1)).reshape(w[rows].shape)

    def _rotate_values(self, block: nn.Module) -> None:
        hd, R = self.head_dim, self.R
        for v_name, o_name in VALUES:
            found = _expand(block, (v_name,))
            if not found:
                continue
            v, o = found[0][1], get_module(block, o_name)
            rows = self._value_rows(v_name)
            w = v.weight.double()
            self._rotate_value_rows(w, v_name)
            _set(v.weight, w)
            if getattr(v, "bias", None) is not None:
                b = v.bias.double()
                b[rows] = (b[rows].view(self.n_kv, hd) @ R).reshape(-1)
                _set(v.bias, b)
            wo = o.weight.double()
            _set(o.weight, (wo.view(wo.shape[0], self.n_heads, hd) @ R).reshape(wo.shape))
            return

    # -- edges ------------------------------------------------------------------------------
    def embedding(self, weight: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """E → EQ, in ``weight``'s dtype."""
        self._ready()
        return _rows_times(weight, self.Q, inplace=inplace)

    def head_and_norm(self, head: torch.Tensor, norm: torch.Tensor,
                      inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The head with the final norm's scale folded in and Q applied, and the norm's new weight."""
        w = _rows_times(head, self.Q, norm.double() + self.offset, inplace=inplace)
        return w, torch.full_like(norm, 1.0 - self.offset)

    def edges(self, tensors: dict[str, torch.Tensor], inplace: bool = False) -> dict[str, torch.Tensor]:
        """The rotated embeddings, head and final norm from a checkpoint's tensors (a tied head,
        absent from ``tensors``, starts from the embeddings and is stored from now on). ``inplace``:
        the embeddings and an untied head are overwritten (tensors the caller owns: on a 49152-token,
        2048-wide model that is 0.4 GB not held twice)."""
        self._ready()
        if self.Q is None:
            return {}  # the heads' rotation stays inside the blocks
        emb, norm = tensors[f"{EMBED}.weight"], tensors[f"{FINAL_NORM}.weight"]
        head = tensors.get(f"{HEAD}.weight")
        new_head, new_norm = self.head_and_norm(emb if head is None else head, norm, inplace and head is not None)
        return {f"{EMBED}.weight": self.embedding(emb, inplace), f"{FINAL_NORM}.weight": new_norm,
                f"{HEAD}.weight": new_head}

    def mark(self, config) -> None:
        """Record the rotation in ``config`` (saved into config.json) and untie the head there."""
        if self.record.untied:
            config.tie_word_embeddings = False
            text = config.get_text_config()
            if text is not config:
                text.tie_word_embeddings = False
        config.gptq_rotation = self.record.as_dict()

    def check_model(self, model: nn.Module) -> None:
        """Refuse before any work (a skeleton on the meta device will do)."""
        arch = for_config(model.config)
        for i, block in enumerate(get_module(model, arch.blocks)):
            self.check_block(block, f"{arch.blocks}.{i}")

    @torch.no_grad()
    def rotate_embedding(self, model: nn.Module) -> None:
        """The embeddings of ``model`` (loaded) rotated in place: what the first block reads."""
        if self.Q is not None:
            emb = get_module(model, EMBED)
            emb.weight = nn.Parameter(self.embedding(emb.weight), requires_grad=False)

    @torch.no_grad()
    def rotate_model(self, model: nn.Module) -> Rotation:
        """Rotate a model held in memory, in place (the head untied if it was tied)."""
        arch = for_config(model.config)
        self.check_model(model)
        for block in get_module(model, arch.blocks):
            self.rotate_block(block)
        if self.Q is not None:
            emb, norm, head = get_module(model, EMBED), get_module(model, FINAL_NORM), get_module(model, HEAD)
            new_head, new_norm = self.head_and_norm(head.weight, norm.weight)
            emb.weight = nn.Parameter(self.embedding(emb.weight), requires_grad=False)
            head.weight = nn.Parameter(new_head, requires_grad=False)  # a tensor of its own: untied
            _set(norm.weight, new_norm)
        self.mark(model.config)
        return self.record

"""Mixture-of-experts blocks: every routed expert is three ordinary linears.

transformers (5.x) builds a block's routed experts as one module of fused 3-D parameters

    mlp.experts.gate_up_proj  [E, 2I, H]      (gate rows first, then up rows)
    mlp.experts.down_proj     [E, H, I]

and converts them to per-expert tensors when it saves (``mlp.experts.{e}.gate_proj.weight``;
Mixtral's ``block_sparse_moe.experts.{e}.w1/w3/w2``), which is also what vLLM's and GPTQModel's
GPTQ MoE loaders read. ``unfuse`` replaces the fused module by ``RoutedExperts``: E small MLPs of
``nn.Linear`` (``mlp.experts.{e}.gate_proj`` / ``up_proj`` / ``down_proj``) computing the same
function with the same routing, so each expert is a linear that the generic machinery captures,
solves, packs, saves and loads like any other. The router (``mlp.gate``) is not a linear GPTQ
touches: it stays in full precision.

Calibration (``pipeline``): the experts module's inputs (hidden states, chosen experts) are
recorded once per block; each expert's Hessian is then built from its own rows, expert by expert
(``expert_rows``): the tokens routed to it, or with ``expert_tokens="all"`` (the default, as in
the peers) every calibration token, while the block's output keeps the real routing.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from gptq.io.modules import StopForward, get_module, hooked


@dataclass(frozen=True)
class ExpertsSpec:
    """Where a family keeps its routed experts, as data.

    path      the experts module inside a block (fused in transformers, ``RoutedExperts`` here)
    count     the config attribute holding the number of routed experts
    renames   (ours, checkpoint's) name fragments that differ on disk; ``{e}`` is the expert index.
              Mixtral stores ``mlp.experts.{e}.gate_proj`` as ``block_sparse_moe.experts.{e}.w1``.
    """

    path: str
    count: str
    renames: tuple[tuple[str, str], ...] = ()

    def _rules(self, reverse: bool):
        rules = []
        for ours, theirs in self.renames:
            src, dst = (theirs, ours) if reverse else (ours, theirs)
            pattern = re.escape(src).replace(re.escape("{e}"), r"(?P<e>\d+)")
            rules.append((re.compile(r"(^|\.)" + pattern + r"(?=\.|$)"), dst))
        return rules

    def rename(self, name: str, to_checkpoint: bool) -> str:
        """A tensor's name as the checkpoint stores it (``to_checkpoint``) or as our model has it."""
        for rx, dst in self._rules(reverse=not to_checkpoint):
            m = rx.search(name)
            if m:
                new = m.group(1) + (dst.replace("{e}", m.group("e")) if "{e}" in dst else dst)
                return name[: m.start()] + new + name[m.end():]
        return name


class ExpertMLP(nn.Module):
    """One routed expert: down(act(gate(x)) * up(x))."""

    def __init__(self, gate_proj: nn.Linear, up_proj: nn.Linear, down_proj: nn.Linear, act_fn):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj
        self.act_fn = act_fn

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """The down projection's input for rows ``x``."""
        return self.act_fn(self.gate_proj(x)) * self.up_proj(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.hidden(x))


class RoutedExperts(nn.ModuleList):
    """E experts called as transformers calls its fused experts module:
    ``experts(hidden [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]``. Each expert
    runs on the tokens routed to it; its output, times the routing weight, is added to them.
    An index ≥ E (transformers' padding slot) routes nowhere."""

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for e in torch.unique(top_k_index).tolist():
            if e >= len(self):
                continue
            token, slot = torch.where(top_k_index == e)
            y = self[e](hidden_states[token]) * top_k_weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out


def _linear(weight: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    lin.weight = nn.Parameter(weight, requires_grad=False)
    return lin


def routed_experts_from_fused(fused: nn.Module) -> RoutedExperts:
    """Split a fused experts module (gate_up_proj [E, 2I, H], down_proj [E, H, I]) into
    ``RoutedExperts``; meta parameters stay meta (a skeleton filled later)."""
    gate_up, down = fused.gate_up_proj, fused.down_proj
    inter = gate_up.shape[1] // 2
    meta = gate_up.is_meta

    def own(t):  # every expert its own storage, so a fused parameter is not kept alive
        return torch.empty(t.shape, dtype=t.dtype, device="meta") if meta else t.detach().clone()

    return RoutedExperts(
        ExpertMLP(_linear(own(gate_up[e, :inter])), _linear(own(gate_up[e, inter:])), _linear(own(down[e])),
                  fused.act_fn)
        for e in range(gate_up.shape[0]))


def unfuse(model: nn.Module, arch) -> nn.Module:
    """Replace every block's fused experts module by ``RoutedExperts`` (in place; a no-op for
    dense families and for blocks already unfused)."""
    spec = arch.experts
    if spec is None:
        return model
    parent_path, _, attr = spec.path.rpartition(".")
    for i, block in enumerate(get_module(model, arch.blocks)):
        try:
            parent = get_module(block, parent_path) if parent_path else block
            fused = getattr(parent, attr)
        except AttributeError:
            raise ValueError(f"{arch.blocks}.{i} has no {spec.path}: a block without routed experts (a dense layer "
                             f"in a {arch.name} model) is not supported yet") from None
        if isinstance(fused, RoutedExperts):
            continue
        if not (hasattr(fused, "gate_up_proj") and hasattr(fused, "down_proj")):
            raise ValueError(f"{arch.blocks}.{i}.{spec.path} is a {type(fused).__name__}, not the fused experts "
                             "(gate_up_proj, down_proj) this transformers version was expected to build")
        setattr(parent, attr, routed_experts_from_fused(fused))
    return model


@contextmanager
def record_routing(experts: nn.Module, into: list, stop: bool, weights: bool = False):
    """Keep (hidden [T, H], top_k_index [T, k]) for every call of the experts module, in call
    order (``weights``: also top_k_weights [T, k], as a third item); with ``stop`` cut the forward
    pass short there (the experts' output is not needed)."""

    def hook(_module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        idx = args[1] if len(args) > 1 else kwargs["top_k_index"]
        if weights:
            w = args[2] if len(args) > 2 else kwargs["top_k_weights"]
            into.append((x.detach(), idx.detach(), w.detach()))
        else:
            into.append((x.detach(), idx.detach()))
        if stop:
            raise StopForward

    with hooked(experts, hook, pre=True, with_kwargs=True):
        yield into


def routed_counts(routing, n_experts: int) -> torch.Tensor:
    """[E] calibration tokens routed to each expert."""
    counts = torch.zeros(n_experts, dtype=torch.int64)
    for _, idx, *_w in routing:
        idx = idx.reshape(-1).cpu()
        counts += torch.bincount(idx[idx < n_experts], minlength=n_experts)
    return counts


def expert_rows(x: torch.Tensor, idx: torch.Tensor, e: int, all_tokens: bool) -> torch.Tensor:
    """The rows of one recorded batch that build expert ``e``'s Hessian."""
    return x if all_tokens else x[(idx == e).any(dim=-1)]

"""Helpers on modules: dotted lookup, the [out, in] weight of a linear, moving nested tensors,
devices, and context managers that watch a model run (every hook removed in ``finally``)."""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn


class StopForward(Exception):
    """Raised by a hook once everything needed from this forward pass has been seen."""


@dataclass
class BlockInputs:
    """One calibration batch at a block boundary: hidden states plus the block's other arguments."""

    hidden: torch.Tensor  # [batch, seq, hidden]
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)


def get_module(root, dotted: str):
    """``root.a.b.c`` for ``dotted`` = "a.b.c" (list indices included: "layers.3")."""
    for part in dotted.split("."):
        root = getattr(root, part)
    return root


def resolve_device(device: str) -> torch.device:
    """"auto" → cuda when torch sees one, else cpu; a clear error for cuda without CUDA."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"--device {device} was asked for, but torch sees no CUDA device; use --device cpu")
    return torch.device(device)


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The [out, in] weight of an nn.Linear or a GPT-2 Conv1D (which stores [in, out])."""
    w = module.weight
    return w.T if _is_conv1d(module) else w


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"


def set_weight_matrix(module: nn.Module, W: torch.Tensor) -> None:
    W = W.T if _is_conv1d(module) else W
    module.weight.data.copy_(W.to(module.weight.dtype))


def in_features(module: nn.Module) -> int:
    return module.weight.shape[0] if _is_conv1d(module) else module.weight.shape[1]


def move(obj, device):
    """Move every tensor inside nested tuples/lists/dicts to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(move(o, device) for o in obj)
    if isinstance(obj, list):
        return [move(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: move(v, device) for k, v in obj.items()}
    return obj


@contextmanager
def hooked(module: nn.Module, hook, pre: bool = False, with_kwargs: bool = False):
    """``hook`` on ``module`` for the duration of the with-block: a forward hook, or with ``pre`` a
    forward pre-hook; removed in ``finally``, whatever happens inside."""
    handle = (module.register_forward_pre_hook(hook, with_kwargs=with_kwargs) if pre
              else module.register_forward_hook(hook))
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def first_block_inputs(block: nn.Module):
    """Collect the arguments the model passes to ``block`` and stop the forward pass there.

        with first_block_inputs(model.model.layers[0]) as seen:
            for batch in batches:
                run_until_stopped(model, batch)
        seen -> [BlockInputs, ...]
    """
    seen: list[BlockInputs] = []

    def hook(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        rest = args[1:] if args else ()
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "layer_past")}
        seen.append(BlockInputs(hidden.detach(), rest, kwargs))
        raise StopForward

    with hooked(block, hook, pre=True, with_kwargs=True):
        yield seen


@contextmanager
def record_inputs(block: nn.Module, into: dict[str, list]):
    """Keep every first input each named linear of ``block`` receives (``into``: {name: list}), in
    call order: the full-precision model's inputs, recorded in one run of the unquantized block."""
    with ExitStack() as stack:
        for name, seen in into.items():
            stack.enter_context(hooked(get_module(block, name), lambda _m, args, seen=seen: seen.append(args[0].detach()),
                                       pre=True))
        yield into


@contextmanager
def record_outputs(module: nn.Module, into=None):
    """Keep every output ``module`` produces, in call order (appended to ``into``, a list by default)."""
    outs = [] if into is None else into
    with hooked(module, lambda _m, _a, out: outs.append(out)):
        yield outs


@contextmanager
def stop_after(module: nn.Module):
    """Cut the forward pass short right after ``module`` has produced its output."""

    def hook(_m, _a, _out):
        raise StopForward

    with hooked(module, hook):
        yield


@contextmanager
def record_io(module: nn.Module, into=None):
    """Keep every (first input, output) pair ``module`` sees, in call order (appended to ``into``)."""
    seen = [] if into is None else into
    with hooked(module, lambda _m, args, out: seen.append((args[0], out))):
        yield seen


@contextmanager
def replay_outputs(module: nn.Module, outputs: list):
    """Make ``module`` return the recorded outputs, in order, instead of computing them.
    Exact when its inputs and weights are those of the recording, which the pipeline ensures."""
    it = iter(outputs)
    module.forward = lambda *args, **kwargs: next(it)  # instance attribute shadows the class method
    try:
        yield
    finally:
        del module.forward


@contextmanager
def block_on_device(i: int, block: nn.Module, dev, before=None, after=None):
    """Block ``i`` on ``dev`` for the with-block: ``before(i, block)`` first (streaming loads its weights
    there), then moved; afterwards moved back and ``after(i, block)`` (streaming releases them). Nothing
    of the after part runs when the with-block raises."""
    if before is not None:
        before(i, block)
    home = next(block.parameters()).device
    block.to(dev)
    yield block
    block.to(home)
    if after is not None:
        after(i, block)


def run_block(block: nn.Module, inp: BlockInputs) -> torch.Tensor | None:
    """Run one block on one batch; None if a capture hook stopped it early."""
    try:
        out = block(inp.hidden, *inp.args, **inp.kwargs)
    except StopForward:
        return None
    return out[0] if isinstance(out, (tuple, list)) else out


@contextmanager
def parameters_on_meta():
    """Build modules without allocating their parameters (buffers, e.g. rotary tables, stay real)."""
    original = nn.Module.register_parameter

    def register(module, name, param):
        original(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=False)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original

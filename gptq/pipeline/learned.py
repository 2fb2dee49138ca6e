"""``--rotate learned``: the residual rotation learned from the calibration data before block 0 is solved.

    block-0 inputs of the unrotated model
      └─ for each block: load → accumulate H of each norm's normalized input → run → release
      └─ learn Q (``core.learned_rotation``) on rank 0, from Q₀ = the Hadamard matrix; Q to every rank
      └─ the caller rotates the model with it (``Rotator.set_learned``) and starts over from the embeddings

One more pass of the full-precision blocks than ``--rotate hadamard`` needs, then the learning, which
fetches a block's readers when a step draws them (``before_block``/``after_block`` load and release
them on the streaming path). Under torchrun each rank runs its own batches and the Hessian partials are
exchanged after every round and added in batch order (``distributed.exchange``): H, and so Q, is one
process's, bit for bit. The caller keeps Q for ``--resume`` (``streaming``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from contextlib import ExitStack

import torch
from torch import nn
from tqdm.auto import tqdm

from gptq.core.config import QuantConfig
from gptq.core.hessian import HessianAccumulator
from gptq.core.learned_rotation import damped_inverse, learn_rotation
from gptq.io.modules import BlockInputs, block_on_device, get_module, hooked
from gptq.models.architectures import for_config
from gptq.models.rotation import ATTN_NORM, MLP_NORM, Rotator
from gptq.pipeline.activations import Activations, block_args
from gptq.pipeline.distributed import SINGLE, World, broadcast, run_in_rounds

NORMS = (ATTN_NORM, MLP_NORM)
Hook = Callable[[int, nn.Module], None]


def _normalized(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What a weight-free copy of the RMSNorm ``norm`` outputs for ``x`` (float32, as the norms compute)."""
    eps = getattr(norm, "variance_epsilon", None)
    eps = getattr(norm, "eps", 1e-6) if eps is None else eps
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


@torch.no_grad()
def norm_hessians(model: nn.Module, inputs: Sequence[BlockInputs], dev: torch.device, store: Activations,
                  before_block: Hook | None = None, after_block: Hook | None = None, world: World = SINGLE,
                  progress: bool = True) -> list[dict[str, torch.Tensor]]:
    """Per block, the Hessian (2·Σxxᵀ/n, float32 on ``dev``) of each norm's input divided by its RMS: what
    the linears reading the norm see once its scale is folded into them. ``inputs``: block 0's (this
    rank's batches with several ranks)."""
    blocks = get_module(model, for_config(model.config).blocks)
    n_rounds = broadcast(len(inputs), 0, world)  # rank 0 holds the most batches
    out = []
    for i in tqdm(range(len(blocks)), desc="rotation statistics", unit="block", disable=not progress):
        with block_on_device(i, blocks[i], dev, before_block, after_block) as block, ExitStack() as stack:
            accs = {}
            for name in NORMS:
                norm = get_module(block, name)
                acc = accs[name] = HessianAccumulator(norm.weight.shape[0], dev, staged=not world.single)
                stack.enter_context(hooked(norm, lambda m, a, acc=acc: acc.add(_normalized(m, a[0])), pre=True))
            outputs = store.new()
            run_in_rounds(block, inputs, outputs, list(accs.values()), world, n_rounds)
        out.append({name: acc.hessian() for name, acc in accs.items()})
        inputs = store.inputs(outputs, block_args(inputs))
    return out


def learn_residual(rot: Rotator, model: nn.Module, inputs: Sequence[BlockInputs], config: QuantConfig,
                   dev: torch.device, store: Activations, before_block: Hook | None = None,
                   after_block: Hook | None = None, world: World = SINGLE, progress: bool = True) -> dict:
    """Learn ``rot``'s residual rotation (``--rotate learned``) from the unrotated model's block-0
    ``inputs`` and set it (``Rotator.set_learned``) on every rank; the model is left unrotated. Returns
    the learning's record (the objective relative to Q₀, steps, seconds on rank 0)."""
    H = norm_hessians(model, inputs, dev, store, before_block, after_block, world, progress)
    info = None
    if world.main:
        hinv = [damped_inverse(h[name], config.damp).to(dev) for h in H for name in NORMS]
        del H
        blocks = get_module(model, for_config(model.config).blocks)
        cache: dict[int, dict[str, torch.Tensor]] = {}

        def weights(j: int) -> torch.Tensor:  # term j: block j // 2's readers of norm j % 2
            i = j // 2
            if i not in cache:
                cache.clear()
                if before_block is not None:
                    before_block(i, blocks[i])
                cache[i] = rot.readers(blocks[i])
                if after_block is not None:
                    after_block(i, blocks[i])
            return cache[i][NORMS[j % 2]]

        bar = tqdm(total=config.rotate_steps, desc="learning the rotation", unit="step", disable=not progress)

        def tick(step: int, objective: float) -> None:
            bar.update(1)
            bar.set_postfix(objective=f"{objective:.3f}", refresh=False)

        bits, group = config.bits, config.group_size
        Q, info = learn_rotation(weights, hinv, rot.Q, bits=bits, group=group, sym=config.sym_at(bits),
                                 steps=config.rotate_steps, seed=config.rotate_seed, progress=tick)
        bar.close()
        if progress:
            print(f"learned rotation: the readers' estimated error at {info['objective']:.3f} of the Hadamard "
                  f"rotation's ({info['seconds']:.0f} s)", file=sys.stderr)
        info["Q"] = Q
    info = broadcast(info, 0, world)
    rot.set_learned(info.pop("Q"), info["objective"])
    return info

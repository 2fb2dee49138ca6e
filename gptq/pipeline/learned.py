"""``--rotate learned``: the residual rotation learned from the calibration data before block 0 is solved.

    block-0 inputs of the unrotated model
      └─ for each block: load → accumulate H of each norm's normalized input → run → release;
         each term (a block's readers of one norm, and the damped inverse of that norm's H) kept by
         the rank that owns it (in memory, or on disk)
      └─ learn Q (``core.learned_rotation``) on every rank, each computing its own terms' gradients,
         summed so that every rank takes the same steps
      └─ the caller rotates the model with it (``Rotator.set_learned``) and starts over from the embeddings

One more pass of the full-precision blocks than ``--rotate hadamard`` needs, then the learning, which
loads no block: each term's readers are taken (float32, norm scales folded in) while the statistics
pass has the block loaded. Under torchrun each rank runs its own batches and the Hessian partials are
exchanged after every round and added in batch order (``distributed.exchange``): H, and so Q, is one
process's, bit for bit. The terms are dealt to the ranks by their cost (``distributed.owners``): a rank
keeps only its terms and computes only their gradients, so the learning's memory and time are shared
out as the solves are. The terms take (hidden + readers' rows) × hidden floats each: 23 GB for
Llama-3-8B's shape (32 blocks, hidden size 4096, MLP width 14336), 0.36 GB for SmolLM2. Where this
rank's share would not fit the memory budget (``--max-memory``) they are spilled to disk, one file per
term, read back when a step draws it. The caller keeps Q for ``--resume`` (``streaming``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from gptq.core.config import QuantConfig
from gptq.core.hessian import HessianAccumulator
from gptq.core.grids import GridSpec
from gptq.core.learned_rotation import Rounding, by_rows, damped_inverse, learn_rotation
from gptq.io.modules import BlockInputs, block_on_device, get_module, hooked
from gptq.models.architectures import for_config
from gptq.models.rotation import ATTN_NORM, MLP_NORM, Rotator
from gptq.pipeline.activations import Activations, block_args, load_item, save_item, should_spill
from gptq.pipeline.distributed import SINGLE, World, all_sum, broadcast, owners, run_in_rounds

NORMS = (ATTN_NORM, MLP_NORM)
Hook = Callable[[int, nn.Module], None]


def _normalized(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What a weight-free copy of the RMSNorm ``norm`` outputs for ``x`` (float32, as the norms compute)."""
    eps = getattr(norm, "variance_epsilon", None)
    eps = getattr(norm, "eps", 1e-6) if eps is None else eps
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


class Terms(Mapping):
    """This rank's terms (term j: block j // 2, norm j % 2): each its readers ([out, hidden], float32, as
    ``Rotator.readers`` stacks them) and its damped inverse Hessian, by j the inverse (what
    ``learn_rotation`` takes as ``hinv``) and by ``readers(j)`` the readers. Held on ``device``, or
    with ``spill_dir`` one safetensors file per term, read back (once for both) when a step draws it."""

    def __init__(self, device: torch.device, spill_dir: Path | None = None):
        self.device, self.dir = device, spill_dir
        self._held: dict[int, tuple[torch.Tensor, torch.Tensor] | Path] = {}
        self._last: tuple[int, tuple[torch.Tensor, torch.Tensor]] | None = None
        if spill_dir is not None:
            spill_dir.mkdir(parents=True, exist_ok=True)

    def put(self, j: int, readers: torch.Tensor, hinv: torch.Tensor) -> None:
        if self.dir is None:
            self._held[j] = (readers.to(self.device), hinv.to(self.device))
        else:
            path = self.dir / f"term-{j:05d}.safetensors"
            save_item((readers, hinv), path)
            self._held[j] = path

    def _get(self, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self._held[j]
        if not isinstance(x, Path):
            return x
        if self._last is None or self._last[0] != j:
            self._last = None  # the previous term's tensors go before the next are read
            self._last = (j, load_item(x, self.device))
        return self._last[1]

    def readers(self, j: int) -> torch.Tensor:
        return self._get(j)[0]

    def __getitem__(self, j: int) -> torch.Tensor:
        return self._get(j)[1]

    def __contains__(self, j) -> bool:  # without reading a spilled term
        return j in self._held

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(self._held))

    def __len__(self) -> int:
        return len(self._held)

    def files(self) -> list[Path]:
        return [x for x in self._held.values() if isinstance(x, Path)]

    def remove(self) -> None:
        """Delete the spilled files (and their folder, once empty)."""
        self._last = None
        for f in self.files():
            f.unlink(missing_ok=True)
        if self.dir is not None and self.dir.is_dir() and not any(self.dir.iterdir()):
            self.dir.rmdir()


def term_rows(model: nn.Module) -> list[int]:
    """The rows each term stacks (its readers'), from the modules' shapes (a skeleton will do)."""
    blocks = get_module(model, for_config(model.config).blocks)
    return [sum(rows for _, rows in layout) for b in blocks for layout in Rotator.reader_rows(b).values()]


def term_bytes(rows: int, hidden: int) -> int:
    """One term's bytes: its readers ([rows, hidden]) and inverse Hessian ([hidden, hidden]), float32."""
    return (hidden + rows) * hidden * 4


def terms_bytes(model: nn.Module, world: World = SINGLE) -> list[int]:
    """The bytes of the terms each rank holds (``term_owners``), by rank: what each decides to spill
    from, and what the disk estimate adds up for the ranks that will."""
    rows, hidden = term_rows(model), model.config.hidden_size
    out = [0] * world.size
    for r, o in zip(rows, term_owners(rows, hidden, world)):
        out[o] += term_bytes(r, hidden)
    return out


def left_for_terms(max_memory: int | None, act_bytes: int, spilled: bool) -> int | None:
    """What an explicit ``--max-memory`` leaves for the terms once the activations kept in memory (none
    when they are spilled) have their share; None (auto: half the memory available when the terms are
    stored, the activations' already taken) stays None."""
    if max_memory is None:
        return None
    return max(0, max_memory - (0 if spilled else act_bytes))


def term_owners(rows: Sequence[int], hidden: int, world: World) -> list[int]:
    """The rank holding each term, balanced by the cost of one step's work on it: the rotated inverse and
    its Cholesky factor (~3 hidden³) plus W Q (rows × hidden²)."""
    return owners([3.0 * hidden**3 + r * hidden**2 for r in rows], world.size)


def roundings(model: nn.Module, grid: Callable[[str], GridSpec]) -> list:
    """Per term (block j // 2, norm j % 2), what its stacked readers round onto in the objective: each
    linear's rows by ``Rounding.of`` its grid, a linear the solver leaves alone (a router) exactly."""
    arch = for_config(model.config)
    out = []
    for i, block in enumerate(get_module(model, arch.blocks)):
        solved = set(arch.block_linears(block))
        for layout in Rotator.reader_rows(block).values():
            out.append(by_rows([(rows, Rounding.of(grid(f"{arch.blocks}.{i}.{name}")) if name in solved else None)
                                for name, rows in layout]))
    return out


@torch.no_grad()
def collect_terms(model: nn.Module, rot: Rotator, inputs: Sequence[BlockInputs], dev: torch.device,
                  store: Activations, damp: float, keep: Terms, mine: Callable[[int], bool] = lambda j: True,
                  before_block: Hook | None = None, after_block: Hook | None = None, world: World = SINGLE,
                  progress: bool = True) -> None:
    """Per block, the Hessian (2·Σxxᵀ/n, float32 on ``dev``) of each norm's input divided by its RMS (what
    the linears reading the norm see once its scale is folded into them), damped and inverted
    (``damped_inverse``), into ``keep`` with the readers (``rot.readers``, taken while the block is
    loaded) for the terms ``mine`` accepts. ``inputs``: block 0's (this rank's batches with several
    ranks); every rank runs every block (each needs every H, the partials of all)."""
    blocks = get_module(model, for_config(model.config).blocks)
    n_rounds = broadcast(len(inputs), 0, world)  # rank 0 holds the most batches
    for i in tqdm(range(len(blocks)), desc="rotation statistics", unit="block", disable=not progress):
        with block_on_device(i, blocks[i], dev, before_block, after_block) as block, ExitStack() as stack:
            accs = {}
            for name in NORMS:
                norm = get_module(block, name)
                acc = accs[name] = HessianAccumulator(norm.weight.shape[0], dev, staged=not world.single)
                stack.enter_context(hooked(norm, lambda m, a, acc=acc: acc.add(_normalized(m, a[0])), pre=True))
            outputs = store.new()
            run_in_rounds(block, inputs, outputs, list(accs.values()), world, n_rounds)
            readers = rot.readers(block) if mine(2 * i) or mine(2 * i + 1) else {}
            for k, name in enumerate(NORMS):
                if mine(2 * i + k):
                    keep.put(2 * i + k, readers[name], damped_inverse(accs[name].hessian(), damp))
        del accs, readers
        inputs = store.inputs(outputs, block_args(inputs))


def learn_residual(rot: Rotator, model: nn.Module, inputs: Sequence[BlockInputs], config: QuantConfig,
                   dev: torch.device, store: Activations, before_block: Hook | None = None,
                   after_block: Hook | None = None, world: World = SINGLE, progress: bool = True,
                   spill_dir: Path | None = None, max_memory: int | None = None,
                   grid: Callable[[str], GridSpec] | None = None) -> dict:
    """Learn ``rot``'s residual rotation (``--rotate learned``) from the unrotated model's block-0
    ``inputs`` and set it (``Rotator.set_learned``) on every rank; the model is left unrotated. Returns
    the learning's record (the objective relative to Q₀, steps, seconds). This rank's terms go to
    ``spill_dir`` (its own folder) when they would not fit ``max_memory`` bytes (default: half the memory
    available on ``dev``); without a ``spill_dir`` they stay in memory.
    ``grid(full linear name)``: the grid each reader will be solved on (the bound format's ``grid``;
    default: the config's), which the objective rounds onto (``roundings``)."""
    rows = term_rows(model)
    hidden = model.config.hidden_size
    owner = term_owners(rows, hidden, world)
    need = terms_bytes(model, world)[world.rank]
    keep = Terms(dev, spill_dir if spill_dir is not None and should_spill(need, max_memory, dev) else None)
    bar = None  # the learning's progress bar, once the statistics are in

    def tick(step: int, objective: float) -> None:
        bar.update(1)
        bar.set_postfix(objective=f"{objective:.3f}", refresh=False)

    rounding = roundings(model, grid or (lambda name: config.grid()))
    try:
        collect_terms(model, rot, inputs, dev, store, config.damp, keep, lambda j: owner[j] == world.rank,
                      before_block, after_block, world, progress)
        bar = tqdm(total=config.rotate_steps, desc="learning the rotation", unit="step", disable=not progress)
        Q, info = learn_rotation(keep.readers, keep, rot.Q, rounding.__getitem__, steps=config.rotate_steps,
                                 seed=config.rotate_seed, n_terms=len(owner), device=dev, progress=tick,
                                 combine=None if world.single else (lambda t: all_sum(t, world)))
    finally:  # also after an error: what was spilled is removed
        if bar is not None:
            bar.close()
        keep.remove()
    if progress:
        print(f"learned rotation: the readers' estimated error at {info['objective']:.3f} of the Hadamard "
              f"rotation's ({info['seconds']:.0f} s)", file=sys.stderr)
    # every rank learned the same Q; rank 0's is handed out all the same, so that a rank whose
    # arithmetic differed (another BLAS, another GPU) cannot write a checkpoint of another rotation
    Q = broadcast(Q, 0, world)
    rot.set_learned(Q, info["objective"])
    return info

"""Where the calibration activations live while the blocks are solved: in memory, or on disk.

Every per-batch list the block loop keeps (a block's inputs and outputs, the recorded outputs
of finished sub-modules, the inputs of a sub-module's last linear) comes from ``Activations.new()``:

    Activations(None)          -> plain Python lists (everything in memory)
    Activations(directory)     -> SpillList: one safetensors file per batch under ``directory``,
                                  read back one batch at a time when the loop reaches it

With spilling, the activations in memory at any moment are those of about one batch, whatever
the number of calibration samples; results are bit-identical either way (tested). The choice is
made from a byte budget (``--max-memory``) against ``activation_bytes``, an upper estimate of
what the in-memory lists hold while one block is solved.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import itertools
import os
import shutil
import sys
import weakref
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from gptq.io.modules import BlockInputs


def save_item(item, path: Path) -> None:
    """A tensor, a tuple of tensors/None, or None, as one safetensors file (written atomically)."""
    if item is None:
        tensors, meta = {}, {"kind": "none"}
    elif isinstance(item, torch.Tensor):
        tensors, meta = {"0": item}, {"kind": "tensor"}
    elif isinstance(item, tuple) and all(x is None or isinstance(x, torch.Tensor) for x in item):
        tensors, meta = {str(k): x for k, x in enumerate(item) if x is not None}, {"kind": "tuple", "n": str(len(item))}
    else:
        raise TypeError(type(item).__name__)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, tmp, metadata=meta)
    os.replace(tmp, path)


def load_item(path: Path, device: torch.device | str):
    with safe_open(path, "pt") as f:
        meta = f.metadata()
        kind = meta["kind"]
        if kind == "none":
            return None
        if kind == "tensor":
            return f.get_tensor("0").to(device)
        keys = set(f.keys())
        return tuple(f.get_tensor(str(k)).to(device) if str(k) in keys else None for k in range(int(meta["n"])))


class SpillList(Sequence):
    """A list of per-batch activations kept on disk, one file per item; the folder is removed
    when the list is garbage collected."""

    def __init__(self, directory: str | os.PathLike, device: torch.device | str = "cpu"):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=False)
        self.device = device
        self._n = 0
        self._kept: dict[int, object] = {}  # items of a kind that has no file form stay in memory
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.dir), True)

    def _path(self, k: int) -> Path:
        return self.dir / f"{k:06d}.safetensors"

    def append(self, item) -> None:
        try:
            save_item(item, self._path(self._n))
        except TypeError:
            self._kept[self._n] = item
        self._n += 1

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, k: int):
        if not isinstance(k, int):
            raise TypeError("SpillList indices must be integers")
        if k < 0:
            k += self._n
        if not 0 <= k < self._n:
            raise IndexError(k)
        if k in self._kept:
            return self._kept[k]
        return load_item(self._path(k), self.device)

    def __iter__(self):
        return (self[k] for k in range(self._n))

    def files(self) -> list[Path]:
        return [self._path(k) for k in range(self._n)]


class SpilledInputs(Sequence):
    """A block's calibration inputs with the hidden states on disk; the other arguments (masks,
    position embeddings: the same for every block) stay in memory."""

    def __init__(self, hidden: SpillList, rest: list[tuple[tuple, dict]]):
        if len(hidden) != len(rest):
            raise ValueError("hidden states and block arguments disagree in number of batches")
        self.hidden, self.rest = hidden, rest

    def __len__(self) -> int:
        return len(self.hidden)

    def __getitem__(self, k: int) -> BlockInputs:
        return BlockInputs(self.hidden[k], *self.rest[k])

    def __iter__(self):
        return (self[k] for k in range(len(self)))


class Activations:
    """Factory for the loop's per-batch lists: in memory (``spill_dir`` None) or spilled to disk."""

    def __init__(self, spill_dir: str | os.PathLike | None = None, device: torch.device | str = "cpu"):
        self.dir = None if spill_dir is None else Path(spill_dir)
        self.device = device
        self._count = itertools.count()

    @property
    def spilling(self) -> bool:
        return self.dir is not None

    def new(self) -> list | SpillList:
        return [] if self.dir is None else SpillList(self.dir / f"{next(self._count):06d}", self.device)

    def inputs(self, hidden, rest: list[tuple[tuple, dict]]) -> list[BlockInputs] | SpilledInputs:
        """Block inputs from per-batch hidden states (a list or SpillList) and the other arguments."""
        if isinstance(hidden, SpillList):
            return SpilledInputs(hidden, rest)
        return [BlockInputs(h, args, kwargs) for h, (args, kwargs) in zip(hidden, rest, strict=True)]


def activation_bytes(config, nsamples: int, seqlen: int, dtype: torch.dtype, fp_target: bool = False) -> int:
    """Upper estimate of the activations held in memory while one block is solved: its inputs,
    outputs and two recorded sub-module outputs (4 × hidden) plus one linear's inputs (up to the
    MLP width), for every calibration token; with full-precision targets also that stream's
    inputs and outputs (2 × hidden) and its recorded inputs of the linears that open a group
    (about 3 × hidden + the MLP width)."""
    hidden = config.hidden_size
    inter = (getattr(config, "intermediate_size", None) or getattr(config, "ffn_dim", None)
             or getattr(config, "n_inner", None) or 4 * hidden)
    per_token = 4 * hidden + inter + (5 * hidden + inter if fp_target else 0)
    return nsamples * seqlen * per_token * torch.empty((), dtype=dtype).element_size()


def available_memory(device: torch.device | str = "cpu") -> int:
    """Bytes available to new allocations where the activations would live: the GPU's free
    memory for a CUDA device, else the host's (MemAvailable on Linux)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


_LIBC = _libc() if sys.platform.startswith("linux") else None


def return_free_memory() -> None:
    """Hand the heap's free pages back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Called between blocks when spilling: every batch read back from disk is a fresh allocation
    of a few MB, and glibc otherwise keeps the fragmented free space, so resident memory crept up
    ~30 MB per SmolLM2 block. (Not done in memory mode: there the creep is small and re-faulting
    the returned pages cost a few percent of time on small models.)"""
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is not None:
        trim(0)


def should_spill(needed: int, budget: int | None, device: torch.device | str = "cpu") -> bool:
    """Spill when the activations would exceed the budget (default: half the memory available on
    ``device``, where the in-memory activations would be kept)."""
    return needed > (available_memory(device) // 2 if budget is None else budget)


def block_args(inputs) -> list[tuple[tuple, dict]]:
    """The non-hidden arguments of each batch, without reading spilled hidden states."""
    if isinstance(inputs, SpilledInputs):
        return inputs.rest
    return [(x.args, x.kwargs) for x in inputs]

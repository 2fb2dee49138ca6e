"""Several processes (``torchrun``), one quantization: torch.distributed, gloo on CPU, NCCL on CUDA.

    torchrun --nproc-per-node 4 -m gptq.quantize MODEL ...          # no new flag

Who does what (every function here is a no-op, or the obvious single-process answer, when the
run is one process, so the block loop reads the same either way):

- ``my_batches``: calibration batches are dealt round-robin, batch k to rank k mod N, so in
  round j the ranks hold batches jN, jN+1, …, jN+N−1: consecutive, in rank order. Every rank
  needs at least one batch (``check_batches``): fewer batches than ranks is refused on every rank.
- Hessians: each rank computes the partial XᵀX of its batch (``HessianAccumulator`` staged), and
  after every round ``exchange`` hands every rank the round's partials, which each adds in rank
  order, i.e. in batch order. One process adds the same per-batch partials in the same order, so
  H, and everything after it, is bit-identical whatever N is (with the same threads per process:
  the partials themselves must be computed alike).
- Solves: rows are independent, so each rank solves a slice of a layer's rows against the same H
  and ``all_gather`` assembles them; every rank writes the result into its copy of the block and
  all continue the block loop with the same quantized block on their own batches. This is
  bit-identical to the whole solve where the matrix products give each row the same values
  whatever the row count (true of the CPU's BLAS here, checked by the tests with 2 and 3 ranks;
  a GPU library may pick other kernels for other shapes). Grids whose state spans rows
  (double-quantized absmax, GGML types) are solved whole by an ``owner`` rank, balanced by solve
  cost (longest first onto the least loaded rank), and broadcast.
- A size budget's first pass (``mix.measure``) runs the same way: each rank its own batches, the
  Hessian partials exchanged after every round, per-batch sums gathered and added in batch order;
  the errors, and so the plan, are then taken from rank 0 (``broadcast``).
- ``--rotate learned`` (``pipeline.learned``): its statistics pass runs as the main pass does; its
  terms are then dealt to the ranks by cost (``owners``), each rank computes its terms' values and
  gradients into slots that are zero elsewhere, and ``all_sum`` hands every rank every slot exactly,
  so all take the steps one process takes.
- Mixture-of-experts blocks: the experts' recorded inputs are gathered to every rank in batch
  order and each rank solves every expert as one process would (``pipeline._gather_batches``).
- Rank 0 alone writes the checkpoint, progress and report (``stream.py``); each rank saves its
  own batches' activations for ``--resume``, named by global batch index, so a run resumes with
  any number of ranks.
- Collectives time out (``GPTQ_DIST_TIMEOUT`` seconds, default 1800): a rank that dies makes the
  others stop with a message instead of waiting forever.
"""

from __future__ import annotations

import atexit
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from gptq.core.config import ConfigError
from gptq.io.modules import run_block

TIMEOUT_ENV = "GPTQ_DIST_TIMEOUT"


class RankLostError(RuntimeError):
    """Another rank stopped answering (died, was killed, or hung past the timeout)."""


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    group: bool = False  # a torch.distributed process group exists (also for one forced rank)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def single(self) -> bool:
        """No process group: the plain single-process path, no collective at all."""
        return not self.group


SINGLE = World()


FORCE_ENV = "GPTQ_DISTRIBUTED"  # "1": join a process group even as a single rank (tests the exchange path)


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher) as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or (
        os.environ.get(FORCE_ENV) == "1" and "MASTER_ADDR" in os.environ)


def init(device: torch.device) -> World:
    """Join the process group torchrun describes (env://): NCCL for CUDA, gloo for CPU. A single
    process gets ``SINGLE`` without any process group."""

    if not launched():
        return SINGLE
    if not dist.is_initialized():  # (a forced single rank still goes through every collective)
        timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "1800")))
        if device.type == "cuda":
            local = int(os.environ.get("LOCAL_RANK", "0"))
            if local >= torch.cuda.device_count():
                raise RuntimeError(f"torchrun started rank {local} on a node with {torch.cuda.device_count()} GPU(s): "
                                   "NCCL runs one GPU per rank. Use --nproc-per-node "
                                   f"{torch.cuda.device_count()}, or --device cpu for CPU ranks (gloo)")
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
        atexit.register(shutdown)
    return World(dist.get_rank(), dist.get_world_size(), True)


def check_batches(n_batches: int, world: World) -> None:
    """Refuse fewer calibration batches than ranks (a rank without a batch has no block inputs to
    run). The same answer on every rank, so all stop together and none waits at a collective."""
    if n_batches < world.size:
        raise ConfigError(
            f"the calibration data makes {n_batches} batch(es) (--nsamples / --batch-size, rounded up) for "
            f"{world.size} ranks, and every rank needs at least one: pass more --nsamples (at least --batch-size x "
            f"{world.size}), a smaller --batch-size, or run at most {n_batches} rank(s) (torchrun --nproc-per-node)")


def my_batches(n_batches: int, world: World) -> list[int]:
    """The global indices of this rank's calibration batches: k ≡ rank (mod size). Refuses fewer
    batches than ranks (``check_batches``)."""
    check_batches(n_batches, world)
    return list(range(world.rank, n_batches, world.size))


def rounds(n_batches: int, world: World) -> int:
    return -(-n_batches // world.size)


def owners(costs: list[float], size: int) -> list[int]:
    """An owner rank per item, balancing the summed cost: longest first, each onto the least
    loaded rank (ties: the lower rank). Deterministic, so every rank computes the same answer."""
    load = [0.0] * size
    out = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(size), key=lambda r: (load[r], r))
        out[i] = r
        load[r] += costs[i]
    return out


def solve_cost(rows: int, cols: int) -> float:
    """The solver's work for a [rows, cols] matrix: the Cholesky and inverse (~cols³) plus the
    column loop and its lazy updates (~rows·cols²)."""
    return float(cols) ** 3 + float(rows) * cols * cols


def _collective(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except RuntimeError as e:  # gloo/NCCL errors (DistBackendError is a RuntimeError)
        raise RankLostError(f"lost contact with another rank ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                            "a rank died, was killed or hung. Progress up to the last completed block is kept: "
                            "rerun the same command with --resume") from e


def exchange(accumulators: list, world: World) -> None:
    """End of a round: every rank receives every rank's staged partial (or nothing, from a rank
    without a batch this round) and adds them in rank order, so each holds the whole H (the
    solve's rows are then shared out: ``pipeline._solve_distributed``)."""

    for acc in accumulators:
        part, rows = acc.take_staged()
        flag = torch.tensor([rows], dtype=torch.int64, device=acc.device)
        flags = [torch.zeros_like(flag) for _ in range(world.size)]
        _collective(dist.all_gather, flags, flag)
        if part is None:
            part = torch.zeros(acc.columns, acc.columns, dtype=torch.float32, device=acc.device)
        parts = [torch.empty_like(part) for _ in range(world.size)]
        _collective(dist.all_gather, parts, part)
        for p, f in zip(parts, flags):
            if int(f):
                acc.add_partial(p, int(f))
        del parts


def run_in_rounds(block, inputs, outputs, accumulators: list, world: World, n_rounds: int) -> None:
    """Run ``block`` on each of this rank's batches (``inputs``), appending to ``outputs``; with several
    ranks in ``n_rounds`` rounds, the staged partials of ``accumulators`` exchanged after each (a rank
    out of batches still takes part), as the main pass does."""
    if world.single:
        for x in inputs:
            outputs.append(run_block(block, x))
        return
    for j in range(n_rounds):
        if j < len(inputs):
            outputs.append(run_block(block, inputs[j]))
        exchange(accumulators, world)


def all_gather(obj, world: World) -> list:
    """Every rank's ``obj``, in rank order, on every rank (pickled)."""
    if world.single:
        return [obj]

    out = [None] * world.size
    _collective(dist.all_gather_object, out, obj)
    return out


def all_sum(t: torch.Tensor, world: World) -> torch.Tensor:
    """``t`` summed over the ranks, in place (on ``t``'s device: CUDA under NCCL); ``t`` itself for one process."""
    if not world.single:
        _collective(dist.all_reduce, t)
    return t


def broadcast(obj, src: int, world: World):
    """``obj`` from rank ``src`` to every rank (pickled: tensors travel with their values)."""
    if world.single:
        return obj

    box = [obj if world.rank == src else None]
    _collective(dist.broadcast_object_list, box, src=src)
    return box[0]


def barrier(world: World) -> None:
    if not world.single:

        _collective(dist.barrier)


def shutdown() -> None:

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

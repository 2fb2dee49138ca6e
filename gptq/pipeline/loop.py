"""The one generic block-by-block loop.

    windows ─► embeddings ─► block 0 inputs ─┐
                                             ▼
          for each block:  move to device ─► for each sequential group:
                                               capture inputs → H per linear → solve → write Ŵ back
                           run the quantized block → next block's inputs ─► move back

With full-precision targets (``config.fp_target``, on by default) a second stream of activations
runs beside the first, through each block once before it is quantized: what the full-precision
model feeds every linear, paired batch by batch with what the quantized one feeds it
(``solver.solve``).

Only the block being solved sits on the compute device. Per-architecture knowledge comes from
``architectures.py``; the maths from ``solver.solve``; packing from ``pack.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from gptq.core.config import QuantConfig
from gptq.core.solver import SolveResult
from gptq.io.modules import (
    BlockInputs,
    StopForward,
    first_block_inputs,
    get_module,
    move,
    record_io,
    record_outputs,
    replay_outputs,
    set_weight_matrix,
    stop_after,
    weight_matrix,
)
from gptq.models.architectures import for_config
from gptq.models.moe import record_routing
from gptq.pipeline.activations import Activations, block_args, return_free_memory
from gptq.pipeline.capture import hessians
from gptq.pipeline.distributed import SINGLE, World, broadcast, owners, run_in_rounds, solve_cost
from gptq.pipeline.experts import gather_batches, solve_experts
from gptq.pipeline.fp_stream import FullPrecisionStream
from gptq.pipeline.replay import closing_linear, rebuild_child_outputs, replayable_children
from gptq.pipeline.solve import Grids, solve_group, sort_channels


@dataclass(frozen=True)
class LayerReport:
    name: str
    loss: float
    seconds: float
    shape: tuple[int, int]  # [out, in]
    tokens: int | None = None  # routed experts: calibration rows their Hessian was built from
    routed: int | None = None  # routed experts: calibration tokens the router sent them
    rule: str = "gptq"  # or "identity-hessian": an expert starved of tokens (see _solve_experts)


@torch.no_grad()
def capture_block_inputs(model: nn.Module, windows: torch.Tensor, batch_size: int, dev: torch.device | str = "cpu",
                         store: Activations | None = None) -> Sequence[BlockInputs]:
    """Run the embeddings on CPU-resident weights and stop at the first block; the inputs it
    receives go to ``dev`` (or, when ``store`` spills, to disk batch by batch)."""
    store = store or Activations()
    arch = for_config(model.config)
    blocks = get_module(model, arch.blocks)
    emb_device = model.get_input_embeddings().weight.device
    hidden, rest = store.new(), []
    with first_block_inputs(blocks[0]) as seen:
        for batch in windows.split(batch_size):
            try:
                model(input_ids=batch.to(emb_device), use_cache=False)
            except StopForward:
                pass
            if len(seen) != 1:
                raise RuntimeError("the model did not reach its first decoder block for every calibration batch")
            x = seen.pop()
            hidden.append(x.hidden if store.spilling else x.hidden.to(dev))
            rest.append(move((x.args, x.kwargs), dev))
    return store.inputs(hidden, rest)


def _run_pass(block, inputs, arch, solved, recorded, store, groups=(), closing=None, routing=None,
              world: World = SINGLE, n_rounds: int = 0, reference=None):
    """One pass of the calibration batches through ``block``: replays the finished children,
    records newly finished ones, accumulates H for ``groups``. With ``closing`` = (child, linear)
    the pass runs to the end of the child, recording the child's outputs and the linear's
    inputs and outputs. With ``routing`` (a list) the routed experts' inputs are recorded into it.
    With several ranks the batches go in ``n_rounds`` rounds, after each of which the Hessian
    partials are exchanged (``distributed.exchange``). With ``reference`` ({linear: per-batch
    inputs} recorded from the full-precision model, ``fp_stream``) the accumulators also sum the
    full-precision targets' cross terms, batch by batch (``capture.hessians``).
    Returns (accumulators, outputs, closing records)."""
    with ExitStack() as stack:
        for child, outs in recorded.items():
            stack.enter_context(replay_outputs(get_module(block, child), outs))
        new = {c: stack.enter_context(record_outputs(get_module(block, c), store.new()))
               for c in replayable_children(arch, solved) if c not in recorded}
        closing_records = None
        if closing is not None:
            child = get_module(block, closing[0])
            closing_records = (stack.enter_context(record_outputs(child, store.new())),
                               stack.enter_context(record_io(get_module(block, closing[1]), store.new())))
            stack.enter_context(stop_after(child))
        if routing is not None:
            stack.enter_context(record_routing(get_module(block, arch.experts.path), routing,
                                               stop=not groups and closing is None))
        accs = (stack.enter_context(hessians(groups, stop=closing is None and routing is None, staged=not world.single,
                                             reference=reference))
                if groups else {})
        outputs = store.new()
        firsts = [accs[next(iter(g))] for g in groups]  # none without groups: the rounds exchange nothing
        firsts += [a.cross for a in firsts if a.cross is not None]
        run_in_rounds(block, inputs, outputs, firsts, world, n_rounds)
    recorded.update({c: outs for c, outs in new.items() if len(outs) == len(inputs)})
    return accs, outputs, closing_records


def _passes(arch, true_sequential: bool) -> list[tuple[list, bool]]:
    """The capture passes over one block, as (groups, experts?). The routed experts form one step
    of their own where the first of their groups is declared (``_solve_experts`` solves each
    expert's gate/up, then its down, expert by expert); without true-sequential, one pass."""
    plain = [g for g in arch.sequential if not arch.routed(g)]
    if not true_sequential:
        return [(plain, len(plain) < len(arch.sequential))]
    passes: list[tuple[list, bool]] = []
    for g in arch.sequential:
        if not arch.routed(g):
            passes.append(([g], False))
        elif passes[-1:] != [([], True)]:
            passes.append(([], True))
    return passes


@dataclass(frozen=True)
class _Run:
    """What every block of one run is solved with."""

    arch: object
    config: QuantConfig
    grids: Grids
    store: Activations
    world: World
    n_rounds: int  # batch rounds under torchrun (rank 0 holds the most batches)
    passes: list  # the capture passes over a block (``_passes``)


@torch.no_grad()
def quantize_blocks(model: nn.Module, inputs: Sequence[BlockInputs], config: QuantConfig, dev: torch.device,
                    first: int = 0, progress: bool = True, before_block=None, after_block=None,
                    store: Activations | None = None, world: World = SINGLE,
                    reference: Sequence[BlockInputs] | None = None, grids: Grids | None = None) -> None:
    """The block loop from block ``first`` on, given that block's inputs.

    before_block(i, block) runs before a block is used (streaming loads its weights there);
    after_block(i, block, results_i, report_i, next_inputs, next_reference) gets the block's results
    ({linear name: SolveResult without Ŵ, which is written back into the block}).
    ``grids``: linear name → the GridSpec it is solved on (the output format's choice; default the
    config's uniform grid).
    ``store`` decides where the per-batch activations live (memory, or spilled to disk).
    With several ranks (``world``), ``inputs`` are this rank's batches (``distributed.my_batches``).
    With full-precision targets (``config.fp_target``) a second stream runs beside the quantized
    one (``fp_stream``): the full-precision model's inputs of each block (``reference``; at block 0
    the same as ``inputs``, so only a resumed run passes it).
    """
    store = store or Activations()
    arch = for_config(model.config)
    blocks = get_module(model, arch.blocks)
    stream = None
    if config.fp_target and first < len(blocks):
        if reference is None and first:
            raise ValueError("full-precision targets resumed past block 0 need the full-precision stream's inputs")
        stream = FullPrecisionStream(inputs if reference is None else reference, store)
    # true-sequential: one capture pass per group, each after the groups before it are quantized;
    # otherwise one pass captures every group from the unquantized block
    run = _Run(arch, config, grids or (lambda name: config.grid()), store, world,
               broadcast(len(inputs), 0, world), _passes(arch, config.true_sequential))
    bar = tqdm(range(first, len(blocks)), desc="quantizing blocks", unit="block", disable=not progress,
               initial=first, total=len(blocks))
    for i in bar:
        block = blocks[i]
        if before_block is not None:
            before_block(i, block)
        home = next(block.parameters()).device
        block.to(dev)
        last = i + 1 == len(blocks)
        results_i, report_i, outputs = _quantize_block(block, f"{arch.blocks}.{i}", inputs, stream, run, bar, last)
        if not last:
            inputs = store.inputs(outputs, block_args(inputs))
            if stream is not None:
                stream.advance()
        block.to(home)
        if after_block is not None:
            after_block(i, block, results_i, report_i, None if last else inputs,
                        None if last or stream is None else stream.inputs)
        del results_i, report_i, outputs
        if store.spilling:  # batches read back from disk fragment the heap: ~30 MB per block otherwise
            return_free_memory()


def _quantize_block(block: nn.Module, prefix: str, inputs: Sequence[BlockInputs], stream, run: _Run, bar,
                    last: bool):
    """Solve every linear of one block, pass by pass (``_passes``), writing each Ŵ back; returns
    (results, report, the block's outputs on ``inputs`` or None for the last block)."""
    arch, config, store, world = run.arch, run.config, run.store, run.world
    if stream is not None:  # through the block before anything in it changes
        stream.run(block, [next(iter(g)) for groups, _ in run.passes for g in groups])
    solved: set[str] = set()
    recorded: dict[str, list] = {}
    results: dict[str, SolveResult] = {}
    report: list[LayerReport] = []

    def keep(name, module, r, seconds, tokens=None, routed=None, rule="gptq"):
        full = f"{prefix}.{name}"
        set_weight_matrix(module, r.weight)
        results[full] = r.without_weight()
        report.append(LayerReport(full, r.loss, seconds, tuple(r.weight.shape), tokens, routed, rule))
        bar.set_postfix_str(f"{name} loss {r.loss:.3g}")

    for groups, experts in run.passes:
        modules = [{name: get_module(block, name) for name in group} for group in groups]
        closing = closing_linear(arch, solved, groups)
        routing = store.new() if experts else None
        owner_of = owners([solve_cost(sum(weight_matrix(m).shape[0] for m in g.values()),
                                      weight_matrix(next(iter(g.values()))).shape[1]) for g in modules], world.size)
        accs, _, records = _run_pass(block, inputs, arch, solved, recorded, store, modules, closing, routing,
                                     world, run.n_rounds, None if stream is None else stream.seen)
        perm = None
        for group, owner in zip(modules, owner_of):
            lead = next(iter(group))  # the linear whose input H was captured
            H = accs[lead].hessian()  # every rank holds the whole H (distributed.exchange)
            C = None if accs[lead].cross is None else accs[lead].cross.matrix()
            perm = (sort_channels(block, arch, lead, H, results, prefix, config)
                    if len(group) == 1 else None)  # a consumer whose input channels may be put in act-order
            if perm is not None:
                H = H[perm[:, None], perm[None, :]]
                C = None if C is None else C[perm[:, None], perm[None, :]]
            for name, module, r, seconds in solve_group(group, H, config, prefix, world, owner, C, run.grids):
                keep(name, module, r, seconds)
            del H, C
            solved.update(group)
        del accs
        if experts:
            if not world.single:  # every rank solves every expert from all the batches, in batch order
                routing = gather_batches(routing, run.n_rounds, world, store)
            for result in solve_experts(block, arch, routing, config, prefix, results, run.grids):
                keep(*result)
            solved.update(n for g in arch.sequential if arch.routed(g) for n in g)
            del routing
        if closing is not None:
            linear = get_module(block, closing[1])
            if perm is not None:  # its recorded inputs are in the old channel order
                linear = lambda x, lin=linear, p=perm: lin(x.index_select(-1, p))  # noqa: E731
            rebuilt = rebuild_child_outputs(linear, records, len(inputs), store)
            if rebuilt is not None:
                recorded[closing[0]] = rebuilt
            del records
    outputs = None if last else _run_pass(block, inputs, arch, solved, recorded, store)[1]
    return results, report, outputs

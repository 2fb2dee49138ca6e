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

import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, replace

import torch
from torch import nn
from tqdm.auto import tqdm

from gptq.core.config import QuantConfig
from gptq.core.hessian import HessianAccumulator
from gptq.core.pack import pack_qweight, pack_qzeros, unpack_qzeros
from gptq.core.solver import SolveResult, concat_rows, round_to_nearest, solve, solve_batch
from gptq.io.modules import (
    BlockInputs,
    StopForward,
    first_block_inputs,
    get_module,
    in_features,
    move,
    record_inputs,
    record_io,
    record_outputs,
    replay_outputs,
    resolve_device,
    run_block,
    set_weight_matrix,
    stop_after,
    weight_matrix,
)
from gptq.models.architectures import for_config
from gptq.models.moe import expert_rows, record_routing, routed_counts
from gptq.pipeline.activations import Activations, activation_bytes, block_args, return_free_memory, should_spill
from gptq.pipeline.capture import hessians
from gptq.pipeline.distributed import SINGLE, World, all_gather, broadcast, exchange, owners, solve_cost


@dataclass(frozen=True)
class PackedLinear:
    """The tensors a checkpoint stores for one quantized linear (all on CPU)."""

    qweight: torch.Tensor  # [in·bits/32, out] int32
    qzeros: torch.Tensor  # [groups, out·bits/32] int32
    scales: torch.Tensor  # [groups, out] float16
    g_idx: torch.Tensor  # [in] int32
    bias: torch.Tensor | None  # [out] float16

    def permute_outputs(self, perm: torch.Tensor, bits: int, checkpoint_format: str) -> "PackedLinear":
        """The same layer with its output rows reordered (rows are quantized independently, so this
        is exact): qweight and scales are indexed along out, qzeros unpacked, indexed, repacked."""
        zeros = unpack_qzeros(self.qzeros, bits, checkpoint_format)[:, perm]
        return PackedLinear(self.qweight[:, perm].contiguous(), pack_qzeros(zeros, bits, checkpoint_format),
                            self.scales[:, perm].contiguous(), self.g_idx,
                            None if self.bias is None else self.bias[perm].contiguous())

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {f"{prefix}.qweight": self.qweight, f"{prefix}.qzeros": self.qzeros,
               f"{prefix}.scales": self.scales, f"{prefix}.g_idx": self.g_idx}
        if self.bias is not None:
            out[f"{prefix}.bias"] = self.bias
        return out


@dataclass(frozen=True)
class LayerReport:
    name: str
    loss: float
    seconds: float
    shape: tuple[int, int]  # [out, in]
    tokens: int | None = None  # routed experts: calibration rows their Hessian was built from
    routed: int | None = None  # routed experts: calibration tokens the router sent them
    rule: str = "gptq"  # or "identity-hessian": an expert starved of tokens (see _solve_experts)


def pack_result(r: SolveResult, module: nn.Module, config: QuantConfig):
    """The layer as its checkpoint format stores it: GPTQ's packed tensors (integer grids) or the
    bitsandbytes 4-bit layout (codebook grids, ``bnb.py``)."""
    bias = getattr(module, "bias", None)
    # a copy, never a view of the module's bias: sort_channels later permutes the module's bias in
    # place *and* the packed layer's rows, which on a shared tensor permuted the stored bias twice
    bias = None if bias is None else bias.detach().to("cpu", copy=True)
    if config.gguf:
        from gptq.formats.gguf import GgmlLinear

        return GgmlLinear.from_result(r, config.grid, bias)
    if config.grid != "int":
        from gptq.formats.bnb import Bnb4bitLinear

        rows, cols = r.codes.shape
        if cols % config.group_size:
            raise ValueError(f"bitsandbytes blocks of {config.group_size} must not straddle rows: an input size of "
                             f"{cols} is not a multiple; choose a --group-size that divides every layer's input")
        return Bnb4bitLinear(r.codes.cpu().contiguous(), r.scales.T.cpu().float().contiguous(), config.grid,
                             None if bias is None else bias.contiguous(),
                             nested=None if r.scale_state is None else r.scale_state.to("cpu"))
    return PackedLinear(
        qweight=pack_qweight(r.codes.cpu(), config.bits),
        qzeros=pack_qzeros(r.zeros.cpu(), config.bits, config.checkpoint_format),
        scales=r.scales.cpu().contiguous(),
        g_idx=r.g_idx.cpu().clone(),  # own storage: linears solved together share one g_idx
        bias=None if bias is None else bias.to(torch.float16).contiguous(),
    )


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


def solve_group(modules: dict[str, nn.Module], H: torch.Tensor, config: QuantConfig, prefix: str,
                world: World = SINGLE, owner: int = 0, C: torch.Tensor | None = None):
    """Solve linears that share one input (and so one H) as a single stacked matrix, then split
    the rows back: identical to solving each alone, with one Cholesky and one column loop.
    With several ranks (each holding H) the stacked rows are shared out (``_solve_distributed``).
    ``C``: the full-precision targets' cross term of that input (``solver.solve``), or None."""
    if config.double_quant and len(modules) > 1:  # double-quantized scales are per matrix: no stacking
        for name, module in modules.items():
            yield from solve_group({name: module}, H, config, prefix, world, owner, C)
        return
    if config.layer_grids:  # a GGUF mix: stack only the linears of one type
        kinds: dict[QuantConfig, dict] = {}
        for name, module in modules.items():
            kinds.setdefault(config.for_layer(f"{prefix}.{name}"), {})[name] = module
        if len(kinds) > 1 or next(iter(kinds)) is not config:
            for cfg, group in kinds.items():
                yield from solve_group(group, H, replace(cfg, layer_grids=()), prefix, world, owner, C)
            return
    Ws = [weight_matrix(m) for m in modules.values()]  # each [out_i, in], the modules' own dtype
    sizes = [W.shape[0] for W in Ws]
    W = torch.cat(Ws) if len(Ws) > 1 else Ws[0]
    del Ws
    t0 = time.perf_counter()
    name = f"{prefix}.{'/'.join(modules)}"
    r = solve(W, H, config, name, C) if world.single else _solve_distributed(W, H, config, name, world, owner, C)
    del W
    seconds = (time.perf_counter() - t0) / len(sizes)
    start = 0
    for (name, module), size in zip(modules.items(), sizes):
        yield name, module, r.rows(start, start + size), seconds
        start += size


def _solve_distributed(W: torch.Tensor, H: torch.Tensor, config: QuantConfig, name: str, world: World,
                       owner: int, C: torch.Tensor | None = None) -> SolveResult:
    """One solve shared by the ranks. Rows are independent, so with uniform integer grids each rank
    solves a contiguous slice of the rows against the same H (its own Cholesky of it) and the
    slices are gathered: bit-identical to the whole solve where the matrix products give the same
    values for any row count (checked for the CPU's BLAS by the tests). Grids whose state spans the
    rows (double-quantized absmax, GGML types) are solved whole by ``owner`` and broadcast."""
    if config.grid != "int":
        return broadcast(solve(W, H, config, name, C) if world.rank == owner else None, owner, world)
    bounds = [round(k * W.shape[0] / world.size) for k in range(world.size + 1)]
    mine = solve(W[bounds[world.rank] : bounds[world.rank + 1]], H, config, name, C)
    return concat_rows(all_gather(mine, world))


def sort_channels(block: nn.Module, arch, consumer: str, H: torch.Tensor, packed_i: dict, prefix: str,
                  config: QuantConfig) -> torch.Tensor | None:
    """Reorder the channels between ``consumer`` (e.g. ``mlp.down_proj``) and its already solved
    producers (``gate_proj``, ``up_proj``) by descending diag(H) of the consumer, in the block
    itself: the producers' output rows (weights, bias, packed tensors) and the consumer's input
    columns move alike, so the block computes the same function. The consumer is then solved in
    act-order with columns already in that order, so its groups are the act-order groups and its
    g_idx stays k // group. Returns the permutation (new position → old channel), or None when
    the architecture declares no such pair for ``consumer``, act-order is off/static,
    ``config.sort_channels`` is off, or the scales are double-quantized (their 256-value blocks
    run along the producers' rows as solved, so the rows cannot move afterwards)."""
    producers = arch.producers_of(consumer)
    if (producers is None or not config.sort_channels or config.double_quant
            or config.act_order not in ("group-aware", "dynamic")):
        return None
    perm = torch.argsort(torch.diag(H), descending=True, stable=True).to(H.device)  # [in]
    cons = get_module(block, consumer)
    set_weight_matrix(cons, weight_matrix(cons)[:, perm])
    for name in producers:
        m = get_module(block, name)
        set_weight_matrix(m, weight_matrix(m)[perm])
        if getattr(m, "bias", None) is not None:
            m.bias.data.copy_(m.bias.data[perm])
        full = f"{prefix}.{name}"
        packed_i[full] = packed_i[full].permute_outputs(perm.cpu(), config.bits, config.checkpoint_format)
    return perm


def _replayable_children(arch, solved: set[str]) -> list[str]:
    """Direct children of a block (e.g. ``self_attn``) whose linears are all quantized: their
    output no longer changes, so later passes over the block can replay it instead of recomputing."""
    return [c for c in arch.children() if all(n in solved for n in arch.linears_under(c))]


def _closing_linear(arch, solved: set[str], groups) -> tuple[str, str] | None:
    """(child, linear) when this pass captures one linear that is the last unsolved one of a
    child module (e.g. ``self_attn.o_proj``): the child's output can then be rebuilt from the
    linear's recorded inputs once it is quantized, instead of recomputing the whole child."""
    if len(groups) != 1 or len(groups[0]) != 1:
        return None
    name = next(iter(groups[0]))
    child = name.split(".")[0]
    if "." not in name or not all(n in solved for n in arch.linears_under(child) if n != name):
        return None
    return child, name


def _run_pass(block, inputs, arch, solved, recorded, store, groups=(), closing=None, routing=None,
              world: World = SINGLE, n_rounds: int = 0, reference=None):
    """One pass of the calibration batches through ``block``: replays the finished children,
    records newly finished ones, accumulates H for ``groups``. With ``closing`` = (child, linear)
    the pass runs to the end of the child, recording the child's outputs and the linear's
    inputs and outputs. With ``routing`` (a list) the routed experts' inputs are recorded into it.
    With several ranks the batches go in ``n_rounds`` rounds, after each of which the Hessian
    partials are exchanged (``distributed.exchange``). With ``reference`` ({linear: per-batch
    inputs} recorded from the full-precision model) the accumulators also sum the full-precision
    targets' cross terms, batch by batch (``capture.hessians``).
    Returns (accumulators, outputs, closing records)."""
    with ExitStack() as stack:
        for child, outs in recorded.items():
            stack.enter_context(replay_outputs(get_module(block, child), outs))
        new = {c: stack.enter_context(record_outputs(get_module(block, c), store.new()))
               for c in _replayable_children(arch, solved) if c not in recorded}
        closing_records = None
        if closing is not None:
            child = get_module(block, closing[0])
            closing_records = (stack.enter_context(record_outputs(child, store.new())),
                               stack.enter_context(record_io(get_module(block, closing[1]), store.new())))
            stack.enter_context(stop_after(child))
        if routing is not None:
            stack.enter_context(record_routing(get_module(block, arch.experts.path), routing,
                                               stop=not groups and closing is None))
        current = None if reference is None or not groups else {}  # the batch's full-precision inputs
        accs = (stack.enter_context(hessians(groups, stop=closing is None and routing is None, staged=not world.single,
                                             reference=current))
                if groups else {})
        outputs = store.new()

        def run(j):
            if current is not None:
                current.update((n, reference[n][j]) for n in (next(iter(g)) for g in groups))
            outputs.append(run_block(block, inputs[j]))

        if world.single:
            for j in range(len(inputs)):
                run(j)
        else:
            firsts = [accs[next(iter(g))] for g in groups]
            firsts += [a.cross for a in firsts if a.cross is not None]
            for j in range(n_rounds):
                if j < len(inputs):
                    run(j)
                if groups:
                    exchange(firsts, world)
    recorded.update({c: outs for c, outs in new.items() if len(outs) == len(inputs)})
    return accs, outputs, closing_records


def _gather_batches(items, n_rounds: int, world: World, store: Activations):
    """Every rank's per-batch records, on every rank, in global batch order (round by round, rank
    by rank). Used for the routed experts under torchrun: each rank then solves every expert
    exactly as one process would (the experts' work is repeated, not shared, for now)."""
    out = store.new()
    for j in range(n_rounds):
        got = all_gather(move(items[j], "cpu") if j < len(items) else None, world)
        for item in got:
            if item is not None:
                out.append(move(item, store.device))
    return out


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


def _expert_chunk(n_in: int, n_mid: int, budget: int = 512 << 20) -> int:
    """Experts taken at once: their Hessians and the solver's copies of their weights in ``budget``."""
    per_expert = 4 * (max(n_in, n_mid) ** 2 + 4 * 3 * n_in * n_mid)
    return max(1, budget // per_expert)


def solve_groups(groups: list[dict[str, nn.Module]], Hs: list[torch.Tensor], config: QuantConfig, prefix: str):
    """Several groups of linears, each with its own H (e.g. one per expert): solved together by
    ``solve_batch`` when their stacked matrices share a shape and ``config.batch_experts`` is on,
    else one by one. Yields (name, module, result, seconds) as ``solve_group`` does."""
    shapes = {(sum(weight_matrix(m).shape[0] for m in g.values()), H.shape[0]) for g, H in zip(groups, Hs)}
    if len(groups) < 2 or len(shapes) > 1 or not config.batch_experts or config.double_quant or config.layer_grids:
        for group, H in zip(groups, Hs):
            yield from solve_group(group, H, config, prefix)
        return
    W = torch.stack([torch.cat([weight_matrix(m) for m in g.values()]) for g in groups])  # [B, out, in]
    t0 = time.perf_counter()
    results = solve_batch(W, torch.stack(Hs), config, [f"{prefix}.{'/'.join(g)}" for g in groups])
    del W
    seconds = (time.perf_counter() - t0) / sum(len(g) for g in groups)
    for group, r in zip(groups, results):
        start = 0
        for name, module in group.items():
            size = weight_matrix(module).shape[0]
            yield name, module, r.rows(start, start + size), seconds
            start += size


def _solve_experts(block: nn.Module, arch, routing, config: QuantConfig, prefix: str, packed_i: dict):
    """Solve every routed expert of a block from the recorded (hidden, top-k index) batches.

    Each expert's gate/up Hessian comes from its own rows: with ``expert_tokens="all"`` every
    calibration token (then it is one H, built once, and the gate/up rows of many experts are
    stacked into one solve), else the tokens routed to it. Its down Hessian comes from those rows
    through its (already quantized, with true-sequential) gate/up. Experts are taken a chunk at a
    time, so only a bounded number of Hessians is held; same-shape experts of a chunk with their
    own Hessians are solved as a batch (``solve_groups``). An expert whose H would rest on fewer
    than ``expert_min_tokens`` rows is solved against the identity Hessian instead (no error
    feedback, each group's grid by H-free MSE: round-to-nearest on the same grids) and reported
    with rule "identity-hessian".
    Yields (name, module, result, seconds, tokens, routed, rule); the caller records each result
    in ``packed_i`` before the generator goes on (sort_channels moves the producers' packed rows)."""
    experts = get_module(block, arch.experts.path)
    base = arch.experts.path
    n_exp = len(experts)
    routed = routed_counts(routing, n_exp)
    all_tokens = config.expert_tokens == "all"
    total = sum(int(x.shape[0]) for x, _ in routing)
    tokens = [total if all_tokens else int(routed[e]) for e in range(n_exp)]
    starved = [t < config.expert_min_tokens for t in tokens]
    n_in, n_mid = in_features(experts[0].gate_proj), in_features(experts[0].down_proj)
    dev = experts[0].gate_proj.weight.device

    def hessians_of(chunk, n, rows_of):
        """{expert: H} over each expert's rows (``rows_of`` maps them to the linear's input)."""
        accs = {e: HessianAccumulator(n, dev) for e in chunk if not starved[e]}
        for x, idx in routing:
            for e, acc in accs.items():
                rows = expert_rows(x, idx, e, all_tokens)
                if rows.shape[0]:
                    acc.add(rows_of(e, rows))
        eye = torch.eye(n, dtype=torch.float32, device=dev)
        return {e: accs[e].hessian() if e in accs and accs[e].count else eye for e in chunk}

    def results(pairs):
        for name, module, r, seconds in pairs:
            e = int(name[len(base) + 1:].split(".")[0])
            yield name, module, r, seconds, tokens[e], int(routed[e]), "identity-hessian" if starved[e] else "gptq"

    shared = hessians_of([0], n_in, lambda e, rows: rows)[0] if all_tokens else None  # the same rows for all
    step = _expert_chunk(n_in, n_mid)
    for c0 in range(0, n_exp, step):
        chunk = list(range(c0, min(c0 + step, n_exp)))
        h_down = None if config.true_sequential else hessians_of(chunk, n_mid, lambda e, rows: experts[e].hidden(rows))
        pairs = [{f"{base}.{e}.gate_proj": experts[e].gate_proj, f"{base}.{e}.up_proj": experts[e].up_proj}
                 for e in chunk]
        if shared is not None:  # one H for every expert: their rows stack into one matrix
            yield from results(solve_group({k: m for p in pairs for k, m in p.items()}, shared, config, prefix))
        else:
            h_up = hessians_of(chunk, n_in, lambda e, rows: rows)
            yield from results(solve_groups(pairs, [h_up.pop(e) for e in chunk], config, prefix))
        if h_down is None:  # from the quantized gate/up
            h_down = hessians_of(chunk, n_mid, lambda e, rows: experts[e].hidden(rows))
        downs, hs = [], []
        for e in chunk:
            name, H = f"{base}.{e}.down_proj", h_down.pop(e)
            perm = sort_channels(block, arch, name, H, packed_i, prefix, config)
            downs.append({name: experts[e].down_proj})
            hs.append(H if perm is None else H[perm[:, None], perm[None, :]])
        yield from results(solve_groups(downs, hs, config, prefix))
        del downs, hs, h_down


def _rebuild_child_outputs(linear: nn.Module, records, n: int, store: Activations) -> Sequence | None:
    """The closing child's outputs with its last linear now quantized: (linear(x), *rest).
    Only when every recorded output really was that linear's output (checked exactly)."""
    child_outs, io = records
    if len(child_outs) != n or len(io) != n:
        return None
    rebuilt = store.new()
    for out, (x, y) in zip(child_outs, io):
        first, rest = (out[0], tuple(out[1:])) if isinstance(out, tuple) else (out, None)
        if not (isinstance(first, torch.Tensor) and first.shape == y.shape and torch.equal(first, y)):
            return None
        y_q = linear(x)
        rebuilt.append(y_q if rest is None else (y_q, *rest))
    return rebuilt


@torch.no_grad()
def round_to_nearest_model(model: nn.Module, config: QuantConfig) -> nn.Module:
    """The baseline: every linear GPTQ would quantize, rounded to its grid in place, no calibration."""
    arch = for_config(model.config)
    for block in get_module(model, arch.blocks):
        for name in arch.block_linears(block):
            lin = get_module(block, name)
            set_weight_matrix(lin, round_to_nearest(weight_matrix(lin).float(), config).weight)
    return model


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    windows: torch.Tensor,  # [nsamples, seqlen] token ids
    config: QuantConfig,
    device: str = "auto",
    batch_size: int = 8,
    progress: bool = True,
    max_memory: int | None = None,
) -> tuple[dict[str, PackedLinear], list[LayerReport]]:
    """GPTQ every linear of every decoder block in place; return the packed tensors and a report.

    ``model``'s quantized linears hold the dequantized Ŵ afterwards, so it can be evaluated as is.
    Calibration activations above ``max_memory`` bytes (default: half the available memory) are
    spilled to a temporary folder (``TMPDIR``), batch by batch; the result is the same.
    """
    dev = resolve_device(device)
    model.eval()
    dtype = next(model.parameters()).dtype
    spill = should_spill(activation_bytes(model.config, windows.shape[0], windows.shape[1], dtype,
                                          bool(config.fp_target)), max_memory, dev)
    packed: dict[str, PackedLinear] = {}
    report: list[LayerReport] = []

    def keep(i, block, packed_i, report_i, next_inputs, next_reference):
        packed.update(packed_i)
        report.extend(report_i)

    with tempfile.TemporaryDirectory(prefix="gptq-activations-") if spill else nullcontext() as tmp:
        store = Activations(tmp, dev)
        inputs = capture_block_inputs(model, windows, batch_size, dev, store)
        quantize_blocks(model, inputs, config, dev, progress=progress, after_block=keep, store=store)
        del inputs
    return packed, report


@torch.no_grad()
def quantize_blocks(model: nn.Module, inputs: Sequence[BlockInputs], config: QuantConfig, dev: torch.device,
                    first: int = 0, progress: bool = True, before_block=None, after_block=None,
                    store: Activations | None = None, world: World = SINGLE,
                    reference: Sequence[BlockInputs] | None = None) -> None:
    """The block loop from block ``first`` on, given that block's inputs.

    before_block(i, block) runs before a block is used (streaming loads its weights there);
    after_block(i, block, packed_i, report_i, next_inputs, next_reference) gets the block's results.
    ``store`` decides where the per-batch activations live (memory, or spilled to disk).
    With several ranks (``world``), ``inputs`` are this rank's batches (``distributed.my_batches``).
    With full-precision targets (``config.fp_target``) a second stream runs beside the quantized
    one: the full-precision model's inputs of each block (``reference``; at block 0 the same as
    ``inputs``, so only a resumed run passes it), run through each block once before the block is
    quantized, recording what it feeds every linear that opens a group.
    """
    store = store or Activations()
    n_rounds = broadcast(len(inputs), 0, world)  # rank 0 holds the most batches
    arch = for_config(model.config)
    blocks = get_module(model, arch.blocks)
    if config.fp_target and reference is None and first < len(blocks):
        if first:
            raise ValueError("full-precision targets resumed past block 0 need the full-precision stream's inputs")
        reference = inputs
    # true-sequential: one capture pass per group, each after the groups before it are quantized;
    # otherwise one pass captures every group from the unquantized block
    passes = _passes(arch, config.true_sequential)
    bar = tqdm(range(first, len(blocks)), desc="quantizing blocks", unit="block", disable=not progress,
               initial=first, total=len(blocks))
    for i in bar:
        block = blocks[i]
        if before_block is not None:
            before_block(i, block)
        home = next(block.parameters()).device
        block.to(dev)
        fp_x, fp_outputs = None, None
        if config.fp_target:  # the full-precision stream, through the block before anything in it changes
            fp_x = {next(iter(g)): store.new() for groups, _ in passes for g in groups}
            fp_outputs = store.new()
            with record_inputs(block, fp_x):
                for inp in reference:
                    fp_outputs.append(run_block(block, inp))
        solved: set[str] = set()
        recorded: dict[str, list] = {}
        packed_i: dict[str, PackedLinear] = {}
        report_i: list[LayerReport] = []
        prefix = f"{arch.blocks}.{i}"

        def keep(name, module, r, seconds, tokens=None, routed=None, rule="gptq"):
            full = f"{prefix}.{name}"
            set_weight_matrix(module, r.weight)
            packed_i[full] = pack_result(r, module, config.for_layer(full))
            report_i.append(LayerReport(full, r.loss, seconds, tuple(r.weight.shape), tokens, routed, rule))
            bar.set_postfix_str(f"{name} loss {r.loss:.3g}")

        for groups, experts in passes:
            modules = [{name: get_module(block, name) for name in group} for group in groups]
            closing = _closing_linear(arch, solved, groups)
            routing = store.new() if experts else None
            owner_of = owners([solve_cost(sum(weight_matrix(m).shape[0] for m in g.values()),
                                          weight_matrix(next(iter(g.values()))).shape[1]) for g in modules], world.size)
            accs, _, records = _run_pass(block, inputs, arch, solved, recorded, store, modules, closing, routing,
                                         world, n_rounds, fp_x)
            perm = None
            for group, owner in zip(modules, owner_of):
                lead = next(iter(group))  # the linear whose input H was captured
                H = accs[lead].hessian()  # every rank holds the whole H (distributed.exchange)
                C = None if accs[lead].cross is None else accs[lead].cross.matrix()
                perm = (sort_channels(block, arch, lead, H, packed_i, prefix, config)
                        if len(group) == 1 else None)  # a consumer whose input channels may be put in act-order
                if perm is not None:
                    H = H[perm[:, None], perm[None, :]]
                    C = None if C is None else C[perm[:, None], perm[None, :]]
                for name, module, r, seconds in solve_group(group, H, config, prefix, world, owner, C):
                    keep(name, module, r, seconds)
                del H, C
                solved.update(group)
            del accs
            if experts:
                if not world.single:  # every rank solves every expert from all the batches, in batch order
                    routing = _gather_batches(routing, n_rounds, world, store)
                for result in _solve_experts(block, arch, routing, config, prefix, packed_i):
                    keep(*result)
                solved.update(n for g in arch.sequential if arch.routed(g) for n in g)
                del routing
            if closing is not None:
                linear = get_module(block, closing[1])
                if perm is not None:  # its recorded inputs are in the old channel order
                    linear = lambda x, lin=linear, p=perm: lin(x.index_select(-1, p))  # noqa: E731
                rebuilt = _rebuild_child_outputs(linear, records, len(inputs), store)
                if rebuilt is not None:
                    recorded[closing[0]] = rebuilt
                del records
        if i + 1 < len(blocks):
            _, outputs, _ = _run_pass(block, inputs, arch, solved, recorded, store)
            if fp_outputs is not None:
                reference = store.inputs(fp_outputs, block_args(reference))
            inputs = store.inputs(outputs, block_args(inputs))
        del recorded, fp_x, fp_outputs
        block.to(home)
        last = i + 1 == len(blocks)
        if after_block is not None:
            after_block(i, block, packed_i, report_i, None if last else inputs, None if last else reference)
        del packed_i, report_i
        if store.spilling:  # batches read back from disk fragment the heap: ~30 MB per block otherwise
            return_free_memory()

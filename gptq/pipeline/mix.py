"""Mixed precision under a size budget (``--max-size`` / ``--bits-per-weight``): a cheap first pass
over the blocks estimates the error every candidate grid would cause in every group of linears,
``core.mix.allocate`` spends the budget, and the format solves and stores each linear on its choice.

    skeleton ──setup()──► units (names, options, bytes of each), the budget for the linears, the
                          fixed bytes; an impossible budget refused here, before any long work; the
                          options below the floor dropped (``--min-bits``: by default the widest
                          width a uniform file fits the budget at, ``core.mix.floor_bits``)
    block inputs ──measure()──► errors per unit and option (the full-precision model, one pass,
                               streaming like the main one: a block's weights at a time)
    core.mix.allocate ──► Plan {linear: GridSpec} ──fmt.set_plan──► the usual solve

A unit is the linears that read one input (q/k/v; gate/up): one Hessian, and one layer in the
engines that fuse them, so one choice. A block's routed experts (mixture-of-experts models) are one
unit too, every expert's gate, up and down: the engines run them as one layer on one setting; each
expert's error is taken on its routed rows (``_expert_errors``). The estimate
(``QuantConfig.sensitivity``) is the output error tr(ΔW H ΔWᵀ) the candidate causes on the
full-precision inputs, ΔW from round-to-nearest
("hessian") or from the GPTQ solve ("gptq"), optionally divided by the mean energy of
the residual stream entering the block ("/residual": later RMSNorms divide an error by that norm) or
scaled by what the unit's coarsest option does to the block's output over that output's energy
("/block"; "gptq/block" is the default). ``benchmarks mix-estimates`` measures how each ranks single
units' damage, ``benchmarks mix`` what each allocation does end to end: the default is the one
estimate that allocated well both on SmolLM2 and on a larger synthetic model (docs/results.md).

Under ``torchrun`` the first pass is shared out as the main one is: each rank runs its own calibration
batches through the block, the ranks' Hessian partials are exchanged and added in batch order
(``distributed.exchange``), and the per-batch sums (the residual stream's energy, a block's output
error) are gathered and added in batch order, so every rank holds one process's H and sums bit for
bit (the routed experts' recorded inputs are gathered in batch order, ``experts.gather_batches``, as
the main pass gathers them), and each computes the errors from them (every unit on every rank: they
are cheap next to the forward passes, except with the "gptq" estimate). The errors are then taken from rank 0
(``distributed.broadcast``), so the plan is the same on every rank by construction.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from gptq.core.config import ConfigError, QuantConfig
from gptq.core.grids import GridSpec
from gptq.core.mix import BudgetError, Unit, allocate, bounds, floor_bits, total
from gptq.core.solver import round_to_nearest, solve
from gptq.core.hessian import HessianAccumulator
from gptq.io.modules import (
    block_on_device,
    get_module,
    in_features,
    run_block,
    set_weight_matrix,
    weight_matrix,
)
from gptq.models.architectures import for_config
from gptq.models.moe import expert_rows, record_routing, routed_counts
from gptq.pipeline.activations import Activations, block_args
from gptq.pipeline.capture import hessians
from gptq.pipeline.distributed import SINGLE, World, all_gather, broadcast, run_in_rounds
from gptq.pipeline.experts import gather_batches


@dataclass(frozen=True)
class Shape:
    names: tuple[str, ...]  # full linear names
    shapes: tuple[tuple[int, int], ...]  # [out, in] each


def unit_shapes(model: nn.Module) -> list[Shape]:
    """The units of a (skeleton) model: per block, each group of linears sharing an input, and the
    block's routed experts (every expert's gate, up and down) as one unit where the first of their
    groups is declared: the engines store and run a block's experts as one layer on one setting
    (vLLM's fused MoE layer takes one quantization setting for its gate/up and down; GGUF keeps each
    role of all experts in one tensor of one type)."""
    arch = for_config(model.config)
    routed = [n for g in arch.sequential if arch.routed(g) for n in g]
    out = []
    for i, block in enumerate(get_module(model, arch.blocks)):
        for group in arch.sequential:
            if arch.routed(group):
                if group[0] != routed[0]:
                    continue  # in the experts' unit already
                group = arch.expand(routed, len(get_module(block, arch.experts.path)))
            mods = [get_module(block, n) for n in group]
            out.append(Shape(tuple(f"{arch.blocks}.{i}.{n}" for n in group),
                             tuple((_out_features(m), in_features(m)) for m in mods)))
    return out


def _out_features(m: nn.Module) -> int:
    return m.weight.shape[1] if type(m).__name__ == "Conv1D" else m.weight.shape[0]


def options(fmt, shape: Shape, grids: list[GridSpec], auto: bool) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(candidate indices a unit can take, bytes of each)."""
    ok = [k for k, g in enumerate(grids) if all(fmt.allows(g, n_in, auto) for _, n_in in shape.shapes)]
    if not ok:
        raise ConfigError(f"none of the candidates {labels(grids)} can store {', '.join(shape.names)} "
                          f"(input sizes {sorted({n for _, n in shape.shapes})}); add one that can (--candidates)")
    return tuple(ok), tuple(fmt.unit_bytes(shape.names, shape.shapes, grids[k]) for k in ok)


def short(names) -> str:
    """model.layers.3.self_attn.q_proj, ...k_proj, ...v_proj → layers.3.self_attn.q_proj+k_proj+v_proj."""
    parent = names[0].rsplit(".", 1)[0]
    leaves = "+".join(n.rsplit(".", 1)[1] for n in names)
    return f"{parent.split('.', 1)[-1]}.{leaves}"


def label(g: GridSpec) -> str:
    return f"{g.bits}g{g.group_size}" if g.kind == "int" else g.kind


def labels(grids) -> str:
    return ",".join(label(g) for g in grids)


@dataclass(frozen=True)
class Plan:
    """A budget spent: the candidates, each unit's choice, and the record the report keeps."""

    grids: tuple[GridSpec, ...]
    units: tuple[Unit, ...]
    choice: tuple[int, ...]  # position into each unit's options
    budget: int  # bytes for the quantized linears
    fixed: int  # bytes outside them (0 for a bits-per-weight budget)
    min_bits: int = 0  # no unit below this width (``Setup.min_bits``)

    def by_linear(self) -> dict[str, GridSpec]:
        return {n: self.grids[u.options[c]] for u, c in zip(self.units, self.choice) for n in u.names}

    def record(self) -> dict:
        used, err = total(list(self.units), list(self.choice))
        return {"budget_bytes": self.budget, "fixed_bytes": self.fixed, "linear_bytes": used,
                "estimated_error": err, "candidates": labels(self.grids), "min_bits": self.min_bits,
                "units": [{"linears": list(u.names), "choice": label(self.grids[u.options[c]]),
                           "bytes": u.bytes[c], "error": u.errors[c],
                           "options": [{"grid": label(self.grids[k]), "bytes": b, "error": e}
                                       for k, b, e in zip(u.options, u.bytes, u.errors)]}
                          for u, c in zip(self.units, self.choice)]}

    def table(self, limit: int = 0) -> str:
        """The allocation as printed: one line per unit (``limit``: at most that many, then the counts)."""
        rows = [f"{'linears':<44} {'choice':>8} {'bytes':>12} {'est. error':>11}"]
        for u, c in list(zip(self.units, self.choice))[: limit or None]:
            rows.append(f"{short(u.names):<44.44} {label(self.grids[u.options[c]]):>8} {u.bytes[c]:>12,} "
                        f"{u.errors[c]:>11.4g}")
        if limit and len(self.units) > limit:
            rows.append(f"... {len(self.units) - limit} more in the report")
        counts: dict[str, int] = {}
        for u, c in zip(self.units, self.choice):
            counts[label(self.grids[u.options[c]])] = counts.get(label(self.grids[u.options[c]]), 0) + len(u.names)
        used, _ = total(list(self.units), list(self.choice))
        rows.append(f"linears: {', '.join(f'{k} x{v}' for k, v in sorted(counts.items()))}; "
                    f"{used:,} of {self.budget:,} bytes" + (f"; none below {self.min_bits} bits" if self.min_bits else ""))
        return "\n".join(rows)


def budget(config: QuantConfig, shapes: list[Shape], fixed: int) -> int:
    """Bytes the quantized linears may take: --bits-per-weight × their weights / 8, or --max-size less
    the fixed bytes."""
    if config.bits_per_weight:
        return int(config.bits_per_weight * sum(o * i for s in shapes for o, i in s.shapes) // 8)
    return config.max_size - fixed


def check_feasible(config: QuantConfig, units_bytes: list[tuple[int, ...]], weights: int, fixed: int,
                   grids: list[GridSpec]) -> None:
    """Refuse a budget no allocation can meet, or one that the largest candidates already satisfy,
    naming the feasible range in the budget's own unit (before any long work)."""
    lo = sum(min(b) for b in units_bytes)
    hi = sum(max(b) for b in units_bytes)
    have = budget(config, [], fixed) if config.max_size else int(config.bits_per_weight * weights // 8)
    if lo <= have < hi:
        return
    if config.max_size:
        rng = f"{_mb(lo + fixed)} to {_mb(hi + fixed)} ({lo + fixed} to {hi + fixed} bytes)"
        asked = f"--max-size {config.max_size} bytes"
    else:
        rng = f"{8 * lo / weights:.3f} to {8 * hi / weights:.3f} bits per weight"
        asked = f"--bits-per-weight {config.bits_per_weight}"
    why = ("is below the smallest file the candidates can make" if have < lo
           else "is at or above what the largest candidate everywhere takes (nothing to choose)")
    hint = ("; add smaller candidates (e.g. --candidates 2g64,3g64,4g64,8g128) or raise the budget" if have < lo
            else "; quantize uniformly at the largest candidate instead, or add larger candidates")
    if config.min_bits and have < lo:
        hint = f"; lower --min-bits (now {config.min_bits}) or raise the budget"
    raise BudgetError(f"{asked} {why}: with candidates {labels(grids)} the feasible range is {rng}{hint}")


def _mb(n: int) -> str:
    return f"{n / 1e6:.3f} MB" if n < 1e8 else f"{n / 1e6:.1f} MB"


@torch.no_grad()
def measure(model: nn.Module, inputs, config: QuantConfig, shapes: list[Shape], unit_options: list[tuple[int, ...]],
            grids: list[GridSpec], dev, store: Activations | None = None, before_block=None, after_block=None,
            progress: bool = True, on_weight=None, world: World = SINGLE) -> list[list[float]]:
    """The estimated error of each unit's options (``config.sensitivity``): one pass of the
    calibration batches through the full-precision blocks (``before_block(i, block)`` /
    ``after_block(i, block)`` load and release weights when streaming). ``inputs``: block 0's
    (with several ranks, ``world``: this rank's batches, ``distributed.my_batches``; the answer is
    one process's, the same on every rank). ``on_weight(name, option, Ŵ)`` sees every candidate
    weight (``benchmarks mix-estimates``)."""
    store = store or Activations()
    arch = for_config(model.config)
    blocks = get_module(model, arch.blocks)
    kind, _, reach = config.sensitivity.partition("/")
    n_rounds = broadcast(len(inputs), 0, world)  # rank 0 holds the most batches
    by_block: dict[int, list[int]] = {}
    for k, s in enumerate(shapes):
        by_block.setdefault(int(s.names[0][len(arch.blocks) + 1:].split(".")[0]), []).append(k)
    errors: list[list[float]] = [[] for _ in shapes]
    for i in tqdm(range(len(blocks)), desc="measuring sensitivity", unit="block", disable=not progress):
        with block_on_device(i, blocks[i], dev, before_block, after_block) as block:
            groups = [{n: get_module(block, n) for n in g} for g in arch.sequential if not arch.routed(g)]
            routing = None if arch.experts is None else store.new()
            outputs = store.new()
            with ExitStack() as stack:
                if routing is not None:  # what the routed experts receive, and from whom they are chosen
                    stack.enter_context(record_routing(get_module(block, arch.experts.path), routing, stop=False,
                                                       weights=True))
                accs = stack.enter_context(hessians(groups, stop=False, staged=not world.single))
                run_in_rounds(block, inputs, outputs, [accs[next(iter(g))] for g in groups], world, n_rounds)
            if routing is not None and not world.single:  # every batch's routing on every rank, in batch order
                routing = gather_batches(routing, n_rounds, world, store)
            energy = _energy([x.hidden for x in inputs], world) if reach == "residual" else None
            out_energy = _energy(outputs, world) if reach == "block" and by_block.get(i) else None
            seen = None if on_weight is None else (lambda n, opt, Q, i=i: on_weight(f"{arch.blocks}.{i}.{n}", opt, Q))
            for k in by_block.get(i, ()):
                names = [n[len(arch.blocks) + 1 + len(str(i)) + 1:] for n in shapes[k].names]
                experts = arch.experts is not None and names[0].startswith(arch.experts.path + ".")
                H = None if experts else accs[names[0]].hessian()

                def unit(opts, keep, seen=None):  # [(error, {linear: Ŵ} if keep)] per option of ``opts``
                    if experts:
                        return _expert_errors(block, arch, routing, opts, grids, config, kind, keep, seen)
                    return _errors([(n, weight_matrix(get_module(block, n)).float(), H, H) for n in names], opts, grids,
                                   config, kind, keep, seen)

                errors[k] = [err for err, _ in unit(unit_options[k], False, seen)]
                if reach == "residual":
                    errors[k] = [e / energy for e in errors[k]]
                elif reach == "block":  # what the coarsest option does to the block's output, per unit of its error
                    # its weights made again rather than every option's kept: a block's experts on every
                    # candidate would not fit in memory
                    j = max(range(len(errors[k])), key=lambda o: errors[k][o])  # the first of the largest error
                    (err, weights), = unit((unit_options[k][j],), True)
                    factor = _block_error(block, inputs, outputs, weights, world) / max(err, 1e-30)
                    errors[k] = [e * factor / out_energy for e in errors[k]]
                    del weights
                del H
            del routing
            del accs
            if i + 1 < len(blocks):
                inputs = store.inputs(outputs, block_args(inputs))
    return broadcast(errors, 0, world)  # rank 0's: one plan on every rank, whatever each computed


def _errors(linears, options, grids: list[GridSpec], config: QuantConfig, kind: str, keep: bool, seen=None,
            into: list | None = None) -> list[tuple[float, dict]]:
    """Per option, (Σ tr(ΔW H ΔWᵀ) over ``linears`` = [(name, W, H to solve on, H to weigh the error
    by)], {name: Ŵ} if ``keep``): ΔW from round-to-nearest (``kind`` "hessian") or the GPTQ solve
    ("gptq"). ``into``: the per-option results to add to (a unit measured a few linears at a time)."""
    out = into if into is not None else [(0.0, {}) for _ in options]
    for j, opt in enumerate(options):
        err, Qs = out[j]
        for n, W, H_solve, H in linears:
            grid = grids[opt]
            Q = (round_to_nearest(W, config, grid).weight if kind == "hessian"
                 else solve(W, H_solve, config, n, None, grid).weight)
            if seen is not None:
                seen(n, opt, Q)
            D = W - Q.float()  # [out, in]
            err += float(((D @ H) * D).sum())
            if keep:
                Qs[n] = Q
        out[j] = (err, Qs)
    return out


def _expert_errors(block: nn.Module, arch, routing, options, grids: list[GridSpec], config: QuantConfig, kind: str,
                   keep: bool, seen=None) -> list[tuple[float, dict]]:
    """``_errors`` of a block's routed experts as one unit, expert by expert (one expert's Hessians
    held at a time). Each expert's error is weighed by what reaches the block's output: its rows,
    each times its routing weight, over all calibration tokens (H = 2 Σ w² x xᵀ / N, on the scale of
    a dense unit's 2 X Xᵀ / N; its down projection's on the expert's full-precision hidden rows), so
    an expert the router seldom picks counts little. With the "gptq" estimate each expert is solved
    as the main pass solves it (``experts.solve_experts``): on its routed rows, or every row with
    ``expert_tokens="all"``, and on the identity below ``expert_min_tokens`` rows."""
    experts = get_module(block, arch.experts.path)
    base = arch.experts.path
    n_tokens = sum(int(x.shape[0]) for x, *_ in routing)
    routed = routed_counts(routing, len(experts))
    all_tokens = config.expert_tokens == "all"
    out = [(0.0, {}) for _ in options]
    for e, ex in enumerate(experts):
        n_in, n_mid = in_features(ex.gate_proj), in_features(ex.down_proj)
        dev = ex.gate_proj.weight.device
        h_in = torch.zeros(n_in, n_in, device=dev)
        h_mid = torch.zeros(n_mid, n_mid, device=dev)
        starved = (n_tokens if all_tokens else int(routed[e])) < config.expert_min_tokens
        solve_in = solve_mid = None
        if kind == "gptq" and not starved:
            solve_in, solve_mid = HessianAccumulator(n_in, dev), HessianAccumulator(n_mid, dev)
        for x, idx, w in routing:
            x, idx, w = x.to(dev), idx.to(dev), w.to(dev)
            token, slot = torch.where(idx == e)
            if token.numel():
                rows = x[token]
                wt = w[token, slot].float()[:, None]
                a, b = rows.float() * wt, ex.hidden(rows).float() * wt
                h_in.addmm_(a.T, a)
                h_mid.addmm_(b.T, b)
            if solve_in is not None:
                rows = expert_rows(x, idx, e, all_tokens)
                if rows.shape[0]:
                    solve_in.add(rows)
                    solve_mid.add(ex.hidden(rows))
        h_in.mul_(2.0 / n_tokens)
        h_mid.mul_(2.0 / n_tokens)
        if solve_in is not None and solve_in.count:
            s_in, s_mid = solve_in.hessian(), solve_mid.hessian()
        else:  # round-to-nearest, or a starved expert solved as the main pass solves it
            s_in, s_mid = torch.eye(n_in, device=dev), torch.eye(n_mid, device=dev)
        lin = [(f"{base}.{e}.{leaf}", weight_matrix(getattr(ex, leaf)).float(), H_s, H)
               for leaf, H_s, H in (("gate_proj", s_in, h_in), ("up_proj", s_in, h_in), ("down_proj", s_mid, h_mid))]
        _errors(lin, options, grids, config, kind, keep, seen, into=out)
        del h_in, h_mid, s_in, s_mid, lin
    return out


def _in_batch_order(mine: list[float], world: World) -> list[float]:
    """Per-batch values of this rank's batches → every batch's, in batch order, on every rank (batch
    k is the (k // size)-th of rank k mod size: ``distributed.my_batches``)."""
    if world.single:
        return mine
    per_rank = all_gather(mine, world)
    return [per_rank[k % world.size][k // world.size] for k in range(sum(map(len, per_rank)))]


def _energy(hidden, world: World = SINGLE) -> float:
    """Mean squared norm of the residual stream per token, over the batches (all ranks' batches,
    added in batch order)."""
    per_batch = _in_batch_order([float(h.float().pow(2).sum(-1).mean()) for h in hidden], world)
    return sum(per_batch) / len(per_batch)


@torch.no_grad()
def _block_error(block: nn.Module, inputs, outputs, weights: dict, world: World = SINGLE) -> float:
    """Mean squared change per token of the block's output when the linears ``weights`` names
    ({name: Ŵ}) hold those weights (each restored afterwards); over all ranks' batches."""
    old = {n: weight_matrix(get_module(block, n)).clone() for n in weights}
    try:
        for n, Q in weights.items():
            set_weight_matrix(get_module(block, n), Q.to(old[n].dtype))
        per_batch = [float((run_block(block, x).float() - y.float()).pow(2).sum(-1).mean())
                     for x, y in zip(inputs, outputs)]
    finally:
        for n, W in old.items():
            set_weight_matrix(get_module(block, n), W)
    per_batch = _in_batch_order(per_batch, world)
    return sum(per_batch) / len(per_batch)


def spend(grids: list[GridSpec], units: list[Unit], budget_bytes: int, fixed: int, min_bits: int = 0) -> Plan:
    try:
        choice = allocate(units, budget_bytes)
    except BudgetError as e:
        lo, hi = bounds(units)
        raise BudgetError(f"{e}; the candidates span {lo} to {hi} bytes") from None
    return Plan(tuple(grids), tuple(units), tuple(choice), budget_bytes, fixed, min_bits)


@dataclass(frozen=True)
class Setup:
    """What a budget run knows before any calibration data: the candidates, the units with the
    options each can take and their bytes, the bytes for the linears and the fixed rest."""

    grids: tuple[GridSpec, ...]
    shapes: tuple[Shape, ...]
    options: tuple[tuple[int, ...], ...]
    bytes: tuple[tuple[int, ...], ...]
    budget: int
    fixed: int
    fixed_of: object = None  # --max-size: {linear: GridSpec} → the fixed bytes exactly, headers on those grids
    min_bits: int = 0  # the floor applied (--min-bits, or auto: ``core.mix.floor_bits``); 0 = none
    dropped: tuple[str, ...] = ()  # candidates the automatic floor left out

    def note(self) -> str | None:
        """What the floor left out, for the command to print (None if nothing)."""
        if not self.dropped:
            return None
        return (f"a size budget stores no linear below {self.min_bits} bits here, so {', '.join(self.dropped)} "
                "will not be used: a uniform file at that width fits the budget, and the bytes above it buy more "
                "than keeping a few linears lower (docs/results.md); --min-bits 0 allows them")


def setup(model: nn.Module, fmt, config: QuantConfig, source_dir=None, rotation=None) -> Setup:
    """The budget's static part from a (skeleton) model and its bound format; refuses an impossible
    budget with the feasible range (``check_feasible``), before any long work. ``rotation``: the
    rotation's record (``models.rotation.Rotation``) when the model is rotated: an untied head is
    stored, and the record travels in the metadata."""
    if for_config(model.config).experts is not None and not fmt.mixed_experts:
        raise ConfigError(f"a size budget (mixed precision) for a mixture-of-experts model ({model.config.model_type}) "
                          f"is supported with --format gptq, gptq_v2 or gguf, not --format {fmt.name}; use one of those, or "
                          "quantize at one setting without a budget")
    grids = fmt.candidates(config.candidates)
    shapes = unit_shapes(model)
    opts = [options(fmt, s, grids, config.candidates == "auto") for s in shapes]
    fixed, fixed_of = 0, None
    if config.max_size:
        if source_dir is None:
            raise ConfigError("--max-size needs the model directory (to count the tensors stored as they are); "
                              "pass it, or give the budget as --bits-per-weight")
        untie = rotation is not None and rotation.untied
        extra = {} if rotation is None else {"gptq_rotation": rotation.as_dict()} | (
            {"tie_word_embeddings": False} if untie else {})
        quantized = {n for s in shapes for n in s.names}
        fixed = fmt.fixed_bytes(model, source_dir, quantized, untie, extra)

        def fixed_of(by_linear):
            return fmt.fixed_bytes(model, source_dir, quantized, untie, extra, by_linear)
    weights = sum(o * i for s in shapes for o, i in s.shapes)
    if config.min_bits:  # given: applied first, so a refused budget names the range above the floor
        opts = _at_least(opts, grids, config.min_bits, shapes)
    check_feasible(config, [b for _, b in opts], weights, fixed, grids)
    have = budget(config, shapes, fixed)
    floor, dropped = config.min_bits, ()
    if floor is None:
        # --max-size: 0.1 % kept in hand, since the headers are counted exactly only once the grids are chosen
        # (``settle``), and a uniform file that fits only within them would leave no plan at all
        room = have - have // 1000 if config.max_size else have
        floor = floor_bits([b for _, b in opts], [tuple(grids[k].bits for k in o) for o, _ in opts], room)
        opts = _at_least(opts, grids, floor, shapes)
        dropped = tuple(label(g) for g in grids if g.bits < floor)  # the note says why; a given floor needs none
    return Setup(tuple(grids), tuple(shapes), tuple(o for o, _ in opts), tuple(b for _, b in opts),
                 have, fixed, fixed_of, floor, dropped)


def _at_least(opts, grids: list[GridSpec], bits: int, shapes: list[Shape]):
    """Each unit's (options, bytes) restricted to candidates of at least ``bits`` bits."""
    out = []
    for (o, b), shape in zip(opts, shapes):
        keep = [(k, n) for k, n in zip(o, b) if grids[k].bits >= bits]
        if not keep:
            raise ConfigError(f"--min-bits {bits}: no candidate of {labels(grids)} with at least {bits} bits can store "
                              f"{', '.join(shape.names)}; lower --min-bits or add a wider candidate (--candidates)")
        out.append((tuple(k for k, _ in keep), tuple(n for _, n in keep)))
    return out


def plan(st: Setup, model: nn.Module, inputs, config: QuantConfig, dev, store=None, before_block=None,
         after_block=None, progress: bool = True, world: World = SINGLE) -> Plan:
    """Measure (``measure``; with several ranks, each on its own batches) and spend the budget
    (``core.mix.allocate``): the same plan on every rank."""
    errors = measure(model, inputs, config, list(st.shapes), list(st.options), list(st.grids), dev, store,
                     before_block, after_block, progress, world=world)
    units = [Unit(s.names, o, b, tuple(e)) for s, o, b, e in zip(st.shapes, st.options, st.bytes, errors)]
    return settle(st, spend(list(st.grids), units, st.budget, st.fixed, st.min_bits), config.max_size)


def settle(st: Setup, chosen: Plan, max_size: int) -> Plan:
    """--max-size: the headers on the chosen grids (their shapes' and offsets' digits differ from the
    representative grid's by a few bytes), and the budget spent again that many bytes lower while the
    file would exceed it; the plan then records the exact fixed bytes."""
    if st.fixed_of is None:
        return chosen
    for _ in range(16):
        fixed = st.fixed_of(chosen.by_linear())
        over = fixed + total(list(chosen.units), list(chosen.choice))[0] - max_size
        if over <= 0:
            return Plan(chosen.grids, chosen.units, chosen.choice, max_size - fixed, fixed, st.min_bits)
        chosen = spend(list(st.grids), list(chosen.units), chosen.budget - over, chosen.fixed, st.min_bits)
    raise BudgetError(f"--max-size {max_size}: no plan found whose file fits it to the byte; raise it a little")


def plan_from_record(st: Setup, record: dict) -> Plan:
    """A plan saved by an interrupted run (``Plan.record``), for --resume: the same choices."""
    by_label = {label(g): k for k, g in enumerate(st.grids)}
    units, choice = [], []
    for s, o, b, r in zip(st.shapes, st.options, st.bytes, record["units"]):
        if list(s.names) != r["linears"]:
            raise ValueError("the saved mixed-precision plan does not match this model; pass --overwrite")
        saved = {x["grid"]: x["error"] for x in r["options"]}
        errs = tuple(saved[label(st.grids[k])] for k in o)
        units.append(Unit(s.names, o, b, errs))
        choice.append(o.index(by_label[r["choice"]]))
    return Plan(st.grids, tuple(units), tuple(choice), record.get("budget_bytes", st.budget),
                record.get("fixed_bytes", st.fixed), st.min_bits)

"""Routed experts: each expert solved from its own Hessian, a bounded chunk of experts at a time,
same-shape experts as one batch; under torchrun every rank sees every batch's routing."""

from __future__ import annotations

import torch
from torch import nn

from gptq.core.config import QuantConfig
from gptq.core.hessian import HessianAccumulator
from gptq.io.modules import get_module, in_features, move
from gptq.models.moe import expert_rows, routed_counts
from gptq.pipeline.activations import Activations
from gptq.pipeline.distributed import World, all_gather
from gptq.pipeline.solve import Grids, solve_group, solve_groups, sort_channels


def expert_chunk(n_in: int, n_mid: int, budget: int = 512 << 20) -> int:
    """Experts taken at once: their Hessians and the solver's copies of their weights in ``budget``."""
    per_expert = 4 * (max(n_in, n_mid) ** 2 + 4 * 3 * n_in * n_mid)
    return max(1, budget // per_expert)


def solve_experts(block: nn.Module, arch, routing, config: QuantConfig, prefix: str, results_i: dict,
                   grids: Grids):
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
    in ``results_i`` before the generator goes on (sort_channels moves the producers' result rows)."""
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
    step = expert_chunk(n_in, n_mid)
    for c0 in range(0, n_exp, step):
        chunk = list(range(c0, min(c0 + step, n_exp)))
        h_down = None if config.true_sequential else hessians_of(chunk, n_mid, lambda e, rows: experts[e].hidden(rows))
        pairs = [{f"{base}.{e}.gate_proj": experts[e].gate_proj, f"{base}.{e}.up_proj": experts[e].up_proj}
                 for e in chunk]
        if shared is not None:  # one H for every expert: their rows stack into one matrix
            yield from results(solve_group({k: m for p in pairs for k, m in p.items()}, shared, config, prefix,
                                           grids=grids))
        else:
            h_up = hessians_of(chunk, n_in, lambda e, rows: rows)
            yield from results(solve_groups(pairs, [h_up.pop(e) for e in chunk], config, prefix, grids))
        if h_down is None:  # from the quantized gate/up
            h_down = hessians_of(chunk, n_mid, lambda e, rows: experts[e].hidden(rows))
        downs, hs = [], []
        for e in chunk:
            name, H = f"{base}.{e}.down_proj", h_down.pop(e)
            perm = sort_channels(block, arch, name, H, results_i, prefix, config)
            downs.append({name: experts[e].down_proj})
            hs.append(H if perm is None else H[perm[:, None], perm[None, :]])
        yield from results(solve_groups(downs, hs, config, prefix, grids))
        del downs, hs, h_down


def gather_batches(items, n_rounds: int, world: World, store: Activations):
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

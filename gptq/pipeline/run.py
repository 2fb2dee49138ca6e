"""Quantize a model held in memory: the loop, with the output format's grids, each block's
results packed by the format as it finishes (``quantize_model``); the streaming path for models
larger than memory is ``streaming.quantize_streaming``."""

from __future__ import annotations

import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from gptq.core.config import QuantConfig
from gptq.core.solver import round_to_nearest
from gptq.formats.base import Format, Stored
from gptq.formats.registry import get
from gptq.io.modules import get_module, resolve_device, set_weight_matrix, weight_matrix
from gptq.models.architectures import for_config
from gptq.models.rotation import rotator
from gptq.pipeline import mix
from gptq.pipeline.activations import Activations, activation_bytes, should_spill
from gptq.pipeline.learned import learn_residual, left_for_terms
from gptq.pipeline.loop import LayerReport, capture_block_inputs, quantize_blocks


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    windows: torch.Tensor,  # [nsamples, seqlen] token ids
    config: QuantConfig,
    device: str = "auto",
    batch_size: int = 8,
    progress: bool = True,
    max_memory: int | None = None,
    fmt: Format | None = None,
    source_dir: str | None = None,
) -> tuple[dict[str, Stored], list[LayerReport]]:
    """GPTQ every linear of every decoder block in place; return what the format (``config.format``)
    stores for each ({linear name: stored}) and a report.

    ``model``'s quantized linears hold the dequantized Ŵ afterwards, so it can be evaluated as is.
    With ``config.rotate`` the model is rotated first, in place (``gptq.models.rotation``).
    Calibration activations above ``max_memory`` bytes (default: half the available memory) are
    spilled to a temporary folder (``TMPDIR``), batch by batch; the result is the same.
    ``fmt``: the output format already bound to this model (default: ``config.format``'s).
    With a size budget (``config.mixed``) a first pass chooses each linear's grid (``pipeline.mix``;
    ``--max-size`` needs ``source_dir``, the model directory); the plan's record is ``fmt.mix``.
    """
    dev = resolve_device(device)
    model.eval()
    rot = rotator(model.config, config)
    dtype = next(model.parameters()).dtype
    act_bytes = activation_bytes(model.config, windows.shape[0], windows.shape[1], dtype, bool(config.fp_target))
    spill = should_spill(act_bytes, max_memory, dev)
    packed: dict[str, Stored] = {}
    report: list[LayerReport] = []
    blocks = for_config(model.config).blocks

    def keep(i, block, results_i, report_i, next_inputs, next_reference):
        packed.update(fmt.pack_block(block, f"{blocks}.{i}", results_i))
        report.extend(report_i)

    with tempfile.TemporaryDirectory(prefix="gptq-activations-") if spill else nullcontext() as tmp:
        store = Activations(tmp, dev)
        if rot is not None and rot.pending:  # --rotate learned: from the unrotated model's statistics
            rot.check_model(model)
            with tempfile.TemporaryDirectory(prefix="gptq-rotation-") as rtmp:  # used above max_memory
                learn_residual(rot, model, capture_block_inputs(model, windows, batch_size, dev, store), config,
                               dev, store, progress=progress, spill_dir=Path(rtmp) / "terms",
                               max_memory=left_for_terms(max_memory, act_bytes, spill),
                               grid=(fmt or get(config).bind(model)).grid)
        if rot is not None:
            rot.rotate_model(model)
        fmt = fmt or get(config).bind(model)
        inputs = capture_block_inputs(model, windows, batch_size, dev, store)
        if config.mixed:
            st = mix.setup(model, fmt, config, source_dir, None if rot is None else rot.record)
            chosen = mix.plan(st, model, inputs, config, dev, store, progress=progress)
            fmt.set_plan(chosen.by_linear())
            fmt.mix = chosen.record()
            if progress:
                print(chosen.table(limit=12), file=sys.stderr)
        quantize_blocks(model, inputs, config, dev, progress=progress, after_block=keep, store=store, grids=fmt.grid)
        del inputs
    return packed, report


@torch.no_grad()
def round_to_nearest_model(model: nn.Module, config: QuantConfig) -> nn.Module:
    """The baseline: every linear GPTQ would quantize, rounded in place to the grid its format
    gives it, no calibration."""
    arch = for_config(model.config)
    grids = get(config).bind(model).grid
    for i, block in enumerate(get_module(model, arch.blocks)):
        for name in arch.block_linears(block):
            lin = get_module(block, name)
            grid = grids(f"{arch.blocks}.{i}.{name}")
            set_weight_matrix(lin, round_to_nearest(weight_matrix(lin).float(), config, grid).weight)
    return model

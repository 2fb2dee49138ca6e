"""The one generic block-by-block loop.

    windows ─► embeddings ─► block 0 inputs ─┐
                                             ▼
          for each block:  move to device ─► for each sequential group:
                                               capture inputs → H per linear → solve → write Ŵ back
                           run the quantized block → next block's inputs ─► move back

Only the block being solved sits on the compute device. Per-architecture knowledge comes from
``architectures.py``; the maths from ``solver.solve``; packing from ``pack.py``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .architectures import for_config, get_module
from .capture import BlockInputs, StopForward, first_block_inputs, hessians, move, run_block, set_weight_matrix, weight_matrix
from .config import QuantConfig
from .pack import pack_qweight, pack_qzeros
from .solver import SolveResult, solve


@dataclass(frozen=True)
class PackedLinear:
    """The tensors a checkpoint stores for one quantized linear (all on CPU)."""

    qweight: torch.Tensor  # [in·bits/32, out] int32
    qzeros: torch.Tensor  # [groups, out·bits/32] int32
    scales: torch.Tensor  # [groups, out] float16
    g_idx: torch.Tensor  # [in] int32
    bias: torch.Tensor | None  # [out] float16

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


def pack_result(r: SolveResult, module: nn.Module, config: QuantConfig) -> PackedLinear:
    bias = getattr(module, "bias", None)
    return PackedLinear(
        qweight=pack_qweight(r.codes.cpu(), config.bits),
        qzeros=pack_qzeros(r.zeros.cpu(), config.bits, config.checkpoint_format),
        scales=r.scales.cpu().contiguous(),
        g_idx=r.g_idx.cpu().contiguous(),
        bias=None if bias is None else bias.detach().to("cpu", torch.float16).contiguous(),
    )


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"--device {device} was asked for, but torch sees no CUDA device; use --device cpu")
    return torch.device(device)


@torch.no_grad()
def capture_block_inputs(model: nn.Module, windows: torch.Tensor, batch_size: int) -> list[BlockInputs]:
    """Run the embeddings on CPU-resident weights and stop at the first block."""
    arch = for_config(model.config)
    blocks = get_module(model, arch.blocks)
    emb_device = model.get_input_embeddings().weight.device
    with first_block_inputs(blocks[0]) as seen:
        for batch in windows.split(batch_size):
            try:
                model(input_ids=batch.to(emb_device), use_cache=False)
            except StopForward:
                pass
    if len(seen) != len(windows.split(batch_size)):
        raise RuntimeError("the model did not reach its first decoder block for every calibration batch")
    return seen


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    windows: torch.Tensor,  # [nsamples, seqlen] token ids
    config: QuantConfig,
    device: str = "auto",
    batch_size: int = 8,
    progress: bool = True,
    on_block_done=None,
) -> tuple[dict[str, PackedLinear], list[LayerReport]]:
    """GPTQ every linear of every decoder block in place; return the packed tensors and a report.

    ``model``'s quantized linears hold the dequantized Ŵ afterwards, so it can be evaluated as is.
    """
    arch = for_config(model.config)
    dev = resolve_device(device)
    blocks = get_module(model, arch.blocks)
    model.eval()
    inputs = [move(x, dev) for x in capture_block_inputs(model, windows, batch_size)]

    packed: dict[str, PackedLinear] = {}
    report: list[LayerReport] = []
    # true-sequential: one capture pass per group, each after the groups before it are quantized;
    # otherwise one pass captures every group from the unquantized block
    passes = [[g] for g in arch.sequential] if config.true_sequential else [list(arch.sequential)]
    bar = tqdm(range(len(blocks)), desc="quantizing blocks", unit="block", disable=not progress)
    for i in bar:
        block = blocks[i]
        home = next(block.parameters()).device
        block.to(dev)
        for groups in passes:
            modules = [{name: get_module(block, name) for name in group} for group in groups]
            with hessians(modules) as accs:
                for inp in inputs:
                    run_block(block, inp)
            for name, module in ((n, m) for group in modules for n, m in group.items()):
                full = f"{arch.blocks}.{i}.{name}"
                t0 = time.perf_counter()
                W = weight_matrix(module).float()  # [out, in]
                r = solve(W, accs[name].hessian(), config, name=full)
                set_weight_matrix(module, r.weight)
                packed[full] = pack_result(r, module, config)
                report.append(LayerReport(full, r.loss, time.perf_counter() - t0, tuple(W.shape)))
                bar.set_postfix_str(f"{name} loss {r.loss:.3g}")
            del accs
        if i + 1 < len(blocks):
            inputs = [BlockInputs(run_block(block, inp), inp.args, inp.kwargs) for inp in inputs]
        block.to(home)
        if on_block_done is not None:
            on_block_done(i)
    return packed, report

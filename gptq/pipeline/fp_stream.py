"""The full-precision stream (full-precision targets, ``QuantConfig.fp_target``): the activations
the unquantized model computes, carried block by block beside the quantized model's own.

Each block is run once on the stream's inputs *before* anything in it is quantized, recording what
every group's first linear receives (``seen``), batch by batch in the quantized stream's batch
order; ``capture.hessians`` pairs them with the quantized model's inputs for the cross term. The
block's outputs become the next block's inputs (``advance``).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from gptq.io.modules import BlockInputs, record_inputs, run_block
from gptq.pipeline.activations import Activations, block_args


class FullPrecisionStream:
    def __init__(self, inputs: Sequence[BlockInputs], store: Activations):
        self.inputs = inputs  # the full-precision model's inputs of the current block, per batch
        self.store = store
        self.seen: dict[str, Sequence] = {}  # first linear → what it received, per batch
        self._outputs: Sequence | None = None

    def run(self, block: nn.Module, firsts: list[str]) -> None:
        """Run the still-unquantized ``block``, recording the inputs of the linears ``firsts``."""
        self.seen = {name: self.store.new() for name in firsts}
        self._outputs = self.store.new()
        with record_inputs(block, self.seen):
            for inp in self.inputs:
                self._outputs.append(run_block(block, inp))

    def advance(self) -> None:
        """The block's outputs become the next block's inputs."""
        self.inputs = self.store.inputs(self._outputs, block_args(self.inputs))
        self.seen, self._outputs = {}, None

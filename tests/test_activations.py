"""Calibration activations spilled to disk: the store itself, and bit-identical results."""

import gc

import pytest
import torch
from conftest import FAMILIES, tiny_model

from gptq import QuantConfig, quantize_model
from gptq.io.modules import BlockInputs
from gptq.pipeline.activations import Activations, SpilledInputs, SpillList, activation_bytes, block_args, should_spill


def test_spill_list_round_trips_each_kind(tmp_path):
    s = SpillList(tmp_path / "a")
    t = torch.randn(2, 3, 4)
    s.append(t)
    s.append((t[0], None, t[1].bfloat16()))  # a non-contiguous view is fine too
    s.append(None)
    s.append({"not": "a tensor"})  # no file form: kept in memory, still in order
    assert len(s) == 4
    assert torch.equal(s[0], t)
    a, none, b = s[1]
    assert torch.equal(a, t[0]) and none is None and b.dtype == torch.bfloat16 and torch.equal(b, t[1].bfloat16())
    assert s[2] is None and s[-1] == {"not": "a tensor"}
    assert [type(x) for x in s] == [torch.Tensor, tuple, type(None), dict]
    assert len(list((tmp_path / "a").glob("*.safetensors"))) == 3
    with pytest.raises(IndexError):
        s[4]
    del s, a, b
    gc.collect()
    assert not (tmp_path / "a").exists()  # the folder goes with the list


def test_spilled_inputs_keep_arguments_in_memory(tmp_path):
    store = Activations(tmp_path / "spill")
    hidden = store.new()
    for k in range(3):
        hidden.append(torch.full((1, 2, 4), float(k)))
    rest = [((f"arg{k}",), {"k": k}) for k in range(3)]
    inputs = store.inputs(hidden, rest)
    assert isinstance(inputs, SpilledInputs) and block_args(inputs) is rest
    x = inputs[2]
    assert isinstance(x, BlockInputs) and x.hidden[0, 0, 0] == 2 and x.args == ("arg2",) and x.kwargs == {"k": 2}
    mem = Activations(None).inputs([torch.zeros(1)] * 3, rest)
    assert isinstance(mem, list) and block_args(mem) == rest


def test_activation_estimate_and_decision(monkeypatch):
    cfg = tiny_model("llama").config  # hidden 64, intermediate 128
    assert activation_bytes(cfg, 8, 32, torch.bfloat16) == 8 * 32 * (4 * 64 + 128) * 2
    assert should_spill(1, 0) and not should_spill(100, 100) and should_spill(101, 100)
    assert not should_spill(1, None)  # auto: half the available memory
    # on a GPU the in-memory activations live in GPU memory: auto follows its free memory
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1000, 8000))
    assert not should_spill(500, None, "cuda") and should_spill(501, None, "cuda:0")


@pytest.mark.parametrize("family", FAMILIES)
def test_spilled_run_is_bit_identical(family, monkeypatch):
    """Every family's per-batch activations (attention tuples, recorded linear inputs...) go
    through the disk and come back exactly."""
    cfg = QuantConfig(bits=4, group_size=32)
    ids = torch.randint(0, 256, (6, 32), generator=torch.Generator().manual_seed(1))
    a = tiny_model(family)
    pa, _ = quantize_model(a, ids, cfg, device="cpu", batch_size=2, progress=False)
    written, kept = [], []
    append = SpillList.append

    def counting(self, item):
        append(self, item)
        (kept if len(self._kept) and self._n - 1 in self._kept else written).append(1)

    monkeypatch.setattr(SpillList, "append", counting)
    b = tiny_model(family)
    pb, _ = quantize_model(b, ids, cfg, device="cpu", batch_size=2, progress=False, max_memory=0)
    layers = b.config.num_hidden_layers
    assert len(written) >= 3 * 2 * layers and not kept  # inputs + outputs of every block at least, all on disk
    assert sorted(pa) == sorted(pb)
    for k in pa:
        assert torch.equal(pa[k].qweight, pb[k].qweight), k
        assert torch.equal(pa[k].scales, pb[k].scales), k
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n


def test_heap_returned_between_blocks_only_when_spilling(monkeypatch):
    import gptq.pipeline.loop as pl

    calls = []
    monkeypatch.setattr(pl, "return_free_memory", lambda: calls.append(1))
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(2))
    model = tiny_model("llama")
    quantize_model(model, ids, QuantConfig(), device="cpu", progress=False, max_memory=0)
    assert len(calls) == model.config.num_hidden_layers
    quantize_model(tiny_model("llama"), ids, QuantConfig(), device="cpu", progress=False)
    assert len(calls) == model.config.num_hidden_layers  # memory mode: left to the allocator

"""Quantize models larger than memory, block by block from the safetensors shards, resumably.

    skeleton (parameters on the meta device, buffers real)
      └─ embeddings loaded → block-0 inputs captured → embeddings released
      └─ for each block i:  load its tensors → solve → write shard i → save the next block's
                            inputs (activations-<i+1>/) + progress.json (atomically) → release
      └─ non-block tensors copied from the source into the last shard
      └─ all shards regrouped into shards of ≤ max_shard_bytes (as save_pretrained writes them),
         index, configs → OUT.partial/final → renamed to OUT

Everything is written into ``OUT.partial``; ``--resume`` continues from the last completed
block after a kill or Ctrl-C, and the final checkpoint is byte-identical to an uninterrupted
run. The state carries a fingerprint of the model, settings and calibration windows; a
mismatch is refused. Peak memory is one block + its Hessians + the calibration activations,
and the activations themselves go to ``OUT.partial/spill`` (one file per batch) when they would
exceed the ``max_memory`` budget (see ``activations.py``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from gptq.core.config import QuantConfig
from gptq.formats.base import Format
from gptq.formats.checkpoint import write_metadata
from gptq.formats.registry import get
from gptq.io.modules import get_module, parameters_on_meta, resolve_device
from gptq.io.safetensors_io import (
    DEFAULT_SHARD_BYTES,
    TensorSource,
    atomic_save,
    atomic_write_text,
    move_into_place,
    refuse_existing,
    regroup_shards,
)
from gptq.models.architectures import for_config
from gptq.models.moe import unfuse
from gptq.models.rotation import rotator
from gptq.pipeline import mix
from gptq.pipeline.activations import (
    Activations,
    SpilledInputs,
    activation_bytes,
    block_args,
    load_item,
    save_item,
    should_spill,
)
from gptq.pipeline.distributed import SINGLE, World, barrier, broadcast, check_batches, my_batches
from gptq.pipeline.learned import learn_residual, left_for_terms, terms_bytes
from gptq.pipeline.loop import capture_block_inputs, quantize_blocks

STATE = "progress.json"
SPILL = "spill"  # activations spilled during the run (not needed to resume)


class ResumeError(RuntimeError):
    pass


def skeleton(model_dir: str | os.PathLike, dtype: torch.dtype) -> nn.Module:
    config = AutoConfig.from_pretrained(model_dir)
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return unfuse(model, for_config(config)).eval()  # routed experts as per-expert linears, as stored


class Materializer:
    """Loads the parameters under a prefix from the source and releases them again."""

    def __init__(self, model: nn.Module, source: TensorSource, dtype: torch.dtype):
        self.model, self.source, self.dtype = model, source, dtype
        self.stored = for_config(model.config).checkpoint_name  # our parameter name → the source's
        self.resident: set[str] = set()  # prefixes currently loaded
        self.max_blocks_resident = 0

    def _params(self, prefix: str):
        for name, p in self.model.named_parameters(remove_duplicate=False):
            if prefix == "" or name.startswith(prefix + "."):
                yield name, p

    def load(self, prefix: str, exclude: str | None = None) -> None:
        for name, p in list(self._params(prefix)):
            if exclude and name.startswith(exclude + "."):
                continue
            if self.stored(name) not in self.source.file_of:
                continue  # e.g. a head tied to the embedding: not stored separately (stays meta)
            parent, _, attr = name.rpartition(".")
            t = self.source.get(self.stored(name))
            if t.shape != p.shape:
                raise ValueError(f"{name}: the model directory has shape {tuple(t.shape)}, the config implies "
                                 f"{tuple(p.shape)}")
            self.model.get_submodule(parent)._parameters[attr] = nn.Parameter(t.to(self.dtype), requires_grad=False)
        if prefix:
            missing = [n for n, p in self._params(prefix) if p.is_meta]
            if missing:
                raise ValueError(f"tensor(s) {', '.join(missing[:4])} missing from the model directory's safetensors")
        self.resident.add(prefix)
        blocks = sum(1 for r in self.resident if r.rsplit(".", 1)[-1].isdigit())
        self.max_blocks_resident = max(self.max_blocks_resident, blocks)

    def release(self, prefix: str, exclude: str | None = None) -> None:
        for name, p in list(self._params(prefix)):
            if exclude and name.startswith(exclude + "."):
                continue
            parent, _, attr = name.rpartition(".")
            self.model.get_submodule(parent)._parameters[attr] = nn.Parameter(
                torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=False)
        self.resident.discard(prefix)


def _size(n: int) -> str:
    for unit, f in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= f:
            return f"{n / f:.2f} {unit}"
    return f"{n} bytes"


def _save_inputs(inputs, partial: Path, block: int, mine: list[int], world: World = SINGLE, reference=None) -> str:
    """Block ``block``'s input hidden states, one file per batch named by its global index (so
    a run resumes with any number of ranks), as a folder that appears whole (renamed into place
    by rank 0 once every rank has written its batches); spilled batches are hard-linked. With
    full-precision targets that stream's inputs go beside them (``fp-`` files)."""
    name = f"activations-{block:05d}"
    tmp = partial / (name + ".tmp")
    if world.main:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(partial / name, ignore_errors=True)
        tmp.mkdir()
    barrier(world)
    for stream, tag in ((inputs, ""), (reference, "fp-")):
        if stream is None:
            continue
        if isinstance(stream, SpilledInputs):
            for k, f in zip(mine, stream.hidden.files(), strict=True):
                try:
                    os.link(f, tmp / f"{tag}{k:06d}.safetensors")
                except OSError:
                    shutil.copyfile(f, tmp / f"{tag}{k:06d}.safetensors")
        else:
            for k, x in zip(mine, stream, strict=True):
                save_item(x.hidden, tmp / f"{tag}{k:06d}.safetensors")
    barrier(world)
    if world.main:
        os.replace(tmp, partial / name)
    return name


def _restore_inputs(folder: Path, inputs, store: Activations, mine: list[int], n_batches: int, tag: str = ""):
    """The saved hidden states (this rank's batches) of the block to resume from, with the freshly
    captured other arguments; ``tag`` "fp-": the full-precision stream's."""
    files = sorted(folder.glob(f"{tag}[0-9]*.safetensors")) if folder.is_dir() else []
    if len(files) != n_batches:
        raise ResumeError(f"{folder}: the saved activations are missing or incomplete ({len(files)} of "
                          f"{n_batches} batches); pass --overwrite to start over")
    hidden = store.new()
    for k in mine:
        hidden.append(load_item(folder / f"{tag}{k:06d}.safetensors", store.device))
    return store.inputs(hidden, block_args(inputs))


def _fingerprint(model_dir, source: TensorSource, qcfg: QuantConfig, windows: torch.Tensor, dtype, batch_size) -> str:
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    h = hashlib.sha256()
    h.update(json.dumps({"config": cfg, "files": source.fingerprint(), "quant": qcfg.as_dict(),
                         "dtype": str(dtype), "batch_size": batch_size}, sort_keys=True).encode())
    h.update(windows.numpy().tobytes())
    return h.hexdigest()


def _estimate_output_bytes(source: TensorSource, arch, qcfg: QuantConfig) -> int:
    total = 0
    for name, f in source.file_of.items():
        with safe_open(f, "pt") as h:
            n = math.prod(h.get_slice(name).get_shape())
        ours = re.sub(r"\.experts\.\d+\.", ".experts.{e}.", arch.model_name(name))  # an expert as its template
        quantized = name.endswith(".weight") and any(ours.endswith(f".{lin}.weight") for lin in arch.linears)
        total += n * qcfg.bits // 8 + n // 16 if quantized else n * 2
    return total


def _saved_state(partial: Path, fp: str, resume: bool, overwrite: bool, world: World) -> dict | None:
    """The progress an interrupted run left in ``partial`` when resuming it (its fingerprint checked),
    else None; an interrupted run is never overwritten without --overwrite."""
    if resume and not (partial / STATE).exists():  # never started, or stopped before block 0 was saved
        if world.main:
            print(f"note: nothing to resume in {partial}" + (" (no block had been completed)" if partial.exists()
                                                              else "") + "; starting from the beginning", file=sys.stderr)
        return None
    if not partial.exists() or overwrite and not resume:
        return None  # (with --overwrite the old one is removed by rank 0, once every rank has looked)
    if not resume:
        raise ResumeError(f"an interrupted run left {partial}; rerun the same command with --resume to continue "
                          "it, or pass --overwrite to start over")
    try:
        state = json.loads((partial / STATE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ResumeError(f"{partial}: the saved progress is missing or corrupt ({e}); pass --overwrite "
                          "to start over") from e
    if state.get("fingerprint") != fp:
        raise ResumeError(f"{partial} was made from a different model, settings or calibration data; "
                          "rerun with exactly the same command, or pass --overwrite to start over")
    return state


def _new_partial(partial: Path, need: int) -> None:
    """An empty ``partial`` folder, refused (and removed) when its disk lacks ``need`` bytes."""
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    free = shutil.disk_usage(partial).free
    if free < need:
        shutil.rmtree(partial, ignore_errors=True)
        raise OSError(f"not enough disk space in {partial.parent}: about {_size(need)} needed, {_size(free)} free; "
                      "free some space or choose another --out")


def _block_tensors(block: nn.Module, prefix: str, packed: dict, arch, source: TensorSource) -> dict:
    """What block ``prefix``'s shard holds, sorted by name: its unquantized tensors in the source's
    dtype (whatever the calibration ran in), each quantized linear as its format stores it."""
    tensors = {}
    for name, t in block.state_dict().items():
        full = f"{prefix}.{name}"
        stored = arch.checkpoint_name(full)
        if full.rsplit(".", 1)[0] not in packed and stored in source.file_of:
            dtype = source.dtype(stored) if t.is_floating_point() else t.dtype
            tensors[stored] = t.detach().to("cpu", dtype).contiguous()
    for p_name, p in packed.items():
        tensors.update((arch.checkpoint_name(k), t) for k, t in p.tensors(p_name).items())
    return dict(sorted(tensors.items()))


def _assemble(partial: Path, final: Path, shards: list[Path], files: dict, max_shard_bytes: int,
              on_regroup: Callable[[], None] | None) -> None:
    """The finished checkpoint, assembled in partial/final.tmp: the block shards regrouped into shards
    of at most ``max_shard_bytes``, config.json (``files["config"]`` with its quantization_config),
    tokenizer, report. Renamed to partial/final when complete (a kill before that redoes it from the
    block shards, which stay until the end), then moved into place."""
    assembled = partial / "final"
    if not assembled.is_dir():
        tmp = partial / "final.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        regroup_shards(shards, tmp, max_shard_bytes)
        if on_regroup is not None:
            on_regroup()
        write_metadata(tmp, files["config"], files["quantization_config"], files["source"],
                       {"quantize_report.json": files["quantize_report.json"]})
        os.replace(tmp, assembled)
    move_into_place(assembled, final)
    shutil.rmtree(partial, ignore_errors=True)


MIX = "mix.json"  # the budget's plan, kept for --resume


def _mix_plan(model, fmt: Format, qcfg: QuantConfig, model_dir, rot, partial: Path, resuming: bool, inputs, dev,
              store, mat: Materializer, progress: bool, world: World) -> None:
    """A size budget's plan (``pipeline.mix``) into ``fmt``: measured in a first pass that loads each block
    as the main pass does, or read back from an interrupted run (the same choices). With several ranks
    the pass is shared out like the main one (each rank its own batches, the Hessians exchanged), the
    plan is one process's on every rank, rank 0 keeps it, and on --resume rank 0 reads it back and
    hands it to the others."""
    st = mix.setup(model, fmt, qcfg, model_dir, None if rot is None else rot.record)
    saved = None
    if resuming:
        saved = broadcast(json.loads((partial / MIX).read_text()) if world.main and (partial / MIX).is_file()
                          else None, 0, world)
    if saved is not None:
        chosen = mix.plan_from_record(st, saved)
    else:
        def before(i, block):
            mat.load(f"{arch.blocks}.{i}")
            if rot is not None:
                rot.rotate_block(block)

        arch = for_config(model.config)
        chosen = mix.plan(st, model, inputs, qcfg, dev, store, before, lambda i, _b: mat.release(f"{arch.blocks}.{i}"),
                          progress and world.main, world)
        if world.main:
            atomic_write_text(partial / MIX, json.dumps(chosen.record()))
    fmt.set_plan(chosen.by_linear())
    fmt.mix = chosen.record()
    if progress and world.main:
        print(chosen.table(limit=12), file=sys.stderr)


def _resume_point(state: dict, partial: Path, block_shards: list[str], fp_target: bool, inputs, store, mine,
                  n_batches: int):
    """Where an interrupted run stops: (the first block to solve, the report so far, that block's inputs,
    its full-precision inputs with --fp-target or None), checking that every completed block's shard
    is there."""
    first = state["completed"] + 1
    missing = [name for name in block_shards[:first] if not (partial / name).is_file()]
    if missing:
        raise ResumeError(f"{partial}: shard(s) {missing} of completed blocks are missing; pass --overwrite")
    reference = None
    if first < len(block_shards):
        folder = partial / state.get("activations", "?")
        if fp_target:
            reference = _restore_inputs(folder, inputs, store, mine, n_batches, "fp-")
        inputs = _restore_inputs(folder, inputs, store, mine, n_batches)
    return first, state["report"], inputs, reference


def _save_edges(source: TensorSource, blocks_prefix: str, rot, path: Path) -> None:
    """The last shard: every tensor outside the blocks, from the source (the edges rotated); kept if an
    interrupted run had written it."""
    if path.is_file():
        return
    rest = {n: source.get(n).contiguous() for n in source.names() if not n.startswith(blocks_prefix + ".")}
    if rot is not None:
        rest.update(rot.edges(rest, inplace=True))  # read from disk: ours to overwrite
    atomic_save(rest, path)


ROTATION = "rotation.safetensors"  # --rotate learned: the learned Q, kept for --resume


def _learned_rotation(model, rot, qcfg: QuantConfig, partial: Path, resuming: bool, windows: torch.Tensor,
                      batch_size: int, dev, store, mat: Materializer, progress: bool, world: World,
                      extra_report: dict | None, max_memory: int | None, fmt: Format) -> None:
    """``--rotate learned``: Q learned from a first pass over the unrotated blocks (``pipeline.learned``),
    loaded and released one at a time, and kept in ``partial``; or, on --resume, read back by rank 0 and
    handed to the others (the same Q). Inverse Hessians over ``max_memory`` go to this rank's spill folder;
    the objective rounds onto ``fmt``'s grids."""
    saved = None
    if resuming:
        if world.main:
            if not (partial / ROTATION).is_file():
                raise ResumeError(f"{partial}: the learned rotation ({ROTATION}) is missing; pass --overwrite")
            with safe_open(partial / ROTATION, "pt") as f:
                saved = (f.get_tensor("Q"), f.get_tensor("objective").item())
        saved = broadcast(saved, 0, world)
    if saved is not None:
        rot.set_learned(*saved)
    else:
        prefix = for_config(model.config).blocks
        inputs = capture_block_inputs(model, windows, batch_size, dev, store)
        spill_dir = partial / SPILL / ("rotation" if world.single else f"rotation-{world.rank}")
        info = learn_residual(rot, model, inputs, qcfg, dev, store, lambda i, _b: mat.load(f"{prefix}.{i}"),
                              lambda i, _b: mat.release(f"{prefix}.{i}"), world, progress and world.main,
                              spill_dir, max_memory, fmt.grid)
        del inputs
        if world.main:
            atomic_save({"Q": rot.Q, "objective": torch.tensor(rot.record.objective, dtype=torch.float64)},
                        partial / ROTATION)
        if extra_report is not None:
            extra_report["rotation_learning"] = info
    if extra_report is not None:
        extra_report["rotation"] = rot.record.as_dict()


def quantize_streaming(model_dir, out, qcfg: QuantConfig, windows: torch.Tensor, dtype: torch.dtype,
                       device: str = "auto", batch_size: int = 8, resume: bool = False, overwrite: bool = False,
                       progress: bool = True, extra_report: dict | None = None,
                       max_memory: int | None = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                       world: World = SINGLE, fmt: Format | None = None,
                       on_event: Callable[[str, int], None] | None = None) -> tuple[Path, list, Materializer]:
    """Quantize ``model_dir`` into ``out`` without ever holding more than one block's weights.
    Calibration activations above ``max_memory`` bytes (default: half the available memory)
    are spilled to ``OUT.partial/spill`` batch by batch; the result is the same. With several
    ranks (``world``, see distributed.py) each runs its share of the batches and rank 0 writes.
    ``fmt``: the output format bound to this model (default: ``qcfg.format``'s, bound here).
    ``on_event(event, rank)``: called with "saved:<i>" once block i is on disk and "regroup" while
    the final shards are written (tests inject kills and interrupts there)."""
    t_start = time.perf_counter()
    dev = resolve_device(device)
    check_batches(-(-windows.shape[0] // batch_size), world)  # before anything is written
    final = Path(out).resolve()
    partial = final.with_name(final.name + ".partial")
    refuse_existing(final, overwrite)
    source = TensorSource(model_dir)
    model = skeleton(model_dir, dtype)
    arch = for_config(model.config)
    fmt = fmt or get(qcfg).bind(model, model_dir)
    rot = rotator(model.config, qcfg)  # each block rotated as it is loaded, the edges at the end
    if rot is not None:
        rot.check_model(model)
    fp = _fingerprint(model_dir, source, qcfg, windows, dtype, batch_size)
    state = _saved_state(partial, fp, resume, overwrite, world)
    act_bytes = activation_bytes(model.config, windows.shape[0], windows.shape[1], dtype,
                                 bool(qcfg.fp_target)) // world.size
    spill = should_spill(act_bytes, max_memory, dev)
    terms_budget = left_for_terms(max_memory, act_bytes, spill)
    terms = terms_bytes(model, world) if rot is not None and rot.pending else []  # by rank
    barrier(world)
    if state is None and world.main:
        # the block shards plus their regrouped copy at the end, the saved block inputs (one or two
        # streams), the spilled activations, --rotate learned's spilled terms
        streams = 2 if qcfg.fp_target else 1
        _new_partial(partial, 2 * _estimate_output_bytes(source, arch, qcfg)
                     + streams * windows.numel() * model.config.hidden_size * 2 + (act_bytes if spill else 0)
                     + sum(b for b in terms if should_spill(b, terms_budget, dev)))

    mat = Materializer(model, source, dtype)
    blocks_prefix = arch.blocks
    nblocks = len(get_module(model, arch.blocks))
    nshards = nblocks + 1
    shard_name = lambda k: f"model-{k:05d}-of-{nshards:05d}.safetensors"

    barrier(world)  # the partial folder is ready
    spill_dir = partial / SPILL if world.single else partial / SPILL / f"rank-{world.rank}"
    shutil.rmtree(spill_dir, ignore_errors=True)  # what a killed run had spilled
    store = Activations(spill_dir if spill else None, dev)
    batches = windows.split(batch_size)
    mine = my_batches(len(batches), world)  # this rank's batches, by global index
    my_windows = torch.cat([batches[k] for k in mine])
    mat.load("", exclude=blocks_prefix)  # embeddings (and whatever else precedes block 0)
    if rot is not None and rot.pending:
        _learned_rotation(model, rot, qcfg, partial, state is not None, my_windows, batch_size, dev, store, mat,
                          progress, world, extra_report, terms_budget, fmt)
    if rot is not None:
        rot.rotate_embedding(model)
    inputs = capture_block_inputs(model, my_windows, batch_size, dev, store)
    mat.release("", exclude=blocks_prefix)
    if qcfg.mixed:
        _mix_plan(model, fmt, qcfg, model_dir, rot, partial, state is not None, inputs, dev, store, mat, progress,
                  world)
        if extra_report is not None:
            extra_report["mix"] = fmt.mix
    first, report, reference = 0, [], None
    if state is not None:
        first, report, inputs, reference = _resume_point(state, partial, [shard_name(k + 1) for k in range(nblocks)],
                                                         bool(qcfg.fp_target), inputs, store, mine, len(batches))

    def before(i, block):
        mat.load(f"{blocks_prefix}.{i}")
        if rot is not None:
            rot.rotate_block(block)

    def after(i, block, results_i, report_i, next_inputs, next_reference):
        prefix = f"{blocks_prefix}.{i}"
        if world.main:
            tensors = _block_tensors(block, prefix, fmt.pack_block(block, prefix, results_i), arch, source)
            atomic_save(tensors, partial / shard_name(i + 1))
        saved = (_save_inputs(next_inputs, partial, i + 1, mine, world, next_reference)
                 if next_inputs is not None else None)
        report.extend(asdict(r) for r in report_i)
        if world.main:
            atomic_write_text(partial / STATE, json.dumps({"fingerprint": fp, "completed": i, "report": report,
                                                            "activations": saved}))
            for old in partial.glob("activations-*"):  # the state now points at the new ones
                if old.name != saved:
                    shutil.rmtree(old)
        barrier(world)  # block i is on disk for every rank
        mat.release(prefix)
        if on_event is not None:
            on_event(f"saved:{i}", world.rank)

    quantize_blocks(model, inputs, qcfg, dev, first=first, progress=progress and world.main, before_block=before,
                    after_block=after, store=store, world=world, reference=reference, grids=fmt.grid)
    del inputs
    if not world.main:  # rank 0 assembles the checkpoint
        return final, report, mat

    _save_edges(source, blocks_prefix, rot, partial / shard_name(nshards))
    if rot is not None:
        rot.mark(model.config)
    summary = (extra_report or {}) | {"seconds": round(time.perf_counter() - t_start, 2), "layers": report}
    files = {"config": model.config, "quantization_config": fmt.quantization_config(), "source": model_dir,
             "quantize_report.json": json.dumps(summary, indent=2) + "\n"}
    _assemble(partial, final, [partial / shard_name(k) for k in range(1, nshards + 1)], files, max_shard_bytes,
              (lambda: on_event("regroup", world.rank)) if on_event is not None else None)
    return final, report, mat

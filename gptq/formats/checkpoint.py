"""A quantized checkpoint directory as transformers lays it out, for every safetensors format:
the model's state dict with each quantized linear replaced by what its format stores, config.json
with the format's ``quantization_config``, the source's tokenizer files.

Everything goes into ``<out>.partial-<pid>`` first and is renamed to ``<out>`` only when
complete, so an interrupted run never leaves a directory that looks finished.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from gptq.core.config import QuantConfig
from gptq.formats.base import Stored
from gptq.formats.registry import get
from gptq.io.safetensors_io import (
    DEFAULT_SHARD_BYTES,
    move_into_place,
    prepare_output,
    source_dtype_name,
    write_tensors,
)
from gptq.models.architectures import for_config

COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                "generation_config.json")


def checkpoint_tensors(model: torch.nn.Module, packed: dict[str, Stored],
                       float_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model's state dict with each quantized linear replaced by its packed tensors.
    Tied weights (e.g. lm_head sharing the embedding) are stored once, as save_pretrained does.
    ``float_dtype``: the dtype for the unquantized floating tensors (the source model's own, when
    the calibration ran in another one)."""
    out: dict[str, torch.Tensor] = {}
    seen_storage: set[int] = set()
    for name, t in model.state_dict().items():
        module = name.rsplit(".", 1)[0]
        if module in packed:
            continue
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen_storage and t.numel() > 0:
            continue
        seen_storage.add(ptr)
        t = t.detach().to("cpu")
        out[name] = (t.to(float_dtype) if float_dtype is not None and t.is_floating_point() else t).contiguous()
    for prefix, p in packed.items():
        out.update(p.tensors(prefix))
    arch = for_config(model.config)  # per-expert names as the family's checkpoints spell them
    return dict(sorted((arch.checkpoint_name(k), t) for k, t in out.items()))


def write_metadata(directory: Path, model_config, qcfg: dict, source_dir=None,
                   extra_files: dict[str, str] | None = None) -> None:
    """config.json with quantization_config, quantize_config.json, the source's tokenizer and
    generation config, and any extra text files. The dtype stays the source's (the calibration
    may have run in another one)."""
    cfg = model_config.to_dict()
    own = source_dtype_name(source_dir)
    if own is not None:
        for key in ("dtype", "torch_dtype"):
            if key in cfg or key == "dtype":
                cfg[key] = own
    cfg["quantization_config"] = qcfg
    cfg.pop("_name_or_path", None)
    (directory / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str) + "\n")
    if qcfg["quant_method"] == "gptq":  # GPTQ loaders also read it beside config.json
        (directory / "quantize_config.json").write_text(json.dumps(qcfg, indent=2) + "\n")
    if source_dir is not None:
        for f in COPIED_FILES:
            src = Path(source_dir) / f
            if src.is_file():
                shutil.copy2(src, directory / f)
    for fname, text in (extra_files or {}).items():
        (directory / fname).write_text(text)


def save_checkpoint(
    out: str | os.PathLike,
    model: torch.nn.Module,
    packed: dict[str, Stored],
    config: QuantConfig,
    source_dir: str | os.PathLike | None = None,
    extra_files: dict[str, str] | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    float_dtype: torch.dtype | None = None,
) -> Path:
    """Write the checkpoint under a temporary name, then rename it into place. ``float_dtype``:
    store the unquantized floating tensors in this dtype (default: as they are in ``model``)."""
    final, tmp = prepare_output(out, overwrite)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write_tensors(tmp, checkpoint_tensors(model, packed, float_dtype), max_shard_bytes)
        fmt = get(config)
        if config.mixed:  # each linear's grid, as the budget chose it, from what was packed
            fmt.arch = for_config(model.config)  # the checkpoint's names for them
            fmt.set_plan({name: p.grid for name, p in packed.items()})
        write_metadata(tmp, model.config, fmt.quantization_config(), source_dir, extra_files)
        move_into_place(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final

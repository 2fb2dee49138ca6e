"""Write a GPTQ checkpoint directory, atomically.

Everything goes into ``<out>.partial-<pid>`` first and is renamed to ``<out>`` only when
complete, so an interrupted run never leaves a directory that looks finished.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from .config import QuantConfig
from .pipeline import PackedLinear

COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                "generation_config.json")
DEFAULT_SHARD_BYTES = 5 * 1024**3


class OutputExistsError(FileExistsError):
    pass


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a byte count → bytes."""
    t = text.strip().upper().replace("IB", "B")
    for unit, mult in (("GB", 1024**3), ("MB", 1024**2), ("KB", 1024), ("B", 1)):
        if t.endswith(unit):
            try:
                return int(float(t[: -len(unit)]) * mult)
            except ValueError:
                break
    try:
        return int(t)
    except ValueError:
        raise ValueError(f"size {text!r} not understood; write e.g. 5GB, 500MB or a number of bytes") from None


def checkpoint_tensors(model: torch.nn.Module, packed: dict[str, PackedLinear]) -> dict[str, torch.Tensor]:
    """The model's state dict with each quantized linear replaced by its packed tensors.
    Tied weights (e.g. lm_head sharing the embedding) are stored once, as save_pretrained does."""
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
        out[name] = t.detach().to("cpu").contiguous()
    for prefix, p in packed.items():
        out.update(p.tensors(prefix))
    return dict(sorted(out.items()))


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def write_tensors(directory: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[str]:
    shards = _shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], directory / "model.safetensors", metadata={"format": "pt"})
        return ["model.safetensors"]
    names, weight_map = [], {}
    for k, shard in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, directory / fname, metadata={"format": "pt"})
        names.append(fname)
        weight_map.update({t: fname for t in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return names


def prepare_output(out: str | os.PathLike, overwrite: bool) -> tuple[Path, Path]:
    """Check the destination before any long work; return (final path, temporary path)."""
    final = Path(out).resolve()
    if final.exists() and (not final.is_dir() or any(final.iterdir())) and not overwrite:
        raise OutputExistsError(f"{final} already exists and is not empty; pass --overwrite to replace it "
                                "or choose another --out")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{final.name}.partial-{os.getpid()}")
    return final, tmp


def write_metadata(directory: Path, model_config, config: QuantConfig, source_dir=None,
                   extra_files: dict[str, str] | None = None) -> None:
    """config.json with quantization_config, quantize_config.json, the source's tokenizer and
    generation config, and any extra text files."""
    qcfg = config.to_quantization_config()
    cfg = model_config.to_dict()
    cfg["quantization_config"] = qcfg
    cfg.pop("_name_or_path", None)
    (directory / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str) + "\n")
    (directory / "quantize_config.json").write_text(json.dumps(qcfg, indent=2) + "\n")
    if source_dir is not None:
        for f in COPIED_FILES:
            src = Path(source_dir) / f
            if src.is_file():
                shutil.copy2(src, directory / f)
    for fname, text in (extra_files or {}).items():
        (directory / fname).write_text(text)


def move_into_place(tmp: Path, final: Path) -> None:
    """Rename the finished temporary directory to its final name (replacing an old one)."""
    if final.exists():
        old = final.with_name(f"{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def save_checkpoint(
    out: str | os.PathLike,
    model: torch.nn.Module,
    packed: dict[str, PackedLinear],
    config: QuantConfig,
    source_dir: str | os.PathLike | None = None,
    extra_files: dict[str, str] | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Write the checkpoint under a temporary name, then rename it into place."""
    final, tmp = prepare_output(out, overwrite)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write_tensors(tmp, checkpoint_tensors(model, packed), max_shard_bytes)
        write_metadata(tmp, model.config, config, source_dir, extra_files)
        move_into_place(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final

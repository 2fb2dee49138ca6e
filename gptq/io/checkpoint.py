"""Write a GPTQ checkpoint directory, atomically.

Everything goes into ``<out>.partial-<pid>`` first and is renamed to ``<out>`` only when
complete, so an interrupted run never leaves a directory that looks finished.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from gptq.core.config import QuantConfig
from gptq.models.architectures import for_config
from gptq.pipeline.loop import PackedLinear

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


def checkpoint_tensors(model: torch.nn.Module, packed: dict[str, PackedLinear],
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


SAFETENSORS_DTYPES = {torch.int32: "I32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32",
                      torch.int64: "I64", torch.uint8: "U8", torch.int8: "I8", torch.float64: "F64",
                      torch.int16: "I16", torch.bool: "BOOL"}
TORCH_DTYPES = {code: dtype for dtype, code in SAFETENSORS_DTYPES.items()}  # header code → torch dtype


def write_safetensors_streaming(path: Path, names: list[str], shapes: dict, dtypes: dict, get) -> None:
    """Write a safetensors file one tensor at a time (``get(name)`` → tensor), so a shard of many
    GB never sits in memory whole. Layout as the format defines it: an 8-byte little-endian header
    length, the JSON header (dtype, shape, data_offsets; metadata format pt), padded with spaces to
    a multiple of 8, then the tensors' bytes in header order."""
    import struct

    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for n in names:
        nbytes = math.prod(shapes[n]) * torch.tensor([], dtype=dtypes[n]).element_size()
        header[n] = {"dtype": SAFETENSORS_DTYPES[dtypes[n]], "shape": list(shapes[n]),
                     "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for n in names:
            t = get(n).contiguous()
            if tuple(t.shape) != tuple(shapes[n]) or t.dtype != dtypes[n]:
                raise ValueError(f"{n}: expected {dtypes[n]} {tuple(shapes[n])}, got {t.dtype} {tuple(t.shape)}")
            f.write(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def regroup_shards(sources: list[Path], directory: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[str]:
    """Copy the tensors of ``sources`` (safetensors files, in order) into shards of at most
    ``max_shard_bytes`` in ``directory``, named as save_pretrained names them (one
    ``model.safetensors``, or ``model-0000k-of-0000N`` plus an index). One tensor in memory at a time."""
    from safetensors import safe_open

    where, shapes, dtypes = {}, {}, {}
    for f in sources:
        with safe_open(f, "pt") as h:
            for name in h.keys():
                sl = h.get_slice(name)
                where[name] = f
                shapes[name] = tuple(sl.get_shape())
                dtypes[name] = TORCH_DTYPES[sl.get_dtype()]
    size = {n: math.prod(shapes[n]) * torch.tensor([], dtype=dtypes[n]).element_size() for n in where}
    groups: list[list[str]] = [[]]
    used = 0
    for name in sorted(where):
        if groups[-1] and used + size[name] > max_shard_bytes:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += size[name]

    def get(name):
        with safe_open(where[name], "pt") as h:
            return h.get_tensor(name)

    names = (["model.safetensors"] if len(groups) == 1 else
             [f"model-{k:05d}-of-{len(groups):05d}.safetensors" for k in range(1, len(groups) + 1)])
    for fname, group in zip(names, groups):
        write_safetensors_streaming(directory / fname, group, shapes, dtypes, get)
    if len(groups) > 1:
        weight_map = {n: fname for fname, group in zip(names, groups) for n in group}
        index = {"metadata": {"total_size": sum(size.values())}, "weight_map": dict(sorted(weight_map.items()))}
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


def source_dtype_name(source_dir) -> str | None:
    """The dtype the source model's config.json declares ("bfloat16", ...), if any."""
    if source_dir is None or not (Path(source_dir) / "config.json").is_file():
        return None
    cfg = json.loads((Path(source_dir) / "config.json").read_text())
    return cfg.get("dtype") or cfg.get("torch_dtype")


def write_metadata(directory: Path, model_config, config: QuantConfig, source_dir=None,
                   extra_files: dict[str, str] | None = None) -> None:
    """config.json with quantization_config, quantize_config.json, the source's tokenizer and
    generation config, and any extra text files. The dtype stays the source's (the calibration
    may have run in another one)."""
    qcfg = config.to_quantization_config()
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
    float_dtype: torch.dtype | None = None,
) -> Path:
    """Write the checkpoint under a temporary name, then rename it into place. ``float_dtype``:
    store the unquantized floating tensors in this dtype (default: as they are in ``model``)."""
    final, tmp = prepare_output(out, overwrite)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write_tensors(tmp, checkpoint_tensors(model, packed, float_dtype), max_shard_bytes)
        write_metadata(tmp, model.config, config, source_dir, extra_files)
        move_into_place(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final

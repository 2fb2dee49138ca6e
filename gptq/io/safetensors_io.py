"""Bytes on disk: safetensors files listed, read lazily or whole, written in shards (as
save_pretrained names them) or one tensor at a time, and outputs that appear only when complete
(written under a temporary name, renamed into place). Nothing about quantization."""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

DEFAULT_SHARD_BYTES = 5 * 1024**3


class CheckpointError(ValueError):
    """The checkpoint is corrupt, truncated or disagrees with its config; names the tensor."""


class OutputExistsError(FileExistsError):
    pass


class OutputNotWritableError(PermissionError):
    """The output's directory cannot be written (read-only file system, no permission, ...)."""


AGAIN = "download or copy it again"


def unreadable(f: Path, e: BaseException) -> CheckpointError:
    """The error for a safetensors file that cannot be opened or read, naming it and the fix."""
    if isinstance(e, FileNotFoundError):
        return CheckpointError(f"{f}: the file is missing; {AGAIN}")
    return CheckpointError(f"{f}: cannot be read, the file is truncated or corrupt ({e}); {AGAIN}")


@contextmanager
def open_safetensors(f: Path) -> Iterator:
    """``safe_open(f)`` whose failures (a truncated file, an invalid header, a missing file) are a
    ``CheckpointError`` naming the file (safetensors' own error is neither an OSError nor a ValueError)."""
    try:
        handle = safe_open(f, "pt")
    except (SafetensorError, OSError) as e:
        raise unreadable(f, e) from e
    with handle as h:
        yield h


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


SAFETENSORS_DTYPES = {torch.int32: "I32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32",
                      torch.int64: "I64", torch.uint8: "U8", torch.int8: "I8", torch.float64: "F64",
                      torch.int16: "I16", torch.bool: "BOOL"}
TORCH_DTYPES = {code: dtype for dtype, code in SAFETENSORS_DTYPES.items()}  # header code → torch dtype


def source_dtype_name(source_dir) -> str | None:
    """The dtype the source model's config.json declares ("bfloat16", ...), if any."""
    if source_dir is None or not (Path(source_dir) / "config.json").is_file():
        return None
    cfg = json.loads((Path(source_dir) / "config.json").read_text())
    return cfg.get("dtype") or cfg.get("torch_dtype")


def tensor_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory: its index's shards, or model.safetensors."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({path / f for f in _weight_map(index).values()})
        _refuse_missing(path, files)
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")


def _weight_map(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not a mapping")
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{index}: not a valid safetensors index ({e}); download or copy the model again") from e
    return weight_map


def _refuse_missing(directory: Path, files: list[Path]) -> None:
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        what = f"shard {missing[0]} named in model.safetensors.index.json is" if len(missing) == 1 else \
            f"shards {', '.join(missing)} named in model.safetensors.index.json are"
        raise CheckpointError(f"{directory}: {what} missing; download or copy the model again")


def checked_tensor_files(path: Path) -> list[Path]:
    """``tensor_files``, each file's header read: a missing, truncated or corrupt file is named
    (``CheckpointError``) before any work. Reads no tensor data."""
    files = tensor_files(Path(path))
    for f in files:
        with open_safetensors(f):
            pass
    return files


def check_safetensors(path: str | os.PathLike) -> None:
    """A model or checkpoint directory's safetensors files, when it has any, checked as
    ``checked_tensor_files`` does (the commands call it before loading)."""
    d = Path(path)
    if d.is_dir() and ((d / "model.safetensors.index.json").is_file() or any(d.glob("*.safetensors"))):
        checked_tensor_files(d)


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory, read whole (a clear error for an unreadable file)."""
    out: dict[str, torch.Tensor] = {}
    for f in tensor_files(path):
        try:
            out.update(load_file(f))
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise unreadable(f, e) from e
    return out


class TensorSource:
    """Lazy access to a model directory's safetensors tensors, one tensor at a time."""

    def __init__(self, model_dir: str | os.PathLike):
        """Every file's header is read here: a missing, truncated or corrupt file is named
        (``CheckpointError``) before any work."""
        d = Path(model_dir)
        index = d / "model.safetensors.index.json"
        if index.is_file():
            self.file_of = {name: d / f for name, f in _weight_map(index).items()}
            files = sorted(set(self.file_of.values()))
            _refuse_missing(d, files)
            for f in files:
                with open_safetensors(f):
                    pass
        else:
            files = sorted(d.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"{d}: no *.safetensors files to stream from")
            self.file_of = {}
            for f in files:
                with open_safetensors(f) as h:
                    self.file_of.update({k: f for k in h.keys()})
        self.loaded = 0

    def names(self) -> list[str]:
        return sorted(self.file_of)

    def get(self, name: str) -> torch.Tensor:
        f = self.file_of[name]
        with open_safetensors(f) as h:
            try:
                t = h.get_tensor(name)
            except SafetensorError as e:  # e.g. an index naming the wrong shard
                raise CheckpointError(f"{f}: cannot read tensor {name} ({e}); {AGAIN}") from e
        self.loaded += 1
        return t

    def dtype(self, name: str) -> torch.dtype:
        """The stored dtype of a tensor, from the file's header."""
        f = self.file_of[name]
        with open_safetensors(f) as h:
            try:
                code = h.get_slice(name).get_dtype()
            except SafetensorError as e:
                raise CheckpointError(f"{f}: cannot read tensor {name} ({e}); {AGAIN}") from e
        return TORCH_DTYPES.get(code, torch.float32)

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape, from the file's header."""
        with open_safetensors(self.file_of[name]) as h:
            return tuple(h.get_slice(name).get_shape())

    def fingerprint(self) -> dict:
        return {str(f.name): f.stat().st_size for f in sorted(set(self.file_of.values()))}


def group_shards(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Tensor names (in the given order) cut into consecutive shards of at most ``max_bytes``
    (a tensor larger than that gets a shard of its own), as save_pretrained cuts them."""
    groups: list[list[str]] = [[]]
    used = 0
    for name, nbytes in sizes.items():
        if groups[-1] and used + nbytes > max_bytes:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += nbytes
    return groups


def shard_names(n: int) -> list[str]:
    """File names of ``n`` shards as save_pretrained names them."""
    return ["model.safetensors"] if n == 1 else [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]


def write_index(directory: Path, names: list[str], groups: list[list[str]], total: int) -> None:
    weight_map = {t: fname for fname, group in zip(names, groups) for t in group}
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_tensors(directory: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[str]:
    """Write ``tensors`` into ``directory`` as one model.safetensors or shards plus an index."""
    sizes = {name: t.numel() * t.element_size() for name, t in tensors.items()}
    groups = group_shards(sizes, max_shard_bytes)
    names = shard_names(len(groups))
    for fname, group in zip(names, groups):
        save_file({t: tensors[t] for t in group}, directory / fname, metadata={"format": "pt"})
    if len(groups) > 1:
        write_index(directory, names, groups, sum(sizes.values()))
    return names


def _header(names: list[str], shapes: dict, dtypes: dict, metadata: dict | None = None) -> bytes:
    """A safetensors header as this project writes it: the JSON (dtype, shape, data_offsets; metadata
    format pt and ``metadata``'s strings) padded with spaces to a multiple of 8."""
    header, offset = {"__metadata__": {"format": "pt"} | (metadata or {})}, 0
    for n in names:
        nbytes = math.prod(shapes[n]) * torch.tensor([], dtype=dtypes[n]).element_size()
        header[n] = {"dtype": SAFETENSORS_DTYPES[dtypes[n]], "shape": list(shapes[n]),
                     "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    return blob + b" " * (-len(blob) % 8)


def header_bytes(shapes: dict, dtypes: dict) -> int:
    """The bytes a file of these tensors spends before their data: 8 (the length) + the header."""
    return 8 + len(_header(sorted(shapes), shapes, dtypes))


def write_safetensors_streaming(path: Path, names: list[str], shapes: dict, dtypes: dict, get,
                                metadata: dict | None = None) -> None:
    """Write a safetensors file one tensor at a time (``get(name)`` → tensor), so a shard of many
    GB never sits in memory whole. Layout as the format defines it: an 8-byte little-endian header
    length, the JSON header (``_header``), then the tensors' bytes in header order."""
    blob = _header(names, shapes, dtypes, metadata)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for n in names:
            t = get(n).contiguous()
            if tuple(t.shape) != tuple(shapes[n]) or t.dtype != dtypes[n]:
                raise ValueError(f"{n}: expected {dtypes[n]} {tuple(shapes[n])}, got {t.dtype} {tuple(t.shape)}")
            if t.numel():
                flat = t.reshape(-1)  # a contiguous tensor may still carry a stride on a size-1 dimension
                flat = flat if flat.stride(0) == 1 else flat.clone(memory_format=torch.contiguous_format)
                f.write(flat.view(torch.uint8).numpy())  # the tensor's own buffer: no copy


def regroup_shards(sources: list[Path], directory: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[str]:
    """Copy the tensors of ``sources`` (safetensors files, in order) into shards of at most
    ``max_shard_bytes`` in ``directory``, named as save_pretrained names them (one
    ``model.safetensors``, or ``model-0000k-of-0000N`` plus an index). One tensor in memory at a time."""
    where, shapes, dtypes = {}, {}, {}
    for f in sources:
        with safe_open(f, "pt") as h:
            for name in h.keys():
                sl = h.get_slice(name)
                where[name] = f
                shapes[name] = tuple(sl.get_shape())
                dtypes[name] = TORCH_DTYPES[sl.get_dtype()]
    size = {n: math.prod(shapes[n]) * torch.tensor([], dtype=dtypes[n]).element_size() for n in sorted(where)}
    groups = group_shards(size, max_shard_bytes)

    def get(name):
        with safe_open(where[name], "pt") as h:
            return h.get_tensor(name)

    names = shard_names(len(groups))
    for fname, group in zip(names, groups):
        write_safetensors_streaming(directory / fname, group, shapes, dtypes, get)
    if len(groups) > 1:
        write_index(directory, names, groups, sum(size.values()))
    return names


def refuse_existing(final: Path, overwrite: bool) -> None:
    """An existing, non-empty output is replaced only with ``overwrite``."""
    if final.exists() and (not final.is_dir() or any(final.iterdir())) and not overwrite:
        raise OutputExistsError(f"{final} already exists and is not empty; pass --overwrite to replace it "
                                "or choose another --out")


def prepare_output(out: str | os.PathLike, overwrite: bool) -> tuple[Path, Path]:
    """Check the destination before any long work; return (final path, temporary path)."""
    final = Path(out).resolve()
    refuse_existing(final, overwrite)
    check_writable(final.parent)
    tmp = final.with_name(f"{final.name}.partial-{os.getpid()}")
    return final, tmp


def check_writable(directory: Path) -> None:
    """Create ``directory`` if needed and a probe file in it (removed at once): a read-only file
    system or a missing permission is an ``OutputNotWritableError`` naming the directory, now
    rather than after hours of work."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".gptq-write-probe-", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputNotWritableError(f"cannot write to {directory} ({e.strerror or e}); choose an --out in a "
                                     "directory you can write to") from None


def move_into_place(tmp: Path, final: Path) -> None:
    """Rename the finished temporary directory to its final name (replacing an old one)."""
    if final.exists():
        old = final.with_name(f"{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_save(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    """``tensors`` as one safetensors file at ``path`` (``metadata``: strings for its header), whole or
    not at all (written under a temporary name, then renamed), from the tensors' own memory
    (safetensors' save_file first copies every tensor into a bytes object: the embeddings and head of
    a large vocabulary twice over)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    names = sorted(tensors)
    write_safetensors_streaming(tmp, names, {n: tuple(tensors[n].shape) for n in names},
                                {n: tensors[n].dtype for n in names}, tensors.__getitem__, metadata)
    os.replace(tmp, path)



"""Where calibration text comes from: a named set (via ``datasets``) or a local file."""

from __future__ import annotations

import json
import os
import socket
import threading
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit
from urllib.request import getproxies, proxy_bypass

LOCAL_HINT = (
    "Use a local file instead: --dataset PATH, where PATH is a .txt file, a .jsonl/.json file with a "
    "'text' field, a .parquet file with a 'text' column, or a directory written by datasets.save_to_disk."
)


TEXT_SUFFIXES = (".txt", ".raw", ".tokens", ".text", ".md", "")


class CalibrationDataError(ValueError):
    """The calibration text could not be read, or there is not enough of it."""


@dataclass(frozen=True)
class NamedSet:
    path: str
    name: str | None
    splits: dict  # "calib" / "eval" -> datasets split spec
    field: str
    data_files: dict | None = None
    mode: str = "stream"  # "documents": windows drawn from single long documents (the paper's C4)


NAMED = {
    "wikitext2": NamedSet("wikitext", "wikitext-2-raw-v1", {"calib": "train", "eval": "test"}, "text"),
    "ptb": NamedSet("ptb_text_only", "penn_treebank", {"calib": "train", "eval": "test"}, "sentence"),
    "c4": NamedSet(
        "allenai/c4", None, {"calib": "train", "eval": "validation"}, "text",
        data_files={"train": "en/c4-train.00000-of-01024.json.gz",
                    "validation": "en/c4-validation.00000-of-00008.json.gz"},
        mode="documents",
    ),
}


def _texts_from_records(records, field: str, where: str) -> list[str]:
    out = []
    for i, r in enumerate(records):
        if not isinstance(r, dict) or field not in r:
            raise CalibrationDataError(f"{where}: record {i} has no '{field}' field; each record needs one")
        out.append(str(r[field]))
    return out


MAX_INVALID_UTF8 = 0.001  # above this fraction of undecodable bytes a "text" file is taken for binary data


def _read_text(path: Path) -> str:
    """A text file's contents as UTF-8. Binary data (NUL bytes, or more than 0.1 % of bytes that are
    not UTF-8) is refused, naming the file; a few stray bytes are replaced, with a warning."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CalibrationDataError(f"{path}: cannot be read ({e.strerror or e})") from e
    hint = "pass a UTF-8 text file (or a .jsonl/.json/.parquet file with a 'text' field) with --dataset"
    nul = data.count(0)
    if nul:
        raise CalibrationDataError(f"{path}: not a text file ({nul} NUL bytes; binary data?); {hint}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        first = e.start
    text = data.decode("utf-8", errors="replace")
    bad = text.count("\ufffd")
    if bad > MAX_INVALID_UTF8 * len(data):
        raise CalibrationDataError(f"{path}: not UTF-8 text ({bad} undecodable bytes, the first at byte {first}; "
                                   f"binary data, or another encoding: convert it with e.g. iconv -t utf-8); {hint}")
    warnings.warn(f"{path}: {bad} byte(s) that are not UTF-8 (the first at byte {first}) were replaced", stacklevel=3)
    return text


def _load_local(path: Path) -> list[str]:
    suffix = path.suffix.lower()
    if path.is_dir():
        try:
            import datasets

            ds = datasets.load_from_disk(str(path))
        except Exception as e:  # noqa: BLE001 - any failure here means "not a saved dataset"
            raise CalibrationDataError(f"{path}: not a directory written by datasets.save_to_disk ({e})") from e
        if isinstance(ds, datasets.DatasetDict):
            split = "train" if "train" in ds else next(iter(ds))
            ds = ds[split]
        if "text" not in ds.column_names:
            raise CalibrationDataError(f"{path}: the dataset has columns {ds.column_names}, no 'text' column")
        return [str(t) for t in ds["text"]]
    if suffix in TEXT_SUFFIXES:
        return [_read_text(path)]
    if suffix == ".jsonl":
        recs = []
        for n, line in enumerate(_read_text(path).splitlines(), 1):
            if line.strip():
                try:
                    recs.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise CalibrationDataError(f"{path}:{n}: not valid JSON ({e.msg})") from e
        return _texts_from_records(recs, "text", str(path))
    if suffix == ".json":
        try:
            data = json.loads(_read_text(path))
        except json.JSONDecodeError as e:
            raise CalibrationDataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from e
        if isinstance(data, dict) and isinstance(data.get("text"), list):
            return [str(t) for t in data["text"]]
        if isinstance(data, list):
            return _texts_from_records(data, "text", str(path))
        raise CalibrationDataError(f"{path}: expected a list of records with a 'text' field")
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # noqa: BLE001 - pyarrow's errors (ArrowInvalid, OSError): not a parquet file
            raise CalibrationDataError(f"{path}: not a readable parquet file ({e}); pass a parquet file with a "
                                       "'text' column, or another file type, with --dataset") from e
        if "text" not in table.column_names:
            raise CalibrationDataError(f"{path}: columns {table.column_names}, no 'text' column")
        return [str(t) for t in table.column("text").to_pylist()]
    raise CalibrationDataError(
        f"{path}: unknown file type '{suffix}'. Supported: plain text (.txt, .raw, .tokens, .md), .jsonl, .json, .parquet, or a save_to_disk directory"
    )


HUB_TIMEOUT = 5.0  # seconds to wait for a TCP connection to the hub before calling it unreachable
TRUE = ("1", "ON", "YES", "TRUE")


def hub_offline() -> str | None:
    """The environment variable that puts the hub client offline (HF_HUB_OFFLINE, ...), if one is set."""
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in TRUE:
            return var
    return None


def hub_unreachable(timeout: float = HUB_TIMEOUT) -> str | None:
    """Why the hub cannot be reached, or None when it can: one TCP connection to its host
    (``HF_ENDPOINT``, default https://huggingface.co; or to the proxy the environment names for
    it) within ``timeout`` seconds, name lookup included, instead of a minute of HTTP retries."""
    url = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    proxies = getproxies()
    proxy = proxies.get(url.scheme) or proxies.get("all")
    if proxy and not proxy_bypass(host):
        p = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = p.hostname or "", p.port or (443 if p.scheme == "https" else 1080 if p.scheme.startswith("socks")
                                                  else 80)
    where = f"{host}:{port}"
    outcome: list[str | None] = []

    def connect():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as e:
            outcome.append(f"{where}: {e.strerror or e}")

    attempt = threading.Thread(target=connect, daemon=True)  # a name lookup does not heed the timeout
    attempt.start()
    attempt.join(timeout)
    return outcome[0] if outcome else f"{where}: no answer within {timeout:g} s"


@contextmanager
def _offline_datasets():
    """``datasets`` and its hub client in offline mode (the cache only, no request, no retry) and
    quiet (its log lines would precede our message)."""
    import datasets
    import huggingface_hub.constants as hub
    from datasets.utils import logging as ds_logging
    from huggingface_hub.utils import logging as hub_logging

    saved = datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE, ds_logging.get_verbosity(), hub_logging.get_verbosity()
    datasets.config.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE = True
    ds_logging.set_verbosity_error()
    hub_logging.set_verbosity_error()
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE = saved[:2]
        ds_logging.set_verbosity(saved[2])
        hub_logging.set_verbosity(saved[3])


def load_documents(dataset: str, purpose: str = "calib") -> tuple[list[str], str]:
    """Return (documents, sampling mode) for a named set or a local path."""
    path = Path(dataset).expanduser()
    if path.exists():
        docs = _load_local(path)
        mode = "stream"
    elif dataset in NAMED:
        spec = NAMED[dataset]
        split = spec.splits[purpose]
        offline = hub_offline()
        unreachable = None if offline else hub_unreachable()
        try:
            import datasets

            kw = {"data_files": {split: spec.data_files[split]}} if spec.data_files else {}
            with _offline_datasets() if offline or unreachable else nullcontext():
                ds = datasets.load_dataset(spec.path, spec.name, split=split, **kw)
        except Exception as e:  # noqa: BLE001 - network, hub and cache errors all end here
            if offline or unreachable:
                why = f"offline mode is on ({offline})" if offline else f"the hub cannot be reached ({unreachable})"
                raise CalibrationDataError(f"could not load the '{dataset}' dataset: {why} and no copy of it is cached. "
                                           + LOCAL_HINT) from e
            raise CalibrationDataError(
                f"could not load the '{dataset}' dataset through datasets "
                f"(the hub may be unreachable: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
                + LOCAL_HINT
            ) from e
        if unreachable:
            warnings.warn(f"the hub cannot be reached ({unreachable}): using the cached copy of '{dataset}'",
                          stacklevel=2)
        docs = [str(t) for t in ds[spec.field]]
        mode = spec.mode
    else:
        looks_like_path = any(c in dataset for c in "/\\.")
        raise CalibrationDataError(
            (f"{dataset}: no such file or directory. " if looks_like_path else f"unknown dataset '{dataset}'. ")
            + f"Named sets: {', '.join(NAMED)}. " + LOCAL_HINT
        )
    if not any(d.strip() for d in docs):
        raise CalibrationDataError(f"{dataset}: the dataset is empty (no text). " + LOCAL_HINT)
    return docs, mode

"""Where calibration text comes from: a named set (via ``datasets``) or a local file."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

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
        return [path.read_text(encoding="utf-8", errors="replace")]
    if suffix == ".jsonl":
        recs = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    recs.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise CalibrationDataError(f"{path}:{n}: not valid JSON ({e.msg})") from e
        return _texts_from_records(recs, "text", str(path))
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise CalibrationDataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from e
        if isinstance(data, dict) and isinstance(data.get("text"), list):
            return [str(t) for t in data["text"]]
        if isinstance(data, list):
            return _texts_from_records(data, "text", str(path))
        raise CalibrationDataError(f"{path}: expected a list of records with a 'text' field")
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if "text" not in table.column_names:
            raise CalibrationDataError(f"{path}: columns {table.column_names}, no 'text' column")
        return [str(t) for t in table.column("text").to_pylist()]
    raise CalibrationDataError(
        f"{path}: unknown file type '{suffix}'. Supported: plain text (.txt, .raw, .tokens, .md), .jsonl, .json, .parquet, or a save_to_disk directory"
    )


def load_documents(dataset: str, purpose: str = "calib") -> tuple[list[str], str]:
    """Return (documents, sampling mode) for a named set or a local path."""
    path = Path(dataset).expanduser()
    if path.exists():
        docs = _load_local(path)
        mode = "stream"
    elif dataset in NAMED:
        spec = NAMED[dataset]
        split = spec.splits[purpose]
        try:
            import datasets

            kw = {"data_files": {split: spec.data_files[split]}} if spec.data_files else {}
            ds = datasets.load_dataset(spec.path, spec.name, split=split, **kw)
        except Exception as e:  # noqa: BLE001 - network, hub and cache errors all end here
            raise CalibrationDataError(
                f"could not load the '{dataset}' dataset through datasets "
                f"(the hub may be unreachable: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
                + LOCAL_HINT
            ) from e
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

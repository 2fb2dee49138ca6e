"""Calibration and evaluation text: named sets through ``datasets``, or local files.

    documents = load_documents("c4")                      # or "wikitext2", "ptb", or a path
    windows   = sample_windows(documents, tokenizer, nsamples=128, seqlen=2048, seed=0)

Local files: ``.txt`` (the whole file), ``.jsonl`` / ``.json`` (a ``text`` field per record),
``.parquet`` (a ``text`` column) and directories written by ``datasets.save_to_disk``.
"""

from .sources import NAMED, CalibrationDataError, load_documents
from .windows import eval_tokens, sample_windows

__all__ = ["CalibrationDataError", "NAMED", "load_documents", "sample_windows", "eval_tokens"]

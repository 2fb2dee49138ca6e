"""Token windows for calibration (random, seeded) and evaluation (consecutive, non-overlapping)."""

from __future__ import annotations

import random
import warnings

import torch

from .sources import CalibrationDataError

JOIN = "\n\n"  # the GPTQ paper joins documents with a blank line before tokenizing once


def _tokenize(tokenizer, text: str, special: bool = False) -> torch.Tensor:
    return tokenizer(text, return_tensors="pt", add_special_tokens=special).input_ids[0]  # [N]


def sample_windows(documents: list[str], tokenizer, nsamples: int, seqlen: int, seed: int = 0,
                   mode: str = "stream") -> torch.Tensor:
    """``nsamples`` random windows of ``seqlen`` tokens → [nsamples, seqlen] int64.

    stream:    join all documents, tokenize once, draw random start offsets (WikiText2, PTB, files).
    documents: draw a random document, retry until it is longer than seqlen, then a random window
               inside it (the paper's C4 sampling). Falls back to stream if too few are that long.
    """
    rng = random.Random(seed)
    if mode == "documents":
        windows = []
        tries = 0
        while len(windows) < nsamples and tries < 50 * nsamples:
            tries += 1
            doc = documents[rng.randrange(len(documents))]
            ids = _tokenize(tokenizer, doc)
            if ids.numel() <= seqlen:
                continue
            start = rng.randrange(ids.numel() - seqlen)
            windows.append(ids[start : start + seqlen])
        if len(windows) == nsamples:
            return torch.stack(windows)
        rng = random.Random(seed)
    ids = _tokenize(tokenizer, JOIN.join(documents))
    n = ids.numel()
    if n < seqlen + 1:
        raise CalibrationDataError(
            f"the calibration text has {n} tokens, too few for one window of --seqlen {seqlen}; "
            f"give at least {seqlen + 1} tokens of text (for {nsamples} distinct windows, "
            f"{nsamples * seqlen}) or lower --seqlen"
        )
    if n < nsamples * seqlen:
        warnings.warn(
            f"the calibration text has {n} tokens, fewer than --nsamples {nsamples} × --seqlen {seqlen} = "
            f"{nsamples * seqlen}: windows will overlap", stacklevel=2,
        )
    starts = [rng.randrange(n - seqlen) for _ in range(nsamples)]
    return torch.stack([ids[s : s + seqlen] for s in starts])  # [nsamples, seqlen]


def eval_tokens(documents: list[str], tokenizer, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """The paper's perplexity protocol: join with "\\n\\n", tokenize once, cut into consecutive
    non-overlapping windows of ``seqlen`` (the remainder is dropped) → [windows, seqlen]."""
    ids = _tokenize(tokenizer, JOIN.join(documents), special=True)  # as the paper: one BOS at the start
    nw = ids.numel() // seqlen
    if max_windows is not None:
        nw = min(nw, max_windows)
    if nw == 0:
        raise CalibrationDataError(
            f"the evaluation text has {ids.numel()} tokens, fewer than one window of --seqlen {seqlen}"
        )
    return ids[: nw * seqlen].reshape(nw, seqlen)

"""The reference side of ``gptq.eval --reference``: what a model is (vocabulary, tokenizer) read
without its weights, the check that two models share a vocabulary, and the on-disk cache of the
reference's next-token distributions.

Cache layout (``--reference-cache DIR``): ``meta.json`` (which reference: its config, weight files,
vocabulary; the stored form), ``tokenizer/`` (the reference's tokenizer, so later runs cut the same
windows without the reference model), and one ``<sha256 of the window's token ids>.safetensors`` per
window holding ``logprobs`` (the log-softmax over the whole vocabulary, float16, [seqlen - 1, vocab]),
``nll`` (the reference's next-token NLL, float32) and ``tokens``. Full float16 log-softmax, not
top-k: KL over the whole vocabulary stays exact (a top-k cache makes KL a lower bound and biases its
tail percentiles, which are the figures that tell quantizations apart), at 2 bytes x vocabulary per
token (SmolLM2, 49152 tokens: 201 MB per 2048-token window; llama-perplexity's base file is the same
size). Windows are written one at a time, atomically; any window a later run needs is either there
whole or computed again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoTokenizer

from gptq.io.safetensors_io import CheckpointError
from gptq.runtime.gguf_reader import gguf_config_and_tokenizer, gguf_file

STORED = "log_softmax float16 [seqlen-1, vocab] per window"


@dataclass
class ModelInfo:
    """A model as the vocabulary check sees it, read without its weights."""

    path: str
    config: object
    tokenizer: object | None
    vocab_size: int

    def identity(self) -> dict:
        """What names this model for the cache: its config (without paths and versions) and the
        names and sizes of its weight files."""
        cfg = {k: v for k, v in self.config.to_dict().items()
               if not k.startswith("_") and k not in ("transformers_version", "dtype", "torch_dtype")}
        p = Path(self.path)
        files = [p] if p.is_file() else sorted(f for f in p.iterdir() if f.suffix in (".safetensors", ".bin", ".gguf"))
        return {"config_sha256": _sha(json.dumps(cfg, sort_keys=True, default=str)),
                "weights": {f.name: f.stat().st_size for f in files}}


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def describe(path: str | Path) -> ModelInfo:
    """Config, tokenizer and vocabulary size of a model directory, checkpoint or GGUF file."""
    if (g := gguf_file(path)) is not None:
        config, tokenizer = gguf_config_and_tokenizer(g)
    else:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"'{path}' does not exist")
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"'{path}' is not a model directory (no config.json) nor a .gguf file")
        config = AutoConfig.from_pretrained(p)
        try:
            tokenizer = AutoTokenizer.from_pretrained(p)
        except (OSError, ValueError):
            tokenizer = None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = getattr(text, "vocab_size", None)
    if vocab is None:
        raise CheckpointError(f"{path}: its config has no vocab_size")
    return ModelInfo(str(path), config, tokenizer, int(vocab))


def token_table(tokenizer, vocab_size: int) -> dict[int, str]:
    """Token id → token for the ids a model of ``vocab_size`` outputs (tokenizers may add tokens
    past them, e.g. transformers' GGUF tokenizers their own unknown token)."""
    return {i: t for t, i in tokenizer.get_vocab().items() if i < vocab_size}


def check_same_vocabulary(model: ModelInfo, ref_vocab: int, ref_tokens: dict[int, str] | None, ref_name: str) -> None:
    """One clear error unless the model's output vocabulary is the reference's, token for token."""
    if model.vocab_size != ref_vocab:
        raise CheckpointError(f"{model.path} has a vocabulary of {model.vocab_size} tokens, the reference {ref_name} "
                              f"{ref_vocab}: KL divergence compares distributions over one vocabulary")
    if model.tokenizer is None or ref_tokens is None:
        return
    mine = token_table(model.tokenizer, model.vocab_size)
    differ = sorted(i for i in set(mine) | set(ref_tokens) if mine.get(i) != ref_tokens.get(i))
    if differ:
        i = differ[0]
        raise CheckpointError(f"{model.path} and the reference {ref_name} have different tokenizers: {len(differ)} of "
                              f"{ref_vocab} token ids differ (id {i}: {mine.get(i)!r} vs {ref_tokens.get(i)!r})")


def window_key(tokens: torch.Tensor) -> str:
    return hashlib.sha256(tokens.to(torch.int64).cpu().numpy().tobytes()).hexdigest()[:32]


class ReferenceCache:
    """A directory of the reference's per-window float16 log-softmax (see the module docstring)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.meta_path = self.root / "meta.json"

    @property
    def meta(self) -> dict | None:
        return json.loads(self.meta_path.read_text()) if self.meta_path.is_file() else None

    def bind(self, ref: ModelInfo | None) -> dict:
        """Check the cache holds ``ref``'s figures (or create it for ``ref``); returns its metadata.
        Without ``ref`` the cache must exist: it then is the reference."""
        meta = self.meta
        if ref is None:
            if meta is None:
                raise CheckpointError(f"--reference-cache {self.root} holds no reference yet: pass --reference MODEL "
                                      "once to fill it")
            return meta
        want = {"stored": STORED, "vocab_size": ref.vocab_size, **ref.identity()}
        if meta is not None:
            if any(meta.get(k) != v for k, v in want.items()):
                raise CheckpointError(f"--reference-cache {self.root} holds another reference's distributions "
                                      f"({meta.get('reference')}); use another directory or delete this one")
            return meta
        if ref.tokenizer is None:
            raise CheckpointError(f"the reference {ref.path} has no tokenizer to store with the cache")
        self.root.mkdir(parents=True, exist_ok=True)
        ref.tokenizer.save_pretrained(self.root / "tokenizer")
        meta = {"reference": str(Path(ref.path).resolve()), **want}
        tmp = self.meta_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, self.meta_path)
        return meta

    def tokenizer(self):
        return AutoTokenizer.from_pretrained(self.root / "tokenizer")

    def path(self, tokens: torch.Tensor) -> Path:
        return self.root / f"{window_key(tokens)}.safetensors"

    def missing(self, windows: torch.Tensor) -> list[int]:
        return [i for i, w in enumerate(windows) if not self.path(w).is_file()]

    def check_space(self, n_windows: int, seqlen: int, vocab: int) -> None:
        need = n_windows * (seqlen - 1) * vocab * 2
        free = shutil.disk_usage(self.root).free
        if need > free:
            raise CheckpointError(f"--reference-cache {self.root}: {n_windows} windows need {need / 2**30:.1f} GiB "
                                  f"(float16 x {vocab} tokens x {seqlen - 1} positions each), {free / 2**30:.1f} GiB "
                                  "free; use fewer windows or another directory")

    def get(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        p = self.path(tokens)
        if not p.is_file():
            return None
        t = load_file(p)
        if not torch.equal(t["tokens"], tokens.to(torch.int64).cpu()):
            raise CheckpointError(f"{p} holds another window's distributions (a hash collision or a copied file)")
        return t["logprobs"], t["nll"]

    def put(self, tokens: torch.Tensor, logprobs: torch.Tensor, nll: torch.Tensor) -> None:
        p = self.path(tokens)
        tmp = p.with_suffix(".tmp")
        save_file({"logprobs": logprobs.to(torch.float16).cpu().contiguous(), "nll": nll.float().cpu().contiguous(),
                   "tokens": tokens.to(torch.int64).cpu().contiguous()}, tmp)
        os.replace(tmp, p)

    def tokens(self) -> dict[int, str]:
        return token_table(self.tokenizer(), int(self.meta["vocab_size"]))

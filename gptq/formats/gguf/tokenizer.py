"""The tokenizer as llama.cpp reads it from a GGUF file, written as convert_hf_to_gguf writes it."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import gguf
from transformers import AutoTokenizer


def vocab(writer, source: Path, hf: dict, add_bos: bool | None = None) -> None:
    """The tokenizer as convert_hf_to_gguf writes it: a byte-level BPE one as ``gpt2``, a
    SentencePiece-style one (BPE on ▁-joined text with byte-fallback tokens, as transformers
    converts Llama 2 / Mistral / Mixtral / Phi-3 tokenizers) as ``llama``."""
    model = _tokenizer_model(source)
    spm = bool(model.get("byte_fallback"))
    tok = AutoTokenizer.from_pretrained(source)
    vocab_size = hf.get("vocab_size", len(tok.get_vocab()))
    reverse = {i: t for t, i in tok.get_vocab().items()}
    added = tok.added_tokens_decoder
    if spm:  # merge order as scores: llama.cpp's SentencePiece tokenizer merges the best-scored pair first
        rank: dict[str, int] = {}
        for r, m in enumerate(model.get("merges", [])):
            a, b = m.split(" ", 1) if isinstance(m, str) else m
            rank.setdefault(a + b, r)
    tokens, types, scores = [], [], []
    for i in range(vocab_size):
        text = reverse.get(i)
        score = 0.0
        if text is None:
            text, kind = f"[PAD{i}]", gguf.TokenType.UNUSED
        elif spm and i == tok.unk_token_id:
            kind = gguf.TokenType.UNKNOWN
        elif i in added:
            kind = gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED
        elif spm and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text):
            kind = gguf.TokenType.BYTE
        else:
            kind = gguf.TokenType.NORMAL
            if spm:
                score = -float(rank.get(text, len(rank) + i))
        tokens.append(text)
        types.append(kind)
        scores.append(score)
    if spm:
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        first = tok.tokenize("a")
        writer.add_add_space_prefix(bool(first) and first[0].startswith("\u2581"))
        special = gguf.SpecialVocab(source, load_merges=False, n_vocab=len(tokens))
        special.add_to_gguf(writer)
        return
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer(tok, source))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(source, load_merges=True, n_vocab=len(tokens))
    if add_bos is not None:  # the converter's choice for the family (Phi-2: no BOS)
        special.add_special_token["bos"] = add_bos
    special.add_to_gguf(writer)
    if "bos" not in special.add_special_token:  # convert_hf_to_gguf writes it even when false
        writer.add_add_bos_token(False)


def _tokenizer_model(source: Path) -> dict:
    """The ``model`` entry of ``tokenizer.json``, refused unless GGUF can express it (BPE)."""
    if not (source / "tokenizer.json").is_file():
        raise ValueError(f"{source}: GGUF output needs a fast tokenizer (tokenizer.json)")
    model = json.loads((source / "tokenizer.json").read_text())["model"]
    if model["type"] != "BPE":
        raise ValueError(f"{source}: tokenizer model {model['type']!r}; GGUF output supports BPE tokenizers "
                         "(byte-level, or SentencePiece-style with byte fallback) so far")
    return model


def check_tokenizer(source: Path) -> str:
    """Refuse a tokenizer the GGUF writer cannot express, before any work; returns the GGUF
    tokenizer model ("gpt2" or "llama")."""
    if _tokenizer_model(source).get("byte_fallback"):
        return "llama"
    pre_tokenizer(AutoTokenizer.from_pretrained(source), source)
    return "gpt2"


def pre_tokenizer(tok, source: Path) -> str:
    """llama.cpp's name for the pre-tokenizer (``tokenizer.ggml.pre``), which it requires to load a
    BPE vocabulary. Recognised from the vocabulary; ``GPTQ_GGUF_PRE`` overrides."""
    if os.environ.get("GPTQ_GGUF_PRE"):
        return os.environ["GPTQ_GGUF_PRE"]
    v = tok.get_vocab()
    if len(v) == 49152 and "<|im_start|>" in v:
        return "smollm"  # SmolLM / SmolLM2 (HuggingFaceTB)
    if "<|begin_of_text|>" in v:
        return "llama-bpe"  # Llama 3
    if len(v) == 50257 and "<|endoftext|>" in v:
        return "gpt-2"  # GPT-2's own vocabulary
    if len(v) >= 151000 and "<|endoftext|>" in v and "<|im_start|>" in v:
        return "qwen2"  # Qwen2, Qwen2.5, Qwen3 (the same BPE and pre-tokenizer)
    raise ValueError(f"{source}: cannot tell llama.cpp's pre-tokenizer for this BPE vocabulary; set GPTQ_GGUF_PRE "
                     "to the name convert_hf_to_gguf.py would write (e.g. llama-bpe, smollm, qwen2)")

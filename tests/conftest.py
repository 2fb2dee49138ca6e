"""Shared fixtures: tiny random models of every supported family (no download) and SmolLM2."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# No GPU in CI: run Triton kernels through its interpreter (must be set before triton is imported)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "wikitext2"

TINY = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128)


def tiny_config(family: str):
    from transformers import (
        GPT2Config,
        GPTNeoXConfig,
        LlamaConfig,
        MistralConfig,
        OPTConfig,
        Phi3Config,
        PhiConfig,
        Qwen2Config,
    )

    if family == "llama":
        return LlamaConfig(**TINY, intermediate_size=128, num_key_value_heads=2)
    if family == "mistral":
        return MistralConfig(**TINY, intermediate_size=128, num_key_value_heads=2, sliding_window=None)
    if family == "qwen2":
        return Qwen2Config(**TINY, intermediate_size=128, num_key_value_heads=2)
    if family == "opt":
        return OPTConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4,
                         word_embed_proj_dim=64, max_position_embeddings=128, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1)
    if family == "gpt_neox":
        return GPTNeoXConfig(**TINY, intermediate_size=128)
    if family == "gpt2":
        return GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=0,
                          eos_token_id=0)
    if family == "phi":
        return PhiConfig(**TINY, intermediate_size=128)
    if family == "phi3":
        return Phi3Config(**TINY, intermediate_size=128, num_key_value_heads=4, pad_token_id=0, bos_token_id=1,
                          eos_token_id=2)
    if family in MOE_FAMILIES:
        return moe_config(family)
    raise KeyError(family)


FAMILIES = ["llama", "mistral", "qwen2", "opt", "gpt_neox", "gpt2", "phi", "phi3"]
MOE_FAMILIES = ["mixtral", "qwen3_moe", "qwen2_moe", "olmoe"]


def moe_config(family: str, experts: int = 8, active: int = 2, hidden: int = 64, inter: int = 64, layers: int = 2):
    """A small random mixture-of-experts config (transformers builds its experts fused)."""
    from transformers import MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig

    base = dict(TINY, hidden_size=hidden, num_hidden_layers=layers, num_key_value_heads=2,
                num_experts_per_tok=active)
    if family == "mixtral":
        return MixtralConfig(**base, intermediate_size=inter, num_local_experts=experts)
    if family == "qwen3_moe":
        return Qwen3MoeConfig(**base, intermediate_size=2 * inter, moe_intermediate_size=inter, num_experts=experts,
                              head_dim=hidden // 4)
    if family == "qwen2_moe":
        return Qwen2MoeConfig(**base, intermediate_size=2 * inter, moe_intermediate_size=inter, num_experts=experts,
                              shared_expert_intermediate_size=3 * inter // 2)
    if family == "olmoe":
        return OlmoeConfig(**base, intermediate_size=inter, num_experts=experts)
    raise KeyError(family)


def tiny_model(family: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family), dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    """A byte-level BPE tokenizer trained here on a few sentences (256-token vocabulary)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=256, special_tokens=["<s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([SAMPLE_TEXT], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<s>")
    d = tmp_path_factory.mktemp("tok")
    fast.save_pretrained(d)
    return d


BPE_VOCAB = 320  # a byte-level BPE with merges (GGUF's byte-level vocabularies need them)


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([SAMPLE_TEXT], trainers.BpeTrainer(
        vocab_size=BPE_VOCAB, special_tokens=["<s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<s>")
    assert len(fast) == BPE_VOCAB
    d = tmp_path_factory.mktemp("bpe")
    fast.save_pretrained(d)
    return d


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_tokenizer_dir):
    """Save a tiny model of a family plus the tokenizer; returns a factory(family) -> dir."""
    import shutil

    def make(family: str = "llama") -> Path:
        d = tmp_path / f"tiny-{family}"
        tiny_model(family).save_pretrained(d)
        for f in tiny_tokenizer_dir.iterdir():
            shutil.copy(f, d / f.name)
        return d

    return make


SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step. "
    "To be or not to be, that is the question. All that glitters is not gold. "
) * 40


@pytest.fixture(scope="session")
def smollm2_dir():
    """The real SmolLM2-135M-Instruct, converted once and cached (see gptq/assets.py)."""
    from gptq.assets import smollm2

    cache = Path(os.environ.get("GPTQ_CACHE", ROOT / ".cache")) / "smollm2"
    return smollm2(cache)


@pytest.fixture(scope="session")
def wikitext():
    """(calibration text, evaluation text) from ../shared when present, else skipped."""
    valid, test = SHARED / "valid.tokens.txt", SHARED / "wiki.test.raw"
    if not (valid.is_file() and test.is_file()):
        pytest.skip("../shared/data/wikitext2 not present")
    return valid, test


@pytest.fixture(scope="session")
def smollm2_setup(smollm2_dir, wikitext):
    """SmolLM2 in fp32, its tokenizer, 16 x 256 calibration windows of WikiText-2 valid and 4 x 512
    evaluation windows of test: what the real-model tests share (loaded once per run)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from calib import eval_tokens, load_documents, sample_windows

    torch.manual_seed(0)
    valid, test = wikitext
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    calib = sample_windows(load_documents(str(valid))[0], tok, nsamples=16, seqlen=256, seed=0)
    evalw = eval_tokens(load_documents(str(test))[0], tok, seqlen=512, max_windows=4)
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    return base, tok, calib, evalw


@pytest.fixture(scope="session")
def smollm2_4bit(smollm2_setup):
    """SmolLM2 quantized in memory at 4 bits g64 on ``smollm2_setup``'s calibration (solved once per
    run; tests must not change it): (model, packed, report, config)."""
    import copy

    from gptq import QuantConfig, quantize_model

    base, _, calib, _ = smollm2_setup
    cfg = QuantConfig(bits=4, group_size=64)
    model = copy.deepcopy(base)
    packed, report = quantize_model(model, calib, cfg, device="cpu", progress=False)
    return model, packed, report, cfg


@pytest.fixture(scope="session")
def smollm2_ppl(smollm2_setup, smollm2_4bit):
    """Perplexities on ``smollm2_setup``'s evaluation windows, each computed once per run:
    {"fp32": the source model, "gptq-4-64": ``smollm2_4bit``'s model}."""
    from gptq.eval import perplexity

    base, _, _, evalw = smollm2_setup
    return {"fp32": perplexity(base, evalw), "gptq-4-64": perplexity(smollm2_4bit[0], evalw)}


def spm_style_tokenizer(text: str, out, vocab_size: int = 400):
    """A Llama-2-style tokenizer as transformers converts SentencePiece BPE ones (▁ for spaces,
    <unk> <s> </s>, byte-fallback tokens <0x00>..<0xFF>, merges in training order), trained on
    ``text`` and saved to ``out``; returns the transformers tokenizer."""
    import json

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import LlamaTokenizerFast

    t = Tokenizer(models.BPE(unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    t.train_from_iterator([text], trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False))
    trained = json.loads(t.to_str())["model"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [k for k, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]) if k not in tokens]
    bpe = models.BPE(vocab={k: i for i, k in enumerate(tokens)}, merges=[tuple(m) for m in trained["merges"]],
                     unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    tk = Tokenizer(bpe)
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    hf = LlamaTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            add_bos_token=True, add_eos_token=False)
    hf.save_pretrained(out)
    return hf


def run_module(module: str, args, env: dict | None = None):
    """``python -m MODULE ARGS`` run in this process, through the command's own ``main(argv)``, with
    its stdout, stderr and exit status as a ``CompletedProcess``. A new interpreter costs seconds of
    imports per call; the CLI tests whose subject is not the process itself (a signal, a kill, an
    environment read at import time) use this instead. A fresh interpreter's warning filters are
    installed for the call, so a warning prints as it would there (once, even if an earlier test
    raised it); ``env`` is set for the call only. An exception ``main`` lets through ends as
    Python's own would: its traceback on stderr, exit status 1."""
    import contextlib
    import importlib
    import io
    import subprocess
    import traceback
    import warnings

    main = importlib.import_module(module).main
    argv = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    saved = {k: os.environ.get(k) for k in (env or {})}
    code = 0
    with warnings.catch_warnings(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        warnings.resetwarnings()  # CPython's default filters (a fresh interpreter's, not pytest's)
        for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.simplefilter("ignore", category)
        warnings.filterwarnings("default", category=DeprecationWarning, module="__main__")
        os.environ.update({k: str(v) for k, v in (env or {}).items()})
        try:
            code = main(argv) or 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if not isinstance(e.code, (int, type(None))):
                print(e.code, file=sys.stderr)
        except Exception:
            traceback.print_exc()
            code = 1
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    return subprocess.CompletedProcess([sys.executable, "-m", module, *argv], code, out.getvalue(), err.getvalue())

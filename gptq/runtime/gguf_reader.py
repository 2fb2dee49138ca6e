"""Read a GGUF file back as a plain transformers model (every tensor dequantized to the activation
dtype), through transformers' GGUF loader and the ``gguf`` package's dequantizers, so that
``gptq.eval`` / ``gptq.generate`` run our GGUF files and llama.cpp's own on the same protocol.

The file is checked first, from its header alone (memory-mapped, no tensor read): an architecture
transformers cannot build, or a tensor type ``gguf`` cannot dequantize, is one clear error before
any weight is converted.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUFReader, quants
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
from transformers.utils import logging as hf_logging

from gptq.io.safetensors_io import CheckpointError

# GGUF architectures whose tensors transformers' loader maps, but not as the file means them
_MISREAD = {
    "llama": ("expert_count", ("a llama-architecture GGUF with merged experts (Mixtral): transformers' GGUF "
                               "loader builds a dense Llama and drops the experts")),
}


def gguf_file(path: str | Path) -> Path | None:
    """The .gguf file ``path`` names: the file itself, or a directory's only ``*.gguf`` when the
    directory has no config.json (else None: not a GGUF model)."""
    p = Path(path)
    if p.suffix.lower() == ".gguf":
        if not p.is_file():
            raise FileNotFoundError(f"'{path}' does not exist")
        return p
    if p.is_dir() and not (p / "config.json").is_file():
        files = sorted(p.glob("*.gguf"))
        if len(files) == 1:
            return files[0]
        if len(files) > 1:
            raise CheckpointError(f"'{path}' holds {len(files)} .gguf files ({', '.join(f.name for f in files[:4])}); "
                                  "name the one to read")
    return None


def _readable(qtype) -> bool:
    """Whether the gguf package can dequantize this tensor type (probed on one zero block)."""
    _, block_bytes = GGML_QUANT_SIZES[qtype]
    try:
        quants.dequantize(np.zeros((1, block_bytes), np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


def check_gguf(file: Path) -> str:
    """Refuse, from the header only, a file transformers' loader cannot read correctly; returns its
    architecture."""
    try:
        reader = GGUFReader(file)
    except (ValueError, OSError, KeyError) as e:
        raise CheckpointError(f"{file}: not a readable GGUF file ({e})") from e
    field = reader.fields.get("general.architecture")
    if field is None:
        raise CheckpointError(f"{file}: no general.architecture in the GGUF metadata")
    arch = field.contents()
    name = reader.fields["general.name"].contents() if "general.name" in reader.fields else ""
    known = arch in GGUF_SUPPORTED_ARCHITECTURES or {"qwen3moe": "qwen3_moe", "qwen2moe": "qwen2_moe"}.get(arch) \
        in GGUF_SUPPORTED_ARCHITECTURES or (arch == "llama" and "mistral" in str(name).lower())
    if not known or arch in ("general", "tokenizer"):
        readable = sorted(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer"))
        raise CheckpointError(f"{file}: GGUF architecture {arch!r} cannot be read (transformers' GGUF loader builds "
                              f"{', '.join(readable)})")
    if arch in _MISREAD:
        key, why = _MISREAD[arch]
        f = reader.fields.get(f"{arch}.{key}")
        if f is not None and int(f.contents() or 0) > 0:
            raise CheckpointError(f"{file}: {why}; it cannot be read")
    unreadable = sorted({t.tensor_type.name for t in reader.tensors if not _readable(t.tensor_type)})
    if unreadable:
        raise CheckpointError(f"{file}: tensor type(s) {', '.join(unreadable)} cannot be dequantized by the "
                              "installed gguf package")
    return arch


def _fix_config(config, file: Path, arch: str) -> None:
    """What transformers' GGUF config mapping leaves out, for the architectures we write: GPT-2's
    position table and MLP width (it sets only ``n_ctx``), Qwen3's head size (its default, 128),
    Qwen3-MoE's expert width (its default, 768)."""
    fields = GGUFReader(file).fields

    def get(key):
        f = fields.get(f"{arch}.{key}")
        return None if f is None else f.contents()

    if config.model_type == "gpt2":
        if get("context_length"):
            config.n_positions = config.n_ctx = int(get("context_length"))
        if get("feed_forward_length"):
            config.n_inner = int(get("feed_forward_length"))
    if get("attention.key_length") and hasattr(config, "head_dim") and config.model_type != "gpt2":
        config.head_dim = int(get("attention.key_length"))
    if get("expert_feed_forward_length") and hasattr(config, "moe_intermediate_size"):
        config.moe_intermediate_size = int(get("expert_feed_forward_length"))


def gguf_config_and_tokenizer(file: Path):
    """(config, tokenizer) of a GGUF file, from its metadata (no tensor is dequantized)."""
    arch = check_gguf(file)
    try:
        config = AutoConfig.from_pretrained(file.parent, gguf_file=file.name)
        _fix_config(config, file, arch)
        tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    except (ValueError, KeyError, NotImplementedError, OSError) as e:
        raise CheckpointError(f"{file}: transformers cannot read its config or tokenizer ({type(e).__name__}: {e})") from e
    return config, tokenizer


def load_gguf(file: str | Path, device, dtype):
    """A .gguf file → (a plain transformers model holding the dequantized weights in ``dtype`` on
    ``device``, its tokenizer)."""
    file = Path(file)
    config, tokenizer = gguf_config_and_tokenizer(file)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its "keys not parsed" notes
    try:
        model = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, config=config, dtype=dtype)
    except (ValueError, KeyError, NotImplementedError, RuntimeError) as e:
        raise CheckpointError(f"{file}: transformers' GGUF loader failed ({e})") from e
    finally:
        hf_logging.set_verbosity(verbosity)
    model.hf_quantizer = None  # plain dequantized tensors from here on
    return model.to(device).eval(), tokenizer

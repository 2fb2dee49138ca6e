"""Load a packed GPTQ checkpoint (ours or any tool's, v1 or v2 format, sharded or not) as a
transformers model whose quantized linears are ``QuantLinear`` modules.

    model, tokenizer = gptq.runtime.load("out/smollm2-gptq", device="cpu")     # backend chosen for you

Which linears are quantized is read from the tensors (every ``<m>.qweight``), so checkpoints
that quantize a different set (e.g. lm_head) load too. Everything is validated — shapes,
dtypes, g_idx bounds, config against tensors — before any kernel runs.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from gptq.formats.bnb import dequantize
from gptq.formats.compat import module_settings
from gptq.formats.compressed_tensors import as_gptq, read_scheme, scheme_of
from gptq.io.modules import in_features, parameters_on_meta, resolve_device
from gptq.io.safetensors_io import CheckpointError, read_tensors
from gptq.models.architectures import UnsupportedModelError, for_config
from gptq.models.moe import unfuse
from gptq.runtime import cpu
from gptq.runtime.cpu_backends import Rows64Backend
from gptq.runtime.gguf_reader import gguf_file, load_gguf
from gptq.runtime.kernels.cpu_rmsnorm import replace_rms_norms
from gptq.runtime.qlinear import QuantLinear, fuse_siblings, half_head_for_cpu, share_permutations

QUANT_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")


def quantization_config(config) -> dict:
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        raise CheckpointError("config.json has no quantization_config: this is not a GPTQ checkpoint")
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    if qc.get("quant_method") == "compressed-tensors":  # run as the GPTQ v2 tensors it converts to exactly
        scheme = read_scheme(qc)
        return {"bits": scheme["bits"], "group_size": scheme["group_size"], "checkpoint_format": "gptq_v2",
                "compressed_tensors": qc}
    if qc.get("quant_method", "gptq") != "gptq":
        raise CheckpointError(f"quantization_config.quant_method is {qc.get('quant_method')!r}, not 'gptq'")
    bits = qc.get("bits")
    if bits not in (2, 3, 4, 8):
        raise CheckpointError(f"quantization_config.bits is {bits!r}; GPTQ checkpoints use 2, 3, 4 or 8")
    gs = qc.get("group_size", -1)
    if not isinstance(gs, int) or (gs < 1 and gs != -1):
        raise CheckpointError(f"quantization_config.group_size is {gs!r}; expected a positive integer or -1")
    fmt = qc.get("checkpoint_format", "gptq")
    if fmt not in ("gptq", "gptq_v2"):
        raise CheckpointError(f"quantization_config.checkpoint_format is {fmt!r}; this loader reads gptq and gptq_v2")
    dynamic = qc.get("dynamic") or {}
    if not isinstance(dynamic, dict):
        raise CheckpointError("quantization_config.dynamic must map module-name patterns to overrides")
    for pattern, over in dynamic.items():
        if pattern.startswith("-:"):
            continue
        try:
            re.compile(pattern.removeprefix("+:"))
        except re.error as e:
            raise CheckpointError(f"quantization_config.dynamic: pattern {pattern!r} is not a regular expression ({e})")
        if not isinstance(over, dict) or over.get("bits", bits) not in (2, 3, 4, 8):
            raise CheckpointError(f"quantization_config.dynamic[{pattern!r}] = {over!r}: expected overrides such as "
                                  "{'bits': 4, 'group_size': 128} with bits 2, 3, 4 or 8")
    return {"bits": bits, "group_size": gs, "checkpoint_format": fmt, "dynamic": dynamic}


def _validate(prefix: str, t: dict[str, torch.Tensor], in_f: int, out_f: int, bits: int, gs: int) -> None:
    """Check one layer's tensors against the module they replace and the config."""
    qw, qz, sc = t["qweight"], t["qzeros"], t["scales"]
    ng = 1 if gs == -1 else math.ceil(in_f / gs)
    if qw.dtype != torch.int32 or qz.dtype != torch.int32:
        raise CheckpointError(f"{prefix}.qweight/qzeros must be int32, found {qw.dtype}/{qz.dtype}")
    if qw.shape != (in_f * bits // 32, out_f):
        rows = qw.shape[0] * 32 / in_f if qw.ndim == 2 and in_f else "?"
        raise CheckpointError(
            f"{prefix}.qweight has shape {tuple(qw.shape)}; a {in_f}→{out_f} layer at bits={bits} needs "
            f"({in_f * bits // 32}, {out_f}) (its row count fits bits={rows:g} if it is a bits mismatch)"
            if isinstance(rows, float) else f"{prefix}.qweight has shape {tuple(qw.shape)}")
    if sc.shape != (ng, out_f) or not sc.is_floating_point():
        raise CheckpointError(f"{prefix}.scales has shape {tuple(sc.shape)} {sc.dtype}; expected ({ng}, {out_f}) "
                              f"floating point for group_size={gs}")
    if qz.shape != (ng, out_f * bits // 32):
        raise CheckpointError(f"{prefix}.qzeros has shape {tuple(qz.shape)}; expected ({ng}, {out_f * bits // 32})")
    g = t["g_idx"]
    if g.shape != (in_f,) or g.is_floating_point():
        raise CheckpointError(f"{prefix}.g_idx has shape {tuple(g.shape)} {g.dtype}; expected ({in_f},) integers")
    if g.numel() and (int(g.min()) < 0 or int(g.max()) >= ng):
        raise CheckpointError(f"{prefix}.g_idx has values in [{int(g.min())}, {int(g.max())}], outside the "
                              f"{ng} groups [0, {ng - 1}]")
    if not torch.isfinite(sc).all():
        raise CheckpointError(f"{prefix}.scales contains NaN or Inf")
    if "bias" in t and t["bias"].shape != (out_f,):
        raise CheckpointError(f"{prefix}.bias has shape {tuple(t['bias'].shape)}; expected ({out_f},)")


def _set_parameter(model: nn.Module, name: str, current: torch.Tensor, t: torch.Tensor) -> None:
    """Put a checkpoint tensor in place of a (meta) parameter, after checking its shape."""
    if current.shape != t.shape:
        raise CheckpointError(f"{name} has shape {tuple(t.shape)}; the model expects {tuple(current.shape)}")
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    parent._parameters[attr] = nn.Parameter(t, requires_grad=False)


def _as_our_model(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Mixture-of-experts families: split the model's fused experts into per-expert linears
    (``moe.unfuse``) and name the checkpoint's tensors as that model does (Mixtral's w1/w3/w2).
    Other models and families we do not quantize ourselves pass through unchanged."""
    try:
        arch = for_config(model.config)
    except UnsupportedModelError:
        return tensors
    unfuse(model, arch)
    return {arch.model_name(k): t for k, t in tensors.items()}


def _meta_model(config, tensors: dict[str, torch.Tensor], act_dtype: torch.dtype):
    """The model a quantized checkpoint's config describes, built without its quantization_config
    and with its parameters on meta → (model, that plain config, the tensors named as the model
    names them)."""
    plain = copy.deepcopy(config)
    del plain.quantization_config
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(plain, dtype=act_dtype)
    return model, plain, _as_our_model(model, tensors)


def _fill(model: nn.Module, plain, tensors: Iterable[tuple[str, torch.Tensor]], act_dtype: torch.dtype,
          path: Path) -> None:
    """Put the checkpoint's remaining (name, tensor) pairs in place of the model's meta parameters,
    tie the embeddings if the config says so, and refuse a model left with any parameter unread."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, t in tensors:
        if name in params:
            _set_parameter(model, name, params[name], t.to(act_dtype))
    if getattr(model.config, "tie_word_embeddings", False) or getattr(plain, "tie_word_embeddings", False):
        model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise CheckpointError(f"{path}: tensor(s) missing from the checkpoint: {', '.join(still_meta[:5])}"
                              + (" ..." if len(still_meta) > 5 else ""))


def _tokenizer(path: Path):
    """The checkpoint's tokenizer, or None where it has none transformers can read."""
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        return None


def default_backend(device: torch.device, bits: int) -> str:
    if device.type == "cuda":
        return "triton" if bits in (2, 4, 8) else "torch"
    return "cpu" if bits == 4 else "dense"


def resolve_dtype(dtype: str | torch.dtype, device: torch.device, backend: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        return getattr(torch, dtype)
    if device.type == "cuda":
        return torch.float16
    if backend == "cpu":  # bf16 activations for the int4 kernel only where the CPU has native bf16
        return cpu.fast_dtype()
    return torch.float32


def prepare_model(model: nn.Module, backend: str, act_dtype: torch.dtype, dev: torch.device) -> None:
    """Make a model whose linears are QuantLinear ready to run: each layer's backend, shared
    permutations and buffers, fused siblings (AVX2 kernel), the float16 head on CPU, and on CPUs
    decoding in fp32 with the AVX2 kernels, RMSNorms in one C call."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    for m in layers:
        m.prepare(backend, act_dtype)
    share_permutations(layers)
    fuse_siblings(model)
    if backend == "cpu" and dev.type == "cpu":
        half_head_for_cpu(model)
        if act_dtype == torch.float32 and any(isinstance(m.backend, Rows64Backend) for m in layers):
            replace_rms_norms(model)
    model.eval()


def load(path: str | Path, device: str = "auto", backend: str = "auto", dtype: str | torch.dtype = "auto"):
    """Load a GPTQ checkpoint directory → (model, tokenizer or None)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"'{path}' is not a model directory (no config.json)")
    config = AutoConfig.from_pretrained(path)
    qc = quantization_config(config)
    fmt = qc["checkpoint_format"]
    dev = resolve_device(device)
    tensors = read_tensors(path)
    if "compressed_tensors" in qc:
        prefixes = sorted({k[: -len(".weight_packed")] for k in tensors if k.endswith(".weight_packed")})
        schemes = {p: scheme_of(qc["compressed_tensors"], p) for p in prefixes}
        settings = {p: None if s is None else (s["bits"], s["group_size"]) for p, s in schemes.items()}
        tensors = as_gptq(tensors, qc["compressed_tensors"])
    else:
        prefixes = sorted({k[: -len(".qweight")] for k in tensors if k.endswith(".qweight")})
        settings = {p: module_settings(qc, p) for p in prefixes}
    bits_seen = {s[0] for s in settings.values() if s is not None}
    # a mix runs each layer on what serves it (the CPU kernel falls back to dense for non-4-bit layers)
    bits = 4 if 4 in bits_seen else qc["bits"]
    backend = default_backend(dev, bits) if backend == "auto" else backend
    act_dtype = resolve_dtype(dtype, dev, backend)

    model, plain, tensors = _meta_model(config, tensors, act_dtype)
    # the model's names (routed experts stored fused or under another family's names are renamed here)
    renamed = sorted({k[: -len(".qweight")] for k in tensors if k.endswith(".qweight")})
    try:  # each stored module's setting under the name our model gives it (Mixtral's w1 → gate_proj)
        settings = {for_config(config).model_name(p): s for p, s in settings.items()}
    except UnsupportedModelError:
        pass
    base = (qc["bits"], qc["group_size"])
    settings = {p: settings[p] if p in settings else base if "compressed_tensors" in qc else module_settings(qc, p)
                for p in renamed}
    prefixes = renamed
    raw = config.quantization_config
    model.config.quantization_config = dict(raw) if isinstance(raw, dict) else raw.to_dict()

    if not prefixes:
        raise CheckpointError(f"{path}: no '*.qweight' tensors, though config.json says GPTQ")
    for prefix in prefixes:
        try:
            old = model.get_submodule(prefix)
        except AttributeError:
            raise CheckpointError(f"{prefix}.qweight names a module the {config.model_type} model does not have")
        in_f = in_features(old)
        out_f = old.weight.shape[1] if type(old).__name__ == "Conv1D" else old.weight.shape[0]
        t = {s: tensors.pop(f"{prefix}.{s}") for s in QUANT_SUFFIXES if f"{prefix}.{s}" in tensors}
        missing = [s for s in ("qweight", "qzeros", "scales") if s not in t]
        if missing:
            raise CheckpointError(f"{prefix}: tensor(s) {', '.join(prefix + '.' + m for m in missing)} missing")
        if settings.get(prefix) is None:
            raise CheckpointError(f"{prefix} has quantized tensors but its quantization_config leaves it unquantized")
        bits, gs = settings[prefix]
        if "g_idx" not in t:  # older checkpoints omit it when there is no act-order
            t["g_idx"] = (torch.arange(in_f) // (in_f if gs == -1 else gs)).to(torch.int32)
        if f"{prefix}.bias" in tensors:
            t["bias"] = tensors.pop(f"{prefix}.bias")
        _validate(prefix, t, in_f, out_f, bits, gs)
        q = QuantLinear(in_f, out_f, bits, gs, "bias" in t, fmt)
        q.qweight, q.qzeros = t["qweight"], t["qzeros"]
        q.scales, q.g_idx = t["scales"].to(torch.float16), t["g_idx"].to(torch.int32)
        if "bias" in t:
            q.bias = t["bias"].to(torch.float16)
        parent_name, _, child = prefix.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, q)

    _fill(model, plain, tensors.items(), act_dtype, path)
    model.to(dev)
    prepare_model(model, backend, act_dtype, dev)
    return model, _tokenizer(path)


def load_bnb(path: Path, device: str = "auto", dtype: str | torch.dtype = "auto"):
    """A bitsandbytes 4-bit checkpoint (NF4/FP4, ours or transformers') → a plain model whose
    linears hold the dequantized weights (no bitsandbytes needed), and its tokenizer."""
    config = AutoConfig.from_pretrained(path)
    dev = resolve_device(device)
    act_dtype = resolve_dtype(dtype, dev, "torch")
    model, plain, tensors = _meta_model(config, read_tensors(path), act_dtype)
    prefixes = {k[: -len(".weight.absmax")] for k in tensors if k.endswith(".weight.absmax")}

    def weights():  # one at a time, in the checkpoint's order: each 4-bit weight dequantized as it is placed
        for name, t in tensors.items():
            prefix = name.rsplit(".weight", 1)[0] if ".weight" in name else None
            if prefix in prefixes and name != f"{prefix}.weight":
                continue  # absmax, quant_map, quant_state: read with the weight
            if prefix in prefixes:
                try:
                    t = dequantize(tensors, prefix)
                except (KeyError, ValueError, StopIteration) as e:
                    raise CheckpointError(f"{prefix}: cannot read its bitsandbytes 4-bit weight ({e})") from e
            yield name, t

    _fill(model, plain, weights(), act_dtype, path)
    tokenizer = _tokenizer(path)
    return model.to(dev).eval(), tokenizer


def load_any(path: str | Path, device: str = "auto", backend: str = "auto", dtype: str = "auto"):
    """A GPTQ checkpoint through ``load``, a bitsandbytes 4-bit one through ``load_bnb``, a GGUF file
    (or a directory holding one and no config.json) through ``load_gguf``, or a plain model
    directory through transformers."""
    if (gguf := gguf_file(path)) is not None:
        dev = resolve_device(device)
        return load_gguf(gguf, dev, resolve_dtype(dtype, dev, "torch"))
    p = Path(path)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"'{path}' is not a model directory (no config.json)")
    config = AutoConfig.from_pretrained(p)
    qc = getattr(config, "quantization_config", None)
    if qc:
        method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
        if str(method).endswith("bitsandbytes"):
            return load_bnb(p, device, dtype)
        return load(p, device, backend, dtype)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev, "torch")
    model = AutoModelForCausalLM.from_pretrained(p, dtype=torch_dtype).to(dev).eval()
    return model, AutoTokenizer.from_pretrained(p)

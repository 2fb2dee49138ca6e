"""python -m gptq.inspect CHECKPOINT [--json]

What a quantized checkpoint holds and which engines serve it, for every format gptq writes: a GPTQ
or compressed-tensors directory (bits, group size, symmetry, act-order, layers, size; vLLM on GPU
and CPU, TGI, transformers, llama.cpp, each with the rule a checkpoint breaks where it is not
served), a bitsandbytes 4-bit directory, or a .gguf file (or a directory holding one). Reads only
config.json and the file headers: no weight is loaded.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from gguf import GGUFReader
from safetensors import SafetensorError

from gptq.cli import plain_warnings
from gptq.formats.compat import (
    Verdict,
    format_verdicts,
    is_moe,
    layer_shapes,
    module_setting,
    packed_shapes,
    quantized_names,
    verdicts,
)
from gptq.formats.compressed_tensors import checkpoint_verdicts, read_scheme, scheme_of
from gptq.formats.gguf.writer import ROTATION_KEY
from gptq.io.safetensors_io import CheckpointError, checked_tensor_files


def describe(ckpt: str | Path) -> dict:
    """The checkpoint's format and settings, its layers' shapes summary, and the engines' verdicts."""
    d = Path(ckpt)
    ggufs = [d] if d.suffix == ".gguf" else sorted(d.glob("*.gguf")) if d.is_dir() else []
    if ggufs:
        return _gguf(ggufs[0])
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"'{ckpt}' is not a model directory (no config.json) nor a .gguf file")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e}); download or copy the checkpoint again") from None
    qc = cfg.get("quantization_config") or {}
    method = qc.get("quant_method")
    info = {"checkpoint": str(d), "format": method,
            "safetensors_bytes": sum(f.stat().st_size for f in d.glob("*.safetensors")),
            "rotation": cfg.get("gptq_rotation")}
    try:
        if method == "gptq":
            return info | _gptq(d, qc, cfg)
        if method == "compressed-tensors":
            return info | _compressed_tensors(d, qc, cfg)
    except SafetensorError as e:
        checked_tensor_files(d)  # names the truncated or corrupt file
        raise CheckpointError(f"{d}: a safetensors file cannot be read, it is truncated or corrupt ({e})") from e
    if method == "bitsandbytes":
        return info | _bnb(qc)
    raise CheckpointError(f"'{ckpt}' is not a quantized checkpoint gptq knows (quant_method {method!r}; "
                          "gptq, compressed-tensors, bitsandbytes, or a .gguf file)")


def _engines(vs: list[Verdict]) -> list[dict]:
    return [{"engine": v.engine, "status": v.status, "reasons": list(v.reasons)} for v in vs]


def _gptq(d: Path, qc: dict, cfg: dict) -> dict:
    shapes = layer_shapes(d, qc["bits"])
    mode = qc.get("act_order") or ("dynamic" if qc.get("desc_act") else ("static" if qc.get("static_groups")
                                                                           else "none"))
    return {"bits": qc["bits"], "group_size": qc.get("group_size", -1), "sym": qc.get("sym", True),
            "desc_act": bool(qc.get("desc_act")), "act_order": mode,
            "checkpoint_format": qc.get("checkpoint_format", "gptq"), "quantized_linears": len(shapes),
            "input_sizes": sorted({k for k, _ in shapes}), "engines": _engines(verdicts(qc, shapes, is_moe(cfg)))} \
        | _mix(d, qc)


def _mix(d: Path, qc: dict) -> dict:
    """A mixed checkpoint (``dynamic`` overrides): how many linears each setting has."""
    if not qc.get("dynamic"):
        return {}
    counts: dict[str, int] = {}
    for name in quantized_names(d):
        s = module_setting(qc, name)
        key = "unquantized" if s is None else f"{s[0]}-bit g{s[1]}{'' if s[2] else ' asym'}"
        counts[key] = counts.get(key, 0) + 1
    return {"mix": dict(sorted(counts.items(), key=lambda kv: -kv[1]))}


def _compressed_tensors(d: Path, qc: dict, cfg: dict) -> dict:
    scheme = read_scheme(qc)
    shapes = packed_shapes(d)
    actorder = qc["config_groups"][next(iter(qc["config_groups"]))]["weights"].get("actorder")
    info = scheme | {"act_order": actorder or "none", "quantized_linears": len(shapes),
                     "input_sizes": sorted({w * 32 // (scheme_of(qc, n) or scheme)["bits"] for n, (_, w) in shapes.items()}),
                     "engines": _engines(checkpoint_verdicts(d, qc, is_moe(cfg)))}
    if len(qc["config_groups"]) > 1:
        counts: dict[str, int] = {}
        for name in shapes:
            s = scheme_of(qc, name)
            key = "unquantized" if s is None else f"{s['bits']}-bit g{s['group_size']}"
            counts[key] = counts.get(key, 0) + 1
        info["mix"] = dict(sorted(counts.items(), key=lambda kv: -kv[1]))
    return info


def _bnb(qc: dict) -> dict:
    kind = qc.get("bnb_4bit_quant_type", "?")
    return {"bits": 4, "quant_type": kind, "double_quant": bool(qc.get("bnb_4bit_use_double_quant")),
            "engines": _engines([
                Verdict("transformers + bitsandbytes", "serves", ()),
                Verdict("vLLM (GPU)", "serves", ("its bitsandbytes loader reads pre-quantized 4-bit checkpoints",)),
                Verdict("llama.cpp / Ollama", "refuses", ("reads GGUF files: quantize with --format gguf:TYPE",))])}


def _gguf(path: Path) -> dict:
    try:
        r = GGUFReader(path)
    except (ValueError, OSError, KeyError) as e:
        raise CheckpointError(f"{path}: not a readable GGUF file ({e})") from e
    arch = bytes(r.fields["general.architecture"].parts[-1]).decode()
    types = Counter(t.tensor_type.name.lower() for t in r.tensors)
    rot = r.fields.get(ROTATION_KEY)
    return {"checkpoint": str(path), "format": "gguf", "architecture": arch, "tensors": len(r.tensors),
            "rotation": json.loads(bytes(rot.parts[-1]).decode()) if rot is not None else None,
            "tensor_types": dict(sorted(types.items())), "bytes": path.stat().st_size,
            "engines": _engines([Verdict("llama.cpp / Ollama", "serves", ()),
                                 Verdict("vLLM / transformers", "slower",
                                         ("read GGUF by dequantizing it to dense weights",))])}


def format_description(info: dict) -> str:
    fmt = info["format"]
    if fmt == "gguf":
        head = (f"{info['checkpoint']}: GGUF, architecture {info['architecture']}, {info['tensors']} tensors "
                f"({', '.join(f'{k} x{v}' for k, v in info['tensor_types'].items())}), {info['bytes'] / 1e6:.1f} MB")
    elif fmt == "bitsandbytes":
        head = (f"{info['checkpoint']}: bitsandbytes 4-bit {info['quant_type']}"
                f"{' (double-quantized absmax)' if info['double_quant'] else ''}, "
                f"{info['safetensors_bytes'] / 1e6:.1f} MB of safetensors")
    else:
        head = (f"{info['checkpoint']}: {fmt}, {info['bits']}-bit, group {info['group_size']}, "
                f"{'symmetric' if info['sym'] else 'asymmetric'}, act-order {info['act_order']}"
                + (f" (desc_act {str(info['desc_act']).lower()}), format {info['checkpoint_format']}"
                   if fmt == "gptq" else "")
                + f"; {info['quantized_linears']} quantized linears (inputs {info['input_sizes']}), "
                f"{info['safetensors_bytes'] / 1e6:.1f} MB of safetensors")
        if info.get("mix"):
            how = "GPTQModel dynamic overrides" if fmt == "gptq" else "one config group per setting"
            head += (f"\nmixed precision ({how}; the base setting is the one above): "
                     + ", ".join(f"{k} x{v}" for k, v in info["mix"].items())
                     + ". Which kernels each setting gets: the engines below")
    vs = [Verdict(e["engine"], e["status"], tuple(e["reasons"])) for e in info["engines"]]
    return head + _rotation_line(info.get("rotation")) + "\nserved by:\n" + format_verdicts(vs)


def _rotation_line(rot: dict | None) -> str:
    if not rot:
        return ""
    parts = [f"residual stream by {rot['residual']}" if rot["residual"] else "",
             f"attention heads' values by {rot['heads']}" if rot["heads"] else ""]
    learned = rot.get("objective")
    return (f"\nrotated before solving (--rotate {rot['kind']}, seed {rot['seed']}): "
            + ", ".join(p for p in parts if p) + ("; the head untied from the embeddings" if rot["untied"] else "")
            + ("" if learned is None else f" (the readers' estimated error at {learned} of the Hadamard start's)"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gptq.inspect", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a quantized checkpoint directory (ours or another tool's) or a .gguf file")
    p.add_argument("--json", action="store_true", help="print the description as JSON")
    args = p.parse_args(argv)
    plain_warnings()
    try:
        info = describe(args.checkpoint)
    except (CheckpointError, FileNotFoundError, ValueError, OSError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(info, indent=2) if args.json else format_description(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""python -m gptq.inspect CKPT [--json]

What a GPTQ checkpoint holds (bits, group size, symmetric or not, act-order, format, layers,
size on disk) and which engines serve it: vLLM on GPU and CPU, TGI, transformers through
GPTQModel, llama.cpp. For each engine that would not, the rule the checkpoint breaks.
Reads only config.json and the safetensors headers: no weight is loaded.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def describe(ckpt: str | Path) -> dict:
    """The checkpoint's settings, its layers' shapes summary, and the engines' verdicts."""
    from gptq.formats.compat import is_moe, layer_shapes, verdicts
    from gptq.runtime.load import CheckpointError

    d = Path(ckpt)
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"'{ckpt}' is not a model directory (no config.json)")
    cfg = json.loads(cfg_path.read_text())
    qc = cfg.get("quantization_config")
    if not qc or qc.get("quant_method") != "gptq":
        raise CheckpointError(f"'{ckpt}' is not a GPTQ checkpoint (config.json has no gptq quantization_config)")
    shapes = layer_shapes(d, qc["bits"])
    size = sum(f.stat().st_size for f in d.glob("*.safetensors"))
    mode = qc.get("act_order") or ("dynamic" if qc.get("desc_act") else ("static" if qc.get("static_groups")
                                                                           else "none"))
    return {"checkpoint": str(d), "bits": qc["bits"], "group_size": qc.get("group_size", -1),
            "sym": qc.get("sym", True), "desc_act": bool(qc.get("desc_act")), "act_order": mode,
            "checkpoint_format": qc.get("checkpoint_format", "gptq"), "quantized_linears": len(shapes),
            "input_sizes": sorted({k for k, _ in shapes}), "safetensors_bytes": size,
            "engines": [{"engine": v.engine, "status": v.status, "reasons": list(v.reasons)}
                        for v in verdicts(qc, shapes, is_moe(cfg))]}


def format_description(info: dict) -> str:
    from gptq.formats.compat import Verdict, format_verdicts

    head = (f"{info['checkpoint']}: {info['bits']}-bit, group {info['group_size']}, "
            f"{'symmetric' if info['sym'] else 'asymmetric'}, act-order {info['act_order']} "
            f"(desc_act {str(info['desc_act']).lower()}), format {info['checkpoint_format']}; "
            f"{info['quantized_linears']} quantized linears (inputs {info['input_sizes']}), "
            f"{info['safetensors_bytes'] / 1e6:.1f} MB of safetensors")
    vs = [Verdict(e["engine"], e["status"], tuple(e["reasons"])) for e in info["engines"]]
    return head + "\nserved by:\n" + format_verdicts(vs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gptq.inspect", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a GPTQ checkpoint directory (ours or another tool's)")
    p.add_argument("--json", action="store_true", help="print the description as JSON")
    args = p.parse_args(argv)
    from gptq.runtime.load import CheckpointError

    try:
        info = describe(args.checkpoint)
    except (CheckpointError, FileNotFoundError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(info, indent=2) if args.json else format_description(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())

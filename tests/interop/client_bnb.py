"""Run inside the bitsandbytes venv: load a bitsandbytes 4-bit checkpoint with transformers
(``from_pretrained(DIR, device_map="cpu")``), print its perplexity on WINDOWS and the weight that
bitsandbytes itself dequantizes for LAYER, as one JSON line (the weight saved beside it as a file).

    python client_bnb.py CKPT WINDOWS LAYER OUT_WEIGHT [nf4|fp4|nf4+dq|fp4+dq]
"""

import json
import sys

import torch


def main(ckpt: str, windows_path: str, layer: str, out_weight: str, own: str = "") -> None:
    """With ``own`` = nf4|fp4 (+dq: double quantization), CKPT is the unquantized model and bitsandbytes
    quantizes it itself."""
    import bitsandbytes.functional as F
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    torch.set_num_threads(2)
    kw = {}
    if own:
        kind, _, dq = own.partition("+")
        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind,
                                                       bnb_4bit_use_double_quant=dq == "dq",
                                                       bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(ckpt, device_map="cpu", **kw)
    lin = model.get_submodule(layer)
    import copy

    state = copy.copy(lin.weight.quant_state)
    state.dtype = torch.float32  # bitsandbytes' own product code[q] * absmax, before any rounding
    w = F.dequantize_4bit(lin.weight.data, state)
    torch.save(w, out_weight)
    windows = torch.load(windows_path)
    nll, count = 0.0, 0
    with torch.no_grad():
        for x in windows:
            logits = model(input_ids=x[None]).logits.float()
            nll += float(torch.nn.functional.cross_entropy(logits[0, :-1], x[1:], reduction="sum"))
            count += x.numel() - 1
    n4 = sum(1 for m in model.modules() if type(m).__name__ == "Linear4bit")
    nested = state.nested and torch.equal(state.state2.code.cpu(), F.create_dynamic_map())
    print(json.dumps({"ppl": float(torch.exp(torch.tensor(nll / count))), "linear4bit": n4,
                      "compute_dtype": str(lin.compute_dtype), "nested_with_bnb_dynamic_map": bool(nested)}))


if __name__ == "__main__":
    main(*sys.argv[1:6])

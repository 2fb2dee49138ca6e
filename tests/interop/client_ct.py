"""Run inside the compressed-tensors venv: load a compressed-tensors checkpoint with transformers
(``from_pretrained``; the ``compressed-tensors`` package decompresses it), print its perplexity on
WINDOWS and the weight it decompressed for LAYER (saved to OUT_WEIGHT) as one JSON line.

    python client_ct.py CKPT WINDOWS LAYER OUT_WEIGHT
"""

import json
import sys

import torch


def main(ckpt: str, windows_path: str, layer: str, out_weight: str) -> None:
    import compressed_tensors
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, device_map="cpu")
    windows = torch.load(windows_path)
    nll, count = 0.0, 0
    with torch.no_grad():
        for x in windows:  # the first forward decompresses every packed linear
            logits = model(input_ids=x[None]).logits.float()
            nll += float(torch.nn.functional.cross_entropy(logits[0, :-1], x[1:], reduction="sum"))
            count += x.numel() - 1
    torch.save(model.get_submodule(layer).weight.detach().float(), out_weight)
    print(json.dumps({"ppl": float(torch.exp(torch.tensor(nll / count))),
                      "compressed_tensors": compressed_tensors.__version__}))


if __name__ == "__main__":
    main(*sys.argv[1:5])

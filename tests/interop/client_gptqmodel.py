"""Run inside the GPTQModel venv: load a GPTQ checkpoint with GPTQModel, print its perplexity
on the token windows in WINDOWS (a torch file, [n, seqlen] ids) as one JSON line.

    python client_gptqmodel.py CKPT WINDOWS [BACKEND]

BACKEND: GPTQModel's kernel (e.g. torch); default its automatic choice.
"""

import json
import sys

import torch


def main(ckpt: str, windows_path: str, backend: str = "auto") -> None:
    from gptqmodel import BACKEND, GPTQModel

    torch.set_num_threads(2)
    # GPTQModel's torch kernel takes half-precision activations only (bfloat16 then)
    dtype = torch.float32 if backend == "auto" else torch.bfloat16
    model = GPTQModel.load(ckpt, device="cpu", dtype=dtype, backend=BACKEND(backend))
    windows = torch.load(windows_path)
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            ids = w[None]
            logits = model(input_ids=ids).logits.float()
            nll += float(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum"))
            count += ids.shape[1] - 1
    kernels = sorted({type(m).__name__ for m in model.model.modules() if hasattr(m, "qweight")})
    print(json.dumps({"ppl": float(torch.exp(torch.tensor(nll / count))), "kernels": kernels}))


if __name__ == "__main__":
    main(*sys.argv[1:4])

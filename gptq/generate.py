"""python -m gptq.generate CKPT --prompt "..." [--max-new-tokens 64]

Greedy (or sampled) generation from a GPTQ checkpoint or a plain model directory. Prints the
text, then the figures LitGPT users know:

    Time for inference: X sec total, Y tokens/sec
    Memory used: Z GB          (resident model weights: packed tensors, kernels' copies, embeddings)
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from gptq.cli import plain_warnings
from gptq.runtime.qlinear import QuantLinear


def resident_bytes(model: torch.nn.Module) -> int:
    """Bytes held by the model's parameters, buffers and kernel-prepared copies (each storage once)."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            key = (t.untyped_storage().data_ptr(), t.device)
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()

    for t in list(model.parameters()) + list(model.buffers()):
        add(t)
    for m in model.modules():
        if isinstance(m, QuantLinear):
            for v in m.backend.tensors():
                add(v)
    return total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gptq.generate", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="GPTQ checkpoint or plain model directory")
    p.add_argument("--prompt", default="The capital of France is", help="prompt text (default: %(default)r)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (default: %(default)s)")
    p.add_argument("--backend", default="auto", help="auto, torch, cpu, dense, triton (default: %(default)s)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="activation dtype (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1:
        p.error(f"--max-new-tokens {args.max_new_tokens} must be at least 1")
    # imported here, after the arguments are checked: the loaders pull in transformers (seconds), which
    # --help and a bad argument need not wait for
    from safetensors import SafetensorError

    from gptq.io.safetensors_io import check_safetensors
    from gptq.runtime.load import CheckpointError, load_any

    plain_warnings()
    try:
        check_safetensors(args.model)  # a missing, truncated or corrupt file is named before loading
        model, tokenizer = load_any(args.model, device=args.device, backend=args.backend, dtype=args.dtype)
    except (CheckpointError, FileNotFoundError, ValueError, OSError, SafetensorError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if tokenizer is None:
        print(f"error: {args.model} has no tokenizer files", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    device = model.get_input_embeddings().weight.device
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids.to(device)
    kw = dict(max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens,
              pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    kw |= {"do_sample": True, "temperature": args.temperature} if args.temperature > 0 else {"do_sample": False}
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=kw["pad_token_id"])  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model.generate(ids, **kw)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    new = out.shape[1] - ids.shape[1]
    print(tokenizer.decode(out[0], skip_special_tokens=True))
    print(f"Time for inference: {dt:.2f} sec total, {new / dt:.2f} tokens/sec", file=sys.stdout)
    print(f"Memory used: {resident_bytes(model) / 1e9:.2f} GB", file=sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())

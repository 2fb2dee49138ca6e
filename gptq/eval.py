"""python -m gptq.eval MODEL_OR_CKPT --dataset wikitext2|ptb|c4|PATH [--seqlen 2048]

Perplexity with the GPTQ paper's protocol: the evaluation split joined with "\\n\\n", tokenized
once, cut into non-overlapping windows, exp(mean next-token NLL). Works on unquantized model
directories and on GPTQ checkpoints, so the two can be compared.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, progress: bool = False, batch_size: int = 1) -> float:
    """exp(mean NLL) over [n, seqlen] token windows (the first token of each window is not scored)."""
    device = model.get_input_embeddings().weight.device
    nll, count = 0.0, 0
    for batch in tqdm(windows.split(batch_size), desc="perplexity", unit="window", disable=not progress):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()  # [b, T, vocab]
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        nll += float(loss)
        count += batch[:, 1:].numel()
    return float(torch.exp(torch.tensor(nll / count)))


def eval_windows(tokenizer, dataset: str, seqlen: int, max_windows: int | None) -> torch.Tensor:
    from calib import eval_tokens, load_documents

    docs, _ = load_documents(dataset, "eval")
    return eval_tokens(docs, tokenizer, seqlen, max_windows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gptq.eval", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a model directory, quantized (GPTQ) or not")
    p.add_argument("--dataset", default="wikitext2",
                   help="wikitext2, ptb, c4 (test/validation splits via `datasets`) or a local text file (default: %(default)s)")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per window (default: %(default)s)")
    p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows (default: all)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (default: %(default)s)")
    p.add_argument("--backend", default="auto", help="kernel backend for GPTQ checkpoints: auto, torch, cpu, triton "
                   "(default: %(default)s)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="activation dtype; auto = float32 on CPU, float16 on CUDA (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    args = p.parse_args(argv)
    if args.seqlen < 2:
        p.error(f"--seqlen {args.seqlen} must be at least 2")
    if args.max_windows is not None and args.max_windows < 1:
        p.error(f"--max-windows {args.max_windows} must be at least 1")
    from calib import CalibrationDataError
    from gptq.runtime.load import CheckpointError, load_any

    try:
        model, tokenizer = load_any(args.model, device=args.device, backend=args.backend, dtype=args.dtype)
        windows = eval_windows(tokenizer, args.dataset, args.seqlen, args.max_windows)
        t0 = time.perf_counter()
        ppl = perplexity(model, windows, progress=not args.json)
    except (CalibrationDataError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = {"model": args.model, "dataset": args.dataset, "seqlen": args.seqlen, "windows": len(windows),
              "perplexity": round(ppl, 4), "seconds": round(time.perf_counter() - t0, 2)}
    print(json.dumps(result) if args.json else
          f"{args.dataset} perplexity {ppl:.4f} ({len(windows)} windows x {args.seqlen} tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

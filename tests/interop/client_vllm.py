"""Run inside the vLLM (CPU build) venv: build ``LLM(CKPT)``, which validates the quantization
config and loads every weight; then, where the CPU GPTQ kernel exists, score the windows'
tokens (prompt_logprobs → perplexity) and continue the first window greedily. One JSON line.

    python client_vllm.py CKPT WINDOWS
"""

import json
import sys


def main(ckpt: str, windows_path: str) -> None:
    import torch
    from vllm import LLM, SamplingParams

    result = {}
    try:
        # on CPU, gpu_memory_utilization is the share of host memory reserved for the KV cache
        llm = LLM(model=ckpt, dtype="bfloat16", max_model_len=2304, enforce_eager=True, gpu_memory_utilization=0.25)
    except Exception as e:  # noqa: BLE001 - the message is the result
        text = f"{type(e).__name__}: {e}"
        result["loaded"] = False
        result["error"] = text[-2000:]
        result["kernel_missing"] = "cpu_gemm_wna16" in text or "wna16" in text
        print(json.dumps(result))
        return
    result["loaded"] = True
    windows = torch.load(windows_path)
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0)
    nll, count = 0.0, 0
    for w in windows:
        ids = w.tolist()
        out = llm.generate({"prompt_token_ids": ids}, params, use_tqdm=False)[0]
        for tok, lp in zip(ids[1:], out.prompt_logprobs[1:]):
            nll -= lp[tok].logprob
            count += 1
    result["ppl"] = float(torch.exp(torch.tensor(nll / count)))
    greedy = llm.generate({"prompt_token_ids": windows[0][:64].tolist()},
                          SamplingParams(max_tokens=16, temperature=0), use_tqdm=False)[0]
    result["greedy"] = list(greedy.outputs[0].token_ids)
    print(json.dumps(result))


if __name__ == "__main__":  # vLLM spawns its workers: build LLM only under this guard
    main(*sys.argv[1:3])

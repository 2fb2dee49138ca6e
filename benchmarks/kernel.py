"""CUDA only: the Triton dequant-matmul against fp16 ``torch.matmul`` on Llama-7B/70B layer shapes at
batch 1/16/64/256, timed eagerly and in a CUDA graph; ratio and achieved GB/s. Without a GPU it
says so and exits 0."""

from __future__ import annotations

from pathlib import Path

import torch

from benchmarks.common import write
from gptq.core.pack import pack_qweight, pack_qzeros

LLAMA_SHAPES = {  # (K, N) of the linears in one block
    "7B qkv/o": (4096, 4096), "7B up/gate": (4096, 11008), "7B down": (11008, 4096),
    "70B q/o": (8192, 8192), "70B up/gate": (8192, 28672), "70B down": (28672, 8192),
}


def kernel(out: Path) -> dict | None:
    if not torch.cuda.is_available():
        print("kernel benchmark: no CUDA device here, nothing to time (the Triton kernel is tested on CPU "
              "under TRITON_INTERPRET=1; run this on a GPU machine for figures)")
        return None
    # imported here, once a GPU is known to be present: Triton is a dependency on Linux only
    from gptq.runtime.kernels.triton_dequant import dequant_matmul

    dev = torch.device("cuda")
    rows = []
    for label, (K, N) in LLAMA_SHAPES.items():
        codes = torch.randint(0, 16, (N, K), dtype=torch.int32)
        qw = pack_qweight(codes, 4).to(dev)
        qz = pack_qzeros(torch.full((K // 128, N), 8, dtype=torch.int32), 4).to(dev)
        sc = (torch.rand(K // 128, N) * 0.01).half().to(dev)
        W = torch.randn(K, N, dtype=torch.float16, device=dev)
        for M in (1, 16, 64, 256):
            x = torch.randn(M, K, dtype=torch.float16, device=dev)
            t_q = _cuda_time(lambda: dequant_matmul(x, qw, qz, sc, 128, 4))
            t_f = _cuda_time(lambda: x @ W)
            g_q = _cuda_graph_time(lambda: dequant_matmul(x, qw, qz, sc, 128, 4))
            g_f = _cuda_graph_time(lambda: x @ W)
            gbytes = (qw.numel() * 4 + sc.numel() * 2 + qz.numel() * 4 + x.numel() * 2 + M * N * 2) / 1e9
            rows.append({"shape": label, "K": K, "N": N, "batch": M, "triton_us": round(t_q * 1e6, 1),
                         "fp16_us": round(t_f * 1e6, 1), "speedup": round(t_f / t_q, 2),
                         "graph_triton_us": round(g_q * 1e6, 1), "graph_fp16_us": round(g_f * 1e6, 1),
                         "graph_speedup": round(g_f / g_q, 2), "triton_GBps": round(gbytes / g_q, 1)})
            print(rows[-1])
    result = {"device": torch.cuda.get_device_name(), "rows": rows}
    write(out, "kernel", result)
    return result


def _cuda_time(fn, iters: int = 50) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def _cuda_graph_time(fn, iters: int = 50) -> float:
    """GPU time per call with the launches recorded once in a CUDA graph (as decoding engines run
    them), so the host's launch overhead is not what is measured."""
    for _ in range(5):  # autotuning and allocation happen here, outside the graph
        fn()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters

"""The CPU matmul paths side by side, per shape and row count, on this CPU (the int4 kernel,
dequantize-then-matmul, dense fp32/bf16, the float16 head): what the cpu backend's choices
(activation dtype, kernel vs dequantize-then-matmul, the fp16 head) rest on."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import write
from gptq.core.pack import pack_qweight, pack_qzeros
from gptq.runtime.cpu import cpu_info, fast_dtype
from gptq.runtime.cpu_backends import DEQUANT_MIN_ROWS, ROWS64_MAX_ROWS
from gptq.runtime.head import HEAD_DENSE_ROWS, HalfHead
from gptq.runtime.kernels import cpu_int4
from gptq.runtime.qlinear import QuantLinear
from gptq.runtime.shared import SharedBuffers

CPU_KERNEL_SHAPES = {"SmolLM2 up/gate": (576, 1536), "SmolLM2 down": (1536, 576), "1.3B up/gate": (2048, 5632)}
CPU_KERNEL_ROWS = (1, 4, 8, 16, 256, 2048)


def _median_ms(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times) * 1e3, 3)


def cpu_kernel(out: Path) -> dict:
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    act = fast_dtype()
    rows = []
    avx2 = cpu_int4.available()
    for label, (K, N) in CPU_KERNEL_SHAPES.items():
        codes = torch.randint(0, 16, (N, K), generator=g, dtype=torch.int32)
        scales = (torch.rand(K // 64, N, generator=g) * 0.01).half()
        layers = {}
        for kernel in ("torch", "avx2") if avx2 else ("torch",):
            layer = QuantLinear(K, N, 4, 64, False)
            layer.qweight = pack_qweight(codes, 4)
            layer.qzeros = pack_qzeros(torch.full((K // 64, N), 8, dtype=torch.int32), 4)
            layer.scales, layer.g_idx = scales, (torch.arange(K) // 64).to(torch.int32)
            assert layer.prepare("cpu", act, cpu_kernel=kernel) == "cpu"
            layer.backend.buffers = SharedBuffers()
            layers[kernel] = layer
        st = layers["torch"].backend
        W = torch.randn(N, K, generator=g)
        for M in CPU_KERNEL_ROWS:
            x = torch.randn(M, K, generator=g)
            xb, Wb = x.bfloat16(), W.bfloat16()
            row = {"shape": label, "K": K, "N": N, "rows": M,
                   "int4_kernel_bf16_ms": _median_ms(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(
                       xb, st.packed, st.sub, st.scale_offset)),
                   "int4_dequant_fp32_ms": _median_ms(lambda: x @ st.dequantized_t(torch.float32)),
                   # bf16 dequantization only where bf16 is the activation dtype (minutes per row elsewhere)
                   "int4_dequant_bf16_ms": (_median_ms(lambda: xb @ st.dequantized_t(torch.bfloat16))
                                            if act == torch.bfloat16 else None),
                   "dense_fp32_ms": _median_ms(lambda: x @ W.T), "dense_bf16_ms": _median_ms(lambda: xb @ Wb.T)}
            if avx2:  # our kernel and our exact dequantization + fp32 matmul, whichever CPU this is
                st64 = layers["avx2"].backend
                row["avx2_kernel_ms"] = _median_ms(lambda: st64.matmul(x))
                row["avx2_dequant_fp32_ms"] = _median_ms(lambda: st64.product(layers["avx2"], x, x))
            chosen = layers["avx2" if avx2 and act == torch.float32 else "torch"]
            xa = x.to(act)
            row["backend_ms"] = _median_ms(lambda: chosen(xa))
            ours = chosen is layers.get("avx2")
            if M >= (ROWS64_MAX_ROWS if ours else DEQUANT_MIN_ROWS):
                row["backend_path"] = "dequantize + dense"
            else:
                row["backend_path"] = "avx2 kernel" if ours else "int4 kernel"
            rows.append(row)
            print(row)
    V, K = 49152, 576
    head_w = torch.randn(V, K, generator=g) * 0.02
    head = HalfHead(torch.nn.Parameter(head_w.half(), requires_grad=False))
    for M in (1, 16, 2048):
        x = torch.randn(M, K, generator=g)
        row = {"shape": f"head {V}x{K}", "rows": M}
        for dt in (torch.float32, torch.bfloat16, torch.float16):
            w, xd = head_w.to(dt), x.to(dt)
            row[f"dense_{str(dt)[6:]}_ms"] = _median_ms(lambda: xd @ w.T, 3)
        xa = x.to(act)
        row["backend_ms"] = _median_ms(lambda: head(xa), 3)
        short = "fp16 weights × fp32 (AVX2)" if head.f16_matmul is not None else "float16"
        row["backend_path"] = short if M < HEAD_DENSE_ROWS else f"float16 → {str(act)[6:]} buffer"
        rows.append(row)
        print(row)
    result = {"cpu": cpu_info(), "activation_dtype": str(act)[6:], "dequant_min_rows": DEQUANT_MIN_ROWS,
              "avx2_kernel_max_rows": ROWS64_MAX_ROWS - 1,
              "setup": "2 threads, median of 5 (head: 3); int4 g64 symmetric", "rows": rows}
    write(out, "cpu_kernel", result)
    return result

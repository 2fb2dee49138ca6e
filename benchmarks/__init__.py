"""Benchmarks of the gptq library: quality, speed and memory figures, printed and written as JSON.

Run from the repository root: ``python -m benchmarks NAME [--out bench-results] [options]``, one
module per benchmark; each writes ``NAME.json`` (``-`` as ``_``) under ``--out``.

quality  SmolLM2-135M-Instruct, 4-bit g64 symmetric, 32 × 512-token calibration windows from
         WikiText-2 valid; perplexity on the first 8 × 2048-token windows of WikiText-2 test.
         fp32 / round-to-nearest / our defaults; quantize wall time and peak RSS (subprocess).
decode   CPU batch-1 greedy decoding (64 new tokens, 2 threads): fp32, bf16 and our packed
         4-bit checkpoint; tokens/s (median of 3), resident weight memory, and seconds per
         2048-token perplexity window (long prompts).
decode-synthetic  the same on a TinyLlama-1.1B-shaped model with random weights (speed only), where
         the linears, not the framework's per-token overhead, set the pace.
kernel   CUDA only: Triton dequant-matmul vs fp16 torch.matmul on Llama-7B/70B layer shapes at
         batch 1/16/64/256, ratio and achieved GB/s. Without a GPU it says so and exits 0.
cpu-kernel the CPU matmul paths (int4 kernel, dequantize-then-matmul, dense fp32/bf16, the head)
         per shape and row count, with the CPU's capability: what the cpu backend's choices rest on.
ablation the quality benchmark with act-order, MSE clipping, true-sequential or full-precision
         targets switched off.
act-order the quality benchmark under each --act-order mode (none, static, group-aware, dynamic).
fp-target the quality benchmark under --fp-target 0 (plain GPTQ), 0.1, 0.25 (default), 0.5, 1.
codebooks GPTQ on bitsandbytes' NF4/FP4 grids vs plain rounding to them (in memory).
scale    streaming quantization of synthetic Llama-shaped models of growing depth and width
         (sharded safetensors on disk): peak RSS and seconds per block (``--13b`` adds 13B-shaped).
spill    one synthetic model and a larger calibration set, activations in memory vs spilled to
         disk (--max-memory 0): peak RSS, seconds, identical checkpoints.
moe      streaming quantization of a synthetic Qwen3-MoE-shaped model (64 experts per layer):
         seconds per block and peak RSS, same-shape experts solved as a batch vs one by one.
distributed the streaming CLI as one process and under torchrun with 2 ranks (1 thread each):
         seconds per block, identical checkpoints.
rotation the quality benchmark rotated (--rotate hadamard) against not, at 3, 2 and 4 bits.
rotation-learned the error the solver would leave in each group of linears under no rotation, Hadamard
         and --rotate learned (3 bits): the diagnostic behind the learned rotation's objective.
rotation-split which linears carry the low-bit loss (3 bits): every linear quantized, then the readers of
         the residual stream (q/k/v, gate/up) or its writers (o, down) taken from an 8-bit checkpoint.
mix      mixed precision: uniform 3g64 and 4g64, then --max-size at the 3-bit size plus half the
         difference for several candidate sets / estimates; share of the 3→4-bit gap recovered,
         and the greedy allocation against the exact knapsack on the run's own estimates.
mix-estimates which --sensitivity estimate predicts a unit's end-to-end KL (each unit alone GPTQ-solved
         at 3-bit g64 in the otherwise full-precision model): rank and log-log correlations.
mix-curve size against quality from 3 to 8 bits per weight, uniform and mixed: a table and an SVG.
notebook executes notebooks/walkthrough.ipynb in place.
all      quality, decode, decode-synthetic, kernel, cpu-kernel.

The speed benchmarks (decode, decode-synthetic, cpu-kernel, codebooks, moe, distributed) record
the CPU they ran on (torch's capability, /proc/cpuinfo flags, measured fp32/bf16 GFLOPS); quality
records the quantize report's compute settings.
"""

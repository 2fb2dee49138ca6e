"""On a CUDA GPU only (skipped elsewhere, e.g. in CI): streaming quantization with the block on
the GPU, activations spilled to disk and resumed, and the Triton backend serving the result."""

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_streaming_on_the_gpu_spilled_and_resumed(tmp_path, tiny_tokenizer_dir):
    from test_stream import all_tensors, sharded_tiny

    from gptq import QuantConfig, load
    from gptq.pipeline.streaming import quantize_streaming

    d = sharded_tiny(tmp_path, tiny_tokenizer_dir)
    windows = torch.randint(0, 256, (6, 32), generator=torch.Generator().manual_seed(0))
    cfg = QuantConfig(bits=4, group_size=32)
    gpu, rep_gpu, _ = quantize_streaming(d, tmp_path / "gpu", cfg, windows, torch.float32, device="cuda",
                                         progress=False)
    spilled, _, _ = quantize_streaming(d, tmp_path / "spilled", cfg, windows, torch.float32, device="cuda",
                                       progress=False, max_memory=0)
    cpu, rep_cpu, _ = quantize_streaming(d, tmp_path / "cpu", cfg, windows, torch.float32, device="cpu",
                                         progress=False)
    a, b = all_tensors(gpu), all_tensors(spilled)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)  # spilling changes nothing
    for r, c in zip(rep_gpu, rep_cpu):  # GPU and CPU arithmetic differ in rounding only
        assert r["name"] == c["name"] and abs(r["loss"] - c["loss"]) <= 0.05 * c["loss"] + 1e-7
    model, _ = load(gpu, device="cuda", backend="triton", dtype="float16")
    ref, _ = load(gpu, device="cuda", backend="torch", dtype="float16")
    ids = windows[:2].cuda()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits.float(), ref(ids).logits.float(), rtol=0, atol=5e-2)

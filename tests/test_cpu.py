"""The CPU compute-dtype choice: measured once, followed by calibration and inference."""

import pytest
import torch

from gptq.runtime import cpu


@pytest.mark.parametrize("fp32,bf16,expected", [(56.0, 8.6, torch.float32), (60.0, 400.0, torch.bfloat16),
                                                (50.0, 50.0, torch.bfloat16)])
def test_dtype_follows_the_measured_speeds(monkeypatch, fp32, bf16, expected):
    from transformers import LlamaConfig

    from gptq.quantize import calib_dtype
    from gptq.runtime.load import resolve_dtype

    monkeypatch.setattr(cpu, "probe", lambda: {"fp32_gflops": fp32, "bf16_gflops": bf16})
    assert cpu.fast_dtype() == expected
    config = LlamaConfig(dtype="bfloat16")
    assert calib_dtype(config, "auto", "cpu") == expected
    assert calib_dtype(config, "float32", "cpu") == torch.float32  # --dtype still overrides
    assert calib_dtype(LlamaConfig(dtype="float16"), "auto", "cpu") == torch.float32  # fp16 is slow on CPUs
    assert calib_dtype(LlamaConfig(dtype="float32"), "auto", "cpu") == torch.float32
    assert resolve_dtype("auto", torch.device("cpu"), "cpu") == expected
    assert resolve_dtype("auto", torch.device("cpu"), "torch") == torch.float32


def test_probe_and_info_describe_this_cpu():
    info = cpu.cpu_info()
    assert info["capability"] == torch.backends.cpu.get_cpu_capability()
    assert info["fp32_gflops"] > 0 and info["bf16_gflops"] > 0
    assert info["fast_dtype"] in ("float32", "bfloat16")
    assert cpu.probe() is cpu.probe()  # measured once per process

"""The CPU compute-dtype choice: from what the CPU is (its flags), never from a timing; followed by
calibration and inference."""

import os
import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig

from gptq.quantize import calib_dtype
from gptq.runtime import cpu
from gptq.runtime.load import resolve_dtype


@pytest.mark.parametrize("flags,expected", [(["avx2", "fma", "f16c"], torch.float32),
                                            (["avx2", "avx512f", "avx512_bf16"], torch.bfloat16),
                                            (["avx2", "amx_bf16"], torch.bfloat16), ([], torch.float32),
                                            (["bf16"], torch.bfloat16)])  # Arm's BF16 extension
@pytest.mark.parametrize("fp32,bf16", [(116.9, 16.7), (8.6, 33.6)])  # a loaded machine's timings, both ways
def test_dtype_follows_the_flags_not_the_timings(monkeypatch, flags, expected, fp32, bf16):
    monkeypatch.delenv("GPTQ_CPU_DTYPE", raising=False)
    monkeypatch.setattr(cpu, "cpu_flags", lambda: flags)
    monkeypatch.setattr(cpu, "probe", lambda: {"fp32_gflops": fp32, "bf16_gflops": bf16})
    assert cpu.fast_dtype() == expected
    config = LlamaConfig(dtype="bfloat16")
    assert calib_dtype(config, "auto", "cpu") == expected
    assert calib_dtype(config, "float32", "cpu") == torch.float32  # --dtype still overrides
    assert calib_dtype(LlamaConfig(dtype="float16"), "auto", "cpu") == torch.float32  # fp16 is slow on CPUs
    assert calib_dtype(LlamaConfig(dtype="float32"), "auto", "cpu") == torch.float32
    assert resolve_dtype("auto", torch.device("cpu"), "cpu") == expected
    assert resolve_dtype("auto", torch.device("cpu"), "torch") == torch.float32
    assert cpu.dtype_choice()[1].startswith("native") is (expected == torch.bfloat16)


def test_environment_override(monkeypatch):
    monkeypatch.setattr(cpu, "cpu_flags", lambda: ["avx512_bf16"])
    monkeypatch.setenv("GPTQ_CPU_DTYPE", "float32")
    assert cpu.dtype_choice() == (torch.float32, "GPTQ_CPU_DTYPE=float32")
    monkeypatch.setenv("GPTQ_CPU_DTYPE", "half")
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        cpu.fast_dtype()


def test_probe_and_info_describe_this_cpu():
    info = cpu.cpu_info()
    assert info["capability"] == torch.backends.cpu.get_cpu_capability()
    assert info["fp32_gflops"] > 0 and info["bf16_gflops"] > 0
    assert info["fast_dtype"] in ("float32", "bfloat16") and info["fast_dtype_reason"]
    assert cpu.probe() is cpu.probe()  # measured once per process


@pytest.mark.parametrize("user, expected", [({}, ("2000", None)), ({"GOMP_SPINCOUNT": "50"}, ("50", None)),
                                            ({"OMP_WAIT_POLICY": "ACTIVE"}, (None, "ACTIVE"))])
def test_importing_gptq_sets_a_short_openmp_spin_unless_the_user_set_one(user, expected):
    """libgomp's threads spin 2,000 times, not 300,000, before they sleep (a fair share on a busy
    machine, docs/results.md); set before torch loads libgomp, never over the user's own setting."""
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")} | user
    code = ("import gptq, os, sys; assert 'torch' in sys.modules; "
            "print(os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OMP_WAIT_POLICY'))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [str(v) for v in expected]


MALLOC_PROBE = """
import ctypes, sys
import gptq
libc = ctypes.CDLL("libc.so.6")
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                 "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 4 << 20
libc.free(libc.malloc(size))  # glibc's default raises its mmap threshold to 4 MiB here
before = libc.mallinfo2().hblkhd
p = libc.malloc(size)
print(libc.mallinfo2().hblkhd - before >= size)
libc.free(p)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
                    reason="glibc's malloc only")
@pytest.mark.parametrize("user_setting", [None, "GLIBC_TUNABLES", "MALLOC_MMAP_THRESHOLD_"])
def test_freed_large_blocks_go_back_to_the_system_unless_the_user_set_malloc(user_setting):
    """Importing gptq fixes glibc's mmap threshold at 1 MiB: a 4 MiB block allocated again after one was
    freed is still mapped (so freeing it returns it), where glibc's rising threshold would have put it
    in the heap. A user's own malloc settings are left alone (and glibc's default then shows)."""
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "MALLOC_MMAP_THRESHOLD_")}
    if user_setting == "GLIBC_TUNABLES":
        env[user_setting] = ""
    elif user_setting:
        env[user_setting] = str(64 << 20)  # larger than the block: the heap
    out = subprocess.run([sys.executable, "-c", MALLOC_PROBE], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [str(user_setting is None)]

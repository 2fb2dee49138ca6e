"""llama.cpp runs our GGUF files (``make interop``; built by ``make interop-setup`` from the full
llama.cpp source in llama-cpp-python 0.3.36's sdist).

For each file type: SmolLM2 converted to f16 by llama.cpp's convert_hf_to_gguf.py, llama.cpp's own
quantization of it without and with an importance matrix (llama-imatrix on the same 32 x 512
WikiText-2 valid tokens we calibrate on), and ours; every file scored by llama-perplexity
(-c 2048 --chunks 8 on WikiText-2 test: llama.cpp's protocol, which scores the second half of
each window, so its numbers are not comparable with gptq.eval's).
"""

import json
import re
import subprocess
import sys

import pytest

from conftest import ROOT
from test_interop import WIKI

pytestmark = [pytest.mark.interop, pytest.mark.slow]
SRC = ROOT / ".cache" / "llama.cpp" / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp"
BIN = SRC / "build" / "bin"


def tool(name):
    if not (BIN / name).is_file():
        pytest.skip(f"{BIN / name} is absent: run `make interop-setup` to build llama.cpp")
    return str(BIN / name)


def perplexity(path) -> float:
    r = subprocess.run([tool("llama-perplexity"), "-m", str(path), "-f", str(WIKI / "wiki.test.raw"), "-c", "2048",
                        "--chunks", "8", "-t", "2"], capture_output=True, text=True, timeout=1800)
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", r.stdout + r.stderr)
    assert r.returncode == 0 and m, (r.stdout + r.stderr)[-3000:]
    return float(m.group(1))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """f16 GGUF of SmolLM2 and its importance matrix, made by llama.cpp's own tools."""
    py = ROOT / ".venv-llamacpp" / "bin" / "python"
    if not py.is_file():
        pytest.skip(".venv-llamacpp is absent: run `make interop-setup`")
    if not (WIKI / "wiki.test.raw").is_file():
        pytest.skip(f"WikiText-2 not found in {WIKI}")
    d = tmp_path_factory.mktemp("llamacpp")
    f16 = d / "smollm2-f16.gguf"
    subprocess.run([str(py), "convert_hf_to_gguf.py", str(ROOT / ".cache" / "smollm2"), "--outtype", "f16",
                    "--outfile", str(f16)], check=True, cwd=SRC, env={"PYTHONPATH": str(SRC / "gguf-py")},
                   capture_output=True)
    imatrix = d / "imatrix.gguf"
    subprocess.run([tool("llama-imatrix"), "-m", str(f16), "-f", str(WIKI / "valid.tokens.txt"), "-c", "512",
                    "--chunks", "32", "-t", "2", "-o", str(imatrix)], check=True, capture_output=True)
    return d, f16, imatrix


@pytest.mark.parametrize("ftype", ["q4_0", "q4_k_m"])
def test_llama_cpp_runs_our_gguf_below_its_own_imatrix_quantization(reference, tmp_path, ftype):
    d, f16, imatrix = reference
    theirs = {}
    for label, extra in (("plain", []), ("imatrix", ["--imatrix", str(imatrix)])):
        path = d / f"smollm2-{ftype}-{label}.gguf"
        subprocess.run([tool("llama-quantize"), *extra, str(f16), str(path), ftype.upper(), "2"], check=True,
                       capture_output=True)
        theirs[label] = (perplexity(path), path.stat().st_size)
    out = tmp_path / "ours"
    subprocess.run([sys.executable, "-m", "gptq.quantize", str(ROOT / ".cache" / "smollm2"), "--dataset",
                    str(WIKI / "valid.tokens.txt"), "--nsamples", "32", "--seqlen", "512", "--format", f"gguf:{ftype}",
                    "--out", str(out), "--quiet"], check=True, cwd=ROOT)
    g = json.loads((out / "quantize_report.json").read_text())["gguf"]
    mine = perplexity(out / g["file"])
    f16_ppl = perplexity(f16) if ftype == "q4_0" else None
    print(f"\n{ftype}: f16 {f16_ppl}; llama.cpp {theirs['plain'][0]:.4f} ({theirs['plain'][1]} B), with imatrix "
          f"{theirs['imatrix'][0]:.4f} ({theirs['imatrix'][1]} B); ours {mine:.4f} ({g['bytes']} B)")
    assert abs(g["bytes"] - theirs["imatrix"][1]) / theirs["imatrix"][1] < 0.01
    if ftype == "q4_k_m":
        assert mine < theirs["imatrix"][0]
    else:  # Q4_0 is at parity (README: three seeds 18.71-18.99 around 18.84): within GPTQ's ±1 % rounding spread
        assert mine < theirs["imatrix"][0] * 1.015 and mine < theirs["plain"][0]

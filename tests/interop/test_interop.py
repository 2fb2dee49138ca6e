"""Real clients load our default checkpoint (``make interop``; not part of ``make test``).

Each client lives in its own virtual environment, made by ``make interop-setup`` (kept out of
the main install): .venv-gptqmodel (GPTQModel, the GPTQ backend of transformers; torch 2.14.1),
.venv-vllm (vLLM's CPU build), .venv-bnb (transformers + bitsandbytes) and .venv-ct (transformers +
compressed-tensors). A missing environment skips its test with the reason.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import ROOT

pytestmark = [pytest.mark.interop, pytest.mark.slow]
HERE = Path(__file__).parent
WIKI = Path(os.environ.get("GPTQ_WIKITEXT", ROOT.parent / "shared" / "data" / "wikitext2"))


def client_python(name: str) -> Path:
    py = ROOT / f".venv-{name}" / "bin" / "python"
    if not py.is_file():
        pytest.skip(f"{py.parent.parent.name} is absent: run `make interop-setup` to install {name} there")
    return py


@pytest.fixture(scope="module")
def default_checkpoint(tmp_path_factory):
    """SmolLM2 quantized with our defaults (4-bit, group 64 so every engine's kernel applies, 32 x 512
    WikiText-2 calibration windows), and 4 x 2048 evaluation windows of WikiText-2 test."""
    import sys

    from gptq.assets import smollm2
    from gptq.eval import eval_windows

    if not (WIKI / "wiki.test.raw").is_file():
        pytest.skip(f"WikiText-2 not found in {WIKI} (set GPTQ_WIKITEXT)")
    model_dir = smollm2(ROOT / ".cache" / "smollm2")
    out = tmp_path_factory.mktemp("interop") / "smollm2-gptq"
    subprocess.run([sys.executable, "-m", "gptq.quantize", str(model_dir), "--dataset", str(WIKI / "valid.tokens.txt"),
                    "--nsamples", "32", "--seqlen", "512", "--group-size", "64", "--out", str(out), "--quiet"],
                   check=True, cwd=ROOT)
    from transformers import AutoTokenizer

    windows = eval_windows(AutoTokenizer.from_pretrained(out), str(WIKI / "wiki.test.raw"), 2048, 4)
    path = out.parent / "windows.pt"
    torch.save(windows, path)
    return out, windows, path


def ours(ckpt, windows) -> float:
    from gptq.eval import perplexity
    from gptq.runtime.load import load

    model, _ = load(ckpt, device="cpu", backend="torch", dtype="float32")
    return perplexity(model, windows)


def run_client(py: Path, script: str, *args, env=None, timeout=3000) -> dict:
    r = subprocess.run([str(py), str(HERE / script), *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, env={**os.environ, **(env or {})}, cwd=HERE)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    assert r.returncode == 0 and lines, f"{script} failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return json.loads(lines[-1])


def test_gptqmodel_perplexity_matches_ours(default_checkpoint):
    py = client_python("gptqmodel")
    ckpt, windows, path = default_checkpoint
    theirs = run_client(py, "client_gptqmodel.py", ckpt, path, env={"GPTQMODEL_CPU_WORKERS": "2"})
    mine = ours(ckpt, windows)
    print(f"\nGPTQModel {theirs['ppl']:.4f} ({theirs['kernels']}) vs ours {mine:.4f}")
    assert abs(theirs["ppl"] - mine) / mine < 0.005


def vllm_scores(ckpt, path) -> dict:
    """client_vllm.py's result; a skip where this CPU build lacks the WNA16 kernel, a failure otherwise."""
    theirs = run_client(client_python("vllm"), "client_vllm.py", ckpt, path)
    if not theirs["loaded"]:
        assert "desc_act" not in theirs["error"], theirs["error"]  # the config itself was accepted
        if theirs.get("kernel_missing"):
            pytest.skip("vLLM accepted the config and read the weights, but this CPU build lacks its WNA16 kernel "
                        f"(cpu_gemm_wna16 needs AVX-512): {theirs['error'][-300:]}")
        pytest.fail(theirs["error"])
    return theirs


def test_vllm_accepts_and_loads(default_checkpoint):
    ckpt, windows, path = default_checkpoint
    theirs = vllm_scores(ckpt, path)
    mine = ours(ckpt, windows)
    print(f"\nvLLM {theirs['ppl']:.4f} vs ours {mine:.4f}")
    assert abs(theirs["ppl"] - mine) / mine < 0.005
    from gptq.runtime.load import load

    model, _ = load(ckpt, device="cpu", backend="torch", dtype="float32")
    greedy = model.generate(windows[0][:64][None], max_new_tokens=16, min_new_tokens=16, do_sample=False)[0, 64:]
    same = sum(int(a == b) for a, b in zip(greedy.tolist(), theirs["greedy"]))
    print(f"greedy continuation: {same} of 16 tokens equal (vLLM bf16 activations, ours fp32)")
    assert theirs["greedy"][:4] == greedy.tolist()[:4] and same >= 12


@pytest.fixture(scope="module")
def rotated_checkpoint(default_checkpoint):
    """The default checkpoint's command with --rotate hadamard."""
    import sys

    out = default_checkpoint[0].parent / "smollm2-gptq-rotated"
    subprocess.run([sys.executable, "-m", "gptq.quantize", str(ROOT / ".cache" / "smollm2"), "--dataset",
                    str(WIKI / "valid.tokens.txt"), "--nsamples", "32", "--seqlen", "512", "--group-size", "64",
                    "--rotate", "hadamard", "--out", str(out), "--quiet"], check=True, cwd=ROOT)
    return out


def test_vllm_serves_a_rotated_checkpoint(default_checkpoint, rotated_checkpoint):
    """A rotated model keeps its architecture (norms as ones, the head untied): vLLM's CPU build loads
    it unchanged and scores within 0.5 % of our loader."""
    _, windows, path = default_checkpoint
    theirs = vllm_scores(rotated_checkpoint, path)
    mine = ours(rotated_checkpoint, windows)
    print(f"\nrotated: vLLM {theirs['ppl']:.4f} vs ours {mine:.4f}")
    assert abs(theirs["ppl"] - mine) / mine < 0.005


def test_gptqmodel_loads_a_rotated_checkpoint(default_checkpoint, rotated_checkpoint):
    py = client_python("gptqmodel")
    _, windows, path = default_checkpoint
    theirs = run_client(py, "client_gptqmodel.py", rotated_checkpoint, path, env={"GPTQMODEL_CPU_WORKERS": "2"})
    mine = ours(rotated_checkpoint, windows)
    print(f"\nrotated: GPTQModel {theirs['ppl']:.4f} vs ours {mine:.4f}")
    assert abs(theirs["ppl"] - mine) / mine < 0.005


def _quantize_smollm2(out: Path, *flags: str) -> Path:
    """SmolLM2 with the default checkpoint's calibration and ``flags``."""
    import sys

    subprocess.run([sys.executable, "-m", "gptq.quantize", str(ROOT / ".cache" / "smollm2"), "--dataset",
                    str(WIKI / "valid.tokens.txt"), "--nsamples", "32", "--seqlen", "512", "--group-size", "64",
                    *flags, "--out", str(out), "--quiet"], check=True, cwd=ROOT)
    return out


@pytest.fixture(scope="module")
def mixed_checkpoint(default_checkpoint):
    """A 3/4-bit mix (--candidates 3g64,4g64) at 3.8 bits per weight: GPTQModel dynamic overrides. (The
    cheap estimate: what is checked here is how the engines read the file, not the allocation.)"""
    return _quantize_smollm2(default_checkpoint[0].parent / "smollm2-mixed", "--bits-per-weight", "3.8",
                             "--candidates", "3g64,4g64", "--sensitivity", "hessian")


@pytest.fixture(scope="module")
def mixed_v2_checkpoint(default_checkpoint):
    """The same mix in checkpoint_format gptq_v2, the layout GPTQModel reads asymmetric grids in."""
    return _quantize_smollm2(default_checkpoint[0].parent / "smollm2-mixed-v2", "--bits-per-weight", "3.8",
                             "--candidates", "3g64,4g64", "--sensitivity", "hessian", "--format", "gptq_v2")


@pytest.fixture(scope="module")
def mixed_4bit_checkpoint(default_checkpoint):
    """A mix of 4-bit group sizes only (--candidates 4g32,4g64), which vLLM's CPU kernel serves."""
    return _quantize_smollm2(default_checkpoint[0].parent / "smollm2-mixed-4bit", "--bits-per-weight", "4.45",
                             "--candidates", "4g32,4g64")


@pytest.fixture(scope="module")
def three_bit_checkpoint(default_checkpoint):
    """Uniform 3-bit g64 with the default grid there (asymmetric: QuantConfig.sym_at) in gptq_v2."""
    return _quantize_smollm2(default_checkpoint[0].parent / "smollm2-3bit", "--bits", "3", "--format", "gptq_v2")


def test_gptqmodel_loads_our_default_3bit_asymmetric_checkpoint(default_checkpoint, three_bit_checkpoint):
    """The default 3-bit grid is asymmetric; in gptq_v2 GPTQModel reads its zero points as they are and
    scores what our loader does (its torch kernel: the automatic CPU one is 4-bit only)."""
    py = client_python("gptqmodel")
    _, windows, path = default_checkpoint
    qc = json.loads((three_bit_checkpoint / "config.json").read_text())["quantization_config"]
    assert (qc["bits"], qc["sym"], qc["checkpoint_format"]) == (3, False, "gptq_v2")
    theirs = run_client(py, "client_gptqmodel.py", three_bit_checkpoint, path, "torch",
                        env={"GPTQMODEL_CPU_WORKERS": "2"})
    mine = ours(three_bit_checkpoint, windows)
    print(f"\n3-bit asymmetric: GPTQModel {theirs['ppl']:.4f} ({theirs['kernels']}) vs ours {mine:.4f}")
    assert abs(theirs["ppl"] - mine) / mine < 0.005


def _mix_of(ckpt: Path) -> set:
    qc = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    return {(o.get("bits", qc["bits"]), o.get("group_size", qc["group_size"])) for o in qc["dynamic"].values()} | {
        (qc["bits"], qc["group_size"])}


def test_gptqmodel_refuses_an_asymmetric_v1_checkpoint_as_inspect_says(default_checkpoint, mixed_checkpoint):
    """GPTQModel loads asymmetric v1 files only from its own producer (its loader checks meta.quantizer):
    the v1 mix, whose 3-bit base is asymmetric, is refused, and gptq.inspect says so beforehand."""
    from gptq.inspect import describe

    verdict = {e["engine"]: e for e in describe(mixed_checkpoint)["engines"]}["transformers + GPTQModel"]
    assert verdict["status"] == "refuses" and any("gptq_v2" in r for r in verdict["reasons"])
    r = subprocess.run([str(client_python("gptqmodel")), str(HERE / "client_gptqmodel.py"), str(mixed_checkpoint),
                        str(default_checkpoint[2]), "torch"], capture_output=True, text=True, timeout=3000, cwd=HERE,
                       env={**os.environ, "GPTQMODEL_CPU_WORKERS": "2"})
    assert r.returncode != 0 and "sym=False" in r.stderr, r.stderr[-3000:]


def test_gptqmodel_honours_our_mixed_precision_overrides(default_checkpoint, mixed_v2_checkpoint):
    """GPTQModel reads the dynamic overrides (the gptq_v2 mix: it loads asymmetric grids in v2); on CPU its
    automatic kernel choice (TorchFusedLinear, 4-bit only, picked from the base setting) fails on the 3-bit
    layers, so it is asked for its torch kernel (2-8 bits, half-precision activations: bf16), as gptq.inspect
    advises."""
    py = client_python("gptqmodel")
    _, windows, path = default_checkpoint
    mixed_checkpoint = mixed_v2_checkpoint
    assert _mix_of(mixed_checkpoint) == {(3, 64), (4, 64)}
    # the base is the 3-bit setting (asymmetric, not one Marlin takes), the 4-bit layers overridden back to sym
    qc = json.loads((mixed_checkpoint / "config.json").read_text())["quantization_config"]
    assert (qc["bits"], qc["sym"]) == (3, False)
    assert all(o["sym"] is True for o in qc["dynamic"].values() if o["bits"] == 4)
    theirs = run_client(py, "client_gptqmodel.py", mixed_checkpoint, path, "torch", env={"GPTQMODEL_CPU_WORKERS": "2"})
    mine = ours(mixed_checkpoint, windows)
    print(f"\nmixed 3/4-bit: GPTQModel {theirs['ppl']:.4f} ({theirs['kernels']}) vs ours {mine:.4f}")
    assert abs(theirs["ppl"] - mine) / mine < 0.005


def test_vllm_serves_a_mix_of_4bit_group_sizes(default_checkpoint, mixed_4bit_checkpoint):
    """vLLM matches the dynamic patterns against its fused layers (qkv_proj, gate_up_proj): a wrong
    group size for one would misread its scales and show in the perplexity."""
    _, windows, path = default_checkpoint
    assert _mix_of(mixed_4bit_checkpoint) == {(4, 32), (4, 64)}
    theirs = vllm_scores(mixed_4bit_checkpoint, path)
    mine = ours(mixed_4bit_checkpoint, windows)
    print(f"\nmixed 4-bit g32/g64: vLLM {theirs['ppl']:.4f} vs ours {mine:.4f}")
    assert abs(theirs["ppl"] - mine) / mine < 0.005


def test_vllm_cpu_refuses_3bit_layers_as_inspect_says(mixed_checkpoint):
    """vLLM's CPU GPTQ kernel takes 4-bit weights only (compat.vllm_cpu): the 3/4-bit mix is refused
    there, and gptq.inspect says so beforehand (on a GPU vLLM serves it on its GPTQ kernel: the base
    setting is the 3-bit one, so it does not pick Marlin)."""
    from gptq.inspect import describe

    verdict = {e["engine"]: e for e in describe(mixed_checkpoint)["engines"]}["vLLM (CPU)"]
    assert verdict["status"] == "refuses" and any("3-bit" in r for r in verdict["reasons"])
    theirs = run_client(client_python("vllm"), "client_vllm.py", mixed_checkpoint, "-")
    assert not theirs["loaded"], "vLLM's CPU build served 3-bit layers: update compat.vllm_cpu"


def test_bitsandbytes_loads_a_rotated_nf4_checkpoint(default_checkpoint, tmp_path):
    """transformers + bitsandbytes run `--format bnb-nf4 --rotate hadamard` as it is, within 0.5 % of ours."""
    import sys

    from gptq.eval import perplexity
    from gptq.runtime.load import load_any

    py = client_python("bnb")
    _, windows, path = default_checkpoint
    out = tmp_path / "smollm2-nf4-rotated"
    subprocess.run([sys.executable, "-m", "gptq.quantize", str(ROOT / ".cache" / "smollm2"), "--dataset",
                    str(WIKI / "valid.tokens.txt"), "--nsamples", "32", "--seqlen", "512", "--format", "bnb-nf4",
                    "--rotate", "hadamard", "--out", str(out), "--quiet"], check=True, cwd=ROOT)
    layer = "model.layers.3.mlp.down_proj"
    theirs = run_client(py, "client_bnb.py", out, path, layer, tmp_path / "w.pt")
    ours_model, _ = load_any(out, device="cpu", dtype="bfloat16")
    mine = perplexity(ours_model, windows)
    print(f"\nrotated NF4: bitsandbytes {theirs['ppl']:.4f} vs ours (bf16) {mine:.4f}")
    assert abs(theirs["ppl"] - mine) / mine < 0.005


@pytest.mark.parametrize("double_quant", [False, True], ids=["nf4", "nf4-double-quant"])
def test_bitsandbytes_loads_our_nf4_checkpoint(default_checkpoint, tmp_path, double_quant):
    """transformers + bitsandbytes load `--format bnb-nf4 [--double-quant]`: bitsandbytes dequantizes
    exactly our solved weights, its perplexity agrees with ours, and beats bitsandbytes' own NF4
    rounding of the model (with the same double quantization setting)."""
    import sys

    from gptq.eval import perplexity
    from gptq.runtime.load import load_any

    py = client_python("bnb")
    _, windows, path = default_checkpoint
    model_dir = ROOT / ".cache" / "smollm2"
    out = tmp_path / "smollm2-nf4"
    subprocess.run([sys.executable, "-m", "gptq.quantize", str(model_dir), "--dataset", str(WIKI / "valid.tokens.txt"),
                    "--nsamples", "32", "--seqlen", "512", "--format", "bnb-nf4", "--out", str(out), "--quiet",
                    *(["--double-quant"] if double_quant else [])],
                   check=True, cwd=ROOT)
    layer = "model.layers.3.mlp.down_proj"
    theirs = run_client(py, "client_bnb.py", out, path, layer, tmp_path / "w.pt")
    own = run_client(py, "client_bnb.py", model_dir, path, layer, tmp_path / "own.pt",
                     "nf4+dq" if double_quant else "nf4")
    assert theirs["nested_with_bnb_dynamic_map"] == double_quant == own["nested_with_bnb_dynamic_map"]
    ours_model, _ = load_any(out, device="cpu", dtype="bfloat16")
    mine = perplexity(ours_model, windows)
    ours_fp32, _ = load_any(out, device="cpu", dtype="float32")
    assert torch.equal(torch.load(tmp_path / "w.pt"), ours_fp32.get_submodule(layer).weight.float())
    print(f"\nbitsandbytes on our NF4{' (double quant)' if double_quant else ''} {theirs['ppl']:.4f} "
          f"({theirs['linear4bit']} Linear4bit) vs ours (bf16) {mine:.4f}; bitsandbytes' own NF4 {own['ppl']:.4f}")
    assert abs(theirs["ppl"] - mine) / mine < 0.005
    assert theirs["ppl"] < 0.95 * own["ppl"]


@pytest.mark.parametrize("budget", [(), ("--bits-per-weight", "4.2", "--candidates", "3g64,4g64", "--format", "gptq_v2")],
                         ids=["uniform", "mixed"])
def test_gptqmodel_loads_our_moe_checkpoint(tmp_path, tiny_tokenizer_dir, budget):
    """A small random Qwen3-MoE (8 experts, 2 active) quantized by us: GPTQModel finds every
    per-expert tensor under the names it expects and scores the same perplexity as our loader.
    Mixed: a size budget puts each block's experts on 3 or 4 bits (one dynamic override per experts
    layer; gptq_v2, as 3-bit grids are asymmetric); GPTQModel reads them, with its torch kernel as for the
    dense mix. (vLLM's CPU build has
    no GPTQ MoE kernel: gptq.inspect says so.)"""
    import shutil
    import sys

    from conftest import SAMPLE_TEXT, moe_config
    from transformers import AutoModelForCausalLM

    py = client_python("gptqmodel")
    torch.manual_seed(0)
    cfg = moe_config("qwen3_moe", experts=8, active=2, hidden=256, inter=128, layers=2)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(tmp_path / "m")
    for f in tiny_tokenizer_dir.iterdir():
        shutil.copy(f, tmp_path / "m" / f.name)
    (tmp_path / "calib.txt").write_text(SAMPLE_TEXT)
    subprocess.run([sys.executable, "-m", "gptq.quantize", str(tmp_path / "m"), "--dataset", str(tmp_path / "calib.txt"),
                    "--nsamples", "8", "--seqlen", "64", "--group-size", "64", *budget, "--out", str(tmp_path / "q"),
                    "--quiet"], check=True, cwd=ROOT)
    if budget:
        qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
        experts = {k: v.get("bits", qc["bits"]) for k, v in qc["dynamic"].items() if "experts" in k}
        assert _mix_of(tmp_path / "q") == {(3, 64), (4, 64)} and experts, qc["dynamic"]
        print(f"\nexperts' overrides: {experts}")
    windows = torch.randint(0, 256, (2, 128), generator=torch.Generator().manual_seed(0))
    torch.save(windows, tmp_path / "windows.pt")
    theirs = run_client(py, "client_gptqmodel.py", tmp_path / "q", tmp_path / "windows.pt",
                        *(["torch"] if budget else []), env={"GPTQMODEL_CPU_WORKERS": "2"})
    mine = ours(tmp_path / "q", windows)
    print(f"\nQwen3-MoE ({'mixed' if budget else 'uniform'}): GPTQModel {theirs['ppl']:.4f} vs ours {mine:.4f}")
    assert abs(theirs["ppl"] - mine) / mine < 0.005


@pytest.fixture(scope="module")
def ct_checkpoint(default_checkpoint):
    """SmolLM2 in the compressed-tensors layout, with the default checkpoint's settings."""
    import sys

    model_dir = ROOT / ".cache" / "smollm2"
    out = default_checkpoint[0].parent / "smollm2-w4a16"
    subprocess.run([sys.executable, "-m", "gptq.quantize", str(model_dir), "--dataset", str(WIKI / "valid.tokens.txt"),
                    "--nsamples", "32", "--seqlen", "512", "--group-size", "64", "--format", "compressed-tensors",
                    "--out", str(out), "--quiet"], check=True, cwd=ROOT)
    return out


def test_vllm_serves_our_compressed_tensors_checkpoint(default_checkpoint, ct_checkpoint):
    """vLLM's CPU build loads `--format compressed-tensors` (its CompressedTensorsWNA16 scheme) and
    scores the windows within 0.5 % of our own loader."""
    _, windows, path = default_checkpoint
    theirs = vllm_scores(ct_checkpoint, path)
    mine = ours(ct_checkpoint, windows)
    print(f"\nvLLM on our compressed-tensors checkpoint {theirs['ppl']:.4f} vs ours {mine:.4f}")
    assert abs(theirs["ppl"] - mine) / mine < 0.005


def test_transformers_loads_our_compressed_tensors_checkpoint(default_checkpoint, ct_checkpoint, tmp_path):
    """transformers + the compressed-tensors package decompress the weights our loader runs (up to the
    rounding of (q - z)·scale in the scales' bf16, which it computes in) and score the same perplexity."""
    from gptq.runtime.load import load

    py = client_python("ct")
    _, windows, path = default_checkpoint
    layer = "model.layers.3.mlp.down_proj"
    theirs = run_client(py, "client_ct.py", ct_checkpoint, path, layer, tmp_path / "w.pt")
    model, _ = load(ct_checkpoint, device="cpu", backend="torch", dtype="float32")
    from gptq.core.pack import dequantize_packed

    q = model.get_submodule(layer)
    mine_w = dequantize_packed(q.qweight, q.qzeros, q.scales.float(), q.g_idx, 4, "gptq_v2")
    torch.testing.assert_close(torch.load(tmp_path / "w.pt"), mine_w, rtol=2**-8, atol=1e-9)
    mine = ours(ct_checkpoint, windows)
    print(f"\ntransformers + compressed-tensors {theirs['compressed_tensors']} {theirs['ppl']:.4f} vs ours {mine:.4f}")
    assert abs(theirs["ppl"] - mine) / mine < 0.005

"""Streaming from shards (model never fully materialized) and resume after SIGKILL."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, SAMPLE_TEXT, run_module, tiny_config
from safetensors.torch import load_file

from gptq import QuantConfig, quantize_model, save_checkpoint
from faults import KILL as KILL_HOOK

from gptq.pipeline.streaming import ResumeError, quantize_streaming


def sharded_tiny(tmp_path, tiny_tokenizer_dir, layers=3):
    import shutil

    from transformers import AutoModelForCausalLM

    cfg = tiny_config("llama")
    cfg.num_hidden_layers = layers
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    d = tmp_path / "tiny-sharded"
    model.save_pretrained(d, max_shard_size="60KB")
    for f in tiny_tokenizer_dir.iterdir():
        shutil.copy(f, d / f.name)
    assert (d / "model.safetensors.index.json").is_file()
    return d


def all_tensors(d):
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_streaming_equals_in_memory_and_holds_one_block(tmp_path, tiny_tokenizer_dir):
    from transformers import AutoModelForCausalLM

    d = sharded_tiny(tmp_path, tiny_tokenizer_dir)
    windows = torch.randint(0, 256, (6, 32), generator=torch.Generator().manual_seed(0))
    cfg = QuantConfig(bits=4, group_size=32)
    out_s, _, mat = quantize_streaming(d, tmp_path / "s", cfg, windows, torch.float32, device="cpu", progress=False)
    assert mat.max_blocks_resident == 1  # never more than one decoder block's weights loaded
    assert all(p.is_meta for p in mat.model.parameters())  # and nothing left behind
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    packed, _ = quantize_model(model, windows, cfg, device="cpu", progress=False)
    out_m = save_checkpoint(tmp_path / "m", model, packed, cfg)
    a, b = all_tensors(out_s), all_tensors(out_m)
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the per-block files are regrouped at the end: one file when it fits, as save_pretrained does
    assert [p.name for p in out_s.glob("*.safetensors")] == ["model.safetensors"]
    assert not (out_s / "model.safetensors.index.json").exists()


def test_regrouped_shards_respect_the_size_and_survive_a_kill(tmp_path, tiny_tokenizer_dir):
    """--max-shard-size splits the finished checkpoint with a correct index; a SIGKILL while the
    final shards are written loses nothing: --resume finishes with the same bytes."""
    from safetensors import safe_open

    d = sharded_tiny(tmp_path, tiny_tokenizer_dir)
    text = calib_text(tmp_path)
    r = run(quantize_cmd(d, tmp_path / "full", "--max-shard-size", "60kB"), text)
    assert r.returncode == 0, r.stderr
    full = tmp_path / "full"
    index = json.loads((full / "model.safetensors.index.json").read_text())
    shards = sorted(full.glob("model-*.safetensors"))
    assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == [p.name for p in shards]
    for p in shards:
        size = p.stat().st_size
        with safe_open(p, "pt") as h:
            names = list(h.keys())
            assert h.metadata() == {"format": "pt"}
            assert all(index["weight_map"][n] == p.name for n in names)
        assert size < 60 * 1024 + 4096 or len(names) == 1  # a tensor larger than the limit gets its own shard
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in all_tensors(full).values())
    killed = run(quantize_cmd(d, tmp_path / "resumed", "--max-shard-size", "60kB"), text, env={KILL_HOOK: "regroup"})
    assert killed.returncode == -9 and not (tmp_path / "resumed").exists()
    r = run(quantize_cmd(d, tmp_path / "resumed", "--max-shard-size", "60kB", "--resume"), text)
    assert r.returncode == 0, r.stderr
    resumed = tmp_path / "resumed"
    assert not (tmp_path / "resumed.partial").exists()
    names = sorted(p.name for p in full.iterdir())
    assert names == sorted(p.name for p in resumed.iterdir())
    for n in names:
        if n != "quantize_report.json":
            assert (full / n).read_bytes() == (resumed / n).read_bytes(), n


def quantize_cmd(model, out, *extra, group_size: int | None = 32):
    """The CLI on a small calibration set ("TEXT": see ``run``); ``group_size=None`` leaves the
    format's own default (64 for bitsandbytes, the GGML block for GGUF)."""
    group = [] if group_size is None else ["--group-size", str(group_size)]
    return [sys.executable, "-m", "gptq.quantize", str(model), "--dataset", "TEXT", "--nsamples", "4",
            "--seqlen", "32", *group, "--out", str(out), "--quiet", *extra]


def calib_text(tmp_path):
    """A calibration text file for the CLI tests."""
    text = tmp_path / "calib.txt"
    text.write_text(SAMPLE_TEXT)
    return text


def run(cmd, text, env=None):
    """The command, in this process (``run_module``); with an environment of its own (``env``: a
    fault to inject, tests/faults.py's variables, through that driver; or settings read at import
    time) in a new process."""
    cmd = [str(text) if c == "TEXT" else c for c in cmd]
    if not env and cmd[1] == "-m":
        return run_module(cmd[2], cmd[3:])
    if env and KILL_HOOK in env and cmd[1:3] == ["-m", "gptq.quantize"]:
        cmd = [cmd[0], str(ROOT / "tests" / "faults.py"), *cmd[3:]]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**os.environ, **(env or {})})


def test_resume_after_sigkill_is_byte_identical(tmp_path, tiny_tokenizer_dir):
    d = sharded_tiny(tmp_path, tiny_tokenizer_dir)
    text = calib_text(tmp_path)
    r = run(quantize_cmd(d, tmp_path / "full"), text)
    assert r.returncode == 0, r.stderr
    killed = run(quantize_cmd(d, tmp_path / "resumed"), text, env={KILL_HOOK: "1"})
    assert killed.returncode == -9  # SIGKILL after block 1 was saved
    partial = tmp_path / "resumed.partial"
    assert (partial / "progress.json").is_file() and not (tmp_path / "resumed").exists()
    # without --resume the leftover state is not silently clobbered
    r = run(quantize_cmd(d, tmp_path / "resumed"), text)
    assert r.returncode == 2 and "--resume" in r.stderr
    # different settings: refused
    r = run(quantize_cmd(d, tmp_path / "resumed", "--bits", "3", "--resume"), text)
    assert r.returncode == 2 and "different model, settings" in r.stderr
    r = run(quantize_cmd(d, tmp_path / "resumed", "--resume"), text)
    assert r.returncode == 0, r.stderr
    assert not partial.exists()
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    names = sorted(p.name for p in full.iterdir())
    assert names == sorted(p.name for p in resumed.iterdir())
    for n in names:
        if n != "quantize_report.json":  # holds timings
            assert (full / n).read_bytes() == (resumed / n).read_bytes(), n


def test_ctrl_c_keeps_resumable_state(tmp_path, tiny_tokenizer_dir):
    d = sharded_tiny(tmp_path, tiny_tokenizer_dir, layers=2)
    text = calib_text(tmp_path)
    r = run(quantize_cmd(d, tmp_path / "o"), text, env={KILL_HOOK: "int:0"})
    assert r.returncode == 130 and "--resume" in r.stderr
    assert (tmp_path / "o.partial" / "progress.json").is_file()
    r = run(quantize_cmd(d, tmp_path / "o", "--resume"), text)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "o" / "model.safetensors").is_file()


def test_corrupt_progress_is_refused(tmp_path, tiny_tokenizer_dir):
    d = sharded_tiny(tmp_path, tiny_tokenizer_dir, layers=2)
    windows = torch.randint(0, 256, (2, 16))
    partial = tmp_path / "o.partial"
    partial.mkdir()
    (partial / "progress.json").write_text("{not json")
    with pytest.raises(ResumeError, match="missing or corrupt"):
        quantize_streaming(d, tmp_path / "o", QuantConfig(), windows, torch.float32, device="cpu", resume=True,
                           progress=False)


def test_nan_weight_names_layer_when_streaming(tmp_path, tiny_tokenizer_dir):
    from transformers import AutoModelForCausalLM

    from gptq.core.hessian import NonFiniteError

    cfg = tiny_config("llama")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("inf")
    model.save_pretrained(tmp_path / "bad")
    with pytest.raises(NonFiniteError, match=r"model.layers.1.mlp.down_proj: the weight contains NaN or Inf"):
        quantize_streaming(tmp_path / "bad", tmp_path / "o", QuantConfig(), torch.randint(0, 256, (2, 16)),
                           torch.float32, device="cpu", progress=False)


def test_spilled_streaming_and_resume_across_modes(tmp_path, tiny_tokenizer_dir):
    """--max-memory 0 spills every activation; a run killed while spilling resumes in memory
    (and the other way round the state is the same files) to the same bytes as a plain run."""
    d = sharded_tiny(tmp_path, tiny_tokenizer_dir)
    text = calib_text(tmp_path)
    r = run(quantize_cmd(d, tmp_path / "full", "--batch-size", "2"), text)
    assert r.returncode == 0, r.stderr
    r = run(quantize_cmd(d, tmp_path / "spilled", "--max-memory", "0", "--batch-size", "2"), text)
    assert r.returncode == 0, r.stderr
    killed = run(quantize_cmd(d, tmp_path / "resumed", "--max-memory", "0", "--batch-size", "2"), text,
                 env={KILL_HOOK: "1"})
    assert killed.returncode == -9
    partial = tmp_path / "resumed.partial"
    state = sorted(p.name for p in partial.iterdir() if p.name.startswith("activations"))
    assert state == ["activations-00002"]  # inputs of block 2 only; older ones removed
    assert len(list((partial / "activations-00002").glob("0*.safetensors"))) == 2  # one per batch
    assert len(list((partial / "activations-00002").glob("fp-*.safetensors"))) == 2  # the full-precision stream
    assert (partial / "spill").is_dir()  # what the killed run had spilled (cleared on resume)
    r = run(quantize_cmd(d, tmp_path / "resumed", "--batch-size", "2", "--resume"), text)
    assert r.returncode == 0, r.stderr
    assert not partial.exists()
    full = tmp_path / "full"
    for other in (tmp_path / "spilled", tmp_path / "resumed"):
        names = sorted(p.name for p in full.iterdir())
        assert names == sorted(p.name for p in other.iterdir())
        for n in names:
            if n not in ("quantize_report.json",):
                assert (full / n).read_bytes() == (other / n).read_bytes(), (other.name, n)


def test_bad_max_memory_is_a_clear_error(tmp_path, tiny_tokenizer_dir):
    d = sharded_tiny(tmp_path, tiny_tokenizer_dir, layers=1)
    r = run(quantize_cmd(d, tmp_path / "o", "--max-memory", "lots"), tmp_path / "none.txt")
    assert r.returncode == 2 and "--max-memory" in r.stderr and "500MB" in r.stderr
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_not_enough_disk_is_refused_before_any_work(tmp_path, tiny_tokenizer_dir, monkeypatch):
    import re
    from collections import namedtuple

    import gptq.pipeline.streaming as stream

    d = sharded_tiny(tmp_path, tiny_tokenizer_dir, layers=2)
    windows = torch.randint(0, 256, (4, 32))
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(stream.shutil, "disk_usage", lambda p: Usage(10**12, 10**12 - 1000, 1000))
    loaded = []
    monkeypatch.setattr(stream.TensorSource, "get", lambda self, name: loaded.append(name))
    needs = []
    for mm in (None, 0):
        with pytest.raises(OSError, match="not enough disk space") as e:
            quantize_streaming(d, tmp_path / "o", QuantConfig(), windows, torch.float32, device="cpu", progress=False,
                               max_memory=mm)
        number, unit = re.search(r"about ([\d.]+) (GB|MB|kB|bytes) needed", str(e.value)).groups()
        needs.append(float(number) * {"GB": 1e9, "MB": 1e6, "kB": 1e3, "bytes": 1}[unit])
        assert not loaded  # refused before a single tensor was read
        assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()
    assert needs[1] > needs[0]  # spilling needs room for the activations too


def test_calibrating_in_fp32_keeps_the_source_dtype_on_disk(tmp_path, tiny_tokenizer_dir):
    """A bf16 model calibrated in fp32 (the choice on CPUs without native bf16) is written with its
    unquantized tensors and config dtype in bf16, streaming or not."""
    import shutil

    from transformers import AutoModelForCausalLM

    cfg = tiny_config("llama")
    torch.manual_seed(0)
    src = tmp_path / "bf16"
    AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(src)
    for f in tiny_tokenizer_dir.iterdir():
        shutil.copy(f, src / f.name)
    text = calib_text(tmp_path)
    for extra in ([], ["--no-stream"]):
        out = tmp_path / f"o{len(extra)}"
        r = run(quantize_cmd(src, out, "--dtype", "float32", *extra), text)
        assert r.returncode == 0, r.stderr
        tensors = all_tensors(out)
        assert tensors["model.embed_tokens.weight"].dtype == torch.bfloat16
        assert tensors["model.layers.0.input_layernorm.weight"].dtype == torch.bfloat16
        assert tensors["model.layers.0.mlp.down_proj.scales"].dtype == torch.float16
        assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
        report = json.loads((out / "quantize_report.json").read_text())
        assert report["compute"]["dtype"] == "float32" and "capability" in report["compute"]["cpu"]


def test_fp_target_spills_resumes_and_streams_to_the_in_memory_bytes(tmp_path, tiny_tokenizer_dir):
    """--fp-target carries a second (full-precision) stream: it is saved beside the quantized one
    (fp- files) so a killed run resumes to the same bytes, spilled or not; and it changes the result."""
    d = sharded_tiny(tmp_path, tiny_tokenizer_dir)
    text = calib_text(tmp_path)
    fp = ["--fp-target", "0.25", "--batch-size", "2"]
    for out, extra in (("plain", ["--fp-target", "0", "--batch-size", "2"]), ("full", fp),
                       ("spilled", [*fp, "--max-memory", "0"])):
        r = run(quantize_cmd(d, tmp_path / out, *extra), text)
        assert r.returncode == 0, r.stderr
    killed = run(quantize_cmd(d, tmp_path / "resumed", *fp, "--max-memory", "0"), text, env={KILL_HOOK: "1"})
    assert killed.returncode == -9
    saved = tmp_path / "resumed.partial" / "activations-00002"
    assert sorted(p.name for p in saved.iterdir()) == ["000000.safetensors", "000001.safetensors",
                                                       "fp-000000.safetensors", "fp-000001.safetensors"]
    # the two streams differ after two quantized blocks
    assert not torch.equal(load_file(saved / "000000.safetensors")["0"], load_file(saved / "fp-000000.safetensors")["0"])
    r = run(quantize_cmd(d, tmp_path / "resumed", *fp, "--resume"), text)  # resumed in memory
    assert r.returncode == 0, r.stderr
    full = tmp_path / "full"
    for other in (tmp_path / "spilled", tmp_path / "resumed"):
        for n in sorted(p.name for p in full.iterdir()):
            if n != "quantize_report.json":
                assert (full / n).read_bytes() == (other / n).read_bytes(), (other.name, n)
    plain, ours = all_tensors(tmp_path / "plain"), all_tensors(full)
    assert torch.equal(plain["model.layers.0.self_attn.q_proj.qweight"], ours["model.layers.0.self_attn.q_proj.qweight"])
    assert not torch.equal(plain["model.layers.2.mlp.down_proj.qweight"], ours["model.layers.2.mlp.down_proj.qweight"])
    report = json.loads((full / "quantize_report.json").read_text())
    assert report["quant_config"]["fp_target"] == 0.25


def test_atomic_save_round_trips_every_dtype_and_leaves_no_temporary(tmp_path):
    """The intermediate shards are written from the tensors' own memory (no bytes copy): every dtype
    and shape reads back exactly, a 0-d and an empty tensor included, with no .tmp left behind."""
    from gptq.io.safetensors_io import atomic_save

    g = torch.Generator().manual_seed(0)
    tensors = {"a.bf16": torch.randn(3, 5, generator=g).bfloat16(), "b.f32": torch.randn(7, generator=g),
               "c.i32": torch.randint(-9, 9, (2, 2, 3), dtype=torch.int32, generator=g),
               "d.u8": torch.randint(0, 255, (4,), dtype=torch.uint8, generator=g),
               "e.f16": torch.randn(2, 3, generator=g).half().t(),  # not contiguous
               "f.scalar": torch.tensor(1.5), "g.empty": torch.zeros(0, 4),
               "h.strided1": torch.zeros(4, 256)[:1, :1].clone().as_strided((1, 1), (256, 256))}  # "contiguous"
    path = tmp_path / "shard.safetensors"
    atomic_save(tensors, path)
    back = load_file(path)
    assert sorted(back) == sorted(tensors)
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and torch.equal(back[k], t), k
    assert [p.name for p in tmp_path.iterdir()] == ["shard.safetensors"]

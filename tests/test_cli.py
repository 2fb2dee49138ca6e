"""The quantize / eval / generate command lines, including their errors."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT, SAMPLE_TEXT, run_module

from gptq.quantize import main as quantize_main


def run(*args, **kw):
    """``python -m ARGS`` in a new interpreter, as a user runs it (the other CLI tests run the
    commands' ``main`` in this process: ``run_module``)."""
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=ROOT, timeout=600, **kw)


@pytest.fixture
def text_file(tmp_path):
    p = tmp_path / "calib.txt"
    p.write_text(SAMPLE_TEXT)
    return p


def test_quantize_cli_writes_checkpoint_and_report(tiny_model_dir, text_file, tmp_path):
    model = tiny_model_dir("llama")
    out = tmp_path / "q"
    r = run("gptq.quantize", str(model), "--dataset", str(text_file), "--nsamples", "4", "--seqlen", "32",
            "--group-size", "32", "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    assert "quantized 14 linears" in r.stdout
    report = json.loads((out / "quantize_report.json").read_text())
    assert len(report["layers"]) == 14 and all(lay["loss"] >= 0 for lay in report["layers"])
    assert (out / "tokenizer.json").is_file()
    # refuse to overwrite without --overwrite, before doing any work
    r = run_module("gptq.quantize", [model, "--dataset", text_file, "--out", out])
    assert r.returncode == 2 and "--overwrite" in r.stderr
    # eval runs on the checkpoint and on the original
    for m, command in ((out, run), (model, lambda *a: run_module(a[0], a[1:]))):
        r = command("gptq.eval", str(m), "--dataset", str(text_file), "--seqlen", "32", "--max-windows", "2", "--json")
        assert r.returncode == 0, r.stderr
        res = json.loads(r.stdout.strip().splitlines()[-1])
        assert res["windows"] == 2 and 1 < res["perplexity"] < 1e4
    r = run("gptq.generate", str(out), "--prompt", "The quick", "--max-new-tokens", "5")
    assert r.returncode == 0, r.stderr
    assert "Time for inference" in r.stdout and "tokens/sec" in r.stdout and "Memory used" in r.stdout


@pytest.mark.parametrize("args,msg", [
    (["/no/such/model"], "does not exist"),
    (["MODEL", "--bits", "5"], "bits=5 is not supported"),
    (["MODEL", "--group-size", "0"], "group_size=0 is invalid"),
    (["MODEL", "--dataset", "EMPTY"], "empty"),
    (["MODEL", "--dataset", "c5"], "unknown dataset"),
])
def test_bad_inputs(args, msg, tiny_model_dir, tmp_path, capsys):
    model = tiny_model_dir("llama")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    args = [str(model) if a == "MODEL" else str(empty) if a == "EMPTY" else a for a in args]
    with pytest.raises(SystemExit) as e:
        quantize_main(args + ["--out", str(tmp_path / "o"), "--quiet"])
    assert e.value.code == 2
    assert msg in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob("o.partial*"))


def test_unsupported_architecture(tmp_path, capsys):
    from transformers import BertConfig

    d = tmp_path / "bert"
    d.mkdir()
    BertConfig().save_pretrained(d)
    with pytest.raises(SystemExit):
        quantize_main([str(d), "--out", str(tmp_path / "o")])
    assert "model_type 'bert' is not supported" in capsys.readouterr().err


def test_help_lists_defaults():
    r = run("gptq.quantize", "--help")
    assert r.returncode == 0
    for flag in ("--bits", "--group-size", "--act-order", "--mse", "--damp", "--nsamples", "--seqlen", "--device"):
        assert flag in r.stdout
    assert "default: 4" in r.stdout


def test_plain_warnings_one_line_each_text_once(monkeypatch, capsys):
    import warnings

    from gptq.cli import plain_warnings

    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # restored after the test
    plain_warnings()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("the text\n  wraps", UserWarning, stacklevel=1)
        warnings.warn("the text wraps", RuntimeWarning, stacklevel=1)
        warnings.warn("another", UserWarning, stacklevel=1)
    assert capsys.readouterr().err.splitlines() == ["warning: the text wraps", "warning: another"]


@pytest.mark.parametrize("command", ["gptq.eval", "gptq.generate", "gptq.inspect"])
def test_every_command_prints_plain_warnings(command, tmp_path, monkeypatch, capsys):
    import importlib
    import warnings

    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)
    assert importlib.import_module(command).main([str(tmp_path / "missing")]) == 2  # refused before any work
    assert warnings.showwarning.__qualname__ == "plain_warnings.<locals>.show"
    assert capsys.readouterr().err.startswith("error: ")

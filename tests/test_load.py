"""Loading checkpoints written by hand, as another GPTQ tool would, and refusing corrupt ones."""

import json
import math

import pytest
import torch
from conftest import tiny_model
from safetensors.torch import load_file, save_file

from gptq import CheckpointError, load
from gptq.runtime.qlinear import QuantLinear


def pack_words_by_hand(values, bits):
    """Independent of gptq.core.pack: a little-endian bit stream, 32 bits per word, as the format doc says."""
    stream = 0
    for i, v in enumerate(values):
        stream |= int(v) << (bits * i)
    nwords = len(values) * bits // 32
    words = [(stream >> (32 * w)) & 0xFFFFFFFF for w in range(nwords)]
    return [w - (1 << 32) if w >= 1 << 31 else w for w in words]


def hand_qweight(codes, bits):  # codes [out, in] -> [in*bits/32, out]
    cols = [pack_words_by_hand(codes[n].tolist(), bits) for n in range(codes.shape[0])]
    return torch.tensor(cols, dtype=torch.int32).T.contiguous()


def hand_qzeros(stored, bits):  # stored [groups, out] -> [groups, out*bits/32]
    return torch.tensor([pack_words_by_hand(row.tolist(), bits) for row in stored], dtype=torch.int32)


def build_checkpoint(tmp_path, bits, group_size, sym, act_order, fmt, seed=0):
    """A tiny llama with every linear replaced by known codes; returns (dir, {name: W})."""
    model = tiny_model("llama", seed)
    g = torch.Generator().manual_seed(seed)
    sd = {k: v for k, v in model.state_dict().items()}
    known = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear) or name == "lm_head":
            continue
        N, K = mod.weight.shape
        G = K if group_size == -1 else group_size
        ng = math.ceil(K / G)
        codes = torch.randint(0, 2**bits, (N, K), generator=g)
        if sym:
            zeros = torch.full((ng, N), 2 ** (bits - 1))
        else:
            zeros = torch.randint(0 if fmt == "gptq_v2" else 1, 2**bits, (ng, N), generator=g)
            zeros[0, :3] = 0 if fmt == "gptq_v2" else 1  # v2 can store a zero point of 0
        scales = (torch.rand(ng, N, generator=g) * 0.05 + 0.01).half()
        g_idx = torch.arange(K) // G
        if act_order:
            g_idx = g_idx[torch.randperm(K, generator=g)]
        W = scales.float()[g_idx].T * (codes - zeros[g_idx].T)  # [N, K]
        known[name] = W
        del sd[f"{name}.weight"]
        sd[f"{name}.qweight"] = hand_qweight(codes, bits)
        sd[f"{name}.qzeros"] = hand_qzeros(zeros - (1 if fmt == "gptq" else 0), bits)
        sd[f"{name}.scales"] = scales
        sd[f"{name}.g_idx"] = g_idx.to(torch.int32)
    sd.pop("lm_head.weight", None) if model.config.tie_word_embeddings else None
    d = tmp_path / f"ck-{bits}-{group_size}-{sym}-{act_order}-{fmt}"
    d.mkdir()
    save_file({k: v.contiguous() for k, v in sd.items()}, d / "model.safetensors", metadata={"format": "pt"})
    cfg = model.config.to_dict()
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": bits, "group_size": group_size, "sym": sym,
                                  "desc_act": act_order, "checkpoint_format": fmt}
    (d / "config.json").write_text(json.dumps(cfg))
    return d, known


@pytest.mark.parametrize("bits,group_size,sym,act_order,fmt", [
    (4, 32, True, False, "gptq"),
    (4, 32, False, True, "gptq"),
    (4, 32, False, True, "gptq_v2"),
    (3, 32, False, True, "gptq"),
    (3, -1, True, False, "gptq_v2"),
    (2, 16, False, False, "gptq"),
    (8, 64, True, True, "gptq"),
])
def test_interop_known_weights(tmp_path, bits, group_size, sym, act_order, fmt):
    d, known = build_checkpoint(tmp_path, bits, group_size, sym, act_order, fmt)
    model, _ = load(d, device="cpu", backend="torch", dtype="float32")
    for name, W in known.items():
        m = model.get_submodule(name)
        assert isinstance(m, QuantLinear)
        eye = torch.eye(m.in_features)
        assert torch.equal(m(eye).T, W), name  # identity input recovers Wᵀ exactly
    model, _ = load(d, device="cpu", backend="dense", dtype="float32")
    name, W = next(iter(known.items()))
    assert torch.equal(model.get_submodule(name).backend.weight, W)


def test_sharded_checkpoint_and_cpu_backend(tmp_path):
    d, known = build_checkpoint(tmp_path, 4, 32, False, True, "gptq")
    tensors = load_file(d / "model.safetensors")
    names = sorted(tensors)
    half = len(names) // 2
    for k, part in enumerate((names[:half], names[half:]), 1):
        save_file({n: tensors[n] for n in part}, d / f"model-0000{k}-of-00002.safetensors", metadata={"format": "pt"})
    (d / "model.safetensors").unlink()
    wm = {n: f"model-0000{1 if i < half else 2}-of-00002.safetensors" for i, n in enumerate(names)}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    model, _ = load(d, device="cpu", backend="cpu")
    name, W = next(iter(known.items()))
    m = model.get_submodule(name)
    assert m.backend.name == "cpu"
    x = torch.randn(3, m.in_features)
    ref = x @ W.T
    assert ((m(x.bfloat16()).float() - ref).norm() / ref.norm()) < 1e-2


def corrupt(tmp_path, how):
    d, _ = build_checkpoint(tmp_path, 4, 32, True, False, "gptq")
    f = d / "model.safetensors"
    if how == "truncated":
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
        return d
    t = load_file(f)
    name = "model.layers.1.mlp.down_proj"
    if how == "shape":
        t[f"{name}.scales"] = t[f"{name}.scales"][:, :-1].contiguous()
    elif how == "g_idx":
        t[f"{name}.g_idx"][5] = 99
    elif how == "bits":
        cfg = json.loads((d / "config.json").read_text())
        cfg["quantization_config"]["bits"] = 8
        (d / "config.json").write_text(json.dumps(cfg))
    elif how == "missing":
        del t[f"{name}.qzeros"]
    save_file(t, f, metadata={"format": "pt"})
    return d


@pytest.mark.parametrize("how,msg", [
    ("truncated", "truncated or corrupt"),
    ("shape", r"model.layers.1.mlp.down_proj.scales has shape"),
    ("g_idx", r"model.layers.1.mlp.down_proj.g_idx has values in \[0, 99\]"),
    ("bits", r"qweight has shape .* bits=8 .*fits bits=4"),
    ("missing", r"down_proj.qzeros missing"),
])
def test_corrupt_checkpoints_are_named(tmp_path, how, msg):
    d = corrupt(tmp_path, how)
    with pytest.raises(CheckpointError, match=msg):
        load(d, device="cpu", backend="torch")


def test_not_a_gptq_checkpoint(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "plain")
    with pytest.raises(CheckpointError, match="no quantization_config"):
        load(tmp_path / "plain", device="cpu")

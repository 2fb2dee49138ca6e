"""A learned residual rotation, measured against the Hadamard one and against none in the same run
(an experiment toward a 10 % perplexity gain at 3 bits; not a ``--rotate`` option yet).

The residual rotation Q (``gptq.models.rotation``, R1) starts as the randomised Hadamard matrix and is
moved along the orthogonal group, Q = Q₀ · exp(A − Aᵀ) with A trained by Adam (SpinQuant trains its
rotations on the orthogonal group too, with Cayley SGD on the model's loss; Liu et al. 2024). The
objective here needs no pass through the model, only each block's input statistics: for every linear
that reads the residual stream (q/k/v with the heads' rotation R2 on v, gate/up; norms folded in), the
error GPTQ leaves when it quantizes the rotated weight W Q column by column on the rotated Hessian
Qᵀ H Q, approximated as

    Σ_ij E_ij² / U_jj²,   E = WQ − rtn(WQ),   U = chol((Qᵀ H Q + λI)⁻¹) (upper)

(GPTQ's error for column j is its rounding error over U_jj²; Frantar et al. 2023, eq. 3 with the
Cholesky form of §4), with round-to-nearest onto the asymmetric group grid, its rounding passed through
straight. Each linear's error counts relative to its value at Q₀. The linears writing the stream (o,
down) are left out of the objective: their error energy under Q grows (down_proj's by half between
no rotation and Hadamard) while the quantized model's perplexity falls, so it does not predict
quality; the readers' error does (it orders no rotation, Hadamard and learned rotations as their
perplexities).

The learned Q is applied with the library's own ``Rotator`` (the same folding, the same exactness),
the rotated model saved in bf16 and quantized by the quality benchmark's command with ``--rotate
none``; the three rows are evaluated by ``gptq.eval --reference`` against the source."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from benchmarks.common import evaluate, quantize_cmd, smollm2_eval, wiki, write
from calib import load_documents, sample_windows
from gptq.models.rotation import ATTN_NORM, MLP_NORM, Rotator
from gptq.runtime.cpu import cpu_info


def hessians(model, windows: torch.Tensor, batch: int = 4) -> list[dict[str, torch.Tensor]]:
    """Per block, X Xᵀ / N (float64) of what each group of linears reads: "attn" and "mlp", the residual
    stream entering each norm divided by its RMS (what the linears reading a weight-free norm see);
    "o" and "down", the inputs of the linears writing the stream."""
    blocks = model.model.layers
    H = [{} for _ in blocks]
    hooks = []

    def add(i, key, x, eps=None):
        x = x.double().reshape(-1, x.shape[-1])
        if eps is not None:
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        h = x.T @ x / windows.numel()
        H[i][key] = h + H[i][key] if key in H[i] else h

    for i, blk in enumerate(blocks):
        for key, name in (("attn", ATTN_NORM), ("mlp", MLP_NORM)):
            hooks.append(getattr(blk, name).register_forward_pre_hook(
                lambda mod, a, i=i, key=key: add(i, key, a[0], mod.variance_epsilon)))
        for key, lin in (("o", blk.self_attn.o_proj), ("down", blk.mlp.down_proj)):
            hooks.append(lin.register_forward_pre_hook(lambda mod, a, i=i, key=key: add(i, key, a[0])))
    with torch.no_grad():
        for s in range(0, windows.shape[0], batch):
            model(windows[s : s + batch])
    for h in hooks:
        h.remove()
    return H


def weights(model, rot: Rotator) -> list[dict[str, torch.Tensor]]:
    """Per block, the linears reading the attention norm (q, k, v; v with the heads' rotation R2) and
    the MLP norm (gate, up), stacked, with the norms' scales folded in, and the writers o (its columns
    under R2) and down; float64, not yet rotated by Q."""
    out = []
    hd, nh, nkv = rot.head_dim, rot.n_heads, rot.n_kv
    for blk in model.model.layers:
        a, m = blk.self_attn, blk.mlp
        n1, n2 = (getattr(blk, n).weight.double()[None] + rot.offset for n in (ATTN_NORM, MLP_NORM))
        v = (rot.R.T @ (a.v_proj.weight.double() * n1).view(nkv, hd, -1)).reshape(nkv * hd, -1)
        wo = a.o_proj.weight.double()
        out.append({"attn": torch.cat([a.q_proj.weight.double() * n1, a.k_proj.weight.double() * n1, v]),
                    "mlp": torch.cat([m.gate_proj.weight.double(), m.up_proj.weight.double()]) * n2,
                    "o": (wo.view(wo.shape[0], nh, hd) @ rot.R).reshape(wo.shape),
                    "down": m.down_proj.weight.double()})
    return out


def rtn(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Round-to-nearest onto the asymmetric min/max grid of each ``group`` columns, the rounding passed
    straight through to the gradient."""
    maxq = 2**bits - 1
    g = w.reshape(w.shape[0], -1, group)
    lo, hi = g.amin(-1, keepdim=True).clamp(max=0), g.amax(-1, keepdim=True).clamp(min=0)
    s = ((hi - lo) / maxq).clamp(min=1e-8)
    z = torch.round(-lo / s).detach()
    x = g / s + z
    q = torch.clamp(x + (torch.round(x) - x).detach(), 0, maxq)
    return ((q - z) * s).reshape(w.shape)


READERS, WRITERS = ("attn", "mlp"), ("o", "down")


def gptq_error(W: torch.Tensor, Hinv: torch.Tensor, Q: torch.Tensor, bits: int, group: int,
               reads: bool = True) -> torch.Tensor:
    """Σ E² / U_jj² (module docstring) for a reader W Q on the rotated inverse Hessian Qᵀ H⁻¹ Q, or
    (``reads=False``) a writer Qᵀ W on its own."""
    Wr = W @ Q if reads else Q.T @ W
    U = torch.linalg.cholesky(Q.T @ Hinv @ Q if reads else Hinv, upper=True)
    return ((Wr - rtn(Wr, bits, group)).pow(2) / U.diagonal().pow(2)[None]).sum()


def _inverse(H: torch.Tensor, damp: float) -> torch.Tensor:
    return torch.linalg.inv(H + damp * H.diagonal().mean() * torch.eye(H.shape[0], dtype=H.dtype)).float()


def learn_rotation(model, windows, bits: int = 3, group: int = 64, steps: int = 400, lr: float = 5e-3,
                   per_step: int = 8, seed: int = 0, damp: float = 0.01) -> tuple[Rotator, dict]:
    """A ``Rotator`` whose residual Q (float64, orthogonal) is the learned one, its heads' R2 the one the
    objective used, and a log of the objective. ``model`` is left as it was."""
    model.requires_grad_(False)
    rot = Rotator(model.config, "hadamard", seed)
    t0 = time.perf_counter()
    hess = hessians(model, windows)
    seconds_hessians = time.perf_counter() - t0
    B = torch.block_diag(*[rot.R] * rot.n_heads)  # o_proj reads its input under R2
    for h in hess:
        h["o"] = B.T @ h["o"] @ B
    terms = [(key, w[key].float(), _inverse(h[key], damp)) for w, h in zip(weights(model, rot), hess)
             for key in READERS + WRITERS]
    readers = [(W, Hi) for key, W, Hi in terms if key in READERS]
    Q0 = rot.Q.float()

    def totals(Q) -> dict:  # the error summed over every block, by group of linears (a diagnostic)
        with torch.no_grad():
            return {key: round(sum(gptq_error(W, Hi, Q, bits, group, key in READERS).item()
                                   for k, W, Hi in terms if k == key), 1) for key in READERS + WRITERS}

    with torch.no_grad():
        base = [gptq_error(W, Hi, Q0, bits, group).item() for W, Hi in readers]
    A = torch.zeros_like(Q0, requires_grad=True)
    opt = torch.optim.Adam([A], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    log, t0 = [], time.perf_counter()
    for step in range(steps):
        Q = Q0 @ torch.matrix_exp(A - A.T)
        pick = torch.randperm(len(readers), generator=gen)[:per_step].tolist()
        loss = sum(gptq_error(*readers[j], Q, bits, group) / base[j] for j in pick) / len(pick)
        opt.zero_grad()
        loss.backward()
        opt.step()
        log.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step}: objective {sum(log[-50:]) / len(log[-50:]):.4f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    with torch.no_grad():
        u, _, vh = torch.linalg.svd((Q0 @ torch.matrix_exp(A - A.T)).double())
        Q = u @ vh  # orthogonal to float64 precision
        final = [gptq_error(W, Hi, Q.float(), bits, group).item() / b for (W, Hi), b in zip(readers, base)]
    rot.__dict__["Q"] = Q  # the learned Q in place of the Hadamard one; R2 and the folding as --rotate does
    return rot, {"objective_relative_to_hadamard": round(sum(final) / len(final), 4),
               "seconds_hessians": round(seconds_hessians, 1),
               "seconds_learning": round(time.perf_counter() - t0, 1),
               "error_by_group": {"none": totals(torch.eye(Q0.shape[0])), "hadamard": totals(Q0),
                                  "learned": totals(Q.float())}}


def rotation_learned(out: Path, bits: int = 3, steps: int = 400, lr: float = 5e-3) -> dict:
    model_dir, tok, _ = smollm2_eval()
    docs, mode = load_documents(str(wiki("valid.tokens.txt")), "calib")
    windows = sample_windows(docs, tok, 32, 512, 0, mode)  # the quality benchmark's calibration windows
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    rot, learning = learn_rotation(model, windows, bits=bits, steps=steps, lr=lr)
    rotated = out / "rotation-learned-model"
    rot.rotate_model(model)
    del model.config.gptq_rotation
    if rotated.exists():
        shutil.rmtree(rotated)
    model.to(torch.bfloat16).save_pretrained(rotated)
    tok.save_pretrained(rotated)
    del model
    cache, ckpt = out / "reference-cache", out / "rotation-ckpt"
    rows = []
    for name, source, kind in (("none", model_dir, "none"), ("hadamard", model_dir, "hadamard"),
                               ("learned", rotated, "none")):
        cmd = quantize_cmd(source, "--bits", str(bits), "--rotate", kind, "--out", str(ckpt), "--overwrite", "--quiet")
        print("$", " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        report = json.loads((ckpt / "quantize_report.json").read_text())
        row = {"rotation": name, "quantize_seconds": report["seconds"], **evaluate(ckpt, model_dir, cache)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    result = {"setup": f"SmolLM2-135M-Instruct, {bits}-bit g64 (default grid), 32 x 512 WikiText-2 valid "
                       "calibration; eval wiki.test.raw 8 x 2048 fp32, KL against the bf16 source",
              "learning": {"steps": steps, "lr": lr, **learning}, "rows": rows, "cpu": cpu_info()}
    write(out, "rotation_learned", result, show=True)
    return result

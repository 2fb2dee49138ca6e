"""The estimated error of each group of linears under no rotation, the Hadamard rotation and the
learned one (``--rotate learned``, ``gptq.core.learned_rotation``): the diagnostic behind that
objective, on SmolLM2 at 3 bits (``python -m benchmarks rotation-learned``; the quality of the three
rotations is ``python -m benchmarks rotation --bits 3 --rotate none,hadamard,learned``).

The statistics are this benchmark's own, in float64: per block, what the linears reading the residual
stream receive (each norm's input over its RMS; norms folded into the readers, the heads' rotation R2 on
v) and what the writers (o, down) receive. Readers are scored as the objective scores them (Σ E²/U_jj² on
the rotated Hessian); writers by the same estimate on Qᵀ W, whose input the residual rotation does not
touch. Beside each estimate, the solver's own error: ``gptq.core.solver.solve`` run on each group at the
benchmark's grid, tr((W − Ŵ) H (W − Ŵ)ᵀ). The findings it records: the readers' estimate moves as the
solver's error does; the writers' does not (the Hadamard rotation raises the down projections' estimate
by half, where the solver's error falls), so the objective leaves the writers out.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from benchmarks.common import smollm2_eval, wiki, write
from calib import load_documents, sample_windows
from gptq.core.config import QuantConfig
from gptq.core.learned_rotation import Rounding, damped_inverse, learn_rotation, reader_error
from gptq.core.solver import solve
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


READERS, WRITERS = ("attn", "mlp"), ("o", "down")


def gptq_error(W: torch.Tensor, Hinv: torch.Tensor, Q: torch.Tensor, bits: int, group: int,
               reads: bool = True) -> torch.Tensor:
    """The library's objective term (``reader_error``) for a reader W Q, or (``reads=False``) the same
    estimate for a writer Qᵀ W on its own inverse Hessian (its input is not rotated by Q)."""
    if reads:
        return reader_error(W, Hinv, Q, Rounding(bits, group))
    return reader_error(Q.T @ W, Hinv, torch.eye(W.shape[1], dtype=W.dtype), Rounding(bits, group))


def solver_error(W: torch.Tensor, H: torch.Tensor, Q: torch.Tensor, config: QuantConfig,
                 reads: bool = True) -> float:
    """What the solver leaves, tr((W′ − Ŵ) H′ (W′ − Ŵ)ᵀ), for a reader W′ = W Q on H′ = Qᵀ H Q, or
    (``reads=False``) a writer W′ = Qᵀ W on its own H."""
    Wr, Hr = (W @ Q, Q.T @ H @ Q) if reads else (Q.T @ W, H)
    D = Wr - solve(Wr, Hr, config).weight.float()
    return (D @ Hr * D).sum().item()


def learn(model, windows, bits: int = 3, group: int = 64, steps: int = 400, lr: float = 5e-3,
          seed: int = 0, damp: float = 0.01) -> dict:
    """The library's learning (``core.learned_rotation.learn_rotation``) on this benchmark's float64
    statistics, and the estimated error by group of linears under no rotation, Hadamard and learned."""
    model.requires_grad_(False)
    rot = Rotator(model.config, "hadamard", seed)
    t0 = time.perf_counter()
    hess = hessians(model, windows)
    seconds_hessians = time.perf_counter() - t0
    B = torch.block_diag(*[rot.R] * rot.n_heads)  # o_proj reads its input under R2
    for h in hess:
        h["o"] = B.T @ h["o"] @ B
    terms = [(key, w[key].float(), damped_inverse(h[key], damp), h[key].float())
             for w, h in zip(weights(model, rot), hess) for key in READERS + WRITERS]
    readers = [(W, Hi) for key, W, Hi, _ in terms if key in READERS]
    config = QuantConfig(bits=bits, group_size=group, sym=False, damp=damp)  # Rounding(bits, group)

    def totals(Q) -> dict:  # the error summed over every block, by group of linears
        with torch.no_grad():
            return {key: round(sum(gptq_error(W, Hi, Q, bits, group, key in READERS).item()
                                   for k, W, Hi, _ in terms if k == key), 1) for key in READERS + WRITERS}

    def solver_totals(Q) -> dict:  # the same, from the solver's own result
        with torch.no_grad():
            return {key: round(sum(solver_error(W, H, Q, config, key in READERS)
                                   for k, W, _, H in terms if k == key), 1) for key in READERS + WRITERS}

    def progress(step, objective):
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step}: objective {objective:.4f}", flush=True)

    Q, info = learn_rotation(lambda j: readers[j][0], [Hi for _, Hi in readers], rot.Q, Rounding(bits, group),
                             steps=steps, lr=lr, seed=seed, progress=progress)
    rotations = {"none": torch.eye(rot.Q.shape[0]), "hadamard": rot.Q.float(), "learned": Q.float()}
    return {"objective_relative_to_hadamard": info["objective"], "seconds_hessians": round(seconds_hessians, 1),
            "seconds_learning": info["seconds"],
            "error_by_group": {name: totals(R) for name, R in rotations.items()},
            "solver_error_by_group": {name: solver_totals(R) for name, R in rotations.items()}}


def rotation_learned(out: Path, bits: int = 3, steps: int = 400, lr: float = 5e-3) -> dict:
    model_dir, tok, _ = smollm2_eval()
    docs, mode = load_documents(str(wiki("valid.tokens.txt")), "calib")
    windows = sample_windows(docs, tok, 32, 512, 0, mode)  # the quality benchmark's calibration windows
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    result = {"setup": f"SmolLM2-135M-Instruct, {bits}-bit g64 asymmetric grid, 32 x 512 WikiText-2 valid "
                       "calibration, float64 statistics", "steps": steps, "lr": lr,
              **learn(model, windows, bits=bits, steps=steps, lr=lr), "cpu": cpu_info()}
    write(out, "rotation_learned", result, show=True)
    return result

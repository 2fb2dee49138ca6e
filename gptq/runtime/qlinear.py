"""``QuantLinear``: a linear layer that keeps GPTQ's packed tensors and multiplies with them.

Backends (``prepare(backend)`` picks one; ``load`` chooses automatically):
  torch   the reference: dequantize to fp32 on every call, then matmul. Any bits, any g_idx.
  triton  fused dequant-matmul on CUDA (gptq/kernels/triton_dequant.py); 2/4/8 bits.
  cpu     4-bit: torch's packed-int4 CPU matmul (``_weight_int4pack_mm_for_cpu``), which reads
          the packed weights directly; scales and zero offsets in bf16. Fast batch-1 decoding.
          The codes are repacked into torch's int4 layout once, and the GPTQ-layout qweight,
          qzeros and scales are released (left as shape-only meta tensors). For long prompts
          (≥ DEQUANT_MIN_ROWS rows) the int4 weight is dequantized into a buffer shared by the
          layers of one shape, then multiplied densely in the activation dtype: on CPUs without
          native bf16 the int4 kernel's bf16 arithmetic is slower than the fp32 dense matmul.
          CPUs without fast bf16 (cpu.fast_dtype() is fp32; AVX2 + FMA + F16C and a C compiler):
          our kernel instead (kernels/cpu_int4.c): codes one row per output, the checkpoint's fp16
          scales and integer zeros, activations rounded to int16 per group, exact int32 dot
          products; siblings reading one input (q/k/v, up/gate) fused into one call; from
          ROWS64_MAX_ROWS rows on, an exact fp32 dequantization into the shared buffer + matmul.
  dense   keeps a dequantized copy in the activation dtype (asked for explicitly, or on CPU for
          2/3/8 bits where no packed CPU kernel exists).

Act-order checkpoints (non-monotonic g_idx) are served by the fast backends by sorting the
input rows by group once at load time and permuting the activations on each call.
"""

from __future__ import annotations

import math
import warnings
import weakref

import torch
from torch import nn

from gptq.core.pack import dequantize_packed, pack_rows, unpack_qweight, unpack_qzeros
from gptq.runtime.kernels.reference import dequant_matmul_reference

BACKENDS = ("torch", "triton", "cpu", "dense")
INT4_CPU_GROUPS = (256, 128, 64, 32)
ROWS64_MAX_ROWS = 16  # AVX2 kernel below this many rows, else exact dequantization + fp32 matmul (bench cpu-kernel:
# at 8-15 rows the kernel is 1.2-2.6x faster on SmolLM2 and 1.3B shapes; the two meet at ~18-30 rows)
DEQUANT_MIN_ROWS = 256  # cpu backend: from this many rows on, dequantize + dense matmul (bench cpu-kernel)
HEAD_DENSE_ROWS = 16  # float16 head: below this many rows multiply in fp16, else in the activation dtype


class SharedBuffers:
    """One scratch tensor per (shape, dtype), shared by every layer of a model: the cpu backend
    dequantizes a layer into it for a long prompt, then the next layer reuses it. ``fill`` skips
    the work when the buffer still holds what the same owner put there last (e.g. the output
    head, whose shape no other layer has)."""

    def __init__(self):
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._owners: dict[tuple, int] = {}

    def get(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        key = (shape, dtype)
        if key not in self._buffers:
            self._buffers[key] = torch.empty(shape, dtype=dtype)
        return self._buffers[key]

    def fill(self, shape: tuple[int, ...], dtype: torch.dtype, owner: object, write) -> torch.Tensor:
        """The buffer for (shape, dtype) holding ``owner``'s content; ``write(buf)`` runs only when
        another owner (or none) filled it last. Owners' content must not change (loaded weights)."""
        key = (shape, dtype)
        buf = self.get(shape, dtype)
        if self._owners.get(key) != id(owner):
            self._owners[key] = None
            write(buf)
            self._owners[key] = id(owner)
        return buf


class InputCache:
    """A value computed from one input tensor, reused while the same tensor object (unchanged)
    comes back: q/k/v (up/gate) are called one after another with the module input itself. The
    input is held by a weak reference: once it is freed the entry can never match again, even if
    a new tensor takes its memory (a data_ptr key could), and the input is not kept alive."""

    def __init__(self):
        self._ref = None
        self._version = -1
        self._value = None

    def __call__(self, x: torch.Tensor, compute):
        if self._ref is None or self._ref() is not x or x._version != self._version:
            self._value = compute()
            self._ref, self._version = weakref.ref(x), x._version
        return self._value


class PermutedInput:
    """The activations permuted into g_idx order, shared by the linears that read the same
    input with the same permutation (q/k/v, up/gate): the gather runs once per input."""

    def __init__(self, perm: torch.Tensor):
        self.perm = perm
        self._cache = InputCache()

    def __call__(self, x: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """x: the module input (the cache key); x2: its [M, in] view to permute."""
        return self._cache(x, lambda: x2.index_select(-1, self.perm))


class FusedSiblings:
    """Linears that read the same input (q/k/v; up/gate) on the cpu backend's AVX2 kernel: their
    codes, scales and zeros live in one tensor each (the layers keep views of their rows), and a
    small batch runs all of them in one kernel call, which writes each layer's own output."""

    def __init__(self, layers: list["QuantLinear"]):
        states = [layer._state for layer in layers]
        self.group = states[0]["group"]
        from gptq.runtime.kernels.cpu_int4 import Int4Rows

        self.tensors = {k: torch.cat([st[k] for st in states]) for k in ("w", "scale", "zero")}
        widths = tuple(layer.out_features for layer in layers)
        self.matmul = Int4Rows(self.tensors["w"], self.tensors["scale"], self.tensors["zero"], self.group, widths)
        self._cache = InputCache()
        start = 0
        for index, (layer, st) in enumerate(zip(layers, states)):
            end = start + layer.out_features
            for k, t in self.tensors.items():
                st[k] = t[start:end]  # a view: no second copy
            st["matmul"] = Int4Rows(st["w"], st["scale"], st["zero"], self.group)
            st["fused"] = (self, index)  # this layer's entry of ``outputs``
            start = end

    def outputs(self, x: torch.Tensor, xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Every sibling's output for the module input x (the cache key), computed from xs."""
        return self._cache(x, lambda: self.matmul(xs))


def share_permutations(layers: list["QuantLinear"]) -> None:
    """Give layers whose act-order permutations are equal one ``PermutedInput``, and every layer
    the model's ``SharedBuffers``."""
    shared: dict[tuple, PermutedInput] = {}
    buffers = SharedBuffers()
    for layer in layers:
        layer._state["buffers"] = buffers
        perm = layer._state.get("perm")
        if perm is None:
            continue
        key = (perm.numel(), perm.device, hash(perm.cpu().numpy().tobytes()))
        if key not in shared:
            shared[key] = PermutedInput(perm)
        layer._state["permute"] = shared[key]


def _fusable(layers: list) -> bool:
    from gptq.runtime.kernels.cpu_int4 import MAX_OUTPUTS

    if not 2 <= len(layers) <= MAX_OUTPUTS or not all(
            isinstance(m, QuantLinear) and m._state.get("kernel") == "rows64" for m in layers):
        return False
    states = [m._state for m in layers]
    first = states[0]
    return all(m.in_features == layers[0].in_features and st["group"] == first["group"]
               and (st["perm"] is None) == (first["perm"] is None)
               and (st["perm"] is None or torch.equal(st["perm"], first["perm"])) for m, st in zip(layers, states))


def fuse_siblings(model: nn.Module) -> int:
    """Fuse the AVX2-kernel linears that share an input, per the model's architecture (its
    ``sequential`` groups); returns how many groups were fused. Unknown families: none."""
    from gptq.io.modules import get_module
    from gptq.models.architectures import UnsupportedModelError, for_config

    try:
        arch = for_config(model.config)
    except (UnsupportedModelError, AttributeError):
        return 0
    try:
        blocks = get_module(model, arch.blocks)
    except AttributeError:
        return 0
    fused = 0
    for block in blocks:
        for group in arch.sequential:
            if arch.routed(group):
                continue
            try:
                layers = [get_module(block, name) for name in group]
            except AttributeError:
                continue
            if _fusable(layers):
                FusedSiblings(layers)
                fused += 1
    return fused


class HalfHead(nn.Module):
    """Output head (and its tied embedding) stored once in float16 for CPU inference. bf16 → fp16
    is exact for weights in the normal range; fp32 → fp16 rounds (relative 2^-11). Decoding
    (fewer than HEAD_DENSE_ROWS rows): on x86 CPUs with AVX2/FMA/F16C our C loop (kernels/cpu_f16.c)
    multiplies the fp16 weights with fp32 activations (no fp16 rounding of x; faster than torch's
    fp16 matmul here: bench cpu-kernel); elsewhere torch's fp16 matmul, about as fast as bf16 where bf16 is
    native and ~6x faster than fp32 where it is not. A long prompt converts the weight into a
    reused buffer of the activation dtype first, because fp16 matmuls of many rows are slow on
    every CPU (bench cpu-kernel)."""

    def __init__(self, weight: nn.Parameter, bias: torch.Tensor | None = None,
                 buffers: SharedBuffers | None = None):
        super().__init__()
        self.weight = weight
        self.bias = bias
        self.buffers = buffers or SharedBuffers()
        from gptq.runtime.kernels import cpu_f16

        self._f16_matmul = cpu_f16.f16_matmul if cpu_f16.available() else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows < HEAD_DENSE_ROWS and self._f16_matmul is not None and self.weight.dtype == torch.float16:
            y = self._f16_matmul(x, self.weight)
            if self.bias is not None:
                y = y + self.bias.float()
            return y.to(x.dtype)
        if rows < HEAD_DENSE_ROWS:
            b = None if self.bias is None else self.bias.to(torch.float16)
            return nn.functional.linear(x.to(torch.float16), self.weight, b).to(x.dtype)
        w = self.buffers.fill(tuple(self.weight.shape), x.dtype, self, lambda buf: buf.copy_(self.weight))
        return nn.functional.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))


class HalfEmbedding(nn.Embedding):
    def __init__(self, *args, out_dtype: torch.dtype = torch.bfloat16, **kw):
        super().__init__(*args, **kw)
        self.out_dtype = out_dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids).to(self.out_dtype)


def half_head_for_cpu(model: nn.Module) -> bool:
    """Swap a bf16 or fp32 output head (and the embedding tied to it) for float16 storage; returns
    whether it did (weights outside float16's range, or a non-Linear head, are left alone)."""
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear) or head.weight.dtype not in (torch.bfloat16, torch.float32):
        return False
    dtype = head.weight.dtype
    w = head.weight.detach()
    if not torch.isfinite(w.to(torch.float16)).all():
        return False
    half = nn.Parameter(w.to(torch.float16), requires_grad=False)
    emb = model.get_input_embeddings()
    if emb is not None and emb.weight is head.weight:
        new_emb = HalfEmbedding(emb.num_embeddings, emb.embedding_dim, emb.padding_idx, device="meta",
                                out_dtype=dtype)
        new_emb.weight = half
        model.set_input_embeddings(new_emb)
    model.set_output_embeddings(HalfHead(half, head.bias))
    return True


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool,
                 checkpoint_format: str = "gptq"):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.checkpoint_format = bits, group_size, checkpoint_format
        ng = 1 if group_size == -1 else math.ceil(in_features / group_size)
        self.register_buffer("qweight", torch.zeros(in_features * bits // 32, out_features, dtype=torch.int32))
        self.register_buffer("qzeros", torch.zeros(ng, out_features * bits // 32, dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(ng, out_features, dtype=torch.float16))
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32))
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float16) if bias else None)
        self.backend = "torch"
        self._state: dict = {}
        self._decode_below = 0  # AVX2 kernel: inputs of fewer elements take ``_decode_rows64``

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, backend={self.backend}")

    @property
    def _zero_offset(self) -> int:
        return 1 if self.checkpoint_format == "gptq" else 0

    # -- load-time preparation -------------------------------------------------------------
    def _sorted_layout(self):
        """(perm or None, uniform group size G) if groups are contiguous runs of G rows once the
        inputs are sorted by g_idx; None if this checkpoint's g_idx has irregular groups."""
        g = self.g_idx.long()
        ng = self.scales.shape[0]
        G = self.in_features if self.group_size == -1 else self.group_size
        counts = torch.bincount(g, minlength=ng).tolist()
        expected = [min(G, self.in_features - k * G) for k in range(ng)]
        if counts != expected:
            return None
        monotonic = bool((g[1:] >= g[:-1]).all())
        perm = None if monotonic else torch.argsort(g, stable=True)
        return perm, G

    def prepare(self, backend: str, dtype: torch.dtype = torch.float32, cpu_kernel: str = "auto") -> str:
        """Build what ``backend`` needs; returns the backend actually used (with a warning if
        the requested one cannot serve this layer)."""
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
        if self.qweight.is_meta:
            raise RuntimeError("this layer was prepared for the cpu backend, which releases the GPTQ-layout "
                               "tensors; load the checkpoint again to use another backend")
        self._state = {}
        self._decode_below = 0
        layout = self._sorted_layout()
        if backend in ("triton", "cpu") and layout is None:
            warnings.warn(f"{backend} backend needs equal-size groups in g_idx; using torch for this layer")
            backend = "torch"
        if backend == "cpu" and self.bits != 4:
            backend = "dense"
        if backend == "cpu":
            backend = self._prepare_int4_cpu(*layout, cpu_kernel)
        elif backend == "triton":
            perm, G = layout
            if self.bits not in (2, 4, 8) or (self.group_size != -1 and G % 16):
                warnings.warn(f"triton backend handles 2/4/8 bits with group size a multiple of 16; "
                              f"using torch for this {self.bits}-bit layer")
                backend = "torch"
            else:
                qweight = self.qweight
                if perm is not None:
                    qweight = pack_rows(unpack_qweight(self.qweight, self.bits)[perm], self.bits)
                self._state = {"perm": perm, "qweight": qweight.to(self.qweight.device)}
        if backend == "dense":
            self._state = {"weight": dequantize_packed(self.qweight, self.qzeros, self.scales, self.g_idx,
                                                       self.bits, self.checkpoint_format).to(dtype)}
        self.backend = backend
        return backend

    def _prepare_int4_cpu(self, perm, G, cpu_kernel: str = "auto") -> str:
        """cpu_kernel "auto": our AVX2 kernel where the CPU has no fast bf16 and it can serve this
        layer, else torch's int4 kernel; "avx2" / "torch" ask for one (benchmarks compare them)."""
        from gptq.runtime.cpu import fast_dtype
        from gptq.runtime.kernels import cpu_int4

        if cpu_kernel not in ("auto", "avx2", "torch"):
            raise ValueError(f"cpu_kernel must be 'auto', 'avx2' or 'torch', not {cpu_kernel!r}")
        fits = G % 32 == 0 and G <= 32768 and self.in_features % 64 == 0 and cpu_int4.available()
        if cpu_kernel == "avx2" and not fits:
            raise ValueError(f"the AVX2 kernel cannot serve this layer (group {G}, {self.in_features} inputs; "
                             f"kernel: {cpu_int4.unavailable_reason() or 'available'})")
        if fits and (cpu_kernel == "avx2" or (cpu_kernel == "auto" and fast_dtype() == torch.float32)):
            return self._prepare_rows64(perm, G)
        sub = next((s for s in INT4_CPU_GROUPS if G % s == 0 and self.in_features % s == 0), None)
        if sub is None:
            return "dense"
        codes = unpack_qweight(self.qweight, 4)  # [in, out]
        zeros = unpack_qzeros(self.qzeros, 4, self.checkpoint_format).float()  # [ng, out]
        scales = self.scales.float()  # [ng, out]
        g_sorted = self.g_idx.long() if perm is None else self.g_idx.long()[perm]
        if perm is not None:
            codes = codes[perm]
        g_of_sub = g_sorted[::sub]  # [in / sub] group of each sub-group of `sub` rows
        s = scales[g_of_sub]  # [n_sub, out]
        # int4pack computes w = (q − 8)·s + offset; GPTQ's w = s·(q − z) ⇒ offset = s·(8 − z)
        offset = s * (8 - zeros[g_of_sub])
        from gptq.runtime.cpu import int4pack_layout

        layout = int4pack_layout()
        self._state = {
            "perm": perm,
            "w": torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.T.contiguous(), 1),
            "sz": torch.stack([s, offset], dim=-1).to(torch.bfloat16).contiguous(),  # [n_sub, out, 2]
            "sub": sub,
            # the layout lets long prompts dequantize the int4 weight (None: always the kernel)
            "layout": layout if layout is not None and self.out_features % layout[0] == 0 else None,
        }
        self._release_gptq_tensors()
        return "cpu"

    def _prepare_rows64(self, perm, G) -> str:
        """CPUs without fast bf16: our AVX2 kernel (kernels/cpu_int4.c) on fp32 activations, the
        codes one row per output, the checkpoint's fp16 scales and integer zeros per group."""
        from gptq.runtime.kernels.cpu_int4 import Int4Rows, pack_rows64

        codes = unpack_qweight(self.qweight, 4)  # [in, out]
        if perm is not None:
            codes = codes[perm]
        st = {
            "perm": perm, "kernel": "rows64", "group": G,
            "w": pack_rows64(codes.T),
            "scale": self.scales.T.contiguous(),  # [out, ng]; sorted inputs: group i is rows iG..(i+1)G
            "zero": unpack_qzeros(self.qzeros, 4, self.checkpoint_format).T.to(torch.uint8).contiguous(),
        }
        st["matmul"] = Int4Rows(st["w"], st["scale"], st["zero"], G)
        self._state = st
        self._decode_below = ROWS64_MAX_ROWS * self.in_features
        self._release_gptq_tensors()
        return "cpu"

    def _release_gptq_tensors(self) -> None:
        # the CPU layout now holds the same codes: release the GPTQ-layout copies (they stay on
        # disk) so the layer is resident at ~28 % of its bf16 size instead of ~55 %
        for name in ("qweight", "qzeros", "scales"):
            t = getattr(self, name)
            setattr(self, name, torch.empty(t.shape, dtype=t.dtype, device="meta"))

    def _dequantized_t(self, dtype: torch.dtype) -> torch.Tensor:
        """cpu backend: Ŵᵀ [in, out] (sorted input order) from the int4 weight, in a shared buffer."""
        from gptq.runtime.cpu import int4pack_dequantize_t

        st = self._state
        K, N = self.in_features, self.out_features
        s = st["sz"][..., 0].float()  # [n_sub, out]
        off = st["sz"][..., 1].float() - 8 * s  # w = (q − 8)·s + offset = q·s + off

        def write(buf):
            int4pack_dequantize_t(st["w"], N, K, st["layout"], st["sub"], s.to(dtype), off.to(dtype), buf)

        return self._scratch((K, N), dtype, write)

    def _scratch(self, shape: tuple[int, int], dtype: torch.dtype, write) -> torch.Tensor:
        """The model's shared buffer of this shape holding this layer's ``write`` (a fresh tensor
        for a layer prepared on its own, outside ``load``)."""
        if "buffers" in self._state:
            return self._state["buffers"].fill(shape, dtype, self, write)
        buf = torch.empty(shape, dtype=dtype)
        write(buf)
        return buf

    def _permuted(self, x: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """x2 ([M, in] view of the module input x) in g_idx order where act-order needs it."""
        st = self._state
        if st.get("perm") is None:
            return x2
        return st["permute"](x, x2) if "permute" in st else x2.index_select(-1, st["perm"])

    def _decode_rows64(self, x: torch.Tensor) -> torch.Tensor:
        """AVX2 kernel, fewer than ROWS64_MAX_ROWS rows (decoding): the per-token path, kept short
        (the kernel writes the output in its final shape; fused siblings each get their own)."""
        st = self._state
        xs = x if st["perm"] is None else self._permuted(x, x.reshape(-1, self.in_features)).view(x.shape)
        fused = st.get("fused")
        y = st["matmul"](xs)[0] if fused is None else fused[0].outputs(x, xs)[fused[1]]
        if self.bias is not None:
            y = y + self.bias
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def _prompt_rows64(self, x: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """AVX2 kernel's layer, many rows: exact dequantization into the shared buffer, fp32 matmul."""
        from gptq.runtime.kernels import cpu_int4

        st = self._state
        xs = self._permuted(x, x2)

        def write(buf):
            cpu_int4.int4_dequantize(st["w"], st["scale"], st["zero"], st["group"], out=buf)

        w = self._scratch((self.out_features, self.in_features), torch.float32, write)
        return nn.functional.linear(xs.float(), w).to(x2.dtype)

    # -- forward ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() < self._decode_below:
            return self._decode_rows64(x)
        shape = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # [M, in]
        if self.backend == "cpu" and self._state.get("kernel") == "rows64":
            y = self._prompt_rows64(x, x2)
        elif self.backend == "cpu":
            st = self._state
            dense = x2.shape[0] >= DEQUANT_MIN_ROWS and st["layout"] is not None
            xp = self._permuted(x, x2)
            xb = xp if dense else xp.to(torch.bfloat16)
            if dense:
                y = xb @ self._dequantized_t(xb.dtype)
            else:
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb.contiguous(), st["w"], st["sub"], st["sz"])
            y = y.to(x.dtype)
        elif self.backend == "triton":
            from gptq.runtime.kernels.triton_dequant import dequant_matmul

            st = self._state
            xs = self._permuted(x, x2)
            y = dequant_matmul(xs, st["qweight"], self.qzeros, self.scales, self.group_size, self.bits,
                               self._zero_offset)
        elif self.backend == "dense":
            y = x2 @ self._state["weight"].to(x.dtype).T
        else:
            return dequant_matmul_reference(x, self.qweight, self.qzeros, self.scales, self.g_idx, self.bits,
                                            self.checkpoint_format, self.bias)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape, self.out_features)

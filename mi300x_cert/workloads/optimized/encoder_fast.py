"""The Whisper encoder with fewer round trips of its activations through device memory.

:class:`FastEncoder` computes the same function as transformers' ``WhisperEncoder`` (eval mode)
over that module's own weights, written so that a compiler keeps copies out, with two optional
kernels of its own:

* **Attention layouts** (always). transformers makes the query (scaled), key and value contiguous
  in ``[batch, heads, frames, head_dim]`` before the fused attention kernel and the kernel's output
  contiguous again before the output projection: four copies of a ``[batch, 1500, 1280]`` tensor
  per layer (≈ 30 ms of a 650 ms chunk of 128 clips of large-v3 on an H200). Here the three
  projections go to ``scaled_dot_product_attention`` as strided views of their outputs, the
  query's scale as the kernel's ``scale`` (the same arithmetic where the scale is a power of two,
  as for every published Whisper size, head size 64; else equal to rounding), and the output,
  laid out like the query, comes back as a view.
* **The MLP's GELU** (``mlp="fused"``): the first product, its bias and the exact (erf) GELU in one
  Triton kernel (:func:`linear_gelu`: persistent, bulk tensor-memory loads on Hopper), so the
  product's output is written once instead of written, read and written again.
* **Residual adds with the next LayerNorm** (``norm="fused"``): ``h = r + y`` (clamped in float16
  as transformers clamps each layer's output), written, and ``LayerNorm(h)`` in one Triton
  program per row (:func:`add_layer_norm`).

The optimized path uses both where they run (docs/performance.md: run 67 on an H200); without
triton or off the GPU they are the library's ops. Same output as the library encoder up to the rounding of reordered
float sums (CPU tests compare them; GPU tests compare the kernels with the library's ops).
"""

from __future__ import annotations

import functools
from typing import Any

__all__ = ["FastEncoder", "add_layer_norm", "linear_gelu", "LINEAR_GELU_CONFIGS", "KERNEL_FORMS"]

KERNEL_FORMS = ("library", "fused")  # FastEncoder's mlp= and norm=

# (block_m, block_n, block_k, warps, stages, group_m): launch settings of the fused kernel; the
# first is the default (Inductor's best persistent bulk-copy template for this shape on an H200).
LINEAR_GELU_CONFIGS: tuple[tuple[int, int, int, int, int, int], ...] = (
    (128, 256, 64, 8, 3, 8), (128, 128, 64, 8, 4, 8), (128, 128, 64, 4, 4, 8), (256, 128, 64, 8, 3, 8))


@functools.cache
def _kernel() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def _linear_gelu_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, N, K: tl.constexpr, BM: tl.constexpr,
                            BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                            PROGRAMS: tl.constexpr, ITERS: tl.constexpr):
        # Persistent: PROGRAMS programs walk the output tiles (grouped along M so that a group's
        # programs share the rows of x in L2), ITERS tiles each; the last tile is repeated where
        # the tiles run out (the same values written again), so every loop bound is a constant
        # (which triton's CPU interpreter needs; one compilation per distinct row count, e.g. a
        # batch's last, smaller chunk of clips).
        xd = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[K, 1], block_shape=[BM, BK])
        wd = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[K, 1], block_shape=[BN, BK])
        yd = tl.make_tensor_descriptor(y_ptr, shape=[M, N], strides=[N, 1], block_shape=[BM, BN])
        npm = tl.cdiv(M, BM)
        npn = tl.cdiv(N, BN)
        tiles = npm * npn
        per_group = GROUP_M * npn
        pid = tl.program_id(0)
        for it in tl.range(0, ITERS, flatten=True):
            tile = tl.minimum(pid + it * PROGRAMS, tiles - 1)
            first_m = (tile // per_group) * GROUP_M
            size_m = tl.minimum(npm - first_m, GROUP_M)
            pm = first_m + (tile % per_group) % size_m
            pn = (tile % per_group) // size_m
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            for ki in range(0, tl.cdiv(K, BK)):
                a = xd.load([pm * BM, ki * BK])
                w = wd.load([pn * BN, ki * BK])
                acc = tl.dot(a, w.T, acc)
            cols = pn * BN + tl.arange(0, BN)
            bias = tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
            # The product rounded as the library's product-with-bias writes it, then the GELU in
            # float32 in the order of the library's kernel: (y · ½) · (erf(y · √½) + 1).
            y = (acc + bias[None, :]).to(tl.float16).to(tl.float32)
            y = (y * 0.5) * (tl.math.erf(y * 0.7071067811865476) + 1.0)
            yd.store([pm * BM, pn * BN], y.to(tl.float16))

    return _linear_gelu_kernel


def _programs(device: Any) -> int:
    """One program per multiprocessor on a GPU; 4 in triton's CPU interpreter."""
    if str(device).startswith("cuda"):
        from .hidden_attn_cuda import persist_blocks

        return persist_blocks(device)
    return 4


def _on_device(device: Any) -> Any:
    """The launch's device as the current one (a no-op off CUDA, e.g. in triton's CPU interpreter)."""
    import contextlib

    import torch

    if getattr(device, "type", str(device).split(":")[0]) == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def linear_gelu_triton(x: Any, w: Any, b: Any, config: tuple[int, ...] | None = None) -> Any:
    """``gelu(x @ wᵀ + b)`` (exact GELU) by the fused Triton kernel: x [..., K] float16, w [N, K],
    b [N]; K and N multiples of 8 (the bulk copies' 16-byte rows)."""
    import torch
    import triton

    if x.dtype != torch.float16 or w.dtype != torch.float16 or b.dtype != torch.float16:
        raise ValueError(f"linear_gelu: float16 operands, got {x.dtype}, {w.dtype}, {b.dtype}")
    K = int(x.shape[-1])
    N = int(w.shape[0])
    if w.dim() != 2 or int(w.shape[1]) != K:
        raise ValueError(f"linear_gelu: w must be [N, {K}] (x's last dimension), got {tuple(w.shape)}")
    if tuple(b.shape) != (N,):
        raise ValueError(f"linear_gelu: b must be [{N}] (w's rows), got {tuple(b.shape)}")
    if K % 8 or N % 8:
        raise ValueError(f"linear_gelu: K and N must be multiples of 8, got K={K}, N={N}")
    bm, bn, bk, warps, stages, group = config or LINEAR_GELU_CONFIGS[0]
    x2 = x.reshape(-1, K).contiguous()
    w = w.contiguous()
    # the bulk copies need 16-byte aligned bases: a view at an odd offset is copied first
    x2 = x2 if x2.data_ptr() % 16 == 0 else x2.clone()
    w = w if w.data_ptr() % 16 == 0 else w.clone()
    M = int(x2.shape[0])
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0:
        return y.view(*x.shape[:-1], N)
    dev = x.device

    def alloc(size: int, alignment: int, stream: Any) -> Any:  # the kernel's tensor descriptors
        return torch.empty(size, dtype=torch.int8, device=dev)

    triton.set_allocator(alloc)
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    programs = max(1, min(_programs(dev), tiles))
    with _on_device(dev):
        _kernel()[(programs,)](x2, w, b.contiguous(), y, M, N, K=K, BM=bm, BN=bn, BK=bk,
                               GROUP_M=group, PROGRAMS=programs, ITERS=triton.cdiv(tiles, programs),
                               num_warps=warps, num_stages=stages)
    return y.view(*x.shape[:-1], N)


@functools.cache
def _op() -> Any:
    """The fused product as a custom operator (opaque to ``torch.compile``, which keeps the rest of
    the layer compiled around it); the library's ops where the Triton kernel cannot run."""
    import torch
    import torch.nn.functional as F

    @torch.library.custom_op("mi300x_cert::linear_gelu", mutates_args=(),
                             schema="(Tensor x, Tensor w, Tensor b) -> Tensor")
    def _linear_gelu(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and x.dtype == torch.float16 and _supported(str(x.device)):
            return linear_gelu_triton(x, w, b)
        return F.gelu(F.linear(x, w, b))

    @_linear_gelu.register_fake
    def _(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return x.new_empty((*x.shape[:-1], w.shape[0]))

    return _linear_gelu


def linear_gelu(x: Any, w: Any, b: Any) -> Any:
    """``gelu(linear(x, w, b))``: the fused kernel on a GPU with float16 operands, else the library."""
    _op()
    import torch

    return torch.ops.mi300x_cert.linear_gelu(x, w, b)


@functools.cache
def _ln_kernel() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def _add_ln_kernel(r_ptr, y_ptr, w_ptr, b_ptr, h_ptr, o_ptr, rows, eps, bound, N: tl.constexpr,
                       BLOCK: tl.constexpr, ROWS: tl.constexpr, CLAMP: tl.constexpr):
        # ROWS rows per program, each whole in registers: r and y read once, h and LayerNorm(h)
        # written once. The arithmetic of the library's ops: the sum rounded to the inputs' dtype
        # (then clamped in float32 and rounded again, as torch.clamp does), mean and variance of
        # that in float32, the normalized row times the weight plus the bias rounded once.
        cols = tl.arange(0, BLOCK)
        cm = cols < N
        w = tl.load(w_ptr + cols, mask=cm, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cols, mask=cm, other=0.0).to(tl.float32)
        for i in range(ROWS):
            row = tl.program_id(0) * ROWS + i
            m = cm & (row < rows)
            off = row.to(tl.int64) * N + cols
            r = tl.load(r_ptr + off, mask=m, other=0.0).to(tl.float32)
            y = tl.load(y_ptr + off, mask=m, other=0.0).to(tl.float32)
            h = (r + y).to(h_ptr.dtype.element_ty).to(tl.float32)
            if CLAMP:
                # NaN stays NaN, as in torch.clamp (Triton's min/max would drop it by default)
                h = tl.minimum(tl.maximum(h, -bound, propagate_nan=tl.PropagateNan.ALL), bound,
                               propagate_nan=tl.PropagateNan.ALL).to(h_ptr.dtype.element_ty).to(tl.float32)
            tl.store(h_ptr + off, h.to(h_ptr.dtype.element_ty), mask=m)
            mean = tl.sum(h, axis=0) / N
            d = tl.where(cm, h - mean, 0.0)
            var = tl.sum(d * d, axis=0) / N
            o = d * (1.0 / tl.sqrt(var + eps)) * w + b
            tl.store(o_ptr + off, o.to(o_ptr.dtype.element_ty), mask=m)

    return _add_ln_kernel


# clamp bound of transformers' encoder layers in float16: finfo(float16).max - 1000
FP16_CLAMP = 65504.0 - 1000.0


def add_layer_norm_triton(r: Any, y: Any, w: Any, b: Any, eps: float, clamp: bool,
                          rows_per_program: int = 1, warps: int = 4) -> tuple[Any, Any]:
    """``h = r + y`` (clamped to ±(float16 max − 1000) when ``clamp``) and ``layer_norm(h, w, b, eps)``
    by one Triton kernel: r, y [..., N] of one float dtype, w and b [N]. Returns (h, normed)."""
    import torch
    import triton

    if r.shape != y.shape or r.dtype != y.dtype:
        raise ValueError(f"add_layer_norm: r and y must have one shape and dtype, got {tuple(r.shape)} "
                         f"{r.dtype} and {tuple(y.shape)} {y.dtype}")
    N = int(r.shape[-1])
    if tuple(w.shape) != (N,) or tuple(b.shape) != (N,):
        raise ValueError(f"add_layer_norm: w and b must be [{N}], got {tuple(w.shape)} and {tuple(b.shape)}")
    if rows_per_program < 1:
        raise ValueError(f"add_layer_norm: rows_per_program must be >= 1, got {rows_per_program}")
    r2, y2 = r.reshape(-1, N).contiguous(), y.reshape(-1, N).contiguous()
    rows = int(r2.shape[0])
    h = torch.empty_like(r2)
    o = torch.empty_like(r2)
    if rows:
        with _on_device(r.device):
            _ln_kernel()[(triton.cdiv(rows, rows_per_program),)](
                r2, y2, w.contiguous(), b.contiguous(), h, o, rows, float(eps), FP16_CLAMP, N=N,
                BLOCK=triton.next_power_of_2(N), ROWS=rows_per_program, CLAMP=bool(clamp), num_warps=warps)
    return h.view(r.shape), o.view(r.shape)


def add_layer_norm_reference(r: Any, y: Any, w: Any, b: Any, eps: float, clamp: bool) -> tuple[Any, Any]:
    """The library's ops for :func:`add_layer_norm_triton` (the encoder layer's own code)."""
    import torch
    import torch.nn.functional as F

    h = r + y
    if clamp:
        h = torch.clamp(h, min=-FP16_CLAMP, max=FP16_CLAMP)
    return h, F.layer_norm(h, (int(h.shape[-1]),), w, b, eps)


@functools.cache
def _ln_op() -> Any:
    """The add + LayerNorm as a custom operator (opaque to ``torch.compile``); the library's ops
    where the Triton kernel cannot run."""
    import torch

    @torch.library.custom_op("mi300x_cert::add_layer_norm", mutates_args=(),
                             schema="(Tensor r, Tensor y, Tensor w, Tensor b, float eps, bool clamp) "
                                    "-> (Tensor, Tensor)")
    def _add_ln(r: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float,
                clamp: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if r.is_cuda:
            return add_layer_norm_triton(r, y, w, b, eps, clamp)
        h, o = add_layer_norm_reference(r, y, w, b, eps, clamp)
        return h.contiguous(), o.contiguous()   # the fake's layout, whatever r's

    @_add_ln.register_fake
    def _(r: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float,
          clamp: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return r.new_empty(r.shape), r.new_empty(r.shape)

    return _add_ln


def add_layer_norm(r: Any, y: Any, w: Any, b: Any, eps: float, clamp: bool) -> tuple[Any, Any]:
    """(h, LayerNorm(h)) with h = r + y, clamped where asked: the Triton kernel on a GPU, else the library."""
    _ln_op()
    import torch

    return torch.ops.mi300x_cert.add_layer_norm(r, y, w, b, float(eps), bool(clamp))


@functools.cache
def _supported(device: str) -> bool:
    return fused_mlp_supported(device)[0]


def fused_mlp_supported(device: str) -> tuple[bool, str]:
    """Whether the fused kernel can run here: triton with tensor descriptors and a CUDA card of compute
    capability ≥ 9 (bulk tensor copies)."""
    try:
        import torch
        import triton.language as tl
    except Exception as e:  # pragma: no cover - triton ships with torch on GPUs
        return False, f"triton unavailable ({type(e).__name__})"
    if not hasattr(tl, "make_tensor_descriptor"):
        return False, "this triton has no tensor descriptors"
    if not str(device).startswith("cuda") or not torch.cuda.is_available() or torch.version.hip:
        return False, "needs an NVIDIA card"
    major, _minor = torch.cuda.get_device_capability(device)
    if major < 9:
        return False, f"compute capability {major}.x has no bulk tensor copies"
    return True, "ok"


class FastEncoder:
    """``WhisperEncoder.forward`` (eval) as a plain function of the input features over the encoder's
    own modules; returns the last hidden state [batch, frames, d_model]. ``mlp`` / ``norm``:
    ``"library"`` (the library's ops, compiled with the rest) or ``"fused"`` (this module's kernels)."""

    def __init__(self, encoder: Any, *, mlp: str = "library", norm: str = "library") -> None:
        import torch

        for name, val in (("mlp", mlp), ("norm", norm)):
            if val not in KERNEL_FORMS:
                raise ValueError(f"{name} must be one of {KERNEL_FORMS}, got {val!r}")
        self.encoder = encoder
        self.mlp = mlp
        self.norm = norm
        # the operators are registered here, not while torch.compile traces the layers
        self._linear_gelu: Any = None
        self._add_ln: Any = None
        if mlp == "fused":
            _op()
            self._linear_gelu = torch.ops.mi300x_cert.linear_gelu
        if norm == "fused":
            _ln_op()
            self._add_ln = torch.ops.mi300x_cert.add_layer_norm
        cfg = encoder.config
        if encoder.training:
            raise ValueError("FastEncoder computes the encoder in eval mode; call encoder.eval() first")
        if len(encoder.layers) < 1:
            raise ValueError("FastEncoder: the encoder has no layers")
        self.heads = int(cfg.encoder_attention_heads)
        self.expected_len = (int(cfg.max_source_positions) * int(encoder.conv1.stride[0])
                             * int(encoder.conv2.stride[0]))
        act = str(getattr(cfg, "activation_function", "gelu"))
        if act != "gelu":
            raise ValueError(f"FastEncoder: activation_function 'gelu' expected, got {act!r}")

    def __call__(self, input_features: Any) -> Any:
        import torch
        import torch.nn.functional as F

        enc = self.encoder
        if int(input_features.shape[-1]) != self.expected_len:
            raise ValueError(f"Whisper expects the mel input features to be of length {self.expected_len}, "
                             f"but found {int(input_features.shape[-1])}")
        x = F.gelu(enc.conv1(input_features))
        x = F.gelu(enc.conv2(x)).permute(0, 2, 1)
        h = (x + enc.embed_positions.weight).contiguous()   # rows of d_model, as the kernels want them
        clamp = h.dtype == torch.float16
        layers = list(enc.layers)
        x = layers[0].self_attn_layer_norm(h)
        # Each layer: h += attention(x); x = final_norm(h); h += mlp(x), clamped in float16; and x =
        # the next layer's first norm of h (the encoder's last norm after the last layer).
        for i, layer in enumerate(layers):
            h, x = self._add_norm(h, self._attention(layer, x), layer.final_layer_norm, False)
            nxt = layers[i + 1].self_attn_layer_norm if i + 1 < len(layers) else enc.layer_norm
            h, x = self._add_norm(h, self._mlp(layer, x), nxt, clamp)
        return x

    def _attention(self, layer: Any, x: Any) -> Any:
        import torch.nn.functional as F

        B, T, E = (int(s) for s in x.shape)
        H = self.heads
        D = E // H
        sa = layer.self_attn
        q = sa.q_proj(x).view(B, T, H, D).transpose(1, 2)   # strided views: no layout copies
        k = sa.k_proj(x).view(B, T, H, D).transpose(1, 2)
        v = sa.v_proj(x).view(B, T, H, D).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v, scale=float(sa.scaling))
        return sa.out_proj(a.transpose(1, 2).reshape(B, T, E))

    def _mlp(self, layer: Any, x: Any) -> Any:
        import torch.nn.functional as F

        if self._linear_gelu is not None:
            m = self._linear_gelu(x, layer.fc1.weight, layer.fc1.bias)
        else:
            m = F.gelu(layer.fc1(x))
        return layer.fc2(m)

    def _add_norm(self, h: Any, y: Any, ln: Any, clamp: bool) -> tuple[Any, Any]:
        if self._add_ln is not None:
            return self._add_ln(h, y, ln.weight, ln.bias, float(ln.eps), bool(clamp))
        return add_layer_norm_reference(h, y, ln.weight, ln.bias, float(ln.eps), clamp)

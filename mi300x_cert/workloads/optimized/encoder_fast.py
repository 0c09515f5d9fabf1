"""The Whisper encoder with fewer round trips of its activations through device memory.

:class:`FastEncoder` computes the same function as transformers' ``WhisperEncoder`` (eval mode)
over that module's own weights, written so that a compiler keeps two kinds of copies out:

* **Attention layouts.** transformers makes the query (scaled), key and value contiguous in
  ``[batch, heads, frames, head_dim]`` before the fused attention kernel and the kernel's output
  contiguous again before the output projection: four copies of a ``[batch, 1500, 1280]`` tensor
  per layer (≈ 30 ms of a 640 ms chunk of 128 clips of large-v3 on an H200). Here the three
  projections go to ``scaled_dot_product_attention`` as strided views of their outputs, the
  query's scale as the kernel's ``scale`` (the same scaling: a power of two for every Whisper
  size), and the output, laid out like the query, comes back as a view.
* **The MLP's GELU** (``mlp="fused"``): the first product, its bias and the exact (erf) GELU in one
  Triton kernel (:func:`linear_gelu`: persistent, bulk tensor-memory loads on Hopper), so the
  product's output is written once instead of written, read and written again. Off by default
  (measured per card: docs/performance.md); without triton or off the GPU it is the library's
  ``gelu(linear(x))``.

Same output as the library encoder up to the rounding of reordered float sums (CPU tests compare
them; GPU tests compare the kernel with the library's product and GELU).
"""

from __future__ import annotations

from typing import Any

__all__ = ["FastEncoder", "linear_gelu", "LINEAR_GELU_CONFIGS", "MLP_FORMS"]

MLP_FORMS = ("library", "fused")

# (block_m, block_n, block_k, warps, stages, group_m): launch settings of the fused kernel; the
# first is the default (Inductor's best persistent bulk-copy template for this shape on an H200).
LINEAR_GELU_CONFIGS: tuple[tuple[int, int, int, int, int, int], ...] = (
    (128, 256, 64, 8, 3, 8), (128, 128, 64, 8, 4, 8), (128, 128, 64, 4, 4, 8), (256, 128, 64, 8, 3, 8))

_KERNEL: Any = None


def _kernel() -> Any:
    global _KERNEL
    if _KERNEL is not None:
        return _KERNEL
    import triton
    import triton.language as tl

    @triton.jit
    def _linear_gelu_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, N, K: tl.constexpr, BM: tl.constexpr,
                            BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                            PROGRAMS: tl.constexpr, ITERS: tl.constexpr):
        # Persistent: PROGRAMS programs walk the output tiles (grouped along M so that a group's
        # programs share the rows of x in L2), ITERS tiles each; the last tile is repeated where
        # the tiles run out (the same values written again), so every loop bound is a constant.
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

    _KERNEL = _linear_gelu_kernel
    return _KERNEL


def _programs(device: Any) -> int:
    import torch

    if str(device).startswith("cuda") and torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(device).multi_processor_count)
    return 4


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
    _kernel()[(programs,)](x2, w.contiguous(), b.contiguous(), y, M, N, K=K, BM=bm, BN=bn, BK=bk,
                           GROUP_M=group, PROGRAMS=programs, ITERS=triton.cdiv(tiles, programs),
                           num_warps=warps, num_stages=stages)
    return y.view(*x.shape[:-1], N)


_OP: Any = None


def _op() -> Any:
    """The fused product as a custom operator (opaque to ``torch.compile``, which keeps the rest of
    the layer compiled around it); the library's ops where the Triton kernel cannot run."""
    global _OP
    if _OP is not None:
        return _OP
    import torch
    import torch.nn.functional as F

    @torch.library.custom_op("mi300x_cert::linear_gelu", mutates_args=(),
                             schema="(Tensor x, Tensor w, Tensor b) -> Tensor")
    def _linear_gelu(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and x.dtype == torch.float16:
            return linear_gelu_triton(x, w, b)
        return F.gelu(F.linear(x, w, b))

    @_linear_gelu.register_fake
    def _(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return x.new_empty((*x.shape[:-1], w.shape[0]))

    _OP = _linear_gelu
    return _OP


def linear_gelu(x: Any, w: Any, b: Any) -> Any:
    """``gelu(linear(x, w, b))``: the fused kernel on a GPU with float16 operands, else the library."""
    _op()
    import torch

    return torch.ops.mi300x_cert.linear_gelu(x, w, b)


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
    own modules; returns the last hidden state [batch, frames, d_model]."""

    def __init__(self, encoder: Any, *, mlp: str = "library") -> None:
        if mlp not in MLP_FORMS:
            raise ValueError(f"mlp must be one of {MLP_FORMS}, got {mlp!r}")
        self.encoder = encoder
        self.mlp = mlp
        self._linear_gelu: Any = None
        if mlp == "fused":  # registered here, not while torch.compile traces the layers
            import torch

            _op()
            self._linear_gelu = torch.ops.mi300x_cert.linear_gelu
        cfg = encoder.config
        self.heads = int(cfg.encoder_attention_heads)
        self.frames = int(encoder.embed_positions.weight.shape[0])
        self.expected_len = int(cfg.max_source_positions) * int(encoder.conv1.stride[0]) * int(encoder.conv2.stride[0])
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
        h = x + enc.embed_positions.weight
        fp16 = h.dtype == torch.float16
        clamp = torch.finfo(torch.float16).max - 1000
        for layer in enc.layers:
            h = self._layer(layer, h)
            if fp16:
                h = torch.clamp(h, min=-clamp, max=clamp)
        return enc.layer_norm(h)

    def _layer(self, layer: Any, h: Any) -> Any:
        import torch.nn.functional as F

        B, T, E = (int(s) for s in h.shape)
        H = self.heads
        D = E // H
        sa = layer.self_attn
        x = layer.self_attn_layer_norm(h)
        q = sa.q_proj(x).view(B, T, H, D).transpose(1, 2)   # strided views: no layout copies
        k = sa.k_proj(x).view(B, T, H, D).transpose(1, 2)
        v = sa.v_proj(x).view(B, T, H, D).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v, scale=float(sa.scaling))
        h = h + sa.out_proj(a.transpose(1, 2).reshape(B, T, E))
        x = layer.final_layer_norm(h)
        if self.mlp == "fused":
            m = self._linear_gelu(x, layer.fc1.weight, layer.fc1.bias)
        else:
            m = F.gelu(layer.fc1(x))
        return h + layer.fc2(m)


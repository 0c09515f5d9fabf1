"""Optimized Whisper greedy decoding: static KV cache + one fixed-shape decode step captured as a
device graph per batch size, written with plain torch over the Hugging Face model's own weights.

Per batch: the encoder runs once (compiled on GPUs, in chunks of clips); either its output is kept
as is (hidden form, below) or the cross-attention K/V of every decoder layer are projected once
from it (K/V form); then ``prompt_len + new_tokens - 1`` replays of the decode step graph. The step
reads its position from a device counter (so the same graph serves every position), writes the
new self-attention K/V into the static cache at that position, attends over the cache with a mask
for the not-yet-written positions, applies the generation rules stock ``generate`` applies
(suppressed tokens, begin-suppressed tokens at the first generated position, EOS suppressed until
``min_new_tokens``), takes the arg-max and advances the counter — all on the device, so the host
only replays. Greedy, like the stock path; same tokens on the same inputs (checked on the CPU
against ``WhisperForConditionalGeneration.generate``; on a GPU a few arg-max ties may resolve
differently in fp16 — the bench reports the agreement).

Cross-attention comes in two forms (``cross``): "kv" keeps every layer's projected K/V (what stock
does), "hidden" keeps only the encoder output and folds the K/V projections into the query and the
output (exact algebra, see :class:`HiddenAttention`): half the bytes per step and 1/64 of the
memory for large-v3; it is the default where the triton kernel runs. On NVIDIA cards a hand-written
CUDA kernel for the same function (:mod:`.hidden_attn_cuda`) competes with the Triton launch
configurations, timed per batch size.

Attention for the single query of a step (K/V form): cross-attention through SDPA or, where it is clearly
faster on the card (timed per batch size on the batch's own caches), :class:`DecodeAttention`, a
Triton kernel that streams each head's K/V once (the step is bound by reading the cross K/V:
32 layers × 2 × 1500 × 1280 fp16 per clip); self-attention through the same kernel reading only
the written cache rows. Without triton (CPU) the K/V form runs through SDPA and the hidden form
through plain torch ops (float32 attention). The encoder runs in chunks of
clips so that large batches fit beside their cross K/V caches.

A stream of batches (:meth:`FastWhisper.generate_many`) can run the next batch's encoder on a
second device stream while the current batch decodes (hidden form, GPU): same tokens as
:meth:`FastWhisper.generate` per batch. It pays only where the encoder's kernels can be resident
beside the decode step's (on an H200 both hidden-form kernels, Triton's and the CUDA one in
:mod:`.hidden_attn_cuda`, fill a multiprocessor's shared memory or registers: measured no gain, see
docs/performance.md).
"""

from __future__ import annotations

import time
from typing import Any

from .common import event_time_us, graphs_supported

__all__ = ["FastWhisper", "whisper_prompt_ids", "CROSS_FORMS", "ENCODER_FORMS"]

# FastWhisper's cross= and encoder= values (see FastWhisper.__init__)
CROSS_FORMS = ("auto", "kv", "hidden")
ENCODER_FORMS = ("auto", "library", "fast", "fast+mlp", "fast+norm", "fast+mlp+norm")


def whisper_prompt_ids(generation_config: Any, language: str | None = "en", task: str = "transcribe") -> list[int]:
    """[<|startoftranscript|>, <|lang|>, <|task|>, <|notimestamps|>] from a generation config."""
    ids = [int(generation_config.decoder_start_token_id)]
    lang_to_id = getattr(generation_config, "lang_to_id", None) or {}
    task_to_id = getattr(generation_config, "task_to_id", None) or {}
    if language and lang_to_id:
        key = language if language.startswith("<|") else f"<|{language}|>"
        if key in lang_to_id:
            ids.append(int(lang_to_id[key]))
    if task and task in task_to_id:
        ids.append(int(task_to_id[task]))
    nts = getattr(generation_config, "no_timestamps_token_id", None)
    if nts is not None:
        ids.append(int(nts))
    return ids


# -- single-query attention (decode) kernel --------------------------------------------------------
_TRITON: dict[str, Any] = {}


def _decode_attn_kernels() -> tuple[Any, Any]:
    """Triton kernels for attention of ONE query per (clip, head) over a [S, D] K/V slab.

    ``_attn_part``: grid (B·H, splits); each program streams its share of K and V once (the
    bytes that bound a decode step), keeps an online softmax in float32 and writes either the
    normalized fp16 output (one split) or (max, sum, unnormalized acc) partials that
    ``_attn_combine`` merges. An optional device length (self-attention: position + 1) limits
    the keys read. Built on first use (no triton import at module import).
    """
    if "part" in _TRITON:
        return _TRITON["part"], _TRITON["combine"]
    import triton
    import triton.language as tl

    @triton.jit
    def _attn_part(Q, K, V, O, Mp, Lp, Ap, LenPtr, S, stride_kbh, stride_vbh, CHUNK: tl.constexpr,
                   D: tl.constexpr, BLOCK_N: tl.constexpr, NSPLIT: tl.constexpr, HAS_LEN: tl.constexpr):
        bh = tl.program_id(0)
        sp = tl.program_id(1)
        if HAS_LEN:
            n = tl.load(LenPtr).to(tl.int32) + 1
        else:
            n = S
        start = sp * CHUNK
        end = tl.minimum(start + CHUNK, n)
        offs_d = tl.arange(0, D)
        q = tl.load(Q + bh * D + offs_d).to(tl.float32)
        kb = K + bh.to(tl.int64) * stride_kbh
        vb = V + bh.to(tl.int64) * stride_vbh
        zero = tl.zeros([BLOCK_N], dtype=tl.float32)
        m_i = tl.sum(zero, 0) - 1.0e30
        l_i = tl.sum(zero, 0)
        acc = tl.zeros([D], dtype=tl.float32)
        for i0 in range(0, CHUNK, BLOCK_N):
            if start + i0 < end:  # blocks past the written keys are skipped, the last one masked
                offs_n = start + i0 + tl.arange(0, BLOCK_N)
                msk = offs_n < end
                k = tl.load(kb + offs_n[:, None] * D + offs_d[None, :], mask=msk[:, None], other=0.0).to(tl.float32)
                v = tl.load(vb + offs_n[:, None] * D + offs_d[None, :], mask=msk[:, None], other=0.0).to(tl.float32)
                s = tl.sum(k * q[None, :], 1)
                s = tl.where(msk, s, -1.0e30 * 2)
                m_new = tl.maximum(m_i, tl.max(s, 0))
                alpha = tl.exp(m_i - m_new)
                p = tl.exp(s - m_new)
                p = tl.where(msk, p, 0.0)
                l_i = l_i * alpha + tl.sum(p, 0)
                acc = acc * alpha + tl.sum(p[:, None] * v, 0)
                m_i = m_new
        if NSPLIT == 1:
            tl.store(O + bh * D + offs_d, (acc / l_i).to(O.dtype.element_ty))
        else:
            tl.store(Ap + (bh * NSPLIT + sp) * D + offs_d, acc)
            tl.store(Mp + bh * NSPLIT + sp, m_i)
            tl.store(Lp + bh * NSPLIT + sp, l_i)

    @triton.jit
    def _attn_combine(O, Mp, Lp, Ap, D: tl.constexpr, NSPLIT: tl.constexpr):
        bh = tl.program_id(0)
        offs_s = tl.arange(0, NSPLIT)
        offs_d = tl.arange(0, D)
        m = tl.load(Mp + bh * NSPLIT + offs_s)
        l = tl.load(Lp + bh * NSPLIT + offs_s)
        a = tl.load(Ap + (bh * NSPLIT + offs_s[:, None]) * D + offs_d[None, :])
        mx = tl.max(m, 0)
        w = tl.exp(m - mx)
        out = tl.sum(a * w[:, None], 0) / tl.sum(l * w, 0)
        tl.store(O + bh * D + offs_d, out.to(O.dtype.element_ty))

    _TRITON["part"], _TRITON["combine"] = _attn_part, _attn_combine
    return _attn_part, _attn_combine


class DecodeAttention:
    """out[b, h] = softmax(q[b, h] · K[b, h]ᵀ) V[b, h] for one query, K/V [B, H, S, D] contiguous,
    q [B, H, D] contiguous (already scaled). ``length`` (a device tensor holding position) limits
    the keys to ``position + 1``. Launch-only: safe inside a device-graph capture."""

    def __init__(self, B: int, H: int, S: int, D: int, *, block_n: int = 64, splits: int = 1,
                 num_warps: int = 4, device: Any = None, dtype: Any = None) -> None:
        import torch

        self.B, self.H, self.S, self.D = B, H, S, D
        self.block_n, self.splits, self.num_warps = int(block_n), int(splits), int(num_warps)
        chunk = -(-S // self.splits)
        self.chunk = -(-chunk // self.block_n) * self.block_n
        self.out = torch.empty(B, H, D, device=device, dtype=dtype)
        n = max(self.splits, 1)
        self.mp = torch.empty(B * H * n, device=device, dtype=torch.float32)
        self.lp = torch.empty(B * H * n, device=device, dtype=torch.float32)
        self.ap = torch.empty(B * H * n * D, device=device, dtype=torch.float32)
        self.part, self.combine = _decode_attn_kernels()

    def label(self) -> str:
        return f"triton decode attention (block {self.block_n}, splits {self.splits}, warps {self.num_warps})"

    def __call__(self, q: Any, k: Any, v: Any, length: Any = None) -> Any:
        BH = self.B * self.H
        self.part[(BH, self.splits)](
            q, k, v, self.out, self.mp, self.lp, self.ap, length if length is not None else q,
            self.S, k.stride(1), v.stride(1), CHUNK=self.chunk,
            D=self.D, BLOCK_N=self.block_n, NSPLIT=self.splits, HAS_LEN=length is not None,
            num_warps=self.num_warps)
        if self.splits > 1:
            self.combine[(BH,)](self.out, self.mp, self.lp, self.ap, D=self.D, NSPLIT=self.splits, num_warps=1)
        return self.out


# -- cross-attention over the encoder output itself (no K/V caches) ------------------------------
#
# Every decoder layer's cross-attention reads the SAME encoder output X [S, E] of a clip through its
# own projections: k_j = W_k x_j, v_j = W_v x_j + b_v. For head h (rows W_k,h, W_v,h of the
# projections), exactly:
#     score_j = q_h · (W_k,h x_j) = (W_k,hᵀ q_h) · x_j = q'_h · x_j
#     out_h   = Σ_j p_j (W_v,h x_j + b_v,h) = W_v,h (Σ_j p_j x_j) + b_v,h      (Σ_j p_j = 1)
# (a bias of k only adds a per-query constant to all scores: softmax ignores it). So a step needs
# q' = W_kᵀ q per head, one attention of all H heads over the single shared "head" X [S, E] (K = V
# = X), and W_v per head on the result. Bytes per layer and step: X once (S·E) instead of K and V
# (2·S·E); memory per clip: S·E once instead of 2·L·S·E (64× less for large-v3).


def _hidden_attn_kernel() -> Any:
    """Triton kernel: for one clip and a group of heads, softmax(Q' Xᵀ) X over the clip's X,
    streaming X once (each block of rows feeds both the scores and the weighted sum). E is split
    in NSL slices of BE columns (E = NSL·BE, NSL ≤ 5) held as separate accumulators."""
    if "hidden" in _TRITON:
        return _TRITON["hidden"]
    import triton
    import triton.language as tl

    @triton.jit
    def _hidden_part(Q, X, O, Mp, Lp, Ap, S, H, sqb, sqh, sob, soh, CHUNK: tl.constexpr, E: tl.constexpr, BE: tl.constexpr,
                     NSL: tl.constexpr, HG: tl.constexpr, GH: tl.constexpr, BN: tl.constexpr,
                     NSPLIT: tl.constexpr):
        g = tl.program_id(0)   # head group (fastest: the groups of one clip read the same X together)
        sp = tl.program_id(1)  # split of the rows of X
        b = tl.program_id(2)   # clip
        rows = tl.arange(0, HG)
        offs_h = g * GH + rows
        hmask = (rows < GH) & (offs_h < H)
        offs_e = tl.arange(0, BE)
        qb = Q + b.to(tl.int64) * sqb + offs_h[:, None] * sqh + offs_e[None, :]
        q0 = tl.load(qb, mask=hmask[:, None], other=0.0)
        q1 = q0
        q2 = q0
        q3 = q0
        q4 = q0
        if NSL > 1:
            q1 = tl.load(qb + BE, mask=hmask[:, None], other=0.0)
        if NSL > 2:
            q2 = tl.load(qb + 2 * BE, mask=hmask[:, None], other=0.0)
        if NSL > 3:
            q3 = tl.load(qb + 3 * BE, mask=hmask[:, None], other=0.0)
        if NSL > 4:
            q4 = tl.load(qb + 4 * BE, mask=hmask[:, None], other=0.0)
        acc0 = tl.zeros([HG, BE], dtype=tl.float32)
        acc1 = tl.zeros([HG, BE], dtype=tl.float32)
        acc2 = tl.zeros([HG, BE], dtype=tl.float32)
        acc3 = tl.zeros([HG, BE], dtype=tl.float32)
        acc4 = tl.zeros([HG, BE], dtype=tl.float32)
        m_i = tl.zeros([HG], dtype=tl.float32) - 1.0e30
        l_i = tl.zeros([HG], dtype=tl.float32)
        start = sp * CHUNK
        end = tl.minimum(start + CHUNK, S)
        xrow = X + b.to(tl.int64) * S * E
        for i0 in range(0, CHUNK, BN):
            offs_n = start + i0 + tl.arange(0, BN)
            nmask = offs_n < end
            xb = xrow + offs_n[:, None] * E + offs_e[None, :]
            x0 = tl.load(xb, mask=nmask[:, None], other=0.0)
            s = tl.dot(q0, tl.trans(x0))
            x1 = x0
            x2 = x0
            x3 = x0
            x4 = x0
            if NSL > 1:
                x1 = tl.load(xb + BE, mask=nmask[:, None], other=0.0)
                s += tl.dot(q1, tl.trans(x1))
            if NSL > 2:
                x2 = tl.load(xb + 2 * BE, mask=nmask[:, None], other=0.0)
                s += tl.dot(q2, tl.trans(x2))
            if NSL > 3:
                x3 = tl.load(xb + 3 * BE, mask=nmask[:, None], other=0.0)
                s += tl.dot(q3, tl.trans(x3))
            if NSL > 4:
                x4 = tl.load(xb + 4 * BE, mask=nmask[:, None], other=0.0)
                s += tl.dot(q4, tl.trans(x4))
            s = tl.where(nmask[None, :], s, -2.0e30)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            pf = p.to(x0.dtype)
            acc0 = tl.dot(pf, x0, acc0 * alpha[:, None])
            if NSL > 1:
                acc1 = tl.dot(pf, x1, acc1 * alpha[:, None])
            if NSL > 2:
                acc2 = tl.dot(pf, x2, acc2 * alpha[:, None])
            if NSL > 3:
                acc3 = tl.dot(pf, x3, acc3 * alpha[:, None])
            if NSL > 4:
                acc4 = tl.dot(pf, x4, acc4 * alpha[:, None])
            m_i = m_new
        if NSPLIT == 1:
            inv = 1.0 / l_i
            ob = O + b.to(tl.int64) * sob + offs_h[:, None] * soh + offs_e[None, :]
            tl.store(ob, (acc0 * inv[:, None]).to(O.dtype.element_ty), mask=hmask[:, None])
            if NSL > 1:
                tl.store(ob + BE, (acc1 * inv[:, None]).to(O.dtype.element_ty), mask=hmask[:, None])
            if NSL > 2:
                tl.store(ob + 2 * BE, (acc2 * inv[:, None]).to(O.dtype.element_ty), mask=hmask[:, None])
            if NSL > 3:
                tl.store(ob + 3 * BE, (acc3 * inv[:, None]).to(O.dtype.element_ty), mask=hmask[:, None])
            if NSL > 4:
                tl.store(ob + 4 * BE, (acc4 * inv[:, None]).to(O.dtype.element_ty), mask=hmask[:, None])
        else:
            row = (b.to(tl.int64) * H + offs_h) * NSPLIT + sp
            tl.store(Mp + row, m_i, mask=hmask)
            tl.store(Lp + row, l_i, mask=hmask)
            ab = Ap + row[:, None] * E + offs_e[None, :]
            tl.store(ab, acc0, mask=hmask[:, None])
            if NSL > 1:
                tl.store(ab + BE, acc1, mask=hmask[:, None])
            if NSL > 2:
                tl.store(ab + 2 * BE, acc2, mask=hmask[:, None])
            if NSL > 3:
                tl.store(ab + 3 * BE, acc3, mask=hmask[:, None])
            if NSL > 4:
                tl.store(ab + 4 * BE, acc4, mask=hmask[:, None])

    _TRITON["hidden"] = _hidden_part
    return _hidden_part


def hidden_slices(E: int) -> tuple[int, int] | None:
    """(NSL, BE) with E = NSL·BE, BE a power of two ≥ 32 and NSL ≤ 5; None if E has no such split."""
    for be in (256, 128, 64, 32):
        if E % be == 0 and E // be <= 5:
            return E // be, be
    return None


def split_buffers(B: int, H: int, E: int, splits: int, device: Any, dtype: Any) -> tuple[Any, Any, Any, Any]:
    """The output of a hidden-form kernel (a [B, H, E] view of a head-major [H, B, E] buffer, what the
    per-head W_v reads) and its per-split partials: max and sum [B, H, n] and, with more than one
    split, the unnormalized accumulators [B, H, n, E] (else a placeholder)."""
    import torch

    out = torch.empty(H, B, E, device=device, dtype=dtype).transpose(0, 1)
    n = max(int(splits), 1)
    mp = torch.empty(B, H, n, device=device, dtype=torch.float32)
    lp = torch.empty(B, H, n, device=device, dtype=torch.float32)
    ap = torch.empty(B, H, n, E, device=device, dtype=torch.float32) if n > 1 else mp
    return out, mp, lp, ap


def merge_splits(out: Any, mp: Any, lp: Any, ap: Any) -> Any:
    """Merge the per-split softmax partials of :func:`split_buffers` into ``out`` (a few torch ops,
    launch-only: safe inside a device-graph capture); returns ``out``."""
    import torch

    w = torch.exp(mp - mp.amax(dim=-1, keepdim=True))          # [B, H, n]
    num = torch.einsum("bhn,bhne->bhe", w, ap)
    out.copy_(num / (lp * w).sum(-1, keepdim=True))
    return out


def hidden_attention_reference(qp: Any, x: Any, chunk: int = 16) -> Any:
    """softmax(q' xᵀ) x per clip and head in float32 (portable path and reference):
    qp [B, H, E] (scale included), x [B, S, E] -> [B, H, E] in qp's dtype."""
    import torch

    out = torch.empty_like(qp)
    for c0 in range(0, qp.shape[0], chunk):
        q = qp[c0:c0 + chunk].float()
        xx = x[c0:c0 + chunk].float()
        p = torch.softmax(torch.bmm(q, xx.transpose(1, 2)), dim=-1)
        out[c0:c0 + chunk] = torch.bmm(p, xx).to(out.dtype)
    return out


class HiddenAttention:
    """out[b, h] = softmax(q'[b, h] · X[b]ᵀ) X[b] for all heads of a clip over the clip's shared
    encoder output X [B, S, E] (contiguous), q' [B, H, E] with the scale included (any strides
    over B and H, E contiguous: the [H, B, E] result of a per-head matmul is read in place). The
    output is a [B, H, E] view of a head-major [H, B, E] buffer (what the per-head W_v needs).
    Heads go in groups of ``GH`` real rows padded to ``HG`` = ``head_tile`` (16: the matrix units'
    smallest tile, two programs per clip for 20 heads; 32: one program, twice the accumulators);
    rows of X are split ``splits`` ways for parallelism at small batches (partials merged by a few
    torch ops). Launch-only: safe inside a device-graph capture."""

    def __init__(self, B: int, H: int, S: int, E: int, *, block_n: int = 32, splits: int = 1,
                 num_warps: int = 4, num_stages: int = 3, head_tile: int = 16, device: Any = None,
                 dtype: Any = None) -> None:
        sl = hidden_slices(E)
        if sl is None:
            raise ValueError(f"HiddenAttention: d_model {E} does not split into ≤5 power-of-two slices")
        self.NSL, self.BE = sl
        self.B, self.H, self.S, self.E = B, H, S, E
        if head_tile not in (16, 32, 64):
            raise ValueError(f"HiddenAttention: head_tile must be 16, 32 or 64, got {head_tile}")
        self.HG = int(head_tile)
        self.groups = -(-H // self.HG)
        self.GH = -(-H // self.groups)
        self.block_n, self.splits = int(block_n), int(splits)
        self.num_warps, self.num_stages = int(num_warps), int(num_stages)
        chunk = -(-S // self.splits)
        self.chunk = -(-chunk // self.block_n) * self.block_n
        self.out, self.mp, self.lp, self.ap = split_buffers(B, H, E, self.splits, device, dtype)
        self.kernel = _hidden_attn_kernel()

    def label(self) -> str:
        return (f"triton shared-hidden attention (block {self.block_n}, splits {self.splits}, "
                f"warps {self.num_warps}, stages {self.num_stages}, heads {self.GH}/{self.HG} per program)")

    def __call__(self, qp: Any, x: Any) -> Any:
        if qp.stride(2) != 1 or not x.is_contiguous():
            raise ValueError("HiddenAttention: q' needs a contiguous last dimension and X [B, S, E] contiguous")
        self.kernel[(self.groups, self.splits, self.B)](
            qp, x, self.out, self.mp, self.lp, self.ap, self.S, self.H, qp.stride(0), qp.stride(1),
            self.out.stride(0), self.out.stride(1), CHUNK=self.chunk, E=self.E,
            BE=self.BE, NSL=self.NSL, HG=self.HG, GH=self.GH, BN=self.block_n, NSPLIT=self.splits,
            num_warps=self.num_warps, num_stages=self.num_stages)
        return self.out if self.splits == 1 else merge_splits(self.out, self.mp, self.lp, self.ap)


# Candidate launch configurations (block_n, splits, num_warps, num_stages, head_tile) for
# HiddenAttention, timed per batch size on the card.
HIDDEN_ATTN_CONFIGS: tuple[tuple[int, int, int, int, int], ...] = (
    (32, 1, 4, 3, 16), (32, 1, 4, 2, 16), (64, 1, 4, 2, 16), (16, 1, 4, 3, 16), (32, 2, 4, 3, 16),
    (32, 4, 4, 3, 16), (32, 1, 8, 2, 32))


def fastest_config(configs: tuple[tuple[int, ...], ...], key: Any, build: Any, error: Any, limit: float,
                   describe: str, time_us: Any, timed: bool, rec: dict[str, Any], rounds: int = 2) -> tuple[dict[str, float], Any]:
    """Try each launch configuration (only the first where nothing is timed): ``build(cfg)`` makes
    the kernel, ``error(kernel)`` checks it against a reference (over ``limit``, or NaN, rejects
    it; ``describe`` formats the rejection from the error), ``time_us(kernel)`` times it. The
    kernels that pass are timed in ``rounds`` rounds, every other round in reverse order, and each
    scored by its mean: a card that warms up (and slows) steadily while the candidates run one
    after another adds the same to every mean (with an even number of rounds), so the order they
    are tried in does not decide the choice. All the candidates that pass are kept until the choice is made (their buffers with
    them). Returns {key: µs} and (µs, kernel) of the fastest or None; rejections and build/launch
    failures are recorded in ``rec["rejected"]``."""
    times: dict[str, float] = {}
    passed: list[tuple[str, Any]] = []
    keys = [key(cfg) for cfg in configs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"fastest_config: configurations share a key: {sorted(k for k in set(keys) if keys.count(k) > 1)}")
    for cfg in configs if timed else configs[:1]:
        k = key(cfg)
        try:
            kern = build(cfg)
            err = float(error(kern))
            if not err < limit:  # NaN fails too
                times[k] = float("nan")
                rec.setdefault("rejected", {})[k] = describe.format(err)
                continue
            passed.append((k, kern))
        except Exception as e:  # a compile or launch failure: that config is out
            rec.setdefault("rejected", {})[k] = f"{type(e).__name__}: {str(e)[:160]}"
    if not timed:
        for k, _ in passed:
            times[k] = 0.0
        return times, ((0.0, passed[0][1]) if passed else None)
    runs: dict[str, list[float]] = {k: [] for k, _ in passed}
    for r in range(max(1, int(rounds))):
        for k, kern in passed if r % 2 == 0 else passed[::-1]:
            if k not in runs:
                continue
            try:
                runs[k].append(float(time_us(kern)))
            except Exception as e:  # a launch failure while timing: that config is out
                rec.setdefault("rejected", {})[k] = f"{type(e).__name__}: {str(e)[:160]}"
                del runs[k]
    best: tuple[float, Any] | None = None
    for k, kern in passed:
        if k in runs:
            times[k] = sum(runs[k]) / len(runs[k])
            if best is None or times[k] < best[0]:
                best = (times[k], kern)
    return times, best


def tb_per_s(gb: float, us: dict[str, float]) -> dict[str, float | None]:
    """TB/s of each timed kernel reading ``gb`` GB per call in ``us[key]`` µs (None where it was
    rejected: NaN, or not timed)."""
    return {k: (gb / (v * 1e-6) / 1e3 if v == v and v > 0 else None) for k, v in us.items()}


def triton_available(device: str) -> bool:
    """Triton kernels can run here (a CUDA/ROCm device and triton importable), or the interpreter
    is on (``TRITON_INTERPRET=1``, CPU tensors: tests)."""
    import os

    try:
        import triton  # noqa: F401
    except Exception:
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    return str(device).startswith("cuda")


# Candidate launch configurations (block_n, splits, num_warps), timed per batch size on the card.
DECODE_ATTN_CONFIGS: tuple[tuple[int, int, int], ...] = (
    (64, 1, 4), (128, 1, 4), (32, 1, 2), (64, 2, 4), (64, 4, 4), (128, 1, 8))
# Self-attention reads at most prompt + new tokens rows per head: whole-sequence blocks issue all
# of a head's loads at once; the first entry is the one used where nothing is timed.
SELF_ATTN_CONFIGS: tuple[tuple[int, int, int], ...] = (
    (64, 1, 4), (128, 1, 4), (128, 1, 8), (32, 1, 2), (256, 1, 8), (64, 2, 4))


def _done_event() -> Any:
    """A timing event recorded on the current device stream (None without a GPU)."""
    import torch

    if not torch.cuda.is_available():
        return None
    ev = torch.cuda.Event(enable_timing=True)
    ev.record()
    return ev


class FastWhisper:
    """Greedy decoding of ``new_tokens`` tokens per clip with a graph-captured static-cache step."""

    def __init__(
        self,
        model: Any,
        *,
        prompt_ids: list[int],
        new_tokens: int,
        min_new_tokens: int | None = None,
        suppress_tokens: list[int] | None = None,
        begin_suppress_tokens: list[int] | None = None,
        eos_token_id: int | None = None,
        device: str = "cpu",
        graphs: bool = True,
        attn: str = "auto",
        self_attn: str = "triton",
        encoder_chunk: int = 128,
        cross: str = "auto",
        compile_encoder: bool | None = None,
        encoder: str = "auto",
    ) -> None:
        import torch

        self.model = model
        self.device = device
        self.prompt = [int(x) for x in prompt_ids]
        self.new_tokens = int(new_tokens)
        self.min_new = int(new_tokens if min_new_tokens is None else min_new_tokens)
        self.total = len(self.prompt) + self.new_tokens  # sequence length incl. prompt
        dec = model.model.decoder
        self.dec = dec
        self.layers = list(dec.layers)
        cfg = model.config
        self.E = int(cfg.d_model)
        self.H = int(cfg.decoder_attention_heads)
        self.D = self.E // self.H
        self.V = int(cfg.vocab_size)
        self.embed_scale = float(getattr(dec, "embed_scale", 1.0) or 1.0)
        self.dtype = next(model.parameters()).dtype
        w = next(model.parameters())
        self.eos = eos_token_id
        # Additive logit masks (float32, like generate's processed scores): row 0 for the first
        # generated position, row 1 for the following ones.
        base = torch.zeros(self.V, dtype=torch.float32)
        if suppress_tokens:
            base[torch.tensor(sorted(set(int(t) for t in suppress_tokens)), dtype=torch.long)] = float("-inf")
        self.suppress_eos = self.eos is not None and self.min_new > 0
        first = base.clone()
        if begin_suppress_tokens:
            first[torch.tensor(sorted(set(int(t) for t in begin_suppress_tokens)), dtype=torch.long)] = float("-inf")
        # Added to the logits in the model's dtype: 0 and -inf add exactly, and an upcast to float32
        # (what generate's processors see) is exact, so the arg-max is the same.
        self.masks = torch.stack([first, base]).to(device=w.device, dtype=self.dtype)
        self.use_graphs = bool(graphs) and graphs_supported(device)
        if attn not in ("auto", "sdpa", "triton"):
            raise ValueError(f"attn must be 'auto', 'sdpa' or 'triton', got {attn!r}")
        if self_attn not in ("sdpa", "triton"):
            raise ValueError(f"self_attn must be 'sdpa' or 'triton', got {self_attn!r}")
        if cross not in CROSS_FORMS:
            raise ValueError(f"cross must be 'auto', 'kv' or 'hidden', got {cross!r}")
        self.attn = attn
        self.self_attn = self_attn
        # Cross-attention form: "kv" projects K/V of every layer once per batch and keeps them;
        # "hidden" keeps only the encoder output and folds the projections into the query and the
        # output (see HiddenAttention): half the bytes per step, 1/(2L) of the memory. "auto":
        # hidden where the triton kernel runs (it needs it to read X once), else kv.
        self.cross = ("hidden" if triton_available(device) else "kv") if cross == "auto" else cross
        H, D, E = self.H, self.D, self.E
        self.wk = [layer.encoder_attn.k_proj.weight.view(H, D, E) for layer in self.layers]
        self.wvT = [layer.encoder_attn.v_proj.weight.view(H, D, E).transpose(1, 2) for layer in self.layers]
        self.bv = [(layer.encoder_attn.v_proj.bias.view(H, 1, D) if layer.encoder_attn.v_proj.bias is not None
                    else torch.zeros(H, 1, D, dtype=self.dtype, device=w.device)) for layer in self.layers]
        self.encoder_chunk = max(1, int(encoder_chunk))
        # The encoder's form (:mod:`.encoder_fast`): "library" is transformers' module; "fast" the
        # same function without the attention's layout copies; "fast+mlp" also the MLP's first
        # product and GELU in one Triton kernel (NVIDIA, compute capability ≥ 9), "fast+norm" each
        # residual add with the next LayerNorm in one (where triton runs on a GPU), "fast+mlp+norm"
        # both; a kernel that cannot run here is left out, with the reason in the notes. "auto":
        # "fast+mlp+norm" where the encoder is compiled (each kernel where it runs), else "library".
        if encoder not in ENCODER_FORMS:
            raise ValueError(f"encoder must be one of {', '.join(repr(f) for f in ENCODER_FORMS)}, got {encoder!r}")
        self.encoder_form = encoder
        # The encoder (≈2.3 TFLOP per 30 s clip for large-v3) through torch.compile on GPUs: fused
        # norms/GELU/residuals; one specialization per chunk shape, kept in the persistent cache.
        self.compile_encoder = str(device).startswith("cuda") if compile_encoder is None else bool(compile_encoder)
        encoder_notes = []
        if self.encoder_form == "auto":
            hip = bool(getattr(torch.version, "hip", None))
            self.encoder_form = ("fast+mlp+norm" if self.compile_encoder and str(device).startswith("cuda") and not hip
                                 else "library")
            if hip and self.compile_encoder:  # measured on NVIDIA cards only so far
                encoder_notes.append("auto: the library encoder on ROCm (the fast form is not measured there)")
        if "+" in self.encoder_form:
            from .encoder_fast import fused_mlp_supported

            parts = self.encoder_form.split("+")[1:]
            if "mlp" in parts:
                ok, why = fused_mlp_supported(str(device))
                dims = (int(cfg.d_model), int(getattr(cfg, "encoder_ffn_dim", 4 * cfg.d_model)))
                if ok and any(d % 8 for d in dims):
                    ok, why = False, f"d_model and encoder_ffn_dim must be multiples of 8, got {dims}"
                if ok and str(self.dtype) != "torch.float16":
                    ok, why = False, f"the kernel is float16 only, the model is {self.dtype}"
                if not ok:
                    parts.remove("mlp")
                    encoder_notes.append(f"fused MLP not used: {why}")
            if "norm" in parts and not (str(device).startswith("cuda") and triton_available(str(device))):
                parts.remove("norm")
                encoder_notes.append("fused add + LayerNorm not used: needs triton on a GPU")
            self.encoder_form = "+".join(["fast", *parts])
        self._encoder: Any = None
        self._eager_encoder: Any = None
        self._chunks_encoded = 0
        self.encoder_label = "eager"
        self.notes: dict[str, Any] = {"encoder_form": self.encoder_form}  # what actually ran, for the conditions
        if encoder_notes:
            self.notes["encoder_form_note"] = "; ".join(encoder_notes)
        self.attn_choice: dict[int, dict[str, Any]] = {}  # batch size -> what was chosen and the timings
        self._states: dict[int, dict[str, Any]] = {}
        self.capture_s: dict[int, float] = {}
        self.reason = "eager" if not self.use_graphs else "not captured yet"
        self.batch_events: list[Any] = []  # generate_many: a device event after each batch (GPU), else None

    # -- per-batch-size static state ---------------------------------------------------------------
    def _state(self, B: int, S: int) -> dict[str, Any]:
        import torch

        st = self._states.get(B)
        if st is not None and st["S"] == S and st["cross"] == self.cross:
            return st
        if self._states:  # one batch size's caches at a time (they are large)
            self._states.clear()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        dev = next(self.model.parameters()).device
        L, H, D, T = len(self.layers), self.H, self.D, self.total
        kv = self.cross == "kv"
        st = {
            "S": S,
            "cross": self.cross,
            "k": [torch.zeros(B, H, T, D, dtype=self.dtype, device=dev) for _ in range(L)],
            "v": [torch.zeros(B, H, T, D, dtype=self.dtype, device=dev) for _ in range(L)],
            "ck": [torch.zeros(B, H, S, D, dtype=self.dtype, device=dev) for _ in range(L)] if kv else [],
            "cv": [torch.zeros(B, H, S, D, dtype=self.dtype, device=dev) for _ in range(L)] if kv else [],
            "enc": None if kv else torch.zeros(B, S, self.E, dtype=self.dtype, device=dev),
            "pos": torch.zeros(1, dtype=torch.long, device=dev),
            "tokens": torch.zeros(B, T, dtype=torch.long, device=dev),
            "prompt": torch.tensor(self.prompt, dtype=torch.long, device=dev),
            "ar": torch.arange(T, device=dev),
            "graph": None,
            "xattn": None,   # DecodeAttention (kv) / HiddenAttention (hidden) for cross-attention, or None
            "sattn": None,   # DecodeAttention for self-attention, or None (SDPA with a mask)
        }
        self._states[B] = st
        return st

    # -- the step (one position for the whole batch) -----------------------------------------------
    def _step(self, st: dict[str, Any]) -> None:
        import torch
        import torch.nn.functional as F

        B = st["tokens"].shape[0]
        H, D, E = self.H, self.D, self.E
        pos = st["pos"]                                   # (1,) long, on device
        P = len(self.prompt)
        tok = st["tokens"].index_select(1, pos).view(B)  # token at this position
        h = self.dec.embed_tokens(tok).view(B, 1, E)  # the decoder does not scale embeddings
        h = h + self.dec.embed_positions.weight.index_select(0, pos).view(1, 1, E).to(h.dtype)
        mask = (st["ar"] <= pos).view(1, 1, 1, -1)       # written cache positions
        for li, layer in enumerate(self.layers):
            sa = layer.self_attn
            r = h
            x = layer.self_attn_layer_norm(h)
            q = (sa.q_proj(x) * sa.scaling).view(B, 1, H, D).transpose(1, 2)
            k = sa.k_proj(x).view(B, 1, H, D).transpose(1, 2)
            v = sa.v_proj(x).view(B, 1, H, D).transpose(1, 2)
            st["k"][li].index_copy_(2, pos, k)
            st["v"][li].index_copy_(2, pos, v)
            if st["sattn"] is not None:
                a = st["sattn"](q.reshape(B, H, D), st["k"][li], st["v"][li], pos).view(B, 1, E)
            else:
                a = F.scaled_dot_product_attention(q, st["k"][li], st["v"][li], attn_mask=mask,
                                                   scale=1.0).transpose(1, 2).reshape(B, 1, E)
            h = r + sa.out_proj(a)
            ca = layer.encoder_attn
            r = h
            x = layer.encoder_attn_layer_norm(h)
            if st["cross"] == "hidden":
                h = r + self.hidden_cross_attention(li, x, st["enc"], st["xattn"])
                r = h
                x = layer.final_layer_norm(h)
                h = r + layer.fc2(layer.activation_fn(layer.fc1(x)))
                continue
            q = (ca.q_proj(x) * ca.scaling).view(B, 1, H, D).transpose(1, 2)
            if st["xattn"] is not None:
                a = st["xattn"](q.reshape(B, H, D), st["ck"][li], st["cv"][li]).view(B, 1, E)
            else:
                a = F.scaled_dot_product_attention(q, st["ck"][li], st["cv"][li],
                                                   scale=1.0).transpose(1, 2).reshape(B, 1, E)
            h = r + ca.out_proj(a)
            r = h
            x = layer.final_layer_norm(h)
            h = r + layer.fc2(layer.activation_fn(layer.fc1(x)))
        h = self.dec.layer_norm(h)
        logits = self.model.proj_out(h).view(B, -1)  # model dtype: see the masks
        gen_index = pos + 1 - P                           # index of the token being chosen among new ones
        row = (gen_index > 0).long()                      # 0 → first generated position
        scores = logits + self.masks.index_select(0, row)
        if self.suppress_eos:
            scores[:, self.eos] = torch.where(gen_index < self.min_new,
                                              torch.full_like(gen_index, 0, dtype=scores.dtype) - float("inf"),
                                              scores[:, self.eos])
        nxt = scores.argmax(dim=-1)
        nxt_pos = pos + 1
        # during the prompt the next token is the next prompt token, else the arg-max
        forced = st["prompt"].index_select(0, torch.clamp(nxt_pos, max=P - 1))
        choice = torch.where(nxt_pos < P, forced.expand(B), nxt)
        st["tokens"].index_copy_(1, torch.clamp(nxt_pos, max=self.total - 1), choice.view(B, 1))
        pos.add_(1)

    def hidden_cross_attention(self, li: int, x: Any, enc: Any, kernel: Any = None) -> Any:
        """Layer ``li``'s cross-attention (incl. out_proj) of the normed states x [B, 1, E] over the
        encoder output enc [B, S, E], in the hidden form: q' = W_kᵀ q per head, softmax(q' encᵀ) enc
        (``kernel`` or the float32 torch ops), then W_v per head + b_v. Same function as
        ``layer.encoder_attn(x, key_value_states=enc)``."""
        import torch

        ca = self.layers[li].encoder_attn
        B, H, D, E = int(x.shape[0]), self.H, self.D, self.E
        qh = (ca.q_proj(x) * ca.scaling).view(B, H, D).transpose(0, 1)          # [H, B, D]
        qp = torch.bmm(qh, self.wk[li]).transpose(0, 1)                        # [B, H, E] view of [H, B, E]
        c = kernel(qp, enc) if kernel is not None else hidden_attention_reference(qp, enc)
        a = torch.baddbmm(self.bv[li], c.transpose(0, 1), self.wvT[li])         # [H, B, D]
        return ca.out_proj(a.transpose(0, 1).reshape(B, 1, E))

    def _encoder_fn(self) -> Any:
        """The encoder as a function of the input features returning its last hidden state, in the
        chosen form (not compiled)."""
        encoder = self.model.model.encoder
        if self.encoder_form == "library":
            return lambda x: encoder(x, return_dict=True).last_hidden_state
        from .encoder_fast import FastEncoder

        parts = self.encoder_form.split("+")[1:]
        return FastEncoder(encoder, mlp="fused" if "mlp" in parts else "library",
                           norm="fused" if "norm" in parts else "library")

    def _encode(self, x: Any) -> Any:
        """The encoder's last hidden state for a chunk of clips: compiled where asked (built on first
        use); a compile failure falls back to the eager encoder, with the reason recorded."""
        if self.compile_encoder and self._encoder is None:
            from .common import compile_module

            target = self.model.model.encoder if self.encoder_form == "library" else self._encoder_fn()
            self._encoder, label = compile_module(target, device=str(x.device), fullgraph=False)
            self.encoder_label = label if self.encoder_form == "library" else f"{self.encoder_form} form, {label}"
        if self._encoder is not None and self.compile_encoder:
            try:
                out = self._encoder(x) if self.encoder_form != "library" else self._encoder(x, return_dict=True)
                self._chunks_encoded += 1
                return getattr(out, "last_hidden_state", out)
            except Exception as e:  # same function, eagerly, by the library's module (a kernel of
                # the fast form may be what failed); what ran before and after is recorded
                reason = f"{type(e).__name__}: {str(e)[:160]}"
                self.notes["encoder_fallback"] = {"from": f"{self.encoder_form} form, compiled", "reason": reason,
                                                  "chunks_before": self._chunks_encoded}
                self.compile_encoder = False
                self.encoder_form = "library"
                self.notes["encoder_form"] = "library"
                self.notes["encoder_compile"] = False
                self._eager_encoder = None
                self.encoder_label = f"eager (compile failed: {reason})"
        if self._eager_encoder is None:
            self._eager_encoder = self._encoder_fn()
        out = self._eager_encoder(x)
        self._chunks_encoded += 1
        return out

    # -- per batch ------------------------------------------------------------------------------
    def prefill(self, input_features: Any) -> dict[str, Any]:
        """Encoder once, cross K/V once, static caches reset, prompt placed."""
        import torch

        with torch.inference_mode():
            # The encoder is per clip: chunks of ``encoder_chunk`` clips bound its activation memory
            # (the cross K/V caches of a large batch take most of the card).
            x = input_features.to(self.dtype)
            B = int(x.shape[0])
            st = None
            for c0 in range(0, B, self.encoder_chunk):
                c1 = min(B, c0 + self.encoder_chunk)
                enc = self._encode(x[c0:c1])
                S = int(enc.shape[1])
                if st is None:
                    st = self._state(B, S)
                if st["cross"] == "hidden":
                    st["enc"][c0:c1].copy_(enc)
                    del enc
                    continue
                for li, layer in enumerate(self.layers):
                    ca = layer.encoder_attn
                    st["ck"][li][c0:c1].copy_(ca.k_proj(enc).view(c1 - c0, S, self.H, self.D).transpose(1, 2))
                    st["cv"][li][c0:c1].copy_(ca.v_proj(enc).view(c1 - c0, S, self.H, self.D).transpose(1, 2))
                del enc
            assert st is not None
            self._reset(st)
        return st

    def _reset(self, st: dict[str, Any]) -> None:
        """Self-attention caches cleared, the prompt placed, position 0 (start of a batch)."""
        for li in range(len(self.layers)):
            st["k"][li].zero_()
            st["v"][li].zero_()
        st["tokens"].zero_()
        st["tokens"][:, : len(self.prompt)] = st["prompt"]
        st["pos"].zero_()

    # -- attention kernel choice (per batch size, timed on the card) ---------------------------------
    def _choose_attention(self, st: dict[str, Any]) -> None:
        """Cross-attention through :class:`DecodeAttention` when asked (``attn="triton"``) or, with
        ``attn="auto"``, when its fastest launch configuration beats SDPA on this batch's own cross
        K/V caches (event-timed, rotating over layers so the caches are read from memory, and
        checked against SDPA's output first) by more than 3%. Self-attention (``self_attn="triton"``,
        the default where triton runs) reads only the ``position + 1`` written cache rows instead of
        masking the whole static cache. The choice and the timings are kept in ``attn_choice[B]``."""
        import torch
        import torch.nn.functional as F

        B, S, T = int(st["tokens"].shape[0]), int(st["S"]), self.total
        H, D, L = self.H, self.D, len(self.layers)
        hidden = st["cross"] == "hidden"
        rec: dict[str, Any] = {"cross": "hidden (torch)" if hidden else "sdpa", "self": "sdpa",
                               "cross_form": st["cross"]}
        self.attn_choice[B] = rec
        if self.attn == "sdpa" and self.self_attn == "sdpa" and not hidden:
            return
        if not triton_available(self.device):
            rec["note"] = "triton unavailable here: " + ("torch ops" if hidden else "sdpa")
            return
        dev, dt = st["k"][0].device, self.dtype
        timed = str(dev).startswith("cuda")
        if self.self_attn == "triton":
            self._choose_self(st, rec, timed)
        if hidden:
            self._choose_hidden(st, rec, timed)
            return
        if self.attn == "sdpa":
            return
        gen = torch.Generator(device=dev).manual_seed(0)
        qs = [torch.randn(B, H, D, device=dev, dtype=dt, generator=gen) * D ** -0.5 for _ in range(2)]

        def sdpa(li: int, q: Any) -> Any:
            return F.scaled_dot_product_attention(q.view(B, H, 1, D), st["ck"][li], st["cv"][li], scale=1.0)

        def bench(fn: Any) -> float:  # µs per layer call, rotating over layers (caches read from memory)
            return event_time_us(lambda i: fn(i % L, qs[i % 2]), 2 * L) if timed else 0.0

        t_sdpa = bench(sdpa)
        ref = sdpa(0, qs[0]).view(B, H, D).float()
        kernels, best = fastest_config(
            DECODE_ATTN_CONFIGS, key=lambda c: "triton b{} s{} w{}".format(*c),
            build=lambda c: DecodeAttention(B, H, S, D, block_n=c[0], splits=c[1], num_warps=c[2], device=dev, dtype=dt),
            error=lambda da: (da(qs[0], st["ck"][0], st["cv"][0]).float() - ref).abs().max(), limit=2e-2,
            describe="max abs diff {:.3g} vs sdpa", time_us=lambda da: bench(lambda li, q: da(q, st["ck"][li], st["cv"][li])),
            timed=timed, rec=rec)
        # SDPA timed before and after the candidates' rounds: the mean carries the same steady
        # slow-down as theirs, so the comparison below is not decided by the order either
        t_sdpa = (t_sdpa + bench(sdpa)) / 2 if timed else t_sdpa
        times: dict[str, float] = {"sdpa": t_sdpa, **kernels}
        rec["us_per_layer"] = times
        if timed:
            gb = 2 * B * H * S * D * st["ck"][0].element_size() / 1e9
            rec["cross_kv_gb_per_layer"] = gb
            rec["tb_per_s"] = tb_per_s(gb, times)
        # The custom kernel must win clearly: at equal speed SDPA (stock's own kernel) is kept.
        if best is not None and (self.attn == "triton" or best[0] < 0.97 * times["sdpa"]):
            st["xattn"] = best[1]
            rec["cross"] = best[1].label()
        if timed:
            torch.cuda.synchronize()

    def _choose_self(self, st: dict[str, Any], rec: dict[str, Any], timed: bool) -> None:
        """The fastest :class:`DecodeAttention` launch configuration for self-attention over this
        batch's static caches [B, H, T, D]: each checked against SDPA over the written rows, timed
        at a quarter, half and nearly all of the sequence (one configuration serves every position
        of the captured step). The batch's own caches of the first layers serve as scratch (filled
        with random data, two in turn so each call reads from memory; no extra memory) and are
        reset afterwards. Where nothing is timed, the first configuration; where no configuration
        works here, or the check itself fails, SDPA with a mask (the reason recorded)."""
        import torch
        import torch.nn.functional as F

        B, T, H, D = int(st["tokens"].shape[0]), self.total, self.H, self.D
        dt = self.dtype
        sub: dict[str, Any] = {}
        try:
            dev = st["k"][0].device
            gen = torch.Generator(device=dev).manual_seed(1)
            nbuf = min(2, len(st["k"])) if timed else 1
            ks, vs = st["k"][:nbuf], st["v"][:nbuf]
            for t in ks + vs:
                t.normal_(generator=gen)
            q = (torch.randn(B, H, D, device=dev, dtype=torch.float32, generator=gen) * D ** -0.5).to(dt)
            pos = sorted({max(0, T // 4 - 1), max(0, T // 2 - 1), max(0, T - 2)})
            lens = [torch.tensor([p], dtype=torch.long, device=dev) for p in pos]
            nref = min(B, 8)
            refs = [F.scaled_dot_product_attention(q[:nref].view(nref, H, 1, D).float(), ks[0][:nref, :, : p + 1].float(),
                                                   vs[0][:nref, :, : p + 1].float(), scale=1.0).view(nref, H, D)
                    for p in pos]

            def error(da: DecodeAttention) -> float:
                return max(float((da(q, ks[0], vs[0], n)[:nref].float() - r).abs().max()) for n, r in zip(lens, refs))

            def time_us(da: DecodeAttention) -> float:  # mean over the positions
                return sum(event_time_us(lambda i: da(q, ks[i % nbuf], vs[i % nbuf], n), 2 * T // len(pos))
                           for n in lens) / len(lens)

            times, best = fastest_config(
                SELF_ATTN_CONFIGS, key=lambda c: "triton b{} s{} w{}".format(*c),
                build=lambda c: DecodeAttention(B, H, T, D, block_n=c[0], splits=c[1], num_warps=c[2], device=dev,
                                                dtype=dt),
                error=error, limit=2e-2, describe="max abs diff {:.3g} vs sdpa", time_us=time_us, timed=timed, rec=sub)
            gb = sum(2 * B * H * (p + 1) * D * ks[0].element_size() for p in pos) / len(pos) / 1e9
        except Exception as e:  # the check could not run here: SDPA (stock's kernel), the reason kept
            times, best = {}, None
            sub.setdefault("rejected", {})["setup"] = f"{type(e).__name__}: {str(e)[:160]}"
        finally:
            self._reset(st)  # the scratch rows back to an empty cache, the prompt placed
        if sub.get("rejected"):
            rec["self_rejected"] = sub["rejected"]
        if best is None:  # no configuration works here: SDPA with a mask over the whole cache
            return
        st["sattn"] = best[1]
        rec["self"] = best[1].label()
        if timed:
            rec["self_us_per_layer"] = times
            rec["self_tb_per_s"] = tb_per_s(gb, times)

    def _choose_hidden(self, st: dict[str, Any], rec: dict[str, Any], timed: bool) -> None:
        """The fastest hidden-form kernel on this batch's encoder output: the launch configurations
        of :class:`HiddenAttention` (Triton) and, on NVIDIA cards, of
        :class:`~.hidden_attn_cuda.CudaHiddenAttention` (event-timed on a GPU; each checked against
        the float32 reference first)."""
        import torch

        B, S, H, E = int(st["tokens"].shape[0]), int(st["S"]), self.H, self.E
        x = st["enc"]
        dev, dt = x.device, self.dtype
        gen = torch.Generator(device=dev).manual_seed(0)
        qs = [(torch.randn(B, H, E, device=dev, dtype=torch.float32, generator=gen) * E ** -0.5).to(dt)
              for _ in range(2)]
        nref = B if timed else min(B, 4)  # on a GPU every clip of the batch is checked (cheap there)
        ref = hidden_attention_reference(qs[0][:nref], x[:nref]).float()
        # the Triton kernel's launch configurations and, on NVIDIA cards (compute capability ≥ 8.0),
        # the hand-written CUDA kernel's, on the same terms and in the same timing rounds
        from .hidden_attn_cuda import CUDA_HIDDEN_CONFIGS, CudaHiddenAttention, cuda_hidden_available

        cands: list[tuple[str, tuple[int, ...]]] = [("triton", c) for c in HIDDEN_ATTN_CONFIGS]
        ok, why = cuda_hidden_available(dev) if timed else (False, "not timed here")
        if ok and dt == torch.float16:
            cands += [("cuda", c) for c in CUDA_HIDDEN_CONFIGS
                      if not c[6] or torch.cuda.get_device_capability(dev)[0] >= 9]
        else:
            rec["cuda_kernel"] = why if not ok else f"fp16 only (model dtype {dt})"

        def build(kc: tuple[str, tuple[int, ...]]) -> Any:
            kind, c = kc
            if kind == "cuda":
                return CudaHiddenAttention.from_config(B, H, S, E, c, device=dev, dtype=dt)
            return HiddenAttention(B, H, S, E, block_n=c[0], splits=c[1], num_warps=c[2], num_stages=c[3],
                                   head_tile=c[4], device=dev, dtype=dt)

        times, best = fastest_config(
            tuple(cands),
            key=lambda kc: (CudaHiddenAttention.config_key(kc[1]) if kc[0] == "cuda"
                            else "triton b{} s{} w{} st{} h{}".format(*kc[1])),
            build=build,
            error=lambda ha: (ha(qs[0], x)[:nref].float() - ref).abs().max() / ref.abs().max().clamp_min(1e-6),
            limit=2e-2, describe="max rel diff {:.3g} vs float32 reference",
            time_us=lambda ha: event_time_us(lambda i: ha(qs[i % 2], x), 20), timed=timed, rec=rec)
        rec["us_per_layer"] = times
        if timed:
            gb = B * S * E * x.element_size() / 1e9
            rec["hidden_gb_per_layer"] = gb
            rec["tb_per_s"] = tb_per_s(gb, times)
            torch.cuda.synchronize()
        if best is not None:
            st["xattn"] = best[1]
            rec["cross"] = best[1].label()

    def _capture(self, st: dict[str, Any]) -> None:
        import torch

        t0 = time.perf_counter()
        saved = [t.clone() for t in (st["pos"], st["tokens"])]
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                self._step(st)
        torch.cuda.current_stream().wait_stream(s)
        st["pos"].copy_(saved[0])
        st["tokens"].copy_(saved[1])
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            self._step(st)
        torch.cuda.synchronize()
        # capture recorded but did not change state beyond what replay will redo; reset
        st["pos"].copy_(saved[0])
        st["tokens"].copy_(saved[1])
        st["graph"] = g
        self.capture_s[st["tokens"].shape[0]] = time.perf_counter() - t0
        ch = self.attn_choice.get(int(st["tokens"].shape[0]), {})
        self.reason = (f"encoder: {self.encoder_label}; decode step captured as a device graph; "
                       f"cross-attention ({ch.get('cross_form', 'kv')} form): {ch.get('cross', 'sdpa')}; "
                       f"self-attention: {ch.get('self', 'sdpa')}")

    def _ready(self, st: dict[str, Any], input_features: Any) -> dict[str, Any]:
        """After the first prefill of a batch size: the attention choice (once per size, falling
        back to the K/V form where no hidden-form kernel works here) and the graph capture."""
        import torch

        B = int(st["tokens"].shape[0])
        if not st.get("attn_chosen"):
            self._choose_attention(st)
            st["attn_chosen"] = True
            if st["cross"] == "hidden" and st["xattn"] is None and str(self.device).startswith("cuda"):
                # no launch configuration of the kernel works on this card: the K/V form
                # (SDPA or the decode kernel) is faster than the float32 reference path
                note = self.attn_choice[B].get("rejected")
                self.cross = "kv"
                st = self.prefill(input_features)
                self._choose_attention(st)
                st["attn_chosen"] = True
                self.attn_choice[B]["note"] = f"hidden form unavailable ({note}); K/V form"
        if self.use_graphs and st["graph"] is None:
            try:
                self._capture(st)
            except Exception as e:  # same function, eagerly
                self.use_graphs = False
                self.reason = f"capture failed, eager: {type(e).__name__}: {str(e)[:200]}"
                torch.cuda.synchronize()
                st = self.prefill(input_features)
        return st

    def _decode(self, st: dict[str, Any], before_step: Any = None) -> Any:
        """All decode steps of the prefilled batch (graph replays, or eager steps); its tokens.
        ``before_step(i)``, where given, is called before step i is launched."""
        n = self.total - 1
        g = st["graph"] if self.use_graphs else None
        for i in range(n):
            if before_step is not None:
                before_step(i)
            if g is not None:
                g.replay()
            else:
                self._step(st)
        B = int(st["tokens"].shape[0])
        self.notes.update({"cross_attention_form": self.cross, "encoder": self.encoder_label,
                           "decode_step": self.reason, "attention": self.attn_choice.get(B)})
        return st["tokens"].clone()

    def generate(self, input_features: Any) -> Any:
        """Token ids (B, prompt + new_tokens), like ``generate(...)`` returns for Whisper."""
        import torch

        with torch.inference_mode():
            st = self._ready(self.prefill(input_features), input_features)
            return self._decode(st)

    def overlap_possible(self) -> tuple[bool, str]:
        """Whether :meth:`generate_many` can run the next batch's encoder beside the current
        batch's decoding, and why not where it cannot."""
        import torch

        if not str(self.device).startswith("cuda") or not torch.cuda.is_available():
            return False, "no device streams here (CPU): batches run in series"
        if self.cross != "hidden":
            return False, "K/V form: the next batch's cross K/V would need a second set of caches; in series"
        return True, "next batch's encoder on a low-priority second stream during decoding"

    def generate_many(self, batches: Any, overlap: bool = True) -> list[Any]:
        """Token ids for several batches of one size, in order: the same tokens as :meth:`generate`
        on each. With ``overlap`` (on a GPU, hidden form), the encoder of batch i+1 runs on a second,
        low-priority device stream while batch i decodes (a chunk every few decode steps): the
        encoder is compute-bound and the decode step is bound by reading the encoder output, so
        the two can share a card where kernels of both fit on a multiprocessor at once. The next
        encoder output goes to a staging buffer, copied into the graph's own buffer once batch i's
        decoding is done (one device copy, ≈2 ms at b1024). The first batch's encoder runs in
        series (nothing to hide it behind). What ran is recorded in ``notes["batches"]``."""
        import torch

        xs = list(batches)
        if not xs:
            return []
        ok, why = self.overlap_possible()
        shapes = {tuple(x.shape) for x in xs}
        if overlap and ok and len(shapes) > 1:
            ok, why = False, f"batches of different shapes {sorted(shapes)}: in series"
        overlap = bool(overlap and ok and len(xs) > 1)
        outs: list[Any] = []
        with torch.inference_mode():
            self.batch_events = []
            if not overlap:
                for x in xs:
                    outs.append(self.generate(x))
                    self.batch_events.append(_done_event())
                self.notes["batches"] = {"count": len(xs), "overlap": False,
                                         "why": why if len(xs) > 1 else "one batch"}
                return outs
            main = torch.cuda.current_stream()
            # Decoding on a high-priority stream, the encoder on a low-priority one: where blocks of
            # both can be resident, the decode step's kernels take multiprocessors first as the
            # encoder's blocks free them (on an H200 neither priority nor equal priority gains:
            # docs/performance.md, "the encoder beside decoding").
            dec = torch.cuda.Stream(device=xs[0].device, priority=-1)
            side = torch.cuda.Stream(device=xs[0].device, priority=0)
            enc_done = torch.cuda.Event()
            st = self._ready(self.prefill(xs[0]), xs[0])
            if st["cross"] != "hidden":  # the hidden form was rejected on this card: series
                outs.append(self._decode(st))
                outs.extend(self.generate(x) for x in xs[1:])
                self.notes["batches"] = {"count": len(xs), "overlap": False,
                                         "why": "hidden form unavailable here: in series"}
                return outs
            staging = torch.empty_like(st["enc"])
            dec.wait_stream(main)
            with torch.cuda.stream(dec):
                for i in range(len(xs)):
                    if i > 0:  # the encoder output of batch i, staged during batch i-1's decoding
                        dec.wait_event(enc_done)
                        st["enc"].copy_(staging)
                        self._reset(st)
                    launch = None
                    if i + 1 < len(xs):
                        side.wait_stream(dec)  # the staging buffer has been copied out, inputs ready
                        launch = _ChunkedEncoder(self, xs[i + 1], staging, side, enc_done)
                    outs.append(self._decode(st, before_step=launch))
                    if launch is not None:
                        launch.finish()
                    self.batch_events.append(_done_event())
            main.wait_stream(dec)
            main.wait_stream(side)
            for o in outs:  # made on the decode stream, used on the caller's from here on
                o.record_stream(main)
        self.notes["batches"] = {"count": len(xs), "overlap": True, "why": why}
        return outs


class _ChunkedEncoder:
    """The next batch's encoder (of ``x``), launched chunk by chunk between the current batch's
    decode steps: called before decode step i, it launches one chunk every few steps (spread over
    the batch's ``fw.total - 1`` steps) on the ``side`` stream into ``staging``; :meth:`finish`
    launches whatever is left and records ``done`` on ``side``.
    Interleaved so that the decode steps are never queued on the host behind a whole batch's
    encoder kernels (thousands of launches, more than a stream's launch queue holds)."""

    def __init__(self, fw: FastWhisper, x: Any, staging: Any, side: Any, done: Any) -> None:
        self.fw, self.x, self.staging, self.side, self.done = fw, x, staging, side, done
        self.starts = list(range(0, int(x.shape[0]), fw.encoder_chunk))
        self.every = max(1, (fw.total - 1) // max(1, len(self.starts)))
        self.next = 0
        self.src: Any = None

    def _launch(self) -> None:
        import torch

        c0 = self.starts[self.next]
        c1 = min(int(self.x.shape[0]), c0 + self.fw.encoder_chunk)
        with torch.cuda.stream(self.side):
            if self.src is None:
                self.src = self.x.to(self.fw.dtype)
            self.staging[c0:c1].copy_(self.fw._encode(self.src[c0:c1]))
        self.next += 1

    def __call__(self, step: int) -> None:
        if step % self.every == 0 and self.next < len(self.starts):
            self._launch()

    def finish(self) -> None:
        while self.next < len(self.starts):
            self._launch()
        self.done.record(self.side)


def attach_to_workload(workload: Any, params: dict[str, Any]) -> FastWhisper:
    """Replace a stock ``WhisperWorkload``'s ``generate`` step with :class:`FastWhisper`.

    Uses the workload's own forced prompt and the generation rules of its generation config; the
    returned sequences are prompt + new tokens, which the workload's ``generated_ids`` strips.
    """
    t0 = time.perf_counter()
    gc = workload.model.generation_config
    fast = FastWhisper(
        workload.model,
        prompt_ids=list(workload.forced_prompt),
        new_tokens=int(workload.new_tokens),
        suppress_tokens=getattr(gc, "suppress_tokens", None),
        begin_suppress_tokens=getattr(gc, "begin_suppress_tokens", None),
        eos_token_id=getattr(gc, "eos_token_id", None),
        device=workload.device,
        graphs=bool(params.get("optimized_graphs", True)),
    )
    fast.notes.update({"decode": "static KV cache, graph-captured step" if fast.use_graphs else "static KV cache, eager step",
                       "cross_attention_form": fast.cross, "encoder_compile": fast.compile_encoder})
    workload.generate = fast.generate
    workload.compile_mode = "none (device graph)" if fast.use_graphs else "none"
    workload.optimized_setup_s = time.perf_counter() - t0
    return fast

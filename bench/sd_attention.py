"""The SD v1-4 UNet's attention at its own shapes, on one card, against its own bound: each fused
kernel PyTorch's SDPA has (flash, memory-efficient, cuDNN; the optimized path puts the fastest first)
and a plain Triton FlashAttention form (:func:`attention` below: one program per 128 or 64 queries
of a head, online softmax in ``exp2``, the head's columns padded to a power of two as the library
kernels pad them: 40 → 64, 80 → 128, 160 → 256). Each checked against float64 on a slice of the
queries first; event-timed medians; two inputs alternated.

The same run measures the ceilings the attention is set against: the card's fp16 GEMM rate (8192³)
and its rate of ``exp2`` (:func:`exp2_rate`: a Triton kernel doing nothing else in registers; the
softmax needs one per score). A score costs 4·d FLOPs (2·d for QKᵀ, 2·d for PV) and one exponential:
160 FLOPs per exponential at d = 40, so the 64² level is bound by the exponentials, not the products.
``bound_ms`` per shape is the larger of the two times at the run's rates (the head's true d, no
padding); ``per_eval_ms`` weighs the shapes by their calls per UNet evaluation.

    python bench/sd_attention.py --batch 64 2 --out bench/results/h200-run36-sd-attention.json

``--split`` adds a form whose head is covered by two power-of-two parts instead (40 = 32 + 16, the
tail masked: 83% of the padded form's products at d = 40); ``--check-parts`` checks, each case in a
child process, which part splits triton compiles right on the card (with triton 3.6 on the H200,
run 37: those with a 16-column part beside a 32-column one are wrong, and at the UNet's shape one
faults). ``--pad-heads 48,64`` adds each SDPA kernel on heads padded with zero columns to those widths
(:func:`pad_heads`; the scale stays 1/√d of the true head, the output's extra columns are zero and
dropped; the layout is the unpadded case's, one tensor per q, k, v, not the fused QKV product's
strides); ``--configs none`` leaves the Triton forms out. Bench-only: the UNet keeps SDPA (docs/performance.md, runs 34–37 and 39).
"""

from __future__ import annotations

import argparse
import json
import math
import re
from typing import Any

# (block_m, block_n, warps, stages)
ATTN_CONFIGS: tuple[tuple[int, int, int, int], ...] = (
    (128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 4), (256, 64, 8, 3),
    (64, 128, 4, 3))

# SD v1-4's transformer blocks (bench.sd_levels.LEVELS): 8 heads; each block has one self-attention
# (side² keys) and one cross-attention (77 text tokens)
HEADS, TEXT_TOKENS = 8, 77

_KERNELS: dict[str, Any] = {}


def head_parts(d: int) -> tuple[int, int]:
    """Two power-of-two parts (each ≥ 16, the matrix units' smallest operand) covering ``d`` columns:
    the largest power of two ≤ d, then the smallest power of two ≥ 16 covering the rest (0 if none)."""
    if d < 1:
        raise ValueError(f"head dimension must be ≥ 1, got {d}")
    a = max(16, 1 << (d.bit_length() - 1))
    rest = d - a
    b = 0 if rest <= 0 else max(16, 1 << (rest - 1).bit_length())
    return a, b


def padded_part(d: int) -> tuple[int, int]:
    """The head padded to one power-of-two part (≥ 16): ``(64, 0)`` at d = 40."""
    if d < 1:
        raise ValueError(f"head dimension must be ≥ 1, got {d}")
    return max(16, 1 << (d - 1).bit_length()), 0


def _kernel() -> Any:
    if "attn" in _KERNELS:
        return _KERNELS["attn"]
    import triton
    import triton.language as tl

    @triton.jit
    def _attn_fwd(q_ptr, k_ptr, v_ptr, o_ptr, scale_log2, Sq, H,
                  sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sob, soh, sos,
                  Sk: tl.constexpr, D: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, BM: tl.constexpr,
                  BN: tl.constexpr, EVEN_N: tl.constexpr):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        q_ptr += b * sqb + h * sqh
        k_ptr += b * skb + h * skh
        v_ptr += b * svb + h * svh
        o_ptr += b * sob + h * soh
        rm = pid_m * BM + tl.arange(0, BM)
        rn = tl.arange(0, BN)
        ra = tl.arange(0, DA)
        mrow = rm < Sq
        qa = tl.load(q_ptr + rm[:, None] * sqs + ra[None, :], mask=mrow[:, None] & (ra[None, :] < D), other=0.0)
        rb = DA + tl.arange(0, DB if DB > 0 else 16)
        qb = tl.load(q_ptr + rm[:, None] * sqs + rb[None, :], mask=mrow[:, None] & (rb[None, :] < D), other=0.0)
        m_i = tl.full((BM,), float("-inf"), tl.float32)
        l_i = tl.zeros((BM,), tl.float32)
        acc_a = tl.zeros((BM, DA), tl.float32)
        acc_b = tl.zeros((BM, DB if DB > 0 else 16), tl.float32)
        for start in range(0, Sk, BN):
            n = start + rn
            nm = n < Sk
            ka = tl.load(k_ptr + n[None, :] * sks + ra[:, None], mask=nm[None, :] & (ra[:, None] < D), other=0.0)
            s = tl.dot(qa, ka)
            if DB > 0:   # a second product summed after it, not chained through one accumulator: chained,
                # triton 3.6 gave wrong scores for 32 + 16 columns on the H200 (run 35)
                kb = tl.load(k_ptr + n[None, :] * sks + rb[:, None], mask=nm[None, :] & (rb[:, None] < D), other=0.0)
                s = s + tl.dot(qb, kb)
            s = s * scale_log2
            if not EVEN_N:
                s = tl.where(nm[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.math.exp2(m_i - m_new)
            p = tl.math.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            pf = p.to(v_ptr.dtype.element_ty)
            va = tl.load(v_ptr + n[:, None] * svs + ra[None, :], mask=nm[:, None] & (ra[None, :] < D), other=0.0)
            acc_a = tl.dot(pf, va, acc_a * alpha[:, None])
            if DB > 0:
                vb = tl.load(v_ptr + n[:, None] * svs + rb[None, :], mask=nm[:, None] & (rb[None, :] < D), other=0.0)
                acc_b = tl.dot(pf, vb, acc_b * alpha[:, None])
            m_i = m_new
        inv = 1.0 / l_i
        tl.store(o_ptr + rm[:, None] * sos + ra[None, :], (acc_a * inv[:, None]).to(o_ptr.dtype.element_ty),
                 mask=mrow[:, None] & (ra[None, :] < D))
        if DB > 0:
            tl.store(o_ptr + rm[:, None] * sos + rb[None, :], (acc_b * inv[:, None]).to(o_ptr.dtype.element_ty),
                     mask=mrow[:, None] & (rb[None, :] < D))

    _KERNELS["attn"] = _attn_fwd
    return _attn_fwd


def diffusers_qkv(B: int, S: int, H: int, D: int, **kw: Any) -> Any:
    """Random [B, H, S, D] in diffusers' strided layout: [B, S, H·D] viewed per head (``kw``: device,
    dtype, generator for ``torch.randn``)."""
    import torch

    return torch.randn(B, S, H * D, **kw).view(B, S, H, D).transpose(1, 2)


def pad_heads(x: Any, width: int) -> Any:
    """``x`` [B, H, S, D] → [B, H, S, width] in diffusers' strided layout ([B, S, H·width] viewed per
    head), the columns past D zero: attention over such q, k, v with scale 1/√D gives the same scores,
    and the output's columns past D are zero."""
    import torch

    B, H, S, D = (int(v) for v in x.shape)
    if int(width) < D:
        raise ValueError(f"pad_heads: width {width} is narrower than the head ({D} columns)")
    base = torch.zeros(B, S, H, int(width), device=x.device, dtype=x.dtype)
    base[..., :D] = x.transpose(1, 2)
    return base.transpose(1, 2)


def pad_widths(text: str) -> list[int]:
    """``--pad-heads``: ``48,64`` → [48, 64] (each once, in order); a width that is not a positive
    multiple of 8 is a ``ValueError`` naming the text."""
    try:
        widths = [int(w) for w in text.split(",") if w.strip()]
    except ValueError:
        widths = [-1]
    if any(w < 1 or w % 8 for w in widths):
        raise ValueError(f"--pad-heads: expected widths that are positive multiples of 8, e.g. 48,64; got {text!r}")
    return list(dict.fromkeys(widths))


def sdpa_padded(F: Any, sdpa_kernel: Any, backend: Any, qkv_padded: Any, d: int) -> Any:
    """SDPA by ``backend`` over heads padded with zero columns (:func:`pad_heads`) at the scale of the
    true head of ``d`` columns; the output's first ``d`` columns (a view)."""
    return _sdpa(F, sdpa_kernel, backend, qkv_padded, scale=1.0 / math.sqrt(d))[..., :d]


def attention_reference(q: Any, k: Any, v: Any) -> Any:
    """softmax(q kᵀ / √d) v, in the inputs' dtype (use float64 inputs for a reference)."""
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return s.softmax(-1) @ v


def attention(q: Any, k: Any, v: Any, config: tuple[int, int, int, int] = ATTN_CONFIGS[0], out: Any = None,
              parts: tuple[int, int] | None = None) -> Any:
    """Non-causal attention, q [B, H, Sq, D], k and v [B, H, Sk, D] (any strides with the last
    dimension contiguous), scale 1/√D; one clear error for what it does not take. ``parts``: the two
    power-of-two column parts; by default the head padded to one (:func:`padded_part`: 40 → 64, as
    the library kernels pad it). ``parts=head_parts(D)`` asks for the two-part form, which triton 3.6
    compiles wrong on the H200 (run 37): bench-only, behind ``--split``."""
    import torch
    import triton

    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention: q, k, v must be [B, H, S, D], got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    B, H, Sq, D = (int(x) for x in q.shape)
    if tuple(k.shape) != (B, H, k.shape[2], D) or tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"attention: k and v must be [{B}, {H}, Sk, {D}] alike, got {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[2] < 1 or Sq < 1:
        raise ValueError(f"attention: empty sequence (Sq={Sq}, Sk={int(k.shape[2])})")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"attention: q, k, v in one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"attention: float16, bfloat16 or float32, got {q.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention: q, k, v on one device, got {q.device}, {k.device}, {v.device}")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("attention: the last dimension of q, k and v must be contiguous")
    if out is not None and (tuple(out.shape) != (B, H, Sq, D) or out.dtype != q.dtype or out.stride(-1) != 1
                            or out.device != q.device):
        raise ValueError(f"attention: out must be [{B}, {H}, {Sq}, {D}] {q.dtype} on {q.device} with a contiguous "
                         f"last dimension, got {tuple(out.shape)} {out.dtype} on {out.device}")
    if len(config) != 4 or any(x < 1 for x in config) or any(x & (x - 1) for x in config[:2]) or min(config[:2]) < 16:
        raise ValueError(f"attention: config (block_m, block_n, warps, stages) with blocks powers of two ≥ 16, "
                         f"got {config}")
    bm, bn, warps, stages = config
    da, db = padded_part(D) if parts is None else parts
    if da + db < D or any(x and (x < 16 or x & (x - 1)) for x in (da, db)) or not da:
        raise ValueError(f"attention: parts {da}, {db} must be powers of two ≥ 16 (the second may be 0) "
                         f"covering D = {D}")
    Sk = int(k.shape[2])
    o = out if out is not None else torch.empty(B, H, Sq, D, device=q.device, dtype=q.dtype)
    grid = (triton.cdiv(Sq, bm), B * H)
    _kernel()[grid](q, k, v, o, (1.0 / math.sqrt(D)) * 1.4426950408889634, Sq, H,
                    *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
                    Sk=Sk, D=D, DA=da, DB=db, BM=bm, BN=bn, EVEN_N=(Sk % bn == 0), num_warps=warps, num_stages=stages)
    return o


def _exp2_kernel() -> Any:
    if "exp2" in _KERNELS:
        return _KERNELS["exp2"]
    import triton
    import triton.language as tl

    @triton.jit
    def _exp2_loop(x_ptr, y_ptr, ITERS: tl.constexpr, BLOCK: tl.constexpr):
        r = tl.program_id(0) * BLOCK * 4 + tl.arange(0, BLOCK)
        a = tl.load(x_ptr + r)
        b = tl.load(x_ptr + r + BLOCK)
        c = tl.load(x_ptr + r + 2 * BLOCK)
        d = tl.load(x_ptr + r + 3 * BLOCK)
        for _ in range(ITERS):   # four independent chains; values stay in (0.5, 2)
            a = tl.math.exp2(a - 1.0)
            b = tl.math.exp2(b - 1.0)
            c = tl.math.exp2(c - 1.0)
            d = tl.math.exp2(d - 1.0)
        tl.store(y_ptr + tl.program_id(0) * BLOCK + tl.arange(0, BLOCK), a + b + c + d)

    _KERNELS["exp2"] = _exp2_loop
    return _exp2_loop


def exp2_rate(device: str = "cuda", iters: int = 4096) -> float:
    """Exponentials per second the card computes (float32 ``exp2``, nothing else in the loop but a
    subtraction): the ceiling a softmax at small head dimensions meets."""
    import torch

    from bench.sd_levels import _time_ms

    sms = torch.cuda.get_device_properties(device).multi_processor_count
    block, progs = 1024, sms * 16
    x = torch.rand(progs * block * 4, device=device) + 0.5
    y = torch.empty(progs * block, device=device)
    k = _exp2_kernel()
    ms = _time_ms(lambda i: k[(progs,)](x, y, ITERS=iters, BLOCK=block, num_warps=8), 3)
    return progs * block * 4 * iters / (ms * 1e-3)


# (B, H, Sq, Sk, D, config, parts): which head-part forms triton compiles right on this card (run 37)
PART_CASES: tuple[tuple[int, int, int, int, int, tuple[int, int, int, int], tuple[int, int]], ...] = tuple(
    (1, 1, 128, 128, d, (64, 64, 4, 1), pt) for d, pt in (
        (40, (64, 0)), (40, (32, 32)), (40, (32, 16)), (40, (16, 32)), (48, (32, 16)), (32, (32, 0)),
        (80, (128, 0)), (80, (64, 16)), (160, (256, 0)), (160, (128, 32)))) + (
    (2, 8, 256, 77, 40, (128, 64, 4, 3), (32, 16)),
    (64, 8, 4096, 4096, 40, (128, 64, 4, 3), (64, 0)), (64, 8, 4096, 4096, 40, (128, 64, 4, 3), (32, 16)))


def one_case(B: int, H: int, Sq: int, Sk: int, D: int, config: tuple[int, int, int, int],
             parts: tuple[int, int]) -> dict[str, Any]:
    """Run :func:`attention` once on random data in diffusers' layout and compare 64 queries of it
    with float64: ``{"max_rel_err": …}``."""
    import torch

    kw = {"device": "cuda", "dtype": torch.float16, "generator": torch.Generator(device="cuda").manual_seed(0)}
    q, k, v = diffusers_qkv(B, Sq, H, D, **kw), diffusers_qkv(B, Sk, H, D, **kw), diffusers_qkv(B, Sk, H, D, **kw)
    o = attention(q, k, v, config=config, parts=parts)
    torch.cuda.synchronize()
    n = min(Sq, 64)
    ref = attention_reference(q[:, :, :n].double(), k.double(), v.double())
    return {"max_rel_err": float((o[:, :, :n].double() - ref).abs().max() / ref.abs().max())}


def check_parts(cases: Any = PART_CASES, timeout: float = 120.0) -> list[dict[str, Any]]:
    """Each case in a child process (a fault ends the child's CUDA context, not this one):
    ``right`` (within 2e-2 of float64), ``wrong`` or ``fault`` with the child's last error line."""
    import os
    import subprocess
    import sys

    rows = []
    for B, H, Sq, Sk, D, cfg, pt in cases:
        argv = [sys.executable, "-m", "bench.sd_attention", "--one",
                ",".join(str(x) for x in (B, H, Sq, Sk, D, *cfg, *pt))]
        row: dict[str, Any] = {"B": B, "H": H, "Sq": Sq, "Sk": Sk, "D": D, "config": list(cfg), "parts": list(pt)}
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                               cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
            last = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
            got = json.loads(last[-1]) if r.returncode == 0 and last else {}
            if isinstance(got.get("max_rel_err"), float):
                row.update(got)
                row["result"] = "right" if row["max_rel_err"] <= 2e-2 else "wrong"
            else:   # the exception's own line (torch ends a CUDA error with a hint line that names no error)
                lines = r.stderr.splitlines()
                err = ([ln for ln in lines if "CUDA error:" in ln or "Triton Error" in ln]
                       or [ln for ln in lines if re.match(r"^[\w.]+(Error|Exception)\b", ln)])
                row.update(result="fault", error=(err[-1] if err else (r.stderr[-300:] or r.stdout[-300:]
                                                                       or f"exit status {r.returncode}")).strip()[:300])
        except subprocess.TimeoutExpired:
            row.update(result="fault", error=f"timed out after {timeout:.0f} s")
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="+", default=[64, 2], help="UNet batch (2 × images with CFG)")
    ap.add_argument("--configs", default=None, help="Triton configs block_m,block_n,warps,stages;… "
                    "(default: ATTN_CONFIGS; none: no Triton form)")
    ap.add_argument("--pad-heads", default="", help="also each SDPA kernel on heads padded with zero columns to "
                    "these widths, e.g. 48,64 (widths not above the head's are skipped)")
    ap.add_argument("--split", action="store_true",
                    help="also the two-part head forms (32+16 at D = 40; with triton 3.6 on the H200 they give "
                         "wrong results and can fault the context, which ends the run: run 35)")
    ap.add_argument("--check-parts", action="store_true",
                    help="only check which head-part forms come out right on this card (PART_CASES, each in a "
                         "child process)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)   # B,H,Sq,Sk,D,bm,bn,w,st,da,db: one case
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    try:
        pads = pad_widths(a.pad_heads)
    except ValueError as e:
        ap.error(str(e))
    if a.one:
        v = [int(x) for x in a.one.split(",")]
        print(json.dumps(one_case(*v[:5], tuple(v[5:9]), tuple(v[9:11]))), flush=True)  # type: ignore[arg-type]
        return
    from bench.cli import run_record

    if a.check_parts:
        rows = check_parts()
        if a.out:
            with open(a.out, "w") as f:
                json.dump({**run_record(), "cases": rows}, f, indent=1)
        return
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from bench.sd_levels import LEVELS, _time_ms, gemm_tflops, parse_configs

    dev, dt = "cuda", torch.float16
    cfgs = [] if a.configs == "none" else parse_configs(a.configs, ATTN_CONFIGS)
    res: dict[str, Any] = {**run_record(), "dtype": "fp16", "heads": HEADS, "levels": {}}
    res["gemm_tflops_fp16"] = gemm = gemm_tflops(dt)
    res["exp2_per_s"] = expr = exp2_rate(dev)
    print(f"ceilings: fp16 GEMM {gemm:.0f} TFLOP/s, exp2 {expr / 1e12:.2f} T/s", flush=True)
    backends = {"sdpa flash": SDPBackend.FLASH_ATTENTION, "sdpa efficient": SDPBackend.EFFICIENT_ATTENTION}
    if hasattr(SDPBackend, "CUDNN_ATTENTION"):
        backends["sdpa cudnn"] = SDPBackend.CUDNN_ATTENTION
    for B in a.batch:
        per_eval: dict[str, float] = {}
        for side, C, calls in LEVELS:
            D = C // HEADS
            for kind, sk in (("self", side * side), ("cross", TEXT_TOKENS)):
                sq = side * side
                kw = {"device": dev, "dtype": dt, "generator": torch.Generator(device=dev).manual_seed(0)}
                ins = [tuple(diffusers_qkv(B, s_len, HEADS, D, **kw) for s_len in (sq, sk, sk)) for _ in range(2)]
                nref = min(sq, 256)
                q0, k0, v0 = ins[0]
                ref = attention_reference(q0[:, :, :nref].double(), k0.double(), v0.double())
                flop = 4 * B * HEADS * sq * sk * D
                exps = B * HEADS * sq * sk
                bound_ms = max(flop / (gemm * 1e12), exps / expr) * 1e3
                row: dict[str, Any] = {"B": B, "heads": HEADS, "Sq": sq, "Sk": sk, "D": D, "calls_per_eval": calls,
                                       "gflop": flop / 1e9, "gexp": exps / 1e9, "bound_ms": bound_ms,
                                       "bound_by": "exp2" if exps / expr > flop / (gemm * 1e12) else "products",
                                       "paths": {}}
                per_eval["bound"] = per_eval.get("bound", 0.0) + calls * bound_ms
                cands: list[tuple[str, Any]] = [(name, lambda i, be=be: _sdpa(F, sdpa_kernel, be, ins[i % 2]))
                                                for name, be in backends.items()]
                for w in (w for w in pads if w > D):
                    padded_ins = [tuple(pad_heads(x, w) for x in qkv) for qkv in ins]
                    cands += [(f"{name} d{w}", lambda i, be=be, pi=padded_ins: sdpa_padded(
                        F, sdpa_kernel, be, pi[i % 2], D)) for name, be in backends.items()]
                outs = [torch.empty(B, HEADS, sq, D, device=dev, dtype=dt) for _ in range(2)]
                split, padded = head_parts(D), padded_part(D)
                forms = [padded] + ([split] if a.split and split != padded else [])
                cands += [(f"triton m{c[0]} n{c[1]} w{c[2]} st{c[3]} d{'+'.join(str(x) for x in pt if x)}",
                           lambda i, c=c, pt=pt: attention(*ins[i % 2], config=c, out=outs[i % 2], parts=pt))
                          for pt in forms for c in cfgs]
                for name, fn in cands:
                    rec: dict[str, Any] = {}
                    try:
                        out = fn(0)
                        torch.cuda.synchronize()
                        rec["max_rel_err_vs_fp64"] = float((out[:, :, :nref].double() - ref).abs().max() / ref.abs().max())
                        if rec["max_rel_err_vs_fp64"] > 2e-2:
                            raise ValueError(f"wrong result: max relative error {rec['max_rel_err_vs_fp64']:.3g}")
                        us = _time_ms(fn, 10) * 1e3
                        rec.update(us=us, tflops=flop / (us * 1e-6) / 1e12, of_bound=bound_ms * 1e3 / us)
                        if name in backends:
                            per_eval[name] = per_eval.get(name, 0.0) + calls * us / 1e3
                    except Exception as e:  # a kernel/config that does not take the shape: recorded, not fatal
                        rec["failed"] = f"{type(e).__name__}: {str(e)[:300]}"
                        if name in backends:
                            per_eval[name] = float("nan")
                    row["paths"][name] = rec
                    print(B, side, kind, name, json.dumps(rec), flush=True)
                res["levels"][f"b{B} {side}x{side} {kind}"] = row
                del ins, outs
                torch.cuda.empty_cache()
        if cfgs:   # the Triton form's configurations differ per shape (the head is padded per level)
            per_eval["triton, best config per shape"] = sum(
                min((r["paths"][k]["us"] for k in r["paths"] if k.startswith("triton") and "us" in r["paths"][k]),
                    default=float("nan")) * r["calls_per_eval"] / 1e3
                for key, r in res["levels"].items() if key.startswith(f"b{B} "))
        res.setdefault("per_eval_ms", {})[f"b{B}"] = per_eval
        print(B, "per UNet evaluation (ms):", json.dumps(per_eval), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


def _sdpa(F: Any, sdpa_kernel: Any, backend: Any, qkv: Any, scale: float | None = None) -> Any:
    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(*qkv, scale=scale)


if __name__ == "__main__":
    main()

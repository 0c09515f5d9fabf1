"""The SD v1-4 UNet's GEGLU (``linear → chunk → value · gelu(gate)``) at the UNet's own shapes, on one
card: the library path the optimized UNet runs today (``torch.compile``: a cuBLAS product, then
Inductor's fused gate kernel) beside a one-kernel form (:func:`geglu` below: both halves' tiles for
the same output columns in one Triton program, two accumulators over one pass of ``x``, biases, the
exact (erf) GELU and the product in float32 in the epilogue, only ``y`` [M, N] written), and the
product alone (the libraries' floor for the first). Each checked against float64 first; event-timed
medians; two inputs alternated. The same run measures the card's fp16 GEMM rate (8192³) as the
ceiling. Bench-only: the UNet does not use the one-kernel form (docs/performance.md, run 26: at
Triton's rate for these products it is slower than the library path it would replace).

    python bench/sd_geglu.py --batch 64 2 --out bench/results/h200-run26-sd-geglu.json

Per UNet evaluation the shapes occur 5, 5, 5 and 1 times (64², 32², 16², 8²): the ``per_eval_ms``
rows weigh them so.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

# (block_m, block_n, block_k, warps, stages): block_n columns of each half per program
# (the sweep of run 26)
GEGLU_CONFIGS: tuple[tuple[int, int, int, int, int], ...] = (
    (128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (128, 64, 64, 8, 3), (128, 128, 32, 8, 4), (64, 128, 64, 4, 3),
    (256, 64, 64, 8, 3), (64, 64, 64, 4, 4))

_KERNEL: Any = None


def _kernel() -> Any:
    global _KERNEL
    if _KERNEL is not None:
        return _KERNEL
    import triton
    import triton.language as tl

    @triton.jit
    def _geglu_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, N, sxm, swn, sym, K: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
        pid = tl.program_id(0)
        npm = tl.cdiv(M, BM)
        npn = tl.cdiv(N, BN)
        per_group = GROUP_M * npn
        first_m = (pid // per_group) * GROUP_M
        size_m = tl.minimum(npm - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % size_m
        pid_n = (pid % per_group) // size_m
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        mm = rm < M
        nm = rn < N
        xp = x_ptr + rm[:, None] * sxm + rk[None, :]
        hp = w_ptr + rn[None, :] * swn + rk[:, None]          # value half: rows [0, N) of W, as Wᵀ tiles
        gp = w_ptr + (rn[None, :] + N) * swn + rk[:, None]    # gate half: rows [N, 2N)
        acc_h = tl.zeros((BM, BN), dtype=tl.float32)
        acc_g = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(0, K, BK):
            km = (k + rk) < K
            a = tl.load(xp, mask=mm[:, None] & km[None, :], other=0.0)
            wh = tl.load(hp, mask=km[:, None] & nm[None, :], other=0.0)
            wg = tl.load(gp, mask=km[:, None] & nm[None, :], other=0.0)
            acc_h = tl.dot(a, wh, acc_h)
            acc_g = tl.dot(a, wg, acc_g)
            xp += BK
            hp += BK
            gp += BK
        bh = tl.load(b_ptr + rn, mask=nm, other=0.0).to(tl.float32)
        bg = tl.load(b_ptr + N + rn, mask=nm, other=0.0).to(tl.float32)
        h = acc_h + bh[None, :]
        g = acc_g + bg[None, :]
        y = h * (0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476)))
        tl.store(y_ptr + rm[:, None] * sym + rn[None, :], y.to(y_ptr.dtype.element_ty), mask=mm[:, None] & nm[None, :])

    _KERNEL = _geglu_kernel
    return _KERNEL


def geglu_reference(x: Any, weight: Any, bias: Any) -> Any:
    """The module's own arithmetic: ``linear → chunk(2) → value · gelu(gate)`` (diffusers' GEGLU)."""
    import torch.nn.functional as F

    h, g = F.linear(x, weight, bias).chunk(2, dim=-1)
    return h * F.gelu(g)


def geglu(x: Any, weight: Any, bias: Any, config: tuple[int, int, int, int, int] = GEGLU_CONFIGS[0],
          out: Any = None) -> Any:
    """``y = h · gelu(g)`` for ``h, g = (x Wᵀ + b).chunk(2, -1)``, x [..., K] with a contiguous last
    dimension, weight [2N, K] contiguous, bias [2N]; one clear error for what it does not take."""
    import torch
    import triton

    if weight.dim() != 2 or weight.shape[0] % 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"geglu: weight must be [2N, K] with K = x's last dimension {x.shape[-1]}, "
                         f"got {tuple(weight.shape)}")
    if bias is None or tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"geglu: bias must be [{weight.shape[0]}], got {None if bias is None else tuple(bias.shape)}")
    if x.dtype != weight.dtype or bias.dtype != weight.dtype:
        raise ValueError(f"geglu: x, weight and bias in one dtype, got {x.dtype}, {weight.dtype}, {bias.dtype}")
    if not weight.is_contiguous() or x.stride(-1) != 1:
        raise ValueError("geglu: weight contiguous and x's last dimension contiguous")
    bm, bn, bk, warps, stages = config
    K, N = int(weight.shape[1]), int(weight.shape[0]) // 2
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = int(x2.shape[0])
    y = out if out is not None else torch.empty(*x.shape[:-1], N, device=x.device, dtype=x.dtype)
    y2 = y.view(M, N)
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    _kernel()[grid](x2, weight, bias, y2, M, N, x2.stride(0), weight.stride(0), y2.stride(0), K=K,
                    BM=bm, BN=bn, BK=bk, GROUP_M=8, num_warps=warps, num_stages=stages)
    return y


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="+", default=[64, 2], help="UNet batch (2 × images with CFG)")
    ap.add_argument("--configs", default=None, help="Triton configs block_m,block_n,block_k,warps,stages;… "
                    "(default: GEGLU_CONFIGS)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    import torch
    import torch.nn.functional as F

    from bench.cli import run_record
    from bench.sd_levels import LEVELS, _time_ms, gemm_tflops, parse_configs

    dev, dt = "cuda", torch.float16
    cfgs = parse_configs(a.configs, GEGLU_CONFIGS)
    res: dict[str, Any] = {**run_record(), "dtype": "fp16", "levels": {}}
    res["gemm_tflops_fp16"] = gemm_tflops(dt)
    compiled = torch.compile(geglu_reference, fullgraph=True, dynamic=False)
    for B in a.batch:
        per_eval: dict[str, float] = {}
        for side, C, calls in LEVELS:
            M, K, N = B * side * side, C, 4 * C
            g = torch.Generator(device=dev).manual_seed(0)
            xs = [torch.randn(M, K, device=dev, dtype=dt, generator=g) for _ in range(2)]
            w = (torch.randn(2 * N, K, device=dev, generator=g) * K ** -0.5).to(dt)
            b = (torch.randn(2 * N, device=dev, generator=g) * 0.1).to(dt)
            nref = min(M, 4096)
            ref = geglu_reference(xs[0][:nref].double(), w.double(), b.double())
            flop = 2 * M * K * 2 * N
            row: dict[str, Any] = {"M": M, "K": K, "N": N, "calls_per_eval": calls, "gflop": flop / 1e9, "paths": {}}
            cands: list[tuple[str, Any]] = [
                ("product alone (cuBLAS, F.linear)", lambda i: F.linear(xs[i % 2], w, b)),
                ("library: eager", lambda i: geglu_reference(xs[i % 2], w, b)),
                ("library: torch.compile (as the optimized UNet)", lambda i: compiled(xs[i % 2], w, b)),
            ]
            outs = [torch.empty(M, N, device=dev, dtype=dt) for _ in range(2)]
            cands += [(f"one kernel: triton m{c[0]} n{c[1]} k{c[2]} w{c[3]} st{c[4]}",
                       lambda i, c=c: geglu(xs[i % 2], w, b, config=c, out=outs[i % 2])) for c in cfgs]
            for name, fn in cands:
                rec: dict[str, Any] = {}
                try:
                    out = fn(0)
                    torch.cuda.synchronize()
                    if not name.startswith("product"):
                        rec["max_rel_err_vs_fp64"] = float((out[:nref].double() - ref).abs().max() / ref.abs().max())
                    us = _time_ms(fn, 20) * 1e3
                    rec["us"] = us
                    rec["tflops"] = flop / (us * 1e-6) / 1e12
                    rec["of_gemm"] = rec["tflops"] / res["gemm_tflops_fp16"]
                    per_eval[name] = per_eval.get(name, 0.0) + calls * us / 1e3
                except Exception as e:  # a config that does not compile or fit: recorded, not fatal
                    rec["failed"] = f"{type(e).__name__}: {str(e)[:300]}"
                    per_eval[name] = float("nan")
                row["paths"][name] = rec
                print(B, side, name, json.dumps(rec), flush=True)
            res["levels"][f"b{B} {side}x{side}"] = row
            del xs, outs
            torch.cuda.empty_cache()
        res.setdefault("per_eval_ms", {})[f"b{B}"] = per_eval
        print(B, "per UNet evaluation (ms):", json.dumps(per_eval), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()

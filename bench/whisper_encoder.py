"""The Whisper encoder on one GPU, by compile variant and chunk size, with its device time by kernel
class (matrix products, attention, Inductor's own kernels, other) and the same run's GEMM ceiling.

    python bench/whisper_encoder.py [--variants default,freeze,cudnn] [--chunks 128]
                                    [--profile] [--mlp] [--norm] [--time-limit 400] [--out enc.json]

Variants, one per ``--variants`` entry: ``eager``, or ``torch.compile(encoder, dynamic=False)``
as the optimized path builds it with settings joined by ``+``: ``default`` (the optimized path's
own: default mode, not full-graph), ``freeze`` (Inductor ``freezing``: weights as constants),
``cdt`` (Inductor ``coordinate_descent_tuning``: launch settings of its own kernels tuned),
``cudnn`` / ``flash`` (that attention kernel first in SDPA's priority order, in the order written;
compiled without the FX-graph and AOT-autograd caches, whose keys do not hold that order, and the
attention kernels that ran are recorded with ``--profile``), ``autotune``
(``max-autotune-no-cudagraphs``: product templates timed, bias and GELU fused into them), ``gemm``
(Inductor ``max_autotune_gemm`` alone: only the products' templates timed against cuBLAS, with
the epilogue's GELU fused into a Triton template where that wins; no convolution or pointwise
tuning), ``tma`` (Inductor's persistent TMA product template among the candidates, with ``gemm``),
``mk`` (Inductor ``triton.multi_kernel``: reductions such as the norms also generated in their
persistent form and the faster chosen at run time), ``fast`` (the optimized path's own encoder,
:class:`~mi300x_cert.workloads.optimized.encoder_fast.FastEncoder`: attention without layout
copies), ``mlp`` (``fast`` with the MLP's first product and GELU in one Triton kernel), ``norm``
(``fast`` with each residual add and the next LayerNorm in one Triton kernel); e.g. ``cdt+flash``,
``gemm+tma``, ``fast+mk``, ``mlp+norm``. ``--mlp`` also times the fused kernel's launch settings
alone against the library's product and GELU at the MLP's shape, ``--norm`` the add + LayerNorm
kernel's against Inductor's norm kernel. Each variant is checked against the eager encoder on the first chunk (relative error
of the last hidden state). Prints one JSON object per result as it goes; the ``--out`` file says
``"complete": true`` once every variant has run, and the exit status is 1 if any variant failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

SETTINGS = ("default", "freeze", "cdt", "cudnn", "flash", "autotune", "gemm", "tma", "mk", "fast", "mlp", "norm")


def kernel_class(name: str) -> str:
    """The class of one device kernel by its name: ``gemm`` (cuBLAS/CUTLASS/Triton product
    templates, the fast encoder's fused product and GELU), ``inductor`` (Inductor's generated
    Triton kernels, including the layout copies it puts before an attention call, and the fast
    encoder's add + LayerNorm kernel in place of its norms), ``attention`` (the fused attention
    kernels), ``other``."""
    n = name.lower()
    if n.startswith("triton_tem") or "linear_gelu" in n:  # Inductor's templates, the fast encoder's product
        return "gemm"
    if "add_ln_kernel" in n:  # the fast encoder's add + LayerNorm, in place of Inductor's norm kernels
        return "inductor"
    if n.startswith("triton_") or "triton" in n:
        return "inductor"
    if any(k in n for k in ("flash", "fmha", "attention", "sdpa")):  # before "cutlass": flash kernels use it
        return "attention"
    if any(k in n for k in ("gemm", "cutlass", "nvjet", "cublas", "xmma")):
        return "gemm"
    return "other"


def mlp_kernels(enc: Any, clips: int, reps: int) -> dict[str, Any]:
    """The first MLP product with its GELU at the encoder's shape (``clips`` × frames rows, layer 0's
    weights): the library's ``gelu(linear(x))`` (as the compiled encoder runs it: a cuBLAS product with
    the bias, then a GELU kernel) against the fused Triton kernel in each launch setting; event-timed
    medians and the largest difference from the library's output."""
    import torch
    import torch.nn.functional as F

    from bench.whisper_parts import _events_ms
    from mi300x_cert.workloads.optimized.encoder_fast import LINEAR_GELU_CONFIGS, linear_gelu_triton

    fc1 = enc.layers[0].fc1
    frames = int(enc.embed_positions.weight.shape[0])
    M, K, N = clips * frames, int(fc1.weight.shape[1]), int(fc1.weight.shape[0])
    g = torch.Generator(device="cuda").manual_seed(1)
    xs = [torch.randn(M, K, device="cuda", dtype=torch.float16, generator=g) for _ in range(2)]
    out: dict[str, Any] = {"m": M, "k": K, "n": N, "tflop": 2 * M * K * N / 1e12, "configs": {}}
    lib = torch.compile(lambda x: F.gelu(F.linear(x, fc1.weight, fc1.bias)), dynamic=False)
    with torch.inference_mode():
        ref = lib(xs[0])
        out["library_ms"] = _events_ms(lambda i: lib(xs[i % 2]), reps + 2)
        out["library_product_ms"] = _events_ms(lambda i: F.linear(xs[i % 2], fc1.weight, fc1.bias), reps + 2)
        for cfg in LINEAR_GELU_CONFIGS:
            key = "x".join(str(c) for c in cfg)
            try:
                y = linear_gelu_triton(xs[0], fc1.weight, fc1.bias, cfg)
                diff = float((y.float() - ref.float()).abs().max())
                ms = _events_ms(lambda i: linear_gelu_triton(xs[i % 2], fc1.weight, fc1.bias, cfg), reps + 2)
                out["configs"][key] = {"ms": ms, "max_abs_diff": diff,
                                       "tflops": out["tflop"] / (ms * 1e-3),
                                       "vs_library": out["library_ms"] / ms}
            except Exception as e:  # a setting that does not fit the card is recorded, the rest go on
                out["configs"][key] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    return out


NORM_SETTINGS = ((4, 4), (2, 4), (1, 4), (4, 8), (8, 8))  # (rows per program, warps)


def norm_kernels(enc: Any, clips: int, reps: int) -> dict[str, Any]:
    """A residual add with the clamp and the next LayerNorm at the encoder's shape (``clips`` × frames
    rows): the library's ops compiled (Inductor's fused norm kernel, as the compiled encoder runs it)
    against the add + LayerNorm kernel in each setting; event-timed medians, the bytes moved (two
    tensors read, two written) as TB/s, and the largest difference from the library's outputs."""
    import torch

    from bench.whisper_parts import _events_ms
    from mi300x_cert.workloads.optimized.encoder_fast import add_layer_norm_reference, add_layer_norm_triton

    ln = enc.layers[0].self_attn_layer_norm
    frames = int(enc.embed_positions.weight.shape[0])
    M, N = clips * frames, int(ln.weight.shape[0])
    g = torch.Generator(device="cuda").manual_seed(2)
    rs = [torch.randn(M, N, device="cuda", dtype=torch.float16, generator=g) for _ in range(2)]
    ys = [torch.randn(M, N, device="cuda", dtype=torch.float16, generator=g) for _ in range(2)]
    gb = 4 * M * N * 2 / 1e9
    out: dict[str, Any] = {"rows": M, "n": N, "gb_moved": gb, "settings": {}}
    lib = torch.compile(lambda r, y: add_layer_norm_reference(r, y, ln.weight, ln.bias, ln.eps, True), dynamic=False)
    with torch.inference_mode():
        ref = lib(rs[0], ys[0])
        out["library_ms"] = _events_ms(lambda i: lib(rs[i % 2], ys[i % 2]), reps + 2)
        out["library_tb_per_s"] = gb / out["library_ms"]
        for rows, warps in NORM_SETTINGS:
            key = f"rows{rows}-w{warps}"
            try:
                h, o = add_layer_norm_triton(rs[0], ys[0], ln.weight, ln.bias, ln.eps, True, rows, warps)
                diff = max(float((h.float() - ref[0].float()).abs().max()), float((o.float() - ref[1].float()).abs().max()))
                ms = _events_ms(lambda i: add_layer_norm_triton(rs[i % 2], ys[i % 2], ln.weight, ln.bias, ln.eps, True,
                                                                rows, warps), reps + 2)
                out["settings"][key] = {"ms": ms, "tb_per_s": gb / ms, "max_abs_diff": diff,
                                        "vs_library": out["library_ms"] / ms}
            except Exception as e:  # a setting that does not fit is recorded, the rest go on
                out["settings"][key] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="synthetic:whisper-large-v3")
    ap.add_argument("--variants", default="eager,default,freeze,cudnn")
    ap.add_argument("--chunks", default="128", help="clips per encoder call, comma-separated")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="device time by kernel class per variant")
    ap.add_argument("--mlp", action="store_true",
                    help="also time the fused product+GELU kernel's settings against the library's at the MLP's shape")
    ap.add_argument("--norm", action="store_true",
                    help="also time the add + LayerNorm kernel's settings against the library's at the encoder's shape")
    ap.add_argument("--time-limit", type=float, default=400.0)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    bad = [v for v in variants if v != "eager" and any(t not in SETTINGS for t in v.split("+"))]
    if bad or not variants:
        ap.error(f"--variants: unknown {bad or variants}; known: eager, or {'+'.join(SETTINGS[:2])}-style "
                 f"joins of {', '.join(SETTINGS)}")
    if len(set(variants)) < len(variants):
        ap.error(f"--variants: each variant once, got {a.variants!r}")
    try:
        chunks = [int(c) for c in a.chunks.split(",") if c.strip()]
    except ValueError:
        chunks = []
    if not chunks or min(chunks) < 1:
        ap.error(f"--chunks: positive clip counts, got {a.chunks!r}")

    import torch
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode

    from bench.cli import _whisper_model, environment, measure_gemm
    from bench.whisper_parts import _events_ms, kernel_rows
    from mi300x_cert.workloads.optimized.common import compile_module, setup_compile_cache
    from mi300x_cert.workloads.optimized.encoder_fast import FastEncoder

    t_end = time.time() + a.time_limit
    res: dict[str, Any] = {"conditions": environment(), "model": a.model, "dtype": "float16",
                           "variants": {}, "gemm": measure_gemm()}

    def emit(key: str, val: Any) -> None:
        print(json.dumps({key: val}), flush=True)
        if a.out:
            Path(a.out).write_text(json.dumps(res, indent=1))

    emit("gemm", res["gemm"])
    setup_compile_cache()
    m = _whisper_model(a.model, torch.float16)
    enc = m.model.encoder
    cfg = m.config
    x1 = torch.randn(1, cfg.num_mel_bins, 3000, device="cuda", dtype=torch.float16)
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        enc(x1)
    tflop_clip = fc.get_total_flops() / 1e12
    res["tflop_per_clip"] = tflop_clip
    g = torch.Generator(device="cuda").manual_seed(0)
    inputs = {C: [torch.randn(C, cfg.num_mel_bins, 3000, device="cuda", dtype=torch.float16, generator=g)
                  for _ in range(2)] for C in chunks}
    n_ref = min(4, chunks[0])
    with torch.inference_mode():  # the eager encoder's output for the first clips of the first chunk
        ref = enc(inputs[chunks[0]][0][:n_ref]).last_hidden_state.float()

    def last(out: Any) -> Any:  # the library encoder returns a model output, FastEncoder the tensor
        return getattr(out, "last_hidden_state", out)

    if a.mlp:
        res["mlp"] = mlp_kernels(enc, chunks[0], a.reps)
        emit("mlp", res["mlp"])
    if a.norm:
        res["norm"] = norm_kernels(enc, chunks[0], a.reps)
        emit("norm", res["norm"])

    def build(v: str) -> tuple[Any, str, Any]:
        prio: Any = contextlib.nullcontext
        if v == "eager":
            return enc, "eager", prio
        parts = set(v.split("+"))
        first = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}
        lead = [first[k] for k in v.split("+") if k in first]  # in the order written
        if lead:
            order = lead + [b for b in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                                        SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH) if b not in lead]

            def prio() -> Any:  # the order, and no cached graph compiled under another one
                stack = contextlib.ExitStack()
                stack.enter_context(sdpa_kernel(order, set_priority=True))
                stack.enter_context(inductor_config.patch(fx_graph_cache=False))
                stack.enter_context(functorch_config.patch(enable_autograd_cache=False))
                return stack
        mode = "max-autotune-no-cudagraphs" if "autotune" in parts else "default"
        options: Any = {k: True for k, on in (("freezing", "freeze" in parts),
                                              ("coordinate_descent_tuning", "cdt" in parts),
                                              ("max_autotune_gemm", bool(parts & {"gemm", "tma"})),
                                              ("triton.enable_persistent_tma_matmul", "tma" in parts)) if on}
        if "mk" in parts:
            options["triton.multi_kernel"] = 1
        if parts & {"gemm", "tma"}:
            options["max_autotune_gemm_backends"] = "ATEN,TRITON"
        options = options or None
        target: Any = enc
        if parts & {"fast", "mlp", "norm"}:
            target = FastEncoder(enc, mlp="fused" if "mlp" in parts else "library",
                                 norm="fused" if "norm" in parts else "library")
        fn, label = compile_module(target, device="cuda", mode=mode, fullgraph=False, options=options)
        if target is not enc:
            label = f"FastEncoder(mlp={target.mlp}, norm={target.norm}), {label}"
        if lead:
            label += f", SDPA order {[b.name for b in order]}"
        return fn, label, prio

    for v in variants:
        if time.time() > t_end - 60:
            res["variants"][v] = {"skipped": "time limit"}
            emit(v, res["variants"][v])
            continue
        torch._dynamo.reset()
        row: dict[str, Any] = {}
        res["variants"][v] = row
        try:
            fn, label, prio = build(v)
            row["label"] = label
            with torch.inference_mode(), prio():
                t0 = time.perf_counter()
                for C in chunks:
                    if time.time() > t_end - 30:
                        row[f"c{C}"] = {"skipped": "time limit"}
                        continue
                    xs = inputs[C]
                    t1 = time.perf_counter()
                    out = last(fn(xs[0]))  # the first call of a shape compiles it
                    torch.cuda.synchronize()
                    first_s = time.perf_counter() - t1
                    if C == chunks[0]:
                        o = out[:n_ref].float()
                        row["rel_err_vs_eager"] = float((o - ref).norm() / ref.norm())
                    del out
                    ms = _events_ms(lambda i: last(fn(xs[i % 2])), a.reps)
                    r: dict[str, Any] = {"first_call_s": first_s, "ms_per_chunk": ms, "ms_per_clip": ms / C,
                                         "tflops": tflop_clip * C / (ms * 1e-3),
                                         "frac_gemm": tflop_clip * C / (ms * 1e-3) / res["gemm"]["tflops"]}
                    if a.profile:
                        with profile(activities=[ProfilerActivity.CUDA]) as prof:
                            fn(xs[0])
                            torch.cuda.synchronize()
                        classes: dict[str, float] = {}
                        top = []
                        for ms_k, calls, name in kernel_rows(prof, 1e3, top=None):  # heaviest first
                            k = kernel_class(name)
                            classes[k] = classes.get(k, 0.0) + ms_k
                            top.append((ms_k, calls, k, name))
                        r["ms_by_class"] = {k: round(val, 3) for k, val in sorted(classes.items())}
                        r["attention_kernels"] = sorted({t[3] for t in top if t[2] == "attention"})
                        r["top_kernels_ms"] = [list(t) for t in top[:25]]
                    row[f"c{C}"] = r
                    torch.cuda.empty_cache()
                    emit(v, row)
            row["compile_and_first_s"] = time.perf_counter() - t0
        except Exception as e:  # a variant that fails to compile or run is recorded, the rest go on
            row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
        emit(v, row)
    failed = [v for v, row in res["variants"].items() if "error" in row]
    res["complete"] = True
    res["failed"] = failed
    emit("complete", True)
    if not a.out:
        print(json.dumps(res, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

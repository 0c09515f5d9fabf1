"""Where one compiled SD v1-4 UNet evaluation spends its time on this card, by kernel class.

    python bench/sd_profile.py [--batches 2,64] [--variants base,freeze,freeze+split_reductions=false]
                               [--unet-forms library,nhwc-up,fast] [--norms] [--graph]
                               [--kernel-min-elements N] [--out profile.json]

The UNet is prepared as the optimized path prepares it (channels-last, fused QKV, the attention
kernel timed and put first) and compiled per variant (``base``: ``conv_1x1_as_mm``; ``freeze``:
Inductor's weight freezing on top — the optimized path's settings since; ``cdt``: coordinate-descent
tuning of Inductor's own kernels on top of that; any of them followed by ``+key=value`` items adds
those Inductor settings, e.g. ``freeze+split_reductions=false+combo_kernels=true``), each in every
``--unet-forms`` form of ``unet_fast.prepare_unet`` (``library``: diffusers' modules as they are;
``nhwc-up``: upsampling kept channels-last; ``fast``: and the GroupNorm kernels). Per UNet batch
(2 = one image with CFG, 64 = 32 images): compile time, the mean time of one evaluation (device
events, warm), with ``--graph`` also of one evaluation captured as a device graph and replayed (as
the optimized path runs it: at batch 2 the eager call is bound by the host), and one profiled
evaluation bucketed into convolution / matrix product / attention / Inductor-generated (norms,
element-wise) / other, with the largest kernels by total time. ``--norms`` also times every distinct
GroupNorm of the UNet (its shape at each batch, recorded from one eager call) compiled as the
library's ops and by ``unet_fast``'s kernels in several launch settings and in their one-kernel form
(``norm_totals_ms``: per batch, summed per evaluation over the norms the size rule gives the kernels). ``--kernel-min-elements`` sets that size rule for
the run (the ``fast`` form's threshold, recorded as ``kernel_min_elements``), to measure another
rule before changing it. Prints one JSON object per measurement.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Any

BUCKETS = (  # first match wins: Inductor names its kernels after the ops they fuse ("convolution")
    ("inductor", re.compile(r"^triton_", re.I)),
    ("norm-kernel", re.compile(r"^_gn_(partial|finish|apply|single)", re.I)),
    ("attention", re.compile(r"flash|fmha|attention|sdpa|cudnn_generated_fort_native_sdpa", re.I)),
    ("conv", re.compile(r"fprop|conv|implicit|dgrad|wgrad|nchw|nhwc", re.I)),
    ("gemm", re.compile(r"gemm|nvjet|cutlass|xmma|ampere_|sm90_|Kernel2|splitK", re.I)),
)


def bucket_of(name: str) -> str:
    for b, rx in BUCKETS:
        if rx.search(name):
            return b
    return "other"


def profile_buckets(fn: Any, reps: int = 3) -> dict[str, Any]:
    """Run ``fn`` ``reps`` times under the profiler; device time and kernel calls per evaluation by
    bucket, the top kernels and the top ones of no class (``other``)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    per_kernel: dict[str, list[float]] = {}
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = getattr(ev, "device_time", None)
        if us is None:
            us = ev.cuda_time
        per_kernel.setdefault(ev.name, []).append(float(us))
    return bucket_kernels(per_kernel, reps)


def bucket_kernels(per_kernel: dict[str, list[float]], reps: int) -> dict[str, Any]:
    """{kernel name: its launches' device µs} over ``reps`` runs → per run: ms and launches by
    bucket (largest first), the total, the 40 largest kernels and the 15 largest of no class."""
    buckets: dict[str, float] = {}
    calls: dict[str, float] = {}
    kernels = []
    for name, ts in per_kernel.items():
        b = bucket_of(name)
        buckets[b] = buckets.get(b, 0.0) + sum(ts) / reps / 1e3
        calls[b] = calls.get(b, 0.0) + len(ts) / reps
        kernels.append({"name": name[:120], "bucket": b, "ms_per_eval": sum(ts) / reps / 1e3,
                        "calls_per_eval": len(ts) / reps})
    kernels.sort(key=lambda k: -k["ms_per_eval"])
    return {"ms_by_bucket": {k: round(v, 3) for k, v in sorted(buckets.items(), key=lambda kv: -kv[1])},
            "calls_by_bucket": {k: calls[k] for k in sorted(calls, key=lambda k: -buckets[k])},
            "ms_total": round(sum(buckets.values()), 3), "top": kernels[:40],
            "top_other": [k for k in kernels if k["bucket"] == "other"][:15]}


NAMED_VARIANTS = {
    "base": {"conv_1x1_as_mm": True, "freezing": False, "coordinate_descent_tuning": False},
    "freeze": {"conv_1x1_as_mm": True, "freezing": True, "coordinate_descent_tuning": False},
    "cdt": {"conv_1x1_as_mm": True, "freezing": True, "coordinate_descent_tuning": True},
}


def variant_options(spec: str) -> dict[str, Any]:
    """Inductor options of one ``--variants`` item: a named variant, then ``+key=value`` items
    (checked like ``--sd-inductor``: an unknown key or a malformed item raises ``ValueError``)."""
    from bench.cli import split_variant

    name, _, own = split_variant(spec, NAMED_VARIANTS)
    return {**NAMED_VARIANTS[name], **own}


# group_norm_act_triton's launch settings timed per norm: the normalizing pass's tile (block_rows ×
# block_c by warps) and the statistics pass's (stat_rows pixels by stat_warps, summed per lane or per
# tile, stat_programs programs per multiprocessor at least). Run 75 timed 8 settings
# (bench/results/h200-run75-sd-norm-settings.json), run 76 the best three beside chunks of samples run
# in turn (a form since removed: 1.3-2x slower); the best three stay here.
_BEST = dict(block_rows=64, block_c=64, warps=4, stat_rows=64, stat_warps=4, stat_tile_sum=False, stat_programs=2,
             single=False, merge=False)   # the three kernels at every size (not the default's choice by size)
NORM_SETTINGS = (
    _BEST,
    dict(_BEST, stat_rows=32, stat_programs=8),
    dict(_BEST, stat_rows=128, stat_tile_sum=True, stat_programs=4),
    # two kernels: the statistics per whole group, merged by the normalizing pass
    dict(_BEST, merge=True),
    # the one-kernel form (a program per sample and group), in tiles of 2,048 or 4,096 elements
    dict(single=True, single_tile=2048, single_warps=4),
    dict(single=True, single_tile=4096, single_warps=8),
)


def norm_setting_label(cfg: dict[str, Any]) -> str:
    """``r64 c64 w4 · s128 w4 tile p8``: the normalizing pass's tile and warps, then the statistics
    pass's rows, warps, summation and programs per multiprocessor."""
    if cfg.get("single"):
        return f"one kernel t{cfg['single_tile']} w{cfg['single_warps']}"
    return (("two kernels · " if cfg.get("merge") else "") + f"r{cfg['block_rows']} c{cfg['block_c']} w{cfg['warps']} · s{cfg['stat_rows']} w{cfg['stat_warps']} "
            f"{'tile' if cfg['stat_tile_sum'] else 'lanes'} p{cfg['stat_programs']}")


def norm_sites(unet: Any, batch: int) -> list[dict[str, Any]]:
    """Every GroupNorm of one eager UNet call at ``batch`` (latents of 64², SD's 77 tokens): its input
    shape, groups, whether a SiLU follows (ResnetBlock2D's norms, the output norm) and whether the
    time embedding is added before it (ResnetBlock2D's second), distinct sites counted."""
    import torch

    sites: dict[tuple[Any, ...], dict[str, Any]] = {}
    hooks = []
    for name, m in unet.named_modules():
        if isinstance(m, torch.nn.GroupNorm):
            silu = name.endswith(("norm1", "norm2", "conv_norm_out"))
            has_t = name.endswith("norm2")

            def hook(mod: Any, args: Any, silu: bool = silu, has_t: bool = has_t) -> None:
                x = args[0]
                key = (tuple(x.shape), mod.num_groups, silu, has_t)
                site = sites.setdefault(key, {"shape": list(x.shape), "groups": mod.num_groups, "silu": silu,
                                              "time_add": has_t, "calls": 0, "eps": mod.eps})
                site["calls"] += 1

            hooks.append(m.register_forward_pre_hook(hook))
    try:
        dev = next(unet.parameters()).device
        with torch.inference_mode():
            unet(torch.randn(batch, 4, 64, 64, device=dev, dtype=torch.float16), torch.tensor(500.0, device=dev),
                 encoder_hidden_states=torch.randn(batch, 77, 768, device=dev, dtype=torch.float16), return_dict=False)
    finally:
        for h in hooks:
            h.remove()
    return list(sites.values())


def norm_rows(unet: Any, batch: int) -> list[dict[str, Any]]:
    """Per distinct GroupNorm site at ``batch``: the library's ops compiled (as the optimized path
    compiles them, channels-last) against ``group_norm_act_triton`` in each of ``NORM_SETTINGS``;
    µs per call (10 calls captured as a device graph and replayed, so the host's launches are not
    timed) and TB/s of one read and one write of the activation; the largest difference of each
    setting's output from the library's."""
    import torch

    from mi300x_cert.workloads.optimized.common import DeviceGraph, event_time_us

    def graph_us(fn: Any) -> float:
        g = DeviceGraph(lambda: [fn() for _ in range(10)], "cuda", name="norms")
        g.run()
        if not g.captured:
            raise RuntimeError(f"the norms' timing graph: {g.reason}")
        return event_time_us(lambda i: g.graph.replay(), 10) / 10

    from mi300x_cert.workloads.optimized.unet_fast import group_norm_act_reference, group_norm_act_triton

    rows = []
    gen = torch.Generator(device="cuda").manual_seed(batch)
    for site in norm_sites(unet, batch):
        N, C, H, W = site["shape"]
        x = torch.randn(N, C, H, W, device="cuda", dtype=torch.float16, generator=gen).to(memory_format=torch.channels_last)
        t = torch.randn(N, C, device="cuda", dtype=torch.float16, generator=gen) if site["time_add"] else None
        w = torch.randn(C, device="cuda", dtype=torch.float16, generator=gen)
        b = torch.randn(C, device="cuda", dtype=torch.float16, generator=gen)
        G, eps, silu = site["groups"], site["eps"], site["silu"]
        moved = 2 * x.numel() * x.element_size()
        torch._dynamo.reset()
        lib = torch.compile(lambda x, t: group_norm_act_reference(x, t, w, b, G, eps, silu), fullgraph=True, dynamic=False)
        row: dict[str, Any] = {"norm_site": site, "unet_batch": batch, "bytes_one_read_one_write": moved}
        with torch.inference_mode():
            ref = lib(x, t)
            us = graph_us(lambda: lib(x, t))
            row["library_us"] = us
            row["library_tb_per_s"] = moved / us / 1e6
            for cfg in NORM_SETTINGS:
                key = norm_setting_label(cfg)
                out = group_norm_act_triton(x, t, w, b, G, eps, silu, **cfg)
                us = graph_us(lambda: group_norm_act_triton(x, t, w, b, G, eps, silu, **cfg))
                row.setdefault("kernel_us", {})[key] = us
                row.setdefault("kernel_tb_per_s", {})[key] = moved / us / 1e6
                row.setdefault("max_abs_vs_library", {})[key] = float((out.float() - ref.float()).abs().max())
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="synthetic:sd-v1-4")
    ap.add_argument("--batches", default="2,64", help="UNet batch sizes (2 = one image with CFG)")
    ap.add_argument("--variants", default="base",
                    help="base,freeze,cdt (comma-separated), each optionally followed by +key=value Inductor settings")
    ap.add_argument("--unet-forms", default="library",
                    help="UNet forms (comma-separated) of unet_fast.prepare_unet: library,nhwc-up,fast")
    ap.add_argument("--norms", action="store_true",
                    help="also time each distinct GroupNorm of the UNet at each batch: library compiled "
                         "against the kernels")
    ap.add_argument("--graph", action="store_true",
                    help="also time one evaluation captured as a device graph and replayed")
    ap.add_argument("--kernel-min-elements", default=None,
                    help="the fast form's size rule for this run: activations of at least this many elements "
                         "take the GroupNorm kernels (default: unet_fast.KERNEL_MIN_ELEMENTS)")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--time-limit", type=float, default=420.0)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    labels = [v.strip() for v in a.variants.split(",") if v.strip()]
    if not labels or len(set(labels)) != len(labels):
        ap.error(f"--variants: name each variant once, got {a.variants!r}")
    try:  # a bad variant or batch is a usage error before the card is touched
        variants = {v: variant_options(v) for v in labels}
    except ValueError as e:
        ap.error(str(e))
    from mi300x_cert.workloads.optimized.unet_fast import UNET_FORMS

    forms = [f.strip() for f in a.unet_forms.split(",") if f.strip()]
    bad = [f for f in forms if f not in UNET_FORMS]
    if not forms or bad or len(set(forms)) != len(forms):
        ap.error(f"--unet-forms: each once, of {', '.join(UNET_FORMS)}; got {a.unet_forms!r}")
    try:
        batches = [int(x) for x in a.batches.split(",")]
    except ValueError:
        batches = []
    if not batches or min(batches) < 1:
        ap.error(f"--batches: expected positive UNet batch sizes like 2,64, got {a.batches!r}")
    from mi300x_cert.workloads.optimized import unet_fast

    if a.kernel_min_elements is not None:
        try:
            rule = int(a.kernel_min_elements)
        except ValueError:
            rule = -1
        if rule < 0:
            ap.error(f"--kernel-min-elements: expected a whole number of elements ≥ 0, got {a.kernel_min_elements!r}")
        unet_fast.KERNEL_MIN_ELEMENTS = rule
    import torch

    from bench.cli import _sd_params, run_record
    from mi300x_cert.workloads.optimized.common import DeviceGraph, event_time_us, pick_sdpa_backend
    from mi300x_cert.workloads.sd import SDWorkload

    t_end = time.time() + a.time_limit
    res: dict[str, Any] = {"conditions": run_record(argv), "model": a.model, "dtype": "float16",
                           "kernel_min_elements": unet_fast.KERNEL_MIN_ELEMENTS, "rows": []}

    def emit(row: dict[str, Any]) -> None:
        res["rows"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "top"}), flush=True)
        for k in row.get("top", [])[:12]:
            print(f"   {k['ms_per_eval']:8.3f} ms  x{k['calls_per_eval']:<4g} {k['bucket']:9s} {k['name']}", flush=True)
        if a.out:
            Path(a.out).write_text(json.dumps(res, indent=1))

    ns = argparse.Namespace(sd_model=a.model, steps=50, dtype="float16")
    wl = SDWorkload(_sd_params(ns, "stock"))
    if getattr(wl, "_hook", None) is not None:  # the stock workload's call counter breaks fullgraph
        wl._hook.remove()
        wl._hook = None
    unet = wl.unet
    unet.to(memory_format=torch.channels_last)
    unet.fuse_qkv_projections()
    res["sdpa"] = pick_sdpa_backend((16, 8), 4096, 40, unet.dtype, "cuda")
    if a.norms:  # at every batch (replayed from a device graph: the host's launches are not timed)
        res["norm_totals_ms"] = {}
        for B in batches:
            rows = norm_rows(unet, B)
            for row in rows:
                emit(row)
            # per UNet evaluation (each site × its calls), over the norms the size rule gives the kernels
            big = [r for r in rows if unet_fast.takes_kernels(math.prod(r["norm_site"]["shape"]))]
            res["norm_totals_ms"][f"b{B}"] = {
                "sites": len(big), "calls": sum(r["norm_site"]["calls"] for r in big),
                "library": sum(r["library_us"] * r["norm_site"]["calls"] for r in big) / 1e3,
                **{k: sum(r["kernel_us"][k] * r["norm_site"]["calls"] for r in big) / 1e3
                   for k in (big[0]["kernel_us"] if big else {})}}
        print(json.dumps({"norm_totals_ms": res["norm_totals_ms"]}), flush=True)
    import copy

    from mi300x_cert.workloads.optimized.unet_fast import prepare_unet

    refs: dict[int, tuple[str, Any]] = {}
    for (variant, opts), form in ((vo, f) for vo in variants.items() for f in forms):
        torch._dynamo.reset()
        model = unet if form == "library" else copy.deepcopy(unet)
        modules = prepare_unet(model, form)
        fn = torch.compile(model, fullgraph=True, dynamic=False, options=opts)
        if form != "library":
            variant = f"{variant}/{form}"
        for B in batches:
            if time.time() > t_end:
                emit({"variant": variant, "unet_batch": B, "skipped": "time limit"})
                continue
            gen = torch.Generator(device="cuda").manual_seed(B)
            x = torch.randn(B, 4, 64, 64, device="cuda", dtype=torch.float16, generator=gen)
            e = torch.randn(B, 77, 768, device="cuda", dtype=torch.float16, generator=gen)
            t = torch.tensor(500.0, device="cuda")
            row: dict[str, Any] = {"variant": variant, "options": opts, "unet_form": form,
                                   "modules_changed": modules, "unet_batch": B}
            try:
                with torch.inference_mode():
                    t0 = time.perf_counter()
                    ref = fn(x, t, encoder_hidden_states=e, return_dict=False)[0]
                    torch.cuda.synchronize()
                    row["compile_s"] = round(time.perf_counter() - t0, 1)
                    row["ms_per_eval"] = event_time_us(lambda i: fn(x, t, encoder_hidden_states=e, return_dict=False),
                                                       10 if B > 8 else 30) / 1e3
                    if a.graph:
                        g = DeviceGraph(lambda x, t, e: fn(x, t, encoder_hidden_states=e, return_dict=False)[0],
                                        "cuda", name=f"unet-b{B}")
                        g.run(x, t, e)
                        row["graph"] = g.reason
                        if g.captured:  # replays of the graph alone: its own input buffers, no copies
                            row["ms_per_eval_graph"] = event_time_us(lambda i: g.graph.replay(),
                                                                     10 if B > 8 else 50) / 1e3
                    first = refs.get(B)  # each later variant against the first one at this batch
                    if first is None:
                        refs[B] = (variant, ref.float())
                    else:
                        row["rel_diff_vs"] = {"variant": first[0],
                                              "rel": float((ref.float() - first[1]).norm() / first[1].norm())}
                    if not a.no_profile:
                        row.update(profile_buckets(lambda: fn(x, t, encoder_hidden_states=e, return_dict=False)))
                        mb = row["ms_by_bucket"]
                        row["libraries_ms"] = round(sum(mb.get(k, 0.0) for k in ("conv", "gemm", "attention")), 3)
                        row["memory_bound_ms"] = round(sum(mb.get(k, 0.0) for k in ("inductor", "norm-kernel")), 3)
                        if "ms_per_eval_graph" in row:
                            # the replayed graph's time minus the kernels of one profiled (eager) call of
                            # the same function: the launch gaps where kernels repeat to within a few % —
                            # at batch 64 the two calls' kernel sums differ by more than the gaps
                            row["graph_minus_kernels_ms"] = round(row["ms_per_eval_graph"] - row["ms_total"], 3)
            except Exception as ex:
                row["error"] = f"{type(ex).__name__}: {str(ex)[:300]}"
            emit(row)
        del model, fn
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    sys.exit(main())

"""cuDNN's attention plans at the certification's own shapes, each timed beside the one PyTorch runs.

PyTorch's cuDNN attention (``SDPBackend.CUDNN_ATTENTION``) builds one cuDNN graph per shape and runs
the first plan cuDNN's heuristics give it. cuDNN's frontend can also list every engine and every
value of its knobs (tile shapes and kernel configurations) for the same graph. This bench builds that
graph for each shape below through the frontend's Python package (``nvidia-cudnn-frontend``, imported
as ``cudnn``; not a dependency of the product), creates the plans of the heuristics' modes A, B and
fallback and then every knob combination of every engine (up to ``--max-plans`` per engine), builds
each plan that cuDNN supports, checks its output on both inputs against PyTorch's cuDNN attention
on the same tensors (the output buffers filled with NaN first, so a plan that writes nothing
cannot pass on an earlier plan's output), and times it (event-timed medians, two inputs
alternated; a plan that disagrees is timed too, marked, and never the best). Last, PyTorch's call
and the fastest plan that agrees are timed again in alternating rounds (``final``), so the two
stand side by side in one card state. A plan that fails to build or run is recorded with its
reason, not fatal; so is a knob value the engine refuses.

Shapes (the layouts are the product's: strided views of the projections' outputs, no copies):

- ``sd-64``: SD v1-4's 64² self-attention at 32 images (UNet batch 64): 8 heads of 40 columns over
  4,096 positions; q, k and v are column blocks of the fused QKV product (row stride 3 × 320).
- ``sd-32``: the 32² level: 8 heads of 80 over 1,024 positions (row stride 3 × 640).
- ``sd-16``: the 16² level: 8 heads of 160 over 256 positions (row stride 3 × 1,280).
- ``whisper-enc``: Whisper large-v3's encoder at a chunk of 128 clips: 20 heads of 64 over 1,500
  positions; q, k and v each their own projection's output (row stride 1,280).

    python bench/cudnn_attention_plans.py --cases sd-64,sd-32,whisper-enc --out plans.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import time
from typing import Any

# name: (batch, heads, positions, head columns, row stride of q/k/v in elements, fused QKV?)
CASES: dict[str, tuple[int, int, int, int, int, bool]] = {
    "sd-64": (64, 8, 4096, 40, 3 * 320, True),
    "sd-32": (64, 8, 1024, 80, 3 * 640, True),
    "sd-16": (64, 8, 256, 160, 3 * 1280, True),
    "whisper-enc": (128, 20, 1500, 64, 1280, False),
}


def parse_cases(text: str) -> list[str]:
    """``--cases``: names from :data:`CASES`, comma-separated; an unknown name is a ``ValueError``
    naming it and the known ones."""
    names = [c.strip() for c in text.split(",") if c.strip()]
    bad = [c for c in names if c not in CASES]
    if bad or not names:
        raise ValueError(f"--cases: unknown {', '.join(bad) or '(none given)'}; known: {', '.join(CASES)}")
    return list(dict.fromkeys(names))


def qkv_views(B: int, H: int, S: int, D: int, row: int, fused: bool, **kw: Any) -> tuple[Any, Any, Any]:
    """q, k, v as [B, H, S, D] views in the product's layout: column blocks of one [B, S, 3·H·D]
    product (``fused``) or three [B, S, H·D] products; ``row`` is their row stride in elements."""
    import torch

    E = H * D
    if fused:
        if row != 3 * E:
            raise ValueError(f"fused QKV: row stride {row} is not 3 × {E}")
        base = torch.randn(B, S, 3 * E, **kw)
        return tuple(base[..., i * E:(i + 1) * E].view(B, S, H, D).transpose(1, 2) for i in range(3))  # type: ignore[return-value]
    if row != E:
        raise ValueError(f"separate projections: row stride {row} is not {E}")
    return tuple(torch.randn(B, S, E, **kw).view(B, S, H, D).transpose(1, 2) for _ in range(3))  # type: ignore[return-value]


def knob_combinations(knobs: list[tuple[Any, int, int, int]], limit: int) -> list[dict[Any, int]]:
    """Every combination of the knobs' values (each ``(type, min, max, stride)``; a stride ≤ 0 is
    taken as 1), in order, at most ``limit`` of them; no knobs → one empty combination."""
    ranges = []
    for kt, lo, hi, st in knobs:
        ranges.append([(kt, v) for v in range(int(lo), int(hi) + 1, max(1, int(st)))])
    out = []
    for combo in itertools.product(*ranges):
        out.append(dict(combo))
        if len(out) >= limit:
            break
    return out


def knob_fields(kn: Any) -> tuple[Any, int, int, int]:
    """A frontend knob as ``(type, min, max, stride)`` (the attribute names differ between the
    frontend's versions; a missing stride is 1)."""
    kt = getattr(kn, "type", None)
    if kt is None:
        kt = getattr(kn, "knob_type")
    return kt, int(getattr(kn, "min_value")), int(getattr(kn, "max_value")), int(getattr(kn, "stride", 1) or 1)


AGREE = 2e-2   # the largest difference from PyTorch's output, as a share of its largest value


def err_of_largest(out: Any, ref: Any) -> float:
    """max |out − ref| / max |ref| in float32; NaN when ``out`` holds a NaN (never ≤ any tolerance)."""
    d = (out.float() - ref.float()).abs()
    if bool(d.isnan().any()):
        return float("nan")
    return float(d.max()) / max(float(ref.float().abs().max()), 1e-30)


def check_plan(call: Any, outs: list[Any], refs: list[Any], sync: Any, timer: Any) -> dict[str, Any]:
    """One plan: ``outs`` (its output buffers, one per input) filled with NaN, ``call(i)`` run on each
    input and compared with ``refs[i]`` (:func:`err_of_largest`; the worst of the inputs), then
    timed by ``timer(call)`` (µs) whether it agrees or not: ``agrees`` says which."""
    for o in outs:
        o.fill_(float("nan"))
    errs = []
    for i, ref in enumerate(refs):
        out = call(i)
        sync()
        errs.append(err_of_largest(out, ref))
    worst = float("nan") if any(math.isnan(e) for e in errs) else max(errs)
    rec: dict[str, Any] = {"err_of_largest": worst, "agrees": bool(worst <= AGREE)}
    rec["us"] = float(timer(call))
    return rec


def fastest_agreeing(plans: list[dict[str, Any]]) -> tuple[int | None, list[str]]:
    """The position of the fastest plan record that agrees (``agrees`` true and a finite ``us``;
    the first of equals), or None; and the names of plans that disagree yet ran faster than it
    (sorted, each once; all the timed ones that disagree when none agrees)."""
    timed = [(i, p) for i, p in enumerate(plans) if isinstance(p.get("us"), float) and math.isfinite(p["us"])]
    right = [(p["us"], i) for i, p in timed if p.get("agrees") is True]
    at = min(right)[1] if right else None
    limit = plans[at]["us"] if at is not None else math.inf
    return at, sorted({p["name"] for _, p in timed if p.get("agrees") is False and p["us"] < limit})


def finite_json(x: Any) -> Any:
    """``x`` with every non-finite float as a string (``"nan"``, ``"inf"``), so the file is standard JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: finite_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite_json(v) for v in x]
    return x


def _timed_us(fn: Any, n: int) -> float:
    """:func:`bench.sd_levels._time_ms` (3 warm-up calls, the median of 5 event-timed groups of
    ``n``) in µs."""
    from bench.sd_levels import _time_ms

    return _time_ms(fn, n) * 1e3


class _Graph:
    """One cuDNN SDPA graph for ``q, k, v`` (the first input pair's tensors give the shapes and
    strides) with an output laid out [B, S, H, D] as PyTorch's cuDNN attention returns it."""

    def __init__(self, cudnn: Any, handle: Any, q: Any, k: Any, v: Any, scale: float) -> None:
        g = cudnn.pygraph(io_data_type=cudnn.data_type.HALF, intermediate_data_type=cudnn.data_type.FLOAT,
                          compute_data_type=cudnn.data_type.FLOAT, handle=handle)
        self.q, self.k, self.v = g.tensor_like(q), g.tensor_like(k), g.tensor_like(v)
        try:
            o, _ = g.sdpa(name="sdpa", q=self.q, k=self.k, v=self.v, generate_stats=False, attn_scale=scale)
        except TypeError:
            o, _ = g.sdpa(name="sdpa", q=self.q, k=self.k, v=self.v, is_inference=True, attn_scale=scale)
        B, H, S, D = (int(x) for x in q.shape)
        o.set_output(True).set_dim([B, H, S, D]).set_stride([S * H * D, D, H * D, 1])
        self.o = o
        g.validate()
        g.build_operation_graph()
        self.g = g


def run_case(name: str, cudnn: Any, handle: Any, max_plans: int, reps: int, time_limit: float) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    B, H, S, D, row, fused = CASES[name]
    kw = {"device": "cuda", "dtype": torch.float16, "generator": torch.Generator(device="cuda").manual_seed(0)}
    ins = [qkv_views(B, H, S, D, row, fused, **kw) for _ in range(2)]
    scale = 1.0 / math.sqrt(D)
    flop = 4 * B * H * S * S * D
    rec: dict[str, Any] = {"B": B, "heads": H, "S": S, "D": D, "row_stride": row, "fused_qkv": fused,
                           "gflop": flop / 1e9, "plans": []}

    def torch_call(i: int) -> Any:
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return F.scaled_dot_product_attention(*ins[i % 2], scale=scale)

    refs = [torch_call(i).clone() for i in range(2)]
    torch.cuda.synchronize()
    t_torch = _timed_us(torch_call, reps)
    rec["torch_cudnn_us"] = t_torch
    rec["torch_cudnn_tflops"] = flop / (t_torch * 1e-6) / 1e12
    print(name, "torch cuDNN", f"{t_torch:.1f} us", f"{rec['torch_cudnn_tflops']:.0f} TFLOP/s", flush=True)

    outs = [torch.empty(B, S, H, D, device="cuda", dtype=torch.float16).transpose(1, 2) for _ in range(2)]
    t0 = time.monotonic()
    calls: dict[int, Any] = {}   # position in rec["plans"] → the plan's call

    def try_plans(label: str, make: Any) -> None:
        """``make(graph)`` creates the plans on a fresh graph; each plan is built, checked, timed."""
        gr = _Graph(cudnn, handle, *ins[0], scale)
        try:
            make(gr.g)
        except Exception as e:
            rec["plans"].append({"source": label, "failed": f"create: {type(e).__name__}: {str(e)[:300]}"})
            return
        try:
            gr.g.check_support()
        except Exception as e:
            rec["plans"].append({"source": label, "failed": f"check_support: {type(e).__name__}: {str(e)[:300]}"})
            return
        count = int(gr.g.get_execution_plan_count())
        for idx in range(count):
            if time.monotonic() - t0 > time_limit:
                rec["time_limit_hit"] = True
                return
            p: dict[str, Any] = {"source": label, "index": idx}
            try:
                p["name"] = str(gr.g.get_plan_name_at_index(idx))
            except Exception as e:
                p["name"] = f"? ({type(e).__name__})"
            try:
                tb = time.monotonic()
                gr.g.build_plan_at_index(idx)
                p["build_s"] = round(time.monotonic() - tb, 3)
                ws = int(gr.g.get_workspace_size_plan_at_index(idx))
                p["workspace_bytes"] = ws
                work = torch.empty(max(ws, 1), device="cuda", dtype=torch.uint8)
                packs = [{gr.q: q, gr.k: k, gr.v: v, gr.o: o} for (q, k, v), o in zip(ins, outs)]

                def call(i: int, idx: int = idx, packs: Any = packs, work: Any = work) -> Any:
                    gr.g.execute_plan_at_index(packs[i % 2], work, idx, handle=handle)
                    return outs[i % 2]

                p.update(check_plan(call, outs, refs, torch.cuda.synchronize, lambda f: _timed_us(f, reps)))
                p.update(tflops=flop / (p["us"] * 1e-6) / 1e12, vs_torch=t_torch / p["us"])
                calls[len(rec["plans"])] = call
            except Exception as e:
                p["failed"] = f"{type(e).__name__}: {str(e)[:300]}"
            rec["plans"].append(p)
            print(name, json.dumps(p), flush=True)

    modes = [m for m in ("A", "B", "FALLBACK") if hasattr(cudnn.heur_mode, m)]
    for m in modes:
        try_plans(f"heuristics {m}", lambda g, m=m: g.create_execution_plans([getattr(cudnn.heur_mode, m)]))
    # every engine and knob combination
    probe = _Graph(cudnn, handle, *ins[0], scale)
    engines: list[dict[str, Any]] = []
    try:
        n_eng = int(probe.g.get_engine_count())
    except Exception as e:
        n_eng = 0
        rec["engine_count_failed"] = f"{type(e).__name__}: {str(e)[:300]}"
    for e_id in range(n_eng):
        info: dict[str, Any] = {"engine": e_id}
        try:
            knobs = probe.g.get_knobs_for_engine(e_id)
            kl = [knob_fields(kn) for kn in knobs]
            info["knobs"] = [{"type": str(t), "min": lo, "max": hi, "stride": st} for t, lo, hi, st in kl]
            combos = knob_combinations(kl, max_plans)
        except Exception as e:
            info["knobs_failed"] = f"{type(e).__name__}: {str(e)[:300]}"
            combos = [{}]
        info["combinations_tried"] = len(combos)
        engines.append(info)

        def make(g: Any, e_id: int = e_id, combos: Any = combos, info: Any = info) -> None:
            info["refused"] = refused = []
            for c in combos:
                try:
                    g.create_execution_plan(e_id, c)
                except Exception as e:
                    refused.append({"knobs": {str(k): v for k, v in c.items()}, "why": f"{type(e).__name__}: {str(e)[:120]}"})
            info["accepted"] = len(combos) - len(refused)
            if not info["accepted"]:
                raise RuntimeError(f"engine {e_id}: no knob combination was accepted")

        try_plans(f"engine {e_id}", make)
    rec["engines"] = engines
    at, wrong_faster = fastest_agreeing(rec["plans"])
    if at is not None:
        best = rec["plans"][at]
        rec["best"] = {k: best[k] for k in ("name", "source", "us")}
        rec["best"]["vs_torch"] = t_torch / best["us"]
        # PyTorch's call and the best plan again, in alternating rounds: one card state for both
        rounds = [(_timed_us(torch_call, reps), _timed_us(calls[at], reps)) for _ in range(3)]
        tt, tb = statistics.median(r[0] for r in rounds), statistics.median(r[1] for r in rounds)
        rec["final"] = {"rounds_us": rounds, "torch_us": tt, "best_us": tb, "torch_over_best": tt / tb}
        rec["wrong_faster_than_best"] = wrong_faster
        print(name, "best", json.dumps(rec["best"]), "final", json.dumps(rec["final"]), flush=True)
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="sd-64,sd-32,whisper-enc", help=f"comma-separated, of {', '.join(CASES)}")
    ap.add_argument("--max-plans", type=int, default=48, help="knob combinations tried per engine (default 48)")
    ap.add_argument("--reps", type=int, default=10, help="calls per timed group (5 groups; default 10)")
    ap.add_argument("--time-limit", type=float, default=150.0, help="seconds of plans per case (default 150)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    try:
        cases = parse_cases(a.cases)
    except ValueError as e:
        ap.error(str(e))
    if a.max_plans < 1 or a.reps < 1:
        ap.error("--max-plans and --reps must be ≥ 1")
    import cudnn
    import torch

    from bench.cli import run_record

    handle = cudnn.create_handle()
    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
    res: dict[str, Any] = {**run_record(), "cudnn_frontend": getattr(cudnn, "__version__", "?"),
                           "cudnn_backend": int(cudnn.backend_version()),
                           "torch_cudnn": int(torch.backends.cudnn.version() or 0), "cases": {}}
    print("cuDNN backend", res["cudnn_backend"], "torch's", res["torch_cudnn"], "frontend", res["cudnn_frontend"],
          flush=True)
    for c in cases:
        res["cases"][c] = run_case(c, cudnn, handle, a.max_plans, a.reps, a.time_limit)
        torch.cuda.empty_cache()
        if a.out:
            with open(a.out, "w") as f:
                json.dump(finite_json(res), f, indent=1, allow_nan=False)


if __name__ == "__main__":
    main()

"""Shared machinery of the optimized path: a persistent compile cache, device-graph capture with a
portable fallback, and a per-card choice of attention kernel.

Vendor-neutral: ``torch.cuda.CUDAGraph`` is a HIP graph on ROCm builds of PyTorch, the compile
cache is Inductor's own, and the attention choice only picks among the kernels PyTorch ships for
the card it runs on (falling back to whatever ``scaled_dot_product_attention`` chooses by itself).
Nothing here imports torch at module import.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable

__all__ = [
    "DEFAULT_CACHE_DIR",
    "setup_compile_cache",
    "graphs_supported",
    "DeviceGraph",
    "GraphCache",
    "inductor_settings",
    "parse_inductor_settings",
    "compile_module",
]

DEFAULT_CACHE_DIR = "~/.cache/mi300x-cert/inductor"
_CACHE_ENV = "MI300X_CERT_COMPILE_CACHE"


def setup_compile_cache(directory: str | os.PathLike[str] | None = None) -> str:
    """Point Inductor's FX-graph cache (and Triton's kernel cache) at one persistent folder, so a
    recertification of the same host skips compilation.

    The AOT-autograd cache stays off unless the operator turns it on
    (``TORCHINDUCTOR_AUTOGRAD_CACHE=1``): its key is the graph before dispatch, which does not hold
    SDPA's priority order, so a graph compiled under another order (another attention kernel chosen
    by timing on an earlier run) would run while this run's conditions record the kernel it chose.
    Measured on an H200 (bench/results/h200-run17-whisper-encoder.json and
    h200-run22-whisper-encoder-sdpa.json): with it on, flash attention put first still ran the
    cached cuDNN graph, bit for bit; compiled without the caches, the flash kernel ran. The
    FX-graph cache is keyed on the graph after dispatch (the attention kernel's own op), so it is
    kept and the compilation itself stays cached.

    The folder is ``directory``, else ``$MI300X_CERT_COMPILE_CACHE``, else
    ``~/.cache/mi300x-cert/inductor``. Variables already set by the operator win. Returns the
    folder used. Call before the first ``torch.compile`` of the process.
    """
    d = Path(os.path.expanduser(str(directory or os.environ.get(_CACHE_ENV) or DEFAULT_CACHE_DIR)))
    d.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(d))
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "0")
    os.environ.setdefault("TRITON_CACHE_DIR", str(d / "triton"))
    try:  # torch may already be imported: set the live config too
        import torch._functorch.config as fc
        import torch._inductor.config as ic

        ic.fx_graph_cache = os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] == "1"
        if hasattr(fc, "enable_autograd_cache"):
            fc.enable_autograd_cache = os.environ["TORCHINDUCTOR_AUTOGRAD_CACHE"] == "1"
    except Exception:  # pragma: no cover - torch without inductor
        pass
    return os.environ["TORCHINDUCTOR_CACHE_DIR"]


INDUCTOR_ENV = "MI300X_CERT_INDUCTOR"


def _setting_value(text: str) -> Any:
    """true/yes/on, false/no/off, an integer, a float, else the text itself."""
    low = text.lower()
    if low in ("true", "yes", "on", "false", "no", "off"):
        return low in ("true", "yes", "on")
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_inductor_settings(spec: Any, source: str = "optimized_inductor") -> dict[str, Any]:
    """Inductor settings from a mapping or a ``"key=value,key=value"`` string (values: true/false,
    integers, floats, else text). Every key must be an existing ``torch._inductor.config`` entry
    (dotted for nested ones, e.g. ``triton.cudagraphs``); an unknown key or a malformed item raises
    ``ValueError`` naming it and ``source``."""
    if spec is None or spec == "" or spec == {}:
        return {}
    items: dict[str, Any] = {}
    if isinstance(spec, dict):
        items = {str(k): v for k, v in spec.items()}
    elif isinstance(spec, str):
        for part in spec.split(","):
            part = part.strip()
            if not part:
                continue
            if "=" not in part:
                raise ValueError(f"{source}: {part!r} is not key=value")
            k, v = (x.strip() for x in part.split("=", 1))
            items[k] = _setting_value(v)
    else:
        raise ValueError(f"{source}: expected a mapping or 'key=value,...', got {type(spec).__name__}")
    try:
        import torch._inductor.config as ic
    except Exception as e:  # pragma: no cover - torch without inductor
        raise ValueError(f"{source}: Inductor is not available ({type(e).__name__})") from e
    for k, v in list(items.items()):
        obj: Any = ic
        for piece in k.split("."):
            if not hasattr(obj, piece):
                raise ValueError(f"{source}: unknown Inductor setting {k!r}")
            obj = getattr(obj, piece)
        if isinstance(obj, bool) and not isinstance(v, bool):  # 0/1 for a switch
            if v not in (0, 1):
                raise ValueError(f"{source}: Inductor setting {k!r} is a switch, got {v!r}")
            items[k] = bool(v)
    return items


SD_INDUCTOR_DEFAULTS: dict[str, Any] = {"conv_1x1_as_mm": True, "freezing": True}


def inductor_settings(extra: Any = None, defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """Inductor settings for one compilation: ``defaults``, then ``extra`` (the workload parameter
    ``optimized_inductor``; ``mi300x-cert bench --sd-inductor``), then ``$MI300X_CERT_INDUCTOR``
    (the operator's word wins). All change kernel choice or scheduling, not the function, e.g.
    ``conv_1x1_as_mm`` (1×1 convolutions as matrix products), ``freezing`` (weights folded as
    constants of the compiled graph), ``coordinate_descent_tuning`` (Inductor times the launch
    parameters of its own kernels). Unknown keys raise ``ValueError`` naming them."""
    wanted = dict(defaults or {})
    wanted.update(parse_inductor_settings(extra))
    wanted.update(parse_inductor_settings(os.environ.get(INDUCTOR_ENV), source=INDUCTOR_ENV))
    return wanted


def compile_module(fn: Any, *, device: str, mode: str = "default", fullgraph: bool = True,
                   options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """``torch.compile`` on GPUs (CUDA or ROCm); on CPU the eager callable is returned unchanged
    unless ``MI300X_CERT_COMPILE_ON_CPU=1`` (CPU compilation costs minutes for a UNet).
    ``options``: Inductor settings for this compilation only (merged over the mode's own).

    Returns (callable, mode label recorded in conditions).
    """
    import torch

    if not str(device).startswith("cuda") and os.environ.get("MI300X_CERT_COMPILE_ON_CPU") != "1":
        return fn, "none (cpu)"
    label = f"torch.compile({mode}, fullgraph={fullgraph})"
    if not options:
        return torch.compile(fn, mode=mode, fullgraph=fullgraph, dynamic=False), label
    from torch._inductor import list_mode_options

    merged = {**list_mode_options(mode), **options}  # torch.compile takes a mode or options, not both
    extra = ", ".join(f"{k}={v}" for k, v in options.items())
    return torch.compile(fn, fullgraph=fullgraph, dynamic=False, options=merged), f"torch.compile({mode}, fullgraph={fullgraph}, {extra})"


def graphs_supported(device: str) -> bool:
    """True when device graphs can be captured here (CUDA, or HIP through the same API)."""
    if not str(device).startswith("cuda") or os.environ.get("MI300X_CERT_NO_GRAPHS") == "1":
        return False
    try:
        import torch

        return bool(torch.cuda.is_available() and hasattr(torch.cuda, "CUDAGraph"))
    except Exception:  # pragma: no cover
        return False


class DeviceGraph:
    """Capture ``fn(*static_inputs)`` once as a CUDA/HIP graph; ``run(*inputs)`` copies the new
    inputs into the static buffers and replays. Where graphs are unsupported (CPU) or the capture
    fails, ``run`` calls ``fn`` eagerly and ``reason`` says why — the function is the same.
    """

    def __init__(self, fn: Callable[..., Any], device: str, warmup_runs: int = 2, name: str = "graph") -> None:
        self.fn = fn
        self.device = device
        self.warmup_runs = warmup_runs
        self.name = name
        self.graph: Any = None
        self.static_in: tuple[Any, ...] = ()
        self.static_out: Any = None
        self.captured = False
        self.reason = "not captured yet"
        self.capture_s = 0.0

    def _capture(self, inputs: tuple[Any, ...]) -> None:
        import torch

        t0 = time.perf_counter()
        self.static_in = tuple(x.clone() for x in inputs)
        s = torch.cuda.Stream(device=self.device)
        s.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(s):
            for _ in range(max(self.warmup_runs, 1)):  # compile / autotune / cuBLAS handles outside capture
                self.fn(*self.static_in)
        torch.cuda.current_stream(self.device).wait_stream(s)
        torch.cuda.synchronize(self.device)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            self.static_out = self.fn(*self.static_in)
        torch.cuda.synchronize(self.device)
        self.graph = g
        self.captured = True
        self.reason = "captured"
        self.capture_s = time.perf_counter() - t0

    def run(self, *inputs: Any) -> Any:
        if not self.captured:
            if not graphs_supported(self.device):
                self.reason = "device graphs unsupported here (eager)"
                return self.fn(*inputs)
            if self.graph is None and self.reason == "not captured yet":
                try:
                    self._capture(inputs)
                except Exception as e:  # capture refused: same function, eagerly
                    self.graph = None
                    self.captured = False
                    self.reason = f"capture failed, eager: {type(e).__name__}: {str(e)[:200]}"
                    import torch

                    torch.cuda.synchronize(self.device)
                    return self.fn(*inputs)
            else:
                return self.fn(*inputs)
        for dst, src in zip(self.static_in, inputs):
            if dst.data_ptr() != src.data_ptr():
                dst.copy_(src, non_blocking=True)
        self.graph.replay()
        return self.static_out


class GraphCache:
    """One :class:`DeviceGraph` per input shape and dtype (a graph replays fixed shapes only).
    ``run`` returns a clone of the graph's static output when ``clone`` (the next replay would
    overwrite it); ``reason`` is the last graph's capture state."""

    def __init__(self, fn: Callable[..., Any], device: str, warmup_runs: int = 2, name: str = "graph") -> None:
        self.fn, self.device, self.warmup_runs, self.name = fn, device, warmup_runs, name
        self.graphs: dict[tuple, DeviceGraph] = {}
        self.reason = "not captured yet"

    def run(self, *inputs: Any, clone: bool = True) -> Any:
        key = tuple((tuple(x.shape), x.dtype) for x in inputs)
        g = self.graphs.get(key)
        if g is None:
            g = self.graphs[key] = DeviceGraph(self.fn, self.device, warmup_runs=self.warmup_runs, name=self.name)
        out = g.run(*inputs)
        self.reason = g.reason
        return out.clone() if (clone and g.captured) else out


def event_time_us(fn: Callable[[int], Any], n: int, warmup: int = 3) -> float:
    """Mean µs per call of ``fn(i)`` (i = 0, 1, …) on the current device stream, timed with device
    events after ``warmup`` untimed calls (``fn`` may rotate inputs by ``i``)."""
    import torch

    for i in range(warmup):
        fn(i)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(n):
        fn(i)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / n * 1e3


def pick_sdpa_backend(batch_heads: tuple[int, int], seq: int, head_dim: int, dtype: Any, device: str,
                      reps: int = 10) -> dict[str, Any]:
    """Time the fused attention kernels PyTorch has for this card on the model's largest attention
    shape and put the fastest first in SDPA's priority order (process-wide; the others stay as
    fallbacks for shapes it rejects). A kernel whose output differs from the default kernel's by
    more than 5e-3 (relative) is not chosen. Returns what was measured and chosen.

    On a build or card without a kernel (e.g. cuDNN attention on ROCm) that kernel is skipped;
    without ``torch._C._set_sdp_priority_order`` nothing changes.
    """
    import torch
    import torch.nn.functional as F

    info: dict[str, Any] = {"shape": [*batch_heads, seq, head_dim], "times_ms": {}, "chosen": "default"}
    if not str(device).startswith("cuda") or not hasattr(torch._C, "_set_sdp_priority_order"):
        return info
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except Exception:  # pragma: no cover
        return info
    cands = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION}
    if hasattr(SDPBackend, "CUDNN_ATTENTION"):
        cands["cudnn"] = SDPBackend.CUDNN_ATTENTION
    B, Hh = batch_heads
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(B, Hh, seq, head_dim, device=device, dtype=dtype, generator=g) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v)
    for name, be in cands.items():
        try:
            with sdpa_kernel([be]):
                out = F.scaled_dot_product_attention(q, k, v)
                err = float((out.float() - ref.float()).norm() / ref.float().norm())
                torch.cuda.synchronize(device)
                us = event_time_us(lambda i: F.scaled_dot_product_attention(q, k, v), reps, warmup=0)
            info["times_ms"][name] = us / 1e3
            info.setdefault("rel_err", {})[name] = err
        except Exception as ex:  # kernel unavailable for this shape/card
            info.setdefault("unavailable", {})[name] = type(ex).__name__
    ok = {n: t for n, t in info["times_ms"].items() if info["rel_err"][n] < 5e-3}
    if ok:
        best = min(ok, key=ok.get)
        order = list(torch._C._get_sdp_priority_order())
        first = int(cands[best].value) if hasattr(cands[best], "value") else int(cands[best])
        torch._C._set_sdp_priority_order([first] + [x for x in order if x != first])
        info["chosen"] = best
    return info

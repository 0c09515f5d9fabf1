"""The workload contract shared by Stable Diffusion, Whisper and ResNet-50.

A workload loads its model once (``__init__``), then runs batches::

    wl.conditions() -> dict        # what was measured: model, dtype, compile mode, versions …
    wl.warmup(batch_size) -> float # seconds spent (compilation included)
    wl.run_batch(batch_size, batch_index) -> dict
    wl.close()

``run_batch`` always returns ``latency_s`` (device work only, synchronized before the clock is
read) and ``latency_overhead_s`` (the same plus host-side input preparation and output
post-processing; always ≥ ``latency_s``) and ``items`` (images or clips in the batch). Timing
definitions per workload are in ``docs/workloads.md``.

torch and the model libraries are imported inside functions: importing this module is cheap.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any

from ..config import resolve_model_source
from ..errors import ModelSourceError, WorkerError

__all__ = [
    "Workload",
    "ModelSource",
    "resolve_device",
    "device_sync",
    "torch_dtype",
    "versions",
    "set_offline_env",
    "seeded_generator",
    "load_optimizer",
]

DTYPES = ("float32", "float16", "bfloat16")


def set_offline_env() -> None:
    """Forbid every Hugging Face hub access for this process (set before the libraries import)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def _quiet_libraries() -> None:
    try:
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()
    except Exception:  # pragma: no cover - transformers missing is reported elsewhere
        pass
    try:
        from diffusers.utils import logging as dlog

        dlog.set_verbosity_error()
    except Exception:  # pragma: no cover
        pass


def resolve_device(device: str | None) -> str:
    """``"auto"``/None → ``"cuda"`` when a GPU (CUDA or ROCm) is visible, else ``"cpu"``.

    ``"cuda"`` / ``"cuda:N"`` without a GPU raises WorkerError.
    """
    import torch

    dev = (device or "auto").strip().lower()
    if dev == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if dev.startswith("cuda"):
        if not torch.cuda.is_available():
            raise WorkerError(f"device {device!r} requested but torch sees no GPU (CUDA/ROCm)")
        return dev
    if dev == "cpu":
        return "cpu"
    raise WorkerError(f"device {device!r} is not one of auto, cpu, cuda, cuda:N")


def device_sync(device: str) -> None:
    """Wait for every queued kernel on ``device`` (no-op on CPU)."""
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


def torch_dtype(name: str, device: str) -> tuple[Any, str]:
    """``"float16"`` → (torch.float16, "float16"). On CPU float16 runs as float32 (most CPU
    kernels lack half precision); the returned name is the dtype actually used."""
    import torch

    if name not in DTYPES:
        raise WorkerError(f"dtype {name!r} is not one of {', '.join(DTYPES)}")
    if name == "float16" and not str(device).startswith("cuda"):
        name = "float32"
    return getattr(torch, name), name


def seeded_generator(seed: int, batch_index: int) -> Any:
    """A CPU generator for batch ``batch_index`` of a run seeded with ``seed`` (same on every device)."""
    import torch

    g = torch.Generator(device="cpu")
    g.manual_seed((int(seed) * 1_000_003 + int(batch_index) + 1) % (2**63 - 1))
    return g


def versions(device: str | None = None) -> dict[str, Any]:
    """Versions of the software stack (and the GPU's name) for the result rows."""
    out: dict[str, Any] = {"python": platform.python_version()}
    try:
        import torch

        out["torch"] = torch.__version__
        out["cuda"] = torch.version.cuda
        out["hip"] = getattr(torch.version, "hip", None)
        if device and str(device).startswith("cuda") and torch.cuda.is_available():
            idx = torch.device(device).index or 0
            out["gpu"] = torch.cuda.get_device_name(idx)
    except ImportError:  # pragma: no cover
        out["torch"] = None
    for mod in ("diffusers", "transformers", "numpy"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            out[mod] = None
    return out


def load_optimizer(kind: str, alias: str | None = None) -> Any:
    """The ``optimize_<kind>`` (or ``optimize_<alias>``) function of
    ``mi300x_cert.workloads.optimized`` (path "optimized")."""
    names = [f"optimize_{kind}"] + ([f"optimize_{alias}"] if alias else [])
    name = names[0]
    try:
        import importlib

        optimized = importlib.import_module(f"{__package__}.optimized")
    except ImportError as e:
        raise WorkerError(
            f"path 'optimized' requested for {kind!r} but mi300x_cert.workloads.optimized cannot be imported: {e}"
        ) from e
    fn = next((getattr(optimized, n) for n in names if hasattr(optimized, n)), None)
    if fn is None:
        raise WorkerError(f"path 'optimized' requested for {kind!r} but mi300x_cert.workloads.optimized has no {name}()")
    return fn


class ModelSource:
    """Where a model comes from: ``synthetic:<arch>`` (shipped configs + seeded random weights)
    or a local directory of saved weights (loaded offline)."""

    def __init__(self, source: str) -> None:
        if not isinstance(source, str) or not source.strip():
            raise ModelSourceError(f"model source {source!r} is empty: use synthetic:<arch> or a weights directory")
        self.source = source.strip()
        self.kind, self.path = resolve_model_source(self.source)

    @property
    def synthetic(self) -> bool:
        return self.kind == "synthetic"

    @property
    def label(self) -> str:
        """``synthetic:<arch>`` or the directory's name (never a machine-specific absolute path)."""
        return self.source if self.synthetic else self.path.name

    def require(self, *relpaths: str, what: str) -> None:
        """Raise ModelSourceError naming the directory and the first missing file."""
        for rel in relpaths:
            if not (self.path / rel).exists():
                raise ModelSourceError(f"model directory {str(self.path)!r} is not {what}: no {rel}")

    def require_any(self, relpaths: list[str], what: str) -> str:
        for rel in relpaths:
            if (self.path / rel).exists():
                return rel
        raise ModelSourceError(
            f"model directory {str(self.path)!r} is not {what}: none of {', '.join(relpaths)}"
        )


class Workload:
    """Base class. Subclasses set ``kind`` and implement ``_load``, ``_conditions`` and the three
    parts of a batch that :meth:`run_batch` times: ``prepare``, ``compute``, ``collect``."""

    kind: str = "?"
    optimizer_alias: str | None = None  # another name of its optimize_<kind> function
    # what loading imports (``module`` or ``module:name,…``): a preloader imports it once for every
    # worker it forks (mi300x_cert.preload); imports only, nothing that touches a device
    PRELOAD: tuple[str, ...] = ()

    def __init__(self, params: dict[str, Any], device: str | None = None) -> None:
        set_offline_env()
        self.params: dict[str, Any] = dict(params or {})
        self.device: str = resolve_device(device or self.params.get("device"))
        self.seed: int = int(self.params.get("seed", 0))
        self.path: str = str(self.params.get("path", "stock"))
        if self.path not in ("stock", "optimized"):
            raise WorkerError(f"path {self.path!r} is not one of stock, optimized")
        self.source = ModelSource(str(self.params.get("model", "")))
        self.dtype, self.dtype_name = torch_dtype(str(self.params.get("dtype", "float32")), self.device)
        self.dtype_requested: str = str(self.params.get("dtype", "float32"))
        self.compile_mode: str = "none"
        self.load_s: float = 0.0
        self.warmup_s: float | None = None
        self._closed = False
        _quiet_libraries()
        t0 = time.perf_counter()
        self._load()
        if self.path == "optimized":
            load_optimizer(self.kind, self.optimizer_alias)(self, self.params)
        device_sync(self.device)
        self.load_s = time.perf_counter() - t0

    def synthetic_init(self) -> Any:
        """Context in which a synthetic model's random weights are created: directly on the GPU
        (seconds for SD v1-4 / Whisper large-v3 instead of tens of seconds of CPU initialisation
        per process), unless ``params["synthetic_init"] == "cpu"``. The seeded weights differ
        between CPU and GPU initialisation; the compute does not. Recorded in the conditions."""
        import contextlib

        import torch

        where = str(self.params.get("synthetic_init", "device"))
        if where not in ("device", "cpu"):
            raise WorkerError(f"synthetic_init {where!r} is not one of device, cpu")
        on_gpu = where == "device" and self.device.startswith("cuda")
        self.synthetic_init_on = self.device if on_gpu else "cpu"
        return torch.device(self.device) if on_gpu else contextlib.nullcontext()

    # -- subclass hooks --------------------------------------------------------------------
    def _load(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _conditions(self) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def prepare(self, batch_size: int, batch_index: int) -> Any:  # pragma: no cover - abstract
        """Host-side input preparation of one batch (counted in ``latency_overhead_s`` only)."""
        raise NotImplementedError

    def compute(self, inputs: Any) -> Any:  # pragma: no cover - abstract
        """The device work of one batch (``latency_s``)."""
        raise NotImplementedError

    def collect(self, outputs: Any, inputs: Any, batch_size: int) -> dict[str, Any]:
        """Output post-processing on the host (counted in ``latency_overhead_s`` only); returns the
        workload's own row fields (tokens, unet_evals, …)."""
        return {}

    def run_batch(self, batch_size: int, batch_index: int) -> dict[str, Any]:
        """Time one batch — the one timing rule of every workload: the device is synchronised
        before each clock read; ``latency_s`` = :meth:`compute`, ``latency_overhead_s`` =
        :meth:`prepare` + :meth:`compute` + :meth:`collect`."""
        b = self._check_batch(batch_size)
        dev = self.device
        device_sync(dev)
        t0 = time.perf_counter()
        inputs = self.prepare(b, batch_index)
        device_sync(dev)
        t1 = time.perf_counter()
        outputs = self.compute(inputs)
        device_sync(dev)
        t2 = time.perf_counter()
        extra = self.collect(outputs, inputs, b) or {}
        t3 = time.perf_counter()
        return {"latency_s": t2 - t1, "latency_overhead_s": t3 - t0, "items": b, **extra}

    def _work(self) -> dict[str, Any]:
        """What one item costs, for utilization against the run's measured ceilings: e.g.
        ``{"flops_per_item": …}`` (counted with ``torch.utils.flop_counter``). Empty: not counted."""
        return {}

    def work(self) -> dict[str, Any]:
        """:meth:`_work`, counted once (the worker reports it with the conditions)."""
        if not hasattr(self, "_work_cache"):
            self._work_cache = self._work()
        return self._work_cache

    def count_flops(self, fn: Any) -> int:
        """FLOPs of ``fn()`` (matrix products, convolutions, attention) by ``FlopCounterMode``,
        under ``inference_mode``; compiled modules are counted through their eager original."""
        import torch
        from torch.utils.flop_counter import FlopCounterMode

        with torch.inference_mode(), FlopCounterMode(display=False) as fc:
            fn()
        device_sync(self.device)
        return int(fc.get_total_flops())

    # -- public API ------------------------------------------------------------------------
    def conditions(self) -> dict[str, Any]:
        base = {
            "workload": self.kind,
            "model": self.source.label,
            "synthetic": self.source.synthetic,
            "dtype": self.dtype_name,
            "path": self.path,
            "compile_mode": self.compile_mode,
            "device": self.device,
            "seed": self.seed,
        }
        if self.dtype_requested != self.dtype_name:
            base["dtype_requested"] = self.dtype_requested
        if self.source.synthetic:
            base["synthetic_init"] = getattr(self, "synthetic_init_on", "cpu")
        base["load_s"] = round(self.load_s, 3)
        base.update(self._conditions())
        try:
            work = self.work()
        except Exception as e:  # a count that cannot be made leaves utilization unknown, never a guess
            work = {"error": f"{type(e).__name__}: {e}"}
        if work:
            base["work"] = work
        base["versions"] = versions(self.device)
        return base

    def warmup(self, batch_size: int) -> float:
        """Run one untimed batch (index -1); returns its wall time in seconds (compile included)."""
        t0 = time.perf_counter()
        self.run_batch(batch_size, -1)
        device_sync(self.device)
        self.warmup_s = time.perf_counter() - t0
        return self.warmup_s

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for name in list(vars(self)):
            val = getattr(self, name)
            if hasattr(val, "parameters") or hasattr(val, "components"):
                setattr(self, name, None)
        import gc

        gc.collect()
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    def __enter__(self) -> "Workload":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def _check_batch(batch_size: int) -> int:
        b = int(batch_size)
        if b <= 0:
            raise WorkerError(f"batch_size must be positive, got {batch_size!r}")
        return b


def repo_path(value: str | os.PathLike[str]) -> Path:
    """A path from params: absolute, relative to the working directory, or relative to the repo root."""
    from ..config import REPO_ROOT

    p = Path(os.path.expanduser(str(value)))
    if p.is_absolute() or p.exists():
        return p
    return REPO_ROOT / p

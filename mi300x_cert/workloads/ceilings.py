"""The card's own limits, measured with vendor-neutral torch code (CUDA and ROCm builds alike).

One worker process runs a list of *tests*; batch ``i`` of the plan is test ``tests[i]``. Each test
returns ``value`` in its ``unit``:

* ``gemm-<dtype>`` — dense ``n×n @ n×n`` matrix products, ``iters`` back to back, TFLOP/s
  (``2 n³`` per product). ``float8`` uses ``torch._scaled_mm`` (e4m3; the ``fnuz`` variant on ROCm)
  and is reported ``supported: false`` where the card or the torch build lacks it.
* ``hbm-copy`` / ``hbm-triad`` — BabelStream's kernels on float32 arrays: ``c = a`` counts
  2 arrays moved, ``a = b + s·c`` counts 3; GB/s = bytes moved / time (10⁹ bytes).
* ``h2d`` / ``d2h`` — one pinned host buffer ↔ device, GB/s.
* ``p2p-<src>-<dst>`` — a device buffer copied from card ``src`` to card ``dst`` (the worker sees
  every card of the case), GB/s.
* ``power`` — matrix products for ``power_chunk_s`` (the case repeats it until its duration has
  passed); the power, clocks and throttle events come from telemetry, not from here.

Every test is timed the same way: device synchronised before the clock starts and before it is read.

``params["simulated"]`` (the simulated backend's box) replaces the measurement by a model of an
MI300X-like card — nominal figures scaled by the box's faults (``hbm_scale``, ``pcie_width``) — and
imports no torch, so the smoke profile stays quick on a CPU.
"""

from __future__ import annotations

import os
import random
import time
from typing import Any

from ..errors import WorkerError

__all__ = ["CeilingsWorkload", "SIMULATED_NOMINAL", "simulated_value"]

# What the simulated MI300X-like card achieves (about what published MI300X measurements show).
SIMULATED_NOMINAL: dict[str, float] = {
    "gemm-float16": 650.0, "gemm-bfloat16": 660.0, "gemm-float8": 1300.0,   # TFLOP/s
    "hbm-copy": 4300.0, "hbm-triad": 4200.0,                                # GB/s
    "h2d": 55.0, "d2h": 56.0,                                               # GB/s at gen5 x16
    "p2p-domain": 48.0, "p2p-cross": 40.0,                                  # GB/s (XGMI / through the host)
}
UNITS = {"gemm": "TFLOP/s", "hbm": "GB/s", "h2d": "GB/s", "d2h": "GB/s", "p2p": "GB/s", "power": "TFLOP/s"}


def unit_of(test: str) -> str:
    return UNITS.get(test.split("-", 1)[0], "?")


def simulated_value(test: str, card: int, sim: dict) -> float:
    """The modelled result of ``test`` on simulated ``card`` (deterministic, ±2 % per card)."""
    jitter = 1.0 + random.Random(f"{card}:{test}").uniform(-0.02, 0.02)
    if test.startswith("p2p-"):
        _, src, dst = test.split("-")
        domains = sim.get("domains") or []
        same = any(int(src) in d and int(dst) in d for d in domains)
        base = SIMULATED_NOMINAL["p2p-domain" if same else "p2p-cross"]
        return base * jitter
    if test == "power":
        return SIMULATED_NOMINAL["gemm-bfloat16"] * jitter
    base = SIMULATED_NOMINAL[test]
    if test.startswith("hbm-"):
        base *= float((sim.get("hbm_scale") or {}).get(str(card), (sim.get("hbm_scale") or {}).get(card, 1.0)))
    if test in ("h2d", "d2h"):
        width = (sim.get("pcie_width") or {}).get(str(card), (sim.get("pcie_width") or {}).get(card, 16))
        base *= int(width) / 16.0
    return base * jitter


class CeilingsWorkload:
    """The workload contract of :mod:`mi300x_cert.workloads.base` (``conditions``, ``warmup``,
    ``run_batch``, ``close``) for the tests above. No model: nothing to load but buffers."""

    kind = "ceilings"

    def __init__(self, params: dict[str, Any], device: str | None = None) -> None:
        self.params = dict(params or {})
        self.tests: list[str] = [str(t) for t in self.params.get("tests") or []]
        if not self.tests:
            raise WorkerError("hardware ceilings: no tests in params")
        self.sim: dict | None = self.params.get("simulated")
        self.card = int(os.environ.get("MI300X_CERT_VIRTUAL_CARD", self.params.get("card", 0)) or 0)
        self.n = int(self.params.get("gemm_n", 8192))
        self.iters = int(self.params.get("iters", 20))
        self.hbm_bytes = int(self.params.get("hbm_bytes", 1 << 30))
        self.pcie_bytes = int(self.params.get("pcie_bytes", 1 << 28))
        self.p2p_bytes = int(self.params.get("p2p_bytes", 1 << 28))
        self.power_chunk_s = float(self.params.get("power_chunk_s", 0.5))
        self.supported: dict[str, bool] = {}
        self._buf: dict[str, Any] = {}
        if self.sim is not None:
            self.device = "simulated"
            return
        from .base import resolve_device

        self.device = resolve_device(device)
        if not self.device.startswith("cuda"):
            raise WorkerError("hardware ceilings measure a GPU: device is cpu and the telemetry backend is not simulated")

    # ---- the contract ---------------------------------------------------------------------------
    def conditions(self) -> dict[str, Any]:
        from .base import versions

        out: dict[str, Any] = {"workload": self.kind, "model": "simulated:mi300x-ceilings" if self.sim is not None else "none",
                               "synthetic": self.sim is not None, "dtype": "per test", "path": "stock",
                               "compile_mode": "none", "device": self.device, "gemm_n": self.n, "iters": self.iters,
                               "hbm_bytes": self.hbm_bytes, "pcie_bytes": self.pcie_bytes, "p2p_bytes": self.p2p_bytes,
                               "tests": self.tests,
                               "timing": "device synchronised before the clock starts and before it is read"}
        if self.sim is None:
            out["versions"] = versions(self.device)
        else:
            out["note"] = "simulated box: modelled figures, no GPU"
        return out

    def warmup(self, batch_size: int) -> float:
        t0 = time.perf_counter()
        if self.sim is None:
            for test in dict.fromkeys(t if not t.startswith("p2p-") else "p2p" for t in self.tests):
                if test == "p2p":
                    continue
                self._measure(test, warm=True)
        return time.perf_counter() - t0

    def run_batch(self, batch_size: int, batch_index: int) -> dict[str, Any]:
        test = self.tests[min(int(batch_index), len(self.tests) - 1)] if batch_index >= 0 else self.tests[0]
        t0 = time.perf_counter()
        if self.sim is not None:
            time.sleep(float(self.sim.get("latency_s", 0.002)) if test != "power" else self.power_chunk_s)
            value: float | None = simulated_value(test, self.card, self.sim)
            supported = True
        else:
            value, supported = self._measure(test)
        dt = time.perf_counter() - t0
        return {"latency_s": dt, "latency_overhead_s": dt, "items": 1, "test": test, "value": value,
                "unit": unit_of(test), "supported": supported}

    def close(self) -> None:
        self._buf.clear()
        if self.sim is None:
            import torch

            torch.cuda.empty_cache()

    # ---- measurements (real cards) --------------------------------------------------------------
    def _timed(self, fn: Any, device: Any = None) -> float:
        import torch

        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    def _measure(self, test: str, warm: bool = False) -> tuple[float | None, bool]:
        iters = 2 if warm else self.iters
        if test.startswith("gemm-"):
            return self._gemm(test.split("-", 1)[1], iters)
        if test.startswith("hbm-"):
            return self._hbm(test.split("-", 1)[1], iters), True
        if test in ("h2d", "d2h"):
            return self._pcie(test, iters), True
        if test.startswith("p2p-"):
            _, src, dst = test.split("-")
            return self._p2p(int(src), int(dst), iters), True
        if test == "power":
            return self._power(), True
        raise WorkerError(f"hardware ceilings: unknown test {test!r}")

    def _gemm(self, dtype: str, iters: int) -> tuple[float | None, bool]:
        import torch

        n = self.n
        if dtype == "float8":
            f8 = torch.float8_e4m3fnuz if getattr(torch.version, "hip", None) else torch.float8_e4m3fn
            key = f"gemm-{dtype}"
            try:
                if key not in self._buf:
                    a = torch.randn(n, n, device=self.device).to(f8)
                    b = torch.randn(n, n, device=self.device).to(f8).t()  # column-major second operand
                    one = torch.ones((), device=self.device)
                    self._buf[key] = (a, b, one)
                a, b, one = self._buf[key]
                mm = lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)  # noqa: E731
                mm()
            except (RuntimeError, TypeError, AttributeError, NotImplementedError):
                return None, False  # the card or the torch build has no fp8 matrix product
        else:
            key = f"gemm-{dtype}"
            if key not in self._buf:
                dt = getattr(torch, dtype)
                self._buf[key] = (torch.randn(n, n, device=self.device, dtype=dt), torch.randn(n, n, device=self.device, dtype=dt))
            a, b = self._buf[key]
            mm = lambda: torch.mm(a, b)  # noqa: E731

        def loop() -> None:
            for _ in range(iters):
                mm()

        secs = self._timed(loop)
        return 2.0 * n ** 3 * iters / secs / 1e12, True

    def _hbm(self, kind: str, iters: int) -> float:
        import torch

        if "hbm" not in self._buf:
            n = self.hbm_bytes // 4
            self._buf["hbm"] = [torch.full((n,), v, device=self.device, dtype=torch.float32) for v in (0.1, 0.2, 0.0)]
        a, b, c = self._buf["hbm"]
        scalar = 0.4
        if kind == "copy":
            fn, arrays = (lambda: c.copy_(a)), 2
        elif kind == "triad":
            fn, arrays = (lambda: torch.add(b, c, alpha=scalar, out=a)), 3
        else:
            raise WorkerError(f"hardware ceilings: unknown memory kernel {kind!r}")

        def loop() -> None:
            for _ in range(iters):
                fn()

        secs = self._timed(loop)
        return arrays * a.numel() * 4 * iters / secs / 1e9

    def _pcie(self, direction: str, iters: int) -> float:
        import torch

        if "pcie" not in self._buf:
            n = self.pcie_bytes // 4
            self._buf["pcie"] = (torch.empty(n, dtype=torch.float32).pin_memory(),
                                 torch.empty(n, dtype=torch.float32, device=self.device))
        host, dev = self._buf["pcie"]
        fn = (lambda: dev.copy_(host, non_blocking=True)) if direction == "h2d" else (lambda: host.copy_(dev, non_blocking=True))

        def loop() -> None:
            for _ in range(iters):
                fn()

        secs = self._timed(loop)
        return host.numel() * 4 * iters / secs / 1e9

    def _p2p(self, src: int, dst: int, iters: int) -> float:
        import torch

        if torch.cuda.device_count() <= max(src, dst):
            raise WorkerError(f"hardware ceilings: peer copy {src}→{dst} needs cards {src} and {dst} visible; "
                              f"this worker sees {torch.cuda.device_count()}")
        n = self.p2p_bytes // 4
        a = torch.empty(n, dtype=torch.float32, device=f"cuda:{src}")
        b = torch.empty(n, dtype=torch.float32, device=f"cuda:{dst}")
        b.copy_(a)

        def loop() -> None:
            for _ in range(iters):
                b.copy_(a, non_blocking=True)

        torch.cuda.synchronize(src)
        secs = self._timed(loop, device=dst)
        return n * 4 * iters / secs / 1e9

    def _power(self) -> float:
        import torch

        n = self.n
        if "power" not in self._buf:
            self._buf["power"] = (torch.randn(n, n, device=self.device, dtype=torch.bfloat16),
                                  torch.randn(n, n, device=self.device, dtype=torch.bfloat16))
        a, b = self._buf["power"]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        done = 0
        while time.perf_counter() - t0 < self.power_chunk_s:
            for _ in range(8):
                torch.mm(a, b)
            done += 8
            torch.cuda.synchronize()
        return 2.0 * n ** 3 * done / (time.perf_counter() - t0) / 1e12

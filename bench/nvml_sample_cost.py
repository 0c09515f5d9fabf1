"""CPU cost of each NVML call the telemetry backend makes, and of one whole ``sample()``.

    python bench/nvml_sample_cost.py [--card 0] [--n 200]   # prints JSON

Times are thread CPU time (what the sampler thread costs the host) and wall time, per call.
"""

from __future__ import annotations

import argparse
import json
import time


def _time(fn, n: int) -> dict:
    c0, w0 = time.thread_time(), time.perf_counter()
    err = None
    for _ in range(n):
        try:
            fn()
        except Exception as e:  # an unsupported call is part of the cost
            err = type(e).__name__
    return {"cpu_us": (time.thread_time() - c0) / n * 1e6, "wall_us": (time.perf_counter() - w0) / n * 1e6, "error": err}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--card", type=int, default=0)
    ap.add_argument("--n", type=int, default=200)
    a = ap.parse_args()
    import pynvml as nv

    nv.nvmlInit()
    h = nv.nvmlDeviceGetHandleByIndex(a.card)
    calls = {
        "temperature": lambda: nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU),
        "power": lambda: nv.nvmlDeviceGetPowerUsage(h),
        "utilization": lambda: nv.nvmlDeviceGetUtilizationRates(h),
        "memory": lambda: nv.nvmlDeviceGetMemoryInfo(h),
        "clock_sm": lambda: nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM),
        "clock_mem": lambda: nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_MEM),
        "clock_event_reasons": lambda: nv.nvmlDeviceGetCurrentClocksEventReasons(h),
        "energy": lambda: nv.nvmlDeviceGetTotalEnergyConsumption(h),
        "field_memory_temp": lambda: nv.nvmlDeviceGetFieldValues(h, [nv.NVML_FI_DEV_MEMORY_TEMP]),
    }
    out = {name: _time(fn, a.n) for name, fn in calls.items()}
    from mi300x_cert.config import TelemetrySpec
    from mi300x_cert.telemetry import open_backend

    with open_backend(TelemetrySpec(backend="nvml"), cards=[a.card]) as be:
        out["backend_sample"] = _time(be.sample, a.n)
    # the whole sampler at 10 Hz for 10 s (main thread asleep: process CPU ≈ the sampler thread's)
    import tempfile
    from pathlib import Path

    from mi300x_cert.rundir import CsvStream
    from mi300x_cert.telemetry import Sampler

    with tempfile.TemporaryDirectory() as d, open_backend(TelemetrySpec(backend="nvml"), cards=[a.card]) as be:
        tel, ev = CsvStream(Path(d) / "t.csv"), CsvStream(Path(d) / "e.csv")
        sampler = Sampler(be, tel, ev, rate_hz=10.0)
        c0, w0 = time.process_time(), time.perf_counter()
        sampler.start()
        time.sleep(10.0)
        sampler.stop()
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
        rows = sum(1 for _ in open(Path(d) / "t.csv")) - 1
        tel.close(); ev.close()
    out["sampler_10hz"] = {"cpu_pct_of_one_core": 100.0 * cpu / wall, "samples": rows, "wall_s": wall}
    out["device"] = nv.nvmlDeviceGetName(h)
    out["driver"] = nv.nvmlSystemGetDriverVersion()
    print(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()

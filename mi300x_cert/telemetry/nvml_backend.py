"""NVIDIA telemetry through NVML (``pynvml`` from the ``nvidia-ml-py`` package).

``pynvml`` imports without a driver; ``nvmlInit()`` then fails (``NVMLError_LibraryNotFound`` /
``Driver Not Loaded``), which becomes a :class:`TelemetryError`. Tests pass a fake module
(``module=``) replaying recorded readings.

Readings (each guarded: an exception or "not supported" gives ``None``): junction =
``nvmlDeviceGetTemperature(h, NVML_TEMPERATURE_GPU)`` (NVML has one GPU die sensor); memory =
``nvmlDeviceGetFieldValues(h, [NVML_FI_DEV_MEMORY_TEMP])`` (HBM parts only); edge = None (NVML has no
edge sensor); power = ``nvmlDeviceGetPowerUsage`` mW → W; utilization; memory info (bytes); SM/MEM
clocks; throttle = a thermal or power slowdown bit of ``nvmlDeviceGetCurrentClocksEventReasons``;
energy = ``nvmlDeviceGetTotalEnergyConsumption`` mJ → J.
"""

from __future__ import annotations

from typing import Any, Callable

from ..errors import TelemetryError
from .base import VendorLibraryBackend, domain_of

__all__ = ["NvmlBackend", "clock_event_reasons"]

# Clock-event (formerly "throttle") reason bits, as in nvml.h.
_REASON_BITS = {
    0x1: "gpu_idle",
    0x2: "applications_clocks",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown",
    0x100: "display_clock",
}
# ``throttle`` means a thermal (or hardware-protection) slowdown: HW slowdown, SW/HW thermal, power
# brake. Running at the board's power limit (sw_power_cap) is how an H100 normally runs flat out
# (seen on every sample of a sustained SD run), not a thermal event: it stays in throttle_reasons.
_SLOWDOWN_MASK = 0x8 | 0x20 | 0x40 | 0x80


def clock_event_reasons(mask: int) -> tuple[bool, str]:
    """(throttled, "reason|reason") from NVML's clock-event reason mask."""
    names = [name for bit, name in _REASON_BITS.items() if mask & bit]
    return bool(mask & _SLOWDOWN_MASK), "|".join(names)


def _int(v: Any) -> int | None:
    try:
        return int(v) if v is not None else None
    except (TypeError, ValueError):
        return None


def _text(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, bytes):
        v = v.decode("utf-8", "replace")
    v = str(v).strip().rstrip("\x00")
    return v or None


class NvmlBackend(VendorLibraryBackend):
    """NVML readings. The total-energy counter costs ≈4 ms of CPU per read on an H100 (every other
    reading together ≈80 µs, measured with ``bench/nvml_sample_cost.py``), so it is read at most
    every ``ENERGY_INTERVAL_S`` per card and repeated between reads: at 10 Hz the sampler then
    stays well under 1% of a core instead of ≈5%."""

    name = "nvml"
    SHUTDOWN = "nvmlShutdown"
    ENERGY_INTERVAL_S = 1.0

    def _open_impl(self) -> list[int]:
        lib = self._module
        if lib is None:
            try:
                import pynvml as lib  # noqa: PLC0415 — only here, never at import
            except Exception as e:
                raise TelemetryError(f"nvml backend unavailable: cannot import pynvml ({e}); "
                                     "install nvidia-ml-py") from e
        try:
            lib.nvmlInit()
        except Exception as e:
            raise TelemetryError(f"nvml backend unavailable: nvmlInit failed: {e} "
                                 "(NVIDIA driver's libnvidia-ml not found or not loaded; "
                                 "or choose telemetry.backend: simulated)") from e
        self.lib = lib
        self._energy_cache: dict[int, tuple[float, Any]] = {}
        try:
            n = int(lib.nvmlDeviceGetCount())
            self._handles = [lib.nvmlDeviceGetHandleByIndex(i) for i in range(n)]
        except Exception as e:
            self._close_impl()
            raise TelemetryError(f"nvml backend: cannot list GPUs: {e}") from e
        if not self._handles:
            self._close_impl()
            raise TelemetryError("nvml backend: NVML found no NVIDIA GPU on this host")
        return list(range(len(self._handles)))

    # ---- readings ------------------------------------------------------------------------------
    def _device(self, card: int) -> dict[str, Any]:
        h = self._handles[card]
        pci = self._call("nvmlDeviceGetPciInfo", h)
        bus = None
        if pci is not None:
            bus = _text(getattr(pci, "busId", None)) or _text(getattr(pci, "busIdLegacy", None))
        return {
            "name": _text(self._call("nvmlDeviceGetName", h)),
            "vendor": "NVIDIA",
            "serial": _text(self._call("nvmlDeviceGetSerial", h)),
            "bus_id": bus,
            "domain": domain_of(card, self._domains),
            "uuid": _text(self._call("nvmlDeviceGetUUID", h)),
            "link_gen": _int(self._call("nvmlDeviceGetCurrPcieLinkGeneration", h)),
            "link_width": _int(self._call("nvmlDeviceGetCurrPcieLinkWidth", h)),
            "link_width_max": _int(self._call("nvmlDeviceGetMaxPcieLinkWidth", h)),
            "power_limit_w": (lambda mw: round(mw / 1000.0, 3) if mw is not None else None)(
                _int(self._call("nvmlDeviceGetEnforcedPowerLimit", h))),
        }

    def _memory_temp(self, h: Any) -> float | None:
        fid = getattr(self.lib, "NVML_FI_DEV_MEMORY_TEMP", None)
        if fid is None:
            return None
        vals = self._call("nvmlDeviceGetFieldValues", h, [fid])
        if not vals:
            return None
        v = vals[0]
        ok = getattr(self.lib, "NVML_SUCCESS", 0)
        if getattr(v, "nvmlReturn", ok) != ok:
            return None
        value = getattr(v, "value", None)
        if value is None:
            return None
        kind = getattr(v, "valueType", 1)
        attr = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal", 6: "usVal"}.get(kind, "uiVal")
        x = getattr(value, attr, None)
        if x is None:
            return None
        x = float(x)
        return x if 0.0 < x < 200.0 else None  # 0 means "no sensor" on some boards

    def _energy_mj(self, card: int, h: Any) -> Any:
        cache = self._energy_cache
        now = self.clock()
        last = cache.get(card)
        if last is not None and now - last[0] < self.ENERGY_INTERVAL_S:
            return last[1]
        value = self._call("nvmlDeviceGetTotalEnergyConsumption", h)
        if value is not None:
            cache[card] = (now, value)
        return value

    def _sample_card(self, card: int, t: float) -> dict[str, Any]:
        lib, h = self.lib, self._handles[card]
        temp = self._call("nvmlDeviceGetTemperature", h, getattr(lib, "NVML_TEMPERATURE_GPU", 0))
        power_mw = self._call("nvmlDeviceGetPowerUsage", h)
        util = self._call("nvmlDeviceGetUtilizationRates", h)
        mem = self._call("nvmlDeviceGetMemoryInfo", h)
        sm = self._call("nvmlDeviceGetClockInfo", h, getattr(lib, "NVML_CLOCK_SM", 1))
        mc = self._call("nvmlDeviceGetClockInfo", h, getattr(lib, "NVML_CLOCK_MEM", 2))
        if hasattr(lib, "nvmlDeviceGetCurrentClocksEventReasons"):
            reasons = self._call("nvmlDeviceGetCurrentClocksEventReasons", h)
        else:
            reasons = self._call("nvmlDeviceGetCurrentClocksThrottleReasons", h)
        energy_mj = self._energy_mj(card, h)
        throttle, why = clock_event_reasons(int(reasons)) if reasons is not None else (None, None)
        return {
            "t": t,
            "card": card,
            "util_pct": float(util.gpu) if util is not None and getattr(util, "gpu", None) is not None else None,
            "mem_used_bytes": int(mem.used) if mem is not None else None,
            "mem_total_bytes": int(mem.total) if mem is not None else None,
            "junction_c": float(temp) if temp is not None else None,
            "edge_c": None,
            "memory_c": self._memory_temp(h),
            "power_w": power_mw / 1000.0 if power_mw is not None else None,
            "energy_j": energy_mj / 1000.0 if energy_mj is not None else None,
            "sclk_mhz": float(sm) if sm is not None else None,
            "mclk_mhz": float(mc) if mc is not None else None,
            "throttle": throttle,
            "throttle_reasons": why,
        }

    def versions(self) -> dict[str, Any]:
        out: dict[str, Any] = {"backend": self.name, "driver_version": None, "rocm_version": None,
                               "cuda_driver_version": None, "library_version": None}
        if self.lib is None:
            return out
        out["driver_version"] = _text(self._call("nvmlSystemGetDriverVersion"))
        cuda = self._call("nvmlSystemGetCudaDriverVersion")
        if isinstance(cuda, int) and cuda > 0:
            out["cuda_driver_version"] = f"{cuda // 1000}.{(cuda % 1000) // 10}"
        out["library_version"] = _text(self._call("nvmlSystemGetNVMLVersion"))
        return out

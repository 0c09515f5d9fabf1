"""AMD Instinct telemetry through ``amdsmi`` (ROCm's AMD SMI Python binding).

``import amdsmi`` itself fails on a machine without ROCm (the PyPI wheel raises
``KeyError('libamd_smi.so')`` while looking for the library), so the module is imported inside
:meth:`AmdSmiBackend.open` and every failure becomes a :class:`TelemetryError`. Tests pass a fake
module object (``module=``) that replays recorded readings.

Readings (one call per value, each guarded: an exception or ``"N/A"`` gives ``None``):
junction = HOTSPOT temperature, edge = EDGE, memory = VRAM (HBM) — ``amdsmi_get_temp_metric(...,
CURRENT)``; power = ``amdsmi_get_power_info`` (``socket_power``, else ``current_socket_power``, else
``average_socket_power``: the key names differ between ROCm releases); activity = ``gfx_activity``;
VRAM used/total in MB; GFX/MEM clocks (``clk``, older ``cur_clk``); throttle from
``amdsmi_get_gpu_metrics_info`` (``throttle_status`` / ``indep_throttle_status``); energy from
``amdsmi_get_energy_count`` (accumulator × resolution µJ).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from ..errors import TelemetryError
from .base import VendorLibraryBackend, domain_of

__all__ = ["AmdSmiBackend", "na"]


def na(value: Any) -> Any:
    """``None`` for the library's "not available" markers ("N/A", "", None, 0xFFFF-style sentinels)."""
    if value is None:
        return None
    if isinstance(value, str):
        v = value.strip()
        if v == "" or v.upper() in ("N/A", "NA", "UNKNOWN", "NONE"):
            return None
        return v
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0xFFFF, 0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF):
        return None
    return value


def _num(value: Any) -> float | None:
    v = na(value)
    if v is None or isinstance(v, bool):
        return None
    if isinstance(v, dict) and "value" in v:  # some releases wrap as {"value": x, "unit": "W"}
        return _num(v["value"])
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _first(d: dict | None, *keys: str) -> float | None:
    if not isinstance(d, dict):
        return None
    for k in keys:
        if k in d:
            v = _num(d[k])
            if v is not None:
                return v
    return None


class AmdSmiBackend(VendorLibraryBackend):
    name = "amdsmi"
    SHUTDOWN = "amdsmi_shut_down"

    def __init__(self, cards: list[int] | None = None, host_cards: list[int] | None = None,
                 domains: list[list[int]] | None = None, clock: Callable[[], float] | None = None,
                 module: Any = None):
        super().__init__(cards, host_cards, domains, clock, module)
        self._hive_domains: dict[int, int | None] = {}

    # ---- lifecycle ---------------------------------------------------------------------------
    def _open_impl(self) -> list[int]:
        lib = self._module
        if lib is None:
            import contextlib
            import io

            said = io.StringIO()  # the wheel prints its loader errors to stdout: keep them out of ours
            try:
                with contextlib.redirect_stdout(said):
                    import amdsmi as lib  # noqa: PLC0415 — only here, never at import
            except Exception as e:  # KeyError('libamd_smi.so'), ImportError, OSError ...
                detail = " ".join(said.getvalue().split())
                raise TelemetryError(
                    f"amdsmi backend unavailable: {type(e).__name__}: {e} (ROCm's libamd_smi not found; "
                    "install ROCm or choose telemetry.backend: simulated)"
                    + (f"; amdsmi said: {detail}" if detail else "")) from e
        try:
            flags = getattr(lib, "AmdSmiInitFlags", None)
            if flags is not None and hasattr(flags, "INIT_AMD_GPUS"):
                lib.amdsmi_init(flags.INIT_AMD_GPUS)
            else:
                lib.amdsmi_init()
        except Exception as e:
            raise TelemetryError(f"amdsmi backend unavailable: amdsmi_init failed: {e}") from e
        self.lib = lib
        try:
            self._handles = list(lib.amdsmi_get_processor_handles())
        except Exception as e:
            self._close_impl()
            raise TelemetryError(f"amdsmi backend: cannot list GPUs: {e}") from e
        if not self._handles:
            self._close_impl()
            raise TelemetryError("amdsmi backend: amdsmi found no AMD GPU on this host")
        self._hive_domains = self._read_hive_domains()
        return list(range(len(self._handles)))

    # ---- topology ------------------------------------------------------------------------------
    def _read_hive_domains(self) -> dict[int, int | None]:
        """Card → XGMI domain from each GPU's XGMI hive id (0 / missing means unknown)."""
        hives: dict[int, Any] = {}
        for i, h in enumerate(self._handles):
            info = self._call("amdsmi_get_xgmi_info", h)
            hive = na(info.get("xgmi_hive_id")) if isinstance(info, dict) else None
            if hive:
                hives[i] = hive
        if len(hives) != len(self._handles):
            return {}
        order: list[Any] = []
        for i in sorted(hives):
            if hives[i] not in order:
                order.append(hives[i])
        return {i: order.index(hives[i]) for i in hives}

    # ---- readings ------------------------------------------------------------------------------
    def _device(self, card: int) -> dict[str, Any]:
        h = self._handles[card]
        asic = self._call("amdsmi_get_gpu_asic_info", h) or {}
        board = self._call("amdsmi_get_gpu_board_info", h) or {}
        serial = na(board.get("product_serial")) or na(asic.get("asic_serial"))
        name = na(asic.get("market_name")) or na(board.get("product_name"))
        bus = self._call("amdsmi_get_gpu_device_bdf", h)
        uid = self._call("amdsmi_get_gpu_device_uuid", h)
        domain = self._hive_domains.get(card) if self._hive_domains else domain_of(card, self._domains)
        return {
            "name": str(name) if name is not None else None,
            "vendor": "AMD",
            "serial": str(serial) if serial is not None else None,
            "bus_id": na(bus),
            "domain": domain,
            "uuid": na(uid),
            **self._link_and_limit(h),
        }

    def _link_and_limit(self, h: Any) -> dict[str, Any]:
        """PCIe generation/width (``amdsmi_get_pcie_info``) and the board power cap in W
        (``amdsmi_get_power_cap_info``, reported in µW); None where the library lacks them."""
        out: dict[str, Any] = {"link_gen": None, "link_width": None, "link_width_max": None, "power_limit_w": None}
        pcie = self._call("amdsmi_get_pcie_info", h) or {}
        metric = pcie.get("pcie_metric") if isinstance(pcie, dict) else None
        static = pcie.get("pcie_static") if isinstance(pcie, dict) else None
        if isinstance(metric, dict):
            out["link_width"] = _num(na(metric.get("pcie_width")))
            speed = _num(na(metric.get("pcie_speed")))  # MT/s: 32000 = gen5, 16000 = gen4
            if speed:
                out["link_gen"] = {2500: 1, 5000: 2, 8000: 3, 16000: 4, 32000: 5, 64000: 6}.get(int(speed))
        if isinstance(static, dict):
            out["link_width_max"] = _num(na(static.get("max_pcie_width")))
        cap = self._call("amdsmi_get_power_cap_info", h) or {}
        v = _num(na(cap.get("power_cap"))) if isinstance(cap, dict) else None
        if v:
            out["power_limit_w"] = round(v / 1e6, 3) if v > 1e5 else float(v)
        for k in ("link_width", "link_width_max"):
            if out[k] is not None:
                out[k] = int(out[k])
        return out

    def _temp(self, h: Any, kind: str) -> float | None:
        types = getattr(self.lib, "AmdSmiTemperatureType", None)
        metric = getattr(self.lib, "AmdSmiTemperatureMetric", None)
        if types is None or metric is None or not hasattr(types, kind):
            return None
        return _num(self._call("amdsmi_get_temp_metric", h, getattr(types, kind), metric.CURRENT))

    def _clock(self, h: Any, kind: str) -> float | None:
        types = getattr(self.lib, "AmdSmiClkType", None)
        if types is None:
            return None
        info = self._call("amdsmi_get_clock_info", h, getattr(types, kind))
        return _first(info, "clk", "cur_clk")

    def _throttle(self, h: Any) -> tuple[bool | None, str | None]:
        """amdsmi 7 reports both fields as booleans ("N/A" when unknown); older releases give the
        raw bit masks, kept verbatim in ``throttle_reasons`` (their bit layout differs per ASIC)."""
        m = self._call("amdsmi_get_gpu_metrics_info", h)
        if not isinstance(m, dict):
            return None, None
        flags: list[bool] = []
        reasons: list[str] = []
        for key in ("throttle_status", "indep_throttle_status"):
            v = na(m.get(key))
            if v is None:
                continue
            if isinstance(v, bool):
                flags.append(v)
                if v:
                    reasons.append(key)
            elif isinstance(v, (int, float)):
                flags.append(bool(v))
                if v:
                    reasons.append(f"{key}=0x{int(v):x}")
            elif isinstance(v, str):
                active = v.strip().lower() in ("true", "on", "yes")
                flags.append(active)
                if active:
                    reasons.append(key)
        if not flags:
            return None, None
        return any(flags), "|".join(reasons)

    def _sample_card(self, card: int, t: float) -> dict[str, Any]:
        h = self._handles[card]
        power = _first(self._call("amdsmi_get_power_info", h),
                       "socket_power", "current_socket_power", "average_socket_power")
        activity = _first(self._call("amdsmi_get_gpu_activity", h), "gfx_activity")
        vram = self._call("amdsmi_get_gpu_vram_usage", h)
        used_mb, total_mb = _first(vram, "vram_used"), _first(vram, "vram_total")
        energy = self._call("amdsmi_get_energy_count", h)
        energy_j = None
        if isinstance(energy, dict):
            acc = _first(energy, "energy_accumulator", "power")
            res = _first(energy, "counter_resolution")
            if acc is not None and res is not None:
                energy_j = acc * res / 1e6
        throttle, reasons = self._throttle(h)
        return {
            "t": t,
            "card": card,
            "util_pct": activity,
            "mem_used_bytes": int(used_mb * 1024**2) if used_mb is not None else None,
            "mem_total_bytes": int(total_mb * 1024**2) if total_mb is not None else None,
            "junction_c": self._temp(h, "HOTSPOT"),
            "edge_c": self._temp(h, "EDGE"),
            "memory_c": self._temp(h, "VRAM"),
            "power_w": power,
            "energy_j": energy_j,
            "sclk_mhz": self._clock(h, "GFX"),
            "mclk_mhz": self._clock(h, "MEM"),
            "throttle": throttle,
            "throttle_reasons": reasons,
        }

    def versions(self) -> dict[str, Any]:
        out: dict[str, Any] = {"backend": self.name, "driver_version": None, "rocm_version": rocm_version(),
                               "cuda_driver_version": None, "library_version": None}
        if self.lib is not None and self._handles:
            drv = self._call("amdsmi_get_gpu_driver_info", self._handles[0])
            if isinstance(drv, dict):
                out["driver_version"] = na(drv.get("driver_version"))
                out["driver_name"] = na(drv.get("driver_name"))
            lv = self._call("amdsmi_get_lib_version")
            if isinstance(lv, dict):
                parts = [str(lv[k]) for k in ("major", "minor", "release") if k in lv]
                out["library_version"] = ".".join(parts) or None
        return out


def rocm_version() -> str | None:
    """ROCm release from ``$ROCM_PATH/.info/version`` (default /opt/rocm), else None."""
    root = Path(os.environ.get("ROCM_PATH", "/opt/rocm"))
    for rel in (".info/version", ".info/version-dev"):
        p = root / rel
        try:
            text = p.read_text().strip()
        except OSError:
            continue
        if text:
            return text.splitlines()[0]
    return None

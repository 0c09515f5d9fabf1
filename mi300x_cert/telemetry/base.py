"""The telemetry backend interface and the row shapes every backend and the sampler share.

A backend is a context manager: the vendor library is imported and initialised in ``__enter__``
and shut down in ``__exit__`` — never at import time, so ``import mi300x_cert.telemetry`` works on a
machine with neither ROCm nor an NVIDIA driver.

A reading the hardware does not offer, or a sensor call that fails, is ``None`` — never 0.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from typing import Any, Callable

from ..errors import CardError, TelemetryError

__all__ = [
    "TELEMETRY_COLUMNS",
    "EVENT_COLUMNS",
    "DEVICE_COLUMNS",
    "METRIC_COLUMNS",
    "TelemetryBackend",
    "VendorLibraryBackend",
    "empty_row",
    "finish_row",
    "domain_of",
]

TELEMETRY_COLUMNS: list[str] = [
    "t", "elapsed_s", "card", "phase", "util_pct", "mem_used_bytes", "mem_total_bytes", "mem_used_pct",
    "junction_c", "edge_c", "memory_c", "power_w", "energy_j", "sclk_mhz", "mclk_mhz", "throttle",
    "throttle_reasons",
]
"""Columns of one telemetry sample (one row per card per tick). ``t`` is unix seconds."""

METRIC_COLUMNS: list[str] = [c for c in TELEMETRY_COLUMNS if c not in ("t", "elapsed_s", "card", "phase")]
"""The columns a sensor fills (all ``None`` in an error row)."""

EVENT_COLUMNS: list[str] = [
    "t", "elapsed_s", "kind", "phase", "cards", "card", "proc", "case_id", "batch_index", "batch_size",
]
"""Columns of the events stream; ``kind`` is ``phase``, ``batch_start`` or ``batch_end``."""

DEVICE_COLUMNS: list[str] = ["index", "name", "vendor", "serial", "bus_id", "domain", "uuid", "link_gen", "link_width",
                              "link_width_max", "power_limit_w"]
"""Keys of one ``devices()`` row (unknown values are ``None``): host link (PCIe generation, current
and maximum width) and the board's power limit in watts."""


def empty_row(card: int, t: float | None = None) -> dict[str, Any]:
    """A telemetry row for ``card`` with every reading ``None``."""
    row: dict[str, Any] = {c: None for c in TELEMETRY_COLUMNS}
    row["card"] = card
    row["t"] = time.time() if t is None else t
    return row


def finish_row(row: dict[str, Any]) -> dict[str, Any]:
    """Derive ``mem_used_pct`` from used/total when both are known; keep column order."""
    used, total = row.get("mem_used_bytes"), row.get("mem_total_bytes")
    if used is not None and total:
        row["mem_used_pct"] = round(100.0 * used / total, 3)
    return {c: row.get(c) for c in TELEMETRY_COLUMNS}


def domain_of(card: int, domains: list[list[int]] | None) -> int | None:
    """Index of the interconnect domain (XGMI hive / NVLink island) holding ``card``, else None."""
    for i, members in enumerate(domains or []):
        if card in members:
            return i
    return None


class TelemetryBackend(ABC):
    """One telemetry source for the cards of one host.

    ``cards``: the card indices to sample (default: every card the backend finds).
    ``host_cards``: every card of the host (the simulated box's size; real backends enumerate).
    ``domains``: interconnect domains from the profile (``host.xgmi_domains``), used when the
    hardware does not report its topology.
    ``clock``: monotonic seconds (the simulated model's time; tests pass a fake clock).
    """

    name: str = "base"

    def __init__(self, cards: list[int] | None = None, host_cards: list[int] | None = None,
                 domains: list[list[int]] | None = None, clock: Callable[[], float] | None = None):
        self._requested_cards = list(cards) if cards is not None else None
        self._host_cards = list(host_cards) if host_cards is not None else None
        self._domains = [list(d) for d in domains] if domains else None
        self.clock: Callable[[], float] = clock or time.monotonic
        self._lock = threading.RLock()
        self._open = False
        self._cards: list[int] = []

    # ---- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> "TelemetryBackend":
        self.open()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def open(self) -> None:
        with self._lock:
            if self._open:
                return
            available = self._open_impl()
            if self._requested_cards is None:
                self._cards = list(available)
            else:
                bad = [c for c in self._requested_cards if c not in available]
                if bad:
                    self._close_impl()
                    raise CardError(f"{self.name} backend: unknown card id(s) {bad}; it sees cards {available}")
                self._cards = list(self._requested_cards)
            self._open = True

    def close(self) -> None:
        with self._lock:
            if self._open:
                self._open = False
                self._close_impl()

    def _require_open(self) -> None:
        if not self._open:
            raise TelemetryError(f"{self.name} backend is not open: use it as `with open_backend(...) as backend:`")

    @property
    def cards(self) -> list[int]:
        """The cards this backend samples (valid once open)."""
        return list(self._cards)

    # ---- what subclasses provide ---------------------------------------------------------------
    @abstractmethod
    def _open_impl(self) -> list[int]:
        """Import/initialise the library; return every card index available."""

    def _close_impl(self) -> None:
        pass

    @abstractmethod
    def _device(self, card: int) -> dict[str, Any]:
        """One devices() row."""

    @abstractmethod
    def _sample_card(self, card: int, t: float) -> dict[str, Any]:
        """One telemetry row (unknown readings None)."""

    def versions(self) -> dict[str, Any]:
        """Driver / runtime versions this backend can read (None when unreadable)."""
        return {"backend": self.name}

    # ---- public API ------------------------------------------------------------------------
    def devices(self) -> list[dict[str, Any]]:
        """One row per sampled card: :data:`DEVICE_COLUMNS`."""
        with self._lock:
            self._require_open()
            out = []
            for c in self._cards:
                d = {k: None for k in DEVICE_COLUMNS}
                d.update(self._device(c))
                d["index"] = c
                out.append(d)
            return out

    def sample(self) -> list[dict[str, Any]]:
        """One row per sampled card with :data:`TELEMETRY_COLUMNS` (``phase`` None: the sampler sets it)."""
        with self._lock:
            self._require_open()
            t = time.time()
            return [finish_row(self._sample_card(c, t)) for c in self._cards]

    def set_busy(self, card: int, busy: bool) -> None:
        """Tell the backend a workload started/stopped on ``card`` (drives the simulated model only)."""
        return None


class VendorLibraryBackend(TelemetryBackend):
    """A backend over a vendor library module (amdsmi, pynvml): ``module`` replaces the import in
    tests (a recorded fake). Subclasses set ``lib`` when initialised and name its ``SHUTDOWN``
    function; :meth:`_call` turns any failing reading into None and counts it in ``sensor_errors``."""

    SHUTDOWN: str = ""

    def __init__(self, cards: list[int] | None = None, host_cards: list[int] | None = None,
                 domains: list[list[int]] | None = None, clock: Callable[[], float] | None = None,
                 module: Any = None):
        super().__init__(cards, host_cards, domains, clock)
        self._module = module
        self.lib: Any = None
        self._handles: list[Any] = []
        self.sensor_errors = 0

    def _close_impl(self) -> None:
        if self.lib is not None:
            try:
                getattr(self.lib, self.SHUTDOWN)()
            except Exception:
                pass
            self.lib = None

    def _call(self, fn: str, *args: Any) -> Any:
        """Call one library function; any exception counts as a sensor error and gives None."""
        try:
            return getattr(self.lib, fn)(*args)
        except Exception:
            self.sensor_errors += 1
            return None

"""A deterministic MI300X-like box, so the whole product runs without a GPU.

The model (equations in ``docs/telemetry.md``): every card has a heat state ``h`` in [0, 1] that
follows ``busy`` (0 or 1) as a first-order lag, ``dh/dt = (busy - h) / tau``, with
``tau = 60 s / time_scale``; power follows ``busy`` with ``tau_p = 2 s / time_scale`` and VRAM use with
``tau_m = 5 s / time_scale``. Between two calls ``busy`` is constant, so the state is advanced with the
exact exponential solution (and energy with the exact integral of power): the readings depend only on
the sequence of ``set_busy`` calls and the clock, never on how often one samples.

    junction = T_idle + h (T_active - T_idle) + hot          T_idle ≈ 34–36.5 °C, T_active ≈ 50–53 °C
    memory   = junction - (1 + 3 h)                           (HBM a few °C below junction)
    edge     = junction - (2 + 6 h)
    power    = P_idle + p (P_active - P_idle)                 P_idle ≈ 137–143 W, P_active ≈ 660–740 W

Per-card offsets come from ``random.Random(card)`` (seeded, identical on every run); there is no noise.

With ``state_path`` the heat, power, VRAM and energy states are saved when the backend closes and
loaded (then cooled, idle, over the wall-clock time that passed) when the next one opens, so the
separate cases and tasks of one run see one continuous box: a group that ran hot is still warm
when the next case's idle phase begins, as on real hardware.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
import uuid
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable

from .base import TelemetryBackend, domain_of

__all__ = ["SimulatedBackend", "default_domains", "SIM_NAME"]

SIM_NAME = "AMD Instinct MI300X (simulated)"
VRAM_TOTAL = 192 * 1024**3
TAU_THERMAL_S = 60.0
TAU_POWER_S = 2.0
TAU_MEM_S = 5.0
THROTTLE_JUNCTION_C = 100.0
POWER_LIMIT_W = 750.0  # MI300X board power
_BUSES = [0x0C, 0x22, 0x38, 0x5C, 0x9F, 0xAF, 0xBF, 0xDF]
_UUID_NS = uuid.UUID("6f1c3f2e-3b7a-4c55-9e0e-2f4d1f0a3c11")


def default_domains(cards: list[int]) -> list[list[int]]:
    """XGMI domains of eight consecutive cards: [0-7], [8-15], ..."""
    out: dict[int, list[int]] = {}
    for c in sorted(cards):
        out.setdefault(c // 8, []).append(c)
    return list(out.values())


@dataclass
class _Card:
    index: int
    t_idle: float
    t_active: float
    p_idle: float
    p_active: float
    util_active: float
    mem_idle: int
    mem_active_extra: int
    h: float = 0.0          # heat state
    p: float = 0.0          # power state
    m: float = 0.0          # VRAM state
    busy: bool = False
    energy_j: float = 0.0
    last: float = 0.0


class SimulatedBackend(TelemetryBackend):
    """See the module docstring. ``sim`` is a :class:`config.SimulatedSpec` (or None for defaults)."""

    name = "simulated"

    def __init__(self, cards: list[int] | None = None, host_cards: list[int] | None = None,
                 domains: list[list[int]] | None = None, clock: Callable[[], float] | None = None,
                 sim: Any = None, state_path: str | Path | None = None):
        super().__init__(cards, host_cards, domains, clock)
        self.state_path = Path(state_path) if state_path else None
        self.host_cards = list(host_cards) if host_cards is not None else list(range(16))
        self.domains = self._domains or default_domains(self.host_cards)
        self.hot_cards: dict[int, float] = dict(getattr(sim, "hot_cards", {}) or {})
        self.broken_sensor_cards: set[int] = set(getattr(sim, "broken_sensor_cards", []) or [])
        self.throttle_cards: set[int] = set(getattr(sim, "throttle_cards", []) or [])
        self.time_scale: float = float(getattr(sim, "time_scale", 20.0) or 20.0)
        self.pcie_width: dict[int, int] = {int(k): int(v) for k, v in (getattr(sim, "pcie_width", {}) or {}).items()}
        self.power_cap_w: dict[int, float] = {int(k): float(v) for k, v in (getattr(sim, "power_cap_w", {}) or {}).items()}
        self._state: dict[int, _Card] = {}

    # ---- lifecycle ---------------------------------------------------------------------------
    def _open_impl(self) -> list[int]:
        now = self.clock()
        self._state = {c: self._make_card(c, now) for c in self.host_cards}
        self._load_state(now)
        return list(self.host_cards)

    def _close_impl(self) -> None:
        self._save_state()

    def _load_state(self, now: float) -> None:
        if not self.state_path or not self.state_path.is_file():
            return
        try:
            saved = json.loads(self.state_path.read_text())
            away = max(0.0, time.time() - float(saved["wall"]))
            for key, v in saved["cards"].items():
                st = self._state.get(int(key))
                if st is None:
                    continue
                st.h, st.p, st.m, st.energy_j = float(v["h"]), float(v["p"]), float(v["m"]), float(v["energy_j"])
                st.busy = False
                st.last = now - away  # the box cooled, idle, while no backend was open
                self._advance(st, now)
        except (OSError, ValueError, KeyError, TypeError):
            return  # a damaged state file only loses continuity, never a run

    def _save_state(self) -> None:
        if not self.state_path:
            return
        now = self.clock()
        cards = {}
        for c, st in self._state.items():
            self._advance(st, now)
            cards[str(c)] = {"h": st.h, "p": st.p, "m": st.m, "energy_j": st.energy_j}
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_name(self.state_path.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"wall": time.time(), "cards": cards}))
        os.replace(tmp, self.state_path)

    @staticmethod
    def _make_card(c: int, now: float) -> _Card:
        rng = random.Random(c)
        return _Card(
            index=c,
            t_idle=35.0 + rng.uniform(-1.0, 1.5),
            t_active=51.5 + rng.uniform(-1.5, 1.5),
            p_idle=140.0 + rng.uniform(-3.0, 3.0),
            p_active=700.0 + rng.uniform(-40.0, 40.0),
            util_active=round(95.0 + rng.uniform(0.0, 5.0), 1),
            mem_idle=int((0.28 + rng.uniform(0.0, 0.05)) * 1024**3),
            mem_active_extra=int((22.0 + rng.uniform(0.0, 4.0)) * 1024**3),
            last=now,
        )

    # ---- model ---------------------------------------------------------------------------------
    def _advance(self, st: _Card, now: float) -> None:
        dt = now - st.last
        if dt <= 0:
            return
        b = 1.0 if st.busy else 0.0
        s = self.time_scale
        tau_p = TAU_POWER_S / s
        ep = math.exp(-dt / tau_p)
        # exact integral of p(t) = b + (p0 - b) e^{-t/tau_p} over [0, dt]
        p_integral = b * dt + (st.p - b) * tau_p * (1.0 - ep)
        st.energy_j += st.p_idle * dt + (st.p_active - st.p_idle) * p_integral
        st.p = b + (st.p - b) * ep
        st.h = b + (st.h - b) * math.exp(-dt * s / TAU_THERMAL_S)
        st.m = b + (st.m - b) * math.exp(-dt * s / TAU_MEM_S)
        st.last = now

    def set_busy(self, card: int, busy: bool) -> None:
        with self._lock:
            st = self._state.get(card)
            if st is None:
                return
            self._advance(st, self.clock())
            st.busy = bool(busy)

    def junction_steady(self, card: int, busy: bool) -> float:
        """The steady-state junction temperature of ``card`` (hot-card offset included)."""
        st = self._state.get(card) or self._make_card(card, 0.0)
        return (st.t_active if busy else st.t_idle) + self.hot_cards.get(card, 0.0)

    # ---- readings ------------------------------------------------------------------------------
    def _device(self, card: int) -> dict[str, Any]:
        serial = f"SIM-MI300X-{card:04d}"
        return {
            "name": SIM_NAME,
            "vendor": "AMD",
            "serial": serial,
            "bus_id": f"{card // 8:04x}:{_BUSES[card % 8]:02x}:00.0",
            "domain": domain_of(card, self.domains),
            "uuid": str(uuid.uuid5(_UUID_NS, serial)),
            "link_gen": 5,
            "link_width": self.pcie_width.get(card, 16),
            "link_width_max": 16,
            "power_limit_w": POWER_LIMIT_W,
        }

    def _sample_card(self, card: int, t: float) -> dict[str, Any]:
        st = self._state[card]
        self._advance(st, self.clock())
        hot = self.hot_cards.get(card, 0.0)
        junction = st.t_idle + st.h * (st.t_active - st.t_idle) + hot
        throttled = (st.busy and card in self.throttle_cards) or junction >= THROTTLE_JUNCTION_C
        power = st.p_idle + st.p * (st.p_active - st.p_idle)
        cap = self.power_cap_w.get(card)
        capped = cap is not None and st.busy and power > cap
        if cap is not None:
            power = min(power, cap)  # a card that cannot hold its power: clocks drop with it
        sclk_max = 1600.0 if throttled else 2100.0
        if capped:
            sclk_max *= max(0.3, cap / max(st.p_active, 1.0))
        return {
            "t": t,
            "card": card,
            "util_pct": st.util_active if st.busy else 0.0,
            "mem_used_bytes": int(st.mem_idle + st.m * st.mem_active_extra),
            "mem_total_bytes": VRAM_TOTAL,
            "junction_c": None if card in self.broken_sensor_cards else round(junction, 3),
            "edge_c": round(junction - (2.0 + 6.0 * st.h), 3),
            "memory_c": round(junction - (1.0 + 3.0 * st.h), 3),
            "power_w": round(power, 3),
            "energy_j": round(st.energy_j, 3),
            "sclk_mhz": round(140.0 + st.p * (sclk_max - 140.0), 1),
            "mclk_mhz": 1300.0 if st.busy else 900.0,
            "throttle": bool(throttled),
            "throttle_reasons": "|".join(r for r, on in (("thermal", throttled), ("power", capped)) if on),
        }

    def versions(self) -> dict[str, Any]:
        return {"backend": self.name, "driver_version": "simulated", "rocm_version": None,
                "cuda_driver_version": None, "library_version": None}

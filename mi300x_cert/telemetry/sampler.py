"""Background sampling of every card, with phase and batch markers.

One daemon thread calls ``backend.sample()`` at ``rate_hz`` (fixed schedule, no drift) and appends the
rows, stamped with the current phase, to the telemetry stream. ``phase()`` and ``batch()`` append to
the events stream; ``batch()`` also tells the backend which cards are busy (reference-counted, since
several worker processes may share one card). A failing sample does not stop the thread: it writes
one row per card with every reading empty, counts the error and keeps going.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any, Iterable

from .base import EVENT_COLUMNS, TELEMETRY_COLUMNS, TelemetryBackend, empty_row

__all__ = ["Sampler"]

log = logging.getLogger(__name__)


def _cards_text(cards: Iterable[int] | None) -> str | None:
    if cards is None:
        return None
    return json.dumps([int(c) for c in cards], separators=(",", ":"))


class Sampler:
    """``Sampler(backend, telemetry_stream, events_stream, rate_hz)``; ``start()`` … ``stop()``.

    Streams are :class:`mi300x_cert.rundir.CsvStream` (anything with ``write(dict)``); the sampler
    does not close them — their owner does. Usable as a context manager (start/stop).
    """

    def __init__(self, backend: TelemetryBackend, telemetry_stream: Any, events_stream: Any,
                 rate_hz: float = 10.0, phase: str | None = None):
        if rate_hz <= 0:
            raise ValueError(f"rate_hz must be positive, got {rate_hz!r}")
        self.backend = backend
        self.telemetry_stream = telemetry_stream
        self.events_stream = events_stream
        self.rate_hz = float(rate_hz)
        self._phase = phase
        self._lock = threading.Lock()
        self._busy: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0_mono = time.monotonic()
        self.samples = 0
        self.errors = 0
        self.last_error: str | None = None
        self.cpu_time_s = 0.0
        self.wall_time_s = 0.0

    # ---- state ---------------------------------------------------------------------------------
    @property
    def current_phase(self) -> str | None:
        return self._phase

    def busy_cards(self) -> dict[int, int]:
        """Card → number of batches currently running on it."""
        with self._lock:
            return {c: n for c, n in self._busy.items() if n > 0}

    def _elapsed(self) -> float:
        return round(time.monotonic() - self._t0_mono, 6)

    # ---- sampling ------------------------------------------------------------------------------
    def sample_once(self) -> list[dict]:
        """Take one sample of every card now and write it (also used by the thread)."""
        t, elapsed, phase = time.time(), self._elapsed(), self._phase
        try:
            rows = self.backend.sample()
        except Exception as e:  # a sensor library failing must not kill the thread
            self.errors += 1
            self.last_error = f"{type(e).__name__}: {e}"
            if self.errors <= 3:
                log.warning("telemetry sample failed (%s); writing an empty row and continuing", self.last_error)
            rows = [empty_row(c, t) for c in self.backend.cards]
        out = []
        for r in rows:
            row = {c: r.get(c) for c in TELEMETRY_COLUMNS}
            row["t"], row["elapsed_s"], row["phase"] = round(t, 6), elapsed, phase
            out.append(row)
        try:
            for row in out:
                self.telemetry_stream.write(row)
        except Exception as e:
            self.errors += 1
            self.last_error = f"writing telemetry: {type(e).__name__}: {e}"
            log.warning("telemetry write failed: %s", self.last_error)
        self.samples += 1
        return out

    def _run(self) -> None:
        period = 1.0 / self.rate_hz
        cpu0, wall0 = time.thread_time(), time.monotonic()
        next_t = time.monotonic()
        while not self._stop.is_set():
            try:
                self.sample_once()
            except Exception as e:  # pragma: no cover — sample_once already guards
                self.errors += 1
                self.last_error = f"{type(e).__name__}: {e}"
            self.cpu_time_s = time.thread_time() - cpu0
            self.wall_time_s = time.monotonic() - wall0
            next_t += period
            delay = next_t - time.monotonic()
            if delay < 0:  # fell behind (slow sensor): skip missed ticks, keep the grid
                next_t = time.monotonic()
                delay = 0
            self._stop.wait(delay)
        self.cpu_time_s = time.thread_time() - cpu0
        self.wall_time_s = time.monotonic() - wall0

    def start(self) -> "Sampler":
        if self._thread is not None:
            raise RuntimeError("sampler already started")
        self._t0_mono = time.monotonic()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="telemetry-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread and wait for it (rows are flushed as they are written)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self) -> "Sampler":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ---- markers -------------------------------------------------------------------------------
    def _event(self, **fields: Any) -> dict:
        row = {c: None for c in EVENT_COLUMNS}
        row.update(fields)
        row["t"], row["elapsed_s"] = round(time.time(), 6), self._elapsed()
        self.events_stream.write(row)
        return row

    def phase(self, name: str, cards: Iterable[int] | None = None) -> dict:
        """Set the phase stamped on later samples (e.g. idle / active / cooldown) and record it."""
        with self._lock:
            self._phase = name
            return self._event(kind="phase", phase=name, cards=_cards_text(cards))

    def batch(self, which: str, card: int, proc: int | None = None, case_id: str | None = None,
              batch_index: int | None = None, batch_size: int | None = None) -> dict:
        """Record a batch start/end on ``card`` and mark the card busy/free in the backend."""
        if which not in ("start", "end"):
            raise ValueError(f"batch marker must be 'start' or 'end', got {which!r}")
        card = int(card)
        with self._lock:
            n = self._busy.get(card, 0)
            if which == "start":
                self._busy[card] = n + 1
                if n == 0:
                    self.backend.set_busy(card, True)
            else:
                self._busy[card] = max(0, n - 1)
                if n == 1:
                    self.backend.set_busy(card, False)
            return self._event(kind=f"batch_{which}", phase=self._phase, cards=_cards_text([card]), card=card,
                               proc=proc, case_id=case_id, batch_index=batch_index, batch_size=batch_size)

    def reset_busy(self, cards: Iterable[int] | None = None) -> None:
        """Mark cards free without an end marker (a crashed worker never sends one)."""
        with self._lock:
            for c in list(self._busy if cards is None else cards):
                if self._busy.get(c, 0) > 0:
                    self._busy[c] = 0
                    self.backend.set_busy(c, False)

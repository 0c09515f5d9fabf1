"""History per GPU serial: every certification one physical card went through, on whichever host.

A run directory gives one row per card of its inventory (:func:`card_history_rows`)::

    {serial, card, name, bus_id, host, hostname, run_id, date, finished, profile, sku, state,
     certified, card_ok, idle_junction_mean_c, active_junction_p95_c, memory_max_c,
     active_power_mean_w, sd_per_image_median_s, sd_batches, utilization: {"<workload> <case>": fraction
     of the run's measured ceiling}, failures: [{suite, expectation,
     subject, reason}], run_dir}

* ``idle_junction_mean_c``, ``active_junction_p95_c``, ``active_power_mean_w`` come from the
  thermal suite's frame (:func:`mi300x_cert.validation.frames.thermal_frame`), i.e. the bare-metal
  experiment's ``stats/bare_metal_thermal.csv`` (telemetry attributed to phases at finalize: idle
  segment; active segments of the card's own group).
* ``memory_max_c`` is the highest memory temperature of the card in any ``telemetry/*.csv``.
* ``sd_per_image_median_s`` is the median ``per_image_s`` of the card's measured sd-throughput rows.
* ``failures`` are the failed expectations of ``validation/verdicts.json`` whose ``card`` is this card.
* ``certified`` is the run's result (the outcome record's, else the overall verdict's); ``card_ok``
  says whether no failure named this card (``None`` before validation).

A value the run does not have is ``None``, never 0.

These rows are what a certification carries into the fleet registry
(:meth:`mi300x_cert.registry.Registry.record_certification`); ``mi300x-cert history`` reads the
registry (with drift flags). The JSON-lines index below is the file-based store it replaces
(``mi300x-cert registry import`` brings one in; ``mi300x-cert history --index DIR`` still reads one).

The index (:func:`record_run`) is one JSON-lines file per serial, ``<index dir>/<serial>.jsonl``,
one line per (serial, host, run id), sorted by date; recording a run again replaces its lines.
Files are rewritten atomically under a lock. The index dir is ``$MI300X_CERT_HISTORY_DIR``, else
``<state dir>/history`` (state dir as :func:`mi300x_cert.alerts.state_dir` resolves it).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import math
import os
import re
import statistics
from pathlib import Path
from typing import Any, Iterator

from .errors import CertError
from .rundir import atomic_write_text, utcnow

__all__ = ["HistoryError", "UnknownSerialError", "history_dir", "card_history_rows", "record_run",
           "record_run_quietly", "card_history", "list_serials", "format_history", "format_serials",
           "cli_history"]

log = logging.getLogger(__name__)

THERMAL_FIELDS = ("idle_junction_mean_c", "active_junction_p95_c", "memory_max_c", "active_power_mean_w")


class HistoryError(CertError):
    """The history index cannot be read or a run cannot be indexed."""


class UnknownSerialError(HistoryError):
    """No certification of this serial is in the index."""


def history_dir() -> Path:
    from .alerts import state_dir

    return Path(os.environ.get("MI300X_CERT_HISTORY_DIR") or state_dir() / "history")


# ---- reading one run directory -----------------------------------------------------------------
def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _num(v: Any) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) or math.isinf(x) else x


def _int(v: Any) -> int | None:
    x = _num(v)
    return int(x) if x is not None else None


def _host(meta: dict, inv: dict) -> tuple[str | None, str | None]:
    """(host as the fleet names it, machine hostname) from run.json / inventory.json."""
    h = inv.get("host")
    hostname = (h.get("fqdn") if h.get("fqdn") not in (None, "", "localhost") else h.get("name")) \
        if isinstance(h, dict) else h
    host = meta.get("host") or (h.get("profile_host") or h.get("name") if isinstance(h, dict) else h)
    return host, hostname


def _thermal(root: Path) -> dict[int, dict[str, float | None]]:
    """card → idle junction mean, active junction p95 and active mean power (thermal-suite attribution)."""
    from .validation.frames import thermal_frame

    out: dict[int, dict[str, float | None]] = {}
    if not (root / "telemetry").is_dir():
        return out
    try:
        df = thermal_frame(root, None, {}).df
    except Exception as e:  # unreadable telemetry: the numbers stay None
        log.warning("history: thermal numbers of %s unavailable: %s", root, e)
        return out
    if "card" not in df.columns:
        return out
    for rec in df.to_dict("records"):
        card = _int(rec.get("card"))
        if card is None:
            continue
        d = out.setdefault(card, {})
        if rec.get("role") == "idle":
            d["idle_junction_mean_c"] = _num(rec.get("junction_mean_c"))
        elif rec.get("role") == "active":
            d["active_junction_p95_c"] = _num(rec.get("junction_p95_c"))
            d["active_power_mean_w"] = _num(rec.get("power_mean_w"))
    return out


def _memory_max(root: Path) -> dict[int, float]:
    out: dict[int, float] = {}
    for p in sorted((root / "telemetry").glob("*.csv")):
        try:
            with open(p, newline="") as f:
                for r in csv.DictReader(f):
                    card, m = _int(r.get("card")), _num(r.get("memory_c"))
                    if card is not None and m is not None:
                        out[card] = max(m, out.get(card, m))
        except OSError as e:
            log.warning("history: cannot read %s: %s", p, e)
    return out


def _sd_per_image(root: Path) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    p = root / "results" / "sd-throughput" / "rows.csv"
    if not p.is_file():
        return out
    with open(p, newline="") as f:
        for r in csv.DictReader(f):
            if (r.get("status") or "ok") != "ok" or str(r.get("warmup", "")).lower() in ("true", "1"):
                continue
            card, v = _int(r.get("card")), _num(r.get("per_image_s"))
            if card is not None and v is not None:
                out.setdefault(card, []).append(v)
    return out


def _verdict_failures(verdicts: dict | None) -> list[dict]:
    if not isinstance(verdicts, dict):
        return []
    if isinstance(verdicts.get("failures"), list):
        return verdicts["failures"]
    return [f for v in (verdicts.get("suites") or {}).values() if isinstance(v, dict) for f in v.get("failures") or []]


def _card_utilization(util: Any, card: int | None) -> dict | None:
    """``{"<workload> <case>": fraction}`` of the rows of ``stats/utilization.json`` measured on
    ``card`` (None when the run has no such table)."""
    if not isinstance(util, list) or card is None:
        return None
    out = {}
    for r in util:
        if not isinstance(r, dict) or r.get("fraction") is None:
            continue
        cards = {_int(x) for x in str(r.get("cards") or "").split()}
        if card in cards:
            out[f"{r.get('workload')} {r.get('case')}"] = round(float(r["fraction"]), 4)
    return out


def card_history_rows(run_dir: str | Path, *, certified: bool | None = None) -> list[dict]:
    """One row per card in the run's inventory (see the module doc). ``certified`` overrides what the
    run directory says (the DAG knows it before ``outcome.json`` is written)."""
    root = Path(run_dir)
    inv = _read_json(root / "inventory.json")
    if not isinstance(inv, dict) or not isinstance(inv.get("cards"), list):
        raise HistoryError(f"{root}/inventory.json is missing or has no 'cards' list: not a run directory")
    meta = _read_json(root / "run.json") or {}
    verdicts = _read_json(root / "validation" / "verdicts.json")
    outcome = _read_json(root / "outcome.json")
    if certified is None:
        if isinstance(outcome, dict) and isinstance(outcome.get("certified"), bool):
            certified = outcome["certified"]
        elif isinstance(verdicts, dict) and isinstance(verdicts.get("success"), bool):
            certified = verdicts["success"] and meta.get("state") == "complete"
    failures = _verdict_failures(verdicts)
    thermal, mem, sd = _thermal(root), _memory_max(root), _sd_per_image(root)
    util = _read_json(root / "stats" / "utilization.json")
    host, hostname = _host(meta, inv)
    rows = []
    for c in inv["cards"]:
        idx = _int(c.get("index"))
        mine = [{"suite": f.get("suite"), "expectation": f.get("expectation"), "subject": f.get("subject"),
                 "reason": f.get("reason")} for f in failures if idx is not None and _int(f.get("card")) == idx]
        th = thermal.get(idx, {}) if idx is not None else {}
        lat = sd.get(idx, []) if idx is not None else []
        rows.append({
            "serial": c.get("serial") or None, "card": idx, "name": c.get("name"), "bus_id": c.get("bus_id"),
            "host": host, "hostname": hostname, "run_id": meta.get("run_id"),
            "date": meta.get("started") or inv.get("collected_at"), "finished": meta.get("finished"),
            "profile": meta.get("profile"), "sku": meta.get("sku"), "state": meta.get("state"),
            "certified": certified, "card_ok": (not mine) if verdicts is not None else None,
            "idle_junction_mean_c": th.get("idle_junction_mean_c"),
            "active_junction_p95_c": th.get("active_junction_p95_c"),
            "memory_max_c": mem.get(idx) if idx is not None else None,
            "active_power_mean_w": th.get("active_power_mean_w"),
            "sd_per_image_median_s": statistics.median(lat) if lat else None, "sd_batches": len(lat) or None,
            "failures": mine, "run_dir": str(root.resolve()),
            "utilization": _card_utilization(util, idx),
        })
    return rows


# ---- the index ---------------------------------------------------------------------------------
def _file_for(serial: str, index: Path) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", serial).strip("._") or "x"
    if safe != serial or len(safe) > 100:  # keep distinct serials in distinct files
        safe = f"{safe[:80]}-{hashlib.sha256(serial.encode()).hexdigest()[:8]}"
    return index / f"{safe}.jsonl"


@contextlib.contextmanager
def _locked(index: Path) -> Iterator[None]:
    import fcntl

    index.mkdir(parents=True, exist_ok=True)
    with open(index / ".lock", "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _read_lines(path: Path) -> list[dict]:
    rows = []
    if not path.is_file():
        return rows
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            log.warning("history: skipping unreadable line %d of %s: %s", n, path, e)
    return rows


def _key(row: dict) -> tuple:
    return (row.get("serial"), row.get("host"), row.get("run_id"), row.get("run_dir") if not row.get("run_id") else None)


def record_run(run_dir: str | Path, index_dir: str | Path | None = None, *, certified: bool | None = None) -> Path:
    """Add (or replace) the run's card rows in the index; returns the index directory. Cards without
    a serial cannot be indexed and are skipped with a warning."""
    index = Path(index_dir) if index_dir else history_dir()
    rows = card_history_rows(run_dir, certified=certified)
    stamp = utcnow()
    with _locked(index):
        for row in rows:
            if not row["serial"]:
                log.warning("history: card %s of %s has no serial; not indexed", row["card"], run_dir)
                continue
            path = _file_for(row["serial"], index)
            keep = [r for r in _read_lines(path) if _key(r) != _key(row)]
            keep.append({**row, "recorded": stamp})
            keep.sort(key=lambda r: (str(r.get("date") or ""), str(r.get("run_id") or "")))
            atomic_write_text(path, "".join(json.dumps(r, sort_keys=True, default=str) + "\n" for r in keep))
    return index


def record_run_quietly(run_dir: str | Path | None, index_dir: str | Path | None = None, *,
                       certified: bool | None = None) -> Path | None:
    """:func:`record_run` for the places that conclude a run: any error is logged, never raised
    (history indexing must not fail a certification)."""
    if not run_dir:
        return None
    try:
        return record_run(run_dir, index_dir, certified=certified)
    except Exception as e:
        log.warning("history: run %s not recorded in the per-serial history: %s", run_dir, e)
        return None


def _all_files(index: Path) -> list[Path]:
    return sorted(index.glob("*.jsonl")) if index.is_dir() else []


def list_serials(index_dir: str | Path | None = None) -> list[dict]:
    """Known serials: ``[{serial, runs, last_date, last_host, last_card, last_certified, last_card_ok}]``."""
    index = Path(index_dir) if index_dir else history_dir()
    out = []
    for p in _all_files(index):
        rows = _read_lines(p)
        if not rows:
            continue
        last = rows[-1]
        out.append({"serial": last.get("serial"), "runs": len(rows), "last_date": last.get("date"),
                    "last_host": last.get("host"), "last_card": last.get("card"),
                    "last_certified": last.get("certified"), "last_card_ok": last.get("card_ok")})
    out.sort(key=lambda r: str(r["serial"]))
    return out


def card_history(serial: str, index_dir: str | Path | None = None) -> list[dict]:
    """Every recorded certification of ``serial``, oldest first. Raises UnknownSerialError."""
    index = Path(index_dir) if index_dir else history_dir()
    rows = [r for r in _read_lines(_file_for(str(serial), index)) if r.get("serial") == serial]
    if not rows:
        n = len(list_serials(index))
        raise UnknownSerialError(f"unknown serial {serial!r}: no certification of it in the history index "
                                 f"{index} ({n} serial{'s' if n != 1 else ''} known; "
                                 f"'mi300x-cert history' lists them)")
    return rows


# ---- text ----------------------------------------------------------------------------------------
def _f(v: Any, fmt: str = "{:.1f}") -> str:
    return "-" if v is None else fmt.format(v)


def _yes(v: Any) -> str:
    return {True: "yes", False: "NO"}.get(v, "-")


def format_history(rows: list[dict]) -> str:
    """One line per certification of a serial; the last column names the failures of this card and,
    for registry rows, its drift flags (:mod:`mi300x_cert.registry.drift`)."""
    from .registry.text import format_drift

    head = ("date", "host", "card", "run id", "certified", "idle°C", "p95°C", "mem max°C", "power W",
            "SD s/img", "failures naming this card / drift")

    def last(r: dict) -> str:
        fails = "; ".join(f"{f.get('suite')}: {f.get('reason') or f.get('expectation')}" for f in r.get("failures") or [])
        drift = format_drift(r.get("drift") or [])
        return " | ".join(x for x in (fails, f"drift: {drift}" if drift else "") if x) or "-"

    lines = [[str(r.get("date") or "-")[:19].replace("T", " "), str(r.get("host") or "-"), _f(r.get("card"), "{}"),
              str(r.get("run_id") or "-"), _yes(r.get("certified")), _f(r.get("idle_junction_mean_c")),
              _f(r.get("active_junction_p95_c")), _f(r.get("memory_max_c")), _f(r.get("active_power_mean_w")),
              _f(r.get("sd_per_image_median_s"), "{:.4f}"), last(r)] for r in rows]
    widths = [max(len(h), *(len(x[i]) for x in lines)) if lines else len(h) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells[:-1], widths)) + "  " + cells[-1]  # noqa: E731
    serial = rows[0].get("serial") if rows else "?"
    return "\n".join([f"serial {serial}: {len(rows)} certification(s)", fmt(list(head))] + [fmt(x) for x in lines])


def format_serials(rows: list[dict]) -> str:
    if not rows:
        return "no serials known"
    head = ["serial", "runs", "last date", "last host", "card", "last certified", "card ok"]
    lines = [[str(r["serial"]), str(r["runs"]), str(r.get("last_date") or "-")[:19].replace("T", " "),
              str(r.get("last_host") or "-"), _f(r.get("last_card"), "{}"), _yes(r.get("last_certified")),
              _yes(r.get("last_card_ok"))] for r in rows]
    widths = [max(len(h), *(len(x[i]) for x in lines)) for i, h in enumerate(head)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip() for cells in [head] + lines)


def cli_history(serial: str | None, index_dir: str | Path | None = None, *, as_json: bool = False) -> int:
    """``mi300x-cert history [SERIAL]``: the serials known, or one serial's certifications."""
    rows = card_history(serial, index_dir) if serial else list_serials(index_dir)
    if as_json:
        print(json.dumps(rows, indent=2, default=str))
    else:
        print(format_history(rows) if serial else format_serials(rows))
    return 0

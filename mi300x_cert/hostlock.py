"""One measurement per host at a time: a file lock in the host's state directory.

Two measurements on one server disturb each other (contention shows up as run-to-run variation,
heat from one as thermal failures of the other), so every code path that measures takes
:func:`host_lock` first: ``mi300x-cert run``/``certify`` around their whole run, and the Airflow
tasks through :func:`mi300x_cert.experiments.run_experiment` / ``run_case`` (the same function).

* The lock is ``<lock dir>/<host>.lock``: ``$MI300X_CERT_LOCK_DIR``, else ``<state dir>/locks``
  (state dir: ``$MI300X_CERT_STATE_DIR``, else ``$AIRFLOW_HOME/mi300x-cert``, else
  ``~/.mi300x-cert``). Everything that measures on one machine must see the same lock dir — the
  Docker images set ``MI300X_CERT_STATE_DIR=/var/lib/mi300x-cert`` for that reason.
* It is an ``flock`` on that file, so the kernel releases it when its holder dies, however it dies
  (SIGKILL included): a stale lock is taken over by the next run, which says whose it was. While
  held, the file names its holder (pid, run directory, start time, command).
* A second run on a locked host waits up to ``wait_s`` seconds (default
  ``$MI300X_CERT_LOCK_WAIT_S``, else 120; ``--wait`` on the command line), then refuses with
  :class:`~mi300x_cert.errors.HostBusyError` naming the holder. ``wait_s=0`` refuses at once.
* Within one process the lock is re-entrant for the same run directory (``run_all`` holds it while
  its ``run_case`` calls take it again).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from .errors import HostBusyError

__all__ = ["host_lock", "lock_path", "lock_dir", "holder", "default_wait_s", "DEFAULT_WAIT_S", "LOCK_WAIT_ENV"]

DEFAULT_WAIT_S = 120.0
LOCK_WAIT_ENV = "MI300X_CERT_LOCK_WAIT_S"
LOCK_DIR_ENV = "MI300X_CERT_LOCK_DIR"

_held: dict[str, dict[str, Any]] = {}  # lock path → {"count", "run_dir", "file"}
_held_guard = threading.Lock()


def lock_dir() -> Path:
    if os.environ.get(LOCK_DIR_ENV):
        return Path(os.environ[LOCK_DIR_ENV])
    from .alerts import state_dir

    return state_dir() / "locks"


def lock_path(host: str) -> Path:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", str(host)).strip("._") or "host"
    return lock_dir() / f"{name}.lock"


def default_wait_s() -> float:
    raw = os.environ.get(LOCK_WAIT_ENV)
    if raw in (None, ""):
        return DEFAULT_WAIT_S
    try:
        value = float(raw)
    except ValueError:
        raise HostBusyError(f"{LOCK_WAIT_ENV}={raw!r} is not a number of seconds") from None
    if value < 0:
        raise HostBusyError(f"{LOCK_WAIT_ENV}={raw!r} must be 0 or more seconds")
    return value


def holder(host: str) -> dict | None:
    """What the lock file of ``host`` says about its holder (None: free or unreadable). Advisory:
    whether it is really held is only known by trying to take it."""
    try:
        text = lock_path(host).read_text()
    except OSError:
        return None
    try:
        data = json.loads(text) if text.strip() else None
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _describe(h: dict | None) -> str:
    if not h:
        return "another process (no holder recorded)"
    return (f"pid {h.get('pid')} on {h.get('machine')} measuring run {h.get('run_dir')} since {h.get('started')}"
            + (f" ({h.get('command')})" if h.get("command") else ""))


def _same(a: Any, b: Any) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except (OSError, TypeError):
        return a == b


def _say(msg: str) -> None:
    print(f"[host lock] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def host_lock(host: str, run_dir: str | Path, wait_s: float | None = None) -> Iterator[dict]:
    """Hold the measurement lock of ``host`` for ``run_dir``; yields the holder record.

    Raises HostBusyError naming the holder when it is still held after ``wait_s`` seconds (None:
    :func:`default_wait_s`), or when this process already holds it for another run directory.
    """
    wait = default_wait_s() if wait_s is None else float(wait_s)
    if wait < 0:
        raise HostBusyError(f"--wait {wait_s!r}: must be 0 or more seconds")
    path = lock_path(host)
    key = str(path)
    with _held_guard:
        mine = _held.get(key)
        if mine is not None:
            if not _same(mine["run_dir"], run_dir):
                raise HostBusyError(f"host {host}: this process already measures run {mine['run_dir']}; "
                                    f"it cannot measure {run_dir} at the same time")
            mine["count"] += 1
    if mine is not None:
        try:
            yield mine["record"]
        finally:
            with _held_guard:
                mine["count"] -= 1
        return

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "a+")
    except OSError as e:
        raise HostBusyError(f"cannot open the host lock {path}: {e.strerror or e}") from e
    try:
        deadline = time.monotonic() + wait
        announced = False
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                pass
            h = holder(host)
            if time.monotonic() >= deadline:
                raise HostBusyError(f"host {host} is busy: {_describe(h)}; gave up after waiting {wait:g} s "
                                    f"(lock {path}; wait longer with --wait SECONDS)")
            if not announced:
                _say(f"host {host} is busy: {_describe(h)}; waiting up to {wait:g} s")
                announced = True
            time.sleep(min(0.5, max(0.05, deadline - time.monotonic())))
        # we hold it: whatever the file still names is a holder that died without releasing
        f.seek(0)
        previous = f.read().strip()
        if previous:
            try:
                prev = json.loads(previous)
            except ValueError:
                prev = None
            if isinstance(prev, dict) and prev.get("pid") != os.getpid():
                _say(f"took over the stale lock of host {host} from {_describe(prev)} (that process is gone)")
        record = {"pid": os.getpid(), "machine": socket.gethostname(), "host": host, "run_dir": str(run_dir),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "command": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:300]}
        f.seek(0)
        f.truncate()
        f.write(json.dumps(record) + "\n")
        f.flush()
    except BaseException:
        f.close()
        raise
    entry = {"count": 1, "run_dir": str(run_dir), "record": record, "file": f}
    with _held_guard:
        _held[key] = entry
    try:
        yield record
    finally:
        with _held_guard:
            _held.pop(key, None)
        try:
            f.seek(0)
            f.truncate()  # released cleanly: nothing stale is left to report
            f.flush()
        except OSError:
            pass
        finally:
            try:
                fcntl.flock(f, fcntl.LOCK_UN)
            finally:
                f.close()

"""Network evidence for "the workload ran locally": interface counters, a socket audit of the workload
processes, and (optionally) enforced isolation.

* :class:`NetworkMonitor` samples ``psutil.net_io_counters(pernic=True)`` at ``rate_hz`` and writes
  per-interface byte counters and deltas (excluded interfaces, ``lo`` by default, are neither
  written nor counted), stamped with the current phase. Processes registered with :meth:`watch`
  (and their children) have their inet sockets listed every tick; each distinct
  ``(pid, laddr, raddr)`` is written once, ``external`` when its remote address is neither loopback
  nor unspecified. A connection opened and closed between two ticks can be missed by the audit (the
  interface counters still see its bytes); enforced mode closes that gap.
* Per watched worker the monitor also records its **own** network evidence (``netns`` stream, one
  row per worker per reading): the network namespace id (the inode of ``/proc/<pid>/ns/net``), the
  monitor's own (host) namespace id, and the interface counters *of that namespace*
  (``/proc/<pid>/net/dev``). A worker is read when it is watched, at every tick and right after
  every phase switch (so each live worker has a reading stamped ``active``). The socket audit reads
  the worker's sockets from its own namespace's tables (``/proc/<pid>/net/tcp*``, ``udp*``), so a
  worker in a private namespace is audited there and not against the host's tables.
* :func:`isolation_prefix` gives the argv prefix that runs a worker in an empty network namespace
  (``unshare --net``: only a down loopback inside, so no packet can leave) — mode ``enforced`` — or
  nothing in mode ``observed``.

Host-wide interface counters see every process of the machine (package downloads, monitoring
agents, the worker's own heartbeats): they are evidence about the host, not about the workload.
How the verdict uses each stream is in ``mi300x_cert.validation.frames.network_frame``.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import logging
import os
import shutil
import subprocess
import threading
import time
from typing import Any, Callable, Iterable

from .errors import NetworkIsolationError

__all__ = [
    "NETWORK_COLUMNS",
    "SOCKET_COLUMNS",
    "NETNS_COLUMNS",
    "netns_id",
    "netns_reading",
    "proc_connections",
    "MODES",
    "NetworkMonitor",
    "isolation_prefix",
    "enforced_available",
    "is_external_address",
]

log = logging.getLogger(__name__)

NETWORK_COLUMNS = ["t", "elapsed_s", "phase", "interface", "bytes_sent", "bytes_recv", "d_sent", "d_recv"]
SOCKET_COLUMNS = ["t", "phase", "pid", "process", "laddr", "raddr", "status", "family", "external"]
# one row per watched worker per reading: its namespace, the host's, and its namespace's interfaces
# (``interfaces`` = "name:sent:recv;…" of every interface, ``external_*`` = sums over non-loopback ones)
NETNS_COLUMNS = ["t", "phase", "pid", "netns", "host_netns", "interfaces", "external_interfaces",
                 "external_bytes_sent", "external_bytes_recv", "error"]
MODES = ("observed", "enforced", "auto")


# ---- classification ---------------------------------------------------------------------------
def _host_of(addr: Any) -> str | None:
    """The IP of a psutil address tuple / ``(ip, port)`` / plain string; None when empty."""
    if addr is None or addr == () or addr == "":
        return None
    if isinstance(addr, str):
        return addr
    ip = getattr(addr, "ip", None)
    if ip is None and isinstance(addr, (tuple, list)) and addr:
        ip = addr[0]
    return ip or None


def is_external_address(addr: Any) -> bool:
    """True when a remote address leaves this host: not empty, not loopback, not unspecified.

    Accepts an IP string, a ``(ip, port)`` tuple or a psutil ``addr``. IPv4-mapped IPv6 addresses
    are judged by their IPv4 part; a scoped address (``fe80::1%eth0``) by its address. A string
    that is not an IP address counts as external (fail closed).
    """
    host = _host_of(addr)
    if not host:
        return False
    host = host.split("%", 1)[0]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return True
    mapped = getattr(ip, "ipv4_mapped", None)
    if mapped is not None:
        ip = mapped
    return not (ip.is_loopback or ip.is_unspecified)


def _fmt_addr(addr: Any) -> str:
    host = _host_of(addr)
    if not host:
        return ""
    port = getattr(addr, "port", None)
    if port is None and isinstance(addr, (tuple, list)) and len(addr) > 1:
        port = addr[1]
    if ":" in host:
        return f"[{host}]:{port}" if port is not None else host
    return f"{host}:{port}" if port is not None else host


def _family_name(fam: Any) -> str:
    name = getattr(fam, "name", None) or str(fam)
    return {"AF_INET": "ipv4", "AF_INET6": "ipv6"}.get(name, name)


# ---- isolation --------------------------------------------------------------------------------
_ENFORCE_LOCK = threading.Lock()
_ENFORCE_CACHE: tuple[list[str] | None, str] | None = None

_CANDIDATES = (
    ["unshare", "--net", "--"],
    ["unshare", "--map-root-user", "--net", "--"],  # unprivileged user namespaces
)


def _probe_enforced() -> tuple[list[str] | None, str]:
    if shutil.which("unshare") is None:
        return None, "the `unshare` command (util-linux) is not installed"
    reasons = []
    for prefix in _CANDIDATES:
        try:
            r = subprocess.run(prefix + ["true"], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired) as e:
            reasons.append(f"`{' '.join(prefix[:-1])} true`: {e}")
            continue
        if r.returncode == 0:
            return list(prefix), "ok"
        reasons.append(f"`{' '.join(prefix[:-1])} true` exited {r.returncode}: {r.stderr.strip() or r.stdout.strip()}")
    return None, "; ".join(reasons)


def enforced_available(refresh: bool = False) -> tuple[list[str] | None, str]:
    """(argv prefix, "ok") when a new network namespace can be made here, else (None, why). Cached."""
    global _ENFORCE_CACHE
    with _ENFORCE_LOCK:
        if _ENFORCE_CACHE is None or refresh:
            _ENFORCE_CACHE = _probe_enforced()
        prefix, why = _ENFORCE_CACHE
        return (list(prefix) if prefix else None), why


def isolation_prefix(mode: str) -> tuple[list[str], str]:
    """``(argv prefix, effective mode)`` for network mode ``enforced`` | ``observed`` | ``auto``.

    ``enforced`` runs workers under ``unshare --net`` (checked once per process) and raises
    NetworkIsolationError naming why when that is impossible; ``auto`` falls back to ``observed``.
    """
    if mode not in MODES:
        raise NetworkIsolationError(f"network.mode {mode!r} is not one of {', '.join(MODES)}")
    if mode == "observed":
        return [], "observed"
    prefix, why = enforced_available()
    if prefix:
        return prefix, "enforced"
    if mode == "enforced":
        raise NetworkIsolationError(
            f"network.mode 'enforced' needs a private network namespace, which cannot be created here: {why} "
            "(run as root or allow unprivileged user namespaces, or use network.mode: observed/auto)")
    return [], "observed"


# ---- per-process namespace evidence ------------------------------------------------------------
def netns_id(pid: int | str = "self") -> str | None:
    """The network namespace of ``pid`` as ``net:[<inode>]`` (None when unreadable: gone, no /proc)."""
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return None


def _read_net_dev(pid: int | str) -> dict[str, tuple[int, int]]:
    """``/proc/<pid>/net/dev`` = the interfaces of ``pid``'s namespace → (bytes_sent, bytes_recv)."""
    out: dict[str, tuple[int, int]] = {}
    with open(f"/proc/{pid}/net/dev") as f:
        lines = f.read().splitlines()[2:]
    for line in lines:
        if ":" not in line:
            continue
        name, rest = line.split(":", 1)
        cols = rest.split()
        if len(cols) >= 9:
            out[name.strip()] = (int(cols[8]), int(cols[0]))
    return out


def _is_loopback_interface(name: str) -> bool:
    return name == "lo" or name.startswith("lo:")


def netns_reading(pid: int) -> dict[str, Any]:
    """One reading of ``pid``'s own network evidence: ``{netns, interfaces: {name: (sent, recv)}}``;
    raises OSError when the process is gone."""
    ns = netns_id(pid)
    if ns is None:
        raise OSError(f"/proc/{pid}/ns/net is not readable")
    return {"netns": ns, "interfaces": _read_net_dev(pid)}


_TCP_STATES = {"01": "ESTABLISHED", "02": "SYN_SENT", "03": "SYN_RECV", "04": "FIN_WAIT1", "05": "FIN_WAIT2",
               "06": "TIME_WAIT", "07": "CLOSE", "08": "CLOSE_WAIT", "09": "LAST_ACK", "0A": "LISTEN",
               "0B": "CLOSING", "0C": "NEW_SYN_RECV"}


def _decode_proc_addr(text: str, v6: bool) -> tuple[str, int] | tuple[()]:
    import socket as _socket

    ip_hex, port_hex = text.split(":")
    port = int(port_hex, 16)
    raw = bytes.fromhex(ip_hex)
    if v6:  # four little-endian 32-bit words
        raw = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
        ip = _socket.inet_ntop(_socket.AF_INET6, raw)
    else:
        ip = _socket.inet_ntop(_socket.AF_INET, raw[::-1])
    if not port and ip in ("0.0.0.0", "::"):
        return ()
    return (ip, port)


def _socket_inodes(pid: int) -> set[str]:
    out: set[str] = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(target[8:-1])
    return out


def proc_connections(pid: int) -> list[tuple[int, Any]]:
    """(pid, connection) for ``pid`` and its live children, each read from **its own** network
    namespace's tables (``/proc/<p>/net/tcp``, ``tcp6``, ``udp``, ``udp6``): psutil reads the
    caller's tables and would see nothing of a worker inside a private namespace."""
    import socket as _socket

    import psutil

    try:
        root = psutil.Process(pid)
        pids = [pid] + [c.pid for c in root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    out: list[tuple[int, Any]] = []
    for p in pids:
        try:
            inodes = _socket_inodes(p)
        except OSError:
            continue
        if not inodes:
            continue
        for proto, fam, v6 in (("tcp", _socket.AF_INET, False), ("tcp6", _socket.AF_INET6, True),
                               ("udp", _socket.AF_INET, False), ("udp6", _socket.AF_INET6, True)):
            try:
                with open(f"/proc/{p}/net/{proto}") as f:
                    lines = f.read().splitlines()[1:]
            except OSError:
                continue
            for line in lines:
                cols = line.split()
                if len(cols) < 10 or cols[9] not in inodes:
                    continue
                status = _TCP_STATES.get(cols[3], cols[3]) if proto.startswith("tcp") else "NONE"
                out.append((p, _Conn(family=fam, laddr=_decode_proc_addr(cols[1], v6),
                                     raddr=_decode_proc_addr(cols[2], v6), status=status)))
    return out


class _Conn:
    __slots__ = ("family", "laddr", "raddr", "status")

    def __init__(self, family: Any, laddr: Any, raddr: Any, status: str):
        self.family, self.laddr, self.raddr, self.status = family, laddr, raddr, status


# ---- monitor ----------------------------------------------------------------------------------
def _psutil_counters() -> dict[str, Any]:
    import psutil

    return psutil.net_io_counters(pernic=True)


def process_label(pid: int) -> str | None:
    """A short name of a process for verdicts: its command line (first words), else its name."""
    import psutil

    try:
        p = psutil.Process(pid)
        cmd = p.cmdline()
        text = " ".join(cmd[:4]) if cmd else p.name()
    except (psutil.Error, OSError):
        return None
    return text if len(text) <= 120 else text[:117] + "..."


class NetworkMonitor:
    """``NetworkMonitor(network_stream, sockets_stream, rate_hz, exclude_interfaces=["lo"])``.

    ``mode`` is the effective isolation mode reported by :meth:`summary`. ``counters_fn`` (→ dict of
    interface → object with ``bytes_sent``/``bytes_recv``), ``connections_fn`` (pid → list of
    ``(pid, conn)``) and ``netns_fn`` (pid → ``{netns, interfaces}``) replace /proc in tests.
    ``netns_stream`` receives the per-worker namespace readings (:data:`NETNS_COLUMNS`). Streams
    may be None (nothing written).
    """

    def __init__(self, network_stream: Any, sockets_stream: Any, rate_hz: float = 2.0,
                 exclude_interfaces: Iterable[str] | None = None, *, mode: str = "observed",
                 counters_fn: Callable[[], dict[str, Any]] | None = None,
                 connections_fn: Callable[[int], list[tuple[int, Any]]] | None = None,
                 netns_stream: Any = None, netns_fn: Callable[[int], dict] | None = None,
                 host_netns: str | None = None):
        if rate_hz <= 0:
            raise ValueError(f"rate_hz must be positive, got {rate_hz!r}")
        self.network_stream = network_stream
        self.sockets_stream = sockets_stream
        self.rate_hz = float(rate_hz)
        self.exclude = list(["lo"] if exclude_interfaces is None else exclude_interfaces)
        self.mode = mode
        self._counters_fn = counters_fn or _psutil_counters
        self._connections_fn = connections_fn or proc_connections
        self.netns_stream = netns_stream
        self._netns_fn = netns_fn or netns_reading
        self.host_netns = host_netns if host_netns is not None else netns_id("self")
        self._workers: dict[int, dict[str, Any]] = {}
        self._lock = threading.RLock()
        self._phase: str | None = None
        self._prev: dict[str, tuple[int, int]] | None = None
        self._watched: set[int] = set()
        self._audited: set[int] = set()  # sockets only: not a worker (e.g. the preloader its workers fork from)
        self._seen: set[tuple[int, str, str]] = set()
        self._connections: list[dict] = []
        self._by_phase: dict[str, dict[str, int]] = {}
        self._by_iface: dict[str, dict[str, int]] = {}
        self._sent = 0
        self._recv = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = time.monotonic()
        self.ticks = 0
        self.errors = 0
        self.last_error: str | None = None

    def excluded(self, interface: str) -> bool:
        return any(fnmatch.fnmatchcase(interface, pat) for pat in self.exclude)

    # ---- control -------------------------------------------------------------------------------
    def phase(self, name: str) -> None:
        """Stamp later rows with ``name``; the counters are read first so bytes land in the phase they belong to."""
        with self._lock:
            self.tick()
            self._phase = name
            try:
                self._read_workers(time.time())
            except Exception as e:
                self._error(f"worker namespaces: {type(e).__name__}: {e}")

    def watch(self, pid: int, worker: bool = True) -> None:
        """Audit the sockets of ``pid`` and its children from now on (audited at once, then every tick).
        A worker also gets namespace readings (its evidence in enforced mode); ``worker=False``
        (the preloader that forks the workers) only its sockets."""
        with self._lock:
            if not worker:
                self._audited.add(int(pid))
                self._audit_sockets(time.time())
                return
            self._watched.add(int(pid))
            self._audit_sockets(time.time())
            self._read_workers(time.time(), only=int(pid))

    def unwatch(self, pid: int) -> None:
        with self._lock:
            self._audit_sockets(time.time())
            self._read_workers(time.time(), only=int(pid))
            self._watched.discard(int(pid))

    def start(self) -> "NetworkMonitor":
        if self._thread is not None:
            raise RuntimeError("network monitor already started")
        self._t0 = time.monotonic()
        self.tick()  # baseline
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="network-monitor", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self.tick()  # the last bytes

    def __enter__(self) -> "NetworkMonitor":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _run(self) -> None:
        period = 1.0 / self.rate_hz
        next_t = time.monotonic() + period
        while not self._stop.wait(max(0.0, next_t - time.monotonic())):
            self.tick()
            next_t += period
            if next_t < time.monotonic():
                next_t = time.monotonic() + period

    # ---- one tick ------------------------------------------------------------------------------
    def tick(self) -> None:
        """Read the counters once (write deltas) and audit the watched processes' sockets."""
        with self._lock:
            t = time.time()
            try:
                self._read_counters(t)
            except Exception as e:
                self._error(f"interface counters: {type(e).__name__}: {e}")
            try:
                self._audit_sockets(t)
            except Exception as e:
                self._error(f"socket audit: {type(e).__name__}: {e}")
            try:
                self._read_workers(t)
            except Exception as e:
                self._error(f"worker namespaces: {type(e).__name__}: {e}")
            self.ticks += 1

    def _error(self, msg: str) -> None:
        self.errors += 1
        self.last_error = msg
        if self.errors <= 3:
            log.warning("network monitor: %s", msg)

    def _read_counters(self, t: float) -> None:
        counters = self._counters_fn() or {}
        now = {name: (int(c.bytes_sent), int(c.bytes_recv)) for name, c in counters.items() if not self.excluded(name)}
        if self._prev is None:  # baseline: remember, write the absolute values with zero deltas
            self._prev = now
            deltas = {name: (0, 0) for name in now}
        else:
            deltas = {}
            for name, (s, r) in now.items():
                ps, pr = self._prev.get(name, (s, r))  # a new interface starts from its first reading
                ds = s - ps if s >= ps else s           # a counter reset counts from zero
                dr = r - pr if r >= pr else r
                deltas[name] = (ds, dr)
            self._prev = now
        phase = self._phase
        elapsed = round(time.monotonic() - self._t0, 6)
        for name in sorted(now):
            s, r = now[name]
            ds, dr = deltas[name]
            self._sent += ds
            self._recv += dr
            ph = self._by_phase.setdefault(phase or "", {"bytes_sent": 0, "bytes_recv": 0})
            ph["bytes_sent"] += ds
            ph["bytes_recv"] += dr
            ifc = self._by_iface.setdefault(name, {"bytes_sent": 0, "bytes_recv": 0})
            ifc["bytes_sent"] += ds
            ifc["bytes_recv"] += dr
            if self.network_stream is not None:
                self.network_stream.write({"t": round(t, 6), "elapsed_s": elapsed, "phase": phase, "interface": name,
                                           "bytes_sent": s, "bytes_recv": r, "d_sent": ds, "d_recv": dr})

    def _audit_sockets(self, t: float) -> None:
        for pid in sorted(self._watched | self._audited):
            for owner, conn in self._connections_fn(pid):
                laddr, raddr = _fmt_addr(getattr(conn, "laddr", None)), _fmt_addr(getattr(conn, "raddr", None))
                key = (int(owner), laddr, raddr)
                if key in self._seen:
                    continue
                self._seen.add(key)
                row = {"t": round(t, 6), "phase": self._phase, "pid": int(owner), "process": process_label(int(owner)),
                       "laddr": laddr, "raddr": raddr,
                       "status": getattr(conn, "status", None), "family": _family_name(getattr(conn, "family", "")),
                       "external": is_external_address(getattr(conn, "raddr", None))}
                self._connections.append(row)
                if self.sockets_stream is not None:
                    self.sockets_stream.write(row)

    def _read_workers(self, t: float, only: int | None = None) -> None:
        """One namespace reading per live watched worker (a worker that is gone is skipped: its last
        reading stands)."""
        for pid in ([only] if only is not None else sorted(self._watched)):
            try:
                r = self._netns_fn(pid)
            except (OSError, ValueError):
                continue
            ifaces = dict(r.get("interfaces") or {})
            ext = {k: v for k, v in ifaces.items() if not _is_loopback_interface(k)}
            row = {"t": round(t, 6), "phase": self._phase, "pid": int(pid), "netns": r.get("netns"),
                   "host_netns": self.host_netns,
                   "interfaces": ";".join(f"{k}:{v[0]}:{v[1]}" for k, v in sorted(ifaces.items())),
                   "external_interfaces": " ".join(sorted(ext)),
                   "external_bytes_sent": int(sum(v[0] for v in ext.values())),
                   "external_bytes_recv": int(sum(v[1] for v in ext.values())), "error": None}
            w = self._workers.setdefault(int(pid), {"pid": int(pid), "readings": 0, "namespaces": []})
            w["readings"] += 1
            if row["netns"] not in w["namespaces"]:
                w["namespaces"].append(row["netns"])
            w["last"] = {k: row[k] for k in ("phase", "netns", "external_interfaces", "external_bytes_sent",
                                             "external_bytes_recv")}
            if self.netns_stream is not None:
                self.netns_stream.write(row)

    # ---- results -------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """Totals over the non-excluded interfaces (overall, per phase, per interface) and connections."""
        with self._lock:
            conns = [dict(c) for c in self._connections]
            return {
                "mode": self.mode,
                "excluded_interfaces": list(self.exclude),
                "bytes_sent_external": self._sent,
                "bytes_recv_external": self._recv,
                "by_phase": {k: dict(v) for k, v in self._by_phase.items()},
                "by_interface": {k: dict(v) for k, v in self._by_iface.items()},
                "external_connections": sum(1 for c in conns if c["external"]),
                "connections": conns,
                "watched_pids": sorted(self._watched),
                "host_netns": self.host_netns,
                "workers": {str(k): {**v, "namespaces": list(v["namespaces"])} for k, v in self._workers.items()},
                "ticks": self.ticks,
                "errors": self.errors,
                "last_error": self.last_error,
            }

"""Network monitor: interface deltas by phase, socket audit, address classifier, enforced isolation.

No test sends a packet anywhere but 127.0.0.1; external traffic is fed in through fake counters.
"""

from __future__ import annotations

import csv
import socket
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest

from mi300x_cert import network
from mi300x_cert.errors import NetworkIsolationError
from mi300x_cert.network import (
    NETWORK_COLUMNS,
    SOCKET_COLUMNS,
    NetworkMonitor,
    is_external_address,
    isolation_prefix,
)
from mi300x_cert.rundir import CsvStream


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class FakeCounters:
    """Interface counters we control: ``add(iface, sent, recv)`` injects traffic."""

    def __init__(self):
        self.values = {"lo": [1000, 1000], "eth0": [50_000, 70_000], "docker0": [0, 0]}

    def add(self, iface: str, sent: int, recv: int) -> None:
        v = self.values.setdefault(iface, [0, 0])
        v[0] += sent
        v[1] += recv

    def __call__(self):
        return {k: types.SimpleNamespace(bytes_sent=v[0], bytes_recv=v[1]) for k, v in self.values.items()}


@pytest.fixture
def loopback_listener():
    """A TCP listener on 127.0.0.1 that accepts and holds connections; yields its port."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    srv.settimeout(0.2)
    conns, stop = [], threading.Event()

    def accept():
        while not stop.is_set():
            try:
                c, _ = srv.accept()
                conns.append(c)
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield srv.getsockname()[1]
    stop.set()
    t.join(2)
    for c in conns:
        c.close()
    srv.close()


# ---- classifier --------------------------------------------------------------------------------
@pytest.mark.parametrize("addr, external", [
    ("127.0.0.1", False), ("127.8.9.10", False), ("::1", False), ("0.0.0.0", False), ("::", False),
    ("::ffff:127.0.0.1", False), ("", False), (None, False), ((), False),
    (("127.0.0.1", 443), False),
    (types.SimpleNamespace(ip="127.0.0.1", port=80), False),
    ("10.0.0.5", True), ("192.168.1.20", True), ("8.8.8.8", True), ("2001:db8::1", True),
    ("fe80::1%eth0", True), ("::ffff:93.184.216.34", True), (("52.95.110.1", 443), True),
    (types.SimpleNamespace(ip="52.95.110.1", port=443), True),
    ("not-an-ip", True),
])
def test_is_external_address(addr, external):
    assert is_external_address(addr) is external


# ---- interface counters --------------------------------------------------------------------------
def test_injected_traffic_on_a_non_excluded_interface_is_counted_by_phase(tmp_path):
    fake = FakeCounters()
    net = CsvStream(tmp_path / "net.csv", NETWORK_COLUMNS)
    mon = NetworkMonitor(net, None, rate_hz=50, exclude_interfaces=["lo", "docker*"], counters_fn=fake)
    mon.tick()                       # baseline
    mon.phase("idle")
    fake.add("eth0", 100, 200)
    fake.add("lo", 10**9, 10**9)     # loopback: excluded
    fake.add("docker0", 5, 5)        # excluded by pattern
    mon.tick()
    mon.phase("active")
    fake.add("eth0", 3000, 4000)
    fake.add("ib0", 7, 9)            # a new interface appears: counted from its first reading
    mon.tick()
    fake.add("ib0", 1, 1)
    mon.tick()
    net.close()
    s = mon.summary()
    assert s["mode"] == "observed"
    assert s["bytes_sent_external"] == 3101 and s["bytes_recv_external"] == 4201
    assert s["by_phase"]["idle"] == {"bytes_sent": 100, "bytes_recv": 200}
    assert s["by_phase"]["active"] == {"bytes_sent": 3001, "bytes_recv": 4001}
    assert s["by_interface"]["eth0"] == {"bytes_sent": 3100, "bytes_recv": 4200}
    assert "lo" not in s["by_interface"] and "docker0" not in s["by_interface"]
    rows = read_csv(tmp_path / "net.csv")
    assert list(rows[0]) == NETWORK_COLUMNS
    assert {r["interface"] for r in rows} == {"eth0", "ib0"}
    eth_active = [r for r in rows if r["interface"] == "eth0" and r["phase"] == "active"]
    assert sum(int(r["d_sent"]) for r in eth_active) == 3000
    assert int(eth_active[-1]["bytes_sent"]) == 53_100


def test_counter_reset_counts_from_zero():
    fake = FakeCounters()
    mon = NetworkMonitor(None, None, counters_fn=fake)
    mon.tick()
    fake.values["eth0"] = [40, 60]   # the interface was reset
    mon.tick()
    assert mon.summary()["bytes_sent_external"] == 40 and mon.summary()["bytes_recv_external"] == 60


def test_background_thread_ticks_and_stop_reads_the_last_bytes(tmp_path):
    fake = FakeCounters()
    mon = NetworkMonitor(None, None, rate_hz=50, counters_fn=fake).start()
    mon.phase("active")
    time.sleep(0.2)
    fake.add("eth0", 123, 456)
    mon.stop()
    s = mon.summary()
    assert s["ticks"] >= 5
    assert s["by_phase"]["active"] == {"bytes_sent": 123, "bytes_recv": 456}


def test_real_counters_are_read_with_psutil():
    mon = NetworkMonitor(None, None, exclude_interfaces=[])
    mon.tick()
    mon.tick()
    assert mon.errors == 0 and mon.summary()["by_interface"]  # at least lo exists


# ---- socket audit --------------------------------------------------------------------------------
def test_socket_audit_catches_a_child_connecting_to_loopback(tmp_path, loopback_listener):
    port = loopback_listener
    sockets_csv = CsvStream(tmp_path / "sockets.csv", SOCKET_COLUMNS)
    mon = NetworkMonitor(None, sockets_csv, rate_hz=20).start()
    mon.phase("active")
    code = (f"import socket, time; s = socket.create_connection(('127.0.0.1', {port})); "
            "print('connected', flush=True); time.sleep(1.0); s.close()")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    mon.watch(child.pid)
    assert child.stdout.readline().strip() == "connected"
    child.wait(10)
    mon.stop()
    sockets_csv.close()
    s = mon.summary()
    mine = [c for c in s["connections"] if c["raddr"] == f"127.0.0.1:{port}"]
    assert len(mine) == 1  # seen once although audited at every tick
    assert mine[0]["external"] is False and mine[0]["pid"] == child.pid and mine[0]["family"] == "ipv4"
    assert mine[0]["phase"] == "active"
    assert s["external_connections"] == 0
    rows = read_csv(tmp_path / "sockets.csv")
    assert list(rows[0]) == SOCKET_COLUMNS
    assert any(r["raddr"] == f"127.0.0.1:{port}" and r["external"] == "False" for r in rows)


def test_a_connection_to_a_remote_address_is_marked_external():
    addr = lambda ip, port: types.SimpleNamespace(ip=ip, port=port)  # noqa: E731
    fam = types.SimpleNamespace(name="AF_INET")
    conns = [
        (4242, types.SimpleNamespace(laddr=addr("10.0.0.2", 51000), raddr=addr("52.95.110.1", 443), status="ESTABLISHED", family=fam)),
        (4242, types.SimpleNamespace(laddr=addr("127.0.0.1", 51001), raddr=addr("127.0.0.1", 8080), status="ESTABLISHED", family=fam)),
        (4243, types.SimpleNamespace(laddr=addr("0.0.0.0", 9000), raddr=(), status="LISTEN", family=fam)),
    ]
    mon = NetworkMonitor(None, None, counters_fn=FakeCounters(), connections_fn=lambda pid: conns if pid == 4242 else [])
    mon.watch(4242)
    mon.tick()
    mon.tick()
    s = mon.summary()
    assert s["external_connections"] == 1
    assert len(s["connections"]) == 3
    ext = [c for c in s["connections"] if c["external"]]
    assert ext[0]["raddr"] == "52.95.110.1:443" and ext[0]["laddr"] == "10.0.0.2:51000"
    listen = [c for c in s["connections"] if c["status"] == "LISTEN"][0]
    assert listen["raddr"] == "" and listen["external"] is False and listen["pid"] == 4243


def test_watching_a_process_that_is_gone_is_harmless():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    mon = NetworkMonitor(None, None, counters_fn=FakeCounters())
    mon.watch(p.pid)
    mon.tick()
    assert mon.errors == 0 and mon.summary()["connections"] == []


# ---- isolation -----------------------------------------------------------------------------------
def test_observed_and_bad_modes():
    assert isolation_prefix("observed") == ([], "observed")
    with pytest.raises(NetworkIsolationError, match="'sealed'"):
        isolation_prefix("sealed")


def test_enforced_unavailable_raises_naming_why_and_auto_falls_back(monkeypatch):
    monkeypatch.setattr(network, "_ENFORCE_CACHE", None)
    monkeypatch.setattr(network.shutil, "which", lambda name: None)
    with pytest.raises(NetworkIsolationError, match="unshare.*not installed"):
        isolation_prefix("enforced")
    assert isolation_prefix("auto") == ([], "observed")
    monkeypatch.setattr(network, "_ENFORCE_CACHE", None)


def test_enforced_isolation_blocks_loopback_of_the_parent_namespace(loopback_listener):
    prefix, why = network.enforced_available(refresh=True)
    if prefix is None:
        pytest.skip(f"no private network namespace here: {why}")
    argv, mode = isolation_prefix("enforced")
    assert mode == "enforced" and argv[0] == "unshare" and "--net" in argv and argv[-1] == "--"
    assert isolation_prefix("auto") == (argv, "enforced")
    code = f"import socket; socket.create_connection(('127.0.0.1', {loopback_listener}), timeout=3); print('ok')"
    free = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert free.returncode == 0 and free.stdout.strip() == "ok"
    jailed = subprocess.run(argv + [sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert jailed.returncode != 0
    assert any(w in jailed.stderr for w in ("Network is unreachable", "Connection refused", "Cannot assign")), jailed.stderr


# ---- the workers' own evidence: namespace readings and the per-namespace socket audit ------------
def test_worker_namespace_readings_are_written_per_phase(tmp_path):
    readings = {"netns": "net:[4026532999]", "interfaces": {"lo": (10, 10)}}
    ns = CsvStream(tmp_path / "netns.csv", network.NETNS_COLUMNS)
    mon = NetworkMonitor(None, None, rate_hz=1, counters_fn=FakeCounters(), connections_fn=lambda pid: [],
                         netns_stream=ns, netns_fn=lambda pid: readings, host_netns="net:[4026531840]")
    mon.tick()
    mon.watch(4321)
    mon.phase("active")
    ns.close()
    rows = read_csv(tmp_path / "netns.csv")
    assert [r["phase"] for r in rows] == ["", "", "active"]  # watched, the tick before the switch, after it
    assert all(r["netns"] == "net:[4026532999]" and r["host_netns"] == "net:[4026531840]" for r in rows)
    assert rows[-1]["external_bytes_sent"] == "0" and rows[-1]["interfaces"] == "lo:10:10"
    assert mon.summary()["workers"]["4321"]["namespaces"] == ["net:[4026532999]"]


def test_the_preloader_is_audited_for_sockets_but_is_not_worker_evidence(tmp_path):
    """The process the workers fork from (mi300x_cert.preload): its sockets are listed, but it adds
    no namespace reading, so it can never stand in for a worker's evidence."""
    addr = lambda ip, port: types.SimpleNamespace(ip=ip, port=port)  # noqa: E731
    fam = types.SimpleNamespace(name="AF_INET")
    conn = types.SimpleNamespace(laddr=addr("10.0.0.2", 51000), raddr=addr("52.95.110.1", 443), status="ESTABLISHED",
                                 family=fam)
    ns = CsvStream(tmp_path / "netns.csv", network.NETNS_COLUMNS)
    mon = NetworkMonitor(None, None, rate_hz=1, counters_fn=FakeCounters(),
                         connections_fn=lambda pid: [(pid, conn)] if pid == 777 else [],
                         netns_stream=ns, netns_fn=lambda pid: {"netns": "net:[1]", "interfaces": {}},
                         host_netns="net:[4026531840]")
    mon.watch(777, worker=False)
    mon.tick()
    mon.phase("active")
    ns.close()
    s = mon.summary()
    assert s["external_connections"] == 1 and s["connections"][0]["pid"] == 777
    assert read_csv(tmp_path / "netns.csv") == [] and "777" not in (s.get("workers") or {})


@pytest.mark.skipif(network.enforced_available()[0] is None, reason="no private network namespace here")
def test_a_worker_in_a_private_namespace_is_read_in_its_own_namespace(tmp_path):
    """A process under the enforced prefix: its namespace differs from ours, holds only `lo`, and
    the audit finds its loopback listener in its own namespace's tables (psutil would not)."""
    prefix, _ = network.enforced_available()
    code = ("import socket,sys,time; s=socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(); "
            "print(s.getsockname()[1], flush=True); sys.stdin.readline()")
    p = subprocess.Popen(prefix + [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        port = int(p.stdout.readline())
        r = network.netns_reading(p.pid)
        assert r["netns"] != network.netns_id("self")
        assert set(r["interfaces"]) == {"lo"}
        conns = network.proc_connections(p.pid)
        assert [(c.laddr, c.status) for _, c in conns] == [(("127.0.0.1", port), "LISTEN")]
    finally:
        p.stdin.close()
        p.wait(timeout=10)

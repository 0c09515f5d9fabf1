"""The network verdict on a host with other traffic: a veth pair into a network namespace this test
makes, megabytes moved through it by another process while a certification runs.

No packet leaves the machine: both ends of the veth pair are on this host (the peer inside the
test's namespace). Needs root (``ip netns``); skipped otherwise.

* enforced mode (the workers in private namespaces): the network suite PASSES and the report shows
  the host's bytes as background — the debug workload (seconds) and the README's smoke profile
  (``mi300x-cert certify --profile smoke``, the real tiny models, ≈1–4 min on 2 cores; it stands
  for ``scripts/smoke.sh``, which runs the same steps through Airflow) both end CERTIFIED;
* observed mode: a workload that connects to the test namespace's address FAILS, naming the
  process and the address.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
import yaml

from mi300x_cert import cli

TINY = Path(__file__).resolve().parent.parent / "fixtures" / "profiles" / "tiny.yaml"

pytestmark = [pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                                 reason="needs root and iproute2 to make a network namespace and a veth pair"),
              pytest.mark.host_network]  # the veth's host end is the host's traffic: runs alone (tests/conftest.py)

SINK = textwrap.dedent("""
    import socket, sys, threading
    def serve(port, hold):
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port)); s.listen(16)
        while True:
            c, _ = s.accept()
            def drain(c=c):
                while c.recv(1 << 16):
                    pass
            threading.Thread(target=drain, daemon=True).start()
    threading.Thread(target=serve, args=(9101, True), daemon=True).start()
    print("ready", flush=True)
    serve(9100, False)
""")

SENDER = textwrap.dedent("""
    import socket, sys, time
    addr, rate = sys.argv[1], float(sys.argv[2])   # bytes per second
    buf = b"x" * 65536
    while True:
        try:
            s = socket.create_connection((addr, 9100), timeout=5)
            t0, sent = time.monotonic(), 0
            while True:
                s.sendall(buf); sent += len(buf)
                ahead = sent / rate - (time.monotonic() - t0)
                if ahead > 0:
                    time.sleep(ahead)
        except OSError:
            time.sleep(0.2)
""")


class VethTraffic:
    """A namespace ``ns`` with the veth peer ``10.231.<k>.2/30`` (host side ``.1``), a sink inside it
    (port 9100 drains, 9101 accepts and holds connections) and a sender process on the host moving
    ``rate`` bytes/s into it."""

    def __init__(self, rate: float = 2_000_000):
        tag = uuid.uuid4().hex[:6]
        self.ns, self.host_if, self.peer_if = f"v13t-{tag}", f"vh{tag}", f"vp{tag}"
        k = int(tag, 16) % 200 + 20
        self.host_ip, self.peer_ip = f"10.231.{k}.1", f"10.231.{k}.2"
        self.rate = rate
        self.procs: list[subprocess.Popen] = []

    def _ip(self, *args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=20)

    def __enter__(self) -> "VethTraffic":
        try:
            self._ip("netns", "add", self.ns)
            self._ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.peer_if)
            self._ip("link", "set", self.peer_if, "netns", self.ns)
            self._ip("addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
            self._ip("link", "set", self.host_if, "up")
            self._ip("-n", self.ns, "addr", "add", f"{self.peer_ip}/30", "dev", self.peer_if)
            self._ip("-n", self.ns, "link", "set", self.peer_if, "up")
            self._ip("-n", self.ns, "link", "set", "lo", "up")
        except (subprocess.CalledProcessError, OSError) as e:
            self.__exit__()
            pytest.skip(f"cannot make a network namespace with a veth pair here: {getattr(e, 'stderr', e)}")
        sink = subprocess.Popen(["ip", "netns", "exec", self.ns, sys.executable, "-c", SINK],
                                stdout=subprocess.PIPE, text=True)
        self.procs.append(sink)
        assert sink.stdout is not None and sink.stdout.readline().strip() == "ready"
        self.procs.append(subprocess.Popen([sys.executable, "-c", SENDER, self.peer_ip, str(self.rate)]))
        time.sleep(1.0)
        return self

    def host_bytes(self) -> int:
        import psutil

        c = psutil.net_io_counters(pernic=True).get(self.host_if)
        return int(c.bytes_sent + c.bytes_recv) if c else 0

    def __exit__(self, *exc) -> None:
        for p in reversed(self.procs):
            p.kill()
            p.wait(timeout=10)
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True, timeout=20)
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True, timeout=20)


@pytest.fixture
def cert_env(monkeypatch, s3_server, signing_env):
    bucket = f"netv-{uuid.uuid4().hex[:10]}"
    for k, v in {"MI300X_CERT_S3_ENDPOINT": s3_server.endpoint, "MI300X_CERT_S3_BUCKET": bucket,
                 "MI300X_CERT_S3_CREATE_BUCKET": "true", "AWS_ACCESS_KEY_ID": "local",
                 "AWS_SECRET_ACCESS_KEY": "local"}.items():
        monkeypatch.setenv(k, v)
    return bucket


def _tiny(tmp_path: Path, mode: str) -> Path:
    prof = yaml.safe_load(TINY.read_text())
    prof["network"]["mode"] = mode
    prof.setdefault("telemetry", {})["simulated"] = {"time_scale": 300.0}
    path = tmp_path / f"tiny-{mode}.yaml"
    path.write_text(yaml.safe_dump(prof))
    return path


def _network_verdict(run: Path) -> dict:
    return json.loads((run / "validation" / "network.json").read_text())


def test_enforced_certification_passes_while_the_host_moves_megabytes(tmp_path, cert_env, monkeypatch, capsys):
    monkeypatch.setenv("MI300X_CERT_WORKLOAD", "debug")
    monkeypatch.setenv("MI300X_CERT_DEBUG_PARAMS", json.dumps({"latency_s": 0.3}))
    out = tmp_path / "run"
    with VethTraffic() as tr:
        before = tr.host_bytes()
        rc = cli.main(["certify", "--profile", str(_tiny(tmp_path, "enforced")), "--out", str(out), "--quiet"])
        moved = tr.host_bytes() - before
    err = capsys.readouterr().err
    assert moved > 2_000_000, f"the test moved only {moved} bytes through {tr.host_if}"
    assert rc == 0, err[-3000:]
    v = _network_verdict(out)
    assert v["success"] is True and v["evidence"]["mode"] == "enforced"
    assert v["evidence"]["workers"] == v["evidence"]["workers_isolated"] > 0
    background = v["evidence"]["background_bytes"]
    assert background["bytes_sent"] + background["bytes_recv"] > 1_000_000
    html = (out / "report" / "index.html").read_text()
    assert "Background bytes" in html and tr.host_if in html
    cert = json.loads((out / "validation" / "verdicts.json").read_text())
    assert "namespace" in cert["network_evidence"]["decided_by"]


def test_observed_workload_connection_fails_naming_process_and_address(tmp_path, cert_env, monkeypatch, capsys):
    monkeypatch.setenv("MI300X_CERT_WORKLOAD", "debug")
    out = tmp_path / "run"
    with VethTraffic(rate=200_000) as tr:
        monkeypatch.setenv("MI300X_CERT_DEBUG_PARAMS", json.dumps({"latency_s": 0.2, "connect_to": f"{tr.peer_ip}:9101"}))
        rc = cli.main(["certify", "--profile", str(_tiny(tmp_path, "observed")), "--out", str(out), "--quiet"])
    text = capsys.readouterr()
    assert rc == 1, text.err[-3000:]
    v = _network_verdict(out)
    assert v["success"] is False and v["evidence"]["mode"] == "observed"
    fails = [f for f in v["failures"] if f["expectation"] == "no_external_connections"]
    assert fails, json.dumps(v["failures"], indent=1)[:3000]
    f = fails[0]
    assert f["raddr"] == f"{tr.peer_ip}:9101"
    assert "mi300x_cert.worker" in f["process"] and f"{tr.peer_ip}:9101" in f["reason"] and "pid" in f["reason"]


@pytest.mark.integration
def test_readme_smoke_profile_is_certified_while_another_process_moves_megabytes(tmp_path, cert_env, monkeypatch, capsys):
    """`mi300x-cert certify --profile smoke` (the smoke profile of scripts/smoke.sh, mode auto →
    enforced as root) with 1 MB/s through a veth pair the whole time: CERTIFIED."""
    monkeypatch.delenv("MI300X_CERT_WORKLOAD", raising=False)
    out = tmp_path / "run"
    with VethTraffic(rate=1_000_000) as tr:
        before = tr.host_bytes()
        rc = cli.main(["certify", "--profile", "smoke", "--out", str(out), "--quiet"])
        moved = tr.host_bytes() - before
    err = capsys.readouterr().err
    assert moved > 5_000_000
    assert rc == 0, err[-4000:]
    assert "CERTIFIED" in err and "NOT CERTIFIED" not in err
    v = _network_verdict(out)
    assert v["evidence"]["mode"] == "enforced"
    bg = v["evidence"]["background_bytes"]
    assert bg["bytes_sent"] + bg["bytes_recv"] > 1_000_000

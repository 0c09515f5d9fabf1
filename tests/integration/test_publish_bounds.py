"""Publishing gives up in bounded time: with the S3 endpoint killed mid-publish, ``publish`` fails
within 60 s with one short error line, deletes what it can in batches (versions included), writes
the full list of left-over keys to a file the error names, and nothing partial verifies."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mi300x_cert import storage
from mi300x_cert.bundle import build_bundle, verify_bundle
from mi300x_cert.errors import StorageError

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def _big_bundle(make_complete_run, files: int = 180) -> Path:
    rd = make_complete_run(complete=False)
    for i in range(files):
        rd.write_text(f"telemetry/sd-throughput-c{i:03d}.csv", "time,card,junction_c\n" + "0.1,0,41.5\n" * 20)
    rd.mark_complete()
    return build_bundle(rd.root)


def _objects(bundle: Path) -> int:
    return sum(1 for p in bundle.rglob("*") if p.is_file())


def _kill_at(client, n: int, kill) -> dict:
    """Call ``kill()`` just before the ``n``-th PutObject is sent."""
    state = {"puts": 0, "killed_at": None}

    def hook(request, **kwargs):
        state["puts"] += 1
        if state["puts"] == n:
            kill()
            state["killed_at"] = time.monotonic()

    client.meta.events.register("before-send.s3.PutObject", hook)
    return state


def _leftover_file(message: str) -> Path:
    m = re.search(r"listed in (\S+\.json)$", message)
    assert m, message
    return Path(m.group(1))


class Proxy:
    """A TCP endpoint in front of an S3 server: ``kill()`` closes it and every connection through
    it (the store behind it survives); ``blackhole`` accepts connections and never answers."""

    def __init__(self, target_port: int | None, blackhole: bool = False):
        self.target, self.blackhole = target_port, blackhole
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(c)
            if self.blackhole:
                continue
            u = socket.create_connection(("127.0.0.1", self.target))
            self.conns.append(u)
            for a, b in ((c, u), (u, c)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def kill(self) -> None:
        self.sock.close()
        for c in self.conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
                c.close()
            except OSError:
                pass


def test_embedded_s3_killed_mid_publish_fails_within_60s(make_complete_run, tmp_path):
    """The embedded server (``python -m mi300x_cert.s3local``) SIGKILLed after 60 objects of ~190,
    default settings (4 tries per object, deadline 60 s)."""
    bundle = _big_bundle(make_complete_run)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = subprocess.Popen([sys.executable, "-m", "mi300x_cert.s3local", "--port", str(port)],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert "127.0.0.1" in srv.stdout.readline()
        store = {"endpoint": f"http://127.0.0.1:{port}", "bucket": "certs", "access_key": "local",
                 "secret_key": "local", "create_bucket": True}
        client = storage.make_client(storage.load_store_config(store))
        state = _kill_at(client, 60, lambda: (srv.kill(), srv.wait()))
        t0 = time.monotonic()
        with pytest.raises(StorageError) as e:
            storage.publish_bundle(bundle, store, client=client)
        t1 = time.monotonic()
    finally:
        srv.kill()
        srv.wait()
    assert state["killed_at"] is not None
    assert t1 - t0 < 60, f"publish took {t1 - t0:.1f} s"
    msg = str(e.value)
    print(f"{_objects(bundle)} objects; failed {t1 - state['killed_at']:.1f} s after the kill; error {len(msg)} chars")
    assert "\n" not in msg and len(msg) < 600, msg
    assert re.match(rf"publishing s3://certs/certifications/gpu-node-07/\S+ failed at artifacts/\S+: cannot reach S3 "
                    rf"endpoint http://127\.0\.0\.1:{port} \(EndpointConnectionError\); removed 0 of the 59 object\(s\) "
                    rf"this attempt created; 60 object\(s\) left over, listed in ", msg), msg
    listing = _leftover_file(msg)
    assert listing.parent == bundle.resolve().parent  # beside the bundle, in the run directory
    record = json.loads(listing.read_text())
    left = record["left_over"]
    assert len(left) == 60 and record["created"] == 59 and record["removed"] == 0
    assert sum(1 for x in left if x["version_id"]) == 59  # versioned bucket: every version named
    assert not any(x["key"].endswith("envelope.dsse.json") for x in left)
    assert "never verify" in record["note"] and record["error"].startswith("cannot reach S3 endpoint")


def test_endpoint_lost_mid_publish_leaves_nothing_that_verifies(make_complete_run, s3_server, s3_store):
    """The endpoint dies (a proxy in front of the session's S3 server is killed) while the store keeps
    what it got: the left-over file lists exactly what is in the bucket, the prefix does not verify,
    and publishing again through a live endpoint completes the bundle."""
    bundle = _big_bundle(make_complete_run, 40)
    proxy = Proxy(s3_server.port)
    store = {**s3_store, "endpoint": proxy.endpoint}
    client = storage.make_client(storage.load_store_config(store))
    _kill_at(client, 25, proxy.kill)
    t0 = time.monotonic()
    with pytest.raises(StorageError) as e:
        storage.publish_bundle(bundle, store, client=client)
    assert time.monotonic() - t0 < 60
    record = json.loads(_leftover_file(str(e.value)).read_text())
    plain = storage.make_client(storage.load_store_config(s3_store))
    resp = plain.list_object_versions(Bucket=s3_store["bucket"])
    present = sorted((v["Key"], v["VersionId"]) for v in resp.get("Versions") or [])
    listed = sorted((x["key"], x["version_id"]) for x in record["left_over"] if x["version_id"])
    assert present and listed == present, "the file lists exactly what was left in the bucket"
    uri = record["uri"]
    with pytest.raises(StorageError, match="incomplete: no envelope.dsse.json"):
        verify_bundle(uri, store=s3_store)
    # the remedy the file names: publish again through a live endpoint
    assert storage.publish_bundle(bundle, s3_store) == uri
    assert verify_bundle(uri, store=s3_store)["ok"]


def test_rollback_deletes_in_batches_by_version(make_complete_run, s3_store, monkeypatch):
    """A store that refuses uploads midway but still answers: the rollback is a few DeleteObjects
    calls (commit markers first, then batches), not one DeleteObject per object."""
    from botocore.exceptions import ConnectionClosedError

    monkeypatch.setattr(storage, "DELETE_BATCH", 10)
    bundle = _big_bundle(make_complete_run, 40)
    client = storage.make_client(storage.load_store_config({**s3_store, "botocore_attempts": 1}))
    calls = {"DeleteObjects": 0, "DeleteObject": 0, "PutObject": 0}

    def count(op):
        def hook(request, **kwargs):
            calls[op] += 1
            if op == "PutObject" and calls[op] > 35:
                raise ConnectionClosedError(endpoint_url=request.url)
        return hook

    for op in calls:
        client.meta.events.register(f"before-send.s3.{op}", count(op))
    with pytest.raises(StorageError, match=r"removed the 35 object\(s\) this attempt created$"):
        storage.publish_bundle(bundle, s3_store, client=client)
    assert calls["DeleteObjects"] == 4 and calls["DeleteObject"] == 0  # 35 versions in batches of 10
    plain = storage.make_client(storage.load_store_config(s3_store))
    resp = plain.list_object_versions(Bucket=s3_store["bucket"])
    assert not resp.get("Versions") and not resp.get("DeleteMarkers")
    assert not list(bundle.parent.glob("publish-failed-*.json"))  # nothing left over, no list written


def test_a_store_that_never_answers_is_given_up_at_the_deadline(make_complete_run, s3_store, monkeypatch):
    """Requests that hang (a black hole) with many tries allowed: the deadline, not the tries, ends it."""
    bundle = _big_bundle(make_complete_run, 5)
    hole = Proxy(None, blackhole=True)
    monkeypatch.setattr(storage, "_ensure_bucket", lambda client, cfg: None)  # straight to the uploads
    try:
        store = {**s3_store, "endpoint": hole.endpoint, "attempts": 50, "backoff_s": 0.2, "read_timeout": 1,
                 "connect_timeout": 1, "botocore_attempts": 1, "deadline_s": 6}
        t0 = time.monotonic()
        with pytest.raises(StorageError) as e:
            storage.publish_bundle(bundle, store)
        elapsed = time.monotonic() - t0
    finally:
        hole.kill()
    assert re.search(r": cannot reach S3 endpoint \S+ \(ReadTimeoutError, gave up 3 s after the first failure "
                     r"\(half of deadline_s\)\); removed the 0 object\(s\) this attempt created$", str(e.value)), str(e.value)
    assert elapsed < 6 + 3, f"{elapsed:.1f} s"  # the deadline plus at most one request's timeouts


@pytest.mark.parametrize("value, message", [("soon", "is not a number of seconds"), ("0", "must be more than 0")])
def test_bad_deadline_is_refused(monkeypatch, value, message):
    monkeypatch.setenv("MI300X_CERT_S3_DEADLINE_S", value)
    with pytest.raises(StorageError, match=f"deadline_s \\(MI300X_CERT_S3_DEADLINE_S\\) = '{value}' {message}"):
        storage.load_store_config()
    monkeypatch.setenv("MI300X_CERT_S3_DEADLINE_S", "90")
    assert storage.load_store_config().deadline_s == 90
    assert storage.load_store_config({"deadline_s": 5}).deadline_s == 5

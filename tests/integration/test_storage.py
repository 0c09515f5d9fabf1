"""Publishing and fetching bundles against a real S3 endpoint over HTTP (moto server on loopback)."""

from __future__ import annotations

import datetime as dt
import os
import re
import socket
import subprocess
import sys
import time

import pytest

from mi300x_cert import storage
from mi300x_cert.bundle import build_bundle, verify_bundle
from mi300x_cert.errors import StorageError, VerifyError

pytestmark = pytest.mark.integration


def _client(store: dict, **overrides):
    return storage.make_client(storage.load_store_config({**store, **overrides}))


def _keys(client, bucket: str, prefix: str = "") -> list[str]:
    resp = client.list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for o in resp.get("Contents") or [])


def _versions(client, bucket: str, prefix: str = "") -> list[tuple[str, str]]:
    resp = client.list_object_versions(Bucket=bucket, Prefix=prefix)
    return sorted((v["Key"], v["VersionId"]) for v in (resp.get("Versions") or []) + (resp.get("DeleteMarkers") or []))


def _prefix(uri: str) -> str:
    return storage.parse_s3_uri(uri)[1]


def _bundle_names(bundle) -> list[str]:
    return sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file())


class PutRecorder:
    """botocore event hook on PutObject: records keys and raises on chosen calls."""

    def __init__(self, fail_on=()):
        self.calls: list[str] = []
        self.fail_on = fail_on  # call numbers (1-based) or a callable(n) -> bool

    def __call__(self, request, **kwargs):
        from botocore.exceptions import ConnectionClosedError

        self.calls.append(request.url.split("?")[0])
        n = len(self.calls)
        fail = self.fail_on(n) if callable(self.fail_on) else n in self.fail_on
        if fail:
            raise ConnectionClosedError(endpoint_url=request.url)


def test_publish_then_verify_from_s3(make_complete_run, s3_store):
    rd = make_complete_run()
    bundle = build_bundle(rd.root)
    client = _client(s3_store, botocore_attempts=1)
    rec = PutRecorder()
    client.meta.events.register("before-send.s3.PutObject", rec)
    uri = storage.publish_bundle(bundle, s3_store, client=client)

    day = dt.datetime.fromisoformat(rd.meta["started"]).astimezone(dt.timezone.utc).date().isoformat()
    assert uri == f"s3://{s3_store['bucket']}/certifications/gpu-node-07/{day}/{rd.run_id}"
    prefix = _prefix(uri)
    assert _keys(client, s3_store["bucket"]) == [f"{prefix}/{n}" for n in _bundle_names(bundle)]
    # commit marker order: manifest, then the envelope, last
    assert [c.rsplit("/", 1)[1] for c in rec.calls[-2:]] == ["manifest.json", "envelope.dsse.json"]
    head = client.head_object(Bucket=s3_store["bucket"], Key=f"{prefix}/statement.json", ChecksumMode="ENABLED")
    assert head["ChecksumSHA256"] and head["Metadata"]["sha256"]

    result = verify_bundle(uri, store=s3_store)
    assert result["ok"] and result["artifacts"] == 6 and result["uri"] == uri

    fetched = storage.fetch_bundle(uri, rd.root.parent / "fetched", s3_store)
    assert _bundle_names(fetched) == _bundle_names(bundle)
    for n in _bundle_names(bundle):
        assert (fetched / n).read_bytes() == (bundle / n).read_bytes()


def test_publish_twice_is_idempotent(make_complete_run, s3_store):
    bundle = build_bundle(make_complete_run().root)
    client = _client(s3_store)
    uri = storage.publish_bundle(bundle, s3_store)
    versions = _versions(client, s3_store["bucket"])
    assert len(versions) == len(_bundle_names(bundle))
    assert storage.publish_bundle(bundle, s3_store) == uri
    assert _versions(client, s3_store["bucket"]) == versions


def test_different_bundle_at_same_key_is_refused(make_complete_run, s3_store):
    rd = make_complete_run()
    bundle = build_bundle(rd.root)
    uri = storage.publish_bundle(bundle, s3_store)
    client = _client(s3_store)
    versions = _versions(client, s3_store["bucket"])
    resigned = build_bundle(rd.root)  # same run, new signature: same keys, other envelope bytes
    with pytest.raises(StorageError, match="envelope.dsse.json.*immutable"):
        storage.publish_bundle(resigned, s3_store)
    assert _versions(client, s3_store["bucket"]) == versions
    assert verify_bundle(uri, store=s3_store)["ok"]


def test_transient_put_error_is_retried(make_complete_run, s3_store):
    bundle = build_bundle(make_complete_run().root)
    client = _client(s3_store, botocore_attempts=1)  # so our own whole-object retry does the work
    rec = PutRecorder(fail_on={3})
    client.meta.events.register("before-send.s3.PutObject", rec)
    uri = storage.publish_bundle(bundle, s3_store, client=client)
    assert len(rec.calls) == len(_bundle_names(bundle)) + 1
    assert rec.calls[2] == rec.calls[3]  # the failed object was sent again
    assert verify_bundle(uri, store=s3_store)["ok"]


def test_permanent_failure_midway_leaves_nothing(make_complete_run, s3_store):
    bundle = build_bundle(make_complete_run().root)
    client = _client(s3_store, botocore_attempts=1)
    rec = PutRecorder(fail_on=lambda n: n > 3)
    client.meta.events.register("before-send.s3.PutObject", rec)
    with pytest.raises(StorageError, match=r"failed at .*removed the 3 object"):
        storage.publish_bundle(bundle, s3_store, client=client)
    assert len(rec.calls) == 3 + s3_store["attempts"]
    plain = _client(s3_store)
    assert _keys(plain, s3_store["bucket"]) == []
    assert _versions(plain, s3_store["bucket"]) == []
    with pytest.raises(StorageError, match="no bundle"):
        storage.fetch_bundle(f"s3://{s3_store['bucket']}/certifications/x/y/z", bundle.parent / "f", s3_store)
    # and the next attempt publishes the whole bundle
    uri = storage.publish_bundle(bundle, s3_store)
    assert verify_bundle(uri, store=s3_store)["ok"]


def test_interrupted_publish_leaves_nothing(make_complete_run, s3_store):
    """Ctrl-C / SIGTERM (KeyboardInterrupt in the CLI) in the middle of an upload: the objects sent
    so far are removed and the interruption goes on up."""
    bundle = build_bundle(make_complete_run().root)
    client = _client(s3_store)

    def interrupt(request, **kwargs):
        interrupt.n += 1
        if interrupt.n == 4:
            raise KeyboardInterrupt("SIGTERM")

    interrupt.n = 0
    client.meta.events.register("before-send.s3.PutObject", interrupt)
    with pytest.raises(KeyboardInterrupt):
        storage.publish_bundle(bundle, s3_store, client=client)
    plain = _client(s3_store)
    assert interrupt.n == 4
    assert _keys(plain, s3_store["bucket"]) == [] and _versions(plain, s3_store["bucket"]) == []


class CorruptingClient:
    """A client whose PutObject stores other bytes than it claims (the checksum header stays ours),
    on the chosen call numbers: what a faulty server or disk would do without validating."""

    def __init__(self, client, corrupt_on):
        self._client, self._corrupt_on, self.puts = client, corrupt_on, 0

    def put_object(self, **kwargs):
        self.puts += 1
        if self._corrupt_on(self.puts):
            body = bytearray(kwargs["Body"])
            body[0] ^= 0x01
            kwargs = {**kwargs, "Body": bytes(body)}
        return self._client.put_object(**kwargs)

    def __getattr__(self, name):
        return getattr(self._client, name)


def test_corrupted_upload_is_detected_and_sent_again(make_complete_run, s3_store):
    bundle = build_bundle(make_complete_run().root)
    wrapped = CorruptingClient(_client(s3_store), corrupt_on=lambda n: n == 2)
    uri = storage.publish_bundle(bundle, s3_store, client=wrapped)
    assert wrapped.puts == len(_bundle_names(bundle)) + 1
    plain = _client(s3_store)
    # the corrupt version was deleted: one version per object
    assert len(_versions(plain, s3_store["bucket"])) == len(_bundle_names(bundle))
    assert verify_bundle(uri, store=s3_store)["ok"]


def test_persistent_corruption_fails_and_leaves_nothing(make_complete_run, s3_store):
    bundle = build_bundle(make_complete_run().root)
    wrapped = CorruptingClient(_client(s3_store), corrupt_on=lambda n: n >= 4)
    with pytest.raises(StorageError, match="profile.yaml.*stored bytes"):
        storage.publish_bundle(bundle, s3_store, client=wrapped)
    assert _versions(_client(s3_store), s3_store["bucket"]) == []


def test_unreachable_endpoint_fails_quickly(make_complete_run):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bundle = build_bundle(make_complete_run().root)
    store = {"endpoint": f"http://127.0.0.1:{port}", "bucket": "certs", "access_key": "a", "secret_key": "b",
             "connect_timeout": 1, "backoff_s": 0.01, "botocore_attempts": 2}
    t0 = time.monotonic()
    with pytest.raises(StorageError, match=re.escape(f"cannot reach S3 endpoint http://127.0.0.1:{port}")):
        storage.publish_bundle(bundle, store)
    assert time.monotonic() - t0 < 10
    with pytest.raises(StorageError, match=f"127.0.0.1:{port}"):
        verify_bundle("s3://certs/certifications/h/2026-01-01/r", store=store)


def test_object_lock_retention(make_complete_run, s3_store, s3_server):
    bundle = build_bundle(make_complete_run().root)
    store = {**s3_store, "retention_days": 3, "retention_mode": "COMPLIANCE"}
    uri = storage.publish_bundle(bundle, store)
    client = _client(store)
    lock = client.get_object_lock_configuration(Bucket=store["bucket"])["ObjectLockConfiguration"]
    assert lock["ObjectLockEnabled"] == "Enabled"
    for key in _keys(client, store["bucket"], _prefix(uri)):
        head = client.head_object(Bucket=store["bucket"], Key=key)
        assert head["ObjectLockMode"] == "COMPLIANCE"
        days = (head["ObjectLockRetainUntilDate"] - dt.datetime.now(dt.timezone.utc)).total_seconds() / 86400
        assert 2.9 < days <= 3.0, key

    # retention asked of a bucket without object lock: refused before any upload
    plain = s3_server.store("nolock-" + store["bucket"][5:])
    storage.publish_bundle(bundle, plain)
    with pytest.raises(StorageError, match="object lock"):
        storage.publish_bundle(bundle, {**plain, "retention_days": 1})


def test_incomplete_or_tampered_objects_are_caught(make_complete_run, s3_store):
    bundle = build_bundle(make_complete_run().root)
    uri = storage.publish_bundle(bundle, s3_store)
    client = _client(s3_store)
    bucket, prefix = storage.parse_s3_uri(uri)

    # an artifact replaced in the bucket without a checksum: fetch refuses it
    key = f"{prefix}/artifacts/results/sd-throughput/rows.csv"
    forged = b"case_id,batch_size,latency_s\nc0,1,0.5\n"
    client.put_object(Bucket=bucket, Key=key, Body=forged)
    with pytest.raises(StorageError, match="no SHA-256 checksum"):
        verify_bundle(uri, store=s3_store)
    # ... and with its own correct checksum: the transfer checks out, the signed digest does not
    client.put_object(Bucket=bucket, Key=key, Body=forged, ChecksumAlgorithm="SHA256")
    with pytest.raises(VerifyError, match="rows.csv"):
        verify_bundle(uri, store=s3_store)

    # the commit marker gone: the prefix is an incomplete bundle
    client.delete_object(Bucket=bucket, Key=f"{prefix}/envelope.dsse.json")
    with pytest.raises(StorageError, match="incomplete"):
        storage.fetch_bundle(uri, bundle.parent / "fetched", s3_store)


def test_store_config_from_environment(monkeypatch):
    for var in ("MI300X_CERT_S3_ENDPOINT", "MI300X_CERT_S3_BUCKET", "MI300X_CERT_S3_REGION",
                "MI300X_CERT_S3_RETENTION_DAYS", "MI300X_CERT_S3_RETENTION_MODE", "MI300X_CERT_S3_CREATE_BUCKET"):
        monkeypatch.delenv(var, raising=False)
    cfg = storage.load_store_config(None)
    assert cfg.embedded and cfg.endpoint == storage.EMBEDDED_ENDPOINT and cfg.create_bucket
    monkeypatch.setenv("MI300X_CERT_S3_ENDPOINT", "http://10.0.0.5:9000")
    with pytest.raises(StorageError, match="MI300X_CERT_S3_BUCKET"):
        storage.load_store_config(None)
    monkeypatch.setenv("MI300X_CERT_S3_BUCKET", "fleet-certs")
    monkeypatch.setenv("MI300X_CERT_S3_RETENTION_DAYS", "365")
    monkeypatch.setenv("MI300X_CERT_S3_RETENTION_MODE", "compliance")
    cfg = storage.load_store_config(None)
    assert (cfg.endpoint, cfg.bucket, cfg.region, cfg.retention_days, cfg.retention_mode, cfg.create_bucket) == \
        ("http://10.0.0.5:9000", "fleet-certs", "us-east-1", 365, "COMPLIANCE", False)
    assert storage.load_store_config({"bucket": "other-bucket"}).bucket == "other-bucket"
    monkeypatch.setenv("MI300X_CERT_S3_RETENTION_MODE", "forever")
    with pytest.raises(StorageError, match="retention_mode"):
        storage.load_store_config(None)
    with pytest.raises(StorageError, match="bogus"):
        storage.load_store_config({"bogus": 1})


def test_s3local_command_serves_until_killed():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "mi300x_cert.s3local", "--port", str(port), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        line = proc.stdout.readline().strip()
        assert line == f"http://127.0.0.1:{port}"
        client = _client({"endpoint": line, "bucket": "probe-bucket", "access_key": "a", "secret_key": "b"})
        client.create_bucket(Bucket="probe-bucket")
        assert "probe-bucket" in [b["Name"] for b in client.list_buckets()["Buckets"]]
    finally:
        proc.terminate()
        assert proc.wait(timeout=20) == 0


def test_environment_configured_publish_and_verify(make_complete_run, s3_server, monkeypatch):
    """The CLI path: no store dict, everything from the environment; verify takes the URI's bucket."""
    monkeypatch.setenv("MI300X_CERT_S3_ENDPOINT", s3_server.endpoint)
    monkeypatch.setenv("MI300X_CERT_S3_BUCKET", "env-published")
    monkeypatch.setenv("MI300X_CERT_S3_CREATE_BUCKET", "true")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "local")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "local")
    from mi300x_cert import pipeline

    uri = pipeline.publish(pipeline.sign(make_complete_run().root))
    assert uri.startswith("s3://env-published/certifications/gpu-node-07/")
    monkeypatch.setenv("MI300X_CERT_S3_BUCKET", "some-other-bucket")
    assert pipeline.verify(uri)["ok"]

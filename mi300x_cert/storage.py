"""Certificate bundles in S3 object storage: publish (checksummed, idempotent, all-or-nothing) and fetch.

Configuration: a ``store`` dict, else the environment (a dict value wins over the environment):

==========================  ==============================  ==============================================
dict key                    environment                     meaning
==========================  ==============================  ==============================================
endpoint                    MI300X_CERT_S3_ENDPOINT         S3 endpoint URL (unset + bucket set: AWS)
bucket                      MI300X_CERT_S3_BUCKET           bucket name
region                      MI300X_CERT_S3_REGION           default us-east-1
access_key / secret_key     AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY
retention_days              MI300X_CERT_S3_RETENTION_DAYS   object-lock retention of every object (optional)
retention_mode              MI300X_CERT_S3_RETENTION_MODE   GOVERNANCE (default) or COMPLIANCE
create_bucket               MI300X_CERT_S3_CREATE_BUCKET    create a missing bucket (default: embedded only)
prefix                      MI300X_CERT_S3_PREFIX           first key component, default "certifications"

deadline_s                  MI300X_CERT_S3_DEADLINE_S       once the store stops answering, publish gives up
                                                            within this many seconds, clean-up included (60)
==========================  ==============================  ==============================================

plus tuning keys (dict only): ``connect_timeout`` (s, default 3), ``read_timeout`` (30), ``attempts``
(whole-object tries, 4), ``botocore_attempts`` (botocore's own retries, 3), ``backoff_s`` (0.5).

With neither an endpoint nor a bucket configured the *embedded default* is used: the loopback S3
server of :mod:`mi300x_cert.s3local` at http://127.0.0.1:9000, bucket ``mi300x-cert`` (created on first
use, versioned). Start it with ``python -m mi300x_cert.s3local --port 9000``.

Object keys: ``<prefix>/<host>/<YYYY-MM-DD of the run start, UTC>/<run id>/<path in the bundle>``.
Every object is written with a SHA-256 checksum computed here, then read back (``ChecksumMode=ENABLED``)
and its bytes hashed and compared here (some servers store a claimed checksum without checking it);
a mismatch deletes that version and uploads again. Artifacts go first; ``manifest.json`` and
``envelope.dsse.json`` last: the envelope is the commit marker a reader waits for. Re-publishing the
same bundle skips objects already present with the same digest; a different object at the same key is
an error (certificates are immutable). When publishing fails after retries, the objects this attempt
created are deleted again (``DeleteObjects`` in batches of up to 1,000, by version; the commit markers
first), so no partial bundle is left behind.

Bounded failure: once a request fails, the publish keeps retrying for at most half of ``deadline_s``
(and ``attempts`` tries per object); the clean-up must then finish within ``deadline_s`` of that first
failure. A healthy publish is never cut short, however many objects it has. What could not be removed
in time is listed in a JSON file (``publish-failed-<time>.json`` beside the bundle directory, else in
``<state dir>/publish-failed``) and the error, one short line, says where. Left-overs never verify:
the envelope (the commit marker) is uploaded last and deleted first.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as _dt
import hashlib
import json
import mimetypes
import os
import re
import shutil
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import StorageError

__all__ = [
    "StoreConfig",
    "load_store_config",
    "make_client",
    "bundle_prefix",
    "publish_bundle",
    "fetch_bundle",
    "parse_s3_uri",
    "embedded_store",
    "EMBEDDED_ENDPOINT",
    "EMBEDDED_BUCKET",
]

EMBEDDED_ENDPOINT = "http://127.0.0.1:9000"
EMBEDDED_BUCKET = "mi300x-cert"
COMMIT_ORDER_LAST = ("manifest.json", "envelope.dsse.json")
_TRANSIENT_CODES = {
    "InternalError", "ServiceUnavailable", "SlowDown", "Throttling", "ThrottlingException",
    "RequestTimeout", "RequestTimeoutException", "500", "502", "503", "504",
}
_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}
_ENV = {
    "endpoint": "MI300X_CERT_S3_ENDPOINT",
    "bucket": "MI300X_CERT_S3_BUCKET",
    "region": "MI300X_CERT_S3_REGION",
    "access_key": "AWS_ACCESS_KEY_ID",
    "secret_key": "AWS_SECRET_ACCESS_KEY",
    "retention_days": "MI300X_CERT_S3_RETENTION_DAYS",
    "retention_mode": "MI300X_CERT_S3_RETENTION_MODE",
    "create_bucket": "MI300X_CERT_S3_CREATE_BUCKET",
    "prefix": "MI300X_CERT_S3_PREFIX",
    "deadline_s": "MI300X_CERT_S3_DEADLINE_S",
}
DELETE_BATCH = 1000  # S3 DeleteObjects limit


@dataclass
class StoreConfig:
    endpoint: str | None
    bucket: str
    region: str = "us-east-1"
    access_key: str | None = None
    secret_key: str | None = None
    retention_days: int | None = None
    retention_mode: str = "GOVERNANCE"
    create_bucket: bool = False
    embedded: bool = False
    prefix: str = "certifications"
    connect_timeout: float = 3.0
    read_timeout: float = 30.0
    attempts: int = 4
    botocore_attempts: int = 3
    backoff_s: float = 0.5
    deadline_s: float = 60.0

    @property
    def where(self) -> str:
        return self.endpoint or f"AWS S3 ({self.region})"


def _bool(v: Any, name: str) -> bool:
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off", ""):
        return False
    raise StorageError(f"store setting {name}={v!r} is not a boolean")


def load_store_config(store: dict | None = None) -> StoreConfig:
    """The store configuration from ``store`` (dict) and the environment. Bad values → StorageError."""
    store = dict(store or {})
    known = {f.name for f in fields(StoreConfig)} - {"embedded"}
    unknown = sorted(set(store) - known)
    if unknown:
        raise StorageError(f"unknown store setting(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})")

    def get(name: str) -> Any:
        if store.get(name) is not None:
            return store[name]
        env = _ENV.get(name)
        v = os.environ.get(env) if env else None
        return v if v not in (None, "") else None

    endpoint, bucket = get("endpoint"), get("bucket")
    embedded = endpoint is None and bucket is None
    if embedded:
        endpoint, bucket = EMBEDDED_ENDPOINT, EMBEDDED_BUCKET
    if not bucket:
        raise StorageError(f"no bucket configured for endpoint {endpoint}: set {_ENV['bucket']} or store['bucket']")
    if not re.fullmatch(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]", str(bucket)):
        raise StorageError(f"bucket name {bucket!r} is not a valid S3 bucket name")
    cfg = StoreConfig(endpoint=endpoint, bucket=str(bucket), embedded=embedded,
                      region=str(get("region") or "us-east-1"))
    cfg.access_key = get("access_key") or ("local" if embedded else None)
    cfg.secret_key = get("secret_key") or ("local" if embedded else None)
    cd = get("create_bucket")
    cfg.create_bucket = embedded if cd is None else _bool(cd, "create_bucket")
    rd = get("retention_days")
    if rd is not None:
        try:
            cfg.retention_days = int(rd)
        except (TypeError, ValueError):
            raise StorageError(f"retention_days ({_ENV['retention_days']}) = {rd!r} is not a whole number of days") from None
        if cfg.retention_days <= 0:
            cfg.retention_days = None
    mode = str(get("retention_mode") or "GOVERNANCE").upper()
    if mode not in ("GOVERNANCE", "COMPLIANCE"):
        raise StorageError(f"retention_mode ({_ENV['retention_mode']}) = {mode!r}: expected GOVERNANCE or COMPLIANCE")
    cfg.retention_mode = mode
    cfg.prefix = str(get("prefix") or "certifications").strip("/")
    for name, typ in (("connect_timeout", float), ("read_timeout", float), ("backoff_s", float),
                      ("attempts", int), ("botocore_attempts", int)):
        if store.get(name) is not None:
            try:
                setattr(cfg, name, typ(store[name]))
            except (TypeError, ValueError):
                raise StorageError(f"store setting {name}={store[name]!r} is not a number") from None
    dl = get("deadline_s")
    if dl is not None:
        try:
            cfg.deadline_s = float(dl)
        except (TypeError, ValueError):
            raise StorageError(f"deadline_s ({_ENV['deadline_s']}) = {dl!r} is not a number of seconds") from None
        if not cfg.deadline_s > 0:
            raise StorageError(f"deadline_s ({_ENV['deadline_s']}) = {dl!r} must be more than 0 seconds")
    cfg.attempts = max(1, cfg.attempts)
    cfg.botocore_attempts = max(1, cfg.botocore_attempts)
    return cfg


def make_client(cfg: StoreConfig) -> Any:
    """A boto3 S3 client for ``cfg`` (short connect timeout, botocore's standard retries)."""
    import boto3
    from botocore.config import Config

    conf = Config(
        connect_timeout=cfg.connect_timeout,
        read_timeout=cfg.read_timeout,
        retries={"total_max_attempts": cfg.botocore_attempts, "mode": "standard"},
        s3={"addressing_style": "path"} if cfg.endpoint else None,
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    session = boto3.session.Session()
    return session.client("s3", endpoint_url=cfg.endpoint, region_name=cfg.region,
                          aws_access_key_id=cfg.access_key, aws_secret_access_key=cfg.secret_key, config=conf)


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """(bucket, prefix without trailing slash) of ``s3://bucket/prefix``."""
    m = re.fullmatch(r"s3://([^/]+)/?(.*)", str(uri))
    if not m:
        raise StorageError(f"{uri!r} is not an s3://bucket/prefix URI")
    return m.group(1), m.group(2).strip("/")


def _safe(component: Any, what: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]", "_", str(component or ""))
    if not s.strip("._"):
        raise StorageError(f"the bundle's {what} {component!r} cannot name an S3 key")
    return s


def bundle_prefix(bundle_dir: str | Path, root: str = "certifications") -> str:
    """``<root>/<host>/<YYYY-MM-DD>/<run-id>`` of a bundle, from its signed statement."""
    p = Path(bundle_dir) / "statement.json"
    try:
        cert = json.loads(p.read_text(encoding="utf-8"))["predicate"]["certification"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise StorageError(f"{p} does not name the run's host, start and id: {e}") from e
    started = cert.get("started")
    try:
        t = _dt.datetime.fromisoformat(str(started))
        if t.tzinfo is not None:
            t = t.astimezone(_dt.timezone.utc)
        day = t.date().isoformat()
    except ValueError:
        raise StorageError(f"{p}: run start {started!r} is not an ISO timestamp") from None
    return "/".join([root.strip("/"), _safe(cert.get("host"), "host"), day, _safe(cert.get("run_id"), "run id")]).strip("/")


# ---------------------------------------------------------------------------------------------
# errors and retries
# ---------------------------------------------------------------------------------------------

def _code(e: Exception) -> str:
    resp = getattr(e, "response", None) or {}
    return str((resp.get("Error") or {}).get("Code") or (resp.get("ResponseMetadata") or {}).get("HTTPStatusCode") or "")


def _status(e: Exception) -> int:
    resp = getattr(e, "response", None) or {}
    try:
        return int((resp.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0)
    except (TypeError, ValueError):
        return 0


def _is_connection_error(e: Exception) -> bool:
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import HTTPClientError

    return isinstance(e, (BotoConnectionError, HTTPClientError))


def _is_transient(e: Exception) -> bool:
    from botocore.exceptions import ClientError, FlexibleChecksumError

    if _is_connection_error(e) or isinstance(e, FlexibleChecksumError):
        return True
    if isinstance(e, ClientError):
        return _code(e) in _TRANSIENT_CODES or _status(e) >= 500
    return isinstance(e, (_ChecksumMismatch, _Conflict))


class _ChecksumMismatch(Exception):
    pass


class _Conflict(Exception):
    pass


def _b64(hexdigest: str) -> str:
    return base64.b64encode(bytes.fromhex(hexdigest)).decode("ascii")


def _sleep(cfg: StoreConfig, attempt: int, budget: "_Budget | None" = None) -> None:
    pause = min(cfg.backoff_s * (2 ** attempt), 10.0)
    if budget is not None:
        pause = max(0.0, min(pause, budget.retry_left()))
    time.sleep(pause)


class _Budget:
    """How long a publish keeps going once the store stops answering: retries until half of
    ``deadline_s`` after the first failure since the last success, clean-up until all of it."""

    def __init__(self, deadline_s: float):
        self.deadline_s = float(deadline_s)
        self.failing_since: float | None = None

    def ok(self) -> None:
        self.failing_since = None

    def failed(self) -> None:
        if self.failing_since is None:
            self.failing_since = time.monotonic()

    def retry_left(self) -> float:
        if self.failing_since is None:
            return float("inf")
        return self.failing_since + self.deadline_s / 2 - time.monotonic()

    def cleanup_until(self) -> float:
        return (self.failing_since if self.failing_since is not None else time.monotonic()) + self.deadline_s


def _short(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _retry(cfg: StoreConfig, what: str, fn: Callable[[], Any], budget: _Budget | None = None) -> Any:
    last: Exception | None = None
    tries = 0
    for attempt in range(cfg.attempts):
        tries += 1
        try:
            result = fn()
        except StorageError:
            raise
        except Exception as e:  # noqa: BLE001 - classified below
            if not _is_transient(e):
                raise StorageError(f"{what} on {cfg.where}: {_short(e)}") from e
            last = e
            if budget is not None:
                budget.failed()
                if budget.retry_left() <= 0:
                    break
            if attempt + 1 < cfg.attempts:
                _sleep(cfg, attempt, budget)
            continue
        if budget is not None:
            budget.ok()
        return result
    gave_up = (f", gave up {cfg.deadline_s / 2:g} s after the first failure (half of deadline_s)"
               if budget is not None and budget.retry_left() <= 0 and tries < cfg.attempts else "")
    if last is not None and _is_connection_error(last):
        err = StorageError(f"cannot reach S3 endpoint {cfg.where} ({what}, {tries} attempts{gave_up}): {_short(last)}")
    else:
        err = StorageError(f"{what} on {cfg.where} failed after {tries} attempts{gave_up}: {_short(last) if last else ''}")
    err.gave_up = gave_up  # type: ignore[attr-defined]
    raise err from last


# ---------------------------------------------------------------------------------------------
# bucket
# ---------------------------------------------------------------------------------------------

def _ensure_bucket(client: Any, cfg: StoreConfig) -> None:
    from botocore.exceptions import ClientError

    try:
        client.head_bucket(Bucket=cfg.bucket)
    except ClientError as e:
        if _code(e) not in ("404", "NoSuchBucket", "NotFound"):
            raise StorageError(f"bucket {cfg.bucket} on {cfg.where}: {e}") from e
        if not cfg.create_bucket:
            raise StorageError(f"bucket {cfg.bucket} does not exist on {cfg.where} (create it, or set create_bucket)") from e
        kwargs: dict[str, Any] = {"Bucket": cfg.bucket}
        if cfg.region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": cfg.region}
        if cfg.retention_days:
            kwargs["ObjectLockEnabledForBucket"] = True
        try:
            client.create_bucket(**kwargs)
            client.put_bucket_versioning(Bucket=cfg.bucket, VersioningConfiguration={"Status": "Enabled"})
        except ClientError as e2:
            if _code(e2) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise StorageError(f"bucket {cfg.bucket} cannot be created on {cfg.where}: {e2}") from e2
    except Exception as e:
        if _is_connection_error(e):
            hint = " (start it: python -m mi300x_cert.s3local --port 9000, or set MI300X_CERT_S3_ENDPOINT)" if cfg.embedded else ""
            raise StorageError(f"cannot reach S3 endpoint {cfg.where}: {e}{hint}") from e
        raise StorageError(f"bucket {cfg.bucket} on {cfg.where}: {e}") from e
    if cfg.retention_days:
        try:
            lock = client.get_object_lock_configuration(Bucket=cfg.bucket).get("ObjectLockConfiguration") or {}
        except ClientError as e:
            raise StorageError(f"retention is configured but bucket {cfg.bucket} has no object lock: {e}") from e
        if lock.get("ObjectLockEnabled") != "Enabled":
            raise StorageError(f"retention is configured but bucket {cfg.bucket} has no object lock enabled")


# ---------------------------------------------------------------------------------------------
# publish
# ---------------------------------------------------------------------------------------------

def _bundle_files(bundle: Path) -> list[str]:
    names = sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file())
    first = [n for n in names if n not in COMMIT_ORDER_LAST]
    return first + [n for n in COMMIT_ORDER_LAST if n in names]


def _content_type(name: str) -> str:
    if name == "SHA256SUMS":
        return "text/plain"
    if name.endswith(".pem"):
        return "application/x-pem-file"
    return mimetypes.guess_type(name)[0] or "application/octet-stream"


def _head(client: Any, bucket: str, key: str) -> dict | None:
    from botocore.exceptions import ClientError

    try:
        return client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    except ClientError as e:
        if _code(e) in _NOT_FOUND:
            return None
        raise


def _remote_sha256(client: Any, bucket: str, key: str, head: dict) -> str:
    """base64 SHA-256 of a stored object: its checksum, its metadata, else its bytes."""
    if head.get("ChecksumSHA256"):
        return head["ChecksumSHA256"].split("-")[0]
    meta = (head.get("Metadata") or {}).get("sha256")
    if meta:
        return _b64(meta)
    body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    return base64.b64encode(hashlib.sha256(body).digest()).decode("ascii")


def _put_one(client: Any, cfg: StoreConfig, key: str, data: bytes, sha_hex: str, content_type: str,
             created: list[tuple[str, str | None]], budget: _Budget | None = None,
             uncertain: list[str] | None = None) -> str:
    """Put one object (skip when identical is present). Returns "uploaded" or "skipped". A put
    whose answer never came is named in ``uncertain`` (it may have been stored)."""
    from botocore.exceptions import ClientError, FlexibleChecksumError

    want = _b64(sha_hex)
    maybe_landed = False  # a put whose answer was lost may still have stored the object

    def attempt() -> str:
        nonlocal maybe_landed
        head = _head(client, cfg.bucket, key)
        if head is not None:
            have = _remote_sha256(client, cfg.bucket, key, head)
            if have != want:
                raise StorageError(f"s3://{cfg.bucket}/{key} already exists with different content "
                                   f"(sha256 {base64.b64decode(have).hex()}, ours {sha_hex}): certificates are immutable")
            if maybe_landed:  # our own earlier put landed though its answer was lost: ours to roll back
                created.append((key, head.get("VersionId")))
                if uncertain is not None and key in uncertain:
                    uncertain.remove(key)
                return "uploaded"
            return "skipped"
        kwargs: dict[str, Any] = {
            "Bucket": cfg.bucket, "Key": key, "Body": data, "ContentType": content_type,
            "ChecksumAlgorithm": "SHA256", "ChecksumSHA256": want, "Metadata": {"sha256": sha_hex},
            "IfNoneMatch": "*",
        }
        if cfg.retention_days:
            kwargs["ObjectLockMode"] = cfg.retention_mode
            kwargs["ObjectLockRetainUntilDate"] = (_dt.datetime.now(_dt.timezone.utc)
                                                   + _dt.timedelta(days=cfg.retention_days))
        try:
            resp = client.put_object(**kwargs)
        except ClientError as e:
            if _code(e) in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                # someone wrote the key meanwhile: the next attempt compares with it
                raise _Conflict(f"s3://{cfg.bucket}/{key} was written concurrently") from e
            raise
        except Exception:
            maybe_landed = True
            if uncertain is not None and key not in uncertain:
                uncertain.append(key)
            raise
        if uncertain is not None and key in uncertain:
            uncertain.remove(key)
        version = resp.get("VersionId")
        created.append((key, version))
        # read it back and hash the bytes here: a server may store a claimed checksum unchecked
        problem = None
        try:
            back = client.get_object(Bucket=cfg.bucket, Key=key, ChecksumMode="ENABLED",
                                     **({"VersionId": version} if version else {}))
            body = back["Body"].read()
            if hashlib.sha256(body).hexdigest() != sha_hex:
                problem = "stored bytes differ from ours"
            elif back.get("ChecksumSHA256") and back["ChecksumSHA256"] != want:
                problem = "stored SHA-256 checksum differs from ours"
        except FlexibleChecksumError as e:
            problem = f"stored bytes do not match the stored checksum: {e}"
        if problem:
            _delete(client, cfg, key, version)
            created.remove((key, version))
            raise _ChecksumMismatch(f"s3://{cfg.bucket}/{key}: {problem}")
        return "uploaded"

    return _retry(cfg, f"upload of s3://{cfg.bucket}/{key}", attempt, budget)


def _delete(client: Any, cfg: StoreConfig, key: str, version: str | None) -> None:
    kwargs: dict[str, Any] = {"Bucket": cfg.bucket, "Key": key}
    if version:
        kwargs["VersionId"] = version
        if cfg.retention_days and cfg.retention_mode == "GOVERNANCE":
            kwargs["BypassGovernanceRetention"] = True
    client.delete_object(**kwargs)


def _delete_batch(client: Any, cfg: StoreConfig, batch: list[tuple[str, str | None]], *, versions: bool = True
                  ) -> list[tuple[str, str | None, str]]:
    """One DeleteObjects request. Returns the entries the store refused, with its reason."""
    objects = [{"Key": k, **({"VersionId": v} if (v and versions) else {})} for k, v in batch]
    kwargs: dict[str, Any] = {"Bucket": cfg.bucket, "Delete": {"Objects": objects, "Quiet": True}}
    if versions and cfg.retention_days and cfg.retention_mode == "GOVERNANCE":
        kwargs["BypassGovernanceRetention"] = True
    resp = client.delete_objects(**kwargs)
    refused = {(e.get("Key"), e.get("VersionId") or None): f"{e.get('Code')}: {e.get('Message')}"
               for e in resp.get("Errors") or []}
    out = []
    for k, v in batch:
        why = refused.get((k, v if versions else None)) or refused.get((k, None))
        if why:
            out.append((k, v, why))
    return out


def _rollback(client: Any, cfg: StoreConfig, created: list[tuple[str, str | None]], until: float
              ) -> list[dict]:
    """Delete what this attempt created — the commit markers first, then the rest in batches of
    ``DELETE_BATCH`` — by ``until`` (a ``time.monotonic()`` deadline). Returns what is left over:
    ``[{"key", "version_id", "state"}]``."""
    left: list[dict] = []
    markers = [c for c in reversed(created) if c[0].rsplit("/", 1)[-1] in COMMIT_ORDER_LAST]
    rest = [c for c in reversed(created) if c not in markers]
    batches = ([markers] if markers else []) + [rest[i:i + DELETE_BATCH] for i in range(0, len(rest), DELETE_BATCH)]
    unreachable: str | None = None
    for batch in batches:
        pending = list(batch)
        why = unreachable or "not deleted: deadline reached"
        attempt = 0
        while pending and unreachable is None and time.monotonic() < until and attempt < cfg.attempts:
            try:
                refused = _delete_batch(client, cfg, pending)
            except Exception as e:  # noqa: BLE001 - the store failing is what we are cleaning up after
                why = f"not deleted: {_short(e, 200)}"
                attempt += 1
                if attempt >= cfg.attempts and _is_connection_error(e):
                    unreachable = f"not deleted: the store cannot be reached ({_short(e, 200)})"
                    why = unreachable
                    break
                time.sleep(max(0.0, min(cfg.backoff_s * (2 ** (attempt - 1)), 10.0, until - time.monotonic())))
                continue
            pending = [(k, v) for k, v, _ in refused]
            if pending and time.monotonic() < until:
                # a locked version (COMPLIANCE retention) cannot go; a delete marker still hides it
                try:
                    still = {(k, v) for k, v, _ in _delete_batch(client, cfg, pending, versions=False)}
                except Exception as e:  # noqa: BLE001
                    still = set(pending)
                    why = f"not deleted: {_short(e, 200)}"
                for k, v, reason in refused:
                    state = (f"not deleted ({reason})" if (k, v) in still
                             else f"hidden by a delete marker (version locked: {reason})")
                    left.append({"key": k, "version_id": v, "state": state})
                pending = []
            break
        for k, v in pending:
            left.append({"key": k, "version_id": v, "state": why})
    return left


def _landed_after_all(client: Any, cfg: StoreConfig, keys: list[str], until: float) -> dict:
    """Puts whose answer never came: one HEAD each (while time is left) tells whether they landed.
    ``{"ours": [(key, version)], "unknown": [key]}`` — a key that was absent before our put and is
    present now is ours to delete."""
    out: dict[str, list] = {"ours": [], "unknown": []}
    for key in keys:
        if time.monotonic() >= until:
            out["unknown"].append(key)
            continue
        try:
            head = _head(client, cfg.bucket, key)
        except Exception:  # noqa: BLE001 - the store is what failed
            out["unknown"].append(key)
            continue
        if head is not None:
            out["ours"].append((key, head.get("VersionId")))
    return out


def _leftover_note(left: list[dict]) -> str:
    if any(x["key"].endswith("/envelope.dsse.json") for x in left):
        return ("envelope.dsse.json is among them: it is uploaded after every other object, so the bundle at this "
                "URI was complete when it was stored; check it with mi300x-cert verify")
    return ("no envelope.dsse.json among them (it is uploaded last and deleted first): these objects never verify "
            "as a certificate; publishing the bundle again completes it, or delete them")


def _reason(e: BaseException, cfg: StoreConfig) -> str:
    """The failure in a few words (the full text goes to the left-over file)."""
    cause = e.__cause__ if isinstance(e, StorageError) else e
    if isinstance(cause, Exception) and _is_connection_error(cause):
        return f"cannot reach S3 endpoint {cfg.where} ({type(cause).__name__}{getattr(e, 'gave_up', '')})"
    return _short(e, 600)  # our own messages; botocore texts inside them are already cut to 300


def _leftover_file(bundle: Path, record: dict) -> Path | None:
    """Write the full list of left-over objects beside the bundle (else under the state dir)."""
    import json as _json

    from .rundir import atomic_write_text

    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    name = f"publish-failed-{stamp}.json"
    text = _json.dumps(record, indent=2, sort_keys=True) + "\n"
    candidates = [bundle.resolve().parent / name]
    try:
        from .alerts import state_dir

        candidates.append(state_dir() / "publish-failed" / f"{_safe(record.get('run_id') or 'bundle', 'run id')}-{name}")
    except Exception:  # noqa: BLE001 - the state dir is a fallback only
        pass
    for path in candidates:
        try:
            atomic_write_text(path, text)
            return path
        except OSError:
            continue
    return None


def publish_bundle(bundle_dir: str | Path, store: dict | None = None, *, client: Any = None) -> str:
    """Upload a bundle; returns ``s3://bucket/<prefix>/<host>/<date>/<run-id>``.

    The bundle is verified locally first (a broken bundle is never published). ``client``: a boto3
    S3 client to use instead of one made from the configuration.
    """
    from .bundle import verify_bundle
    from .errors import BundleError

    bundle = Path(bundle_dir)
    try:
        verify_bundle(bundle, trust=False)  # integrity; trust is the control plane's to decide
    except BundleError as e:
        raise StorageError(f"bundle {bundle} does not verify, not publishing it: {e}") from e
    cfg = load_store_config(store)
    prefix = bundle_prefix(bundle, cfg.prefix)
    uri = f"s3://{cfg.bucket}/{prefix}"
    client = client or make_client(cfg)
    _ensure_bucket(client, cfg)
    created: list[tuple[str, str | None]] = []
    uncertain: list[str] = []
    budget = _Budget(cfg.deadline_s)
    current = None
    names = _bundle_files(bundle)
    try:
        for name in names:
            current = name
            data = (bundle / name).read_bytes()
            _put_one(client, cfg, f"{prefix}/{name}", data, hashlib.sha256(data).hexdigest(),
                     _content_type(name), created, budget, uncertain)
    except BaseException as e:  # a failure, an interruption (SIGINT/SIGTERM) or a bug: no partial bundle stays
        budget.failed()
        until = budget.cleanup_until()
        maybe = _landed_after_all(client, cfg, [k for k in uncertain if not any(k == c[0] for c in created)], until)
        created.extend(maybe["ours"])
        left = _rollback(client, cfg, created, until)
        left += [{"key": k, "version_id": None, "state": "possibly stored: the store never answered its upload"}
                 for k in maybe["unknown"]]
        removed = len(created) - sum(1 for x in left if x["key"] not in maybe["unknown"])
        where = None
        if left:
            where = _leftover_file(bundle, {
                "uri": uri, "endpoint": cfg.where, "bucket": cfg.bucket, "failed_at": current,
                "error": _short(e, 2000), "created": len(created), "removed": removed, "left_over": left,
                "run_id": prefix.rsplit("/", 1)[-1],
                "note": (_leftover_note(left)),
            })
        if not isinstance(e, (StorageError, OSError)):
            raise
        tail = ""
        if left:
            tail = (f"; {len(left)} object(s) left over, listed in {where}" if where
                    else f"; {len(left)} object(s) left over (no list could be written beside the bundle or in the "
                         f"state dir; the first: {', '.join(x['key'] for x in left[:3])})")
        count = f"the {len(created)}" if removed == len(created) else f"{removed} of the {len(created)}"
        raise StorageError(f"publishing {uri} failed at {current}: {_reason(e, cfg)}; removed {count} "
                           f"object(s) this attempt created{tail}") from e
    return uri


# ---------------------------------------------------------------------------------------------
# fetch
# ---------------------------------------------------------------------------------------------

def fetch_bundle(uri: str, dest: str | Path, store: dict | None = None, *, client: Any = None) -> Path:
    """Download the bundle at ``uri`` into ``dest`` (new or empty), checking every object's SHA-256.

    A prefix without ``envelope.dsse.json`` (the commit marker) is refused as incomplete."""
    bucket, prefix = parse_s3_uri(uri)
    if not prefix:
        raise StorageError(f"{uri}: a bundle URI needs a prefix (s3://bucket/certifications/...)")
    cfg = load_store_config({**(store or {}), "bucket": bucket})  # endpoint and credentials; the bucket is the URI's
    client = client or make_client(cfg)
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise StorageError(f"{dest} exists and is not empty")

    def listing() -> list[dict]:
        out: list[dict] = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
            out.extend(page.get("Contents") or [])
        return out

    objects = _retry(cfg, f"listing of {uri}", listing)
    names = [o["Key"][len(prefix) + 1:] for o in objects]
    if not names:
        raise StorageError(f"no bundle at {uri}")
    if "envelope.dsse.json" not in names:
        raise StorageError(f"{uri} is incomplete: no envelope.dsse.json (the commit marker)")
    created_dest = not dest.exists()
    dest.mkdir(parents=True, exist_ok=True)
    try:
        _download_all(client, cfg, bucket, uri, objects, names, dest)
    except BaseException:
        if created_dest:
            shutil.rmtree(dest, ignore_errors=True)
        raise
    return dest


def _download_all(client: Any, cfg: StoreConfig, bucket: str, uri: str, objects: list[dict], names: list[str],
                  dest: Path) -> None:
    for key, name in zip((o["Key"] for o in objects), names):
        parts = Path(name).parts
        if not name or name.startswith("/") or ".." in parts:
            raise StorageError(f"{uri}: object {key!r} has an unsafe name")

        def get(key: str = key) -> bytes:
            resp = client.get_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
            body = resp["Body"].read()
            want = resp.get("ChecksumSHA256") or (_b64(resp["Metadata"]["sha256"]) if (resp.get("Metadata") or {}).get("sha256") else None)
            if not want:
                raise StorageError(f"s3://{bucket}/{key} has no SHA-256 checksum")
            if base64.b64encode(hashlib.sha256(body).digest()).decode("ascii") != want.split("-")[0]:
                raise _ChecksumMismatch(f"s3://{bucket}/{key}: downloaded bytes do not match its SHA-256 checksum")
            return body

        data = _retry(cfg, f"download of s3://{bucket}/{key}", get)
        out = dest / name
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(data)


@contextlib.contextmanager
def embedded_store(bucket: str = EMBEDDED_BUCKET, port: int = 0, **extra: Any) -> Iterator[dict]:
    """Start the embedded loopback S3 server for the duration of a ``with`` block; yields a store dict."""
    from . import s3local

    srv = s3local.start(port=port)
    try:
        yield srv.store(bucket, **extra)
    finally:
        srv.stop()

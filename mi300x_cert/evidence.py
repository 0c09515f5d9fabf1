"""Evidence of a registered certification, read back from S3 and checked before anyone sees it.

The registry records, for every concluded run, where its bundle was published (``bundle_uri``) and the
sha256 of its DSSE envelope (``bundle_digest``), taken when the bundle was verified against the key
enrolled for the host. :class:`Evidence` serves any file of that bundle — the report, its figures,
the Great Expectations Data Docs, the manifest, the signed statement — only after a chain of digests
back to that registered value checks out::

    registry bundle_digest ──sha256──► envelope.dsse.json ──payload──► statement.json (signed)
        statement.predicate.bundle.files["manifest.json"].sha256 ──► manifest.json
        manifest.artifacts[name].sha256 / size ──► artifacts/<name>

A file whose bytes do not match is an :class:`EvidenceError` (never served); so is a bundle with no
registered digest. The signature itself was checked once, at registration; the pinned envelope digest
keeps it checked. The console plugin (``plugins/mi300x_cert_plugin.py``) is the caller; the same
function serves a script::

    ev = Evidence.for_certification(reg.get_certification(host, run_id))
    html = ev.read("artifacts/report/index.html")
"""

from __future__ import annotations

import base64
import hashlib
import json
import mimetypes
import threading
from pathlib import PurePosixPath
from typing import Any

from .bundle import BUNDLE_FILES
from .errors import CertError, EvidenceError, StorageError
from .validation.gx_runner import DATA_DOCS_REL

__all__ = ["Evidence", "EvidenceError", "content_type", "REPORT", "DATA_DOCS", "BUNDLE_TOP"]

REPORT = "artifacts/report/index.html"
DATA_DOCS = f"artifacts/{DATA_DOCS_REL}"
BUNDLE_TOP = BUNDLE_FILES


def content_type(name: str) -> str:
    low = name.lower()
    for ext, ct in ((".json", "application/json"), (".pem", "text/plain; charset=utf-8"),
                    (".csv", "text/csv; charset=utf-8"), (".jsonl", "text/plain; charset=utf-8"),
                    (".yaml", "text/plain; charset=utf-8"), (".log", "text/plain; charset=utf-8"),
                    (".woff2", "font/woff2"), (".woff", "font/woff"), (".svg", "image/svg+xml"),
                    (".js", "text/javascript; charset=utf-8"), (".css", "text/css; charset=utf-8"),
                    (".html", "text/html; charset=utf-8")):
        if low.endswith(ext):
            return ct
    if low.endswith("sha256sums"):
        return "text/plain; charset=utf-8"
    return mimetypes.guess_type(name)[0] or "application/octet-stream"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Evidence:
    """The verified view of one published bundle (``bundle_uri`` + registered ``bundle_digest``)."""

    _cache: dict[tuple[str, str], "Evidence"] = {}
    _lock = threading.Lock()

    def __init__(self, bundle_uri: str, bundle_digest: str, *, store: dict | None = None, client: Any = None):
        if not bundle_uri or not str(bundle_uri).startswith("s3://"):
            raise EvidenceError(f"bundle {bundle_uri!r}: only bundles published to S3 are served (s3://…)")
        if not bundle_digest or len(str(bundle_digest)) != 64:
            raise EvidenceError(f"bundle {bundle_uri}: the registry holds no envelope digest for it; nothing can be "
                                "checked, so nothing is served")
        from .storage import load_store_config, make_client, parse_s3_uri

        self.uri = str(bundle_uri).rstrip("/")
        self.digest = str(bundle_digest).lower()
        self.bucket, self.prefix = parse_s3_uri(self.uri)
        self._cfg = load_store_config({**(store or {}), "bucket": self.bucket})
        self._client = client or make_client(self._cfg)
        self._statement: dict | None = None
        self._top: dict[str, bytes] = {}
        self._entries: dict[str, dict] = {}

    # ---- construction ----
    @classmethod
    def for_certification(cls, cert: dict | None, *, store: dict | None = None) -> "Evidence":
        """The evidence of a registry certification row (cached per bundle and digest)."""
        if not cert:
            raise EvidenceError("no such certification in the registry")
        uri, digest = cert.get("bundle_uri"), cert.get("bundle_digest")
        if not uri:
            raise EvidenceError(f"run {cert.get('run_id')} of {cert.get('host')} published no bundle: "
                                f"{'; '.join(cert.get('reasons') or []) or 'no evidence'}")
        key = (str(uri), str(digest))
        with cls._lock:
            ev = cls._cache.get(key)
        if ev is None:
            ev = cls(str(uri), str(digest or ""), store=store)
            ev._load()
            with cls._lock:
                if len(cls._cache) > 256:
                    cls._cache.clear()
                cls._cache[key] = ev
        return ev

    # ---- S3 ----
    def _get(self, name: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        key = f"{self.prefix}/{name}"
        try:
            return self._client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code in ("NoSuchKey", "404", "NotFound"):
                raise EvidenceError(f"{name} is missing from the published bundle {self.uri}") from None
            raise StorageError(f"s3://{self.bucket}/{key}: {code or e}") from None
        except BotoCoreError as e:
            raise StorageError(f"s3://{self.bucket}/{key} cannot be read: {e}") from None

    # ---- the chain ----
    def _load(self) -> None:
        env_bytes = self._get("envelope.dsse.json")
        got = _sha(env_bytes)
        if got != self.digest:
            raise EvidenceError(f"{self.uri}/envelope.dsse.json has sha256 {got}, the registry recorded {self.digest}: "
                                "the published bundle changed after it was registered", status=409)
        try:
            env = json.loads(env_bytes)
            statement_bytes = base64.b64decode(env["payload"], validate=True)
            statement = json.loads(statement_bytes)
            files = statement["predicate"]["bundle"]["files"]
        except (ValueError, KeyError, TypeError) as e:
            raise EvidenceError(f"{self.uri}: the registered envelope holds no readable statement ({e})") from None
        man_bytes = self._get("manifest.json")
        want = (files.get("manifest.json") or {}).get("sha256")
        if not want or _sha(man_bytes) != want:
            raise EvidenceError(f"{self.uri}/manifest.json does not match the digest in the signed statement", status=409)
        try:
            manifest = json.loads(man_bytes)
            entries = {e["name"]: e for e in manifest["artifacts"]}
        except (ValueError, KeyError, TypeError) as e:
            raise EvidenceError(f"{self.uri}/manifest.json is not a bundle manifest ({e})") from None
        subjects = {s.get("name"): (s.get("digest") or {}).get("sha256") for s in statement.get("subject") or []}
        if subjects != {n: e.get("sha256") for n, e in entries.items()}:
            raise EvidenceError(f"{self.uri}/manifest.json disagrees with the subjects of the signed statement", status=409)
        self._statement = statement
        self._statement_files = files
        self._top = {"envelope.dsse.json": env_bytes, "statement.json": statement_bytes, "manifest.json": man_bytes}
        self._entries = entries

    @property
    def statement(self) -> dict:
        if self._statement is None:
            self._load()
        return self._statement  # type: ignore[return-value]

    def names(self) -> list[str]:
        """Every servable path: the bundle's top-level files and ``artifacts/<name>``."""
        if self._statement is None:
            self._load()
        return list(BUNDLE_TOP) + [f"artifacts/{n}" for n in sorted(self._entries)]

    def has(self, path: str) -> bool:
        if self._statement is None:
            self._load()
        return path in BUNDLE_TOP or (path.startswith("artifacts/") and path[len("artifacts/"):] in self._entries)

    @staticmethod
    def normalise(path: str) -> str:
        """A bundle path without ``.``/``..`` segments (a path climbing out of the bundle is refused)."""
        parts: list[str] = []
        for p in PurePosixPath(str(path)).parts:
            if p in ("", ".", "/"):
                continue
            if p == "..":
                if not parts:
                    raise EvidenceError(f"{path!r} leaves the bundle")
                parts.pop()
            else:
                parts.append(p)
        return "/".join(parts)

    def read(self, path: str) -> bytes:
        """The bytes of one bundle file, after its digest checked out (EvidenceError otherwise)."""
        if self._statement is None:
            self._load()
        path = self.normalise(path)
        if path in self._top:
            return self._top[path]
        if path in ("SHA256SUMS",):
            data = self._get(path)
            want = (self._statement_files.get(path) or {}).get("sha256")
            if not want or _sha(data) != want:
                raise EvidenceError(f"{self.uri}/{path} does not match the digest in the signed statement", status=409)
            return data
        if path in ("key-info.json", "signer.pub.pem"):
            data = self._get(path)
            signer = (self.statement.get("predicate", {}).get("bundle") or {}).get("signer") or {}
            if path == "key-info.json":
                from .bundle.manifest import canonical_json

                if data != canonical_json(signer):
                    raise EvidenceError(f"{self.uri}/key-info.json differs from the signer block of the signed statement", status=409)
            else:
                from .bundle.keys import public_key_from_pem

                try:
                    key, _ = public_key_from_pem(data, "signer.pub.pem")
                except CertError as e:
                    raise EvidenceError(f"{self.uri}/signer.pub.pem: {e}") from None
                if key.keyid != signer.get("keyid"):
                    raise EvidenceError(f"{self.uri}/signer.pub.pem is not the key named in the signed statement", status=409)
            return data
        if not path.startswith("artifacts/"):
            raise EvidenceError(f"{path!r} is not a file of the bundle {self.uri}")
        name = path[len("artifacts/"):]
        entry = self._entries.get(name)
        if entry is None:
            raise EvidenceError(f"{path!r} is not listed in the manifest of {self.uri}")
        data = self._get(path)
        if _sha(data) != entry.get("sha256") or len(data) != entry.get("size"):
            raise EvidenceError(f"{self.uri}/{path} does not match its signed digest (sha256 {_sha(data)}, "
                                f"{len(data)} bytes): not served", status=409)
        return data

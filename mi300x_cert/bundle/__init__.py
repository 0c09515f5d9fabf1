"""Signed, tamper-evident certificate bundles: build and verify.

A bundle is ``<run_dir>/bundle/``, self-contained (it uploads and verifies alone)::

    artifacts/<name>        a byte copy of every file of the run directory (bundle/ excluded)
    manifest.json           every artifact: name, path in the bundle, sha256, size (sorted by name)
    SHA256SUMS              the same digests in ``sha256sum -c`` form
    statement.json          the in-toto Statement v1 (subjects = artifacts; test-result predicate)
    envelope.dsse.json      DSSE envelope of statement.json, ECDSA P-256 signature
    signer.pub.pem          the public key that signed
    key-info.json           {keyid, scheme, development_key}

The signed statement carries the sha256 of ``manifest.json`` and ``SHA256SUMS`` and the signer block
that ``key-info.json`` repeats; every JSON file is written in one canonical form that verification
re-creates, so a change to any byte of any file of the bundle fails :func:`verify_bundle`.
See docs/certificates.md for checking a bundle with OpenSSL and coreutils alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

from ..errors import BundleError, RunDirError, VerifyError
from .manifest import (
    ARTIFACTS_DIR,
    MANIFEST_SCHEMA,
    canonical_json,
    list_artifacts,
    manifest_dict,
    parse_sha256sums,
    sha256_bytes,
    sha256_file,
    sha256sums_text,
)

__all__ = ["build_bundle", "verify_bundle", "check_location", "resolve_trust", "BUNDLE_FILES", "BUNDLE_DIR"]

BUNDLE_DIR = "bundle"
BUNDLE_FILES = ("manifest.json", "SHA256SUMS", "statement.json", "envelope.dsse.json", "signer.pub.pem", "key-info.json")


# ---------------------------------------------------------------------------------------------
# build
# ---------------------------------------------------------------------------------------------

def _copy_hashed(src: Path, dst: Path) -> tuple[str, int]:
    """Copy ``src`` to ``dst`` and return (sha256, size) of the bytes written."""
    h = hashlib.sha256()
    size = 0
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        while True:
            chunk = fi.read(1 << 20)
            if not chunk:
                break
            h.update(chunk)
            fo.write(chunk)
            size += len(chunk)
        fo.flush()
        os.fsync(fo.fileno())
    return h.hexdigest(), size


def _optional_json(path: Path, name: str, notes: list[str]) -> Any | None:
    if not path.is_file():
        notes.append(f"{name} is missing")
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        notes.append(f"{name} could not be read: {e}")
        return None


def _versions(inventory: dict | None) -> dict:
    from importlib import metadata

    out: dict[str, Any] = {"python": platform.python_version()}
    for dist in ("mi300x-cert", "securesystemslib", "cryptography"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    if isinstance(inventory, dict):
        inv_versions = inventory.get("versions")
        if isinstance(inv_versions, dict):
            out["inventory"] = inv_versions
        for k, v in inventory.items():
            if isinstance(k, str) and ("driver" in k or k.endswith("_version")) and not isinstance(v, (dict, list)):
                out.setdefault("inventory_fields", {})[k] = v
    return out


LOAD_FLEET = object()  # default of ``fleet`` arguments: read the fleet file (a caller holding it passes it)


def fleet_required(host: str | None, conditions: Any = None, experiments: list[str] | None = None,
                   fleet: Any = LOAD_FLEET) -> tuple[list[str], str] | None:
    """The suites the fleet profile of ``host`` requires of a run (see
    :func:`mi300x_cert.fleet.required_suites`), limited to ``experiments`` (an operator's choice for
    the run) or else to the experiments the run was planned with (``conditions.json``
    ``enabled_experiments``); None where the fleet names no profile for the host. ``fleet``: the
    fleet already loaded (or None: there is none), else it is read here."""
    from ..fleet import fleet_or_none, planned_experiments, required_suites

    if not host:
        return None
    return required_suites(fleet_or_none() if fleet is LOAD_FLEET else fleet, host,
                           experiments if experiments is not None else planned_experiments(conditions))


def build_bundle(run_dir: str | Path, key: str | Path | None = None) -> Path:
    """Build ``<run_dir>/bundle/`` from a complete run directory and sign it. Returns its path.

    ``key``: a PEM private key (ECDSA P-256, PKCS#8); default ``$MI300X_CERT_SIGNING_KEY``, else the
    local development key. The bundle is assembled in a temporary sibling directory and renamed into
    place when whole; an existing bundle is replaced. Raises RunDirError for a run that is not
    complete (nothing is written), BundleError for a key or artifact problem.
    """
    from ..rundir import RunDir
    from .keys import load_signer
    from .signing import build_statement, sign_payload

    rd = RunDir(run_dir)
    rd.require_complete()
    meta = rd.meta
    root = rd.root
    signer = load_signer(key)  # key problems surface before anything is written

    tmp = root / f".bundle.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        names = list_artifacts(root)
        entries = []
        for name in names:
            digest, size = _copy_hashed(root / name, tmp / ARTIFACTS_DIR / name)
            entries.append({"name": name, "sha256": digest, "size": size})

        manifest_bytes = canonical_json(manifest_dict(meta, entries))
        sums_bytes = sha256sums_text(entries).encode("utf-8")

        notes: list[str] = []
        arts = tmp / ARTIFACTS_DIR
        inventory = _optional_json(arts / "inventory.json", "inventory.json", notes)
        conditions = _optional_json(arts / "conditions.json", "conditions.json", notes)
        verdicts = _optional_json(arts / "validation" / "verdicts.json", "validation/verdicts.json", notes)
        util_path = arts / "stats" / "utilization.json"
        utilization = _optional_json(util_path, "stats/utilization.json", notes) if util_path.is_file() else None
        by_name = {e["name"]: e for e in entries}
        profile_digest = by_name.get("profile.yaml", {}).get("sha256")
        if profile_digest is None:
            notes.append("profile.yaml is missing")
        if signer.development_key:
            notes.append("signed with a local development key: not a production certificate")

        signer_block = {"keyid": signer.keyid, "scheme": signer.scheme, "development_key": signer.development_key}
        statement = build_statement(
            subjects=entries, meta=meta, inventory=inventory if isinstance(inventory, dict) else None,
            conditions=conditions, verdicts=verdicts, profile_digest=profile_digest,
            bundle_digests={"manifest.json": sha256_bytes(manifest_bytes), "SHA256SUMS": sha256_bytes(sums_bytes)},
            signer_block=signer_block, versions=_versions(inventory if isinstance(inventory, dict) else None),
            notes=notes, utilization=utilization if isinstance(utilization, list) else None,
            required=fleet_required(meta.get("host"), conditions))
        statement_bytes = canonical_json(statement)
        envelope = sign_payload(statement_bytes, signer.signer)

        (tmp / "manifest.json").write_bytes(manifest_bytes)
        (tmp / "SHA256SUMS").write_bytes(sums_bytes)
        (tmp / "statement.json").write_bytes(statement_bytes)
        (tmp / "signer.pub.pem").write_bytes(signer.public_pem)
        (tmp / "key-info.json").write_bytes(canonical_json(signer_block))
        # the envelope last: a bundle directory without it is never taken for a signed one
        (tmp / "envelope.dsse.json").write_bytes(canonical_json(envelope))

        final = root / BUNDLE_DIR
        old = None
        if final.exists():
            old = root / f".bundle.old-{uuid.uuid4().hex[:12]}"
            os.rename(final, old)
        os.rename(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return final
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, (BundleError, RunDirError)) or not isinstance(e, Exception):
            raise
        raise BundleError(f"bundle of {root} could not be built: {e}") from e


# ---------------------------------------------------------------------------------------------
# verify
# ---------------------------------------------------------------------------------------------

def _read(bundle: Path, name: str) -> bytes:
    try:
        return (bundle / name).read_bytes()
    except FileNotFoundError:
        raise VerifyError(f"{name} is missing from bundle {bundle}") from None
    except OSError as e:
        raise VerifyError(f"{name} in bundle {bundle} cannot be read: {e}") from e


def _json(data: bytes, name: str) -> Any:
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise VerifyError(f"{name} is not valid JSON: {e}") from e
    if canonical_json(obj) != data:
        raise VerifyError(f"{name} is not in the canonical form it was written in (modified?)")
    return obj


def _bundle_files(bundle: Path) -> tuple[set[str], set[str]]:
    """(top-level entries, artifact names under artifacts/); non-regular files are refused."""
    top: set[str] = set()
    arts: set[str] = set()
    for entry in bundle.iterdir():
        top.add(entry.name)
    art_root = bundle / ARTIFACTS_DIR
    if art_root.is_dir() and not art_root.is_symlink():
        for dirpath, dirnames, filenames in os.walk(art_root):
            for n in dirnames + filenames:
                p = Path(dirpath) / n
                if p.is_symlink() or not (p.is_dir() or p.is_file()):
                    raise VerifyError(f"{p.relative_to(bundle).as_posix()} is not a regular file")
            for n in filenames:
                arts.add((Path(dirpath) / n).relative_to(art_root).as_posix())
    return top, arts


def _verify_dir(bundle: Path, key: str | Path | None) -> dict:
    from .keys import load_public_key, public_key_from_pem, public_pem
    from .signing import CERTIFICATION_TYPE, PREDICATE_TYPE, STATEMENT_TYPE, envelope_from_bytes, verify_envelope

    if not bundle.is_dir():
        raise VerifyError(f"bundle {bundle} is not a directory")
    top, art_names = _bundle_files(bundle)
    expected_top = set(BUNDLE_FILES) | {ARTIFACTS_DIR}
    for name in sorted(expected_top - top):
        raise VerifyError(f"{name} is missing from bundle {bundle}")
    for name in sorted(top - expected_top):
        raise VerifyError(f"{name} is not part of a bundle (extra file in {bundle})")
    for name in BUNDLE_FILES:
        p = bundle / name
        if p.is_symlink() or not p.is_file():
            raise VerifyError(f"{name} is not a regular file")

    # signature
    env_bytes = _read(bundle, "envelope.dsse.json")
    envelope = envelope_from_bytes(env_bytes)
    _json(env_bytes, "envelope.dsse.json")
    pub_bytes = _read(bundle, "signer.pub.pem")
    try:
        bundle_key, bundle_pub = public_key_from_pem(pub_bytes, "signer.pub.pem")
    except BundleError as e:
        raise VerifyError(str(e)) from e
    if public_pem(bundle_pub) != pub_bytes:
        raise VerifyError("signer.pub.pem is not in the canonical PEM form it was written in (modified?)")
    verify_key = load_public_key(key) if key else bundle_key
    keyid = verify_envelope(envelope, verify_key)

    # statement = the signed payload, byte for byte
    statement_bytes = _read(bundle, "statement.json")
    if envelope.payload != statement_bytes:
        raise VerifyError("statement.json differs from the statement signed in envelope.dsse.json")
    statement = _json(statement_bytes, "statement.json")
    if statement.get("_type") != STATEMENT_TYPE or statement.get("predicateType") != PREDICATE_TYPE:
        raise VerifyError(f"statement.json is not an in-toto {STATEMENT_TYPE} with predicate {PREDICATE_TYPE}")
    predicate = statement.get("predicate") or {}
    bundle_block = predicate.get("bundle") or {}
    signer_block = bundle_block.get("signer") or {}
    if signer_block.get("keyid") != keyid or bundle_key.keyid != keyid:
        raise VerifyError("signer.pub.pem is not the key named in the signed statement")
    if _read(bundle, "key-info.json") != canonical_json(signer_block):
        raise VerifyError("key-info.json differs from the signer block of the signed statement")

    # manifest and SHA256SUMS are covered by digests inside the statement
    files = bundle_block.get("files") or {}
    for name in ("manifest.json", "SHA256SUMS"):
        want = (files.get(name) or {}).get("sha256")
        if not want or sha256_bytes(_read(bundle, name)) != want:
            raise VerifyError(f"{name} does not match the digest in the signed statement")
    manifest = _json(_read(bundle, "manifest.json"), "manifest.json")
    if manifest.get("schema") != MANIFEST_SCHEMA or not isinstance(manifest.get("artifacts"), list):
        raise VerifyError(f"manifest.json is not a {MANIFEST_SCHEMA} manifest")
    entries = manifest["artifacts"]
    names = [e.get("name") for e in entries]
    if names != sorted(set(names)):
        raise VerifyError("manifest.json artifact names are not sorted and unique")
    for e in entries:
        if e.get("path") != f"{ARTIFACTS_DIR}/{e.get('name')}":
            raise VerifyError(f"manifest.json: artifact {e.get('name')} has path {e.get('path')!r}")
    subjects = [(s.get("name"), (s.get("digest") or {}).get("sha256")) for s in statement.get("subject") or []]
    if subjects != [(e["name"], e.get("sha256")) for e in entries]:
        raise VerifyError("manifest.json disagrees with the subjects of the signed statement")
    try:
        sums = parse_sha256sums(_read(bundle, "SHA256SUMS").decode("utf-8"))
    except (BundleError, UnicodeDecodeError) as e:
        raise VerifyError(f"SHA256SUMS: {e}") from e
    if sums != [(e["sha256"], e["path"]) for e in entries]:
        raise VerifyError("SHA256SUMS disagrees with manifest.json")

    # the artifacts themselves
    listed = set(names)
    for extra in sorted(art_names - listed):
        raise VerifyError(f"{ARTIFACTS_DIR}/{extra} is not listed in manifest.json (extra artifact)")
    for missing in sorted(listed - art_names):
        raise VerifyError(f"{ARTIFACTS_DIR}/{missing} is listed in manifest.json but missing")
    for e in entries:
        digest, size = sha256_file(bundle / e["path"])
        if digest != e["sha256"] or size != e.get("size"):
            raise VerifyError(f"{e['path']} does not match its signed digest (sha256 {digest}, {size} bytes)")

    cert = predicate.get("certification") or {}
    run_meta = json.loads((bundle / ARTIFACTS_DIR / "run.json").read_bytes()) if "run.json" in listed else {}
    verdicts_doc = (json.loads((bundle / ARTIFACTS_DIR / "validation/verdicts.json").read_bytes())
                    if "validation/verdicts.json" in listed else None)
    try:  # only the planned experiments are read from it; the statement notes an unreadable one
        conditions_doc = (json.loads((bundle / ARTIFACTS_DIR / "conditions.json").read_bytes())
                          if "conditions.json" in listed else None)
    except ValueError:
        conditions_doc = None
    return {
        "_evidence": {"state": run_meta.get("state") if isinstance(run_meta, dict) else None,
                      "error": run_meta.get("error") if isinstance(run_meta, dict) else None,
                      "verdicts": verdicts_doc, "conditions": conditions_doc},
        "ok": True,
        "keyid": keyid,
        "artifacts": len(entries),
        "development_key": bool(signer_block.get("development_key")),
        "trusted": None,
        "result": predicate.get("result"),
        "failed_tests": list(predicate.get("failedTests") or []),
        "certified": bool(cert.get("certified")) if cert.get("_type") == CERTIFICATION_TYPE else None,
        "run_id": cert.get("run_id"),
        "host": cert.get("host"),
        "started": cert.get("started"),
        "state": cert.get("state"),
        "bundle": str(bundle),
    }


def check_location(bundle: Path, uri: str) -> str:
    """A bundle is valid only at the S3 location its signed statement names
    (``…/<host>/<YYYY-MM-DD of the start>/<run id>``): a valid bundle copied under another run's or
    host's prefix is a replay. Returns the expected ``host/date/run`` suffix; raises VerifyError."""
    from ..errors import StorageError
    from ..storage import bundle_prefix, parse_s3_uri

    try:
        want = bundle_prefix(bundle, root="")
        _, prefix = parse_s3_uri(uri)
    except StorageError as e:
        raise VerifyError(str(e)) from e
    got = "/".join(prefix.strip("/").split("/")[-3:])
    if got != want:
        raise VerifyError(f"{uri} holds the signed bundle of {want.replace('/', ' · ')} (host · date · run id): "
                          f"a bundle is only valid at the location its statement names (…/{want}); refused as a replay")
    return want


def resolve_trust(result: dict, key: str | Path | None = None) -> dict:
    """Whether the bundle's signer speaks for the host its statement names. Sets ``trusted``,
    ``trust_source`` (key | configured | registry) and ``trust_reason`` in ``result`` and returns it.

    Trusted: a key given explicitly (``--key``: the signature was checked with it), a key configured
    by the operator (``$MI300X_CERT_VERIFY_KEY`` / ``$MI300X_CERT_SIGNING_KEY``), or a key the control
    plane enrolled for that host (``mi300x-cert keys enroll``) and did not revoke."""
    from ..errors import CertError
    from .keys import trusted_keyids

    keyid, host = result.get("keyid"), result.get("host")
    result.update(trusted=False, trust_source=None, trust_reason=None)
    if key:
        result.update(trusted=True, trust_source="key")
        return result
    try:
        if keyid in trusted_keyids():
            result.update(trusted=True, trust_source="configured")
            return result
    except CertError as e:
        result["trust_reason"] = f"configured keys cannot be read: {e}"
        return result
    try:
        from ..registry import open_registry

        reg = open_registry()
        if host and reg.trusted_key(host, keyid):
            result.update(trusted=True, trust_source="registry")
            return result
        known = reg.get_key(keyid)
    except CertError as e:
        result["trust_reason"] = f"the registry cannot be read: {e}"
        return result
    short = str(keyid)[:16]
    if not host:
        result["trust_reason"] = "the statement names no host"
    elif not known:
        result["trust_reason"] = f"key {short}… is not enrolled for host {host} (mi300x-cert keys enroll)"
    elif known.get("revoked_at"):
        result["trust_reason"] = f"key {short}… was revoked on {known.get('revoked_at')}"
    else:
        result["trust_reason"] = f"key {short}… is enrolled for host {known.get('host')}, not {host}"
    return result


def verify_bundle(target: str | Path, key: str | Path | None = None, store: dict | None = None, *,
                  trust: bool = True, keep: str | Path | None = None, fleet: Any = LOAD_FLEET) -> dict:
    """Check a bundle directory or ``s3://bucket/prefix``: the DSSE signature (with ``key``, a public
    PEM, else the bundle's own ``signer.pub.pem``), the statement, manifest, SHA256SUMS and every
    artifact's digest; for ``s3://`` also that the bundle lies at the location its statement names
    (:func:`check_location`: a copy under another run's or host's prefix is a replay). Raises
    VerifyError naming the first thing that does not check out.

    Returns {"ok", "keyid", "artifacts", "development_key", "trusted", "trust_source", "trust_reason",
    "result", "failed_tests", "certified", "host", "run_id", ...}; a bundle that verifies may still
    certify a FAILED result, and may come from a signer nobody trusts (``trusted`` False, with the
    reason): :func:`mi300x_cert.outcome.decide` weighs both. ``trust=False`` checks integrity only
    (no registry is consulted: what a GPU host does before publishing). ``keep``: for ``s3://``, a new
    directory to keep the downloaded bundle in (its path is returned as ``local``). ``fleet``: the
    fleet file already loaded by the caller (or None: none), for the suites its profile requires;
    read here by default.
    """
    t = str(target)
    if t.startswith("s3://"):
        from ..storage import fetch_bundle

        with tempfile.TemporaryDirectory(prefix="mi300x-cert-verify-") as tmpd:
            dest = Path(keep) if keep else Path(tmpd) / BUNDLE_DIR
            local = fetch_bundle(t, dest, store)
            out = _verify_checked(Path(local), key)
            check_location(Path(local), t)
            out.update(bundle=t, uri=t, local=str(local) if keep else None)
    else:
        out = _verify_checked(Path(target), key)
    if trust:
        resolve_trust(out, key)
    from ..outcome import decide

    evidence = out.pop("_evidence", {})
    required = fleet_required(out.get("host"), evidence.get("conditions"), fleet=fleet)
    out["required"] = {"suites": required[0], "by": required[1]} if required else None
    out["decision"] = decide(state=evidence.get("state"), error=evidence.get("error"), verdicts=evidence.get("verdicts"),
                             required=required[0] if required else None, required_by=required[1] if required else None,
                             signed=True, trusted=out.get("trusted") if trust else None,
                             trust_reason=out.get("trust_reason")).as_dict()
    if out["decision"]["certified"] and out.get("certified") is not True:
        out["decision"].update(certified=False, result="NOT CERTIFIED",
                               reasons=["the signed statement itself does not claim certification"])
    return out


def _verify_checked(bundle: Path, key: str | Path | None) -> dict:
    try:
        return _verify_dir(bundle, key)
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        # structurally odd content (e.g. a subject that is not an object): never a crash, never a pass
        raise VerifyError(f"bundle {bundle} is malformed: {type(e).__name__}: {e}") from e

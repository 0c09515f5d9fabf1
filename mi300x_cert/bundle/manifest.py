"""Artifacts of a run directory: listing, digests, ``manifest.json`` and ``SHA256SUMS``.

Every regular file of the run directory except ``bundle/`` (and the bundle's temporary siblings) is an
artifact. Names are POSIX paths relative to the run directory; inside the bundle the copy of artifact
``NAME`` lives at ``artifacts/NAME``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

from ..errors import BundleError

__all__ = [
    "ARTIFACTS_DIR",
    "MANIFEST_SCHEMA",
    "sha256_file",
    "sha256_bytes",
    "list_artifacts",
    "manifest_dict",
    "sha256sums_text",
    "parse_sha256sums",
    "canonical_json",
    "is_bundle_workdir",
]

ARTIFACTS_DIR = "artifacts"
MANIFEST_SCHEMA = "https://mi300x-cert.dev/bundle-manifest/v1"
_CHUNK = 1 << 20


def canonical_json(obj: Any) -> bytes:
    """The one serialization of every JSON file in a bundle (verify re-serializes and compares bytes)."""
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> tuple[str, int]:
    """(hex sha256, size in bytes) of a file, read in chunks."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_CHUNK)
            if not chunk:
                break
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def is_bundle_workdir(name: str) -> bool:
    """``bundle`` itself and the temporary siblings build_bundle uses."""
    return name == "bundle" or name.startswith(".bundle.")


def _check_name(name: str, origin: Path) -> None:
    # SHA256SUMS escapes these; keep names plain so every tool reads the same list
    if any(c in name for c in ("\n", "\r", "\\")) or name.startswith("/"):
        raise BundleError(f"artifact {origin} has a name that cannot be listed in SHA256SUMS: {name!r}")


def list_artifacts(run_root: Path) -> list[str]:
    """Sorted POSIX names of every artifact file under ``run_root`` (``bundle/`` excluded).

    A symbolic link or other non-regular file is refused (it could point outside the run)."""
    run_root = Path(run_root)
    names: list[str] = []
    for dirpath, dirnames, filenames in os.walk(run_root):
        rel_dir = Path(dirpath).relative_to(run_root)
        if rel_dir == Path("."):
            dirnames[:] = [d for d in dirnames if not is_bundle_workdir(d)]
        for d in dirnames:
            if (Path(dirpath) / d).is_symlink():
                raise BundleError(f"{Path(dirpath) / d} is a symbolic link; a run directory holds only regular files")
        for fn in filenames:
            p = Path(dirpath) / fn
            if p.is_symlink() or not p.is_file():
                raise BundleError(f"{p} is not a regular file; a run directory holds only regular files")
            name = (rel_dir / fn).as_posix()
            _check_name(name, p)
            names.append(name)
    names.sort()
    return names


def manifest_dict(meta: dict, entries: Iterable[dict]) -> dict:
    """``entries``: {name, sha256, size} sorted by name."""
    arts = [{"name": e["name"], "path": f"{ARTIFACTS_DIR}/{e['name']}", "sha256": e["sha256"], "size": e["size"]}
            for e in entries]
    return {
        "schema": MANIFEST_SCHEMA,
        "run_id": meta.get("run_id"),
        "host": meta.get("host"),
        "artifacts_dir": ARTIFACTS_DIR,
        "artifact_count": len(arts),
        "total_bytes": sum(a["size"] for a in arts),
        "artifacts": arts,
    }


def sha256sums_text(entries: Iterable[dict]) -> str:
    """``sha256sum -c`` input (text mode, two spaces), paths relative to the bundle directory."""
    return "".join(f"{e['sha256']}  {ARTIFACTS_DIR}/{e['name']}\n" for e in entries)


def parse_sha256sums(text: str, origin: str = "SHA256SUMS") -> list[tuple[str, str]]:
    """[(sha256, path)] in file order; a malformed line raises BundleError naming ``origin``."""
    out: list[tuple[str, str]] = []
    for i, line in enumerate(text.split("\n")[:-1] if text.endswith("\n") else text.split("\n"), 1):
        digest, sep, path = line.partition("  ")
        if not sep or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest) or not path:
            raise BundleError(f"{origin} line {i} is not '<sha256>  <path>': {line[:80]!r}")
        out.append((digest, path))
    return out

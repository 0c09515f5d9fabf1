"""What was measured: host, OS, CPU, cards (serial, bus id, interconnect domain), driver/ROCm/CUDA and
library versions, and the project's git revision. Written to ``inventory.json`` of every run and
printed by ``mi300x-cert inventory``.

Library versions come from package metadata (``importlib.metadata``) and torch's GPU runtime from its
``version.py`` file, so collecting an inventory never imports torch, diffusers, transformers, Great
Expectations, Airflow or boto3.
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import os
import platform
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from .errors import CertError

__all__ = ["collect_inventory", "library_versions", "git_revision", "LIBRARIES"]

LIBRARIES = {
    # key in the inventory → distribution name
    "torch": "torch",
    "diffusers": "diffusers",
    "transformers": "transformers",
    "great_expectations": "great-expectations",
    "airflow": "apache-airflow",
    "boto3": "boto3",
    "numpy": "numpy",
    "pandas": "pandas",
    "pydantic": "pydantic",
    "psutil": "psutil",
    "amdsmi": "amdsmi",
    "nvidia-ml-py": "nvidia-ml-py",
    "securesystemslib": "securesystemslib",
    "mi300x-cert": "mi300x-cert",
}


def library_versions() -> dict[str, str | None]:
    """Installed version of each library in :data:`LIBRARIES` (None when not installed); no imports."""
    out: dict[str, str | None] = {}
    for key, dist in LIBRARIES.items():
        try:
            out[key] = md.version(dist)
        except md.PackageNotFoundError:
            out[key] = None
    return out


def torch_runtime() -> dict[str, str | None]:
    """torch's CUDA / HIP build versions read from ``torch/version.py`` without importing torch."""
    out: dict[str, str | None] = {"cuda": None, "hip": None, "git_version": None}
    try:
        spec = importlib.util.find_spec("torch")
    except (ImportError, ValueError):
        return out
    if spec is None or not spec.submodule_search_locations:
        return out
    path = Path(list(spec.submodule_search_locations)[0]) / "version.py"
    try:
        text = path.read_text()
    except OSError:
        return out
    for key in out:
        m = re.search(rf"^{key}\s*(?::\s*[^=]+)?=\s*(['\"])(.*?)\1", text, re.M)
        out[key] = m.group(2) if m else None
    return out


def git_revision(root: Path | None = None) -> dict[str, Any]:
    """``{"sha", "dirty"}`` of the project checkout; ``MI300X_CERT_GIT_SHA`` when there is no checkout."""
    from .config import REPO_ROOT

    root = Path(root or REPO_ROOT)
    env_sha = os.environ.get("MI300X_CERT_GIT_SHA")
    try:
        r = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if r.returncode != 0:
            return {"sha": env_sha, "dirty": None}
        sha = r.stdout.strip()
        st = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                            capture_output=True, text=True, timeout=20)
        dirty = bool(st.stdout.strip()) if st.returncode == 0 else None
        return {"sha": sha, "dirty": dirty}
    except (OSError, subprocess.TimeoutExpired):
        return {"sha": env_sha, "dirty": None}


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def _os_info() -> dict[str, Any]:
    pretty = None
    text = _read("/etc/os-release")
    if text:
        m = re.search(r'^PRETTY_NAME="?([^"\n]*)"?', text, re.M)
        pretty = m.group(1) if m else None
    return {"system": platform.system(), "release": platform.release(), "distribution": pretty,
            "platform": platform.platform()}


def _cpu_info() -> dict[str, Any]:
    model = None
    text = _read("/proc/cpuinfo")
    if text:
        m = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
        model = m.group(1).strip() if m else None
    model = model or platform.processor() or None
    physical = mem = None
    try:
        import psutil

        physical = psutil.cpu_count(logical=False)
        mem = psutil.virtual_memory().total
    except Exception:
        pass
    return {"model": model, "logical_cores": os.cpu_count(), "physical_cores": physical,
            "memory_bytes": mem, "machine": platform.machine()}


def _driver_files() -> dict[str, Any]:
    """Driver versions readable from the file system even when no telemetry library is present."""
    out: dict[str, Any] = {"amdgpu_driver_version": None, "nvidia_driver_version": None}
    amd = _read("/sys/module/amdgpu/version")
    if amd and amd.strip():
        out["amdgpu_driver_version"] = amd.strip()
    nv = _read("/proc/driver/nvidia/version")
    if nv:
        m = re.search(r"Kernel Module(?: for [^\s]+)?\s+([0-9][0-9.]+)", nv)
        out["nvidia_driver_version"] = m.group(1) if m else nv.splitlines()[0].strip()
    return out


def _domains_of(cards: list[dict]) -> list[list[int]] | None:
    groups: dict[int, list[int]] = {}
    for c in cards:
        if c.get("domain") is not None:
            groups.setdefault(int(c["domain"]), []).append(int(c["index"]))
    return [groups[k] for k in sorted(groups)] or None


def collect_inventory(profile: Any, strict: bool = True, clock: Any = None, module: Any = None) -> dict[str, Any]:
    """The inventory of this host for ``profile`` (a :class:`config.Profile`).

    Cards come from the profile's telemetry backend (all cards of the host). When that backend cannot
    start, ``strict`` re-raises its TelemetryError; otherwise the error is recorded under
    ``telemetry_error`` and ``cards`` is empty. ``clock``/``module`` are passed to the backend (tests).
    """
    from .telemetry import open_backend
    from .telemetry.amdsmi_backend import rocm_version
    from .rundir import utcnow

    cards: list[dict] = []
    backend_versions: dict[str, Any] = {"backend": profile.telemetry.backend}
    error = None
    try:
        with open_backend(profile.telemetry, cards=None, host_cards=profile.host.card_ids,
                          domains=profile.host.xgmi_domains, clock=clock, module=module) as backend:
            cards = backend.devices()
            backend_versions = backend.versions()
    except CertError as e:
        if strict:
            raise
        error = str(e)

    files = _driver_files()
    driver = backend_versions.get("driver_version") or files["amdgpu_driver_version"] or files["nvidia_driver_version"]
    expected = profile.host.card_ids
    runtime = torch_runtime()
    return {
        "collected_at": utcnow(),
        "profile": profile.name,
        "sku": profile.sku,
        "host": {"name": socket.gethostname(), "profile_host": profile.host.name, "fqdn": socket.getfqdn()},
        "os": _os_info(),
        "cpu": _cpu_info(),
        "python": {"version": platform.python_version(), "implementation": platform.python_implementation(),
                   "virtualenv": sys.prefix != sys.base_prefix},
        "telemetry_backend": profile.telemetry.backend,
        "telemetry": backend_versions,
        "telemetry_error": error,
        "cards": cards,
        "card_count": len(cards),
        "expected_cards": expected,
        "interconnect_domains": _domains_of(cards) or profile.host.xgmi_domains,
        "versions": {
            "driver": driver,
            "amdgpu_driver": files["amdgpu_driver_version"],
            "nvidia_driver": files["nvidia_driver_version"],
            "rocm": backend_versions.get("rocm_version") or rocm_version(),
            "cuda_driver": backend_versions.get("cuda_driver_version"),
            "torch_cuda": runtime["cuda"],
            "torch_hip": runtime["hip"],
        },
        "torch_runtime": runtime,
        "libraries": library_versions(),
        "git": git_revision(),
    }

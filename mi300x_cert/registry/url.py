"""Where the registry lives. No SQLAlchemy import here.

1. ``$MI300X_CERT_REGISTRY_URL`` (any SQLAlchemy URL: ``postgresql+psycopg2://…``, ``sqlite:///…``);
2. else the Airflow connection ``$MI300X_CERT_REGISTRY_CONN_ID`` (default ``mi300x_cert_registry``),
   only when Airflow is importable and the connection exists: its ``get_uri()``, with
   ``postgres://`` / ``postgresql://`` normalised to ``postgresql+psycopg2://``;
3. else the embedded SQLite database ``sqlite:///<state dir>/registry.db``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = ["URL_ENV", "CONN_ID_ENV", "DEFAULT_CONN_ID", "registry_url", "normalise_url", "mask_url",
           "is_sqlite", "sqlite_path"]

URL_ENV = "MI300X_CERT_REGISTRY_URL"
CONN_ID_ENV = "MI300X_CERT_REGISTRY_CONN_ID"
DEFAULT_CONN_ID = "mi300x_cert_registry"


def normalise_url(url: str) -> str:
    """``postgres://`` (Airflow's and Heroku's spelling) and bare ``postgresql://`` → psycopg2 driver."""
    url = str(url).strip()
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg2://" + url[len(prefix):]
    return url


def mask_url(url: str | None) -> str:
    """The URL with its password replaced by ``***`` (for messages and logs)."""
    if not url:
        return str(url)
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://[^:/@]*):[^@/]*@", r"\1:***@", str(url))


def _airflow_conn_uri(conn_id: str) -> str | None:
    try:
        try:
            from airflow.sdk import BaseHook  # type: ignore[attr-defined]
        except ImportError:
            from airflow.hooks.base import BaseHook  # type: ignore[no-redef]
    except Exception:  # Airflow not installed (or broken): no connection to read
        return None
    try:
        return BaseHook.get_connection(conn_id).get_uri()
    except Exception:  # AirflowNotFoundException, no metadata DB, …: the connection is not there
        return None


def registry_url() -> str:
    """The registry URL by the rules in the module doc."""
    env = os.environ.get(URL_ENV, "").strip()
    if env:
        return normalise_url(env)
    conn_id = os.environ.get(CONN_ID_ENV, "").strip() or DEFAULT_CONN_ID
    uri = _airflow_conn_uri(conn_id)
    if uri:
        return normalise_url(uri)
    from ..alerts import state_dir

    return f"sqlite:///{Path(state_dir()).resolve() / 'registry.db'}"


def is_sqlite(url: str) -> bool:
    return str(url).startswith("sqlite")


def sqlite_path(url: str) -> Path | None:
    """The database file of a file-based SQLite URL (None for in-memory / other databases)."""
    m = re.match(r"^sqlite(?:\+\w+)?:///(.*?)(\?.*)?$", str(url))
    if not m or m.group(1) in ("", ":memory:"):
        return None
    return Path(m.group(1))

"""The fleet registry: the control plane's database of hosts, signing keys, certifications, card
results per GPU serial, and alerts (SQLAlchemy 2 + Alembic; SQLite embedded, PostgreSQL in a fleet).

    from mi300x_cert.registry import open_registry
    reg = open_registry()                    # $MI300X_CERT_REGISTRY_URL / Airflow connection / SQLite
    cert, created = reg.record_certification(cert, cards, failed)
    reg.fleet(hosts=[...]); reg.serial_history("SN-0"); reg.list_alerts()

Importing this package is cheap: SQLAlchemy and Alembic load on first use of :class:`Registry`.
See ``docs/registry.md``.
"""

from __future__ import annotations

from typing import Any

from ..errors import RegistryConflict, RegistryError
from .drift import DriftRule
from .url import mask_url, registry_url

__all__ = ["Registry", "open_registry", "close_all", "registry_url", "mask_url", "DriftRule", "RegistryError",
           "RegistryConflict", "DEFAULT_VALID_DAYS"]

_LAZY = {"Registry", "open_registry", "close_all", "DEFAULT_VALID_DAYS"}


def __getattr__(name: str) -> Any:  # PEP 562: SQLAlchemy only when the registry is used
    if name in _LAZY:
        from . import core

        return getattr(core, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

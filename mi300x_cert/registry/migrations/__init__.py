"""Alembic migration scripts of the fleet registry, run programmatically by
:meth:`mi300x_cert.registry.Registry.upgrade` (no ``alembic.ini`` needed)."""

from pathlib import Path

__all__ = ["SCRIPT_LOCATION"]

SCRIPT_LOCATION = Path(__file__).resolve().parent

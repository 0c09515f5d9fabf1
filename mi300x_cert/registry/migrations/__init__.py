"""Alembic migration scripts of the fleet registry, run programmatically by
:meth:`mi300x_cert.registry.Registry.upgrade` (no ``alembic.ini`` needed)."""

__all__: list[str] = []

"""Alembic environment: runs on the connection :meth:`Registry.upgrade` hands over in
``config.attributes["connection"]`` (the registry's own engine, with its SQLite locking)."""

from __future__ import annotations

__all__ = ["run_migrations"]


def run_migrations() -> None:
    from alembic import context

    from mi300x_cert.registry.schema import metadata

    connection = context.config.attributes.get("connection")
    if connection is None:  # pragma: no cover - only the registry runs these scripts
        raise RuntimeError("the registry migrations run through Registry.upgrade(), with a connection")
    context.configure(connection=connection, target_metadata=metadata, render_as_batch=True,
                      transaction_per_migration=False)
    with context.begin_transaction():
        context.run_migrations()


try:  # executed by alembic; a plain import (package checks) does nothing
    from alembic import context as _context

    _context.config  # raises outside a migration run
except (ImportError, NameError, AttributeError):
    pass
else:
    run_migrations()

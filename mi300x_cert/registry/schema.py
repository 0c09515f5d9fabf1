"""The registry's tables (SQLAlchemy Core). The migrations in ``migrations/versions`` create exactly
this schema; a test compares the two (alembic autogenerate finds no difference).

Timestamps are ISO-8601 UTC strings of one fixed form (``2026-11-29T07:00:00.000+00:00``, as
:func:`mi300x_cert.rundir.utcnow` writes them): they sort as text, identically on SQLite and
PostgreSQL. JSON columns use SQLAlchemy's JSON type (TEXT on SQLite, json on PostgreSQL).

Text columns that take part in a UNIQUE key of an alert (``run_id``, ``suite``) are NOT NULL with
``''`` for "none": NULLs are distinct in a UNIQUE constraint, which would let a retry duplicate.
"""

from __future__ import annotations

from sqlalchemy import (JSON, Boolean, Column, Float, ForeignKey, Index, Integer, MetaData, String, Table, Text,
                        UniqueConstraint)

__all__ = ["metadata", "hosts", "keys", "certifications", "card_results", "failed_expectations", "serials",
           "alerts", "alert_events", "SCHEMA_HEAD"]

SCHEMA_HEAD = "0002"  # the newest migration's revision id (a test checks it against the scripts)

metadata = MetaData(naming_convention={
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
})

TS = String(32)  # ISO-8601 UTC

hosts = Table(
    "hosts", metadata,
    Column("name", String(200), primary_key=True),
    Column("sku", String(100)),
    Column("profile", String(200)),
    Column("cards", Integer),
    Column("valid_days", Integer),
    Column("first_seen", TS, nullable=False),
    Column("last_seen", TS, nullable=False),
    # denormalised so the fleet view is O(hosts): the newest certification, the newest CERTIFIED one
    Column("last_certification_id", Integer),
    Column("last_certified_id", Integer),
)

keys = Table(
    "keys", metadata,
    Column("keyid", String(128), primary_key=True),
    Column("host", String(200), ForeignKey("hosts.name"), nullable=False),
    Column("public_pem", Text, nullable=False),
    Column("scheme", String(64), nullable=False),
    Column("enrolled_at", TS, nullable=False),
    Column("enrolled_by", String(200), nullable=False),
    Column("note", Text, nullable=False, default=""),
    Column("revoked_at", TS),
    Column("revoked_by", String(200)),
    Column("revoke_reason", Text),
    Index(None, "host"),
)

certifications = Table(
    "certifications", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("host", String(200), ForeignKey("hosts.name"), nullable=False),
    Column("run_id", String(250), nullable=False),
    Column("profile", String(200)),
    Column("sku", String(100)),
    Column("path", String(32)),
    Column("started", TS),
    Column("finished", TS),
    Column("registered_at", TS, nullable=False),
    Column("result", String(16), nullable=False),
    Column("certified", Boolean, nullable=False),
    Column("reasons", JSON, nullable=False),
    Column("verdicts", JSON, nullable=False),
    Column("bundle_uri", Text),
    Column("bundle_digest", String(80)),
    Column("signer_keyid", String(128)),
    Column("trusted", Boolean, nullable=False, default=False),
    Column("expires_at", TS),
    Column("source", String(16), nullable=False),
    Column("dag_id", String(250)),
    Column("report", Text),
    Column("data_docs", Text),
    UniqueConstraint("host", "run_id"),
    Index(None, "host", "registered_at"),
    Index(None, "registered_at"),
)

card_results = Table(
    "card_results", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("certification_id", Integer, ForeignKey("certifications.id"), nullable=False),
    Column("host", String(200), nullable=False),
    Column("run_id", String(250), nullable=False),
    Column("sku", String(100)),
    Column("serial", String(200)),
    Column("card", Integer),
    Column("name", String(200)),
    Column("bus_id", String(64)),
    Column("date", TS),
    Column("idle_junction_mean_c", Float),
    Column("active_junction_p95_c", Float),
    Column("memory_max_c", Float),
    Column("active_power_mean_w", Float),
    Column("sd_per_image_median_s", Float),
    Column("sd_batches", Integer),
    Column("card_ok", Boolean),
    Column("failures", JSON, nullable=False),
    Column("drift", JSON, nullable=False),
    Column("utilization", JSON),  # {"<workload> <case>": achieved / the run's measured ceiling} (0002)
    Index(None, "serial", "date"),
    Index(None, "certification_id"),
)

failed_expectations = Table(
    "failed_expectations", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("certification_id", Integer, ForeignKey("certifications.id"), nullable=False),
    Column("suite", String(100)),
    Column("expectation", String(250)),
    Column("column", String(250)),
    Column("card", Integer),
    Column("observed", JSON),
    Column("expected", JSON),
    Column("reason", Text),
    Index(None, "certification_id"),
)

# the newest card row of each serial (what the SKU median and the serial list read): O(serials)
serials = Table(
    "serials", metadata,
    Column("serial", String(200), primary_key=True),
    Column("sku", String(100)),
    Column("runs", Integer, nullable=False),
    Column("last_card_result_id", Integer, ForeignKey("card_results.id"), nullable=False),
    Column("last_date", TS),
    Index(None, "sku"),
)

alerts = Table(
    "alerts", metadata,
    Column("id", String(250), primary_key=True),
    Column("host", String(200), nullable=False),
    Column("run_id", String(250), nullable=False, default=""),
    Column("dag_id", String(250)),
    Column("suite", String(100), nullable=False, default=""),
    Column("kind", String(32), nullable=False),
    Column("severity", String(16), nullable=False),
    Column("created", TS, nullable=False),
    Column("message", Text, nullable=False),
    Column("failures", JSON, nullable=False),
    Column("report", Text),
    Column("data_docs", Text),
    Column("bundle_uri", Text),
    Column("certification_id", Integer),
    Column("status", String(16), nullable=False),
    Column("acknowledged_by", String(200)),
    Column("acknowledged_at", TS),
    Column("note", Text, nullable=False, default=""),
    UniqueConstraint("host", "run_id", "suite", "kind"),
    Index(None, "status", "host"),
    Index(None, "created"),
)

alert_events = Table(
    "alert_events", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("alert_id", String(250), ForeignKey("alerts.id"), nullable=False),
    Column("action", String(16), nullable=False),
    Column("by", String(200)),
    Column("at", TS, nullable=False),
    Column("note", Text, nullable=False, default=""),
    Index(None, "alert_id"),
)

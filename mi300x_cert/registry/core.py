"""The fleet registry: one database the control plane owns (see ``docs/registry.md``).

:class:`Registry` wraps one SQLAlchemy engine. Every public method is one transaction and returns
plain JSON-able dicts. Database errors become one :class:`~mi300x_cert.errors.RegistryError` naming
the URL (password masked); a record that contradicts an existing one is a
:class:`~mi300x_cert.errors.RegistryConflict` and is never overwritten.

Concurrency:

* SQLite: WAL, ``busy_timeout`` 60 s, foreign keys on; pysqlite's own transaction handling is off
  (``isolation_level = None``) and every write transaction starts with ``BEGIN IMMEDIATE``, so
  concurrent writers queue on the write lock instead of failing half-way; reads use a plain
  ``BEGIN``.
* PostgreSQL: ``pool_pre_ping``; read-modify-write paths are single statements (``INSERT … ON
  CONFLICT``, ``UPDATE … SET col = COALESCE(…)``) or retried once on a unique-key race.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import logging
import os
import re
import threading
from pathlib import Path
from typing import Any, Iterable, Iterator

from ..errors import RegistryConflict, RegistryError
from .drift import DRIFT_METRICS, DriftRule, median_by_metric
from .url import is_sqlite, mask_url, normalise_url, registry_url, sqlite_path

__all__ = ["Registry", "open_registry", "close_all", "RESULTS", "SOURCES", "ALERT_KINDS", "SEVERITIES",
           "DEFAULT_VALID_DAYS", "CERT_FIELDS", "CARD_FIELDS", "FAILED_FIELDS", "ts"]

log = logging.getLogger(__name__)

RESULTS = ("CERTIFIED", "NOT CERTIFIED")
SOURCES = ("register", "certify", "import")
PATHS = (None, "stock", "optimized")
ALERT_KINDS = ("expectation", "not_certified", "refused", "expired", "never_certified", "drift", "conflict")
SEVERITIES = ("error", "warning")
EVENT_ACTIONS = ("raised", "acknowledged", "reopened", "links")
DEFAULT_VALID_DAYS = 30  # a CERTIFIED record with neither expires_at nor valid_days expires after this

CERT_FIELDS = ("host", "run_id", "profile", "sku", "path", "started", "finished", "registered_at", "result",
               "certified", "reasons", "verdicts", "bundle_uri", "bundle_digest", "signer_keyid", "trusted",
               "expires_at", "source", "dag_id", "report", "data_docs")
_CERT_EXTRA = ("valid_days", "cards")  # accepted in the cert dict: they go to the host row
CARD_FIELDS = ("serial", "card", "name", "bus_id", "date", "idle_junction_mean_c", "active_junction_p95_c",
               "memory_max_c", "active_power_mean_w", "sd_per_image_median_s", "sd_batches", "card_ok", "failures",
               "utilization")
FAILED_FIELDS = ("suite", "expectation", "column", "card", "observed", "expected", "reason")
_TS_FIELDS = ("started", "finished", "registered_at", "expires_at")
_ALERT_OUT = ("id", "host", "run_id", "dag_id", "suite", "kind", "severity", "created", "message", "failures",
              "report", "data_docs", "bundle_uri", "certification_id", "status", "acknowledged_by",
              "acknowledged_at", "note")


# ---- small helpers ---------------------------------------------------------------------------------
def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def _parse_ts(value: Any) -> _dt.datetime | None:
    if value is None or value == "":
        return None
    if isinstance(value, _dt.datetime):
        d = value
    elif isinstance(value, _dt.date):
        d = _dt.datetime(value.year, value.month, value.day)
    elif isinstance(value, str):
        text = value.strip()
        if text.endswith("Z"):
            text = text[:-1] + "+00:00"
        try:
            d = _dt.datetime.fromisoformat(text)
        except ValueError:
            m = re.fullmatch(r"(\d{4})(\d{2})(\d{2})T(\d{2})(\d{2})(\d{2})(?:\+00:?00)?", text)
            if not m:
                raise
            d = _dt.datetime(*map(int, m.groups()))
    else:
        raise ValueError(f"not a timestamp: {value!r}")
    if d.tzinfo is None:
        d = d.replace(tzinfo=_dt.timezone.utc)
    return d.astimezone(_dt.timezone.utc)


def ts(value: Any, field: str = "timestamp") -> str | None:
    """Canonical ISO-8601 UTC text of ``value`` (str / datetime; naive means UTC); None stays None.
    Raises RegistryError naming ``field`` for anything else."""
    try:
        d = _parse_ts(value)
    except (ValueError, TypeError) as e:
        raise RegistryError(f"{field}: {value!r} is not an ISO-8601 timestamp") from e
    return None if d is None else d.isoformat(timespec="milliseconds")


def _age_s(then: str | None, now: _dt.datetime) -> float | None:
    d = _parse_ts(then) if then else None
    return None if d is None else round((now - d).total_seconds(), 3)


def _safe(text: Any) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_")[:60] or "x"


def _short(e: BaseException) -> str:
    orig = getattr(e, "orig", None) or e
    text = str(orig).strip().splitlines()
    return text[0] if text else type(orig).__name__


def _name(value: Any, field: str, *, required: bool = True, max_len: int = 200) -> str | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise RegistryError(f"{field} is required")
        return None
    if not isinstance(value, str) or len(value) > max_len:
        raise RegistryError(f"{field}: {value!r} must be a string of at most {max_len} characters")
    return value.strip()


def _opt_int(value: Any, field: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise RegistryError(f"{field}: {value!r} is not an integer") from None
        if f != int(f):
            raise RegistryError(f"{field}: {value!r} is not an integer")
        value = int(f)
    return int(value)


def _opt_float(value: Any, field: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise RegistryError(f"{field}: {value!r} is not a number")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise RegistryError(f"{field}: {value!r} is not a number") from None
    return None if x != x or x in (float("inf"), float("-inf")) else x


def _opt_bool(value: Any, field: str) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    raise RegistryError(f"{field}: {value!r} is not true/false")


def _jsonable(value: Any) -> Any:
    """JSON-safe copy (NaN → None, unknown objects → str) for JSON columns."""
    if isinstance(value, float):
        return None if value != value or value in (float("inf"), float("-inf")) else value
    if value is None or isinstance(value, (str, int, bool)):
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (_dt.datetime, _dt.date)):
        return value.isoformat()
    return str(value)


# ---- engine ----------------------------------------------------------------------------------------
def _make_engine(url: str):
    from sqlalchemy import create_engine, event
    from sqlalchemy.pool import StaticPool

    if is_sqlite(url):
        path = sqlite_path(url)
        kw: dict[str, Any] = {"connect_args": {"timeout": 60, "check_same_thread": False}}
        if path is None:
            kw["poolclass"] = StaticPool
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, **kw)

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn, _rec) -> None:  # pragma: no cover - exercised through every test
            dbapi_conn.isolation_level = None  # pysqlite must not BEGIN on its own: we do (below)
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA busy_timeout = 60000")
            cur.execute("PRAGMA foreign_keys = ON")
            if path is not None:
                cur.execute("PRAGMA journal_mode = WAL")
                cur.execute("PRAGMA synchronous = NORMAL")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn) -> None:
            read = conn.get_execution_options().get("registry_read")
            conn.exec_driver_sql("BEGIN" if read else "BEGIN IMMEDIATE")

        return engine
    kw = {"pool_pre_ping": True, "future": True}
    if url.startswith(("postgresql", "postgres")):
        kw["connect_args"] = {"connect_timeout": int(os.environ.get("MI300X_CERT_REGISTRY_CONNECT_TIMEOUT", "5"))}
    return create_engine(url, **kw)


@contextlib.contextmanager
def _file_lock(path: Path | None) -> Iterator[None]:
    if path is None:
        yield
        return
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(str(path) + ".lock", "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


class _Retry(Exception):
    """A unique-key race lost to a concurrent writer: run the transaction again."""


# ---- the registry ----------------------------------------------------------------------------------
class Registry:
    """The fleet registry at ``url`` (default :func:`~mi300x_cert.registry.url.registry_url`).

    ``auto_upgrade``: apply missing migrations on open (default: for SQLite only; any other database
    whose schema is behind raises RegistryError asking for ``mi300x-cert registry upgrade``).
    """

    def __init__(self, url: str | None = None, *, auto_upgrade: bool | None = None,
                 drift_rule: DriftRule | None = None, check_schema: bool = True) -> None:
        self.url = normalise_url(url) if url else registry_url()
        self.masked_url = mask_url(self.url)
        self.drift_rule = drift_rule or DriftRule()
        try:
            self._engine = _make_engine(self.url)
        except RegistryError:
            raise
        except Exception as e:  # ArgumentError, NoSuchModuleError, ImportError of a driver, …
            raise RegistryError(f"registry URL {self.masked_url} cannot be used: {_short(e)}") from None
        self.dialect = self._engine.dialect.name
        if check_schema:
            self._check_schema(is_sqlite(self.url) if auto_upgrade is None else auto_upgrade)

    # ---- plumbing ----
    @property
    def engine(self):
        """The SQLAlchemy engine (bulk loads, benchmarks). Its transactions follow the rules above."""
        return self._engine

    def close(self) -> None:
        self._engine.dispose()

    def __repr__(self) -> str:
        return f"Registry({self.masked_url!r})"

    def _error(self, e: BaseException, what: str = "") -> RegistryError:
        return RegistryError(f"registry {self.masked_url}{': ' + what if what else ''}: {_short(e)}")

    @contextlib.contextmanager
    def _tx(self, *, read: bool = False) -> Iterator[Any]:
        from sqlalchemy.exc import IntegrityError, SQLAlchemyError

        try:
            with self._engine.connect() as conn:
                if read:
                    conn.execution_options(registry_read=True)
                with conn.begin():
                    yield conn
        except (RegistryError, _Retry, IntegrityError):
            raise
        except SQLAlchemyError as e:
            raise self._error(e) from None

    def _write(self, fn, *args, **kw):
        """Run ``fn(conn, …)`` in one write transaction; once more if it lost a unique-key race."""
        from sqlalchemy.exc import IntegrityError

        for attempt in (1, 2, 3):
            try:
                with self._tx() as conn:
                    return fn(conn, *args, **kw)
            except (_Retry, IntegrityError) as e:
                if attempt == 3:
                    raise self._error(e, "write kept colliding with concurrent writers") from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _insert(self, table):
        if self.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        elif self.dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert
        else:  # pragma: no cover - only SQLite and PostgreSQL are supported
            raise RegistryError(f"registry {self.masked_url}: database {self.dialect!r} is not supported "
                                "(SQLite or PostgreSQL)")
        return insert(table)

    # ---- schema ----
    def revision(self) -> str | None:
        """The schema revision of the database (None: no schema yet)."""
        from sqlalchemy import inspect, text

        with self._tx(read=True) as conn:
            if not inspect(conn).has_table("alembic_version"):
                return None
            return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()

    @staticmethod
    def head() -> str:
        from .schema import SCHEMA_HEAD

        return SCHEMA_HEAD

    def _check_schema(self, auto: bool) -> None:
        rev = self.revision()
        if rev == self.head():
            return
        known = self._known_revisions()
        if rev is not None and rev not in known:
            raise RegistryError(f"registry {self.masked_url}: schema revision {rev!r} is newer than this "
                                f"mi300x-cert knows (head {self.head()}): upgrade mi300x-cert")
        if auto:
            self.upgrade()
            return
        raise RegistryError(f"registry {self.masked_url}: schema is at revision {rev or 'none (empty database)'}, "
                            f"this mi300x-cert needs {self.head()}: run 'mi300x-cert registry upgrade'")

    @staticmethod
    def _known_revisions() -> set[str]:
        from .migrations.versions import known_revisions

        return known_revisions()

    def upgrade(self) -> dict:
        """Apply the missing migrations (idempotent; concurrent callers serialise). Returns status()."""
        from alembic import command
        from alembic.config import Config
        from sqlalchemy import text
        from sqlalchemy.exc import SQLAlchemyError

        from .migrations import SCRIPT_LOCATION

        cfg = Config()
        cfg.set_main_option("script_location", str(SCRIPT_LOCATION))
        logging.getLogger("alembic").setLevel(logging.WARNING)  # status() says what was applied
        with _file_lock(sqlite_path(self.url) if is_sqlite(self.url) else None):
            try:
                with self._engine.connect() as conn:
                    with conn.begin():  # BEGIN IMMEDIATE on SQLite: one migrator at a time
                        if self.dialect == "postgresql":
                            conn.execute(text("SELECT pg_advisory_xact_lock(730030001)"))
                        cfg.attributes["connection"] = conn
                        command.upgrade(cfg, "head")
            except SQLAlchemyError as e:
                raise self._error(e, "upgrade failed") from None
        return self.status()

    def status(self) -> dict:
        """URL (masked), database kind, schema revision vs head, row counts."""
        from sqlalchemy import func, select

        from . import schema as s

        rev = self.revision()
        out = {"url": self.masked_url, "dialect": self.dialect, "revision": rev, "head": self.head(),
               "up_to_date": rev == self.head(), "counts": {}}
        if rev is not None:
            with self._tx(read=True) as conn:
                for t in (s.hosts, s.keys, s.certifications, s.card_results, s.failed_expectations, s.serials,
                          s.alerts, s.alert_events):
                    out["counts"][t.name] = conn.execute(select(func.count()).select_from(t)).scalar()
        return out

    # ---- hosts ----
    def _upsert_host(self, conn, name: str, *, sku=None, profile=None, cards=None, valid_days=None,
                     seen: str | None = None) -> None:
        from sqlalchemy import func

        from .schema import hosts

        seen = seen or _now()
        ins = self._insert(hosts).values(name=name, sku=sku, profile=profile, cards=cards, valid_days=valid_days,
                                         first_seen=seen, last_seen=seen)
        ex = ins.excluded
        conn.execute(ins.on_conflict_do_update(index_elements=[hosts.c.name], set_={
            "sku": func.coalesce(ex.sku, hosts.c.sku), "profile": func.coalesce(ex.profile, hosts.c.profile),
            "cards": func.coalesce(ex.cards, hosts.c.cards),
            "valid_days": func.coalesce(ex.valid_days, hosts.c.valid_days), "last_seen": ex.last_seen}))

    def upsert_host(self, name: str, *, sku: str | None = None, profile: str | None = None,
                    cards: int | None = None, valid_days: int | None = None) -> dict:
        """Create or update a host row (None leaves a field as it is). Returns the host."""
        name = _name(name, "host")
        cards, valid_days = _opt_int(cards, "cards"), _opt_int(valid_days, "valid_days")
        if valid_days is not None and valid_days <= 0:
            raise RegistryError(f"valid_days: {valid_days!r} must be positive")

        def tx(conn):
            self._upsert_host(conn, name, sku=_name(sku, "sku", required=False),
                              profile=_name(profile, "profile", required=False), cards=cards, valid_days=valid_days)
            return self._host(conn, name)

        return self._write(tx)

    def _host(self, conn, name: str) -> dict | None:
        from sqlalchemy import select

        from .schema import hosts

        r = conn.execute(select(hosts).where(hosts.c.name == name)).mappings().first()
        return dict(r) if r else None

    def get_host(self, name: str) -> dict | None:
        with self._tx(read=True) as conn:
            return self._host(conn, name)

    # ---- keys ----
    @staticmethod
    def _key_out(r) -> dict:
        d = dict(r)
        d["revoked"] = d.get("revoked_at") is not None
        return d

    def enroll_key(self, host: str, public_pem: bytes | str, *, by: str, note: str = "") -> dict:
        """Enroll a host's bundle-signing public key (PEM; a private PEM's public half is used).
        Re-enrolling the same key for the same host is a no-op. A key already enrolled for another
        host, or revoked, is a RegistryError naming both."""
        from sqlalchemy import select

        from ..bundle.keys import public_key_from_pem, public_pem as to_pem
        from ..errors import BundleError
        from .schema import keys

        host = _name(host, "host")
        by = _name(by, "by (who enrolls the key)")
        if isinstance(public_pem, str):
            public_pem = public_pem.encode()
        try:
            sslkey, pub = public_key_from_pem(bytes(public_pem), f"public key for host {host}")
        except BundleError as e:
            raise RegistryError(str(e)) from None
        keyid, pem = sslkey.keyid, to_pem(pub).decode()

        def tx(conn):
            row = conn.execute(select(keys).where(keys.c.keyid == keyid)).mappings().first()
            if row is not None:
                if row["host"] != host:
                    raise RegistryError(f"key {keyid} is already enrolled for host {row['host']!r}; it cannot "
                                        f"also be enrolled for host {host!r} (one key, one host)")
                if row["revoked_at"]:
                    raise RegistryError(f"key {keyid} of host {host!r} was revoked at {row['revoked_at']} by "
                                        f"{row['revoked_by']}: a revoked key cannot be enrolled again; enroll a new key")
                return self._key_out(row)
            self._upsert_host(conn, host)
            conn.execute(keys.insert().values(keyid=keyid, host=host, public_pem=pem, scheme=sslkey.scheme,
                                              enrolled_at=_now(), enrolled_by=by, note=note or ""))
            return self._key_out(conn.execute(select(keys).where(keys.c.keyid == keyid)).mappings().one())

        return self._write(tx)

    def list_keys(self, host: str | None = None) -> list[dict]:
        from sqlalchemy import select

        from .schema import keys

        q = select(keys).order_by(keys.c.host, keys.c.enrolled_at, keys.c.keyid)
        if host:
            q = q.where(keys.c.host == host)
        with self._tx(read=True) as conn:
            return [self._key_out(r) for r in conn.execute(q).mappings()]

    def get_key(self, keyid: str) -> dict | None:
        from sqlalchemy import select

        from .schema import keys

        with self._tx(read=True) as conn:
            r = conn.execute(select(keys).where(keys.c.keyid == keyid)).mappings().first()
            return self._key_out(r) if r else None

    def revoke_key(self, keyid: str, *, by: str, reason: str = "") -> dict:
        """Revoke a key (from now on no bundle it signs is trusted). Revoking twice keeps the first."""
        from sqlalchemy import select, update

        from .schema import keys

        keyid = _name(keyid, "keyid", max_len=128)
        by = _name(by, "by (who revokes the key)")

        def tx(conn):
            n = conn.execute(update(keys).where(keys.c.keyid == keyid, keys.c.revoked_at.is_(None))
                             .values(revoked_at=_now(), revoked_by=by, revoke_reason=reason or "")).rowcount
            row = conn.execute(select(keys).where(keys.c.keyid == keyid)).mappings().first()
            if row is None:
                raise RegistryError(f"key {keyid!r} is not enrolled ('mi300x-cert keys list' shows the keys)")
            if not n:
                log.info("key %s was already revoked at %s", keyid, row["revoked_at"])
            return self._key_out(row)

        return self._write(tx)

    def trusted_key(self, host: str, keyid: str) -> dict | None:
        """The key if it is enrolled for ``host`` and not revoked, else None."""
        from sqlalchemy import select

        from .schema import keys

        with self._tx(read=True) as conn:
            r = conn.execute(select(keys).where(keys.c.keyid == keyid, keys.c.host == host,
                                                keys.c.revoked_at.is_(None))).mappings().first()
            return self._key_out(r) if r else None

    # ---- certifications ----
    def _check_cert(self, cert: dict) -> dict:
        if not isinstance(cert, dict):
            raise RegistryError(f"certification must be a dict, got {type(cert).__name__}")
        unknown = sorted(set(cert) - set(CERT_FIELDS) - set(_CERT_EXTRA))
        if unknown:
            raise RegistryError(f"certification: unknown field(s) {', '.join(unknown)} "
                                f"(known: {', '.join(CERT_FIELDS + _CERT_EXTRA)})")
        c = {k: cert.get(k) for k in CERT_FIELDS}
        c["host"] = _name(c["host"], "certification.host")
        c["run_id"] = _name(c["run_id"], "certification.run_id", max_len=250)
        if c["result"] not in RESULTS:
            raise RegistryError(f"certification.result: {c['result']!r} is not one of {', '.join(RESULTS)}")
        certified = c["result"] == "CERTIFIED"
        if c["certified"] is not None and c["certified"] is not certified:
            raise RegistryError(f"certification.certified: {c['certified']!r} contradicts result {c['result']!r}")
        c["certified"] = certified
        if c["path"] not in PATHS:
            raise RegistryError(f"certification.path: {c['path']!r} is not one of stock, optimized or null")
        c["source"] = c["source"] or "register"
        if c["source"] not in SOURCES:
            raise RegistryError(f"certification.source: {c['source']!r} is not one of {', '.join(SOURCES)}")
        reasons = c["reasons"] or []
        if not isinstance(reasons, (list, tuple)):
            raise RegistryError(f"certification.reasons: must be a list of strings, got {reasons!r}")
        c["reasons"] = [str(r) for r in reasons]
        verdicts = c["verdicts"] or {}
        if not isinstance(verdicts, dict) or any(v is not None and not isinstance(v, bool) for v in verdicts.values()):
            raise RegistryError(f"certification.verdicts: must map suite → true/false/null, got {verdicts!r}")
        c["verdicts"] = {str(k): v for k, v in verdicts.items()}
        c["trusted"] = bool(_opt_bool(c["trusted"], "certification.trusted"))
        for f in _TS_FIELDS:
            c[f] = ts(c[f], f"certification.{f}")
        for f in ("profile", "sku", "bundle_uri", "bundle_digest", "signer_keyid", "dag_id", "report", "data_docs"):
            if c[f] is not None and not isinstance(c[f], str):
                c[f] = str(c[f])
        vd = _opt_int(cert.get("valid_days"), "certification.valid_days")
        if vd is not None and vd <= 0:
            raise RegistryError(f"certification.valid_days: {vd!r} must be positive")
        c["_valid_days"] = vd
        c["_cards"] = _opt_int(cert.get("cards"), "certification.cards")
        return c

    @staticmethod
    def _check_cards(cards: Iterable[dict], cert: dict) -> list[dict]:
        out, seen = [], set()
        for i, card in enumerate(cards or []):
            if not isinstance(card, dict):
                raise RegistryError(f"cards[{i}] must be a dict, got {type(card).__name__}")
            serial = card.get("serial")
            serial = None if serial in (None, "") else str(serial)
            if serial is not None:
                if serial in seen:
                    raise RegistryError(f"cards[{i}].serial: {serial!r} appears twice in one certification")
                seen.add(serial)
            fails = card.get("failures") or []
            if not isinstance(fails, list):
                raise RegistryError(f"cards[{i}].failures must be a list")
            row = {"serial": serial, "card": _opt_int(card.get("card"), f"cards[{i}].card"),
                   "name": None if card.get("name") is None else str(card["name"]),
                   "bus_id": None if card.get("bus_id") is None else str(card["bus_id"]),
                   "date": ts(card.get("date"), f"cards[{i}].date") or cert["started"] or cert["finished"]
                   or cert["registered_at"],
                   "sd_batches": _opt_int(card.get("sd_batches"), f"cards[{i}].sd_batches"),
                   "card_ok": _opt_bool(card.get("card_ok"), f"cards[{i}].card_ok"),
                   "failures": _jsonable(fails)}
            for m in ("idle_junction_mean_c", "active_junction_p95_c", "memory_max_c", "active_power_mean_w",
                      "sd_per_image_median_s"):
                row[m] = _opt_float(card.get(m), f"cards[{i}].{m}")
            out.append(row)
        return out

    @staticmethod
    def _check_failed(failed: Iterable[dict]) -> list[dict]:
        out = []
        for i, f in enumerate(failed or []):
            if not isinstance(f, dict):
                raise RegistryError(f"failed[{i}] must be a dict, got {type(f).__name__}")
            out.append({
                "suite": None if f.get("suite") is None else str(f["suite"]),
                "expectation": str(f.get("expectation") or f.get("expectation_type") or f.get("type") or "") or None,
                "column": None if f.get("column") is None else str(f["column"]),
                "card": _opt_int(f.get("card"), f"failed[{i}].card"),
                "observed": _jsonable(f.get("observed", f.get("observed_value"))),
                "expected": _jsonable(f.get("expected", f.get("expected_value"))),
                "reason": None if f.get("reason", f.get("message")) is None else str(f.get("reason", f.get("message"))),
            })
        return out

    @staticmethod
    def _cert_out(r) -> dict:
        return {k: r[k] for k in ("id",) + CERT_FIELDS}

    def _cert_full(self, conn, cert_row) -> dict:
        from sqlalchemy import select

        from .schema import card_results, failed_expectations

        out = self._cert_out(cert_row)
        cid = cert_row["id"]
        out["cards"] = [self._card_out(r) for r in conn.execute(
            select(card_results).where(card_results.c.certification_id == cid).order_by(card_results.c.card,
                                                                                         card_results.c.id)).mappings()]
        out["failed"] = [{k: r[k] for k in ("id",) + FAILED_FIELDS} for r in conn.execute(
            select(failed_expectations).where(failed_expectations.c.certification_id == cid)
            .order_by(failed_expectations.c.id)).mappings()]
        out["drift"] = [{"serial": c["serial"], "card": c["card"], **f} for c in out["cards"] for f in c["drift"]]
        return out

    @staticmethod
    def _card_out(r) -> dict:
        return {k: r[k] for k in ("id", "certification_id", "host", "run_id", "sku") + CARD_FIELDS + ("drift",)}

    def _expires(self, c: dict, host_valid_days: int | None) -> str | None:
        if c["expires_at"] or not c["certified"]:
            return c["expires_at"]
        base = _parse_ts(c["finished"] or c["started"] or c["registered_at"])
        days = c["_valid_days"] or host_valid_days or DEFAULT_VALID_DAYS
        return (base + _dt.timedelta(days=days)).isoformat(timespec="milliseconds")

    def _previous(self, conn, serial: str, date: str | None) -> dict | None:
        from sqlalchemy import select

        from .schema import card_results

        q = select(card_results).where(card_results.c.serial == serial)
        if date is not None:
            q = q.where(card_results.c.date < date)
        r = conn.execute(q.order_by(card_results.c.date.desc(), card_results.c.id.desc()).limit(1)).mappings().first()
        return dict(r) if r else None

    def _sku_median(self, conn, sku: str | None, exclude: set[str], min_count: int) -> dict:
        from sqlalchemy import select

        from .schema import card_results, serials

        if not sku:
            return {}
        cols = [card_results.c[m] for m in DRIFT_METRICS]
        q = (select(serials.c.serial, *cols).join(card_results, card_results.c.id == serials.c.last_card_result_id)
             .where(serials.c.sku == sku))
        rows = [dict(r) for r in conn.execute(q).mappings() if r["serial"] not in exclude]
        return median_by_metric(rows, min_count)

    def record_certification(self, cert: dict, cards: list[dict] | None = None,
                             failed: list[dict] | None = None, *,
                             drift_rule: DriftRule | None = None) -> tuple[dict, bool]:
        """Record one concluded certification with its card rows and failed expectations, in one
        transaction (see the module doc of :mod:`mi300x_cert.registry`). Returns ``(certification,
        created)``; the certification carries ``cards`` (each with its ``drift`` flags), ``failed``
        and ``drift`` (every flag of the run, with serial and card). The same (host, run_id) again with
        the same bundle_digest and result changes nothing (``created`` False); different content
        raises RegistryConflict. ``drift_rule`` overrides the registry's (e.g. the fleet file's)."""
        c = self._check_cert(cert)
        c["registered_at"] = c["registered_at"] or _now()
        card_rows = self._check_cards(cards or [], c)
        failed_rows = self._check_failed(failed or [])
        return self._write(self._record_tx, c, card_rows, failed_rows, drift_rule or self.drift_rule)

    def _record_tx(self, conn, c: dict, card_rows: list[dict], failed_rows: list[dict],
                   rule: DriftRule) -> tuple[dict, bool]:
        from sqlalchemy import case, func, or_, select, update

        from .schema import card_results, certifications, failed_expectations, hosts, serials

        existing = conn.execute(select(certifications).where(
            certifications.c.host == c["host"], certifications.c.run_id == c["run_id"])).mappings().first()
        if existing is not None:
            if existing["bundle_digest"] == c["bundle_digest"] and existing["result"] == c["result"]:
                return self._cert_full(conn, existing), False
            raise RegistryConflict(
                f"host {c['host']!r} run {c['run_id']!r} is already registered with result {existing['result']!r} "
                f"and bundle digest {existing['bundle_digest']!r} (certification {existing['id']}, "
                f"{existing['source']} at {existing['registered_at']}); the new record says {c['result']!r} with "
                f"digest {c['bundle_digest']!r}: not overwritten")
        self._upsert_host(conn, c["host"], sku=c["sku"], profile=c["profile"], cards=c["_cards"],
                          valid_days=c["_valid_days"], seen=c["registered_at"])
        host_vd = conn.execute(select(hosts.c.valid_days).where(hosts.c.name == c["host"])).scalar()
        c["expires_at"] = self._expires(c, host_vd)
        values = {k: c[k] for k in CERT_FIELDS}
        cid = conn.execute(certifications.insert().values(**values).returning(certifications.c.id)).scalar_one()

        # drift: against the serial's previous certification and the SKU's fleet median
        mine = {r["serial"] for r in card_rows if r["serial"]}
        median = self._sku_median(conn, c["sku"], mine, rule.min_fleet_cards) if mine else {}
        rows = []
        for r in card_rows:
            flags = []
            if r["serial"]:
                flags = rule.flags(r, self._previous(conn, r["serial"], r["date"]), median)
            rows.append({**r, "certification_id": cid, "host": c["host"], "run_id": c["run_id"], "sku": c["sku"],
                         "drift": flags})
        if rows:
            ids = conn.execute(card_results.insert().returning(card_results.c.id, sort_by_parameter_order=True),
                               rows).scalars().all()
            latest = [{"serial": r["serial"], "sku": c["sku"], "runs": 1, "last_card_result_id": i,
                       "last_date": r["date"]} for r, i in zip(rows, ids) if r["serial"]]
            if latest:
                ins = self._insert(serials).values(latest)
                ex = ins.excluded
                newer = or_(serials.c.last_date.is_(None), ex.last_date >= serials.c.last_date)
                conn.execute(ins.on_conflict_do_update(index_elements=[serials.c.serial], set_={
                    "runs": serials.c.runs + 1,
                    "sku": case((newer, ex.sku), else_=serials.c.sku),
                    "last_card_result_id": case((newer, ex.last_card_result_id), else_=serials.c.last_card_result_id),
                    "last_date": case((newer, ex.last_date), else_=serials.c.last_date)}))
        if failed_rows:
            conn.execute(failed_expectations.insert(), [{**f, "certification_id": cid} for f in failed_rows])

        # the host's newest certification (and newest CERTIFIED one), by when it concluded
        mine_at = c["finished"] or c["started"] or c["registered_at"]
        concluded = lambda col: (select(func.coalesce(certifications.c.finished, certifications.c.started,  # noqa: E731
                                                      certifications.c.registered_at))
                                 .where(certifications.c.id == col).scalar_subquery())
        conn.execute(update(hosts).where(hosts.c.name == c["host"], or_(
            hosts.c.last_certification_id.is_(None), concluded(hosts.c.last_certification_id) <= mine_at))
            .values(last_certification_id=cid))
        if c["certified"]:
            conn.execute(update(hosts).where(hosts.c.name == c["host"], or_(
                hosts.c.last_certified_id.is_(None), concluded(hosts.c.last_certified_id) <= mine_at))
                .values(last_certified_id=cid))
        row = conn.execute(select(certifications).where(certifications.c.id == cid)).mappings().one()
        return self._cert_full(conn, row), True

    def get_certification(self, host: str, run_id: str) -> dict | None:
        """One certification with its cards, failed expectations and drift flags (None if unknown)."""
        from sqlalchemy import select

        from .schema import certifications

        with self._tx(read=True) as conn:
            r = conn.execute(select(certifications).where(certifications.c.host == host,
                                                          certifications.c.run_id == run_id)).mappings().first()
            return self._cert_full(conn, r) if r else None

    def list_certifications(self, host: str | None = None, limit: int = 50, offset: int = 0) -> list[dict]:
        """Certifications newest first (by registered_at), without their card rows."""
        from sqlalchemy import select

        from .schema import certifications

        q = select(certifications).order_by(certifications.c.registered_at.desc(), certifications.c.id.desc())
        if host:
            q = q.where(certifications.c.host == host)
        q = q.limit(max(0, int(limit))).offset(max(0, int(offset)))
        with self._tx(read=True) as conn:
            return [self._cert_out(r) for r in conn.execute(q).mappings()]

    # ---- fleet and expiry ----
    @staticmethod
    def _concluded(c: dict | None) -> str | None:
        return None if not c else (c.get("finished") or c.get("started") or c.get("registered_at"))

    def expiry_state(self, last: dict | None, last_certified: dict | None, valid_days: int | None,
                     now: _dt.datetime) -> dict:
        """The one expiry rule (fleet view and audit): ``{status, certified_now, expired, expires_at,
        expired_certification}``. status: never_certified | certified | not_certified | expired."""
        days = valid_days or DEFAULT_VALID_DAYS
        if last is None:
            return {"status": "never_certified", "certified_now": False, "expired": False, "expires_at": None,
                    "expired_certification": None}
        exp_at = last_certified.get("expires_at") if last_certified else None
        if last_certified and not exp_at:  # fail closed: a CERTIFIED record always expires
            base = _parse_ts(self._concluded(last_certified))
            exp_at = (base + _dt.timedelta(days=days)).isoformat(timespec="milliseconds")
        cert_expired = bool(last_certified) and now >= _parse_ts(exp_at)
        stale_failure = (not last["certified"]) and now >= _parse_ts(self._concluded(last)) + _dt.timedelta(days=days)
        expired = cert_expired or stale_failure
        if last["certified"]:
            status = "expired" if cert_expired else "certified"
        else:
            status = "expired" if expired else "not_certified"
        ref = last_certified if cert_expired else (last if stale_failure else None)
        return {"status": status, "certified_now": bool(last["certified"]) and not cert_expired, "expired": expired,
                "expires_at": exp_at, "expired_certification": ref}

    @staticmethod
    def _now_dt(now: Any) -> _dt.datetime:
        if now is None:
            return _dt.datetime.now(_dt.timezone.utc)
        d = _parse_ts(now) if not isinstance(now, _dt.datetime) else (
            now if now.tzinfo else now.replace(tzinfo=_dt.timezone.utc))
        return d.astimezone(_dt.timezone.utc)

    @staticmethod
    def _fleet_hosts(hosts: list[dict] | None) -> dict[str, dict]:
        out: dict[str, dict] = {}
        for i, h in enumerate(hosts or []):
            if not isinstance(h, dict) or not h.get("name"):
                raise RegistryError(f"hosts[{i}]: each fleet host needs a 'name'")
            vd = _opt_int(h.get("valid_days"), f"hosts[{i}].valid_days")
            out[str(h["name"])] = {"name": str(h["name"]), "sku": h.get("sku"), "profile": h.get("profile"),
                                   "valid_days": vd}
        return out

    def _fleet_rows(self, conn) -> list[dict]:
        from sqlalchemy import func, select

        from .schema import alerts, certifications, hosts

        last = certifications.alias("last")
        lc = certifications.alias("lc")
        q = (select(hosts.c.name, hosts.c.sku, hosts.c.profile, hosts.c.cards, hosts.c.valid_days,
                    hosts.c.first_seen, hosts.c.last_seen,
                    last.c.id.label("l_id"), last.c.run_id.label("l_run_id"), last.c.result.label("l_result"),
                    last.c.certified.label("l_certified"), last.c.started.label("l_started"),
                    last.c.finished.label("l_finished"), last.c.registered_at.label("l_registered_at"),
                    last.c.expires_at.label("l_expires_at"), last.c.reasons.label("l_reasons"),
                    last.c.bundle_uri.label("l_bundle_uri"), last.c.trusted.label("l_trusted"),
                    last.c.report.label("l_report"), last.c.path.label("l_path"),
                    lc.c.id.label("c_id"), lc.c.run_id.label("c_run_id"), lc.c.started.label("c_started"),
                    lc.c.finished.label("c_finished"), lc.c.registered_at.label("c_registered_at"),
                    lc.c.expires_at.label("c_expires_at"), lc.c.certified.label("c_certified"))
             .select_from(hosts.outerjoin(last, last.c.id == hosts.c.last_certification_id)
                          .outerjoin(lc, lc.c.id == hosts.c.last_certified_id))
             .order_by(hosts.c.name))
        rows = [dict(r) for r in conn.execute(q).mappings()]
        counts = dict(conn.execute(select(alerts.c.host, func.count()).where(alerts.c.status == "open")
                                   .group_by(alerts.c.host)).all())
        for r in rows:
            r["open_alerts"] = int(counts.get(r["name"], 0))
        return rows

    @staticmethod
    def _split(r: dict, prefix: str) -> dict | None:
        if r.get(f"{prefix}id") is None:
            return None
        return {k[len(prefix):]: v for k, v in r.items() if k.startswith(prefix)}

    def fleet(self, now: Any = None, hosts: list[dict] | None = None) -> list[dict]:
        """One row per host (registered hosts, plus the fleet file's ``hosts`` never seen): last result,
        run id, finished, registered_at, age_s, expires_at, expired, open_alerts, certified_ever, status."""
        now_dt = self._now_dt(now)
        fleet_hosts = self._fleet_hosts(hosts)
        with self._tx(read=True) as conn:
            rows = self._fleet_rows(conn)
        out, seen = [], set()
        for r in rows:
            seen.add(r["name"])
            fh = fleet_hosts.get(r["name"], {})
            last, lcert = self._split(r, "l_"), self._split(r, "c_")
            vd = fh.get("valid_days") or r["valid_days"]
            st = self.expiry_state(last, lcert, vd, now_dt)
            out.append({
                "host": r["name"], "sku": r["sku"] or fh.get("sku"), "profile": r["profile"] or fh.get("profile"),
                "in_fleet": r["name"] in fleet_hosts if hosts is not None else None,
                "status": st["status"], "certified_now": st["certified_now"],
                "result": last["result"] if last else None, "certified": last["certified"] if last else None,
                "run_id": last["run_id"] if last else None, "path": last["path"] if last else None,
                "finished": last["finished"] if last else None,
                "registered_at": last["registered_at"] if last else None,
                "age_s": _age_s(self._concluded(last), now_dt), "expires_at": st["expires_at"],
                "expired": st["expired"], "open_alerts": r["open_alerts"], "certified_ever": lcert is not None,
                "last_certified_run_id": lcert["run_id"] if lcert else None,
                "reasons": last["reasons"] if last else [], "bundle_uri": last["bundle_uri"] if last else None,
                "trusted": last["trusted"] if last else None, "valid_days": vd,
            })
        for name, fh in fleet_hosts.items():
            if name in seen:
                continue
            out.append({"host": name, "sku": fh.get("sku"), "profile": fh.get("profile"), "in_fleet": True,
                        "status": "never_certified", "certified_now": False, "result": None, "certified": None,
                        "run_id": None, "path": None, "finished": None, "registered_at": None, "age_s": None,
                        "expires_at": None, "expired": False, "open_alerts": 0, "certified_ever": False,
                        "last_certified_run_id": None, "reasons": [], "bundle_uri": None, "trusted": None,
                        "valid_days": fh.get("valid_days")})
        out.sort(key=lambda x: x["host"])
        return out

    def audit_expiry(self, hosts: list[dict], now: Any = None) -> list[dict]:
        """For each fleet host (name, valid_days): no certification → a 'never_certified' alert; the
        newest CERTIFIED record past expires_at, or a newest NOT CERTIFIED result older than
        valid_days → an 'expired' alert. One alert per host and certification (re-running the audit
        raises nothing new). Returns the alerts raised now or still open."""
        now_dt = self._now_dt(now)
        fleet_hosts = self._fleet_hosts(hosts)
        with self._tx(read=True) as conn:
            rows = {r["name"]: r for r in self._fleet_rows(conn)}
        out = []
        for name, fh in fleet_hosts.items():
            r = rows.get(name)
            last, lcert = (self._split(r, "l_"), self._split(r, "c_")) if r else (None, None)
            st = self.expiry_state(last, lcert, fh.get("valid_days") or (r or {}).get("valid_days"), now_dt)
            if st["status"] == "never_certified":
                alert, _ = self._raise_once(host=name, run_id=None, suite=None, kind="never_certified",
                                            severity="warning",
                                            message=f"host {name} has no certification in the registry")
            elif st["expired"]:
                ref = st["expired_certification"]
                if ref is lcert:
                    msg = (f"host {name}: certification {ref['run_id']} expired at {st['expires_at']}"
                           + ("" if last and last["id"] == ref["id"] else
                              f" (newest run {last['run_id']} is {last['result']})"))
                else:
                    msg = (f"host {name}: newest run {ref['run_id']} is NOT CERTIFIED and older than "
                           f"{fh.get('valid_days') or (r or {}).get('valid_days') or DEFAULT_VALID_DAYS} days; "
                           "no valid certification")
                alert, _ = self._raise_once(host=name, run_id=ref["run_id"], suite=None, kind="expired",
                                            severity="error", message=msg, certification_id=ref["id"])
            else:
                continue
            if alert["status"] == "open":
                out.append(alert)
        return out

    def _raise_once(self, **kw) -> tuple[dict, bool]:
        existing = self._find_alert(kw["host"], kw.get("run_id"), kw.get("suite"), kw["kind"])
        if existing is not None:
            return existing, False
        return self.raise_alert(**kw)

    # ---- per-serial history ----
    def serial_history(self, serial: str) -> list[dict]:
        """Every certification of one GPU serial, oldest first, with drift flags. Raises
        :class:`~mi300x_cert.history.UnknownSerialError` when the registry has none."""
        from sqlalchemy import func, select

        from ..history import UnknownSerialError
        from .schema import card_results as cr, certifications as c, serials

        q = (select(cr, c.c.result, c.c.certified, c.c.profile, c.c.finished, c.c.bundle_uri, c.c.source,
                    c.c.trusted, c.c.path)
             .join(c, c.c.id == cr.c.certification_id).where(cr.c.serial == str(serial))
             .order_by(cr.c.date, cr.c.id))
        with self._tx(read=True) as conn:
            rows = [dict(r) for r in conn.execute(q).mappings()]
            if not rows:
                n = conn.execute(select(func.count()).select_from(serials)).scalar()
                raise UnknownSerialError(f"unknown serial {serial!r}: no certification of it in the registry "
                                         f"{self.masked_url} ({n} serial{'s' if n != 1 else ''} known; "
                                         "'mi300x-cert history' lists them)")
        return rows

    def list_serials(self) -> list[dict]:
        """Known serials: ``[{serial, sku, runs, last_date, last_host, last_card, last_run_id,
        last_certified, last_card_ok, last_drift}]`` sorted by serial."""
        from sqlalchemy import select

        from .schema import card_results as cr, certifications as c, serials as s

        q = (select(s.c.serial, s.c.sku, s.c.runs, s.c.last_date, cr.c.host.label("last_host"),
                    cr.c.card.label("last_card"), cr.c.run_id.label("last_run_id"),
                    c.c.certified.label("last_certified"), cr.c.card_ok.label("last_card_ok"),
                    cr.c.drift.label("last_drift"))
             .join(cr, cr.c.id == s.c.last_card_result_id).join(c, c.c.id == cr.c.certification_id)
             .order_by(s.c.serial))
        with self._tx(read=True) as conn:
            return [dict(r) for r in conn.execute(q).mappings()]

    # ---- alerts ----
    @staticmethod
    def _alert_id(host: str, run_id: str, suite: str, kind: str) -> str:
        digest = hashlib.sha256(f"{host}|{run_id}|{suite}|{kind}".encode()).hexdigest()[:10]
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        return f"{stamp}-{_safe(host)}-{_safe(suite or kind)}-{digest}"

    @staticmethod
    def _alert_out(r, events: list[dict] | None = None) -> dict:
        d = {k: r[k] for k in _ALERT_OUT}
        d["run_id"] = d["run_id"] or None
        d["suite"] = d["suite"] or None
        d["acknowledged"] = d["status"] == "acknowledged"
        if events is not None:
            d["events"] = events
        return d

    def _events(self, conn, ids: list[str]) -> dict[str, list[dict]]:
        from sqlalchemy import select

        from .schema import alert_events as ev

        out: dict[str, list[dict]] = {i: [] for i in ids}
        for chunk in range(0, len(ids), 500):
            part = ids[chunk:chunk + 500]
            for r in conn.execute(select(ev).where(ev.c.alert_id.in_(part)).order_by(ev.c.id)).mappings():
                out[r["alert_id"]].append({"action": r["action"], "by": r["by"], "at": r["at"], "note": r["note"]})
        return out

    def _alert(self, conn, alert_id: str) -> dict | None:
        from sqlalchemy import select

        from .schema import alerts

        r = conn.execute(select(alerts).where(alerts.c.id == alert_id)).mappings().first()
        return self._alert_out(r, self._events(conn, [alert_id])[alert_id]) if r else None

    def _find_alert(self, host, run_id, suite, kind) -> dict | None:
        from sqlalchemy import select

        from .schema import alerts

        with self._tx(read=True) as conn:
            r = conn.execute(select(alerts.c.id).where(alerts.c.host == host, alerts.c.run_id == (run_id or ""),
                                                       alerts.c.suite == (suite or ""), alerts.c.kind == kind)).first()
            return self._alert(conn, r[0]) if r else None

    def raise_alert(self, *, host: str, run_id: str | None, suite: str | None, kind: str, message: str,
                    failures: Iterable[dict] = (), severity: str = "error", dag_id: str | None = None,
                    report: str | None = None, data_docs: str | None = None, bundle_uri: str | None = None,
                    certification_id: int | None = None, by: str | None = None) -> tuple[dict, bool]:
        """Record an alert; idempotent on (host, run_id, suite, kind): a retry updates message, failures
        and links of the same record (its acknowledgement stays) and appends a 'raised' event.
        Returns ``(alert, created)``."""
        from sqlalchemy import func, select, update

        from .schema import alert_events, alerts

        host = _name(host, "alert.host")
        run_id = _name(run_id, "alert.run_id", required=False, max_len=250) or ""
        suite = _name(suite, "alert.suite", required=False, max_len=100) or ""
        if kind not in ALERT_KINDS:
            raise RegistryError(f"alert.kind: {kind!r} is not one of {', '.join(ALERT_KINDS)}")
        if severity not in SEVERITIES:
            raise RegistryError(f"alert.severity: {severity!r} is not one of {', '.join(SEVERITIES)}")
        failures = _jsonable(list(failures or []))
        message = str(message or "")
        cert_id = _opt_int(certification_id, "alert.certification_id")

        def tx(conn):
            now = _now()
            found = conn.execute(select(alerts.c.id).where(alerts.c.host == host, alerts.c.run_id == run_id,
                                                           alerts.c.suite == suite, alerts.c.kind == kind)).first()
            if found:
                aid = found[0]
                conn.execute(update(alerts).where(alerts.c.id == aid).values(
                    message=message or alerts.c.message, failures=failures, severity=severity,
                    dag_id=func.coalesce(dag_id, alerts.c.dag_id), report=func.coalesce(report, alerts.c.report),
                    data_docs=func.coalesce(data_docs, alerts.c.data_docs),
                    bundle_uri=func.coalesce(bundle_uri, alerts.c.bundle_uri),
                    certification_id=func.coalesce(cert_id, alerts.c.certification_id)))
                conn.execute(alert_events.insert().values(alert_id=aid, action="raised", by=by, at=now,
                                                          note="raised again (retry): record updated"))
                return self._alert(conn, aid), False
            aid = self._alert_id(host, run_id, suite, kind)
            conn.execute(alerts.insert().values(
                id=aid, host=host, run_id=run_id, dag_id=dag_id, suite=suite, kind=kind, severity=severity,
                created=now, message=message, failures=failures, report=report, data_docs=data_docs,
                bundle_uri=bundle_uri, certification_id=cert_id, status="open", note=""))
            conn.execute(alert_events.insert().values(alert_id=aid, action="raised", by=by, at=now, note=""))
            return self._alert(conn, aid), True

        return self._write(tx)

    def list_alerts(self, include_acknowledged: bool = False, host: str | None = None,
                    limit: int | None = None) -> list[dict]:
        """Alerts newest first, each with its ``events``."""
        from sqlalchemy import select

        from .schema import alerts

        q = select(alerts).order_by(alerts.c.created.desc(), alerts.c.id.desc())
        if not include_acknowledged:
            q = q.where(alerts.c.status == "open")
        if host:
            q = q.where(alerts.c.host == host)
        if limit is not None:
            q = q.limit(max(0, int(limit)))
        with self._tx(read=True) as conn:
            rows = list(conn.execute(q).mappings())
            ev = self._events(conn, [r["id"] for r in rows])
            return [self._alert_out(r, ev[r["id"]]) for r in rows]

    def get_alert(self, alert_id: str) -> dict:
        with self._tx(read=True) as conn:
            a = self._alert(conn, str(alert_id))
        if a is None:
            raise RegistryError(f"alert {alert_id!r} not found in the registry {self.masked_url}")
        return a

    def _set_status(self, alert_id: str, by: str, note: str, *, ack: bool) -> dict:
        from sqlalchemy import update

        from .schema import alert_events, alerts

        verb = "acknowledging" if ack else "reopening"
        by = _name(by, f"by ({verb} an alert needs a name)")
        alert_id = str(alert_id)

        def tx(conn):
            now = _now()
            values: dict[str, Any] = ({"status": "acknowledged", "acknowledged_by": by, "acknowledged_at": now,
                                       "note": note or ""} if ack else
                                      {"status": "open", "acknowledged_by": None, "acknowledged_at": None})
            if not ack and note:
                values["note"] = note
            n = conn.execute(update(alerts).where(alerts.c.id == alert_id).values(**values)).rowcount
            if not n:
                raise RegistryError(f"alert {alert_id!r} not found in the registry {self.masked_url}")
            conn.execute(alert_events.insert().values(alert_id=alert_id, action="acknowledged" if ack else "reopened",
                                                      by=by, at=now, note=note or ""))
            return self._alert(conn, alert_id)

        return self._write(tx)

    def acknowledge(self, alert_id: str, by: str, note: str = "") -> dict:
        """Acknowledge an alert (one transaction; every acknowledgement is kept as an event)."""
        return self._set_status(alert_id, by, note, ack=True)

    def reopen(self, alert_id: str, by: str, note: str = "") -> dict:
        return self._set_status(alert_id, by, note, ack=False)

    def update_run_links(self, host: str, run_id: str, report: str | None = None, data_docs: str | None = None,
                         bundle_uri: str | None = None) -> int:
        """Add report / Data Docs / bundle links to every alert of one run (and to its certification
        where a link is missing). Single UPDATE statements that touch only the link columns: a
        concurrent acknowledgement is never undone. Returns the number of alerts updated."""
        from sqlalchemy import func, literal, select, update

        from .schema import alert_events, alerts, certifications

        if not any((report, data_docs, bundle_uri)):
            return 0

        def tx(conn):
            where = (alerts.c.host == host, alerts.c.run_id == (run_id or ""))
            n = conn.execute(update(alerts).where(*where).values(
                report=func.coalesce(report, alerts.c.report), data_docs=func.coalesce(alerts.c.data_docs, data_docs),
                bundle_uri=func.coalesce(bundle_uri, alerts.c.bundle_uri))).rowcount
            if n:
                links = ", ".join(f"{k}={v}" for k, v in (("report", report), ("data_docs", data_docs),
                                                          ("bundle_uri", bundle_uri)) if v)
                conn.execute(alert_events.insert().from_select(
                    ["alert_id", "action", "by", "at", "note"],
                    select(alerts.c.id, literal("links"), literal(None), literal(_now()), literal(links)).where(*where)))
            conn.execute(update(certifications).where(certifications.c.host == host,
                                                      certifications.c.run_id == run_id).values(
                report=func.coalesce(certifications.c.report, report),
                data_docs=func.coalesce(certifications.c.data_docs, data_docs),
                bundle_uri=func.coalesce(certifications.c.bundle_uri, bundle_uri)))
            return n

        return self._write(tx)

    # ---- import of today's state directory ----
    def import_state_dir(self, path: str | Path) -> dict:
        """Bring a state directory's files in (see :mod:`mi300x_cert.registry.importer`)."""
        from .importer import import_state_dir

        return import_state_dir(self, path)


def create_database(url: str) -> bool:
    """Create the registry's PostgreSQL database when it does not exist (the compose stack's init and a
    bare-metal install call this through ``mi300x-cert registry upgrade --create-database``). Connects
    to the server's ``postgres`` maintenance database with the same credentials. Returns True when it
    created one; SQLite needs nothing (False)."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    url = normalise_url(url)
    if is_sqlite(url):
        return False
    u = make_url(url)
    name = u.database
    if not name or not re.fullmatch(r"[A-Za-z0-9_.-]{1,63}", name):
        raise RegistryError(f"registry URL {mask_url(url)}: database name {name!r} cannot be created safely")
    eng = create_engine(u.set(database="postgres"), isolation_level="AUTOCOMMIT", pool_pre_ping=True,
                        connect_args={"connect_timeout": 10} if u.get_backend_name() == "postgresql" else {})
    try:
        with eng.connect() as conn:
            if conn.execute(text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}).scalar():
                return False
            conn.execute(text(f'CREATE DATABASE "{name}"'))
            return True
    except SQLAlchemyError as e:
        raise RegistryError(f"registry database {name!r} cannot be created at {mask_url(url)}: {_short(e)}") from None
    finally:
        eng.dispose()


# ---- one Registry per URL per process -------------------------------------------------------------
_CACHE: dict[tuple[int, str], Registry] = {}
_CACHE_LOCK = threading.Lock()


def open_registry(url: str | None = None) -> Registry:
    """The process's :class:`Registry` for ``url`` (default :func:`registry_url`), opened once."""
    resolved = normalise_url(url) if url else registry_url()
    key = (os.getpid(), resolved)
    with _CACHE_LOCK:
        reg = _CACHE.get(key)
        if reg is None:
            reg = _CACHE[key] = Registry(resolved)
        return reg


def close_all() -> None:
    """Dispose every cached registry (tests; a forked child should not reuse its parent's pool)."""
    with _CACHE_LOCK:
        for reg in _CACHE.values():
            try:
                reg.close()
            except Exception:  # noqa: BLE001 - best effort
                pass
        _CACHE.clear()

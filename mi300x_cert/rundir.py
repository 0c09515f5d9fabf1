"""The run directory: everything one certification run measured, laid out so nothing is lost on a crash.

Layout (``RunDir.root``)::

    run.json                        identity and state: running | complete | failed (+ error); the
                                    experiments registered when the run was planned (experiments_registered)
    profile.yaml                    the resolved profile the run used
    inventory.json                  host, cards (serial, bus id, domain), driver and library versions
    results/<experiment>/cases/<case_id>.rows.csv      per-batch rows of one case (streamed as they arrive)
    results/<experiment>/cases/<case_id>.json          case status: ok | failed (+ reason), written last
    results/<experiment>/cases/<case_id>/proc<k>.log   worker stderr
    results/<experiment>/cases/attempts/               files of earlier, failed attempts of a case
    results/<experiment>/rows.csv                      measured rows of the experiment (written by finalize)
    results/<experiment>/warmup_rows.csv               warm-up rows (excluded from every statistic)
    telemetry/<stem>.csv            per-card samples (streamed)
    events/<stem>.csv               phase and batch markers (streamed)
    network/<stem>.csv              interface byte counters (streamed)
    sockets/<stem>.csv              connections opened by workload processes (streamed)
    netns/<stem>.csv                each worker's network namespace id and that namespace's interface counters
    stats/<table>.csv               Appendix A/B tables and the other experiments' summaries
    conditions.json                 the conditions of every figure/table, per experiment
    validation/ report/ bundle/     later steps

A case whose ``<case_id>.json`` exists with status ``ok`` is complete and is never run again, so a
retried task (or a restarted worker) only runs what is missing. Whole files are written atomically
(temporary file + rename); streamed CSVs are flushed line by line.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import os
import re
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Any, Iterable

from .errors import RunDirError

__all__ = ["RunDir", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "CsvStream", "read_json", "utcnow",
           "discard_new_run"]


RUN_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def utcnow() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise RunDirError(f"{path} is missing") from None
    except json.JSONDecodeError as e:
        raise RunDirError(f"{path} is not valid JSON: {e}") from None


class CsvStream:
    """Append rows to a CSV file, header first, flushed per row (thread-safe).

    Columns are fixed by the first row (or ``columns``); later keys outside them raise.
    """

    def __init__(self, path: Path, columns: list[str] | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._columns = list(columns) if columns else None
        exists = self.path.exists() and self.path.stat().st_size > 0
        if exists:
            with open(self.path, newline="") as f:
                header = next(csv.reader(f), None)
            self._columns = header
        self._f = open(self.path, "a", newline="", buffering=1)
        self._writer: csv.DictWriter | None = None
        self._header_written = exists
        if self._columns:
            self._make_writer()

    def _make_writer(self) -> None:
        self._writer = csv.DictWriter(self._f, fieldnames=self._columns, extrasaction="raise")
        if not self._header_written:
            self._writer.writeheader()
            self._header_written = True

    @property
    def columns(self) -> list[str] | None:
        return self._columns

    def write(self, row: dict) -> None:
        with self._lock:
            if self._writer is None:
                self._columns = list(row.keys())
                self._make_writer()
            self._writer.writerow({k: ("" if v is None else v) for k, v in row.items()})  # type: ignore[union-attr]
            self._f.flush()

    def write_many(self, rows: Iterable[dict]) -> None:
        for r in rows:
            self.write(r)

    def close(self) -> None:
        with self._lock:
            if not self._f.closed:
                self._f.flush()
                os.fsync(self._f.fileno())
                self._f.close()

    def __enter__(self) -> "CsvStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def discard_new_run(root: Path, keep_dir: bool = False) -> None:
    """Remove what :meth:`RunDir.create` (and the set-up right after it) wrote into a run directory
    that never started, so a failed start leaves nothing that looks like a run. ``keep_dir`` keeps
    the (then empty) directory itself when it existed before."""
    import shutil

    root = Path(root)
    if not root.is_dir():
        return
    if keep_dir:
        for child in root.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
    else:
        shutil.rmtree(root, ignore_errors=True)


class RunDir:
    """Accessor for one run directory. ``RunDir.create`` makes a new one; ``RunDir(path)`` opens one."""

    STATES = ("running", "complete", "failed")

    def __init__(self, root: Path | str):
        self.root = Path(root)
        if not (self.root / "run.json").is_file():
            raise RunDirError(f"{self.root} is not a run directory (no run.json)")

    # ---- creation and state ----------------------------------------------------------------
    @classmethod
    def create(cls, root: Path | str, *, host: str, profile_name: str, sku: str, profile_yaml: str,
               run_id: str | None = None, experiments_registered: Iterable[str] | None = None) -> "RunDir":
        """A new run directory. ``experiments_registered`` (default: every experiment registered now)
        is recorded in run.json: what a later version of the tool may treat as predated is only what
        was registered after this run was planned (:meth:`predated_experiments`)."""
        root = Path(root)
        if experiments_registered is None:
            from .experiments import experiment_names

            experiments_registered = experiment_names()
        registered = sorted({str(n) for n in experiments_registered})
        if (root / "run.json").exists():
            raise RunDirError(f"{root} already holds a run; choose a new --out, or finish that run with "
                              f"`mi300x-cert run --resume {root}` (or `mi300x-cert certify --resume {root}`)")
        if root.exists() and (not root.is_dir() or any(root.iterdir())):
            raise RunDirError(f"{root} exists and is not empty")
        existed = root.exists()
        if run_id is not None and not RUN_ID_RE.fullmatch(str(run_id)):
            raise RunDirError(f"run id {run_id!r} is not usable: letters, digits, '.', '_' and '-' only, "
                              "starting with a letter or digit, at most 128 characters (it names files and S3 keys)")
        run_id = run_id or _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:8]
        try:
            root.mkdir(parents=True, exist_ok=True)
            atomic_write_text(root / "profile.yaml", profile_yaml)
            atomic_write_json(root / "run.json", {
                "run_id": run_id, "host": host, "profile": profile_name, "sku": sku,
                "state": "running", "started": utcnow(), "finished": None, "error": None, "experiments": {},
                "experiments_registered": registered,
            })
        except BaseException as e:  # unwritable, disk full, interrupted: nothing half-made stays
            discard_new_run(root, keep_dir=existed)
            if isinstance(e, OSError):
                raise RunDirError(f"cannot create run directory {root}: {e.strerror or e}") from e
            raise
        return cls(root)

    @property
    def meta(self) -> dict:
        return read_json(self.root / "run.json")

    def _update_meta(self, **changes: Any) -> dict:
        meta = self.meta
        meta.update(changes)
        atomic_write_json(self.root / "run.json", meta)
        return meta

    @property
    def run_id(self) -> str:
        return self.meta["run_id"]

    @property
    def state(self) -> str:
        return self.meta["state"]

    def set_experiment_state(self, experiment: str, state: str, **info: Any) -> None:
        meta = self.meta
        meta.setdefault("experiments", {})[experiment] = {"state": state, "at": utcnow(), **info}
        atomic_write_json(self.root / "run.json", meta)

    def mark_complete(self) -> None:
        self._update_meta(state="complete", finished=utcnow(), error=None)

    def mark_failed(self, error: str) -> None:
        self._update_meta(state="failed", finished=utcnow(), error=error)

    def reopen(self) -> None:
        """Mark an interrupted or failed run ``running`` again before it is resumed; the earlier
        state and error are kept under ``resumed`` in run.json."""
        meta = self.meta
        meta.setdefault("resumed", []).append({"at": utcnow(), "state": meta.get("state"), "error": meta.get("error")})
        meta.update(state="running", finished=None, error=None)
        atomic_write_json(self.root / "run.json", meta)

    def require_complete(self) -> None:
        if self.state != "complete":
            hint = (f"; finish it with `mi300x-cert run --resume {self.root}`" if self.state in ("running", "failed") else "")
            raise RunDirError(f"run {self.root} is not complete (state: {self.state}; error: {self.meta.get('error')}){hint}")

    def load_profile(self):
        """The profile the run used (``profile.yaml``); RunDirError (one line, naming the field)
        when it is missing or no longer valid. The stored profile is the full resolved profile, one
        section per experiment registered when the run was planned: an experiment registered since
        (see :meth:`predated_experiments`) was not part of this run's plan and loads disabled,
        instead of taking today's default and demanding evidence the run could not have. Any other
        missing section takes the default (enabled) and fails for missing evidence."""
        from .config import load_profile
        from .errors import CertError

        path = self.root / "profile.yaml"
        if not path.is_file():
            raise RunDirError(f"{self.root} has no profile.yaml: cannot tell which experiments and thresholds apply")
        later = self.predated_experiments()
        try:
            return load_profile(path, overrides={"experiments": {n: {"enabled": False} for n in later}} if later else None)
        except CertError as e:
            gaps = [n for n in self._missing_sections() if n not in later]
            hint = (f" (its profile.yaml has no section for {', '.join(gaps)}, an experiment the run was planned "
                    "with: the section took today's defaults)") if gaps else ""
            raise RunDirError(f"the run's stored profile is not valid: {e}{hint}") from None

    def _missing_sections(self) -> list[str]:
        """Registered experiments with no section in the stored profile (predated or not)."""
        import yaml

        from .experiments import experiment_names

        try:
            data = yaml.safe_load((self.root / "profile.yaml").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            return []
        sections = data.get("experiments") if isinstance(data, dict) else None
        if not isinstance(sections, dict):
            return []
        return [n for n in experiment_names() if n not in sections]

    def predated_experiments(self) -> list[str]:
        """Registered experiments the run predates: registered now, not in the run's record of the
        experiments registered when it was planned (run.json ``experiments_registered``), and with no
        section in its stored profile. A run without that record (made before it existed) predates
        only experiments of :data:`mi300x_cert.experiments.PREDATED_WITHOUT_RECORD` whose section it lacks. A section missing
        for an experiment the record names is a malformed profile, not a predated experiment: it
        takes the default and fails closed."""
        from .experiments import PREDATED_WITHOUT_RECORD, experiment_names

        missing = self._missing_sections()  # [] when profile.yaml is unreadable: load_profile names that
        if not missing:
            return []
        try:
            meta = self.meta
        except RunDirError:
            return []
        if "experiments_registered" in meta:
            record = meta.get("experiments_registered")
            if not isinstance(record, list):
                return []  # an unreadable record predates nothing: every section takes the default
            known = {str(n) for n in record}
        else:
            known = set(experiment_names()) - PREDATED_WITHOUT_RECORD
        return [n for n in missing if n not in known]

    # ---- paths ----------------------------------------------------------------------------
    def path(self, *parts: str) -> Path:
        p = self.root.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def experiment_dir(self, experiment: str) -> Path:
        d = self.root / "results" / experiment
        (d / "cases").mkdir(parents=True, exist_ok=True)
        return d

    def case_rows_path(self, experiment: str, case_id: str) -> Path:
        return self.experiment_dir(experiment) / "cases" / f"{case_id}.rows.csv"

    def case_status_path(self, experiment: str, case_id: str) -> Path:
        return self.experiment_dir(experiment) / "cases" / f"{case_id}.json"

    def case_status(self, experiment: str, case_id: str) -> dict | None:
        p = self.case_status_path(experiment, case_id)
        return read_json(p) if p.exists() else None

    def case_done(self, experiment: str, case_id: str) -> bool:
        st = self.case_status(experiment, case_id)
        return bool(st and st.get("status") == "ok")

    def write_case_status(self, experiment: str, case_id: str, status: str, **info: Any) -> None:
        atomic_write_json(self.case_status_path(experiment, case_id), {"case_id": case_id, "status": status, "at": utcnow(), **info})

    def stream(self, kind: str, stem: str, columns: list[str] | None = None) -> CsvStream:
        """A streamed CSV under ``telemetry/``, ``events/``, ``network/``, ``sockets/`` or ``netns/``."""
        if kind not in ("telemetry", "events", "network", "sockets", "netns"):
            raise ValueError(kind)
        return CsvStream(self.root / kind / f"{stem}.csv", columns)

    def write_json(self, rel: str, obj: Any) -> Path:
        p = self.root / rel
        atomic_write_json(p, obj)
        return p

    def write_text(self, rel: str, text: str) -> Path:
        p = self.root / rel
        atomic_write_text(p, text)
        return p

    def read_json(self, rel: str) -> Any:
        return read_json(self.root / rel)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"


def csv_text(rows: list[dict], columns: list[str] | None = None) -> str:
    buf = io.StringIO()
    if not rows and not columns:
        return ""
    w = csv.DictWriter(buf, fieldnames=columns or list(rows[0].keys()))
    w.writeheader()
    for r in rows:
        w.writerow(r)
    return buf.getvalue()

"""Great Expectations Core 1.x plumbing: one file context per validate call.

Layout under ``<run_dir>/validation/``::

    gx/great_expectations.yml
    gx/expectations/<suite>.json          copied from the repository's expectations/<suite>.json
    gx/uncommitted/data_docs/local_site/index.html    Data Docs (UpdateDataDocsAction)

Each suite gets a pandas dataframe asset, a whole-dataframe batch definition, a
ValidationDefinition and a Checkpoint whose ``result_format`` is COMPLETE with the frame's
``subject`` column as ``unexpected_index_column_names``, so every unexpected row comes back
with the label of what failed (``card 13 active``, ``N=4 8x64``).

Fail closed: the suite file is loaded through GX's own suite store — the path on which GX logs
and silently DROPS an expectation it cannot build (an unknown or unimported custom type) — and
the number loaded is compared with ``meta.declared_expectations`` stored in the suite file.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any

from ..errors import ValidationError

__all__ = ["GXRunner", "DATA_DOCS_REL", "suite_parameters", "load_suite_file"]

DATA_DOCS_REL = "validation/gx/uncommitted/data_docs/local_site/index.html"
MAX_ROW_FAILURES = 50  # per expectation; the count of the rest is reported


def load_suite_file(path: Path) -> dict:
    """Read and sanity-check a suite JSON file (raises ValidationError naming the file)."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValidationError(f"suite file {path} is missing") from None
    except json.JSONDecodeError as e:
        raise ValidationError(f"suite file {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("expectations"), list):
        raise ValidationError(f"suite file {path}: needs an 'expectations' list")
    return data


def suite_parameters(data: Any) -> set[str]:
    """Every ``{"$PARAMETER": name}`` the suite references."""
    found: set[str] = set()
    if isinstance(data, dict):
        if set(data) == {"$PARAMETER"}:
            found.add(str(data["$PARAMETER"]))
        else:
            for v in data.values():
                found |= suite_parameters(v)
    elif isinstance(data, list):
        for v in data:
            found |= suite_parameters(v)
    return found


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.messages.append(record.getMessage())
        except Exception:  # pragma: no cover
            pass


def _jsonable(v: Any) -> Any:
    if v is None:
        return None
    if hasattr(v, "item") and not isinstance(v, (list, dict, str)):
        try:
            v = v.item()
        except Exception:
            pass
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return None if math.isnan(v) else str(v)
    if isinstance(v, (str, int, float, bool)):
        return v
    if isinstance(v, (list, tuple, set)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return str(v)


class GXRunner:
    """One GX file context rooted at ``<run_dir>/validation`` for the length of one validate call."""

    def __init__(self, run_dir: Path | str):
        os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")  # never phone home (network isolation)
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        self.gx = gx
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / "validation"
        self.root.mkdir(parents=True, exist_ok=True)
        for name in ("great_expectations", "great_expectations.core", "great_expectations.data_context"):
            logging.getLogger(name).setLevel(logging.WARNING)
        try:
            self.ctx = gx.get_context(mode="file", project_root_dir=str(self.root))
            if self.ctx.variables.progress_bars is None or self.ctx.config.analytics_enabled is not False:
                self.ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
                self.ctx.config.analytics_enabled = False
                self.ctx.variables.save()
            self.datasource = self.ctx.data_sources.add_or_update_pandas("run")
        except Exception as e:
            raise ValidationError(f"cannot open the GX context in {self.root}/gx: {type(e).__name__}: {e}") from e

    @property
    def data_docs(self) -> Path:
        return self.run_dir / DATA_DOCS_REL

    # ---- suites -----------------------------------------------------------------------------
    def load_suite(self, name: str, source: Path) -> tuple[Any, dict]:
        """Copy ``source`` into the GX suite store and load it back through GX.

        Returns (suite or None, info) with info = {declared, loaded, dropped, problems}.
        """
        info: dict[str, Any] = {"declared": None, "loaded": 0, "dropped": [], "problems": []}
        data = load_suite_file(source)
        declared = (data.get("meta") or {}).get("declared_expectations")
        if not isinstance(declared, int) or isinstance(declared, bool):
            info["problems"].append(f"suite {source.name}: meta.declared_expectations is missing or not an integer")
        else:
            info["declared"] = declared
        if data.get("name") != name:
            info["problems"].append(f"suite {source.name}: name is {data.get('name')!r}, expected {name!r}")
        store_dir = self.root / "gx" / "expectations"
        store_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, store_dir / f"{name}.json")
        cap = _Capture()
        gx_logger = logging.getLogger("great_expectations")
        gx_logger.addHandler(cap)
        try:
            suite = self.ctx.suites.get(name)
        except Exception as e:
            info["problems"].append(f"suite {name} could not be loaded by GX: {type(e).__name__}: {e}")
            return None, info
        finally:
            gx_logger.removeHandler(cap)
        loaded_types = [e.expectation_type for e in suite.expectations]
        info["loaded"] = len(loaded_types)
        file_types = [str(e.get("type")) for e in data["expectations"] if isinstance(e, dict)]
        remaining = list(loaded_types)
        for t in file_types:
            if t in remaining:
                remaining.remove(t)
            else:
                info["dropped"].append(t)
        if info["declared"] is not None and info["loaded"] != info["declared"]:
            why = f" (dropped by GX: {', '.join(info['dropped'])})" if info["dropped"] else ""
            logs = f"; GX said: {' | '.join(m[:200] for m in cap.messages[:3])}" if cap.messages else ""
            info["problems"].append(
                f"suite {name} declares {info['declared']} expectations but {info['loaded']} loaded{why}{logs}")
        return suite, info

    # ---- running ----------------------------------------------------------------------------
    def run(self, name: str, suite: Any, df: Any, params: dict) -> list[dict]:
        """Validate ``df`` against ``suite`` through a Checkpoint (Data Docs updated); returns the
        per-expectation results as plain dicts."""
        gx = self.gx
        try:
            asset = self.datasource.get_asset(name)
        except (LookupError, Exception):
            asset = self.datasource.add_dataframe_asset(name)
        try:
            batch_def = asset.get_batch_definition(name)
        except (KeyError, LookupError, Exception):
            batch_def = asset.add_batch_definition_whole_dataframe(name)
        try:
            vd = self.ctx.validation_definitions.add_or_update(
                gx.ValidationDefinition(name=name, data=batch_def, suite=suite))
            cp = self.ctx.checkpoints.add_or_update(gx.Checkpoint(
                name=name, validation_definitions=[vd],
                actions=[gx.checkpoint.UpdateDataDocsAction(name="update_data_docs")],
                result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["subject"]},
            ))
            result = cp.run(batch_parameters={"dataframe": df}, expectation_parameters=params)
        except Exception as e:
            raise ValidationError(f"GX could not run suite {name}: {type(e).__name__}: {e}") from e
        from .offline import make_offline

        make_offline(self.data_docs.parent)  # the CDN assets GX links → local copies (air-gapped sites)
        out: list[dict] = []
        for vr in result.run_results.values():
            for r in vr.results:
                out.append(_jsonable(r.to_json_dict()))
        return out


def exception_message(res: dict) -> str | None:
    info = res.get("exception_info") or {}
    if isinstance(info, dict) and info.get("raised_exception"):
        return str(info.get("exception_message"))
    if isinstance(info, dict):
        msgs = [v.get("exception_message") for v in info.values() if isinstance(v, dict) and v.get("raised_exception")]
        if msgs:
            return "; ".join(dict.fromkeys(str(m) for m in msgs))
    return None

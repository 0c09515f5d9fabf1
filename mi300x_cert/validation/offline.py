"""Great Expectations Data Docs that work offline (certification sites are air-gapped).

GX 1.24 renders pages that load Bootstrap, jQuery, Popper, bootstrap-table, bootstrap-datepicker,
Font Awesome and Vega from public CDNs, and its logo from an S3 bucket of the GX project. Offline
those pages render empty and unstyled. :func:`make_offline` copies the same libraries, shipped with
this package under ``static/vendor/`` (taken from the npm registry, licences beside each; see
``static/vendor/VENDOR.md``), into the Data Docs site as ``static/vendor/`` and rewrites every page's
and stylesheet's asset URLs to **relative** paths, so a page works from a run directory on disk and
from S3 through the console alike. Links to GX's web site (documentation, newsletter form) are
dropped. Vega is copied only when a page draws a chart (none of this project's suites do; the
script tags are removed otherwise). Idempotent: runs after every Data Docs update.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

__all__ = ["make_offline", "VENDOR_DIR", "ASSET_MAP", "external_assets"]

VENDOR_DIR = Path(__file__).resolve().parent / "static" / "vendor"

# CDN URL (without query) → path under the site's static/vendor/ (None: the GX logo → static/images)
ASSET_MAP: dict[str, str] = {
    "https://maxcdn.bootstrapcdn.com/bootstrap/4.3.1/css/bootstrap.min.css": "bootstrap-4.3.1/css/bootstrap.min.css",
    "https://stackpath.bootstrapcdn.com/bootstrap/4.3.1/js/bootstrap.min.js": "bootstrap-4.3.1/js/bootstrap.min.js",
    "https://unpkg.com/bootstrap-table@1.19.1/dist/bootstrap-table.min.css": "bootstrap-table-1.19.1/bootstrap-table.min.css",
    "https://unpkg.com/bootstrap-table@1.19.1/dist/bootstrap-table.min.js": "bootstrap-table-1.19.1/bootstrap-table.min.js",
    "https://unpkg.com/bootstrap-table@1.19.1/dist/extensions/filter-control/bootstrap-table-filter-control.min.js":
        "bootstrap-table-1.19.1/extensions/filter-control/bootstrap-table-filter-control.min.js",
    "https://unpkg.com/bootstrap-table@1.19.0/dist/extensions/filter-control/bootstrap-table-filter-control.css":
        "bootstrap-table-1.19.1/extensions/filter-control/bootstrap-table-filter-control.min.css",
    "https://unpkg.com/bootstrap-table@1.19.0/dist/extensions/filter-control/bootstrap-table-filter-control.min.css":
        "bootstrap-table-1.19.1/extensions/filter-control/bootstrap-table-filter-control.min.css",
    "https://unpkg.com/bootstrap-table@1.19.1/dist/extensions/filter-control/bootstrap-table-filter-control.min.css":
        "bootstrap-table-1.19.1/extensions/filter-control/bootstrap-table-filter-control.min.css",
    "https://cdnjs.cloudflare.com/ajax/libs/bootstrap-datepicker/1.9.0/css/bootstrap-datepicker.min.css":
        "bootstrap-datepicker-1.9.0/css/bootstrap-datepicker.min.css",
    "https://cdnjs.cloudflare.com/ajax/libs/bootstrap-datepicker/1.9.0/js/bootstrap-datepicker.min.js":
        "bootstrap-datepicker-1.9.0/js/bootstrap-datepicker.min.js",
    "https://cdn.jsdelivr.net/npm/@forevolve/bootstrap-dark@1.1.0/dist/css/bootstrap-prefers-dark.css":
        "bootstrap-dark-1.1.0/css/bootstrap-prefers-dark.css",
    "https://cdnjs.cloudflare.com/ajax/libs/font-awesome/6.6.0/css/all.min.css": "fontawesome-free-6.6.0/css/all.min.css",
    "https://code.jquery.com/jquery-3.7.1.min.js": "jquery-3.7.1/jquery.min.js",
    "https://cdnjs.cloudflare.com/ajax/libs/popper.js/1.12.9/umd/popper.min.js": "popper.js-1.12.9/umd/popper.min.js",
    "https://cdn.jsdelivr.net/npm/vega@5": "vega-5.33.1/vega.min.js",
    "https://cdn.jsdelivr.net/npm/vega-lite@5": "vega-lite-5.23.0/vega-lite.min.js",
    "https://cdn.jsdelivr.net/npm/vega-embed@6": "vega-embed-6.29.0/vega-embed.min.js",
}
_GX_ASSETS = "https://great-expectations-web-assets.s3.us-east-2.amazonaws.com/"
_VEGA = ("vega-5.33.1", "vega-lite-5.23.0", "vega-embed-6.29.0")

# an asset reference: src/href attribute or CSS url(), absolute http(s)
_ASSET_RE = re.compile(r"""(?:\b(?:src|href)\s*=\s*["']?|url\(\s*["']?)\s*((?:https?:)?//[^"')\s>]+)""", re.I)
_TAG_RE = re.compile(r"<(script|link|img|source|iframe)\b[^>]*>", re.I)
_A_EXTERNAL_RE = re.compile(r"""(<a\b[^>]*?)\s+href\s*=\s*["']https?://[^"']*["']""", re.I)
_FORM_EXTERNAL_RE = re.compile(r"""<form\b[^>]*action\s*=\s*["']https?://.*?</form>""", re.I | re.S)


def external_assets(text: str) -> list[str]:
    """Every absolute http(s) or scheme-relative (``//host/…``) URL the page or stylesheet would
    *load*: ``src``/``href`` of script, link, img, source and iframe tags, and CSS ``url(…)`` (data:
    URIs, XML namespaces and links a reader may follow are not loads)."""
    out: list[str] = []
    for tag in _TAG_RE.finditer(text):
        out += [m.group(1) for m in _ASSET_RE.finditer(tag.group(0))]
    out += re.findall(r"""url\(\s*["']?((?:https?:)?//[^"')\s]+)""", text, re.I)
    return out


def _needs_vega(text: str) -> bool:
    return "vegaEmbed(" in text


def _rel(from_file: Path, site: Path, target: str) -> str:
    return Path(os.path.relpath(site / target, from_file.parent)).as_posix()


def _rewrite(text: str, page: Path, site: Path, keep_vega: bool) -> str:
    def repl_url(url: str) -> str | None:
        base = url.split("?", 1)[0]
        if base in ASSET_MAP:
            return _rel(page, site, "static/vendor/" + ASSET_MAP[base])
        if base.startswith(_GX_ASSETS):
            return _rel(page, site, "static/images/logo-long.png")
        return None

    if not keep_vega:  # no chart on this page: drop the three Vega script tags
        text = re.sub(r"""<script[^>]*src=["']https://cdn\.jsdelivr\.net/npm/vega[^"']*["'][^>]*>\s*</script>\s*""", "",
                      text, flags=re.I)

    def sub(m: re.Match) -> str:
        new = repl_url(m.group(1))
        return m.group(0) if new is None else m.group(0).replace(m.group(1), new)

    text = _ASSET_RE.sub(sub, text)
    text = _FORM_EXTERNAL_RE.sub("", text)       # GX's newsletter sign-up form posts to its web site
    text = _A_EXTERNAL_RE.sub(r"\1", text)       # links to GX's web site: text kept, link dropped
    return text


def make_offline(site_dir: str | Path) -> dict:
    """Vendor the libraries into ``site_dir/static/vendor`` and rewrite every HTML/CSS file of the
    site to use them. Returns ``{"pages", "vega", "external"}`` (external: URLs still loaded from
    outside, which must be empty). The per-suite validation tasks of one run may call this at the
    same time: one at a time (a lock file in the temp dir), each file replaced atomically."""
    import fcntl

    site = Path(site_dir)
    if not site.is_dir():
        return {"pages": 0, "vega": False, "external": []}
    import hashlib
    import tempfile

    key = hashlib.sha256(str(site.resolve()).encode()).hexdigest()[:16]
    # the lock lives outside the run directory: everything inside it is signed into the bundle
    with open(Path(tempfile.gettempdir()) / f"mi300x-cert-offline-{key}.lock", "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            return _make_offline(site)
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _make_offline(site: Path) -> dict:
    files = sorted(p for p in site.rglob("*") if p.suffix in (".html", ".css") and p.is_file()
                   and "vendor" not in p.relative_to(site).parts)
    texts = {p: p.read_text(encoding="utf-8", errors="replace") for p in files}
    vega = any(_needs_vega(t) for t in texts.values())
    dest = site / "static" / "vendor"
    for item in VENDOR_DIR.iterdir():
        if item.is_dir() and (vega or item.name not in _VEGA):
            shutil.copytree(item, dest / item.name, dirs_exist_ok=True)
        elif item.is_file():
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy2(item, dest / item.name)
    external: list[str] = []
    for p, t in texts.items():
        new = _rewrite(t, p, site, vega)
        if new != t:
            _write(p, new)
        external += [f"{p.relative_to(site).as_posix()}: {u}" for u in external_assets(new)]
    return {"pages": len(files), "vega": vega, "external": external}

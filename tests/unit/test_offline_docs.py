"""Data Docs offline: every CDN asset GX links has a vendored copy with its licence, pages are rewritten
to relative local paths (any depth), Vega only where a chart is drawn, idempotent."""

from __future__ import annotations

import re
from pathlib import Path

from mi300x_cert.validation.offline import ASSET_MAP, VENDOR_DIR, external_assets, make_offline

PAGE = """<html><head>
<link rel="stylesheet" href="https://maxcdn.bootstrapcdn.com/bootstrap/4.3.1/css/bootstrap.min.css"/>
<link rel="stylesheet" href="https://cdnjs.cloudflare.com/ajax/libs/font-awesome/6.6.0/css/all.min.css">
<script src="https://code.jquery.com/jquery-3.7.1.min.js"></script>
<script src="https://cdn.jsdelivr.net/npm/vega@5"></script>
<script src="https://cdn.jsdelivr.net/npm/vega-lite@5"></script>
<script src="https://cdn.jsdelivr.net/npm/vega-embed@6"></script>
<style>.x{background: url('https://great-expectations-web-assets.s3.us-east-2.amazonaws.com/full_logo_dark.png')}</style>
</head><body><img src="https://great-expectations-web-assets.s3.us-east-2.amazonaws.com/logo-long.png?d=1&x=2">
<a href="https://docs.greatexpectations.io/docs/x">docs</a>
<form action="https://greatexpectations.io/newsletter"><input name="e"></form>
<svg xmlns="http://www.w3.org/2000/svg"></svg>%s</body></html>"""


def test_every_cdn_asset_of_the_installed_gx_is_vendored_with_a_licence():
    import great_expectations

    root = Path(great_expectations.__file__).parent / "render"
    urls = set()
    for p in list(root.rglob("*.j2")) + list(root.rglob("*.html")):
        urls |= set(re.findall(r"""(?:src|href)=["'](https?://(?:cdn|unpkg|code\.jquery|maxcdn|stackpath)[^"']+)""",
                               p.read_text(errors="replace")))
    assert urls, "GX's templates link no CDN asset any more: check offline.py"
    missing = sorted(u for u in urls if u.split("?")[0] not in ASSET_MAP)
    assert missing == [], f"GX links assets the project does not ship: {missing}"
    for target in ASSET_MAP.values():
        assert (VENDOR_DIR / target).is_file(), target
        top = VENDOR_DIR / target.split("/")[0]
        assert any(top.glob("LICENSE*")), f"{top.name} has no licence file"
    assert (VENDOR_DIR / "VENDOR.md").is_file()
    for css in VENDOR_DIR.rglob("*.css"):  # the vendored stylesheets load nothing from outside either
        assert external_assets(css.read_text(errors="replace")) == [], css


def test_pages_are_rewritten_to_relative_local_copies(tmp_path):
    site = tmp_path / "local_site"
    (site / "validations" / "a" / "b").mkdir(parents=True)
    (site / "static" / "styles").mkdir(parents=True)
    (site / "index.html").write_text(PAGE % "")
    (site / "validations" / "a" / "b" / "deep.html").write_text(PAGE % "")
    (site / "static" / "styles" / "s.css").write_text(
        ".n{background:url('https://great-expectations-web-assets.s3.us-east-2.amazonaws.com/full_logo_dark.png')}")
    out = make_offline(site)
    assert out["external"] == [] and out["vega"] is False and out["pages"] == 3
    index = (site / "index.html").read_text()
    assert 'href="static/vendor/bootstrap-4.3.1/css/bootstrap.min.css"' in index
    assert 'src="static/vendor/jquery-3.7.1/jquery.min.js"' in index
    assert 'src="static/images/logo-long.png"' in index
    assert "vega" not in index and "newsletter" not in index and "<a>docs</a>" in index
    deep = (site / "validations" / "a" / "b" / "deep.html").read_text()
    assert 'href="../../../static/vendor/bootstrap-4.3.1/css/bootstrap.min.css"' in deep
    assert "url('../images/logo-long.png')" in (site / "static" / "styles" / "s.css").read_text()
    assert (site / "static/vendor/fontawesome-free-6.6.0/webfonts/fa-solid-900.woff2").is_file()
    assert not (site / "static/vendor/vega-5.33.1").exists()
    for p in site.rglob("*.html"):
        assert external_assets(p.read_text()) == [], p
    before = {p: p.read_bytes() for p in site.rglob("*.html")}
    assert make_offline(site)["external"] == []
    assert before == {p: p.read_bytes() for p in site.rglob("*.html")}, "a second pass changes nothing"


def test_vega_is_kept_where_a_page_draws_a_chart(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text(PAGE % "<script>vegaEmbed('#c', spec)</script>")
    out = make_offline(site)
    assert out["vega"] and out["external"] == []
    text = (site / "index.html").read_text()
    assert 'src="static/vendor/vega-5.33.1/vega.min.js"' in text
    assert (site / "static/vendor/vega-embed-6.29.0/vega-embed.min.js").is_file()


def test_the_detector_sees_loads_not_namespaces():
    assert external_assets('<svg xmlns="http://www.w3.org/2000/svg"></svg><a href="https://x.org">x</a>') == []
    assert external_assets('<img src="https://x.org/a.png">') == ["https://x.org/a.png"]
    assert external_assets("<style>b{background:url(http://x.org/b.png)}</style>") == ["http://x.org/b.png"]
    assert external_assets("<link rel=stylesheet href='//cdn.x/y.css'>") == ["//cdn.x/y.css"]  # scheme-relative
    assert external_assets('<script src="static/vendor/x.js"></script>') == []

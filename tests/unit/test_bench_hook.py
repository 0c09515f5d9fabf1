"""The bench is developer tooling of the checkout: the package never imports it, and the CLI's
``bench`` subcommand is a thin hook that finds ``bench/cli.py`` only in a checkout."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_the_package_never_imports_the_bench():
    for p in (REPO / "mi300x_cert").rglob("*.py"):
        text = p.read_text()
        assert not re.search(r"^\s*(from bench|import bench)\b", text, re.M), p
    assert not (REPO / "mi300x_cert" / "bench.py").exists()
    assert (REPO / "bench" / "cli.py").is_file()


def test_bench_hook_outside_a_checkout_says_how(monkeypatch, tmp_path):
    from mi300x_cert import cli, config
    from mi300x_cert.errors import CertError

    monkeypatch.setattr(config, "REPO_ROOT", tmp_path)
    with pytest.raises(CertError, match=r"python -m bench\.cli"):
        cli.cmd_bench(argparse.Namespace(rest=["--help"]))

"""One set of temperature conversions for suites, verdict text and the report."""

import math

import pytest

from mi300x_cert.units import c_to_f, dc_to_df, f_to_c, format_c, format_dc


def test_conversions():
    assert c_to_f(100) == 212 and c_to_f(-40) == -40 and f_to_c(212) == 100
    assert dc_to_df(10) == 18  # a difference has no +32
    assert f_to_c(c_to_f(37.5)) == pytest.approx(37.5)


def test_formatting_and_missing_values():
    assert format_c(51) == "51.0 °C (123.8 °F)"
    assert format_dc(10) == "10.0 °C (18.0 °F)"
    for missing in (None, "n/a", math.nan):
        assert format_c(missing) == "" and format_dc(missing, missing="?") == "?"


def test_validation_and_report_use_them():
    from mi300x_cert.report.html import c_f
    from mi300x_cert.validation import _temp_formatter

    assert c_f(51) == format_c(51) and c_f(None) == ""
    assert _temp_formatter("°C")(51) == format_c(51)
    assert _temp_formatter("Δ°C")(10) == format_dc(10)
    assert _temp_formatter("°C")(None) == "None"  # shown as is, never a made-up temperature

"""Package-level contracts: the error tree, __all__, and light imports."""

import importlib
import subprocess
import sys

import pytest

import mi300x_cert.errors as errors

MODULES = ["mi300x_cert.errors", "mi300x_cert.config", "mi300x_cert.rundir", "mi300x_cert.pipeline", "mi300x_cert.certify"]


@pytest.mark.parametrize("name", MODULES)
def test_all_names_exist(name):
    mod = importlib.import_module(name)
    assert mod.__all__, name
    for attr in mod.__all__:
        assert hasattr(mod, attr), f"{name}.__all__ names missing {attr}"


def test_every_error_is_a_cert_error():
    for name in errors.__all__:
        obj = getattr(errors, name)
        if isinstance(obj, type):
            assert issubclass(obj, errors.CertError)
    assert issubclass(errors.VerifyError, errors.BundleError)


def test_core_imports_stay_light():
    code = (
        "import sys, mi300x_cert.pipeline, mi300x_cert.config, mi300x_cert.cli, mi300x_cert.certify;"
        "heavy=[m for m in ('torch','diffusers','transformers','great_expectations','boto3','airflow','matplotlib') if m in sys.modules];"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"heavy modules imported by the core: {out}"

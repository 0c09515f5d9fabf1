"""mi300x-cert: certify that a GPU server does what its vendor promises.

The package is importable without Airflow, torch, Great Expectations or boto3: each of those is
imported lazily inside the function that needs it.
"""

__all__ = ["__version__"]

__version__ = "0.1.0"

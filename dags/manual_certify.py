"""Manual certify run with a typed trigger form (``manual_certify``).

Form fields, their checks and the hand-over to ``recertify_<host>`` are built by
:func:`mi300x_cert.airflow_dags.build_manual_dag`.
"""

from pathlib import Path

from mi300x_cert.airflow_dags import build_manual_dag

dag = build_manual_dag(Path(__file__).stem.removeprefix("manual_"))

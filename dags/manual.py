"""Manual runs with a typed trigger form: ``manual_certify`` and one ``manual_<experiment>`` per
registered experiment (:mod:`mi300x_cert.experiments`).

Form fields, their checks and the hand-over to ``recertify_<host>`` are built by
:func:`mi300x_cert.airflow_dags.build_manual_dag`.
"""

from mi300x_cert.airflow_dags import MANUAL_EXPERIMENTS, build_manual_dag

for _kind in MANUAL_EXPERIMENTS:
    globals()[f"manual_{_kind}"] = build_manual_dag(_kind)

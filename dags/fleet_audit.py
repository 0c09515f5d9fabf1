"""Daily fleet audit (``fleet_audit``): alerts on hosts whose certificate expired or never existed.

Runs on the control plane; built by :func:`mi300x_cert.airflow_dags.build_fleet_audit_dag`.
"""

from mi300x_cert.airflow_dags import build_fleet_audit_dag

dag = build_fleet_audit_dag()

"""Recertification DAGs: one ``recertify_<host>`` per server of ``include/fleet.yaml``.

The task chain, queues, pools and alerting live in :mod:`mi300x_cert.airflow_dags`; this file only
registers one DAG per fleet host (``schedule`` from the fleet, ``catchup=False``, ``max_active_runs=1``).
"""

from mi300x_cert.airflow_dags import build_recertify_dags

for _dag_id, _dag in build_recertify_dags().items():
    globals()[_dag_id] = _dag

"""Recertification DAGs: one ``recertify_<host>`` per server of ``include/fleet.yaml``.

The task chain, queues, pools and alerting live in :mod:`mi300x_cert.airflow_dags`; this file only
registers one DAG per fleet host (``schedule`` from the fleet, ``catchup=False``, ``max_active_runs=1``).

The fleet is split over this file (shard 0) and ``recertify_1.py`` … ``recertify_15.py`` by a stable
hash of the host name, so that every file of a large fleet parses well within Airflow's import
timeout and the dag-processor parses them in parallel. All sixteen files are deployed together; this
file refuses to load when one of the others is missing.
"""

from mi300x_cert.airflow_dags import build_recertify_dags

for _dag_id, _dag in build_recertify_dags(dag_file=__file__).items():
    globals()[_dag_id] = _dag

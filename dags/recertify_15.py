"""Recertification DAGs, shard 15 of the fleet: the ``recertify_<host>`` DAGs of the hosts whose name hashes here.

See ``recertify.py`` (shard 0) and :func:`mi300x_cert.airflow_dags.build_recertify_dags`.
"""

from mi300x_cert.airflow_dags import build_recertify_dags

for _dag_id, _dag in build_recertify_dags(dag_file=__file__).items():
    globals()[_dag_id] = _dag

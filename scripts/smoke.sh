#!/usr/bin/env bash
# Smoke certification end to end on the embedded default: simulated 16-card box, tiny synthetic
# models, a fresh local Airflow home (SQLite, LocalExecutor) and a local S3 endpoint on loopback.
# Prints where the run directory, report, Data Docs and the signed bundle (local and in S3) are.
source "$(dirname "$0")/_env.sh"
exec mi300x-cert airflow-smoke "$@"

#!/usr/bin/env bash
# An MLflow tracking server with a sqlite store and served artifacts.
#   bash clusters/mlflow-server.sh [ROOT=/var/lib/mlflow] [PORT=5000] [HOST=127.0.0.1]
# It binds 127.0.0.1 unless told otherwise: put an authenticating proxy in front before exposing it.
set -euo pipefail
root=${1:-/var/lib/mlflow}
port=${2:-5000}
host=${3:-127.0.0.1}
mkdir -p "$root/artifacts"
# No server-side jobs (MLflow 3's GenAI scorers and trace upkeep; lsep_tune uses none): five processes
# fewer, ~20 s less CPU at each start. Export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true to keep them.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}
exec mlflow server \
    --backend-store-uri "sqlite:///$root/mlflow.db" \
    --artifacts-destination "$root/artifacts" \
    --host "$host" --port "$port"

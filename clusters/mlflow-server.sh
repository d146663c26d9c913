#!/usr/bin/env bash
# An MLflow tracking server with a sqlite store and served artifacts.
#   bash clusters/mlflow-server.sh [ROOT=/var/lib/mlflow] [PORT=5000] [HOST=127.0.0.1]
# It binds 127.0.0.1 unless told otherwise: put an authenticating proxy in front before exposing it.
set -euo pipefail
root=${1:-/var/lib/mlflow}
port=${2:-5000}
host=${3:-127.0.0.1}
mkdir -p "$root/artifacts"
exec mlflow server \
    --backend-store-uri "sqlite:///$root/mlflow.db" \
    --artifacts-destination "$root/artifacts" \
    --host "$host" --port "$port"

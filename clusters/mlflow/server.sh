#!/usr/bin/env bash
# The team's MLflow server: runs in PostgreSQL, artifacts on shared storage (or an S3-compatible
# store) served through the server, users and permissions from MLflow's basic authentication.
#
#   export MLFLOW_BACKEND_STORE_URI=postgresql+psycopg://lsep@DBHOST:5432/mlflow
#   export MLFLOW_AUTH_DATABASE_URI=postgresql+psycopg://lsep@DBHOST:5432/mlflow_auth
#   export MLFLOW_ARTIFACTS_DESTINATION=/shared/mlflow-artifacts   # or s3://BUCKET/mlflow
#   export MLFLOW_FLASK_SERVER_SECRET_KEY=...   # CSRF key: the same on every server of this store
#   export MLFLOW_AUTH_ADMIN_PASSWORD=...       # read on the first start only: creates the admin
#   bash clusters/mlflow/server.sh [--host 127.0.0.1] [--port 5000] [--workers 4] [--state DIR] [-- MLFLOW-SERVER-ARGS]
#
# It binds 127.0.0.1 unless told otherwise (--host or MLFLOW_HOST). Keep database passwords in
# ~/.pgpass (or PGPASSFILE) rather than in the URLs; the backend URL reaches `mlflow server` through
# the environment, not its command line, so `ps` does not show it. Clients log in with
# MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD. Anything after `--` goes to `mlflow server`
# as it is (e.g. --allowed-hosts mlflow.example.org when it answers on a public name).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
host=${MLFLOW_HOST:-127.0.0.1}
port=${MLFLOW_PORT:-5000}
workers=${MLFLOW_WORKERS:-4}
state=${MLFLOW_STATE_DIR:-${XDG_STATE_HOME:-$HOME/.local/state}/lsep_tune-mlflow}

refuse() { echo "error: clusters/mlflow/server.sh: $1" >&2; exit 2; }
while [ $# -gt 0 ]; do
    case $1 in
        --host|--port|--workers|--state)
            [ $# -ge 2 ] || refuse "$1: expected a value"
            case $1 in --host) host=$2 ;; --port) port=$2 ;; --workers) workers=$2 ;; --state) state=$2 ;; esac
            shift 2 ;;
        --) shift; break ;;
        *) refuse "$1: expected --host, --port, --workers, --state or -- followed by mlflow server arguments" ;;
    esac
done
need() { [ -n "${!1:-}" ] || refuse "$1: expected it set ($2)"; }
need MLFLOW_BACKEND_STORE_URI "the runs' database, e.g. postgresql+psycopg://lsep@DBHOST:5432/mlflow"
need MLFLOW_ARTIFACTS_DESTINATION "a folder every client's uploads land in, or s3://BUCKET/PREFIX"
need MLFLOW_FLASK_SERVER_SECRET_KEY "a random string, e.g. from: python -c 'import secrets; print(secrets.token_hex(32))'"
if [ -z "${MLFLOW_AUTH_CONFIG_PATH:-}" ]; then
    need MLFLOW_AUTH_DATABASE_URI "the users' database, e.g. postgresql+psycopg://lsep@DBHOST:5432/mlflow_auth"
    # A private copy of basic_auth.ini with the users' database in it (the URL may hold a password).
    (umask 077 && mkdir -p "$state")
    export MLFLOW_AUTH_CONFIG_PATH=$state/basic_auth.ini
    (umask 077 && python3 - "$here/basic_auth.ini" "$MLFLOW_AUTH_CONFIG_PATH" <<'PY'
import configparser, os, sys

template, out = sys.argv[1:]
config = configparser.RawConfigParser()
config.read(template)
# MLflow reads the file with interpolation on: a URL-encoded password's % must be written %%.
config["mlflow"]["database_uri"] = os.environ["MLFLOW_AUTH_DATABASE_URI"].replace("%", "%%")
with open(out, "w") as f:
    f.write(f"# Written by clusters/mlflow/server.sh from {template} and MLFLOW_AUTH_DATABASE_URI.\n")
    config.write(f)
PY
    )
fi
# MLflow 3's server-side jobs (GenAI scorers, prompt optimisation, trace upkeep): lsep_tune uses none, and
# they are five more processes (~1.2 GB) and ~20 s of CPU at each start. Export it `true` to keep them.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}
case $MLFLOW_ARTIFACTS_DESTINATION in
    *://*) ;;
    *) mkdir -p "$MLFLOW_ARTIFACTS_DESTINATION" ;;
esac
exec mlflow server --app-name basic-auth \
    --serve-artifacts --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION" \
    --host "$host" --port "$port" --workers "$workers" "$@"

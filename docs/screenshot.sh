#!/usr/bin/env bash
# The runs table as a user sees it: `mlflow ui` on a tracking store, opened by headless Chromium
# (Debian's `chromium` package) at the page the search prints, saved as a PNG.
#
#   docs/screenshot.sh STORE_URI PAGE OUT.png [WIDTH,HEIGHT]
#
# PAGE: the page the search printed (its summary.json's mlflow_runs_url; only its part from '#' on is
# used), or an experiment id for MLflow's default view of it. e.g.
#   docs/screenshot.sh sqlite:///$PWD/runs/search-digits-.../mlflow.db \
#     "$(python -c 'import json,sys; print(json.load(open(sys.argv[1]))["mlflow_runs_url"])' runs/search-digits-.../summary.json)" \
#     docs/mlflow-runs-table.png
# MLflow's UI is a JavaScript app: --virtual-time-budget lets it fetch and draw the runs first.
set -euo pipefail
store=$1 page=$2 out=$3 size=${4:-1600,900}
port=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
profile=$(mktemp -d)
mlflow ui --backend-store-uri "$store" --host 127.0.0.1 --port "$port" --workers 1 >"$profile/ui.log" 2>&1 &
ui=$!
trap 'kill "$ui" 2>/dev/null; wait "$ui" 2>/dev/null; rm -rf "$profile"' EXIT
for _ in $(seq 120); do
  curl -fs "http://127.0.0.1:$port/health" >/dev/null && break
  sleep 1
done
case $page in
  *'#'*) url="http://127.0.0.1:$port/#${page#*#}" ;;
  *) url="http://127.0.0.1:$port/#/experiments/$page/runs?workflowType=machine_learning" ;;
esac
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --user-data-dir="$profile/chrome" \
  --window-size="$size" --virtual-time-budget=30000 --run-all-compositor-stages-before-draw \
  --screenshot="$out" "$url" 2>"$profile/chrome.log" || { cat "$profile/chrome.log" >&2; exit 1; }
echo "wrote $out from $url"

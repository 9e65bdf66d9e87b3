#!/usr/bin/env bash
# `make demo`: the whole product end to end on one machine.
#   1. a synthetic FER-2013 CSV (unless DATA=path/to/fer2013.csv is given)
#   2. the pipeline (DirectRunner, local directories, smoke training profile)
#   3. the embedded TF-Serving-protocol server over the pushed models
#   4. the ensemble client classifying a few faces over gRPC
# Usage: demo.sh RUN_DIR [DATA] [ROWS] [extra Beam/pipeline flags...]
set -euo pipefail
RUN_DIR=${1:-demo_run}; DATA=${2:-}; ROWS=${3:-4000}; shift $(( $# < 3 ? $# : 3 ))
BIN=.venv/bin
# Third-party noise (TensorFlow, TFDV, google.api_core, Beam) is silenced inside the CLIs
# themselves, by core/quiet.py, so every command below prints only its own lines.

# A step's committed output directory: <step>/COMMIT.json names it (core/artifacts.py).
step_dir() {
  if [ -f "$RUN_DIR/$1/COMMIT.json" ]; then
    $BIN/python -c 'import json, sys; print(json.load(open(sys.argv[1]))["uri"])' \
      "$RUN_DIR/$1/COMMIT.json"
  else
    echo "$RUN_DIR/$1"
  fi
}
MONITORING_PAGE="$RUN_DIR/monitoring/demo/monitoring.html"
pages() {
  echo "== pages to open in a browser (self-contained, offline):"
  echo "   data:       $(step_dir statistics)/statistics.html"
  # infra-validate's copy of the evaluation report adds its verdict under the gate's.
  local report; report="$(step_dir infra_validation)/report.html"
  [ -f "$report" ] || report="$(step_dir evaluation)/report.html"
  echo "   evaluation: $report"
  [ -f "$MONITORING_PAGE" ] && echo "   monitoring: $MONITORING_PAGE"
  return 0
}
# One line per model held back, by the evaluation gate (blessings.json) or by infra
# validation (infra_blessings.json: it loaded or answered wrong in a model server).
held_back() {
  local blessings infra
  blessings="$(step_dir evaluation)/blessings.json"
  infra="$(step_dir infra_validation)/infra_blessings.json"
  [ -f "$blessings" ] || return 0
  $BIN/python -c 'import json, os, sys
infra = json.load(open(sys.argv[2])) if os.path.exists(sys.argv[2]) else {}
for name, b in json.load(open(sys.argv[1])).items():
    if not b["blessed"]:
        print("== " + b["summary"])
    elif name in infra and not infra[name]["blessed"]:
        print("== " + infra[name]["summary"])' "$blessings" "$infra"
}

# How many requests fer-serve logged per model (its metrics endpoint) and where.
request_logs() {
  $BIN/python - "$REST_PORT" "$RUN_DIR/request_logs" <<'PY'
import re, sys, urllib.request
url = f"http://127.0.0.1:{sys.argv[1]}/monitoring/prometheus/metrics"
try:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
except OSError as error:
    print(f"== request logs: cannot read fer-serve's metrics at {url}: {error}")
    sys.exit(0)   # only a report line: the demo goes on
written = re.findall(r'^fer_serve_request_log_written_total\{model_name="([^"]+)"\} (\d+)$',
                     text, re.M)
print("== request logs: " + ", ".join(f"{model} {count}" for model, count in written)
      + f" requests logged as TF Serving PredictionLogs under {sys.argv[2]}/")
PY
}

mkdir -p "$RUN_DIR"
# What a real export has and the synthetic one lacks: a few broken rows and faces that
# appear in two splits. Added so the statistics page shows how ingest handles them.
add_real_world_defects() {
  $BIN/python - "$1" <<'PY'
import csv, sys
path = sys.argv[1]
with open(path, newline="") as f:
    training = [r for _, r in zip(range(3), (r for r in csv.DictReader(f)
                                             if r["Usage"] == "Training"))]
short = " ".join(training[0]["pixels"].split()[:-1])
rows = [["9", training[0]["pixels"], "Training"],          # label out of range
        ["3", short, "Training"],                          # 2303 pixels
        ["4", training[1]["pixels"].replace(" ", " x", 1), "PublicTest"],  # not a number
        # The same faces again in the test split: reported and removed from test.
        *[[r["emotion"], r["pixels"], "PrivateTest"] for r in training[1:3]]]
with open(path, "a", newline="") as f:
    csv.writer(f, lineterminator="\n").writerows(rows)
print(f"== added {len(rows)} defective rows to {path}: 3 unparseable, 2 cross-split duplicates")
PY
}

if [ -z "$DATA" ]; then
  DATA="$RUN_DIR/synthetic_fer2013.csv"
  if [ ! -f "$DATA" ]; then
    $BIN/fer-pipeline synth --rows "$ROWS" --out "$DATA"
    add_real_world_defects "$DATA"
  fi
fi

echo "== pipeline: $DATA -> $RUN_DIR"
# --request-log-dir: models.config tells fer-serve to log every request the client sends
# below (serving/request_log.py), which is what `fer-pipeline monitor` reads.
$BIN/fer-pipeline run --data "$DATA" --output "$RUN_DIR" --profile smoke \
  --request-log-dir "$RUN_DIR/request_logs" "$@"

CONFIG="$RUN_DIR/serving_models/models.config"
if [ ! -f "$CONFIG" ]; then
  held_back
  echo "== no model was blessed, so nothing is served"
  pages
  exit 1
fi

GRPC_PORT=${GRPC_PORT:-8500}; REST_PORT=${REST_PORT:-8501}
echo "== serving $CONFIG on 127.0.0.1:$GRPC_PORT (gRPC) and :$REST_PORT (REST)"
$BIN/fer-serve --model-config "$CONFIG" --port "$GRPC_PORT" --rest-port "$REST_PORT" \
  > "$RUN_DIR/server.log" 2>&1 &
SERVER_PID=$!
trap 'kill $SERVER_PID 2>/dev/null || true' EXIT

echo "== client: ensemble decisions for 8 held-out (PrivateTest) faces"
# Retries with backoff cover the seconds the server needs to load both models.
$BIN/fer-client --port "$GRPC_PORT" --csv "$DATA" --usage PrivateTest --rows 8 --table --retries 8 \
  --review-queue "$RUN_DIR/review_queue"
held_back
echo "== client: the other held-out faces too, as live traffic for the monitor"
$BIN/fer-client --port "$GRPC_PORT" --csv "$DATA" --usage PrivateTest --rows 100000 \
  --retries 8 > "$RUN_DIR/client_traffic.json"
request_logs
echo "   Real TF Serving over the same directory: see docs/serving.md."
echo "== human review: faces the two models could not decide"
$BIN/fer-review status --queue "$RUN_DIR/review_queue"
echo "   review them: $BIN/fer-review --queue $RUN_DIR/review_queue   (then open http://127.0.0.1:8502/)"
# The server closes its request log files when it stops; the monitor then reads them all.
kill "$SERVER_PID" 2>/dev/null || true
wait "$SERVER_PID" 2>/dev/null || true
echo "== monitor: the logged traffic against the run that trained the served versions"
# Exit status 1 means drift (a scheduler would retrain); the demo reports it and goes on.
# The demo's test split is ~400 faces, under the default 500 a window needs to be judged;
# it is the test split itself, so its answers equal the evaluation's and 200 is enough.
$BIN/fer-pipeline monitor --output "$RUN_DIR" --out "$RUN_DIR/monitoring/demo" \
  --min-requests 200 || echo "== the monitor found drift or could not judge (exit status $?): see its page"
pages

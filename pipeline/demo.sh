#!/usr/bin/env bash
# `make demo`: the whole product end to end on one machine.
#   1. a synthetic FER-2013 CSV (unless DATA=path/to/fer2013.csv is given)
#   2. the pipeline (DirectRunner, local directories, smoke training profile)
#   3. the embedded TF-Serving-protocol server over the pushed models
#   4. the ensemble client classifying a few faces over gRPC
# Usage: demo.sh RUN_DIR [DATA] [ROWS] [extra Beam/pipeline flags...]
set -euo pipefail
RUN_DIR=${1:-demo_run}; DATA=${2:-}; ROWS=${3:-6000}; shift $(( $# < 3 ? $# : 3 ))
BIN=.venv/bin
export TF_CPP_MIN_LOG_LEVEL=2

mkdir -p "$RUN_DIR"
if [ -z "$DATA" ]; then
  DATA="$RUN_DIR/synthetic_fer2013.csv"
  [ -f "$DATA" ] || $BIN/fer-pipeline synth --rows "$ROWS" --out "$DATA"
fi

echo "== pipeline: $DATA -> $RUN_DIR"
$BIN/fer-pipeline run --data "$DATA" --output "$RUN_DIR" --profile smoke "$@"

CONFIG="$RUN_DIR/serving_models/models.config"
if [ ! -f "$CONFIG" ]; then
  echo "== no model was blessed, so nothing is served; see $RUN_DIR/evaluation/report.html"
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
echo "== done. Reports: $RUN_DIR/statistics/statistics.html, $RUN_DIR/evaluation/report.html"
echo "   Real TF Serving over the same directory: see README (Serving)."
echo "== human review: faces the two models could not decide"
$BIN/fer-review status --queue "$RUN_DIR/review_queue"
echo "   review them: $BIN/fer-review --queue $RUN_DIR/review_queue   (then open http://127.0.0.1:8502/)"

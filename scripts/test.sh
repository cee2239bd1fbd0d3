#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite, integration tests on SmolLM2 included.
set -euo pipefail
cd "$(dirname "$0")/.."
say() { echo "test: $*" >&2; }
say "phase 1/3: setup (.venv)"
bash scripts/setup.sh
if [ ! -f models/smollm2-135m/epic_ort_manifest.json ]; then
  say "phase 2/3: exporting SmolLM2-135M into models/smollm2-135m for the integration tests (once, about 1 minute)"
  .venv/bin/epic-ort export smollm2-135m models/smollm2-135m
else
  say "phase 2/3: models/smollm2-135m is exported already"
fi
say "phase 3/3: pytest (unit tests on tiny models built in the suite, then integration tests on SmolLM2)"
exec .venv/bin/python -m pytest -q --durations=15 "$@"

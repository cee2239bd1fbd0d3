#!/usr/bin/env bash
# Set up, export SmolLM2-135M into models/ once, then generate with EPIC (alpha calibrated).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
MODEL=models/smollm2-135m
if [ ! -f "$MODEL/epic_ort_manifest.json" ]; then
  echo "demo: exporting SmolLM2-135M-Instruct into $MODEL (once)" >&2
  .venv/bin/epic-ort export smollm2-135m "$MODEL"
fi
PROMPT=${1:-"It was a bright cold morning, and the village was just waking up when"}
echo "prompt: $PROMPT"
echo "EPIC continuation (--alpha auto, 64 new tokens, seed 0):"
.venv/bin/epic-ort generate "$MODEL" "$PROMPT" --alpha auto --max-new-tokens 64 --seed 0

#!/usr/bin/env bash
# On a machine with an NVIDIA GPU and onnxruntime-gpu: greedy parity with the CPU, plain and EPIC timing.
# Finishes in well under 5 minutes on SmolLM2-135M (export included when the model folder is missing).
set -euo pipefail
cd "$(dirname "$0")/.."
# Optimum's graph: the lean graph's attention has no CUDA kernel (see epic_ort/runtime/providers.py)
MODEL=${1:-models/smollm2-135m-optimum}
PY=${PYTHON:-python3}
if [ ! -f "$MODEL/epic_ort_manifest.json" ]; then
  "$PY" -m epic_ort.cli.main export smollm2-135m "$MODEL" --graph optimum
fi
timeout 290 "$PY" bench/gpu_check.py "$MODEL" --tokens "${TOKENS:-64}"

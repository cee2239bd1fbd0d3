#!/usr/bin/env bash
# On a machine with an NVIDIA GPU and onnxruntime-gpu >= 1.29: greedy parity with the CPU, then plain and
# EPIC timing at batch 1/8/32, on the fp16 lean graph and on Optimum's graph (exported when missing:
# needs the export extra). Meant to finish in under 5 minutes on SmolLM2-135M.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LEAN=${LEAN:-models/smollm2-135m-fp16}
OPTIMUM=${OPTIMUM:-models/smollm2-135m-optimum}
[ -f "$LEAN/epic_ort_manifest.json" ] || "$PY" -m epic_ort.cli.main export smollm2-135m "$LEAN" --graph lean --dtype fp16
[ -f "$OPTIMUM/epic_ort_manifest.json" ] || "$PY" -m epic_ort.cli.main export smollm2-135m "$OPTIMUM" --graph optimum
timeout 290 "$PY" bench/gpu_check.py "$LEAN" "$OPTIMUM" --tokens "${TOKENS:-32}" --batches "${BATCHES:-1,8,32}"

#!/usr/bin/env bash
# Every GPU benchmark on one CUDA machine, in under 10 minutes on an H100:
# the fused rotation against copy bandwidth, then time to first token for the
# Llama-3.2-1B shape (4k..64k) and the Llama-3.1-8B shape (4k..32k).
# Results: benchmarks/results/rotate-cuda.json, ttft-cuda-1b.json and ttft-cuda-8b.json.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: run these on a GPU machine')"
OUT=benchmarks/results
mkdir -p "$OUT"
start=$(date +%s)
"$PY" benchmarks/rotate.py --reps 20 --out "$OUT"
"$PY" benchmarks/ttft.py --models llama-3.2-1b --n-ctx 4096 16384 32768 65536 --tag cuda-1b --out "$OUT"
"$PY" benchmarks/ttft.py --models llama-3.1-8b --n-ctx 4096 16384 32768 --tag cuda-8b --out "$OUT"
echo "all GPU benchmarks done in $(( $(date +%s) - start )) s"

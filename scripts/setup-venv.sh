#!/usr/bin/env bash
# Idempotent: creates .venv (if absent) and installs the project with the CPU torch pin.
# GPU users: install CUDA torch first (see README), then run this with STA_CONSTRAINTS=/dev/null.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
export PIP_CONSTRAINT=${STA_CONSTRAINTS:-$PWD/constraints-cpu.txt}
stamp=.venv/.installed-$(cat pyproject.toml constraints-cpu.txt | sha256sum | cut -c1-16)-${1:-base}
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip setuptools wheel
  if [ "${1:-base}" = dev ]; then extra="[dev]"; else extra=""; fi
  .venv/bin/python -m pip install -q -e ".$extra"
  touch "$stamp"
fi

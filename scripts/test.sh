#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite. Extra args go to pytest, e.g. -m "not slow".
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-venv.sh dev
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 MLFLOW_DISABLE_TELEMETRY=true RAY_USAGE_STATS_ENABLED=0
exec .venv/bin/python -m pytest "$@"

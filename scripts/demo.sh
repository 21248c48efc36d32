#!/usr/bin/env bash
# Set up (idempotent) and run the main job on the embedded default: synthetic data, local shards,
# local Ray with 2 CPU workers on DeepSpeed, MLflow in ./mlflow.db. Extra args are config overrides.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-venv.sh
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=${RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER:-0} MLFLOW_DISABLE_TELEMETRY=true
exec .venv/bin/python -m pipeline.train "$@"

#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite. Extra args go to pytest, e.g. -m "not slow".
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-venv.sh dev
# The Slurm tests need a real one-node Slurm; install it where we may (root + apt), else they skip.
if ! command -v sbatch >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" -eq 0 ]; then
  cluster/slurm/install-slurm.sh || echo "warning: Slurm install failed; Slurm tests will skip" >&2
fi
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 MLFLOW_DISABLE_TELEMETRY=true RAY_USAGE_STATS_ENABLED=0
exec .venv/bin/python -m pytest "$@"

#!/usr/bin/env bash
# The STA ablation in miniature: grid sweeps through `python -m pipeline.tune`, then docs/ablation.md.
#   scripts/ablation.sh                 # all sweeps (model variants first), then the report
#   scripts/ablation.sh variants        # only the named sweeps (configs/ablation/<name>.yaml)
# Outputs (data, checkpoints, MLflow store) stay under the git-ignored data/ablation and runs/ablation;
# a finished sweep is restored from runs/ablation/<name>, not re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 MLFLOW_DISABLE_TELEMETRY=true RAY_USAGE_STATS_ENABLED=0
sweeps=("$@")
[ ${#sweeps[@]} -gt 0 ] || sweeps=(variants clip_len stripes lambda_reg)
mkdir -p runs/ablation
for s in "${sweeps[@]}"; do
  echo "== sweep $s"
  .venv/bin/python -m pipeline.tune --config "configs/ablation/$s.yaml" 2>&1 | tee "runs/ablation/$s.log" | grep -E "^(==|   |search|restoring)" || true
done
.venv/bin/python bench/ablation.py

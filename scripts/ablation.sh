#!/usr/bin/env bash
# The STA ablation in miniature, all through `python -m pipeline.tune` (grid mode), then docs/ablation.md.
#   scripts/ablation.sh                 # pretraining (if absent), all sweeps, then the report
#   scripts/ablation.sh variants        # only the named sweeps (configs/ablation/<name>.yaml)
# Order: the pretraining run (configs/pretrain-synthetic.yaml) makes the trunk every run starts from; then
# the sweeps by priority: the main comparison, from scratch, at 3x the budget, lambda, fusion/map, N, K. Outputs (data,
# checkpoints, MLflow store) stay under the git-ignored data/ and runs/; a sweep is restored from
# runs/ablation/<name>: finished trials are kept, an interrupted sweep continues where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 MLFLOW_DISABLE_TELEMETRY=true RAY_USAGE_STATS_ENABLED=0
sweeps=("$@")
[ ${#sweeps[@]} -gt 0 ] || sweeps=(variants scratch budget lambda_reg fusion clip_len stripes)
mkdir -p runs/ablation runs/pretrain
if [ ! -f runs/pretrain/pretrain-synthetic/final/meta.json ]; then
  echo "== pretraining the trunk (configs/pretrain-synthetic.yaml)"
  .venv/bin/python -m pipeline.train --config configs/pretrain-synthetic.yaml > runs/pretrain/train.log 2>&1 \
    || { tail -20 runs/pretrain/train.log; exit 1; }
  grep -A8 "^== STA training finished" runs/pretrain/train.log || true
fi
for s in "${sweeps[@]}"; do
  echo "== sweep $s"
  .venv/bin/python -m pipeline.tune --config "configs/ablation/$s.yaml" 2>&1 \
    | tee "runs/ablation/$s.log" | grep -E "^(==|   |search|restoring)" || true
done
.venv/bin/python bench/ablation.py

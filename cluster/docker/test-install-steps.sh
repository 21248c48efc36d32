#!/usr/bin/env bash
# Replay the Dockerfile's CPU-variant install steps (no Docker engine needed) in a fresh venv under
# /tmp, then import the project from outside the source tree. Reuses pip's cache, so a second run is
# much faster than the first (the DeepSpeed sdist build still runs every time).
#
#   cluster/docker/test-install-steps.sh [ROOT]       # ROOT defaults to a new /tmp/sta-image.XXXX
#
# TORCH_INDEX_URL: where the replay looks for torch (the image uses PyTorch's CPU index; set it to a
# mirror, or to your default index when torch==2.13.0+cpu is already reachable there).
set -euo pipefail
cd "$(dirname "$0")/../.."
root=${1:-$(mktemp -d /tmp/sta-image.XXXXXX)}
env_args=()
[ -n "${TORCH_INDEX_URL:-}" ] && env_args+=(--env "TORCH_INDEX_URL=$TORCH_INDEX_URL")
start=$(date +%s)
python3 cluster/docker/replay_install.py --variant cpu --root "$root" "${env_args[@]}"
cd /
"$root/opt/venv/bin/python" -P -c "
import importlib.metadata as md, pipeline.train, sta_model.model, ray, deepspeed, torch
assert pipeline.train.__file__.startswith('$root/opt/venv/'), pipeline.train.__file__
print('installed:', {p: md.version(p) for p in ('sta-reid', 'torch', 'ray', 'deepspeed', 'mlflow')})
"
"$root/opt/venv/bin/python" -m pipeline.train --config "$root/app/configs/tiny.yaml" --print-config >/dev/null
echo "test-install-steps: OK in $(( $(date +%s) - start ))s (root $root)"

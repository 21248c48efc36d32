#!/usr/bin/env bash
# Re-walk README.md's "Running on a cluster" section (and docs/cluster.md's `ray job submit` part) end to
# end on a loopback head, as a new user would (issue #16), printing every command before it runs.
#
#   scripts/walkthrough_cluster.sh 2>&1 | tee docs/walkthrough-cluster.log
#
# What stands in for the cluster, all on 127.0.0.1 with ports of its own (another Ray may run here):
#   - S3: moto's server; shards, checkpoints and exports go to s3:// URLs as the docs ask;
#   - MLflow: `mlflow server` on a sqlite file (README: "an MLflow server");
#   - the head: `ray start --head --block` with its own --temp-dir; the S3 credentials are in the head's
#     environment ("credentials come from the cluster"), only settings go into --runtime-env-json.
# Everything started here is stopped by its PID on exit (never `ray stop`: it would stop other Rays too).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export PATH="$ROOT/.venv/bin:$PATH"   # the venv stands in for the cluster's image (the same packages)
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 MLFLOW_DISABLE_TELEMETRY=true RAY_USAGE_STATS_ENABLED=0
# The shell of a new user: none of our settings inherited.
unset RAY_ADDRESS RAY_AUTH_MODE MLFLOW_TRACKING_URI AWS_ENDPOINT_URL AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY \
      AWS_DEFAULT_REGION STA_GIT_COMMIT STA_GIT_DIRTY STA_USER 2>/dev/null || true

WALK=${WALK_DIR:-/tmp/walk}             # MLflow store, raw synthetic data, captured outputs
RAY_TMP=${WALK_RAY_TMP:-/tmp/walk_ray}  # our head's --temp-dir: every process of it names this path
PIDS=()                                 # process-group leaders started here (setsid)

say() { printf '\n### %s\n' "$*"; }
show() {  # print a command the way one would type it
  local a out=()
  for a in "$@"; do
    if [[ $a =~ ^[][A-Za-z0-9_./:=@%+,{}-]+$ || $a == '&' || $a == '|' ]]; then out+=("$a"); else out+=("'${a//\'/\'\\\'\'}'"); fi
  done
  printf '$ %s\n' "${out[*]}"
}
run() { show "$@"; "$@"; }

our_ray_pids() {  # processes of our head: their command lines name our temp dir (or are our `ray start`)
  ps -eo pid=,args= | awk -v m="$RAY_TMP" 'index($0, m) && !/awk/ {print $1}' | grep -vx "$$" || true
}

cleanup() {
  local rc=$? pid left
  trap - EXIT INT TERM
  say "cleanup: stop what this script started, by PID"
  for pid in "${PIDS[@]}"; do  # `ray start --block` shuts its node down on SIGTERM; moto; mlflow
    if kill -0 "$pid" 2>/dev/null; then echo "kill -TERM -$pid  ($(ps -o args= -p "$pid" | cut -c1-80))"; kill -TERM -- "-$pid" 2>/dev/null || true; fi
  done
  for _ in $(seq 60); do
    left=$(our_ray_pids; for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && echo "$pid"; done; true)
    [ -z "$left" ] && break
    sleep 1
  done
  left=$(our_ray_pids)
  if [ -n "$left" ]; then echo "still running after 60 s, SIGKILL:" $left; kill -KILL $left 2>/dev/null || true; fi
  for pid in "${PIDS[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
  sleep 3  # children of a killed parent are reaped by init
  say "ps: anything of ours left? (command lines naming $RAY_TMP, our ports, or in the groups of ${PIDS[*]:-})"
  show ps -eo pid,pgid,args '|' grep -E "$RAY_TMP|-p ${S3_PORT:-x}|--port ${MLF_PORT:-x}"
  { ps -eo pid,pgid,args | grep -E "$RAY_TMP|-p ${S3_PORT:-x}|--port ${MLF_PORT:-x}" | grep -v grep
    for pid in "${PIDS[@]}"; do ps -o pid=,pgid=,args= -g "$pid" 2>/dev/null; done; } | sort -u | sed 's/^/LEFT: /' || true
  echo "(no LEFT: line = nothing left)"
  echo "walkthrough exit code: $rc"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_http() {  # url seconds
  local deadline=$((SECONDS + $2))
  until curl -s -o /dev/null "$1"; do
    [ $SECONDS -lt $deadline ] || { echo "no answer from $1 after $2 s"; return 1; }
    sleep 1
  done
}

free_port() { python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

say "0. the machine"
run git rev-parse --short HEAD
run ray --version
run mlflow --version
run ls -l "$HOME/.ray/auth_token"   # exists: any earlier local ray.init() writes it
echo "USER=${USER-<unset>}"
rm -rf "$WALK" "$RAY_TMP"
mkdir -p "$WALK"
# `--working-dir .` uploads the working tree as it is, uncommitted edits included: walk in a fresh clone of
# this commit (what a new user has), not in a tree others are editing.
run git clone -q "$ROOT" "$WALK/src"
run cd "$WALK/src"
run git log --oneline -1
S3_PORT=$(free_port); MLF_PORT=$(free_port); GCS_PORT=$(free_port); DASH_PORT=$(free_port)
AGENT_PORT=$(free_port); CLIENT_PORT=$(free_port)
echo "ports: S3 $S3_PORT, MLflow $MLF_PORT, GCS $GCS_PORT, dashboard $DASH_PORT, dashboard agent $AGENT_PORT, ray client $CLIENT_PORT"

say "1. S3 (stands in for the cluster's bucket): moto's server on loopback"
show moto_server -H 127.0.0.1 -p "$S3_PORT" \&
setsid moto_server -H 127.0.0.1 -p "$S3_PORT" >"$WALK/moto.log" 2>&1 &
PIDS+=($!); echo "moto PID $!"
wait_http "http://127.0.0.1:$S3_PORT/" 120
# The cluster's credentials: dummy values for moto; the secret is random so that it can be looked for later.
SECRET="walk-$(python -c 'import uuid; print(uuid.uuid4().hex)')"
CLUSTER_ENV=(AWS_ENDPOINT_URL="http://127.0.0.1:$S3_PORT" AWS_ACCESS_KEY_ID=testing
             AWS_SECRET_ACCESS_KEY="$SECRET" AWS_DEFAULT_REGION=us-east-1)
echo "cluster credentials: AWS_ENDPOINT_URL=http://127.0.0.1:$S3_PORT AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=<random, not shown> AWS_DEFAULT_REGION=us-east-1"
show python -c 'import boto3; s3 = boto3.client("s3"); [s3.create_bucket(Bucket=b) for b in ("walk-data", "walk-runs")]'
env "${CLUSTER_ENV[@]}" python -c "import boto3; s3 = boto3.client('s3'); [s3.create_bucket(Bucket=b) for b in ('walk-data', 'walk-runs')]; print('buckets:', [b['Name'] for b in s3.list_buckets()['Buckets']])"

say "2. MLflow server on loopback (README: 'use ... an MLflow server')"
show mlflow server --host 127.0.0.1 --port "$MLF_PORT" --backend-store-uri "sqlite:///$WALK/mlflow.db" \
  --artifacts-destination "$WALK/mlartifacts" --workers 1 \&
setsid mlflow server --host 127.0.0.1 --port "$MLF_PORT" --backend-store-uri "sqlite:///$WALK/mlflow.db" \
  --artifacts-destination "$WALK/mlartifacts" --workers 1 >"$WALK/mlflow.log" 2>&1 &
PIDS+=($!); echo "mlflow PID $!"
wait_http "http://127.0.0.1:$MLF_PORT/health" 300
run curl -s "http://127.0.0.1:$MLF_PORT/health"; echo

say "3. the head: ray start --head on 127.0.0.1, own ports and temp dir, S3 credentials in its environment"
echo "(no RAY_AUTH_MODE set: README says any 'ray start' on a machine with ~/.ray/auth_token turns token auth on)"
echo "(--dashboard-agent-listen-port / --ray-client-server-port: their defaults 52365 / 10001 may be held by another Ray here)"
HEAD_CMD=(ray start --head --node-ip-address=127.0.0.1 --port="$GCS_PORT" --dashboard-host=127.0.0.1
          --dashboard-port="$DASH_PORT" --dashboard-agent-listen-port="$AGENT_PORT"
          --ray-client-server-port="$CLIENT_PORT" --num-cpus=2 --temp-dir="$RAY_TMP" --disable-usage-stats --block)
show "${HEAD_CMD[@]}" \&
env "${CLUSTER_ENV[@]}" setsid "${HEAD_CMD[@]}" >"$WALK/ray-start.log" 2>&1 &
HEAD_PID=$!; PIDS+=("$HEAD_PID"); echo "ray start --block PID $HEAD_PID"
deadline=$((SECONDS + 300))
until grep -q "Ray runtime started" "$WALK/ray-start.log"; do
  kill -0 "$HEAD_PID" 2>/dev/null || { cat "$WALK/ray-start.log"; echo "ray start exited"; exit 1; }
  [ $SECONDS -lt $deadline ] || { cat "$WALK/ray-start.log"; echo "head not up after 300 s"; exit 1; }
  sleep 2
done
echo "--- ray start output ($((SECONDS)) s into the walk):"
cat "$WALK/ray-start.log"
echo "--- processes of our head:"
ps -o pid=,args= -p "$(our_ray_pids | paste -sd, -)" | cut -c1-150
export RAY_ADDRESS="http://127.0.0.1:$DASH_PORT"   # docs/cluster.md: export RAY_ADDRESS=http://<head ip>:8265

say "4. without RAY_AUTH_MODE=token the CLI must fail with AuthenticationError (README)"
show ray job submit --address "$RAY_ADDRESS" -- echo hello
set +e
ray job submit --address "$RAY_ADDRESS" -- echo hello >"$WALK/noauth.out" 2>&1
rc=$?
set -e
grep -E -v '^\s*$' "$WALK/noauth.out" | tail -n 6
echo "exit code $rc; AuthenticationError in output: $(grep -c AuthenticationError "$WALK/noauth.out" || true) line(s)"

say "5. README: export RAY_AUTH_MODE=token, then ray job submit (tiny config, s3:// data and checkpoints, MLflow server)"
run export RAY_AUTH_MODE=token
MLFLOW_URI="http://127.0.0.1:$MLF_PORT"
# README's --runtime-env-json, with our tracking URI; the user and git expansions exactly as written there.
RUNTIME_ENV='{"excludes": [".git", "data", "runs", "mlruns", "mlartifacts", "mlflow.db", ".venv"],
    "env_vars": {"MLFLOW_TRACKING_URI": "'"$MLFLOW_URI"'",
                 "STA_GIT_COMMIT": "'"$(git rev-parse HEAD)"'", "STA_USER": "'"${USER:-$(id -un)}"'",
                 "STA_GIT_DIRTY": "'"$(test -z "$(git status --porcelain --untracked-files=no)" && echo false || echo true)"'"}}'
SUBMIT=(ray job submit --address "$RAY_ADDRESS" --working-dir . --runtime-env-json "$RUNTIME_ENV"
        -- python -m pipeline.train --config configs/tiny.yaml data.root="$WALK/raw" data.shards=s3://walk-data/tiny
        checkpoint.storage_path=s3://walk-runs/sta optim.epochs=1 tracking.log_model=false)
attempt=0; deadline=$((SECONDS + 900))
while true; do
  attempt=$((attempt + 1))
  echo "--- attempt $attempt ($((SECONDS)) s into the walk)"
  show "${SUBMIT[@]}"
  set +e
  "${SUBMIT[@]}" 2>&1 | tee "$WALK/submit.out"
  rc=${PIPESTATUS[0]}
  set -e
  echo "--- ray job submit exit code: $rc"
  if [ "$rc" -ne 0 ] && grep -q "No available agent to submit job" "$WALK/submit.out" && [ $SECONDS -lt $deadline ]; then
    echo "README: 'a head started seconds ago may answer No available agent ...; submit again' -> again in 10 s"
    sleep 10; continue
  fi
  break
done
[ "$rc" -eq 0 ] || { echo "the job failed"; exit 1; }
JOB_ID=$(grep -oE "raysubmit_[A-Za-z0-9]+" "$WALK/submit.out" | head -n 1)
echo "submission id: $JOB_ID"

say "6. follow-ups (README: ray job logs -f <id>, ray job status <id>)"
run ray job status "$JOB_ID"
show ray job logs "$JOB_ID" \| tail -n 5
ray job logs "$JOB_ID" >"$WALK/job-logs.out" 2>&1
tail -n 5 "$WALK/job-logs.out"
echo "($(wc -l <"$WALK/job-logs.out") lines; the same as the stream of step 5)"
run ray job list

say "7. the run in MLflow (tracking URI = the job's MLFLOW_TRACKING_URI)"
run env MLFLOW_TRACKING_URI="$MLFLOW_URI" mlflow experiments search
show python - '<<EOF  # the run of this job, by the tag the driver sets: ray.job_submission_id'
MLFLOW_TRACKING_URI="$MLFLOW_URI" JOB_ID="$JOB_ID" GIT_HEAD=$(git rev-parse HEAD) python - <<'EOF'
import os
from mlflow import MlflowClient

c = MlflowClient()
exp = c.get_experiment_by_name("sta-tiny")
runs = c.search_runs([exp.experiment_id], f"tags.`ray.job_submission_id` = '{os.environ['JOB_ID']}'")
print(f"runs of job {os.environ['JOB_ID']}: {len(runs)}")
r = runs[0]
print("run name:", r.info.run_name, "| status:", r.info.status, "| run id:", r.info.run_id)
for k in ("mlflow.source.type", "mlflow.source.name", "mlflow.source.git.commit", "git.dirty", "mlflow.user",
          "ray.job_submission_id", "sta.run_dir", "sta.export.best", "sta.export.final"):
    print(f"  tag {k} = {r.data.tags.get(k)}")
print("  git commit == submitter's HEAD:", r.data.tags.get("mlflow.source.git.commit") == os.environ["GIT_HEAD"])
for k in sorted(r.data.metrics):
    if k.startswith(("train/loss_total", "eval/", "system/epoch")):
        print(f"  metric {k} = {r.data.metrics[k]:.4g}")
print("  artifacts:", sorted(a.path for a in c.list_artifacts(r.info.run_id)))
EOF

say "8. the checkpoints and exports are in the bucket; the secret is nowhere in Ray's session dir"
show python - '<<EOF  # list s3://walk-runs'
env "${CLUSTER_ENV[@]}" python - <<'EOF'
import boto3

objs = boto3.client("s3").list_objects_v2(Bucket="walk-runs").get("Contents", [])
keys = [o["Key"] for o in objs]
print(f"s3://walk-runs: {len(keys)} objects")
for k in sorted({k.split("/", 2)[0] + "/" + k.split("/", 2)[1] + "/" + k.split("/", 2)[2].split("/", 1)[0]
                 for k in keys if k.count("/") >= 2}):
    print("  ", k)
print("  final export:", [k for k in keys if k.endswith("final/model.pt")])
EOF
show grep -rl --binary-files=text '<the secret>' "$RAY_TMP"
if grep -rlq --binary-files=text "$SECRET" "$RAY_TMP"; then
  echo "SECRET FOUND in:"; grep -rl --binary-files=text "$SECRET" "$RAY_TMP"
else
  echo "not found (as docs/cluster.md says)"
fi
say "done: the documented path worked; cleanup follows"

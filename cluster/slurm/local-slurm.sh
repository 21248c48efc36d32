#!/usr/bin/env bash
# A one-node Slurm on this machine, for testing cluster/slurm/*.sbatch (CI and laptops, not production).
#
#   cluster/slurm/local-slurm.sh start    # write slurm.conf, start munged + slurmctld + slurmd, wait for the node
#   cluster/slurm/local-slurm.sh env      # print `export SLURM_CONF=...` for the client tools (sbatch, squeue, ...)
#   cluster/slurm/local-slurm.sh status   # sinfo of the local cluster
#   cluster/slurm/local-slurm.sh stop     # stop the three daemons started by `start`
#
# Everything lives under $STA_SLURM_DIR (default /tmp/sta-slurm): config, munge key and socket, state,
# spool, logs, pid files. Nothing is written to /etc, so a system Slurm (if any) is left alone; the
# client tools find this cluster through SLURM_CONF. Needs root (slurmd launches jobs as the submitter)
# and the Debian/Ubuntu packages `slurm-wlm munge` (cluster/slurm/install-slurm.sh installs them).
#
# The node is named after `hostname -s`, addressed as 127.0.0.1, and gets this machine's CPUs and
# memory. No cgroups (proctrack/linuxproc, task/none): works in containers without a cgroup mount.
# Ports: STA_SLURMCTLD_PORT (default 6817) and STA_SLURMD_PORT (default 6818).
set -euo pipefail

DIR=${STA_SLURM_DIR:-/tmp/sta-slurm}
CONF=$DIR/etc/slurm.conf
MUNGE_SOCKET=$DIR/munge/munge.socket.2
CTLD_PORT=${STA_SLURMCTLD_PORT:-6817}
SLURMD_PORT=${STA_SLURMD_PORT:-6818}
NODE=$(hostname -s)

die() { echo "local-slurm: $*" >&2; exit 1; }

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

write_conf() {
  local cpus mem_mb
  cpus=$(nproc --all)
  # Leave ~10% (at least 512 MiB) of memory to the OS so slurmd does not drain the node for low memory.
  mem_mb=$(awk '/^MemTotal:/ {m=int($2/1024); r=int(m*0.9); if (m-r < 512) r=m-512; print r}' /proc/meminfo)
  mkdir -p "$DIR"/{etc,munge,state,spool,log,run}
  chmod 700 "$DIR/munge"
  cat >"$CONF" <<EOF
# Written by cluster/slurm/local-slurm.sh — single-node test cluster, not for production.
ClusterName=sta-local
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups: track job processes through /proc, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# Finished jobs are appended here (JobState, ExitCode); no slurmdbd needed.
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
MpiDefault=none
ReturnToService=2
# Keep finished jobs visible to scontrol show job for an hour.
MinJobAge=3600
KillWait=10
InactiveLimit=0
SlurmdTimeout=60
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
  if [ ! -s "$DIR/munge/munge.key" ]; then
    # 1024 random bytes, readable by the daemon's user only (munged refuses anything looser).
    dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
  fi
  chmod 400 "$DIR/munge/munge.key"
}

start() {
  [ "$(id -u)" -eq 0 ] || die "must run as root (slurmd starts jobs as their owner)"
  for b in munged slurmctld slurmd sinfo; do command -v "$b" >/dev/null || die "$b not found: run cluster/slurm/install-slurm.sh"; done
  write_conf
  export SLURM_CONF=$CONF
  if ! pid_alive "$DIR/run/munged.pid"; then
    munged --force --key-file="$DIR/munge/munge.key" --socket="$MUNGE_SOCKET" \
      --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed"
  fi
  if ! pid_alive "$DIR/run/slurmctld.pid"; then
    # -i: ignore state files from an older run of this script whose config differed.
    slurmctld -f "$CONF" -i
  fi
  if ! pid_alive "$DIR/run/slurmd.pid"; then
    slurmd -f "$CONF"
  fi
  local state=""
  for _ in $(seq 1 60); do
    state=$(sinfo -h -N -n "$NODE" -o '%T' 2>/dev/null || true)
    case "$state" in
      idle*|mixed*|allocated*) echo "local-slurm: node $NODE is $state (SLURM_CONF=$CONF)"; return 0 ;;
    esac
    sleep 1
  done
  echo "local-slurm: node $NODE did not become idle (state: '${state:-none}'); logs:" >&2
  tail -n 20 "$DIR"/log/*.log >&2 || true
  exit 1
}

stop_one() {  # $1 name, $2 pid file
  local pid
  pid_alive "$2" || { rm -f "$2"; return 0; }
  pid=$(cat "$2")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || { rm -f "$2"; return 0; }; sleep 0.5; done
  echo "local-slurm: $1 ($pid) ignored SIGTERM, sending SIGKILL" >&2
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$2"
}

stop() {
  stop_one slurmd "$DIR/run/slurmd.pid"
  stop_one slurmctld "$DIR/run/slurmctld.pid"
  stop_one munged "$DIR/run/munged.pid"
  echo "local-slurm: stopped"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  status) SLURM_CONF=$CONF sinfo -N -l ;;
  *) echo "usage: $0 start|stop|env|status" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# Install a single-node Slurm (Debian/Ubuntu packages) for CI and local tests of cluster/slurm/*.sbatch.
# Needs root (or passwordless sudo). Idempotent: does nothing when sbatch, slurmctld and slurmd exist.
# After this, `cluster/slurm/local-slurm.sh start` configures and starts it on localhost.
set -euo pipefail
if command -v sbatch >/dev/null && command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
   && command -v munged >/dev/null; then
  # shellcheck disable=SC2016
  echo "slurm already installed: $(dpkg-query -W -f '${Version}' slurm-wlm 2>/dev/null || echo unknown)"
  exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo -n"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# slurm-wlm pulls slurmctld + slurmd + client tools; slurm-wlm-basic-plugins carries the
# proctrack/linuxproc, task/none and select/cons_tres plugins used by local-slurm.sh.
# Newer Debian/Ubuntu split the client tools into slurm-client (already a dependency).
$SUDO apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
# shellcheck disable=SC2016  # dpkg-query formats, not shell variables
dpkg-query -W -f '${Package} ${Version}\n' slurm-wlm slurmd slurmctld munge

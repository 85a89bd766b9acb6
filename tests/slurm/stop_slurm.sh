#!/usr/bin/env bash
# Stop the Slurm started by tests/slurm/start_slurm.sh. Only processes whose pid files it wrote (and
# whose program name still matches) are stopped; a munged/MariaDB it found running is left alone.
#   --purge   also remove its state, logs and the /etc/slurm files it wrote (restoring *.before-kit)
set -uo pipefail
ROOT=${KIT_SLURM_DIR:-/tmp/kit-slurm}
MARK="written by rlhf-kit tests/slurm/start_slurm.sh"
say() { echo "[kit-slurm stop] $*"; }

alive() {  # alive PID COMM
  [ -r "/proc/$1/stat" ] && [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ] \
    && [ "$(cat "/proc/$1/comm" 2>/dev/null)" = "$2" ]
}
stop() {  # stop PIDFILE COMM: TERM, wait up to 20 s, then KILL
  local file=$1 comm=$2 pid i
  [ -s "$file" ] || return 0
  pid=$(cat "$file"); rm -f "$file"
  alive "$pid" "$comm" || return 0
  kill -TERM "$pid" 2>/dev/null
  for ((i = 0; i < 100; i++)); do alive "$pid" "$comm" || { say "$comm stopped"; return 0; }; sleep 0.2; done
  say "$comm ($pid) ignored SIGTERM; killing it"; kill -KILL "$pid" 2>/dev/null; sleep 0.3
  ! alive "$pid" "$comm"
}

rc=0
if [ -s "$ROOT/run/slurmctld.pid" ] && timeout 5 scontrol ping >/dev/null 2>&1; then
  jobs=$(timeout 10 squeue -h -o %A | tr '\n' ' ')
  if [ -n "${jobs// }" ]; then
    say "cancelling $jobs"; timeout 10 scancel $jobs
    for ((i = 0; i < 50; i++)); do [ -z "$(timeout 5 squeue -h -o %A)" ] && break; sleep 0.2; done
  fi
fi
stop "$ROOT/run/slurmd.pid" slurmd || rc=1
stop "$ROOT/run/slurmctld.pid" slurmctld || rc=1
stop "$ROOT/run/slurmdbd.pid" slurmdbd || rc=1
stop "$ROOT/run/mariadbd.pid" mariadbd || rc=1
if [ -s "$ROOT/run/munged.pid" ]; then stop "$ROOT/run/munged.pid" munged || rc=1; rm -f /run/munge/munged.pid; fi
# job step daemons left behind by a job that outlived its controller
for stat in /proc/[0-9]*/stat; do
  d=${stat%/stat}
  [ "$(cat "$d/comm" 2>/dev/null)" = slurmstepd ] && { say "killing leftover slurmstepd ${d#/proc/}"; kill -KILL "${d#/proc/}" 2>/dev/null; }
done
if [ "${1:-}" = --purge ]; then
  rm -rf "$ROOT"
  for f in slurm.conf gres.conf slurmdbd.conf; do
    if grep -qs "$MARK" "/etc/slurm/$f"; then
      rm -f "/etc/slurm/$f"; [ -e "/etc/slurm/$f.before-kit" ] && mv "/etc/slurm/$f.before-kit" "/etc/slurm/$f"
    fi
  done
  say "purged"
fi
exit $rc

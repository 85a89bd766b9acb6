#!/usr/bin/env bash
# Bring up a throwaway single-node Slurm (Debian 12, slurm-wlm 22.05) for the kit's Slurm tests.
#
#   sudo tests/slurm/start_slurm.sh        # root: installs packages, writes /etc/slurm, starts daemons
#   tests/slurm/stop_slurm.sh [--purge]
#
# What the tests need from it, and why each piece is here:
#   - accounting (MariaDB + slurmdbd): sacct is how a job that died without a result is noticed;
#     without it submitit reports UNKNOWN forever.
#   - enforced associations with two accounts: `kit` (root may use it) and `others` (root may not),
#     so "an account the user lacks" is refused by Slurm itself.
#   - fake GPUs: character devices declared as gres/gpu, so --gpus-per-node is really allocated and
#     CUDA_VISIBLE_DEVICES is set; asking for more than the node has is refused.
#   - cred_expire=5: a requeued job may restart after 5 s instead of Slurm's default 120 s.
#   - fast scheduler intervals, so a job starts within a second of submission.
# Idempotent: a healthy cluster started by this script is left alone (KIT_SLURM_RESTART=1 restarts it).
# Knobs: KIT_SLURM_DIR (/tmp/kit-slurm), KIT_SLURM_CPUS (4), KIT_SLURM_GPUS (2), KIT_SLURM_TIMEOUT (600 s).
set -Eeuo pipefail

ROOT=${KIT_SLURM_DIR:-/tmp/kit-slurm}
CPUS=${KIT_SLURM_CPUS:-4}
GPUS=${KIT_SLURM_GPUS:-2}
LIMIT=${KIT_SLURM_TIMEOUT:-600}
SELF_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
T0=$(date +%s)
HOST=$(hostname -s)
SOCK=/run/mysqld/mysqld.sock
MARK="written by rlhf-kit tests/slurm/start_slurm.sh"

say()  { echo "[kit-slurm +$(( $(date +%s) - T0 ))s] $*"; }
fail() {
  trap - ERR
  echo "start_slurm.sh: $*" >&2
  for f in "$ROOT"/log/*.log "$ROOT"/state/dblog/*.log; do [ -s "$f" ] && { echo "--- last lines of $f" >&2; tail -n 20 "$f" >&2; }; done
  [ "${KIT_SLURM_KEEP_ON_FAILURE:-0}" = 1 ] || KIT_SLURM_DIR=$ROOT "$SELF_DIR/stop_slurm.sh" >&2 || true
  exit 1
}
trap 'fail "failed at line $LINENO: $BASH_COMMAND"' ERR
remaining() { local r=$(( T0 + LIMIT - $(date +%s) )); (( r > 0 )) && echo "$r" || echo 1; }
# poll "what" max_seconds command...: retry every 0.2 s, never past the overall limit
poll() {
  local what=$1 max=$2; shift 2
  local stop=$(( $(date +%s) + max )); (( stop > T0 + LIMIT )) && stop=$(( T0 + LIMIT ))
  until "$@" >/dev/null 2>&1; do (( $(date +%s) < stop )) || return 1; sleep 0.2; done
  say "$what"
}
# ours PIDFILE COMM: the pid in PIDFILE is alive (not a zombie) and is the program COMM
ours() {
  local pid; pid=$(cat "$1" 2>/dev/null) || return 1
  [ -n "$pid" ] && [ -r "/proc/$pid/stat" ] && [ "$(awk '{print $3}' "/proc/$pid/stat")" != Z ] \
    && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ]
}
node_state() { sinfo -h -n "$HOST" -o %T 2>/dev/null | head -n1; }

[ "$(id -u)" = 0 ] || fail "run me as root (package install, munge, slurm daemons)"

if [ "${KIT_SLURM_RESTART:-0}" != 1 ] && ours "$ROOT/run/slurmctld.pid" slurmctld && ours "$ROOT/run/slurmd.pid" slurmd \
   && ours "$ROOT/run/slurmdbd.pid" slurmdbd && [[ "$(node_state)" =~ ^(idle|mixed|allocated)$ ]]; then
  say "already up (node $HOST $(node_state)); KIT_SLURM_RESTART=1 to start afresh"
  exit 0
fi
[ -d "$ROOT/run" ] && { say "cleaning up a previous instance"; KIT_SLURM_DIR=$ROOT "$SELF_DIR/stop_slurm.sh" || true; }

# 1. packages: only what is missing; keep their postinst from starting system services
need=()
for p in slurmctld slurmd slurm-client slurmdbd munge mariadb-server; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed' || need+=("$p")
done
if (( ${#need[@]} )); then
  say "installing ${need[*]}"
  blocker=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; blocker=1; fi
  export DEBIAN_FRONTEND=noninteractive
  timeout "$(remaining)" apt-get update -qq || fail "apt-get update failed"
  mkdir -p "$ROOT"
  timeout "$(remaining)" apt-get install -y -qq --no-install-recommends -o Dpkg::Use-Pty=0 "${need[@]}" >"$ROOT/apt.log" 2>&1 \
    || { tail -n 20 "$ROOT/apt.log" >&2; fail "apt-get install failed (log: $ROOT/apt.log)"; }
  (( blocker )) && rm -f /usr/sbin/policy-rc.d
fi

# 2. a clean state directory and fake GPU devices
rm -rf "$ROOT/state" "$ROOT/log" "$ROOT/run"
mkdir -p "$ROOT"/{etc,log,run,state/ctld,state/d,gpu}
for ((i = 0; i < GPUS; i++)); do
  # a character device (numbers of /dev/null): slurmd then accepts it as a GPU and sets CUDA_VISIBLE_DEVICES
  [ -c "$ROOT/gpu/nvidia$i" ] || { rm -f "$ROOT/gpu/nvidia$i"; mknod "$ROOT/gpu/nvidia$i" c 1 3; }
done

# 3. configuration (clients read /etc/slurm, so that is where it goes; a foreign config is kept aside)
mem=$(( $(free -m | awk '/^Mem:/{print $2}') - 2048 ))
(( mem < 1024 )) && mem=1024
gres_types="" node_gres=""
if (( GPUS > 0 )); then gres_types="GresTypes=gpu"; node_gres="Gres=gpu:$GPUS"; fi
cat >"$ROOT/etc/slurm.conf" <<EOF
# $MARK
ClusterName=kit
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=5
StateSaveLocation=$ROOT/state/ctld
SlurmdSpoolDir=$ROOT/state/d
SlurmctldPidFile=$ROOT/run/slurmctld.pid
SlurmdPidFile=$ROOT/run/slurmd.pid
SlurmctldLogFile=$ROOT/log/slurmctld.log
SlurmdLogFile=$ROOT/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1,sched_min_interval=0
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStorageEnforce=associations
AccountingStorageTRES=gres/gpu
JobAcctGatherType=jobacct_gather/linux
JobCompType=jobcomp/none
DefMemPerCPU=500
MailProg=/bin/true
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
MinJobAge=600
KillWait=5
InactiveLimit=0
$gres_types
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$mem $node_gres State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
{ echo "# $MARK"; echo "AutoDetect=off"
  (( GPUS > 0 )) && echo "NodeName=$HOST Name=gpu File=$ROOT/gpu/nvidia[0-$((GPUS - 1))]"; } >"$ROOT/etc/gres.conf"
cat >"$ROOT/etc/slurmdbd.conf" <<EOF
# $MARK
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
LogFile=$ROOT/log/slurmdbd.log
PidFile=$ROOT/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=root
StorageLoc=kit_slurm_acct
EOF
mkdir -p /etc/slurm
for f in slurm.conf gres.conf slurmdbd.conf; do
  if [ -e "/etc/slurm/$f" ] && ! grep -q "$MARK" "/etc/slurm/$f"; then mv "/etc/slurm/$f" "/etc/slurm/$f.before-kit"; fi
done
install -m 644 "$ROOT/etc/slurm.conf" "$ROOT/etc/gres.conf" /etc/slurm/
install -m 600 "$ROOT/etc/slurmdbd.conf" /etc/slurm/
say "config written: node $HOST, $CPUS cpus, ${mem}M, $GPUS fake gpus"

# 4. munge (reuse one that answers; otherwise start our own and remember that we did)
if ! { munge -n | unmunge; } >/dev/null 2>&1; then
  [ -s /etc/munge/munge.key ] || mungekey --create --force
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  install -d -o munge -g munge /run/munge /var/lib/munge /var/log/munge
  rm -f /run/munge/munged.pid
  runuser -u munge -- /usr/sbin/munged --force
  poll "munge up" 20 bash -c 'munge -n | unmunge' || fail "munged did not start"
  cp /run/munge/munged.pid "$ROOT/run/munged.pid"
fi

# 5. MariaDB (a private datadir, our own process) and slurmdbd
if ! mariadb-admin --socket=$SOCK ping >/dev/null 2>&1; then
  # mariadbd runs as mysql: its data, pid file and log live in folders that user owns
  install -d -o mysql -g mysql /run/mysqld "$ROOT/state/db" "$ROOT/state/dblog"
  mariadb-install-db --user=mysql --datadir="$ROOT/state/db" --auth-root-authentication-method=socket --skip-test-db \
    >"$ROOT/log/mariadb-install.log" 2>&1 || fail "mariadb-install-db failed"
  setsid /usr/sbin/mariadbd --user=mysql --datadir="$ROOT/state/db" --socket=$SOCK --skip-networking \
    --pid-file="$ROOT/state/dblog/mariadbd.pid" --log-error="$ROOT/state/dblog/mariadb.log" --innodb-buffer-pool-size=64M \
    </dev/null >/dev/null 2>&1 &
  echo $! >"$ROOT/run/mariadbd.pid"
  poll "mariadb up" 60 mariadb-admin --socket=$SOCK ping || fail "MariaDB did not start"
else
  mariadb --socket=$SOCK -e 'DROP DATABASE IF EXISTS kit_slurm_acct' || true   # a shared server: start clean
fi
slurmdbd || fail "slurmdbd did not start"
poll "slurmdbd answering" 60 sacctmgr -n list cluster || fail "slurmdbd does not answer"

# 6. associations before the controller starts, so it loads them: root may use `kit` (default) and
#    `root`, nobody may use `others`
sacctmgr -i -Q add cluster kit >/dev/null
sacctmgr -i -Q add account kit,others cluster=kit description=rlhf-kit-tests organization=kit >/dev/null
sacctmgr -i -Q add user root account=kit cluster=kit >/dev/null
sacctmgr -i -Q modify user root set defaultaccount=kit >/dev/null

# 7. controller and node daemon
slurmctld || fail "slurmctld did not start"
poll "slurmctld answering" 60 scontrol ping || fail "slurmctld does not answer"
slurmd || fail "slurmd did not start"
poll "node $HOST idle" 90 bash -c "[ \"\$(sinfo -h -n $HOST -o %T)\" = idle ]" \
  || { scontrol show node "$HOST" >&2 || true; fail "node $HOST is '$(node_state)', not idle"; }

# 8. one job through the whole path, accounting included
job=$(sbatch --parsable -o /dev/null --wrap true) || fail "smoke job refused"
poll "smoke job $job completed and accounted" 60 \
  bash -c "[ \"\$(sacct -n -X -P -o State -j $job | head -n1)\" = COMPLETED ]" || fail "smoke job $job did not complete"
say "Slurm is up (sinfo: $(sinfo -h -o '%P %D %T %G' | head -n1)); stop it with tests/slurm/stop_slurm.sh"

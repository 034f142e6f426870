#!/usr/bin/env bash
# A real single-host Slurm for the cluster tests: Debian's slurm-wlm and munge, slurmctld and two
# slurmd daemons as two nodes (n1, n2) on this host, each with two fake GPUs declared as GRES.
#
#   bash scripts/local_slurm.sh install   # as root: apt-get install slurm-wlm munge (CI does this)
#   bash scripts/local_slurm.sh start     # as root: start munge, slurmctld, slurmd n1 and n2; prints SLURM_CONF=...
#   bash scripts/local_slurm.sh stop      # stop the daemons this script started
#   bash scripts/local_slurm.sh status    # exit 0 when both nodes answer
#
# Everything lives in $LOCAL_SLURM_DIR (default /tmp/imagenet-sd-slurm): slurm.conf, gres.conf, state,
# spool, logs and the fake GPU device files (character devices with /dev/null's numbers). The tools
# find the cluster through SLURM_CONF=$LOCAL_SLURM_DIR/slurm.conf. Nodes reach each other at 127.0.0.1
# (NodeAddr) on ports of their own; their names go into /etc/hosts so that a job's node list resolves.
# Exit status: 0 done, 1 failed (its reason on one line), 2 bad usage.
set -u -o pipefail

DIR="${LOCAL_SLURM_DIR:-/tmp/imagenet-sd-slurm}"
CONF="$DIR/slurm.conf"
NODES=(n1 n2)
fail() { echo "local_slurm: $*" >&2; exit 1; }
need_root() { [[ $(id -u) == 0 ]] || fail "$1 needs root (it $2); run it as root or with sudo"; }

install() {
    need_root install "installs Debian's slurm-wlm and munge"
    command -v slurmctld > /dev/null && command -v munged > /dev/null && return 0
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge > "${TMPDIR:-/tmp}/local-slurm-apt.log" 2>&1 \
        || fail "apt-get install slurm-wlm munge failed; see ${TMPDIR:-/tmp}/local-slurm-apt.log"
}

write_conf() {
    local host
    host="$(hostname -s)"
    mkdir -p "$DIR/state" "$DIR/dev" "$DIR/log"
    for i in 0 1 2 3; do [[ -e "$DIR/dev/gpu$i" ]] || mknod "$DIR/dev/gpu$i" c 1 3; done
    cat > "$CONF.new" <<CONF
# Written by scripts/local_slurm.sh: a test cluster of two nodes on one host.
ClusterName=imagenet-sd-test
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=17817
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job waits cred_expire + 1 s before it may start again (120 s by default): 10 s keeps the tests short.
AuthInfo=cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool-%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
GresTypes=gpu
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
KillWait=5
MinJobAge=600
InactiveLimit=0
OverTimeLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
# Each node declares the same fixed shape whatever the host (config_overrides: slurmd reports these, not
# what it detects), so that a job's request fits on any machine: a shape read off the host broke CI, where
# nproc under the tests' OMP_NUM_THREADS=1 said 1 CPU and every 2-task job was refused. CR_CPU counts CPUs,
# not cores, so hyperthreads do not halve it. The tasks are small; four CPUs a node oversubscribe the host.
NodeName=DEFAULT CPUs=4 Boards=1 SocketsPerBoard=1 CoresPerSocket=4 ThreadsPerCore=1 RealMemory=4096 Gres=gpu:2 State=UNKNOWN
NodeName=n1 NodeHostname=$host NodeAddr=127.0.0.1 Port=17818
NodeName=n2 NodeHostname=$host NodeAddr=127.0.0.1 Port=17819
PartitionName=test Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
    cat > "$DIR/gres.conf.new" <<GRES
NodeName=n1 Name=gpu File=$DIR/dev/gpu[0-1]
NodeName=n2 Name=gpu File=$DIR/dev/gpu[2-3]
GRES
}

running() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2> /dev/null; }

status() {
    export SLURM_CONF="$CONF"
    [[ -f "$CONF" ]] || return 1
    local idle
    idle=$(sinfo -h -N -o '%N %t' 2> /dev/null | awk '$2 ~ /^(idle|mix|alloc)/' | wc -l)
    [[ $idle == "${#NODES[@]}" ]]
}

start() {
    need_root start "starts munged, slurmctld and slurmd as root"
    command -v slurmctld > /dev/null || fail "slurmctld is not installed; run: bash scripts/local_slurm.sh install"
    export SLURM_CONF="$CONF"
    write_conf
    if cmp -s "$CONF.new" "$CONF" && cmp -s "$DIR/gres.conf.new" "$DIR/gres.conf" && status; then
        rm -f "$CONF.new" "$DIR/gres.conf.new"; echo "SLURM_CONF=$CONF"; return 0
    fi
    stop          # daemons of an older configuration (or half started) go first
    mv "$CONF.new" "$CONF"; mv "$DIR/gres.conf.new" "$DIR/gres.conf"
    for n in "${NODES[@]}"; do grep -qw "$n" /etc/hosts || echo "127.0.0.1 $n" >> /etc/hosts; done
    if ! pgrep -x munged > /dev/null; then
        [[ -f /etc/munge/munge.key ]] || { mkdir -p /etc/munge; dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 2> /dev/null; }
        chown munge:munge /etc/munge/munge.key 2> /dev/null; chmod 400 /etc/munge/munge.key
        mkdir -p /run/munge && chown munge:munge /run/munge 2> /dev/null
        runuser -u munge -- munged > "$DIR/log/munged.out" 2>&1 || munged --force > "$DIR/log/munged.out" 2>&1 \
            || fail "munged did not start; see $DIR/log/munged.out"
    fi
    running "$DIR/slurmctld.pid" || slurmctld -c -f "$CONF" > "$DIR/log/slurmctld.out" 2>&1 \
        || fail "slurmctld did not start; see $DIR/log/slurmctld.log"
    for n in "${NODES[@]}"; do
        running "$DIR/slurmd-$n.pid" || slurmd -N "$n" -f "$CONF" > "$DIR/log/slurmd-$n.out" 2>&1 \
            || fail "slurmd -N $n did not start; see $DIR/log/slurmd-$n.log"
    done
    for _ in $(seq 60); do status && { echo "SLURM_CONF=$CONF"; return 0; }; sleep 0.5; done
    fail "the nodes did not come up in 30 s: $(sinfo -h -N -o '%N %t %E' 2>&1 | tr '\n' ';'); logs in $DIR/log"
}

# The pid file of a daemon still running, if any.
still_running() {
    local f
    for f in "$DIR"/slurmd-*.pid "$DIR/slurmctld.pid"; do running "$f" && { echo "$f"; return 0; }; done
    return 1
}

stop() {
    local f
    for f in "$DIR"/slurmd-*.pid "$DIR/slurmctld.pid"; do running "$f" && kill "$(cat "$f")"; done
    for _ in $(seq 40); do          # up to 20 s for them to exit and free their ports
        still_running > /dev/null || return 0
        sleep 0.5
    done
    fail "a daemon did not stop in 20 s: $(still_running)"
}

case "${1:-}" in
    install) install ;;
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: bash scripts/local_slurm.sh install|start|stop|status" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# A real single-node SLURM cluster on loopback for the tests: munge, MariaDB, slurmdbd, slurmctld, slurmd.
#   scripts/slurm_cluster.sh install   Debian packages (needs root)
#   scripts/slurm_cluster.sh start     configure and start every daemon, wait until the node is idle
#   scripts/slurm_cluster.sh stop      stop the daemons by their pid files
#   scripts/slurm_cluster.sh status    exit 0 when sinfo reports the node
set -euo pipefail

STATE=${CLIPKD_SLURM_STATE:-/var/tmp/clipkd-slurm}
CONF=/etc/slurm
PACKAGES="munge slurmctld slurmd slurm-client slurmdbd mariadb-server"

need_root() { [ "$(id -u)" = 0 ] || { echo "slurm_cluster: needs root" >&2; exit 3; }; }

install() {
    need_root
    if command -v slurmctld >/dev/null && command -v slurmdbd >/dev/null && command -v mariadbd >/dev/null; then
        return 0
    fi
    # keep the packages' maintainer scripts from starting services: this script starts them itself
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends $PACKAGES >/dev/null
    rm -f /usr/sbin/policy-rc.d
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local seconds=$1 what=$2; shift 2
    for _ in $(seq $((seconds * 10))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
    echo "slurm_cluster: $what did not come up in ${seconds}s" >&2
    return 1
}

start_munge() {
    mkdir -p /run/munge /etc/munge && chown munge:munge /run/munge /etc/munge
    [ -s /etc/munge/munge.key ] || { dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null;
                                     chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key; }
    pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged
    wait_for 10 munged munge -n
}

start_mariadb() {
    mkdir -p "$STATE/mysql" /run/mysqld && chown mysql:mysql "$STATE/mysql" /run/mysqld
    if [ ! -d "$STATE/mysql/mysql" ]; then
        mariadb-install-db --user=mysql --datadir="$STATE/mysql" >/dev/null
    fi
    if ! mariadb -uroot -e 'select 1' >/dev/null 2>&1; then
        setsid mariadbd --user=mysql --datadir="$STATE/mysql" --skip-networking \
            --socket=/run/mysqld/mysqld.sock --pid-file=/run/mysqld/mariadb.pid </dev/null >"$STATE/mariadb.log" 2>&1 &
    fi
    wait_for 30 mariadb mariadb -uroot -e 'select 1'
    mariadb -uroot -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
        DROP DATABASE IF EXISTS slurm_acct_db; CREATE DATABASE slurm_acct_db;
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
}

write_config() {
    mkdir -p "$CONF" "$STATE/ctld" "$STATE/d" "$STATE/log"
    local hardware
    hardware=$(slurmd -C | head -n 1 | sed -e 's/^NodeName=[^ ]* //' -e 's/ UpTime=.*//')
    # job ids restart at 1 after a state wipe and would collide with old result files: start from the clock
    local first_job_id=$(( $(date +%s) % 60000000 + 1000 ))  # below MaxJobId (67043328)
    cat > "$CONF/slurm.conf" <<CONF
ClusterName=clipkd
SlurmctldHost=localhost
SlurmUser=root
AuthType=auth/munge
# a requeued job waits for the credential lifetime before it may start again (default 120 s)
AuthInfo=cred_expire=10
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=5,bf_interval=1
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/none
FirstJobId=$first_job_id
MinJobAge=600
KillWait=5
ReturnToService=2
MpiDefault=none
NodeName=localhost NodeAddr=127.0.0.1 $hardware State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF
    cat > "$CONF/slurmdbd.conf" <<CONF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
PidFile=$STATE/slurmdbd.pid
LogFile=$STATE/log/slurmdbd.log
CONF
    chmod 600 "$CONF/slurmdbd.conf" && chown root:root "$CONF/slurmdbd.conf"
}

start() {
    need_root
    if status >/dev/null 2>&1; then echo "slurm_cluster: already running"; return 0; fi
    mkdir -p "$STATE"
    start_munge
    start_mariadb
    write_config
    rm -rf "$STATE/ctld"/* "$STATE/d"/*
    slurmdbd
    wait_for 30 slurmdbd sacctmgr -n list cluster
    sacctmgr -i add cluster clipkd >/dev/null 2>&1 || true
    slurmctld -i
    slurmd -N localhost
    wait_for 60 "an idle node" sh -c 'sinfo -h -o %T | grep -qx idle'
    echo "slurm_cluster: up ($(sinfo -h -o '%P %D %T %c CPUs'))"
}

stop_pid() {
    local file=$1
    [ -s "$file" ] || return 0
    local pid; pid=$(cat "$file")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$file"
}

stop() {
    need_root
    stop_pid "$STATE/slurmd.pid"
    stop_pid "$STATE/slurmctld.pid"
    stop_pid "$STATE/slurmdbd.pid"
    stop_pid /run/mysqld/mariadb.pid
    echo "slurm_cluster: stopped"
}

status() { sinfo -h -o %T 2>/dev/null | grep -Eq 'idle|mix|alloc'; }

case "${1:-}" in
    install) install ;;
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 install|start|stop|status" >&2; exit 2 ;;
esac

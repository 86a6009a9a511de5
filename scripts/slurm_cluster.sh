#!/usr/bin/env bash
# A real SLURM cluster for the tests: munge, MariaDB, slurmdbd, slurmctld, slurmd.
#   scripts/slurm_cluster.sh install   Debian packages (needs root)
#   scripts/slurm_cluster.sh start     configure and start every daemon, wait until the node is idle
#   scripts/slurm_cluster.sh stop      stop the daemons by their pid files
#   scripts/slurm_cluster.sh status    exit 0 when sinfo reports the node
# One node on loopback by default. NODES=2 starts two: node1 on this host and node2 in a network namespace of
# its own (clipkd-node2, joined by a veth pair on 10.213.0.0/24, names in /etc/hosts), each with one CPU, so a
# job can span two nodes whose processes meet over a network.
set -euo pipefail

STATE=${CLIPKD_SLURM_STATE:-/var/tmp/clipkd-slurm}
CONF=/etc/slurm
NODES=${NODES:-1}
NETNS=clipkd-node2
NODE1_IP=10.213.0.1
NODE2_IP=10.213.0.2
HOSTS_MARK="# clipkd test cluster"
PACKAGES="munge slurmctld slurmd slurm-client slurmdbd mariadb-server iproute2"

need_root() { [ "$(id -u)" = 0 ] || { echo "slurm_cluster: needs root" >&2; exit 3; }; }

install() {
    need_root
    if command -v slurmctld >/dev/null && command -v slurmdbd >/dev/null && command -v mariadbd >/dev/null \
        && command -v ip >/dev/null; then
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

make_netns() {  # node2's network: a namespace joined to this host by a veth pair, both ends named clipkd0
    ip netns list | grep -qw "$NETNS" || ip netns add "$NETNS"
    if ! ip link show clipkd0 >/dev/null 2>&1; then
        ip link add clipkd0 type veth peer name clipkd0n
        ip link set clipkd0n netns "$NETNS"
        ip netns exec "$NETNS" ip link set clipkd0n name clipkd0
        ip addr add "$NODE1_IP/24" dev clipkd0
        ip link set clipkd0 up
        ip netns exec "$NETNS" ip addr add "$NODE2_IP/24" dev clipkd0
        ip netns exec "$NETNS" ip link set clipkd0 up
        ip netns exec "$NETNS" ip link set lo up
    fi
    grep -q "$HOSTS_MARK" /etc/hosts || printf '%s node1 %s\n%s node2 %s\n' "$NODE1_IP" "$HOSTS_MARK" \
        "$NODE2_IP" "$HOSTS_MARK" >> /etc/hosts
}

remove_netns() {
    ip link del clipkd0 2>/dev/null || true
    ip netns del "$NETNS" 2>/dev/null || true
    sed -i "/$HOSTS_MARK/d" /etc/hosts
}

nodes_config() {  # the NodeName lines, the partition's node list, and where slurmctld listens
    if [ "$NODES" = 2 ]; then
        local memory; memory=$(slurmd -C | head -n 1 | sed -e 's/.*RealMemory=\([0-9]*\).*/\1/')
        echo "SlurmctldHost=$(hostname -s)($NODE1_IP)"
        echo "SlurmdParameters=config_overrides"
        echo "NodeName=node1 NodeAddr=$NODE1_IP CPUs=1 RealMemory=$((memory / 2)) State=UNKNOWN"
        echo "NodeName=node2 NodeAddr=$NODE2_IP CPUs=1 RealMemory=$((memory / 2)) State=UNKNOWN"
        echo "PartitionName=debug Nodes=node[1-2] Default=YES MaxTime=INFINITE State=UP"
    else
        local hardware
        hardware=$(slurmd -C | head -n 1 | sed -e 's/^NodeName=[^ ]* //' -e 's/ UpTime=.*//')
        echo "SlurmctldHost=localhost"
        echo "NodeName=localhost NodeAddr=127.0.0.1 $hardware State=UNKNOWN"
        echo "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP"
    fi
}

write_config() {
    mkdir -p "$CONF" "$STATE/ctld" "$STATE/d" "$STATE/log"
    # job ids restart at 1 after a state wipe and would collide with old result files: start from the clock
    local first_job_id=$(( $(date +%s) % 60000000 + 1000 ))  # below MaxJobId (67043328)
    cat > "$CONF/slurm.conf" <<CONF
ClusterName=clipkd
SlurmUser=root
AuthType=auth/munge
# a requeued job waits for the credential lifetime before it may start again (default 120 s)
AuthInfo=cred_expire=10
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d/%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
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
$(nodes_config)
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
    if [ "$NODES" = 2 ]; then
        make_netns
        mkdir -p "$STATE/d/node1" "$STATE/d/node2"
        slurmd -N node1
        # nsenter, not "ip netns exec": that remounts /sys, hiding the cgroup tree slurmd needs
        nsenter --net=/var/run/netns/"$NETNS" slurmd -N node2
        wait_for 60 "two idle nodes" sh -c 'sinfo -h -N -o %T | grep -cx idle | grep -qx 2'
    else
        mkdir -p "$STATE/d/localhost"
        slurmd -N localhost
        wait_for 60 "an idle node" sh -c 'sinfo -h -o %T | grep -qx idle'
    fi
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
    for pid_file in "$STATE"/slurmd-*.pid "$STATE/slurmd.pid"; do stop_pid "$pid_file"; done
    stop_pid "$STATE/slurmctld.pid"
    stop_pid "$STATE/slurmdbd.pid"
    stop_pid /run/mysqld/mariadb.pid
    remove_netns
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

#!/usr/bin/env bash
# A real PostgreSQL server for the store's tests, on a Unix socket only (no TCP port is opened).
#   scripts/postgres.sh install   Debian's postgresql (needs root)
#   scripts/postgres.sh start     initialise a cluster in $STATE once, start it, wait until it answers
#   scripts/postgres.sh stop      stop it
#   scripts/postgres.sh status    exit 0 when it answers
#   scripts/postgres.sh url       the SQLAlchemy URL of its `postgres` database (tests create their own)
set -euo pipefail

STATE=${CLIPKD_PG_STATE:-/var/tmp/clipkd-postgres}
PORT=${CLIPKD_PG_PORT:-54329}

need_root() { [ "$(id -u)" = 0 ] || { echo "postgres: needs root" >&2; exit 3; }; }
bin_dir() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }

install() {
    need_root
    [ -n "$(bin_dir)" ] && return 0
    # keep the package's maintainer scripts from starting a system cluster: this script starts its own
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends postgresql >/dev/null
    rm -f /usr/sbin/policy-rc.d
}

status() { "$(bin_dir)/pg_isready" -q -h "$STATE" -p "$PORT" 2>/dev/null; }

start() {
    need_root
    if status; then echo "postgres: already running"; return 0; fi
    local bin; bin=$(bin_dir)
    [ -n "$bin" ] || { echo "postgres: not installed (scripts/postgres.sh install)" >&2; exit 3; }
    mkdir -p "$STATE" && chown postgres:postgres "$STATE"
    if [ ! -f "$STATE/data/PG_VERSION" ]; then
        runuser -u postgres -- "$bin/initdb" -D "$STATE/data" --auth=trust --username=postgres >/dev/null
    fi
    runuser -u postgres -- "$bin/pg_ctl" -D "$STATE/data" -l "$STATE/server.log" -w -t 60 \
        -o "-p $PORT -k $STATE -c listen_addresses='' -c max_connections=100 -c fsync=off" start >/dev/null
    echo "postgres: up ($("$bin/postgres" --version), socket $STATE port $PORT)"
}

stop() {
    need_root
    status || return 0
    runuser -u postgres -- "$(bin_dir)/pg_ctl" -D "$STATE/data" -m fast -w stop >/dev/null
    echo "postgres: stopped"
}

url() { echo "postgresql+psycopg://postgres@/postgres?host=$STATE&port=$PORT"; }

case "${1:-}" in
    install) install ;;
    start) start ;;
    stop) stop ;;
    status) status ;;
    url) url ;;
    *) echo "usage: $0 install|start|stop|status|url" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# Starts (or stops) the PostgreSQL and Redis servers the storage and limit tests run against:
# private instances on loopback, on their own ports, with data in a scratch directory, so
# nothing on the machine is touched. Source it to get the URLs exported:
#   source scripts/services.sh start   # exports PARLANCE_TEST_POSTGRES_URL, PARLANCE_TEST_REDIS_URL
#   scripts/services.sh stop
set -euo pipefail

dir="${PARLANCE_SERVICES_DIR:-/tmp/parlance-services}"
pg_port="${PARLANCE_TEST_PG_PORT:-55432}"
redis_port="${PARLANCE_TEST_REDIS_PORT:-56379}"

pg_bin() {
  local d
  d="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)"
  [ -n "$d" ] || { echo "PostgreSQL is not installed (scripts/bootstrap.sh installs it)" >&2; return 1; }
  echo "$d"
}

# PostgreSQL refuses to run as root: run it as the `postgres` user when we are root.
as_pg() {
  if [ "$(id -u)" = 0 ]; then su postgres -s /bin/sh -c "$*"; else sh -c "$*"; fi
}

start() {
  local bin; bin="$(pg_bin)"
  command -v redis-server >/dev/null || { echo "redis-server is not installed (scripts/bootstrap.sh installs it)" >&2; return 1; }
  mkdir -p "$dir"
  if [ "$(id -u)" = 0 ]; then chown postgres "$dir" 2>/dev/null || true; chmod 755 "$dir"; fi
  if [ ! -f "$dir/pg/PG_VERSION" ]; then
    as_pg "$bin/initdb -D '$dir/pg' -U parlance --auth=trust -E UTF8 >/dev/null"
  fi
  if ! as_pg "$bin/pg_ctl -D '$dir/pg' status >/dev/null 2>&1"; then
    as_pg "$bin/pg_ctl -D '$dir/pg' -l '$dir/pg.log' -w -o \"-p $pg_port -k '$dir' -c listen_addresses=127.0.0.1 -c max_connections=300 -c fsync=off\" start >/dev/null"
  fi
  as_pg "$bin/psql -h 127.0.0.1 -p $pg_port -U parlance -d postgres -tAc \"SELECT 1 FROM pg_database WHERE datname='parlance'\"" | grep -q 1 \
    || as_pg "$bin/createdb -h 127.0.0.1 -p $pg_port -U parlance parlance"
  if ! redis-cli -p "$redis_port" ping >/dev/null 2>&1; then
    redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no \
      --daemonize yes --pidfile "$dir/redis.pid" --logfile "$dir/redis.log" --dir "$dir"
    for _ in $(seq 50); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break; sleep 0.1; done
  fi
  export PARLANCE_TEST_POSTGRES_URL="postgres://parlance@127.0.0.1:$pg_port/parlance"
  export PARLANCE_TEST_REDIS_URL="redis://127.0.0.1:$redis_port/"
  echo "services: PostgreSQL on 127.0.0.1:$pg_port, Redis on 127.0.0.1:$redis_port" >&2
}

stop() {
  local bin; bin="$(pg_bin)" || return 0
  [ -f "$dir/pg/PG_VERSION" ] && as_pg "$bin/pg_ctl -D '$dir/pg' -m fast stop >/dev/null 2>&1" || true
  redis-cli -p "$redis_port" shutdown nosave >/dev/null 2>&1 || true
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: scripts/services.sh start|stop" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# Install Debian's PostgreSQL if missing and start a throwaway server on loopback for the tests.
#
#   eval "$(.ci/postgres.sh)"        # exports BLOODCELL_TEST_POSTGRES
#   ... pytest ...
#   .ci/postgres.sh stop
#
# The cluster lives in a temporary folder, trusts local connections (loopback only) and is owned
# by the `postgres` user when run as root (initdb refuses root), else by the caller.
# Everything but the final `export` line goes to stderr, so `eval "$(...)"` works.
set -euo pipefail

PORT="${BLOODCELL_PG_PORT:-5433}"
STATE="${BLOODCELL_PG_STATE:-/tmp/bloodcell-pg.dir}"  # remembers the cluster folder for `stop`

as_owner() {
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

if [ "${1:-}" = "stop" ]; then
    [ -f "$STATE" ] || { echo "no server started by $0" >&2; exit 0; }
    DIR="$(cat "$STATE")"
    BIN="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)"
    as_owner "$BIN/pg_ctl" -D "$DIR/data" -m fast stop >&2 || true
    rm -rf "$DIR" "$STATE"
    exit 0
fi

if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    echo "installing postgresql (Debian package)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq postgresql >&2
fi
BIN="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)"

DIR="$(mktemp -d /tmp/bloodcell-pg.XXXXXX)"
chmod 755 "$DIR"
[ "$(id -u)" = 0 ] && chown postgres: "$DIR"
as_owner "$BIN/initdb" -D "$DIR/data" -U postgres --auth=trust -E UTF8 >&2
as_owner "$BIN/pg_ctl" -D "$DIR/data" -l "$DIR/log" -w \
    -o "-k $DIR -p $PORT -c listen_addresses=127.0.0.1 -c max_connections=200 -c fsync=off" start >&2
echo "$DIR" > "$STATE"
echo "export BLOODCELL_TEST_POSTGRES=postgresql+psycopg2://postgres@127.0.0.1:$PORT/postgres"

#!/bin/bash
# The stand-in postgres:15 image's entrypoint (see postgres.Containerfile):
# the part of the upstream image's behaviour that compose.yaml relies on.
# First start: initdb with POSTGRES_USER and its password (POSTGRES_PASSWORD
# or POSTGRES_PASSWORD_FILE), POSTGRES_INITDB_ARGS, listen on all addresses,
# scram-sha-256 for other hosts, create POSTGRES_DB, run
# /docker-entrypoint-initdb.d/*.sh and *.sql. Then run the server as postgres.
set -Eeuo pipefail

file_env() {
  local var=$1 file_var="${1}_FILE"
  if [[ -n ${!file_var:-} ]]; then
    export "$var"="$(<"${!file_var}")"
  fi
}

if [[ ${1:0:1} == - ]]; then
  set -- postgres "$@"
fi

if [[ $1 == postgres && $(id -u) == 0 ]]; then
  mkdir -p "$PGDATA"
  chown postgres:postgres "$PGDATA"
  chmod 700 "$PGDATA"
  exec setpriv --reuid=postgres --regid=postgres --init-groups "${BASH_SOURCE[0]}" "$@"
fi

if [[ $1 == postgres && ! -s $PGDATA/PG_VERSION ]]; then
  file_env POSTGRES_PASSWORD
  file_env POSTGRES_USER
  file_env POSTGRES_DB
  : "${POSTGRES_USER:=postgres}"
  : "${POSTGRES_DB:=$POSTGRES_USER}"
  if [[ -z ${POSTGRES_PASSWORD:-} && ${POSTGRES_HOST_AUTH_METHOD:-} != trust ]]; then
    echo "error: POSTGRES_PASSWORD (or POSTGRES_PASSWORD_FILE) is not set" >&2
    exit 1
  fi
  pwfile=$(mktemp)
  printf '%s\n' "${POSTGRES_PASSWORD:-}" >"$pwfile"
  # shellcheck disable=SC2086 # POSTGRES_INITDB_ARGS is a list of arguments
  initdb --username="$POSTGRES_USER" --pwfile="$pwfile" ${POSTGRES_INITDB_ARGS:-}
  rm -f "$pwfile"
  printf "listen_addresses = '*'\n" >>"$PGDATA/postgresql.conf"
  printf 'host all all all %s\n' "${POSTGRES_HOST_AUTH_METHOD:-scram-sha-256}" >>"$PGDATA/pg_hba.conf"

  # A private server on the socket only, for the setup.
  pg_ctl -D "$PGDATA" -w -o "-c listen_addresses='' -c unix_socket_directories=/var/run/postgresql" start
  psql=(psql -X -v ON_ERROR_STOP=1 -h /var/run/postgresql --username "$POSTGRES_USER" --no-password)
  if [[ $POSTGRES_DB != postgres ]]; then
    "${psql[@]}" --dbname postgres --set db="$POSTGRES_DB" <<<'CREATE DATABASE :"db";'
  fi
  for f in /docker-entrypoint-initdb.d/*; do
    # shellcheck disable=SC1090 # the image user's init scripts
    case $f in
      *.sh) echo "running $f" && . "$f" ;;
      *.sql) echo "running $f" && "${psql[@]}" --dbname "$POSTGRES_DB" -f "$f" ;;
      *) ;;
    esac
  done
  pg_ctl -D "$PGDATA" -m fast -w stop
  unset POSTGRES_PASSWORD
  echo "PostgreSQL init process complete; ready for start up."
fi

exec "$@"

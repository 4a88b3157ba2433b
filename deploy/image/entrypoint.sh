#!/bin/sh
# The Daybook image's entrypoint: run the given command (default
# daybook-command) after turning DAYBOOK_PG_PASSWORD_FILE, a file holding the
# PostgreSQL password (a compose or Kubernetes secret), into a libpq password
# file that only this user can read, named by PGPASSFILE. DAYBOOK_PG then
# holds no password, and no password is in the environment or the process
# list. DAYBOOK_REDIS_PASSWORD_FILE is read by the binaries themselves.
set -eu

if [ -n "${DAYBOOK_PG_PASSWORD_FILE:-}" ]; then
  if [ ! -r "$DAYBOOK_PG_PASSWORD_FILE" ]; then
    echo "daybook-entrypoint: DAYBOOK_PG_PASSWORD_FILE: cannot read $DAYBOOK_PG_PASSWORD_FILE" >&2
    exit 2
  fi
  password=$(head -n 1 "$DAYBOOK_PG_PASSWORD_FILE")
  if [ -z "$password" ]; then
    echo "daybook-entrypoint: DAYBOOK_PG_PASSWORD_FILE: $DAYBOOK_PG_PASSWORD_FILE holds no password" >&2
    exit 2
  fi
  umask 077
  # The password file, private to this container's user (libpq ignores one
  # that others may read).
  dir=$(mktemp -d "${TMPDIR:-/tmp}/daybook-pg.XXXXXX")
  # In a pgpass line, ':' and '\' are escaped with '\'.
  printf '*:*:*:*:%s\n' "$(printf '%s' "$password" | sed 's/[\\:]/\\&/g')" >"$dir/pgpass"
  unset password
  export PGPASSFILE="$dir/pgpass"
  unset DAYBOOK_PG_PASSWORD_FILE
fi
exec "$@"

#!/bin/sh
# The one-shot `migrate` service of compose.yaml: apply the migrations as the
# PostgreSQL superuser (DAYBOOK_PG), then give the service roles, which
# migration 003 creates without a password, the passwords from
# DAYBOOK_COMMAND_PASSWORD, DAYBOOK_PROJECTOR_PASSWORD and
# DAYBOOK_QUERY_PASSWORD: the postgres image asks for a password over the
# network (scram-sha-256). Runs on every `docker compose up`; both steps are
# idempotent, and changed passwords take effect at the services' next start.
set -eu

: "${DAYBOOK_COMMAND_PASSWORD:?must be set}"
: "${DAYBOOK_PROJECTOR_PASSWORD:?must be set}"
: "${DAYBOOK_QUERY_PASSWORD:?must be set}"

daybook-admin migrate

# psql variables (:'name') quote the passwords as SQL literals.
psql "$DAYBOOK_PG" -X -q -v ON_ERROR_STOP=1 \
  -v command_password="$DAYBOOK_COMMAND_PASSWORD" \
  -v projector_password="$DAYBOOK_PROJECTOR_PASSWORD" \
  -v query_password="$DAYBOOK_QUERY_PASSWORD" <<'SQL'
ALTER ROLE daybook_command PASSWORD :'command_password';
ALTER ROLE daybook_projector PASSWORD :'projector_password';
ALTER ROLE daybook_query PASSWORD :'query_password';
SQL
echo "migrate: migrations applied, service role passwords set"

#!/bin/bash
# compose.yaml's pg-roles one-shot, run in the postgres image (for psql):
# create the service roles daybook_command, daybook_projector and
# daybook_query if they do not exist yet (migration 003 would create them
# without a password) and set each one's password from its secret file.
# Runs on every `up`: a changed secret takes effect at the services' next
# start. The passwords travel through files, never the command line.
set -euo pipefail

secrets=/run/secrets
# The superuser's password, in a libpq password file private to this run.
umask 077
PGPASSFILE=$(mktemp)
export PGPASSFILE
trap 'rm -f "$PGPASSFILE"' EXIT
printf '*:*:*:*:%s\n' "$(head -n 1 "$secrets/pg_postgres_password" | sed 's/[\\:]/\\&/g')" >"$PGPASSFILE"

for _ in $(seq 1 30); do
  pg_isready -q && break
  sleep 1
done

# psql reads each password with a backquoted command (\set name `...`) and
# quotes it as a literal (:'name').
psql -X -q -v ON_ERROR_STOP=1 <<SQL
SET password_encryption = 'scram-sha-256';
SELECT format('CREATE ROLE %I LOGIN', r)
  FROM unnest(ARRAY['daybook_command', 'daybook_projector', 'daybook_query']) AS r
 WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) \gexec
\set pw \`head -n 1 $secrets/pg_command_password\`
ALTER ROLE daybook_command PASSWORD :'pw';
\set pw \`head -n 1 $secrets/pg_projector_password\`
ALTER ROLE daybook_projector PASSWORD :'pw';
\set pw \`head -n 1 $secrets/pg_query_password\`
ALTER ROLE daybook_query PASSWORD :'pw';
SQL
echo "pg-roles: service roles ready, passwords set"

#!/usr/bin/env bash
# The logical backup and restore of docs/operations.md ("Backup and restore"), end to
# end, on two throw-away clusters:
#   1. an "old" cluster whose transaction ids are far ahead (its xid epoch advanced
#      with pg_resetwal, as years of traffic would) holds a migrated database with
#      events, and is dumped with pg_dump;
#   2. a new cluster restores the dump as it is: the projector, the command service
#      and `daybook-admin status` refuse to start (exit 3) and point at the docs;
#   3. the documented repair: stop the new cluster, `pg_resetwal -e <epoch>` with the
#      epoch computed from the log, start it: the services start, a new command is
#      appended and projected, and `daybook-admin verify` is clean.
# Run by meson (suite integration) with the DAYBOOK_*_BIN variables.
set -euo pipefail

REPO_TOP=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd -P)
DBK_PROG=logical_restore
# shellcheck source=scripts/lib.sh
source "$REPO_TOP/scripts/lib.sh"

: "${DAYBOOK_COMMAND_BIN:?run through meson test}" "${DAYBOOK_PROJECTOR_BIN:?}" "${DAYBOOK_ADMIN_BIN:?}"
# The clusters here trust loopback connections; no Redis ACL either.
unset PGPASSFILE DBK_REDIS_SECRETS

WORK=$(mktemp -d "${TMPDIR:-/tmp}/daybook-restore.XXXXXX")
OLD_HOME="" NEW_HOME="" REDIS_PORT="" PIDS=()

cleanup() {
  local pid home
  set +e
  for pid in "${PIDS[@]}"; do dbk_stop_pid "$pid" service 5; done
  [[ -n $REDIS_PORT ]] && dbk_redis_stop "$REDIS_PORT" "$WORK/redis.pid" nosave
  for home in "$OLD_HOME" "$NEW_HOME"; do
    [[ -n $home ]] || continue
    dbk_pg_stop "$home" immediate
    dbk_pg_kill "$home"
  done
  rm -rf -- "$WORK"
}
trap cleanup EXIT

fail() {
  dbk_say "FAILED: $*"
  local log
  for log in "$WORK"/*.log; do [[ -e $log ]] && dbk_tail "$log" 30; done
  exit 1
}

psql_at() { # PORT SQL -- one value, as the superuser, on database daybook
  PGCONNECT_TIMEOUT=10 "$DBK_PG_BIN/psql" "$(dbk_pg_uri "$1" daybook)" -XtAq -v ON_ERROR_STOP=1 -c "$2"
}

new_cluster() { # NAME PORT -- initdb, print the PostgreSQL home
  local home
  mkdir -p "$WORK/$1"
  home=$(dbk_pg_prepare_home "$WORK/$1" "$WORK/$1/postgres")
  dbk_pg_initdb "$home" test >&2
  dbk_pg_write_conf "$home" "$2" test
  printf '%s\n' "$home"
}

# run_until_exit NAME BIN ENV... -- run a service that must refuse to start: its
# exit status (124 if it still ran after 30 s); stderr into $WORK/NAME.log.
run_until_exit() {
  local name=$1 bin=$2 status=0
  shift 2
  env "$@" timeout 30 "$bin" >/dev/null 2>"$WORK/$name.log" || status=$?
  printf '%s\n' "$status"
}

start_service() { # NAME BIN ENV... -- start in the background
  local name=$1 bin=$2
  shift 2
  env "$@" "$bin" >/dev/null 2>>"$WORK/$name.log" &
  PIDS+=($!)
}

wait_for() { # SECONDS DESCRIPTION COMMAND... -- until COMMAND succeeds
  local deadline=$((SECONDS + $1)) what=$2
  shift 2
  until "$@"; do
    ((SECONDS < deadline)) || fail "timed out waiting for $what"
    sleep 0.2
  done
}

projected() { # PORT -- the SQL projection has applied the whole log
  [[ $(psql_at "$1" "SELECT (SELECT txid::text || '.' || position FROM projection_checkpoints \
    WHERE projection = 'sql') = (SELECT txid::text || '.' || position FROM events \
    ORDER BY txid DESC, position DESC LIMIT 1)") == t ]]
}

dbk_pg_setup_user
[[ -n ${DBK_PG_USER:-} ]] && chmod 711 "$WORK"
OLD_PORT=$(dbk_pick_free_port)
NEW_PORT=$(dbk_pick_free_port "$OLD_PORT")
REDIS_PORT=$(dbk_pick_free_port "$OLD_PORT" "$NEW_PORT")

# --- 1. the old cluster, its transaction ids in epoch 7, a log, a dump ------------------
OLD_HOME=$(new_cluster old "$OLD_PORT")
dbk_as_pg "$DBK_PG_BIN/pg_resetwal" -e 7 -D "$OLD_HOME/data" >/dev/null ||
  fail "pg_resetwal -e 7 on the old cluster"
dbk_pg_start "$OLD_HOME"
dbk_pg_ensure_db "$OLD_PORT" daybook
DAYBOOK_PG=$(dbk_pg_uri "$OLD_PORT" daybook) DAYBOOK_MIGRATIONS=$REPO_TOP/sql \
  "$DAYBOOK_ADMIN_BIN" migrate >"$WORK/migrate.log" 2>&1 || fail "migrate"
psql_at "$OLD_PORT" "INSERT INTO events (stream, version, type, data, metadata) VALUES
  ('account-a', 1, 'AccountOpened', '{\"account_id\":\"a\",\"name\":\"A\",\"currency\":\"EUR\",\"overdraft_limit\":0}', '{}'),
  ('account-a', 2, 'FundsDeposited', '{\"amount\":500}', '{}')" >/dev/null
old_max=$(psql_at "$OLD_PORT" "SELECT max(txid) FROM events")
((old_max >= 7 * 4294967296)) || fail "the old cluster's txids ($old_max) are not in epoch 7"
"$DBK_PG_BIN/pg_dump" -Fc -f "$WORK/daybook.dump" "$(dbk_pg_uri "$OLD_PORT" daybook)" ||
  fail "pg_dump"
dbk_pg_stop "$OLD_HOME" fast

# --- 2. restored as it is into a new cluster: refused ------------------------------------
NEW_HOME=$(new_cluster new "$NEW_PORT")
dbk_pg_start "$NEW_HOME"
for role in daybook_command daybook_projector daybook_query; do
  PGCONNECT_TIMEOUT=10 "$DBK_PG_BIN/psql" "$(dbk_pg_uri "$NEW_PORT" postgres)" -XqA \
    -v ON_ERROR_STOP=1 -c "CREATE ROLE $role LOGIN" >/dev/null
done
dbk_pg_ensure_db "$NEW_PORT" daybook
"$DBK_PG_BIN/pg_restore" -d "$(dbk_pg_uri "$NEW_PORT" daybook)" --exit-on-error \
  "$WORK/daybook.dump" 2>"$WORK/restore.log" || fail "pg_restore"
[[ $(psql_at "$NEW_PORT" "SELECT max(txid) FROM events") == "$old_max" ]] ||
  fail "the restore did not keep the txids"
dbk_redis_start "$REDIS_PORT" "$WORK/redis" "$WORK/redis.pid" "$WORK/redis.log" test

svc_env() { # ROLE -- the environment of a service on the new cluster
  printf '%s\n' "DAYBOOK_PG=$(dbk_pg_uri "$NEW_PORT" daybook "$1")" \
    "DAYBOOK_REDIS=redis://127.0.0.1:$REDIS_PORT" "DAYBOOK_TOKENS_FILE=$WORK/tokens.txt" \
    "DAYBOOK_LISTEN=127.0.0.1:$(dbk_pick_free_port "$OLD_PORT" "$NEW_PORT" "$REDIS_PORT")"
}
token=restore-test-token
printf 'restore %s write,read,admin\n' "$(printf '%s' "$token" | sha256sum | cut -d' ' -f1)" \
  >"$WORK/tokens.txt"

mapfile -t env_projector < <(svc_env daybook_projector)
mapfile -t env_command < <(svc_env daybook_command)
status=$(run_until_exit projector-refused "$DAYBOOK_PROJECTOR_BIN" "${env_projector[@]}")
[[ $status == 3 ]] || fail "the projector on the naive restore: exit $status, not 3"
grep -q 'daybook-projector: the event store holds txid .*docs/operations.md' \
  "$WORK/projector-refused.log" || fail "the projector did not say why"
status=$(run_until_exit command-refused "$DAYBOOK_COMMAND_BIN" "${env_command[@]}")
[[ $status == 3 ]] || fail "the command service on the naive restore: exit $status, not 3"
status=0
DAYBOOK_PG=$(dbk_pg_uri "$NEW_PORT" daybook) "$DAYBOOK_ADMIN_BIN" status \
  >/dev/null 2>"$WORK/status-refused.log" || status=$?
[[ $status == 3 ]] || fail "daybook-admin status on the naive restore: exit $status, not 3"
dbk_say "a naive restore is refused, as it should be"

# --- 3. the documented repair: advance the xid epoch past the log's -----------------------
epoch=$(psql_at "$NEW_PORT" "SELECT div(max(txid)::text::numeric, 4294967296) + 1 FROM events")
dbk_pg_stop "$NEW_HOME" fast
dbk_as_pg "$DBK_PG_BIN/pg_resetwal" -e "$epoch" -D "$NEW_HOME/data" >"$WORK/resetwal.log" 2>&1 ||
  fail "pg_resetwal -e $epoch"
dbk_pg_start "$NEW_HOME"

mapfile -t env_command < <(svc_env daybook_command)
command_listen=${env_command[3]#DAYBOOK_LISTEN=}
start_service projector "$DAYBOOK_PROJECTOR_BIN" "${env_projector[@]}"
start_service command "$DAYBOOK_COMMAND_BIN" "${env_command[@]}"
wait_for 60 "the restored log to be projected" projected "$NEW_PORT"

deposit() {
  [[ $(curl -s -o /dev/null -w '%{http_code}' --max-time 10 -X POST \
    -H "Authorization: Bearer $token" -H 'Content-Type: application/json' \
    --data '{"amount":250}' "http://$command_listen/accounts/a/deposits") == 201 ]]
}
wait_for 30 "a deposit to be accepted" deposit
wait_for 60 "the new event to be projected" projected "$NEW_PORT"
[[ $(psql_at "$NEW_PORT" "SELECT balance FROM rm_accounts WHERE account_id = 'a'") == 750 ]] ||
  fail "the new deposit is not in the read model"
[[ $(psql_at "$NEW_PORT" "SELECT count(*) FROM events WHERE txid > '$old_max'::xid8") == 1 ]] ||
  fail "the new event does not sort after the restored ones"
DAYBOOK_PG=$(dbk_pg_uri "$NEW_PORT" daybook) DAYBOOK_REDIS=redis://127.0.0.1:$REDIS_PORT \
  "$DAYBOOK_ADMIN_BIN" verify --no-redis >"$WORK/verify.log" 2>&1 || fail "verify after the repair"
dbk_say "restored as documented: the services start and project new events"

# shellcheck shell=bash
# The highly available stack of `scripts/dev up --ha` (docs/deployment.md, "The HA
# topology"), sourced by scripts/dev after its own functions: HAProxy in front of two
# daybook-command and two daybook-query instances, two projectors, PostgreSQL
# managed by Patroni (a primary and a synchronous standby) with etcd as its store,
# Redis with one replica and three Sentinels -- all on loopback, under DEV_DIR.
#
# Ports (B = DAYBOOK_DEV_PORT_BASE):
#   B+1 HAProxy -> command   B+2 HAProxy -> query   B+3 projector-1 metrics
#   B+4 postgres-1           B+5 redis-1             B+6 HAProxy statistics
#   B+10,11 command-1,2      B+12,13 query-1,2       B+14 projector-2 metrics
#   B+15 postgres-2          B+16,17 patroni-1,2 REST
#   B+18,19 etcd client, peer                        B+20 redis-2
#   B+21,22,23 sentinel-1,2,3
#
# DEV_DIR/stack holds "ha" once `up --ha` ran there: `down` and `status` then act on
# this stack, and the plain `up` refuses that directory (and `up --ha` a plain one).

# Debian packages only the HA stack needs (installed by `up --ha` and `test --ha`).
DBK_HA_PACKAGES=(haproxy patroni python3-etcd python3-psycopg2 etcd-server redis-sentinel)

DBK_HA_SCOPE=daybook          # Patroni's cluster name
DBK_HA_REDIS_MASTER=daybook   # the Sentinels' name of the Redis primary
DBK_HA_PG_ROLES=(daybook_command daybook_projector daybook_query)

ha_load_config() {
  HA_PROXY_COMMAND=$((PORT_BASE + 1))
  HA_PROXY_QUERY=$((PORT_BASE + 2))
  HA_PROXY_STATS=$((PORT_BASE + 6))
  HA_PG_PORTS=($((PORT_BASE + 4)) $((PORT_BASE + 15)))
  HA_PATRONI_PORTS=($((PORT_BASE + 16)) $((PORT_BASE + 17)))
  HA_ETCD_PORT=$((PORT_BASE + 18))
  HA_ETCD_PEER=$((PORT_BASE + 19))
  HA_REDIS_PORTS=($((PORT_BASE + 5)) $((PORT_BASE + 20)))
  HA_SENTINEL_PORTS=($((PORT_BASE + 21)) $((PORT_BASE + 22)) $((PORT_BASE + 23)))
  HA_COMMAND_PORTS=($((PORT_BASE + 10)) $((PORT_BASE + 11)))
  HA_QUERY_PORTS=($((PORT_BASE + 12)) $((PORT_BASE + 13)))
  HA_PROJECTOR_PORTS=($((PORT_BASE + 3)) $((PORT_BASE + 14)))
}

# The stack DEV_DIR holds: "ha", "plain" or "" (nothing yet).
dev_stack_kind() {
  if [[ -r $DEV_DIR/stack ]]; then
    head -n 1 "$DEV_DIR/stack"
  elif [[ -e $DEV_DIR/postgres/data || -e $DEV_DIR/pids/command.pid ]]; then
    echo plain
  fi
}

# ha_pg_uri ROLE [DB] -- a multi-host URI that reaches the primary wherever it is.
ha_pg_uri() {
  printf 'postgresql://%s@127.0.0.1:%s,127.0.0.1:%s/%s?target_session_attrs=read-write&connect_timeout=3\n' \
    "$1" "${HA_PG_PORTS[0]}" "${HA_PG_PORTS[1]}" "${2:-daybook}"
}

# ha_as_pg CMD... -- exec CMD as the PostgreSQL OS user without an intermediate
# process (setpriv, not runuser), so that $! is the command's own pid.
ha_as_pg() {
  if [[ -n ${DBK_PG_USER:-} ]]; then
    exec setpriv --reuid="$DBK_PG_USER" --regid="$(id -g "$DBK_PG_USER")" --init-groups -- "$@"
  fi
  exec "$@"
}

# ha_spawn PIDFILE LOG [pg] CMD... -- start CMD detached, in its own session, log
# appended to LOG; record its pid. With "pg", as the PostgreSQL OS user.
ha_spawn() {
  local pidfile=$1 log=$2 as_pg=""
  shift 2
  if [[ $1 == pg ]]; then
    as_pg=1
    shift
  fi
  (
    cd /
    if [[ -n $as_pg ]]; then
      ha_as_pg setsid "$@" </dev/null >>"$log" 2>&1
    fi
    exec setsid "$@" </dev/null >>"$log" 2>&1
  ) &
  printf '%s\n' "$!" >"$pidfile"
}

# ha_pid NAME PATTERN -- the running pid of pidfile NAME whose command line matches
# PATTERN (guards against recycled pids), or fail.
ha_pid() {
  local pid
  pid=$(dbk_pidfile_pid "$PID_DIR/$1.pid") || return 1
  dbk_pid_running "$pid" || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$2" || return 1
  printf '%s\n' "$pid"
}

# ha_wait WHAT SECONDS CMD... -- poll CMD every 0.2 s until it succeeds.
ha_wait() {
  local what=$1 deadline=$((SECONDS + $2))
  shift 2
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || return 1
    sleep 0.2
  done
}

ha_require_free() {
  local port=$1 what=$2
  dbk_port_in_use "$port" &&
    dbk_die "port $port ($what) is taken by something else; choose another DAYBOOK_DEV_PORT_BASE"
  return 0
}

# ------------------------------------------------------------------- etcd --

ha_ensure_etcd() {
  if ha_pid etcd etcd >/dev/null; then
    dbk_say "etcd already running on 127.0.0.1:$HA_ETCD_PORT"
    return 0
  fi
  ha_require_free "$HA_ETCD_PORT" etcd
  mkdir -p "$DEV_DIR/etcd"
  chmod 700 "$DEV_DIR/etcd"
  dbk_say "starting etcd (Patroni's store) on 127.0.0.1:$HA_ETCD_PORT"
  ha_spawn "$PID_DIR/etcd.pid" "$LOG_DIR/etcd.log" etcd --name daybook-etcd \
    --data-dir "$DEV_DIR/etcd" \
    --listen-client-urls "http://127.0.0.1:$HA_ETCD_PORT" \
    --advertise-client-urls "http://127.0.0.1:$HA_ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$HA_ETCD_PEER" \
    --initial-advertise-peer-urls "http://127.0.0.1:$HA_ETCD_PEER" \
    --initial-cluster "daybook-etcd=http://127.0.0.1:$HA_ETCD_PEER" \
    --enable-v2=false --log-level warn
  ha_wait etcd 30 curl -sf --max-time 1 "http://127.0.0.1:$HA_ETCD_PORT/health" || {
    dbk_tail "$LOG_DIR/etcd.log"
    dbk_die "etcd did not become healthy"
  }
}

# ---------------------------------------------------------------- patroni --

# ha_patroni_conf N -- write node N's Patroni configuration (mode 600, owned by the
# PostgreSQL OS user: it holds the superuser's and the replication user's passwords).
ha_patroni_conf() {
  local n=$1 i=$(($1 - 1)) home=$HA_PG_HOME/pg$1 conf
  conf=$(
    cat <<EOF
# Written by scripts/dev up --ha on every start.
scope: $DBK_HA_SCOPE
name: pg$n
log:
  level: WARNING
restapi:
  listen: 127.0.0.1:${HA_PATRONI_PORTS[i]}
  connect_address: 127.0.0.1:${HA_PATRONI_PORTS[i]}
etcd3:
  hosts: 127.0.0.1:$HA_ETCD_PORT
bootstrap:
  dcs:
    # A dead primary's leader key expires after ttl; loop_wait + 2 * retry_timeout <= ttl.
    ttl: 10
    loop_wait: 1
    retry_timeout: 4
    maximum_lag_on_failover: 1048576
    # A commit returns only once the synchronous standby has it: an acknowledged
    # write survives the primary's loss, and only that standby may be promoted.
    synchronous_mode: true
    # A crashed postmaster is a failover, not a restart in place.
    primary_start_timeout: 0
    postgresql:
      use_pg_rewind: true
      use_slots: true
      parameters:
        wal_level: replica
        hot_standby: "on"
        wal_log_hints: "on"
        max_wal_senders: 8
        max_replication_slots: 8
        wal_keep_size: 128MB
  initdb:
    - encoding: UTF8
    - locale: C.UTF-8
    - auth: scram-sha-256
postgresql:
  listen: 127.0.0.1:${HA_PG_PORTS[i]}
  connect_address: 127.0.0.1:${HA_PG_PORTS[i]}
  data_dir: $home/data
  bin_dir: $DBK_PG_BIN
  pgpass: $home/pgpass
  authentication:
    superuser:
      username: postgres
      password: $(dbk_secret "$SECRETS_DIR" pg-postgres)
    replication:
      username: replicator
      password: $(dbk_secret "$SECRETS_DIR" pg-replicator)
    rewind:
      username: postgres
      password: $(dbk_secret "$SECRETS_DIR" pg-postgres)
  parameters:
    unix_socket_directories: '$home'
    password_encryption: scram-sha-256
    logging_collector: "off"
  pg_hba:
    - local all all scram-sha-256
    - host replication replicator 127.0.0.1/32 scram-sha-256
    - host all all 127.0.0.1/32 scram-sha-256
EOF
  )
  dbk_as_pg mkdir -p "$home"
  dbk_as_pg chmod 700 "$home"
  # shellcheck disable=SC2016 # $1 is expanded by that sh
  printf '%s\n' "$conf" | dbk_as_pg sh -c 'umask 077 && cat >"$1"' sh "$home/patroni.yml"
}

# ha_patroni_get N PATH -- GET Patroni node N's REST PATH (JSON on stdout).
ha_patroni_get() {
  curl -s --max-time 2 "http://127.0.0.1:${HA_PATRONI_PORTS[$1 - 1]}$2"
}

# ha_patroni_role N -- primary, replica, or nothing when unknown.
ha_patroni_role() {
  local json role
  json=$(ha_patroni_get "$1" /patroni) || return 1
  role=$(printf '%s' "$json" | python3 -c 'import json,sys; print(json.load(sys.stdin).get("role",""))' 2>/dev/null) || return 1
  case $role in
    master | primary) echo primary ;;
    replica | sync_standby | standby_leader) echo replica ;;
    *) return 1 ;;
  esac
}

# Exactly one primary and one synchronous standby that streams from it.
ha_patroni_healthy() {
  local json
  json=$(ha_patroni_get 1 /cluster) || return 1
  printf '%s' "$json" | python3 -c '
import json, sys
members = json.load(sys.stdin).get("members", [])
roles = sorted(m.get("role") for m in members if m.get("state") in ("running", "streaming"))
sys.exit(0 if roles in (["leader", "sync_standby"], ["master", "sync_standby"]) else 1)'
}

ha_pg_primary_port() {
  local n
  for n in 1 2; do
    if [[ $(ha_patroni_role "$n" 2>/dev/null) == primary ]]; then
      echo "${HA_PG_PORTS[n - 1]}"
      return 0
    fi
  done
  return 1
}

ha_ensure_patroni() {
  local n started=0
  for n in 1 2; do
    if ha_pid "patroni-$n" patroni >/dev/null; then
      dbk_say "patroni-$n already running"
      continue
    fi
    ha_require_free "${HA_PATRONI_PORTS[n - 1]}" "patroni-$n"
    ha_require_free "${HA_PG_PORTS[n - 1]}" "postgres-$n"
    ha_patroni_conf "$n"
    dbk_say "starting patroni-$n (PostgreSQL on 127.0.0.1:${HA_PG_PORTS[n - 1]})"
    touch "$LOG_DIR/patroni-$n.log"
    [[ -n ${DBK_PG_USER:-} ]] && chown "$DBK_PG_USER:" "$LOG_DIR/patroni-$n.log"
    ha_spawn "$PID_DIR/patroni-$n.pid" "$LOG_DIR/patroni-$n.log" pg \
      patroni "$HA_PG_HOME/pg$n/patroni.yml"
    started=1
    # The first node bootstraps the cluster; the second one copies it afterwards.
    if ((n == 1)); then
      ha_wait "patroni-1 primary" 120 ha_pg_primary_port || {
        dbk_tail "$LOG_DIR/patroni-1.log"
        dbk_die "patroni-1 did not bootstrap a primary"
      }
    fi
  done
  dbk_say "waiting for a primary and a synchronous standby"
  ha_wait "patroni" 180 ha_patroni_healthy || {
    dbk_tail "$LOG_DIR/patroni-1.log" 20
    dbk_tail "$LOG_DIR/patroni-2.log" 20
    dbk_die "Patroni did not reach a primary with a synchronous standby"
  }
  ((started)) || true
  HA_PG_PRIMARY=$(ha_pg_primary_port) || dbk_die "no PostgreSQL primary"
  # The services' roles and their passwords, the database: on the primary.
  export PGPASSFILE=$SECRETS_DIR/pgpass
  ha_pg_passfile
  dbk_pg_ensure_db "$HA_PG_PRIMARY" daybook
  dbk_pg_role_passwords "$HA_PG_PRIMARY" "$SECRETS_DIR" "${DBK_HA_PG_ROLES[@]}"
}

# The libpq password file: every role on both nodes.
ha_pg_passfile() {
  local role port
  (
    umask 077
    for port in "${HA_PG_PORTS[@]}"; do
      for role in postgres "${DBK_HA_PG_ROLES[@]}"; do
        printf '127.0.0.1:%s:*:%s:%s\n' "$port" "$role" "$(dbk_secret "$SECRETS_DIR" "pg-$role")"
      done
    done >"$PGPASSFILE.tmp"
    mv "$PGPASSFILE.tmp" "$PGPASSFILE"
  )
}

# ------------------------------------------------------------------ redis --

# ha_redis_conf N -- node N's redis.conf, written once: Sentinel rewrites it on a
# failover (replicaof), so a later `up` must not undo that.
ha_redis_conf() {
  local n=$1 i=$(($1 - 1)) dir=$DEV_DIR/redis-$1 conf
  conf=$dir/redis.conf
  mkdir -p "$dir"
  [[ -s $conf ]] && return 0
  (
    umask 077
    {
      printf '# Written once by scripts/dev up --ha; Sentinel rewrites it on failover.\n'
      printf 'bind 127.0.0.1\nport %s\ndir %s\n' "${HA_REDIS_PORTS[i]}" "$dir"
      printf 'pidfile %s\nlogfile %s\ndaemonize yes\n' "$PID_DIR/redis-$n.pid" "$LOG_DIR/redis-$n.log"
      printf 'aclfile %s\n' "$SECRETS_DIR/redis.acl"
      printf 'appendonly yes\n'
      # Replication and Sentinel's commands run as daybook-ops.
      printf 'masteruser daybook-ops\nmasterauth %s\n' "$(dbk_secret "$SECRETS_DIR" redis-daybook-ops)"
      printf 'replica-announce-ip 127.0.0.1\n'
      ((n == 1)) || printf 'replicaof 127.0.0.1 %s\n' "${HA_REDIS_PORTS[0]}"
    } >"$conf"
  )
}

ha_sentinel_conf() {
  local n=$1 i=$(($1 - 1)) dir=$DEV_DIR/sentinel-$1 conf
  conf=$dir/sentinel.conf
  mkdir -p "$dir"
  [[ -s $conf ]] && return 0
  (
    umask 077
    {
      printf '# Written once by scripts/dev up --ha; Sentinel rewrites it.\n'
      printf 'bind 127.0.0.1\nport %s\ndir %s\n' "${HA_SENTINEL_PORTS[i]}" "$dir"
      printf 'pidfile %s\nlogfile %s\ndaemonize yes\n' "$PID_DIR/sentinel-$n.pid" "$LOG_DIR/sentinel-$n.log"
      printf 'sentinel resolve-hostnames no\nsentinel announce-ip 127.0.0.1\n'
      # Two of the three Sentinels must agree that the primary is down.
      printf 'sentinel monitor %s 127.0.0.1 %s 2\n' "$DBK_HA_REDIS_MASTER" "${HA_REDIS_PORTS[0]}"
      printf 'sentinel auth-user %s daybook-ops\n' "$DBK_HA_REDIS_MASTER"
      printf 'sentinel auth-pass %s %s\n' "$DBK_HA_REDIS_MASTER" "$(dbk_secret "$SECRETS_DIR" redis-daybook-ops)"
      printf 'sentinel down-after-milliseconds %s 2000\n' "$DBK_HA_REDIS_MASTER"
      printf 'sentinel failover-timeout %s 10000\n' "$DBK_HA_REDIS_MASTER"
      printf 'sentinel parallel-syncs %s 1\n' "$DBK_HA_REDIS_MASTER"
    } >"$conf"
  )
}

ha_ensure_redis() {
  local n port
  dbk_redis_render_acl "$SECRETS_DIR" "$SECRETS_DIR/redis.acl"
  for n in 1 2; do
    port=${HA_REDIS_PORTS[n - 1]}
    if ha_pid "redis-$n" redis-server >/dev/null && dbk_redis_ping "$port"; then
      dbk_say "redis-$n already running on 127.0.0.1:$port"
      continue
    fi
    ha_require_free "$port" "redis-$n"
    ha_redis_conf "$n"
    # A node that comes back after a failover rejoins as the replica of the primary
    # the Sentinels name, instead of serving its old data as a second primary.
    local extra=() primary
    if primary=$(ha_redis_primary_port 2>/dev/null) && [[ $primary != "$port" ]]; then
      extra=(--replicaof 127.0.0.1 "$primary")
    fi
    dbk_say "starting redis-$n on 127.0.0.1:$port${extra[*]:+ (replica of :$primary)}"
    redis-server "$DEV_DIR/redis-$n/redis.conf" "${extra[@]}" || dbk_die "redis-$n failed to start"
    ha_wait "redis-$n" 20 dbk_redis_ping "$port" || {
      dbk_tail "$LOG_DIR/redis-$n.log"
      dbk_die "redis-$n did not answer"
    }
  done
  for n in 1 2 3; do
    port=${HA_SENTINEL_PORTS[n - 1]}
    if ha_pid "sentinel-$n" 'sentinel' >/dev/null; then
      dbk_say "sentinel-$n already running on 127.0.0.1:$port"
      continue
    fi
    ha_require_free "$port" "sentinel-$n"
    ha_sentinel_conf "$n"
    dbk_say "starting sentinel-$n on 127.0.0.1:$port"
    redis-sentinel "$DEV_DIR/sentinel-$n/sentinel.conf" || dbk_die "sentinel-$n failed to start"
  done
  ha_wait sentinels 20 ha_redis_primary_port || dbk_die "the Sentinels name no Redis primary"
}

ha_sentinel_list() {
  local IFS=,
  local hosts=() p
  for p in "${HA_SENTINEL_PORTS[@]}"; do hosts+=("127.0.0.1:$p"); done
  printf '%s' "${hosts[*]}"
}

# The Redis primary's port, as the Sentinels see it.
ha_redis_primary_port() {
  local p out
  for p in "${HA_SENTINEL_PORTS[@]}"; do
    out=$(redis-cli -h 127.0.0.1 -p "$p" --raw sentinel get-master-addr-by-name "$DBK_HA_REDIS_MASTER" 2>/dev/null) || continue
    out=$(printf '%s\n' "$out" | sed -n 2p)
    [[ $out =~ ^[0-9]+$ ]] && {
      echo "$out"
      return 0
    }
  done
  return 1
}

# ha_redis_url USER -- the Sentinel URL (no password: it comes from a file or is
# appended by the caller).
ha_redis_url() {
  printf 'redis-sentinel://%s@%s/%s\n' "$1" "$(ha_sentinel_list)" "$DBK_HA_REDIS_MASTER"
}

# --------------------------------------------------------------- services --

ha_service_start() {
  local name=$1 n=$2 port=$3 bin log pidfile env=()
  bin=$(service_binary "$name")
  log=$LOG_DIR/$name-$n.log
  pidfile=$PID_DIR/$name-$n.pid
  if ha_pid "$name-$n" "daybook-$name" >/dev/null; then
    dbk_say "$name-$n already running"
    return 0
  fi
  ha_require_free "$port" "$name-$n"
  case $name in
    projector | query)
      env+=("DAYBOOK_REDIS=$(ha_redis_url "daybook-$name")"
        "DAYBOOK_REDIS_PASSWORD_FILE=$SECRETS_DIR/redis-daybook-$name.password")
      ;;
  esac
  dbk_say "starting $name-$n on 127.0.0.1:$port (log: $log)"
  (
    cd "$REPO_TOP" || exit 1
    exec env DAYBOOK_PG="$(ha_pg_uri "daybook_$name")" "${env[@]}" \
      DAYBOOK_LISTEN="127.0.0.1:$port" DAYBOOK_TOKENS_FILE="$TOKENS_FILE" \
      DAYBOOK_INSTANCE="$name-$n" \
      DAYBOOK_LOG_LEVEL="${DAYBOOK_LOG_LEVEL:-info}" PGPASSFILE="$PGPASSFILE" \
      setsid "$bin" </dev/null >>"$log" 2>&1
  ) &
  printf '%s\n' "$!" >"$pidfile"
}

ha_services_each() {
  local fn=$1 name n ports
  for name in command projector query; do
    case $name in
      command) ports=("${HA_COMMAND_PORTS[@]}") ;;
      query) ports=("${HA_QUERY_PORTS[@]}") ;;
      projector) ports=("${HA_PROJECTOR_PORTS[@]}") ;;
    esac
    for n in 1 2; do
      "$fn" "$name" "$n" "${ports[n - 1]}"
    done
  done
}

ha_service_wait() {
  local name=$1 n=$2 port=$3
  ha_wait "$name-$n" 30 curl -sf --max-time 2 "http://127.0.0.1:$port/healthz" || {
    dbk_tail "$LOG_DIR/$name-$n.log"
    dbk_die "$name-$n did not answer GET /healthz on 127.0.0.1:$port"
  }
}

# ---------------------------------------------------------------- haproxy --

# ha_haproxy_conf_text -- print HAProxy's configuration for the ports of
# ha_load_config, its pid file in PID_DIR and its admin socket in DEV_DIR. The
# proxy test (tests/ha/proxy_retry.py) runs HAProxy with this very text.
ha_haproxy_conf_text() {
  cat <<EOF
# Written by scripts/dev up --ha on every start.
global
  maxconn 1024
  pidfile $PID_DIR/haproxy.pid
  stats socket $DEV_DIR/haproxy.sock mode 600 level admin

defaults
  mode http
  option dontlognull
  timeout connect 1s
  timeout client 65s
  # Reads may wait for min_position up to the query service's own bound.
  timeout server 65s
  timeout http-request 10s
  # A request that could not reach a server goes to another one.
  retries 2
  option redispatch 1
  # Checks: GET /readyz every 500 ms; two failures take a server out, two
  # successes put it back; its open connections are cut when it goes out.
  default-server inter 500ms fastinter 250ms downinter 500ms fall 2 rise 2 on-marked-down shutdown-sessions

frontend command
  bind 127.0.0.1:$HA_PROXY_COMMAND
  default_backend command

# One command instance leads and is ready; a standby answers /readyz 503 and gets
# nothing. 'backup' makes command-2 serve only while command-1 is out, so that even a
# command service without leadership never has two writers behind this proxy.
backend command
  option httpchk GET /readyz
  http-check expect status 200
  # A write is sent again only when it cannot have reached a server: a connection
  # that could not be made ('retries 2' and 'option redispatch 1' above; the check
  # takes a dead instance out meanwhile). Never after it was sent: HAProxy resends
  # without looking at the request, and the client gets only the last answer. So no
  # 'empty-response' (an instance killed after COMMIT, before its reply) and no
  # '503' (an outcome_unknown): an unkeyed write would be applied twice, and the
  # client would see the resend's 201, or its 503 unavailable ("nothing was
  # written"), instead of outcome_unknown (SPEC 3). Not even for a keyed write: its
  # key keeps the resend from writing twice, but the resend's answer still hides the
  # unknown outcome, and it helps nothing: it goes at once to the same instance
  # (command-2 is a backup) without heeding Retry-After. Clients retry their 503s
  # themselves, with their Idempotency-Key.
  retry-on conn-failure
  # A write that reached an instance and got no answer (502: the connection closed;
  # 504: none within 'timeout server') may have committed: the client gets what the
  # service answers when it cannot tell, 503 outcome_unknown (SPEC 3), not HAProxy's
  # HTML page. No instance to take it (HAProxy's own 503) means nothing was written:
  # the service's 503 unavailable. Problem bodies as the service writes them.
  http-error status 502 content-type application/problem+json string '{"type":"https://daybook.dev/problems/outcome_unknown","title":"Outcome unknown","status":503,"detail":"the command instance closed the connection before it answered; the write may or may not have been applied: retry with the same Idempotency-Key to apply it exactly once","code":"outcome_unknown"}'
  http-error status 504 content-type application/problem+json string '{"type":"https://daybook.dev/problems/outcome_unknown","title":"Outcome unknown","status":503,"detail":"the command instance did not answer in time; the write may or may not have been applied: retry with the same Idempotency-Key to apply it exactly once","code":"outcome_unknown"}'
  http-error status 503 content-type application/problem+json hdr Retry-After 1 string '{"type":"https://daybook.dev/problems/unavailable","title":"Service unavailable","status":503,"detail":"no command instance can take writes now; nothing was written: retry shortly","code":"unavailable"}'
  http-after-response set-status 503 if { status 502 } || { status 504 }
  server command-1 127.0.0.1:${HA_COMMAND_PORTS[0]} check
  server command-2 127.0.0.1:${HA_COMMAND_PORTS[1]} check backup

frontend query
  bind 127.0.0.1:$HA_PROXY_QUERY
  default_backend query

# A query instance is not ready while PostgreSQL is away (a failover), yet it still
# answers most reads from Redis: when no instance is ready, the unchecked backup
# entries (the same processes) take the reads rather than HAProxy answering 503.
backend query
  balance roundrobin
  option httpchk GET /readyz
  http-check expect status 200
  # Reads (GET, HEAD) change nothing: one that met a closed connection before any
  # answer (an instance killed under it) is sent again, to the other instance.
  retry-on conn-failure empty-response
  option allbackups
  server query-1 127.0.0.1:${HA_QUERY_PORTS[0]} check
  server query-2 127.0.0.1:${HA_QUERY_PORTS[1]} check
  server query-1-last-resort 127.0.0.1:${HA_QUERY_PORTS[0]} backup
  server query-2-last-resort 127.0.0.1:${HA_QUERY_PORTS[1]} backup

listen stats
  bind 127.0.0.1:$HA_PROXY_STATS
  stats enable
  stats uri /
  stats refresh 2s
EOF
}

ha_haproxy_conf() {
  local conf=$DEV_DIR/haproxy.cfg
  ha_haproxy_conf_text >"$conf"
  haproxy -c -q -f "$conf" || dbk_die "haproxy rejects $conf"
}

ha_ensure_haproxy() {
  if ha_pid haproxy haproxy >/dev/null; then
    dbk_say "HAProxy already running"
    return 0
  fi
  ha_require_free "$HA_PROXY_COMMAND" "HAProxy (command)"
  ha_require_free "$HA_PROXY_QUERY" "HAProxy (query)"
  ha_haproxy_conf
  dbk_say "starting HAProxy on 127.0.0.1:$HA_PROXY_COMMAND (command) and :$HA_PROXY_QUERY (query)"
  ha_spawn "$PID_DIR/haproxy.pid" "$LOG_DIR/haproxy.log" haproxy -db -f "$DEV_DIR/haproxy.cfg"
  ha_wait haproxy 20 curl -s -o /dev/null --max-time 1 "http://127.0.0.1:$HA_PROXY_STATS/" ||
    dbk_die "HAProxy did not start"
}

# ------------------------------------------------------------------- env --

ha_write_env_file() {
  local file=$DEV_DIR/env
  (
    umask 077
    {
      printf '# Daybook HA dev environment: source this file. Written by scripts/dev up --ha.\n'
      printf "export DAYBOOK_COMMAND_URL='http://127.0.0.1:%s'\n" "$HA_PROXY_COMMAND"
      printf "export DAYBOOK_QUERY_URL='http://127.0.0.1:%s'\n" "$HA_PROXY_QUERY"
      printf "export DAYBOOK_PG='postgresql://postgres:%s@127.0.0.1:%s,127.0.0.1:%s/daybook?target_session_attrs=read-write'\n" \
        "$(dbk_secret "$SECRETS_DIR" pg-postgres)" "${HA_PG_PORTS[0]}" "${HA_PG_PORTS[1]}"
      printf "export DAYBOOK_REDIS='redis-sentinel://daybook-admin:%s@%s/%s'\n" \
        "$(dbk_secret "$SECRETS_DIR" redis-daybook-admin)" "$(ha_sentinel_list)" "$DBK_HA_REDIS_MASTER"
      printf "export DAYBOOK_WRITE_TOKEN='%s'\n" "$WRITE_TOKEN"
      printf "export DAYBOOK_READ_TOKEN='%s'\n" "$READ_TOKEN"
      printf "export DAYBOOK_ADMIN_TOKEN='%s'\n" "$ADMIN_TOKEN"
      printf "export DAYBOOK_HA_STATUS='%s status --json'\n" "$REPO_TOP/scripts/dev"
    } >"$file.tmp"
    mv "$file.tmp" "$file"
  )
}

# --------------------------------------------------------------- commands --

ha_prepare_dev_dir() {
  mkdir -p "$DEV_DIR" "$LOG_DIR" "$PID_DIR"
  local kind
  kind=$(dev_stack_kind)
  [[ -z $kind || $kind == ha ]] ||
    dbk_die "$DEV_DIR holds a plain stack: run 'scripts/dev down' and choose another DAYBOOK_DEV_DIR for --ha"
  echo ha >"$DEV_DIR/stack"
  local link=$DEV_DIR/postgres existing="" abs
  [[ -e $link ]] && existing=$(readlink -m "$link")
  dbk_pg_setup_user "${existing:+$existing/pg1}"
  abs=$(cd "$DEV_DIR" && pwd -P)
  HA_PG_HOME=$(dbk_pg_prepare_home "$DEV_DIR" "/var/tmp/daybook-$(dbk_short_hash "$abs")")
  chmod 711 "$HA_PG_HOME"
  dbk_secret "$SECRETS_DIR" pg-postgres >/dev/null
}

ha_locate() {
  HA_PG_HOME=$DEV_DIR/postgres
  if [[ -L $HA_PG_HOME ]]; then HA_PG_HOME=$(readlink -m "$HA_PG_HOME"); fi
  DBK_PG_USER=""
  if dbk_is_root && [[ -d $HA_PG_HOME/pg1/data ]]; then
    DBK_PG_USER=$(stat -c %U "$HA_PG_HOME/pg1/data")
  fi
}

cmd_up_ha() {
  DBK_PACKAGES+=("${DBK_HA_PACKAGES[@]}")
  dbk_ensure_packages
  dbk_build "$REPO_TOP" "$BUILD_DIR"
  ha_prepare_dev_dir
  ha_ensure_etcd
  ha_ensure_patroni
  ha_ensure_redis
  # shellcheck disable=SC2034 # read by scripts/dev's migrate
  PG_URI=$(ha_pg_uri postgres)
  migrate
  ensure_tokens
  ha_write_env_file
  ha_services_each ha_service_start
  ha_services_each ha_service_wait
  ha_ensure_haproxy
  ha_wait "HAProxy -> command" 30 curl -sf --max-time 2 "http://127.0.0.1:$HA_PROXY_COMMAND/readyz" ||
    dbk_die "no command instance is ready behind HAProxy"
  # shellcheck disable=SC2034 # read by scripts/dev's seed_demo (through HAProxy)
  COMMAND_PORT=$HA_PROXY_COMMAND QUERY_PORT=$HA_PROXY_QUERY
  seed_demo
  ha_print_summary
}

ha_print_summary() {
  local rel=$DEV_DIR
  [[ $rel == "$REPO_TOP"/* ]] && rel=${rel#"$REPO_TOP"/}
  cat <<EOF

Daybook (HA) is up.
  command API    http://127.0.0.1:$HA_PROXY_COMMAND  (HAProxy -> command-1, command-2)
  query API      http://127.0.0.1:$HA_PROXY_QUERY  (HAProxy -> query-1, query-2)
  HAProxy stats  http://127.0.0.1:$HA_PROXY_STATS/
  PostgreSQL     Patroni on 127.0.0.1:${HA_PG_PORTS[0]},${HA_PG_PORTS[1]} (REST :${HA_PATRONI_PORTS[0]}, :${HA_PATRONI_PORTS[1]}; etcd :$HA_ETCD_PORT)
  Redis          127.0.0.1:${HA_REDIS_PORTS[0]},${HA_REDIS_PORTS[1]}; Sentinels $(ha_sentinel_list)
  logs           $LOG_DIR/
  every process  scripts/dev status --json

  write token    $WRITE_TOKEN
  read token     $READ_TOKEN
  (admin token, connection strings: source $rel/env)

Try:
  curl -s -H 'Authorization: Bearer $READ_TOKEN' http://127.0.0.1:$HA_PROXY_QUERY/accounts/alice
  curl -s -H 'Authorization: Bearer $WRITE_TOKEN' -H 'Content-Type: application/json' \\
       -d '{"amount":500,"reference":"coffee"}' http://127.0.0.1:$HA_PROXY_COMMAND/accounts/bob/withdrawals

Stop with: scripts/dev down
EOF
}

# ha_stop_pidfile NAME PATTERN [GRACE] -- SIGTERM the process, wait, SIGKILL.
ha_stop_pidfile() {
  local pid
  if pid=$(ha_pid "$1" "$2"); then
    dbk_say "stopping $1 (pid $pid)"
    dbk_stop_pid "$pid" "$1" "${3:-10}"
  fi
  rm -f "$PID_DIR/$1.pid"
}

cmd_down_ha() {
  local n name
  ha_locate
  ha_stop_pidfile haproxy haproxy
  for name in query projector command; do
    for n in 2 1; do ha_stop_pidfile "$name-$n" "daybook-$name"; done
  done
  for n in 3 2 1; do ha_stop_pidfile "sentinel-$n" sentinel; done
  for n in 2 1; do ha_stop_pidfile "redis-$n" redis-server; done
  # Patroni stops its PostgreSQL on SIGTERM; the standby first, so that the primary
  # need not wait for it.
  for n in 2 1; do ha_stop_pidfile "patroni-$n" patroni 60; done
  for n in 1 2; do
    if [[ -d $HA_PG_HOME/pg$n/data ]]; then dbk_pg_kill "$HA_PG_HOME/pg$n" 2>/dev/null; fi
  done
  ha_stop_pidfile etcd etcd
  dbk_say "stopped (data kept in $DEV_DIR)"
}

# ----------------------------------------------------------------- status --

# status_row NAME INSTANCE PID URL ROLE -- one JSON object per line (tab separated
# input for the python formatter below).
status_row() { printf '%s\t%s\t%s\t%s\t%s\n' "$@"; }

# ha_metric_nonzero NAME -- true when the Prometheus text on stdin has NAME with a
# value other than 0.
ha_metric_nonzero() {
  awk -v name="$1" '$1 == name || index($1, name "{") == 1 { if ($2 + 0 != 0) found = 1 }
    END { exit !found }'
}

# A service's role from its /readyz and /metrics: command and projector lead or
# stand by, query serves.
ha_service_role() {
  local name=$1 port=$2 body metrics
  case $name in
    query) echo serving ;;
    projector)
      metrics=$(curl -s --max-time 2 "http://127.0.0.1:$port/metrics" 2>/dev/null) || true
      if ha_metric_nonzero daybook_projector_leader <<<"$metrics"; then
        echo leader
      else
        echo standby
      fi
      ;;
    command)
      metrics=$(curl -s --max-time 2 "http://127.0.0.1:$port/metrics" 2>/dev/null) || true
      if printf '%s\n' "$metrics" | grep -Eq '^daybook_command_leader(\{[^}]*\})? '; then
        # Its value is the lease epoch it leads with, 0 on standby.
        if ha_metric_nonzero daybook_command_leader <<<"$metrics"; then
          echo leader
        else
          echo standby
        fi
        return 0
      fi
      # Without the metric: the ready instance leads.
      body=$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://127.0.0.1:$port/readyz" 2>/dev/null) || true
      if [[ $body == 200 ]]; then echo leader; else echo standby; fi
      ;;
  esac
}

ha_status_rows() {
  local n pid name port role
  ha_locate
  if pid=$(ha_pid haproxy haproxy); then
    status_row proxy haproxy "$pid" "http://127.0.0.1:$HA_PROXY_STATS/" proxy
  fi
  if pid=$(ha_pid etcd etcd); then
    status_row dcs etcd "$pid" "http://127.0.0.1:$HA_ETCD_PORT" dcs
  fi
  for n in 1 2; do
    role=$(ha_patroni_role "$n" 2>/dev/null) || role=unknown
    if pid=$(ha_pid "patroni-$n" patroni); then
      status_row patroni "patroni-$n" "$pid" "http://127.0.0.1:${HA_PATRONI_PORTS[n - 1]}" "$role"
    fi
    pid=$(dbk_as_pg head -n 1 "$HA_PG_HOME/pg$n/data/postmaster.pid" 2>/dev/null) || pid=""
    if [[ -n $pid ]] && dbk_pid_running "$pid"; then
      status_row postgres "postgres-$n" "$pid" "postgresql://127.0.0.1:${HA_PG_PORTS[n - 1]}/daybook" "$role"
    fi
  done
  for n in 1 2; do
    port=${HA_REDIS_PORTS[n - 1]}
    if pid=$(ha_pid "redis-$n" redis-server); then
      role=$(dbk_redis_cli "$port" --raw role 2>/dev/null | head -n 1) || role=""
      case $role in master) role=primary ;; slave) role=replica ;; *) role=unknown ;; esac
      status_row redis "redis-$n" "$pid" "redis://127.0.0.1:$port" "$role"
    fi
  done
  for n in 1 2 3; do
    if pid=$(ha_pid "sentinel-$n" sentinel); then
      status_row sentinel "sentinel-$n" "$pid" "redis://127.0.0.1:${HA_SENTINEL_PORTS[n - 1]}" sentinel
    fi
  done
  for name in command query projector; do
    for n in 1 2; do
      case $name in
        command) port=${HA_COMMAND_PORTS[n - 1]} ;;
        query) port=${HA_QUERY_PORTS[n - 1]} ;;
        projector) port=${HA_PROJECTOR_PORTS[n - 1]} ;;
      esac
      if pid=$(ha_pid "$name-$n" "daybook-$name"); then
        status_row "$name" "$name-$n" "$pid" "http://127.0.0.1:$port" "$(ha_service_role "$name" "$port")"
      fi
    done
  done
}

# The plain stack's processes in the same form.
plain_status_rows() {
  local name pid port
  locate_dev_dir
  if dbk_pg_running "$PG_HOME"; then
    pid=$(dbk_as_pg head -n 1 "$PG_HOME/data/postmaster.pid" 2>/dev/null) || pid=""
    status_row postgres postgres "$pid" "postgresql://127.0.0.1:$PG_PORT/daybook" primary
  fi
  if dbk_redis_running "$REDIS_PORT" "$REDIS_PIDFILE"; then
    status_row redis redis "$(dbk_pidfile_pid "$REDIS_PIDFILE")" "redis://127.0.0.1:$REDIS_PORT" primary
  fi
  for name in "${SERVICES[@]}"; do
    if pid=$(service_pid "$name"); then
      port=$(service_port "$name")
      status_row "$name" "$name" "$pid" "http://127.0.0.1:$port" "$(ha_service_role "$name" "$port")"
    fi
  done
}

# status --json: {"processes":[{"name","instance","pid","url","role"}]}
cmd_status_json() {
  local rows=""
  if [[ -d $DEV_DIR ]]; then
    if [[ $(dev_stack_kind) == ha ]]; then
      rows=$(ha_status_rows)
    else
      rows=$(plain_status_rows)
    fi
  fi
  printf '%s' "$rows" | python3 -c '
import json, sys
procs = []
for line in sys.stdin.read().splitlines():
    name, instance, pid, url, role = line.split("\t")
    procs.append({"name": name, "instance": instance, "pid": int(pid) if pid.isdigit() else None,
                  "url": url, "role": role})
print(json.dumps({"processes": procs}))'
}

# ------------------------------------------------------------------ tests --

# test --ha: a private HA stack (own directory, ports from DAYBOOK_HA_TEST_PORT_BASE or
# a free range), the `ha` suite against it, then down and removed.
HA_TEST_DIR=""

# A port base B whose B+1 .. B+23 are all free, from 20000-31999 as dbk_pick_free_port:
# below the ephemeral range, and away from the fixed bases of `scripts/dev up` stacks,
# another engineer's `test --ha` among them.
ha_pick_port_base() {
  local base off tries
  for ((tries = 0; tries < 200; tries++)); do
    base=$((20000 + (RANDOM * 32768 + RANDOM) % 11950 / 50 * 50))
    for ((off = 1; off <= 23; off++)); do
      dbk_port_in_use $((base + off)) && continue 2
    done
    printf '%s\n' "$base"
    return 0
  done
  dbk_die "could not find 23 free TCP ports in a row"
}
ha_test_cleanup() {
  [[ -n $HA_TEST_DIR ]] || return 0
  DAYBOOK_DEV_DIR=$HA_TEST_DIR DAYBOOK_DEV_PORT_BASE=$HA_TEST_BASE "$REPO_TOP/scripts/dev" down || true
  local link=$HA_TEST_DIR/postgres
  if [[ -L $link ]]; then rm -rf -- "$(readlink -m "$link")"; fi
  rm -rf -- "$HA_TEST_DIR"
  HA_TEST_DIR=""
}

cmd_test_ha() {
  DBK_PACKAGES+=("${DBK_HA_PACKAGES[@]}")
  dbk_ensure_packages
  dbk_build "$REPO_TOP" "$BUILD_DIR"
  HA_TEST_BASE=${DAYBOOK_HA_TEST_PORT_BASE:-$(ha_pick_port_base)}
  HA_TEST_DIR=$(mktemp -d "${TMPDIR:-/tmp}/daybook-ha-test.XXXXXX")
  chmod 711 "$HA_TEST_DIR"
  trap ha_test_cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  dbk_say "starting a private HA stack in $HA_TEST_DIR (ports from $HA_TEST_BASE)"
  DAYBOOK_DEV_DIR=$HA_TEST_DIR DAYBOOK_DEV_PORT_BASE=$HA_TEST_BASE "$REPO_TOP/scripts/dev" up --ha >/dev/null
  export DAYBOOK_HA_DEV_DIR=$HA_TEST_DIR DAYBOOK_HA_PORT_BASE=$HA_TEST_BASE
  local testlog=$BUILD_DIR/meson-logs/testlog.json status=0 started=$SECONDS
  rm -f "$testlog"
  dbk_say "running the failover tests"
  meson test -C "$BUILD_DIR" --suite ha --print-errorlogs --num-processes 1 "$@" </dev/null &
  TEST_RUNNER_PID=$!
  wait "$TEST_RUNNER_PID" || status=$?
  TEST_RUNNER_PID=""
  if ((status != 0)); then
    local log
    for log in "$HA_TEST_DIR"/logs/*.log; do dbk_tail "$log" 15; done
  fi
  python3 -c 'import json, sys
for line in open(sys.argv[1]):
    t = json.loads(line)
    for l in (t.get("stdout") or "").splitlines():
        if "takeover" in l or "FAILED" in l or "SKIP" in l:
            print(t["name"] + ": " + l)' "$testlog" 2>/dev/null || true
  ha_test_cleanup
  trap - EXIT
  local summary
  if ! summary=$(count_results "$testlog") && ((status == 0)); then
    status=1
  fi
  printf 'ha tests: %s (%d s)\n' "$summary" $((SECONDS - started))
  return "$status"
}

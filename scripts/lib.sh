# shellcheck shell=bash
# Shared functions of the Daybook developer scripts (scripts/dev, scripts/bench,
# the scripts that `scripts/dev test` generates for the tests). Source it; it
# defines functions and a few constants and runs nothing by itself.
#
# Conventions: functions are prefixed `dbk_`; messages go to stderr; every
# function works under `set -euo pipefail`.

DBK_PG_BIN=${DAYBOOK_PG_BIN:-/usr/lib/postgresql/15/bin}

# Debian packages the build, the tests and `scripts/dev up` need.
DBK_PACKAGES=(
  build-essential pkg-config meson ninja-build
  libpq-dev libhiredis-dev libevent-dev libjansson-dev libssl-dev libcriterion-dev
  postgresql-15 redis-server curl python3
)

# dbk_add_test_packages -- the Debian packages `scripts/dev test` adds for its
# contract, proxy and lint tests: the YAML parser and JSON-Schema validator of
# tests/contract/contract.py, haproxy for tests/ha/proxy_retry.py (about 2 MB),
# promtool (in Debian's prometheus package, about 20 MB to download) for the alert
# rules and the /metrics scrapes, and nodejs and npm for the OpenAPI lint unless an
# npm is already installed (another node's npm would conflict with Debian's).
dbk_add_test_packages() {
  DBK_PACKAGES+=(python3-yaml python3-jsonschema haproxy prometheus)
  command -v npm >/dev/null 2>&1 || DBK_PACKAGES+=(nodejs npm)
}

# ---------------------------------------------------------------- messages --

# DBK_PROG prefixes every message (default: dev).
dbk_say() { printf '%s: %s\n' "${DBK_PROG:-dev}" "$*" >&2; }
dbk_warn() { printf '%s: warning: %s\n' "${DBK_PROG:-dev}" "$*" >&2; }
dbk_die() {
  printf '%s: error: %s\n' "${DBK_PROG:-dev}" "$*" >&2
  exit 1
}

# dbk_tail FILE [LINES] -- print the end of a log file, framed, to stderr.
dbk_tail() {
  local file=$1 lines=${2:-40}
  if [[ -r $file ]]; then
    printf -- '----- last %s lines of %s -----\n' "$lines" "$file" >&2
    tail -n "$lines" -- "$file" >&2 || true
    printf -- '----- end of %s -----\n' "$file" >&2
  else
    printf '%s: (no log at %s)\n' "${DBK_PROG:-dev}" "$file" >&2
  fi
}

dbk_is_root() { ((EUID == 0)); }

# dbk_short_hash STRING -- 12 hex digits identifying STRING.
dbk_short_hash() { printf '%s' "$1" | sha256sum | cut -c1-12; }

# --------------------------------------------------------------- secrets --
#
# Passwords are generated once into a secrets directory (mode 700), one file
# per account (mode 600): redis-<user>.password, pg-<role>.password. Hex only,
# so they need no quoting in URLs, ACL files or pgpass lines.

# dbk_secret DIR NAME -- print the secret DIR/NAME.password, generating it once.
dbk_secret() {
  local dir=$1 file="$1/$2.password"
  if [[ ! -d $dir ]]; then
    mkdir -p "$dir"
    chmod 700 "$dir"
  fi
  if [[ ! -s $file ]]; then
    (
      umask 077
      head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$file.tmp"
      printf '\n' >>"$file.tmp"
      mv "$file.tmp" "$file"
    )
  fi
  head -n 1 "$file"
}

# ---------------------------------------------------------------- packages --

dbk_package_installed() {
  local status
  status=$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null) || return 1
  [[ $status == "install ok installed" ]]
}

# dbk_ensure_packages -- install whichever of DBK_PACKAGES is missing. As
# root with apt-get; otherwise through sudo when it is usable, else stop and
# say what to install.
dbk_ensure_packages() {
  local pkgs=("${DBK_PACKAGES[@]}") missing=() pkg
  if ! command -v dpkg-query >/dev/null 2>&1; then
    dbk_warn "dpkg-query not found: not a Debian system? Not checking packages (needed: ${pkgs[*]})"
    return 0
  fi
  for pkg in "${pkgs[@]}"; do
    dbk_package_installed "$pkg" || missing+=("$pkg")
  done
  ((${#missing[@]})) || return 0

  local sudo=()
  if ! dbk_is_root; then
    if command -v sudo >/dev/null 2>&1 && { [[ -t 0 ]] || sudo -n true 2>/dev/null; }; then
      sudo=(sudo)
    else
      dbk_die "missing Debian packages: ${missing[*]}
  install them as root, then run this again:
    apt-get update && apt-get install -y ${missing[*]}"
    fi
  fi
  dbk_say "installing missing packages: ${missing[*]}"
  # A machine that has just booted may be running unattended-upgrades or cloud-init:
  # wait for the package locks (up to 10 minutes) rather than fail at once, and try
  # the index update once more (a mirror's hiccup).
  local apt=("${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600)
  "${apt[@]}" update -q >&2 || { sleep 5 && "${apt[@]}" update -q >&2; } ||
    dbk_die "apt-get update failed"
  "${apt[@]}" install -y -q --no-install-recommends "${missing[@]}" >&2 ||
    dbk_die "apt-get install failed for: ${missing[*]}"
}

# ------------------------------------------------------------------- build --

# dbk_build SRC_DIR BUILD_DIR -- configure (if needed) and build with the
# tests enabled, warnings as errors, and the sanitizers when DAYBOOK_SANITIZE=1.
dbk_build() {
  local src=$1 build=$2 sanitize=none
  [[ ${DAYBOOK_SANITIZE:-0} == 1 ]] && sanitize=address,undefined
  local opts=(-Dtests=enabled -Dwerror=true "-Db_sanitize=$sanitize")
  local stamp="$build/.daybook-setup-options"

  if [[ ! -f $build/meson-private/coredata.dat ]]; then
    if [[ -e $build ]] && [[ -n $(ls -A "$build" 2>/dev/null) ]]; then
      dbk_die "$build exists but is not a meson build directory; remove it"
    fi
    dbk_say "configuring $build (${opts[*]})"
    meson setup "$build" "$src" "${opts[@]}" >&2 || dbk_die "meson setup failed"
    printf '%s\n' "${opts[*]}" >"$stamp"
  elif [[ ! -f $stamp ]] || [[ $(<"$stamp") != "${opts[*]}" ]]; then
    dbk_say "reconfiguring $build (${opts[*]})"
    meson setup --reconfigure "$build" "$src" "${opts[@]}" >&2 ||
      dbk_die "meson setup --reconfigure failed"
    printf '%s\n' "${opts[*]}" >"$stamp"
  fi
  dbk_say "building in $build"
  ninja -C "$build" >&2 || dbk_die "build failed"
}

# --------------------------------------------------------------- processes --

# dbk_pid_running PID -- true when the process exists and is not a zombie.
dbk_pid_running() {
  local pid=$1 stat
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  if [[ -r /proc/$pid/stat ]]; then
    stat=$(<"/proc/$pid/stat") || return 1
    stat=${stat##*) }
    [[ ${stat%% *} != Z ]] || return 1
  fi
  return 0
}

# dbk_pidfile_pid PIDFILE -- print the pid recorded in PIDFILE, if any.
dbk_pidfile_pid() {
  local pid=""
  [[ -r $1 ]] && read -r pid <"$1" 2>/dev/null
  [[ $pid =~ ^[0-9]+$ ]] && printf '%s\n' "$pid"
}

# dbk_wait_pid_gone PID SECONDS -- wait until the process has exited.
dbk_wait_pid_gone() {
  local pid=$1 deadline=$((SECONDS + $2))
  while dbk_pid_running "$pid"; do
    ((SECONDS < deadline)) || return 1
    sleep 0.1
  done
}

# dbk_stop_pid PID NAME [GRACE_SECONDS] -- SIGTERM, wait, then SIGKILL.
dbk_stop_pid() {
  local pid=$1 name=$2 grace=${3:-10}
  dbk_pid_running "$pid" || return 0
  kill -TERM "$pid" 2>/dev/null || true
  if ! dbk_wait_pid_gone "$pid" "$grace"; then
    dbk_warn "$name (pid $pid) still running after ${grace}s: sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    dbk_wait_pid_gone "$pid" 5 || dbk_warn "$name (pid $pid) did not die"
  fi
}

# ------------------------------------------------------------------- ports --

# dbk_port_in_use PORT -- true when something listens on 127.0.0.1:PORT (or on
# every address).
dbk_port_in_use() {
  local port=$1
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    return 0
  fi
  if command -v ss >/dev/null 2>&1; then
    [[ -n $(ss -Hltn "sport = :$port" 2>/dev/null) ]] && return 0
  fi
  return 1
}

# dbk_pick_free_port [EXCLUDED_PORT...] -- print a free loopback TCP port,
# from 20000-31999: below Linux's ephemeral range, so no outgoing connection
# holds it either.
dbk_pick_free_port() {
  local port tries excluded ok
  for ((tries = 0; tries < 200; tries++)); do
    port=$((20000 + (RANDOM * 32768 + RANDOM) % 12000))
    ok=1
    for excluded in "$@"; do
      [[ $port == "$excluded" ]] && ok=0
    done
    ((ok)) || continue
    dbk_port_in_use "$port" && continue
    printf '%s\n' "$port"
    return 0
  done
  dbk_die "could not find a free TCP port"
}

# -------------------------------------------------------------- postgresql --
#
# PostgreSQL refuses to run as root. As root, every server-side command runs
# as DBK_PG_USER (the `postgres` OS user, or a system user `daybook` when that
# does not exist) through runuser; as a normal user, DBK_PG_USER is empty and
# commands run directly. A cluster lives in a "PostgreSQL home" directory
# owned by that user: HOME/data (the data directory) and HOME/postgresql.log.

# dbk_pg_setup_user [EXISTING_HOME] -- set DBK_PG_USER. When a cluster already
# exists in EXISTING_HOME, keep the OS user that owns it.
dbk_pg_setup_user() {
  DBK_PG_USER=""
  dbk_is_root || return 0
  local home=${1:-} owner
  if [[ -n $home && -d $home/data ]]; then
    owner=$(stat -c %U "$home/data")
    if [[ $owner != root && $owner != UNKNOWN ]]; then
      DBK_PG_USER=$owner
      return 0
    fi
  fi
  if getent passwd postgres >/dev/null; then
    DBK_PG_USER=postgres
  else
    if ! getent passwd daybook >/dev/null; then
      dbk_say "creating system user 'daybook' to run PostgreSQL"
      useradd --system --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin daybook || dbk_die "useradd daybook failed"
    fi
    DBK_PG_USER=daybook
  fi
}

# dbk_as_pg CMD... -- run CMD as the PostgreSQL OS user (from /, which that
# user can always enter).
dbk_as_pg() {
  if [[ -n ${DBK_PG_USER:-} ]]; then
    (cd / && runuser -u "$DBK_PG_USER" -- "$@")
  else
    "$@"
  fi
}

# dbk_pg_can_reach DIR -- true when the PostgreSQL OS user can traverse DIR.
dbk_pg_can_reach() {
  [[ -z ${DBK_PG_USER:-} ]] && return 0
  dbk_as_pg test -x "$1"
}

# dbk_pg_prepare_home PARENT FALLBACK -- choose, create and print the
# PostgreSQL home for a cluster that belongs to PARENT: PARENT/postgres when
# the PostgreSQL OS user can reach PARENT, otherwise FALLBACK (a directory it
# can reach), which PARENT/postgres then links to. An existing link is kept.
dbk_pg_prepare_home() {
  local parent=$1 fallback=$2 link="$1/postgres" home
  if [[ -L $link ]]; then
    home=$(readlink -m "$link")
  elif [[ -d $link ]] || dbk_pg_can_reach "$parent"; then
    home=$link
  else
    home=$fallback
  fi
  mkdir -p "$home"
  if [[ -n ${DBK_PG_USER:-} ]]; then
    chown "$DBK_PG_USER:" "$home"
    dbk_pg_can_reach "$home" || dbk_die "user $DBK_PG_USER cannot reach $home"
  fi
  chmod 700 "$home"
  [[ $home == "$link" ]] || ln -sfn "$home" "$link"
  printf '%s\n' "$home"
}

dbk_pg_uri() { printf 'postgresql://%s@127.0.0.1:%s/%s\n' "${3:-postgres}" "$1" "$2"; }

# dbk_pg_initdb HOME [test] [PASSWORD] -- create the cluster in HOME/data once.
# With PASSWORD, the superuser `postgres` gets it and every connection needs a
# password (scram-sha-256); without, the cluster trusts loopback connections.
dbk_pg_initdb() {
  local home=$1 profile=${2:-dev} password=${3:-} extra=() auth=trust
  [[ -f $home/data/PG_VERSION ]] && return 0
  [[ $profile == test ]] && extra=(--nosync)
  if [[ -n $password ]]; then
    # Readable by the PostgreSQL OS user, and only for the length of initdb.
    printf '%s\n' "$password" | dbk_as_pg sh -c 'umask 077 && cat >"$1"' sh "$home/pwfile"
    auth=scram-sha-256
    extra+=("--pwfile=$home/pwfile")
  fi
  dbk_say "initialising PostgreSQL cluster in $home/data"
  dbk_as_pg "$DBK_PG_BIN/initdb" -D "$home/data" -U postgres "--auth=$auth" \
    -E UTF8 --locale=C.UTF-8 --no-instructions "${extra[@]}" >"$home/initdb.log" 2>&1 || {
    dbk_as_pg rm -f "$home/pwfile"
    dbk_tail "$home/initdb.log"
    dbk_die "initdb failed"
  }
  dbk_as_pg rm -f "$home/pwfile"
  printf "\n# Daybook: listener and test settings, rewritten by scripts/dev\ninclude_if_exists = 'daybook.conf'\n" |
    dbk_as_pg tee -a "$home/data/postgresql.conf" >/dev/null
}

# dbk_pg_write_conf HOME PORT [test] -- (re)write HOME/data/daybook.conf.
dbk_pg_write_conf() {
  local home=$1 port=$2 profile=${3:-dev}
  {
    printf '# Written by scripts/dev on every start; edit postgresql.conf instead.\n'
    printf "listen_addresses = '127.0.0.1'\n"
    printf 'port = %s\n' "$port"
    printf "unix_socket_directories = ''\n"
    if [[ $profile == test ]]; then
      printf '# Test cluster: speed over durability.\n'
      printf 'fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n'
    fi
  } | dbk_as_pg tee "$home/data/daybook.conf" >/dev/null
}

# dbk_pg_running HOME -- true when the cluster in HOME/data runs.
dbk_pg_running() {
  [[ -f $1/data/PG_VERSION ]] || return 1
  dbk_as_pg "$DBK_PG_BIN/pg_ctl" status -D "$1/data" >/dev/null 2>&1
}

# dbk_pg_start HOME -- start the cluster and wait until it accepts connections.
dbk_pg_start() {
  local home=$1
  dbk_as_pg "$DBK_PG_BIN/pg_ctl" start -D "$home/data" -l "$home/postgresql.log" \
    -w -t 120 -s >/dev/null || {
    dbk_tail "$home/postgresql.log"
    dbk_die "PostgreSQL did not start (data: $home/data)"
  }
}

# dbk_pg_stop HOME [MODE] -- stop the cluster (default mode: fast).
dbk_pg_stop() {
  local home=$1 mode=${2:-fast}
  dbk_pg_running "$home" || return 0
  dbk_as_pg "$DBK_PG_BIN/pg_ctl" stop -D "$home/data" -m "$mode" -w -t 60 -s ||
    dbk_warn "pg_ctl stop failed for $home/data"
}

# dbk_pg_kill HOME -- last resort after a failed stop: kill the postmaster.
dbk_pg_kill() {
  local pid=""
  [[ -r $1/data/postmaster.pid ]] && pid=$(head -n 1 "$1/data/postmaster.pid" 2>/dev/null)
  [[ -n $pid ]] && dbk_stop_pid "$pid" postgres 5
  return 0
}

# dbk_pg_ensure_db PORT DBNAME -- create the database if it does not exist.
dbk_pg_ensure_db() {
  local port=$1 db=$2 uri exists
  uri=$(dbk_pg_uri "$port" postgres)
  exists=$(PGCONNECT_TIMEOUT=10 "$DBK_PG_BIN/psql" "$uri" -XtAq -v ON_ERROR_STOP=1 \
    -c "SELECT 1 FROM pg_database WHERE datname = '$db'") ||
    dbk_die "cannot connect to PostgreSQL at $uri"
  if [[ $exists != 1 ]]; then
    dbk_say "creating database $db"
    PGCONNECT_TIMEOUT=10 "$DBK_PG_BIN/psql" "$uri" -XqA -v ON_ERROR_STOP=1 \
      -c "CREATE DATABASE \"$db\"" >/dev/null || dbk_die "CREATE DATABASE $db failed"
  fi
}

# dbk_pg_passfile FILE PORT SECRETS_DIR ROLE... -- write a libpq password file
# (mode 600) for 127.0.0.1:PORT with the password of each role (generated
# once in SECRETS_DIR as pg-<role>.password). Point PGPASSFILE at it.
dbk_pg_passfile() {
  local file=$1 port=$2 dir=$3 role
  shift 3
  dbk_secret "$dir" pg-postgres >/dev/null # creates the directory
  (
    umask 077
    for role in "$@"; do
      printf '127.0.0.1:%s:*:%s:%s\n' "$port" "$role" "$(dbk_secret "$dir" "pg-$role")"
    done >"$file.tmp"
    mv "$file.tmp" "$file"
  )
}

# dbk_pg_require_passwords HOME PORT SECRETS_DIR -- make the cluster ask every
# connection for a password (scram-sha-256): give `postgres` its password
# (through PGPASSFILE, which must hold it: this also converts a cluster that
# an older scripts/dev created with trust), then rewrite pg_hba.conf and
# reload when it changed.
dbk_pg_require_passwords() {
  local home=$1 port=$2 dir=$3 hba want uri pw
  uri=$(dbk_pg_uri "$port" postgres)
  hba=$(dbk_as_pg cat "$home/data/pg_hba.conf")
  want=$(printf '%s\n' '# Written by scripts/dev: a password (scram-sha-256) for every connection.' \
    'local all all scram-sha-256' 'host all all 127.0.0.1/32 scram-sha-256' \
    'host all all ::1/128 scram-sha-256')
  [[ $hba == "$want" ]] && return 0
  dbk_say "switching PostgreSQL to password authentication"
  # The password goes through stdin, not the command line (visible in ps).
  pw=$(dbk_secret "$dir" pg-postgres)
  PGCONNECT_TIMEOUT=10 "$DBK_PG_BIN/psql" "$uri" -XqA -v ON_ERROR_STOP=1 >/dev/null <<SQL ||
SET password_encryption = 'scram-sha-256';
ALTER ROLE postgres PASSWORD '$pw';
SQL
    dbk_die "setting the password of role postgres failed"
  printf '%s\n' "$want" | dbk_as_pg tee "$home/data/pg_hba.conf" >/dev/null
  dbk_as_pg "$DBK_PG_BIN/pg_ctl" reload -D "$home/data" -s >/dev/null ||
    dbk_die "pg_ctl reload failed"
}

# dbk_pg_role_passwords PORT SECRETS_DIR ROLE... -- create each login role if
# it does not exist yet (sql/003 would create it without a password) and give
# it its password. Roles are cluster-wide, so this is not a migration's job.
dbk_pg_role_passwords() {
  local port=$1 dir=$2 role uri pw
  shift 2
  uri=$(dbk_pg_uri "$port" postgres)
  for role in "$@"; do
    [[ $role =~ ^[a-z_][a-z0-9_]*$ ]] || dbk_die "bad role name '$role'"
    # The password goes through stdin, not the command line (visible in ps).
    pw=$(dbk_secret "$dir" "pg-$role")
    PGCONNECT_TIMEOUT=10 "$DBK_PG_BIN/psql" "$uri" -XqA -v ON_ERROR_STOP=1 >/dev/null <<SQL ||
SELECT 'CREATE ROLE $role LOGIN' WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '$role') \\gexec
SET password_encryption = 'scram-sha-256';
ALTER ROLE $role PASSWORD '$pw';
SQL
      dbk_die "setting the password of role $role failed"
  done
}

# ------------------------------------------------------------------- redis --

# The Redis ACL users (deploy/redis-users.acl) and the template's place.
DBK_REDIS_USERS=(daybook-projector daybook-query daybook-admin daybook-ops)
DBK_REDIS_ACL_TEMPLATE=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)/deploy/redis-users.acl

# dbk_redis_render_acl SECRETS_DIR OUT -- render the ACL template into OUT
# (mode 600) with the hashes of the users' passwords (generated once in
# SECRETS_DIR as redis-<user>.password).
dbk_redis_render_acl() {
  local dir=$1 out=$2 user hash subst=()
  for user in "${DBK_REDIS_USERS[@]}"; do
    hash=$(printf '%s' "$(dbk_secret "$dir" "redis-$user")" | sha256sum | cut -d' ' -f1)
    subst+=(-e "s/@$user@/$hash/g")
  done
  (
    umask 077
    sed -e '/^#/d' -e '/^[[:space:]]*$/d' "${subst[@]}" "$DBK_REDIS_ACL_TEMPLATE" >"$out.tmp"
    mv "$out.tmp" "$out"
  )
}

# dbk_redis_url PORT USER SECRETS_DIR -- redis:// URL with USER's password.
dbk_redis_url() {
  printf 'redis://%s:%s@127.0.0.1:%s\n' "$2" "$(dbk_secret "$3" "redis-$2")" "$1"
}

# dbk_redis_cli PORT ARGS... -- redis-cli on 127.0.0.1:PORT; as daybook-ops
# when the secrets directory DBK_REDIS_SECRETS holds its password file.
dbk_redis_cli() {
  local port=$1
  shift
  local file=${DBK_REDIS_SECRETS:-/nonexistent}/redis-daybook-ops.password
  if [[ -r $file ]]; then
    REDISCLI_AUTH=$(head -n 1 "$file") \
      redis-cli --no-auth-warning --user daybook-ops -h 127.0.0.1 -p "$port" "$@"
  else
    redis-cli -h 127.0.0.1 -p "$port" "$@"
  fi
}

# dbk_redis_ping PORT -- true when Redis answers PONG.
dbk_redis_ping() {
  [[ $(dbk_redis_cli "$1" ping 2>/dev/null) == PONG ]]
}

# dbk_redis_running PORT PIDFILE -- true when our Redis runs and answers.
dbk_redis_running() {
  local pid
  pid=$(dbk_pidfile_pid "$2") || return 1
  dbk_pid_running "$pid" && dbk_redis_ping "$1"
}

# dbk_redis_start PORT DIR PIDFILE LOGFILE [test|dev] [ACLFILE] -- start a
# daemonized Redis on 127.0.0.1:PORT with its working directory DIR, and wait
# for PONG. The test profile keeps nothing on disk, so a restart starts empty.
# With ACLFILE (see dbk_redis_render_acl; set DBK_REDIS_SECRETS too), Redis
# knows only those users and the default user is disabled.
dbk_redis_start() {
  local port=$1 dir=$2 pidfile=$3 logfile=$4 profile=${5:-dev} acl=${6:-} persist=()
  [[ $profile == test ]] && persist=(--save '' --appendonly no)
  [[ -n $acl ]] && persist+=(--aclfile "$acl")
  mkdir -p "$dir"
  rm -f "$pidfile"
  redis-server --daemonize yes --bind 127.0.0.1 --port "$port" \
    --pidfile "$pidfile" --logfile "$logfile" --dir "$dir" "${persist[@]}" ||
    dbk_die "redis-server failed to start"
  local deadline=$((SECONDS + 20))
  until dbk_redis_ping "$port"; do
    if ((SECONDS >= deadline)); then
      dbk_tail "$logfile"
      dbk_die "Redis did not answer on 127.0.0.1:$port"
    fi
    sleep 0.1
  done
}

# dbk_redis_stop PORT PIDFILE [nosave] -- shut Redis down; kill it if needed.
dbk_redis_stop() {
  local port=$1 pidfile=$2 save=${3:-} pid
  pid=$(dbk_pidfile_pid "$pidfile") || return 0
  dbk_pid_running "$pid" || {
    rm -f "$pidfile"
    return 0
  }
  local out
  out=$(dbk_redis_cli "$port" shutdown ${save:+"$save"} 2>&1) || true
  if [[ $out == *NOAUTH* || $out == *WRONGPASS* || $out == *NOPERM* ]]; then
    # Started with other users (an older scripts/dev): SIGTERM shuts down as well.
    dbk_stop_pid "$pid" redis 10
  else
    dbk_wait_pid_gone "$pid" 10 || dbk_stop_pid "$pid" redis 5
  fi
  rm -f "$pidfile"
}

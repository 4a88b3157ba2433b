#!/usr/bin/env bash
# Make the secrets compose.yaml mounts, once, into DIR (default
# deploy/secrets; compose.yaml reads DAYBOOK_SECRETS_DIR):
#   pg_<role>_password      PostgreSQL: postgres (superuser), command,
#                           projector, query
#   redis_<user>_password   Redis ACL users: projector, query, admin, ops
#   redis.acl               deploy/redis-users.acl with the passwords' SHA-256
#   tokens.txt              API tokens' hashes (DAYBOOK_TOKENS_FILE), made by
#                           `daybook-admin token new`
#   tokens.env              the tokens themselves (mode 600): DAYBOOK_WRITE_TOKEN,
#                           DAYBOOK_READ_TOKEN, DAYBOOK_ADMIN_TOKEN
# Existing files are kept (delete one to make it anew). The directory is mode
# 700; the files the containers read are mode 644, since the containers' users
# (postgres, redis, daybook uid 10001) must read them.
#
# daybook-admin is taken from DAYBOOK_ADMIN (a command), else from PATH, else
# from build/, else from the image: `docker run --rm daybook:latest
# daybook-admin` (DAYBOOK_CONTAINER_ENGINE=podman for podman).
#
# usage: deploy/make-secrets.sh [DIR]
set -euo pipefail

top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
dir=${1:-$top/deploy/secrets}

die() {
  printf 'make-secrets: %s\n' "$*" >&2
  exit 1
}

admin() {
  if [[ -n ${DAYBOOK_ADMIN:-} ]]; then
    # shellcheck disable=SC2086 # a command with its arguments
    $DAYBOOK_ADMIN "$@"
  elif command -v daybook-admin >/dev/null 2>&1; then
    daybook-admin "$@"
  elif [[ -x $top/build/admin/daybook-admin ]]; then
    "$top/build/admin/daybook-admin" "$@"
  else
    "${DAYBOOK_CONTAINER_ENGINE:-docker}" run --rm --network none daybook:latest daybook-admin "$@"
  fi
}

# secret NAME -- DIR/NAME: 48 hex digits from /dev/urandom, made once.
secret() {
  local file=$dir/$1
  [[ -s $file ]] && return 0
  head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$file.tmp"
  printf '\n' >>"$file.tmp"
  chmod 644 "$file.tmp"
  mv "$file.tmp" "$file"
}

mkdir -p "$dir"
chmod 700 "$dir"
for role in postgres command projector query; do
  secret "pg_${role}_password"
done
users=(projector query admin ops)
for user in "${users[@]}"; do
  secret "redis_${user}_password"
done

# The Redis ACL file: the template without its comments, each @daybook-<user>@
# replaced by the SHA-256 of that user's password (Redis's #<hash> form).
acl=$(grep -v '^#' "$top/deploy/redis-users.acl" | grep -v '^[[:space:]]*$')
for user in "${users[@]}"; do
  hash=$(head -n 1 "$dir/redis_${user}_password" | tr -d '\n' | sha256sum | cut -d' ' -f1)
  acl=${acl//@daybook-$user@/$hash}
done
[[ ! $acl =~ @daybook-[a-z-]+@ ]] || die "deploy/redis-users.acl names a user this script does not know"
printf '%s\n' "$acl" >"$dir/redis.acl.tmp"
chmod 644 "$dir/redis.acl.tmp"
mv "$dir/redis.acl.tmp" "$dir/redis.acl"

# API tokens: made once; the hashes for the services, the tokens for you.
if [[ ! -s $dir/tokens.txt || ! -s $dir/tokens.env ]]; then
  lines=() envs=()
  for spec in write:write read:read admin:write,read,admin; do
    name=${spec%%:*}
    out=$(admin token new --id "compose-$name" --scopes "${spec#*:}" 2>/dev/null) ||
      die "daybook-admin token new failed (build the image or the binaries first?)"
    token=$(sed -n 1p <<<"$out")
    lines+=("$(sed -n 2p <<<"$out")")
    envs+=("DAYBOOK_${name^^}_TOKEN=$token")
  done
  (
    umask 077
    printf '%s\n' "# Daybook API tokens for compose.yaml; keep private. Hashes in tokens.txt." \
      "${envs[@]}" >"$dir/tokens.env.tmp"
    mv "$dir/tokens.env.tmp" "$dir/tokens.env"
  )
  printf '%s\n' "# Daybook API tokens (DAYBOOK_TOKENS_FILE): <id> <sha256 of the token> <scopes>." \
    "# Made by deploy/make-secrets.sh with daybook-admin token new; the tokens are in tokens.env." \
    "${lines[@]}" >"$dir/tokens.txt.tmp"
  chmod 644 "$dir/tokens.txt.tmp"
  mv "$dir/tokens.txt.tmp" "$dir/tokens.txt"
  printf 'make-secrets: new API tokens in %s/tokens.env (shown only there)\n' "$dir" >&2
fi
printf 'make-secrets: secrets ready in %s\n' "$dir" >&2

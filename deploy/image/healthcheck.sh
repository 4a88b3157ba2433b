#!/bin/bash
# daybook-healthcheck PORT [PATH] -- exit 0 when GET PATH (default /readyz) on
# 127.0.0.1:PORT answers 200 within 5 s. The image's health check, in bash
# alone (no curl in the image).
set -u
port=${1:?usage: daybook-healthcheck PORT [PATH]}
path=${2:-/readyz}
exec 3<>"/dev/tcp/127.0.0.1/$port" || exit 1
printf 'GET %s HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n' "$path" >&3
IFS= read -r -t 5 status <&3 || exit 1
[[ $status == HTTP/1.?\ 200\ * ]]

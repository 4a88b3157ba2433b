# Daybook image: the four binaries (daybook-command, daybook-query,
# daybook-projector, daybook-admin) and the SQL migrations, on Debian 12.
# Built from Debian packages only. compose.yaml builds and runs it; by hand:
#   docker build -t daybook .      (or: podman build -t daybook .)
# scripts/dev compose-test builds it with podman and runs compose.yaml.

ARG DEBIAN_IMAGE=debian:bookworm-slim

# ---- build: meson + ninja, release, without the tests
FROM ${DEBIAN_IMAGE} AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      gcc libc6-dev pkg-config meson ninja-build \
      libpq-dev libhiredis-dev libevent-dev libjansson-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN meson setup /build --buildtype=release -Dtests=disabled \
 && ninja -C /build \
 && install -d /out \
 && install -m 755 /build/command/daybook-command /build/query/daybook-query \
      /build/projector/daybook-projector /build/admin/daybook-admin /out/

# ---- runtime: the binaries and exactly the shared libraries they link
# (libpq, hiredis, libevent with its pthreads part for daybook-query, jansson).
# No shell tools beyond Debian's essential set: the health check speaks HTTP
# through bash (daybook-healthcheck), the entrypoint turns *_FILE secrets into
# a libpq password file.
FROM ${DEBIAN_IMAGE}
ARG DEBIAN_IMAGE
ARG VERSION=dev
ARG REVISION=unknown
LABEL org.opencontainers.image.title="daybook" \
      org.opencontainers.image.description="Daybook: an event-sourced ledger (command, query, projector, admin)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="NOASSERTION" \
      org.opencontainers.image.base.name="${DEBIAN_IMAGE}"
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      libpq5 libhiredis0.14 libevent-2.1-7 libevent-pthreads-2.1-7 libjansson4 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 daybook \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin daybook
COPY --from=build /out/ /usr/local/bin/
COPY sql/ /usr/share/daybook/sql/
COPY deploy/image/entrypoint.sh /usr/local/bin/daybook-entrypoint
COPY deploy/image/healthcheck.sh /usr/local/bin/daybook-healthcheck
# Fail the build when any binary misses a shared library (ldd: "not found"),
# and prove that each one starts (--help needs no configuration).
RUN set -e; \
    for b in daybook-command daybook-query daybook-projector daybook-admin; do \
      ldd "/usr/local/bin/$b" >/tmp/ldd.txt; \
      if grep 'not found' /tmp/ldd.txt; then \
        echo "$b: unresolved shared libraries" >&2; exit 1; \
      fi; \
      "/usr/local/bin/$b" --help >/dev/null; \
    done; \
    rm -f /tmp/ldd.txt
ENV DAYBOOK_MIGRATIONS=/usr/share/daybook/sql
# Numeric, so that runtimes can check "not root" without reading /etc/passwd.
USER 10001:10001
# The services listen on 127.0.0.1 unless DAYBOOK_LISTEN says otherwise;
# in a container, set DAYBOOK_LISTEN=0.0.0.0:<port> (compose.yaml does).
EXPOSE 8081 8082 8083
ENTRYPOINT ["daybook-entrypoint"]
CMD ["daybook-command"]

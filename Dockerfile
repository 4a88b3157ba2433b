# Daybook image: the four binaries (daybook-command, daybook-query,
# daybook-projector, daybook-admin) and the SQL migrations, on Debian 12.
# Built from Debian packages only. compose.yaml builds and runs it; by hand:
#   docker build -t daybook .

# ---- build: meson + ninja, release, without the tests
FROM debian:12 AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      build-essential pkg-config meson ninja-build \
      libpq-dev libhiredis-dev libevent-dev libjansson-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN meson setup /build --buildtype=release -Dtests=disabled \
 && ninja -C /build \
 && install -d /out \
 && install -m 755 /build/command/daybook-command /build/query/daybook-query \
      /build/projector/daybook-projector /build/admin/daybook-admin /out/

# ---- runtime: the binaries, their libraries, psql (for deploy/migrate.sh)
# and curl (for the health checks)
FROM debian:12-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      libpq5 libhiredis0.14 libevent-2.1-7 libjansson4 \
      postgresql-client-15 curl ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin daybook
COPY --from=build /out/ /usr/local/bin/
COPY sql/ /usr/share/daybook/sql/
COPY deploy/migrate.sh /usr/local/bin/daybook-migrate
ENV DAYBOOK_MIGRATIONS=/usr/share/daybook/sql
USER daybook
# The services listen on 127.0.0.1 unless DAYBOOK_LISTEN says otherwise;
# in a container, set DAYBOOK_LISTEN=0.0.0.0:<port> (compose.yaml does).
EXPOSE 8081 8082 8083
CMD ["daybook-command"]

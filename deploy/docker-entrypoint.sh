#!/bin/sh
# The gateway container's entrypoint, configured by environment only: migrate the
# database, then exec the gateway, which replaces this shell as PID 1 and so gets
# `docker stop`'s SIGTERM itself (it then flushes what waits to the database).
# Arguments go to `estate run`, e.g. `docker compose run --rm gateway --simulate 5`.
set -eu

estate db upgrade
exec estate run "$@"

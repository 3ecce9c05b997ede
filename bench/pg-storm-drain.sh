#!/usr/bin/env bash
# One relay on a fresh PostgreSQL database: a storm (STORM_SECONDS, default 10), then how fast
# the same relay drains what it accepted (jobs reaching the stand-in P0 per second over the
# next 10 s). Quicker than bench/pg.sh for before/after comparisons of the PostgreSQL store.
#
#   bench/pg-storm-drain.sh
#   PG_ADMIN=postgres://postgres@db:5432/postgres STORM_SECONDS=15 bench/pg-storm-drain.sh
#
# Needs wrk, curl and psql. Extra libpq options for the relay's connections go in PGOPTS
# (e.g. '&options=-c%20session_preload_libraries%3Dauto_explain' to log plans).
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh

PG_ADMIN=${PG_ADMIN:-postgres://postgres@127.0.0.1:5432/test}
name="relay_storm_drain_$$"
psql "$PG_ADMIN" -qc "CREATE DATABASE $name"
trap 'psql "$PG_ADMIN" -qc "DROP DATABASE IF EXISTS $name WITH (FORCE)" || true; cleanup' EXIT
cargo build --release --quiet --bin p0-relay --example p0_sink
start_sink
STORE_URL="${PG_ADMIN%/*}/$name?sslmode=disable${PGOPTS:-}" start_relay "$TARGET/release/p0-relay" storm-drain
r=$(run_wrk "http://$RELAY" /webhooks/github "${STORM_SECONDS:-10}" "$CONN" 0)
secs=$(field seconds "$r")
echo "storm: $(per_second "$(field s202 "$r")" "$secs") accepted/s, $(( $(field s200 "$r") + $(field other "$r") )) other answers"
a=$(curl -s "http://$SINK/count" | cut -d' ' -f2); sleep 10; b=$(curl -s "http://$SINK/count" | cut -d' ' -f2)
echo "drain: $(( (b - a) / 10 )) jobs/s reaching P0"

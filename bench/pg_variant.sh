#!/usr/bin/env bash
# One PostgreSQL storm with the store's SQL changed by hand, to try a change to a PL/pgSQL
# function without building the relay again: a fresh database, the relay started once to
# create the schema, then SQL_FILE applied with psql (a function's `CREATE OR REPLACE`, or a
# setting for the database's sessions), then the storm of bench/compare.sh. A relay
# replaces its functions only when it migrates, so the one applied stays in use. With
# TRACK=1 the functions are timed (`track_functions = all`) and their calls and times
# printed: wall time, so a lock waited for counts in the function that waited.
#
#   bench/pg_variant.sh target/compare/p0-relay-<sha> [SQL_FILE]
#   CONFIG_REV=HEAD bench/pg_variant.sh target/release/p0-relay /tmp/variant.sql
#
# The relay runs with the relay.yaml and mappings of the revision its name ends in
# (p0-relay-<sha>, as bench/compare.sh names its builds), or of CONFIG_REV. Prints accepted/s,
# P0 calls/s end to end, relay CPU per webhook, and PostgreSQL's CPU per accepted webhook
# (every postgres process's, storm and drain: a rough figure, compare it within one run).
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: bench/pg_variant.sh RELAY_BINARY [SQL_FILE]"; exit 2; }
# Paths as given, before moving to the repository.
bin=$(realpath "$1")
sql=${2:+$(realpath "$2")}
cd "$(dirname "$0")/.."
PG_ADMIN=${PG_ADMIN:-postgres://postgres@127.0.0.1:5432/test}
source bench/lib.sh
needs_pg
rev=${CONFIG_REV:-${bin##*/p0-relay-}}
git cat-file -e "$rev^{commit}" 2>/dev/null || {
  echo "no revision $rev (from CONFIG_REV, or the binary's name p0-relay-<revision>): its relay.yaml and mappings are needed"; exit 2; }
mkdir -p "$work/cfg"
git archive "$rev" relay.yaml mappings | tar -x -C "$work/cfg"
cargo build --release --quiet --example p0_sink
fresh_db variant
export STORE_URL=$db_url
# Once to migrate (on another port), stopped before the variant is applied.
RELAY_DIR=$work/cfg LISTEN=127.0.0.1:18098 start_relay "$bin" migrate
kill "$relay_pid" 2>/dev/null || true; wait "$relay_pid" 2>/dev/null || true
[ -z "$sql" ] || psql "${db_url%%\?*}" -q -v ON_ERROR_STOP=1 -f "$sql" >/dev/null
[ "${TRACK:-0}" != 1 ] || psql "${db_url%%\?*}" -q -v ON_ERROR_STOP=1 -c \
  "DO \$\$ BEGIN EXECUTE format('ALTER DATABASE %I SET track_functions = %L', current_database(), 'all'); END \$\$"
# utime + stime of every postgres process, and what the postmaster collected of those ended.
pg_ticks() {
  local t=0 p
  for p in $(pgrep -x postgres); do
    t=$((t + $(sed 's/.*) //' "/proc/$p/stat" 2>/dev/null | awk '{print $12 + $13 + $14 + $15}' || echo 0)))
  done
  echo "$t"
}
before=$(pg_ticks)
RELAY_DIR=$work/cfg relay_storm "$bin" run "${STORM_SECONDS:-15}"
sleep 2 # the relay's connections ended: their backends' time reaches the postmaster
after=$(pg_ticks)
[ "${TRACK:-0}" != 1 ] || psql "${db_url%%\?*}" -c "SELECT funcname, calls, round(total_time) AS total_ms,
    round(self_time) AS self_ms, round((total_time * 1000 / calls)::NUMERIC) AS us_per_call
  FROM pg_stat_user_functions ORDER BY total_time DESC"
pg_us=$(awk -v t=$((after - before)) -v hz="$(getconf CLK_TCK)" -v n="$accepted" 'BEGIN {printf "%.0f", (n > 0 ? t * 1e6 / hz / n : 0)}')
echo "$(basename "$bin") ${sql:-(no change)}: accepted/s $answered_rate, P0 calls/s $calls_rate, lost $lost, non-202 $non202, relay CPU us per webhook $cpu, PostgreSQL CPU us per webhook $pg_us"

#!/usr/bin/env bash
# The database's cost of one batch write, with no relay, storm or network in the way: pgbench
# calls `p0_relay_write` with one storm-like batch (bench/sql/write_batch.sql: eight
# deliveries and eight `sent` events) on one connection, against a database migrated by each
# binary given, taking turns, ROUNDS times (default 3), SECONDS_EACH (default 8) each. On a
# shared machine this is far steadier than a storm's rate: compare the latencies of one run.
# SQL_<n> (SQL_1, SQL_2, ...) applies a file to the n-th binary's database after it migrates,
# as bench/pg_variant.sh does; JSON_<n>=1 sends the n-th its batch's events as JSON, as
# earlier relays did (their functions read nothing else). Each binary starts once, to migrate,
# with the relay.yaml and mappings of the revision its name ends in (p0-relay-<sha>, as
# bench/compare.sh names its builds), else with the checkout's. (bench/lib.sh asks for wrk
# and curl, as for every script.)
#
#   bench/pg_write.sh target/compare/p0-relay-<old> target/compare/p0-relay-<new>
#   SQL_2=/tmp/variant.sql bench/pg_write.sh target/release/p0-relay target/release/p0-relay
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: bench/pg_write.sh RELAY_BINARY..."; exit 2; }
# Paths as given, before moving to the repository.
bins=()
for b in "$@"; do p=$(realpath -e -- "$b"); bins+=("$p"); done
for n in $(seq "$#"); do
  sql=SQL_$n
  if [ -n "${!sql:-}" ]; then p=$(realpath -e -- "${!sql}"); export "SQL_$n=$p"; fi
done
cd "$(dirname "$0")/.."
PG_ADMIN=${PG_ADMIN:-postgres://postgres@127.0.0.1:5432/test}
source bench/lib.sh
needs_pg
pgbench --version >/dev/null 2>&1 || { echo "missing pgbench (apt-get install postgresql-contrib)"; exit 1; }
urls=()
opts=()
for i in "${!bins[@]}"; do
  n=$((i + 1))
  fresh_db "write$n"
  urls+=("${db_url%%\?*}")
  rev=${bins[$i]##*/p0-relay-}
  cfg=. from="the checkout"
  if git cat-file -e "$rev^{commit}" 2>/dev/null; then
    cfg=$work/cfg$n from=$rev; mkdir -p "$cfg"; git archive "$rev" relay.yaml mappings | tar -x -C "$cfg"
  fi
  echo "${bins[$i]}: migrates with the relay.yaml and mappings of $from" >&2
  RELAY_DIR=$cfg STORE_URL=$db_url LISTEN=127.0.0.1:18098 start_relay "${bins[$i]}" "write$n" ||
    { echo "${bins[$i]} did not start:"; cat "$work/relay-write$n.log"; exit 1; }
  kill "$relay_pid" 2>/dev/null || true; wait "$relay_pid" 2>/dev/null || true
  sql=SQL_$n
  [ -z "${!sql:-}" ] || psql "${db_url%%\?*}" -q -v ON_ERROR_STOP=1 -f "${!sql}" >/dev/null
  # A first few batches: they fail here, with pgbench's words, if this binary's database
  # cannot take them.
  json=JSON_$n
  opts+=("-Djson=${!json:-0}")
  pgbench -n "${opts[$i]}" -f bench/sql/write_batch.sql -t 20 "${db_url%%\?*}" >"$work/warm$n" 2>&1 ||
    { echo "${bins[$i]}: the batch failed:"; cat "$work/warm$n"; exit 1; }
done
echo "| round | $(for b in "${bins[@]}"; do printf '%s | ' "$(basename "$b")"; done)"
echo "|---|$(for _ in "${bins[@]}"; do printf -- '---|'; done)"
for r in $(seq "${ROUNDS:-3}"); do
  row="| $r |"
  for i in "${!urls[@]}"; do
    u=${urls[$i]}
    out=$(pgbench -n "${opts[$i]}" -f bench/sql/write_batch.sql -T "${SECONDS_EACH:-8}" "$u" 2>&1) ||
      { echo "$u: pgbench failed:"; echo "$out"; exit 1; }
    ms=$(sed -n 's/latency average = \([0-9.]*\) ms/\1/p' <<<"$out")
    row="$row $ms ms |"
  done
  echo "$row"
done

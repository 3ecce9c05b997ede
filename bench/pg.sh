#!/usr/bin/env bash
# PostgreSQL against SQLite, in one run, same load (wrk, real GitHub deliveries signed per
# request, unique IDs, stand-in P0 answering at once), release build:
#   1. one relay on SQLite, 2. one relay on PostgreSQL, 3. three relays on one PostgreSQL
#   database (three wrk processes, one per relay, splitting the connections).
# Each PostgreSQL run gets a fresh database, dropped after.
#
#   bench/pg.sh                                  # PostgreSQL at 127.0.0.1:5432 (trust auth)
#   PG_ADMIN=postgres://postgres@db:5432/postgres STORM_SECONDS=20 bench/pg.sh
#
# Needs wrk, webhook, curl and psql. Target: PostgreSQL accepts >= 50% of SQLite's rate on
# this 2-core machine, where the database shares the cores.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh

STORM=${STORM_SECONDS:-30}
PG_ADMIN=${PG_ADMIN:-postgres://postgres@127.0.0.1:5432/test}
needs_pg
committed_at() { curl -s "http://$1/metrics" | awk '/^p0_relay_webhooks_total\{outcome="accepted",source="github"\}/ {print $2}'; }

cargo build --release --quiet --bin p0-relay --example p0_sink
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB; $(uname -sr); $(git rev-parse --short HEAD)"
echo "PostgreSQL: $(psql "$PG_ADMIN" -qAtc 'SHOW server_version'), synchronous_commit=$(psql "$PG_ADMIN" -qAtc 'SHOW synchronous_commit')"

# 1. One relay on SQLite.
relay_storm "$TARGET/release/p0-relay" sqlite "$STORM"
sq=("$answered_rate" "$calls_rate" "$accepted" "$distinct" "$lost" "$dupes" "$hwm_storm" "$non202")

# 2. One relay on PostgreSQL, same load.
fresh_db one
STORE_URL=$db_url relay_storm "$TARGET/release/p0-relay" pg-one "$STORM"
pg1=("$answered_rate" "$calls_rate" "$accepted" "$distinct" "$lost" "$dupes" "$hwm_storm" "$non202")

# 3. Three relays on one PostgreSQL database, the connections split between them.
fresh_db three
start_sink
addrs=(127.0.0.1:18081 127.0.0.1:18082 127.0.0.1:18083)
for i in 0 1 2; do
  LISTEN=${addrs[$i]} STORE_URL=$db_url start_relay "$TARGET/release/p0-relay" "pg-three-$i"
done
per=$(( CONN / 3 > 0 ? CONN / 3 : 1 ))
t0=$(date +%s.%N)
wrk_pids=()
for i in 0 1 2; do
  BENCH_SALT="r$i-" run_wrk "http://${addrs[$i]}" /webhooks/github "$STORM" "$per" 0 >"$work/wrk-$i" &
  wrk_pids+=($!)
done
for p in "${wrk_pids[@]}"; do wait "$p" || true; done
accepted3=0; non202_3=0; secs3=0
for i in 0 1 2; do
  r=$(cat "$work/wrk-$i")
  accepted3=$(( accepted3 + $(field s202 "$r") ))
  non202_3=$(( non202_3 + $(field s200 "$r") + $(field other "$r") ))
  secs3=$(field seconds "$r")
done
answered3=$(per_second "$accepted3" "$secs3")
sleep 1
committed3=0
for a in "${addrs[@]}"; do c=$(committed_at "$a"); committed3=$(( committed3 + $(printf '%.0f' "${c:-0}") )); done
drain "$committed3"
t1=$(date +%s.%N)
read -r calls3 distinct3 _ < <(curl -s "http://$SINK/count"; echo)
calls_rate3=$(awk -v n="$distinct3" -v a="$t0" -v b="$t1" 'BEGIN {printf "%.0f", n/(b-a)}')
lost3=$(( accepted3 > distinct3 ? accepted3 - distinct3 : 0 ))
dupes3=$(( calls3 - distinct3 ))

cat <<OUT

| measure (${CONN} connections, ${STORM} s) | SQLite, 1 relay | PostgreSQL, 1 relay | PostgreSQL, 3 relays |
|---|---|---|---|
| webhooks accepted/s | ${sq[0]} | ${pg1[0]} | $answered3 |
| P0 calls completed/s, end to end | ${sq[1]} | ${pg1[1]} | $calls_rate3 |
| acknowledged / reached P0 / lost | ${sq[2]} / ${sq[3]} / ${sq[4]} | ${pg1[2]} / ${pg1[3]} / ${pg1[4]} | $accepted3 / $distinct3 / $lost3 |
| duplicate calls / non-202 answers | ${sq[5]} / ${sq[7]} | ${pg1[5]} / ${pg1[7]} | $dupes3 / $non202_3 |
| peak RSS during the storm, MiB (per relay) | ${sq[6]} | ${pg1[6]} | - |

PostgreSQL accepted / SQLite accepted  = $(ratio "${pg1[0]}" "${sq[0]}")   (target >= 0.50)
three relays / one relay on PostgreSQL = $(ratio "$answered3" "${pg1[0]}")   (reported)
OUT

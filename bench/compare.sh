#!/usr/bin/env bash
# Before/after in one run: builds p0-relay at each git revision given and runs the same storm
# against each, one after the other, with the current benchmark tools.
#
#   bench/compare.sh 25585d6 ffdc728 30b36cb 95a68b8 c619d8b
#   STORM_SECONDS=30 bench/compare.sh HEAD~1 HEAD
#   PG_ADMIN=postgres://postgres@127.0.0.1:5432/test bench/compare.sh HEAD~1 HEAD   # on PostgreSQL
#
# With PG_ADMIN set, each run's store is a fresh PostgreSQL database on that server (dropped
# after); otherwise a fresh SQLite file.
#
# Binaries are kept per commit in $CARGO_TARGET_DIR/compare (default target/compare), so a
# revision built once is not built again (BUILD_ONLY=1 builds and stops, so the builds can run
# before the machine is quiet). The payload is BENCH_PAYLOAD (see bench/lib.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh

STORM=${STORM_SECONDS:-20}
[ $# -ge 1 ] || { echo "usage: bench/compare.sh REV..."; exit 2; }
cargo build --release --quiet --example p0_sink
mkdir -p "$TARGET/compare"
for rev in "$@"; do
  sha=$(git rev-parse --short=12 "$rev^{commit}")
  bin="$TARGET/compare/p0-relay-$sha"
  if [ ! -x "$bin" ]; then
    git worktree add --quiet --detach "$work/src-$rev" "$rev"
    # The same target dir as the current tree's release build: dependencies build once.
    CARGO_TARGET_DIR=$TARGET cargo build --release --quiet --locked \
      --manifest-path "$work/src-$rev/Cargo.toml" --bin p0-relay
    cp "$TARGET/release/p0-relay" "$bin"
    git worktree remove --force "$work/src-$rev"
  fi
  cp "$bin" "$work/p0-relay-${rev//\//_}"
  # Each revision runs with its own relay.yaml and mappings (a newer config may hold keys an
  # older relay does not know).
  mkdir -p "$work/cfg-$sha"
  git archive "$sha" relay.yaml mappings | tar -x -C "$work/cfg-$sha"
done
[ -z "${BUILD_ONLY:-}" ] || exit 0
[ -z "${PG_ADMIN:-}" ] || needs_pg
if [ -n "${PG_ADMIN:-}" ]; then echo "store: PostgreSQL at ${PG_ADMIN%/*}"; else echo "store: SQLite"; fi
echo "machine: $(nproc) cores; load average $(cut -d' ' -f1-3 /proc/loadavg); storm ${STORM} s at ${CONN} connections per revision; payload $(basename "$BENCH_PAYLOAD") ($(wc -c <"$BENCH_PAYLOAD") bytes)"
echo
echo "| revision | accepted/s | P0 calls/s end to end | lost | non-202 | peak RSS MiB | relay CPU us per webhook in the storm | per P0 call in the drain |"
echo "|---|---|---|---|---|---|---|---|"
n=0
for rev in "$@"; do
  # A store of its own per run, even for a revision given twice (wrk's IDs repeat per run).
  n=$((n + 1))
  if [ -n "${PG_ADMIN:-}" ]; then fresh_db "run$n"; export STORE_URL=$db_url; fi
  sha=$(git rev-parse --short=12 "$rev^{commit}")
  RELAY_DIR="$work/cfg-$sha" relay_storm "$work/p0-relay-${rev//\//_}" "$n-${rev//\//_}" "$STORM"
  echo "| $rev $(git log -1 --format=%s "$rev" | cut -c1-60) | $answered_rate | $calls_rate | $lost | $non202 | $hwm | $cpu | $drain_cpu |"
done

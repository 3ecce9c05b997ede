#!/usr/bin/env bash
# Before/after in one run: builds p0-relay at each git revision given and runs the same storm
# against each, one after the other, with the current benchmark tools.
#
#   bench/compare.sh 25585d6 ffdc728 30b36cb 95a68b8 c619d8b
#   STORM_SECONDS=30 bench/compare.sh HEAD~1 HEAD
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh

STORM=${STORM_SECONDS:-20}
[ $# -ge 1 ] || { echo "usage: bench/compare.sh REV..."; exit 2; }
cargo build --release --quiet --example p0_sink
for rev in "$@"; do
  git worktree add --quiet --detach "$work/src-$rev" "$rev"
  CARGO_TARGET_DIR=$PWD/target/compare cargo build --release --quiet --locked \
    --manifest-path "$work/src-$rev/Cargo.toml" --bin p0-relay
  cp target/compare/release/p0-relay "$work/p0-relay-$rev"
  git worktree remove --force "$work/src-$rev"
done
echo "machine: $(nproc) cores; storm ${STORM} s at ${CONN} connections per revision"
echo
echo "| revision | accepted/s | P0 calls/s end to end | lost | peak RSS MiB |"
echo "|---|---|---|---|---|"
for rev in "$@"; do
  relay_storm "$work/p0-relay-$rev" "$rev" "$STORM"
  echo "| $rev $(git log -1 --format=%s "$rev" | cut -c1-60) | $answered_rate | $calls_rate | $lost | $hwm |"
done

#!/usr/bin/env bash
# Instructions per webhook, counted exactly (callgrind counts instructions, not time, so the
# figure does not move with whatever else the machine runs), for one or more relay binaries,
# each on a fresh SQLite store (or on STORE_URL, the same database for all) under the same paced load: 8 connections at 8
# webhooks/s each for 30 s (CG_SECONDS), the real-size GitHub comment. Counting starts once
# the relay answers (startup is left out) and ends when it stops. Prints instructions per
# accepted webhook and leaves callgrind.out.<name> in target/callgrind for
# `callgrind_annotate` (per function; `--inclusive=yes` for callers' totals).
#
#   bench/callgrind.sh target/compare/p0-relay-<sha> target/compare/p0-relay-<sha2>
#
# Under valgrind SHA-256 runs in software (valgrind hides the CPU's SHA extensions the relay
# uses), and `rep movsb` counts one instruction per byte copied: both weigh more here than in
# time. Needs valgrind (Debian's package).
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: bench/callgrind.sh RELAY_BINARY..."; exit 2; }
# Paths as given, before moving to the repository.
bins=()
for b in "$@"; do bins+=("$(realpath "$b")"); done
cd "$(dirname "$0")/.."
source bench/lib.sh
needs valgrind
cargo build --release --quiet --example p0_sink
out=$TARGET/callgrind
mkdir -p "$out"
n=0
for bin in "${bins[@]}"; do
  n=$((n + 1))
  name=$(basename "$bin")
  # A build from compare.sh (p0-relay-<sha>) runs with that revision's relay.yaml and mappings.
  dir=.
  sha=${bin##*/p0-relay-}
  if [ "$sha" != "$bin" ] && git cat-file -e "$sha^{commit}" 2>/dev/null; then
    dir="$work/cfg-$n"; mkdir -p "$dir"
    git archive "$sha" relay.yaml mappings | tar -x -C "$dir"
  fi
  rm -f "$out/callgrind.out.$name"
  start_sink
  # (RELAY_WRAP is split into words: a target directory with spaces would break it.)
  RELAY_DIR=$dir WAIT_SECONDS=60 RELAY_WRAP="valgrind --tool=callgrind --instr-atstart=no \
    --callgrind-out-file=$out/callgrind.out.$name" start_relay "$bin" "cg$n"
  callgrind_control -i on "$relay_pid" >/dev/null
  run_wrk "http://$RELAY" /webhooks/github "${CG_SECONDS:-30}" 8 8 >/dev/null
  sleep 3 # the last decisions reach the stand-in P0
  accepted=$(curl -s "http://$RELAY/metrics" | awk '/^p0_relay_webhooks_total\{outcome="accepted",source="github"\}/ {print $2}')
  stop_both
  total=$(awk '/^summary:/ {print $2}' "$out/callgrind.out.$name")
  echo "$name: $(awk -v t="$total" -v n="$accepted" 'BEGIN {printf "%.0f", (n > 0 ? t / n : 0)}') instructions per webhook ($accepted accepted); $out/callgrind.out.$name"
done

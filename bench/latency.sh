#!/usr/bin/env bash
# Answer latency at the latency run's fixed, moderate rate (10 connections, each pausing 1/110 s
# between requests: about 1,000 webhooks/s), for one or more relay binaries, one after the
# other, each with a fresh store: p50 and p99 as wrk measures them, the relay's CPU per
# webhook per thread, and, from the relay's own log, its p99 receipt-to-answer time and the
# moments when answers took longer than 3 ms (grouped per 100 ms since the first).
#
#   bench/latency.sh target/compare/p0-relay-<sha> target/compare/p0-relay-<sha2> ...
#   RATE=55 LAT=30 bench/latency.sh $CARGO_TARGET_DIR/compare/p0-relay-<sha>   # half the rate, 30 s
#
# Name the same binaries several times, alternating (A B A B): the p99 varies from run to run.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh

LAT=${LAT:-20}
RATE=${RATE:-110}
[ $# -ge 1 ] || { echo "usage: bench/latency.sh RELAY_BINARY..."; exit 2; }
cargo build --release --quiet --example p0_sink
n=0
for bin in "$@"; do
  n=$((n + 1))
  # Paths given relative to where the script was started (it runs from the repository).
  bin=$(cd "$OLDPWD" && realpath "$bin")
  # A build from compare.sh (p0-relay-<sha>) runs with that revision's relay.yaml and
  # mappings; any other with this tree's.
  dir=.
  sha=${bin##*/p0-relay-}
  if [ "$sha" != "$bin" ] && git cat-file -e "$sha^{commit}" 2>/dev/null; then
    dir="$work/cfg-$n"; mkdir -p "$dir"
    git archive "$sha" relay.yaml mappings | tar -x -C "$dir"
  fi
  start_sink; RELAY_DIR=$dir start_relay "$bin" "lat$n"
  c0=$(thread_cpu "$relay_pid")
  r=$(run_wrk "http://$RELAY" /webhooks/github "$LAT" 10 "$RATE")
  c1=$(thread_cpu "$relay_pid")
  stop_both
  acc=$(field s202 "$r")
  echo "$bin: $(per_second "$acc" "$(field seconds "$r")")/s; wrk p50 $(field p50_ms "$r") ms, p99 $(field p99_ms "$r") ms; relay CPU us per webhook: $(cpu_per "$c0" "$c1" "$acc")"
  # The relay's own view, from its log line per webhook (UTC time of day, duration_us).
  sed -nE 's/^[0-9-]+T([0-9]+):([0-9]+):([0-9.]+)Z.* webhook .*duration_us=([0-9]+).*/\1 \2 \3 \4/p' \
    "$work/relay-lat$n.log" >"$work/durations"
  [ -s "$work/durations" ] || { echo "  no webhook lines in the relay's log (is RUST_LOG or log_json set?)"; continue; }
  # Nearest rank: the smallest duration at or above 99% of them.
  p99=$(cut -d' ' -f4 "$work/durations" | sort -n | awk '{d[NR] = $1} END {i = int(NR * 0.99); if (i < NR * 0.99) i++; if (i < 1) i = 1; printf "%.2f", d[i] / 1000}')
  slow=$(awk '$4 > 3000 {t = $1 * 3600 + $2 * 60 + $3; if (!s) s = t; b = sprintf("%.1f", int((t - s) * 10) / 10)
      if (!(b in n)) order[++k] = b; n[b]++; if ($4 > m[b]) m[b] = $4}
      END {for (i = 1; i <= k; i++) printf " %s: %d, %.1f;", order[i], n[order[i]], m[order[i]] / 1000}' "$work/durations")
  echo "  relay-side p99 $p99 ms over $(wc -l <"$work/durations") webhooks; over 3 ms, per 100 ms (s since the first: count, max ms):$slow"
done

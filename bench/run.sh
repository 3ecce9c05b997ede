#!/usr/bin/env bash
# End-to-end load benchmark, one command, one run: the ceiling (bare axum answering 202), the
# floor (the same server checking each body's signature and JSON, storing nothing), the
# relay (release build, store on disk, pacing and inbound limits off, forwarding to a
# stand-in P0 that answers 200 at once) and the peer (adnanh/webhook running curl), all driven
# by wrk with real-size GitHub issue_comment deliveries (bench/payloads/), each with unique
# IDs, signed per request; a second storm with the trimmed 1.1 KB test payload.
#
#   bench/run.sh                       # full run (about 5 minutes)
#   STORM_SECONDS=20 bench/run.sh      # shorter storm
#   RELAY_BIN=path/to/p0-relay bench/run.sh   # another build of the relay (e.g. from compare.sh)
#
# Needs wrk, webhook and curl (Debian: apt-get install wrk webhook curl).
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh

STORM=${STORM_SECONDS:-60}
PEER=${PEER_SECONDS:-30}
CEIL=${CEILING_SECONDS:-15}
LAT=${LATENCY_SECONDS:-20}

TRIMMED=$(dated_now "$PWD/mappings/testdata/github/issue_comment_created.json")
TRIM=${TRIMMED_SECONDS:-20}

needs webhook
cargo build --release --quiet --bin p0-relay --example p0_sink --example ceiling
RELAY_BIN=${RELAY_BIN:-$TARGET/release/p0-relay}
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB; $(uname -sr); $(git rev-parse --short HEAD); relay $RELAY_BIN"
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "payload: $(basename "$BENCH_PAYLOAD") ($(wc -c <"$BENCH_PAYLOAD") bytes); trimmed: $(wc -c <"$TRIMMED") bytes"

# 1. The ceiling: at full rate, then at the latency run's pacing (10 connections, each pausing
#    1/110 s between requests, which with the answer time comes to about 1,000 webhooks/s).
"$TARGET/release/examples/ceiling" 127.0.0.1:18090 & ceiling_pid=$!; pids+=("$ceiling_pid")
wait_port 127.0.0.1:18090
c0=$(thread_cpu "$ceiling_pid")
r=$(run_wrk http://127.0.0.1:18090 /webhooks/github "$CEIL" "$CONN" 0)
ceiling=$(per_second "$(field s202 "$r")" "$(field seconds "$r")")
ceiling_cpu=$(cpu_per "$c0" "$(thread_cpu "$ceiling_pid")" "$(field s202 "$r")")
r=$(run_wrk http://127.0.0.1:18090 /webhooks/github "$LAT" 10 110)
ceil_lat_rate=$(per_second "$(field s202 "$r")" "$(field seconds "$r")")
ceil_p50=$(field p50_ms "$r"); ceil_p99=$(field p99_ms "$r")
kill "$ceiling_pid"; wait "$ceiling_pid" 2>/dev/null || true

# 1b. The floor under any relay: the same server reading each body, checking its signature and
#     that it is JSON, storing nothing. What lies between it and the relay is, roughly, the
#     relay's own work (the relay's HTTP setup differs a little: HTTP/1 only, TCP_NODELAY).
"$TARGET/release/examples/ceiling" 127.0.0.1:18090 floor "$BENCH_SECRET" & floor_pid=$!; pids+=("$floor_pid")
wait_port 127.0.0.1:18090
c0=$(thread_cpu "$floor_pid")
r=$(run_wrk http://127.0.0.1:18090 /webhooks/github "$CEIL" "$CONN" 0)
floor=$(per_second "$(field s202 "$r")" "$(field seconds "$r")")
floor_cpu=$(cpu_per "$c0" "$(thread_cpu "$floor_pid")" "$(field s202 "$r")")
[ "$floor" -gt 0 ] || echo "the floor accepted nothing ($(field other "$r") other answers): its signature check disagrees with wrk's"
kill "$floor_pid"; wait "$floor_pid" 2>/dev/null || true

# 2. The relay in a storm at full rate, then drained.
relay_storm "$RELAY_BIN" storm "$STORM"
storm_cpu=$cpu; storm_drain_cpu=$drain_cpu

# 3. Answer latency at the same fixed, moderate rate.
start_sink; start_relay "$RELAY_BIN" latency
r=$(run_wrk "http://$RELAY" /webhooks/github "$LAT" 10 110)
lat_rate=$(per_second "$(field s202 "$r")" "$(field seconds "$r")")
p50=$(field p50_ms "$r"); p99=$(field p99_ms "$r")
stop_both

# 4. The second row: the trimmed 1.1 KB test payload, same storm, shorter.
storm_real=("$answered_rate" "$calls_rate" "$accepted" "$distinct" "$lost" "$hwm_storm" "$hwm" "$committed" "$dupes" "$non202")
BENCH_PAYLOAD=$TRIMMED BENCH_COMMENT_ID=1710001 relay_storm "$RELAY_BIN" trimmed "$TRIM"
trimmed_rate=$answered_rate; trimmed_calls=$calls_rate; trimmed_lost=$lost; trimmed_hwm=$hwm
read -r answered_rate calls_rate accepted distinct lost hwm_storm hwm committed dupes non202 <<<"${storm_real[*]}"

# 5. The peer: webhook + curl against the same stand-in.
start_sink
(cd bench/peer && P0_BASE_URL=http://$SINK PATH=$PWD:$PATH exec webhook -hooks hooks.json -ip 127.0.0.1 -port 9000 >"$work/webhook.log" 2>&1) &
pids+=($!); sleep 0.5
peer_pid=$(pgrep -n -x webhook)
r=$(run_wrk http://127.0.0.1:9000 /hooks/github "$PEER" "$CONN" 0)
peer_hwm=$(hwm_mib "$peer_pid")
peer_accepted=$(( $(field s200 "$r") + $(field s202 "$r") ))
peer_accept_rate=$(per_second "$peer_accepted" "$(field seconds "$r")")
drain "$peer_accepted"
read -r _ pdistinct pspan < <(curl -s "http://$SINK/count"; echo)
peer_calls_rate=$(per_second "$pdistinct" "$pspan")
peer_lost=$(( peer_accepted > pdistinct ? peer_accepted - pdistinct : 0 ))
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"

cat <<OUT

| measure | ceiling (bare axum) | p0-relay | webhook + curl |
|---|---|---|---|
| webhooks accepted/s (${CONN} connections) | $ceiling | $answered_rate | $peer_accept_rate |
| floor: signature and JSON checked, nothing stored | $floor ($(ratio "$floor" "$ceiling") of the ceiling) | - | - |
| same, trimmed 1.1 KB payload (${TRIM} s) | - | $trimmed_rate (P0 calls/s $trimmed_calls, lost $trimmed_lost, $trimmed_hwm MiB) | - |
| P0 calls completed/s, end to end | - | $calls_rate | $peer_calls_rate |
| acknowledged / reached P0 / lost | - | $accepted / $distinct / $lost | $peer_accepted / $pdistinct / $peer_lost |
| server CPU us per webhook in the storm | ${ceiling_cpu##*total=}; floor ${floor_cpu##*total=} | $storm_cpu | - |
| relay CPU us per P0 call in the drain | - | $storm_drain_cpu | - |
| peak RSS, MiB | - | $hwm_storm (storm, ${STORM} s), $hwm (after drain) | $peer_hwm |
| answer latency p50 / p99 ms (10 connections at 110/s each) | $ceil_p50 / $ceil_p99 at ${ceil_lat_rate}/s | $p50 / $p99 at ${lat_rate}/s | - |

relay accepted / ceiling              = $(ratio "$answered_rate" "$ceiling")   (target >= 0.50; the floor reaches $(ratio "$floor" "$ceiling"))
relay P0 calls/s / peer P0 calls/s    = $(ratio "$calls_rate" "$peer_calls_rate")   (target >= 50)
relay lost                            = $lost   (target 0; committed: $committed; duplicate calls: $dupes; non-202 answers: $non202)
relay p99 at ~1,000/s                 = $p99 ms   (target <= 3; the ceiling's own p99: $ceil_p99 ms)
relay peak RSS                        = $hwm MiB   (target <= 32)
OUT

#!/usr/bin/env bash
# Shared by the scripts in bench/: start the stand-in P0 and the relay, drive them
# with wrk, and read the results. Sourced, not run.

CONN=${CONNECTIONS:-64}
SINK=127.0.0.1:14010
RELAY=127.0.0.1:18080
export BENCH_SECRET=bench-secret
# The real-size octokit example by default; the trimmed test payload is
# BENCH_PAYLOAD=$PWD/mappings/testdata/github/issue_comment_created.json BENCH_COMMENT_ID=1710001.
export BENCH_PAYLOAD=${BENCH_PAYLOAD:-$PWD/bench/payloads/github_issue_comment_created.json}
export BENCH_COMMENT_ID=${BENCH_COMMENT_ID:-492700400}
# Release builds go to CARGO_TARGET_DIR when it is set, as cargo's do.
TARGET=${CARGO_TARGET_DIR:-$PWD/target}

# needs TOOL...: stops with the package to install when a tool is missing (the Debian
# package of each tool here has the tool's name).
needs() {
  for tool in "$@"; do
    command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install $*)"; exit 1; }
  done
}
needs wrk curl
work=$(mktemp -d)
# dated_now FILE: a copy of FILE (in $work) with every timestamp set to now, each the same
# length. Grants are judged on the event's own time (an approve over an hour old is refused),
# and the payloads are old examples.
dated_now() {
  local out
  out="$work/$(basename "$1")"
  sed -E "s/20[0-9]{2}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z/$(date -u +%Y-%m-%dT%H:%M:%SZ)/g" \
    "$1" >"$out"
  echo "$out"
}
BENCH_PAYLOAD=$(dated_now "$BENCH_PAYLOAD")
pids=()
dbs=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true
  for d in "${dbs[@]}"; do psql "$PG_ADMIN" -qc "DROP DATABASE IF EXISTS $d WITH (FORCE)" || true; done
  rm -rf "$work"
}
trap cleanup EXIT

# fresh_db TAG: creates a database on PG_ADMIN's server (dropped at exit) and sets db_url.
fresh_db() {
  local name="relay_bench_${1//[^a-z0-9_]/_}_$$"
  psql "$PG_ADMIN" -qc "CREATE DATABASE $name"
  dbs+=("$name")
  db_url="${PG_ADMIN%/*}/$name?sslmode=disable"
}
# needs_pg: stops unless psql is there and PG_ADMIN answers.
needs_pg() {
  command -v psql >/dev/null || { echo "missing psql (apt-get install postgresql-client)"; exit 1; }
  psql "$PG_ADMIN" -qAtc 'SELECT 1' >/dev/null || { echo "PostgreSQL not reachable at $PG_ADMIN"; exit 1; }
}

# wait_port ADDRESS: waits until something answers at ADDRESS (WAIT_SECONDS, default 5).
wait_port() {
  local tries=$(( ${WAIT_SECONDS:-5} * 20 ))
  for _ in $(seq 1 "$tries"); do curl -s -o /dev/null "http://$1/" && return 0; sleep 0.05; done
  echo "nothing answers at $1 after ${WAIT_SECONDS:-5} s" >&2; return 1
}
field() { sed -n "s/.*$1=\([0-9.]*\).*/\1/p" <<<"$2"; }
hwm_mib() { awk '/VmHWM/ {printf "%.1f", $2/1024}' "/proc/$1/status"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", (b > 0 ? a/b : 0)}'; }
per_second() { awk -v n="$1" -v s="$2" 'BEGIN {printf "%.0f", (s > 0 ? n/s : 0)}'; }

# thread_cpu PID: "name ticks" per thread name (summed over threads of one name), and
# "~process ticks", which also holds threads that have ended. utime and stime are read after
# the last ")" (a thread's name may hold spaces or parentheses).
thread_cpu() {
  {
    for t in /proc/"$1"/task/*; do
      printf '%s %s\n' "$(tr ' ' _ <"$t/comm")" "$(sed 's/.*) //' "$t/stat" | awk '{print $12 + $13}')"
    done 2>/dev/null
    printf '~process %s\n' "$(sed 's/.*) //' /proc/"$1"/stat | awk '{print $12 + $13}')"
  } | awk '{a[$1] += $2} END {for (k in a) print k, a[k]}' | LC_ALL=C sort -k1,1
}
# cpu_per BEFORE AFTER N: CPU microseconds per item from two thread_cpu readings, per thread
# name (those of at least 0.5 us) and for the whole process: "tokio-rt-worker=84
# store-writer=38 total=122". A thread that started between the readings counts from zero.
cpu_per() {
  LC_ALL=C join -a 2 -e 0 -o 0,1.2,2.2 <(echo "$1") <(echo "$2") | awk -v n="$3" -v hz="$(getconf CLK_TCK)" '
    {us = n > 0 ? ($3 - $2) * 1e6 / hz / n : 0}
    $1 == "~process" {t = us; next}
    us >= 0.5 {printf "%s=%.0f ", $1, us}
    END {printf "total=%.0f", t}'
}

# run_wrk URL PATH SECONDS CONNECTIONS RATE_PER_CONNECTION: prints wrk's RESULT line.
run_wrk() {
  BENCH_PATH=$2 BENCH_RATE=$5 wrk -t2 -c"$4" -d"$3"s -s bench/wrk/github.lua "$1" | grep '^RESULT'
}

start_sink() { "$TARGET/release/examples/p0_sink" "$SINK" & sink_pid=$!; pids+=("$sink_pid"); wait_port "$SINK"; }

# drain N: waits until the stand-in P0 has seen N distinct decisions, or 10 s without progress.
drain() {
  local last=-1 same=0 now
  while :; do
    now=$(curl -s "http://$SINK/count" | cut -d' ' -f2)
    [ "$now" -ge "$1" ] && break
    if [ "$now" = "$last" ]; then same=$((same + 1)); [ $same -ge 20 ] && break; else same=0; fi
    last=$now; sleep 0.5
  done
}

# start_relay BINARY TAG: the relay with a fresh store on disk, pacing and limits off.
# BINARY is an absolute path.
# STORE_URL (a postgres:// URL) and LISTEN override the store and the address; RELAY_WRAP,
# a command the relay runs under (valgrind, say).
start_relay() {
  cat >"$work/env" <<ENV
P0_ORG_ID=bench
P0_API_TOKEN=bench-token
P0_BASE_URL=http://$SINK
GITHUB_WEBHOOK_SECRET=bench-secret
PAGERDUTY_WEBHOOK_SECRET=unused
OPSGENIE_WEBHOOK_TOKEN=unused
GITHUB_APPROVERS=octocat
P0_RELAY_LISTEN=${LISTEN:-$RELAY}
P0_RELAY_DB=${STORE_URL:-$work/relay-$2.db}
P0_RELAY_INBOUND_LIMIT=0
P0_RELAY_P0_RATE=0
ENV
  # From RELAY_DIR when set (a revision's own relay.yaml and mappings), else from here.
  (cd "${RELAY_DIR:-.}" && exec ${RELAY_WRAP:-} "$1" serve --env-file "$work/env") 2>"$work/relay-$2.log" & relay_pid=$!
  pids+=("$relay_pid"); wait_port "${LISTEN:-$RELAY}"
}

stop_both() { kill "$relay_pid" "$sink_pid" 2>/dev/null || true; wait "$relay_pid" "$sink_pid" 2>/dev/null || true; }

# relay_storm BINARY TAG SECONDS: a storm at full rate, then a drain. Sets answered_rate,
# accepted, committed, distinct, dupes, calls_rate, lost, hwm_storm, hwm, non202; cpu, the
# relay's CPU per accepted webhook during the storm (P0 calls made meanwhile included), and
# drain_cpu, its CPU per P0 call made after the storm.
relay_storm() {
  start_sink; start_relay "$1" "$2"
  local r secs t0 t1 calls span cpu0 cpu1 early
  cpu0=$(thread_cpu "$relay_pid")
  t0=$(date +%s.%N)
  r=$(run_wrk "http://$RELAY" /webhooks/github "$3" "$CONN" 0)
  cpu1=$(thread_cpu "$relay_pid")
  early=$(curl -s "http://$SINK/count" | cut -d' ' -f2)
  hwm_storm=$(hwm_mib "$relay_pid")
  secs=$(field seconds "$r")
  non202=$(( $(field s200 "$r") + $(field other "$r") ))
  accepted=$(field s202 "$r")
  answered_rate=$(per_second "$accepted" "$secs")
  # The relay's own count also has the requests still in flight when wrk stopped: committed
  # (and so delivered) though wrk never read their answer.
  sleep 1
  committed=$(curl -s "http://$RELAY/metrics" | awk '/^p0_relay_webhooks_total\{outcome="accepted",source="github"\}/ {print $2}')
  drain "$committed"
  t1=$(date +%s.%N)
  cpu=$(cpu_per "$cpu0" "$cpu1" "$accepted")
  read -r calls distinct span < <(curl -s "http://$SINK/count"; echo)
  drain_cpu=$(cpu_per "$cpu1" "$(thread_cpu "$relay_pid")" $((distinct - early)))
  hwm=$(hwm_mib "$relay_pid")
  calls_rate=$(awk -v n="$distinct" -v a="$t0" -v b="$t1" 'BEGIN {printf "%.0f", n/(b-a)}')
  # Lost: acknowledged with 202 but never delivered.
  lost=$(( accepted > distinct ? accepted - distinct : 0 ))
  dupes=$((calls - distinct))
  stop_both
}

#!/usr/bin/env bash
# Benchmark of the cxmpute gateway against its baseline, in one run, on
# 127.0.0.1 only. See docs/benchmarks.md for what each figure means.
#
#   bench/run.sh                 # builds (release), then measures (about 4.5 minutes on 2 cores)
#   BENCH_BUILD=0 bench/run.sh   # measure with binaries already built
#
# Binaries come from ${CARGO_TARGET_DIR:-target}/release/. The script builds
# them itself first: cargo build --release -p cxmpute-gateway
# -p cxmpute-provider -p cxmpute-bench (BENCH_NICE=19 builds at low priority).
#
# Phases, each on a fresh gateway with a fresh SQLite file:
#   upstream  loadgen -> fake-upstream (the baseline, no gateway)
#   bare      loadgen -> hop -> hop -> fake-upstream (two bare forwarding
#             proxies in the gateway's and the node's places: the floor)
#   link      loadgen -> gateway -> linked node (reversed HTTP/2) -> fake-upstream
#   direct    loadgen -> gateway -> direct-mode node (HTTP URL) -> fake-upstream
# Results: a table on stdout and bench/results/latest.json (BENCH_OUT=path to
# write elsewhere). Needs bash, curl, jq, python3, awk, ss (optional).
#
# Knobs (environment): BENCH_SCALE (multiplies request counts, default 1),
# BENCH_DURATION (seconds of each throughput run, default 5),
# BENCH_NODE_MAX_CONCURRENCY (default 1024, so 1,000 streams all run at once),
# BENCH_STREAMS (open streams for the memory figure, default 1000),
# BENCH_KEEP_TMP=1 (keep logs and raw results in the temp folder).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-target}
case "$TARGET_DIR" in /*) ;; *) TARGET_DIR=$ROOT/$TARGET_DIR ;; esac
BIN=$TARGET_DIR/release
OUT=${BENCH_OUT:-$ROOT/bench/results/latest.json}
SCALE=${BENCH_SCALE:-1}
DURATION=${BENCH_DURATION:-5}
NODE_MAX_CONCURRENCY=${BENCH_NODE_MAX_CONCURRENCY:-1024}
STREAMS=${BENCH_STREAMS:-1000}
ADMIN_TOKEN=bench-admin-token-$RANDOM$RANDOM$RANDOM
# Deposit: close to i64::MAX, with room for the provider's rewards.
DEPOSIT=9000000000000000000

for tool in curl jq python3 awk; do
    command -v "$tool" >/dev/null || { echo "run.sh: needs $tool" >&2; exit 1; }
done

# 1,000 streams need ~4,000 descriptors across the processes; children inherit this.
want_fds=65536
hard_fds=$(ulimit -Hn)
if [[ $hard_fds != unlimited ]] && ((hard_fds < want_fds)); then want_fds=$hard_fds; fi
ulimit -n "$want_fds" || echo "run.sh: could not raise the open-file limit (now $(ulimit -n))" >&2

if [[ ${BENCH_BUILD:-1} != 0 ]]; then
    echo "== building (release) into $TARGET_DIR" >&2
    (cd "$ROOT" && CARGO_TARGET_DIR=$TARGET_DIR nice -n "${BENCH_NICE:-0}" \
        cargo build --release -p cxmpute-gateway -p cxmpute-provider -p cxmpute-bench) >&2
fi
for b in cxmpute-gateway cxmpute-provider loadgen fake-upstream hop; do
    [[ -x $BIN/$b ]] || { echo "run.sh: $BIN/$b missing; build first" >&2; exit 1; }
done

TMP=$(mktemp -d "${TMPDIR:-/tmp}/cxmpute-bench.XXXXXX")
VALS=$TMP/values.txt   # "name value" lines, read by summarize.py
RUNS=$TMP/runs         # one loadgen JSON per run
mkdir -p "$RUNS"
: >"$VALS"
PIDS=()

# --- process handling --------------------------------------------------------

alive() { # pid: running (not gone, not a zombie)
    [[ -r /proc/$1/stat ]] || return 1
    local state
    state=$(awk '{ sub(/^.*\) /, ""); print $1 }' "/proc/$1/stat" 2>/dev/null) || return 1
    [[ -n $state && $state != Z ]]
}

stop_pid() { # pid: TERM, up to 5 s, then KILL; reaps it
    local pid=$1 i
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do alive "$pid" || break; sleep 0.1; done
    alive "$pid" && kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    local kept=() p
    for p in ${PIDS[@]+"${PIDS[@]}"}; do [[ $p == "$pid" ]] || kept+=("$p"); done
    PIDS=(${kept[@]+"${kept[@]}"})
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    # Newest first: loadgen, then nodes (they drain through their gateway), then gateways.
    local i
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do stop_pid "${PIDS[i]}"; done
    if [[ ${BENCH_KEEP_TMP:-0} == 1 || $rc != 0 ]]; then
        echo "run.sh: logs and raw results kept in $TMP" >&2
    else
        rm -rf "$TMP"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

LAST_PID=
spawn() { # name cmd...: starts cmd in the background, logs to $TMP/name.{out,err}
    local name=$1
    shift
    "$@" >"$TMP/$name.out" 2>"$TMP/$name.err" &
    LAST_PID=$!
    PIDS+=("$LAST_PID")
}

die_with_logs() { # name message
    echo "run.sh: $2" >&2
    tail -n 30 "$TMP/$1.err" >&2 2>/dev/null || true
    exit 1
}

wait_listening() { # name pid: prints the URL from the "listening on http://…" line
    local name=$1 pid=$2 i url
    for ((i = 0; i < 300; i++)); do
        url=$(sed -n 's/^listening on \(http:\/\/[^ ]*\).*/\1/p' "$TMP/$name.out" | head -n 1)
        if [[ -n $url ]]; then echo "$url"; return 0; fi
        alive "$pid" || die_with_logs "$name" "$name exited before listening"
        sleep 0.1
    done
    die_with_logs "$name" "$name did not print its address within 30 s"
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# --- measurement helpers ------------------------------------------------------

val() { echo "$1 $2" >>"$VALS"; }

cpu_ticks() { # pid: utime + stime in clock ticks
    awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"
}

rss_kb() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }

busy_idle() { # whole machine: "busy total" jiffies
    awk '/^cpu / { t = 0; for (i = 2; i <= NF; i++) t += $i; print t - $5 - $6, t }' /proc/stat
}

# `times` must run in this shell (a subshell has no children of its own), so
# it writes a file and this reads it: CPU of this shell's reaped children, ms.
children_cpu_ms() {
    awk 'NR == 2 { split($1, u, /[ms]/); split($2, s, /[ms]/)
        printf "%d", (u[1] * 60 + u[2] + s[1] * 60 + s[2]) * 1000 }' "$TMP/times.txt"
}

# Processes whose CPU time every run records, as "name:pid …"; set per phase.
PROCS=
LOADGEN_TIMEOUT=30
lg() { # label, then loadgen args: runs loadgen, keeps its JSON and CPU figures
    local label=$1
    shift
    local file=$RUNS/$label.json entry before=() i=0 lg0 lg1 m0 m1 b0 t0 b1 t1
    for entry in $PROCS; do before+=("$(cpu_ticks "${entry#*:}")"); done
    times >"$TMP/times.txt"
    lg0=$(children_cpu_ms)
    m0=$(busy_idle)
    if ! "$BIN/loadgen" --json --timeout-secs "$LOADGEN_TIMEOUT" "$@" >"$file" 2>"$RUNS/$label.err"; then
        echo "run.sh: loadgen failed for $label:" >&2
        cat "$RUNS/$label.err" >&2
        echo '{"failed": true}' >"$file"
    fi
    m1=$(busy_idle)
    times >"$TMP/times.txt"
    lg1=$(children_cpu_ms)
    for entry in $PROCS; do
        val "cpu_${label}_${entry%%:*}_ticks" $(($(cpu_ticks "${entry#*:}") - before[i]))
        i=$((i + 1))
    done
    val "cpu_${label}_loadgen_ms" $((lg1 - lg0))
    # The CPU window includes loadgen's warmup requests: note how many.
    local warmup=0 prev=
    for entry in "$@"; do
        if [[ $prev == --warmup ]]; then warmup=$entry; fi
        prev=$entry
    done
    val "cpu_${label}_warmup" "$warmup"
    read -r b0 t0 <<<"$m0"
    read -r b1 t1 <<<"$m1"
    val "cpu_${label}_machine_busy_ticks" $((b1 - b0))
    val "cpu_${label}_machine_total_ticks" $((t1 - t0))
    jq -r --arg l "$label" '"  \($l): \(.requests // 0) req, \(.errors // "?") errors, " +
        "\((.rps // 0) | floor) req/s, p50 \(.latency_us.p50 // "-") us, p99 \(.latency_us.p99 // "-") us" +
        (if .ttfb_us then ", ttfb p50 \(.ttfb_us.p50) us p99 \(.ttfb_us.p99) us" else "" end) +
        (if (.errors // 0) > 0 then "  ERRORS: \(.statuses) \(.first_error // "")" else "" end)' "$file" >&2
}

scaled() { echo $(($1 * SCALE)); } # request count scaled by BENCH_SCALE

BODY=$TMP/chat.json
STREAM_BODY=$TMP/stream.json
SLOW_BODY=$TMP/slow.json
echo '{"model":"fake-chat","max_tokens":4,"messages":[{"role":"user","content":"hello there"}]}' >"$BODY"
echo '{"model":"fake-chat","max_tokens":4,"stream":true,"messages":[{"role":"user","content":"hello there"}]}' >"$STREAM_BODY"
echo '{"model":"fake-chat","max_tokens":200,"stream":true,"messages":[{"role":"user","content":"__slow__ x"}]}' >"$SLOW_BODY"

# Measures one target URL; phase is upstream | bare | link | direct. Extra args
# (headers) are passed to every loadgen run.
measure() {
    local phase=$1 url=$2
    shift 2
    echo "== $phase: latency at concurrency 1" >&2
    lg "${phase}_c1" --url "$url" "$@" --body-file "$BODY" -c 1 --warmup 2000 -n "$(scaled 10000)" --duration-secs 15
    echo "== $phase: throughput" >&2
    lg "${phase}_c16" --url "$url" "$@" --body-file "$BODY" -c 16 --warmup 2000 --duration-secs "$DURATION"
    lg "${phase}_c64" --url "$url" "$@" --body-file "$BODY" -c 64 --warmup 2000 --duration-secs "$DURATION"
    echo "== $phase: streaming time to first byte" >&2
    lg "${phase}_stream_c1" --url "$url" "$@" --body-file "$STREAM_BODY" --stream -c 1 --warmup 100 \
        -n "$(scaled 5000)" --duration-secs 10
    lg "${phase}_stream_c16" --url "$url" "$@" --body-file "$STREAM_BODY" --stream -c 16 --warmup 500 \
        -n "$(scaled 10000)" --duration-secs 10
}

# CPU per request over a fixed-count run at concurrency 64, after a separate
# warmup so that only measured requests count (capped at 30 s; the division
# uses the requests actually sent). Every run records CPU the same way (see
# lg); this one is the figure held against the target.
measure_cpu() {
    local phase=$1 url=$2
    shift 2
    local count
    count=$(scaled 20000)
    echo "== $phase: CPU per request ($count requests at concurrency 64)" >&2
    lg "${phase}_cpu_warmup" --url "$url" "$@" --body-file "$BODY" -c 64 -n 3000
    lg "${phase}_cpu" --url "$url" "$@" --body-file "$BODY" -c 64 -n "$count" --duration-secs 30
}

# Both of the above for one phase, with the processes whose CPU it records.
measure_phase() { # phase url procs [loadgen args...]
    local phase=$1 url=$2
    PROCS=$3
    shift 3
    measure "$phase" "$url" "$@"
    measure_cpu "$phase" "$url" "$@"
}

# --- gateway set-up -----------------------------------------------------------

GW= GW_PID= API_KEY= CREDENTIAL=
admin() { # method path [json]
    local args=(-sS -f -X "$1" -H "Authorization: Bearer $ADMIN_TOKEN" "$GW$2")
    if [[ $# -ge 3 ]]; then args+=(-H 'content-type: application/json' --data "$3"); fi
    curl "${args[@]}"
}

start_gateway() { # name
    local name=$1
    spawn "$name" env CXMPUTE_ADMIN_TOKEN="$ADMIN_TOKEN" CXMPUTE_ALLOW_PRIVATE_DIRECT_URLS=1 CXMPUTE_LOG=warn \
        "$BIN/cxmpute-gateway" --database-url "sqlite://$TMP/$name.db" serve --listen 127.0.0.1:0
    GW_PID=$LAST_PID
    GW=$(wait_listening "$name" "$GW_PID")
    local user provider
    user=$(admin POST /admin/accounts '{"name":"bench-user"}' | jq -r .id)
    admin POST "/admin/accounts/$user/deposit" "{\"amount\":$DEPOSIT}" >/dev/null
    API_KEY=$(admin POST "/admin/accounts/$user/keys" '{"name":"bench"}' | jq -r .key)
    provider=$(admin POST /admin/accounts '{"name":"bench-provider"}' | jq -r .id)
    CREDENTIAL=$(admin POST "/admin/accounts/$provider/devices" '{"name":"bench-node"}' | jq -r .credential)
    [[ -n $API_KEY && $API_KEY != null && -n $CREDENTIAL && $CREDENTIAL != null ]] ||
        die_with_logs "$name" "admin API set-up failed"
    echo "  $name at $GW (pid $GW_PID)" >&2
}

wait_model() { # node-name node-pid: until /v1/models lists fake-chat with 1 provider
    local i
    for ((i = 0; i < 300; i++)); do
        if curl -sS -f "$GW/v1/models" 2>/dev/null |
            jq -e '.data[] | select(.id == "fake-chat" and .providers == 1)' >/dev/null 2>&1; then
            return 0
        fi
        alive "$2" || die_with_logs "$1" "$1 exited"
        sleep 0.1
    done
    die_with_logs "$1" "fake-chat never appeared in $GW/v1/models with 1 provider"
}

# Sanity check: one answer through the gateway is the fake upstream's answer.
check_answer() {
    local got
    got=$(curl -sS -f -H "Authorization: Bearer $API_KEY" -H 'content-type: application/json' \
        --data @"$BODY" "$GW/v1/chat/completions" | jq -r '.choices[0].message.content')
    [[ $got == "hello there hello there " ]] || { echo "run.sh: unexpected answer: $got" >&2; exit 1; }
}

# --- run ----------------------------------------------------------------------

echo "== temp folder $TMP; open-file limit $(ulimit -n)" >&2
# Whatever else runs on the machine skews every figure: measure it first.
read -r b0 t0 <<<"$(busy_idle)"
sleep 2
read -r b1 t1 <<<"$(busy_idle)"
val background_busy_permille $((1000 * (b1 - b0) / (t1 - t0 > 0 ? t1 - t0 : 1)))
val background_loadavg_x100 "$(awk '{ printf "%d", $1 * 100 }' /proc/loadavg)"
echo "  background CPU use before starting: $(((b1 - b0) * 100 / (t1 - t0 > 0 ? t1 - t0 : 1)))%, load average $(cut -d' ' -f1 /proc/loadavg)" >&2
spawn upstream "$BIN/fake-upstream" --port 0
UP_PID=$LAST_PID
UP=$(wait_listening upstream "$UP_PID")
echo "  fake-upstream at $UP (pid $UP_PID)" >&2

measure_phase upstream "$UP/v1/chat/completions" "upstream:$UP_PID"

# Floor phase: two bare HTTP/1.1 forwarding proxies (bench/src/bin/hop.rs)
# where the gateway and the node go: what two hops cost on this machine with
# no authentication, routing, metering or accounting. Their CPU is recorded
# under the names of the processes whose places they take.
spawn hop_node "$BIN/hop" --port 0 --to "${UP#http://}"
HOP_NODE_PID=$LAST_PID
HOP_NODE=$(wait_listening hop_node "$HOP_NODE_PID")
spawn hop_gateway "$BIN/hop" --port 0 --to "${HOP_NODE#http://}"
HOP_GATEWAY_PID=$LAST_PID
HOP_GATEWAY=$(wait_listening hop_gateway "$HOP_GATEWAY_PID")
echo "  two bare hops: $HOP_GATEWAY -> $HOP_NODE -> $UP" >&2
measure_phase bare "$HOP_GATEWAY/v1/chat/completions" "gateway:$HOP_GATEWAY_PID node:$HOP_NODE_PID upstream:$UP_PID"
PROCS="upstream:$UP_PID"
stop_pid "$HOP_GATEWAY_PID"
stop_pid "$HOP_NODE_PID"

# Link phase: gateway + one node linked over the reversed HTTP/2 connection.
start_gateway gw_link
spawn node_link env CXMPUTE_CREDENTIAL="$CREDENTIAL" CXMPUTE_LOG=warn "$BIN/cxmpute-provider" start \
    --gateway "$GW" --upstream "$UP/v1" --no-embeddings --no-chat --no-speech --no-scrape --max-concurrency "$NODE_MAX_CONCURRENCY"
NODE_PID=$LAST_PID
wait_model node_link "$NODE_PID"
check_answer
AUTH="Authorization: Bearer $API_KEY"
measure_phase link "$GW/v1/chat/completions" "gateway:$GW_PID node:$NODE_PID upstream:$UP_PID" -H "$AUTH"

# Gateway memory with $STREAMS slow streams open (50 ms per token, 200 tokens).
echo "== link: gateway memory with $STREAMS open streams" >&2
GW_PORT=${GW##*:}
idle=$(rss_kb "$GW_PID")
val mem_rss_idle_kb "$idle"
"$BIN/loadgen" --json --url "$GW/v1/chat/completions" -H "$AUTH" --body-file "$SLOW_BODY" --stream \
    -c "$STREAMS" -n "$STREAMS" --timeout-secs 60 >"$RUNS/link_streams.json" 2>"$RUNS/link_streams.err" &
LG_PID=$!
PIDS+=("$LG_PID")
peak=0 at3=0 conns=-1 started=$SECONDS
for ((i = 0; i < 180; i++)); do # 0.5 s samples, at most 90 s
    alive "$LG_PID" || break
    r=$(rss_kb "$GW_PID")
    if ((r > peak)); then peak=$r; fi
    if ((i == 6)); then # ~3 s in
        at3=$r
        if command -v ss >/dev/null; then
            conns=$(ss -Htn state established "( sport = :$GW_PORT )" | wc -l)
        fi
    fi
    sleep 0.5
done
if alive "$LG_PID"; then
    echo "run.sh: the $STREAMS streams did not finish within 90 s; stopping loadgen" >&2
    val mem_streams_hung 1
fi
stop_pid "$LG_PID"
val mem_rss_3s_kb "$at3"
val mem_rss_peak_kb "$peak"
val mem_open_conns_3s "$conns"
val mem_streams_wall_s $((SECONDS - started))
val mem_rss_after_kb "$(rss_kb "$GW_PID")"
[[ -s $RUNS/link_streams.json ]] || echo '{"failed": true}' >"$RUNS/link_streams.json"
jq -r '"  streams: \(.requests // 0) req, \(.errors // "?") errors, latency p50 \(.latency_us.p50 // "-") us, ttfb p50 \(.ttfb_us.p50 // "-") us"' \
    "$RUNS/link_streams.json" >&2
echo "  gateway RSS: idle $((idle / 1024)) MiB, at ~3 s $((at3 / 1024)) MiB, peak $((peak / 1024)) MiB, $conns client connections open at ~3 s" >&2

PROCS="upstream:$UP_PID"
stop_pid "$NODE_PID"
stop_pid "$GW_PID"

# Direct phase: a fresh gateway and a node registered by URL (no link).
start_gateway gw_direct
NODE_PORT=$(free_port)
spawn node_direct env CXMPUTE_CREDENTIAL="$CREDENTIAL" CXMPUTE_LOG=warn "$BIN/cxmpute-provider" start \
    --gateway "$GW" --upstream "$UP/v1" --no-embeddings --no-chat --no-speech --no-scrape --max-concurrency "$NODE_MAX_CONCURRENCY" \
    --listen "127.0.0.1:$NODE_PORT" --direct-url "http://127.0.0.1:$NODE_PORT"
NODE_PID=$LAST_PID
wait_model node_direct "$NODE_PID"
check_answer
AUTH="Authorization: Bearer $API_KEY"
measure_phase direct "$GW/v1/chat/completions" "gateway:$GW_PID node:$NODE_PID upstream:$UP_PID" -H "$AUTH"

# --- summary ------------------------------------------------------------------

mkdir -p "$(dirname "$OUT")"
python3 "$ROOT/bench/summarize.py" --runs "$RUNS" --values "$VALS" --clk-tck "$(getconf CLK_TCK)" \
    --scale "$SCALE" --duration "$DURATION" --streams "$STREAMS" \
    --node-max-concurrency "$NODE_MAX_CONCURRENCY" --commit "$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)" \
    --dirty "$(git -C "$ROOT" --no-optional-locks status --porcelain 2>/dev/null | grep -c . || true)" \
    --out "$OUT"

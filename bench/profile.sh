#!/usr/bin/env bash
# Profiles the gateway on the link path with perf: fake-upstream, a gateway on
# SQLite (or the database DB_URL names) and one linked node, loadgen at concurrency C for D seconds, and
# `perf record` on the gateway meanwhile. Prints requests/s, p50 and p99 latency, the
# gateway's CPU per request, and perf's split by thread and by function.
#
#   BENCH_BUILD=0 bench/profile.sh          # binaries from ${CARGO_TARGET_DIR:-target}/release
#   C=1 D=6 PERF=0 bench/profile.sh         # concurrency 1, no perf (cleaner CPU figure)
#   GW_THREADS=1 PERF=0 bench/profile.sh    # the gateway's tokio runtime with one worker thread
#   DIRECT=1 bench/profile.sh               # the node registered by URL (direct mode) instead of linked
#   NODE_THREADS=1 PERF=0 bench/profile.sh  # the same for the node
#   NODE_BIN=target/debug/cxmpute-provider bench/profile.sh   # a node binary from elsewhere
#   GW_BIN=/tmp/gw-a bench/profile.sh       # the same for the gateway (A/B runs of two builds)
#   DB_URL=postgres://postgres@127.0.0.1:5432/bench bench/profile.sh   # the gateway on PostgreSQL
#                                           # (give it an empty database: it migrates it)
#   CALLGRIND=1 N=3000 C=16 bench/profile.sh   # instructions the gateway runs per request, counted by
#                                           # valgrind (steady on a busy machine; no perf)
#   CALLGRIND=node N=3000 C=16 bench/profile.sh  # the same for the node
#   STRACE=1 N=2000 C=1 bench/profile.sh    # system calls the gateway makes per request, by kind
#   STRACE=node N=2000 C=1 bench/profile.sh # the same for the node
#   SCHED=1 C=1 bench/profile.sh            # one request's path, step by step (perf tracepoints over all four
#                                           # processes; bench/timeline.py reads them; needs perf and root or
#                                           # perf_event_paranoid <= -1)
#
# Everything runs on 127.0.0.1 and stops on exit. Needs curl, jq, awk, and perf
# unless PERF=0. The perf data and logs stay in the folder it prints.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
BIN=$TARGET_DIR/release
C=${C:-64}
D=${D:-8}
PERF=${PERF:-1}
NODE_BIN=${NODE_BIN:-$BIN/cxmpute-provider}
GW_BIN=${GW_BIN:-$BIN/cxmpute-gateway}
GW_ENV=()
[[ -n ${GW_THREADS:-} ]] && GW_ENV+=(TOKIO_WORKER_THREADS="$GW_THREADS")
NODE_ENV=()
[[ -n ${NODE_THREADS:-} ]] && NODE_ENV+=(TOKIO_WORKER_THREADS="$NODE_THREADS")
if [[ ${BENCH_BUILD:-1} != 0 ]]; then
    (cd "$ROOT" && cargo build --release -p cxmpute-gateway -p cxmpute-provider -p cxmpute-bench) >&2
fi
for tool in curl jq awk; do command -v "$tool" >/dev/null || { echo "profile.sh: needs $tool" >&2; exit 1; }; done
CALLGRIND=${CALLGRIND:-0}
GW_WRAP=()
NODE_WRAP=()
if [[ $CALLGRIND != 0 ]]; then
    PERF=0
    command -v callgrind_control >/dev/null || { echo "profile.sh: needs valgrind for CALLGRIND=1" >&2; exit 1; }
fi
[[ $PERF == 0 ]] || command -v perf >/dev/null || { echo "profile.sh: needs perf (or PERF=0)" >&2; exit 1; }

TMP=$(mktemp -d "${TMPDIR:-/tmp}/cxmpute-profile.XXXXXX")
TOKEN=profile-admin-token-$RANDOM$RANDOM
GRIND=(valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$TMP/callgrind.out")
case $CALLGRIND in
0) ;;
node) NODE_WRAP=("${GRIND[@]}") ;;
*) GW_WRAP=("${GRIND[@]}") ;;
esac
cleanup() { kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT

url_in() { # file...: the first http://… address printed
    local i u
    for ((i = 0; i < 100; i++)); do
        u=$(grep -ho 'http://[0-9.:]*' "$@" 2>/dev/null | head -1 || true)
        [[ -n $u ]] && { echo "$u"; return; }
        sleep 0.1
    done
    echo "profile.sh: no address in $*" >&2
    exit 1
}

"$BIN/fake-upstream" --port 0 >"$TMP/up.out" 2>"$TMP/up.err" &
UP_PID=$!
UP=$(url_in "$TMP/up.out" "$TMP/up.err")
env "${GW_ENV[@]}" CXMPUTE_ADMIN_TOKEN="$TOKEN" CXMPUTE_ALLOW_PRIVATE_DIRECT_URLS=1 CXMPUTE_LOG=warn "${GW_WRAP[@]}" "$GW_BIN" \
    --database-url "${DB_URL:-sqlite://$TMP/gw.db}" serve --listen 127.0.0.1:0 >"$TMP/gw.out" 2>"$TMP/gw.err" &
GW_PID=$!
GW=$(url_in "$TMP/gw.out" "$TMP/gw.err")
admin() {
    local a=(-sS -f -X "$1" -H "Authorization: Bearer $TOKEN" "$GW$2")
    [[ $# -ge 3 ]] && a+=(-H 'content-type: application/json' --data "$3")
    curl "${a[@]}"
}
user=$(admin POST /admin/accounts '{"name":"profile-user"}' | jq -r .id)
admin POST "/admin/accounts/$user/deposit" '{"amount":9000000000000000000}' >/dev/null
KEY=$(admin POST "/admin/accounts/$user/keys" '{"name":"profile"}' | jq -r .key)
provider=$(admin POST /admin/accounts '{"name":"profile-provider"}' | jq -r .id)
CRED=$(admin POST "/admin/accounts/$provider/devices" '{"name":"profile-node"}' | jq -r .credential)
NODE_ARGS=()
if [[ ${DIRECT:-0} != 0 ]]; then # the node registered by URL instead of linked
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    NODE_ARGS=(--listen "127.0.0.1:$port" --direct-url "http://127.0.0.1:$port")
fi
env "${NODE_ENV[@]}" CXMPUTE_CREDENTIAL="$CRED" CXMPUTE_LOG=warn "${NODE_WRAP[@]}" "$NODE_BIN" start --gateway "$GW" \
    --upstream "$UP/v1" --no-embeddings --no-chat --no-speech --no-scrape --max-concurrency 1024 "${NODE_ARGS[@]}" \
    >"$TMP/node.out" 2>"$TMP/node.err" &
NODE_PID=$!
for ((i = 0; i < 300; i++)); do
    curl -sS "$GW/v1/models" | jq -e '.data[] | select(.id == "fake-chat" and .providers == 1)' >/dev/null 2>&1 && break
    sleep 0.1
done
echo '{"model":"fake-chat","max_tokens":4,"messages":[{"role":"user","content":"hello there"}]}' >"$TMP/body.json"
LG=("$BIN/loadgen" --url "$GW/v1/chat/completions" -H "Authorization: Bearer $KEY" --body-file "$TMP/body.json" -c "$C")
"${LG[@]}" -n 3000 >/dev/null # warm-up

if [[ $CALLGRIND != 0 ]]; then
    N=${N:-3000}
    who=gateway
    GRIND_PID=$GW_PID
    [[ $CALLGRIND != node ]] || { who=node; GRIND_PID=$NODE_PID; }
    callgrind_control -i on "$GRIND_PID" >/dev/null
    "${LG[@]}" -n "$N" --json >"$TMP/loadgen.json"
    callgrind_control -i off "$GRIND_PID" >/dev/null
    callgrind_control -d "$GRIND_PID" >/dev/null
    ok=$(jq '.ok' "$TMP/loadgen.json")
    ir=
    for _ in $(seq 300); do # the dump is written while the gateway runs on
        sleep 0.2
        ir=$(callgrind_annotate "$TMP/callgrind.out.1" 2>/dev/null | awk '/PROGRAM TOTALS/ && !t { gsub(",", "", $1); t = $1 } END { print t }')
        [[ -z $ir ]] || break
    done
    [[ -n $ir ]] || { echo "profile.sh: callgrind wrote no profile" >&2; exit 1; }
    echo "concurrency $C: $N requests ($ok answered 2xx), $who instructions $ir, $((ir / N)) per request"
    echo "per function: callgrind_annotate $TMP/callgrind.out.1"
    exit 0
fi
if [[ ${STRACE:-0} != 0 ]]; then
    command -v strace >/dev/null || { echo "profile.sh: needs strace for STRACE=1" >&2; exit 1; }
    N=${N:-2000}
    who=gateway
    TRACE_PID=$GW_PID
    [[ $STRACE != node ]] || { who=node; TRACE_PID=$NODE_PID; }
    strace -f -c -o "$TMP/strace.txt" -p "$TRACE_PID" 2>/dev/null &
    STRACE_PID=$!
    sleep 1 # strace attaches to every thread
    "${LG[@]}" -n "$N" --json >"$TMP/loadgen.json"
    kill -INT "$STRACE_PID"
    wait "$STRACE_PID" 2>/dev/null || true
    echo "concurrency $C: $N requests ($(jq .ok "$TMP/loadgen.json") answered 2xx); $who system calls per request:"
    # strace -c rows: % time, seconds, usecs/call, calls, [errors,] name
    awk -v n="$N" '$1 ~ /^[0-9.]+$/ && NF >= 5 && $NF != "total" {
        printf "%8.2f  %s\n", $4 / n, $NF; total += $4 }
        END { printf "%8.2f  in all\n", total / n }' "$TMP/strace.txt" | sort -rn
    exit 0
fi
if [[ ${SCHED:-0} != 0 ]]; then
    # A timeline of every system call and context switch of the four processes
    # while requests run; `bench/timeline.py` turns it into the median time of
    # each step of one request's path (which process, which call, when).
    "${LG[@]}" --duration-secs 3 >/dev/null &
    LG_PID=$!
    sleep 1
    perf record -q -e raw_syscalls:sys_enter -e raw_syscalls:sys_exit -e sched:sched_switch \
        -e sched:sched_wakeup -p "$LG_PID,$GW_PID,$NODE_PID,$UP_PID" -o "$TMP/sched.data" \
        -- sleep "${SCHED_SECS:-0.3}" >/dev/null 2>&1
    wait "$LG_PID" || true
    perf script -i "$TMP/sched.data" -F comm,pid,tid,cpu,time,event,trace >"$TMP/sched.txt" 2>/dev/null
    python3 "$ROOT/bench/timeline.py" "$TMP/sched.txt" loadgen="$LG_PID" gateway="$GW_PID" node="$NODE_PID" \
        upstream="$UP_PID"
    echo "raw timeline: $TMP/sched.txt"
    exit 0
fi
ticks() { awk '{ print $14 + $15 }' "/proc/${1:-$GW_PID}/stat"; }
sys_ticks() { awk '{ print $15 }' "/proc/$GW_PID/stat"; }
t0=$(ticks)
s0=$(sys_ticks)
n0=$(ticks "$NODE_PID")
if [[ $PERF != 0 ]]; then
    perf record -F 2000 -g --call-graph dwarf,16384 -p "$GW_PID" -o "$TMP/perf.data" -- sleep "$D" >/dev/null 2>&1 &
    PERF_PID=$!
fi
"${LG[@]}" --json --duration-secs "$D" >"$TMP/loadgen.json"
t1=$(ticks)
s1=$(sys_ticks)
n1=$(ticks "$NODE_PID")
[[ $PERF == 0 ]] || wait "$PERF_PID" || true
n=$(jq .requests "$TMP/loadgen.json")
hz=$(getconf CLK_TCK)
echo "concurrency $C: $n requests, $(jq -r '.rps | floor' "$TMP/loadgen.json") requests/s," \
    "p50 $(jq .latency_us.p50 "$TMP/loadgen.json") us, p99 $(jq .latency_us.p99 "$TMP/loadgen.json") us, gateway CPU $(((t1 - t0) * 1000000 / hz / (n > 0 ? n : 1))) us per request" \
    "($(((s1 - s0) * 1000000 / hz / (n > 0 ? n : 1))) us of it in the kernel)," \
    "node CPU $(((n1 - n0) * 1000000 / hz / (n > 0 ? n : 1))) us per request"
if [[ $PERF != 0 ]]; then
    echo "-- gateway CPU by thread"
    perf report -i "$TMP/perf.data" --no-children --sort comm -g none --stdio 2>/dev/null | grep -v '^#' | grep -v '^$' | head -5
    echo "-- by function"
    perf report -i "$TMP/perf.data" --no-children --sort sym -g none --stdio 2>/dev/null | grep -v '^#' | grep -v '^$' | cut -c1-120 | head -25
fi
echo "logs and perf data: $TMP"

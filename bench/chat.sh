#!/usr/bin/env bash
# Chat tokens per second through the whole gateway path against the engine on
# its own, in one run, on 127.0.0.1 only. See docs/benchmarks.md.
#
#   bench/chat.sh                  # builds, then measures (a few minutes on 2 cores)
#   BENCH_BUILD=0 bench/chat.sh    # with binaries already built
#
# engine:  the chat_bench example drives the built-in llama.cpp engine
#          directly (no HTTP): a warm-up, one stream, then N at once.
# gateway: the same requests (prompts, seed, temperature, max_tokens), streamed
#          by bench/chat_client.py through the gateway (SQLite) and a linked
#          node running the same engine with the same slot count.
# The two take turns for BENCH_ROUNDS rounds (engine first in odd rounds,
# gateway first in even ones), so that a machine whose speed drifts during the
# run moves both alike; each ratio is taken within a round, and the summary is
# the median over the rounds. Prints every round and the medians; writes
# bench/results/chat-latest.json (BENCH_OUT=path to write elsewhere).
#
# Knobs: BENCH_ROUNDS (default 3), BENCH_STREAMS (default 4), BENCH_TOKENS
# (default 128), BENCH_SEED (default 7; pick one where every answer runs to
# BENCH_TOKENS on this build), BENCH_PROFILE (debug or release, default debug:
# llama.cpp itself is always built optimised, so the profile changes only the
# Rust around it).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-target}
case "$TARGET_DIR" in /*) ;; *) TARGET_DIR=$ROOT/$TARGET_DIR ;; esac
PROFILE=${BENCH_PROFILE:-debug}
BIN=$TARGET_DIR/$PROFILE
OUT=${BENCH_OUT:-$ROOT/bench/results/chat-latest.json}
STREAMS=${BENCH_STREAMS:-4}
TOKENS=${BENCH_TOKENS:-128}
SEED=${BENCH_SEED:-7}
ROUNDS=${BENCH_ROUNDS:-3}
[[ $ROUNDS =~ ^[1-9][0-9]?$ ]] || { echo "chat.sh: BENCH_ROUNDS must be a whole number from 1 to 99" >&2; exit 1; }

for tool in python3 jq; do
    command -v "$tool" >/dev/null || { echo "chat.sh: needs $tool" >&2; exit 1; }
done
if [[ ${BENCH_BUILD:-1} != 0 ]]; then
    release=()
    [[ $PROFILE == release ]] && release=(--release)
    echo "== building ($PROFILE) into $TARGET_DIR" >&2
    (cd "$ROOT" && CARGO_TARGET_DIR=$TARGET_DIR cargo build ${release[@]+"${release[@]}"} \
        -p cxmpute-gateway -p cxmpute-provider --bin cxmpute-gateway --bin cxmpute-provider --example chat_bench) >&2
fi
for b in cxmpute-gateway cxmpute-provider examples/chat_bench; do
    [[ -x $BIN/$b ]] || { echo "chat.sh: $BIN/$b missing; build first" >&2; exit 1; }
done
bash "$ROOT/scripts/fetch-model.sh" gemma-3-270m >/dev/null

TMP=$(mktemp -d "${TMPDIR:-/tmp}/cxmpute-chat-bench.XXXXXX")
PIDS=()
cleanup() {
    local rc=$? i
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        kill -TERM "${PIDS[i]}" 2>/dev/null || true
        wait "${PIDS[i]}" 2>/dev/null || true
    done
    if [[ $rc != 0 ]]; then
        echo "chat.sh: logs kept in $TMP" >&2
        tail -n 20 "$TMP"/*.err >&2 2>/dev/null || true
    else
        rm -rf "$TMP"
    fi
    exit "$rc"
}
trap cleanup EXIT

echo "== machine: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)" >&2
echo "== starting a gateway and a linked node" >&2
DB="sqlite://$TMP/bench.db"
GW=("$BIN/cxmpute-gateway" --database-url "$DB")
"${GW[@]}" serve --listen 127.0.0.1:0 >"$TMP/gateway.out" 2>"$TMP/gateway.err" &
PIDS+=($!)
URL=
for _ in $(seq 1 300); do
    URL=$(sed -n 's/^listening on \(http:\/\/[^ ]*\).*/\1/p' "$TMP/gateway.out" | head -n 1)
    [[ -n $URL ]] && break
    sleep 0.1
done
[[ -n $URL ]] || { echo "chat.sh: the gateway did not start" >&2; exit 1; }
ACCOUNT=$("${GW[@]}" admin account create --name chat-bench 2>/dev/null | jq -r .id)
"${GW[@]}" admin account deposit "$ACCOUNT" 1000000000000000 >/dev/null 2>&1
KEY=$("${GW[@]}" admin key create "$ACCOUNT" 2>/dev/null)
CRED=$("${GW[@]}" admin device create "$ACCOUNT" --name chat-bench 2>/dev/null)
[[ -n $ACCOUNT && -n $KEY && -n $CRED ]] || { echo "chat.sh: could not create an account, key and device" >&2; exit 1; }
CXMPUTE_CREDENTIAL=$CRED CXMPUTE_LOG=warn "$BIN/cxmpute-provider" start --headless --gateway "$URL" \
    --no-embeddings --no-speech --chat-slots "$STREAMS" >"$TMP/node.out" 2>"$TMP/node.err" &
PIDS+=($!)
for i in $(seq 1 600); do
    if curl -fsS "$URL/v1/models" -H "authorization: Bearer $KEY" 2>/dev/null | jq -e '.data[] | select(.id == "gemma-3-270m")' >/dev/null; then
        break
    fi
    [[ $i == 600 ]] && { echo "chat.sh: the node did not offer gemma-3-270m within 60 s" >&2; exit 1; }
    sleep 0.1
done

engine_run() {
    echo "== round $1 of $ROUNDS: the engine alone ($STREAMS streams, $TOKENS tokens each)" >&2
    "$BIN/examples/chat_bench" --streams "$STREAMS" --tokens "$TOKENS" --seed "$SEED" --json >"$TMP/engine.out"
    grep -v '^{' "$TMP/engine.out" >&2
    grep '^{' "$TMP/engine.out" >"$TMP/engine-$1.json"
}
gateway_run() {
    echo "== round $1 of $ROUNDS: through the gateway and the linked node" >&2
    python3 "$ROOT/bench/chat_client.py" --url "$URL" --key "$KEY" --streams "$STREAMS" --tokens "$TOKENS" \
        --seed "$SEED" >"$TMP/gateway-$1.json"
}
ROUND_FILES=()
for ((r = 1; r <= ROUNDS; r++)); do
    if ((r % 2 == 1)); then
        engine_run "$r"
        gateway_run "$r"
    else
        gateway_run "$r"
        engine_run "$r"
    fi
    jq -n --slurpfile e "$TMP/engine-$r.json" --slurpfile g "$TMP/gateway-$r.json" \
        '{engine: $e[0], gateway: $g[0]}' >"$TMP/round-$r.json"
    ROUND_FILES+=("$TMP/round-$r.json")
done

mkdir -p "$(dirname "$OUT")"
jq -s --arg date "$(date -u +%Y-%m-%dT%H:%M:%SZ)" --arg cores "$(nproc)" --arg profile "$PROFILE" --arg seed "$SEED" \
    --arg load "$(cut -d' ' -f1-3 /proc/loadavg)" '
    def rate(r): r.tokens / r.secs;
    def median: sort | if length % 2 == 1 then .[length / 2 | floor] else (.[length / 2 - 1] + .[length / 2]) / 2 end;
    [ .[] | . + {
        tokens_per_second: {
          engine_single: rate(.engine.single), gateway_single: rate(.gateway.single),
          engine_batch: rate(.engine.batch), gateway_batch: rate(.gateway.batch)
        }
      } | . + {
        ratios: {
          gateway_vs_engine_single: (.tokens_per_second.gateway_single / .tokens_per_second.engine_single),
          gateway_vs_engine_batch: (.tokens_per_second.gateway_batch / .tokens_per_second.engine_batch),
          gateway_batch_vs_single: (.tokens_per_second.gateway_batch / .tokens_per_second.gateway_single),
          engine_batch_vs_single: (.tokens_per_second.engine_batch / .tokens_per_second.engine_single)
        }
      } ] as $rounds
    | {
      date: $date, cores: ($cores | tonumber), profile: $profile, seed: ($seed | tonumber),
      load_average_after: $load,
      streams: $rounds[0].engine.batch.streams,
      rounds: $rounds,
      tokens_per_second: ($rounds[0].tokens_per_second | with_entries(.key as $k | .value = ([$rounds[].tokens_per_second[$k]] | median))),
      ratios: ($rounds[0].ratios | with_entries(.key as $k | .value = ([$rounds[].ratios[$k]] | median)))
    }' "${ROUND_FILES[@]}" >"$OUT"
jq -r '
  def r1: . * 10 | round / 10;
  def pct: . * 100 | round;
  "round  engine 1 / \(.streams)     gateway 1 / \(.streams)    gateway/engine 1 / \(.streams)   \(.streams) / 1 engine, gateway",
  (.rounds | to_entries[] | .key as $i | .value |
    "\($i + 1)      \(.tokens_per_second.engine_single | r1) / \(.tokens_per_second.engine_batch | r1)    \(.tokens_per_second.gateway_single | r1) / \(.tokens_per_second.gateway_batch | r1)    \(.ratios.gateway_vs_engine_single | pct) % / \(.ratios.gateway_vs_engine_batch | pct) %        \(.ratios.engine_batch_vs_single * 100 | round / 100)x, \(.ratios.gateway_batch_vs_single * 100 | round / 100)x"),
  "median over \(.rounds | length) rounds (each ratio taken within its round):",
  "                      engine    gateway   gateway/engine",
  "1 stream   tokens/s  \(.tokens_per_second.engine_single | r1)      \(.tokens_per_second.gateway_single | r1)      \(.ratios.gateway_vs_engine_single | pct) %",
  "\(.streams) streams  tokens/s  \(.tokens_per_second.engine_batch | r1)      \(.tokens_per_second.gateway_batch | r1)      \(.ratios.gateway_vs_engine_batch | pct) %",
  "batch / single       \(.ratios.engine_batch_vs_single * 100 | round / 100)x     \(.ratios.gateway_batch_vs_single * 100 | round / 100)x",
  "written to '"$OUT"'"' "$OUT"

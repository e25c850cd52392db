#!/usr/bin/env bash
# llama.cpp's own speed on the built-in chat model, as the baseline for the
# chat figures of bench/chat.sh. See docs/benchmarks.md.
#
#   bench/llama-cpp.sh             # builds llama-batched-bench once (about 10 min on 2 cores), then measures
#
# Builds llama.cpp's `llama-batched-bench` tool against the very source that the
# node links (the llama-cpp-sys-2 crate that Cargo.lock names), with the same
# CPU kernels as .cargo/config.toml turns on for the node (AVX2/FMA/F16C,
# OpenMP, no -march=native), then decodes with it: 128 new tokens per
# sequence, for 1, 2 and 4 sequences decoded together, on BENCH_THREADS
# threads (default: all cores, as the node uses), once after an 8-token
# prompt per sequence (decode speed alone) and once after prompts as long as
# those bench/chat.sh sends once the chat format is applied (the same work as
# a whole request there: prompt, then decode).
# Prints llama.cpp's table and summary lines; writes
# bench/results/llama-cpp-latest.json (BENCH_OUT=path to write elsewhere).
#
# Knobs: BENCH_THREADS, BENCH_TOKENS (default 128), BENCH_PROMPT_TOKENS (the
# chat-length prompt; default 18, about what bench/chat.sh's four prompts come to with
# the built-in model, as its output's `prompt_tokens` shows), LLAMA_TOOLS_DIR
# (where the tool is built; default $CARGO_TARGET_DIR/llama-cpp-tools, kept
# between runs).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-target}
case "$TARGET_DIR" in /*) ;; *) TARGET_DIR=$ROOT/$TARGET_DIR ;; esac
TOOLS=${LLAMA_TOOLS_DIR:-$TARGET_DIR/llama-cpp-tools}
OUT=${BENCH_OUT:-$ROOT/bench/results/llama-cpp-latest.json}
THREADS=${BENCH_THREADS:-$(nproc)}
TOKENS=${BENCH_TOKENS:-128}
PROMPT=${BENCH_PROMPT_TOKENS:-18}
SDIST_PACKAGE=llama-cpp-python
SDIST_VERSION=0.3.36
SDIST_SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e

for tool in cmake c++ jq python3; do
    command -v "$tool" >/dev/null || { echo "llama-cpp.sh: needs $tool" >&2; exit 1; }
done

manifest=$(cd "$ROOT" && cargo metadata --format-version 1 --locked 2>/dev/null \
    | jq -r '.packages[] | select(.name == "llama-cpp-sys-2") | .manifest_path' | head -n 1)
[[ -n $manifest ]] || { echo "llama-cpp.sh: llama-cpp-sys-2 not found by cargo metadata" >&2; exit 1; }
SRC=$(dirname "$manifest")/llama.cpp
version=$(basename "$(dirname "$manifest")")

BUILD=$TOOLS/$version
TOOL=$BUILD/out/bin/llama-batched-bench
if [[ ! -x $TOOL ]]; then
    # The crate ships llama.cpp's library sources but not its tools. The tool's
    # two files come from the llama.cpp that the llama-cpp-python sdist on the
    # Python package index vendors (pinned, sha256 checked); they are built
    # against the crate's llama.cpp, so the library measured is the node's.
    mkdir -p "$BUILD/tool"
    if [[ ! -f $BUILD/tool/batched-bench.cpp ]]; then
        echo "== fetching llama-batched-bench's source ($SDIST_PACKAGE $SDIST_VERSION, Python package index)" >&2
        python3 - "$SDIST_PACKAGE" "$SDIST_VERSION" "$SDIST_SHA256" "$BUILD/tool" <<'PY'
import hashlib, io, json, sys, tarfile, urllib.parse, urllib.request
package, version, sha256, dest = sys.argv[1:]
index = f"https://pypi.org/simple/{package}/"
listing = urllib.request.Request(index, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
files = json.load(urllib.request.urlopen(listing, timeout=60))["files"]
sdist = next(f for f in files if f["filename"] == f"{package.replace('-', '_')}-{version}.tar.gz")
data = urllib.request.urlopen(urllib.parse.urljoin(index, sdist["url"]), timeout=600).read()
if hashlib.sha256(data).hexdigest() != sha256:
    sys.exit(f"sha256 of {sdist['filename']} is not the pinned {sha256}")
with tarfile.open(fileobj=io.BytesIO(data)) as tar:
    for name in ("batched-bench.cpp", "main.cpp"):
        member = next(m for m in tar.getmembers() if m.name.endswith(f"vendor/llama.cpp/tools/batched-bench/{name}"))
        open(f"{dest}/{name}", "wb").write(tar.extractfile(member).read())
PY
    fi
    cat >"$BUILD/tool/CMakeLists.txt" <<CMAKE
cmake_minimum_required(VERSION 3.14)
project(cxmpute-llama-tools C CXX)
set(LLAMA_BUILD_COMMON ON CACHE BOOL "" FORCE)
add_subdirectory("$SRC" llama.cpp)
add_executable(llama-batched-bench main.cpp batched-bench.cpp)
target_link_libraries(llama-batched-bench PRIVATE llama-common llama \${CMAKE_THREAD_LIBS_INIT})
target_compile_features(llama-batched-bench PRIVATE cxx_std_17)
set_target_properties(llama-batched-bench PROPERTIES RUNTIME_OUTPUT_DIRECTORY "$BUILD/out/bin")
CMAKE
    echo "== building llama-batched-bench against $version into $BUILD (about 10 minutes on 2 cores)" >&2
    cmake -S "$BUILD/tool" -B "$BUILD/cmake" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
        -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
        -DGGML_BMI2=ON -DGGML_SSE42=ON -DGGML_OPENMP=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF >&2
    cmake --build "$BUILD/cmake" --target llama-batched-bench -j "$(nproc)" >&2
fi

models=$(bash "$ROOT/scripts/fetch-model.sh" gemma-3-270m | tail -n 1)
GGUF=$(find "$models" -maxdepth 2 -name '*.gguf' | head -n 1)
[[ -f ${GGUF:-} ]] || { echo "llama-cpp.sh: no .gguf under $models" >&2; exit 1; }

echo "== machine: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)" >&2
echo "== llama-batched-bench: $THREADS threads, prompts of 8 and $PROMPT tokens, $TOKENS new tokens per sequence" >&2
# -c: room for 4 sequences of PROMPT + TOKENS tokens each. Flash attention is
# left to llama.cpp to decide (auto), as the node leaves it (its context
# parameters keep llama.cpp's default).
raw=$("$TOOL" -m "$GGUF" -t "$THREADS" -tb "$THREADS" -c 4096 -b 512 -ub 512 \
    -npp "8,$PROMPT" -ntg "$TOKENS" -npl 1,2,4 -fa auto --output-format jsonl 2>"$BUILD/last-run.err") \
    || { tail -n 20 "$BUILD/last-run.err" >&2; exit 1; }
grep -v '^{' <<<"$raw" >&2 || true
mkdir -p "$(dirname "$OUT")"
grep '^{' <<<"$raw" >"$BUILD/last-run.jsonl"
python3 - "$version" "$THREADS" "$TOKENS" "$PROMPT" "$BUILD/last-run.jsonl" "$OUT" <<'PY'
import json, sys
version, threads, tokens, prompt, rows_file, out = sys.argv[1:]
rows = [json.loads(line) for line in open(rows_file)]
for r in rows:
    # Generated tokens over the whole time, prompt included: what bench/chat.sh
    # counts for a request.
    r["speed_whole"] = r["pl"] * r["tg"] / r["t"]
decode = {r["pl"]: r for r in rows if r["pp"] == 8}
whole = {r["pl"]: r for r in rows if r["pp"] == int(prompt)}
for r in rows:
    print(f"{r['pl']} sequence(s), {r['pp']}-token prompts: {r['speed_tg']:.1f} generated tokens/s decoding, "
          f"{r['speed_whole']:.1f} over the whole run (prompts {r['t_pp'] * 1000:.0f} ms)")
summary = {"source": version, "threads": int(threads), "tokens": int(tokens), "prompt_tokens": int(prompt), "runs": rows}
if 1 in decode and 4 in decode:
    summary["four_over_one"] = decode[4]["speed_tg"] / decode[1]["speed_tg"]
    print(f"decoding alone (8-token prompts), 4 sequences / 1 sequence: {summary['four_over_one']:.2f}x")
if 1 in whole and 4 in whole:
    summary["whole_single"] = whole[1]["speed_whole"]
    summary["whole_four"] = whole[4]["speed_whole"]
    summary["whole_four_over_one"] = whole[4]["speed_whole"] / whole[1]["speed_whole"]
    print(f"whole runs ({prompt}-token prompts): 1 sequence {summary['whole_single']:.1f}, "
          f"4 sequences {summary['whole_four']:.1f} tokens/s, {summary['whole_four_over_one']:.2f}x")
with open(out, "w") as f:
    json.dump(summary, f, indent=1)
PY
echo "== written $OUT" >&2

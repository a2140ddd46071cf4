#!/usr/bin/env bash
# The embeddings of every kernel this CPU can run, for byte-for-byte comparisons of two builds
# (a refactoring must not move a bit of int8 or bf16 output).
#
#   bash bench/kernel-outputs.sh write BIN DIR [SETS]   # DIR/<model>-<set>-<kernel>.npy
#   bash bench/kernel-outputs.sh compare DIR_A DIR_B    # cmp of each file; f32 max |diff|
#
# SETS: comma-separated sets of sentences: golden (the 20 of tests/minilm-golden.json),
# 2k (bench/data/sentences-2k.txt, bench/make-sentences.py) [golden,2k]. MODELS (env):
# folders under models/ [all-MiniLM-L6-v2 all-mpnet-base-v2]. Each kernel is forced with
# FETCH_ML_KERNEL; one the CPU lacks is listed as skipped (fetch-ml refuses it). int8:
# amx avx512vnni avxvnni avx2 portable; bf16: amxbf16 avx512bf16 avx2bf16 portable; f32:
# gemm (one kernel). The portable kernels run the 2k set only for the models in PORTABLE_2K
# [all-MiniLM-L6-v2]: MPNet's 2,000 sentences on the scalar int8 kernel ran over four minutes
# on 2 vCPUs without finishing (its golden sentences still run on them). `compare` fails
# (exit 1) when an int8 or bf16 file differs, or a file of A is missing from B; f32 files
# that differ are reported with their largest difference.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
MODELS=${MODELS:-"all-MiniLM-L6-v2 all-mpnet-base-v2"}
PORTABLE_2K=${PORTABLE_2K:-all-MiniLM-L6-v2}
INT8="amx avx512vnni avxvnni avx2 portable"
BF16="amxbf16 avx512bf16 avx2bf16 portable"

write() {
  local bin=$1 dir=$2 sets=${3:-golden,2k}
  mkdir -p "$dir"
  local golden="$dir/golden.txt"
  python3 - "$repo/tests/minilm-golden.json" > "$golden" <<'EOF'
import json, sys
for item in json.load(open(sys.argv[1]))["items"]:
    # One sentence per line; the blank and whitespace-only ones are skipped by --input.
    print(item["text"].replace("\n", " "))
EOF
  for model in $MODELS; do
    for set in ${sets//,/ }; do
      local file
      case $set in
        golden) file=$golden ;;
        2k) file="$here/data/sentences-2k.txt" ;;
        *) echo "unknown set $set" >&2; exit 2 ;;
      esac
      for spec in f32:gemm $(printf 'int8:%s ' $INT8) $(printf 'bf16:%s ' $BF16); do
        local dtype=${spec%%:*} kernel=${spec#*:}
        local out="$dir/$model-$set-$dtype-$kernel.npy"
        if [ "$kernel" = portable ] && [ "$set" = 2k ] \
            && [[ " $PORTABLE_2K " != *" $model "* ]]; then
          echo "$model $set $dtype $kernel: not run (PORTABLE_2K)"
          rm -f "$out" "$out.log" "$out.meta.jsonl"
          continue
        fi
        local env=()
        [ "$dtype" != f32 ] && env=(FETCH_ML_KERNEL="$kernel")
        if env "${env[@]}" "$bin" --task=1 --model "$repo/models/$model" --input "$file" \
            --dtype "$dtype" --format npy -o "$out" --overwrite 2> "$out.log"; then
          echo "$model $set $dtype $kernel: $(sed -n "s/.*dense layers on the \(\S*\) kernel.*/\1/p" "$out.log")"
        else
          echo "$model $set $dtype $kernel: skipped ($(tail -1 "$out.log"))"
          rm -f "$out"
        fi
      done
    done
  done
}

compare() {
  local a=$1 b=$2 bad=0
  for fa in "$a"/*.npy; do
    local name fb
    name=$(basename "$fa")
    fb="$b/$name"
    if [ ! -f "$fb" ]; then
      echo "MISSING $name"; bad=1; continue
    fi
    if cmp -s "$fa" "$fb" && cmp -s "$fa.meta.jsonl" "$fb.meta.jsonl"; then
      echo "identical $name"
    elif [[ $name == *-f32-* ]]; then
      python3 - "$fa" "$fb" <<'EOF'
import struct, sys
def load(p):
    data = open(p, "rb").read()
    hlen = struct.unpack("<H", data[8:10])[0]
    body = data[10 + hlen:]
    return struct.unpack(f"<{len(body) // 4}f", body)
a, b = load(sys.argv[1]), load(sys.argv[2])
assert len(a) == len(b), "lengths differ"
d = max(abs(x - y) for x, y in zip(a, b))
n = sum(x != y for x, y in zip(a, b))
print(f"f32 differs {sys.argv[1].rsplit('/', 1)[1]}: {n} of {len(a)} values, max |diff| {d:.3g}")
EOF
    else
      echo "DIFFERS $name"; bad=1
    fi
  done
  return $bad
}

case ${1:-} in
  write) shift; write "$@" ;;
  compare) shift; compare "$@" ;;
  *) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 2 ;;
esac

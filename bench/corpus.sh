#!/usr/bin/env bash
# Corpus-scale figures for BENCHMARKS.md ("Corpus scale"): three local shards run at once
# against one run on the same cores, and Parquet / .npy against JSONL on the same run.
#
#   cargo build --release && bash bench/corpus.sh [SENTENCES_FILE] [LINES] [REPS]
#
# Defaults: bench/data/sentences-100k.txt (bench/make-sentences.py), all 100,000 lines, 2
# repetitions. Each repetition runs, one after the other: one run with --threads 2 writing
# JSONL; three shards at once (--shard I/3, --threads 1 each, so 3 threads on the 2 cores);
# one run writing Parquet; one writing .npy. All processes are pinned to cores 0-1 with
# taskset. Wall times and peak RSS come from /usr/bin/time (%e, %M); the shards' wall time
# is from the first start to the last exit.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
BIN=${BIN:-$repo/target/release/fetch-ml}
MODEL=${MODEL:-$repo/models/all-MiniLM-L6-v2}
src=${1:-$here/data/sentences-100k.txt}
lines=${2:-100000}
reps=${3:-2}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
head -n "$lines" "$src" > "$work/in.txt"
n=$(grep -c . "$work/in.txt")
echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; load average: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "input: $n sentences ($(wc -c < "$work/in.txt") bytes) from $src"

run() { # name, extra args...: one process; prints wall seconds and peak RSS MB
  local name=$1; shift
  /usr/bin/time -f "%e %M" -o "$work/time-$name" taskset -c 0,1 \
    "$BIN" --task=1 --model "$MODEL" --input "$work/in.txt" "$@" 2> "$work/err-$name"
  read -r secs kb < "$work/time-$name"
  echo "$secs $((kb / 1024))"
}

for r in $(seq 1 "$reps"); do
  echo "== repetition $r (load average $(cut -d' ' -f1 /proc/loadavg))"
  read -r s m <<< "$(run one-jsonl --threads 2 --format jsonl -o "$work/one.jsonl")"
  echo "one run, --threads 2, jsonl:   $s s, peak RSS $m MB, $(wc -c < "$work/one.jsonl") bytes"
  start=$(date +%s.%N)
  for i in 0 1 2; do
    run "shard$i" --threads 1 --shard "$i/3" --overwrite --format jsonl -o "$work/shard.jsonl" > "$work/res$i" &
  done
  wait
  end=$(date +%s.%N)
  echo "three shards at once, --threads 1 each: $(echo "$end - $start" | bc -l | xargs printf '%.2f') s wall"
  for i in 0 1 2; do
    read -r s m < "$work/res$i"
    echo "  shard $i/3: $s s, peak RSS $m MB, $(grep -o '[0-9]* sentence(s)' "$work/err-shard$i")"
  done
  cat "$work"/shard-0000?-of-00003.jsonl | sort > "$work/union"; sort "$work/one.jsonl" > "$work/whole"
  cmp -s "$work/union" "$work/whole" && echo "  union of the shards == the one run's JSONL, byte for byte" \
    || echo "  UNION DIFFERS from the one run"
  read -r s m <<< "$(run one-parquet --threads 2 --format parquet -o "$work/one.parquet")"
  echo "one run, --threads 2, parquet: $s s, peak RSS $m MB, $(wc -c < "$work/one.parquet") bytes"
  read -r s m <<< "$(run one-npy --threads 2 --format npy -o "$work/one.npy")"
  echo "one run, --threads 2, npy:     $s s, peak RSS $m MB, $(wc -c < "$work/one.npy") + $(wc -c < "$work/one.npy.meta.jsonl") bytes (matrix + sidecar)"
done

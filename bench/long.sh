#!/usr/bin/env bash
# Long-context encoders: fetch-ml against PyTorch float32 on random models laid out exactly as
# modernbert-embed-base (22 layers, 768 wide, 8,192 positions) and nomic-embed-text-v1.5
# (12 layers, 768 wide, 8,192 positions), side by side in one run. Run by hand on an idle
# machine (any other work makes the figures meaningless):
#
#   bash bench/long.sh [--small] [--parts one,sentences,curve] [--models modernbert,nomic]
#                      [--dtypes f32,bf16,int8] [--threads N] [--repeat N] [--tokens N]
#                      [--lengths 512,1024,2048,4096,8192] [--limit N] [--dir DIR]
#
#   --small    a smoke test of the whole script (a few minutes): the same widths and
#              vocabularies with 2 layers (bench/data/long-small), one input of 1,024 tokens,
#              200 sentences, lengths 256,512,1024
#   --parts    one: one input of --tokens tokens [8192]: time and peak RSS per dtype, against
#                   the weights file and PyTorch; the vectors compared by cosine
#              sentences: the 2,000 sentences of bench/data/sentences-2k.txt (--limit N for
#                   fewer), sentences per second per dtype against PyTorch
#              curve: one input at each of --lengths: ms per 1,000 tokens per dtype against
#                   PyTorch, the GFLOP of the dense layers and of the attention, GFLOP/s, and
#                   the attention kernel alone
#   --models   modernbert (transformers' ModernBertModel, its default attention) and/or
#              nomic (bench/long_torch.py's PyTorch port of NomicBertModel: transformers
#              cannot run it offline; checked against fetch-ml here by cosine)
#   --dtypes   fetch-ml's --dtype values [f32,bf16,int8]
#   --threads  threads for both tools [2]; --repeat: best of N timed runs [1]
#   --dir      where the bench models live [bench/data/long]; written when missing by
#              scripts/make-long-fixtures.py --bench (about 1.2 GB, a minute)
#
# Needs: cargo, the venv of bench/setup-python.sh (or $BENCH_PY), models/all-MiniLM-L6-v2
# (its tokenizer, bert-base-uncased's, serves both models), bench/data/sentences-2k.txt
# (bench/make-sentences.py), GNU time at /usr/bin/time.
#
# What is measured:
#   one        fetch-ml: "forward" is the model's forward pass and pooling alone, model loaded
#              (benches/long_context.rs, the task-1 encoder); "process" and "peak RSS" are the
#              whole `fetch-ml --task=1 -i TEXT` process (load, tokenize, embed, write) from
#              /usr/bin/time. PyTorch: forward and pooling after a warm-up
#              (bench/long_torch.py), peak RSS of its process (import torch alone is ~500 MB).
#   sentences  fetch-ml: the whole process / sentences (as bench/run.sh); PyTorch: the
#              encode loop only (length-sorted batches of 32, padded, mean pooling).
#   curve      both tools' forward pass per length, model loaded, after a warm-up.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
BIN=${FETCH_ML:-"$repo/target/release/fetch-ml"}
PY=${BENCH_PY:-"$repo/.bench-venv/bin/python"}
[ -x "$PY" ] || PY=/work/main/.bench-venv/bin/python

parts=one,sentences,curve
models=modernbert,nomic
dtypes=f32,bf16,int8
threads=2
repeat=1
tokens=8192
lengths=512,1024,2048,4096,8192
limit=
dir="$here/data/long"
layers=
small=0

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --small) small=1; shift ;;
    --parts) parts=$2; shift 2 ;;
    --models) models=$2; shift 2 ;;
    --dtypes) dtypes=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    --repeat) repeat=$2; shift 2 ;;
    --tokens) tokens=$2; shift 2 ;;
    --lengths) lengths=$2; shift 2 ;;
    --limit) limit=$2; shift 2 ;;
    --dir) dir=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [ "$small" = 1 ]; then
  dir="$here/data/long-small"; layers=2; tokens=1024; lengths=256,512,1024; limit=${limit:-200}
fi

sentences="$here/data/sentences-2k.txt"
[ -f "$sentences" ] || { echo "missing $sentences: run $PY bench/make-sentences.py --no-100k" >&2; exit 1; }
[ -x /usr/bin/time ] || { echo "missing /usr/bin/time (apt-get install -y time)" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; load average: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "threads: $threads; fetch-ml $(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo '?'); $("$PY" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)')"

(cd "$repo" && cargo build --release -q && cargo bench --bench long_context --no-run -q 2>/dev/null)
harness() { (cd "$repo" && cargo bench -q --bench long_context -- "$@"); }

if [ ! -f "$dir/modernbert-base/model.safetensors" ] || [ ! -f "$dir/nomic-base/model.safetensors" ]; then
  echo "writing the bench models into $dir"
  "$PY" "$repo/scripts/make-long-fixtures.py" --bench "$dir" ${layers:+--layers "$layers"} 2>&1 | grep -v "Writing model shards" || true
fi

folder() { case $1 in modernbert) echo "$dir/modernbert-base" ;; nomic) echo "$dir/nomic-base" ;; *) echo "unknown model $1" >&2; exit 2 ;; esac; }
field() { "$PY" -c 'import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])' "$1" "$2"; }
mb() { awk -v k="$1" 'BEGIN { printf "%.0f", k / 1024 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2fx", a / b; else print "-" }'; }

cosine() { # two JSONL files with one "embedding" each
  "$PY" - "$1" "$2" <<'EOF'
import json, math, sys
a, b = (json.loads(open(p).readline())["embedding"] for p in sys.argv[1:3])
d = sum(x * y for x, y in zip(a, b))
print(f"{d / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b)):.7f}")
EOF
}

one() {
  local name=$1 m; m=$(folder "$1")
  local text="$work/$name-text.txt"
  "$PY" "$here/long_torch.py" "$m" make-text --tokens $((tokens + 64)) --file "$sentences" --out "$text"
  local weights; weights=$(( $(stat -c %s "$m/model.safetensors") / 1000000 ))
  echo
  echo "== one input of $tokens tokens, $name (model.safetensors $weights MB)"
  local theirs; theirs=$("$PY" "$here/long_torch.py" "$m" one --text "$text" --tokens "$tokens" \
    --threads "$threads" --repeat "$repeat" --out "$work/$name-torch.jsonl" 2>/dev/null)
  echo "pytorch attention: $(field "$theirs" attention)"
  local t_secs; t_secs=$(field "$theirs" seconds)
  printf "%-28s %10s %10s %12s %14s %9s\n" tool forward process "peak RSS MB" "RSS-weights MB" speedup
  printf "%-28s %10.2f %10s %12.0f %14s %9s\n" "pytorch f32" \
    "$t_secs" - "$(field "$theirs" peak_rss_mb)" - 1.00x
  for d in ${dtypes//,/ }; do
    local line; line=$(harness "$m" --dtype "$d" --lengths "$tokens" --repeat "$repeat" --threads "$threads" | tail -1)
    local f_secs; f_secs=$(field "$line" seconds)
    /usr/bin/time -f "%e %M" -o "$work/time" "$BIN" --task=1 --threads "$threads" --dtype "$d" \
      --max-seq-length "$tokens" --format jsonl --model "$m" -i "$text" -o "$work/$name-$d.jsonl" 2>/dev/null
    read -r wall rss < "$work/time"
    printf "%-28s %10.2f %10.2f %12s %14s %9s\n" "fetch-ml $d ($(field "$line" kernel))" "$f_secs" "$wall" \
      "$(mb "$rss")" "$(( $(mb "$rss") - weights ))" "$(ratio "$t_secs" "$f_secs")"
  done
  for d in ${dtypes//,/ }; do
    echo "cosine fetch-ml $d vs pytorch f32: $(cosine "$work/$name-$d.jsonl" "$work/$name-torch.jsonl")"
  done
}

sentences_part() {
  local name=$1 m; m=$(folder "$1")
  local input="$work/sentences.txt"
  if [ -n "$limit" ]; then head -n "$limit" "$sentences" > "$input"; else cp "$sentences" "$input"; fi
  local n; n=$(grep -c . "$input")
  echo
  echo "== $n sentences of $(basename "$sentences"), $name"
  local theirs; theirs=$("$PY" "$here/long_torch.py" "$m" sentences --file "$input" \
    --threads "$threads" --repeat "$repeat" 2>/dev/null)
  local t_rate; t_rate=$(field "$theirs" sentences_per_sec)
  printf "%-28s %12s %12s %9s\n" tool seconds "sentences/s" speedup
  printf "%-28s %12.2f %12.1f %9s\n" "pytorch f32 (encode loop)" "$(field "$theirs" seconds)" "$t_rate" 1.00x
  for d in ${dtypes//,/ }; do
    local best=
    for _ in $(seq "$repeat"); do
      /usr/bin/time -f "%e" -o "$work/time" "$BIN" --task=1 --threads "$threads" --dtype "$d" \
        --format jsonl --model "$m" -i "$input" -o "$work/out.jsonl" 2>/dev/null
      local s; s=$(cat "$work/time")
      best=$(awk -v a="$s" -v b="${best:-1e9}" 'BEGIN { print (a < b) ? a : b }')
    done
    local rate; rate=$(awk -v n="$n" -v s="$best" 'BEGIN { printf "%.1f", n / s }')
    printf "%-28s %12.2f %12s %9s\n" "fetch-ml $d (process)" "$best" "$rate" "$(ratio "$rate" "$t_rate")"
  done
}

curve() {
  local name=$1 m; m=$(folder "$1")
  local text="$work/$name-curve.txt"
  local longest; longest=$(tr ',' '\n' <<< "$lengths" | sort -n | tail -1)
  "$PY" "$here/long_torch.py" "$m" make-text --tokens $((longest + 64)) --file "$sentences" --out "$text"
  echo
  echo "== time per token, one input, $name (ms per 1,000 tokens; GFLOP/s of dense + attention)"
  printf "%-10s %8s %10s %10s %10s %12s %12s\n" tool tokens "ms/1k tok" "GFLOP" "GFLOP/s" "attn GFLOP" "attn GFLOP/s"
  "$PY" "$here/long_torch.py" "$m" curve --text "$text" --lengths "$lengths" --threads "$threads" \
    --repeat "$repeat" 2>/dev/null | while read -r line; do
      printf "%-10s %8s %10.1f\n" pytorch "$(field "$line" tokens)" "$(field "$line" ms_per_1k_tokens)"
    done
  for d in ${dtypes//,/ }; do
    harness "$m" --dtype "$d" --lengths "$lengths" --repeat "$repeat" --threads "$threads" | while read -r line; do
      "$PY" - "$line" <<'EOF'
import json, sys
j = json.loads(sys.argv[1])
g = j["gflop_dense"] + j["gflop_attention"]
print(f"{'ours ' + j['dtype']:<10} {j['tokens']:>8} {j['ms_per_1k_tokens']:>10.1f} {g:>10.1f} "
      f"{j['gflops']:>10.1f} {j['gflop_attention']:>12.1f} {j['attention_gflops']:>12.1f}")
EOF
    done
  done
}

for model in ${models//,/ }; do
  for part in ${parts//,/ }; do
    case $part in
      one) one "$model" ;;
      sentences) sentences_part "$model" ;;
      curve) curve "$model" ;;
      *) echo "unknown part $part" >&2; exit 2 ;;
    esac
  done
done

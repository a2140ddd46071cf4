#!/usr/bin/env bash
# fetch-ml vs sentence-transformers / PyTorch on this machine, side by side, in one run.
# Run by hand (not by CI), on an otherwise idle machine:
#
#   bash bench/run.sh [--parts all|embed,startup,train] [--file SENTENCES] [--repeat N]
#                     [--threads N] [--batch-size N] [--examples N] [--limit N] [--no-check]
#                     [--no-length-grouping] [--dtype f32|bf16|int8] [--baseline BIN]
#
#   --parts      what to run, comma-separated: embed, startup, train, quant, or all [all]
#   --file       sentence file for the embedding part [bench/data/sentences-2k.txt]
#   --repeat     runs of each tool in the embed and train parts; the best is kept [2]
#   --threads    threads for both tools [2]
#   --batch-size sentences per forward pass / examples per optimizer step [32]
#   --examples   training examples timed in the train part [320]
#   --limit      embed only the first N sentences of --file (smoke tests)
#   --no-check   skip the cosine comparison of the two tools' vectors
#   --dtype      fetch-ml's --dtype in the embed part [f32]
#   --baseline   quant part: another fetch-ml build (e.g. of the commit before a change), timed
#                side by side with this one (runs alternate, best of --repeat each) for every
#                dtype; prints this/baseline per dtype and whether their vectors are the same
#                bytes. Build it apart: git archive REV | tar -x -C /tmp/base && (cd /tmp/base
#                && CARGO_TARGET_DIR=/tmp/base-target cargo build --release)
#   --no-length-grouping  train part: plain shuffled batches in both tools (passes fetch-ml's
#                flag of that name and st_train.py's); default: both group by length
#
# Needs: target/release/fetch-ml (or $FETCH_ML), models/all-MiniLM-L6-v2 (scripts/fetch-minilm.sh;
# or any model folder as $MODEL, e.g. models/all-mpnet-base-v2 from scripts/fetch-mpnet.sh),
# the venv of bench/setup-python.sh (or $BENCH_PY), bench/data/ (bench/make-sentences.py),
# and GNU time at /usr/bin/time (apt-get install -y time).
#
# What is measured:
#   embed    fetch-ml: wall time of the whole process (start-up, model load, tokenization,
#            inference, writing the JSONL) / sentences. sentence-transformers: model.encode()
#            only, after a warm-up (bench/st_embed.py); its whole-process time is shown too.
#            Peak RSS of both from /usr/bin/time -v (Maximum resident set size).
#   startup  wall time of one sentence, process start to exit: fetch-ml --sentence (best of 5)
#            vs bench/st_startup.py (best of 3), interpreter start-up included.
#   quant    fetch-ml --task=1 --dtype f32, bf16, int8 (whole process, as embed) against
#            ONNX Runtime fp32 and dynamic int8 (bench/ort_embed.py: encode loop only, after a
#            warm-up; needs onnxruntime, onnx and onnxscript in the venv); the vectors of each
#            dtype are compared by cosine with fetch-ml's f32 ones.
#   train    fetch-ml --task=2 --epochs 1: train rows / training.train_seconds of its JSON
#            report (evaluation excluded; no warm-up step); bench/st_train.py: timed rows / s
#            after one warm-up step. Both form batches the same way (grouped by length unless
#            --no-length-grouping).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
BIN=${FETCH_ML:-"$repo/target/release/fetch-ml"}
MODEL=${MODEL:-"$repo/models/all-MiniLM-L6-v2"}
PY=${BENCH_PY:-"$repo/.bench-venv/bin/python"}

parts=all
file="$here/data/sentences-2k.txt"
repeat=2
threads=2
batch=32
examples=320
limit=
check=1
embed_dtype=f32
baseline=
grouping=()
startup_ours=5
startup_theirs=3

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --parts) parts=$2; shift 2 ;;
    --parts=*) parts=${1#*=}; shift ;;
    --file) file=$2; shift 2 ;;
    --file=*) file=${1#*=}; shift ;;
    --repeat) repeat=$2; shift 2 ;;
    --repeat=*) repeat=${1#*=}; shift ;;
    --threads) threads=$2; shift 2 ;;
    --dtype) embed_dtype=$2; shift 2 ;;
    --dtype=*) embed_dtype=${1#*=}; shift ;;
    --baseline) baseline=$2; shift 2 ;;
    --baseline=*) baseline=${1#*=}; shift ;;
    --threads=*) threads=${1#*=}; shift ;;
    --batch-size) batch=$2; shift 2 ;;
    --batch-size=*) batch=${1#*=}; shift ;;
    --examples) examples=$2; shift 2 ;;
    --examples=*) examples=${1#*=}; shift ;;
    --limit) limit=$2; shift 2 ;;
    --limit=*) limit=${1#*=}; shift ;;
    --no-check) check=0; shift ;;
    --no-length-grouping) grouping=(--no-length-grouping); shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ "$parts" = all ] && parts=embed,startup,train,quant
want() { [[ ",$parts," == *",$1,"* ]]; }
for p in ${parts//,/ }; do
  case "$p" in embed|startup|train|quant) ;; *) echo "unknown part: $p" >&2; exit 2 ;; esac
done

die() { echo "error: $*" >&2; exit 1; }
[ -x "$BIN" ] || die "$BIN not found: build it with cargo build --release"
[ -z "$baseline" ] || [ -x "$baseline" ] || die "--baseline $baseline is not an executable"
[ -f "$MODEL/model.safetensors" ] || die "no model at $MODEL: run scripts/fetch-minilm.sh"
[ -x "$PY" ] || die "no Python venv at $PY: run bash bench/setup-python.sh"
[ -x /usr/bin/time ] || die "GNU time missing: apt-get install -y time"
if want embed || want quant; then
  [ -f "$file" ] || die "no sentence file $file: run $PY bench/make-sentences.py"
fi

work=$(mktemp -d /tmp/fetch-ml-bench.XXXXXX)
trap 'rm -rf "$work"' EXIT
if [ -n "$limit" ] && { want embed || want quant; }; then
  awk -v n="$limit" 'NF && ++k <= n' "$file" > "$work/sentences.txt"
  file="$work/sentences.txt"
fi

# Threads: fetch-ml's matrix products and kernels follow RAYON_NUM_THREADS, as its --threads
# flag sets it (candle's element-wise pool keeps its default of 1); the Python scripts set
# OMP/MKL/torch themselves.
ours_env=(env "RAYON_NUM_THREADS=$threads")

# ---------- helpers ----------
now() { date +%s.%N; }
calc() { awk "BEGIN { printf \"%.${2:-2}f\", $1 }"; }
show_cmd() { printf '  $'; printf ' %q' "$@"; printf '\n'; }

# run_timed OUT ERR CMD...: runs CMD under /usr/bin/time -v; sets WALL (s) and RSS_MB.
run_timed() {
  local out=$1 err=$2; shift 2
  local t0 t1
  t0=$(now)
  if ! /usr/bin/time -v -o "$work/time.txt" "$@" > "$out" 2> "$err"; then
    echo "command failed:" >&2; show_cmd "$@" >&2; tail -20 "$err" >&2; exit 1
  fi
  t1=$(now)
  WALL=$(calc "$t1 - $t0" 4)
  RSS_MB=$(awk -F': ' '/Maximum resident set size/ { printf "%.1f", $2 / 1024 }' "$work/time.txt")
}
# json_get KEY...: the value at KEY/KEY/... of the JSON document on standard input.
json_get() {
  python3 -c 'import functools, json, sys
print(functools.reduce(lambda d, k: d[k], sys.argv[1:], json.loads(sys.stdin.read())))' "$@"
}
better() { awk "BEGIN { exit !($1 > $2) }"; }   # true if $1 > $2

# ---------- header ----------
echo "== fetch-ml benchmark, $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
echo "machine: $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')), \
$(awk '/MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo) RAM, $(uname -sr)"
echo "load average now: $(cut -d' ' -f1-3 /proc/loadavg) (anything well above 0 means other work is running)"
rev=$(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo '?')
dirty=$(git -C "$repo" status --porcelain --untracked-files=no 2>/dev/null | grep -q . && echo ', work tree modified' || true)
echo "fetch-ml: $("$BIN" --version) at $BIN (built $(date -r "$BIN" '+%Y-%m-%d %H:%M'), repo $rev$dirty)"
if [ -n "$baseline" ]; then
  echo "baseline: $("$baseline" --version) at $baseline (built $(date -r "$baseline" '+%Y-%m-%d %H:%M'))"
fi
"$PY" - <<'PY'
import platform, torch, transformers, sentence_transformers
print(f"python {platform.python_version()}, torch {torch.__version__}, transformers "
      f"{transformers.__version__}, sentence-transformers {sentence_transformers.__version__}")
PY
echo "model: $MODEL; threads: $threads; batch size: $batch"
echo

summary=()

# ---------- quantized inference against ONNX Runtime ----------
if want quant; then
  n=$(grep -c '[^[:space:]]' "$file")
  echo "== quantized inference: $n sentences from $file (best of $repeat)"
  echo "CPU flags: $(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -E '^(avx2|avx512f|avx512_vnni|avx_vnni|avx512_bf16|amx_bf16|amx_int8)$' | tr '\n' ' ')"
  declare -A q_sps q_rss b_sps
  for dtype in f32 bf16 int8; do
    cmd=("${ours_env[@]}" "$BIN" --task=1 --model "$MODEL" --input "$file" --format jsonl
         --output "$work/ours-$dtype.jsonl" --batch-size "$batch" --dtype "$dtype")
    show_cmd "${cmd[@]}"
    base_cmd=()
    if [ -n "$baseline" ]; then
      base_cmd=("${ours_env[@]}" "$baseline" --task=1 --model "$MODEL" --input "$file"
                --format jsonl --output "$work/base-$dtype.jsonl" --batch-size "$batch"
                --dtype "$dtype")
      show_cmd "${base_cmd[@]}"
    fi
    best=0 best_base=0
    for r in $(seq 1 "$repeat"); do
      run_timed "$work/q.out" "$work/q.err" "${cmd[@]}"
      sps=$(calc "$n / $WALL")
      echo "  run $r fetch-ml $dtype: $sps sentences/s (wall $WALL s), peak RSS $RSS_MB MB"
      if better "$sps" "$best"; then best=$sps; q_rss[$dtype]=$RSS_MB; fi
      if [ -n "$baseline" ]; then
        run_timed "$work/b.out" "$work/b.err" "${base_cmd[@]}"
        sps=$(calc "$n / $WALL")
        echo "  run $r baseline $dtype: $sps sentences/s (wall $WALL s), peak RSS $RSS_MB MB"
        if better "$sps" "$best_base"; then best_base=$sps; fi
      fi
    done
    q_sps[$dtype]=$best
    grep -h kernel "$work/q.err" | head -1 | sed 's/^/  /' || true
    if [ -n "$baseline" ]; then
      b_sps[$dtype]=$best_base
      if cmp -s "$work/ours-$dtype.jsonl" "$work/base-$dtype.jsonl"; then same="the same bytes"
      else same="NOT the same bytes"; fi
      echo "  $dtype this build / baseline: $(calc "$best / $best_base")x ($best vs $best_base sentences/s); vectors: $same"
    fi
  done
  ort_cmd=("$PY" "$here/ort_embed.py" --model "$MODEL" --file "$file" --threads "$threads"
           --batch-size "$batch" --work-dir "$work/ort")
  show_cmd "${ort_cmd[@]}"
  best_fp=0 best_i8=0
  for r in $(seq 1 "$repeat"); do
    HF_HUB_OFFLINE=1 "${ort_cmd[@]}" > "$work/ort.out" 2> "$work/ort.err" || { tail "$work/ort.err"; exit 1; }
    fp=$(grep fp32 "$work/ort.out" | json_get sentences_per_s)
    i8=$(grep int8 "$work/ort.out" | json_get sentences_per_s)
    echo "  run $r onnxruntime: fp32 $fp sentences/s, int8 $i8 sentences/s (encode loop only)"
    if better "$fp" "$best_fp"; then best_fp=$fp; fi
    if better "$i8" "$best_i8"; then best_i8=$i8; fi
  done
  echo "result:"
  echo "  fetch-ml f32 ${q_sps[f32]}, bf16 ${q_sps[bf16]}, int8 ${q_sps[int8]} sentences/s (whole process); peak RSS f32 ${q_rss[f32]}, bf16 ${q_rss[bf16]}, int8 ${q_rss[int8]} MB"
  echo "  onnxruntime fp32 $best_fp, int8 $best_i8 sentences/s (encode loop)"
  echo "  ratios: fetch-ml int8 / onnxruntime int8 $(calc "${q_sps[int8]} / $best_i8")x; bf16 / f32 $(calc "${q_sps[bf16]} / ${q_sps[f32]}")x; int8 / f32 $(calc "${q_sps[int8]} / ${q_sps[f32]}")x"
  summary+=("quant    int8 ours/onnxruntime-int8 $(calc "${q_sps[int8]} / $best_i8")x (${q_sps[int8]} vs $best_i8 sentences/s); bf16/f32 $(calc "${q_sps[bf16]} / ${q_sps[f32]}")x")
  if [ -n "$baseline" ]; then
    summary+=("quant    this build / baseline: f32 $(calc "${q_sps[f32]} / ${b_sps[f32]}")x, bf16 $(calc "${q_sps[bf16]} / ${b_sps[bf16]}")x, int8 $(calc "${q_sps[int8]} / ${b_sps[int8]}")x")
  fi
  "$PY" - "$work" <<'PY'
import json, sys
import numpy as np
def load(path):
    rows = {}
    for line in open(path):
        d = json.loads(line)
        rows[d["index"]] = d["embedding"]
    return np.array([rows[k] for k in sorted(rows)], dtype=np.float64)
ref = load(f"{sys.argv[1]}/ours-f32.jsonl")
for dtype in ["bf16", "int8"]:
    v = load(f"{sys.argv[1]}/ours-{dtype}.jsonl")
    cos = (v * ref).sum(1) / (np.linalg.norm(v, axis=1) * np.linalg.norm(ref, axis=1))
    sim_ref, sim_v = ref @ ref.T, v @ v.T
    np.fill_diagonal(sim_ref, -2); np.fill_diagonal(sim_v, -2)
    nn = (sim_ref.argmax(1) == sim_v.argmax(1)).mean()
    print(f"  {dtype} vs f32 over {len(cos)} sentences: cosine mean {cos.mean():.6f}, min {cos.min():.6f}; nearest neighbour agrees for {100*nn:.2f}%")
PY
  echo
fi

# ---------- embedding throughput ----------
if want embed; then
  n=$(grep -c '[^[:space:]]' "$file")
  echo "== embedding throughput: $n sentences from $file (best of $repeat)"
  ours_cmd=("${ours_env[@]}" "$BIN" --task=1 --model "$MODEL" --input "$file" --format jsonl
            --output "$work/ours.jsonl" --batch-size "$batch" --dtype "$embed_dtype")
  theirs_cmd=("$PY" "$here/st_embed.py" "$file" --batch-size "$batch" --threads "$threads"
              --model "$MODEL")
  echo "fetch-ml:"; show_cmd "${ours_cmd[@]}"
  echo "sentence-transformers (the last run also gets --out FILE.npy, for the cosine check):"
  show_cmd "${theirs_cmd[@]}"
  best_ours=0 best_theirs=0
  for r in $(seq 1 "$repeat"); do
    run_timed "$work/ours.out" "$work/ours.err" "${ours_cmd[@]}"
    sps=$(calc "$n / $WALL")
    echo "  run $r fetch-ml:              $sps sentences/s (wall $WALL s), peak RSS $RSS_MB MB"
    if better "$sps" "$best_ours"; then best_ours=$sps ours_wall=$WALL ours_rss=$RSS_MB; fi

    extra=()
    if [ "$r" = "$repeat" ] && [ "$check" = 1 ]; then extra=(--out "$work/theirs.npy"); fi
    run_timed "$work/theirs.out" "$work/theirs.err" "${theirs_cmd[@]}" "${extra[@]}"
    line=$(tail -1 "$work/theirs.out")
    sps=$(json_get sentences_per_sec <<< "$line")
    secs=$(json_get seconds <<< "$line")
    echo "  run $r sentence-transformers: $sps sentences/s (encode $secs s; whole process $WALL s), peak RSS $RSS_MB MB"
    if better "$sps" "$best_theirs"; then
      best_theirs=$sps theirs_secs=$secs theirs_wall=$WALL theirs_rss=$RSS_MB
    fi
  done
  r_tp=$(calc "$best_ours / $best_theirs")
  r_rss=$(calc "$ours_rss / $theirs_rss")
  r_whole=$(calc "$theirs_wall / $ours_wall")
  echo "result:"
  echo "  fetch-ml              $best_ours sentences/s (whole process, $ours_wall s)   peak RSS $ours_rss MB"
  echo "  sentence-transformers $best_theirs sentences/s (encode() only, $theirs_secs s; whole process $theirs_wall s)   peak RSS $theirs_rss MB"
  echo "  ratio fetch-ml / sentence-transformers: throughput ${r_tp}x, peak RSS ${r_rss}x"
  echo "  whole process, start to exit (both load the model; theirs excludes writing output): fetch-ml ${r_whole}x faster"
  summary+=("embed    throughput ours/theirs ${r_tp}x ($best_ours vs $best_theirs sentences/s); peak RSS ours/theirs ${r_rss}x ($ours_rss vs $theirs_rss MB)")
  if [ "$check" = 1 ]; then
    "$PY" - "$work/ours.jsonl" "$work/theirs.npy" <<'PY'
import json, sys
import numpy as np
theirs = np.load(sys.argv[2])
ours = np.zeros_like(theirs)
with open(sys.argv[1]) as f:
    for line in f:
        d = json.loads(line)
        ours[d["index"]] = d["embedding"]
cos = (ours * theirs).sum(1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(theirs, axis=1))
print(f"  vectors: cosine(fetch-ml, sentence-transformers) over {len(cos)} sentences: "
      f"mean {cos.mean():.7f}, min {cos.min():.7f}; largest component difference "
      f"{np.abs(ours - theirs).max():.2e}")
PY
  fi
  echo
fi

# ---------- start-up ----------
if want startup; then
  echo "== start-up: one sentence, process start to exit"
  ours_cmd=("${ours_env[@]}" "$BIN" --task=1 --model "$MODEL" --sentence "Hello world!")
  theirs_cmd=("$PY" "$here/st_startup.py" --threads "$threads" --model "$MODEL" "Hello world!")
  echo "fetch-ml (best of $startup_ours):"; show_cmd "${ours_cmd[@]}"
  echo "sentence-transformers (best of $startup_theirs):"; show_cmd "${theirs_cmd[@]}"
  best_o=999999 best_t=999999
  for r in $(seq 1 "$startup_ours"); do
    run_timed "$work/s.out" "$work/s.err" "${ours_cmd[@]}"
    if better "$best_o" "$WALL"; then best_o=$WALL so_rss=$RSS_MB; fi
  done
  for r in $(seq 1 "$startup_theirs"); do
    run_timed "$work/s.out" "$work/s.err" "${theirs_cmd[@]}"
    if better "$best_t" "$WALL"; then best_t=$WALL st_rss=$RSS_MB; fi
  done
  r_su=$(calc "$best_t / $best_o" 1)
  echo "result:"
  echo "  fetch-ml              $best_o s   peak RSS $so_rss MB"
  echo "  sentence-transformers $best_t s   peak RSS $st_rss MB"
  echo "  ratio fetch-ml / sentence-transformers: time $(calc "$best_o / $best_t" 3)x (fetch-ml ${r_su}x faster)"
  summary+=("startup  time ours/theirs $(calc "$best_o / $best_t" 3)x ($best_o vs $best_t s)")
  echo
fi

# ---------- training throughput ----------
if want train; then
  echo "== training throughput: multitask model, $examples examples, batch $batch, \
batches $([ ${#grouping[@]} = 0 ] && echo 'grouped by length' || echo 'in random order') (best of $repeat)"
  ckpt="$work/bench-ckpt"
  ours_cmd=("${ours_env[@]}" "$BIN" --task=2 --model "$MODEL" --epochs 1 --max-train-examples "$examples"
            --batch-size "$batch" --format json --save "$ckpt" -s hi "${grouping[@]}")
  theirs_cmd=("$PY" "$here/st_train.py" --examples "$examples" --batch-size "$batch" --threads "$threads"
              "${grouping[@]}")
  echo "fetch-ml (examples/s = training.train_rows / training.train_seconds of the JSON report):"
  show_cmd "${ours_cmd[@]}"
  echo "pytorch:"; show_cmd "${theirs_cmd[@]}"
  best_ours=0 best_theirs=0
  for r in $(seq 1 "$repeat"); do
    rm -rf "$ckpt"
    run_timed "$work/t.out" "$work/t.err" "${ours_cmd[@]}"
    secs=$(calc "$(json_get training train_seconds < "$work/t.out")" 4)
    rows=$(json_get training train_rows < "$work/t.out")
    eps=$(calc "$rows / $secs")
    echo "  run $r fetch-ml: $eps examples/s ($rows rows in $secs s; whole process $WALL s), peak RSS $RSS_MB MB"
    if better "$eps" "$best_ours"; then best_ours=$eps ours_rss=$RSS_MB; fi

    run_timed "$work/p.out" "$work/p.err" "${theirs_cmd[@]}"
    line=$(tail -1 "$work/p.out")
    eps=$(json_get examples_per_sec <<< "$line")
    echo "  run $r pytorch:  $eps examples/s ($(json_get examples <<< "$line") rows in $(json_get seconds <<< "$line") s, \
$(json_get padded_tokens <<< "$line") padded tokens for $(json_get real_tokens <<< "$line"); whole process $WALL s), peak RSS $RSS_MB MB"
    if better "$eps" "$best_theirs"; then best_theirs=$eps theirs_rss=$RSS_MB; fi
  done
  r_tr=$(calc "$best_ours / $best_theirs")
  echo "result:"
  echo "  fetch-ml $best_ours examples/s   peak RSS $ours_rss MB"
  echo "  pytorch  $best_theirs examples/s   peak RSS $theirs_rss MB"
  echo "  ratio fetch-ml / pytorch: throughput ${r_tr}x, peak RSS $(calc "$ours_rss / $theirs_rss")x"
  summary+=("train    throughput ours/theirs ${r_tr}x ($best_ours vs $best_theirs examples/s); peak RSS ours/theirs $(calc "$ours_rss / $theirs_rss")x")
  echo
fi

echo "== summary (ours = fetch-ml; theirs = sentence-transformers / PyTorch $("$PY" -c 'import torch; print(torch.__version__)'))"
for s in "${summary[@]}"; do echo "  $s"; done

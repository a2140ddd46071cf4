#!/usr/bin/env bash
# bench/serve.sh: --task=serve under load, beside task 1's offline figures for the same
# sentence and dtype, and beside infinity-emb 0.0.78 on the same model, all in one run (the
# measuring is bench/serve_bench.py). Run by hand on a quiet machine: on a loaded one, only the
# ratios taken side by side mean something. Everything listens on 127.0.0.1 and every load
# point is bounded in time.
#
#   cargo build --release                     # once; wrk: apt-get install wrk (or oha, below)
#   bash bench/serve.sh                       # f32 and int8; 1, 8, 32, 128 clients, 10 s each
#   SECS=3 OFFLINE_N=500 bash bench/serve.sh  # a quick look (about 2 minutes)
#   INFINITY="torch optimum" bash bench/serve.sh   # also infinity-emb, both engines
#   LOADGEN=oha bash bench/serve.sh           # oha instead of wrk (cargo install oha --root .tools)
#
# Settings (environment): BIN, MODEL (all-MiniLM-L6-v2), THREADS (2), DTYPES ("f32 int8"),
# CLIENTS ("1 8 32 128"), SECS (10), OFFLINE_N (2000 sentences for task 1's throughput),
# LOADGEN (wrk, or oha), INFINITY ("" | torch | "torch optimum"; INFINITY=1 means both),
# BENCH_PY (.bench-venv/bin/python, from bench/setup-python.sh: torch and numpy for infinity),
# INFINITY_PKGS (bench/data/infinity-pkgs; installed there from bench/requirements-infinity.txt
# with pip --target --no-deps when missing), INFINITY_OPTIMUM_PKGS (bench/data/infinity-optimum,
# from bench/requirements-infinity-optimum.txt).
#
# What it prints, for fetch-ml per dtype:
#   task 1: sentences/s offline on OFFLINE_N copies of one 39-token tweet (--batch-size 32,
#     whole process minus a one-sentence run, median of 3), measured before and again after
#     the server (the ratios use their mean); ms per sentence at --batch-size 1 (200 copies;
#     two passes run side by side on 2 threads); peak RSS embedding the one sentence;
#   the server: time from start to the first 200 of /health; RSS when ready and after one
#     request; then per client count, each client sending one sentence per request to /embed:
#     sentences/s, p50 and p99 latency, failures, requests per batch and the time of a batch
#     (from /metrics); peak RSS during the last (largest) load point (VmHWM reset before it).
# infinity-emb (--engine torch, batch 32; optimum on an ONNX export of the same model, made
# once with bench/ort_embed.py): the same figures from its /embeddings route, and the cosine
# of its vector with fetch-ml's. Then a side-by-side table, and the ratios against the issue's
# targets: batching efficiency (served sentences/s at 32 clients over task 1's offline), the
# latency at one client against task 1's batch-1 time and the server's own forward pass, ready
# time, idle RSS over task 1's, fetch-ml over infinity at each client count.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${BIN:-target/release/fetch-ml}
MODEL=${MODEL:-models/all-MiniLM-L6-v2}
THREADS=${THREADS:-2}
DTYPES=${DTYPES:-f32 int8}
CLIENTS=${CLIENTS:-1 8 32 128}
SECS=${SECS:-10}
OFFLINE_N=${OFFLINE_N:-2000}
WORK=${WORK:-bench/data/serve}
INFINITY=${INFINITY:-}
[ "$INFINITY" = 1 ] && INFINITY="torch optimum"
[ "$INFINITY" = 0 ] && INFINITY=
BENCH_PY=${BENCH_PY:-.bench-venv/bin/python}
INFINITY_PKGS=${INFINITY_PKGS:-bench/data/infinity-pkgs}
INFINITY_OPTIMUM_PKGS=${INFINITY_OPTIMUM_PKGS:-bench/data/infinity-optimum}
OHA=${OHA:-$(command -v oha || echo .tools/bin/oha)}
if command -v wrk > /dev/null; then LOADGEN=${LOADGEN:-wrk}; else LOADGEN=${LOADGEN:-oha}; fi

[ -x "$BIN" ] || { echo "build first: cargo build --release" >&2; exit 1; }
[ -f "$MODEL/model.safetensors" ] || { echo "no model at $MODEL: scripts/fetch-minilm.sh" >&2; exit 1; }
case $LOADGEN in
  wrk) command -v wrk > /dev/null || { echo "no wrk: apt-get install wrk (or LOADGEN=oha)" >&2; exit 1; } ;;
  oha) [ -x "$OHA" ] || { echo "no oha: cargo install oha --locked --root .tools (or OHA=path)" >&2; exit 1; } ;;
  *) echo "LOADGEN is wrk or oha, not $LOADGEN" >&2; exit 1 ;;
esac
mkdir -p "$WORK"

infinity_args=()
if [ -n "$INFINITY" ]; then
  [ -x "$BENCH_PY" ] || { echo "INFINITY needs the bench venv: bash bench/setup-python.sh (or BENCH_PY=path)" >&2; exit 1; }
  # Absolute, without resolving the venv's symlink to the base interpreter.
  BENCH_PY="$(cd "$(dirname "$BENCH_PY")" && pwd)/$(basename "$BENCH_PY")"
  if [ ! -d "$INFINITY_PKGS/infinity_emb" ]; then
    echo "installing infinity-emb into $INFINITY_PKGS (bench/requirements-infinity.txt)"
    "$BENCH_PY" -m pip install --quiet --disable-pip-version-check --target "$INFINITY_PKGS" \
      --no-deps -r bench/requirements-infinity.txt
  fi
  path="$INFINITY_PKGS"
  if [[ " $INFINITY " == *" optimum "* ]]; then
    if [ ! -d "$INFINITY_OPTIMUM_PKGS/optimum/onnxruntime" ]; then
      echo "installing optimum into $INFINITY_OPTIMUM_PKGS (bench/requirements-infinity-optimum.txt)"
      "$BENCH_PY" -m pip install --quiet --disable-pip-version-check --target "$INFINITY_OPTIMUM_PKGS" \
        --no-deps -r bench/requirements-infinity-optimum.txt
    fi
    # The model's files plus an ONNX export of it, for --engine optimum.
    onnx="$WORK/minilm-onnx"
    if [ ! -f "$onnx/model.onnx" ]; then
      echo "exporting $MODEL to ONNX for infinity's optimum engine ($onnx)"
      mkdir -p "$onnx"
      for f in "$MODEL"/*; do ln -sfn "$(realpath "$f")" "$onnx/"; done
      (cd bench && PYTHONDONTWRITEBYTECODE=1 "$BENCH_PY" -c 'import sys, ort_embed; ort_embed.export(sys.argv[1], sys.argv[2])' \
        "$(realpath "../$MODEL")" "$(realpath "../$onnx")/model.onnx") > "$WORK/onnx-export.log" 2>&1 \
        || { echo "ONNX export failed (see $WORK/onnx-export.log)" >&2; exit 1; }
    fi
    infinity_args+=(--onnx-model "$onnx" --optimum-path "$(realpath "$INFINITY_OPTIMUM_PKGS")")
  fi
  infinity_args+=(--infinity "$INFINITY" --infinity-python "$BENCH_PY" --infinity-path "$(realpath "$path")")
fi

exec python3 bench/serve_bench.py --bin "$BIN" --model "$MODEL" --threads "$THREADS" \
  --dtypes "$DTYPES" --clients "$CLIENTS" --secs "$SECS" --offline-n "$OFFLINE_N" \
  --loadgen "$LOADGEN" --oha "$OHA" --work "$WORK" "${infinity_args[@]}"

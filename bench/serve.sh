#!/usr/bin/env bash
# bench/serve.sh: --task=serve under load from oha, beside task 1's offline figures for the same
# sentence and dtype, and (INFINITY=1) infinity-emb on the same model. Run by hand on a quiet
# machine; everything listens on 127.0.0.1 and every load point is bounded in time.
#
#   cargo build --release && cargo install oha --locked --root .tools    # once
#   (or: apt-get install wrk; LOADGEN=wrk, the default when oha is missing)
#   bash bench/serve.sh                      # f32 and int8, 1/8/32/128 clients, 10 s each
#   DTYPES=int8 SECS=3 bash bench/serve.sh   # a quick look
#   INFINITY=1 bash bench/serve.sh           # also infinity-emb 0.0.78 (--engine torch)
#
# What it prints, per dtype:
#   task 1 offline: sentences/s on N copies of the sentence (load time taken out), ms per
#     sentence at batch 1, and peak RSS embedding one sentence;
#   the server: time from start to the first 200 of /health, idle RSS once ready, and for
#     1, 8, 32 and 128 clients sending one sentence per request: requests/s, p50 and p99
#     latency, non-200 answers; batching efficiency = served sentences/s at 32 clients over
#     task 1's offline sentences/s; peak RSS after all load points (VmHWM) and its bound.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=${MODEL:-models/all-MiniLM-L6-v2}
BIN=${BIN:-target/release/fetch-ml}
OHA=${OHA:-$(command -v oha || echo .tools/bin/oha)}
if [ -x "$OHA" ]; then LOADGEN=${LOADGEN:-oha}; else LOADGEN=${LOADGEN:-wrk}; fi
THREADS=${THREADS:-2}
DTYPES=${DTYPES:-f32 int8}
CLIENTS=${CLIENTS:-1 8 32 128}
SECS=${SECS:-10}
OFFLINE_N=${OFFLINE_N:-2000}
INFINITY=${INFINITY:-0}
WORK=${WORK:-bench/data/serve}
# A 39-token tweet (MiniLM's tokenizer, [CLS] and [SEP] included).
TWEET=${TWEET:-"Just landed in Lisbon and the sunset over the river is unreal, can't wait to try the pastéis de nata everyone keeps talking about with my two best friends #travel"}

[ -x "$BIN" ] || { echo "build first: cargo build --release" >&2; exit 1; }
if [ "$LOADGEN" = oha ]; then
  [ -x "$OHA" ] || { echo "no oha: cargo install oha --locked --root .tools (or OHA=path)" >&2; exit 1; }
else
  command -v wrk > /dev/null || { echo "no load generator: cargo install oha, or apt-get install wrk" >&2; exit 1; }
fi
[ -f "$MODEL/model.safetensors" ] || { echo "no model at $MODEL: scripts/fetch-minilm.sh" >&2; exit 1; }
mkdir -p "$WORK"
python3 - "$TWEET" > "$WORK/body.json" <<'PY'
import json, sys
print(json.dumps({"inputs": sys.argv[1]}))
PY
python3 - "$TWEET" > "$WORK/body-openai.json" <<'PY'
import json, sys
print(json.dumps({"input": [sys.argv[1]], "model": "all-MiniLM-L6-v2"}))
PY
for n in 1 200 "$OFFLINE_N"; do
  python3 -c "import sys; print('\n'.join([sys.argv[1]] * int(sys.argv[2])))" "$TWEET" "$n" > "$WORK/tweet-$n.txt"
done

now() { date +%s.%N; }
secs() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.4f}')" "$1" "$2"; }
rss_kb() { awk -v k="$2" '$1 == k":" {print $2}' "/proc/$1/status"; }

# Seconds of one task-1 run (median of 3) with extra flags.
task1_secs() {
  local best=()
  for _ in 1 2 3; do
    local t0 t1
    t0=$(now)
    "$BIN" --task=1 --model "$MODEL" --threads "$THREADS" --format jsonl -o "$WORK/out.jsonl" "$@" 2>/dev/null
    t1=$(now)
    best+=("$(secs "$t0" "$t1")")
  done
  printf '%s\n' "${best[@]}" | sort -g | sed -n 2p
}

# Runs the load generator against URL with BODY at C clients for SECS seconds; prints
# "rps p50_ms p99_ms non200".
load() {
  local url=$1 body=$2 c=$3
  if [ "$LOADGEN" = oha ]; then
    "$OHA" -c "$c" -z "${SECS}s" -m POST -H 'content-type: application/json' -D "$body" \
      --no-tui --output-format json "$url" > "$WORK/oha.json" 2>/dev/null
    python3 - "$WORK/oha.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
s, p = d["summary"], d["latencyPercentiles"]
codes = d.get("statusCodeDistribution", {})
bad = sum(v for k, v in codes.items() if k != "200") + sum(d.get("errorDistribution", {}).values())
print(f'{s["requestsPerSec"]:.1f} {1000 * (p["p50"] or 0):.2f} {1000 * (p["p99"] or 0):.2f} {bad}')
PY
  else
    python3 - "$body" > "$WORK/post.lua" <<'PY'
import json, sys
body = open(sys.argv[1]).read().strip()
print('wrk.method = "POST"')
print('wrk.headers["Content-Type"] = "application/json"')
print("wrk.body = " + json.dumps(body))
PY
    wrk -t "$(( c < 2 ? c : 2 ))" -c "$c" -d "${SECS}s" --timeout 60s --latency -s "$WORK/post.lua" "$url" > "$WORK/wrk.txt" 2>&1
    python3 - "$WORK/wrk.txt" <<'PY'
import re, sys
t = open(sys.argv[1]).read()
def ms(label):
    m = re.search(r"^\s*" + label + r"\s+([\d.]+)(us|ms|s)\b", t, re.M)
    if not m:
        return 0.0
    return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", t).group(1))
bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", t)
errs = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", t)
n = (int(bad.group(1)) if bad else 0) + (sum(map(int, errs.groups())) if errs else 0)
print(f"{rps:.1f} {ms('50%'):.2f} {ms('99%'):.2f} {n}")
PY
  fi
}

# Starts a server; sets PID, URL and READY (seconds to the first 200 of /health).
start_server() {
  local t0
  t0=$(now)
  "$BIN" --task=serve --model "$MODEL" --threads "$THREADS" --port 0 "$@" \
    > "$WORK/server.out" 2> "$WORK/server.err" &
  PID=$!
  until grep -q listening "$WORK/server.out" 2>/dev/null; do sleep 0.002; done
  URL=$(sed -n 's/^listening on //p' "$WORK/server.out")
  until curl -sf "$URL/health" > /dev/null; do sleep 0.002; done
  READY=$(secs "$t0" "$(now)")
}

stop_server() { kill -TERM "$PID"; wait "$PID" || true; }

echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) CPUs"
echo "cpu: family $(grep -m1 'cpu family' /proc/cpuinfo | cut -d: -f2 | xargs) model $(grep -m1 '^model\s' /proc/cpuinfo | cut -d: -f2 | xargs); load average now: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "model: $MODEL; threads: $THREADS; $SECS s per load point; load from $LOADGEN"
echo "sentence: $TWEET"
for dtype in $DTYPES; do
  echo
  echo "== dtype $dtype"
  t1=$(task1_secs --dtype "$dtype" --input "$WORK/tweet-1.txt")
  tn=$(task1_secs --dtype "$dtype" --input "$WORK/tweet-$OFFLINE_N.txt")
  tb=$(task1_secs --dtype "$dtype" --input "$WORK/tweet-200.txt" --batch-size 1)
  offline=$(python3 -c "print(f'{($OFFLINE_N - 1) / ($tn - $t1):.1f}')")
  batch1=$(python3 -c "print(f'{1000 * ($tb - $t1) / 199:.2f}')")
  rss1=$(/usr/bin/time -f %M "$BIN" --task=1 --model "$MODEL" --threads "$THREADS" --dtype "$dtype" -s "$TWEET" 2>&1 >/dev/null | tail -1)
  echo "task 1 offline: $offline sentences/s ($OFFLINE_N sentences, batch 32); batch 1: $batch1 ms/sentence; one sentence: peak RSS $((rss1 / 1024)) MB"
  start_server --dtype "$dtype"
  ready=$READY
  idle=$(rss_kb "$PID" VmRSS)
  tokens=$(curl -s "$URL/tokenize" -d @"$WORK/body.json" | python3 -c "import json,sys; print(len(json.load(sys.stdin)[0]))")
  echo "server: ready (first 200 from /health) after $ready s; idle RSS $((idle / 1024)) MB ($(python3 -c "print(f'{$idle / $rss1:.2f}')")x task 1's one sentence); the sentence is $tokens tokens"
  # Warm-up, then the load points.
  SECS=1 load "$URL/embed" "$WORK/body.json" 8 > /dev/null
  printf '%8s %10s %9s %9s %7s\n' clients "req/s" "p50 ms" "p99 ms" "non-200"
  for c in $CLIENTS; do
    read -r rps p50 p99 bad < <(load "$URL/embed" "$WORK/body.json" "$c")
    printf '%8s %10s %9s %9s %7s\n' "$c" "$rps" "$p50" "$p99" "$bad"
    [ "$c" = 32 ] && eff=$(python3 -c "print(f'{100 * $rps / $offline:.0f}%')")
  done
  read -r rps p50 p99 bad < <(load "$URL/v1/embeddings" "$WORK/body-openai.json" 32)
  echo "/v1/embeddings at 32 clients: $rps req/s, p50 $p50 ms, p99 $p99 ms, non-200 $bad"
  peak=$(rss_kb "$PID" VmHWM)
  batch_tokens=$(curl -s "$URL/info" | python3 -c "import json,sys; print(json.load(sys.stdin)['limits']['max_batch_tokens'])")
  echo "batching efficiency at 32 clients: ${eff:-n/a} of task 1's offline sentences/s"
  echo "peak RSS over all load points: $((peak / 1024)) MB (bound: idle + one batch of --max-batch-tokens $batch_tokens tokens in flight + the queued requests' tokens)"
  curl -s "$URL/metrics" | grep -E '^fetch_ml_batch_requests_(sum|count)' | tr '\n' ' '
  echo
  stop_server
done

if [ "$INFINITY" = 1 ]; then
  echo
  echo "== infinity-emb 0.0.78 (--engine torch, batch 32), same model and machine"
  PY=${PY:-/work/main/.bench-venv/bin/python}
  INF="$WORK/infinity-pkgs"
  if [ ! -d "$INF/infinity_emb" ]; then
    "$PY" -m pip install --quiet --target "$INF" "infinity-emb[server]==0.0.78" --no-deps \
      && "$PY" -m pip install --quiet --target "$INF" fastapi uvicorn orjson typer rich \
         prometheus-fastapi-instrumentator posthog hf_transfer \
      || { echo "infinity-emb did not install: skipped"; exit 0; }
  fi
  PORT=${INFINITY_PORT:-7997}
  t0=$(now)
  PYTHONPATH="$INF" "$PY" -c "import sys; from infinity_emb.cli import cli; sys.argv[0] = 'infinity_emb'; cli()" v2 --model-id "$MODEL" --engine torch \
    --batch-size 32 --port "$PORT" --host 127.0.0.1 > "$WORK/infinity.log" 2>&1 &
  IPID=$!
  for _ in $(seq 1 600); do curl -sf "127.0.0.1:$PORT/health" > /dev/null && break; sleep 0.1; done
  curl -sf "127.0.0.1:$PORT/health" > /dev/null || { echo "infinity-emb did not start (see $WORK/infinity.log): skipped"; kill "$IPID" 2>/dev/null; exit 0; }
  echo "ready after $(secs "$t0" "$(now)") s; idle RSS $(( $(rss_kb "$IPID" VmRSS) / 1024 )) MB"
  printf '%8s %10s %9s %9s %7s\n' clients "req/s" "p50 ms" "p99 ms" "non-200"
  for c in $CLIENTS; do
    read -r rps p50 p99 bad < <(load "127.0.0.1:$PORT/embeddings" "$WORK/body-openai.json" "$c")
    printf '%8s %10s %9s %9s %7s\n' "$c" "$rps" "$p50" "$p99" "$bad"
  done
  echo "peak RSS: $(( $(rss_kb "$IPID" VmHWM) / 1024 )) MB"
  kill -TERM "$IPID"; wait "$IPID" || true
fi

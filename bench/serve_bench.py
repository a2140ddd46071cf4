#!/usr/bin/env python3
"""The measurements of bench/serve.sh (which sets it up and documents it): fetch-ml's server
beside task 1 on the same sentence, per dtype, and infinity-emb beside both, in one run.
Standard library only; everything listens on 127.0.0.1 and every load point is bounded.
"""
import argparse, json, math, os, re, statistics, subprocess, sys, time, urllib.request

TWEET = ("Just landed in Lisbon and the sunset over the river is unreal, can't wait to try the "
         "pastéis de nata everyone keeps talking about with my two best friends #travel")


def log(*a):
    print(*a, flush=True)


def http(url, body=None, timeout=10):
    """(status, text) of a GET (or a JSON POST with body)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def rss_kb(pid, key):
    """VmRSS or VmHWM of a process, in kB."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def reset_peak(pid):
    """Starts VmHWM again from the current RSS (Linux: 5 > clear_refs)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def mb(kb):
    return f"{kb / 1024:.0f} MB"


class Args:
    pass


def run_timed(cmd, **kw):
    """Wall seconds and peak RSS (kB) of a command that must succeed."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kw)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    err = p.stderr.read().decode()
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        sys.exit(f"failed ({p.returncode}): {' '.join(cmd)}\n{err}")
    return wall, ru.ru_maxrss


class Task1:
    """`--task=1` on copies of the sentence: whole-process times, start-up taken out."""

    def __init__(self, a, dtype):
        self.a, self.dtype = a, dtype

    def secs(self, n, *extra):
        cmd = [self.a.bin, "--task=1", "--model", self.a.model, "--threads", str(self.a.threads),
               "--dtype", self.dtype, "--input", os.path.join(self.a.work, f"tweet-{n}.txt"),
               "--format", "jsonl", "-o", os.path.join(self.a.work, "out.jsonl"), *extra]
        return statistics.median(run_timed(cmd)[0] for _ in range(3))

    def offline(self):
        """Sentences/s on offline_n copies at --batch-size 32 (one sentence's run subtracted)."""
        n = self.a.offline_n
        return (n - 1) / (self.secs(n) - self.secs(1))

    def batch1_ms(self):
        """ms per sentence at --batch-size 1 over 200 copies (passes run side by side)."""
        return 1000 * (self.secs(200, "--batch-size", "1") - self.secs(1)) / 199

    def one_sentence_rss(self):
        cmd = [self.a.bin, "--task=1", "--model", self.a.model, "--threads", str(self.a.threads),
               "--dtype", self.dtype, "-s", TWEET]
        return run_timed(cmd)[1]


def load(a, url, body, clients):
    """(requests/s, p50 ms, p99 ms, failures) from the load generator."""
    secs = a.secs
    if a.loadgen == "oha":
        out = subprocess.run([a.oha, "-c", str(clients), "-z", f"{secs}s", "-m", "POST",
                              "-H", "content-type: application/json", "-d", json.dumps(body),
                              "--no-tui", "--output-format", "json", url],
                             capture_output=True, text=True, timeout=secs + 120).stdout
        d = json.loads(out)
        s, p = d["summary"], d["latencyPercentiles"]
        codes = d.get("statusCodeDistribution", {})
        bad = sum(v for k, v in codes.items() if k != "200")
        bad += sum(d.get("errorDistribution", {}).values())
        return s["requestsPerSec"], 1000 * (p["p50"] or 0), 1000 * (p["p99"] or 0), bad
    script = os.path.join(a.work, "post.lua")
    with open(script, "w") as f:
        f.write('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n')
        f.write(f"wrk.body = {json.dumps(json.dumps(body))}\n")
    out = subprocess.run(["wrk", "-t", str(min(clients, 2)), "-c", str(clients), "-d", f"{secs}s",
                          "--timeout", "60s", "--latency", "-s", script, url],
                         capture_output=True, text=True, timeout=secs + 120).stdout

    def ms(label):
        m = re.search(r"^\s*" + label + r"\s+([\d.]+)(us|ms|s)\b", out, re.M)
        return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)] if m else math.nan

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errs = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    n = (int(bad.group(1)) if bad else 0) + (sum(map(int, errs.groups())) if errs else 0)
    return rps, ms("50%"), ms("99%"), n


def metrics(base):
    d = {}
    for line in http(base + "/metrics")[1].splitlines():
        if line and not line.startswith("#"):
            k, v = line.rsplit(" ", 1)
            d[k] = float(v)
    return d


class Server:
    """A server process: started, polled until /health answers 200, stopped with SIGTERM."""

    def __init__(self, name, cmd, base, embed_path, body, cwd=None, env=None, log_file=None):
        self.name, self.base, self.embed_path, self.body = name, base, embed_path, body
        t0 = time.perf_counter()
        out = open(log_file, "w") if log_file else subprocess.DEVNULL
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE if base is None else out,
                                     stderr=out, text=True)
        if base is None:  # fetch-ml prints its address first
            line = self.proc.stdout.readline()
            if not line.startswith("listening on "):
                self.stop()
                raise RuntimeError(f"{name}: no address printed ({line!r})")
            self.base = line.split()[-1]
        deadline = time.perf_counter() + 600
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name} exited ({self.proc.returncode}) before it was ready")
            try:
                if http(self.base + "/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if time.perf_counter() > deadline:
                self.stop()
                raise RuntimeError(f"{name} not ready after 600 s")
            time.sleep(0.005)
        self.ready = time.perf_counter() - t0

    def vector(self):
        status, text = http(self.base + self.embed_path, self.body)
        if status != 200:
            raise RuntimeError(f"{self.name}: {status} {text[:200]}")
        v = json.loads(text)
        return v[0] if isinstance(v, list) else v["data"][0]["embedding"]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def cosine(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def measure(a, server, fetch_ml):
    """Every figure of one server: ready, RSS, the load points, peak RSS at the last."""
    r = {"ready": server.ready, "rss_ready": rss_kb(server.proc.pid, "VmRSS")}
    r["vector"] = server.vector()
    r["rss_idle"] = rss_kb(server.proc.pid, "VmRSS")
    load(a, server.base + server.embed_path, server.body, 8)  # warm-up, not reported
    r["points"] = {}
    for c in a.clients:
        peak = c == max(a.clients) and reset_peak(server.proc.pid)
        m0 = metrics(server.base) if fetch_ml else {}
        rps, p50, p99, bad = load(a, server.base + server.embed_path, server.body, c)
        point = {"rps": rps, "p50": p50, "p99": p99, "bad": bad}
        if fetch_ml:
            m1 = metrics(server.base)
            g = lambda k: m1.get(k, 0) - m0.get(k, 0)
            batches = g("fetch_ml_batch_requests_count")
            if batches:
                point["per_batch"] = g("fetch_ml_batch_requests_sum") / batches
                point["infer_ms"] = 1000 * g("fetch_ml_inference_duration_seconds_sum") / batches
        r["points"][c] = point
        if peak:
            r["peak"] = rss_kb(server.proc.pid, "VmHWM")
        log(f"  {server.name}: {c:4d} clients {rps:8.1f} sentences/s  p50 {p50:8.2f} ms  "
            f"p99 {p99:8.2f} ms  failed {bad}"
            + (f"  ({point['per_batch']:.1f} requests/batch, {point['infer_ms']:.2f} ms each)"
               if "per_batch" in point else ""))
    return r


def fetch_ml(a, dtype):
    """Task 1 before and after the server, and the server, for one dtype."""
    t1 = Task1(a, dtype)
    log(f"== fetch-ml {dtype}")
    before, b1 = t1.offline(), t1.batch1_ms()
    rss1 = t1.one_sentence_rss()
    log(f"  task 1: {before:.1f} sentences/s offline; {b1:.2f} ms/sentence at --batch-size 1; "
        f"one sentence: peak RSS {mb(rss1)}")
    cmd = [a.bin, "--task=serve", "--model", a.model, "--threads", str(a.threads), "--dtype", dtype,
           "--port", "0"]
    server = Server(f"fetch-ml {dtype}", cmd, None, "/embed", {"inputs": TWEET},
                    log_file=os.path.join(a.work, f"fetch-ml-{dtype}.log"))
    try:
        r = measure(a, server, True)
        r["max_batch_tokens"] = json.loads(http(server.base + "/info")[1])["limits"]["max_batch_tokens"]
    finally:
        server.stop()
    after = t1.offline()
    log(f"  task 1 again after the server: {after:.1f} sentences/s offline")
    r.update(offline=(before + after) / 2, offline_runs=(before, after), batch1=b1, rss1=rss1)
    return r


def infinity(a, engine, want):
    """infinity-emb with one engine, or None when it does not start."""
    port = a.infinity_port + (0 if engine == "torch" else 1)
    path = a.infinity_path if engine == "torch" else f"{a.optimum_path}:{a.infinity_path}"
    env = dict(os.environ, HF_HUB_OFFLINE="1", DO_NOT_TRACK="1", INFINITY_ANONYMOUS_USAGE_STATS="0",
               HF_HOME=os.path.join(os.path.abspath(a.work), "hf"), PYTHONPATH=path)
    cmd = [a.infinity_python, "-c", "from infinity_emb.cli import cli; cli()", "v2",
           "--engine", engine, "--batch-size", "32", "--device", "cpu", "--no-vector-disk-cache",
           "--host", "127.0.0.1", "--port", str(port)]
    cwd = None
    if engine == "torch":
        cmd += ["--model-id", os.path.abspath(a.model)]
    else:
        # optimum wants an ONNX file named as it lists the folder's files, relative to the
        # folder: run inside a folder of the model's files plus model.onnx.
        cwd = a.onnx_model
        cmd += ["--model-id", ".", "--pooling-method", "mean"]
    log(f"== infinity-emb 0.0.78 --engine {engine}, batch 32")
    logf = os.path.join(a.work, f"infinity-{engine}.log")
    try:
        server = Server(f"infinity {engine}", cmd, f"http://127.0.0.1:{port}", "/embeddings",
                        {"input": [TWEET], "model": "all-MiniLM-L6-v2"}, cwd=cwd, env=env,
                        log_file=logf)
    except RuntimeError as e:
        log(f"  skipped: {e} (see {logf})")
        return None
    try:
        r = measure(a, server, False)
    finally:
        server.stop()
    r["cosine"] = cosine(r["vector"], want)
    log(f"  its vector against fetch-ml f32's: cosine {r['cosine']:.6f}")
    return r


def summary(a, results):
    log("")
    log("== side by side (" + a.machine + ")")
    names = list(results)
    w = max(16, *(len(n) + 2 for n in names))
    log(f"{'':26}" + "".join(f"{n:>{w}}" for n in names))

    def row(label, f):
        log(f"{label:26}" + "".join(f"{f(results[n]):>{w}}" for n in names))

    fmt = lambda v, spec: "-" if v is None else format(v, spec)
    row("ready (s)", lambda r: fmt(r["ready"], ".3f"))
    row("RSS ready", lambda r: mb(r["rss_ready"]))
    row("RSS idle (after 1 request)", lambda r: mb(r["rss_idle"]))
    row("task 1 one-sentence RSS", lambda r: mb(r["rss1"]) if "rss1" in r else "-")
    row("task 1 offline sent/s", lambda r: fmt(r.get("offline"), ".1f"))
    row("task 1 batch-1 ms/sent", lambda r: fmt(r.get("batch1"), ".2f"))
    for c in a.clients:
        row(f"{c} clients sent/s", lambda r: fmt(r["points"][c]["rps"], ".1f"))
        row(f"{c} clients p50/p99 ms",
            lambda r: f"{r['points'][c]['p50']:.1f}/{r['points'][c]['p99']:.1f}")
    row(f"peak RSS at {max(a.clients)} clients", lambda r: mb(r["peak"]) if "peak" in r else "-")
    if any(p["rps"] == 0 for r in results.values() for p in r["points"].values()):
        log("(a point with no answer within the time, 0 sentences/s: raise SECS)")
    log("")
    log("ratios, each taken side by side in this run:")
    for n, r in results.items():
        if "offline" not in r:
            continue
        pts, c32 = r["points"], 32 if 32 in r["points"] else max(r["points"])
        one = pts.get(1)
        if one and "infer_ms" not in one:
            one = None
        lo, hi = r["offline_runs"]
        log(f"  {n}: batching efficiency at {c32} clients = {pts[c32]['rps'] / r['offline']:.2f} of "
            f"task 1's offline sentences/s (task 1: {lo:.1f} before, {hi:.1f} after the server; "
            f"target >= 0.80)")
        if one:
            fwd = one.get("infer_ms")
            log(f"  {n}: 1 client p50 {one['p50']:.2f} ms = task 1's batch-1 {r['batch1']:.2f} ms/sentence "
                f"{one['p50'] - r['batch1']:+.2f} ms (target <= +1); one sentence's forward pass in "
                f"the server {fwd:.2f} ms, so its own overhead is {one['p50'] - fwd:.2f} ms; "
                f"p99 - p50 = {one['p99'] - one['p50']:.2f} ms (target <= 3)")
        log(f"  {n}: ready in {r['ready']:.3f} s (target <= 0.5); idle RSS {r['rss_idle'] / r['rss1']:.2f}x "
            f"task 1's one sentence (target <= 1.2); peak RSS under {max(a.clients)} clients "
            f"{mb(r.get('peak', 0))}, the batching limit being {r['max_batch_tokens']} tokens per batch")
        for m, o in results.items():
            if m.startswith("infinity"):
                ratio = " ".join(f"{c}:{pts[c]['rps'] / o['points'][c]['rps']:.2f}x"
                                 for c in a.clients if o["points"][c]["rps"] and pts[c]["rps"])
                log(f"  {n} over {m}, sentences/s by clients: {ratio}")


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--bin", default="target/release/fetch-ml")
    p.add_argument("--model", default="models/all-MiniLM-L6-v2")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtypes", default="f32 int8")
    p.add_argument("--clients", default="1 8 32 128")
    p.add_argument("--secs", type=int, default=10)
    p.add_argument("--offline-n", type=int, default=2000)
    p.add_argument("--loadgen", default="wrk", choices=["wrk", "oha"])
    p.add_argument("--oha", default="oha")
    p.add_argument("--work", default="bench/data/serve")
    p.add_argument("--infinity", default="", help="engines, e.g. 'torch optimum'")
    p.add_argument("--infinity-python", default=".bench-venv/bin/python")
    p.add_argument("--infinity-path", default="bench/data/infinity-pkgs")
    p.add_argument("--optimum-path", default="bench/data/infinity-optimum")
    p.add_argument("--onnx-model", default="bench/data/serve/minilm-onnx")
    p.add_argument("--infinity-port", type=int, default=7997)
    a = p.parse_args(namespace=Args())
    a.clients = [int(c) for c in a.clients.split()]
    os.makedirs(a.work, exist_ok=True)
    for n in {1, 200, a.offline_n}:
        with open(os.path.join(a.work, f"tweet-{n}.txt"), "w") as f:
            f.write((TWEET + "\n") * n)
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    fam = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("cpu family")), "?")
    mod = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if re.match(r"model\s*:", l)), "?")
    a.machine = f"{cpu}, family {fam} model {mod}, {os.cpu_count()} CPUs"
    load_avg = lambda: " ".join(open("/proc/loadavg").read().split()[:3])
    log(f"machine: {a.machine}; load average {load_avg()}")
    log(f"model {a.model}; {a.threads} threads; {a.secs} s per load point; load from {a.loadgen}; "
        f"task 1 offline on {a.offline_n} copies of one sentence:")
    log(f"  {TWEET}")
    results = {}
    for dtype in a.dtypes.split():
        results[f"fetch-ml {dtype}"] = fetch_ml(a, dtype)
    want = next(iter(results.values()))["vector"] if results else None
    for engine in a.infinity.split():
        r = infinity(a, engine, want)
        if r:
            results[f"infinity {engine}"] = r
    log(f"load average at the end: {load_avg()}")
    summary(a, results)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Soak test of `qmix serve` on 127.0.0.1: N concurrent clients for a bounded time.

Each client loops until the time is up, picking at random:
  stream      a streaming chat request read to its end ([DONE])
  disconnect  a streaming chat request dropped after its first chunk
  complete    a non-streaming completion
  malformed   a bad request that must get a 4xx (invalid JSON, wrong type, text/plain body,
              unknown endpoint, huge max_tokens type, half a request and then a hang-up)
and every --burst-every seconds a burst of more requests than the slots and the queue hold
(some must get 503 busy, none may fail otherwise); a client that gets 503 backs off 0.1-0.5 s.
The server's RSS is sampled all along.

Reports requests and outcomes by kind, unexpected errors by kind, latency percentiles (time to
first token and total for streams, total for completions) and the RSS trend. Exits 1 when there
was an unexpected error or the server died.

usage: bench/soak.py [--model testdata/demo] [--clients 16] [--seconds 60] [--parallel 4]
                     [--queue 8] [--max-tokens 32] [--qmix build/qmix] [--threads N]
python3 standard library only.
"""
import argparse
import collections
import http.client
import json
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="testdata/demo")
    p.add_argument("--qmix", default=os.environ.get("QMIX", "build/qmix"))
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--parallel", type=int, default=4, help="server slots")
    p.add_argument("--queue", type=int, default=8, help="server queue before 503")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=0, help="server compute threads (0: all)")
    p.add_argument("--burst-every", type=float, default=10)
    p.add_argument("--prefix-cache", default="64M",
                   help="the server's prefix cache (default 64M: it fills early, so the RSS trend "
                        "after that shows leaks, not the cache)")
    p.add_argument("--seed", type=int, default=1)
    return p.parse_args()


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests = collections.Counter()   # by kind
        self.outcomes = collections.Counter()   # (kind, outcome)
        self.errors = collections.Counter()     # unexpected, by what happened
        self.lat = collections.defaultdict(list)

    def add(self, kind, outcome, error=None, **lat):
        with self.lock:
            self.requests[kind] += 1
            self.outcomes[(kind, outcome)] += 1
            if error:
                self.errors[f"{kind}: {error}"] += 1
            for k, v in lat.items():
                self.lat[k].append(v)


def start_server(a):
    cmd = [a.qmix, "serve", a.model, "--port", "0", "--parallel", str(a.parallel),
           "--queue", str(a.queue), "--ctx", "2048", "--threads", str(a.threads),
           "--prefix-cache", a.prefix_cache]
    log = open(os.path.join(os.environ.get("TMPDIR", "/tmp"), f"qmix-soak-{os.getpid()}.log"),
               "w+")
    proc = subprocess.Popen(cmd, stdout=log, stderr=log)
    for _ in range(600):
        log.seek(0)
        m = re.search(r"http://[^:]+:(\d+)", log.read())
        if m:
            return proc, int(m.group(1)), log.name
        if proc.poll() is not None:
            log.seek(0)
            sys.exit("server exited at start:\n" + log.read())
        time.sleep(0.1)
    proc.kill()
    sys.exit("server did not start")


def chat_body(rng, stream, max_tokens):
    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "cloud", "seven"]
    text = " ".join(rng.choice(words) for _ in range(rng.randint(2, 24)))
    return json.dumps({"messages": [{"role": "user", "content": text}],
                       "max_tokens": rng.randint(1, max_tokens), "stream": stream,
                       "temperature": rng.choice([0, 0.7]), "seed": rng.randint(0, 1 << 20)})


def post(port, path, body, ctype="application/json", timeout=120):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    c.request("POST", path, body=body, headers={"Content-Type": ctype})
    return c, c.getresponse()


def do_stream(port, rng, a, st, drop):
    kind = "disconnect" if drop else "stream"
    t0 = time.monotonic()
    try:
        c, r = post(port, "/v1/chat/completions", chat_body(rng, True, a.max_tokens))
    except OSError as e:
        return st.add(kind, "error", f"connect/send: {type(e).__name__}")
    if r.status == 503:
        c.close()
        return st.add(kind, "busy")
    if r.status != 200:
        c.close()
        return st.add(kind, "error", f"status {r.status}")
    ttft = None
    done = False
    try:
        for line in r:
            # time to the first generated text (the first chunk only names the role)
            if ttft is None and line.startswith(b"data: {") and (
                    b'"content":"' in line and b'"content":""' not in line or
                    b'"reasoning_content":"' in line):
                ttft = time.monotonic() - t0
                if drop:
                    break
            if line.startswith(b"data: [DONE]"):
                done = True
                break
            if line.startswith(b"data: {\"error\""):
                c.close()
                return st.add(kind, "error", "error event in the stream")
    except OSError as e:
        c.close()
        return st.add(kind, "error", f"read: {type(e).__name__}")
    c.close()
    if not done and not (drop and ttft is not None):
        return st.add(kind, "error", "stream ended without [DONE]")
    lat = {"ttft": ttft} if ttft is not None else {}  # none: an answer with no visible text
    if drop:
        return st.add(kind, "dropped" if ttft is not None else "finished first", **lat)
    st.add(kind, "ok", stream_total=time.monotonic() - t0, **lat)


def do_complete(port, rng, a, st):
    t0 = time.monotonic()
    body = json.dumps({"prompt": "Once upon a time", "max_tokens": rng.randint(1, a.max_tokens)})
    try:
        c, r = post(port, "/v1/completions", body)
        data = r.read()
        c.close()
    except OSError as e:
        return st.add("complete", "error", f"{type(e).__name__}")
    if r.status == 503:
        return st.add("complete", "busy")
    if r.status != 200 or "choices" not in json.loads(data):
        return st.add("complete", "error", f"status {r.status}")
    st.add("complete", "ok", complete_total=time.monotonic() - t0)


MALFORMED = [
    ("bad json", "/v1/chat/completions", b'{"messages": [', "application/json", 400),
    ("not an object", "/v1/chat/completions", b"[1, 2]", "application/json", 400),
    ("wrong type", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": "many"}',
     "application/json", 400),
    ("text/plain", "/v1/chat/completions", b'{"messages": []}', "text/plain", 415),
    ("no endpoint", "/v1/nothing", b"{}", "application/json", 404),
    ("bad prompt", "/v1/completions", b'{"prompt": {"a": 1}}', "application/json", 400),
]


def do_malformed(port, rng, st):
    if rng.random() < 0.2:  # half a request, then a hang-up
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le")
            s.close()
            return st.add("malformed", "hangup")
        except OSError as e:
            return st.add("malformed", "error", f"hangup: {type(e).__name__}")
    name, path, body, ctype, want = rng.choice(MALFORMED)
    try:
        c, r = post(port, path, body, ctype)
        r.read()
        c.close()
    except OSError as e:
        return st.add("malformed", "error", f"{name}: {type(e).__name__}")
    if r.status != want:
        return st.add("malformed", "error", f"{name}: status {r.status}, expected {want}")
    st.add("malformed", "rejected")


def client(port, a, st, deadline, seed):
    rng = random.Random(seed)
    while time.monotonic() < deadline:
        busy = st.outcomes[("stream", "busy")] + st.outcomes[("complete", "busy")]
        x = rng.random()
        if x < 0.6:
            do_stream(port, rng, a, st, drop=False)
        elif x < 0.7:
            do_stream(port, rng, a, st, drop=True)
        elif x < 0.85:
            do_complete(port, rng, a, st)
        else:
            do_malformed(port, rng, st)
        if st.outcomes[("stream", "busy")] + st.outcomes[("complete", "busy")] > busy:
            time.sleep(rng.uniform(0.1, 0.5))  # a 503 says retry later: clients back off


def burster(port, a, st, deadline):
    rng = random.Random(a.seed + 7)
    n = a.parallel + a.queue + 8
    while time.monotonic() + a.burst_every < deadline:
        time.sleep(a.burst_every)
        ts = [threading.Thread(target=do_complete, args=(port, rng, a, st)) for _ in range(n)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()


def rss_mib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None


def slope_per_min(pts):
    n = len(pts)
    if n < 2:
        return 0.0
    mt = sum(t for t, _ in pts) / n
    mr = sum(r for _, r in pts) / n
    var = sum((t - mt) ** 2 for t, _ in pts)
    return sum((t - mt) * (r - mr) for t, r in pts) / var * 60 if var else 0.0


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))] if xs else float("nan")


def main():
    a = parse_args()
    proc, port, logname = start_server(a)
    st = Stats()
    rss = []
    t_start = time.monotonic()
    deadline = t_start + a.seconds
    threads = [threading.Thread(target=client, args=(port, a, st, deadline, a.seed * 1000 + i))
               for i in range(a.clients)]
    threads.append(threading.Thread(target=burster, args=(port, a, st, deadline)))
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        r = rss_mib(proc.pid)
        if r is not None:
            rss.append((time.monotonic() - t_start, r))
        time.sleep(1)
    alive = proc.poll() is None
    proc.terminate()
    try:
        rc = proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = "killed"
    elapsed = time.monotonic() - t_start

    print(f"qmix serve {a.model}: {a.clients} clients, {a.parallel} slots, queue {a.queue}, "
          f"{elapsed:.0f} s, {os.cpu_count()} cores")
    total = sum(st.requests.values())
    print(f"requests: {total} ({total / elapsed:.1f}/s)")
    for kind in sorted(st.requests):
        outs = ", ".join(f"{o} {n}" for (k, o), n in sorted(st.outcomes.items()) if k == kind)
        print(f"  {kind:<11} {st.requests[kind]:>6}: {outs}")
    nerr = sum(st.errors.values())
    print(f"unexpected errors: {nerr}")
    for e, n in st.errors.most_common():
        print(f"  {n:>6}  {e}")
    print("latency (s)        p50      p90      p99      max        n")
    for k in ("ttft", "stream_total", "complete_total"):
        xs = st.lat.get(k, [])
        if xs:
            print(f"  {k:<14} {pct(xs, 50):8.3f} {pct(xs, 90):8.3f} {pct(xs, 99):8.3f} "
                  f"{max(xs):8.3f} {len(xs):8d}")
    if rss:
        half = rss[len(rss) // 2:]
        print(f"RSS (MiB): start {rss[0][1]:.1f}, end {rss[-1][1]:.1f}, max "
              f"{max(r for _, r in rss):.1f}; trend {slope_per_min(rss):+.2f} MiB/min over the "
              f"run (the prefix cache filling), {slope_per_min(half):+.2f} MiB/min over the "
              f"second half ({min(r for _, r in half):.1f}..{max(r for _, r in half):.1f})")
    print(f"server: {'alive' if alive else 'DIED'} at the end, exit status {rc} after SIGTERM "
          f"(log: {logname})")
    sys.exit(1 if nerr or not alive or rc != 0 else 0)


if __name__ == "__main__":
    main()

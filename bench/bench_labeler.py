"""Latency of the web labeler (label.py serve) under several labelers at once: p50 and p99 of fetching the next
pair (GET /api/next) and of posting an answer (POST /api/answer), with N concurrent clients on a run that
already holds 10,000 labels. Starts a real server on 127.0.0.1 (Flask's threaded server, as `make label`
runs it) on a throwaway run directory and talks to it over HTTP, one keep-alive connection per client.

    .venv/bin/python bench/bench_labeler.py            # 8 clients x 250 answers, 10,000 labels on disk
"""
import argparse
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import contract as C  # noqa: E402


def make_run(directory, n_labels, n_open):
    """A run with n_labels answered pairs and n_open waiting ones, over 8 tiny clips."""
    import imageio.v2 as imageio
    os.makedirs(os.path.join(directory, C.CLIPS_DIR))
    C.write_json_atomic(os.path.join(directory, C.CONFIG), {  # as collect.py writes HalfCheetah-v5's
        "format_version": C.FORMAT_VERSION, "env_id": "HalfCheetah-v5", "env_kwargs": {}, "seed": 0, "dt": 0.05,
        "segment_seconds": 1.5, "segment_steps": 30, "obs_shape": [17], "act_shape": [6], "nq": 9, "nv": 9})
    frames = np.zeros((30, 128, 128, 3), np.uint8)
    frames[:, 40:80, 40:80] = 200
    imageio.mimwrite(os.path.join(directory, C.CLIPS_DIR, "0.mp4"), frames, fps=20, codec="libx264",
                     macro_block_size=16, ffmpeg_log_level="error")
    for i in range(1, 8):
        shutil.copy(os.path.join(directory, C.CLIPS_DIR, "0.mp4"), os.path.join(directory, C.CLIPS_DIR, f"{i}.mp4"))
    n = n_labels + n_open
    C.append_jsonl(os.path.join(directory, C.QUERIES), [
        {"query_id": q, "left": q % 8, "right": (q + 1) % 8, "left_clip": f"clips/{q % 8}.mp4",
         "right_clip": f"clips/{(q + 1) % 8}.mp4", "round": 0, "selection": "random", "policy_step": 0,
         "time": time.time()} for q in range(n)])
    now = time.time()
    C.append_jsonl(os.path.join(directory, C.LABELS), [
        {"query_id": q, "choice": "left", "labeler": f"earlier{q % 5}", "time": now - n_labels + q}
        for q in range(n_labels)])


def request(conn, method, path, body=None):
    headers = {"Content-Type": "application/json"} if body is not None else {}
    started = time.perf_counter()
    conn.request(method, path, body=None if body is None else json.dumps(body), headers=headers)
    response = conn.getresponse()
    data = response.read()
    elapsed = time.perf_counter() - started
    if response.status != 200:
        raise RuntimeError(f"{method} {path}: {response.status} {data[:200]!r}")
    return json.loads(data), elapsed


def client(port, name, answers, next_ms, answer_ms, errors):
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        holding = []
        for i in range(answers):
            r, t = request(conn, "GET", f"/api/next?labeler={name}&holding={','.join(map(str, holding))}")
            next_ms.append(t * 1000)
            holding.append(r["pair"]["query_id"])  # the page keeps the next pair preloaded
            if len(holding) < 2:
                continue
            query_id = holding.pop(0)
            _, t = request(conn, "POST", "/api/answer", {"query_id": query_id, "choice": "left", "labeler": name})
            answer_ms.append(t * 1000)
        conn.close()
    except Exception as e:  # reported by the main thread
        errors.append(f"{name}: {e}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--answers", type=int, default=250, help="answers per client")
    p.add_argument("--labels", type=int, default=10_000, help="labels on disk before the clients start")
    args = p.parse_args()
    directory = tempfile.mkdtemp(prefix="bench_labeler_")
    server = None
    try:
        run = os.path.join(directory, "run")
        make_run(run, args.labels, args.clients * (args.answers + 2))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = subprocess.Popen([sys.executable, os.path.join(ROOT, "label.py"), "serve", "--run", run,
                                   "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 30
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                request(conn, "GET", "/api/status")
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise SystemExit(f"the server did not start: {server.stderr.read().decode()[-2000:]}")
                time.sleep(0.2)
        next_ms, answer_ms, errors = [], [], []
        threads = [threading.Thread(target=client, args=(port, f"bench{k}", args.answers + 1, next_ms, answer_ms,
                                                         errors)) for k in range(args.clients)]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - started
        if errors:
            raise SystemExit("errors: " + "; ".join(errors[:5]))
        lines = open(os.path.join(run, C.LABELS), "rb").read().count(b"\n")
        print(f"web labeler, {args.clients} concurrent clients, {args.labels} labels on disk, "
              f"{len(answer_ms)} answers in {seconds:.1f} s ({len(answer_ms) / seconds:.0f} answers/s), "
              f"{os.cpu_count()} CPU cores; labels.jsonl now has {lines} lines")
        for name, ms in (("next pair (GET /api/next)", next_ms), ("post answer (POST /api/answer)", answer_ms)):
            print(f"  {name:32s} p50 {np.percentile(ms, 50):6.1f} ms   p99 {np.percentile(ms, 99):6.1f} ms   "
                  f"max {max(ms):6.1f} ms   ({len(ms)} requests)")
    finally:
        if server is not None:
            server.terminate()
            server.wait(10)
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()

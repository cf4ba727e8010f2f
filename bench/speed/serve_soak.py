"""Soak and load test of `tfglm serve`: `--clients` clients sending mixed good and bad REST and gRPC requests (and a
slow client every 2 s) while `--swaps` new model versions are written one after another, for at least `--seconds`.
Reports status counts (no 5xx, no dropped connection, no wrong answer expected), latency percentiles of the good
requests, and for each swap: how long the version took to load, the server's RSS once it serves it (its own and its
versions' processes'), the stall (the longest good request in flight as it was swapped in) and the new version's
time to its first answer (from the moment it is served to the first gRPC answer it gives).

The model is `configs/gpt-char-tiny.yaml`'s (4 x 128, context 64, characters), trained for 4 steps on a synthetic
corpus and exported with XLA (or without: `--no-jit-compile`); the server is `tfglm serve --max_batch_size 8` in a
process of its own. Good requests are greedy or seeded-sampled completions of short prompts, checked against the
answer each got alone at the start; a new version is a copy of version 1, so every version must answer the same. A
version is written once the one before it is served and `--swap-every` seconds have passed.

    nice -n 10 python -m bench.speed.serve_soak --clients 8 --swaps 20        # memory across redeploys
    nice -n 10 python -m bench.speed.serve_soak --clients 16 --seconds 150 --swaps 1 --swap-every 75   # latency
"""

import argparse
import json
import os
import random
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from bench import common
from tfglm.serving.export import export_run

PROMPTS = ["ROMEO:", "JULIET:", "To be, or", "What light", "O, speak"]
BAD_BODIES = [b'{"inputs": ', b'{"inputs": {"prompts": [1]}}', b'{"signature_name": ["generate"], "inputs": ["a"]}',
              b'{"inputs": {"prompts": [{"b64": "!!!="}]}}', b'{"inputs": {"prompts": ["a"], "x": [[1], [1, 2]]}}',
              b'{"inputs": {"prompts": ["a"], "max_new_tokens": 1000}}', b"[" * 50000]
RAW_BAD = [b"Content-Length: abc\r\n\r\n", b"Content-Length: -1\r\n\r\n", b"Content-Length: 100000000000\r\n\r\n",
           b"Content-Length: 99999999999999999999\r\n\r\n", b"Content-Length: 1000000000\r\n\r\n"]


def make_export(root, jit_compile):
    run_dir = common.tiny_run(root, "gpt-char-tiny.yaml")
    base = os.path.join(root, "models")
    export_run(run_dir, base, jit_compile=jit_compile)
    return base


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def children(pid):
    """The processes `pid` started (its served versions', multiprocessing's resource tracker)."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry))
        except (OSError, ValueError):
            pass
    return found


def server_rss_mb(pid):
    """(the server's own RSS, its child processes' together) in MB."""
    own, rest = rss_mb(pid), 0.0
    for child in children(pid):
        try:
            rest += rss_mb(child)
        except (OSError, StopIteration):  # ended meanwhile, or a zombie
            pass
    return own, rest


class Traffic:
    """The requests, each returning (kind, outcome, seconds, right): outcome an HTTP status, a gRPC code name or
    'dropped'; right False only for a good request answered wrongly."""

    def __init__(self, rest_port, grpc_port):
        self.url = f"http://127.0.0.1:{rest_port}/v1/models/m"
        self.rest_port = rest_port
        self.stub = prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(f"127.0.0.1:{grpc_port}"))
        self.solo = {}
        self.answered_by = {}  # version -> when it first answered a good gRPC request

    def post(self, body):
        request = urllib.request.Request(self.url + ":predict", body)
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as e:
            return e.code, json.load(e)

    def good_rest(self, rng):
        key = (rng.choice(PROMPTS), rng.choice([0.0, 0.8]), rng.randint(0, 3))
        body = {"inputs": {"prompts": [key[0]], "temperature": key[1], "seed": key[2]}}
        status, response = self.post(json.dumps(body).encode())
        answer = response.get("outputs", {}).get("completions")
        return "good_rest", status, self.solo.setdefault(key, answer) == answer

    def good_grpc(self, rng):
        prompt = rng.choice(PROMPTS)
        request = predict_pb2.PredictRequest()
        request.model_spec.name, request.model_spec.signature_name = "m", "generate"
        request.inputs["prompts"].CopyFrom(tf.make_tensor_proto([prompt]))
        try:
            response = self.stub.Predict(request, timeout=120)
        except grpc.RpcError as e:
            return "good_grpc", e.code().name, True
        answer = [c.decode() for c in tf.make_ndarray(response.outputs["completions"])]
        self.answered_by[response.model_spec.version.value] = min(
            time.monotonic(), self.answered_by.get(response.model_spec.version.value, float("inf")))
        return "good_grpc", "OK", self.solo.setdefault((prompt, 0.0, 0), answer) == answer

    def bad_rest(self, rng):
        return "bad_rest", self.post(rng.choice(BAD_BODIES))[0], True

    def bad_raw(self, rng):
        data = b"POST /v1/models/m:predict HTTP/1.1\r\nHost: t\r\nConnection: close\r\n" + rng.choice(RAW_BAD)
        return "bad_raw", raw_status(self.rest_port, data), True

    def bad_grpc(self, rng):
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "m"
        huge = tf.make_tensor_proto(np.int32(1))
        huge.tensor_shape.dim.add().size = 250_000_000
        request.inputs["prompts"].CopyFrom(tf.make_tensor_proto(["a"]))
        request.inputs["max_new_tokens"].CopyFrom(huge)
        try:
            self.stub.Predict(request, timeout=120)
            return "bad_grpc", "OK", True
        except grpc.RpcError as e:
            return "bad_grpc", e.code().name, True

    def slow(self, rng):
        data = b"POST /v1/models/m:predict HTTP/1.1\r\nHost: t\r\nX-Slow: " + b"a" * 200
        return "slow", raw_status(self.rest_port, data, pause_s=0.1), True

    def kinds(self):
        return [self.good_rest] * 8 + [self.good_grpc] * 4 + [self.bad_rest] * 2 + [self.bad_raw, self.bad_grpc]


def raw_status(port, data, pause_s=None):
    """The HTTP status of `data` sent on a socket (a byte every `pause_s` if given), 'dropped' if the server closed
    without answering, or 'reset' if the connection was reset before an answer was read."""
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        for i in range(len(data)) if pause_s else [None]:
            if select.select([sock], [], [], 0)[0]:  # the server has answered
                break
            sock.sendall(data if i is None else data[i:i + 1])
            if pause_s:
                time.sleep(pause_s)
        response = b""
        try:
            while chunk := sock.recv(65536):
                response += chunk
        except ConnectionResetError:
            if not response:
                return "reset"
    return int(response.split()[1]) if response else "dropped"


def served_version(traffic):
    return max(int(s["version"]) for s in json.load(urllib.request.urlopen(traffic.url, timeout=30))[
        "model_version_status"])


def soak(base, clients, seconds, swaps, swap_every, server_log, deadline_s=float("inf")):
    rest_port, grpc_port = free_port(), free_port()
    server = subprocess.Popen([sys.executable, "-m", "tfglm", "serve", "--model_name", "m", "--model_base_path", base,
                               "--port", str(grpc_port), "--rest_api_port", str(rest_port), "--max_batch_size", "8",
                               "--read_timeout_seconds", "2"],
                              stdout=server_log, stderr=subprocess.STDOUT)
    traffic = Traffic(rest_port, grpc_port)
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                urllib.request.urlopen(traffic.url, timeout=5).read()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "the server did not start"
                time.sleep(1)
        rng = random.Random(0)
        for _ in range(2):  # the solo answers
            for prompt in PROMPTS:
                for temperature in (0.0, 0.8):
                    for seed in range(4):
                        key = (prompt, temperature, seed)
                        body = {"inputs": {"prompts": [prompt], "temperature": temperature, "seed": seed}}
                        traffic.solo[key] = traffic.post(json.dumps(body).encode())[1]["outputs"]["completions"]
        results, stop, start = [], threading.Event(), time.monotonic()
        swapped = [{"version": 1, "load_s": None, "rss_mb": server_rss_mb(server.pid), "served_at": 0.0}]

        def client(seed):
            rng, kinds = random.Random(seed), traffic.kinds()
            while not stop.is_set():
                kind, sent = rng.choice(kinds), time.monotonic()
                try:
                    name, outcome, right = kind(rng)
                except OSError:
                    name, outcome, right = kind.__name__, "dropped", True
                results.append((name, outcome, time.monotonic() - sent, right, sent - start))

        def slow_clients():  # one every 2 s, each in a thread of its own, joined before the server stops
            while not stop.wait(2):
                threads.append(threading.Thread(target=lambda: results.append(
                    ("slow", traffic.slow(rng)[1], 0.0, True, time.monotonic() - start))))
                threads[-1].start()

        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        threads.append(threading.Thread(target=slow_clients))
        for thread in threads:
            thread.start()
        version = 1
        while (version <= swaps or time.monotonic() - start < seconds) and time.monotonic() - start < deadline_s:
            if version <= swaps and time.monotonic() - start - swapped[-1]["served_at"] >= swap_every:
                version += 1
                written = time.monotonic()
                shutil.copytree(os.path.join(base, "1"), os.path.join(base, f"tmp-{version}"))
                os.replace(os.path.join(base, f"tmp-{version}"), os.path.join(base, str(version)))
                while served_version(traffic) != version:
                    assert server.poll() is None and time.monotonic() - written < 900, f"version {version} not served"
                    time.sleep(0.05)
                served = time.monotonic()
                time.sleep(1)  # the version before it ends once its requests are done
                swapped.append({"version": version, "load_s": served - written, "rss_mb": server_rss_mb(server.pid),
                                "served_at": served - start})
                print(f"version {version} served after {served - written:.1f} s; RSS server + versions "
                      f"{swapped[-1]['rss_mb'][0]:.0f} + {swapped[-1]['rss_mb'][1]:.0f} MB", flush=True)
            time.sleep(0.5)
        stop.set()
        for thread in threads:  # by index: it also reaches a slow client started while slow_clients ends
            thread.join(timeout=300)
        for swap in swapped[1:]:
            first = traffic.answered_by.get(swap["version"])
            swap["first_answer_s"] = first - start - swap["served_at"] if first else None
            at = swap["served_at"]
            swap["stall_s"] = max((s for name, o, s, _, sent in results
                                   if name.startswith("good") and sent <= at <= sent + s), default=0.0)
    finally:
        server.terminate()
        server.wait(timeout=60)
    return results, swapped, time.monotonic() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=0, help="least seconds of traffic")
    parser.add_argument("--swaps", type=int, default=20, help="new versions written, one after another")
    parser.add_argument("--swap-every", type=float, default=5, help="least seconds between a version served and "
                                                                     "the next written")
    parser.add_argument("--deadline", type=float, default=float("inf"),
                        help="seconds of traffic after which no version is written (the report covers those swapped)")
    parser.add_argument("--no-jit-compile", action="store_true", help="export without XLA")
    parser.add_argument("--export", help="serve a copy of this export (a version directory) instead of training one")
    args = parser.parse_args()
    reference = common.machine_reference()
    with tempfile.TemporaryDirectory() as root, tempfile.TemporaryFile("w+") as server_log:
        if args.export:
            base = os.path.join(root, "models")
            shutil.copytree(args.export, os.path.join(base, "1"))
        else:
            base = make_export(root, not args.no_jit_compile)
        results, swapped, seconds = soak(base, args.clients, args.seconds, args.swaps, args.swap_every, server_log,
                                         args.deadline)
        server_log.seek(0)
        errors = [line for line in server_log if ": ERROR: " in line or "Traceback" in line]
    outcomes = {}
    for name, outcome, *_ in results:
        outcomes.setdefault(name, {}).setdefault(str(outcome), 0)
        outcomes[name][str(outcome)] += 1
    good = sorted(s for name, outcome, s, _, _ in results if name.startswith("good") and outcome in (200, "OK"))
    total = [sum(s["rss_mb"]) for s in swapped]
    slowest = sorted(({"kind": name, "sent_at_s": round(sent, 1), "seconds": round(s, 2)}
                      for name, outcome, s, _, sent in results if name.startswith("good") and outcome in (200, "OK")),
                     key=lambda r: -r["seconds"])[:5]  # placed beside the swaps' served_at
    summary = {
        "seconds": seconds, "machine": reference, "clients": args.clients, "requests": len(results),
        "5xx": sum(isinstance(o, int) and o >= 500 for _, o, *_ in results),
        "failed": sum(o not in (200, "OK") for name, o, *_ in results if name.startswith("good")),
        "dropped": sum(o == "dropped" for _, o, *_ in results),
        "wrong_answers": sum(not right for *_, right, _ in results),
        "good_requests": len(good), "requests_per_s": len(results) / seconds,
        **{f"p{q}_ms": 1000 * float(np.percentile(good, q)) for q in (50, 95, 99)}, "max_ms": 1000 * good[-1],
        "swaps": len(swapped) - 1, "rss_first_swap_mb": total[min(1, len(total) - 1)], "rss_last_mb": total[-1],
        "rss_ratio": total[-1] / total[min(1, len(total) - 1)],
        "first_answer_max_s": max((s["first_answer_s"] or float("inf") for s in swapped[1:]), default=None),
        "stall_max_s": max((s["stall_s"] for s in swapped[1:]), default=None),
        "server_errors_logged": len(errors), "xla": not args.no_jit_compile,
    }
    print("\noutcomes by kind:", json.dumps(outcomes, indent=1))
    common.print_table([{"version": s["version"], "load_s": s["load_s"], "server_mb": s["rss_mb"][0],
                         "versions_mb": s["rss_mb"][1], "total_mb": sum(s["rss_mb"]), "stall_s": s.get("stall_s"),
                         "first_answer_s": s.get("first_answer_s")} for s in swapped],
                       ["version", "load_s", "server_mb", "versions_mb", "total_mb", "stall_s", "first_answer_s"])
    common.print_table([summary], ["requests", "5xx", "failed", "dropped", "wrong_answers", "p50_ms", "p95_ms",
                                   "p99_ms", "max_ms", "rss_first_swap_mb", "rss_last_mb", "rss_ratio",
                                   "first_answer_max_s", "stall_max_s"])
    print("slowest good requests:", *slowest, sep="\n  ")
    print(f"server log: {len(errors)} errors", *errors[:5], sep="\n")
    name = f"serve_soak_{args.clients}_clients{'' if summary['xla'] else '_no_xla'}.json"
    common.write_json(name, {"summary": summary, "outcomes": outcomes, "swaps": swapped, "slowest": slowest})


if __name__ == "__main__":
    main()

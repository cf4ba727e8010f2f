"""Long-lived worker processes for the timing benchmarks: one model per process, so that no two frameworks share a
process's thread pools (TensorFlow and PyTorch in one process slow each other down) and per-process settings (XLA
flags, thread counts) stay per model.

A worker builds and warms up its model, prints one JSON line (`serve`'s `ready`), then for each line `n` on its stdin
runs `n` units of work and prints `{"seconds": ..., "value": ..., "peak_rss_mb": ...}`. The parent (`start`, `ask`)
asks every worker in turn, round after round, so a change of the machine's load falls on all of them alike.

No TensorFlow or PyTorch here: both kinds of worker import it.
"""

import json
import os
import subprocess
import sys
import tempfile
import time


def peak_rss_mb():
    """This process's peak resident set size in MB (VmHWM of /proc/self/status, Linux).

    Not `resource.getrusage(...).ru_maxrss`: Linux carries the forking parent's high-water mark into an exec'd child's
    ru_maxrss, so a worker started from a 1.3 GB benchmark process reports at least 1.3 GB.
    """
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def serve(run, ready):
    """The worker's side: prints `ready` (a dict) as one JSON line, then answers each stdin line `n` with the wall
    seconds of `run(n)`, its return value and the peak RSS so far."""
    print(json.dumps(ready), flush=True)
    for line in sys.stdin:
        start = time.perf_counter()
        value = run(int(line))
        print(json.dumps({"seconds": time.perf_counter() - start, "value": value, "peak_rss_mb": peak_rss_mb()}),
              flush=True)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where `python -m bench...` runs


def start(module, args):
    """Starts a worker, `python -m module args` at the repository root, and waits for its `ready` line; returns
    (process, ready dict). Raises RuntimeError with the end of its stderr if it exits first."""
    errors = tempfile.TemporaryFile("w+")  # not a pipe: a worker's logs must never fill it and block the worker
    process = subprocess.Popen([sys.executable, "-m", module, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=errors, text=True, cwd=ROOT)
    process.errors = errors
    return process, ask(process)


def ask(process, n=None):
    """Sends `n` (when given) and returns the worker's next JSON line."""
    if n is not None:
        process.stdin.write(f"{n}\n")
        process.stdin.flush()
    out = process.stdout.readline()
    if not out:
        process.wait()
        process.errors.seek(0)
        raise RuntimeError(" | ".join(process.errors.read().strip().splitlines()[-3:]) or "exited")
    return json.loads(out)


def stop(processes):
    """Closes the workers' stdin and waits for them to exit."""
    for process in processes:
        process.stdin.close()
        process.wait()

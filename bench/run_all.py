"""Runs every benchmark in turn (each in its own process), passing --quick unless --full is given.

    nice -n 10 .venv/bin/python bench/run_all.py [--full]

Tables go to stdout, JSON to bench/results/. Training runs first: data_throughput.py reads its JSON.
"""

import argparse
import os
import subprocess
import sys

SCRIPTS = ("train_throughput.py", "profile_train_step.py", "data_throughput.py", "quality_tiny_shakespeare.py",
           "generate_throughput.py", "probe_decode_step.py", "probe_decode_precision.py")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the full step counts (tens of minutes on 2 cores)")
    args = parser.parse_args()
    here = os.path.dirname(os.path.abspath(__file__))
    failed = []
    for script in SCRIPTS:
        print(f"\n== {script}", flush=True)
        cmd = [sys.executable, os.path.join(here, script)] + ([] if args.full else ["--quick"])
        if subprocess.run(cmd, check=False).returncode:
            failed.append(script)
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

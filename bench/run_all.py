"""Runs every benchmark that has a `--quick` form, in turn, each in its own process.

The speed benchmarks and the Tiny Shakespeare quality run, with --quick unless --full is given. The other quality runs,
`lora_cost` and `serve_soak` take tens of minutes to hours and run alone (bench/README.md gives their commands).

    nice -n 10 python -m bench.run_all [--full]

Tables go to stdout, JSON to bench/results/. Training runs first: data_throughput reads its JSON.
"""

import argparse
import subprocess
import sys

from bench import workers

MODULES = ("bench.speed.train_throughput", "bench.speed.data_throughput", "bench.speed.generate_throughput",
           "bench.speed.distribute_throughput", "bench.speed.serve_throughput", "bench.quality.tiny_shakespeare")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the full step counts (about an hour on 2 cores)")
    args = parser.parse_args()
    failed = []
    for module in MODULES:
        print(f"\n== {module}", flush=True)
        command = [sys.executable, "-m", module] + ([] if args.full else ["--quick"])
        if subprocess.run(command, check=False, cwd=workers.ROOT).returncode:
            failed.append(module)
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

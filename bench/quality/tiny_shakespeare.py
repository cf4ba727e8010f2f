"""Quality: nanoGPT's CPU recipe on Tiny Shakespeare with `tfglm.training.trainer.train` and configs/gpt-char-tiny.yaml
(4 x 128, context 64, batch 12, 2,000 steps, lr 1e-3, no dropout, 90/10 split, 200 validation batches).

Reports the validation loss at each validation point with its wall time (metrics.jsonl; the first point includes XLA
compilation) and the wall time at the first point at or below nanoGPT's 1.886 (its validation loss after 2,000
iterations, about 2 min 16 s on this machine). Skips when ../shared/data is absent.

    python -m bench.quality.tiny_shakespeare [--quick] [--set KEY=VALUE ...]
        # --quick: 500 steps (the target is not expected); --set: config overrides, e.g. train.learning_rate=3e-3
"""

import argparse
import os
import sys
import tempfile
import time

from bench import common
from tfglm.config import load_config
from tfglm.training import runs
from tfglm.training.trainer import train

NANOGPT_VAL_LOSS = 1.886
NANOGPT_SECONDS = 136


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="500 steps instead of 2,000")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    args = parser.parse_args()
    if not os.path.exists(common.SHAKESPEARE):
        print(f"SKIPPED: {os.path.normpath(common.SHAKESPEARE)} is absent (needs ../shared/data)")
        return 0
    overrides = [f"data.files={os.path.abspath(common.SHAKESPEARE)}", *(["train.steps=500"] if args.quick else []),
                 *args.set]
    config = load_config(os.path.join(common.CONFIGS, "gpt-char-tiny.yaml"), overrides)
    peak_before = common.matmul_peak_gflops()
    with tempfile.TemporaryDirectory() as run_dir:
        start = time.perf_counter()
        train(config, run_dir, verbose=0)
        total = time.perf_counter() - start
        rows = runs.read_metrics(run_dir)
    peak_after = common.matmul_peak_gflops()
    common.print_table(rows, ["step", "train_loss", "val_loss", "tokens_per_s", "wall_s"])
    reached = next((r for r in rows if r["val_loss"] <= NANOGPT_VAL_LOSS), None)
    print(f"{config.train.steps} steps: final validation loss {rows[-1]['val_loss']:.4f} "
          f"(nanoGPT: {NANOGPT_VAL_LOSS} after 2000 iterations, ~{NANOGPT_SECONDS} s here); "
          f"training wall time {rows[-1]['wall_s']:.1f} s, train() call {total:.1f} s")
    print(f"fp32 matmul peak (2048^2, XLA), a gauge of the machine's load: {peak_before:.1f} GFLOP/s before, "
          f"{peak_after:.1f} after (unloaded: about 105-112)")
    print(f"reached {NANOGPT_VAL_LOSS}: " + (f"at step {reached['step']}, {reached['wall_s']:.1f} s" if reached
                                             else "no"))
    common.write_json("quality_tiny_shakespeare.json", {
        "quick": args.quick, "overrides": args.set, "steps": config.train.steps,
        "eval_batches": config.train.eval_batches, "metrics": rows, "train_call_s": total,
        "matmul_peak_gflops": {"before": peak_before, "after": peak_after}, "target_val_loss": NANOGPT_VAL_LOSS,
        "reached_target": reached and {"step": reached["step"], "wall_s": reached["wall_s"]}})
    return 0


if __name__ == "__main__":
    sys.exit(main())

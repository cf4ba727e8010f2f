"""What LoRA costs against full fine-tuning: all-MiniLM-L6-v2 (imported with `tfglm import`) fine-tuned as an SST-2
classifier (context 64, batch 32, steps_per_execution 10, XLA) fully and with LoRA rank 8, each in its own process:
trainable parameters, the steady training step (a 2,000-row, one-epoch `tfglm.training.trainer.train` run first, which
compiles every length bucket, then 100 more steps timed), and the process's peak resident memory.

    pip install -e ".[bench]"
    python -m bench.speed.lora_cost [--rank 8]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from bench import extra

extra.require("all_minilm_l6_v2")

import all_minilm_l6_v2  # noqa: E402
import numpy as np  # noqa: E402

from bench import common, workers  # noqa: E402
from tfglm.training import runs  # noqa: E402
from tfglm.training.pretrained import import_checkpoint  # noqa: E402
from tfglm.training.trainer import train  # noqa: E402

MODES = ("full", "lora")
TIMED_STEPS = 100


def child(mode, rank, root):
    """One mode in this process: prints {"trainable_params", "step_ms", "peak_rss_mb"} as JSON."""
    config = runs.read_config(os.path.join(root, "minilm"), [
        "classify.text_column=sentence", "classify.label_column=label", "classify.epochs=1",
        "classify.batch_size=32", "classify.learning_rate=1e-4", "train.steps_per_execution=10",
        f"train.lora_rank={rank if mode == 'lora' else 0}", f"train.init_from={os.path.join(root, 'minilm')}",
        f"classify.train_file={os.path.join(root, 'train.tsv')}", f"classify.val_file={os.path.join(root, 'val.tsv')}"])
    run = train(config, os.path.join(root, mode), task="classify", verbose=0)
    dataset = common.without_autotune(run.task.datasets(0)[0])
    run.model.fit(dataset, epochs=1, steps_per_epoch=TIMED_STEPS, verbose=0)  # any bucket not yet compiled
    start = time.perf_counter()
    run.model.fit(dataset, epochs=1, steps_per_epoch=TIMED_STEPS, verbose=0)
    step_ms = 1e3 * (time.perf_counter() - start) / TIMED_STEPS
    trainable = sum(int(np.prod(v.shape)) for v in run.model.trainable_variables)
    print(json.dumps({"trainable_params": trainable, "params": run.model.count_params(), "step_ms": round(step_ms, 1),
                      "peak_rss_mb": round(workers.peak_rss_mb())}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.rank, args.root)
    result = {"rank": args.rank, "timed_steps": TIMED_STEPS, "machine": common.machine_reference()}
    with tempfile.TemporaryDirectory() as root:
        checkpoint = all_minilm_l6_v2.extract_model(os.path.join(root, "checkpoint"))
        import_checkpoint("huggingface", checkpoint, os.path.join(root, "minilm"), ["model.max_length=64"])
        common.subsample(os.path.join(common.SST2, "train.tsv"), "sentence", "label", 2000,
                         os.path.join(root, "train.tsv"))
        common.subsample(os.path.join(common.SST2, "dev.tsv"), "sentence", "label", 200, os.path.join(root, "val.tsv"))
        for mode in MODES:
            out = subprocess.run([sys.executable, "-m", "bench.speed.lora_cost", "--child", mode, "--rank",
                                  str(args.rank), "--root", root], check=True, capture_output=True, text=True,
                                 cwd=common.ROOT).stdout
            result[mode] = json.loads(out.strip().splitlines()[-1])
            print(mode, result[mode], flush=True)
    full, lora = result["full"], result["lora"]
    print(f"LoRA rank {args.rank}: {lora['trainable_params']:,} of {lora['params']:,} parameters train "
          f"({100 * lora['trainable_params'] / full['trainable_params']:.2f}% of full fine-tuning's "
          f"{full['trainable_params']:,}); step {lora['step_ms']} vs {full['step_ms']} ms "
          f"({full['step_ms'] / lora['step_ms']:.2f}x faster); peak RSS {lora['peak_rss_mb']} vs "
          f"{full['peak_rss_mb']} MB")
    common.write_json("lora_cost.json", result)


if __name__ == "__main__":
    main()

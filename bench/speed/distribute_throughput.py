"""Distributed training on CPU: tokens/s with 1 and 2 replicas for the same global batch, and the overhead of
tfglm's distributed loop against plain Keras `fit` on one device.

Three ways to train configs/gpt-char-tiny.yaml (4x128, context 64, global batch 12), in one process, alternating:
  fit          Keras `fit` on the default strategy (what one device uses)
  loop x1      `tfglm.training.distributed.fit_distributed` on the default strategy (the loop, no all-reduce)
  mirrored x2  `fit_distributed` under MirroredStrategy over 2 logical CPU devices (6 sequences each)
Two logical CPU devices share the same two cores, so x2 measures the loop's cross-replica overhead, not a speed-up.

    python -m bench.speed.distribute_throughput [--quick]
"""

import argparse
import os
import time

import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402
import numpy as np  # noqa: E402

from bench import common  # noqa: E402
from tfglm.config import load_config  # noqa: E402
from tfglm.data import corpus as data  # noqa: E402
from tfglm.models.gpt import GPT  # noqa: E402
from tfglm.training import distributed  # noqa: E402
from tfglm.training.trainer import compile_model  # noqa: E402


class Timer(keras.callbacks.Callback):
    """Seconds of each epoch's training (validation excluded)."""

    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_test_begin(self, logs=None):
        self.seconds = time.perf_counter() - self.start


def trainer(name, config, tokens):
    """A function that trains one epoch of `train.eval_interval` steps and returns its training seconds."""
    t, seq_len = config.train, config.model.max_length
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]) if name == "mirrored x2" \
        else tf.distribute.get_strategy()
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = GPT.from_config_tree(config.model, 67)
        compile_model(model, t)
    val = data.eval_dataset(tokens[-20000:], seq_len, t.batch_size, 1)
    timer, epoch = Timer(), [0]

    def run_epoch():
        train = data.train_dataset(tokens, seq_len, t.batch_size, t.seed, epoch[0] * t.eval_interval,
                                   t.eval_interval)
        kwargs = dict(epochs=epoch[0] + 1, initial_epoch=epoch[0], steps_per_epoch=t.eval_interval,
                      callbacks=[timer], verbose=0)
        if name == "fit":
            model.fit(train, validation_data=val, shuffle=False, **kwargs)
        else:
            distributed.fit_distributed(model, strategy, distributed.per_worker(train, t.batch_size),
                                        distributed.per_worker(val, t.batch_size),
                                        steps_per_execution=t.steps_per_execution, **kwargs)
        epoch[0] += 1
        return timer.seconds

    return run_epoch


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter rounds")
    args = parser.parse_args()
    steps, rounds = (100, 2) if args.quick else (200, 4)
    reference = common.machine_reference()
    config = load_config(os.path.join(common.CONFIGS, "gpt-char-tiny.yaml"),
                         [f"train.eval_interval={steps}", f"train.steps={steps * (rounds + 1)}"])
    stream = common.shakespeare_tokens()
    tokens = stream[0] if stream else np.random.default_rng(0).integers(0, 67, 400_000).astype("int32")
    names = ("fit", "loop x1", "mirrored x2")
    runners = {name: trainer(name, config, tokens) for name in names}
    compile_s = {name: runners[name]() for name in names}  # first epoch: XLA compilation included
    seconds = {name: [] for name in names}
    for _ in range(rounds):
        for name in names:
            seconds[name].append(runners[name]())
    tokens_per_step = config.train.batch_size * config.model.max_length
    rows = [{"mode": name, "tokens_per_s": steps * tokens_per_step / common.median(seconds[name]),
             "first_epoch_s": compile_s[name]} for name in names]
    for row in rows:
        row["vs_fit"] = row["tokens_per_s"] / rows[0]["tokens_per_s"]
    common.print_table(rows, ["mode", "tokens_per_s", "vs_fit", "first_epoch_s"])
    common.write_json("distribute_throughput.json", {"config": "gpt-char-tiny", "machine": reference,
                                                     "steps_per_round": steps,
                                                     "rounds": rounds, "rows": rows})


if __name__ == "__main__":
    main()

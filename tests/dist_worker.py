"""Runs tfglm.train.train in its own process for the distribution tests (TF_CONFIG and devices are per process).

usage: dist_worker.py OUT WEIGHTS_NPZ LOGICAL_CPUS RESUME OVERRIDE... [task=NAME] [reads=JSON]

With reads=JSON, the start of every block the worker reads from a prepared corpus's shards is written to JSON.
"""

import json
import logging
import sys

import numpy as np
import tensorflow as tf

logging.basicConfig(level=logging.INFO, format="tfglm: %(message)s")
out, weights_path, logical_cpus, resume, *overrides = sys.argv[1:]
if int(logical_cpus) > 1:
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * int(logical_cpus))

from tfglm.config import load_config  # noqa: E402
from tfglm.data import shards  # noqa: E402
from tfglm.errors import TfglmError  # noqa: E402
from tfglm.training.trainer import train  # noqa: E402

options = dict(o.split("=", 1) for o in overrides if o.startswith(("task=", "reads=")))
overrides = [o for o in overrides if not o.startswith(("task=", "reads="))]
read_starts, read_blocks = [], shards.TokenStream.blocks


def recorded_blocks(stream, starts, length):
    read_starts.extend(int(s) for s in starts)
    return read_blocks(stream, starts, length)


if "reads" in options:
    shards.TokenStream.blocks = recorded_blocks
try:
    model = train(load_config(overrides=overrides), out, task=options.get("task"), resume=resume == "1",
                  verbose=0).model
except TfglmError as e:
    print(f"tfglm: error: {e}", file=sys.stderr)
    sys.exit(2)
np.savez(weights_path, *[w.numpy() for w in model.weights])
if "reads" in options:
    with open(options["reads"], "w") as f:
        json.dump(read_starts, f)

"""Runs tfglm.train.train in its own process for the distribution tests (TF_CONFIG and devices are per process).

usage: dist_worker.py OUT WEIGHTS_NPZ LOGICAL_CPUS RESUME OVERRIDE... [task=NAME]
"""

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
from tfglm.errors import TfglmError  # noqa: E402
from tfglm.training.trainer import train  # noqa: E402

try:
    task = next((o.split("=", 1)[1] for o in overrides if o.startswith("task=")), None)
    overrides = [o for o in overrides if not o.startswith("task=")]
    model = train(load_config(overrides=overrides), out, task=task, resume=resume == "1", verbose=0).model
except TfglmError as e:
    print(f"tfglm: error: {e}", file=sys.stderr)
    sys.exit(2)
np.savez(weights_path, *[w.numpy() for w in model.weights])

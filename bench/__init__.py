"""tfglm's benchmarks (not tests): `speed/` side by side with peers, `quality/` each beside a simple baseline, `data/`
the converters they use. Run from the repository root as modules, e.g. `python -m bench.speed.train_throughput`."""

import os

# Quiet TensorFlow's C++ start-up chatter: this package is imported before any benchmark imports TensorFlow.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

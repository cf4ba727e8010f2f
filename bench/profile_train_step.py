"""Where a GPT training step's time goes, for `configs/gpt-char-tiny.yaml` (or `--config`), in one process: the
`fit` step at the steady rate; Keras's `train_step` alone under XLA on one fixed batch; forward + backward without
the optimizer; the forward pass; and the step's matrix multiplications alone (every dense layer's forward, input-
gradient and weight-gradient GEMM, the attention einsums and the tied output projection, at the step's shapes),
beside the 2048² matmul peak. The gap between the GEMMs and the step is what layer norms, GELU, softmax, masking,
the loss, AdamW and the loop cost.

    nice -n 10 python bench/profile_train_step.py [--config gpt-char-tiny.yaml] [--steps 200] [--quick]
"""

import argparse
import os
import time

import common
import keras
import numpy as np
import tensorflow as tf

from tfglm.config import load_config
from tfglm.models.gpt import GPT
from tfglm.training.trainer import compile_model


def mean_ms(fn, repeats):
    fn()
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1000


def step_gemms(batch, length, hidden, inner, heads, layers, vocab):
    """One jitted function running the training step's GEMMs (forward, input gradient, weight gradient) on random
    operands; returns it and its FLOPs."""
    rows = batch * length
    dense = [(rows, hidden, 3 * hidden), (rows, hidden, hidden), (rows, hidden, inner), (rows, inner, hidden)] * layers
    dense.append((rows, hidden, vocab))
    operands = [(tf.random.normal([m, k]), tf.random.normal([k, n]), tf.random.normal([m, n])) for m, k, n in dense]
    head_dim = hidden // heads
    q = tf.random.normal([batch, heads, length, head_dim])
    scores = tf.random.normal([batch, heads, length, length])

    @tf.function(jit_compile=True)
    def run():
        total = 0.0
        for x, w, dy in operands:
            total += tf.reduce_sum(x @ w) + tf.reduce_sum(dy @ tf.transpose(w)) + tf.reduce_sum(tf.transpose(x) @ dy)
        for _ in range(layers):  # QKᵀ and PV forward, and their two gradients each
            for _ in range(3):
                total += tf.reduce_sum(tf.einsum("bhqd,bhkd->bhqk", q, q))
                total += tf.reduce_sum(tf.einsum("bhqk,bhkd->bhqd", scores, q))
        return total

    flops = sum(6 * m * k * n for m, k, n in dense) + layers * 3 * 2 * 2 * batch * heads * length * length * head_dim
    return run, flops


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="gpt-char-tiny.yaml")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--quick", action="store_true", help="100 steps")
    args = parser.parse_args()
    args.steps = 100 if args.quick else args.steps
    config = load_config(os.path.join(common.CONFIGS, args.config), ["model.dropout=0.0"])
    m, t = config.model, config.train
    vocab = 65
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, (t.batch_size, m.max_length + 1), dtype=np.int32)
    x, y = tf.constant(tokens[:, :-1]), tf.constant(tokens[:, 1:])
    model = GPT.from_config_tree(m, vocab)
    compile_model(model, t)
    dataset = common.without_autotune(tf.data.Dataset.from_tensors((x, y)).repeat())
    peak = common.matmul_peak_gflops()

    steps = args.steps - args.steps % t.steps_per_execution
    model.fit(dataset, steps_per_epoch=t.steps_per_execution * 2, epochs=1, verbose=0)
    start = time.perf_counter()
    model.fit(dataset, steps_per_epoch=steps, epochs=1, verbose=0)
    fit_ms = (time.perf_counter() - start) / steps * 1000

    train_step = tf.function(lambda: model.train_step((x, y)), jit_compile=True)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function(jit_compile=True)
    def gradients():
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        return tape.gradient(loss, model.trainable_variables)

    forward = tf.function(lambda: model(x), jit_compile=True)
    gemms, gemm_flops = step_gemms(t.batch_size, m.max_length, m.hidden_dim, 4 * m.hidden_dim, m.num_heads,
                                   m.num_layers, vocab)
    repeats = max(10, steps // 4)
    rows = [("fit step", fit_ms),
            ("train_step (XLA, no fit loop)", mean_ms(lambda: train_step()["loss"].numpy(), repeats)),
            ("forward + backward", mean_ms(lambda: gradients()[0].numpy(), repeats)),
            ("forward", mean_ms(lambda: forward().numpy(), repeats)),
            ("GEMMs of the step alone", mean_ms(lambda: gemms().numpy(), repeats))]
    table = [{"part": name, "ms": ms, "share_of_fit": ms / fit_ms} for name, ms in rows]
    tokens_per_step = t.batch_size * m.max_length
    result = {"config": args.config, "matmul_peak_gflops": peak, "gemm_gflop_per_step": gemm_flops / 1e9,
              "gemm_gflops_alone": gemm_flops / rows[-1][1] / 1e6, "fit_tokens_per_s": tokens_per_step / fit_ms * 1000,
              "parts": table}
    common.write_json("profile_train_step.json", result)
    common.print_table(table, ["part", "ms", "share_of_fit"])
    print(f"matmul peak {peak:.0f} GFLOP/s; the step's GEMMs: {gemm_flops / 1e9:.2f} GFLOP, "
          f"{result['gemm_gflops_alone']:.0f} GFLOP/s alone; fit: {result['fit_tokens_per_s']:.0f} tokens/s")


if __name__ == "__main__":
    main()

"""Training throughput: tfglm's GPT vs KerasHub's GPT2CausalLM of the identical config, side by side.

For configs/gpt-char-tiny.yaml and configs/gpt-char-shakespeare.yaml (dropout forced to 0): both models compiled
with XLA and the same AdamW + loss (`tfglm.train.compile_model`; KerasHub's default accuracy metric removed), fed the
same batches (Tiny Shakespeare via `tfglm.data.train_dataset`, or random tokens without ../shared/data). Warm-up
first (the first `fit` call's time, minus its steps at the steady rate, is reported as compile time), then timed
rounds alternating tfglm / KerasHub. Peak RSS: each model trains in its own subprocess.

    python bench/train_throughput.py [--quick] [--only tiny|shakespeare]
"""

import argparse
import json
import os
import subprocess
import sys
import time

import common  # noqa: F401  (sets TF_CPP_MIN_LOG_LEVEL before TensorFlow loads)
import keras
import keras_hub
import numpy as np
import tensorflow as tf

from tfglm.data import corpus as data
from tfglm.config import load_config
from tfglm.models.gpt import GPT
from tfglm.tasks.trainer import compile_model

MODELS = ("tfglm", "keras_hub")
# name: (config file, full plan, quick plan); a plan is (steps_per_execution, warm-up steps, steps a round, rounds).
# The 6x384 steps take ~10 s here, so steps_per_execution there is 1 (the config's 10 would make each execution
# ~100 s); per-execution overhead is negligible at that step time.
SETUPS = {
    "tiny": ("gpt-char-tiny.yaml", (50, 100, 100, 5), (50, 50, 50, 2)),
    "shakespeare": ("gpt-char-shakespeare.yaml", (1, 3, 1, 5), (1, 2, 1, 2)),
}


def load(name, steps_per_execution):
    return load_config(os.path.join(common.CONFIGS, SETUPS[name][0]),
                       ["model.dropout=0.0", f"train.steps_per_execution={steps_per_execution}"])


def batches(config, count):
    """`count` identical-for-both batches (inputs, targets) as numpy arrays, and where they came from."""
    m, t = config.model, config.train
    stream = common.shakespeare_tokens()
    if stream is None:
        rng = np.random.default_rng(0)
        x = rng.integers(0, 67, (count, t.batch_size, m.max_length + 1), dtype=np.int32)
        return x[..., :-1], x[..., 1:], 67, "random tokens (../shared/data absent)"
    ds = data.train_dataset(stream[0], m.max_length, t.batch_size, t.seed, 0, count)
    xs, ys = zip(*ds.as_numpy_iterator())
    return np.stack(xs), np.stack(ys), stream[2], "Tiny Shakespeare (tfglm.data.train_dataset)"


def build(kind, config, vocab_size):
    """(compiled model, parameters excluding position embeddings, the model's input dataset builder)."""
    m = config.model
    if kind == "tfglm":
        model = GPT.from_config_tree(m, vocab_size)
        compile_model(model, config.train)
        position = model.position_embedding.count_params()
        return model, model.count_params() - position, lambda x: x
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=vocab_size, num_layers=m.num_layers, num_heads=m.num_heads, hidden_dim=m.hidden_dim,
        intermediate_dim=4 * m.hidden_dim, dropout=0.0, max_sequence_length=m.max_length)
    model = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    compile_model(model, config.train)
    # Same optimizer object and loss; drop CausalLM's default accuracy metric, which tfglm's model doesn't compute.
    model.compile(optimizer=model.optimizer, loss=model.loss, weighted_metrics=[], jit_compile=True,
                  steps_per_execution=config.train.steps_per_execution)
    position = backbone.get_layer("position_embedding").count_params()
    return model, model.count_params() - position, lambda x: {"token_ids": x, "padding_mask": tf.ones_like(x)}


def fit_seconds(model, dataset, steps):
    """Wall seconds of `steps` training steps, and the last loss."""
    start = time.perf_counter()
    history = model.fit(dataset, epochs=1, steps_per_epoch=steps, verbose=0)
    return time.perf_counter() - start, float(history.history["loss"][-1])


def child(kind, name, steps, quick):
    """Subprocess entry: trains one model for its warm-up steps and prints its peak RSS as JSON."""
    spe, warmup, _, _ = SETUPS[name][2 if quick else 1]
    config = load(name, spe)
    x, y, vocab, _ = batches(config, warmup)
    rss_before = common.peak_rss_mb()
    model, _, inputs = build(kind, config, vocab)
    dataset = common.without_autotune(tf.data.Dataset.from_tensor_slices((inputs(x), y)).repeat())
    fit_seconds(model, dataset, steps)
    print(json.dumps({"rss_before_model_mb": rss_before, "peak_rss_mb": common.peak_rss_mb()}))


def peak_rss(kind, name, quick):
    spe = SETUPS[name][2 if quick else 1][0]
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, "--only", name, "--steps", str(2 * spe)]
    cmd += ["--quick"] if quick else []
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def run_config(name, quick):
    spe, warmup, round_steps, rounds = SETUPS[name][2 if quick else 1]
    config = load(name, spe)
    m, t = config.model, config.train
    x, y, vocab, source = batches(config, max(warmup, round_steps))
    tokens_per_step = t.batch_size * m.max_length
    rows = []
    runs = {}
    for kind in MODELS:
        keras.utils.set_random_seed(t.seed)
        model, params, inputs = build(kind, config, vocab)
        dataset = common.without_autotune(tf.data.Dataset.from_tensor_slices((inputs(x), y)).repeat())
        first, _ = fit_seconds(model, dataset, spe)  # compiles
        if warmup > spe:
            fit_seconds(model, dataset, warmup - spe)
        runs[kind] = {"model": model, "dataset": dataset, "params": params, "first": first, "times": []}
    for _ in range(rounds):
        for kind in MODELS:
            seconds, loss = fit_seconds(runs[kind]["model"], runs[kind]["dataset"], round_steps)
            runs[kind]["times"].append(seconds / round_steps)
            runs[kind]["loss"] = loss
    for kind in MODELS:
        r = runs[kind]
        step = common.median(r["times"])
        flops_per_token = 6 * r["params"] + 12 * m.num_layers * m.hidden_dim * m.max_length
        rows.append({
            "config": name, "model": kind, "params_no_pos": r["params"], "step_ms": 1e3 * step,
            "step_ms_all": [round(1e3 * s, 2) for s in r["times"]], "tokens_per_s": tokens_per_step / step,
            "gflops": flops_per_token * tokens_per_step / step / 1e9, "flops_per_token": flops_per_token,
            "compile_s": r["first"] - spe * step, "loss": r["loss"], **peak_rss(kind, name, quick)})
    # The load moves between rounds, not within one pair: the median of the paired per-round ratios is the figure.
    ratio = common.median([k / t for t, k in zip(runs["tfglm"]["times"], runs["keras_hub"]["times"])])
    print(f"{name}: " + ", ".join(f"{r['model']} {r['tokens_per_s']:.0f} tokens/s" for r in rows)
          + f", tfglm/KerasHub {ratio:.3f}", flush=True)
    return {"config": name, "file": SETUPS[name][0], "data": source, "batch_size": t.batch_size,
            "context": m.max_length, "steps_per_execution": spe, "warmup_steps": warmup, "steps_per_round": round_steps,
            "rounds": rounds, "rows": rows, "tfglm_over_keras_hub": ratio}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer warm-up and timed steps")
    parser.add_argument("--only", choices=sorted(SETUPS), help="one config only")
    parser.add_argument("--child", choices=MODELS, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.only, args.steps, args.quick)

    peak_before = common.matmul_peak_gflops()
    results = [run_config(name, args.quick) for name in ([args.only] if args.only else SETUPS)]
    peak_after = common.matmul_peak_gflops()
    peak = max(peak_before, peak_after)
    rows = [row for r in results for row in r["rows"]]
    for row in rows:
        row["pct_of_matmul_peak"] = 100 * row["gflops"] / peak
    common.print_table(rows, ["config", "model", "params_no_pos", "step_ms", "tokens_per_s", "gflops",
                              "pct_of_matmul_peak", "compile_s", "peak_rss_mb", "loss"])
    for r in results:
        print(f"{r['config']}: tfglm / KerasHub tokens/s = {r['tfglm_over_keras_hub']:.3f} (median of paired rounds; "
              f"step ms by round: tfglm {r['rows'][0]['step_ms_all']}, KerasHub {r['rows'][1]['step_ms_all']}) "
              f"({r['data']}, {r['rounds']} rounds x {r['steps_per_round']} steps, "
              f"steps_per_execution {r['steps_per_execution']})")
    print(f"fp32 matmul peak (2048^2, XLA): {peak_before:.1f} GFLOP/s before, {peak_after:.1f} after")
    common.write_json("train_throughput.json", {
        "quick": args.quick, "matmul_peak_gflops": {"before": peak_before, "after": peak_after},
        "flops_note": "FLOPs/token = 6*N + 12*L*d*T (nanoGPT); N excludes position embeddings", "results": results})


if __name__ == "__main__":
    main()

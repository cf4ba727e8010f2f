"""Training throughput: tfglm's GPT vs KerasHub's GPT2CausalLM and two PyTorch GPTs of the identical config.

For configs/gpt-char-tiny.yaml and configs/gpt-char-shakespeare.yaml (dropout forced to 0): tfglm and KerasHub
compiled with XLA and the same AdamW + loss (`tfglm.train.compile_model`; KerasHub's default accuracy metric
removed); Hugging Face transformers' `GPT2LMHeadModel` and nanoGPT's model (`torch_gpt.py`) in eager PyTorch on the
CPU with the same AdamW settings, schedule, clipping and loss (`torch_train.py`). All four are fed the same batches
(Tiny Shakespeare via `tfglm.data.train_dataset`, or random tokens without ../shared/data). Warm-up first (the first
call's time, minus its steps at the steady rate, is reported as compile time), then timed rounds alternating tfglm /
KerasHub / HF-torch / nanoGPT-torch; the ratios are tfglm's tokens/s over each peer's, medians of the per-round
pairs. Peak RSS: each model trains in its own subprocess (the PyTorch ones without TensorFlow).

    python bench/train_throughput.py [--quick] [--only tiny|shakespeare]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

if "--child" not in sys.argv:  # not in the Keras models' peak-RSS children, which should not carry PyTorch
    import torch_train  # PyTorch before TensorFlow: torch_train.py says why

import common  # noqa: F401  (sets TF_CPP_MIN_LOG_LEVEL before TensorFlow loads)
import keras
import keras_hub
import numpy as np
import tensorflow as tf

from tfglm.data import corpus as data
from tfglm.config import load_config
from tfglm.models.gpt import GPT
from tfglm.tasks.trainer import compile_model

TF_MODELS = ("tfglm", "keras_hub")
MODELS = TF_MODELS + ("hf_torch", "nanogpt_torch")  # the PyTorch ones: torch_train.KINDS
NAMES = {"tfglm": "tfglm", "keras_hub": "KerasHub", "hf_torch": "HF-torch", "nanogpt_torch": "nanoGPT-torch"}
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


def runner(kind, config, vocab, x, y):
    """(fit(steps) -> (wall seconds, last loss), parameters excluding position embeddings, notes for the JSON)."""
    if kind in TF_MODELS:
        keras.utils.set_random_seed(config.train.seed)
        model, params, inputs = build(kind, config, vocab)
        dataset = common.without_autotune(tf.data.Dataset.from_tensor_slices((inputs(x), y)).repeat())
        return lambda steps: fit_seconds(model, dataset, steps), params, {}
    c = torch_train.config_of(config, vocab)
    trainer = torch_train.Trainer(kind, c["model"], c["train"], vocab, x, y)

    def fit(steps):
        start = time.perf_counter()
        loss = trainer.fit(steps)
        return time.perf_counter() - start, loss

    threads = torch_train.torch.get_num_threads()
    return fit, trainer.params_no_pos, {"attention": trainer.attention, "torch_threads": threads}


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


def peak_rss(kind, name, quick, config, vocab, x, y):
    spe = SETUPS[name][2 if quick else 1][0]
    with tempfile.TemporaryDirectory() as tmp:
        if kind in TF_MODELS:
            cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, "--only", name, "--steps", str(2 * spe)]
            cmd += ["--quick"] if quick else []
        else:  # the same batches, handed over in a file: the child does not import TensorFlow
            np.savez(os.path.join(tmp, "batches.npz"), x=x, y=y)
            cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_train.py"), kind,
                   os.path.join(tmp, "batches.npz"), json.dumps(torch_train.config_of(config, vocab)), str(2 * spe)]
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
        fit, params, notes = runner(kind, config, vocab, x, y)
        first, _ = fit(spe)  # compiles (TensorFlow), first-call set-up (PyTorch)
        if warmup > spe:
            fit(warmup - spe)
        runs[kind] = {"fit": fit, "params": params, "notes": notes, "first": first, "times": []}
    for _ in range(rounds):
        for kind in MODELS:
            seconds, loss = runs[kind]["fit"](round_steps)
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
            "compile_s": r["first"] - spe * step, "loss": r["loss"], **r["notes"],
            **peak_rss(kind, name, quick, config, vocab, x, y)})
    # The load moves between rounds, not within one pair: the median of the paired per-round ratios is the figure.
    ratios = {f"tfglm_over_{kind}": common.median([k / t for t, k in zip(runs["tfglm"]["times"], runs[kind]["times"])])
              for kind in MODELS[1:]}
    print(f"{name}: " + ", ".join(f"{NAMES[r['model']]} {r['tokens_per_s']:.0f} tokens/s" for r in rows) + ", "
          + ", ".join(f"tfglm/{NAMES[kind]} {ratios[f'tfglm_over_{kind}']:.3f}" for kind in MODELS[1:]), flush=True)
    return {"config": name, "file": SETUPS[name][0], "data": source, "batch_size": t.batch_size,
            "context": m.max_length, "steps_per_execution": spe, "warmup_steps": warmup, "steps_per_round": round_steps,
            "rounds": rounds, "rows": rows, **ratios}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer warm-up and timed steps")
    parser.add_argument("--only", choices=sorted(SETUPS), help="one config only")
    parser.add_argument("--child", choices=TF_MODELS, help=argparse.SUPPRESS)
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
        print(f"{r['config']}: tfglm tokens/s over " + ", ".join(
            f"{NAMES[kind]} {r[f'tfglm_over_{kind}']:.3f}" for kind in MODELS[1:]) + " (medians of paired rounds; "
              "step ms by round: " + ", ".join(f"{NAMES[row['model']]} {row['step_ms_all']}" for row in r["rows"])
              + f") ({r['data']}, {r['rounds']} rounds x {r['steps_per_round']} steps, "
              f"steps_per_execution {r['steps_per_execution']} for the Keras models)")
    print(f"fp32 matmul peak (2048^2, XLA): {peak_before:.1f} GFLOP/s before, {peak_after:.1f} after")
    common.write_json("train_throughput.json", {
        "quick": args.quick, "matmul_peak_gflops": {"before": peak_before, "after": peak_after},
        "flops_note": "FLOPs/token = 6*N + 12*L*d*T (nanoGPT); N excludes position embeddings", "results": results})


if __name__ == "__main__":
    main()

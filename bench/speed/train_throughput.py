"""Training throughput: tfglm's GPT vs KerasHub's GPT2CausalLM and two PyTorch GPTs of the identical config.

For configs/gpt-char-tiny.yaml and configs/gpt-char-shakespeare.yaml (dropout forced to 0): tfglm and KerasHub compiled
with XLA and the same AdamW + loss (`tfglm.training.trainer.compile_model`; KerasHub's default accuracy metric removed);
Hugging Face transformers' `GPT2LMHeadModel` and nanoGPT's model (`torch_gpt.py`) in eager PyTorch on the CPU with the
same AdamW settings, schedule, clipping and loss (`torch_train.py`). All four are fed the same batches (Tiny Shakespeare
via `tfglm.data.corpus.train_dataset`, or random tokens without ../shared/data). Warm-up first (the first call's time,
minus its steps at the steady rate, is reported as compile time), then timed rounds alternating tfglm / KerasHub /
HF-torch / nanoGPT-torch; the ratios are tfglm's tokens/s over each peer's, medians of the per-round pairs. Each model
trains in its own worker process (`bench/workers.py`; the PyTorch ones, `torch_train.py`, without TensorFlow), so no two
frameworks share a process's threads, and each reports its own peak RSS.

    python -m bench.speed.train_throughput [--quick] [--only tiny|shakespeare]
"""

import argparse
import os
import tempfile

import keras
import keras_hub
import numpy as np
import tensorflow as tf

from bench import common, extra, workers
from tfglm.config import load_config
from tfglm.data import corpus as data
from tfglm.models.gpt import GPT
from tfglm.training.trainer import compile_model

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


def overrides(steps_per_execution):
    return ["model.dropout=0.0", f"train.steps_per_execution={steps_per_execution}"]


def load(name, steps_per_execution):
    return load_config(os.path.join(common.CONFIGS, SETUPS[name][0]), overrides(steps_per_execution))


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
    return np.stack(xs), np.stack(ys), stream[2], "Tiny Shakespeare (tfglm.data.corpus.train_dataset)"


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


def worker(kind, name, batches_path, quick):
    """A Keras model's worker process: builds `kind` for config `name`, then trains the steps it is asked for."""
    config = load(name, SETUPS[name][2 if quick else 1][0])
    batches = np.load(batches_path)
    rss_before = workers.peak_rss_mb()
    keras.utils.set_random_seed(config.train.seed)
    model, params, inputs = build(kind, config, int(batches["vocab"]))
    dataset = tf.data.Dataset.from_tensor_slices((inputs(batches["x"]), batches["y"])).repeat()
    dataset = common.without_autotune(dataset)

    def fit(steps):  # the last loss
        return float(model.fit(dataset, epochs=1, steps_per_epoch=steps, verbose=0).history["loss"][-1])

    workers.serve(fit, {"rss_before_model_mb": rss_before, "params_no_pos": params})


def command(kind, name, batches_path, quick):
    """The worker of `kind` as (module, arguments) for `workers.start`."""
    if kind in TF_MODELS:
        return "bench.speed.train_throughput", ["--worker", kind, "--only", name, "--batches", batches_path] + (
            ["--quick"] if quick else [])
    spe = SETUPS[name][2 if quick else 1][0]
    return "bench.speed.torch_train", [kind, batches_path, os.path.join(common.CONFIGS, SETUPS[name][0]),
                                       *overrides(spe)]


def run_config(name, quick):
    spe, warmup, round_steps, rounds = SETUPS[name][2 if quick else 1]
    config = load(name, spe)
    m, t = config.model, config.train
    x, y, vocab, source = batches(config, max(warmup, round_steps))
    tokens_per_step = t.batch_size * m.max_length
    rows = []
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        batches_path = os.path.join(tmp, "batches.npz")
        np.savez(batches_path, x=x, y=y, vocab=vocab)
        for kind in MODELS:  # one at a time: a model compiling must not share the cores with another
            process, ready = workers.start(*command(kind, name, batches_path, quick))
            first = workers.ask(process, spe)["seconds"]  # compiles (TensorFlow), first-call set-up (PyTorch)
            if warmup > spe:
                workers.ask(process, warmup - spe)
            notes = {k: v for k, v in ready.items() if k not in ("params_no_pos", "rss_before_model_mb")}
            runs[kind] = {"process": process, "ready": ready, "notes": notes, "first": first, "times": []}
        for _ in range(rounds):
            for kind in MODELS:
                out = workers.ask(runs[kind]["process"], round_steps)
                runs[kind]["times"].append(out["seconds"] / round_steps)
                runs[kind].update(loss=out["value"], peak_rss_mb=out["peak_rss_mb"])
        workers.stop(r["process"] for r in runs.values())
    for kind in MODELS:
        r = runs[kind]
        step = common.median(r["times"])
        params = r["ready"]["params_no_pos"]
        flops_per_token = 6 * params + 12 * m.num_layers * m.hidden_dim * m.max_length
        rows.append({
            "config": name, "model": kind, "params_no_pos": params, "step_ms": 1e3 * step,
            "step_ms_all": [round(1e3 * s, 2) for s in r["times"]], "tokens_per_s": tokens_per_step / step,
            "gflops": flops_per_token * tokens_per_step / step / 1e9, "flops_per_token": flops_per_token,
            "compile_s": r["first"] - spe * step, "loss": r["loss"], **r["notes"],
            "rss_before_model_mb": r["ready"]["rss_before_model_mb"], "peak_rss_mb": r["peak_rss_mb"]})
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
    parser.add_argument("--worker", choices=TF_MODELS, help=argparse.SUPPRESS)
    parser.add_argument("--batches", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.only, args.batches, args.quick)
    extra.require("torch", "transformers")  # the PyTorch peers' workers

    reference = common.machine_reference()
    peak_before = reference["matmul_gflops"]
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
        "quick": args.quick, "machine": reference, "matmul_peak_gflops": {"before": peak_before, "after": peak_after},
        "flops_note": "FLOPs/token = 6*N + 12*L*d*T (nanoGPT); N excludes position embeddings", "results": results})


if __name__ == "__main__":
    main()

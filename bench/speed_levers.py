"""Speed levers, one by one: the tiny config's training step (and batch-1 greedy decoding of the shakespeare-sized
model) under each XLA CPU flag, thread setting and compile option, against the default and against the
nanoGPT-style PyTorch model, in alternating rounds.

Every lever runs in its own long-lived subprocess (XLA flags and thread pools are fixed when TensorFlow starts),
built and warmed up once; then each round asks every process in turn for the same number of steps, so a change of
the machine's load falls on all levers alike. The figure is each lever's median per-round ratio to the default
(> 1: faster). A lever whose process fails to start (an XLA flag this build rejects) is reported as such.

    python bench/speed_levers.py [--only train|decode] [--levers a,b] [--rounds 5] [--steps 100]
        [--tokens 256]
"""

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))

# name -> (XLA_FLAGS, tfglm config overrides, TensorFlow intra-op threads or None)
LEVERS = {
    "default": ("", [], None),
    "no_xla": ("", ["train.jit_compile=false"], None),
    "fast_math": ("--xla_cpu_enable_fast_math=true", [], None),
    "legacy_runtime": ("--xla_cpu_use_thunk_runtime=false", [], None),
    "xnnpack": ("--xla_cpu_use_xnnpack=true", [], None),
    "xnn_fusion": ("--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY", [], None),
    "onednn": ("--xla_cpu_use_onednn=true", [], None),
    "no_fusion_emitters": ("--xla_cpu_use_fusion_emitters=false", [], None),
    "concurrency_scheduler": ("--xla_cpu_enable_concurrency_optimized_scheduler=true", [], None),
    "single_thread_eigen": ("--xla_cpu_multi_thread_eigen=false", [], None),
    "intra_op_1": ("", [], 1),
}
TORCH = "nanogpt_torch"
CONFIGS = {"train": "gpt-char-tiny.yaml", "decode": "gpt-char-shakespeare.yaml"}
DECODE_TOKENS = 128  # generate_throughput.py's: 16-token prompt, 128 new tokens, vocabulary 50,257


def tf_worker(what, overrides, threads):
    """A TensorFlow lever's process: builds, warms up, then times `n` steps per stdin line."""
    import common  # noqa: F401  (quiet TensorFlow logs)
    import keras
    import numpy as np
    import tensorflow as tf

    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
    from tfglm.config import load_config
    from tfglm.models.gpt import GPT

    config = load_config(os.path.join(common.CONFIGS, CONFIGS[what]), ["model.dropout=0.0", *overrides])
    keras.utils.set_random_seed(0)
    vocab = 67 if what == "train" else 50_257
    model = GPT.from_config_tree(config.model, vocab)
    if what == "train":
        from tfglm.tasks.trainer import compile_model

        compile_model(model, config.train)
        rng = np.random.default_rng(0)
        x = rng.integers(0, vocab, (100, config.train.batch_size, config.model.max_length + 1), dtype=np.int32)
        dataset = common.without_autotune(tf.data.Dataset.from_tensor_slices((x[..., :-1], x[..., 1:])).repeat())

        def run(n):
            return float(model.fit(dataset, epochs=1, steps_per_epoch=n, verbose=0).history["loss"][-1])
        run(2 * config.train.steps_per_execution)
    else:
        from tfglm.generation.decode import Generator

        class CodepointIds:  # generate_throughput.py's stand-in tokenizer (not imported: it loads PyTorch)
            eot_id, vocab_size = vocab - 1, vocab
            tokenize = staticmethod(lambda strings: tf.strings.unicode_decode(strings, "UTF-8"))
            detokenize = staticmethod(lambda ids: tf.strings.reduce_join(tf.strings.as_string(ids), axis=-1))

        if not model.built:
            model.build()
        generator = Generator(model, CodepointIds(), jit_compile=config.train.jit_compile)
        prompts = tf.constant(["First Citizen: "])  # with <eot>, 16 tokens

        def run(n):  # n new tokens, greedy, in calls of DECODE_TOKENS
            return sum(float(generator.generate(prompts, DECODE_TOKENS, 0.0, 0, 1.0, 0)["num_tokens"].numpy().sum())
                       for _ in range(max(1, n // DECODE_TOKENS)))
        run(DECODE_TOKENS)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        n = int(line)
        start = time.perf_counter()
        value = run(n)
        print(json.dumps({"seconds": time.perf_counter() - start, "value": value}), flush=True)


def torch_worker(what):
    """The nanoGPT-style PyTorch peer's process (no TensorFlow): the same protocol as `tf_worker`."""
    import numpy as np
    import torch_train

    from tfglm.config import load_config  # no TensorFlow

    config = load_config(os.path.join(HERE, "..", "configs", CONFIGS[what]))
    c = torch_train.config_of(config, 67)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 67, (100, config.train.batch_size, config.model.max_length + 1))
    trainer = torch_train.Trainer(TORCH, c["model"], c["train"], 67, x[..., :-1], x[..., 1:])
    trainer.fit(2)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        start = time.perf_counter()
        value = trainer.fit(int(line))
        print(json.dumps({"seconds": time.perf_counter() - start, "value": value}), flush=True)


def start(what, name):
    env = dict(os.environ)
    if name != TORCH and LEVERS[name][0]:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + LEVERS[name][0]).strip()
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", what, "--lever", name],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def ask(process, line=None):
    if line is not None:
        process.stdin.write(f"{line}\n")
        process.stdin.flush()
    out = process.stdout.readline()
    if not out:
        raise RuntimeError(" | ".join(process.stderr.read().strip().splitlines()[-3:]) or "exited")
    return json.loads(out)


def sweep(what, names, rounds, steps):
    processes, failed = {}, {}
    for name in names:  # one at a time: a process warming up must not share the cores with another
        process = start(what, name)
        try:
            ask(process)
            processes[name] = process
        except RuntimeError as e:
            failed[name] = str(e)
            print(f"{what} {name}: failed to start: {e}", flush=True)
    times = {name: [] for name in processes}
    for _ in range(rounds):
        for name, process in processes.items():
            out = ask(process, steps)  # decode: per generated token (a random model may stop early at <eot>)
            times[name].append(out["seconds"] / (out["value"] if what == "decode" else steps))
    for process in processes.values():
        process.stdin.close()
        process.wait()
    base = times["default"]
    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    rows = [{"lever": name, "flags": LEVERS.get(name, ("",))[0], "ms": round(1e3 * median(t), 2),
             "speedup_over_default": round(median([b / s for b, s in zip(base, t)]), 3),
             "ms_by_round": [round(1e3 * s, 1) for s in t]} for name, t in times.items()]
    for row in rows:
        print(f"{what} {row['lever']:>22}: {row['ms']:8.2f} ms/step, x{row['speedup_over_default']:.3f} "
              f"vs default, rounds {row['ms_by_round']}", flush=True)
    return {"rows": rows, "failed": failed, "rounds": rounds, "steps_per_round": steps}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(CONFIGS))
    parser.add_argument("--levers", help="comma-separated subset (default: all)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=100, help="training steps a round")
    parser.add_argument("--tokens", type=int, default=256, help="new tokens a round (decode)")
    parser.add_argument("--worker", choices=sorted(CONFIGS), help=argparse.SUPPRESS)
    parser.add_argument("--lever", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        if args.lever == TORCH:
            return torch_worker(args.worker)
        _, overrides, threads = LEVERS[args.lever]
        return tf_worker(args.worker, overrides, threads)
    chosen = args.levers.split(",") if args.levers else list(LEVERS)
    result = {}
    for what in [args.only] if args.only else CONFIGS:
        names = ["default"] + [n for n in chosen if n != "default"]
        names += [TORCH] if what == "train" else []
        result[what] = sweep(what, names, args.rounds, args.steps if what == "train" else args.tokens)
    import common

    common.write_json("speed_levers.json", result)


if __name__ == "__main__":
    main()

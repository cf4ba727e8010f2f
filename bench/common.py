"""Shared helpers for the benchmarks: paths, the Tiny Shakespeare token stream, machine peaks, tables and JSON."""

import json
import os
import time

import numpy as np
import tensorflow as tf

from tfglm.config import load_config
from tfglm.data import corpus as data
from tfglm.data import labelled
from tfglm.data.tokenizers import CharTokenizer
from tfglm.generation.decode import Generator
from tfglm.models.gpt import GPT
from tfglm.training.trainer import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")
RESULTS = os.path.join(ROOT, "bench", "results")
DATA = os.path.join(ROOT, "..", "shared", "data")
SHAKESPEARE = os.path.join(DATA, "tinyshakespeare", "input.txt")
SST2 = os.path.join(DATA, "sst2")


def shakespeare_tokens():
    """(train tokens, validation tokens, vocab size) of Tiny Shakespeare with tfglm's char tokenizer (90/10 split),
    or None when ../shared/data is absent."""
    if not os.path.exists(SHAKESPEARE):
        return None
    stats = data.scan_files([SHAKESPEARE])
    tokenizer = CharTokenizer(stats.chars)
    train, val = data.split_tokens(data.tokenize_files([SHAKESPEARE], tokenizer), 0.1)
    return train, val, tokenizer.vocab_size


def best_seconds(fn, repeats):
    """The fastest of `repeats` timed calls of fn() (after one untimed warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def alternating_seconds(fns, calls):
    """name -> wall seconds of each of `calls` calls of fns[name]() (after one untimed call each), the functions
    called in turn, so that a change of the machine's load falls on all of them alike."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(calls):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def matmul_peak_gflops(n=2048, repeats=5):
    """fp32 GFLOP/s of an n x n matmul under XLA, best of `repeats`."""
    a = tf.random.normal([n, n])
    b = tf.random.normal([n, n])

    @tf.function(jit_compile=True)
    def matmul():
        return tf.matmul(a, b)

    return 2 * n ** 3 / best_seconds(lambda: matmul().numpy(), repeats) / 1e9


def read_bandwidth_gbs(gigabytes=1.0, repeats=5):
    """GB/s of a full tf.reduce_sum over a float32 tensor of `gigabytes`, best of `repeats`.

    Eager (Eigen, all cores), not XLA: XLA's CPU reduction is compute-bound here (about 1.7 GB/s against Eigen's 7-8
    under the same load), so it would measure the reduction, not the memory.
    """
    x = tf.ones([int(gigabytes * 1e9) // 4])
    return gigabytes / best_seconds(lambda: tf.reduce_sum(x).numpy(), repeats)


def machine_reference():
    """The machine's state for this run, to read its figures against: {"matmul_gflops", "read_gbs"}. Machines here
    are shared, and absolute figures move by 2x with other people's load."""
    reference = {"matmul_gflops": round(matmul_peak_gflops(), 1), "read_gbs": round(read_bandwidth_gbs(), 1)}
    print(f"machine: fp32 matmul (2048^2, XLA) {reference['matmul_gflops']} GFLOP/s, read bandwidth "
          f"{reference['read_gbs']} GB/s", flush=True)
    return reference


def subsample(path, text_column, label_column, rows, out_path, seed=0):
    """The first `rows` of a seeded shuffle of a labelled file, as TSV (all of them for rows 0)."""
    texts, labels = labelled.read_labelled(path, text_column, label_column)
    order = np.random.RandomState(seed).permutation(len(texts))[:rows or None]
    with open(out_path, "w", encoding="utf-8") as f:
        f.write(f"{text_column}\t{label_column}\n")
        f.writelines(f"{' '.join(texts[i].split())}\t{labels[i]}\n" for i in order)
    return out_path, len(order)


def write_json(name, result):
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, name)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {os.path.relpath(path, ROOT)}")


def print_table(rows, columns):
    """Prints dicts `rows` as a Markdown table of `columns` (numbers rounded to 4 significant digits)."""
    def cell(value):
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    print("| " + " | ".join(columns) + " |")
    print("| " + " | ".join("---" for _ in columns) + " |")
    for row in rows:
        print("| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |")


def median(values):
    return float(np.median(values))


class CodepointIds:
    """The decode benchmarks' stand-in tokenizer for a 50,257-token GPT: ids are the prompt's Unicode code points,
    `<eot>` is GPT-2's 50,256."""

    eot_id = 50_256
    vocab_size = 50_257

    def tokenize(self, strings):
        return tf.strings.unicode_decode(strings, "UTF-8")

    def detokenize(self, ids):
        return tf.strings.reduce_join(tf.strings.as_string(ids), axis=-1, separator=" ")


# The decode benchmark's model: GPT-2's vocabulary, 6 x 384, context 256, random weights (same shapes, same cost);
# greedy from a 16-token prompt.
DECODE_SHAPE = {"num_layers": 6, "num_heads": 6, "hidden_dim": 384, "max_length": 256}
DECODE_PROMPT = "First Citizen: "  # 15 characters; with <eot>, 16 tokens
DECODE_NEW_TOKENS = 128


def decode_generator(jit_compile=True):
    """A `tfglm.generation.decode.Generator` of the decode benchmarks' model, with `CodepointIds`."""
    model = GPT(CodepointIds.vocab_size, **DECODE_SHAPE)
    model.build()
    return Generator(model, CodepointIds(), jit_compile=jit_compile)


def without_autotune(dataset):
    """`dataset` with tf.data autotuning off. With it on, a `fit` call ends only on a tick of the autotuning thread's
    back-off (10, 20, 40 ... ms from the call's start), so whole-`fit` timings snap to 10 x (2^k - 1) ms."""
    options = tf.data.Options()
    options.autotune.enabled = False
    return dataset.with_options(options)


def tiny_run(root, config):
    """A run of `config` (a file in configs/) trained for 4 steps on a short play-like corpus, for serving
    benchmarks: the weights' values do not change the cost. Greedy, at most 32 new tokens by default."""
    corpus = os.path.join(root, "corpus.txt")
    with open(corpus, "w") as f:
        f.write("ROMEO: what light through yonder window breaks?\nJULIET: it is the east.\n" * 2000)
    overrides = [f"data.files=[{corpus}]", "train.steps=4", "train.batch_size=4", "train.eval_interval=4",
                 "train.eval_batches=1", "train.steps_per_execution=2", "train.warmup_steps=1",
                 "generate.temperature=0", "generate.max_new_tokens=32"]
    run_dir = os.path.join(root, "run")
    train(load_config(os.path.join(CONFIGS, config), overrides), run_dir, verbose=0)
    return run_dir

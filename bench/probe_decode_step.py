"""Where a batch-1 decode step's time goes, against the fp32 read-bandwidth bound: the whole step of
`generate_throughput.py`'s model (6 x 384, context 256, vocabulary 50,257; greedy, `tfglm.generation.decode`), beside
its two kinds of matrix products alone, each per step of an XLA while loop whose every step depends on the last (as
in the decode loop):

- the output projection, [1, 384] x [384, 50,257] (77 MB, 64% of the bytes a step reads), whole and split into 2 or 4
  column blocks (could independent blocks keep more cores streaming?);
- the blocks' 24 products in a chain ([1, 384] x [384, 1,152], x [384, 384], x [384, 1,536], [1, 1,536] x
  [1,536, 384], six times; 42 MB), with the weights as tfglm keeps them ([in, out]), transposed ([out, in],
  `transpose_b`), and split into 2 column blocks.

What is left of the step beyond the two (layer norms, GELU, attention over the cache, the cache update, sampling) is
the step minus their best forms. Variants alternate call by call; median of 15 calls (5 with `--quick`).
`--threads 1` runs it all on one intra-op thread, to see which parts use the second core.

    python bench/probe_decode_step.py [--quick] [--threads N]
"""

import argparse

import common
import numpy as np
import tensorflow as tf

WIDTH, LAYERS, VOCAB = common.DECODE_SHAPE["hidden_dim"], common.DECODE_SHAPE["num_layers"], \
    common.CodepointIds.vocab_size
LOOP_STEPS = 50
BLOCK_SHAPES = [shape for _ in range(LAYERS) for shape in
                ((WIDTH, 3 * WIDTH), (WIDTH, WIDTH), (WIDTH, 4 * WIDTH), (4 * WIDTH, WIDTH))]


def in_loop(step_fn):
    """`step_fn(h) -> h` at every step of an XLA-compiled `LOOP_STEPS`-step while loop from a random [1, 384]."""
    start = tf.random.normal([1, WIDTH])
    loop = tf.function(lambda: tf.while_loop(lambda i, _: i < LOOP_STEPS, lambda i, h: (i + 1, step_fn(h)),
                                             (0, start))[1], jit_compile=True)
    return lambda: loop().numpy()


def column_blocks(matrix, parts):
    """`matrix` [in, out] as `parts` variables of consecutive columns."""
    cuts = np.linspace(0, matrix.shape[1], parts + 1).astype(int)
    return [tf.Variable(matrix[:, a:b]) for a, b in zip(cuts, cuts[1:])]


def projection(parts):
    blocks = column_blocks(tf.random.normal([WIDTH, VOCAB], stddev=0.02), parts)
    return in_loop(lambda h: h + 1e-9 * tf.reduce_sum(tf.concat([tf.matmul(h, b) for b in blocks], axis=1)))


def block_chain(layout, parts=1):
    """The 24 block products in a chain, each feeding the next (residual-style, so values stay small)."""
    weights = [tf.random.normal(shape, stddev=0.02) for shape in BLOCK_SHAPES]
    if layout == "out_in":
        weights = [tf.Variable(tf.transpose(w)) for w in weights]
        products = [lambda x, w=w: tf.matmul(x, w, transpose_b=True) for w in weights]
    else:
        products = [lambda x, bs=column_blocks(w, parts): tf.concat([tf.matmul(x, b) for b in bs], axis=1)
                    for w in weights]

    def step(h):
        x = h
        for product in products:
            y = product(x)
            x = y if y.shape[1] == 4 * WIDTH else h + 1e-3 * y[:, :WIDTH]
        return x

    return in_loop(step)


def decode_step():
    """The real thing: `Generator.generate` of 128 new tokens from a 16-token prompt; returns the tokens made."""
    import keras

    keras.utils.set_random_seed(0)
    generator = common.decode_generator()
    prompts = tf.constant([common.DECODE_PROMPT])
    return lambda: generator.generate(prompts, common.DECODE_NEW_TOKENS, 0.0, 0, 1.0, 0)["num_tokens"].numpy()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 timed calls of each variant instead of 15")
    parser.add_argument("--threads", type=int, help="TensorFlow intra-op threads (default: all cores)")
    args = parser.parse_args()
    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    calls = 5 if args.quick else 15
    generate = decode_step()
    tokens = int(generate()[0])  # a random model may stop early at <eot>: time per token generated
    probes = {"output projection": projection(1), "output projection, 2 column blocks": projection(2),
              "output projection, 4 column blocks": projection(4), "block products [in, out]": block_chain("in_out"),
              "block products [out, in]": block_chain("out_in"),
              "block products, 2 column blocks": block_chain("in_out", 2)}
    times = common.alternating_seconds({"decode step": generate, **probes}, calls)
    bandwidth = common.read_bandwidth_gbs()
    mb = {"output projection": WIDTH * VOCAB * 4 / 1e6, "block products": sum(a * b for a, b in BLOCK_SHAPES) * 4 / 1e6}
    mb["decode step"] = mb["output projection"] + mb["block products"]  # plus the cache and norms: < 1%
    ms = {name: 1e3 * common.median(t) / (tokens if name == "decode step" else LOOP_STEPS) for name, t in times.items()}
    rows = []
    for name, value in ms.items():
        weights = mb[next(k for k in mb if name.startswith(k))]
        rows.append({"part": name, "ms": value, "weight_mb": weights, "gb_per_s": weights / value,
                     "pct_of_bandwidth_bound": 100 * weights / bandwidth / value})
    best = min(v for k, v in ms.items() if k.startswith("output")) + min(
        v for k, v in ms.items() if k.startswith("block"))
    rows.append({"part": "rest of the step (step - best of each)", "ms": ms["decode step"] - best})
    common.print_table(rows, ["part", "ms", "weight_mb", "gb_per_s", "pct_of_bandwidth_bound"])
    print(f"read bandwidth (tf.reduce_sum over 1 GB): {bandwidth:.1f} GB/s; batch-1 bound "
          f"{mb['decode step'] / bandwidth:.2f} ms a token; {tokens} tokens a call; intra-op threads "
          f"{args.threads or 'default'}")
    common.write_json("probe_decode_step.json", {"calls": calls, "threads": args.threads,
                                                 "read_bandwidth_gbs": bandwidth, "rows": rows})


if __name__ == "__main__":
    main()

"""Would smaller weights speed up decoding here? The decode step's largest matmul, the output projection of
`generate_throughput.py`'s model ([batch, 384] x [384, 50,257], 77 MB of fp32 weights: 64% of what a step reads),
timed in fp32, bf16 and int8, each under XLA (as tfglm's decode loop runs it) and as TensorFlow's own kernel
(oneDNN, outside XLA), at batch 1 and 8, beside the time it takes just to read its weights at the read bandwidth
measured in the same run.

int8 is tried both ways a weight-only int8 decode could run: int8 x int8 -> int32 (`tf.matmul(output_type=int32)`),
and int8 weights cast to fp32 in the graph and scaled per column. fp32, bf16 and the latter are also timed per step
of an XLA while loop, as the decode loop runs them. Variants alternate call by call; the figure is the median of 40
calls (10 with `--quick`).

    python bench/probe_decode_precision.py [--quick]
"""

import argparse

import common
import tensorflow as tf

WIDTH, VOCAB = 384, 50257
LOOP_STEPS = 50


def variants(batch):
    """(name, runtime) -> (dtype of the weights, steps a call, function of no arguments returning a tensor)."""
    hidden = tf.random.normal([batch, WIDTH])
    weights = tf.random.normal([WIDTH, VOCAB], stddev=0.02)
    scale = tf.reduce_max(tf.abs(weights), axis=0) / 127  # per output column
    bf16, int8 = tf.cast(weights, tf.bfloat16), tf.cast(tf.round(weights / scale), tf.int8)
    products = {  # name -> (product of a hidden state, the hidden state it takes)
        "float32": (lambda h: tf.matmul(h, weights), hidden),
        "bfloat16": (lambda h: tf.matmul(h, bf16), tf.cast(hidden, tf.bfloat16)),
        "int8 x int8 -> int32": (lambda h: tf.matmul(h, int8, output_type=tf.int32),
                                 tf.cast(tf.clip_by_value(tf.round(hidden * 32), -127, 127), tf.int8)),
        "int8 dequantized": (lambda h: tf.matmul(h, tf.cast(int8, tf.float32)) * scale, hidden),
    }
    out = {}
    for name, (product, h) in products.items():
        dtype = name.split()[0]
        out[(name, "xla")] = (dtype, 1, tf.function(lambda p=product, h=h: p(h), jit_compile=True))
        out[(name, "tensorflow")] = (dtype, 1, tf.function(lambda p=product, h=h: p(h)))
    # As the decode loop runs them: XLA may hoist work out of a loop.
    for name in ("float32", "bfloat16", "int8 dequantized"):
        product, h = products[name]
        out[(name, f"xla, {LOOP_STEPS}-step loop")] = (name.split()[0], LOOP_STEPS, in_loop(product, h))
    return out


def in_loop(product, hidden):
    """`product` at every step of an XLA-compiled `LOOP_STEPS`-step while loop, each step's hidden state depending on
    the last step's product (so the product itself cannot be hoisted out of the loop)."""
    def step(i, h):
        return i + 1, h + 1e-9 * tf.reduce_sum(product(h))

    return tf.function(lambda: tf.while_loop(lambda i, _: i < LOOP_STEPS, step, (0, hidden))[1], jit_compile=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 timed calls of each variant instead of 40")
    args = parser.parse_args()
    calls = 10 if args.quick else 40
    bandwidth = common.read_bandwidth_gbs()
    rows = []
    for batch in (1, 8):
        probes = variants(batch)
        times = common.alternating_seconds(  # its untimed first call of each compiles it
            {key: lambda fn=fn: fn().numpy() for key, (_, _, fn) in probes.items()}, calls)
        fp32_xla = common.median(times[("float32", "xla")])
        for (name, runtime), (dtype, steps, _) in probes.items():
            seconds = common.median(times[(name, runtime)]) / steps
            weight_bytes = WIDTH * VOCAB * tf.as_dtype(dtype).size
            rows.append({"batch": batch, "product": name, "runtime": runtime, "ms": 1e3 * seconds,
                         "read_bound_ms": 1e3 * weight_bytes / (bandwidth * 1e9),
                         "speedup_over_fp32_xla": fp32_xla / seconds})
    common.print_table(rows, ["batch", "product", "runtime", "ms", "read_bound_ms", "speedup_over_fp32_xla"])
    print(f"read bandwidth (tf.reduce_sum over 1 GB): {bandwidth:.1f} GB/s")
    common.write_json("probe_decode_precision.json", {"calls": calls, "read_bandwidth_gbs": bandwidth,
                                                      "rows": rows})


if __name__ == "__main__":
    main()

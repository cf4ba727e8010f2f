"""Speed levers, one by one: the tiny config's training step (and batch-1 greedy decoding of the shakespeare-sized
model) under each XLA CPU flag, thread setting, compile option and code variant, against the default and against
the nanoGPT-style PyTorch model, in alternating rounds.

The code variants are patched into the worker's model (nothing in tfglm changes): attention through
`keras.ops.dot_product_attention` on [batch, length, heads, head_dim] (no transposes of queries, keys, values and
output), the AdamW update outside the XLA-compiled step, `steps_per_execution` 1 (against the config's 50), the
token embedding as a one-hot matmul (its gradient a matmul, not a scatter-add), global-norm clipping with one
reduction over all gradients instead of one per variable, layer norm and GELU with hand-derived gradients, and the
tanh GELU written with one sigmoid. Some entries are not levers but bounds, with wrong numerics on purpose:
`no_mask` (the causal mask dropped), `no_norm_gelu`, `no_norm` and `no_gelu` (layer norms and / or the GELU
replaced by the identity) and `no_clipping` (no global-norm clipping) say how much of the step those parts cost at
most, so how much fusing them by hand could win.

Every lever runs in its own long-lived subprocess (XLA flags and thread pools are fixed when TensorFlow starts),
built and warmed up once; then each round asks every process in turn for the same number of steps, so a change of
the machine's load falls on all levers alike. The figure is each lever's median per-round ratio to the default
(> 1: faster). A lever whose process fails to start (an XLA flag this build rejects) is reported as such.

    python bench/speed_levers.py [--only train|decode] [--levers a,b] [--rounds 5] [--steps 100]
        [--tokens 256]
"""

import argparse
import os
import statistics
import sys
import tempfile

import numpy as np

import workers

HERE = os.path.dirname(os.path.abspath(__file__))


def keras_attention(model):
    """Self-attention without a cache (training) through `keras.ops.dot_product_attention`, on the QKV projection
    reshaped to [batch, length, 3, heads, head_dim]: no transposes in tfglm's code."""
    from keras import ops
    from tfglm.layers import MultiHeadAttention

    original = MultiHeadAttention.call

    def call(self, x, cache=None, index=0, padding_mask=None, context=None, training=None):
        if cache is not None or self.cross or padding_mask is not None:
            return original(self, x, cache, index, padding_mask, context, training)
        batch, length = ops.shape(x)[0], ops.shape(x)[1]
        qkv = ops.reshape(self.qkv(x), (batch, length, 3, self.num_heads, self.head_dim))
        out = ops.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], is_causal=self.causal)
        return self.output_dense(ops.reshape(out, (batch, length, self.num_heads * self.head_dim))), None

    MultiHeadAttention.call = call


def optimizer_outside_xla(model):
    """Forward and backward in one XLA function; the AdamW update (and clipping) in TensorFlow's own kernels."""
    import tensorflow as tf

    variables = model.trainable_variables

    @tf.function(jit_compile=True)
    def loss_and_gradients(x, y):
        with tf.GradientTape() as tape:
            loss = model.compute_loss(x=x, y=y, y_pred=model(x, training=True))
        return loss, tape.gradient(loss, variables)

    def train_step(data):
        loss, gradients = loss_and_gradients(*data)
        model.optimizer.apply(gradients, variables)
        return {"loss": loss}

    model.train_step = train_step


def one_hot_embedding(model):
    """The token embedding lookup as one_hot(ids) @ embeddings: forward and gradient are matmuls (cheap for a
    67-character vocabulary), where a gather's gradient is a scatter-add."""
    import keras
    from keras import ops

    original = keras.layers.ReversibleEmbedding.call

    def call(self, inputs, reverse=False):
        if reverse:
            return original(self, inputs, reverse=True)
        return ops.matmul(ops.one_hot(inputs, self.input_dim, dtype=self.compute_dtype), self.embeddings)

    keras.layers.ReversibleEmbedding.call = call


def one_reduction_clipping(model):
    """Global-norm clipping with one reduction over all gradients (flattened and concatenated) instead of Keras's one
    per variable."""
    from keras import ops

    optimizer = model.optimizer

    def clip(gradients):
        flat = ops.concatenate([ops.reshape(g, (-1,)) for g in gradients])
        norm = ops.sqrt(ops.sum(ops.square(flat)))
        scale = ops.minimum(1.0, optimizer.global_clipnorm / ops.maximum(norm, 1e-12))
        return [g * scale for g in gradients]

    optimizer._clip_gradients = clip


def set_activation(model, activation):
    """Makes `activation` every block's feed-forward activation in `model`."""
    for layer in model._flatten_layers():
        if layer.name == "feed_forward_in":
            layer.activation = activation


def hand_gradient_norm_gelu(model):
    """Layer norm and the tanh GELU with hand-derived gradients (`tf.custom_gradient`): the backward pass of a norm is
    two row reductions and the gamma / beta sums, and the GELU's keeps only its input, where autodiff of Keras's
    `moments` and of the tanh formula keeps more intermediates and reductions."""
    import keras
    import tensorflow as tf

    def norm_call(self, x):
        epsilon = self.epsilon

        @tf.custom_gradient
        def norm(x, gamma, beta):
            centered = x - tf.reduce_mean(x, -1, keepdims=True)
            inv = tf.math.rsqrt(tf.reduce_mean(tf.square(centered), -1, keepdims=True) + epsilon)
            normed = centered * inv

            def grad(dy):
                g = dy * gamma
                dx = inv * (g - tf.reduce_mean(g, -1, keepdims=True)
                            - normed * tf.reduce_mean(g * normed, -1, keepdims=True))
                rows = list(range(len(x.shape) - 1))
                return dx, tf.reduce_sum(dy * normed, rows), tf.reduce_sum(dy, rows)

            return normed * gamma + beta, grad

        return norm(x, tf.convert_to_tensor(self.gamma), tf.convert_to_tensor(self.beta))

    @tf.custom_gradient
    def gelu(x):
        c = 0.7978845608028654  # sqrt(2 / pi)
        t = tf.tanh(c * (x + 0.044715 * x ** 3))

        def grad(dy):
            return dy * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c * (1 + 3 * 0.044715 * x * x))

        return 0.5 * x * (1 + t), grad

    keras.layers.LayerNormalization.call = norm_call
    set_activation(model, gelu)


def no_mask(model):
    """A bound, not a lever: attention without its causal mask."""
    for layer in model._flatten_layers():
        if hasattr(layer, "causal"):
            layer.causal = False


def sigmoid_gelu(model):
    """The tanh GELU as x * sigmoid(2u), u = sqrt(2 / pi) (x + 0.044715 x^3): the same function (0.5 (1 + tanh u) is
    sigmoid(2u)) with one transcendental and fewer element-wise operations."""
    from keras import ops

    set_activation(model, lambda x: x * ops.sigmoid(1.5957691216057308 * (x + 0.044715 * x * x * x)))


def no_norm(model):
    """A bound, not a lever: every layer norm replaced by the identity."""
    import keras

    keras.layers.LayerNormalization.call = lambda self, x: x


def no_gelu(model):
    """A bound, not a lever: the feed-forward GELU replaced by the identity."""
    set_activation(model, lambda x: x)


def no_norm_gelu(model):
    """A bound, not a lever: every layer norm and the feed-forward GELU replaced by the identity."""
    no_norm(model)
    no_gelu(model)


XLA_FLAG_LEVERS = {
    "fast_math": "--xla_cpu_enable_fast_math=true",
    "legacy_runtime": "--xla_cpu_use_thunk_runtime=false",
    "xnnpack": "--xla_cpu_use_xnnpack=true",
    "xnn_fusion": "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    "onednn": "--xla_cpu_use_onednn=true",
    "no_fusion_emitters": "--xla_cpu_use_fusion_emitters=false",
    "concurrency_scheduler": "--xla_cpu_enable_concurrency_optimized_scheduler=true",
    "single_thread_eigen": "--xla_cpu_multi_thread_eigen=false",
    "vector_width_512": "--xla_cpu_prefer_vector_width=512",
    "fast_min_max": "--xla_cpu_enable_fast_min_max=true",
}
PATCH_LEVERS = (keras_attention, one_hot_embedding, hand_gradient_norm_gelu, no_mask, no_norm_gelu, sigmoid_gelu,
                no_norm, no_gelu, one_reduction_clipping)
# name -> (XLA_FLAGS, tfglm config overrides, TensorFlow intra-op threads or None, patch of the built model or None)
LEVERS = {
    "default": ("", [], None, None),
    "no_xla": ("", ["train.jit_compile=false"], None, None),
    **{name: (flag, [], None, None) for name, flag in XLA_FLAG_LEVERS.items()},
    "intra_op_1": ("", [], 1, None),
    "optimizer_outside_xla": ("", ["train.jit_compile=false"], None, optimizer_outside_xla),
    "steps_per_execution_1": ("", ["train.steps_per_execution=1"], None, None),
    **{patch.__name__: ("", [], None, patch) for patch in PATCH_LEVERS},
    "no_clipping": ("", ["train.grad_clip=0.0"], None, None),
}
TRAIN_ONLY = ("keras_attention", "optimizer_outside_xla", "steps_per_execution_1", "one_hot_embedding",
              "one_reduction_clipping", "no_clipping", "hand_gradient_norm_gelu", "sigmoid_gelu", "no_norm", "no_gelu")
TORCH = "nanogpt_torch"
TRAIN_CONFIG = "gpt-char-tiny.yaml"  # decoding: common.decode_generator's model (generate_throughput.py's)
WHAT = ("train", "decode")


def tf_worker(what, overrides, threads, patch, batches_path):
    """A TensorFlow lever's worker process (`workers.py`): builds, warms up, then runs the steps (training) or new
    tokens (decoding) it is asked for."""
    import common
    import keras
    import tensorflow as tf

    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
    from tfglm.config import load_config
    from tfglm.models.gpt import GPT

    config = load_config(os.path.join(common.CONFIGS, TRAIN_CONFIG), ["model.dropout=0.0", *overrides])
    keras.utils.set_random_seed(0)
    if what == "train":
        from tfglm.training.trainer import compile_model

        model = GPT.from_config_tree(config.model, 67)
        compile_model(model, config.train)
        batches = np.load(batches_path)
        dataset = tf.data.Dataset.from_tensor_slices((batches["x"], batches["y"])).repeat()
        dataset = common.without_autotune(dataset)

        def run(n):
            return float(model.fit(dataset, epochs=1, steps_per_epoch=n, verbose=0).history["loss"][-1])
        warmup = 2 * config.train.steps_per_execution
    else:
        generator = common.decode_generator(config.train.jit_compile)
        model = generator.model
        prompts = tf.constant([common.DECODE_PROMPT])
        tokens = common.DECODE_NEW_TOKENS

        def run(n):  # n new tokens, greedy, in calls of `tokens`
            return sum(float(generator.generate(prompts, tokens, 0.0, 0, 1.0, 0)["num_tokens"].numpy().sum())
                       for _ in range(max(1, n // tokens)))
        warmup = tokens
    if patch:  # before the first call traces the model
        patch(model)
    run(warmup)
    workers.serve(run, {})


def batches(count=100, vocab=67):
    """`count` random training batches (x, y) of TRAIN_CONFIG's shape, the same for every process."""
    from tfglm.config import load_config  # no TensorFlow

    config = load_config(os.path.join(HERE, "..", "configs", TRAIN_CONFIG))
    x = np.random.default_rng(0).integers(0, vocab, (count, config.train.batch_size, config.model.max_length + 1),
                                          dtype=np.int32)
    return {"x": x[..., :-1], "y": x[..., 1:], "vocab": vocab}


def command(what, name, batches_path):
    """The worker command line of lever `name` (or of the PyTorch peer, `torch_train.py`)."""
    if name == TORCH:
        return [sys.executable, os.path.join(HERE, "torch_train.py"), TORCH, batches_path,
                os.path.join(HERE, "..", "configs", TRAIN_CONFIG), "model.dropout=0.0"]
    return [sys.executable, os.path.abspath(__file__), "--worker", what, "--lever", name, "--batches", batches_path]


def sweep(what, names, rounds, steps, batches_path):
    processes, failed = {}, {}
    for name in names:  # one at a time: a process warming up must not share the cores with another
        env = dict(os.environ)
        if name != TORCH and LEVERS[name][0]:
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + LEVERS[name][0]).strip()
        try:
            processes[name], _ = workers.start(command(what, name, batches_path), env)
        except RuntimeError as e:
            failed[name] = str(e)
            print(f"{what} {name}: failed to start: {e}", flush=True)
    times = {name: [] for name in processes}
    for _ in range(rounds):
        for name, process in processes.items():
            out = workers.ask(process, steps)  # decode: per generated token (a random model may stop early at <eot>)
            times[name].append(out["seconds"] / (out["value"] if what == "decode" else steps))
    workers.stop(processes.values())
    base = times["default"]
    rows = [{"lever": name, "flags": LEVERS.get(name, ("",))[0], "ms": round(1e3 * statistics.median(t), 2),
             "speedup_over_default": round(statistics.median([b / s for b, s in zip(base, t)]), 3),
             "ms_by_round": [round(1e3 * s, 1) for s in t]} for name, t in times.items()]
    for row in rows:
        print(f"{what} {row['lever']:>22}: {row['ms']:8.2f} ms/step, x{row['speedup_over_default']:.3f} "
              f"vs default, rounds {row['ms_by_round']}", flush=True)
    return {"rows": rows, "failed": failed, "rounds": rounds, "steps_per_round": steps}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=WHAT)
    parser.add_argument("--levers", help="comma-separated subset (default: all)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=100, help="training steps a round")
    parser.add_argument("--tokens", type=int, default=256, help="new tokens a round (decode)")
    parser.add_argument("--worker", choices=WHAT, help=argparse.SUPPRESS)
    parser.add_argument("--lever", help=argparse.SUPPRESS)
    parser.add_argument("--batches", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _, overrides, threads, patch = LEVERS[args.lever]
        return tf_worker(args.worker, overrides, threads, patch, args.batches)
    chosen = args.levers.split(",") if args.levers else list(LEVERS)
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        batches_path = os.path.join(tmp, "batches.npz")
        np.savez(batches_path, **batches())
        for what in [args.only] if args.only else WHAT:
            names = ["default"] + [n for n in chosen if n != "default" and (what == "train" or n not in TRAIN_ONLY)]
            names += [TORCH] if what == "train" else []
            result[what] = sweep(what, names, args.rounds, args.steps if what == "train" else args.tokens,
                                 batches_path)
    import common

    common.write_json("speed_levers.json", result)


if __name__ == "__main__":
    main()

"""Generation throughput: `tfglm.generation.decode.Generator.generate` vs KerasHub `GPT2CausalLM.generate` and
Hugging Face transformers' `GPT2LMHeadModel.generate` (PyTorch), greedy, 16-token prompts, 128 new tokens, batch 1 and
8, for a 6 x 384 model with context 256 and a 50,257-token vocabulary (random weights: same shapes, same cost), and
tfglm's model again through its exported SavedModel: the `generate` signature of
`tfglm.serving.signatures.language_model`, saved and loaded back in this process, and its `generate_start` + `advance`
signatures streaming 4 tokens a call as `tfglm serve` does. The five alternate call by call; the
ratios are tfglm's tokens/s over each peer's, medians of the paired rounds. Also the batch-1 memory-bandwidth bound:
weight bytes / read bandwidth, both measured in this run.

tfglm's entry point takes strings, so it gets a stand-in tokenizer (`common.CodepointIds`): ids are the prompt's code
points and `<eot>` is 50,256 as in GPT-2. Tokenizing 15 characters and joining 128 ids into a string are included in
its time but cost microseconds; what is timed is the decode. KerasHub gets the same 16 ids (`<eot>` + the 15 code
points) as a `token_ids` / `padding_mask` batch of length 144, with no stop token. Hugging Face gets them as
`input_ids` with an all-ones `attention_mask`: `do_sample=False`, the KV cache, `min_new_tokens` = `max_new_tokens` =
128 (so `<eot>` cannot end it early), under `torch.inference_mode()`, on the CPU with torch's default thread count.

    python -m bench.speed.generate_throughput [--quick]
"""

import argparse
import shutil
import tempfile
import time

from bench import extra

extra.require("torch", "transformers")

import torch  # noqa: E402
# Before TensorFlow: transformers' generate loads torch._dynamo, which loads triton, whose LLVM segfaults when it is
# loaded into a process that already holds XLA's (torch 2.14, TensorFlow 2.20: `import triton` after an XLA
# compilation crashes in triton/knobs.py).
import torch._dynamo  # noqa: F401, E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

import keras  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from bench import common  # noqa: E402
from tfglm.config import GenerateConfig  # noqa: E402
from tfglm.serving.engine import STEPS as STREAM_STEPS  # noqa: E402
from tfglm.serving.signatures import language_model  # noqa: E402

VOCAB, PROMPT, NEW_TOKENS = common.CodepointIds.vocab_size, common.DECODE_PROMPT, common.DECODE_NEW_TOKENS
LAYERS, HEADS, WIDTH, CONTEXT = (common.DECODE_SHAPE[k] for k in ("num_layers", "num_heads", "hidden_dim",
                                                                   "max_length"))
BATCHES = (1, 8)


def tfglm_runner(batch):
    """A callable running one tfglm generation of `batch` prompts; returns the number of generated tokens."""
    generator = common.decode_generator()
    prompts = tf.constant([PROMPT] * batch)

    def run():
        out = generator.generate(prompts, NEW_TOKENS, 0.0, 0, 1.0, 0)
        return int(out["num_tokens"].numpy().sum())

    return run, generator.model.count_params()


def exported_runner(batch, stream_steps=None):
    """The same through the SavedModel's `generate` signature (as `tfglm export` writes it), loaded back; or, with
    `stream_steps`, through its `generate_start` and `advance` signatures, `stream_steps` tokens a call, as
    `tfglm serve` streams."""
    generator = common.decode_generator()
    export = language_model(generator, GenerateConfig())
    path = tempfile.mkdtemp(prefix="tfglm-generate-")
    tf.saved_model.save(export.module, path, signatures={name: export.signatures[name]
                                                         for name in ("generate", "generate_start", "advance")})
    signatures = tf.saved_model.load(path).signatures
    shutil.rmtree(path)
    # Every input given: a loaded signature called from Python does not fill in the SignatureDef's defaults.
    prompts, max_new_tokens = tf.constant([PROMPT] * batch), tf.constant(NEW_TOKENS)
    options = {"temperature": tf.constant(0.0), "top_k": tf.constant(0), "top_p": tf.constant(1.0),
               "seed": tf.constant(0)}

    state = signatures["advance"].structured_input_signature[1]  # the decode state's names, and advance's options

    def run():
        if stream_steps is None:
            out = signatures["generate"](prompts=prompts, max_new_tokens=max_new_tokens, **options)
        else:
            out = signatures["generate_start"](prompts=prompts, max_new_tokens=max_new_tokens)
            while "finished" not in out or not bool(out["finished"]):
                out = signatures["advance"](**{k: out[k] for k in state if k in out}, steps=tf.constant(stream_steps),
                                            **options)
        return int(out["num_tokens"].numpy().sum())

    return run, generator.model.count_params()


def keras_hub_runner(batch):
    """The same for KerasHub: `<eot>` + the prompt's code points, padded to 144, no stop token."""
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=VOCAB, num_layers=LAYERS, num_heads=HEADS, hidden_dim=WIDTH, intermediate_dim=4 * WIDTH,
        dropout=0.0, max_sequence_length=CONTEXT)
    lm = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    lm.compile(sampler="greedy", jit_compile=True)
    prompt = [common.CodepointIds.eot_id] + [ord(c) for c in PROMPT]
    length = len(prompt) + NEW_TOKENS
    inputs = {"token_ids": np.zeros((batch, length), np.int32), "padding_mask": np.zeros((batch, length), bool)}
    inputs["token_ids"][:, :len(prompt)] = prompt
    inputs["padding_mask"][:, :len(prompt)] = True

    def run():
        out = lm.generate(inputs, stop_token_ids=None)
        return int((~inputs["padding_mask"] & np.asarray(out["padding_mask"])).sum())

    return run, backbone.count_params()


def hf_torch_runner(batch):
    """The same for Hugging Face's PyTorch GPT-2: the same 16 ids, greedy with the KV cache, exactly 128 new tokens."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_positions=CONTEXT, n_embd=WIDTH, n_layer=LAYERS, n_head=HEADS,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # n_inner None: 4 x width; tied embeddings
    model = GPT2LMHeadModel(config).eval()
    prompt = torch.tensor([[common.CodepointIds.eot_id] + [ord(c) for c in PROMPT]] * batch)

    def run():
        with torch.inference_mode():
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, use_cache=True,
                                 max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                 pad_token_id=common.CodepointIds.eot_id)
        return int(out.shape[0] * (out.shape[1] - prompt.shape[1]))

    return run, model.num_parameters()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one timed round instead of three")
    args = parser.parse_args()
    rounds = 1 if args.quick else 3
    reference = common.machine_reference()
    bandwidth = reference["read_gbs"]
    rows = []
    for batch in BATCHES:
        built = {}
        for name, make in (("tfglm", tfglm_runner), ("tfglm_exported", exported_runner),
                           ("tfglm_exported_stream4", lambda b: exported_runner(b, STREAM_STEPS)),
                           ("keras_hub", keras_hub_runner), ("hf_torch", hf_torch_runner)):
            # Every model built before any is called: reseeding clears TensorFlow's kernel cache
            # (`TFE_ContextClearCaches`), and a function called before it re-instantiates on its next call (about
            # 1 s for tfglm's `generate`), which made tfglm's first timed round 2-2.5x slower than the rest.
            keras.utils.set_random_seed(0)
            built[name] = make(batch)
        runners = {}
        for name, (run, params) in built.items():
            start = time.perf_counter()
            run()  # compiles
            runners[name] = {"run": run, "params": params, "first_s": time.perf_counter() - start, "times": []}
        for _ in range(rounds):
            for r in runners.values():
                start = time.perf_counter()
                r["tokens"] = r["run"]()
                r["times"].append(time.perf_counter() - start)
        for name, r in runners.items():
            seconds = common.median(r["times"])
            rows.append({"model": name, "batch": batch, "params": r["params"], "new_tokens": r["tokens"],
                         "seconds": seconds, "tokens_per_s": r["tokens"] / seconds,
                         "ms_per_step": 1e3 * seconds / NEW_TOKENS, "first_call_s": r["first_s"],
                         "times_s": [round(t, 3) for t in r["times"]]})
        # The median of paired per-round ratios: robust to the machine's load moving between rounds.
        for row in rows[-len(runners):]:
            for peer in ("keras_hub", "hf_torch") if row["model"].startswith("tfglm") else ():
                row[f"tfglm_over_{peer}"] = common.median(
                    [k / t for t, k in zip(runners[row["model"]]["times"], runners[peer]["times"])])
    weight_bytes = 4 * rows[0]["params"]
    bound = bandwidth * 1e9 / weight_bytes
    for row in rows:  # decode steps/s against the weight-reading bound (a step reads every weight once)
        row["pct_of_bandwidth_bound"] = 100 * row["tokens_per_s"] / row["batch"] / bound
    common.print_table(rows, ["model", "batch", "new_tokens", "seconds", "tokens_per_s", "ms_per_step",
                              "first_call_s", "tfglm_over_keras_hub", "tfglm_over_hf_torch",
                              "pct_of_bandwidth_bound"])
    for row in rows:
        if row["model"] == "tfglm":
            print(f"batch {row['batch']}: tfglm tokens/s over KerasHub {row['tfglm_over_keras_hub']:.3f}, over "
                  f"HF-torch {row['tfglm_over_hf_torch']:.3f} (medians of {rounds} paired rounds)")
    print(f"read bandwidth (tf.reduce_sum over 1 GB): {bandwidth:.1f} GB/s; weights {weight_bytes / 1e6:.1f} MB "
          f"fp32 -> batch-1 bound {bound:.0f} tokens/s ({1e3 / bound:.1f} ms a token)")
    common.write_json("generate_throughput.json", {
        "quick": args.quick, "rounds": rounds, "machine": reference, "read_bandwidth_gbs": bandwidth,
        "weight_bytes": weight_bytes, "batch1_bound_tokens_per_s": bound, "torch_threads": torch.get_num_threads(),
        "rows": rows})


if __name__ == "__main__":
    main()

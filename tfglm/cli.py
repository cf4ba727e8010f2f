"""`tfglm` command line: train and generate. A user's mistake is one line on stderr, never a traceback."""

import argparse
import json
import logging
import os
import shutil
import sys

from tfglm.errors import TfglmError

log = logging.getLogger("tfglm")


def _parser():
    parser = argparse.ArgumentParser(prog="tfglm", description="TensorFlow Generative Language Models")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a GPT on text files (or the embedded corpus)")
    train.add_argument("--config", help="YAML config (default: configs/default.yaml values)")
    train.add_argument("--data", nargs="+", help="training text files, directories or globs (overrides data.files)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.steps=200")
    train.add_argument("--out", required=True, help="run directory")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    train.add_argument("--overwrite", action="store_true", help="delete a run already in --out and start afresh")

    generate = commands.add_parser("generate", help="generate text from a trained run")
    generate.add_argument("--model", required=True, help="run directory")
    generate.add_argument("--prompt", action="append", help="seed text (repeat for several prompts)")
    generate.add_argument("--max-new-tokens", type=int)
    generate.add_argument("--temperature", type=float, help="0 is greedy")
    generate.add_argument("--top-k", type=int, help="0 disables")
    generate.add_argument("--top-p", type=float)
    generate.add_argument("--seed", type=int)
    generate.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    return parser


def _generate_settings(config, args=None):
    """The run's `generate` config with any command-line values applied, validated like a config."""
    from tfglm.config import load_config

    overrides = []
    for key in ("max_new_tokens", "temperature", "top_k", "top_p", "seed"):
        value = getattr(args, key, None) if args else None
        if value is not None:
            overrides.append(f"generate.{key}={value}")
    return load_config(base=config.to_dict(), overrides=overrides).generate


def generate_texts(generator, prompts, settings):
    """Runs the shared decode function; warns about prompts truncated to fit the context."""
    import tensorflow as tf

    lengths = generator.prompt_ids(tf.constant(prompts), settings.max_new_tokens).row_lengths()
    full = generator.tokenizer.tokenize(tf.constant(prompts)).row_lengths() + 1
    for i, (kept, had) in enumerate(zip(lengths.numpy(), full.numpy())):
        if kept < had:
            log.warning("prompt %d: %d tokens, truncated from the left to the last %d (context %d minus %d new)",
                        i + 1, had, kept, generator.context, settings.max_new_tokens)
    out = generator.generate(tf.constant(prompts), settings.max_new_tokens, settings.temperature, settings.top_k,
                             settings.top_p, settings.seed)
    return [c.decode("utf-8", errors="replace") for c in out["completions"].numpy()], out["num_tokens"].numpy()


def cmd_train(args):
    from tfglm import runs
    from tfglm.config import load_config
    from tfglm.generate import Generator
    from tfglm.train import train

    overrides = list(args.set)
    if args.data:
        overrides.append("data.files=" + json.dumps(args.data))
    if args.resume:
        if args.config:
            raise TfglmError("--resume continues the run's own config.json; drop --config (use --set to change it)")
        config_path = runs.path(args.out, runs.CONFIG)
        if not os.path.exists(config_path):
            raise TfglmError(f"{args.out}: nothing to resume (no {runs.CONFIG})")
        with open(config_path) as f:
            config = load_config(base=json.load(f), overrides=overrides)
    else:
        config = load_config(args.config, overrides)
        if args.overwrite and os.path.isdir(args.out):
            if not os.path.exists(runs.path(args.out, runs.CONFIG)):
                raise TfglmError(f"{args.out}: --overwrite only replaces a tfglm run directory, and this is not one")
            shutil.rmtree(args.out)
    train(config, args.out, resume=args.resume)
    _, tokenizer, model = runs.load_run(args.out)
    settings = _generate_settings(config)
    texts, _ = generate_texts(Generator(model, tokenizer), [settings.prompt], settings)
    print(f"\nmodel: {os.path.abspath(args.out)}")
    print(f"sample (prompt {settings.prompt!r}, temperature {settings.temperature}):\n{settings.prompt}{texts[0]}")


def cmd_generate(args):
    from tfglm import runs
    from tfglm.generate import Generator

    config, tokenizer, model = runs.load_run(args.model)
    settings = _generate_settings(config, args)
    prompts = args.prompt or [settings.prompt]
    texts, counts = generate_texts(Generator(model, tokenizer), prompts, settings)
    for prompt, text, count in zip(prompts, texts, counts):
        if args.json:
            print(json.dumps({"prompt": prompt, "completion": text, "num_tokens": int(count)}, ensure_ascii=False))
        else:
            print(prompt + text)
            print("-" * 40)


def main(argv=None):
    logging.basicConfig(format="tfglm: %(levelname)s: %(message)s", level=logging.INFO)
    logging.getLogger("tfglm").setLevel(logging.INFO)
    args = _parser().parse_args(argv)
    try:
        {"train": cmd_train, "generate": cmd_generate}[args.command](args)
    except TfglmError as e:
        print(f"tfglm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tfglm: interrupted; the last checkpoint is intact (continue with --resume)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

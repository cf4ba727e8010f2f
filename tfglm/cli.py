"""`tfglm` command line: train, generate and export. A user's mistake is one line on stderr, never a traceback."""

import argparse
import json
import logging
import os
import shutil
import sys

from tfglm.errors import TfglmError

log = logging.getLogger("tfglm")


def _add_generate_options(parser):
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--temperature", type=float, help="0 is greedy")
    parser.add_argument("--top-k", type=int, help="0 disables")
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--seed", type=int)


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
    train.add_argument("--tpu", help="TPU name or address (implies train.strategy tpu under auto)")

    generate = commands.add_parser("generate", help="generate text from a trained run")
    generate.add_argument("--model", required=True, help="run directory")
    generate.add_argument("--prompt", action="append", help="seed text (repeat for several prompts)")
    _add_generate_options(generate)
    generate.add_argument("--json", action="store_true", help="print one JSON object per prompt")

    export = commands.add_parser("export", help="export a trained run as a TF Serving SavedModel version")
    export.add_argument("--model", required=True, help="run directory")
    export.add_argument("--out", required=True, help="model base path; the export is written to OUT/<version>/")
    export.add_argument("--version", type=int, help="version number (default: the next free one)")
    export.add_argument("--no-jit-compile", action="store_true",
                        help="decode without XLA (for a model server without --xla_cpu_compilation_enabled=true)")

    pretrain = commands.add_parser("pretrain", help="pretrain a BERT-style encoder (masked LM + next sentence)")
    pretrain.add_argument("--config", required=True, help="YAML config with model.kind bert (configs/bert-*.yaml)")
    pretrain.add_argument("--data", nargs="+", help="text files, directories, globs, or labelled TSV/CSV/JSONL files")
    pretrain.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    pretrain.add_argument("--out", required=True, help="run directory")
    pretrain.add_argument("--overwrite", action="store_true", help="delete a run already in --out and start afresh")

    finetune = commands.add_parser("finetune", help="fine-tune a pretrained encoder or GPT (or one from scratch) on a "
                                                     "task")
    finetune.add_argument("--model", help="pretrained run directory, from `tfglm pretrain` (an encoder) or `tfglm "
                                           "train` (a GPT); its config and tokenizer are used")
    finetune.add_argument("--task", required=True, choices=["classify"])
    finetune.add_argument("--train", required=True, help="labelled TSV, CSV or JSONL file")
    finetune.add_argument("--eval", required=True, help="labelled file scored into eval.json with the best model")
    finetune.add_argument("--val", help="labelled file for early stopping (default: classify.val_fraction of --train)")
    finetune.add_argument("--from-scratch", action="store_true", help="random initial weights (no pretraining)")
    finetune.add_argument("--config", help="YAML config, for --from-scratch without --model")
    finetune.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                          help="override, e.g. classify.label_column=topic")
    finetune.add_argument("--out", required=True, help="run directory")
    finetune.add_argument("--overwrite", action="store_true", help="delete a run already in --out and start afresh")

    evaluate = commands.add_parser("evaluate", help="score a fine-tuned classifier (--data) or a translation run "
                                                    "(--source, --reference: corpus BLEU)")
    evaluate.add_argument("--model", required=True, help="fine-tuned or translation run directory")
    evaluate.add_argument("--data", help="classifier: labelled TSV, CSV or JSONL file")
    evaluate.add_argument("--source", help="translation: source sentences, one a line (.gz read as gzip)")
    evaluate.add_argument("--reference", help="translation: reference translations, aligned with --source")
    evaluate.add_argument("--beam", type=int, help="translation: beam width (default translate.beam_width; 1 greedy)")

    translate = commands.add_parser("translate", help="translate texts with a translation run")
    translate.add_argument("--model", required=True, help="translation run directory")
    translate.add_argument("texts", nargs="+", help="texts to translate")
    translate.add_argument("--beam", type=int, help="beam width (default translate.beam_width; 1 is greedy)")
    translate.add_argument("--json", action="store_true", help="print one JSON object per text")

    predict = commands.add_parser("predict", help="classify texts with a fine-tuned run")
    predict.add_argument("--model", required=True, help="fine-tuned run directory")
    predict.add_argument("texts", nargs="+", help="texts to classify")
    predict.add_argument("--json", action="store_true", help="print one JSON object per text")

    serve = commands.add_parser("serve", help="serve exported models over TF Serving's REST and gRPC APIs")
    serve.add_argument("--port", type=int, default=8500, help="gRPC port")
    serve.add_argument("--rest_api_port", type=int, default=8501, help="REST port (0 disables REST)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    serve.add_argument("--model_name", default="default", help="name of the model at --model_base_path")
    serve.add_argument("--model_base_path", help="directory of numbered versions written by tfglm export")
    serve.add_argument("--model_config_file", help="TF Serving ModelServerConfig text proto (several models)")
    serve.add_argument("--enable_batching", action="store_true", help="batch concurrent greedy generate requests")
    serve.add_argument("--max_prompt_bytes", type=int, default=64 * 1024, help="longest text accepted, in bytes")
    serve.add_argument("--file_system_poll_wait_seconds", type=float, default=1.0, help="new-version poll interval")

    client = commands.add_parser("client", help="generate with a model served by tfglm serve or TF Serving")
    client.add_argument("--server", default="http://127.0.0.1:8501", help="REST URL, or host:port with --grpc")
    client.add_argument("--grpc", action="store_true", help="use gRPC (--server host:8500)")
    client.add_argument("--model", required=True, help="model name")
    client.add_argument("--prompt", action="append", required=True, help="seed text (repeat for several prompts)")
    _add_generate_options(client)
    return parser


def _overwrite(run_dir):
    """Deletes the run in `run_dir` for --overwrite, refusing a directory that is not a run."""
    from tfglm.tasks import runs

    if os.path.isdir(run_dir):
        if not os.path.exists(runs.path(run_dir, runs.CONFIG)):
            raise TfglmError(f"{run_dir}: --overwrite only replaces a tfglm run directory, and this is not one")
        shutil.rmtree(run_dir)


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
    from tfglm.tasks import runs
    from tfglm.config import load_config
    from tfglm.generation.decode import Generator
    from tfglm.tasks.trainer import train

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
        if args.overwrite:
            _overwrite(args.out)
    if config.model.kind == "translate":
        from tfglm.tasks.seq2seq import train_translation

        train_translation(config, args.out, resume=args.resume)
        print(f"\nmodel: {os.path.abspath(args.out)}")
        return
    if config.model.kind != "gpt":
        raise TfglmError(f"model.kind: train is for GPTs; pretrain a {config.model.kind!r} encoder with tfglm pretrain")
    train(config, args.out, resume=args.resume, tpu=args.tpu)
    _, tokenizer, model = runs.load_run(args.out)
    settings = _generate_settings(config)
    texts, _ = generate_texts(Generator(model, tokenizer), [settings.prompt], settings)
    print(f"\nmodel: {os.path.abspath(args.out)}")
    print(f"sample (prompt {settings.prompt!r}, temperature {settings.temperature}):\n{settings.prompt}{texts[0]}")


def cmd_generate(args):
    from tfglm.tasks import runs
    from tfglm.generation.decode import Generator

    config, tokenizer, model = runs.load_run(args.model)
    if config.model.kind != "gpt":
        use = "translate" if config.model.kind == "translate" else "predict"
        raise TfglmError(f"{args.model}: a {config.model.kind!r} model does not generate free text; use tfglm {use}")
    settings = _generate_settings(config, args)
    prompts = args.prompt or [settings.prompt]
    texts, counts = generate_texts(Generator(model, tokenizer), prompts, settings)
    for prompt, text, count in zip(prompts, texts, counts):
        if args.json:
            print(json.dumps({"prompt": prompt, "completion": text, "num_tokens": int(count)}, ensure_ascii=False))
        else:
            print(prompt + text)
            print("-" * 40)


def cmd_export(args):
    from tfglm.serving.export import export_run

    print(export_run(args.model, args.out, args.version, jit_compile=not args.no_jit_compile))


def cmd_pretrain(args):
    from tfglm.config import load_config
    from tfglm.tasks.masked_lm import pretrain

    overrides = list(args.set) + (["data.files=" + json.dumps(args.data)] if args.data else [])
    config = load_config(args.config, overrides)
    if args.overwrite:
        _overwrite(args.out)
    pretrain(config, args.out)
    print(f"\nmodel: {os.path.abspath(args.out)}")


def cmd_finetune(args):
    from tfglm.tasks import runs
    from tfglm.tasks.classify import finetune
    from tfglm.config import load_config

    if args.model and args.config:
        raise TfglmError("--config: fine-tuning uses the --model run's config; change it with --set")
    if not args.model and not (args.from_scratch and args.config):
        raise TfglmError("--model: give a pretrained run, or --from-scratch with --config")
    config = runs.read_config(args.model, args.set) if args.model else load_config(args.config, args.set)
    if config.model.kind not in ("bert", "gpt"):
        raise TfglmError(f"model.kind: fine-tuning needs an encoder ('bert') or a GPT ('gpt'), got "
                         f"{config.model.kind!r}")
    if args.overwrite:
        _overwrite(args.out)
    pretrained = None if args.from_scratch else args.model
    result = finetune(config, args.out, args.train, args.eval, pretrained=pretrained, val_file=args.val)
    print(json.dumps(result))
    print(f"model: {os.path.abspath(args.out)}")


def cmd_evaluate(args):
    from tfglm.tasks import runs

    if runs.read_config(args.model).model.kind == "translate":
        from tfglm.tasks.seq2seq import evaluate

        if not (args.source and args.reference):
            raise TfglmError("--source and --reference: a translation run is scored on source sentences and their "
                             "reference translations")
        result = evaluate(args.model, args.source, args.reference, args.beam)
        print(f"BLEU = {result['bleu']}  ({result['signature']})")
        print(json.dumps(result))
        return
    from tfglm.tasks.classify import evaluate

    if not args.data:
        raise TfglmError("--data: a classifier is scored on a labelled TSV, CSV or JSONL file")
    print(json.dumps(evaluate(args.model, args.data)))


def cmd_translate(args):
    from tfglm.tasks.seq2seq import load_translator, translate_texts

    for text, translation in zip(args.texts, translate_texts(load_translator(args.model, args.beam), args.texts)):
        print(json.dumps({"text": text, "translation": translation}, ensure_ascii=False) if args.json else translation)


def cmd_predict(args):
    from tfglm.tasks.classify import predict

    for row in predict(args.model, args.texts):
        if args.json:
            print(json.dumps(row, ensure_ascii=False))
        else:
            probs = "  ".join(f"{label}={p:.3f}" for label, p in row["probabilities"].items())
            print(f"{row['label']}\t{probs}\t{row['text']}")


def cmd_serve(args):
    import time

    try:
        from tfglm.serving.server import Server, read_model_config
    except ImportError as e:
        raise TfglmError(f"serve needs tensorflow-serving-api ({e}): pip install 'tfglm[serve]'") from None
    if bool(args.model_config_file) == bool(args.model_base_path):
        raise TfglmError("give --model_base_path (with --model_name) or --model_config_file, not both")
    models = read_model_config(args.model_config_file) if args.model_config_file else {
        args.model_name: args.model_base_path}
    server = Server(models, args.host, args.port, args.rest_api_port or None, args.enable_batching,
                    args.max_prompt_bytes, args.file_system_poll_wait_seconds).start()
    rest = f", REST on http://{args.host}:{server.rest_port}" if args.rest_api_port else ""
    log.info("serving %s: gRPC on %s:%d%s", ", ".join(models), args.host, server.grpc_port, rest)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        log.info("stopped")
    finally:
        server.stop()


def cmd_client(args):
    from tfglm.serving.client import Client

    client = Client(args.server, args.model, "grpc" if args.grpc else "rest")
    out = client.generate(args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    for prompt, completion in zip(args.prompt, out["completions"]):
        print(prompt + completion)
        print("-" * 40)


def main(argv=None):
    logging.basicConfig(format="tfglm: %(levelname)s: %(message)s", level=logging.INFO)
    logging.getLogger("tfglm").setLevel(logging.INFO)
    args = _parser().parse_args(argv)
    try:
        {"train": cmd_train, "generate": cmd_generate, "export": cmd_export, "pretrain": cmd_pretrain,
         "finetune": cmd_finetune, "evaluate": cmd_evaluate, "predict": cmd_predict, "translate": cmd_translate,
         "serve": cmd_serve, "client": cmd_client}[args.command](args)
    except TfglmError as e:
        print(f"tfglm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tfglm: interrupted; the last checkpoint is intact (continue with --resume)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

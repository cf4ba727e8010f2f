"""`tfglm` command line. Every training command runs the one trainer on the run's task; every command that reads a
run looks its task up in the registry. A user's mistake is one line on stderr, never a traceback."""

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import warnings

from tfglm.config import GENERATE_OPTIONS, generate_settings, stop_sequences
from tfglm.errors import TfglmError
from tfglm.tasks import catalog

log = logging.getLogger("tfglm")


def _add_generate_options(parser):
    for option in GENERATE_OPTIONS:
        parser.add_argument("--" + option.name.replace("_", "-"), type=option.type, help=option.help)


def _add_evaluation_options(parser):
    """The fields of every task's `Evaluation`, as options (a field several tasks share is one option)."""
    from tfglm.tasks import registry

    fields = {}
    for task in registry.tasks():
        for field in dataclasses.fields(task.Evaluation):
            fields.setdefault(field.name, field)
    for field in fields.values():
        parser.add_argument("--" + field.name.replace("_", "-"), dest=field.name, type=field.type,
                            help=field.metadata.get("help"))


def _add_training_options(parser, config_help):
    parser.add_argument("--config", help=config_help)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override, e.g. train.steps=200")
    parser.add_argument("--out", required=True, help="run directory")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="delete a run already in --out and start afresh")
    parser.add_argument("--tpu", help="TPU name or address (implies train.strategy tpu under auto)")
    parser.set_defaults(trains=True)


class _Command(argparse.ArgumentParser):
    """A command's parser; one whose options only the imported task classes tell (`evaluate`) adds them with
    `add_options(parser)` when it is the command given, so that the others, and `tfglm --help`, need no import."""

    def __init__(self, *args, add_options=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_options = add_options

    def parse_known_args(self, args=None, namespace=None):
        if self.add_options:
            self.add_options, add_options = None, self.add_options
            add_options(self)
        return super().parse_known_args(args, namespace)


def _parser():
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", action="store_true", help="show TensorFlow's and XLA's own log lines")
    parser = argparse.ArgumentParser(prog="tfglm", description="TensorFlow Generative Language Models",
                                     parents=[common])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Command)
    tasks = catalog.declarations()

    def command(name, help, **kwargs):
        return commands.add_parser(name, help=help, parents=[common], **kwargs)

    train = command("train", "train a model on text files (or the embedded corpus): a GPT, an encoder (masked LM) "
                             "or a translation model, by the config's model.kind")
    _add_training_options(train, "YAML config (default: configs/default.yaml values)")
    train.add_argument("--data", nargs="+", help="training text files, directories or globs (overrides data.files)")

    prepare = command("prepare", "clean, deduplicate and tokenize a corpus of any size into token shards for `tfglm "
                                 "train --data DIR` (or `tfglm pretrain`), with Apache Beam (pip install "
                                 "'tfglm[beam]'); Beam's own pipeline options (--runner, --project, ...) pass through")
    prepare.add_argument("--config", help="YAML config whose tokenizer and data settings the shards are made with")
    prepare.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. "
                                                                                          "data.format=jsonl")
    prepare.add_argument("--data", nargs="+", required=True,
                         help="text files, JSONL or Parquet files, directories or globs (local or gs://)")
    prepare.add_argument("--out", required=True, help="directory for the shards, tokenizer and manifest")

    for task in tasks:  # the tasks with a training command of their own (`tfglm pretrain`)
        if task.command:
            own = command(task.command["name"], task.command["help"])
            _add_training_options(own, task.command["config"])
            own.add_argument("--data", nargs="+", help=task.command["data"])
            own.set_defaults(task=task.name)

    finetune = command("finetune", "fine-tune a pretrained encoder or GPT (or one from scratch) on a task")
    _add_training_options(finetune, "YAML config, for --from-scratch without --model")
    finetune.add_argument("--model", help="pretrained run directory, from `tfglm pretrain` (an encoder) or `tfglm "
                                          "train` (a GPT); its config and tokenizer are used")
    finetuned = [task for task in tasks if task.finetune]
    finetune.add_argument("--task", default=finetuned[0].name, choices=[task.name for task in finetuned],
                          help="; ".join(f"{task.name}: {task.finetune}" for task in finetuned))
    finetune.add_argument("--train", help="the training file: " + "; ".join(f"{task.name}: {task.finetune}"
                                                                             for task in finetuned))
    finetune.add_argument("--eval", help="a file like --train, scored into eval.json with the best model (optional)")
    finetune.add_argument("--val", help="a file like --train for validation and early stopping (default: the "
                                        "task's val_fraction of --train)")
    finetune.add_argument("--from-scratch", action="store_true", help="random initial weights (no pretraining)")
    finetune.add_argument("--knowledge", help="chat: a knowledge base (from tfglm index) to ground the replies in "
                                              "(chat.knowledge)")

    importer = command("import", "import a pretrained checkpoint as a run directory (BERT-family encoders as "
                                 "masked_lm runs, GPT-2 as causal_lm runs)")
    importer.add_argument("--from", dest="source", required=True, choices=["huggingface", "keras-hub"],
                          help="the directory's layout: Hugging Face's (config.json, model.safetensors, tokenizer "
                               "files) or a KerasHub preset (save_to_preset)")
    importer.add_argument("directory", help="checkpoint directory")
    importer.add_argument("--out", required=True, help="run directory to write")
    importer.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                          help="override, e.g. model.max_length=128 (keeps the first 128 positions)")
    importer.add_argument("--overwrite", action="store_true", help="replace a run already in --out")

    generate = command("generate", "generate text from a trained run")
    generate.add_argument("--model", required=True, help="run directory")
    generate.add_argument("--prompt", action="append", help="seed text (repeat for several prompts)")
    _add_generate_options(generate)
    generate.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    generate.add_argument("--stream", action="store_true", help="print each completion as it is generated")
    generate.add_argument("--stop", action="append",
                          help="end a completion before this text (repeat for up to 4; the text excludes it)")

    chat = command("chat", "talk with a chat run in the terminal (/reset, /exit), answer --message turns, or answer "
                           "the independent conversations of an --input file in batches")
    chat.add_argument("--model", required=True, help="chat run directory (from `tfglm finetune --task chat`)")
    chat.add_argument("--system", help="system message (default: the run's chat.system; '' for none)")
    chat.add_argument("--message", action="append",
                      help="a user turn, answered without a terminal (repeat for a conversation: each is answered "
                           "with the turns before it)")
    chat.add_argument("--input", help="a file of independent conversations to answer, each ending with the user's "
                                      "turn: JSONL (chat messages, or a chat.question_column field), or a TSV/CSV "
                                      "question column")
    chat.add_argument("--output", help="with --input: the .jsonl file to write, a line an input conversation: its "
                                       "messages with the reply, and num_tokens (default: stdout)")
    chat.add_argument("--batch-size", type=int, default=32, help="with --input: conversations answered at once")
    _add_generate_options(chat)
    chat.add_argument("--json", action="store_true", help="with --message: print one JSON object per reply")

    export = command("export", "export a trained run as a TF Serving SavedModel version")
    export.add_argument("--model", required=True, help="run directory")
    export.add_argument("--out", required=True, help="model base path; the export is written to OUT/<version>/")
    export.add_argument("--version", type=int, help="version number (default: the next free one)")
    export.add_argument("--no-jit-compile", action="store_true",
                        help="decode without XLA (for a model server without --xla_cpu_compilation_enabled=true)")

    evaluate = command("evaluate", "score a run into its eval.json: a language model's perplexity on text or a "
                                   "prepared corpus's validation split (--data), a classifier on labelled data "
                                   "(--data), a chat model's replies (--data), a translation model's BLEU (--source, "
                                   "--reference)",
                       add_options=_add_evaluation_options)
    evaluate.add_argument("--model", required=True, help="run directory")

    translate = command("translate", "translate texts with a translation run")
    translate.add_argument("--model", required=True, help="translation run directory")
    translate.add_argument("texts", nargs="+", help="texts to translate")
    translate.add_argument("--beam", type=int, help="beam width (default translate.beam_width; 1 is greedy)")
    translate.add_argument("--json", action="store_true", help="print one JSON object per text")

    predict = command("predict", "classify texts with a fine-tuned run")
    predict.add_argument("--model", required=True, help="fine-tuned run directory")
    predict.add_argument("texts", nargs="+", help="texts to classify")
    predict.add_argument("--json", action="store_true", help="print one JSON object per text")

    embed = command("embed", "embed texts with an embed run (a sentence-transformers encoder from `tfglm import`): "
                             "L2-normalized vectors, one per text")
    embed.add_argument("--model", required=True, help="embed run directory")
    embed.add_argument("texts", nargs="*", help="texts to embed")
    embed.add_argument("--input", help="a file of texts to embed: one a line (.txt), or JSONL with a \"text\" field")
    embed.add_argument("--output", help="write the vectors to a .npy file (float32 [texts, dim]) or a .jsonl file "
                                        "(default: one JSON object a text on stdout)")

    index = command("index", "build a knowledge base: the entries of a JSONL, CSV or TSV file (question or "
                             "questions, answer, optional intent and id) embedded with an embed run")
    index.add_argument("--model", required=True, help="embed run directory")
    index.add_argument("--data", required=True, help="the entries (.jsonl, .csv or .tsv)")
    index.add_argument("--out", required=True, help="index directory to write (an index there is replaced)")

    serve = command("serve", "serve exported models over TF Serving's REST and gRPC APIs")
    serve.add_argument("--port", type=int, default=8500, help="gRPC port")
    serve.add_argument("--rest_api_port", type=int, default=8501, help="REST port (0 disables REST)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    serve.add_argument("--model_name", default="default", help="name of the model at --model_base_path")
    serve.add_argument("--model_base_path", help="directory of numbered versions written by tfglm export")
    serve.add_argument("--model_config_file", help="TF Serving ModelServerConfig text proto (several models)")
    serve.add_argument("--enable_batching", action="store_true",
                       help="accepted for TF Serving's command lines: tfglm serve always batches generation "
                            "(every generate, chat and OpenAI request shares one decode engine per model)")
    serve.add_argument("--max_slots", type=int, help="sequences a model decodes at once (its decode engine's KV-cache "
                                                     "slots, each layers x 2 x context x width values; default 16, "
                                                     "fewer when they would take over 1/16 of memory)")
    serve.add_argument("--max_prompt_bytes", type=int, default=64 * 1024, help="longest text accepted, in bytes")
    serve.add_argument("--file_system_poll_wait_seconds", type=float, default=1.0, help="new-version poll interval")
    serve.add_argument("--max_batch_size", type=int, default=32,
                       help="most prompts (rows) a request may hold")
    serve.add_argument("--max_enqueued_requests", type=int, default=64,
                       help="requests running or waiting, over both protocols, before 503 / UNAVAILABLE")
    serve.add_argument("--max_connections", type=int, default=256, help="REST connections before 503")
    serve.add_argument("--max_request_bytes", type=int, default=4 << 20, help="largest REST body or gRPC message")
    serve.add_argument("--read_timeout_seconds", type=float, default=10.0,
                       help="time a REST request has to send its headers, and again its body (then 408)")

    client = command("client", "generate with a model served by tfglm serve or TF Serving")
    client.add_argument("--server", default="http://127.0.0.1:8501", help="REST URL, or host:port with --grpc")
    client.add_argument("--grpc", action="store_true", help="use gRPC (--server host:8500)")
    client.add_argument("--model", required=True, help="model name")
    client.add_argument("--prompt", action="append", required=True, help="seed text (repeat for several prompts)")
    _add_generate_options(client)
    client.add_argument("--stop", action="append",
                        help="end a completion before this text (repeat for up to 4; REST to tfglm serve only)")
    return parser


def _overwrite(run_dir):
    """Deletes the run in `run_dir` for --overwrite, refusing a directory that is not a run (or a failed start's
    leftovers: a tokenizer/ and nothing else)."""
    if os.path.isdir(run_dir):
        leftovers = set(os.listdir(run_dir)) <= {"tokenizer", "tmp-config.json"}
        if not os.path.exists(os.path.join(run_dir, "config.json")) and not leftovers:
            raise TfglmError(f"{run_dir}: --overwrite only replaces a tfglm run directory, and this is not one")
        shutil.rmtree(run_dir)


def _training_config(args, overrides, default_config=None):
    """The config of a training command: the run's own for --resume, else --config (or `default_config`, a run
    directory's) with the overrides."""
    from tfglm.config import load_config
    from tfglm.training import runs

    if args.resume and args.overwrite:
        raise TfglmError("--resume continues the run in --out and --overwrite deletes it: give one of them")
    if args.resume:
        if args.config:
            raise TfglmError("--resume continues the run's own config.json; drop --config (use --set to change it)")
        if not runs.is_run(args.out):
            raise TfglmError(f"{args.out}: nothing to resume (no {runs.CONFIG})")
        return runs.read_config(args.out, overrides)
    config = runs.read_config(default_config, overrides) if default_config else load_config(args.config, overrides)
    if args.overwrite:
        _overwrite(args.out)
    return config


def _data_overrides(args):
    return list(args.set) + (["data.files=" + json.dumps(args.data)] if getattr(args, "data", None) else [])


def cmd_train(args):
    """`tfglm train` (the task for the config's model.kind), or a task's own training command (`args.task`)."""
    from tfglm.tasks import registry
    from tfglm.training.trainer import train

    run = train(_training_config(args, _data_overrides(args)), args.out, task=getattr(args, "task", None),
                resume=args.resume, tpu=args.tpu)
    print(f"\nmodel: {os.path.abspath(args.out)}")
    if run.task.generates:
        from tfglm.generation.decode import generate_texts

        best = registry.load_run(args.out)
        settings = best.config.generate
        texts, _ = generate_texts(best.task.generator(best.model), [settings.prompt], settings)
        print(f"sample (prompt {settings.prompt!r}, temperature {settings.temperature}):\n{settings.prompt}{texts[0]}")


def cmd_prepare(args, beam_args):
    from tfglm.config import load_config
    from tfglm.data.prepare import prepare

    prepare(load_config(args.config, args.set), args.data, args.out, beam_args)
    print(f"\nprepared: {args.out} (train with --data {args.out})")


def cmd_finetune(args):
    from tfglm.tasks import registry
    from tfglm.training import runs
    from tfglm.training.trainer import train

    overrides = list(args.set)
    task = (runs.task_name(args.out) or args.task) if args.resume else args.task
    registry.get_task(task).check_overrides(overrides)
    if not args.resume:
        if args.model and args.config:
            raise TfglmError("--config: fine-tuning uses the --model run's config; change it with --set")
        if not args.model and not (args.from_scratch and args.config):
            raise TfglmError("--model: give a pretrained run, or --from-scratch with --config")
        if not args.train:
            raise TfglmError("--train: a fine-tune needs a training file")
        section = registry.get_task(args.task).key()
        overrides += [f"{section}.train_file={json.dumps(args.train)}",
                      f"{section}.eval_file={json.dumps(args.eval or '')}",
                      f"{section}.val_file={json.dumps(args.val or '')}",
                      f"train.init_from={json.dumps('' if args.from_scratch else args.model)}"]
        if args.knowledge:
            overrides.append(f"{section}.knowledge={json.dumps(args.knowledge)}")
    config = _training_config(args, overrides, default_config=None if args.resume else args.model)
    train(config, args.out, task=task, resume=args.resume, tpu=args.tpu)
    eval_file = getattr(config, registry.get_task(task).key()).eval_file
    if eval_file:
        run = registry.load_run(args.out)
        result = run.task.evaluate(run.model, run.task.Evaluation(data=eval_file))
        runs.write_json(runs.path(args.out, runs.EVAL), result)
        print(json.dumps(result))
    print(f"model: {os.path.abspath(args.out)}")


def cmd_import(args):
    from tfglm.training.pretrained import import_checkpoint

    if args.overwrite:
        _overwrite(args.out)
    task = import_checkpoint(args.source, args.directory, args.out, args.set)
    print(f"{task} run: {os.path.abspath(args.out)}")


def _check_utf8(option, texts):
    """Command-line texts that cannot be encoded (undecodable bytes Python kept as surrogates) are a user error."""
    for i, text in enumerate(texts, 1):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise TfglmError(f"--{option} {i}: not valid UTF-8 (byte {e.start} of the {option})") from None


def _stop_sequences(args):
    """The --stop options as stop sequences (`config.stop_sequences`: OpenAI's `stop` rules)."""
    try:
        return stop_sequences(args.stop)
    except ValueError as e:
        raise TfglmError(f"--stop: {e}") from None


def cmd_generate(args):
    from tfglm.generation.decode import warn_truncated
    from tfglm.serving.engine import generate_requests
    from tfglm.tasks import registry

    stop = _stop_sequences(args)
    if args.stream and args.json:
        raise TfglmError("--stream prints text as it comes; --json prints whole objects: give one of them")
    run = registry.load_run(args.model)
    generator = run.task.generator(run.model)
    settings = generate_settings(run.config, vars(args))
    prompts = args.prompt or [settings.prompt]
    _check_utf8("prompt", prompts)
    warn_truncated(generator, prompts, settings)
    for prompt, request in zip(prompts, generate_requests(generator, prompts, settings, stop, args.stream)):
        if args.stream:
            print(prompt, end="", flush=True)
            for piece in request.texts():
                print(piece, end="", flush=True)
            print("\n" + "-" * 40)
            continue
        text = "".join(request.texts())
        if args.json:
            print(json.dumps({"prompt": prompt, "completion": text, "num_tokens": len(request.tokens),
                              "finish_reason": request.finish_reason}, ensure_ascii=False))
        else:
            print(prompt + text)
            print("-" * 40)


def _chat_terminal(session):
    """The interactive loop: a line in, the reply streamed out; /reset, /exit, Ctrl-D; Ctrl-C stops a reply."""
    try:
        import readline  # noqa: F401  (importing it gives input() line editing and a history)
    except ImportError:
        pass
    print("tfglm chat: /reset starts a new conversation; /exit or Ctrl-D ends; Ctrl-C stops a reply",
          file=sys.stderr)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print()
            return
        except KeyboardInterrupt:
            print()
            continue
        command = line.strip()
        if command == "/exit":
            return
        if command == "/reset":
            session.reset()
            print("(new conversation)")
            continue
        if not command:
            continue
        print("assistant> ", end="", flush=True)
        reply = session.stream(command)
        try:
            for piece in reply:
                print(piece, end="", flush=True)
            print()
        except KeyboardInterrupt:
            reply.close()
            print(" [stopped]")


def _answer_file(run, session, args):
    """`tfglm chat --input`: the conversations of the file answered in batches, written as JSONL."""
    from tfglm.data.chat import read_conversations
    from tfglm.training import runs

    c = run.config.chat
    conversations = read_conversations(args.input, c.question_column, c.answer_column, answered=False)
    replies, counts = session.answer_all(conversations, args.batch_size)
    lines = [json.dumps({"messages": [{"role": role, "content": text} for role, text in zip(roles, contents)]
                         + [{"role": "assistant", "content": reply}], "num_tokens": count}, ensure_ascii=False) + "\n"
             for (roles, contents), reply, count in zip(conversations, replies, counts)]
    if not args.output:
        sys.stdout.writelines(lines)
        return

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(lines)

    runs.atomic_write(args.output, write)
    log.info("answered %d conversations into %s", len(lines), args.output)


def cmd_chat(args):
    from tfglm.tasks import registry

    if args.json and not args.message:
        raise TfglmError("--json: prints the replies to --message turns; give --message")
    if args.input and args.message:
        raise TfglmError("--input answers a file of independent conversations, --message the turns of one: give one "
                         "of them")
    if args.output and not args.input:
        raise TfglmError("--output: holds the replies to --input; give --input")
    if args.output and not args.output.endswith(".jsonl"):
        raise TfglmError(f"--output {args.output}: expected a .jsonl file")
    if args.batch_size < 1:
        raise TfglmError(f"--batch-size: must be >= 1, got {args.batch_size}")
    _check_utf8("message", args.message or [])
    run = registry.load_run(args.model)
    session = run.task.chat_session(run.model, generate_settings(run.config, vars(args)), args.system)
    if args.input:
        _answer_file(run, session, args)
        return
    if not args.message:
        _chat_terminal(session)
        return
    for message in args.message:
        reply, count = session.reply(message)
        if args.json:
            print(json.dumps({"message": message, "reply": reply, "num_tokens": count}, ensure_ascii=False))
        else:
            print(reply)


def cmd_export(args):
    from tfglm.serving.export import export_run

    path = export_run(args.model, args.out, args.version, jit_compile=not args.no_jit_compile)
    print(path)
    log.info("exported version %s of %s; in Python: import tensorflow_text, then tf.saved_model.load(%r); to serve "
             "every version: tfglm serve --model_base_path %s", os.path.basename(path), args.out, path, args.out)


def cmd_evaluate(args):
    from tfglm.tasks import registry
    from tfglm.training import runs

    run = registry.load_run(args.model)
    inputs = run.task.Evaluation(**{field.name: getattr(args, field.name)
                                    for field in dataclasses.fields(run.task.Evaluation)})
    result = run.task.evaluate(run.model, inputs)
    runs.write_json(runs.path(args.model, runs.EVAL), result)
    if "bleu" in result:
        scores = [f"{name} = {result[key]}" for name, key in (("BLEU", "bleu"), ("chrF", "chrf"), ("ROUGE-L", "rouge_l"),
                                                              ("intent accuracy", "intent_accuracy")) if key in result]
        print(f"{'  '.join(scores)}  ({result['signature']})")
    print(json.dumps(result))


def cmd_translate(args):
    from tfglm.generation.beam import translate_texts
    from tfglm.tasks import registry

    run = registry.load_run(args.model)
    translator = run.task.translator(run.model, args.beam)
    for text, translation in zip(args.texts, translate_texts(translator, args.texts)):
        print(json.dumps({"text": text, "translation": translation}, ensure_ascii=False) if args.json else translation)


def cmd_predict(args):
    from tfglm.tasks import registry

    run = registry.load_run(args.model)
    for row in run.task.predict(run.model, args.texts):
        if args.json:
            print(json.dumps(row, ensure_ascii=False))
        else:
            probs = "  ".join(f"{label}={p:.3f}" for label, p in row["probabilities"].items())
            print(f"{row['label']}\t{probs}\t{row['text']}")


def _read_texts(path):
    """The texts of a .txt file (its non-empty lines) or a .jsonl file (each row's "text")."""
    from tfglm.data import labelled

    if path.endswith(".jsonl"):
        texts = []
        for line, row in labelled.rows(path):
            if not isinstance(row.get("text"), str):
                raise TfglmError(f"{path}:{line}: no \"text\" string")
            texts.append(row["text"])
        return texts
    try:
        with open(path, encoding="utf-8") as f:
            return [line.rstrip("\n") for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise TfglmError(f"--input {path}: cannot read ({getattr(e, 'strerror', None) or e})") from None


def cmd_embed(args):
    import numpy as np

    from tfglm.tasks import registry
    from tfglm.training import runs

    texts = list(args.texts) + (_read_texts(args.input) if args.input else [])
    if not texts:
        raise TfglmError("nothing to embed: give texts or --input")
    _check_utf8("text", texts)
    if args.output and not args.output.endswith((".npy", ".jsonl")):
        raise TfglmError(f"--output {args.output}: expected a .npy or .jsonl file")
    run = registry.load_run(args.model)
    vectors = run.task.embedder(run.model)(texts)
    lines = [json.dumps({"text": text, "embedding": vector.tolist()}, ensure_ascii=False) + "\n"
             for text, vector in zip(texts, vectors)]
    if not args.output:
        sys.stdout.writelines(lines)
        return

    def write(tmp):
        if args.output.endswith(".npy"):
            np.save(tmp, vectors)
        else:
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(lines)

    runs.atomic_write(args.output, write)
    log.info("wrote %d vectors of %d dimensions to %s", *vectors.shape, args.output)


def cmd_index(args):
    from tfglm.tasks.embed import build_index

    knowledge = build_index(args.model, args.data, args.out)
    log.info("indexed %d entries (%d questions) in %s", len(knowledge.entries), len(knowledge.vectors), args.out)
    print(os.path.abspath(args.out))


def cmd_serve(args):
    import signal
    import time

    from tfglm.serving.serve import Server
    from tfglm.serving.versions import read_model_config

    if bool(args.model_config_file) == bool(args.model_base_path):
        raise TfglmError("give --model_base_path (with --model_name) or --model_config_file, not both")
    models = read_model_config(args.model_config_file) if args.model_config_file else {
        args.model_name: args.model_base_path}
    server = Server(models, args.host, args.port, args.rest_api_port or None, args.max_prompt_bytes,
                    args.file_system_poll_wait_seconds, max_batch_size=args.max_batch_size,
                    max_enqueued_requests=args.max_enqueued_requests, max_connections=args.max_connections,
                    max_request_bytes=args.max_request_bytes, read_timeout_s=args.read_timeout_seconds,
                    max_slots=args.max_slots).start()
    rest = f", REST on http://{args.host}:{server.rest_port}" if args.rest_api_port else ""
    log.info("serving %s: gRPC on %s:%d%s", ", ".join(models), args.host, server.grpc_port, rest)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stopped as by Ctrl-C: the versions' processes end
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
    out = client.generate(args.prompt, **{o.name: getattr(args, o.name) for o in GENERATE_OPTIONS},
                          stop=_stop_sequences(args) or None)
    for prompt, completion in zip(args.prompt, out["completions"]):
        print(prompt + completion)
        print("-" * 40)


def _quiet(verbose):
    """Without --verbose, TensorFlow, XLA, absl and Python warnings stay off the console; tfglm's own lines stay."""
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0" if verbose else "3"
    if not verbose:
        warnings.filterwarnings("ignore")
        import absl.logging

        absl.logging.set_verbosity(absl.logging.ERROR)
        logging.getLogger("tensorflow").setLevel(logging.ERROR)
        for handler in logging.getLogger().handlers:  # other libraries' records (Apache Beam's) through the root
            handler.addFilter(lambda record: record.name.startswith("tfglm"))


def main(argv=None):
    logging.basicConfig(format="tfglm: %(levelname)s: %(message)s", level=logging.INFO)
    logging.getLogger("tfglm").setLevel(logging.INFO)
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "prepare":  # only Beam's pipeline options go unparsed
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    _quiet(args.verbose)
    commands = {"train": cmd_train, "generate": cmd_generate, "chat": cmd_chat, "export": cmd_export,
                "finetune": cmd_finetune, "import": cmd_import, "evaluate": cmd_evaluate,
                "prepare": lambda args: cmd_prepare(args, extra), "predict": cmd_predict, "translate": cmd_translate,
                "serve": cmd_serve, "client": cmd_client, "embed": cmd_embed, "index": cmd_index}
    try:
        commands.get(args.command, cmd_train)(args)  # the rest are tasks' own training commands
    except TfglmError as e:
        print(f"tfglm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        training = getattr(args, "trains", False)
        print("tfglm: interrupted" + ("; the last checkpoint is intact (continue with --resume)" if training else ""),
              file=sys.stderr)
        return 130
    return 0


def run():
    """The `tfglm` program. Without --verbose, what TensorFlow's C++ runtime, XLA and absl write to the process's
    stderr (file descriptor 2) goes to /dev/null, whatever their own log settings; tfglm's lines, errors and
    Python tracebacks keep the real stderr (and so do the processes tfglm starts itself)."""
    if "--verbose" not in sys.argv[1:]:
        terminal = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
        sys.stderr = os.fdopen(terminal, "w", buffering=1, encoding=sys.stderr.encoding, errors="backslashreplace")
    sys.exit(main())


if __name__ == "__main__":
    run()

"""Chat fine-tuning on the Chit Chat Challenge conversations: does the chat format lower a pretrained GPT's perplexity
on the assistant's replies beyond what the same amount of further training on the same conversations does?

In one process, each phase timed: the `chitchat-dataset` package converted (bench/data/chitchat_jsonl.py: a seeded
90/5/5 split by conversation); a base GPT pretrained with `tfglm train --config configs/chat-chitchat.yaml` on the
training conversations as plain text (one message a line, a blank line between conversations) and scored on the test
conversations; then, from that base, on the same subset of the training conversations (the first
`--finetune-conversations`, default 560: one epoch of their examples is about as many steps as the pretraining):
- the chat fine-tune, `tfglm finetune --task chat --model BASE` on the subset as JSONL (one epoch of S steps,
  validation on the val split, its eval.json on the test split);
- the control, `tfglm train --config BASE/config.json --set train.init_from=BASE` on the subset as the same plain
  text as the pretraining, for the same S steps (read from the fine-tune's metrics.jsonl), with the fine-tune's batch
  size and learning-rate schedule (chat.batch_size, chat.learning_rate, warm-up 10%, decay to 0), so that the format
  is what differs: the chat template and a loss on the assistant's tokens only, against plain text and a loss on
  every character.
Then three sample replies of the fine-tuned model and of the control.

All perplexities are exp(mean cross-entropy) over the same characters (the config's tokenizer is `char`, so a message
is the same tokens wherever it stands). The fine-tuned model's is eval.json's: each test conversation in the chat
template `<eot> <|user|> text <eot> <|assistant|> text <eot> ...`, one longer than the context split at turn
boundaries into several examples (tfglm.tasks.chat.encode: the most recent messages that fit, then the most recent
of those left, ...; a message longer than the context alone cut from the left), the loss on each assistant message's
characters and the `<eot>` that ends it. The base and the control have no role markers, so they read the same rows as
the plain text they were trained on: the markers removed, each message's closing `<eot>` written as the line end
"\\n" and the leading `<eot>` as the blank line "\\n\\n" that precedes a conversation in their training text; the loss
on the same assistant characters and the line end that ends each assistant message. So all three count the same
messages' characters, plus one end-of-message token per assistant message (`<eot>` for the chat model, "\\n" for the
others), against the same preceding messages.

Samples: for the first three test conversations that open with a user message, the reply to that first message alone
(at most 100 characters), greedy (temperature 0) and sampled (temperature 0.8, top_k 40, seed 0), next to the
conversation's own reply: the fine-tuned model's through the chat template, the control's as the plain text's
continuation of "\\n\\n" + message + "\\n" up to its first line end.
`--quick`: 40 pretraining steps, 60 conversations for the fine-tune and the control, the first 20 val and test ones.

    nice -n 10 python -m bench.quality.chat [--quick] [--finetune-conversations N]
"""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time

from bench import extra

extra.require("chitchat_dataset")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tfglm  # noqa: E402
from bench import common  # noqa: E402
from bench.data import chitchat_jsonl  # noqa: E402
from tfglm.data.chat import ChatTokenizer, read_conversations  # noqa: E402
from tfglm.data.tokenizers import load_tokenizer  # noqa: E402
from tfglm.tasks.chat import assistant_loss, encode  # noqa: E402
from tfglm.training import runs  # noqa: E402

CONFIG = os.path.join(common.CONFIGS, "chat-chitchat.yaml")
GREEDY, SAMPLED = (0.0, 0, 1.0, 0), (0.8, 40, 1.0, 0)  # temperature, top_k, top_p, seed


def tfglm_command(*args):
    """Runs the `tfglm` command line in a child process; returns its wall seconds."""
    start = time.time()
    subprocess.run([sys.executable, "-m", "tfglm.cli", *args], check=True)
    return time.time() - start


def as_plain_text(ids, weights, tokenizer):
    """The chat rows (ids, weights) as the base model's plain text: role markers removed, each `<eot>` a line end and
    the leading one the blank line before a conversation, right-padded with line ends of weight 0."""
    newline = int(tokenizer.base.tokenize(tf.constant(["\n"])).flat_values[0])
    plain_ids, plain_weights = [], []
    for row, row_weights in zip(ids, weights):
        keep = row < tokenizer.base.vocab_size
        text, text_weights = np.where(row == tokenizer.eot_id, newline, row)[keep], row_weights[keep]
        if row[0] == tokenizer.eot_id:
            text, text_weights = np.concatenate([[newline], text]), np.concatenate([[0.0], text_weights])
        assert len(text) <= len(row), "a row with a leading <eot> has a role marker to drop"
        plain_ids.append(np.pad(text, (0, len(row) - len(text)), constant_values=newline))
        plain_weights.append(np.pad(text_weights, (0, len(row) - len(text))))
    return np.stack(plain_ids).astype(np.int32), np.stack(plain_weights).astype(np.float32)


def head(path, count, name):
    """A file of `path`'s first `count` conversations (lines): its path, and the conversations' messages."""
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()[:count]
    out = os.path.join(os.path.dirname(path), name)
    with open(out, "w", encoding="utf-8") as f:
        f.writelines(lines)
    return out, [json.loads(line)["messages"] for line in lines]


def assistant_share(weights, conversations):
    """(assistant tokens learnt or scored, all the conversations' assistant tokens (characters + 1 each)); those left
    out are the ends of replies cut to fit the context (`chat.long`)."""
    total = sum(len(m["content"]) + 1 for messages in conversations for m in messages if m["role"] == "assistant")
    return int(weights[:, 1:].sum()), total  # position 0 has no prediction: not scored


def samples(chat_dir, control_dir, test_path, count=3, new_tokens=100):
    """[{user, reference, chat greedy, chat sampled, control greedy, control sampled}] for the first `count` test
    conversations opening with a user message."""
    chat, control = tfglm.load_run(chat_dir), tfglm.load_run(control_dir)
    chat_generator, control_generator = chat.task.generator(chat.model), control.task.generator(control.model)
    firsts = [contents[:2] for roles, contents in read_conversations(test_path) if roles[:2] == ["user", "assistant"]]
    out = []
    for user, reference in firsts[:count]:
        dialogue = {"user": user, "reference": reference}
        for name, options in (("greedy", GREEDY), ("sampled", SAMPLED)):
            reply = chat_generator.chat(tf.constant([["user"]]), tf.constant([[user]]), new_tokens, *options)
            dialogue[f"chat {name}"] = reply["completions"].numpy()[0].decode(errors="replace")
            text = control_generator.generate(tf.constant([f"\n\n{user}\n"]), new_tokens, *options)
            dialogue[f"control {name}"] = text["completions"].numpy()[0].decode(errors="replace").split("\n")[0]
        out.append(dialogue)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--finetune-conversations", type=int, default=None,
                        help="training conversations the fine-tune and the control train on (560; --quick 60)")
    parser.add_argument("--out", default=os.path.join(common.ROOT, "runs", "bench-chat"))
    args = parser.parse_args()
    count = args.finetune_conversations or (60 if args.quick else 560)
    shutil.rmtree(args.out, ignore_errors=True)
    base, chat, control = (os.path.join(args.out, name) for name in ("base", "chat", "control"))
    wall = {}

    start = time.time()
    data = chitchat_jsonl.write_split(os.path.join(args.out, "data"))
    if args.quick:
        for split in ("val", "test"):
            data[split], _ = head(data[split], 20, f"chitchat-{split}-quick.jsonl")
    subset, conversations = head(data["train"], count, f"chitchat-train-{count}.jsonl")
    subset_text = subset.removesuffix(".jsonl") + ".txt"
    with open(subset_text, "w", encoding="utf-8") as f:
        f.write(chitchat_jsonl.plain_text(conversations))
    wall["convert"] = time.time() - start

    quick = ["--set", "train.steps=40", "--set", "train.eval_interval=20", "--set", "train.steps_per_execution=20",
             "--set", "generate.max_new_tokens=20"] if args.quick else []
    wall["pretrain"] = tfglm_command("train", "--config", CONFIG, "--data", data["text"], "--out", base, *quick)

    start = time.time()
    base_run = tfglm.load_run(base)
    tokenizer = ChatTokenizer(load_tokenizer(runs.path(base, runs.TOKENIZER)))
    length = base_run.config.model.max_length + 1
    test_conversations = read_conversations(data["test"])
    ids, weights = encode(tokenizer, test_conversations, length, data["test"])
    plain = as_plain_text(ids, weights, tokenizer)
    batch = base_run.config.chat.batch_size
    base_loss, base_tokens = assistant_loss(base_run.model, *plain, batch)
    wall["score base"] = time.time() - start

    start = time.time()
    _, subset_weights = encode(tokenizer, read_conversations(subset), length, subset)
    with open(data["test"], encoding="utf-8") as f:
        shares = {"fine-tune subset": assistant_share(subset_weights, conversations),
                  "test": assistant_share(weights, [json.loads(line)["messages"] for line in f])}
    subset_examples = len(subset_weights)
    wall["encode subset"] = time.time() - start

    wall["finetune"] = tfglm_command("finetune", "--task", "chat", "--model", base, "--train", subset,
                                     "--val", data["val"], "--eval", data["test"], "--out", chat)
    scores = runs.read_json(runs.path(chat, runs.EVAL))
    assert scores["assistant_tokens"] == base_tokens, (scores["assistant_tokens"], base_tokens)
    steps = runs.read_metrics(chat)[-1]["step"]

    c, t = base_run.config.chat, base_run.config.train
    settings = {"init_from": json.dumps(base), "steps": steps, "batch_size": c.batch_size,
                "learning_rate": c.learning_rate, "min_learning_rate": 0, "warmup_steps": steps // 10,
                "eval_interval": steps, "steps_per_execution": min(t.steps_per_execution, steps)}
    overrides = [a for name, value in settings.items() for a in ("--set", f"train.{name}={value}")]
    wall["control"] = tfglm_command("train", "--config", runs.path(base, runs.CONFIG), "--data", subset_text,
                                    "--out", control, *overrides)

    start = time.time()
    control_loss, control_tokens = assistant_loss(tfglm.load_run(control).model, *plain, batch)
    assert control_tokens == base_tokens, (control_tokens, base_tokens)
    wall["score control"] = time.time() - start

    start = time.time()
    dialogues = samples(chat, control, data["test"])
    wall["samples"] = time.time() - start

    history = {name: runs.read_metrics(run) for name, run in (("base", base), ("chat", chat), ("control", control))}
    pretrain_steps = history["base"][-1]["step"]
    rows = [{"model": f"base ({pretrain_steps} steps, plain text)", "assistant tokens": base_tokens,
             "loss": base_loss, "perplexity": math.exp(base_loss), "training s": history["base"][-1]["wall_s"],
             "phase s": wall["pretrain"]},
            {"model": f"base + {steps} plain-text steps (control)", "assistant tokens": control_tokens,
             "loss": control_loss, "perplexity": math.exp(control_loss),
             "training s": history["control"][-1]["wall_s"], "phase s": wall["control"]},
            {"model": f"base + {steps} chat steps (fine-tuned)", "assistant tokens": scores["assistant_tokens"],
             "loss": scores["loss"], "perplexity": scores["perplexity"], "training s": history["chat"][-1]["wall_s"],
             "phase s": wall["finetune"]}]
    common.print_table(rows, ["model", "assistant tokens", "loss", "perplexity", "training s", "phase s"])
    print("wall s:", {name: round(seconds, 1) for name, seconds in wall.items()})
    print(f"fine-tune subset: {count} conversations, {subset_examples} examples, {steps} steps of {c.batch_size} "
          f"(one epoch); control: {steps} steps of {c.batch_size} x {base_run.config.model.max_length} characters")
    for split, (kept, total) in shares.items():
        print(f"{split}: {kept:,} of {total:,} assistant tokens ({kept / total:.1%}) learnt or scored")
    for d in dialogues:
        print(f"\nuser: {d['user']}\nreference: {d['reference']}")
        for name in ("chat greedy", "chat sampled", "control greedy", "control sampled"):
            print(f"{name}: {d[name]}")
    common.write_json("quality_chat.json", {
        "quick": args.quick, "finetune_conversations": count, "finetune_examples": subset_examples,
        "finetune_steps": steps, "config": runs.read_json(runs.path(chat, runs.CONFIG)),
        "control_settings": settings, "cpu_count": os.cpu_count(), "results": rows,
        "wall_s": {name: round(seconds, 1) for name, seconds in wall.items()},
        "assistant_tokens_learnt_or_scored": {split: {"kept": kept, "total": total}
                                              for split, (kept, total) in shares.items()},
        "metrics": history, "samples": dialogues})


if __name__ == "__main__":
    main()

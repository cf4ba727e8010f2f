"""Chat fine-tuning on the Chit Chat Challenge conversations: does `tfglm finetune --task chat` lower a pretrained
GPT's perplexity on the assistant's replies?

In one process, each phase timed: the `chitchat-dataset` package converted (bench/chitchat_jsonl.py: a seeded
90/5/5 split by conversation); a base GPT pretrained with `tfglm train --config configs/chat-chitchat.yaml` on the
training conversations as plain text (one message a line, a blank line between conversations); the base scored on
the test conversations; `tfglm finetune --task chat --model BASE` on the training conversations (validation on the
val split, its eval.json on the test split); three sample replies.

Both perplexities are exp(mean cross-entropy) over the same characters (the config's tokenizer is `char`, so a
message is the same tokens wherever it stands). The fine-tuned model's is eval.json's: each test conversation in the
chat template `<eot> <|user|> text <eot> <|assistant|> text <eot> ...`, its oldest messages dropped whole to fit the
context (tfglm.tasks.chat.encode), the loss on each assistant message's characters and the `<eot>` that ends it.
The base model has no role markers, so it reads the same rows as the plain text it was pretrained on: the markers
removed, each message's closing `<eot>` written as the line end "\\n" and the leading `<eot>` as the blank line
"\\n\\n" that precedes a conversation in its training text; the loss on the same assistant characters and the line
end that ends each assistant message. So both count the same messages' characters, plus one end-of-message token
per assistant message (`<eot>` for the chat model, "\\n" for the base), against the same preceding messages.

Samples: for the first three test conversations that open with a user message, the fine-tuned model's greedy reply
(temperature 0, at most 100 characters) to that first message alone, next to the conversation's own reply.
`--quick`: 40 pretraining steps and a fine-tune on the first 320 training conversations.

    nice -n 10 python bench/quality_chat.py [--quick]
"""

import argparse
import math
import os
import shutil
import subprocess
import sys
import time

import chitchat_jsonl
import common
import numpy as np
import tensorflow as tf

import tfglm
from tfglm.data.chat import ChatTokenizer, read_conversations
from tfglm.data.tokenizers import load_tokenizer
from tfglm.tasks import runs
from tfglm.tasks.chat import assistant_loss, encode

CONFIG = os.path.join(common.CONFIGS, "chat-chitchat.yaml")


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


def assistant_share(tokenizer, path, length):
    """(assistant tokens trained or scored within the context, all the file's assistant tokens)."""
    conversations = read_conversations(path)
    _, weights = encode(tokenizer, conversations, length, path)  # position 0 has no prediction: not scored
    total = sum(len(text) + 1 for roles, contents in conversations for role, text in zip(roles, contents)
                if role == "assistant")
    return int(weights[:, 1:].sum()), total


def samples(run_dir, test_path, count=3):
    """[{user, reference, reply}] for the first `count` test conversations opening with a user message."""
    run = tfglm.load_run(run_dir)
    generator = run.task.generator(run.model)
    out = []
    for roles, contents in read_conversations(test_path):
        if roles[:2] == ["user", "assistant"] and len(out) < count:
            reply = generator.chat(tf.constant([["user"]]), tf.constant([[contents[0]]]), 100, 0.0, 0, 1.0, 0)
            out.append({"user": contents[0], "reference": contents[1],
                        "reply": reply["completions"].numpy()[0].decode(errors="replace")})
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=os.path.join(common.ROOT, "runs", "bench-chat"))
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    base, chat = os.path.join(args.out, "base"), os.path.join(args.out, "chat")
    wall = {}

    start = time.time()
    data = chitchat_jsonl.write_split(os.path.join(args.out, "data"))
    if args.quick:
        with open(data["train"], encoding="utf-8") as f:
            head = f.readlines()[:320]
        data["train"] = os.path.join(args.out, "data", "chitchat-train-quick.jsonl")
        with open(data["train"], "w", encoding="utf-8") as f:
            f.writelines(head)
    wall["convert"] = time.time() - start

    quick = ["--set", "train.steps=40", "--set", "train.eval_interval=20", "--set", "train.steps_per_execution=20",
             "--set", "generate.max_new_tokens=20"] if args.quick else []
    wall["pretrain"] = tfglm_command("train", "--config", CONFIG, "--data", data["text"], "--out", base, *quick)

    start = time.time()
    base_run = tfglm.load_run(base)
    tokenizer = ChatTokenizer(load_tokenizer(runs.path(base, runs.TOKENIZER)))
    length = base_run.config.model.max_length + 1
    ids, weights = encode(tokenizer, read_conversations(data["test"]), length, data["test"])
    base_loss, base_tokens = assistant_loss(base_run.model, *as_plain_text(ids, weights, tokenizer),
                                            base_run.config.chat.batch_size)
    wall["score base"] = time.time() - start

    wall["finetune"] = tfglm_command("finetune", "--task", "chat", "--model", base, "--train", data["train"],
                                     "--val", data["val"], "--eval", data["test"], "--out", chat)
    scores = runs.read_json(runs.path(chat, runs.EVAL))
    assert scores["assistant_tokens"] == base_tokens, (scores["assistant_tokens"], base_tokens)

    start = time.time()
    dialogues = samples(chat, data["test"])
    wall["samples"] = time.time() - start

    shares = {split: assistant_share(tokenizer, data[split], length) for split in ("train", "test")}
    history = {"base": runs.read_metrics(base), "chat": runs.read_metrics(chat)}  # the last wall_s: training time
    rows = [{"model": "base (plain text)", "assistant tokens": base_tokens, "loss": base_loss,
             "perplexity": math.exp(base_loss), "training s": history["base"][-1]["wall_s"],
             "phase s": wall["pretrain"]},
            {"model": "chat fine-tuned", "assistant tokens": scores["assistant_tokens"], "loss": scores["loss"],
             "perplexity": scores["perplexity"], "training s": history["chat"][-1]["wall_s"],
             "phase s": wall["finetune"]}]
    common.print_table(rows, ["model", "assistant tokens", "loss", "perplexity", "training s", "phase s"])
    print("wall s:", {name: round(seconds, 1) for name, seconds in wall.items()})
    for split, (kept, total) in shares.items():
        print(f"{split}: {kept:,} of {total:,} assistant tokens ({kept / total:.1%}) within the context")
    for d in dialogues:
        print(f"\nuser: {d['user']}\nreference: {d['reference']}\nfine-tuned: {d['reply']}")
    common.write_json("quality_chat.json", {
        "quick": args.quick, "config": runs.read_json(runs.path(chat, runs.CONFIG)), "cpu_count": os.cpu_count(),
        "results": rows, "wall_s": {name: round(seconds, 1) for name, seconds in wall.items()},
        "assistant_tokens_within_context": {split: {"kept": kept, "total": total} for split, (kept, total)
                                            in shares.items()},
        "metrics": history,
        "samples": dialogues})


if __name__ == "__main__":
    main()

"""Writes the `chitchat-dataset` pip package's conversations (BYU's Chit Chat Challenge, 7,168 conversations) as
tfglm conversations JSONL for `tfglm finetune --task chat`, and the training share as plain text for `tfglm train`.

The package's dataset.json maps a conversation id to {"messages": [turn, ...], ...}, a turn being one speaker's
messages [{"text", "timestamp", "sender"}, ...], the speakers alternating. Turn i becomes one message, role "user"
for even i (the first speaker) and "assistant" for odd i, its texts joined with a space and whitespace normalised: a
message is then one line of the plain text, so the plain text's line ends are exactly the message ends (and a space
is the package's own default joiner). Empty turns are skipped, and the same speaker's turns that skipping makes
adjacent are merged; a conversation ends at its last assistant message (an unanswered user message teaches the chat
task nothing), and conversations without an assistant message (one speaker only) are dropped.

A seeded 90/5/5 split by conversation: OUT/chitchat-train.jsonl, chitchat-val.jsonl, chitchat-test.jsonl, and
OUT/chitchat-train.txt, the training conversations one message a line with a blank line between conversations.

    python -m bench.data.chitchat_jsonl [--out runs/chitchat-data]
"""

import argparse
import json
import os

from bench import extra

extra.require("chitchat_dataset")

import chitchat_dataset  # noqa: E402
import numpy as np  # noqa: E402

SPLITS = (("train", 0.9), ("val", 0.05), ("test", 0.05))


def to_messages(turns):
    """(messages [{"role", "content"}] up to the last assistant one, empty turns skipped, turns merged) of one
    conversation's turns."""
    messages, empty, merged = [], 0, 0
    for i, turn in enumerate(turns):
        text = " ".join(" ".join(m["text"] for m in turn).split())
        role = "assistant" if i % 2 else "user"
        if not text:
            empty += 1
        elif messages and messages[-1]["role"] == role:
            messages[-1]["content"] += " " + text
            merged += 1
        else:
            messages.append({"role": role, "content": text})
    while messages and messages[-1]["role"] == "user":
        messages.pop()
    return messages, empty, merged


def plain_text(conversations):
    """Conversations ([{"role", "content"}] each) as the training text: one message a line, a blank line between
    conversations."""
    return "\n".join("".join(m["content"] + "\n" for m in messages) for messages in conversations)


def write_split(out_dir, seed=0):
    """Writes the three JSONL splits and the training text; returns {split: path} (split "text" for the text)."""
    dataset = chitchat_dataset.Dataset()
    conversations, empty, merged = [], 0, 0
    for record in dataset.values():
        messages, e, m = to_messages(record["messages"])
        empty, merged = empty + e, merged + m
        if messages:
            conversations.append(messages)
    print(f"{len(dataset)} conversations: {len(dataset) - len(conversations)} without an assistant message dropped, "
          f"{empty} empty turns skipped, {merged} turns merged")
    order = np.random.RandomState(seed).permutation(len(conversations))
    os.makedirs(out_dir, exist_ok=True)
    paths, start = {}, 0
    for name, share in SPLITS:
        end = len(order) if name == SPLITS[-1][0] else start + round(share * len(order))
        part = [conversations[i] for i in order[start:end]]
        start = end
        paths[name] = os.path.join(out_dir, f"chitchat-{name}.jsonl")
        with open(paths[name], "w", encoding="utf-8") as f:
            for messages in part:
                f.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
        turns = sum(len(messages) for messages in part)
        replies = sum(m["role"] == "assistant" for messages in part for m in messages)
        print(f"{paths[name]}: {len(part)} conversations, {turns} messages ({replies} assistant)")
        if name == "train":
            paths["text"] = os.path.join(out_dir, "chitchat-train.txt")
            with open(paths["text"], "w", encoding="utf-8") as f:
                f.write(plain_text(part))
            print(f"{paths['text']}: {os.path.getsize(paths['text']):,} bytes")
    return paths


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/chitchat-data")
    write_split(parser.parse_args().out)


if __name__ == "__main__":
    main()

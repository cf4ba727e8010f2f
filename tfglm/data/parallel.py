"""Parallel text for translation: two aligned files (plain or .gz) or a TSV of source<TAB>target lines, read as
sentence pairs (`tfglm.preprocessors.Seq2SeqPreprocessor` tokenizes and batches them).

Policy: files with different line counts are rejected, naming both counts; a pair with an empty side is skipped,
counted and reported with its first line. Padding is id 0, SentencePiece's `<unk>`, which a byte-fallback model
never emits.
"""

import gzip
import logging
import os

from tfglm.errors import TfglmError

log = logging.getLogger("tfglm")
PAD = 0


def _lines(path):
    """A file's lines (split on \\n only, so a stray \\r or U+2028 never shifts the alignment)."""
    if not os.path.isfile(path):
        raise TfglmError(f"{path}: no such file")
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", errors="replace", newline="\n") as f:
        return [line.rstrip("\n") for line in f]


def read_pairs(source="", target="", pairs=""):
    """(sources, targets): the non-empty pairs of aligned files `source` and `target`, or of the TSV `pairs`."""
    if pairs:
        rows = []
        for line, text in enumerate(_lines(pairs), 1):
            fields = text.split("\t") if text.strip() else ["", ""]
            if len(fields) != 2:
                raise TfglmError(f"{pairs}:{line}: {len(fields)} tab-separated fields, expected 2 (source, target)")
            rows.append(fields)
        where = pairs
    else:
        if not (source and target):
            raise TfglmError("config: translate.source and translate.target (or translate.pairs): no parallel data")
        sources, targets = _lines(source), _lines(target)
        if len(sources) != len(targets):
            raise TfglmError(f"{source} has {len(sources)} lines but {target} has {len(targets)}: parallel files "
                             f"must be aligned line by line")
        rows, where = zip(sources, targets), f"{source}, {target}"
    kept, empty, first_empty = [], 0, None
    for line, (s, t) in enumerate(rows, 1):
        s, t = s.strip(), t.strip()
        if not (s and t):
            empty += 1
            first_empty = first_empty or line
            continue
        kept.append((s, t))
    if empty:
        log.warning("%s: skipped %d pair(s) with an empty side (the first on line %d)", where, empty, first_empty)
    if not kept:
        raise TfglmError(f"{where}: no sentence pairs")
    return [s for s, _ in kept], [t for _, t in kept]

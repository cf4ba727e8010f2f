"""`tfglm prepare`: a corpus of any size into token shards (`tfglm.data.shards`), with Apache Beam.

One pipeline, so a small corpus pays the runner's start-up once. It reads every document twice, where it is: the
scan applies Unicode NFC normalization, the length limits (`data.min_chars`, `data.max_chars`) and a content hash,
counts what it drops, finds exact duplicates (every copy after the first, in input order, is dropped) and collects
what a new tokenizer learns from: the character set, or a sample (the documents of lowest hash) for SentencePiece
and WordPiece. One step then trains the tokenizer, the way `tfglm train` and `tfglm pretrain` train it (or takes
`train.init_from`'s), and saves it beside the shards; the write step, which waits for it and for the duplicates as
side inputs, tokenizes each unit's kept documents in the graph with it and writes the shards. A document's split is a
function of its hash (validation when the hash falls in the lowest `data.val_fraction`), so it does not depend on the
order documents arrive in. Segments (`tfglm.data.shards`) are documents for a GPT config and non-empty lines for a
BERT one (`tfglm pretrain`'s sentence pairs).

Units of work: a batch of text files (one document a file) up to UNIT_BYTES, a byte range of a JSONL file (a line
belongs to the range it starts in) or a row group of a Parquet file. Each is read where it runs, so no text passes
through the runner's shuffle (only 16-byte hashes and the tokenizer's sample do), and each unit writes its own
shards, named by its index, so the output is the same on every runner and after retries.

A mistake in the data is one error line naming the file (and line, or row group): a JSONL line that is not a JSON
object with a string `data.text_field`, a Parquet file without that column, a file that cannot be read. What is
cheap is checked before the pipeline starts (every file's size, each JSONL file's first line, each Parquet file's
schema); the rest is raised in the worker as a `TfglmError` and re-raised here, out of the runner's traceback.

Runner: the DirectRunner in multi-processing mode on every core (in this process when there is one unit of work,
which no other core could share, so a small corpus starts no worker), unless Beam options say otherwise; Beam's own
pipeline options (`--runner DataflowRunner --project P --region R --temp_location gs://...`, `--runner FlinkRunner`,
`--runner SparkRunner`) pass through unchanged. Paths go through `tf.io.gfile`, so `gs://` works for input and output.
"""

import collections
import hashlib
import heapq
import io
import json
import logging
import re
import unicodedata

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import tensorflow as tf
from apache_beam.options.pipeline_options import PipelineOptions

from tfglm.data import shards
from tfglm.data.tokenizers import CharTokenizer, load_tokenizer, new_tokenizer
from tfglm.errors import TfglmError

log = logging.getLogger("tfglm")
UNIT_BYTES = 64 << 20
SAMPLE_DOCS = 4000  # documents a new SentencePiece or WordPiece vocabulary learns from, each cut to SAMPLE_CHARS
SAMPLE_CHARS = 8000
TOKENIZE_BATCH = 256
DIRECT_DEFAULTS = ["--direct_running_mode=multi_processing", "--direct_num_workers=0"]  # 0: every core
DIRECT_ONE_UNIT = ["--direct_running_mode=in_memory", "--direct_num_workers=1"]  # no worker processes to start


def list_files(patterns):
    """Files, directories (recursively) and globs, through `tf.io.gfile`, sorted."""
    files = []
    for pattern in patterns:
        if tf.io.gfile.isdir(pattern):
            matches = [shards.join(d, n) for d, _, names in tf.io.gfile.walk(pattern) for n in names]
        else:
            matches = [p for p in tf.io.gfile.glob(pattern) if not tf.io.gfile.isdir(p)]
        if not matches:
            raise TfglmError(f"data: {pattern}: matches no files")
        files += matches
    return sorted(set(files))


def file_format(path, configured):
    if configured != "auto":
        return configured
    name = path.lower()
    return "jsonl" if name.endswith((".jsonl", ".json")) else "parquet" if name.endswith(".parquet") else "text"


class GFileReader(io.RawIOBase):
    """A `tf.io.gfile` file as the seekable binary file pyarrow reads Parquet from (GFile lacks `closed`)."""

    def __init__(self, path):
        super().__init__()
        self.file = tf.io.gfile.GFile(path, "rb")

    def readable(self):
        return True

    def seekable(self):
        return True

    def seek(self, offset, whence=io.SEEK_SET):
        self.file.seek(offset, whence)
        return self.file.tell()

    def tell(self):
        return self.file.tell()

    def readinto(self, buffer):
        data = self.file.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def close(self):
        self.file.close()
        super().close()


def parquet_file(path):
    try:
        return pq.ParquetFile(io.BufferedReader(GFileReader(path)))
    except Exception as e:  # pyarrow raises several kinds for a file that is not Parquet
        raise TfglmError(f"{path}: not a Parquet file ({first_line(e)})") from None


def first_line(error):
    return (getattr(error, "message", None) or str(error)).strip().splitlines()[0]


def jsonl_text(line, text_field):
    """The text of one JSONL line (None for a null or non-string value); ValueError, saying why, for a line that is
    not a JSON object with the field."""
    try:
        row = json.loads(line.strip())  # a string cut short by the newline is unterminated, not a control character
    except ValueError as e:
        raise ValueError(f"not JSON ({first_line(e)})") from None
    if not isinstance(row, dict) or text_field not in row:
        raise ValueError(f"no field {text_field!r} (data.text_field)")
    text = row[text_field]
    return text if isinstance(text, str) else None


def check_first_line(path, text_field):
    """Reads a JSONL file's first non-empty line, so a wrong format or `data.text_field` stops before the pipeline."""
    with tf.io.gfile.GFile(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    jsonl_text(line, text_field)
                except ValueError as e:
                    raise TfglmError(f"{path}:{number}: {e}") from None
                return


def plan_units(files, data):
    """The units of work: ("text", [paths]), ("jsonl", path, start, end) or ("parquet", path, row group)."""
    units, batch, batch_bytes = [], [], 0
    for path in files:
        kind, size = file_format(path, data.format), tf.io.gfile.stat(path).length
        if kind == "text":
            batch.append(path)
            batch_bytes += size
            if batch_bytes >= UNIT_BYTES:
                units.append(("text", batch))
                batch, batch_bytes = [], 0
        elif kind == "jsonl":
            check_first_line(path, data.text_field)
            units += [("jsonl", path, start, min(start + UNIT_BYTES, size)) for start in range(0, size, UNIT_BYTES)]
        else:
            parquet = parquet_file(path)
            schema = parquet.schema_arrow
            if data.text_field not in schema.names:
                raise TfglmError(f"{path}: no column {data.text_field!r} (data.text_field); it has "
                                 f"{', '.join(schema.names)}")
            column = schema.field(data.text_field).type
            if not (pa.types.is_string(column) or pa.types.is_large_string(column)):
                raise TfglmError(f"{path}: column {data.text_field!r} (data.text_field) holds {column}, not text")
            units += [("parquet", path, group) for group in range(parquet.num_row_groups)]
    if batch:
        units.append(("text", batch))
    return units


def line_number(path, offset):
    """The number of the line that starts at byte `offset` of `path` (read only to name a line in an error)."""
    lines = 1
    with tf.io.gfile.GFile(path, "rb") as f:
        while offset > 0:
            chunk = f.read(min(offset, 1 << 24))
            lines, offset = lines + chunk.count(b"\n"), offset - len(chunk)
    return lines


def read_unit(unit, text_field, counts):
    """The unit's raw documents in order; binary text files and null texts are counted in `counts`, not yielded."""
    kind, path = unit[0], unit[1]
    try:
        if kind == "text":
            for path in unit[1]:
                with tf.io.gfile.GFile(path, "rb") as f:
                    data = f.read()
                if b"\0" in data:
                    counts["binary_files"] += 1
                    continue
                counts["bytes"] += len(data)
                yield data.decode("utf-8", errors="replace")
        elif kind == "jsonl":
            _, path, start, end = unit
            with tf.io.gfile.GFile(path, "rb") as f:
                f.seek(max(start - 1, 0))
                if start:
                    f.readline()  # the rest of a line that began in the previous range (or the newline before ours)
                first, lines = f.tell(), 0
                while f.tell() < end:
                    line = f.readline()
                    if not line:
                        break
                    lines += 1
                    counts["bytes"] += len(line)
                    if not line.strip():
                        continue
                    try:
                        text = jsonl_text(line, text_field)
                    except ValueError as e:
                        raise TfglmError(f"{path}:{line_number(path, first) + lines - 1}: {e}") from None
                    if text is None:
                        counts["no_text"] += 1
                    else:
                        yield text
        else:
            _, path, group = unit
            try:
                column = parquet_file(path).read_row_group(group, columns=[text_field]).column(0).to_pylist()
            except Exception as e:  # pyarrow's several kinds
                raise TfglmError(f"{path}: row group {group}: not readable ({first_line(e)})") from None
            for text in column:
                if isinstance(text, str):
                    counts["bytes"] += len(text.encode())
                    yield text
                else:
                    counts["no_text"] += 1
    except tf.errors.OpError as e:
        raise TfglmError(f"{path}: cannot read ({first_line(e)})") from None


def clean_documents(unit, data, counts):
    """(index in unit, hash, text) of the unit's documents that pass cleaning: NFC, then the length limits."""
    for index, text in enumerate(read_unit(unit, data.text_field, counts)):
        counts["documents"] += 1
        text = unicodedata.normalize("NFC", text)
        if len(text.strip()) < max(data.min_chars, 1):
            counts["too_short"] += 1
        elif data.max_chars and len(text) > data.max_chars:
            counts["too_long"] += 1
        else:
            yield index, hashlib.blake2b(text.encode(), digest_size=16).hexdigest(), text


def is_validation(digest, val_fraction):
    return int(digest[:8], 16) < val_fraction * 16 ** 8


def scan_unit(numbered, data, learn):
    """One unit's counts, (hash, (unit, index)) pairs, and what a new tokenizer learns from (`learn`): its character
    set ("chars") or its documents of lowest hash ("sample")."""
    number, unit = numbered
    counts = collections.Counter()
    hashes, chars, sample = [], set(), []
    for index, digest, text in clean_documents(unit, data, counts):
        hashes.append((digest, (number, index)))
        if learn == "chars":
            chars.update(text)
        elif learn == "sample":
            entry = (-int(digest, 16), digest, text[:SAMPLE_CHARS])
            (heapq.heappush if len(sample) < SAMPLE_DOCS else heapq.heappushpop)(sample, entry)
    return {"counts": dict(counts), "hashes": hashes, "chars": "".join(sorted(chars)),
            "sample": [(digest, text) for _, digest, text in sample]}


def copies_after_first(keyed):
    """The locations of every copy of a document but the first in input order."""
    _, locations = keyed
    return sorted(locations)[1:]


def add_counts(dicts):
    total = collections.Counter()
    for d in dicts:
        total.update(d)
    return dict(total)


def write_json(value, path):
    with tf.io.gfile.GFile(path, "w") as f:
        json.dump(value, f)


def read_json(path):
    with tf.io.gfile.GFile(path) as f:
        return json.load(f)


def unit_duplicates(locations):
    """{unit number: indexes in the unit of the documents to drop}, from (unit, index) locations."""
    dropped = collections.defaultdict(list)
    for number, index in locations:
        dropped[number].append(index)
    return dict(dropped)


def document_segments(text, segments):
    """The texts a document's segments are tokenized from: its non-empty lines, or the whole document."""
    return [line.strip() for line in text.split("\n") if line.strip()] if segments == "lines" else [text]


class WriteShards(beam.DoFn):
    """Tokenizes a unit's kept documents with the run's tokenizer and writes its training and validation shards, each
    with its segment index."""

    def __init__(self, out, data, segments):
        self.out, self.data, self.segments = out, data, segments
        self.tokenize = None

    def process(self, numbered, dropped, tokenizer):
        number, unit = numbered
        if tokenizer is None:  # no document passed cleaning
            return
        if self.tokenize is None:  # the tokenizer is saved once the side input is ready, after `setup`
            loaded = shards.read_tokenizer(shards.join(self.out, shards.TOKENIZER))
            self.tokenize = tf.function(loaded.tokenize, input_signature=[tf.TensorSpec([None], tf.string)])
        eot, dtype = tokenizer["eot_id"], tokenizer["dtype"]
        dropped = set(dropped.get(number, ()))
        counts = {split: {"tokens": 0, "segments": 0} for split in ("train", "validation")}
        names = {split: f"{split}-{number:05d}" for split in counts}
        files = {(split, kind): tf.io.gfile.GFile(shards.join(self.out, f"{names[split]}.{kind}.tmp"), "wb")
                 for split in counts for kind in ("bin", "idx")}
        pending = {split: [] for split in counts}

        def flush(split):
            docs = pending[split]
            ids = self.tokenize(tf.constant([text for doc in docs for text in doc]))
            flat, lengths = ids.flat_values.numpy(), ids.row_lengths().numpy()
            if self.segments == "documents":  # each document's tokens followed by <eot>
                flat, lengths = np.insert(flat, np.cumsum(lengths), eot), lengths + 1
            document = np.repeat(np.arange(len(docs)), [len(doc) for doc in docs])[lengths > 0]
            lengths = lengths[lengths > 0]  # a line of nothing the tokenizer keeps is no segment
            index = np.zeros(len(lengths), shards.INDEX)
            index["end"] = counts[split]["tokens"] + np.cumsum(lengths)
            index["document_end"] = np.append(document[1:] != document[:-1], True)
            files[split, "bin"].write(flat.astype(dtype).tobytes())
            files[split, "idx"].write(index.tobytes())
            counts[split]["tokens"] += len(flat)
            counts[split]["segments"] += len(index)
            pending[split] = []

        for index, digest, text in clean_documents(unit, self.data, collections.Counter()):
            if index in dropped:
                continue
            split = "validation" if is_validation(digest, self.data.val_fraction) else "train"
            pending[split].append(document_segments(text, self.segments))
            if len(pending[split]) == TOKENIZE_BATCH:
                flush(split)
        written = {}
        for split in counts:
            if pending[split]:
                flush(split)
            for kind in ("bin", "idx"):
                files[split, kind].close()
                path = shards.join(self.out, f"{names[split]}.{kind}")
                if counts[split]["segments"]:
                    tf.io.gfile.rename(path + ".tmp", path, overwrite=True)
                else:
                    tf.io.gfile.remove(path + ".tmp")
            written[split] = {"path": f"{names[split]}.bin", "index": f"{names[split]}.idx", **counts[split]}
        yield written | {"unit": number}


def pipeline_options(beam_args, num_units):
    """Beam's options from the command line, with the DirectRunner on every core unless they choose otherwise; in
    this process when there is one unit of work (a small corpus), which other cores could not share."""
    chosen = {arg.split("=")[0] for arg in beam_args}
    defaults = DIRECT_DEFAULTS if num_units > 1 else DIRECT_ONE_UNIT
    return PipelineOptions([d for d in defaults if d.split("=")[0] not in chosen] + list(beam_args))


def make_tokenizer(_, config, out, chars, sample):
    """Saves the run's tokenizer into `out` (`train.init_from`'s, or one trained as `tfglm train` or `tfglm
    pretrain` would) and returns what the write step and the manifest need of it; None when no document passed
    cleaning."""
    if config.train.init_from:
        tokenizer = load_tokenizer(shards.join(config.train.init_from, shards.TOKENIZER))
    elif not (chars or sample):
        return None
    elif config.tokenizer.kind == "char":
        tokenizer = CharTokenizer(chars)
    else:
        texts = [text for _, text in sorted(sample)]
        tokenizer = new_tokenizer(config, [line for text in texts for line in text.splitlines() if line])
    sha256 = shards.save_tokenizer(tokenizer, shards.join(out, shards.TOKENIZER))
    return {"kind": tokenizer.kind, "sha256": sha256, "vocab_size": tokenizer.vocab_size,
            "eot_id": getattr(tokenizer, "eot_id", None),
            "dtype": "uint16" if tokenizer.vocab_size <= 1 << 16 else "uint32"}


def worker_error(error):
    """The `TfglmError` message a Beam worker raised, out of the runner's exception: the worker's own exception with
    Beam's step name added (in process), or another kind holding the worker's traceback as text (other processes).
    None when the failure was another."""
    found = [str(error)] if isinstance(error, TfglmError) else re.findall(r"TfglmError: (.+)", str(error))
    return re.sub(r" \[while running .*\]$", "", found[-1].strip()) if found else None


def prepare(config, patterns, out, beam_args=()):
    """Cleans, deduplicates and tokenizes the files `patterns` name into shards and a manifest in `out`; returns
    the manifest."""
    if config.model.kind not in ("gpt", "bert"):
        raise TfglmError(f"model.kind: prepared shards train causal language models (gpt) and masked ones (bert), "
                         f"got {config.model.kind!r}")
    if config.tokenizer.kind == "bytepair" and not config.train.init_from:
        raise TfglmError("tokenizer.kind: 'bytepair' vocabularies come from `tfglm import`; set train.init_from to "
                         "an imported run to prepare with its tokenizer")
    if tf.io.gfile.exists(shards.join(out, shards.MANIFEST)):
        raise TfglmError(f"{out}: already holds a prepared corpus; choose another --out")
    data = config.data
    segments = "lines" if config.model.kind == "bert" else "documents"
    files = list_files(patterns)
    units = list(enumerate(plan_units(files, data)))
    log.info("prepare: %d file(s) in %d unit(s) of work", len(files), len(units))
    tf.io.gfile.makedirs(out)
    scan_dir = shards.join(out, "scan")
    tf.io.gfile.makedirs(scan_dir)
    learn = None if config.train.init_from else "chars" if config.tokenizer.kind == "char" else "sample"

    def written_to(name):
        return f"write {name}" >> beam.Map(write_json, shards.join(scan_dir, f"{name}.json"))

    try:
        with beam.Pipeline(options=pipeline_options(beam_args, len(units))) as p:
            spread = p | "units" >> beam.Create(units) | "spread units" >> beam.Reshuffle()
            scans = spread | "scan" >> beam.Map(scan_unit, data, learn)
            scans | beam.Map(lambda s: s["counts"]) | "add counts" >> beam.CombineGlobally(add_counts) | \
                written_to("counts")
            duplicates = (scans | beam.FlatMap(lambda s: s["hashes"]) | beam.GroupByKey()
                          | beam.FlatMap(copies_after_first) | "duplicates" >> beam.combiners.ToList())
            chars = scans | beam.Map(lambda s: s["chars"]) | "character set" >> beam.CombineGlobally(
                lambda c: "".join(set("".join(c))))
            sample = scans | beam.FlatMap(lambda s: s["sample"]) | beam.combiners.Top.Smallest(SAMPLE_DOCS)
            tokenizer = (p | "start tokenizer" >> beam.Create([None])
                         | "tokenizer" >> beam.Map(make_tokenizer, config, out, beam.pvalue.AsSingleton(chars),
                                                   beam.pvalue.AsSingleton(sample)))
            tokenizer | written_to("tokenizer")
            duplicates | beam.Map(len) | written_to("duplicates")
            (spread | "tokenize and write" >> beam.ParDo(
                WriteShards(out, data, segments),
                beam.pvalue.AsSingleton(duplicates | beam.Map(unit_duplicates)), beam.pvalue.AsSingleton(tokenizer))
             | "shards" >> beam.combiners.ToList() | written_to("shards"))
    except Exception as e:  # the runner's own kinds, the worker's traceback inside
        message = worker_error(e)
        if message is None:
            raise
        raise TfglmError(message) from None

    counts = collections.Counter(read_json(shards.join(scan_dir, "counts.json")))
    duplicates = read_json(shards.join(scan_dir, "duplicates.json"))
    kept = counts["documents"] - counts["too_short"] - counts["too_long"] - duplicates
    if kept < 1:
        raise TfglmError(f"data: no document left to prepare ({counts['documents']} read, {counts['too_short']} too "
                         f"short, {counts['too_long']} too long, {duplicates} duplicates)")
    tokenizer = read_json(shards.join(scan_dir, "tokenizer.json"))
    written = sorted(read_json(shards.join(scan_dir, "shards.json")), key=lambda r: r["unit"])
    manifest = {
        "format": shards.FORMAT, "dtype": tokenizer["dtype"], "segments": segments, "tokenizer": shards.TOKENIZER,
        "tokenizer_sha256": tokenizer["sha256"], "tokenizer_kind": tokenizer["kind"],
        "vocab_size": tokenizer["vocab_size"], "eot_id": tokenizer["eot_id"], "val_fraction": data.val_fraction,
        "sources": patterns,
        "documents": {"read": counts["documents"], "kept": kept, "duplicates": duplicates,
                      "too_short": counts["too_short"], "too_long": counts["too_long"], "no_text": counts["no_text"],
                      "binary_files": counts["binary_files"]},
        "bytes_read": counts["bytes"],
        "splits": {split: [r[split] for r in written if r[split]["segments"]] for split in ("train", "validation")},
    }
    for split, listed in manifest["splits"].items():
        manifest[f"{split}_tokens"] = sum(s["tokens"] for s in listed)
        manifest[f"{split}_segments"] = sum(s["segments"] for s in listed)
    shards.write_manifest(out, manifest)
    tf.io.gfile.rmtree(scan_dir)
    d = manifest["documents"]
    log.info("prepare: %d documents read, %d kept; dropped %d duplicates, %d too short, %d too long, %d with no text, "
             "%d binary files", d["read"], d["kept"], d["duplicates"], d["too_short"], d["too_long"], d["no_text"],
             d["binary_files"])
    log.info("prepare: %d training and %d validation tokens (%d + %d %s) in %d + %d shards, vocabulary %d: %s",
             manifest["train_tokens"], manifest["validation_tokens"], manifest["train_segments"],
             manifest["validation_segments"], segments, len(manifest["splits"]["train"]),
             len(manifest["splits"]["validation"]), tokenizer["vocab_size"], out)
    return manifest

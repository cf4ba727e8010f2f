"""`tfglm prepare`: a corpus of any size into token shards (`tfglm.data.shards`), with Apache Beam.

Two pipelines. The scan reads every document once: Unicode NFC normalization, the length limits
(`data.min_chars`, `data.max_chars`) and a content hash; it counts what it drops, finds exact duplicates (every copy
after the first, in input order, is dropped) and collects what a new tokenizer learns from: the character set, or a
sample (the documents of lowest hash) for SentencePiece. The tokenizer is then trained on the driver, the way
`tfglm train` trains it (or taken from `train.init_from`'s run), and saved beside the shards. The write pipeline
reads the documents again, tokenizes them in the graph with that tokenizer and writes the shards. A document's split
is a function of its hash (validation when the hash falls in the lowest `data.val_fraction`), so it does not depend
on the order documents arrive in.

Units of work: a batch of text files (one document a file) up to UNIT_BYTES, a byte range of a JSONL file (a line
belongs to the range it starts in) or a row group of a Parquet file. Each is read where it runs, so no text passes
through the runner's shuffle (only 16-byte hashes do), and each unit writes its own two shards, named by its index,
so the output is the same on every runner and after retries.

Runner: the DirectRunner in multi-processing mode on every core, unless Beam options say otherwise; Beam's own
pipeline options (`--runner DataflowRunner --project P --region R --temp_location gs://...`, `--runner FlinkRunner`,
`--runner SparkRunner`) pass through unchanged. Paths go through `tf.io.gfile`, so `gs://` works for input and output.
"""

import collections
import hashlib
import heapq
import io
import json
import logging
import unicodedata

import apache_beam as beam
import numpy as np
import pyarrow.parquet as pq
import tensorflow as tf
from apache_beam.options.pipeline_options import PipelineOptions

from tfglm.data import shards
from tfglm.data.tokenizers import CharTokenizer, load_tokenizer, new_tokenizer
from tfglm.errors import TfglmError

log = logging.getLogger("tfglm")
UNIT_BYTES = 64 << 20
SAMPLE_DOCS = 4000  # documents a new SentencePiece vocabulary learns from, each cut to SAMPLE_CHARS
SAMPLE_CHARS = 8000
TOKENIZE_BATCH = 256
DIRECT_DEFAULTS = ["--direct_running_mode=multi_processing", "--direct_num_workers=0"]  # 0: every core


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
    return pq.ParquetFile(io.BufferedReader(GFileReader(path)))


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
            units += [("jsonl", path, start, min(start + UNIT_BYTES, size)) for start in range(0, size, UNIT_BYTES)]
        else:
            try:
                parquet = parquet_file(path)
            except Exception as e:  # pyarrow raises several kinds for a file that is not Parquet
                raise TfglmError(f"{path}: not a Parquet file ({str(e).splitlines()[0]})") from None
            if data.text_field not in parquet.schema_arrow.names:
                raise TfglmError(f"{path}: no column {data.text_field!r} (data.text_field); it has "
                                 f"{', '.join(parquet.schema_arrow.names)}")
            units += [("parquet", path, group) for group in range(parquet.num_row_groups)]
    if batch:
        units.append(("text", batch))
    return units


def read_unit(unit, text_field, counts):
    """The unit's raw documents in order; what cannot be read as text is counted in `counts`, not yielded."""
    kind = unit[0]
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
            while f.tell() < end:
                line = f.readline()
                if not line:
                    break
                counts["bytes"] += len(line)
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)[text_field]
                except (ValueError, KeyError, TypeError):
                    text = None
                if isinstance(text, str):
                    yield text
                else:
                    counts["malformed"] += 1
    else:
        _, path, group = unit
        column = parquet_file(path).read_row_group(group, columns=[text_field]).column(0).to_pylist()
        for text in column:
            if isinstance(text, str):
                counts["bytes"] += len(text.encode())
                yield text
            else:
                counts["malformed"] += 1


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


class WriteShards(beam.DoFn):
    """Tokenizes a unit's kept documents with the saved tokenizer and writes its training and validation shards."""

    def __init__(self, out, data, dropped, dtype):
        self.out, self.data, self.dropped, self.dtype = out, data, dropped, dtype

    def setup(self):
        tokenizer = shards.read_tokenizer(shards.join(self.out, shards.TOKENIZER))
        self.eot = tokenizer.eot_id
        self.tokenize = tf.function(tokenizer.tokenize, input_signature=[tf.TensorSpec([None], tf.string)])

    def process(self, numbered):
        number, unit = numbered
        dropped = set(self.dropped.get(str(number), ()))
        counts = {"train": 0, "validation": 0}
        names = {split: f"{split}-{number:05d}.bin" for split in counts}
        files = {split: tf.io.gfile.GFile(shards.join(self.out, name + ".tmp"), "wb") for split, name in names.items()}
        pending = {split: [] for split in counts}

        def flush(split):
            ids = self.tokenize(tf.constant(pending[split]))
            flat, ends = ids.flat_values.numpy(), np.cumsum(ids.row_lengths().numpy())
            tokens = np.insert(flat, ends, self.eot).astype(self.dtype)
            files[split].write(tokens.tobytes())
            counts[split] += len(tokens)
            pending[split] = []

        for index, digest, text in clean_documents(unit, self.data, collections.Counter()):
            if index in dropped:
                continue
            split = "validation" if is_validation(digest, self.data.val_fraction) else "train"
            pending[split].append(text)
            if len(pending[split]) == TOKENIZE_BATCH:
                flush(split)
        for split in counts:
            if pending[split]:
                flush(split)
            files[split].close()
            written = shards.join(self.out, names[split] + ".tmp")
            if counts[split]:
                tf.io.gfile.rename(written, shards.join(self.out, names[split]), overwrite=True)
            else:
                tf.io.gfile.remove(written)
        yield {split: {"path": names[split], "tokens": counts[split]} for split in counts} | {"unit": number}


def pipeline_options(beam_args):
    """Beam's options from the command line, with the DirectRunner on every core unless they choose otherwise."""
    chosen = {arg.split("=")[0] for arg in beam_args}
    return PipelineOptions([d for d in DIRECT_DEFAULTS if d.split("=")[0] not in chosen] + list(beam_args))


def new_run_tokenizer(config, scan_dir):
    """The tokenizer the shards are written with: `train.init_from`'s, or one trained as `tfglm train` would."""
    if config.train.init_from:
        return load_tokenizer(shards.join(config.train.init_from, shards.TOKENIZER))
    if config.tokenizer.kind == "char":
        return CharTokenizer(read_json(shards.join(scan_dir, "chars.json")))
    sample = [text for _, text in sorted(read_json(shards.join(scan_dir, "sample.json")))]
    log.info("training a %d-token SentencePiece vocabulary on %d sampled documents", config.tokenizer.vocab_size,
             len(sample))
    return new_tokenizer(config, [line for text in sample for line in text.splitlines() if line])


def prepare(config, patterns, out, beam_args=()):
    """Cleans, deduplicates and tokenizes the files `patterns` name into shards and a manifest in `out`; returns
    the manifest."""
    if config.model.kind != "gpt":
        raise TfglmError(f"model.kind: prepared shards train causal language models (gpt), got {config.model.kind!r}")
    if config.tokenizer.kind == "bytepair" and not config.train.init_from:
        raise TfglmError("tokenizer.kind: 'bytepair' vocabularies come from `tfglm import`; set train.init_from to "
                         "an imported run to prepare with its tokenizer")
    if tf.io.gfile.exists(shards.join(out, shards.MANIFEST)):
        raise TfglmError(f"{out}: already holds a prepared corpus; choose another --out")
    data = config.data
    files = list_files(patterns)
    units = list(enumerate(plan_units(files, data)))
    log.info("prepare: %d file(s) in %d unit(s) of work", len(files), len(units))
    tf.io.gfile.makedirs(out)
    scan_dir = shards.join(out, "scan")
    tf.io.gfile.makedirs(scan_dir)
    learn = None if config.train.init_from else "chars" if config.tokenizer.kind == "char" else "sample"
    options = pipeline_options(beam_args)

    with beam.Pipeline(options=options) as p:
        scans = (p | "units" >> beam.Create(units) | beam.Reshuffle()
                 | "scan" >> beam.Map(scan_unit, data, learn))
        (scans | beam.Map(lambda s: s["counts"]) | "add counts" >> beam.CombineGlobally(add_counts)
         | "write counts" >> beam.Map(write_json, shards.join(scan_dir, "counts.json")))
        (scans | beam.FlatMap(lambda s: s["hashes"]) | beam.GroupByKey() | beam.FlatMap(copies_after_first)
         | beam.combiners.ToList() | "write duplicates" >> beam.Map(write_json, shards.join(scan_dir, "dups.json")))
        (scans | beam.Map(lambda s: s["chars"]) | "character set" >> beam.CombineGlobally(lambda c: "".join(set(
            "".join(c)))) | "write chars" >> beam.Map(write_json, shards.join(scan_dir, "chars.json")))
        (scans | beam.FlatMap(lambda s: s["sample"]) | beam.combiners.Top.Smallest(SAMPLE_DOCS)
         | "write sample" >> beam.Map(write_json, shards.join(scan_dir, "sample.json")))

    counts = collections.Counter(read_json(shards.join(scan_dir, "counts.json")))
    duplicates = read_json(shards.join(scan_dir, "dups.json"))
    kept = counts["documents"] - counts["too_short"] - counts["too_long"] - len(duplicates)
    if kept < 1:
        raise TfglmError(f"data: no document left to prepare ({counts['documents']} read, {counts['too_short']} too "
                         f"short, {counts['too_long']} too long, {len(duplicates)} duplicates)")
    tokenizer = new_run_tokenizer(config, scan_dir)
    tokenizer_sha256 = shards.save_tokenizer(tokenizer, shards.join(out, shards.TOKENIZER))
    dtype = "uint16" if tokenizer.vocab_size <= 1 << 16 else "uint32"
    dropped = collections.defaultdict(list)
    for number, index in duplicates:
        dropped[str(number)].append(index)

    results_path = shards.join(scan_dir, "shards.json")
    with beam.Pipeline(options=options) as p:
        (p | "units" >> beam.Create(units) | beam.Reshuffle()
         | "tokenize and write" >> beam.ParDo(WriteShards(out, data, dict(dropped), dtype))
         | beam.combiners.ToList() | beam.Map(write_json, results_path))

    written = sorted(read_json(results_path), key=lambda r: r["unit"])
    manifest = {
        "format": shards.FORMAT, "dtype": dtype, "tokenizer": shards.TOKENIZER, "tokenizer_sha256": tokenizer_sha256,
        "tokenizer_kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size, "eot_id": tokenizer.eot_id,
        "val_fraction": data.val_fraction, "sources": patterns,
        "documents": {"read": counts["documents"], "kept": kept, "duplicates": len(duplicates),
                      "too_short": counts["too_short"], "too_long": counts["too_long"],
                      "malformed": counts["malformed"], "binary_files": counts["binary_files"]},
        "bytes_read": counts["bytes"],
        "splits": {split: [r[split] for r in written if r[split]["tokens"]] for split in ("train", "validation")},
    }
    for split, listed in manifest["splits"].items():
        manifest[f"{split}_tokens"] = sum(s["tokens"] for s in listed)
    shards.write_manifest(out, manifest)
    tf.io.gfile.rmtree(scan_dir)
    d = manifest["documents"]
    log.info("prepare: %d documents read, %d kept; dropped %d duplicates, %d too short, %d too long, %d malformed, "
             "%d binary files", d["read"], d["kept"], d["duplicates"], d["too_short"], d["too_long"], d["malformed"],
             d["binary_files"])
    log.info("prepare: %d training and %d validation tokens in %d + %d shards, vocabulary %d: %s",
             manifest["train_tokens"], manifest["validation_tokens"], len(manifest["splits"]["train"]),
             len(manifest["splits"]["validation"]), tokenizer.vocab_size, out)
    return manifest

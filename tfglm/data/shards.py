"""A prepared corpus: shards of token ids and their manifest, written by `tfglm prepare` (`tfglm.data.prepare`) and
streamed by training.

Format: each shard is a raw file of little-endian fixed-width token ids (uint16 when the vocabulary fits, else
uint32) and an index beside it (`.idx`) of its segments: each segment's end offset in the shard's tokens and whether
it ends a document (`INDEX`, 9 bytes a segment). `manifest.json` lists the shards of each split with their token and
segment counts, what a segment is (`segments`), the tokenizer (saved in `tokenizer/`) and its SHA-256, and what
cleaning dropped.

Segments serve both kinds of model. A causal LM's segment is a document, its tokens followed by `<eot>`: training
reads the token stream alone, as nanoGPT does, and no separator costs a token. A masked LM's segment is a non-empty
line, tokenized on its own (WordPiece has no `<eot>`): its sentence pairs need each line's extent and whether the
next line is of the same document, which the index gives by one seek, so an example is read in O(1) whatever the
corpus size. A separator token instead would cost the causal stream a token a line, and finding a masked LM's
segment would need a scan or an index anyway.

Raw files rather than TFRecord or ArrayRecord: a training block is any window of the token stream at a random offset,
so the reader needs random access at token granularity, one seek and one read of `seq_len + 1` ids. TFRecord is
sequential, and ArrayRecord reads whole records (a block would span several); a raw file serves any window, takes 2
bytes a token, reads with NumPy as nanoGPT's `train.bin` does, and a shard on `gs://` reads through `tf.io.gfile` as a
local one reads with `os.pread`.

Causal LM training treats the training shards, in manifest order, as one token stream and draws each batch exactly
as the in-memory path does (`corpus.block_starts`), so a batch is a pure function of (seed, step) and a resumed run
reads the batches an uninterrupted one would, with no re-tokenization. Masked LM training draws its segments by
number and looks them up in the indexes a chunk at a time (`tfglm.tasks.masked_lm`). Memory holds a few batches,
whatever the corpus size.
"""

import hashlib
import json
import os
import posixpath
import shutil
import tempfile
import threading

import numpy as np
import tensorflow as tf

from tfglm.data import corpus
from tfglm.data.tokenizers import load_tokenizer
from tfglm.errors import TfglmError

MANIFEST = "manifest.json"
TOKENIZER = "tokenizer"
FORMAT = "tfglm-token-shards/2"
INDEX = np.dtype([("end", "<i8"), ("document_end", "?")])  # one record a segment
SEGMENTS = {"lines": "masked_lm", "documents": "causal_lm"}  # what a segment is, and the task that reads it


def join(directory, name):
    """A path under `directory`, local or a URL (`gs://bucket/dir`)."""
    return posixpath.join(directory, name) if "://" in directory else os.path.join(directory, name)


def is_prepared(paths):
    """Whether `data.files` names one directory that `tfglm prepare` wrote (it holds a manifest)."""
    return len(paths) == 1 and tf.io.gfile.exists(join(paths[0], MANIFEST))


def tokenizer_hash(directory):
    """SHA-256 over a saved tokenizer's file names and contents: the identity of its vocabulary."""
    digest = hashlib.sha256()
    for name in sorted(tf.io.gfile.listdir(directory)):
        digest.update(name.encode() + b"\0")
        with tf.io.gfile.GFile(join(directory, name), "rb") as f:
            digest.update(f.read() + b"\0")
    return digest.hexdigest()


def copy_files(source, target):
    """Copies the files of directory `source` into `target` (any `tf.io.gfile` paths)."""
    tf.io.gfile.makedirs(target)
    for name in tf.io.gfile.listdir(source):
        tf.io.gfile.copy(join(source, name), join(target, name), overwrite=True)


def save_tokenizer(tokenizer, directory):
    """Saves `tokenizer` into `directory` (any `tf.io.gfile` path) and returns its `tokenizer_hash`."""
    local = tempfile.mkdtemp()
    try:
        tokenizer.save(local)
        copy_files(local, directory)
    finally:
        shutil.rmtree(local)
    return tokenizer_hash(directory)


def read_tokenizer(directory):
    """The tokenizer saved in `directory` (any `tf.io.gfile` path)."""
    local = tempfile.mkdtemp()
    try:
        copy_files(directory, local)
        return load_tokenizer(local)
    finally:
        shutil.rmtree(local)


def write_manifest(directory, manifest):
    path = join(directory, MANIFEST)
    with tf.io.gfile.GFile(path + ".tmp", "w") as f:
        json.dump(manifest, f, indent=1)
    tf.io.gfile.rename(path + ".tmp", path, overwrite=True)


class ShardFiles:
    """Fixed-width records of several files, read by offset: a local file with `os.pread` (one system call, safe
    from parallel `tf.data` calls without a lock), any other (`gs://`) through `tf.io.gfile`, one lock a file. Local
    files do not go through `tf.io.gfile`: its reader fills a 512 KB buffer at every seek, 0.2 ms a random read."""

    def __init__(self, paths, dtype):
        self.paths, self.dtype = paths, np.dtype(dtype)
        self._files, self._locks = {}, [threading.Lock() for _ in paths]

    def _open(self, shard):
        with self._locks[shard]:
            if shard not in self._files:
                path = self.paths[shard]
                self._files[shard] = tf.io.gfile.GFile(path, "rb") if "://" in path else open(path, "rb", buffering=0)
            return self._files[shard]

    def read(self, shard, offset, count):
        """Records [offset, offset + count) of file `shard`."""
        f, start, size = self._open(shard), int(offset) * self.dtype.itemsize, int(count) * self.dtype.itemsize
        if "://" in self.paths[shard]:
            with self._locks[shard]:
                f.seek(start)
                data = f.read(size)
        else:
            data = os.pread(f.fileno(), size, start)
        if len(data) != size:
            raise TfglmError(f"{self.paths[shard]}: broken shard (ends before record {offset + count}); prepare the "
                             f"corpus again")
        return np.frombuffer(data, self.dtype)


class TokenStream:
    """Shards read as one stream of token ids, any window of it read by seek and read."""

    def __init__(self, paths, counts, dtype):
        self.files = ShardFiles(paths, dtype)
        self.ends = np.cumsum(counts, dtype=np.int64)
        self.num_tokens = int(self.ends[-1]) if len(counts) else 0

    def window(self, start, count):
        """Tokens [start, start + count) of the stream, as int32."""
        start, count = int(start), int(count)
        out, shard = [np.zeros([0], np.int32)], int(np.searchsorted(self.ends, start, side="right"))
        while count > 0:
            begin = int(self.ends[shard - 1]) if shard else 0
            take = min(count, int(self.ends[shard]) - start)
            out.append(self.files.read(shard, start - begin, take))
            start, count, shard = start + take, count - take, shard + 1
        return np.concatenate(out).astype(np.int32)

    def blocks(self, starts, length):
        """[len(starts), length] int32: the windows at `starts`."""
        return np.stack([self.window(int(s), int(length)) for s in starts]) if len(starts) else \
            np.zeros([0, length], np.int32)


class SegmentStream:
    """The segments of a split, numbered across its shards in manifest order: each one's extent in the token stream
    and whether the next segment continues its document, read from the shards' indexes."""

    def __init__(self, paths, counts, tokens):
        self.index, self.tokens = ShardFiles(paths, INDEX), tokens
        self.ends = np.cumsum(counts, dtype=np.int64)
        self.num_segments = int(self.ends[-1]) if len(counts) else 0

    def bounds(self, s):
        """(start, end, has_next) of segment `s`, or of each of an array of them: tokens [start, end) of the stream.
        One read of the index a segment."""
        s = np.asarray(s, np.int64)
        shard = np.searchsorted(self.ends, s.ravel(), side="right")
        local = s.ravel() - np.concatenate([[0], self.ends])[shard]
        start, end, document_end = np.zeros([3, len(local)], np.int64)
        for i, (k, j) in enumerate(zip(shard, local)):  # segment j ends at record j, and starts where j - 1 ends
            records = self.index.read(k, max(j - 1, 0), min(j, 1) + 1)
            start[i] = records[0]["end"] if j else 0
            end[i], document_end[i] = records[-1]["end"], records[-1]["document_end"]
        base = np.concatenate([[0], self.tokens.ends])[shard]
        return (base + start).reshape(s.shape), (base + end).reshape(s.shape), document_end.reshape(s.shape) == 0

    def window(self, start, end):
        return self.tokens.window(start, end - start)


def check_size(path, size, what):
    """Raises unless file `path` holds `size` bytes (`what` the manifest says it holds)."""
    found = tf.io.gfile.stat(path).length if tf.io.gfile.exists(path) else None
    if found != size:
        found = "missing" if found is None else f"{found} bytes"
        raise TfglmError(f"{path}: broken shard ({found}; the manifest says {what}); prepare the corpus again")


class Prepared:
    """A directory `tfglm prepare` wrote: its manifest, checked against the shards' sizes, and each split's token
    stream (`streams`) and segments (`segments`).

    Examples:
    ```python
    prepared = Prepared("shards/", reader="causal_lm")  # manifest.json, tokenizer/, {train,validation}-*.{bin,idx}
    ds = prepared.train_dataset(seq_len=256, batch_size=12, seed=1337, start_step=0, num_steps=100)
    start, end, has_next = prepared.segments["train"].bounds(0)  # the first document's tokens, and <eot>
    ```
    """

    def __init__(self, directory, reader=None):
        """Opens the corpus in `directory` for a run of task `reader` (None: any), which must be the task its
        segments serve (`SEGMENTS`)."""
        self.directory = directory
        path = join(directory, MANIFEST)
        try:
            with tf.io.gfile.GFile(path) as f:
                self.manifest = json.load(f)
            splits = {name: self.manifest["splits"][name] for name in ("train", "validation")}
            self.dtype, self.tokenizer_sha256 = self.manifest["dtype"], self.manifest["tokenizer_sha256"]
            segments = self.manifest["segments"]
            if self.manifest.get("format") != FORMAT or segments not in SEGMENTS:
                raise KeyError("format" if self.manifest.get("format") != FORMAT else "segments")
        except json.JSONDecodeError as e:
            raise TfglmError(f"{path}:{e.lineno}: not a JSON manifest ({e.msg})") from None
        except (KeyError, TypeError) as e:
            raise TfglmError(f"{path}: not a {FORMAT} manifest (no valid {e})") from None
        if reader and SEGMENTS[segments] != reader:
            raise TfglmError(f"{path}: its segments are {segments}, prepared for a {SEGMENTS[segments]} run, not "
                             f"this {reader} run; prepare the corpus with this run's config")
        self.streams, self.segments = {}, {}
        for name, listed in splits.items():
            paths = [join(directory, s["path"]) for s in listed]
            indexes = [join(directory, s["index"]) for s in listed]
            counts = [int(s["tokens"]) for s in listed]
            segment_counts = [int(s["segments"]) for s in listed]
            for shard, count in zip(paths, counts):
                check_size(shard, count * np.dtype(self.dtype).itemsize, f"{count} {self.dtype} tokens")
            for index, count in zip(indexes, segment_counts):
                check_size(index, count * INDEX.itemsize, f"{count} segments")
            self.streams[name] = TokenStream(paths, counts, self.dtype)
            self.segments[name] = SegmentStream(indexes, segment_counts, self.streams[name])

    @property
    def tokenizer_dir(self):
        return join(self.directory, TOKENIZER)

    def check_tokenizer(self, tokenizer_dir):
        """Raises unless the tokenizer saved in `tokenizer_dir` is the one the shards were tokenized with."""
        if tokenizer_hash(tokenizer_dir) != self.tokenizer_sha256:
            raise TfglmError(f"{join(self.directory, MANIFEST)}: its shards were tokenized with another tokenizer "
                             f"than {tokenizer_dir} (tokenizer_sha256 differs); prepare the corpus with this run's "
                             f"tokenizer")

    def train_dataset(self, seq_len, batch_size, seed, start_step, num_steps, context=None):
        """Batches (inputs, targets) for global steps [start_step, start_step + num_steps), as
        `corpus.train_dataset` draws them from the same stream in memory. Given a `tf.distribute.InputContext`, only
        that input pipeline's rows of each global batch (rows [id * share, (id + 1) * share), share = batch_size /
        pipelines), which is all it reads."""
        stream = self.streams["train"]
        blocks = corpus.check_blocks(stream.num_tokens, seq_len, batch_size)
        context = context or tf.distribute.InputContext()
        share = batch_size // context.num_input_pipelines
        first = context.input_pipeline_id * share

        def batch_at(step):
            starts = corpus.block_starts(step, blocks, seq_len, batch_size, seed)[first:first + share]
            block = tf.numpy_function(stream.blocks, [starts, seq_len + 1], tf.int32, stateful=False)
            block.set_shape([share, seq_len + 1])
            return block[:, :-1], block[:, 1:]

        ds = tf.data.Dataset.range(start_step, start_step + num_steps)
        return ds.map(batch_at, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)

    def validation_tokens(self, max_tokens):
        """The first `max_tokens` tokens of the validation stream (or all of it)."""
        stream = self.streams["validation"]
        count = min(stream.num_tokens, max_tokens)
        return stream.window(0, count) if count else np.zeros([0], np.int32)

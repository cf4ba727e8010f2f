"""In-graph tokenizers: TensorFlow core ops and tensorflow-text ops only, so they run in `tf.data` and in an
exported SavedModel that TF Serving loads as is.

Each maps strings [batch] to ragged int32 ids [batch, None] and back. Each has an end-of-text token `<eot>`
(`eot_id`), which separates documents in training and starts every prompt.
"""

import io
import json
import os

import keras_hub
import sentencepiece
import tensorflow as tf
import tensorflow_text as tf_text

from tfglm.data.chat import ChatTokenizer
from tfglm.errors import TfglmError

EOT = "<eot>"
UNK = "<unk>"


class CharTokenizer(tf.Module):
    """One id per Unicode character of the training corpus; unseen characters map to `<unk>`.

    Written here rather than taken from keras-hub: keras-hub's `UnicodeCodepointTokenizer` uses raw code points as
    ids, so a 65-symbol corpus would still need a vocabulary (and output layer) as large as its highest code point.

    Examples:
    ```python
    import tensorflow as tf
    from tfglm import CharTokenizer

    tokenizer = CharTokenizer("hello world")
    ids = tokenizer.tokenize(tf.constant(["hello", "low"]))  # ragged ids, one per character
    assert tokenizer.detokenize(ids).numpy().tolist() == [b"hello", b"low"]
    ```
    """

    kind = "char"

    def __init__(self, chars):
        super().__init__()
        self.chars = sorted(set(chars) - {"\ufffd"})
        specials = [EOT, UNK]
        self.vocab_size = len(specials) + len(self.chars)
        self.eot_id = 0
        self.unk_id = 1
        codepoints = tf.constant([ord(c) for c in self.chars], tf.int64)
        self._encode = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(codepoints, tf.range(2, self.vocab_size, dtype=tf.int64)),
            default_value=self.unk_id)
        # <eot> decodes to nothing, <unk> to U+FFFD.
        self._decode = tf.constant([-1, 0xFFFD] + [ord(c) for c in self.chars], tf.int32)

    def tokenize(self, strings):
        codepoints = tf.strings.unicode_decode(strings, "UTF-8", errors="replace")
        return tf.cast(tf.ragged.map_flat_values(self._encode.lookup, tf.cast(codepoints, tf.int64)), tf.int32)

    def detokenize(self, ids):
        ids = _as_ragged(ids)
        codepoints = tf.ragged.map_flat_values(tf.gather, self._decode, ids)
        codepoints = tf.ragged.boolean_mask(codepoints, codepoints >= 0)
        return tf.strings.unicode_encode(codepoints, "UTF-8")

    def save(self, directory):
        _write_spec(directory, {"kind": self.kind, "chars": "".join(self.chars)})


class SentencePieceTokenizer(tf.Module):
    """Byte-fallback BPE trained with SentencePiece and run with tensorflow-text's in-graph ops.

    Identity normalisation, no dummy prefix and byte fallback make `detokenize(tokenize(text)) == text` for any
    valid UTF-8 text, including characters never seen in training.

    Examples:
    ```python
    import tensorflow as tf
    from tfglm import SentencePieceTokenizer
    from tfglm.data.tokenizers import train_sentencepiece

    lines = ["the cat sat on the mat", "the dog sat on the log"] * 50
    tokenizer = SentencePieceTokenizer(train_sentencepiece(lines, vocab_size=300))
    ids = tokenizer.tokenize(tf.constant(["the cat", "naïve ☃"]))  # unseen characters fall back to bytes
    assert tokenizer.detokenize(ids).numpy().tolist() == ["the cat".encode(), "naïve ☃".encode()]
    ```
    """

    kind = "sentencepiece"

    def __init__(self, proto):
        super().__init__()
        self.proto = proto
        self._sp = tf_text.SentencepieceTokenizer(model=proto, out_type=tf.int32)
        processor = sentencepiece.SentencePieceProcessor(model_proto=proto)
        self.vocab_size = processor.get_piece_size()
        self.eot_id = processor.piece_to_id(EOT)
        self.unk_id = processor.unk_id()

    def tokenize(self, strings):
        return self._sp.tokenize(strings)

    def detokenize(self, ids):
        return self._sp.detokenize(_as_ragged(ids))

    def save(self, directory):
        _write_spec(directory, {"kind": self.kind, "model": "sentencepiece.model"})
        with open(os.path.join(directory, "sentencepiece.model"), "wb") as f:
            f.write(self.proto)


class WordPieceTokenizer(tf.Module):
    """BERT's WordPiece (lower-cased and accents stripped unless `lowercase=False`), run in the graph by keras-hub's
    `WordPieceTokenizer`, for encoders.

    The vocabulary holds `SPECIALS`; tfglm's own vocabularies start with them ([PAD] 0, [CLS] 1, [SEP] 2, [UNK] 3,
    [MASK] 4), an imported BERT vocabulary has them where it has them.

    Examples:
    ```python
    import tensorflow as tf
    from tfglm import WordPieceTokenizer

    tokenizer = WordPieceTokenizer(WordPieceTokenizer.SPECIALS + ["the", "cat", "sat", "##s"])
    assert tokenizer.tokenize(tf.constant(["The cats sat"])).to_list() == [[5, 6, 8, 7]]
    ```
    """

    kind = "wordpiece"
    SPECIALS = ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"]

    def __init__(self, vocabulary, lowercase=True):
        super().__init__()
        self.vocabulary = list(vocabulary)
        self.lowercase = lowercase
        index = {token: i for i, token in enumerate(self.vocabulary)}
        missing = [token for token in self.SPECIALS if token not in index]
        if missing:
            raise TfglmError(f"WordPiece vocabulary: no {', '.join(missing)} token")
        self._wp = keras_hub.tokenizers.WordPieceTokenizer(vocabulary=self.vocabulary, lowercase=lowercase,
                                                           strip_accents=lowercase, dtype="int32")
        self.vocab_size = len(self.vocabulary)
        self.pad_id, self.cls_id, self.sep_id, self.unk_id, self.mask_id = (index[t] for t in self.SPECIALS)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def tokenize(self, strings):
        """Ragged ids, also when called eagerly (where keras-hub's tokenizer would give Python lists)."""
        return self._wp.tokenize(strings)

    def detokenize(self, ids):
        return self._wp.detokenize(_as_ragged(ids))

    def save(self, directory):
        _write_spec(directory, {"kind": self.kind, "vocabulary": "vocab.txt", "lowercase": self.lowercase})
        with open(os.path.join(directory, "vocab.txt"), "w", encoding="utf-8") as f:
            f.writelines(token + "\n" for token in self.vocabulary)


class BytePairTokenizer(tf.Module):
    """GPT-2's byte-level BPE (`vocab.json` + `merges.txt`), run in the graph by keras-hub's `BytePairTokenizer`;
    its `<|endoftext|>` is the end-of-text token. From `tfglm import` only (tfglm does not train one).

    Examples:
    ```python
    import tensorflow as tf
    from tfglm import BytePairTokenizer

    vocabulary = {"<|endoftext|>": 0, "a": 1, "b": 2, "Ġ": 3, "ab": 4, "Ġab": 5}
    tokenizer = BytePairTokenizer(vocabulary, ["a b", "Ġ ab"])
    assert tokenizer.tokenize(tf.constant(["ab ab"])).to_list() == [[4, 5]]
    ```
    """

    kind = "bytepair"
    EOT = "<|endoftext|>"

    def __init__(self, vocabulary, merges):
        super().__init__()
        vocabulary, merges = dict(vocabulary), list(merges)
        if self.EOT not in vocabulary:
            raise TfglmError(f"byte-pair vocabulary: no {self.EOT} token")
        # Always its TensorFlow ops (keras-hub would otherwise run the `tokenizers` library eagerly).
        self._bpe = keras_hub.tokenizers.BytePairTokenizer(vocabulary=vocabulary, merges=merges,
                                                           unsplittable_tokens=[self.EOT], dtype="int32",
                                                           _allow_python_workflow=False)
        self.vocabulary, self.merges = vocabulary, merges
        self.vocab_size = max(vocabulary.values()) + 1
        self.eot_id = vocabulary[self.EOT]

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def tokenize(self, strings):
        """Ragged ids, also when called eagerly."""
        return self._bpe.tokenize(strings)

    def detokenize(self, ids):
        return self._detokenize(tf.cast(_as_ragged(ids), tf.int32))

    @tf.function(input_signature=[tf.RaggedTensorSpec([None, None], tf.int32)])
    def _detokenize(self, ids):
        """Strings, also when called eagerly (where keras-hub's would give Python lists)."""
        return self._bpe.detokenize(ids)

    def save(self, directory):
        _write_spec(directory, {"kind": self.kind, "vocabulary": "vocab.json", "merges": "merges.txt"})
        with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump(self.vocabulary, f, ensure_ascii=False)
        with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
            f.writelines(merge + "\n" for merge in self.merges)


def read_merges(path):
    """The merge rules of a GPT-2 `merges.txt` (its `#version` line skipped)."""
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line.strip() and not line.startswith("#version")]


def train_wordpiece(lines, vocab_size):
    """Trains a lower-cased WordPiece vocabulary (keras-hub's trainer) on a list of text lines."""
    dataset = tf.data.Dataset.from_tensor_slices(lines).batch(1024)
    vocabulary = keras_hub.tokenizers.compute_word_piece_vocabulary(
        dataset, vocab_size, lowercase=True, strip_accents=True, reserved_tokens=WordPieceTokenizer.SPECIALS)
    return WordPieceTokenizer(vocabulary)


def _write_spec(directory, spec):
    """tokenizer.json: the kind and what `load_tokenizer` needs to rebuild the tokenizer."""
    with open(os.path.join(directory, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(spec, f, ensure_ascii=False)


def _as_ragged(ids):
    return ids if isinstance(ids, tf.RaggedTensor) else tf.RaggedTensor.from_tensor(ids)


def train_sentencepiece(lines, vocab_size, max_lines=2_000_000):
    """Trains a byte-fallback BPE model on an iterator of text lines; returns its serialized proto."""
    proto = io.BytesIO()
    sentencepiece.set_random_generator_seed(0)  # the same corpus gives the same vocabulary on every worker
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=proto, vocab_size=vocab_size, model_type="bpe",
            byte_fallback=True, character_coverage=0.9995, normalization_rule_name="identity",
            add_dummy_prefix=False, remove_extra_whitespaces=False, split_digits=True,
            allow_whitespace_only_pieces=True, user_defined_symbols=["\n"], control_symbols=[EOT],
            unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1, input_sentence_size=max_lines, shuffle_input_sentence=True,
            hard_vocab_limit=False, num_threads=os.cpu_count() or 1, minloglevel=2)
    except RuntimeError as e:
        raise TfglmError(f"tokenizer.vocab_size: SentencePiece training failed: {str(e).splitlines()[-1]}") from None
    return proto.getvalue()


def load_tokenizer(directory):
    """Loads the tokenizer saved by `tokenizer.save(directory)` (a `ChatTokenizer` where it has chat markers)."""
    path = os.path.join(directory, "tokenizer.json")
    if not os.path.isfile(path):
        raise TfglmError(f"{path}: no tokenizer here (is this a tfglm run directory?)")
    with open(path, encoding="utf-8") as f:
        spec = json.load(f)
    base = _load_base(directory, spec)
    return ChatTokenizer(base, spec["chat_markers"]) if spec.get("chat_markers") else base


def _load_base(directory, spec):
    if spec["kind"] == "char":
        return CharTokenizer(spec["chars"])
    if spec["kind"] == "wordpiece":
        with open(os.path.join(directory, spec["vocabulary"]), encoding="utf-8") as f:
            return WordPieceTokenizer(f.read().splitlines(), spec.get("lowercase", True))
    if spec["kind"] == "bytepair":
        with open(os.path.join(directory, spec["vocabulary"]), encoding="utf-8") as f:
            vocabulary = json.load(f)
        return BytePairTokenizer(vocabulary, read_merges(os.path.join(directory, spec["merges"])))
    with open(os.path.join(directory, spec["model"]), "rb") as f:
        return SentencePieceTokenizer(f.read())


def new_tokenizer(config, texts):
    """The vocabulary of a fine-tune from scratch (`config.tokenizer`), learnt from its training texts: WordPiece,
    characters, or else SentencePiece."""
    size = config.tokenizer.vocab_size
    learn = {"wordpiece": lambda: train_wordpiece(texts, size), "char": lambda: CharTokenizer("".join(texts))}
    return learn.get(config.tokenizer.kind, lambda: SentencePieceTokenizer(train_sentencepiece(texts, size)))()


def packer(tokenizer, length):
    """Packs one or two segments as [CLS] A [SEP] (B [SEP]), padded with [PAD] to `length`."""
    return keras_hub.layers.MultiSegmentPacker(length, start_value=tokenizer.cls_id, end_value=tokenizer.sep_id,
                                               pad_value=tokenizer.pad_id)

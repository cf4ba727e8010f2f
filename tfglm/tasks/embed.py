"""Sentence embeddings: an encoder imported from sentence-transformers (`tfglm import`; its modules.json and
1_Pooling/config.json name mean pooling) embeds texts as the mean of its last hidden states over the text's tokens,
L2-normalized, so a dot product is a cosine similarity.

An `embed` run answers `tfglm embed` (vectors of texts), `tfglm index` (a knowledge base of entries,
`tfglm.data.knowledge`) and `tfglm export` (an `embed` signature: strings in, float32 [batch, dim] out, tokenized in
the graph), which `tfglm serve` answers at OpenAI's `POST /v1/embeddings`.
"""

import dataclasses
import logging
import os

import numpy as np
import tensorflow as tf

from tfglm.data.knowledge import KnowledgeBase, read_entries
from tfglm.data.tokenizers import load_tokenizer
from tfglm.errors import TfglmError
from tfglm.models.encoder import Encoder, dummy_inputs
from tfglm.models.heads import mean_pool
from tfglm.preprocessors import EncoderPreprocessor
from tfglm.preprocessors.buckets import trim_padding
from tfglm.tasks.base import Task
from tfglm.tasks.registry import load_run
from tfglm.training import runs

log = logging.getLogger("tfglm")
TEXTS = tf.TensorSpec([None], tf.string, name="texts")


@dataclasses.dataclass
class EmbedConfig:
    batch_size: int = 64  # texts embedded at a time by `tfglm embed` and `tfglm index`


class TextEmbedder:
    """Texts in, unit vectors out: [CLS] text [SEP] (cut to the encoder's context) through `encoder`, mean-pooled over
    the tokens, L2-normalized. `embed` is the graph function the export serves; calling the embedder embeds a list of
    texts `batch_size` at a time into a float32 [texts, dim] array.

    Examples:
    ```python
    import tfglm

    run = tfglm.load_run("runs/minilm")  # from `tfglm import --from huggingface all-MiniLM-L6-v2/`
    embedder = run.task.embedder(run.model)
    vectors = embedder(["where is my order?", "track my parcel"])  # [2, 384], unit rows
    float(vectors[0] @ vectors[1])  # their cosine similarity
    ```
    """

    def __init__(self, encoder, tokenizer, max_length, batch_size=64):
        self.encoder, self.tokenizer, self.max_length, self.batch_size = encoder, tokenizer, max_length, batch_size
        self.dim = encoder.hidden_dim
        self.preprocessor = EncoderPreprocessor(tokenizer, max_length)

    @tf.function(input_signature=[TEXTS])
    def embed(self, texts):
        """{"embeddings": float32 [batch, dim] unit vectors, "num_tokens": int32 [batch], each text's tokens read
        (after the cut, without [CLS] and [SEP])}."""
        inputs = trim_padding(self.preprocessor(texts), self.max_length)
        hidden = self.encoder(inputs, training=False)["sequence_output"]
        pooled = tf.cast(mean_pool(hidden, inputs["padding_mask"]), tf.float32)
        num_tokens = tf.reduce_sum(tf.cast(inputs["padding_mask"], tf.int32), axis=1) - 2
        return {"embeddings": tf.math.l2_normalize(pooled, axis=-1), "num_tokens": num_tokens}

    def __call__(self, texts):
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        return np.concatenate([self.embed(tf.constant(texts[i:i + self.batch_size]))["embeddings"].numpy()
                               for i in range(0, len(texts), self.batch_size)])


class Embed(Task):
    """Sentence embeddings of an encoder imported from sentence-transformers (model.kind bert, model.pooling mean)."""

    name = "embed"
    model_kinds = ("bert",)
    section = EmbedConfig

    @classmethod
    def checks(cls, section, config):
        return [(section.batch_size >= 1, "embed.batch_size", "must be >= 1")]

    def load_vocabulary(self):
        self.tokenizer = load_tokenizer(runs.path(self.run_dir, runs.TOKENIZER))

    def prepare(self, resume, chief):
        raise TfglmError(f"{self.run_dir}: an embed run is imported (tfglm import of a sentence-transformers "
                         f"model), not trained")

    def build_model(self):
        encoder = Encoder.from_config_tree(self.config.model, self.tokenizer.vocab_size)
        encoder(dummy_inputs(self.config.model.max_length))
        return encoder

    def embedder(self, model):
        return TextEmbedder(model, self.tokenizer, self.config.model.max_length, self.config.embed.batch_size)

    def exported(self, model, jit_compile):
        return self.embedder(model)


def build_index(run_dir, data, out):
    """Embeds the entries in the file `data` with the embed run in `run_dir` and writes their index to `out`;
    returns the KnowledgeBase."""
    entries = read_entries(data)
    run = load_run(run_dir)
    log.info("embedding the %d questions of %d entries", sum(len(e["questions"]) for e in entries), len(entries))
    knowledge = KnowledgeBase.build(entries, run.task.embedder(run.model), os.path.abspath(run_dir))
    knowledge.save(out)
    return knowledge


def load_index(directory):
    """The KnowledgeBase in `directory` (from `tfglm index`), searched with the embed run it was built with.

    Examples:
    ```python
    from tfglm.tasks.embed import load_index

    knowledge = load_index("kb")  # from `tfglm index --model runs/minilm --data faq.jsonl --out kb`
    for hit in knowledge.search("how do I cancel my order?", k=3):
        print(round(hit["score"], 3), hit["intent"], hit["answer"][:60])
    ```
    """
    meta, entries, vectors = KnowledgeBase.read(directory)
    run = load_run(meta["model"])
    return KnowledgeBase(entries, vectors, run.task.embedder(run.model), meta["model"])

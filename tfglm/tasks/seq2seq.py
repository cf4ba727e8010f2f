"""Translation runs: train an `EncoderDecoder` on parallel text (a shared SentencePiece vocabulary, label smoothing,
teacher forcing), translate with it, score corpus BLEU with sacrebleu, and export a `translate` signature.

A translation run directory holds what a GPT run does (config.json, tokenizer/, last and best weights, metrics.jsonl
whose losses are label-smoothed, logs/), plus eval.json after `tfglm evaluate`.
"""

import dataclasses
import logging
import time

import keras
from keras import ops

from tfglm.data import parallel
from tfglm.data.tokenizers import SentencePieceTokenizer, load_tokenizer, train_sentencepiece
from tfglm.errors import TfglmError
from tfglm.generation.beam import Translator, translate_texts
from tfglm.models.encoder_decoder import EncoderDecoder
from tfglm.preprocessors import Seq2SeqPreprocessor
from tfglm.tasks.base import Task
from tfglm.tasks.registry import load_run
from tfglm.training import runs

log = logging.getLogger("tfglm")


@dataclasses.dataclass
class TranslateConfig:
    # Parallel data: aligned `source` and `target` files (one sentence a line; .gz read as gzip), or a TSV of
    # source<TAB>target lines in `pairs`; likewise for validation.
    source: str = ""
    target: str = ""
    pairs: str = ""
    val_source: str = ""
    val_target: str = ""
    val_pairs: str = ""
    label_smoothing: float = 0.1
    beam_width: int = 4  # 1 is greedy
    length_penalty: float = 0.6  # GNMT's alpha: hypotheses ranked by log-probability / ((5 + length) / 6) ** alpha


@dataclasses.dataclass
class TranslationEvaluation:
    """A translation run is scored on source sentences and their reference translations."""
    source: str = dataclasses.field(default="", metadata={
        "help": "translation: source sentences, one a line (.gz read as gzip)"})
    reference: str = dataclasses.field(default="", metadata={
        "help": "translation: reference translations, aligned with --source"})
    beam: int = dataclasses.field(default=None, metadata={
        "help": "translation: beam width (default translate.beam_width; 1 greedy)"})


class SmoothedCrossEntropy(keras.losses.Loss):
    """Token cross-entropy against labels smoothed by `smoothing`; with `corpus.per_token_weights` its sum over the
    batch size is the mean over the non-padding tokens."""

    def __init__(self, vocab_size, smoothing, name="smoothed_cross_entropy"):
        super().__init__(name=name, reduction="sum_over_batch_size")
        self.vocab_size = vocab_size
        self.smoothing = smoothing

    def call(self, labels, logits):
        one_hot = ops.one_hot(ops.cast(labels, "int32"), self.vocab_size)
        return keras.losses.categorical_crossentropy(one_hot, logits, from_logits=True,
                                                     label_smoothing=self.smoothing)


class Seq2Seq(Task):
    """Translation: an `EncoderDecoder` trained on parallel text (`translate.*` files) with label smoothing and
    teacher forcing; BLEU by `evaluate`; a `translate` export signature."""

    name = "seq2seq"
    model_kinds = ("translate",)
    default_for = ("translate",)
    section, section_name = TranslateConfig, "translate"
    Evaluation = TranslationEvaluation

    @classmethod
    def checks(cls, tr, config):
        return [
            (0.0 <= tr.label_smoothing < 1.0, "translate.label_smoothing", "must be in [0, 1)"),
            (tr.beam_width >= 1, "translate.beam_width", "must be >= 1 (1 is greedy)"),
            (tr.length_penalty >= 0, "translate.length_penalty", "must be >= 0"),
        ]

    def load_vocabulary(self):
        self.tokenizer = load_tokenizer(runs.path(self.run_dir, runs.TOKENIZER))

    def prepare(self, resume, chief):
        tr, length = self.config.translate, self.config.model.max_length
        if not (tr.val_pairs or tr.val_source):
            raise TfglmError("config: translate.val_source and translate.val_target (or translate.val_pairs): "
                             "validation pairs are required")
        self.sources, self.targets = parallel.read_pairs(tr.source, tr.target, tr.pairs)
        self.val_sources, self.val_targets = parallel.read_pairs(tr.val_source, tr.val_target, tr.val_pairs)
        if resume:
            self.load_vocabulary()
        else:
            log.info("training a %d-token SentencePiece vocabulary", self.config.tokenizer.vocab_size)
            self.tokenizer = SentencePieceTokenizer(train_sentencepiece(self.sources + self.targets,
                                                                        self.config.tokenizer.vocab_size))
            if chief:
                runs.save_tokenizer(self.run_dir, self.tokenizer)
        self.preprocessor = Seq2SeqPreprocessor(self.tokenizer, length)
        self.target_tokens = self.preprocessor.report_lengths(self.sources, self.targets, tr.pairs or tr.source)
        self.preprocessor.report_lengths(self.val_sources, self.val_targets, tr.val_pairs or tr.val_source)
        log.info("%d training and %d validation pairs, vocabulary %d", len(self.sources), len(self.val_sources),
                 self.tokenizer.vocab_size)

    def build_model(self):
        return EncoderDecoder.from_config_tree(self.config.model, self.tokenizer.vocab_size)

    def compile_options(self):
        return {"loss": SmoothedCrossEntropy(self.tokenizer.vocab_size, self.config.translate.label_smoothing),
                "weighted_metrics": [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]}

    def datasets(self, step):
        t = self.config.train
        train = self.preprocessor.dataset(self.sources, self.targets, t.batch_size, seed=t.seed)
        val = self.preprocessor.dataset(self.val_sources, self.val_targets, t.batch_size)
        return train.skip(step), val.take(t.eval_batches).cache()

    def tokens_per_step(self):
        return self.config.train.batch_size * self.target_tokens

    def samples(self, model):
        """The first validation source, translated greedily (no XLA)."""
        if not hasattr(self, "_sampler"):
            self._sampler = Translator(model, self.tokenizer, beam_width=1, jit_compile=False)
        source = self.val_sources[0]
        return {"translate": f"{source} -> {translate_texts(self._sampler, [source])[0]}"}

    def translator(self, model, beam_width=None, jit_compile=True):
        """A `Translator`; beam width and length penalty from the config unless given."""
        if beam_width is not None and beam_width < 1:
            raise TfglmError(f"--beam: must be >= 1 (1 is greedy), got {beam_width}")
        tr = self.config.translate
        return Translator(model, self.tokenizer, beam_width or tr.beam_width, tr.length_penalty,
                          jit_compile=jit_compile)

    def evaluate(self, model, inputs):
        """Corpus BLEU (sacrebleu, default 13a tokenization) of the translations of `--source` against
        `--reference`."""
        import sacrebleu

        if not (inputs.source and inputs.reference):
            raise TfglmError("--source and --reference: a translation run is scored on source sentences and their "
                             "reference translations")
        translator = self.translator(model, inputs.beam)
        sources, references = parallel.read_pairs(inputs.source, inputs.reference)
        start = time.time()
        log.info("translating %d sentences (beam %d)", len(sources), translator.beam_width)
        hypotheses = translate_texts(translator, sources)
        bleu = sacrebleu.metrics.BLEU()
        score = bleu.corpus_score(hypotheses, [references])
        return {"source": inputs.source, "reference": inputs.reference, "sentences": len(sources),
                "bleu": round(score.score, 2), "signature": str(bleu.get_signature()),
                "beam_width": translator.beam_width, "length_penalty": translator.length_penalty,
                "translate_s": round(time.time() - start, 1)}

    def exported(self, model, jit_compile):
        return self.translator(model, jit_compile=jit_compile)


def load_translator(run_dir, beam_width=None, jit_compile=True):
    """A `Translator` for the translation run's best weights (`Task.translator`: an error for another task's run)."""
    run = load_run(run_dir)
    return run.task.translator(run.model, beam_width, jit_compile)


def evaluate(run_dir, source, reference, beam_width=None):
    """`Seq2Seq.evaluate` of the run's best weights, written to its eval.json."""
    run = load_run(run_dir)
    result = run.task.evaluate(run.model, TranslationEvaluation(source, reference, beam_width))
    runs.write_json(runs.path(run_dir, runs.EVAL), result)
    return result

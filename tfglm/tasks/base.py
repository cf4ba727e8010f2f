"""The Task interface: what one kind of run owns. The one trainer (`tfglm.training.trainer.train`) gives every task the
same strategies, precision, checkpoints, resume, metrics and TensorBoard; a task supplies what is specific to it.

A task is one class, registered by name (`tfglm.tasks.registry.register`): besides training, it declares its config
section, the checks of that section, the options `tfglm evaluate` takes for it, and which commands it answers
(`finetune --task`, `predict`, `translate`, `chat`, `embed`). The config, the command line and the registry read these; none of
them names a task.
"""

import dataclasses
import logging

import numpy as np

from tfglm.data import epochs, shards
from tfglm.data.chat import ChatTokenizer
from tfglm.errors import TfglmError
from tfglm.generation.chat import ChatSession
from tfglm.training import runs

log = logging.getLogger("tfglm")


@dataclasses.dataclass
class Evaluation:
    """What `Task.evaluate` scores: a file of the task's data. A task whose evaluation takes other inputs declares its
    own dataclass; each field becomes a `tfglm evaluate` option (`help` in its metadata)."""
    data: str = dataclasses.field(default="", metadata={
        "help": "the data to score, as the run's task trains on it: text files or a prepared corpus (a language "
                "model; the corpus's validation split), labelled texts (a classifier), conversations (a chat "
                "model)"})


# The train settings `epoch_schedule` sets, and the task section's key that sets each instead (None: the schedule's).
EPOCH_SCHEDULED = {"train.steps": "epochs", "train.batch_size": "batch_size", "train.learning_rate": "learning_rate",
                   "train.min_learning_rate": None, "train.warmup_steps": None, "train.eval_interval": None}


class Task:
    """One kind of run: causal LM, masked LM + next sentence, classification, sequence-to-sequence.

    A task is made for a config and a run directory. `load_vocabulary` (a run's saved tokenizer, labels, ...) or
    `prepare` (read the data; build and save the vocabulary of a new run) comes first; then `schedule`,
    `build_model`, `datasets` and the rest. Subclasses set `name` (the registry key, recorded in run.json),
    `model_kinds` (the `model.kind` values they train) and, where validation loss is not the measure, `monitor`.
    """

    name = None
    model_kinds = ()
    default_for = ()  # the `model.kind` values `tfglm train` runs this task for
    section = None  # the dataclass of the task's config section (e.g. `classify:`), if it has one
    section_name = None  # the section's key in the config (default: `name`)
    finetune = None  # what its training files hold, for a task `tfglm finetune --task NAME` runs: --train, --val and
    # --eval set its section's train_file, val_file and eval_file, and `evaluate` scores eval_file as Evaluation(data)
    Evaluation = Evaluation  # the inputs of `evaluate`
    command = None  # a training command of its own: {"name", "help", "config": --config's help, "data": --data's}
    monitor = ("val_loss", "min")  # the validation metric that picks best.weights.h5, and whether lower is better
    patience = None  # stop after this many validation points without a better `monitor`; None never stops early
    generates = False  # whether `generator` makes free text
    perplexity = False  # whether val_loss is a plain next-token cross-entropy, so exp(val_loss) is a perplexity
    counts_epochs = False  # whether `schedule` counts epochs (`epoch_schedule`: one validation point an epoch)

    def __init__(self, config, run_dir):
        if config.model.kind not in self.model_kinds:
            raise TfglmError(f"model.kind: the {self.name} task trains {' or '.join(map(repr, self.model_kinds))} "
                             f"models, got {config.model.kind!r}")
        self.config, self.run_dir = config, run_dir
        self.tokenizer = None

    def load_vocabulary(self):
        """Reads what the run saved besides its weights (the tokenizer; labels) into this task."""
        raise NotImplementedError

    def prepare(self, resume, chief):
        """Reads and checks the data; a new run builds its vocabulary and (on the chief) saves it."""
        raise NotImplementedError

    def open_prepared(self, resume, chief):
        """The corpus `tfglm prepare` wrote in the directory data.files names (`shards.Prepared`), checked to be for
        this task. A new run takes the shards' tokenizer (saved on the chief); a resumed one, or one from
        `train.init_from`, must have it."""
        prepared = shards.Prepared(self.config.data.files[0], reader=self.name)
        source = prepared.tokenizer_dir
        if resume or self.config.train.init_from:
            source = runs.path(self.run_dir if resume else self.config.train.init_from, runs.TOKENIZER)
        prepared.check_tokenizer(source)
        if chief and not resume:
            shards.copy_files(source, runs.path(self.run_dir, runs.TOKENIZER))
        self.tokenizer = shards.read_tokenizer(source)
        manifest = prepared.manifest
        log.info("prepared corpus %s: %d train, %d validation tokens in %d + %d %s, vocabulary %d", prepared.directory,
                 manifest["train_tokens"], manifest["validation_tokens"], manifest["train_segments"],
                 manifest["validation_segments"], manifest["segments"], self.tokenizer.vocab_size)
        return prepared

    def schedule(self):
        """The run's `train` settings (a TrainConfig): the config's, or derived from task settings such as epochs."""
        return self.config.train

    def build_model(self):
        """A new, built model for `self.tokenizer`, with random weights."""
        raise NotImplementedError

    def initialize(self, model):
        """Starts a new run's `model` from pretrained weights where the task has them (`train.init_from`)."""

    def compile_options(self):
        """`loss` and `weighted_metrics` for Keras `compile` (next-token cross-entropy when not given)."""
        return {}

    def datasets(self, step):
        """(train, validation) `tf.data` datasets; train yields the batches of steps [step, schedule().steps), or is
        a function of a `tf.distribute.InputContext` that yields only that input pipeline's rows of each batch."""
        raise NotImplementedError

    def tokens_per_step(self):
        """Tokens a training step sees, for the tokens/s figure."""
        raise NotImplementedError

    def samples(self, model):
        """{name: text} written to TensorBoard at each validation point (generated text for generative tasks)."""
        return {}

    def backbone(self, model):
        """The part of `model` another task can start from (`train.init_from`)."""
        return model

    def trained_with_lora(self, model):
        """Variables of the backbone that must train even under LoRA (`train.lora_rank`), which freezes the rest."""
        return []

    def generator(self, model):
        """A strings-in, strings-out generator (`tfglm generate`), for tasks that generate free text."""
        raise TfglmError(f"{self.run_dir}: a {self.name} run does not generate free text")

    @classmethod
    def key(cls):
        """The task's section in the config tree."""
        return cls.section_name or cls.name

    @classmethod
    def check_overrides(cls, overrides):
        """Refuses a `--set` of a train setting that `epoch_schedule` sets, for a task counting epochs: it would be
        read, logged as applied, and then replaced by the schedule's."""
        for text in overrides if cls.counts_epochs else ():
            key = text.split("=", 1)[0].strip()
            if key in EPOCH_SCHEDULED:
                own = EPOCH_SCHEDULED[key]
                instead = (f"set {cls.key()}.{own} instead" if own else
                           "it follows the epochs: warm-up over the first 10%, decay to 0, validation each epoch")
                raise TfglmError(f"--set {key}: a {cls.name} fine-tune counts epochs ({cls.key()}.epochs) and sets "
                                 f"{key} itself; {instead}")

    @classmethod
    def checks(cls, section, config):
        """(ok, key, message) for every check of the task's config `section` (in the whole `config`)."""
        return []

    def evaluate(self, model, inputs):
        """Scores the run on `inputs` (an `Evaluation`: the `tfglm evaluate` options); returns what eval.json holds."""
        raise TfglmError(f"{self.run_dir}: a {self.name} run has no evaluation")

    def predict(self, model, texts):
        """[{"text", "label", "probabilities": {label: p}}] for each text (`tfglm predict`), for tasks that classify."""
        raise TfglmError(f"{self.run_dir}: a {self.name} run does not classify texts (`tfglm predict` takes a "
                         f"fine-tuned classifier)")

    def embedder(self, model):
        """A `TextEmbedder` (`tfglm embed`, `tfglm index`), for tasks that embed texts."""
        raise TfglmError(f"{self.run_dir}: a {self.name} run does not embed texts (`tfglm embed` takes an encoder "
                         f"imported from sentence-transformers)")

    def translator(self, model, beam_width=None, jit_compile=True):
        """A `Translator` (`tfglm translate`), for tasks that translate."""
        raise TfglmError(f"{self.run_dir}: not a translation run (its task is {self.name})")

    def chat_session(self, model, settings, system=None):
        """A `ChatSession` (`tfglm chat`) with `settings` (a GenerateConfig) and the `system` message ("" none), for
        runs whose tokenizer has the chat template."""
        if not isinstance(self.tokenizer, ChatTokenizer):
            raise TfglmError(f"{self.run_dir}: a {self.name} run, without the chat template; `tfglm chat` talks with "
                             f"a chat run (`tfglm finetune --task chat`)")
        return ChatSession(self.generator(model), system or "", settings)

    def exported(self, model, jit_compile):
        """What `tfglm export` serves (`tfglm.serving.signatures` builds the signatures): a `Generator` (a language
        model), a `Translator`, a `TextClassifier` or a `TextEmbedder`; `jit_compile` makes its decode loops XLA
        functions."""
        raise TfglmError(f"{self.run_dir}: a {self.name} run has nothing to serve")


@dataclasses.dataclass(frozen=True)
class TextClassifier:
    """A classifier as its export serves it (`Task.exported`): the model, its tokenizer, `encode` (texts [batch] ->
    the model's inputs, in the graph), the label names in class-index order, and the `tf.Example` feature that holds
    the text (TF Serving's Classify API)."""

    model: object
    tokenizer: object
    encode: object
    labels: list
    text_feature: str


def epoch_checks(key, section):
    """The checks of a fine-tune's config `section` (at `key`) counted in epochs (`epoch_schedule`): its held-out
    validation share, epochs, patience, batch size and learning rate."""
    return [
        (0.0 <= section.val_fraction < 1.0, f"{key}.val_fraction", "must be in [0, 1)"),
        (section.epochs >= 1, f"{key}.epochs", "must be >= 1"),
        (section.patience >= 1, f"{key}.patience", "must be >= 1"),
        (section.batch_size >= 1, f"{key}.batch_size", "must be >= 1"),
        (section.learning_rate > 0, f"{key}.learning_rate", "must be > 0"),
    ]


def held_out(num_rows, fraction, seed, key, noun):
    """(training rows, validation rows), as row indices: `fraction` of `num_rows` held out in an order shuffled with
    `seed`, for a fine-tune given no validation file. `key` (the section's config key) and `noun` (what a row is)
    name the mistake when none is left for validation."""
    order = np.random.RandomState(seed).permutation(num_rows)
    n_val = int(num_rows * fraction)
    if n_val < 1:
        raise TfglmError(f"{key}.val_fraction: {fraction} of {num_rows} {noun} leaves none for validation; raise it "
                         f"or pass --val")
    return order[n_val:], order[:n_val]


def epoch_schedule(train, section, num_rows):
    """The `train` settings of a fine-tune counted in epochs of `num_rows` examples, from its task's config
    `section` (batch_size, learning_rate, epochs): warm-up over the first 10%, decay to zero, validation each epoch.
    An epoch is every row once, its last batch filled up (`tfglm.data.epochs`); steps per execution is the largest
    divisor of its steps up to `train.steps_per_execution`, so no step of an epoch is left out."""
    name = type(section).__name__.removesuffix("Config").lower()
    if section.batch_size > num_rows:
        raise TfglmError(f"{name}.batch_size: {section.batch_size} is more than the {num_rows} training examples")
    per_epoch = epochs.steps_per_epoch(num_rows, section.batch_size)
    per_execution = max(d for d in range(1, min(train.steps_per_execution, per_epoch) + 1) if per_epoch % d == 0)
    steps = section.epochs * per_epoch
    return dataclasses.replace(train, steps=steps, batch_size=section.batch_size,
                               learning_rate=section.learning_rate, min_learning_rate=0.0, warmup_steps=steps // 10,
                               eval_interval=per_epoch, steps_per_execution=per_execution)

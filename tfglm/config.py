"""One typed config tree (model, data, tokenizer, train, generate, and each task's section), read from YAML with dotted
overrides. The tasks add their sections (`add_section`); this module knows none of them."""

import dataclasses
import json
import logging
import math
import os
import typing

import yaml

from tfglm.errors import TfglmError

log = logging.getLogger("tfglm")


@dataclasses.dataclass
class ModelConfig:
    kind: str = "gpt"  # "gpt" (decoder; tfglm train), "bert" (encoder; tfglm pretrain and finetune) or "translate"
    # (encoder-decoder; tfglm train, translate, evaluate)
    num_layers: int = 4
    num_heads: int = 4
    hidden_dim: int = 128
    intermediate_dim: int = 0  # 0 means 4 * hidden_dim
    max_length: int = 64  # context length in tokens
    dropout: float = 0.0
    # What imported checkpoints need (`tfglm import`); the defaults are tfglm's own blocks. Encoders read all four.
    norm_first: bool = True  # pre-norm blocks; false: post-norm, as BERT
    activation: str = "gelu_tanh"  # the feed-forward GELU: "gelu_tanh" (GPT-2's) or "gelu" (exact, BERT's)
    layer_norm_epsilon: float = 1e-5
    num_segments: int = 2  # an encoder's token-type (segment) vocabulary
    pooling: str = "cls"  # an encoder's text vector for classifying: "cls" (BERT's tanh pooler on [CLS]) or "mean"
    # (the mean of the last hidden states over the text's tokens, as sentence-transformers models pool)


@dataclasses.dataclass
class TokenizerConfig:
    kind: str = "char"  # "char", "sentencepiece" (byte-fallback BPE), "wordpiece" (BERT's; for model.kind bert) or
    # "bytepair" (GPT-2's byte-level BPE; from `tfglm import` only)
    vocab_size: int = 4096  # sentencepiece only; char vocabularies are the corpus's characters


@dataclasses.dataclass
class DataConfig:
    files: list = dataclasses.field(default_factory=list)  # globs; empty means the embedded corpus
    val_fraction: float = 0.1  # the last fraction of the token stream is validation
    # `tfglm prepare` only (`tfglm.data.prepare`):
    format: str = "auto"  # auto (by extension) | text (one file a document) | jsonl | parquet
    text_field: str = "text"  # the document's field in JSONL objects and Parquet rows
    min_chars: int = 1  # shorter documents (after Unicode NFC normalization) are dropped and counted
    max_chars: int = 0  # longer documents are dropped and counted; 0: no limit


@dataclasses.dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 12
    learning_rate: float = 1e-3
    min_learning_rate: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta_1: float = 0.9
    beta_2: float = 0.99
    grad_clip: float = 1.0
    eval_interval: int = 250  # steps between validation, checkpoint and metrics line
    eval_batches: int = 20
    steps_per_execution: int = 25
    jit_compile: bool = True
    seed: int = 1337
    strategy: str = "auto"  # auto | default | mirrored | multiworker | tpu
    mixed_precision: str = "float32"  # float32 | mixed_bfloat16 | mixed_float16
    grad_accum_steps: int = 1  # the optimizer updates every k batches with their mean gradient
    connect_timeout_s: int = 60  # multi-worker: how long to wait for every peer in TF_CONFIG
    init_from: str = ""  # a run directory whose weights start this run's backbone (fine-tuning a pretrained model)
    lora_rank: int = 0  # > 0: LoRA of this rank on the backbone's projections, the rest of the backbone frozen
    log_every_s: float = 30.0  # when stdout is not a terminal: a progress line this often (a terminal has Keras's bar)


@dataclasses.dataclass(frozen=True)
class Option:
    """A generation option: its name, Python type, default and valid range [low, high] (`low_open`: low excluded).
    The one declaration read by the config, the CLI, the export signature, the server and the client."""
    name: str
    type: type
    default: object
    low: float
    high: float = None
    low_open: bool = False
    help: str = ""

    def check(self, value, context=None):
        """None if `value` is valid (for a model of `context` tokens), else what is wrong."""
        high = context - 1 if self.name == "max_new_tokens" and context else self.high
        if isinstance(value, float) and not math.isfinite(value):
            return f"must be finite, got {value}"
        low_ok = value > self.low if self.low_open else value >= self.low
        if not low_ok or (high is not None and value > high):
            where = f"{'(' if self.low_open else '['}{self.low}, {'inf)' if high is None else f'{high}]'}"
            model = f" for this model (context {context})" if high != self.high else ""
            return f"must be in {where}{model}, got {value}"
        return None


INT32_MAX = 2 ** 31 - 1  # the integer options are int32 inputs of the exported signatures

GENERATE_OPTIONS = (
    Option("max_new_tokens", int, 32, 1, INT32_MAX, help="new tokens at most; below the model's context"),
    Option("temperature", float, 0.8, 0.0, help="0 is greedy"),
    Option("top_k", int, 0, 0, INT32_MAX, help="sample from the k most likely tokens; 0 disables"),
    Option("top_p", float, 1.0, 0.0, 1.0, low_open=True, help="sample from the smallest set holding this mass"),
    Option("seed", int, 0, 0, INT32_MAX, help="the same seed gives the same text"),
)

MAX_STOPS = 4


def stop_sequences(value):
    """The stop sequences of `value` as a tuple of strings: a string, a list of at most MAX_STOPS non-empty strings,
    or None (none), as OpenAI's `stop`. A ValueError says what is wrong. Generation ends before the first of them
    that its text contains (a per-request option, not exported: `tfglm serve`'s decode engine applies it)."""
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) and s for s in stops):
        raise ValueError(f"expected a non-empty string or a list of them, got {json.dumps(value)[:40]}")
    if len(stops) > MAX_STOPS:
        raise ValueError(f"at most {MAX_STOPS} stop sequences, got {len(stops)}")
    return tuple(stops)


GenerateConfig = dataclasses.make_dataclass(
    "GenerateConfig", [("prompt", str, dataclasses.field(default=""))]
    + [(o.name, o.type, dataclasses.field(default=o.default)) for o in GENERATE_OPTIONS])


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """What a `model.kind` reads: the tokenizer kinds it takes, whether it takes imported checkpoints' blocks (post-norm,
    exact GELU, another epsilon), and whether its context bounds generation (a decoder's prompt and new tokens)."""
    tokenizers: tuple
    imported_blocks: bool = False
    decoder: bool = True


MODEL_KINDS = {
    "gpt": ModelFamily(("char", "sentencepiece", "bytepair")),
    "bert": ModelFamily(("wordpiece",), imported_blocks=True, decoder=False),
    "translate": ModelFamily(("sentencepiece",), decoder=False),
}
TOKENIZER_KINDS = ("char", "sentencepiece", "wordpiece", "bytepair")

SECTIONS = {}  # a task's section: key -> (dataclass, checks(section, config) -> [(ok, key, message)])
SECTION_SOURCES = []  # callables run before a config is read, that add the sections (the task registry's discovery)


def add_section(key, cls, checks):
    """Adds the section `key` (dataclass `cls`, checked by `checks`) to every config read from now on."""
    if key in {f.name for f in dataclasses.fields(Config)} or SECTIONS.get(key, (cls,))[0] is not cls:
        raise TfglmError(f"config: section {key!r} is declared twice")
    SECTIONS[key] = (cls, checks)


@dataclasses.dataclass
class Config:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = dataclasses.field(default_factory=TokenizerConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    generate: GenerateConfig = dataclasses.field(default_factory=GenerateConfig)
    sections: dict = dataclasses.field(default_factory=dict)  # the tasks' sections, read as attributes (config.chat)

    def __getattr__(self, name):
        sections = self.__dict__.get("sections", {})
        if name not in sections:
            raise AttributeError(f"config has no section {name!r}")
        return sections[name]

    def replace(self, **changes):
        """A copy with the sections in `changes` (built-in or a task's) replaced."""
        own = {key: changes.pop(key) for key in list(changes) if key in self.sections}
        return dataclasses.replace(self, **changes, sections={**self.sections, **own})

    def to_dict(self):
        values = {f.name: dataclasses.asdict(getattr(self, f.name)) for f in dataclasses.fields(self)
                  if f.name != "sections"}
        return {**values, **{key: dataclasses.asdict(section) for key, section in self.sections.items()}}

    def save(self, path):
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)


def _build_config(values, where):
    """The Config of a dict: its built-in sections and the tasks', each checked (`_build`)."""
    if not isinstance(values, dict):
        raise TfglmError(f"{where}: config: expected a mapping, got {type(values).__name__}")
    builtin = [f.name for f in dataclasses.fields(Config) if f.name != "sections"]
    for key in values:
        if key not in builtin and key not in SECTIONS:
            raise TfglmError(f"{where}: {key}: unknown key (known: {', '.join([*builtin, *SECTIONS])})")
    hints = typing.get_type_hints(Config)
    return Config(**{key: _build(hints[key], values[key], where, key) for key in builtin if key in values},
                  sections={key: _build(cls, values.get(key, {}), where, key) for key, (cls, _) in SECTIONS.items()})


def _build(cls, values, where, prefix):
    """Builds dataclass `cls` from a dict, checking keys and types; `where` names the source in errors."""
    if not isinstance(values, dict):
        raise TfglmError(f"{where}: {prefix or 'config'}: expected a mapping, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        name = f"{prefix}.{key}" if prefix else key
        if key not in fields:
            raise TfglmError(f"{where}: {name}: unknown key (known: {', '.join(fields)})")
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            kwargs[key] = _build(kind, value, where, name)
        else:
            kwargs[key] = _coerce(value, kind, where, name)
    return cls(**kwargs)


def _coerce(value, kind, where, name):
    if kind is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:  # ints, and strings such as 2e-3 (YAML 1.1 reads a float without a dot as a string)
            value = float(value)
        except (ValueError, OverflowError):
            pass
    if kind is float and isinstance(value, float) and not math.isfinite(value):  # inf, nan, or beyond a double
        raise TfglmError(f"{where}: {name}: must be finite, got {value!r}")
    if kind is list and isinstance(value, str):
        return [value]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TfglmError(f"{where}: {name}: expected {kind.__name__}, got {value!r}")
    return value


def generate_settings(config, values=None):
    """The `generate` config of `config` with the option values in `values` ({name: value}, e.g. command-line
    options; None leaves an option as it is) applied, validated like a config."""
    overrides = [f"generate.{o.name}={values[o.name]}" for o in GENERATE_OPTIONS
                 if values is not None and values.get(o.name) is not None]
    return load_config(base=config.to_dict(), overrides=overrides).generate


def generate_options(settings):
    """The generation options of `settings` in `GENERATE_OPTIONS` order (the `Generator` methods' arguments)."""
    return tuple(getattr(settings, o.name) for o in GENERATE_OPTIONS)


def _either(names):
    """'a', 'b' or 'c'."""
    quoted = [repr(n) for n in names]
    return " or ".join(filter(None, [", ".join(quoted[:-1]), quoted[-1] if quoted else ""]))


def validate(config):
    """Rejects impossible values, naming every key that has one."""
    m, t, g, tok = config.model, config.train, config.generate, config.tokenizer
    family = MODEL_KINDS.get(m.kind)
    checks = [
        (family is not None, "model.kind", f"must be {_either(MODEL_KINDS)}, got {m.kind!r}"),
        (family is None or tok.kind not in TOKENIZER_KINDS or tok.kind in family.tokenizers, "tokenizer.kind",
         f"must be {_either(family.tokenizers if family else ())} for model.kind {m.kind!r}, got {tok.kind!r}"),
        (m.num_layers >= 1, "model.num_layers", "must be >= 1"),
        (m.num_heads >= 1, "model.num_heads", "must be >= 1"),
        (m.hidden_dim >= 1 and m.num_heads >= 1 and m.hidden_dim % m.num_heads == 0, "model.hidden_dim",
         f"must be a positive multiple of model.num_heads ({m.num_heads}), got {m.hidden_dim}"),
        (m.intermediate_dim >= 0, "model.intermediate_dim", "must be >= 0 (0 means 4 * hidden_dim)"),
        (m.max_length >= 2, "model.max_length", "must be >= 2"),
        (0.0 <= m.dropout < 1.0, "model.dropout", "must be in [0, 1)"),
        (m.activation in ("gelu_tanh", "gelu"), "model.activation",
         f"must be 'gelu_tanh' or 'gelu', got {m.activation!r}"),
        (m.layer_norm_epsilon > 0, "model.layer_norm_epsilon", "must be > 0"),
        (m.num_segments >= 1, "model.num_segments", "must be >= 1"),
        (m.pooling in ("cls", "mean"), "model.pooling", f"must be 'cls' or 'mean', got {m.pooling!r}"),
        (family is None or family.imported_blocks
         or (m.norm_first and m.activation == "gelu_tanh" and m.layer_norm_epsilon == 1e-5), "model.norm_first",
         f"post-norm, exact GELU and another epsilon are for model.kind "
         f"{_either([k for k, f in MODEL_KINDS.items() if f.imported_blocks])} only"),
        (tok.kind in TOKENIZER_KINDS, "tokenizer.kind", f"must be {_either(TOKENIZER_KINDS)}, got {tok.kind!r}"),
        (tok.vocab_size >= 300, "tokenizer.vocab_size", "must be >= 300 (256 byte pieces are reserved)"),
        (0.0 < config.data.val_fraction < 1.0, "data.val_fraction", "must be in (0, 1)"),
        (config.data.format in ("auto", "text", "jsonl", "parquet"), "data.format",
         f"must be 'auto', 'text', 'jsonl' or 'parquet', got {config.data.format!r}"),
        (config.data.min_chars >= 0 and config.data.max_chars >= 0, "data.min_chars",
         "data.min_chars and data.max_chars must be >= 0"),
        (1 <= t.steps <= 10 ** 12, "train.steps", "must be in [1, 1e12]"),
        (t.batch_size >= 1, "train.batch_size", "must be >= 1"),
        (t.learning_rate > 0, "train.learning_rate", "must be > 0"),
        (0 <= t.min_learning_rate <= t.learning_rate, "train.min_learning_rate", "must be in [0, train.learning_rate]"),
        (0 <= t.warmup_steps < t.steps, "train.warmup_steps", "must be in [0, train.steps)"),
        (t.eval_interval >= 1 and t.steps >= 1 and t.steps % t.eval_interval == 0, "train.eval_interval",
         f"must divide train.steps ({t.steps}), got {t.eval_interval}"),
        (t.eval_batches >= 1, "train.eval_batches", "must be >= 1"),
        (t.steps_per_execution >= 1 and t.eval_interval >= 1 and t.eval_interval % t.steps_per_execution == 0,
         "train.steps_per_execution",
         f"must divide train.eval_interval ({t.eval_interval}), got {t.steps_per_execution}"),
        (t.grad_clip >= 0, "train.grad_clip", "must be >= 0 (0 disables clipping)"),
        (t.strategy in ("auto", "default", "mirrored", "multiworker", "tpu"), "train.strategy",
         f"must be auto, default, mirrored, multiworker or tpu, got {t.strategy!r}"),
        (t.mixed_precision in ("float32", "mixed_bfloat16", "mixed_float16"), "train.mixed_precision",
         f"must be float32, mixed_bfloat16 or mixed_float16, got {t.mixed_precision!r}"),
        (t.grad_accum_steps >= 1, "train.grad_accum_steps", "must be >= 1"),
        (t.lora_rank >= 0, "train.lora_rank", "must be >= 0 (0 is full fine-tuning)"),
        (t.connect_timeout_s >= 1, "train.connect_timeout_s", "must be >= 1"),
        (t.log_every_s >= 0, "train.log_every_s", "must be >= 0"),
    ]
    for key, (_, section_checks) in SECTIONS.items():
        checks += section_checks(getattr(config, key), config)
    context = m.max_length if family is None or family.decoder else None
    checks += [(message is None, f"generate.{o.name}", message)
               for o in GENERATE_OPTIONS for message in [o.check(getattr(g, o.name), context)]]
    errors = [f"{key}: {message}" for ok, key, message in checks if not ok]
    if errors:
        raise TfglmError("config: " + "; ".join(errors))
    return config


def fit_intervals(config, fixed):
    """Scales the training intervals not in `fixed` (keys the user set) down to fit `train.steps`: warm-up below it,
    the evaluation interval dividing it, steps per execution dividing that. So `--set train.steps=N` alone works."""
    t = config.train
    if t.steps < 1:
        return config
    changes = {}
    if "train.warmup_steps" not in fixed and t.warmup_steps >= t.steps:
        changes["warmup_steps"] = t.steps // 10
    interval = t.eval_interval
    if "train.eval_interval" not in fixed and (interval < 1 or t.steps % interval):
        interval = max(d for d in range(1, max(1, min(interval, t.steps)) + 1) if t.steps % d == 0)
        changes["eval_interval"] = interval
    per_execution = t.steps_per_execution
    if "train.steps_per_execution" not in fixed and interval >= 1 and (per_execution < 1 or interval % per_execution):
        changes["steps_per_execution"] = max(d for d in range(1, max(1, min(per_execution, interval)) + 1)
                                             if interval % d == 0)
    if not changes:
        return config
    log.info("train.steps %d: %s", t.steps, ", ".join(f"train.{k} {getattr(t, k)} -> {v}" for k, v in changes.items()))
    return dataclasses.replace(config, train=dataclasses.replace(t, **changes))


def parse_override(text):
    """'train.steps=200' -> (['train', 'steps'], 200); the value is read as YAML."""
    if "=" not in text:
        raise TfglmError(f"--set {text!r}: expected KEY=VALUE, e.g. train.steps=200")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def load_config(path=None, overrides=(), base=None, where="config"):
    """Reads YAML `path` (or starts from `base`/defaults), applies `--set` overrides and validates. Training intervals
    the overrides leave alone follow an overridden `train.steps` (`fit_intervals`).

    Examples:
    ```python
    from tfglm import load_config

    config = load_config(overrides=["train.steps=100", "model.dropout=0.1"])
    assert config.train.steps % config.train.eval_interval == 0  # the interval followed the steps
    ```
    """
    values = base if base is not None else {}
    if path:
        where = path
        if not os.path.isfile(path):
            raise TfglmError(f"{path}: config file not found")
        try:
            with open(path) as f:
                values = yaml.safe_load(f) or {}
        except UnicodeDecodeError as e:
            raise TfglmError(f"{path}: not a YAML text file (byte {e.start} is not UTF-8)") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f" line {mark.line + 1}" if mark else ""
            raise TfglmError(f"{path}:{line}: invalid YAML: {getattr(e, 'problem', e)}") from None
    for source in SECTION_SOURCES:
        source()
    config = _build_config(values, where)
    values = config.to_dict()
    fixed = set()
    for text in overrides:
        keys, value = parse_override(text)
        node = values
        for i, key in enumerate(keys[:-1]):
            if not isinstance(node.get(key), dict):
                raise TfglmError(f"--set {text}: {'.'.join(keys[:i + 1])}: unknown section")
            node = node[key]
        node[keys[-1]] = value
        fixed.add(".".join(keys))
        config = _build_config(values, "--set")
    if "train.steps" in fixed:
        config = fit_intervals(config, fixed)
    return validate(config)

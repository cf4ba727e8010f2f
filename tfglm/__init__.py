"""tfglm: TensorFlow Generative Language Models.

The Python API (imported on first use, so `import tfglm` stays light):

    tfglm.GPT, tfglm.Encoder, tfglm.EncoderDecoder      registered Keras models (tfglm.models)
    tfglm.CharTokenizer, tfglm.SentencePieceTokenizer, tfglm.WordPieceTokenizer, tfglm.BytePairTokenizer
                                                        in-graph tokenizers
    tfglm.Generator, tfglm.Translator                   strings in, strings out: the one decode loop, beam search
    tfglm.load_config(path, overrides)                  the typed config tree
    tfglm.train(config, run_dir)                        the one trainer; returns Run(config, tokenizer, model, task)
    tfglm.load_run(run_dir)                             Run(config, tokenizer, model, task) of a trained run
    tfglm.import_checkpoint(source, directory, run_dir) a pretrained checkpoint as a run directory
    tfglm.export_run(run_dir, base_path)                a TF Serving SavedModel version

Example (see README, "Python API"):

    import tensorflow as tf, tfglm
    run = tfglm.load_run("runs/tiny")
    generator = tfglm.Generator(run.model, run.tokenizer)
    generator.generate(tf.constant(["ROMEO:"]), 20, 0.0, 0, 1.0, 0)["completions"]
"""

import importlib
import os

# Quiet TensorFlow's C++ start-up chatter unless the user asked for it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

__version__ = "0.2.0"

_API = {
    "GPT": "tfglm.models.gpt", "Encoder": "tfglm.models.encoder", "EncoderDecoder": "tfglm.models.encoder_decoder",
    "CharTokenizer": "tfglm.data.tokenizers", "SentencePieceTokenizer": "tfglm.data.tokenizers",
    "WordPieceTokenizer": "tfglm.data.tokenizers", "BytePairTokenizer": "tfglm.data.tokenizers",
    "Generator": "tfglm.generation.decode",
    "Translator": "tfglm.generation.beam", "load_config": "tfglm.config", "train": "tfglm.training.trainer",
    "load_run": "tfglm.tasks.registry", "export_run": "tfglm.serving.export",
    "import_checkpoint": "tfglm.training.pretrained",
}
__all__ = sorted(_API)


def __getattr__(name):
    if name not in _API:
        raise AttributeError(f"module 'tfglm' has no attribute {name!r}")
    importlib.import_module("tfglm.models")  # registers every model and layer with Keras
    importlib.import_module("tfglm.tasks.registry")  # finds every task, and its config section, on first use
    return getattr(importlib.import_module(_API[name]), name)

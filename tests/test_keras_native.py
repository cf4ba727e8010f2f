"""Keras-native models: `.keras` files round-trip without custom objects, `summary()` works, the docstring examples
run, and weight files written by the classes before this change (main at LEGACY_COMMIT) load into them."""

import importlib
import json
import os
import re
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfglm.layers import gelu
from tfglm.models import encoder, encoder_decoder, gpt, heads

LEGACY_COMMIT = "89bc14f24ba4ac06c72b289a69c16fb1d401423a"
LEGACY_FILES = ["tfglm/layers.py", "tfglm/models/gpt.py", "tfglm/models/encoder.py",
                "tfglm/models/encoder_decoder.py", "tfglm/models/heads.py"]
SIZE = dict(vocab_size=40, num_layers=2, num_heads=2, hidden_dim=16, max_length=12, dropout=0.1)
TOKENS = np.array([[3, 5, 7, 9, 0, 0], [4, 6, 8, 10, 12, 2]], "int32")
ENCODER_INPUTS = {"token_ids": TOKENS, "segment_ids": np.array([[0] * 6, [0, 0, 0, 1, 1, 1]], "int32"),
                  "padding_mask": (TOKENS != 0).astype("int32")}
INPUTS = {
    "GPT": TOKENS,
    "Encoder": ENCODER_INPUTS,
    "EncoderDecoder": {"source_ids": TOKENS, "target_ids": np.array([[1, 5, 6], [1, 7, 8]], "int32")},
    "GPTClassifier": {"token_ids": TOKENS, "lengths": np.array([4, 6], "int32")},
    "EncoderClassifier": ENCODER_INPUTS,
    "EncoderPretrainer": {**ENCODER_INPUTS, "mask_positions": np.array([[1, 2], [0, 4]], "int32")},
}
NAMES = list(INPUTS)


def _build(name, gpt_module, encoder_module, encoder_decoder_module, heads_module):
    """The model `name`, tiny, from the given modules (today's or the legacy ones), called once on its inputs."""
    keras.utils.set_random_seed(0)
    model = {
        "GPT": lambda: gpt_module.GPT(**SIZE),
        "Encoder": lambda: encoder_module.Encoder(**SIZE),
        "EncoderDecoder": lambda: encoder_decoder_module.EncoderDecoder(**SIZE),
        "GPTClassifier": lambda: heads_module.GPTClassifier(gpt_module.GPT(**SIZE), 3),
        "EncoderClassifier": lambda: heads_module.EncoderClassifier(encoder_module.Encoder(**SIZE), 3),
        "EncoderPretrainer": lambda: heads_module.EncoderPretrainer(encoder_module.Encoder(**SIZE)),
    }[name]()
    model(INPUTS[name])
    return model


def _outputs(model, name):
    return [np.asarray(t) for t in tf.nest.flatten(model(INPUTS[name]))]


@pytest.fixture(scope="module")
def legacy(tmp_path_factory):
    """The model modules at LEGACY_COMMIT, importable as `legacy_tfglm.*` (with its `tfglm.layers`)."""
    root = tmp_path_factory.mktemp("legacy")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for path in LEGACY_FILES:
        shown = subprocess.run(["git", "show", f"{LEGACY_COMMIT}:{path}"], cwd=repo, capture_output=True, text=True)
        if shown.returncode:
            pytest.skip(f"needs the git history with {LEGACY_COMMIT[:7]}: {shown.stderr.strip()}")
        target = root / path.replace("tfglm/", "legacy_tfglm/", 1)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(re.sub(r"\btfglm\.(layers|models)\b", r"legacy_tfglm.\1", shown.stdout))
    for package in ("legacy_tfglm", "legacy_tfglm/models"):
        (root / package / "__init__.py").touch()
    sys.path.insert(0, str(root))
    try:
        yield [importlib.import_module(f"legacy_tfglm.models.{m}") for m in ("gpt", "encoder", "encoder_decoder",
                                                                              "heads")]
    finally:
        sys.path.remove(str(root))
        for module in [m for m in sys.modules if m.startswith("legacy_tfglm")]:
            del sys.modules[module]


@pytest.mark.parametrize("name", NAMES)
def test_keras_file_round_trips_with_identical_outputs(name, tmp_path):
    model = _build(name, gpt, encoder, encoder_decoder, heads)
    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras")  # no custom_objects: every class is registered
    assert type(loaded) is type(model)
    assert json.dumps(loaded.get_config(), sort_keys=True) == json.dumps(model.get_config(), sort_keys=True)
    for expected, actual in zip(_outputs(model, name), _outputs(loaded, name), strict=True):
        np.testing.assert_array_equal(actual, expected)


def test_a_fresh_interpreter_loads_a_keras_file_after_importing_tfglm_models(tmp_path):
    """One import registers every class: a GPTClassifier's file also needs the GPT's (in another module)."""
    model = _build("GPTClassifier", gpt, encoder, encoder_decoder, heads)
    model.save(tmp_path / "model.keras")
    np.save(tmp_path / "inputs.npy", INPUTS["GPTClassifier"])
    script = ("import sys, keras, numpy as np, tfglm.models; model = keras.saving.load_model(sys.argv[1]); "
              "np.save(sys.argv[2], np.asarray(model(np.load(sys.argv[3], allow_pickle=True).item())))")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # `-c` imports tfglm from here
    subprocess.run([sys.executable, "-c", script, tmp_path / "model.keras", tmp_path / "out.npy",
                    tmp_path / "inputs.npy"], cwd=repo, check=True)
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), _outputs(model, "GPTClassifier")[0])


@pytest.mark.parametrize("name", NAMES)
def test_summary_lists_every_parameter(name):
    model = _build(name, gpt, encoder, encoder_decoder, heads)
    lines = []
    model.summary(print_fn=lines.append)
    assert f"Total params: {model.count_params():,} " in "\n".join(lines)


@pytest.mark.parametrize("name", NAMES)
def test_legacy_weight_files_load_with_identical_outputs_and_optimizer_state(name, legacy, tmp_path):
    """A file `save_weights` wrote, optimizer state included (as a run's last weights), loads variable for
    variable: the same values in the same order, so a resumed optimizer's slots still match their variables."""
    old, new = _build(name, *legacy), _build(name, gpt, encoder, encoder_decoder, heads)
    rng = np.random.RandomState(1)
    for model in (old, new):
        model.compile(optimizer=keras.optimizers.AdamW(), loss="mse")
        model.optimizer.build(model.trainable_variables)
    for variable in old.trainable_variables + old.optimizer.variables:
        variable.assign(rng.normal(scale=0.1, size=variable.shape).astype(variable.dtype))
    old.optimizer.iterations.assign(7)
    old.save_weights(tmp_path / "old.weights.h5")
    new.load_weights(tmp_path / "old.weights.h5")
    assert [v.shape for v in new.trainable_variables] == [v.shape for v in old.trainable_variables]
    for expected, actual in zip(old.trainable_variables + old.optimizer.variables,
                                new.trainable_variables + new.optimizer.variables, strict=True):
        np.testing.assert_array_equal(actual.numpy(), expected.numpy())
    for expected, actual in zip(_outputs(old, name), _outputs(new, name), strict=True):
        np.testing.assert_array_equal(actual, expected)


def test_encoder_decoder_owns_a_gpt_decoder():
    model = _build("EncoderDecoder", gpt, encoder, encoder_decoder, heads)
    assert not isinstance(model, gpt.GPT) and isinstance(model.decoder, gpt.GPT)
    assert model.decoder.get_config()["cross_attention"] and "cross_attention" not in model.get_config()


def test_gelu_is_registered_and_the_tanh_approximation():
    assert keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(gelu)) is gelu
    x = np.linspace(-4, 4, 101).astype("float32")
    tanh_approximation = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))
    np.testing.assert_allclose(np.asarray(gelu(x)), tanh_approximation, atol=1e-6)
    assert not np.allclose(np.asarray(gelu(x)), np.asarray(keras.activations.gelu(x, approximate=False)), atol=1e-5)


@pytest.mark.parametrize("cls", [gpt.GPT, encoder.Encoder, encoder_decoder.EncoderDecoder, heads.GPTClassifier,
                                 heads.EncoderClassifier, heads.EncoderPretrainer])
def test_docstring_example_runs(cls):
    examples = re.findall(r"Examples:\n\s*```python\n(.*?)```", cls.__doc__, re.S)
    assert len(examples) == 1
    exec(compile(textwrap.dedent(examples[0]), f"{cls.__name__} example", "exec"), {})

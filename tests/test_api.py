"""The Python API: `import tfglm` names it, every docstring example runs, and the README's example trains with
plain Keras `fit` and learns."""

import os
import re
import textwrap

import pytest

import tfglm

README = os.path.join(os.path.dirname(__file__), "..", "README.md")
# In this order: `train`'s example writes the run that `load_run`'s and `export_run`'s read.
API = ["load_config", "CharTokenizer", "SentencePieceTokenizer", "WordPieceTokenizer", "BytePairTokenizer", "GPT",
       "Encoder", "EncoderDecoder", "Generator", "Translator", "train", "load_run", "export_run", "import_checkpoint"]


def _example(obj):
    return re.search(r"Examples:\n\s*```python\n(.*?)```", obj.__doc__, re.S).group(1)


@pytest.mark.slow
def test_every_public_name_has_a_docstring_example_that_runs(tmp_path, monkeypatch):
    assert sorted(API) == tfglm.__all__
    monkeypatch.chdir(tmp_path)
    for name in API:
        code = _example(getattr(tfglm, name))
        exec(compile(textwrap.dedent(code), f"tfglm.{name}", "exec"), {})
    assert os.path.exists("runs/example/run.json") and os.path.exists("models/example/1/saved_model.pb")
    with pytest.raises(AttributeError, match="no attribute 'Nothing'"):
        tfglm.Nothing  # noqa: B018


@pytest.mark.slow
def test_python_api_example_trains_with_keras_fit_and_generates(tmp_path, monkeypatch, capsys):
    with open(README, encoding="utf-8") as f:
        section = f.read().split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    (tmp_path / "input.txt").write_text("ROMEO: abcdefgh\n" * 300, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    losses = namespace["history"].history["loss"]
    assert losses[-1] < 0.5 * losses[0]
    printed = capsys.readouterr().out.strip()
    assert printed.startswith("ROMEO: abcdefgh")  # the pattern it learned, greedily
    assert namespace["out"]["num_tokens"].numpy()[0] == 40

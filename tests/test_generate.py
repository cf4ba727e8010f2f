"""The shared decode loop: greedy and sampled, batched, seeded, stopping at <eot>, bucketed shapes."""

import json
import logging

import pytest
import tensorflow as tf

from conftest import tiny_config
from tfglm.tasks.registry import load_run
from tfglm.cli import main
from tfglm.generation.decode import Generator, generate_texts
from tfglm.generation.sampling import sample
from tfglm.training.trainer import train


@pytest.fixture(scope="module")
def documents_run(tmp_path_factory):
    """A tiny GPT trained on many copies of the document 'abcdefgh' (each followed by <eot>)."""
    root = tmp_path_factory.mktemp("docs")
    for i in range(200):
        (root / f"{i:03d}.txt").write_text("abcdefgh")
    run_dir = str(root / "run")
    config = tiny_config(f"data.files=[{root}/*.txt]", "train.steps=160", "train.eval_interval=80",
                         "train.steps_per_execution=40", "train.learning_rate=0.003",
                         "train.min_learning_rate=0.0003", "data.val_fraction=0.3")
    train(config, run_dir, verbose=0)
    return run_dir


@pytest.fixture(scope="module")
def generator(documents_run):
    _, tokenizer, model, _ = load_run(documents_run)
    return Generator(model, tokenizer)


def _generate(generator, prompts, max_new_tokens=10, temperature=0.0, top_k=0, top_p=1.0, seed=0):
    out = generator.generate(tf.constant(prompts), max_new_tokens, temperature, top_k, top_p, seed)
    return [c.decode() for c in out["completions"].numpy()], out["num_tokens"].numpy().tolist()


def test_greedy_stops_at_end_of_text(generator):
    assert _generate(generator, ["abc", ""]) == (["defgh", "abcdefgh"], [5, 8])


def test_batched_prompts_of_different_lengths_equal_each_alone(generator):
    prompts = ["a", "abcdef", "xyz", "", "bcd"]
    batched = _generate(generator, prompts, temperature=0.0)
    alone = [_generate(generator, [p]) for p in prompts]
    assert batched == ([a[0][0] for a in alone], [a[1][0] for a in alone])


def test_same_seed_same_text_other_seed_other_text(generator):
    prompts = ["", "ab"] * 4
    first = _generate(generator, prompts, temperature=5.0, seed=1)
    assert _generate(generator, prompts, temperature=5.0, seed=1) == first
    assert _generate(generator, prompts, temperature=5.0, seed=2) != first


def test_top_k_one_and_tiny_top_p_are_greedy(generator):
    greedy = _generate(generator, ["abc", "b"])
    assert _generate(generator, ["abc", "b"], temperature=3.0, top_k=1, seed=5) == greedy
    assert _generate(generator, ["abc", "b"], temperature=3.0, top_p=1e-6, seed=5) == greedy


def test_sampler_filters():
    logits = tf.math.log(tf.constant([[0.5, 0.3, 0.15, 0.05]]))
    top2 = {int(sample(logits, 1.0, 2, 1.0, seed, 0)[0]) for seed in range(200)}
    nucleus = {int(sample(logits, 1.0, 0, 0.75, seed, 0)[0]) for seed in range(200)}
    assert top2 == {0, 1} and nucleus == {0, 1}
    assert {int(sample(logits, 1.0, 0, 1.0, seed, 0)[0]) for seed in range(200)} == {0, 1, 2, 3}
    draws = [int(sample(logits, 1.0, 0, 1.0, 0, position)[0]) for position in range(2000)]
    assert abs(draws.count(0) / 2000 - 0.5) < 0.05 and abs(draws.count(3) / 2000 - 0.05) < 0.02  # its distribution


def test_long_prompt_is_truncated_from_the_left_with_a_warning(generator, caplog):
    settings = tiny_config("generate.max_new_tokens=6").generate
    with caplog.at_level(logging.WARNING, logger="tfglm"):
        texts, counts = generate_texts(generator, ["xx" * 20 + "abc"], settings)
    assert "prompt 1: 44 tokens, truncated from the left to the last 10" in caplog.text
    assert texts[0].startswith("defgh") and counts[0] <= 6


def test_decode_compiles_once_per_shape_bucket(generator):
    _generate(generator, ["a"])
    compiled = [generator._prefill, generator._advance]
    traces = [f.experimental_get_tracing_count() for f in compiled]
    for prompt in ["ab", "abcd", "abcdefg", "b"]:
        _generate(generator, [prompt], max_new_tokens=5)
    list(generator.stream(["abc"], 5, 0.0, 0, 1.0, 0, steps=2))  # streaming reuses the same traces
    assert [f.experimental_get_tracing_count() for f in compiled] == traces


@pytest.mark.parametrize("steps", [1, 3])
def test_streaming_gives_the_same_tokens_as_decoding_at_once(generator, steps):
    prompts = ["abc", "b", "hgf"]
    for temperature in (0.0, 1.5):
        whole = generator.generate(tf.constant(prompts), 9, temperature, 0, 1.0, 3)["completions"].numpy()
        chunks = list(generator.stream(prompts, 9, temperature, 0, 1.0, 3, steps=steps))
        assert len(chunks) >= 3  # the text came in pieces
        assert ["".join(row) for row in zip(*chunks)] == [text.decode() for text in whole]


def test_cli_generate_and_its_errors(documents_run, capsys):
    assert main(["generate", "--model", documents_run, "--prompt", "abc", "--temperature", "0", "--json"]) == 0
    assert '"completion": "defgh"' in capsys.readouterr().out
    assert main(["generate", "--model", documents_run, "--max-new-tokens", "16"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("tfglm: error: config: generate.max_new_tokens: must be in [1, 15] for this model (context 16), "
                   "got 16")
    assert main(["generate", "--model", documents_run, "--temperature", "-1"]) == 2
    assert "generate.temperature: must be in [0.0, inf), got -1.0" in capsys.readouterr().err
    for option, value, message in (("--seed", "4294967301", "generate.seed: must be in [0, 2147483647]"),
                                   ("--temperature", "inf", "generate.temperature: must be finite")):
        assert main(["generate", "--model", documents_run, option, value]) == 2
        assert message in capsys.readouterr().err
    assert main(["generate", "--model", documents_run + "-missing"]) == 2
    assert "no such run directory" in capsys.readouterr().err


def test_cli_generate_many_prompts_each_as_alone(documents_run, capsys):
    """Prompts of mixed lengths decode together in the engine's slots, each as it does alone, greedy and seeded,
    printed in their order; --stream prints the same; --stop ends a completion before it."""
    prompts = ["abc", "", "bcdefg", "h" * 20]  # the last truncated to fit the context

    def generate(prompts, *options):
        assert main(["generate", "--model", documents_run, *[a for p in prompts for a in ("--prompt", p)],
                     *options]) == 0
        return capsys.readouterr().out

    for options in (["--temperature", "0"], ["--temperature", "1.5", "--seed", "7"]):
        together = [json.loads(line) for line in generate(prompts, *options, "--json").splitlines()]
        alone = [json.loads(generate([prompt], *options, "--json")) for prompt in prompts]
        assert together == alone and [t["prompt"] for t in together] == prompts
        assert generate(prompts, *options, "--stream") == generate(prompts, *options)
    stopped = json.loads(generate(["abc"], "--temperature", "0", "--json", "--stop", "f", "--stop", "xy"))
    assert stopped == {"prompt": "abc", "completion": "de", "num_tokens": 3, "finish_reason": "stop"}
    for stops, message in ((["a"] * 5, "--stop: at most 4 stop sequences, got 5"),
                           ([""], "--stop: expected a non-empty string or a list of them")):
        assert main(["generate", "--model", documents_run, *[a for s in stops for a in ("--stop", s)]]) == 2
        assert message in capsys.readouterr().err

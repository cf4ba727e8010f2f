"""The decode engine (continuous batching) on a tiny in-process export: random weights, characters, no training.
Every sequence gets the tokens it gets alone, whatever shares the slots; slots are freed at the end, at a cancel;
long prompts are prefilled in chunks."""

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tensorflow as tf

from tfglm.config import GenerateConfig
from tfglm.data.tokenizers import CharTokenizer
from tfglm.generation.decode import Generator
from tfglm.generation.sampling import sample
from tfglm.models.gpt import GPT
from tfglm.serving import signatures
from tfglm.serving.engine import Request, generator_engine, held, prefill_widths
from tfglm.serving.export import write_warmup
from tfglm.serving.servable import Servable

ALPHABET = "abcdefgh "
GREEDY = {"max_new_tokens": 10, "temperature": 0.0, "top_k": 0, "top_p": 1.0, "seed": 0}


@pytest.fixture(scope="module")
def generator():
    tf.keras.utils.set_random_seed(0)
    tokenizer = CharTokenizer(ALPHABET)
    model = GPT(tokenizer.vocab_size, num_layers=2, num_heads=2, hidden_dim=16, max_length=64)
    model.build()
    return Generator(model, tokenizer, jit_compile=False)


@pytest.fixture(scope="module")
def export(generator, tmp_path_factory):
    """The generator's export, as `tfglm export` writes it (without XLA)."""
    path = str(tmp_path_factory.mktemp("engine") / "1")
    built = signatures.build(generator, GenerateConfig(prompt="abc", **GREEDY))
    write_warmup(path, *built.warmup)
    tf.saved_model.save(built.module, path, signatures=built.signatures)
    return path


@pytest.fixture(scope="module")
def servable(export):
    servable = Servable("tiny", 1, export, max_slots=4)
    yield servable
    servable.close()


def engine_of(generator, max_slots, **kwargs):
    """An engine on the in-process Generator's slot functions (`tfglm generate`'s)."""
    return generator_engine(generator, max_slots, **kwargs)


def prompt_ids(generator, prompt, max_new_tokens=10):
    return generator.preprocessor.prompt_ids(tf.constant([prompt]), max_new_tokens)[0].numpy()


def tokens_of(request):
    """The request's new token ids, once it has ended."""
    for _ in request:
        pass
    return request.tokens


def test_a_sequence_gets_the_tokens_of_generate(generator):
    """Greedy and sampled, the engine's tokens are `Generator.generate`'s (same keying of the random draws)."""
    engine = engine_of(generator, max_slots=4)
    try:
        for prompt, options in [("abc", GREEDY), ("hhh a", dict(GREEDY, temperature=0.9, top_k=5, seed=3)),
                                ("", dict(GREEDY, temperature=1.2, top_p=0.8, seed=11))]:
            out = generator.generate(tf.constant([prompt]), *options.values())
            want = generator.tokenizer.tokenize(out["completions"]).to_list()[0]
            request = engine.submit(Request(prompt_ids(generator, prompt), *options.values()))
            assert tokens_of(request) == want
            assert request.finish_reason == ("length" if len(want) == 10 else "stop")
    finally:
        engine.close()


def test_concurrent_mixed_sequences_get_what_they_get_alone(generator):
    """24 sequences (greedy and seeded sampled, several lengths) through 4 slots at once equal each alone."""
    engine = engine_of(generator, max_slots=4)
    rng = np.random.default_rng(0)
    jobs = []
    for i in range(24):
        prompt = "".join(rng.choice(list(ALPHABET), size=rng.integers(0, 40)))
        temperature = [0.0, 0.8, 1.5][i % 3]
        jobs.append((prompt, (int(rng.integers(1, 20)), temperature, int(rng.integers(0, 6)), 0.9, i)))
    try:
        alone = [tokens_of(engine.submit(Request(prompt_ids(generator, p, o[0]), *o))) for p, o in jobs]
        with ThreadPoolExecutor(12) as pool:
            together = list(pool.map(lambda job: tokens_of(engine.submit(
                Request(prompt_ids(generator, job[0], job[1][0]), *job[1]))), jobs))
    finally:
        engine.close()
    assert together == alone
    assert any(len(t) > 1 for t in alone)


def test_long_prompts_are_prefilled_in_chunks(generator):
    """A prompt longer than a chunk (16 here) is prefilled over several step boundaries, and its tokens are those
    of the prompt prefilled at once."""
    calls = []
    engine = engine_of(generator, max_slots=2, chunk=16, prefill_tokens=16)
    prefill = engine._prefill

    def counted(caches, tokens, slots, ids, start):
        calls.append((len(slots), ids.shape[1], int(start)))
        return prefill(caches, tokens, slots, ids, start)

    engine._prefill = counted
    prompt = "abcdefgh " * 5  # 45 characters, 46 ids with <eot>: chunks at 0, 16 and 32
    try:
        got = tokens_of(engine.submit(Request(prompt_ids(generator, prompt, 8), 8, 0.0, 0, 1.0, 0)))
    finally:
        engine.close()
    assert calls == [(1, 16, 0), (1, 16, 16), (1, 16, 32)]
    out = generator.generate(tf.constant([prompt]), 8, 0.0, 0, 1.0, 0)
    assert got == generator.tokenizer.tokenize(out["completions"]).to_list()[0]


def test_a_cancelled_sequence_frees_its_slot_at_the_next_step(generator):
    """With one slot, a long sequence cancelled after its first tokens lets the next one in at once."""
    engine = engine_of(generator, max_slots=1, steps=1)
    try:
        first = engine.submit(Request(prompt_ids(generator, "a", 60), 60, 0.9, 0, 1.0, 1, streamed=True))
        second = engine.submit(Request(prompt_ids(generator, "b", 5), 5, 0.0, 0, 1.0, 0))
        pieces = iter(first)
        next(pieces)
        first.cancel()
        assert len(tokens_of(second)) <= 5 and second.finish_reason in ("stop", "length")
        assert len(tokens_of(first)) < 58 and first.finish_reason == "cancelled"
    finally:
        engine.close()


def stopped(text, stops):
    """What generating `text` one character at a time and ending at the first stop sequence completed gives: (the
    text before that stop, the characters generated) or (text, None)."""
    for n in range(1, len(text) + 1):
        found = [text[:n].find(stop) for stop in stops if stop in text[:n]]
        if found:
            return text[:min(found)], n
    return text, None


def test_stop_sequences_end_a_sequence_as_one_character_at_a_time_would(generator):
    """A stop sequence ends the sequence at the step it is completed in, whatever the step's size: the text is
    what comes before the first stop completed, the tokens those up to the one that completed it, the slot freed.
    Streamed, no piece ever holds text of the stop."""
    rng = np.random.default_rng(1)
    engines = [engine_of(generator, max_slots=2, steps=steps) for steps in (1, 4)]
    try:
        for seed in (1, 4):  # 20 and 17 characters before <eot>; seed 4's hold a 3-byte one, the unknown "\ufffd"
            text = b"".join(engines[0].submit(Request(prompt_ids(generator, "abc", 40), 40, 0.9, 0, 1.0, seed)))
            text = text.decode()
            cases = [[text[5:8]], [text[6:10], text[8]], ["zz", text[-2:]], ["x"], [text[:1]], ["\ufffd "]]
            cases += [[text[i:i + int(rng.integers(1, 4))] for i in rng.integers(0, len(text) - 3, 3)]
                      for _ in range(6)]
            for stops in cases:
                want, count = stopped(text, stops)
                for engine in engines:
                    for streamed in (False, True):
                        request = engine.submit(Request(prompt_ids(generator, "abc", 40), 40, 0.9, 0, 1.0, seed,
                                                        stops, streamed))
                        assert "".join(request.texts()) == want, (stops, engine.steps, streamed)
                        assert len(request.tokens) == (count or len(text))
                        assert request.finish_reason == "stop"
            assert not any(slot for engine in engines for slot in engine.slots)
    finally:
        for engine in engines:
            engine.close()


def test_a_stream_holds_back_only_what_may_begin_a_stop_sequence(generator):
    assert held(b"abc", [b"cd"]) == 1 and held(b"abc", [b"bcx", b"c"]) == 2 and held(b"abc", [b"x"]) == 0
    assert held(b"ab", [b"abcd"]) == 2 and held(b"", [b"ab"]) == 0
    engine = engine_of(generator, max_slots=1, steps=1)
    try:  # greedy, "abc" goes on "ccc...": 30 of them
        free = list(engine.submit(Request(prompt_ids(generator, "abc", 30), 30, 0.0, 0, 1.0, 0, ["zzzz"], True)))
        request = engine.submit(Request(prompt_ids(generator, "abc", 30), 30, 0.0, 0, 1.0, 0, ["cd"], True))
        held_back = list(request)
    finally:
        engine.close()
    assert free == [b"c"] * 30  # no stop begins: each token's text as it comes
    # Each "c" may begin "cd": it waits a step, till the next token is not "d"; the last goes with the end.
    assert held_back == [b"c"] * 28 + [b"cc"] and request.finish_reason == "length"


def test_prefill_widths_and_sampling_keyed_per_row():
    assert prefill_widths(128) == [16, 32, 64, 128] and prefill_widths(40) == [16, 32, 40]
    assert prefill_widths(8) == [8]
    logits = tf.random.stateless_normal([3, 50], seed=[1, 2])
    temperature, top_k, top_p = tf.constant([0.0, 1.0, 1.0]), tf.constant([0, 10, 0]), tf.constant([1.0, 1.0, 0.9])
    rows = sample(logits, temperature, top_k, top_p, tf.constant([5, 6, 7]), tf.constant([3, 4, 9]))
    alone = [int(sample(logits[i:i + 1], temperature[i], top_k[i], top_p[i], [5, 6, 7][i], [3, 4, 9][i])[0])
             for i in range(3)]
    assert rows.numpy().tolist() == alone and alone[0] == int(tf.argmax(logits[0]))
    draws = {int(sample(logits[1:2], 1.0, 0, 1.0, seed, 0)[0]) for seed in range(40)}
    assert len(draws) > 5  # different seeds, different draws


def test_servable_runs_generate_and_streams_through_its_engine(servable, export, generator):
    """`predict` and `stream` of an export with the engine's signatures equal its own `generate` signature, greedy
    and sampled, and use no signature but the engine's for the decoding."""
    generate = servable.loaded.signatures["generate"]
    prompts = np.array([b"abc", b"", b"h" * 70], object)  # the last truncated to fit
    for options in (GREEDY, dict(GREEDY, temperature=0.9, top_k=4, seed=5)):
        arrays = {k: np.array(v, np.float32 if isinstance(v, float) else np.int32) for k, v in options.items()}
        want = generate(prompts=tf.constant(prompts), **{k: tf.constant(v) for k, v in arrays.items()})
        got = servable.predict("generate", {"prompts": prompts, **arrays})
        assert got["completions"].tolist() == want["completions"].numpy().tolist()
        assert got["num_tokens"].tolist() == want["num_tokens"].numpy().tolist()
        stream = servable.stream("generate", servable.prepare("generate", {"prompts": prompts[:1], **arrays}))
        assert "".join(stream).encode() == want["completions"].numpy()[0]
        assert stream.usage["completion_tokens"] == want["num_tokens"].numpy()[0]
    assert servable.engine.max_slots == 4 and not any(servable.engine.slots)


def test_engine_signatures_are_not_served_over_predict(servable):
    for name in signatures.ENGINE[:1] + signatures.ENGINE[2:]:
        with pytest.raises(Exception, match="not served over Predict"):
            servable.check_input_names(name, {})


def test_a_failing_step_fails_the_sequences_in_slots_not_the_engine(generator):
    engine = engine_of(generator, max_slots=2)
    step, fail = engine._step, threading.Event()

    def flaky(*args):
        if fail.is_set():
            fail.clear()
            raise RuntimeError("boom")
        return step(*args)

    engine._step = flaky
    try:
        fail.set()
        with pytest.raises(RuntimeError, match="boom"):
            tokens_of(engine.submit(Request(prompt_ids(generator, "a"), 5, 0.0, 0, 1.0, 0)))
        assert len(tokens_of(engine.submit(Request(prompt_ids(generator, "a"), 5, 0.0, 0, 1.0, 0)))) <= 5
    finally:
        engine.close()


def test_an_export_without_the_engine_signatures_is_served_as_before(generator, tmp_path):
    """An export written before the engine (no slot signatures) runs each request through its own `generate` and
    streams through `generate_start` and `advance`, with the same text."""
    built = signatures.build(generator, GenerateConfig(prompt="abc", **GREEDY))
    for name in signatures.ENGINE:
        built.signatures.pop(name, None)
        if hasattr(built.module, name):
            delattr(built.module, name)
    path = str(tmp_path / "1")
    write_warmup(path, *built.warmup)
    tf.saved_model.save(built.module, path, signatures=built.signatures)
    old = Servable("old", 1, path)
    try:
        assert old.engine is None
        arrays = {k: np.array(v, np.float32 if isinstance(v, float) else np.int32) for k, v in GREEDY.items()}
        got = old.predict("generate", {"prompts": np.array([b"abc"], object), **arrays})
        want = generator.generate(tf.constant(["abc"]), *GREEDY.values())
        assert got["completions"].tolist() == want["completions"].numpy().tolist()
        stream = old.stream("generate", old.prepare("generate", {"prompts": np.array([b"abc"], object), **arrays}))
        assert "".join(stream).encode() == want["completions"].numpy()[0]
        assert stream.usage["completion_tokens"] == int(want["num_tokens"][0]) and stream.finish_reason
    finally:
        old.close()

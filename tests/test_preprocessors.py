"""The preprocessors on their own: special tokens, truncation side, padding, bucket shapes, config round trip."""

import re
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from tfglm.data.chat import ChatTokenizer
from tfglm.data.parallel import PAD
from tfglm.data.tokenizers import CharTokenizer, train_wordpiece
from tfglm.preprocessors import (CausalLMPreprocessor, ChatPreprocessor, EncoderPreprocessor, Seq2SeqPreprocessor,
                                 buckets, language_model_preprocessor)
from tfglm.preprocessors.grounded import GroundedChatPreprocessor

TOKENIZER = CharTokenizer("abcdefgh")  # <eot> 0, <unk> 1, a..h 2..9


def ids(text):
    return [2 + "abcdefgh".index(c) for c in text]


def test_bucket_is_the_next_power_of_two_within_its_bounds():
    got = [int(buckets.bucket(n)) for n in (0, 1, 16, 17, 32, 33, 100)]
    assert got == [16, 16, 16, 32, 32, 64, 128]
    assert int(buckets.bucket(3, minimum=1)) == 4 and int(buckets.bucket(100, limit=40)) == 40
    assert buckets.bucket_widths(100) == [16, 32, 64, 100] and buckets.bucket_widths(40, minimum=8) == [8, 16, 32, 40]
    for n in range(1, 101):  # a width of bucket_widths is what bucket gives for the lengths it holds
        assert int(buckets.bucket(n, limit=100)) == min(w for w in buckets.bucket_widths(100) if w >= n)


def test_causal_lm_puts_eot_first_and_cuts_documents_right_prompts_left():
    p = CausalLMPreprocessor(TOKENIZER, sequence_length=5)
    out = p(tf.constant(["abcdefg", "h"]))
    np.testing.assert_array_equal(out["token_ids"], [[0] + ids("abcd"), [0] + ids("h") + [0, 0, 0]])
    np.testing.assert_array_equal(out["lengths"], [5, 2])
    assert p.prompt_ids(tf.constant(["abcdefg", "h"]), 2).to_list() == [ids("efg"), [0] + ids("h")]
    kept, had = p.truncations(tf.constant(["abcdefg", "h"]), 2)
    assert kept.numpy().tolist() == [3, 2] and had.numpy().tolist() == [8, 2]


def test_decode_buffer_buckets_batch_prompt_and_total():
    p = CausalLMPreprocessor(TOKENIZER, sequence_length=64)
    prompts = p.prompt_ids(tf.constant(["abc", "a" * 20, "b"]), 10)
    buffer = p.decode_buffer(prompts, 10)
    assert buffer["tokens"].shape == (4, 32) and int(buffer["rows"]) == 3  # 21 + 10 -> 32; 3 rows -> 4
    assert int(buffer["prefill_length"]) == 32 and buffer["lengths"].numpy().tolist() == [4, 21, 2, 1]
    np.testing.assert_array_equal(buffer["tokens"][0, :6], [0] + ids("abc") + [0, 0])  # right-padded with <eot>
    assert p.decode_buffer(p.prompt_ids(tf.constant(["a" * 50]), 30), 30)["tokens"].shape == (1, 64)  # the context


def test_chat_preprocessor_opens_the_assistant_turn_and_cuts_from_the_left():
    tokenizer = ChatTokenizer(TOKENIZER)
    p = language_model_preprocessor(tokenizer, 10)
    assert isinstance(p, ChatPreprocessor) and type(language_model_preprocessor(TOKENIZER, 10)) is CausalLMPreprocessor
    roles, contents = tf.constant([["user", "assistant", "user"]]), tf.constant([["ab", "cd", "ef"]])
    user, assistant = tokenizer.role_ids["user"], tokenizer.role_ids["assistant"]
    assert p.chat_ids(roles, contents, 2).to_list() == [[0, user, *ids("ef"), 0, assistant]]  # older turns dropped
    assert p.chat_ids(roles, contents, 0).to_list()[0][:2] == [0, user]  # room for one more turn: not a reply alone
    assert p.encode(roles, contents, 2)["dropped_turns"].numpy().tolist() == [2]
    assert p.chat_ids(tf.constant([["user"]]), tf.constant([["abcdefgh"]]), 4).to_list() == [
        [*ids("efgh"), 0, assistant]]  # a last message longer than the room: cut from the left
    with pytest.raises(tf.errors.InvalidArgumentError, match="conversation does not fit the context"):
        p.chat_ids(tf.constant([["user"]]), tf.constant([["abcdefgh"]]), 4, whole=True)  # or refused whole


def test_classifier_preprocessors_pack_for_their_backbone():
    tokenizer = train_wordpiece(["the cat sat on the mat", "a dog ran"], 40)
    encoder = EncoderPreprocessor(tokenizer, sequence_length=6)
    out = encoder(tf.constant(["the cat sat on the mat"]))
    tokens = tokenizer.tokenize(tf.constant(["the cat sat on the mat"])).to_list()[0]
    assert out["token_ids"].numpy().tolist() == [[tokenizer.cls_id, *tokens[:4], tokenizer.sep_id]]
    short = encoder(tf.constant(["a"]))
    assert short["token_ids"].numpy()[0, 3:].tolist() == [tokenizer.pad_id] * 3
    assert short["padding_mask"].numpy().tolist() == [[True, True, True, False, False, False]]
    assert short["segment_ids"].numpy().tolist() == [[0] * 6]
    decoder = CausalLMPreprocessor(TOKENIZER, sequence_length=4)  # a GPT classifier's
    assert decoder(tf.constant(["abcdef"]))["token_ids"].numpy().tolist() == [[0] + ids("abc")]


def test_seq2seq_preprocessor_cuts_sources_and_buckets_the_buffer():
    p = Seq2SeqPreprocessor(TOKENIZER, sequence_length=12)
    out = p(tf.constant(["abc", "abcdefghabcdefgh", ""]))
    assert out["source_ids"].shape == (4, 12) and out["lengths"].numpy().tolist() == [3, 12, 0]
    np.testing.assert_array_equal(out["source_ids"][0], ids("abc") + [PAD] * 9)
    assert p(tf.constant(["ab"]))["source_ids"].shape == (1, 8)  # lengths bucket from 8


@pytest.mark.parametrize("family", [CausalLMPreprocessor, ChatPreprocessor, Seq2SeqPreprocessor])
def test_config_round_trip(family):
    tokenizer = ChatTokenizer(TOKENIZER) if family is ChatPreprocessor else TOKENIZER
    p = family(tokenizer, sequence_length=7, name="pre")
    config = p.get_config()
    assert config["sequence_length"] == 7 and config["name"] == "pre"
    restored = family.from_config({**config, "tokenizer": tokenizer})
    assert restored.get_config() == config
    texts = tf.constant(["abcdefgh"])
    out, again = p(texts), restored(texts)
    for key in out:
        np.testing.assert_array_equal(again[key], out[key])


def test_encoder_config_round_trip():
    tokenizer = train_wordpiece(["the cat sat", "a dog ran"], 30)
    p = EncoderPreprocessor(tokenizer, sequence_length=5)
    restored = EncoderPreprocessor.from_config({**p.get_config(), "tokenizer": tokenizer})
    assert restored.get_config() == p.get_config()
    np.testing.assert_array_equal(restored(tf.constant(["the cat"]))["token_ids"],
                                  p(tf.constant(["the cat"]))["token_ids"])


@pytest.mark.parametrize("family", [CausalLMPreprocessor, ChatPreprocessor, EncoderPreprocessor,
                                    GroundedChatPreprocessor, Seq2SeqPreprocessor])
def test_docstring_example_runs(family):
    examples = re.findall(r"Examples:\n\s*```python\n(.*?)```", family.__doc__, re.S)
    assert len(examples) == 1
    exec(compile(textwrap.dedent(examples[0]), f"{family.__name__} example", "exec"), {})

import tensorflow as tf

from tfglm.data.tokenizers import CharTokenizer, SentencePieceTokenizer, load_tokenizer, train_sentencepiece

MIXED = ["Hello, world!  Tabs\tand\nnewlines.", "Ünïcödé: naïve café — 日本語テキスト ☃ 😀", ""]
CORPUS = ["The quick brown fox jumps over the lazy dog.", "Ünïcödé naïve café 日本語", "numbers 12345 and CAPS"] * 50


def _round_trip(tokenizer, texts):
    ids = tokenizer.tokenize(tf.constant(texts))
    return [t.decode("utf-8") for t in tokenizer.detokenize(ids).numpy()]


def test_char_round_trip_and_unknown_characters(tmp_path):
    tokenizer = CharTokenizer("".join(MIXED))
    assert _round_trip(tokenizer, MIXED) == MIXED
    ids = tokenizer.tokenize(tf.constant(["a€"])).numpy()[0]
    assert ids[1] == tokenizer.unk_id  # '€' never seen
    tokenizer.save(str(tmp_path))
    assert _round_trip(load_tokenizer(str(tmp_path)), MIXED) == MIXED


def test_sentencepiece_round_trips_unseen_text_exactly(tmp_path):
    tokenizer = SentencePieceTokenizer(train_sentencepiece(iter(CORPUS), vocab_size=320))
    texts = MIXED + ["unseen ✓ symbols ∑ and 한국어", "  leading and trailing spaces  "]
    assert _round_trip(tokenizer, texts) == texts
    assert tokenizer.detokenize(tf.ragged.constant([[tokenizer.eot_id]])).numpy()[0] == b""
    tokenizer.save(str(tmp_path))
    assert _round_trip(load_tokenizer(str(tmp_path)), texts) == texts


def test_tokenizers_run_inside_tf_data_graph():
    tokenizer = CharTokenizer("abc")
    ds = tf.data.Dataset.from_tensor_slices(["abc", "cab"]).batch(2).map(lambda s: tokenizer.tokenize(s))
    ids = next(iter(ds))
    assert ids.to_list() == [[2, 3, 4], [4, 2, 3]]

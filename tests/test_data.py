import numpy as np
import pytest
import tensorflow as tf

from tfglm.data import corpus as data
from tfglm.errors import TfglmError
from tfglm.preprocessors import buckets
from tfglm.data.tokenizers import CharTokenizer


def test_packing_gives_exact_shapes_and_loses_no_token():
    tokens = np.arange(1000, dtype=np.int32)
    seq_len, batch = 16, 4
    blocks = data.num_blocks(len(tokens), seq_len)
    steps_per_epoch = blocks // batch
    ds = data.train_dataset(tokens, seq_len, batch, seed=1, start_step=0, num_steps=steps_per_epoch)
    inputs, targets = [], []
    for x, y in ds.as_numpy_iterator():
        assert x.shape == y.shape == (batch, seq_len)
        np.testing.assert_array_equal(x[:, 1:], y[:, :-1])  # targets are inputs shifted by one
        inputs.append(x)
        targets.append(y)
    starts = np.sort(np.concatenate(inputs)[:, 0])
    offset = starts[0]
    assert offset < seq_len
    # One epoch visits distinct, non-overlapping blocks on one grid; only the remainder of a batch and the edges
    # (less than batch + 2 blocks) are left for the next epoch, whose grid starts at another offset.
    assert len(set(starts)) == len(starts) == steps_per_epoch * batch
    assert np.all((starts - offset) % seq_len == 0) and starts[-1] + seq_len < len(tokens)
    assert len(tokens) - len(starts) * seq_len < (batch + 2) * seq_len


def test_batches_are_a_function_of_seed_and_step():
    tokens = np.arange(5000, dtype=np.int32)
    full = list(data.train_dataset(tokens, 16, 4, seed=7, start_step=0, num_steps=30).as_numpy_iterator())
    resumed = list(data.train_dataset(tokens, 16, 4, seed=7, start_step=20, num_steps=10).as_numpy_iterator())
    for a, b in zip(full[20:], resumed):
        np.testing.assert_array_equal(a[0], b[0])
    other = next(data.train_dataset(tokens, 16, 4, seed=8, start_step=0, num_steps=1).as_numpy_iterator())
    assert not np.array_equal(full[0][0], other[0])


def test_tokenize_files_separates_documents_with_eot(tmp_path):
    (tmp_path / "a.txt").write_text("ab")
    (tmp_path / "b.txt").write_text("ba")
    files = data.resolve_files([str(tmp_path)])
    tokenizer = CharTokenizer(data.scan_files(files).chars)
    assert data.tokenize_files(files, tokenizer).tolist() == [2, 3, 0, 3, 2, 0]


def test_standard_split_is_last_fraction():
    train, val = data.split_tokens(np.arange(100), 0.1)
    assert train.tolist() == list(range(90)) and val.tolist() == list(range(90, 100))


def test_missing_paths_and_empty_globs(tmp_path):
    with pytest.raises(TfglmError, match="nope.txt: no such file or directory"):
        data.resolve_files([str(tmp_path / "nope.txt")])
    with pytest.raises(TfglmError, match=r"\*\.md: matches no files"):
        data.resolve_files([str(tmp_path / "*.md")])


def test_empty_corpus_is_rejected(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text(" \n\n")
    with pytest.raises(TfglmError, match="corpus is empty"):
        data.scan_files(data.resolve_files([str(tmp_path)]))


def test_binary_file_is_rejected_with_its_line(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"text\nmore\x00\x01\x02")
    with pytest.raises(TfglmError, match=r"model\.bin:2: binary file \(NUL byte at offset 9\)"):
        data.scan_files([str(path)])


def test_invalid_utf8_is_replaced_and_counted(tmp_path, caplog):
    path = tmp_path / "latin1.txt"
    path.write_bytes("ok line\ncaf\xe9 and na\xefve\n".encode("latin-1"))
    stats = data.scan_files([str(path)])
    assert stats.invalid_sequences == 2
    assert "latin1.txt:2: 2 invalid UTF-8 sequence(s) replaced with U+FFFD" in caplog.text
    tokenizer = CharTokenizer(stats.chars)
    tokens = data.tokenize_files([str(path)], tokenizer)
    assert (tokens == tokenizer.unk_id).sum() == 2  # U+FFFD is not in the vocabulary


def test_a_single_50mb_line_is_tokenized(tmp_path):
    path = tmp_path / "one_line.txt"
    path.write_text("abcd" * (50 * 2 ** 20 // 4))
    stats = data.scan_files([str(path)])
    tokens = data.tokenize_files([str(path)], CharTokenizer(stats.chars))
    assert len(tokens) == 50 * 2 ** 20 + 1 and tokens[-1] == 0


def test_too_small_corpus_names_the_fix():
    with pytest.raises(TfglmError, match="fewer than train.batch_size"):
        data.train_dataset(np.arange(50, dtype=np.int32), 16, 8, 0, 0, 1)
    with pytest.raises(TfglmError, match="validation split has 20 tokens"):
        data.eval_dataset(np.arange(20, dtype=np.int32), 16, 8, 1)


def test_bucketed_batches_are_full_cut_to_their_longest_row_and_lose_no_token():
    assert buckets.bucket_widths(100) == [16, 32, 64, 100] and buckets.bucket_widths(16) == [16]
    rng = np.random.RandomState(0)
    lengths = rng.randint(1, 101, size=500)
    ids = (np.arange(100)[None] < lengths[:, None]) * (1 + np.arange(500)[:, None])  # row i: i + 1 then padding
    examples = tf.data.Dataset.from_tensor_slices(({"token_ids": ids, "padding_mask": ids > 0}, lengths))
    seen = []
    for inputs, row_lengths in buckets.bucket_by_length(examples, 8, 100).as_numpy_iterator():
        width = inputs["token_ids"].shape[1]
        assert inputs["token_ids"].shape == inputs["padding_mask"].shape == (8, width)
        assert width == min(w for w in buckets.bucket_widths(100) if w >= row_lengths.max())
        assert row_lengths.min() > [0, 16, 32, 64][buckets.bucket_widths(100).index(width)]  # one bucket a batch
        np.testing.assert_array_equal(inputs["padding_mask"].sum(1), row_lengths)
        seen += list(inputs["token_ids"][:, 0])
    assert len(seen) == len(set(seen)) > 500 - 4 * 8  # each example once; only unfilled buckets' rests are left


def test_trim_padding_cuts_an_in_order_batch_to_its_longest_row():
    inputs = {"token_ids": np.array([[5, 6, 0] + [0] * 37, [7] * 20 + [0] * 20]), "lengths": np.array([2, 20])}
    trimmed = buckets.trim_padding({k: tf.constant(v) for k, v in inputs.items()}, 40)
    np.testing.assert_array_equal(trimmed["token_ids"], inputs["token_ids"][:, :32])
    np.testing.assert_array_equal(trimmed["lengths"], [2, 20])

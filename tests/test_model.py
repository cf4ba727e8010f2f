import keras
import numpy as np

from tfglm.models.gpt import GPT


def _model():
    keras.utils.set_random_seed(0)
    model = GPT(vocab_size=50, num_layers=2, num_heads=4, hidden_dim=32, max_length=24)
    model.build()
    return model


def test_changing_a_later_token_never_changes_earlier_outputs():
    model = _model()
    tokens = np.random.RandomState(0).randint(0, 50, size=(2, 24)).astype("int32")
    base = model(tokens).numpy()
    for t in (0, 7, 22):
        changed = tokens.copy()
        changed[:, t + 1] = (changed[:, t + 1] + 1) % 50
        out = model(changed).numpy()
        np.testing.assert_allclose(out[:, : t + 1], base[:, : t + 1], atol=1e-5)
        assert not np.allclose(out[:, t + 1], base[:, t + 1])


def test_cached_decoding_matches_full_forward_pass():
    model = _model()
    tokens = np.random.RandomState(1).randint(0, 50, size=(3, 20)).astype("int32")
    full = model(tokens).numpy()
    caches = model.init_cache(3, 24)
    hidden, caches = model.forward(tokens[:, :8], caches, 0)  # prefill 8 positions, then one token at a time
    cached = [model.logits(hidden).numpy()]
    for i in range(8, 20):
        hidden, caches = model.forward(tokens[:, i:i + 1], caches, i)
        cached.append(model.logits(hidden).numpy())
    np.testing.assert_allclose(np.concatenate(cached, axis=1), full, atol=1e-4)


def test_output_projection_is_tied_to_token_embeddings():
    model = _model()
    names = [v.path for v in model.trainable_variables]
    assert sum("embeddings" in n and "token" in n for n in names) == 1
    assert not any("reverse" in n for n in names)
    per_block = 4 * 32 * 32 + 4 * 32 + 2 * 4 * 32 * 32 + 4 * 32 + 32 + 4 * 32
    assert model.count_params() == 50 * 32 + 24 * 32 + 2 * per_block + 2 * 32

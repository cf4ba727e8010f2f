"""Batches of a fine-tune counted in epochs: which rows make each training step's batch, a pure function of the seed,
so a resumed run (`skip(step)`) sees exactly the batches it would have seen.

Every epoch is a new permutation of all the rows; its last batch is filled up from the start of that permutation
(a shuffled wrap-around), so each row is seen at least once an epoch and every batch is full (one shape a bucket).
"""

import numpy as np

POOL_BATCHES = 64  # batches sorted by length together: wide enough to group similar lengths, narrow enough to mix


def steps_per_epoch(num_rows, batch_size):
    """Batches in one pass over `num_rows` rows, the last one filled up by the wrap-around."""
    return -(-num_rows // batch_size)


def epoch_batches(num_rows, batch_size, epochs, seed, lengths=None):
    """Row indices, int64 [epochs * steps_per_epoch, batch_size]: each epoch's rows in a new order, seeded by (seed,
    epoch). With `lengths` (one a row), each pool of `POOL_BATCHES` batches holds rows of similar length (sorted
    within the pool, the pool's batches then shuffled), so a batch cut to its longest row carries little padding."""
    steps = steps_per_epoch(num_rows, batch_size)
    batches = []
    for epoch in range(epochs):
        rng = np.random.default_rng([seed, epoch])
        order = rng.permutation(num_rows)
        order = np.resize(order, steps * batch_size)  # repeats the permutation's start to fill the last batch
        epoch_ids = order.reshape(steps, batch_size)
        if lengths is not None:
            pools = []
            for start in range(0, len(order), POOL_BATCHES * batch_size):
                pool = order[start:start + POOL_BATCHES * batch_size]
                pool = pool[np.argsort(np.asarray(lengths)[pool], kind="stable")].reshape(-1, batch_size)
                pools.append(pool[rng.permutation(len(pool))])
            epoch_ids = np.concatenate(pools)
        batches.append(epoch_ids)
    return np.concatenate(batches).astype(np.int64)

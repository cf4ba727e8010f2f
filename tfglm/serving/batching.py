"""Batching of concurrent greedy `generate` requests (`tfglm serve --enable_batching`)."""

import collections
import queue
import threading
import time
from concurrent import futures

import numpy as np

from tfglm.config import GENERATE_OPTIONS


class Batcher:
    """Runs concurrent greedy `generate` requests with identical options as one batch.

    Callers queue their request and wait. One worker thread takes the oldest waiting request and, for up to
    `timeout_s` or until `max_batch_size` prompts are collected, more from the queue; the batch is the oldest request
    plus every other waiting one whose options (max_new_tokens, temperature, top_k, top_p, seed) are the same, in
    arrival order; the others wait for a later batch. The batch's prompts are concatenated, run in one call, and the
    outputs split back by request. Greedy completions do not depend on the rest of the batch (tests/test_export.py
    checks it); sampled ones do (a row's random numbers depend on its place), so requests with temperature > 0, like
    those of `max_batch_size` prompts or more, run alone on the caller's thread, and a seeded request gets the same
    text whatever other clients send. `on_batch(size)` is called with the number of prompts of every batch run.
    """

    Request = collections.namedtuple("Request", "arrays key future")

    def __init__(self, run, max_batch_size=8, timeout_s=0.005, on_batch=None):
        self._run, self.max_batch_size, self.timeout_s = run, max_batch_size, timeout_s
        self._on_batch = on_batch or (lambda size: None)
        self._queue = queue.Queue()
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._work, daemon=True, name="tfglm-batcher").start()

    def __call__(self, arrays):
        if arrays["temperature"] > 0 or len(arrays["prompts"]) >= self.max_batch_size:
            self._on_batch(len(arrays["prompts"]))
            return self._run(arrays)
        request = self.Request(arrays, tuple(arrays[o.name].item() for o in GENERATE_OPTIONS), futures.Future())
        with self._lock:
            if self._closed:
                return self._run(arrays)
            self._queue.put(request)
        return request.future.result()

    def close(self):
        """Ends the worker once the requests already queued have run."""
        with self._lock:
            self._closed = True
            self._queue.put(None)

    def _work(self):
        waiting, closing = [], False  # requests taken from the queue, oldest first
        while waiting or not closing:
            if not waiting:
                request = self._queue.get()
                if request is None:
                    return
                waiting.append(request)
            key, deadline = waiting[0].key, time.monotonic() + self.timeout_s
            while not closing and self._size(waiting, key) < self.max_batch_size:
                try:
                    request = self._queue.get(timeout=max(deadline - time.monotonic(), 0))
                except queue.Empty:
                    break
                if request is None:
                    closing = True
                else:
                    waiting.append(request)
            batch, rest, size = [], [], 0
            for request in waiting:
                n = len(request.arrays["prompts"])
                if request.key == key and size + n <= self.max_batch_size:
                    batch.append(request)
                    size += n
                else:
                    rest.append(request)
            waiting = rest
            self._execute(batch)

    @staticmethod
    def _size(waiting, key):
        return sum(len(r.arrays["prompts"]) for r in waiting if r.key == key)

    def _execute(self, batch):
        arrays = dict(batch[0].arrays, prompts=np.concatenate([r.arrays["prompts"] for r in batch]))
        self._on_batch(len(arrays["prompts"]))
        try:
            outputs = self._run(arrays)
        except Exception as e:  # every waiting caller gets the error
            for request in batch:
                request.future.set_exception(e)
            return
        start = 0
        for request in batch:
            end = start + len(request.arrays["prompts"])
            request.future.set_result({k: v[start:end] for k, v in outputs.items()})
            start = end

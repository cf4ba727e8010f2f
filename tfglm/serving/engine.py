"""Continuous batching: one decode engine per served version, a fixed pool of KV-cache slots that every concurrent
generation shares (`generate` and `chat` over REST and gRPC, the OpenAI endpoints whole and streamed, and the prompts
of one `tfglm generate`).

One engine thread owns the slots. At each step boundary it
1. admits waiting requests, first come first served, into free slots;
2. prefills prompts: one `slot_prefill` call of at most `prefill_tokens` prompt tokens (rows x width), the rows that
   start at the same position batched, widths bucketed (`widths`), a prompt longer than `chunk` tokens split into
   chunks over several boundaries. A long prompt therefore stalls the running streams by one bounded prefill call a
   step, never by its whole length;
3. runs one `slot_step` of `steps` tokens over every slot (idle ones stand still), and hands each request its new
   text; a slot is freed at `<eot>`, at its `max_new_tokens` (or the context's end), at one of its request's stop
   sequences, or when its request is cancelled (a client gone), at the next boundary.

Options are per slot (temperature, top_k, top_p, seed, max_new_tokens) and sampling is keyed on each slot's (seed,
position), so a request's text is the same whatever else shares the pool, and the same as alone. Shapes are static:
the pool is `max_slots` x context, the step one shape and the prefill a few (each width at each power-of-two row count
within `prefill_tokens`: 14 for a context of 128 or more and 16 slots), all run by `warm_up` before the engine takes
traffic, so no request compiles.

Text is made once per step for every request that needs it then, in one `detokenize` call: a streamed request's or
one with stop sequences each step, any other's when it ends. A stream never sends text that may turn out to begin a
stop sequence: the end of the text that is the start of one waits until the next tokens decide it.

The engine knows only three functions (`Generator.slot_prefill` / `slot_step` and the tokenizer's detokenization; in
a `tfglm export` its `slot_prefill`, `slot_step` and `detokenize` signatures) and the token ids: prompts become ids
outside it.
"""

import codecs
import collections
import logging
import os
import queue
import threading
import time

import numpy as np
import tensorflow as tf

from tfglm.config import generate_options

log = logging.getLogger("tfglm")
STEPS = 4  # tokens a slot gains per step call: amortises the call, keeps the time to a first token short
CHUNK = 128  # most prompt tokens of one row per prefill call
PREFILL_TOKENS = 256  # most prompt tokens (rows x width) per prefill call, so per step boundary
MAX_SLOTS = 16


def default_slots(bytes_per_slot):
    """`--max_slots` when not given: MAX_SLOTS, fewer if the pool's caches would take more than 1/16 of memory."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return MAX_SLOTS
    return int(max(1, min(MAX_SLOTS, memory // 16 // bytes_per_slot)))


def generator_engine(generator, max_slots, **kwargs):
    """An engine, started, on a `Generator`'s own functions: `tfglm generate`'s. It runs the very functions a `tfglm
    export`'s `slot_prefill` and `slot_step` signatures wrap, so a run's prompts take the served path without a
    SavedModel written and loaded for each run. Not warmed up: each shape compiles the first time a run needs it.
    At most `max_slots` slots, fewer where `default_slots` says so."""
    projection = generator.model.output_projection()
    cache = generator.model.init_cache(1, generator.context)  # a layer's [1, 2, heads, context, head_dim] each
    per_slot, dtype = [len(cache), *cache[0].shape[1:]], tf.as_dtype(generator.model.compute_dtype)
    max_slots = min(max_slots, default_slots(int(np.prod(per_slot)) * dtype.size))

    def prefill(caches, tokens, slots, ids, start):
        out = generator.slot_prefill(caches, tokens, tf.constant(slots), tf.constant(ids), tf.constant(start))
        return out["caches"], out["tokens"]

    def step(caches, tokens, *arrays):
        out = generator.slot_step(caches, tokens, *map(tf.constant, arrays), projection)
        return out["caches"], out["tokens"]

    def detokenize(rows):
        ids = tf.RaggedTensor.from_row_lengths(np.array([t for row in rows for t in row], np.int32),
                                               [len(row) for row in rows])
        return generator.tokenizer.detokenize(ids).numpy().tolist()

    return Engine(prefill, step, detokenize, per_slot, dtype, generator.tokenizer.eot_id, max_slots, **kwargs).start()


def generate_requests(generator, prompts, settings, stop=(), streamed=False):
    """`tfglm generate`'s prompts as Requests, in their order, all submitted at once to an engine on `generator`
    (`generator_engine`: a slot a prompt, up to MAX_SLOTS), with the options of `settings` (a `generate`
    config) and `stop` sequences: prompts of any lengths share the slots, and one that ends frees its slot for the
    next. The engine ends once they have."""
    room = min(max(settings.max_new_tokens, 1), generator.context - 1)
    ids = generator.preprocessor.prompt_ids(tf.constant(prompts), room).to_list()
    engine = generator_engine(generator, min(len(prompts), MAX_SLOTS))
    try:
        return [engine.submit(Request(row, room, *generate_options(settings)[1:], stop, streamed)) for row in ids]
    finally:
        engine.close()


class Request:
    """One sequence to decode: its prompt ids and options, `stop` sequences (strings) and whether it is `streamed`
    (its text sent as it grows, else whole at the end). Iterating it yields its text (UTF-8 bytes, a piece may end
    inside a character) as the engine makes it, until the sequence ends; then `tokens` are its new token ids (up to
    the one that completed a stop sequence) and `finish_reason` is "stop" (`<eot>` or a stop sequence), "length" or
    "cancelled"."""

    def __init__(self, ids, max_new_tokens, temperature, top_k, top_p, seed, stop=(), streamed=False):
        self.ids = np.asarray(ids, np.int32)
        self.max_new_tokens, self.temperature, self.top_k, self.top_p, self.seed = (
            int(max_new_tokens), float(temperature), int(top_k), float(top_p), int(seed))
        self.stop, self.streamed = tuple(s.encode("utf-8") for s in stop), streamed
        self.tokens, self.sent = [], 0  # the new ids; the bytes of their text sent so far
        self.finish_reason, self.cancelled = None, False
        self.submitted, self.first_token_s = time.perf_counter(), None
        self._events = queue.SimpleQueue()
        self._wake = None  # the engine's, once submitted

    @classmethod
    def finished(cls, ids):
        """A request that needs no decoding (a grounded chat's hand-off): it yields nothing and ends "stop"."""
        request = cls(ids, 0, 0.0, 0, 1.0, 0)
        request.finish_reason = "stop"
        request._events.put(None)
        return request

    def __iter__(self):
        while True:
            event = self._events.get()
            if event is None:
                return
            if isinstance(event, BaseException):
                raise event
            yield event

    def texts(self):
        """Yields the text as strings as it comes (an unfinished UTF-8 character waits for its last bytes)."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        for piece in self:
            yield decoder.decode(piece)
        yield decoder.decode(b"", final=True)

    def cancel(self):
        """Frees the request's slot (or queue place) at the engine's next step boundary."""
        self.cancelled = True
        if self._wake is not None:
            with self._wake:
                self._wake.notify()

    def _take(self, text, ended):
        """Sends the part of `text` (the whole text of `tokens`) that is decided; returns the end of the first stop
        sequence it completes (bytes), or None. Before its end, a suffix of the text that may begin a stop sequence
        is held back."""
        found = [(i + len(stop), i) for stop in self.stop for i in [text.find(stop, self.sent)] if i >= 0]
        stop_end, cut = min(found) if found else (None, len(text) if ended else len(text) - held(text, self.stop))
        if cut > self.sent:
            self._events.put(text[self.sent:cut])
            self.sent = cut
        return stop_end


def held(text, stops):
    """The length of the longest end of `text` that begins one of `stops` (bytes): text a stream may not send yet."""
    return max((n for stop in stops for n in range(min(len(stop) - 1, len(text)), 0, -1)
                if text.endswith(stop[:n])), default=0)


class Slot:
    """A request in a slot: how much of its prompt is prefilled, its position and limit once decoding."""

    def __init__(self, request, context):
        self.request, self.filled, self.decoding = request, 0, False
        self.position = len(request.ids) - 1
        self.limit = min(len(request.ids) + request.max_new_tokens, context)


class Engine:
    """The slot pool of one model: `prefill(caches, tokens, slots, ids, start) -> (caches, tokens)`,
    `step(caches, tokens, positions, limits, temperature, top_k, top_p, seed, steps) -> (caches, tokens)` (see
    `tfglm.generation.decode.slot_prefill` and `slot_step`) and `detokenize(rows of token ids) -> [text as bytes]`,
    the caches' shape per slot ([layers, 2, heads, context, head_dim]) and dtype, and `eot_id`. `metrics` (optional)
    has `slots` and `queue` gauges, a `ttft` histogram and a `tokens` counter (Prometheus children).

    Examples:
    ```python
    engine = Engine(prefill, step, detokenize, cache_shape, tf.float32, eot_id, max_slots=8)
    engine.warm_up()
    request = engine.submit(Request(prompt_ids, 16, 0.0, 0, 1.0, 0, stop=["\n\n"]))
    text = b"".join(request)  # or, as it comes: `for piece in request.texts()` with `streamed=True`
    request.tokens, request.finish_reason
    engine.close()
    ```
    """

    def __init__(self, prefill, step, detokenize, cache_shape, cache_dtype, eot_id, max_slots, steps=STEPS,
                 chunk=CHUNK, prefill_tokens=PREFILL_TOKENS, metrics=None):
        self._prefill, self._step, self._detokenize = prefill, step, detokenize
        self.eot_id, self.max_slots, self.steps = eot_id, max_slots, steps
        self.context = cache_shape[3]
        self.widths = prefill_widths(min(chunk, self.context))
        self.prefill_tokens = max(prefill_tokens, self.widths[-1])
        self.metrics = metrics
        self.caches = tf.zeros([cache_shape[0], max_slots, *cache_shape[1:]], cache_dtype)
        self.tokens = tf.zeros([max_slots, self.context], tf.int32)
        self.slots = [None] * max_slots
        self._admitted = []  # the slots in use, in admission order
        self._waiting = collections.deque()
        self._wake = threading.Condition()
        self._closing = self._stopped = False
        self._thread = threading.Thread(target=self._run, daemon=True, name="tfglm-engine")
        self._started = False

    def warm_up(self):
        """Runs every shape the engine uses (each prefill width at each row count, and the step) once, then starts
        the engine (`start`); returns the seconds it took."""
        start = time.perf_counter()
        for width in self.widths:
            for k in self.prefill_rows(width):
                self._prefill(self.caches, self.tokens, np.zeros([k], np.int32), np.zeros([k, width], np.int32),
                              np.int32(0))
        idle = np.zeros([self.max_slots], np.int32)
        self._step(self.caches, self.tokens, idle, idle, np.zeros([self.max_slots], np.float32), idle,
                   np.ones([self.max_slots], np.float32), idle, np.int32(self.steps))
        self.start()
        return time.perf_counter() - start

    def start(self):
        """Starts the engine thread; without `warm_up`, each shape compiles when a request first needs it."""
        self._started = True
        self._thread.start()
        return self

    def prefill_rows(self, width):
        """The row counts a prefill of `width` can take: powers of two, within `prefill_tokens` and the slots."""
        most = max(1, min(self.prefill_tokens // width, self.max_slots))
        return [1 << i for i in range(most.bit_length()) if 1 << i <= most] + ([most] if most & (most - 1) else [])

    def submit(self, request):
        """Queues `request` (FCFS) and returns it; iterate it for its tokens."""
        if len(request.ids) >= self.context or not len(request.ids):
            raise ValueError(f"a prompt of {len(request.ids)} ids; the context holds {self.context}")
        with self._wake:
            if self._stopped or not self._started:
                raise RuntimeError("the engine is not running")
            request._wake = self._wake
            self._waiting.append(request)
            self._gauge("queue", 1)
            self._wake.notify()
        return request

    def close(self):
        """Ends the engine thread once every request submitted has finished."""
        with self._wake:
            self._closing = True
            self._wake.notify()

    def _gauge(self, name, delta):
        if self.metrics is not None:
            getattr(self.metrics, name).inc(delta)

    def _run(self):
        while True:
            with self._wake:
                while not self._waiting and not self._admitted and not self._closing:
                    self._wake.wait()
                if self._closing and not self._waiting and not self._admitted:
                    self._stopped = True
                    return
                self._admit()
            try:
                self._prefill_some()
                self._step_all()
            except Exception as e:  # a fault of the functions: every request in a slot gets it, the engine goes on
                log.exception("decode engine step failed")
                for slot in list(self._admitted):
                    self._free(slot, None, e)

    def _admit(self):
        """Drops cancelled requests from the queue and the slots; fills free slots from the queue (lock held)."""
        for request in [r for r in self._waiting if r.cancelled]:
            self._waiting.remove(request)
            self._gauge("queue", -1)
            request.finish_reason = "cancelled"
            request._events.put(None)
        for slot in [s for s in self._admitted if s.request.cancelled]:
            self._free(slot, "cancelled")
        while self._waiting and len(self._admitted) < self.max_slots:
            request = self._waiting.popleft()
            self._gauge("queue", -1)
            index = self.slots.index(None)
            self.slots[index] = Slot(request, self.context)
            self.slots[index].index = index
            self._admitted.append(self.slots[index])
            self._gauge("slots", 1)

    def _free(self, slot, finish_reason, error=None):
        self.slots[slot.index] = None
        self._admitted.remove(slot)
        self._gauge("slots", -1)
        slot.request.finish_reason = finish_reason
        slot.request._events.put(error)

    def _prefill_some(self):
        """One prefill call: the oldest slots still prefilling that start at the same position, at most
        `prefill_tokens` tokens in all."""
        pending = [s for s in self._admitted if not s.decoding]
        if not pending:
            return
        group = [s for s in pending if s.filled == pending[0].filled]
        width = next((w for w in self.widths if w >= max(len(s.request.ids) - s.filled for s in group)),
                     self.widths[-1])
        group = group[:max(self.prefill_rows(width))]
        start = min(group[0].filled, self.context - width)  # the last chunk may overlap the one before it
        rows = min(r for r in self.prefill_rows(width) if r >= len(group))
        ids = np.zeros([rows, width], np.int32)
        for i, slot in enumerate(group):
            chunk = slot.request.ids[start:start + width]
            ids[i, :len(chunk)] = chunk
        ids[len(group):] = ids[0]
        slots = np.array([s.index for s in group] + [group[0].index] * (rows - len(group)), np.int32)
        self.caches, self.tokens = self._prefill(self.caches, self.tokens, slots, ids, np.int32(start))
        for slot in group:
            slot.filled = min(len(slot.request.ids), start + width)
            slot.decoding = slot.filled == len(slot.request.ids)

    def _step_all(self):
        """One step call over every slot; each decoding slot's new tokens to its request, their text to those that
        need it now (`_send`), finished ones freed."""
        decoding = [s for s in self._admitted if s.decoding]
        if not decoding:
            return
        positions = np.full([self.max_slots], self.context - 1, np.int32)  # idle slots: a position no prompt uses
        limits = np.zeros([self.max_slots], np.int32)
        options = [np.zeros([self.max_slots], np.float32), np.zeros([self.max_slots], np.int32),
                   np.ones([self.max_slots], np.float32), np.zeros([self.max_slots], np.int32)]
        for slot in decoding:
            request = slot.request
            positions[slot.index], limits[slot.index] = slot.position, slot.limit
            for array, value in zip(options, (request.temperature, request.top_k, request.top_p, request.seed)):
                array[slot.index] = value
        self.caches, self.tokens = self._step(self.caches, self.tokens, positions, limits, *options,
                                              np.int32(self.steps))
        tokens, now = self.tokens.numpy(), time.perf_counter()
        ended = {}
        for slot in decoding:
            end = min(slot.position + self.steps, slot.limit - 1)
            new = tokens[slot.index, slot.position + 1:end + 1].tolist()
            slot.position = end
            if end == slot.limit - 1:
                ended[slot] = "length"
            if self.eot_id in new:
                new, ended[slot] = new[:new.index(self.eot_id)], "stop"
            request = slot.request
            if request.first_token_s is None:
                request.first_token_s = now - request.submitted
                if self.metrics is not None:
                    self.metrics.ttft.observe(request.first_token_s)
            if self.metrics is not None:
                self.metrics.tokens.inc(len(new))
            request.tokens += new
        self._send([s for s in decoding if s in ended or s.request.streamed or s.request.stop], ended)
        for slot, finish in ended.items():
            self._free(slot, finish)

    def _send(self, slots, ended):
        """Detokenizes the requests of `slots` (one call) and sends each the text it may have; a request whose text
        completes one of its stop sequences ends before it ("stop" in `ended`), its tokens cut after the one that
        completed it."""
        if not slots:
            return
        for slot, text in zip(slots, self._detokenize([s.request.tokens for s in slots])):
            stop_end = slot.request._take(text, slot in ended)
            if stop_end is not None:
                ended[slot] = "stop"
                slot.request.tokens = self._tokens_to(slot.request.tokens, stop_end)

    def _tokens_to(self, tokens, end):
        """The shortest start of `tokens` whose text reaches byte `end`; only this step's tokens may be cut."""
        counts = range(max(1, len(tokens) - self.steps), len(tokens))
        if not counts:
            return tokens
        texts = self._detokenize([tokens[:n] for n in counts])
        return tokens[:next((n for n, text in zip(counts, texts) if len(text) >= end), len(tokens))]


def prefill_widths(longest, minimum=16):
    """The prefill widths: powers of two from `minimum` below `longest`, then `longest`."""
    widths = [min(minimum, longest)]
    while widths[-1] < longest:
        widths.append(min(widths[-1] * 2, longest))
    return widths

"""The request checks every front shares: `RequestError` (a request the server will not serve, with its HTTP status
and, through CODES, its gRPC status) and the checks of generation options and conversations, so the same bad value
gets the same answer over REST, gRPC and the OpenAI endpoints."""

import json
import math

import numpy as np

from tfglm.config import GENERATE_OPTIONS
from tfglm.data.chat import ROLES

# gRPC status names of the HTTP statuses a request can end with (metrics use them for both protocols).
CODES = {200: "OK", 400: "INVALID_ARGUMENT", 404: "NOT_FOUND", 405: "UNIMPLEMENTED", 408: "DEADLINE_EXCEEDED",
         413: "RESOURCE_EXHAUSTED", 503: "UNAVAILABLE", 500: "INTERNAL"}


class RequestError(Exception):
    """A request the server will not serve; `status` is the HTTP status (CODES has the gRPC code of each), `headers`
    any HTTP headers the answer needs."""

    def __init__(self, message, status=400, headers=None):
        super().__init__(message)
        self.status, self.headers = status, headers

    def __reduce__(self):  # a served version's process raises them, the server answers them
        return type(self), (str(self), self.status, self.headers)


OPTIONS = {o.name: o for o in GENERATE_OPTIONS}
DTYPES = {int: np.int32, float: np.float32}


def check_generate_options(arrays, context):
    """Rejects the generation options in `arrays` a model cannot honour, naming the option and its range
    (`GENERATE_OPTIONS`)."""
    for name, array in arrays.items():
        if name in OPTIONS:
            _check_option(OPTIONS[name], array.item(), context, name)


def option_array(name, value, context, where=None):
    """The array a signature takes for generation option `name` given as a JSON `value`, once its type and range
    are checked (the same ranges as `check_generate_options`); errors name `where` (default `name`)."""
    option, where = OPTIONS[name], where or name
    if isinstance(value, bool) or not isinstance(value, (int, float) if option.type is float else int):
        raise RequestError(f"{where}: expected {'a number' if option.type is float else 'an integer'}, got "
                           f"{json.dumps(value)[:40]}")
    if option.type is float and abs(value) > float(np.finfo(np.float32).max):
        value = math.inf  # beyond float32 (a JSON integer can be beyond float64 too)
    _check_option(option, value, context, where)
    return np.array(value, dtype=DTYPES[option.type])


def _check_option(option, value, context, where):
    problem = option.check(value, context)
    if problem:
        raise RequestError(f"{where}: {problem}")


def check_conversations(roles, contents):
    """Rejects conversations the chat template cannot encode, naming the role, rather than leaving it to the
    graph's assertion."""
    if roles.shape != contents.shape:
        raise RequestError(f"roles and contents: one role a message, got shapes {list(roles.shape)} and "
                           f"{list(contents.shape)}")
    unknown = sorted(set(roles.flat) - {r.encode() for r in ROLES + ("",)})
    if unknown:
        raise RequestError(f"roles: unknown role {unknown[0].decode('utf-8', errors='replace')!r} (expected "
                           f"{', '.join(ROLES)}, or '' for no message)")
    empty = [i for i, row in enumerate(roles.reshape(len(roles), -1)) if not any(row)]
    if empty:
        raise RequestError(f"roles: conversation {empty[0]} has no message (every role is '')")


def check_token_ids(token_ids, lengths, vocab_size):
    """Rejects `detokenize` inputs that do not give one length in [0, its row's length] to each row of `token_ids`,
    or whose ids (those within the lengths) are not in the vocabulary of `vocab_size` ids (None: not checked)."""
    if lengths.shape[0] != token_ids.shape[0]:
        raise RequestError(f"lengths: one a row of token_ids, got {lengths.shape[0]} for {token_ids.shape[0]} rows")
    bad = np.flatnonzero((lengths < 0) | (lengths > token_ids.shape[1]))
    if bad.size:
        raise RequestError(f"lengths[{bad[0]}]: must be in [0, {token_ids.shape[1]}] (the length of the rows of "
                           f"token_ids), got {lengths[bad[0]]}")
    used = token_ids[np.arange(token_ids.shape[1]) < lengths[:, None]]
    bad = used[(used < 0) | (used >= vocab_size)] if vocab_size is not None else used[:0]
    if bad.size:
        raise RequestError(f"token_ids: {bad[0]} is not a token id (the vocabulary has {vocab_size}: 0 to "
                           f"{vocab_size - 1})")

"""The request checks every front shares: `RequestError` (a request the server will not serve, with its HTTP status
and, through CODES, its gRPC status) and the checks of generation options and conversations, so the same bad value
gets the same answer over REST, gRPC and the OpenAI endpoints."""

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


def check_generate_options(arrays, context):
    """Rejects the generation options in `arrays` a model cannot honour, naming the option and its range
    (`GENERATE_OPTIONS`)."""
    for option in GENERATE_OPTIONS:
        problem = option.check(arrays[option.name].item(), context) if option.name in arrays else None
        if problem:
            raise RequestError(f"{option.name}: {problem}")


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

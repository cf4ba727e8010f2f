"""The one error type for a user's mistake: the CLI prints it as a single line, never a traceback."""


class TfglmError(Exception):
    """Bad input from the user: a path, a config value, a corpus, a prompt. The message names where."""

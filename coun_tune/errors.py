"""The one error type that means "the user's input is wrong": the CLI prints it on one line
and exits with code 2, before anything is written or logged."""


class UsageError(ValueError):
    """Bad user input (spec, flag, forget list, path, corrupted file)."""

"""Errors shared across layers. UsageError means "the user's input is wrong": the CLI prints it
on one line and exits with code 2, before anything is written or logged. DivergedError ends a
trial as failed (the search goes on)."""


class UsageError(ValueError):
    """Bad user input (spec, flag, forget list, path, corrupted file)."""


class DivergedError(RuntimeError):
    """The loss became NaN or infinite: the trial ends as failed with this reason. Lives here
    (not in the engine) so that methods and the engine can both raise it without importing
    each other; `coun_tune.core.engine.DivergedError` is the same class."""

"""Errors of the loader layer: one type per kind of failure, each naming the problem."""


class FormatError(ValueError):
    """A model file or directory is malformed, truncated, of an unknown version or architecture."""


class FetchError(RuntimeError):
    """A default model could not be fetched (offline, pip missing, wheel without the expected file)."""

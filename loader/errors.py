"""The error types of anybit: one root, `AnybitError`, and one type per layer and kind of failure.

Every error a user can cause (a bad file, a bad argument, a full disk) is an `AnybitError`, so callers
and the CLIs can tell "anybit refused this, with a message naming the file and field" from a bug. The
loader's types live here because the loader is the lowest layer (runtime and engine import it); the
runtime's (CudaError, NoGpuError, OutOfMemoryError, CpuKernelError) derive from the same root. Each
type also derives from the builtin it refines, so existing `except ValueError` / `except OSError`
code keeps catching them.
"""


class AnybitError(Exception):
    """Root of every error anybit raises on purpose."""


class FormatError(AnybitError, ValueError):
    """A model file or directory is malformed, truncated, of an unknown version or architecture."""


class FetchError(AnybitError, RuntimeError):
    """A default model could not be fetched (offline, pip missing, wheel without the expected file)."""


class UsageError(AnybitError, ValueError):
    """A bad argument or option value (a CLI exits 2 with its message)."""


class StorageError(AnybitError, OSError):
    """Writing a result failed (disk full, no permission) or would destroy something not asked for;
    nothing was left half-written."""

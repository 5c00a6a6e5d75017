"""What every anybit CLI shares: argument checks, output files written whole, and how it ends.

- `checked_argv`: arguments the OS handed over in an encoding other than UTF-8 (Python keeps such bytes
  as lone surrogates) are refused with the argument and byte named, instead of failing deep inside the
  tokenizer with a UnicodeEncodeError.
- `check_ranges`: bounds on numeric options after parsing (finite floats, counts >= 0, ...), reported
  by argparse (usage line, exit 2), so NaN temperatures or negative token counts never reach the model.
- `run`: the `__main__` wrapper. A closed pipe (`| head -c 1`) ends quietly; SIGTERM unwinds like an
  interrupt, so temporaries are removed (`finally` blocks run); running out of memory is one line.
- `check_output_file` / `write_file_atomic`: an output path is checked before any work, and written to
  a temporary sibling renamed into place, so a full disk never leaves a partial file behind.
"""
from __future__ import annotations

import argparse
import errno
import math
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Callable

from loader.errors import AnybitError, StorageError, UsageError

EXIT_USAGE, EXIT_FAIL, EXIT_INTERRUPTED, EXIT_PIPE, EXIT_TERM = 2, 1, 130, 141, 143


def checked_argv(argv: list[str] | None) -> list[str]:
    """argv (sys.argv[1:] when None), each argument required to be valid UTF-8 text."""
    args = list(sys.argv[1:] if argv is None else argv)
    for i, a in enumerate(args, 1):
        try:
            a.encode("utf-8")
        except UnicodeEncodeError as e:
            bad = ord(a[e.start])
            byte = f"0x{bad - 0xDC00:02x}" if 0xDC80 <= bad <= 0xDCFF else f"U+{bad:04X}"
            raise UsageError(f"argument {i} is not valid UTF-8 (byte {byte} at character {e.start + 1}); "
                             f"pass text in UTF-8, or read it from a file with '-'") from None
    return args


# python -m engine.generate: every numeric option's range
GENERATE_BOUNDS = {"max_tokens": (0, 1 << 24), "temperature": (0.0, 1e4), "top_k": (0, 1 << 24),
                   "top_p": (0.0, 1.0, True), "repeat_penalty": (0.0, 1e4, True), "seed": (0, (1 << 63) - 1),
                   "threads": (1, 4096), "context": (1, 1 << 24)}
EMBED_BOUNDS = {"batch": (1, 1 << 20), "threads": (1, 4096)}


def check_ranges(p: argparse.ArgumentParser, args, bounds: dict[str, tuple]) -> None:
    """bounds: {dest: (lo, hi)} inclusive, or (lo, hi, True) for an exclusive lower bound; None: open.
    Floats must be finite. Violations go through p.error (usage line, exit 2)."""
    for dest, b in bounds.items():
        v = getattr(args, dest, None)
        if v is None or isinstance(v, str):
            continue
        lo, hi = b[0], b[1]
        lo_open = len(b) > 2 and b[2]
        flag = "--" + dest.replace("_", "-")
        if isinstance(v, float) and not math.isfinite(v):
            p.error(f"argument {flag}: must be a finite number, got {v}")
        if lo is not None and (v <= lo if lo_open else v < lo):
            p.error(f"argument {flag}: must be {'>' if lo_open else '>='} {lo}, got {v}")
        if hi is not None and v > hi:
            p.error(f"argument {flag}: must be <= {hi}, got {v}")


def check_output_file(path: str, suffix: str | None = None) -> Path:
    """Check an output file's path before the work: its folder exists and is writable, and the path is
    not a directory. Replacing an existing file is what naming it asks for."""
    out = Path(path)
    if suffix and out.suffix != suffix:
        raise UsageError(f"output {path!r} must end in {suffix}")
    if out.is_dir():
        raise UsageError(f"output {path!r} is a directory")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"output {path!r}: folder {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"output {path!r}: folder {str(parent)!r} is not writable")
    return out


def write_file_atomic(path: Path, write: Callable[[object], None]) -> None:
    """write(f) into a temporary file beside `path`, then rename it over `path`; on any failure the
    temporary is removed and `path` is left as it was."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent if str(path.parent) else ".")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            from loader.safe_write import storage_error
            raise storage_error(e, path) from None
        raise


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that cleanup (finally, except BaseException) runs."""


def _on_term(signum, frame):
    raise Terminated()


def _quiet_stdout() -> None:
    """After a broken pipe: point stdout at /dev/null so the interpreter's final flush stays silent."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


def is_out_of_memory(e: BaseException) -> bool:
    """MemoryError, ENOMEM from mmap and friends, or a lazily imported extension whose segments could
    not be mapped (what a low `ulimit -v` gives when the tokenizer library is first imported)."""
    if isinstance(e, MemoryError) or (isinstance(e, OSError) and e.errno == errno.ENOMEM):
        return True
    text = str(e)
    return isinstance(e, ImportError) and ("failed to map segment" in text or "Cannot allocate memory" in text)


def report(e: BaseException) -> int:
    """Print one line for an error and return the exit status: 2 for bad input (a usage or format
    error), 1 for a failure (disk full, out of memory, a device error); a closed stdout pipe (`| head`)
    ends quietly with 141, as a shell tool killed by SIGPIPE would."""
    if isinstance(e, BrokenPipeError):
        _quiet_stdout()
        return EXIT_PIPE
    if is_out_of_memory(e) and not isinstance(e, AnybitError):
        print("error: out of memory (raise the memory limit, or use a smaller model or context)", file=sys.stderr)
        return EXIT_FAIL
    print(f"error: {e}", file=sys.stderr)
    if isinstance(e, StorageError):
        return EXIT_FAIL
    if isinstance(e, (UsageError, ValueError)) or (isinstance(e, OSError) and not isinstance(e, AnybitError)
                                                   and e.errno in (errno.ENOENT, errno.ENOTDIR, errno.EISDIR)):
        return EXIT_USAGE
    return EXIT_FAIL


def run(main: Callable[[list[str]], int], argv: list[str] | None = None) -> int:
    """Run a CLI's main(argv) with the endings every anybit CLI shares; returns the exit status."""
    try:
        old = signal.signal(signal.SIGTERM, _on_term)
    except ValueError:                  # not the main thread
        old = None
    try:
        return main(checked_argv(argv))
    except BrokenPipeError:
        _quiet_stdout()
        return EXIT_PIPE
    except Terminated:
        print("terminated: nothing partial was left behind", file=sys.stderr)
        return EXIT_TERM
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (AnybitError, MemoryError, OSError) as e:
        return report(e)
    except ImportError as e:
        if is_out_of_memory(e):
            return report(e)
        raise
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)

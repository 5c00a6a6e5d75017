"""Writes that never destroy: where a directory may be written, temporaries that name their writer.

A result is written into a temporary sibling directory, `.NAME.tmp-PID-XXXXXX`, and renamed into place.
The writer's process id in the name lets the next writer clean what a killed one (SIGKILL, a power cut)
left behind, without touching the temporaries of writers still running. What is replaced must be what
the caller said may be replaced (`replaceable`): by default only a missing path, an empty directory, or a
directory of the same kind (an anybit packed directory, a cache entry); anything else needs `force`.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

from loader.errors import StorageError, UsageError

_OURS = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)-")
# temporaries of anybit before they carried a pid: ".NAME." + 8 characters of tempfile.mkdtemp
_LEGACY = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}$")
_LEGACY_FILES = {"model.safetensors", "tokenizer.json", "config.json"}
LEGACY_AGE_S = 3600


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:         # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def stale_temporaries(parent: Path, name: str | None = None, files: set[str] | None = None) -> list[Path]:
    """Temporary directories in `parent` left by anybit writers that are no longer running: those of
    output `name` only when given (a folder the user chose may hold other programs' files), and only
    those holding nothing but `files` when given."""
    out = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return out
    now = time.time()
    for e in entries:
        if not e.is_dir() or e.is_symlink():
            continue
        m = _OURS.match(e.name) or _LEGACY.match(e.name)
        if not m or (name is not None and m.group("name") != name):
            continue
        if files is not None:
            try:
                if not {f.name for f in e.iterdir()} <= files:
                    continue
            except OSError:
                continue
        if "pid" in m.groupdict():
            if not pid_alive(int(m.group("pid"))):
                out.append(e)
        else:
            try:
                names = {f.name for f in e.iterdir()}
                old = now - e.stat().st_mtime > LEGACY_AGE_S
            except OSError:
                continue
            if old and names <= _LEGACY_FILES:
                out.append(e)
    return out


def clean_stale(parent: Path, name: str | None = None, files: set[str] | None = None) -> list[Path]:
    """Remove stale temporaries in `parent` (see stale_temporaries); returns what was removed."""
    gone = []
    for d in stale_temporaries(parent, name, files):
        shutil.rmtree(d, ignore_errors=True)
        if not d.exists():
            gone.append(d)
    return gone


def make_temp(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))


def _inside(a: Path, b: Path) -> bool:
    """a is b or lies under b (both resolved)."""
    return a == b or b in a.parents


def check_destination(out, *, same_kind: Callable[[Path], bool], kind: str, force: bool = False,
                      source=None) -> Path:
    """Refuse to write `out` where that would destroy something the user did not ask to replace:
    a file, or a non-empty directory that is not `same_kind`, unless `force`; never the source
    itself or a directory holding it (even with force: the source is still being read). Also refuses
    an output inside the source directory unless `force`. Returns out as a Path."""
    out = Path(out)
    target = out.resolve()
    if source is not None:
        src = Path(source).resolve()
        if _inside(src, target):
            raise UsageError(f"output {str(out)!r} is {'the source' if src == target else 'a directory holding the source'} "
                             f"{str(source)!r}; writing it would destroy the source: choose another output")
        if src.is_dir() and _inside(target, src) and not force:
            raise UsageError(f"output {str(out)!r} lies inside the source directory {str(source)!r}; "
                             f"choose another output, or pass --force")
    if force or not os.path.lexists(out):
        return out
    if out.is_symlink() or not out.is_dir():
        raise UsageError(f"output {str(out)!r} exists and is not a directory; refusing to replace it "
                         f"(remove it, or pass --force)")
    try:
        empty = not any(out.iterdir())
    except OSError as e:
        raise StorageError(f"cannot read output directory {str(out)!r}: {e.strerror or e}") from None
    if not empty and not same_kind(out):
        raise UsageError(f"output {str(out)!r} is a non-empty directory that is not {kind}; refusing to "
                         f"replace it (choose another output, or pass --force)")
    return out


def replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished `tmp` to `out`, replacing what is there; a failure leaves the old `out`."""
    if os.path.lexists(out):
        old = out.with_name(f".{out.name}.old-{os.getpid()}-{os.urandom(3).hex()}")
        os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            os.replace(old, out)
            raise
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    else:
        os.replace(tmp, out)


def storage_error(e: BaseException, what) -> StorageError:
    """A failed write as one line: disk full and no permission named as such."""
    code = getattr(e, "errno", None)
    text = str(e)
    if code == errno.ENOSPC or "StorageFull" in text or "No space left" in text:
        reason = "the disk is full"
    elif code in (errno.EACCES, errno.EPERM) or "PermissionDenied" in text:
        reason = "permission denied"
    elif code == errno.ENOMEM:
        reason = "out of memory"
    elif code == errno.EDQUOT:
        reason = "disk quota exceeded"
    else:
        reason = getattr(e, "strerror", None) or text or type(e).__name__
    return StorageError(f"cannot write {what}: {reason}; nothing was written")

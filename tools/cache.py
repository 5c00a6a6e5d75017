"""`python -m tools.cache [list | size | clean [--all | KEY ...]]`: the model cache ($ANYBIT_CACHE, else
~/.cache/anybit), which grows by one packed copy per model and recipe.

    list          every entry: its key, kind, size and what it is
    size          the total, and per kind
    clean         what is safe to drop: temporaries of writers no longer running, packed copies this
                  anybit cannot read (an older format, damaged), CPU kernel builds of other sources
    clean KEY     one entry (a key as `list` shows it; a packed copy also by its bare name)
    clean --all   every packed copy, fetched default model and kernel build (all are rebuilt on demand)

Only what anybit writes is touched: other folders in the cache (a benchmark's environment) are listed
as "other" and never removed. An entry is renamed aside before it is deleted, so a half-deleted copy
never looks valid to a reader.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from loader.fetch import MARKER
from loader.packed import is_packed_dir, read_config
from loader.safe_write import LEGACY_AGE_S, pid_alive, stale_temporaries
from runtime.errors import human_bytes

KINDS = ("packed", "model", "build", "temp", "other")


@dataclass
class Entry:
    key: str
    kind: str
    path: Path
    size: int
    detail: str
    stale: bool = False         # removed by a plain `clean`


def cache_root() -> Path:
    env = os.environ.get("ANYBIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "anybit"


def tree_size(p: Path) -> int:
    if p.is_symlink() or p.is_file():
        return p.lstat().st_size
    total = 0
    for dirpath, _dirs, files in os.walk(p):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


def _packed_entry(p: Path) -> Entry:
    key = f"packed/{p.name}"
    try:
        cfg = read_config(p)
        bits = sorted({m.get("bits") for m in (cfg.get("tensors") or {}).values()})
        return Entry(key, "packed", p, tree_size(p),
                     f"{cfg['model'].get('arch')}, format {cfg['version']}, bits {bits or [16]}")
    except Exception as e:          # unreadable: shown, and removed by a plain clean
        return Entry(key, "packed", p, tree_size(p), f"unreadable by this anybit ({str(e)[:80]})", stale=True)


def _current_build() -> str | None:
    try:
        from runtime.cpu.build import build_key
        return build_key()
    except Exception:
        return None


def entries(root: Path | None = None) -> list[Entry]:
    root = root or cache_root()
    if not root.is_dir():
        return []
    out: list[Entry] = []
    for d in (root, root / "packed"):
        for t in stale_temporaries(d) if d.is_dir() else []:
            out.append(Entry(str(t.relative_to(root)), "temp", t, tree_size(t), "left by a writer that died", True))
    temps = {e.path for e in out}
    for p in sorted(root.iterdir()):
        if p in temps:
            continue
        if p.name.startswith(".tmp-"):          # loader/fetch.py's working folders (no pid in the name)
            old = time.time() - p.stat().st_mtime > LEGACY_AGE_S
            out.append(Entry(p.name, "temp", p, tree_size(p),
                             "a fetch's working folder" + ("" if old else " (recent: may be running)"), old))
        elif p.name == "packed" and p.is_dir():
            for q in sorted(p.iterdir()):
                if q in temps:
                    continue
                if q.name.startswith("."):
                    out.append(Entry(f"packed/{q.name}", "temp", q, tree_size(q),
                                     "a writer's temporary" + (" (running)" if _running(q.name) else ""),
                                     not _running(q.name)))
                elif q.is_dir() and is_packed_dir(q):
                    out.append(_packed_entry(q))
                elif q.is_dir():
                    out.append(Entry(f"packed/{q.name}", "packed", q, tree_size(q), "not a packed directory", True))
        elif p.name == "cpu" and p.is_dir():
            current = _current_build()
            for q in sorted(p.iterdir()):
                old = current is not None and q.name != current
                out.append(Entry(f"cpu/{q.name[:16]}", "build", q, tree_size(q),
                                 "C kernels, " + ("built from other sources" if old else "current"), old))
        elif p.is_dir() and (p / MARKER).is_file():
            out.append(Entry(p.name, "model", p, tree_size(p), "fetched default model"))
        else:
            out.append(Entry(p.name, "other", p, tree_size(p), "not anybit's; never removed"))
    return out


def _running(name: str) -> bool:
    import re
    m = re.search(r"\.(?:tmp|old)-(\d+)-", name)
    return bool(m) and pid_alive(int(m.group(1)))


def remove(e: Entry) -> None:
    """Rename aside, then delete: a reader never sees a half-deleted entry under its name."""
    aside = e.path.with_name(f".{e.path.name}.old-{os.getpid()}-rm")
    try:
        os.replace(e.path, aside)
    except OSError:
        aside = e.path
    if aside.is_dir() and not aside.is_symlink():
        shutil.rmtree(aside, ignore_errors=True)
    else:
        aside.unlink(missing_ok=True)


def _find(key: str, all_entries: list[Entry]) -> Entry | None:
    for e in all_entries:
        if key in (e.key, e.path.name) or (e.kind == "build" and key.startswith("cpu/")
                                            and e.path.name.startswith(key[4:]) and len(key) > 4):
            return e
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.cache", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd")
    sub.add_parser("list", help="every entry with its size")
    sub.add_parser("size", help="total size, per kind")
    c = sub.add_parser("clean", help="remove stale entries, one KEY, or --all")
    c.add_argument("keys", nargs="*", metavar="KEY")
    c.add_argument("--all", action="store_true", help="every packed copy, fetched model and kernel build")
    c.add_argument("--dry-run", action="store_true", help="say what would be removed")
    args = p.parse_args(argv)
    root = cache_root()
    found = entries(root)
    cmd = args.cmd or "list"
    if cmd == "list":
        print(f"cache {root}: {len(found)} entries, {human_bytes(sum(e.size for e in found))}")
        for e in found:
            print(f"  {e.key:<60} {e.kind:<7} {human_bytes(e.size):>11}  {e.detail}")
        return 0
    if cmd == "size":
        print(f"{human_bytes(sum(e.size for e in found))} in {root}")
        for k in KINDS:
            n = [e for e in found if e.kind == k]
            if n:
                print(f"  {k:<7} {len(n):>4} entries {human_bytes(sum(e.size for e in n)):>11}")
        return 0
    if args.all and args.keys:
        p.error("give KEYs or --all, not both")
    if args.all:
        todo = [e for e in found if e.kind in ("packed", "model", "build") or (e.kind == "temp" and e.stale)]
    elif args.keys:
        todo = []
        for k in args.keys:
            e = _find(k, found)
            if e is None:
                print(f"error: no cache entry {k!r} (see `python -m tools.cache list`)", file=sys.stderr)
                return 2
            if e.kind == "other" or (e.kind == "temp" and not e.stale):
                print(f"error: {e.key} is {'not anybit' + chr(39) + 's' if e.kind == 'other' else 'in use by a running writer'}; "
                      f"not removed", file=sys.stderr)
                return 2
            todo.append(e)
    else:
        todo = [e for e in found if e.stale]
    freed = sum(e.size for e in todo)
    for e in todo:
        print(f"{'would remove' if args.dry_run else 'removed'} {e.key} ({human_bytes(e.size)})")
        if not args.dry_run:
            remove(e)
    print(f"{'would free' if args.dry_run else 'freed'} {human_bytes(freed)} in {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


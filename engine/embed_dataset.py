"""Batch embedding of a large corpus on Ray Data: resumable, every input row exactly once in the output.

    python -m engine.embed_dataset INPUT OUTPUT [--column text] [--replicas N] [--shard-rows 1000]

INPUT is a text file (one text per line), a JSONL file or a Parquet file/directory (then `--column` names
the text column). OUTPUT is a directory of Parquet shards `part-00000.parquet`, ... with the columns
`row` (the input row number), `text` and `embedding` (float32 list, L2-normalised like engine.embed).

How the work is cut, and why it can be resumed: Ray Data reads the input in order; rows are numbered and
cut into shards of --shard-rows consecutive rows. A pool of --replicas embedder actors (`map_batches`
with one shard per batch) embeds each shard and writes its Parquet file atomically (a temporary name,
then a rename), so a shard file either exists whole or not at all. A rerun after a kill embeds only the
shards whose files are missing. OUTPUT/_manifest.json fixes the input (path, size, mtime), the column, the
shard size and the model recipe: a rerun that differs in any of them is refused instead of mixing two
corpora (use a new OUTPUT, or --overwrite to start again). When every shard is there, `_SUCCESS` is
written with the row count.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

MANIFEST = "_manifest.json"
SUCCESS = "_SUCCESS"


def shard_name(i: int) -> str:
    return f"part-{i:05d}.parquet"


def input_fingerprint(path: Path) -> dict:
    st = path.stat()
    if path.is_dir():       # a Parquet dataset directory: its files' sizes and times
        files = sorted(p for p in path.rglob("*.parquet") if p.is_file())
        return {"path": str(path.resolve()), "files": [[str(p.relative_to(path)), p.stat().st_size,
                                                        p.stat().st_mtime_ns] for p in files]}
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def input_kind(path: Path) -> str:
    if path.is_dir() or path.suffix.lower() == ".parquet":
        return "parquet"
    if path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    return "text"


def read_texts(path: Path, column: str) -> list[str]:
    """The input's texts in input order, read with Ray Data."""
    import ray.data
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True      # row numbers must mean the input's order
    kind = input_kind(path)
    if kind == "text":
        ds = ray.data.read_text(str(path), drop_empty_lines=False)
        col = "text"
    elif kind == "jsonl":
        ds = ray.data.read_json(str(path), lines=True)
        col = column
    else:
        ds = ray.data.read_parquet(str(path), columns=[column])
        col = column
    texts = []
    for i, row in enumerate(ds.iter_rows()):
        if col not in row:
            raise ValueError(f"{path}: row {i} has no column {col!r} (columns: {sorted(row)})")
        t = row[col]
        if not isinstance(t, str):
            raise ValueError(f"{path}: row {i}, column {col!r} is {type(t).__name__}, not text")
        texts.append(t)
    return texts


class ShardEmbedder:
    """A Ray Data actor: one embedder per actor, loaded once; each batch is whole shards."""

    def __init__(self, out_dir: str, model, wbits: int, abits: int, threads: int):
        from engine.embed import load_embedder
        self.out = Path(out_dir)
        self.emb = load_embedder(model, wbits=wbits, abits=abits, device="cpu", threads=threads)

    def __call__(self, batch: dict) -> dict:
        import numpy as np
        import pyarrow as pa
        import pyarrow.parquet as pq
        done = []
        for shard, start, texts in zip(batch["shard"], batch["start"], batch["texts"]):
            texts = [str(t) for t in texts]
            vec = self.emb.embed(texts).astype(np.float32)
            rows = np.arange(int(start), int(start) + len(texts), dtype=np.int64)
            emb = pa.FixedSizeListArray.from_arrays(pa.array(vec.reshape(-1), pa.float32()), vec.shape[1])
            table = pa.table({"row": rows, "text": pa.array(texts, pa.string()), "embedding": emb})
            final = self.out / shard_name(int(shard))
            tmp = self.out / f".{final.name}.tmp-{os.getpid()}"
            pq.write_table(table, tmp)
            os.replace(tmp, final)          # a shard file is whole or absent
            done.append(int(shard))
        return {"shard": np.array(done, dtype=np.int64)}


def plan(out: Path, manifest: dict, overwrite: bool) -> None:
    """Create OUTPUT or check that it belongs to this same job; remove temporaries of killed runs."""
    mpath = out / MANIFEST
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not mpath.exists():
            raise ValueError(f"{out}: not empty and not an embed_dataset output; choose another OUTPUT")
        try:
            old = json.loads(mpath.read_text())
        except ValueError as e:
            raise ValueError(f"{mpath}: unreadable manifest ({e})") from None
        if old != manifest:
            if not overwrite:
                diff = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
                raise ValueError(f"{out}: made from another input or recipe (differs in {', '.join(diff)}); "
                                 "use another OUTPUT or --overwrite")
            for p in out.iterdir():
                if p.name.startswith(("part-", ".part-")) or p.name in (SUCCESS, MANIFEST):
                    p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    for p in out.glob(".part-*.tmp-*"):
        p.unlink()
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, mpath)


def run(input_path, output, *, column: str = "text", replicas: int = 2, shard_rows: int = 1000,
        model=None, wbits: int = 16, abits: int = 16, threads: int = 1, overwrite: bool = False,
        log=sys.stderr) -> dict:
    """Embed INPUT into OUTPUT (see the module doc); returns counts and timings."""
    import ray
    import ray.data

    src, out = Path(input_path), Path(output)
    if not src.exists():
        raise ValueError(f"{src}: no such file or directory")
    if replicas < 1 or shard_rows < 1 or threads < 1:
        raise ValueError("replicas, shard rows and threads must be at least 1")
    manifest = {"input": input_fingerprint(src), "column": column, "shard_rows": shard_rows,
                "model": None if model is None else str(Path(model).resolve()), "wbits": wbits, "abits": abits}
    plan(out, manifest, overwrite)
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):      # join a running cluster
            ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
        else:                                  # a local one-node cluster, room for every actor's threads
            ray.init(num_cpus=max(os.cpu_count() or 1, replicas * threads), include_dashboard=False,
                     log_to_driver=False)
    t0 = time.perf_counter()
    texts = read_texts(src, column)
    n_shards = (len(texts) + shard_rows - 1) // shard_rows
    todo = [i for i in range(n_shards) if not (out / shard_name(i)).exists()]
    print(f"anybit: {len(texts)} rows in {n_shards} shards; {n_shards - len(todo)} already done, "
          f"{len(todo)} to embed with {replicas} actor(s)", file=log, flush=True)
    t1 = time.perf_counter()
    if todo:
        items = [{"shard": i, "start": i * shard_rows, "texts": texts[i * shard_rows:(i + 1) * shard_rows]}
                 for i in todo]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ds = ds.map_batches(ShardEmbedder, batch_size=1, concurrency=replicas, num_cpus=threads,
                            fn_constructor_kwargs={"out_dir": str(out), "model": model, "wbits": wbits,
                                                   "abits": abits, "threads": threads})
        finished = 0
        for b in ds.iter_batches(batch_size=1):
            finished += len(b["shard"])
            print(f"anybit: shard {finished}/{len(todo)} written ({time.perf_counter() - t1:.1f} s)",
                  file=log, flush=True)
    missing = [i for i in range(n_shards) if not (out / shard_name(i)).exists()]
    if missing:
        raise RuntimeError(f"{out}: shards {missing[:5]} were not written; run again to finish them")
    (out / SUCCESS).write_text(json.dumps({"rows": len(texts), "shards": n_shards}) + "\n")
    embed_s = time.perf_counter() - t1
    n_new = sum(min(shard_rows, len(texts) - i * shard_rows) for i in todo)
    return {"rows": len(texts), "shards": n_shards, "embedded_rows": n_new, "read_s": t1 - t0,
            "embed_s": embed_s, "rows_per_s": n_new / embed_s if embed_s > 0 and n_new else 0.0}


def read_output(output) -> "tuple":
    """(rows int64, texts list, embeddings float32 (n, dim)) of a finished OUTPUT, in row order."""
    import numpy as np
    import pyarrow.parquet as pq
    out = Path(output)
    parts = sorted(out.glob("part-*.parquet"))
    tables = [pq.read_table(p) for p in parts]
    rows = np.concatenate([t.column("row").to_numpy() for t in tables]) if tables else np.zeros(0, np.int64)
    texts = [s for t in tables for s in t.column("text").to_pylist()]
    embs = [np.asarray(t.column("embedding").combine_chunks().flatten().to_numpy(), np.float32)
            .reshape(t.num_rows, -1) for t in tables]
    emb = np.concatenate(embs) if embs else np.zeros((0, 0), np.float32)
    order = np.argsort(rows, kind="stable")
    return rows[order], [texts[i] for i in order], emb[order]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine.embed_dataset",
                                description="Embed a corpus with a pool of Ray actors into Parquet shards.")
    p.add_argument("input", help="text file (a line each), JSONL, or Parquet file/directory")
    p.add_argument("output", help="output directory of Parquet shards (resumable)")
    p.add_argument("--column", default="text", help="the text column of JSONL/Parquet input (default text)")
    p.add_argument("--replicas", type=int, default=2, help="embedder actors (default 2)")
    p.add_argument("--threads", type=int, default=1, help="threads per actor (default 1)")
    p.add_argument("--shard-rows", type=int, default=1000, help="rows per output shard (default 1000)")
    p.add_argument("--model", default=None, help="BERT model (HF or packed dir; default all-MiniLM-L6-v2)")
    p.add_argument("--wbits", type=int, default=16)
    p.add_argument("--abits", type=int, default=16)
    p.add_argument("--overwrite", action="store_true", help="start again in an OUTPUT made by another job")
    args = p.parse_args(argv)
    try:
        import ray  # noqa: F401
        import pyarrow  # noqa: F401
    except ImportError as e:
        print(f"error: batch embedding needs the ray extra (pip install 'anybit[ray]'): {e}", file=sys.stderr)
        return 2
    from loader.errors import FetchError, FormatError
    try:
        r = run(args.input, args.output, column=args.column, replicas=args.replicas, shard_rows=args.shard_rows,
                model=args.model, wbits=args.wbits, abits=args.abits, threads=args.threads,
                overwrite=args.overwrite)
    except (ValueError, FormatError, FetchError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())

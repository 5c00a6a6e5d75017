"""Sentence embeddings: `load_embedder(...)` (Python API) and `python -m engine.embed` (CLI).

    python -m engine.embed "first text" "second text" [--similarity] [--out FILE.npy]
    python -m engine.embed - < lines.txt                # one text per input line

Policies for odd inputs (also in the CLI's --help):
- an empty or whitespace-only text is embedded: it tokenizes to [CLS] [SEP], whose embedding is a
  fixed, valid vector. Refusing it would make one blank line fail a whole file.
- texts longer than the model's maximum (256 tokens for all-MiniLM-L6-v2) are truncated, keeping the
  final [SEP], with one warning on stderr per embedder.
- the CLI rejects an empty list of texts and stdin that is not UTF-8 (naming the line), exit status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from engine.encoder import Encoder
from loader.bipolar import PackedLinear
from loader.errors import FetchError, FormatError
from loader.tokenizer import Tokenizer
from runtime.select import select_backend


class Embedder:
    """Texts -> float32 embeddings (len(texts), dim) with a packed BERT model on one backend."""

    def __init__(self, model, backend, *, abits: int = 16, agroup=None, batch_size: int = 32,
                 own_backend: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {batch_size}")
        self.model = model
        self.backend = backend
        self.encoder = Encoder(model.config, model.tensors, backend, abits=abits, agroup=agroup)
        # the backend holds its own tiles of the linears now: give back their mapped file pages
        if hasattr(model, "release_pages"):
            model.release_pages([n for n, t in model.tensors.items() if isinstance(t, PackedLinear)])
        self.tokenizer = Tokenizer.from_json(model.tokenizer_json)
        self.batch_size = int(batch_size)
        self.max_len = self.encoder.max_len
        self.dim = self.encoder.dim
        self.abits = abits
        self.wbits = _wbits_of(model.tensors)
        self._own_backend = own_backend
        self._warned = False
        self.truncated = 0          # how many texts were cut so far (all calls)

    @property
    def device(self) -> str:
        return getattr(self.backend, "name", "?")

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """[CLS] ... [SEP] ids per text, truncated to the model's maximum length (with one warning)."""
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise ValueError(f"text {i} is a {type(t).__name__}, not a str")
        # one id more than allowed tells which texts were really cut; HF truncation keeps [SEP] last
        seqs = self.tokenizer.encode_for_encoder(texts, self.max_len + 1)
        cut = [i for i, s in enumerate(seqs) if len(s) > self.max_len]
        for i in cut:
            seqs[i] = seqs[i][:self.max_len - 1] + seqs[i][-1:]
        if cut:
            self.truncated += len(cut)
            if not self._warned:
                self._warned = True
                print(f"warning: {len(cut)} text(s) longer than {self.max_len} tokens truncated "
                      f"(first: text {cut[0] + 1})", file=sys.stderr)
        return seqs

    def embed(self, texts, batch_size: int | None = None) -> np.ndarray:
        """float32 (len(texts), dim); L2-normalised when the model prescribes it."""
        if isinstance(texts, str):
            raise ValueError("embed() takes a list of texts, not a single str (wrap it in a list)")
        texts = list(texts)
        bs = self.batch_size if batch_size is None else int(batch_size)
        if bs < 1:
            raise ValueError(f"batch size must be at least 1, got {bs}")
        seqs = self.tokenize(texts)
        out = np.zeros((len(seqs), self.dim), np.float32)
        # longest first, so that each batch holds sequences of similar length (the attention loop and
        # any padded backend do the least wasted work); results go back to the input order
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
        for b in range(0, len(order), bs):
            idx = order[b:b + bs]
            out[idx] = self.encoder.encode([seqs[i] for i in idx])
        return out

    def close(self) -> None:
        self.encoder.close()
        if self._own_backend and hasattr(self.backend, "close"):
            self.backend.close()
        self._own_backend = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _wbits_of(tensors) -> int:
    from loader.bipolar import PackedLinear
    bits = {t.bits for t in tensors.values() if isinstance(t, PackedLinear)}
    return max(bits) if bits else 16


def default_group(wbits: int) -> int | None:
    """The embedder's weight group when none is given: 32 at 4 bits or fewer, where a small encoder
    loses too much with groups of 128 (all-MiniLM-L6-v2 at W4A16: mean cosine to float 0.951 at G = 128,
    0.974 at G = 32); else None, the packer's default (SPEC.md section 7)."""
    return 32 if wbits <= 4 else None


def load_embedder(path=None, *, wbits: int = 16, abits: int = 16, group: int | None = None, agroup=None,
                  device: str = "auto", threads: int | None = None, batch_size: int = 32,
                  progress: bool = False) -> Embedder:
    """An `Embedder` for a BERT model: HF directory, packed directory, or None for all-MiniLM-L6-v2.

    wbits 1..8 packs the linears (group None -> `default_group(wbits)`); 16 keeps them float.
    abits 1..8 quantizes activations per token and per group of `agroup` lanes (None -> the weight group).
    """
    from engine.model_store import load_packed_model
    # packs once per recipe and caches the packed directory (wbits 16 keeps float weights, not cached)
    if group is None and wbits != 16:
        group = default_group(wbits)
    model, _ = load_packed_model(path, wbits=wbits, abits=abits, group=group, agroup=agroup, kind="embedder",
                                 progress=progress)
    if model.config.arch != "bert":
        raise FormatError(f"{path or 'default model'}: an embedder needs a BERT-family model, this is {model.config.arch!r}")
    backend = select_backend(device, threads)
    try:
        return Embedder(model, backend, abits=abits, agroup=agroup, batch_size=batch_size, own_backend=True)
    except BaseException:
        if hasattr(backend, "close"):
            backend.close()
        raise


# ---- CLI ---------------------------------------------------------------------------------------

class InputError(ValueError):
    """Bad CLI input (no texts, undecodable stdin)."""


def read_stdin_lines(data: bytes) -> list[str]:
    """Lines of stdin as str; every line is kept (a blank line is a text, embedded as [CLS] [SEP])."""
    if not data:
        return []
    lines = data.split(b"\n")
    if lines[-1] == b"":           # the newline that ends the last line does not start another text
        lines.pop()
    out = []
    for n, raw in enumerate(lines, 1):
        try:
            out.append(raw.decode("utf-8").removesuffix("\r"))
        except UnicodeDecodeError as e:
            raise InputError(f"stdin line {n} is not valid UTF-8 (byte 0x{raw[e.start]:02x} at "
                             f"column {e.start + 1}); convert the input to UTF-8") from None
    return out


def _parse_bits(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 1..8 or 16, got {s!r}") from None
    if v != 16 and not 1 <= v <= 8:
        raise argparse.ArgumentTypeError(f"expected 1..8 or 16, got {v}")
    return v


def _parse_agroup(s: str):
    if s == "token":
        return "token"
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a multiple of 32 or 'token', got {s!r}") from None


def _positive(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m engine.embed",
        description="Embed texts with a BERT-family model (default all-MiniLM-L6-v2). Prints one JSON line "
                    'per input, {"text": ..., "embedding": [...]}.',
        epilog="With no TEXT, or with '-', texts are read from stdin, one per line (must be UTF-8). An empty "
               "or whitespace-only text is embedded (as [CLS] [SEP]). Texts over the model's maximum length "
               "are truncated with a warning.")
    p.add_argument("texts", nargs="*", metavar="TEXT", help="texts to embed; '-' reads lines from stdin")
    p.add_argument("--model", help="HF directory or packed directory (default: all-MiniLM-L6-v2)")
    p.add_argument("--wbits", type=_parse_bits, default=16, help="weight bits 1..8, or 16 (float; default)")
    p.add_argument("--abits", type=_parse_bits, default=16, help="activation bits 1..8, or 16 (float; default)")
    p.add_argument("--group", type=_positive, default=None, help="weight group size (multiple of 32; default 128)")
    p.add_argument("--agroup", type=_parse_agroup, default=None,
                   help="activation group (multiple of 32, or 'token'; default: the weight group)")
    p.add_argument("--batch", type=_positive, default=32, help="texts per forward pass (default 32)")
    p.add_argument("--similarity", action="store_true",
                   help='print the cosine matrix instead: {"text": ..., "similarity": [cos to each input]}')
    p.add_argument("--out", metavar="FILE.npy", help="write the embeddings to a .npy file instead of JSON lines")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--threads", type=_positive, default=None)
    return p


def _collect_texts(args_texts: list[str], stdin) -> list[str]:
    texts: list[str] = []
    use_stdin = not args_texts or "-" in args_texts
    stdin_lines = read_stdin_lines(stdin.buffer.read() if hasattr(stdin, "buffer") else
                                   stdin.read().encode("utf-8")) if use_stdin else []
    if not args_texts:
        texts = stdin_lines
    else:
        for t in args_texts:
            texts.extend(stdin_lines if t == "-" else [t])
    if not texts:
        raise InputError("no input texts (give TEXT arguments or lines on stdin)")
    return texts


def _row_json(values: np.ndarray) -> str:
    # str() of a float32 is its shortest round-trip form: readable, and exact when read back as float32
    return "[" + ",".join(str(v) for v in values.astype(np.float32)) + "]"


def main(argv=None) -> int:
    from engine.cli_common import EMBED_BOUNDS, check_output_file, check_ranges, checked_argv, report, \
        write_file_atomic
    try:
        argv = checked_argv(argv)
    except ValueError as e:
        return report(e)
    p = build_parser()
    args = p.parse_args(argv)
    check_ranges(p, args, EMBED_BOUNDS)
    try:
        if args.out is not None and not args.out.endswith(".npy"):
            raise InputError(f"--out must name a .npy file, got {args.out!r}")
        out_path = None if args.out is None else check_output_file(args.out, ".npy")   # before the work
        texts = _collect_texts(args.texts, sys.stdin)
        t0 = time.perf_counter()
        emb = load_embedder(args.model, wbits=args.wbits, abits=args.abits, group=args.group,
                            agroup=args.agroup, device=args.device, threads=args.threads, batch_size=args.batch,
                            progress=True)
        t1 = time.perf_counter()
        try:
            vecs = emb.embed(texts)
        finally:
            emb.close()
        t2 = time.perf_counter()
        if not np.isfinite(vecs).all():
            raise FormatError(f"{args.model or 'the default embedder'}: the model produced NaN or infinite "
                              f"embeddings (its weights or parameters are not finite); nothing was written")
        out = sys.stdout
        if args.similarity:
            n = np.linalg.norm(vecs.astype(np.float64), axis=1, keepdims=True)
            unit = vecs / np.maximum(n, 1e-12)
            sim = np.round(unit @ unit.T, 6)
            for t, row in zip(texts, sim):
                out.write(json.dumps({"text": t, "similarity": [float(x) for x in row]}, ensure_ascii=False) + "\n")
        if out_path is not None:
            write_file_atomic(out_path, lambda f: np.save(f, vecs))     # no partial .npy on a full disk
            print(f"wrote {vecs.shape[0]}x{vecs.shape[1]} float32 embeddings to {args.out}", file=sys.stderr)
        elif not args.similarity:
            for t, row in zip(texts, vecs):
                out.write('{"text": ' + json.dumps(t, ensure_ascii=False) + ', "embedding": ' + _row_json(row) + "}\n")
        out.flush()
        print(f"embedded {len(texts)} text(s), dim {vecs.shape[1]}, W{emb.wbits}A{emb.abits} on {emb.device}: "
              f"load {t1 - t0:.2f} s, {len(texts) / max(t2 - t1, 1e-9):.1f} texts/s", file=sys.stderr)
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (InputError, FormatError, FetchError, ValueError, OSError, MemoryError) as e:
        return report(e)
    except Exception as e:        # runtime errors (CUDA, out of memory): one line, not a traceback
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    from engine.cli_common import run
    sys.exit(run(main))

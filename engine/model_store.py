"""Where models come from: the default wheel, a GGUF file, an HF directory or a packed directory.

Sources are packed once per recipe and cached (ANYBIT_CACHE, default ~/.cache/anybit/packed), so
the first run shows progress and later runs load the packed directory by mmap in well under a second.
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

from loader.errors import FormatError
from loader.fetch import cache_dir
from loader.pack import PackedModel, Recipe, quantize_model
from loader.pack_writer import pack_to_dir
from loader.precision import Q8, SOURCE, check_wbits
from loader.packed import is_packed_dir, read_packed
from loader.progress import Progress, summary
from loader.validate import check_group

ROTATE_BLOCK = 256          # most lanes per Hadamard block for per-token activation scales (576 -> 64)
QUANT_REVISION = 5          # bump when quantize_model's output changes for the same recipe (4: GPTQ batch updates;
                            # 5: exact two-level K-quant imports, group 32 for re-quantized GGUF tensors)


def cache_root() -> Path:
    return cache_dir()          # the one cache root ($ANYBIT_CACHE or ~/.cache/anybit): loader/fetch.py


def resolve_source(path, kind: str = "decoder") -> Path:
    if path is None:
        from loader.fetch import default_model_path
        return Path(default_model_path(kind))
    p = Path(path).expanduser()
    if not p.exists():
        raise FormatError(f"model path {str(path)!r} does not exist")
    return p


def _cache_key(src: Path, recipe: Recipe) -> str:
    files = [src] if src.is_file() else sorted(src.glob("*"))
    stamp = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]
    # no format version here: a cached pack this anybit cannot read fails read_packed and is packed again
    blob = json.dumps([str(src.resolve()), stamp, recipe.to_dict(), 1, QUANT_REVISION], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _read_source(src: Path, kind: str = "decoder"):
    from loader.sources import read_source
    source = read_source(src)
    if kind == "decoder":
        check_runnable(source.config, src)      # before minutes of packing, not after
    return source


def check_runnable(cfg, where) -> None:
    """One FormatError line when the decoder cannot run this config, before minutes of packing: the
    decoder's builders run every decoder option the loaders accept (engine/archs/), not an encoder."""
    from engine.archs import DECODERS
    if cfg.arch not in DECODERS:
        what = "an encoder: use engine.embed" if cfg.arch == "bert" else "no graph builder"
        raise FormatError(f"{where}: the decoder does not run architecture {cfg.arch!r} ({what})")


def default_recipe(kind: str, wbits: int, abits: int, group=None, agroup=None) -> Recipe:
    """The recipe a source is packed with for these precisions (the cache key includes it); wbits 0:
    every tensor at its source type's own bits."""
    # quantized activations on a decoder: linear inputs are rotated (loader/rotation.py) with one scale
    # per token (measured far better than SmoothQuant: W8A8 G128 KL 0.0068 against 0.025; SmoothQuant
    # stays available as `tools.pack --smooth`), and with groups too where the weights have 8 bits,
    # since re-rounding the rotated weights costs nothing there (W8A8 G32: KL 0.0036 rotated against
    # 0.0128 exact) while below 8 bits it costs more than it saves (W6 rotated KL 0.031, W4 0.39: the
    # exact import is kept). The encoder's quantized-activation path runs plain.
    rotate = 0
    if kind == "decoder" and abits != 16 and (agroup == "token" or wbits == 8):
        rotate = ROTATE_BLOCK
    # a 4-bit or narrower embedder (float activations) is rounded by GPTQ on rotated inputs, calibrated on
    # the calibration text (engine/calibrate.py): round-to-nearest left a short sentence at cosine 0.904
    gptq = kind == "embedder" and 1 <= wbits <= 4 and abits == 16
    if gptq:
        rotate = ROTATE_BLOCK
    return Recipe(wbits=wbits, group=group, abits=abits, agroup=agroup, rotate=rotate, gptq=gptq)


def load_packed_model(path=None, *, wbits: int | str = 4, abits: int = 16, group=None, agroup=None,
                      kind: str = "decoder", progress: bool = True) -> tuple[PackedModel, int | str]:
    """-> (packed model, the weight bits it runs at). wbits 16 keeps float weights (never cached);
    "source" packs each tensor at its source type's own bits (Recipe wbits 0) and runs a packed
    directory at the bits it holds."""
    wbits = check_wbits(wbits)
    if abits == Q8:         # a rounding at run time: packed as for A16 (the same cache entry)
        abits = 16
    src = resolve_source(path, kind)
    if src.is_dir() and is_packed_dir(src):
        pm = read_packed(src)
        if kind == "decoder":
            check_runnable(pm.config, src)
        if wbits == SOURCE:
            return pm, SOURCE
        # the model's precision is that of its layers; the output projection keeps its own (head_bits)
        bits = [m["bits"] for n, m in pm.info.items() if n not in ("output", "tok_embeddings")] or [16]
        stored = max(bits)
        if wbits == 16 and stored != 16:
            raise FormatError(f"{src} holds {stored}-bit weights; it cannot run unquantized (--wbits 16)")
        if wbits != 16 and wbits > stored:
            print(f"anybit: {src} holds {stored}-bit weights; running at {stored} bits", file=sys.stderr)
            wbits = stored
        return pm, wbits
    recipe = default_recipe(kind, 0 if wbits == SOURCE else wbits, abits, group, agroup)
    if wbits == 16:
        return quantize_model(_read_source(src, kind), recipe), 16
    out = cache_root() / "packed" / f"{src.stem}-w{wbits}-{_cache_key(src, recipe)}"
    if is_packed_dir(out):
        try:
            return read_packed(out), wbits
        except FormatError as e:
            print(f"anybit: cached pack unusable ({e}); packing again", file=sys.stderr)
    t0 = time.perf_counter()
    source = _read_source(src, kind)
    # a group wider than every input only pads rows with zeros (--group 65536 ran out of memory)
    check_group(group, [t.shape[-1] for t in source.tensors.values() if len(t.shape) == 2], str(src))
    hessians = None
    if recipe.gptq:
        from engine.calibrate import encoder_hessians
        if progress:
            print("anybit: calibrating (GPTQ) on the calibration text ...", file=sys.stderr)
        hessians = encoder_hessians(source, recipe)
    at = "source bits" if wbits == SOURCE else f"W{wbits}"
    label = f"anybit: first use of {src.name} at {at}: packing (cached for later runs)"
    show = Progress(label) if progress else None
    _, info, _ = pack_to_dir(source, recipe, out, hessians=hessians, progress=show,
                              force=True)   # the cache's own entry: a damaged one is replaced
    pm = read_packed(out, verify=False)
    if progress:
        size = src.stat().st_size if src.is_file() else None
        print("anybit: " + summary(info, time.perf_counter() - t0, pm.weight_bytes, size), file=sys.stderr)
    return pm, wbits

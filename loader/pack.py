"""SourceModel + recipe -> PackedModel: every linear weight to bipolar bit planes, the rest float32.

Exact import (SPEC.md section 1): GGUF Q4_0 / Q4_1 / Q8_0 blocks of 32 map onto bipolar codes with a
per-group offset, losslessly, when the requested precision is 4 (Q4_x) or 8 (Q8_0) and the group is 32:

    Q4_1  w = d*q + m      c = q         s = d/2   o = 7.5*d + m
    Q4_0  w = d*(q - 8)    c = q         s = d/2   o = -d/2
    Q8_0  w = d*q          c = q + 128   s = d/2   o = -d/2

since v = 2c - (2^p - 1) gives s*v + o = w in each case. A 4-bit grid also sits exactly inside any wider
bipolar grid: with c' = c + (2^p - 16)/2 the value v' = 2c' - (2^p - 1) equals v, so Q4_x imports
exactly at every p >= 4 (s and o unchanged); Q8_0 only at p = 8.

The other types whose sub-blocks are affine maps of unsigned codes (Q5_0, Q5_1, Q4_K, Q5_K, Q6_K, Q3_K,
Q2_K, IQ4_XS / IQ4_NL at p = 8) import the same way into the two-level form of loader/kquant.py: the
source's codes at its own bits (or shifted into a wider grid), the source's float16 d / dmin and integer
sub-scales, sub-blocks of 16 or 32 lanes. A tensor asked at fewer bits than its source is re-quantized,
in groups of the source's sub-block (32 lanes for 16-lane sources: float32 parameters per 16 lanes would
cost 4 bits per weight); float sources default to 128.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from loader.bipolar import PackedLinear, QuantTensor, padded_k, quantize_weights
from loader.errors import FormatError
from loader.packed import PackedModel
from loader.precision import check_bits
from loader.gptq import gptq_quantize
from loader.pack_ops import can_read_raw, exact_from_raw, pack_codes, quantize_source, release
from loader.kquant import KQ_TYPES, SubScales, sub_layout
from loader.rotation import check_block, hadamard_blocks
from loader.source import ModelConfig, SourceModel, SourceTensor

LLAMA_LINEARS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
BERT_LINEARS = ("wq", "wk", "wv", "wo", "w_in", "w_out")
EXACT_BITS = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}    # the source grid's bits: exact at p >= these
EXACT_BITS.update({t: v[0] for t, v in KQ_TYPES.items()})
SOURCE_GROUP = {t: KQ_TYPES[t][1] if t in KQ_TYPES else 32 for t in EXACT_BITS}   # exact import's G


HEADS = ("output", "tok_embeddings")               # a decoder's (V, d) tables: packed at the head's bits


def is_linear(name: str, arch: str) -> bool:
    """Packed: every linear weight, and a decoder's output and untied embedding table (its rows are
    gathered one per token from the packed planes). Float32: norms, biases, BERT's embeddings."""
    if arch == "bert":
        return name.startswith("layers.") and name.rsplit(".", 1)[-1] in BERT_LINEARS
    if name in HEADS:
        return True
    return name.startswith("layers.") and name.rsplit(".", 1)[-1] in LLAMA_LINEARS


@dataclass
class Recipe:
    """How to quantize. wbits 0: every tensor at its source type's own bits (exact import; float and
    other sources at 8). group=None: the source's sub-block where it maps exactly (16 or 32), 32 for
    other quantized sources, else 128. head_bits=None: default_head_bits (the output projection is
    never below 4 bits by default)."""
    wbits: int = 4
    group: int | str | None = None      # "channel": one group per output row
    asymmetric: bool = True
    clip: bool = True
    head_bits: int | None = None
    abits: int = 16
    agroup: int | str | None = None     # None -> = weight group; "token" -> one scale per token
    smooth: bool = False
    rotate: int = 0                     # most lanes per block Hadamard on linear inputs (loader/rotation.py)
    gptq: bool = False                  # error-compensating rounding with calibration Hessians (loader/gptq.py)

    def __post_init__(self):
        if self.wbits != 0:                 # 0: each tensor at its source type's own bits
            check_bits(self.wbits, "wbits")
        check_bits(self.abits, "abits")
        if self.group not in (None, "channel") and (not isinstance(self.group, int) or self.group <= 0
                                                    or self.group % 32):
            raise ValueError(f"group must be a positive multiple of 32 or 'channel', got {self.group!r}")
        if isinstance(self.agroup, str) and self.agroup != "token":
            raise ValueError(f"agroup must be a multiple of 32, 'token' or None, got {self.agroup!r}")
        if isinstance(self.agroup, int) and (self.agroup <= 0 or self.agroup % 32):
            raise ValueError(f"agroup must be a positive multiple of 32, got {self.agroup}")

        if self.rotate:
            check_block(self.rotate)

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        for k in ("rotate", "gptq"):
            if not d[k]:
                del d[k]                # recipes from before these existed keep their cache keys
        return d


def exact_import(blocks: tuple, ggml_type: str, bits: int | None = None) -> QuantTensor:
    """Raw GGUF block fields -> QuantTensor with G = 32 at `bits` (default: the source grid's own).
    The two-level types (loader/kquant.py) give their codes with float32 parameters here; use
    exact_import_sub for the form that keeps the source's bytes."""
    if ggml_type in KQ_TYPES:
        q, sub = exact_import_sub(blocks, ggml_type, bits)
        q.scales, q.offsets = sub.params()
        return q
    if ggml_type == "Q4_1":
        d, m, q = blocks
        codes, off = q, 7.5 * d.astype(np.float64) + m
    elif ggml_type == "Q4_0":
        d, q = blocks
        codes, off = q, -0.5 * d.astype(np.float64)
    elif ggml_type == "Q8_0":
        d, q = blocks
        codes, off = q.astype(np.int16) + 128, -0.5 * d.astype(np.float64)
    else:
        raise FormatError(f"no exact import for ggml type {ggml_type}")
    codes = np.asarray(codes)
    N, K = codes.shape
    if K % 32:
        raise FormatError(f"{ggml_type} tensor with K={K} not a multiple of 32")
    bits = _exact_bits(ggml_type, bits)
    codes = codes.astype(np.int16) + ((1 << bits) - (1 << EXACT_BITS[ggml_type])) // 2
    return QuantTensor(codes.astype(np.uint8), (d.astype(np.float64) / 2).astype(np.float32),
                       off.astype(np.float32), bits, 32, K)


def _exact_bits(ggml_type: str, bits: int | None) -> int:
    src_bits = EXACT_BITS[ggml_type]
    bits = src_bits if bits is None else bits
    if not src_bits <= bits <= 8:
        raise FormatError(f"{ggml_type} maps exactly onto {src_bits}..8 bits, not {bits}")
    return bits


def exact_import_sub(blocks: tuple, ggml_type: str, bits: int | None = None) -> tuple[QuantTensor, SubScales]:
    """(codes (scales / offsets None), SubScales) of a two-level type at `bits` >= the source's: codes
    shifted by (2^bits - 2^p)/2 keep v, so s and o (d, c0, ...) stay as they are."""
    codes, sub = blocks
    bits = _exact_bits(ggml_type, bits)
    shift = ((1 << bits) - (1 << EXACT_BITS[ggml_type])) // 2
    if shift:
        codes = (codes.astype(np.int16) + shift).astype(np.uint8)
    return QuantTensor(codes, None, None, bits, sub.G, codes.shape[1]), sub


def default_head_bits(wbits: int, ggml_type: str | None) -> int:
    """Bits of the output projection when the recipe does not say.

    From 4 bits on, a Q8_0 head stays 8-bit (its exact import: the W4A16 row of the README loses nothing
    against the source). Below 4 bits the head is packed at 4: there the layers already decide the
    quality (W3 +221%, W2 unusable on the default model), and an 8-bit head would be half of the bytes
    read per token at W2 (28 of 57 MB), capping the speed that the fewer planes buy; llama.cpp's own
    2- and 3-bit mixes keep their output tensor at a middle precision likewise."""
    if wbits < 4:
        return 4
    return 8 if ggml_type == "Q8_0" and wbits < 8 else wbits


# linears whose input a recipe's `rotate` applies to: every Llama linear (measured on the default model at
# W8A8, G = 128, one scale per token: w_down alone KL 0.0135, all of them 0.0068 and perplexity -0.15%)
ROTATED = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down", "output", "w_in", "w_out")   # + BERT's


def rotation_block(name: str, K: int, most: int) -> int:
    """The Hadamard block for linear `name` of K inputs under a recipe's rotate = most: the largest power
    of two up to `most` that divides K (at least 32), for the linears in ROTATED; else 0."""
    if not most or name.rsplit(".", 1)[-1] not in ROTATED:
        return 0
    b = most
    while b >= 32 and K % b:
        b //= 2
    return b if b >= 32 else 0


def _resolve_group(recipe_group, bits: int, ggml_type: str | None, K: int) -> tuple[int, bool]:
    """(group, exact) for one tensor of K input columns."""
    exact_possible = ggml_type in EXACT_BITS and EXACT_BITS[ggml_type] <= bits
    if recipe_group == "channel":
        return -(-K // 32) * 32, False
    if recipe_group is None:
        if exact_possible:
            return SOURCE_GROUP[ggml_type], True
        return (32 if ggml_type not in (None, "F32", "F16", "BF16", "F64") else 128), False
    return recipe_group, exact_possible and recipe_group == SOURCE_GROUP[ggml_type]


def source_bits(ggml_type: str | None) -> int:
    """A tensor's own bits for wbits = 0: its type's exact grid, else 8. IQ4_NL / IQ4_XS are exact only
    at 8 bits (their codebook values are integers in [-127, 113]), twice their 4.25-4.5 bits per
    weight: they are re-quantized at 4 (the packer reports their loss) unless 8 bits are asked for."""
    if (ggml_type or "").startswith("IQ"):
        return 4
    return EXACT_BITS.get(ggml_type or "", 8)


@dataclass
class TensorPlan:
    """What one source tensor becomes, decided before any of it is read: the streaming writer
    (loader/pack_writer.py) lays out the file from these, so every shape must be known up front."""
    name: str
    source: SourceTensor
    kind: str                           # "float" | "exact" | "round"
    bits: int = 16
    group: int = 0
    rotate: int = 0
    smooth: np.ndarray | None = None
    offsets: bool = True

    def arrays(self) -> list[tuple[str, str, tuple]]:
        """(file key, safetensors dtype, shape) of what this tensor is stored as, in file order."""
        shape = tuple(self.source.shape)
        if self.kind == "float":
            return [(self.name, "F32", shape)]
        N, K = shape
        Kp = padded_k(K, max(self.group, 32))
        out = [(f"{self.name}.planes", "U32", (self.bits, N, Kp // 32))]
        if self.two_level:
            out += [(f"{self.name}.{f}", dt, (N, Kp // n)) for f, dt, n in sub_layout(self.source.ggml_type)]
            return out
        out.append((f"{self.name}.scales", "F32", (N, Kp // self.group)))
        if self.offsets:
            out.append((f"{self.name}.offsets", "F32", (N, Kp // self.group)))
        if self.smooth is not None:
            out.append((f"{self.name}.smooth", "F32", (K,)))
        return out

    @property
    def weights(self) -> int:
        return int(np.prod(self.source.shape, dtype=np.int64))

    @property
    def two_level(self) -> bool:
        """An exact import kept in the source's two-level form (loader/kquant.py)."""
        return self.kind == "exact" and self.source.ggml_type in KQ_TYPES


def plan_model(src: SourceModel, recipe: Recipe, smooth: dict[str, np.ndarray] | None = None) -> list[TensorPlan]:
    """The TensorPlan of every source tensor under `recipe` (see quantize_model)."""
    smooth = smooth or {}
    plans = []
    for name, t in src.tensors.items():
        if not is_linear(name, src.config.arch) or recipe.wbits == 16:
            plans.append(TensorPlan(name, t, "float"))
            continue
        bits = recipe.wbits or source_bits(t.ggml_type)
        if name in HEADS:
            bits = recipe.head_bits or (bits if not recipe.wbits else default_head_bits(bits, t.ggml_type))
        group, exact = _resolve_group(recipe.group, bits, t.ggml_type, t.shape[-1])
        rot = rotation_block(name, t.shape[-1], recipe.rotate)
        s = None if rot else smooth.get(name)            # the rotation replaces smoothing for this input
        exact = exact and s is None and not rot and (t.blocks is not None or can_read_raw(t))
        if not exact:
            group = max(group, 32)                       # a 16-lane source sub-block re-quantizes at 32
        plans.append(TensorPlan(name, t, "exact" if exact else "round", bits, group, rot,
                                None if s is None else np.asarray(s, np.float32), exact or recipe.asymmetric))
    return plans


def pack_tensor(plan: TensorPlan, recipe: Recipe, hessians: dict | None = None) -> tuple[object, dict | None]:
    """-> (float32 array or PackedLinear, info or None) for one planned tensor."""
    t = plan.source
    if plan.kind == "float":
        return np.ascontiguousarray(t.load(), dtype=np.float32), None
    bits, group, rot, s = plan.bits, plan.group, plan.rotate, plan.smooth
    err = 0.0
    H = (hessians or {}).get(plan.name) if recipe.gptq else None
    if plan.two_level:
        q, sub = exact_import_sub(t.blocks(), t.ggml_type, bits)
        lin = PackedLinear(pack_codes(q.codes, q.bits), None, None, q.bits, q.group, q.K, q.codes.shape[0],
                           sub=sub)
    elif plan.kind == "exact":
        if can_read_raw(t):
            lin = exact_from_raw(t, bits)                   # the same values, straight from the mapped blocks
        else:
            q = exact_import(t.blocks(), t.ggml_type, bits)
            lin = PackedLinear(pack_codes(q.codes, q.bits), q.scales.astype(np.float32),
                               None if q.offsets is None else q.offsets.astype(np.float32), q.bits, q.group, q.K,
                               q.codes.shape[0])
    elif s is None and (H is None or t.shape[-1] % group):
        lin, err = quantize_source(t, bits, group, asymmetric=recipe.asymmetric, clip=recipe.clip, rotate=rot)
    else:                                                   # smoothing or GPTQ: the NumPy path
        w_ref = t.load().astype(np.float64)
        if rot:
            w_ref = hadamard_blocks(w_ref, rot)             # W R: the decoder feeds R x
        w_in = w_ref * s[None, :] if s is not None else w_ref
        if H is not None:
            q = gptq_quantize(w_in, H, bits, group, asymmetric=recipe.asymmetric, clip_search=recipe.clip)
        else:
            q = quantize_weights(w_in, bits, group, asymmetric=recipe.asymmetric, clip_search=recipe.clip)
        lin = PackedLinear(pack_codes(q.codes, q.bits), q.scales.astype(np.float32),
                           None if q.offsets is None else q.offsets.astype(np.float32), q.bits, q.group, q.K,
                           q.codes.shape[0], s, rot)
        deq = q.dequantize() / (s[None, :] if s is not None else 1.0)
        err = float(np.linalg.norm(deq - w_ref) / max(np.linalg.norm(w_ref), 1e-30))
    info = {"bits": bits, "group": group, "exact": plan.kind == "exact", "rel_err": err,
            "source_type": t.ggml_type or "float", "rotate": rot}
    return lin, info


def iter_packed(src: SourceModel, recipe: Recipe, plans: list[TensorPlan], *, hessians: dict | None = None,
                progress: Callable[[int, int, str], None] | None = None
                ) -> Iterator[tuple[TensorPlan, object, dict | None]]:
    """Pack the planned tensors one at a time, in order; progress(done, total, name) counts weights.
    Each source tensor's mapped pages are handed back once it is packed (loader/pack_ops.release)."""
    total = sum(p.weights for p in plans)
    done = 0
    for plan in plans:
        if progress:
            progress(done, total, plan.name)
        packed, info = pack_tensor(plan, recipe, hessians)
        release(plan.source)
        done += plan.weights
        yield plan, packed, info
    if progress:
        progress(total, total, "done")


def quantize_model(src: SourceModel, recipe: Recipe | None = None, *,
                   smooth: dict[str, np.ndarray] | None = None,
                   hessians: dict[str, np.ndarray] | None = None,
                   progress: Callable[[int, int, str], None] | None = None) -> PackedModel:
    """Quantize every linear of `src` by `recipe` (wbits 16: keep float32), all in memory (to write a
    large model as it is packed, see loader.pack_writer.pack_to_dir).

    smooth: per linear name, factors s (K,) from calibration; the weight is multiplied by s along K
    before quantization and the backend divides activations by s (SPEC.md section 1). Smoothing
    rewrites weights, so those tensors are never exact imports.
    hessians: per linear name, X^T X of its (rotated, when the recipe rotates it) calibration inputs;
    with recipe.gptq those linears are rounded by GPTQ (loader/gptq.py) instead of to nearest.
    """
    recipe = recipe or Recipe()
    out: dict[str, np.ndarray | PackedLinear] = {}
    info: dict[str, dict] = {}
    for plan, packed, meta in iter_packed(src, recipe, plan_model(src, recipe, smooth), hessians=hessians,
                                          progress=progress):
        out[plan.name] = packed
        if meta is not None:
            info[plan.name] = meta
    return PackedModel(src.config, out, src.tokenizer_json, recipe.to_dict(), info)


def progress_bar(label: str):
    """Progress on stderr for quantize_model: a bar on a terminal, else a line every few seconds."""
    from loader.progress import Progress
    return Progress(label)

"""The decoder of a Llama-family model on any backend: prefill a prompt, then one token per step.

The model is one graph (engine/archs/: the architecture's builder over this module's weight table);
the backend compiles it once (CPU: one C loop over op records; GPU: device buffers and CUDA graphs;
NumPy: the op-by-op interpreter) and runs it per step. This module prepares the weights: each linear on
the backend (PackedLinear -> the backend's handle, or a float32 (N, K) array for the unquantized path),
q|k|v and gate|up fused into one product each where their recipes agree, because one call with a wider N
costs less than three in decode; and it owns the KV cache.
"""
from __future__ import annotations

import mmap
from collections import OrderedDict

import numpy as np

from engine.archs import BUILDERS, DECODERS
from engine.graph import Step
from loader.bipolar import PackedLinear, can_concat_rows, concat_rows, unpack_planes, values_of
from loader.errors import FormatError
from loader.rotation import hadamard_blocks
from loader.packed import PackedModel
from loader.precision import Q8, check_abits
from runtime.act_q8 import block_for_type
from runtime.contract import has


def _concat(lins: list[PackedLinear]) -> PackedLinear | None:
    """Stack linears along N when they share K, bits, group, parameter form, offsets and smoothing."""
    return concat_rows(lins)


class Linear:
    """A graph weight: y = x W^T on a backend, whatever the weight's form. h: the backend's handle of a
    PackedLinear (rotate: the weight holds W R, feed it R x), or float_w: float32 (N, K). splits: the
    output columns of each product when several were fused into this one."""

    def __init__(self, backend, w, abits: int, agroup, splits=None, release=None):
        self.abits = abits
        self.act_quant = None       # (abits, group): float weights with quantize-dequantized inputs
        if abits == Q8 and not isinstance(w, (list, PackedLinear)):
            self.act_quant = (Q8, agroup)           # agroup: the q8 rounding block (act_q8.block_for_type)
        if isinstance(w, list):     # row blocks of one product, stacked by the backend (prepare_rows)
            self.h, self.float_w = backend.prepare_rows(w, release), None
            self.rotate, self.N, self.K = w[0].rotate, sum(x.N for x in w), w[0].K
            self.agroup = w[0].Kp if agroup == "token" else agroup
        elif isinstance(w, PackedLinear):
            self.h, self.float_w = backend.prepare_linear(w), None
            self.rotate, self.N, self.K = w.rotate, w.N, w.K
            self.agroup = w.Kp if agroup == "token" else agroup
        else:
            self.h, self.float_w = None, np.ascontiguousarray(w, np.float32)
            self.rotate, self.agroup = 0, None
            self.N, self.K = self.float_w.shape
        self.splits = list(splits or [self.N])


class Embedding:
    """Token rows (M, d) of a float table or of a packed one (then dequantized one row per token, never
    as a whole). A packed table's recent rows are kept (least recently used dropped, CACHE_BYTES in all):
    a decode step's few rows took ~0.5 ms of reads and unpacking in Python, and text repeats its tokens."""
    CACHE_BYTES = 8 << 20

    def __init__(self, table, mapping=None):
        self.table = table
        # rows of a mapped table are read with pread (loader.packed.FileMap.take), not through the map
        self.take = mapping.take if mapping is not None else (lambda a, ids: a[..., ids, :])
        self._kept: OrderedDict[int, np.ndarray] = OrderedDict()
        self._keep = self.CACHE_BYTES // (4 * table.K) if isinstance(table, PackedLinear) else 0

    def rows(self, ids, pos=None) -> np.ndarray:
        e = self.table
        if not isinstance(e, PackedLinear):
            return np.asarray(self.take(e, ids), np.float32)
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        kept, distinct = self._kept, set(ids)
        miss = sorted(distinct.difference(kept))
        if miss:
            for i, row in zip(miss, self._dequantize(miss)):
                kept[i] = row
        out = np.stack([kept[i] for i in ids]) if ids else np.empty((0, e.K), np.float32)
        for i in ids:
            kept.move_to_end(i)
        while len(kept) > max(self._keep, len(distinct)):
            kept.popitem(last=False)
        return out

    def _dequantize(self, ids: list[int]) -> np.ndarray:
        e = self.table
        codes = unpack_planes(np.ascontiguousarray(self.take(e.planes, ids)))     # (M, Kp)
        v = values_of(codes, e.bits).astype(np.float32)
        sr, orow = e.row_params(ids, self.take)   # two-level: only these rows' parameters are computed
        w = np.repeat(sr, e.group, axis=1) * v
        if orow is not None:
            w += np.repeat(orow, e.group, axis=1)
        w = w[:, :e.K]
        if e.smooth is not None:          # a smoothed tied output holds W * s: undo it for the rows
            w = w / e.smooth
        if e.rotate:                      # a rotated one holds W R, and R R = I
            w = hadamard_blocks(w, e.rotate)
        return np.ascontiguousarray(w, np.float32)


def lazy_zeros(shape) -> np.ndarray:
    """A zero float32 array whose memory is mapped page by page on first touch, in small pages.

    Why: the cache is sized for the whole context (4096 positions: 190 MB for SmolLM2) but a generation
    touches a few hundred. np.zeros of that size asks for transparent huge pages, so each layer's first
    row written zeroes 2 MiB; measured, those faults took 0.5 ms of a 5 ms decode step whenever a row
    crossed into a new huge page. An anonymous mapping without huge pages zeroes only what is written."""
    n = int(np.prod(shape)) * 4
    mm = mmap.mmap(-1, max(n, 4))
    if hasattr(mm, "madvise") and hasattr(mmap, "MADV_NOHUGEPAGE"):
        mm.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(mm, np.float32, count=n // 4).reshape(shape)


class KVCache:
    """Preallocated keys and values: per layer (T, Hkv, hd) float32. Build/free as a pair.

    With a backend that offers kv_store (the GPU backend) the cache lives on the device, one array per
    layer: a step then sends only its new rows, instead of every layer's whole cache to each attention
    call. Rows past n are never read, so the device arrays need no clearing."""

    def __init__(self, n_layers: int, T: int, n_kv_heads: int, head_dim: int, backend=None):
        self.T = T
        self.device = backend is not None and has(backend, "device_kv")
        if self.device:
            self.k = [backend.empty((T, n_kv_heads, head_dim)) for _ in range(n_layers)]
            self.v = [backend.empty((T, n_kv_heads, head_dim)) for _ in range(n_layers)]
        else:
            self.k = lazy_zeros((n_layers, T, n_kv_heads, head_dim))
            self.v = lazy_zeros((n_layers, T, n_kv_heads, head_dim))
        self.n = 0      # positions filled

    def store(self, backend, li: int, start: int, k: np.ndarray, v: np.ndarray) -> None:
        """Rows start .. start+M-1 of layer li."""
        if self.device:
            pos = np.arange(start, start + len(k), dtype=np.int32)
            backend.kv_store(self.k[li], k, pos)
            backend.kv_store(self.v[li], v, pos)
        else:
            self.k[li, start:start + len(k)] = k
            self.v[li, start:start + len(v)] = v

    def close(self) -> None:
        if self.device:
            for a in self.k + self.v:
                a.close()
        self.k = self.v = None      # host mappings go with the last view


class ContextOverflow(ValueError):
    pass


def compile_graph(graph, backend, interpret: bool = False):
    """The backend's compiled program, or the op-by-op interpreter (for a backend without a compiler,
    or asked for: the per-op reference of the tests and benchmarks)."""
    if has(backend, "compile") and not interpret:
        try:
            return backend.compile(graph)
        except NotImplementedError:     # an op without a kernel on this backend's compiled path
            pass
    from runtime.interpret import Interpreter
    return Interpreter(graph, backend)


def rope_divisors(cfg) -> np.ndarray | None:
    """Per-pair divisors of the RoPE frequencies of the (global) layers: the Llama 3 factors times the
    linear scale (dividing a pair's angle by s is dividing its position by s), or None when all are 1."""
    f = np.ones(cfg.rope_dim // 2, np.float64)
    if cfg.rope_freq_factors is not None:
        f = f * np.asarray(cfg.rope_freq_factors, np.float64)
    f = f * float(cfg.rope_scale)
    return None if np.all(f == 1.0) else f.astype(np.float32)


class Decoder:
    def __init__(self, pm: PackedModel, backend, *, wbits_run: int | None = None, abits: int = 16,
                 agroup=None, context: int | None = None, arch: str | None = None, interpret: bool = False):
        cfg = pm.config
        arch = arch or cfg.arch
        if arch not in DECODERS:
            raise FormatError(f"the decoder runs {', '.join(DECODERS)} models, not {arch!r}")
        self.cfg, self.backend = cfg, backend
        self.context = min(cfg.max_seq_len, context or 4096)
        self.abits = abits = check_abits(abits)
        if abits == Q8 and agroup is not None:
            raise ValueError(f"agroup does not apply to abits 'q8' (its blocks follow each weight's source type), "
                             f"got agroup {agroup!r}")

        def get(name):
            w = pm.linear(name)
            if isinstance(w, PackedLinear) and wbits_run is not None and wbits_run < w.bits:
                w = w.nested(wbits_run)
            return w

        W: dict = {}
        self.linear_for: dict = {}        # source linear name -> the Linear that computes it

        # the backend holds its own copies of what it prepared: the mapped file pages under each weight
        # are given back as soon as it is prepared (rows of fused weights as they are read), so that the
        # peak memory of loading is about one weight's file data over the backend's copies
        release = pm.mapping.release if pm.mapping is not None else None

        def add(names):
            ws = [get(n) for n in names]
            # abits "q8": each product rounds its input in the blocks llama.cpp uses for its weight's source
            # type (32 or 256 lanes); products whose roundings differ are not fused, as they see different inputs
            blocks = [block_for_type(pm.info.get(n, {}).get("source_type")) for n in names]
            ag = {n: (b if abits == Q8 else agroup) for n, b in zip(names, blocks)}
            fuse = len(ws) > 1 and len(set(ag.values())) == 1
            lin = None
            if fuse and all(isinstance(w, PackedLinear) for w in ws):
                if can_concat_rows(ws):
                    lin = (Linear(backend, ws, abits, ag[names[0]], [w.N for w in ws], release=release)
                           if has(backend, "prepare_rows") else
                           Linear(backend, _concat(ws), abits, ag[names[0]], [w.N for w in ws]))
            elif fuse and all(not isinstance(w, PackedLinear) for w in ws):
                lin = Linear(backend, np.concatenate([np.asarray(w, np.float32) for w in ws], axis=0), abits,
                             ag[names[0]], [np.shape(w)[0] for w in ws])
            if lin is not None:
                W["|".join(names)] = lin
                self.linear_for.update((n, lin) for n in names)
            else:
                rows = has(backend, "prepare_rows")
                for n, w in zip(names, ws):
                    W[n] = self.linear_for[n] = (Linear(backend, [w], abits, ag[n], release=release)
                                                 if rows and isinstance(w, PackedLinear) else
                                                 Linear(backend, w, abits, ag[n]))
            pm.release_pages(names)

        def vec(name):
            W[name] = np.ascontiguousarray(pm.linear(name), np.float32)

        # the output projection first (kept at its packed bits): the largest single weight, prepared while
        # little else is held, so that its file pages and temporaries do not add to the final peak
        add(["output"])
        for i in range(cfg.n_layers):
            p = f"layers.{i}."
            for n in ("attn_norm", "ffn_norm", "q_norm", "k_norm", "attn_post_norm", "ffn_post_norm", "bo"):
                if n in ("attn_norm", "ffn_norm") or p + n in pm.tensors:
                    vec(p + n)
            add([p + "wq", p + "wk", p + "wv"])
            add([p + "wo"])
            add([p + "w_gate", p + "w_up"])
            add([p + "w_down"])
            for b in ("bq", "bk", "bv"):
                if p + b in pm.tensors:
                    vec(p + b)
            bias = [p + b for b in ("bq", "bk", "bv")]
            if all(b in W for b in bias) and "|".join(p + n for n in ("wq", "wk", "wv")) in W:
                W["|".join(bias)] = np.concatenate([W[b] for b in bias])
        vec("norm")
        # (V, d) rows gathered per token: the untied table (packed like the linears), or the tied output
        W["tok_embeddings"] = Embedding(pm.tensors.get("tok_embeddings", pm.linear("output")), pm.mapping)
        freqs = rope_divisors(cfg)
        if freqs is not None:
            W["rope_freqs"] = freqs
        self.weights = W
        self.graph = BUILDERS[arch](cfg, W)
        self.program = compile_graph(self.graph, backend, interpret)

    def new_cache(self) -> KVCache:
        c = self.cfg
        return KVCache(c.n_layers, self.context, c.n_kv_heads, c.head_dim, self.backend)

    def close(self) -> None:
        self.program.close()

    def step(self, ids, pos, caches, out_rows) -> np.ndarray:
        """One batched step: row i is token ids[i] at position pos[i] of the sequence whose cache is
        caches[i] (rows of one sequence consecutive). Returns the output rows out_rows (R, V). The
        caller advances each cache's n."""
        ids = np.asarray(ids, np.int64)
        pos = np.asarray(pos, np.int32)
        if len(ids) == 0 or pos.shape != ids.shape or len(caches) != len(ids):
            raise ValueError("a step needs one position and one cache per token id, and at least one id")
        if np.any(ids < 0) or np.any(ids >= self.cfg.vocab_size):
            raise ValueError(f"token id out of range 0..{self.cfg.vocab_size - 1}")
        for c, p in zip(caches, pos):
            if not 0 <= p < c.T:
                raise ContextOverflow(f"position {p} is outside the context of {c.T}")
        return self.program.run(Step(ids, pos, list(caches), np.asarray(out_rows, np.int32)))

    def step_batch(self, tokens, caches) -> np.ndarray:
        """Batched decode: one new token for each of N sequences (each with its own cache, at its own
        position cache.n) in one step, so every linear reads its weights once for all N rows. Returns the
        logits (N, V) and advances each cache by one."""
        if len(tokens) != len(caches) or len({id(c) for c in caches}) != len(caches):
            raise ValueError("step_batch takes one token per sequence and a distinct cache for each")
        pos = np.array([c.n for c in caches], np.int32)
        logits = self.step(tokens, pos, caches, np.arange(len(tokens)))
        for c in caches:
            c.n += 1
        return logits

    def forward(self, ids, cache: KVCache, *, all_logits: bool = False) -> np.ndarray:
        """Run tokens `ids` at positions cache.n .. cache.n+M-1; returns logits of the last token
        (V,) or of every token (M, V)."""
        ids = np.asarray(ids, np.int64)
        M = len(ids)
        start = cache.n
        if start + M > cache.T:
            raise ContextOverflow(f"{start + M} tokens exceed the context of {cache.T}")
        if M == 0:
            raise ValueError("forward needs at least one token id")
        rows = np.arange(M) if all_logits else np.array([M - 1])
        logits = self.step(ids, np.arange(start, start + M, dtype=np.int32), [cache] * M, rows)
        cache.n = start + M
        return logits if all_logits else logits[0]

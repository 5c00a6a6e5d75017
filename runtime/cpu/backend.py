"""CpuBackend: the backend interface of docs/DESIGN.md over the C kernels (runtime/cpu/*.c via cffi).

Linears run on the packed weights directly: A16 by integer dot products of packed codes with 16-bit
activations (kernels_int8.c) or by 16-bit table lookup (byte shuffles, one pass per plane; chosen per
precision and isa by I8_MIN_BITS), quantized activations by byte dot products of weight codes and
activation codes (kernels_quant.c) or by AND + popcount (kernels_linear.c), both with exact integer block
sums (QUANT_KERNEL says which runs). Every call releases the
GIL (cffi API mode) and runs on a persistent pthread pool created once per backend.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from loader.bipolar import LANES, LinearShape, PackedLinear, can_concat_rows, concat_rows, round_up
from loader.kquant import concat_subscales
from loader.precision import Q8, check_bits
from runtime.act_q8 import check_q8_block, q8_values
from runtime.cpu import build, layout
from runtime.cpu.errors import check as _check
from runtime.cpu.ops import CpuOps
from runtime.cpu.params import derived_zero, f16_params

ISAS = ("portable", "avx2", "avx512")      # index = the C isa code
# From which weight precision the byte-code kernel (kernels_int8.c) replaces the table kernel, per isa.
# Measured one thread, AMD EPYC (Zen 4), M = 1, G = 32 (tools/bench_cpu_kernels.py): with AVX-512 VNNI
# the integer dot products beat the tables at every precision (N x K = 1536x576: W1 22 vs 28 us, W4 25
# vs 57 us; output 49152x576: W1 0.46 vs 0.69 ms, W8 0.78 vs 3.2 ms), the table cost being linear in
# planes; AVX2 has no byte dot product (codes are widened to 16 bits) and wins only from 3 bits.
I8_MIN_BITS = {"portable": 1, "avx2": 3, "avx512": 1}
# Quantized activations: "bytes" (vpdpbusd on codes, kernels_quant.c) or "popcount" (AND + popcount over
# bit planes). Measured one thread, AMD EPYC (Zen 4), SmolLM2 shapes, G = Ga = 32 (tools/bench_cpu_kernels.py,
# bench/results/cpu_quant_bytes.json): the byte kernel wins at every (p, q) measured, W1A1 included.
QUANT_KERNEL = "bytes"


def available_isas() -> list[str]:
    """The kernel paths this machine can run, portable first."""
    _, lib = build.load()
    mask = lib.ab_isa_available()
    return [name for i, name in enumerate(ISAS) if mask >> i & 1]


def a16_block(group: int) -> int:
    """Lanes per int8 table scale of the A16 kernels for weight group `group`."""
    _, lib = build.load()
    return lib.ab_a16_block(group)


@dataclass
class LinearHandle:
    """A weight prepared for this backend: the kernel tiles plus the canonical planes (popcount path)."""
    lin: LinearShape          # the weight's description; its planes are not kept (see prepare_linear)
    wl: np.ndarray | None     # uint8 (Nt, p, Kp/8, 64)   layout.preprocess(planes); None when codes is set
    codes: np.ndarray | None  # uint8 (Nt, Q, 64, 4)   layout.codes_tiles(planes), for p >= i8_min_bits
    wsc: np.ndarray           # float32 (Nt, Kp/G, 64)    layout.tile_rows(scales); float16 a = 2s, see f16_params
    woff: np.ndarray | None   # float32 offsets o, or float16 z = o - r s (the weight of code (2^p - 1 - r)/2)
    planes: np.ndarray | None # uint32 (p, N, Kp/32), kept for the f32 A16 and popcount kernels only
    wcsum: np.ndarray | None  # uint16 (N, Kp/32) code sum per word (popcount path; built on first use)
    qcodes: np.ndarray | None = None   # codes tiles for the quantized-activation byte kernel (lazy)
    wpw: np.ndarray | None = None      # int32 (Nt, Kp/32, 64): 2 * code sum per word, tiled (lazy)
    f16: int = 0              # 0: wsc/woff float32 s, o; r > 0: float16 a = 2s, z = o - r*s (f16_params);
                              # r | k << 16: no woff, z = -k a (derived_zero)

    @property
    def param_dtype(self) -> str:
        """"float16" when the kernels read half-size group parameters (exact, see f16_params), "two-level"
        for float16 d / dmin with 8-bit sub-scales (layout.kq_blob), else "float32"."""
        if self.f16 == layout.KQ_FLAG:
            return "two-level"
        return "float16" if self.wsc.dtype == np.float16 else "float32"

    @property
    def N(self) -> int:
        return self.lin.N

    @property
    def K(self) -> int:
        return self.lin.K


class CpuBackend(CpuOps):
    """threads: pool size (default os.cpu_count()). isa: "avx512" | "avx2" | "portable" | None (best
    available; env ANYBIT_CPU_ISA overrides None). a16: "lut" (16-bit tables, fast) or "f32" (exact float
    path for validation). i8_min_bits: weights with at least this many bits run A16 as byte codes times
    16-bit activations (kernels_int8.c) instead of one table pass per plane; None picks I8_MIN_BITS[isa]
    (9 keeps every weight on the table kernel)."""

    name = "cpu"
    capabilities = frozenset({"compile", "hadamard", "prepare_rows"})

    def __init__(self, threads: int | None = None, isa: str | None = None, a16: str = "lut",
                 i8_min_bits: int | None = None, quant: str | None = None, params: str = "auto"):
        self._ffi, self._lib = build.load()
        have = available_isas()
        isa = isa or os.environ.get("ANYBIT_CPU_ISA") or None
        if isa in (None, "auto"):
            isa = have[-1]
        if isa not in ISAS:
            raise ValueError(f"unknown CPU isa {isa!r}; choose one of {', '.join(ISAS)}")
        if isa not in have:
            raise RuntimeError(f"CPU isa {isa!r} is not supported by this machine (available: {', '.join(have)})")
        if a16 not in ("lut", "f32"):
            raise ValueError(f"a16 must be 'lut' or 'f32', got {a16!r}")
        self.isa, self._isa_code, self.a16 = isa, ISAS.index(isa), a16
        self.i8_min_bits = int(I8_MIN_BITS[isa] if i8_min_bits is None else i8_min_bits)
        self.quant = quant or QUANT_KERNEL
        if self.quant not in ("bytes", "popcount"):
            raise ValueError(f"quant must be 'bytes' or 'popcount', got {quant!r}")
        if params not in ("auto", "float32"):
            raise ValueError(f"params must be 'auto' (float16 where exact) or 'float32', got {params!r}")
        self.params = params
        self.threads = int(threads or os.cpu_count() or 1)
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self._pool = self._lib.ab_pool_create(self.threads)
        if self._pool == self._ffi.NULL:
            raise RuntimeError("could not create the CPU thread pool")

    # ---- lifetime -------------------------------------------------------------------------------
    def close(self) -> None:
        pool, self._pool = getattr(self, "_pool", None), None
        if pool is not None and pool != self._ffi.NULL:
            self._lib.ab_pool_destroy(pool)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def _p(self, ctype: str, a: np.ndarray | None):
        return self._ffi.NULL if a is None else self._ffi.cast(ctype, a.ctypes.data)

    @property
    def _live_pool(self):
        if self._pool is None:
            raise RuntimeError("this CpuBackend is closed")
        return self._pool

    # ---- linears --------------------------------------------------------------------------------
    def prepare_linear(self, lin: PackedLinear) -> LinearHandle:
        if lin.sub is not None:
            return self._prepare_two_level([lin])
        planes = np.ascontiguousarray(lin.planes, dtype=np.uint32)
        p = planes.shape[0]
        bytecodes = p >= self.i8_min_bits
        # float16 group parameters only for the byte-code kernels (the table kernel reads float32)
        half = f16_params(lin.scales, lin.offsets, lin.bits) if bytecodes and self.params == "auto" else None
        if half is not None:
            k = 0 if half[1] is None else derived_zero(half[0], half[1])
            wsc, r = layout.tile_rows(half[0]), half[2] | k << 16
            woff = None if half[1] is None or k else layout.tile_rows(half[1])
        else:
            r = 0
            wsc = layout.tile_rows(np.asarray(lin.scales, np.float32))
            woff = None if lin.offsets is None else layout.tile_rows(np.asarray(lin.offsets, np.float32))
        # the kernels read their tiles; only the float32 A16 kernel and the popcount kernel read the planes
        # on every call, so the handle keeps them for those alone and rebuilds them from the tiles when
        # another path needs them once (_planes): the concatenated planes of fused weights are then freed
        keep = self.a16 == "f32" or self.quant == "popcount"
        return LinearHandle(LinearShape.of(lin), None if bytecodes else layout.preprocess(planes),
                            layout.codes_tiles(planes) if bytecodes else None, wsc, woff,
                            planes if keep else None, None, f16=r)

    def prepare_rows(self, lins: list[PackedLinear], release=None) -> LinearHandle:
        """One handle for linears stacked along N (products that share an input; can_concat_rows must hold). Two-level
        weights are tiled from their parts a chunk of rows at a time, release(views) told of the sources
        once read (a mapped file's pages can go): no concatenated copy, the peak of loading a 7B-shaped
        model. Other forms are concatenated and prepared as one."""
        if not can_concat_rows(lins):
            raise ValueError("prepare_rows: these linears differ in shape, bits, group or parameter form")
        if lins[0].sub is not None:
            return self._prepare_two_level(lins, release)
        h = self.prepare_linear(lins[0] if len(lins) == 1 else concat_rows(lins))
        if release is not None:
            release([a for x in lins for a in (x.planes, x.scales, x.offsets) if a is not None])
        return h

    def _prepare_two_level(self, lins: list[PackedLinear], release=None) -> LinearHandle:
        """Two-level parameters (loader/kquant.py): the byte-code A16 kernel on every isa and precision,
        codes in parts of 1/2/4 bits (a 5-bit code reads 5 bits, not 8) and the parameters as the source
        stored them (layout.kq_blob). The kernels see G = the super-block S (a multiple of 32); the
        header gives the 16- or 32-lane groups inside it. lins: one weight, or several stacked along N."""
        lin, N = lins[0], sum(x.N for x in lins)
        sub = lin.sub if len(lins) == 1 else concat_subscales([x.sub for x in lins])
        codes, parts = layout.kq_codes_tiles([x.planes for x in lins], release=release)
        blob = layout.kq_blob(sub, N, lin.Kp, parts, codes.shape[1])
        if release is not None:
            release([a for x in lins for a in (x.sub.d, x.sub.sc, x.sub.dmin, x.sub.m) if a is not None])
        keep = self.a16 == "f32" or self.quant == "popcount"
        planes = None
        if keep:
            planes = np.ascontiguousarray(lin.planes if len(lins) == 1 else
                                          np.concatenate([x.planes for x in lins], axis=1), dtype=np.uint32)
        # the shape's parameters are read back from the blob when asked (layout.BlobSub), not kept twice
        shape = LinearShape(None, None, lin.bits, sub.S, lin.K, N, lin.Kp, lin.smooth, lin.rotate,
                            layout.BlobSub(blob, N, sub.G, sub.S, sub.c0, sub.nib))
        return LinearHandle(shape, None, codes, blob, None, planes, None, f16=layout.KQ_FLAG)

    @staticmethod
    def _pgroup(lin) -> int:
        """Lanes per group of the weight's parameters (a two-level handle's G is its super-block)."""
        return lin.sub.G if lin.sub is not None else lin.group

    @staticmethod
    def _planes(h: LinearHandle, keep: bool = False) -> np.ndarray:
        """The canonical planes (p, N, Kp/32) uint32: kept ones, or rebuilt exactly from the kernel tiles
        (and kept when a kernel reads them on every call)."""
        if h.planes is None:
            if h.f16 == layout.KQ_FLAG:
                planes = layout.kq_uncodes_tiles(h.codes, h.lin.N, h.lin.bits, h.lin.Kp)
            elif h.codes is not None:
                planes = layout.uncodes_tiles(h.codes, h.lin.N, h.lin.bits)
            else:
                planes = layout.unpreprocess(h.wl, h.lin.N)
            if not keep:
                return planes
            h.planes = planes
        return h.planes

    def _input(self, h: LinearHandle, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != h.lin.K:
            raise ValueError(f"linear input must be (M, {h.lin.K}), got {x.shape}")
        return x

    def _output(self, out, M: int, N: int) -> np.ndarray:
        if out is None:
            return np.empty((M, N), np.float32)
        if out.shape != (M, N) or out.dtype != np.float32 or not out.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous float32 array of shape {(M, N)}")
        return out

    def linear(self, h: LinearHandle, x: np.ndarray, *, abits: int = 16, agroup: int | str | None = None,
               out: np.ndarray | None = None) -> np.ndarray:
        if not isinstance(h, LinearHandle):
            raise ValueError(f"linear needs a LinearHandle from prepare_linear, got {type(h).__name__}")
        ar = 0
        if abits == Q8:          # llama.cpp's 8-bit grid in blocks of agroup lanes, then the A16 product
            ar = check_q8_block(agroup)
        elif (isinstance(abits, bool) or not isinstance(abits, (int, np.integer))
              or not (abits == 16 or 1 <= abits <= 8)):
            raise ValueError(f"abits must be 1..8, 16 or 'q8', got {abits!r}")
        x = self._input(h, x)
        lin = h.lin
        y = self._output(out, x.shape[0], lin.N)
        if abits == 16 or abits == Q8:
            if lin.smooth is not None:
                x = np.ascontiguousarray(x / lin.smooth.astype(np.float32))
            if ar and (self.a16 == "f32" or h.codes is None):
                # the rounding is part of the byte-code kernel's quantizer; the other A16 paths get the
                # rounded row as floats (exact on the Q8_0 grid: 11 x 8 significant bits)
                x, ar = np.ascontiguousarray(q8_values(x, ar), np.float32), 0
            if self.a16 == "f32":
                # locals: a two-level weight's float32 parameters are computed on read, and a pointer
                # into a temporary would outlive it
                sc, of = np.asarray(lin.scales, np.float32), lin.offsets
                of = None if of is None else np.asarray(of, np.float32)
                rc = self._lib.ab_linear_a16_f32(
                    self._live_pool, self._p("uint32_t *", self._planes(h, keep=True)), self._p("float *", sc),
                    self._p("float *", of),
                    lin.bits, lin.N, lin.Kp, self._pgroup(lin), self._p("float *", x), x.shape[0], lin.K, self._p("float *", y))
            elif h.codes is not None:
                args = (self._live_pool, self._isa_code, self._p("uint8_t *", h.codes), self._p("void *", h.wsc),
                        self._p("void *", h.woff), h.f16, lin.bits, layout.container_bits(lin.bits), lin.N, lin.Kp,
                        lin.group, self._p("float *", x), x.shape[0], lin.K)
                y_p = self._p("float *", y)
                rc = self._lib.ab_linear_i8_q8(*args, ar, y_p) if ar else self._lib.ab_linear_i8(*args, y_p)
            else:
                rc = self._lib.ab_linear_a16(
                    self._live_pool, self._isa_code, self._p("uint8_t *", h.wl), self._p("float *", h.wsc),
                    self._p("float *", h.woff), lin.bits, lin.N, lin.Kp, lin.group, self._p("float *", x),
                    x.shape[0], lin.K, self._p("float *", y))
            _check(rc, "linear_a16")
            return y
        self._linear_quant(h, x, abits, agroup, y)
        return y

    def _agroups(self, lin, agroup) -> tuple[int, int]:
        """(Ga as the kernel sees it, block lanes L). Per token -> Ga = Kp (one group over all lanes)."""
        k32 = round_up(lin.K, LANES)
        G = self._pgroup(lin)
        ga = max(G, LANES) if agroup is None else (k32 if agroup == "token" else int(agroup))
        if ga <= 0 or ga % LANES:
            raise ValueError(f"agroup must be a positive multiple of {LANES} or 'token', got {agroup!r}")
        ga = min(ga, k32)
        if ga >= k32:
            return lin.Kp, G
        small, big = sorted((ga, G))
        if big % small:
            raise ValueError(f"activation group {ga} and weight group {G}: the smaller must divide the larger")
        return ga, small

    def quantize_activations(self, x: np.ndarray, abits: int, ga: int, Kp: int, smooth=None):
        """C quantizer: (planes uint32 (q, M, Kp/32), scales f32 (M, ceil(Kp/ga)), code sums uint16 (M, Kp/32))."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if check_bits(abits, "abits") == 16:
            raise ValueError("quantized activations take abits 1..8, got 16")
        if x.ndim != 2:
            raise ValueError(f"activations must be (M, K), got {x.shape}")
        M, K = x.shape
        if Kp % LANES or not K <= Kp or ga <= 0 or ga % LANES:
            raise ValueError(f"quantize_activations: K={K}, Kp={Kp}, group {ga}: Kp and the group must be "
                             f"positive multiples of {LANES} with K <= Kp")
        if smooth is not None and np.shape(smooth) != (K,):
            raise ValueError(f"smooth must be ({K},), got {np.shape(smooth)}")
        W = Kp // LANES
        planes = np.empty((abits, M, W), np.uint32)
        scales = np.empty((M, -(-Kp // ga)), np.float32)
        csum = np.empty((M, W), np.uint16)
        sm = None if smooth is None else np.ascontiguousarray(smooth, dtype=np.float32)
        _check(self._lib.ab_quantize_acts(self._live_pool, self._p("float *", x), M, K, Kp, int(abits), ga,
                                          self._p("float *", sm), self._p("uint32_t *", planes),
                                          self._p("float *", scales), self._p("uint16_t *", csum)),
               "quantize_activations")
        return planes, scales, csum

    def _quant_weights(self, h: LinearHandle) -> None:
        """Build (once) what the byte kernel reads: code tiles (shared with A16 when present), word sums."""
        if h.qcodes is None or h.wpw is None:
            planes = self._planes(h)                                         # once; not kept
            kq = h.f16 == layout.KQ_FLAG          # A16 reads its codes in parts; this kernel whole containers
            if h.qcodes is None:
                h.qcodes = h.codes if h.codes is not None and not kq else layout.codes_tiles(planes)
            if h.wpw is None and kq and h.lin.sub.G == 16:
                h.wpw = layout.tile_rows(layout.code_sums(planes, 16) * 2)    # per 16 lanes (kernels_quant.c wu)
            if h.wpw is None:
                p, N, W = planes.shape
                wpw = np.empty((-(-N // layout.TILE), W, layout.TILE), np.int32)
                self._lib.ab_qd_word_sums(self._p("uint32_t *", planes), p, N, W, self._p("int32_t *", wpw))
                h.wpw = wpw

    def _linear_bytes(self, h, x, abits, agroup, y, debug=False):
        lin = h.lin
        ga, L = self._agroups(lin, agroup)
        if check_bits(abits, "abits") == 16:
            raise ValueError("quantized activations take abits 1..8, got 16")
        self._quant_weights(h)
        M = x.shape[0]
        nb = lin.Kp // L
        dI = np.empty((M, lin.N, nb), np.int64) if debug else None
        dU = np.empty((M, lin.N, nb), np.int64) if debug else None
        sm = None if lin.smooth is None else np.ascontiguousarray(lin.smooth, dtype=np.float32)
        rc = self._lib.ab_linear_qd(
            self._live_pool, self._isa_code, self._p("uint8_t *", h.qcodes), self._p("int32_t *", h.wpw),
            self._p("void *", h.wsc), self._p("void *", h.woff), h.f16, lin.bits, layout.container_bits(lin.bits),
            lin.N, lin.Kp, lin.group, int(abits), ga, L, self._p("float *", x), self._p("float *", sm), M, lin.K,
            self._p("float *", y), self._p("int64_t *", dI), self._p("int64_t *", dU))
        _check(rc, "linear_qd")
        return dI, dU, L

    def _linear_quant(self, h, x, abits, agroup, y, debug=False, kernel=None):
        if (kernel or self.quant) == "bytes" and h.lin.Kp <= 32768:
            return self._linear_bytes(h, x, abits, agroup, y, debug)
        lin = h.lin
        if self._pgroup(lin) % LANES:
            raise ValueError("the popcount kernel needs weight groups of 32 lanes or more; this weight has "
                             f"{self._pgroup(lin)}-lane sub-blocks (use quant='bytes')")
        self._planes(h, keep=True)        # kept already, unless prepared under another kernel choice
        if h.wcsum is None:
            p, N, W = h.planes.shape
            h.wcsum = np.empty((N, W), np.uint16)
            self._lib.ab_code_sums(self._p("uint32_t *", h.planes), p, N, W, self._p("uint16_t *", h.wcsum))
        ga, L = self._agroups(lin, agroup)
        aplanes, ascales, acsum = self.quantize_activations(x, abits, ga, lin.Kp, lin.smooth)
        M = x.shape[0]
        nb = lin.Kp // L
        dI = np.empty((M, lin.N, nb), np.int64) if debug else None
        dU = np.empty((M, lin.N, nb), np.int64) if debug else None
        sc, of = np.asarray(lin.scales, np.float32), lin.offsets      # locals: see linear()
        of = None if of is None else np.asarray(of, np.float32)
        rc = self._lib.ab_linear_quant(
            self._live_pool, self._isa_code, self._p("uint32_t *", h.planes), self._p("uint16_t *", h.wcsum),
            self._p("float *", sc), self._p("float *", of),
            lin.bits, lin.N, lin.Kp, self._pgroup(lin), self._p("uint32_t *", aplanes), self._p("uint16_t *", acsum),
            self._p("float *", ascales), int(abits), ga, L, M, lin.K, self._p("float *", y),
            self._p("int64_t *", dI), self._p("int64_t *", dU))
        _check(rc, "linear_quant")
        return dI, dU, L

    def linear_quant_debug(self, h: LinearHandle, x: np.ndarray, abits: int, agroup=None, kernel=None):
        """(y, I, U, L): the output plus the exact integer block sums I[m, n, b], U[m, n, b] (DESIGN.md).
        kernel "bytes" | "popcount" (None: this backend's choice); the byte kernel's debug run is its
        portable path."""
        x = self._input(h, x)
        y = np.empty((x.shape[0], h.lin.N), np.float32)
        dI, dU, L = self._linear_quant(h, x, abits, agroup, y, debug=True, kernel=kernel)
        return y, dI, dU, L

    def linear_float(self, w: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Unquantized x @ w.T in float32 (NumPy's BLAS is already cache-blocked and threaded)."""
        return np.matmul(np.asarray(x, np.float32), np.asarray(w, np.float32).T)

    # ---- graphs (engine/graph.py) ---------------------------------------------------------------
    def compile(self, graph):
        """The graph as C op records, run per step in one C call (runtime/cpu/program.py)."""
        from runtime.cpu.program import CpuProgram
        return CpuProgram(self, graph)


__all__ = ["CpuBackend", "LinearHandle", "available_isas", "a16_block"]

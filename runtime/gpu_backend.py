"""GpuBackend: the backend interface of docs/DESIGN.md on the CUDA driver API, every op a PTX kernel.

Weights are uploaded once (prepare_linear) through the pool in the GPU layout of runtime/gpu_layout.py;
activations may be NumPy arrays (uploaded, result copied back: the interface's contract) or
runtime.memory.DeviceArray (kept on the device, result a new DeviceArray owned by the caller), so an
engine can run a whole decode step on the device and capture it with `capture_graph`: runtime/gpu_program.py
does that for any graph (compile). The device layer is runtime/gpu_device.py.

Linear paths (which one ran is recorded in `last_path`):
- abits 16: gemv_a16_m1 for one token (sign-flip sums, cost linear in p), else gemv_a16 (dequantizes
  each lane once and serves 4 tokens per pass over the packed planes);
- abits 1..8: actquant, then bgemm_b1 (tensor cores) when M > 8 and the blocks of L = min(G, Ga) lanes
  fit its 128-lane granularity (L % 128 == 0, or one block L >= K), else gemv_q (popcount, any group).
- two-level weights (exact K-quant imports, groups of 16 or 32 lanes; runtime/gpu_device.GpuLinear):
  the same GEMVs, which rebuild each sub-block's scale and offset from d, dmin and the integer
  sub-scales; with quantized activations they take gemv_q for any M (their groups are below bgemm_b1's
  128-lane granularity, as float-table weights with G < 128 are).
- linear_float (wbits 16) has no float GEMM kernel yet: it runs on the host in float32 and says so.

Untested on a GPU at the time of writing: only the interpreter has executed these kernels.
"""
from __future__ import annotations

import numpy as np

from loader.bipolar import PackedLinear, round_up
from runtime.driver import cdiv
from runtime.gpu_device import CudaDevice, GpuLinear
from runtime.gpu_rows import GpuLayoutOps

GEMV_MAX_M = 8           # up to this many tokens the quantized path uses gemv_q instead of bgemm_b1


def bgemm_geometry(M: int, N: int, K: int, p: int, q: int, arch: str, group: int, agroup: int
                   ) -> tuple[tuple, tuple, int]:
    """grid, block, dynamic smem of bgemm_b1, from its staging plan (runtime/staging.plan_bgemm_b1).
    An arch the planner does not know (the interpreter's "sim", a newer GPU) is held to the smallest
    limits it knows (sm_86: 99 KiB per block); the kernel needs at most 48 KiB."""
    from runtime.staging import ARCH_LIMITS, plan_bgemm_b1
    plan = plan_bgemm_b1(M, N, K, p, q, arch if arch in ARCH_LIMITS else "sm_86", group=group, agroup=agroup)
    return plan.grid(), plan.block, plan.smem_bytes


class GpuBackend(GpuLayoutOps):
    name = "cuda"
    capabilities = frozenset({"compile", "device_kv", "hadamard"})

    def __init__(self, threads: int | None = None, *, device: int = 0, pool_limit: int | None = None,
                 dev=None):
        self.threads = threads or 1
        self.dev = dev if dev is not None else CudaDevice(device, pool_limit)
        self._rope: dict[tuple, tuple] = {}
        self._linears: list[GpuLinear] = []
        self.last_path = ""
        self.arena = None       # while set (runtime/gpu_program.py), empty() takes memory from it
        self._programs: list = []

    # ---- plumbing --------------------------------------------------------------------------------
    def close(self) -> None:
        """Release everything, each part even if an earlier one failed (a device fault makes every
        driver call fail); the first error is raised at the end."""
        from runtime.driver import Releaser
        rel = Releaser()
        for m in self._programs:
            rel(m.close)
        self._programs.clear()
        for h in self._linears:
            rel(h.close)
        self._linears.clear()
        for c, s, _ in self._rope.values():
            rel(c.close)
            rel(s.close)
        self._rope.clear()
        rel(self.dev.close)
        rel.done()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def upload(self, a: np.ndarray):
        return self.dev.upload(a)

    def empty(self, shape, dtype=np.float32):
        if self.arena is not None:
            return self.arena.empty(shape, dtype)
        return self.dev.empty(shape, dtype)

    def download(self, d) -> np.ndarray:
        return self.dev.download(d)

    def _launch(self, file, name, grid, block, args, smem=0):
        self.dev.launch(file, name, grid, block, [0 if a is None else (a.ptr if hasattr(a, "ptr") else a)
                                                  for a in args], smem)

    def _is_dev(self, x) -> bool:
        return isinstance(x, self.dev.array_type)

    def _dev(self, x, dtype=np.float32):
        """(device array, was_host) for an input that is either NumPy or a device array."""
        if self._is_dev(x):
            if x.dtype != np.dtype(dtype):
                raise TypeError(f"device array of {x.dtype}, expected {np.dtype(dtype)}")
            return x, False
        if self.arena is not None:      # a device-resident step must not copy (no copies in a graph)
            raise RuntimeError(f"host array {np.shape(x)} passed inside a device-resident step")
        return self.upload(np.ascontiguousarray(x, dtype)), True

    def _finish(self, out, host: bool, temps=()):
        for t in temps:
            t.close()
        if not host:
            return out
        r = self.download(out)
        out.close()
        return r

    # ---- graphs (engine/graph.py) on the device (runtime/gpu_program.py) -----------------------------
    def compile(self, graph):
        """Every activation on the device, decode steps as CUDA graphs. NotImplementedError when an op
        has no device kernel (the engine then interprets the graph op by op)."""
        from runtime.gpu_program import GpuProgram
        p = GpuProgram(self, graph)
        self._programs.append(p)
        return p

    def capture_graph(self, fn):
        """Capture the launches fn() makes on the backend's stream (device-array arguments only)."""
        return self.dev.capture(fn)

    # ---- linear algebra ----------------------------------------------------------------------------
    def prepare_linear(self, lin: PackedLinear) -> GpuLinear:
        h = GpuLinear(self, lin)
        self._linears.append(h)
        return h

    def linear(self, h: GpuLinear, x, *, abits: int = 16, agroup: int | None = None, out=None, residual=None):
        """x W^T, or residual + x W^T with residual (M, N): a residual add fused
        into the GEMV's output store (bgemm_b1: a separate add), bitwise add(residual, x W^T)."""
        if abits == "q8":
            raise ValueError("abits 'q8' (llama.cpp's 8-bit activation rounding) runs on the CPU only; "
                             "the GPU backend has no kernel for it (use device 'cpu')")
        xd, host = self._dev(x)
        M, K = xd.shape
        if K != h.K:
            raise ValueError(f"linear: x has {K} columns, the weight expects K = {h.K}")
        y = self.empty((M, h.N))
        temps = []
        resd = None
        if residual is not None:
            resd, rh = self._dev(residual)
            if tuple(resd.shape) != (M, h.N):
                raise ValueError(f"linear: residual {tuple(resd.shape)}, expected {(M, h.N)}")
            if rh:
                temps.append(resd)
        if abits == 16:
            if h.smooth is not None:
                xs = self.empty((M, K))
                temps.append(xs)
                n = M * K
                self._launch("ops.ptx", "div_cols_f32", (cdiv(n, 256), 1, 1), (256, 1, 1), [xs, xd, h.smooth, n, K])
                xd_use = xs
            else:
                xd_use = xd
            if xd_use.ptr % 4:
                raise ValueError(f"linear: x at {xd_use.ptr:#x} is not 4-byte aligned (a view at an odd offset)")
            # gemv_a16_m1 reads x with 16-byte vector loads, which fault on a GPU (the interpreter stops
            # too) for a caller's view that is only 4-byte aligned: such an x takes gemv_a16
            if M == 1 and xd_use.ptr % 16 == 0:
                self._launch("gemv.ptx", "gemv_a16_m1", (cdiv(h.N, 4), 1, 1), (128, 1, 1),
                             [y, xd_use, h.planes, h.scales, h.offsets, h.N, K, h.Kw, h.p, h.G, h.ngw, resd,
                              *h.kq_args()])
                self.last_path = "gemv_a16_m1"
            else:
                self._launch("gemv.ptx", "gemv_a16", (cdiv(h.N, 4), cdiv(M, 4), 1), (128, 1, 1),
                             [y, xd_use, h.planes, h.scales, h.offsets, M, h.N, K, h.Kw, h.p, h.G, h.ngw, resd,
                              *h.kq_args()])
                self.last_path = "gemv_a16"
        elif 1 <= abits <= 8:
            q = int(abits)
            ga = max(h.G, 32) if agroup is None else int(agroup)    # 16-lane weight groups: Ga 32
            if ga <= 0 or ga % 32:
                raise ValueError(f"agroup must be a positive multiple of 32, got {agroup!r}")
            ga = min(ga, round_up(K, 32))
            big, small = max(ga, h.G), min(ga, h.G)
            if big % small and big < K:
                raise ValueError(f"activation group {ga} and weight group {h.G}: the smaller must divide "
                                 "the larger")
            nga, nch = cdiv(K, ga), h.Kw // 4
            ap, asc, acs = self.empty((q, M, h.Kw), np.uint32), self.empty((M, nga)), self.empty((M, nch), np.uint32)
            temps += [ap, asc, acs]
            self._launch("actquant.ptx", "actquant", (M, 1, 1), (128, 1, 1),
                         [ap, asc, acs, xd, h.smooth, M, K, h.Kw, q, ga, nga, nch], smem=4 * nga)
            L = min(h.G, ga)
            exact_range = L * ((1 << h.p) - 1) * ((1 << q) - 1) < 2 ** 31
            if M > GEMV_MAX_M and (L % 128 == 0 or L >= K) and exact_range and not h.kq:
                grid, block, smem = bgemm_geometry(M, h.N, K, h.p, q, self.dev.arch, h.G, ga)
                self._launch("bgemm_b1.ptx", "bgemm_b1", grid, block,
                             [y, ap, asc, acs, h.planes, h.scales, h.offsets, h.csum, M, h.N, K, h.Kw, h.p, q,
                              h.G, ga, L, nga, h.ngw, nch], smem=smem)
                self.last_path = "bgemm_b1"
                if resd is not None:
                    n = M * h.N
                    self._launch("ops.ptx", "add_f32", (cdiv(n, 256), 1, 1), (256, 1, 1), [y, resd, y, n, n])
            else:
                self._launch("gemv.ptx", "gemv_q", (cdiv(h.N, 4), M, 1), (128, 1, 1),
                             [y, ap, asc, h.planes, h.scales, h.offsets, M, h.N, K, h.Kw, h.p, q, h.G, ga,
                              h.ngw, nga, resd, *h.kq_args()])
                self.last_path = "gemv_q"
        else:
            raise ValueError(f"abits must be 1..8 or 16, got {abits!r}")
        if host:
            temps.append(xd)
        res = self._finish(y, host, temps)
        if out is not None and host:
            out[...] = res
            return out
        return res

    def linear_float(self, w, x):
        """Unquantized reference path: no float GEMM kernel exists yet, so it runs on the host."""
        x = x.to_host() if self._is_dev(x) else np.asarray(x, np.float32)
        self.last_path = "host float32"
        return np.asarray(x, np.float32) @ np.asarray(w, np.float32).T

    # ---- elementwise and normalisation ---------------------------------------------------------------
    def _rows(self, name, x, extra, block=256):
        xd, host = self._dev(x)
        M, d = xd.shape
        out = self.empty((M, d))
        self._launch("ops.ptx", name, (M, 1, 1), (block, 1, 1), [out, xd] + extra(d))
        return xd, host, out

    def rmsnorm(self, x, w, eps):
        wd, wh = self._dev(w)
        xd, host, out = self._rows("rmsnorm_f32", x, lambda d: [wd, d, float(eps)])
        return self._finish(out, host, [t for t, hh in ((xd, host), (wd, wh)) if hh])

    def layernorm(self, x, w, b, eps):
        wd, wh = self._dev(w)
        bd, bh = self._dev(b)
        xd, host, out = self._rows("layernorm_f32", x, lambda d: [wd, bd, d, float(eps)])
        return self._finish(out, host, [t for t, hh in ((xd, host), (wd, wh), (bd, bh)) if hh])

    def _rope_tables(self, theta: float, hd: int, need: int):
        key = (float(theta), int(hd))
        cur = self._rope.get(key)
        if cur is None or cur[2] < need:
            n = max(need, 2 * cur[2] if cur else 4096)
            if cur:
                cur[0].close()
                cur[1].close()
            cur = self._rope[key] = (*self.rope_tables(theta, hd, n), n)
        return cur

    def rope_tables(self, theta: float, hd: int, n: int, freqs=None):
        """cos/sin tables (n, hd/2) float32 from float64 angles, as device arrays the caller owns. freqs:
        per-pair divisors of the frequencies (Llama 3's factors, linear scaling), or None."""
        inv = float(theta) ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)
        if freqs is not None:
            inv = inv / np.asarray(freqs, np.float64)
        ang = np.arange(n, dtype=np.float64)[:, None] * inv[None, :]
        return self.upload(np.cos(ang).astype(np.float32)), self.upload(np.sin(ang).astype(np.float32))

    def rope(self, x, pos, theta, style, tables=None):
        """In place on x (M, H, hd). Tables of cos/sin (float64 angles) are cached per (theta, hd), or
        given (rope_tables(), covering every position in pos: a device-resident step never reads pos)."""
        if style not in ("adjacent", "half"):
            raise ValueError(f"unknown rope style {style!r}")
        xd, host = self._dev(x)
        M, H, hd = xd.shape
        if tables is not None:
            c, s = tables
        else:
            pos_h = pos.to_host() if self._is_dev(pos) else np.asarray(pos, np.int32)
            c, s, _ = self._rope_tables(theta, hd, int(pos_h.max()) + 1 if pos_h.size else 1)
        pd, ph = self._dev(pos, np.int32)
        npairs = M * H * hd // 2
        self._launch("ops.ptx", "rope_f32", (cdiv(npairs, 256), 1, 1), (256, 1, 1),
                     [xd, pd, c, s, npairs, H, hd, 0 if style == "adjacent" else 1])
        if ph:
            pd.close()
        if host:
            x[...] = self.download(xd)
            xd.close()

    def attention(self, q, k_cache, v_cache, n_ctx, q_pos, mask=None):
        qd, qh = self._dev(q)
        kd, kh = self._dev(k_cache)
        vd, vh = self._dev(v_cache)
        pd, ph = self._dev(q_pos, np.int32)
        M, H, hd = qd.shape
        Hkv = kd.shape[1]
        if hd > 128 or H % Hkv:
            raise ValueError(f"attention kernel needs hd <= 128 and H % Hkv == 0 (hd {hd}, H {H}, Hkv {Hkv})")
        md, mh = (None, False) if mask is None else self._dev(np.asarray(mask, bool)[:n_ctx].astype(np.uint8), np.uint8)
        out = self.empty((M, H, hd))
        self._launch("ops.ptx", "attention_f32", (H, M, 1), (32, 1, 1),
                     [out, qd, kd, vd, pd, md, H, Hkv, hd, int(n_ctx), float(1.0 / np.sqrt(hd))])
        temps = [t for t, hh in ((kd, kh), (vd, vh), (pd, ph), (md, mh), (qd, qh)) if hh]
        return self._finish(out, qh, temps)

    def kv_store(self, cache, src, pos):
        """cache[pos[i]] = src[i] on the device (cache a DeviceArray (T, Hkv, hd))."""
        sd, sh = self._dev(src)
        pd, ph = self._dev(pos, np.int32)
        row = int(np.prod(cache.shape[1:]))
        self._launch("ops.ptx", "kv_store", (sd.shape[0], 1, 1), (128, 1, 1), [cache, sd, pd, row])
        for t, hh in ((sd, sh), (pd, ph)):
            if hh:
                t.close()

    def _ew(self, name, arrays, n_extra=()):
        ds = [self._dev(a) for a in arrays]
        n = int(np.prod(ds[0][0].shape))
        out = self.empty(ds[0][0].shape)
        self._launch("ops.ptx", name, (cdiv(n, 256), 1, 1), (256, 1, 1), [out] + [d for d, _ in ds] + [n, *n_extra])
        return self._finish(out, ds[0][1], [d for d, hh in ds if hh])

    def swiglu(self, a, b):
        return self._ew("swiglu_f32", [a, b])

    def gelu(self, x):
        return self._ew("gelu_f32", [x])

    def add(self, a, b, out=None):
        ad, ah = self._dev(a)
        bd, bh = self._dev(b)
        n, nb = int(np.prod(ad.shape)), int(np.prod(bd.shape))
        if nb == 0 or n % nb or tuple(ad.shape[len(ad.shape) - len(bd.shape):]) != tuple(bd.shape):
            raise ValueError(f"add: cannot broadcast {bd.shape} over {ad.shape}")
        o = self.empty(ad.shape)
        self._launch("ops.ptx", "add_f32", (cdiv(n, 256), 1, 1), (256, 1, 1), [o, ad, bd, n, nb])
        res = self._finish(o, ah, [t for t, hh in ((ad, ah), (bd, bh)) if hh])
        if out is not None and ah:
            out[...] = res
            return out
        return res

    def argmax(self, x) -> int:
        xd, host = self._dev(x)
        o = self.empty((2,), np.uint32)
        self._launch("ops.ptx", "argmax_f32", (1, 1, 1), (1024, 1, 1), [o, xd, int(np.prod(xd.shape))])
        r = self.download(o)
        o.close()
        if host:
            xd.close()
        return int(r[0])

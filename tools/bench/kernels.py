"""Kernels: the packed linear on GEMV (decode, M = 1) and GEMM (prefill, M > 1) shapes of real models, at
W1..W8 x A1..A8/A16, beside a peer in the same run (NumPy float32 matmul on the CPU; cuBLAS FP16/INT8
through torch or cupy on a GPU) and beside the machine's measured ceilings (a large memcpy for bandwidth,
the peer's best GEMM for compute).

Figures per row: median time (with spread), effective TOPS = 2*M*N*K / time, GB/s = bytes moved / time
(packed weights + scales [+ offsets] + activations in + outputs out), the ratio to the peer (peer time /
our time: > 1 is faster) and the fractions of the two ceilings.
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np

from tools.bench import machine
from tools.bench.stats import alternate, print_table, result_path, summarize, write_result

SHAPES = {   # model: [(name, N, K)]: y(M, N) = x(M, K) @ W(N, K)^T
    "smollm2-135m": [("q/o", 576, 576), ("k/v", 192, 576), ("gate/up", 1536, 576), ("down", 576, 1536),
                     ("lm_head", 49152, 576)],
    "llama-2-7b": [("q/k/v/o", 4096, 4096), ("gate/up", 11008, 4096), ("down", 4096, 11008)],
    "llama-3-8b": [("q/o", 4096, 4096), ("gate/up", 14336, 4096), ("down", 4096, 14336), ("k/v", 1024, 4096)],
}
DEFAULT_PRECISIONS = "w1a16,w2a16,w4a16,w8a16,w1a1,w2a2,w4a4,w4a8,w8a8"
QUICK_PRECISIONS = "w2a16,w4a16,w8a16,w4a8,w8a8"
ALL_PRECISIONS = ",".join(f"w{w}a{a}" for w in range(1, 9) for a in (*range(1, 9), 16))


def random_linear(rng, N: int, K: int, bits: int, group: int):
    """A PackedLinear of random planes (speed does not depend on the values; shape and bits decide)."""
    from loader.bipolar import PackedLinear
    Kp = -(-K // group) * group
    planes = rng.integers(0, 2**32, (bits, N, Kp // 32), dtype=np.uint64).astype(np.uint32)
    scales = rng.uniform(0.001, 0.01, (N, Kp // group)).astype(np.float32)
    return PackedLinear(planes, scales, None, bits, group, K, N)


def parse_precisions(s: str) -> list[tuple[int, int]]:
    out = []
    for t in s.lower().split(","):
        t = t.strip()
        try:
            w, a = t[1:].split("a")
            wb, ab = int(w), int(a)
        except ValueError:
            raise ValueError(f"precision {t!r}: expected w<1..8>a<1..8|16>, e.g. w4a16") from None
        if not t.startswith("w") or not 1 <= wb <= 8 or not (1 <= ab <= 8 or ab == 16):
            raise ValueError(f"precision {t!r}: weights 1..8 bits, activations 1..8 or 16")
        out.append((wb, ab))
    return out


# ---- ceilings ----------------------------------------------------------------------------------------

def cpu_bandwidth(nbytes: int, reps: int = 5) -> dict:
    """Host memcpy bandwidth in GB/s, counting read + write (what a streaming kernel can hope for)."""
    src = np.ones(nbytes // 8, np.float64)
    dst = np.empty_like(src)
    samples = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        samples.append(time.perf_counter() - t0)
    s = summarize(samples[1:])
    return {"bytes": int(src.nbytes), "gbps": 2 * src.nbytes / s["median"] / 1e9,
            "gbps_best": 2 * src.nbytes / s["min"] / 1e9, "time_s": s}


def cpu_compute(n: int, reps: int = 5) -> dict:
    """NumPy float32 GEMM n^3: the peer's compute ceiling on this machine (TOPS = 1e12 flop/s)."""
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
    np.matmul(a, b)
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        np.matmul(a, b)
        samples.append(time.perf_counter() - t0)
    s = summarize(samples)
    return {"n": n, "tops": 2 * n**3 / s["median"] / 1e12, "tops_best": 2 * n**3 / s["min"] / 1e12, "time_s": s}


# ---- CPU ---------------------------------------------------------------------------------------------

def _row(model, name, N, K, M, prec, samples, nbytes, peer, ceil):
    s = summarize(samples)
    flops = 2.0 * M * N * K
    t = s["median"]
    row = {"model": model, "layer": name, "N": N, "K": K, "M": M, "precision": prec, "time_s": s,
           "tops": flops / t / 1e12, "gbps": nbytes / t / 1e9, "bytes": int(nbytes),
           "intensity": flops / nbytes}
    if peer:
        # median ratio (the headline) and best-vs-best: under load from other processes the fastest
        # sample is the better estimate of what each side can do, and BLAS pools suffer most from load
        row["vs_peer"] = peer["median"] / t
        row["vs_peer_best"] = peer["min"] / s["min"]
    row["frac_bandwidth"] = row["gbps"] / ceil["bandwidth_gbps"]
    row["frac_compute"] = row["tops"] / ceil["compute_tops"] if ceil.get("compute_tops") else None
    return row


def run_cpu(a, shapes, precs, ms, ceil) -> list[dict]:
    from runtime.cpu.backend import CpuBackend
    rng = np.random.default_rng(0)
    rows = []
    with CpuBackend(threads=a.threads, isa=a.isa) as be:
        ceil["isa"] = be.isa
        for model, name, N, K in shapes:
            wf = rng.standard_normal((N, K), dtype=np.float32)
            built = {}
            for wb, ab in precs:
                if wb not in built:
                    lin = random_linear(rng, N, K, wb, a.group)
                    built[wb] = (lin, be.prepare_linear(lin))
            for M in ms:
                x = rng.standard_normal((M, K), dtype=np.float32)
                y = np.empty((M, N), np.float32)
                cands = {"numpy-f32": lambda: np.matmul(x, wf.T, out=y)}
                for wb, ab in precs:
                    h = built[wb][1]
                    cands[f"w{wb}a{ab}"] = (lambda h=h, ab=ab: be.linear(h, x, abits=ab, agroup=a.group, out=y))
                samp = alternate(cands, reps=a.reps, min_time=a.min_time)
                peer = summarize(samp["numpy-f32"])
                act_out = 4 * (M * K + M * N)
                rows.append({**_row(model, name, N, K, M, "numpy-f32", samp.pop("numpy-f32"), 4 * N * K + act_out,
                                    None, ceil), "peer": True})
                for (wb, ab) in precs:
                    rows.append(_row(model, name, N, K, M, f"w{wb}a{ab}", samp[f"w{wb}a{ab}"],
                                     built[wb][0].nbytes + act_out, peer, ceil))
                _progress(rows, model, name, M)
            del built
    return rows


def _progress(rows, model, name, M):
    last = [r for r in rows if r["model"] == model and r["layer"] == name and r["M"] == M]
    best = max((r for r in last if not r.get("peer")), key=lambda r: r.get("vs_peer", 0))
    print(f"[kernels] {model} {name} M={M}: best {best['precision']} x{best.get('vs_peer', 0):.2f} vs peer",
          file=sys.stderr, flush=True)


# ---- GPU ---------------------------------------------------------------------------------------------

def gpu_ceilings(nbytes: int) -> dict:
    """Device-to-device copy bandwidth (read + write) with CUDA events."""
    from runtime import driver
    from runtime.gpu_device import CudaDevice
    dev = CudaDevice()
    try:
        src, dst = dev.empty((nbytes // 4,), np.float32), dev.empty((nbytes // 4,), np.float32)
        d = driver.driver()
        h = driver.stream_handle(dev.stream)
        e0, e1 = driver.Event(), driver.Event()
        samples = []
        for i in range(6):
            e0.record(dev.stream)
            driver.check(d.cuMemcpyDtoDAsync(dst.ptr, src.ptr, nbytes, h), "cuMemcpyDtoDAsync")
            e1.record(dev.stream)
            e1.synchronize()
            if i:
                samples.append(e0.elapsed_ms(e1) / 1e3)
        s = summarize(samples)
        src.close(), dst.close(), e0.close(), e1.close()
        return {"bytes": nbytes, "gbps": 2 * nbytes / s["median"] / 1e9, "time_s": s}
    finally:
        dev.close()


def run_gpu(a, shapes, precs, ms, ceil, notes) -> list[dict]:
    from runtime import driver
    from runtime.gpu_backend import GpuBackend
    from tools.bench.peers import PeerUnavailable, gpu_peer, gpu_peer_gemm
    lib_name, lib = gpu_peer()
    if lib_name is None:
        notes.append(lib)
    rng = np.random.default_rng(0)
    rows = []
    with GpuBackend() as be:
        stream = be.dev.stream
        for model, name, N, K in shapes:
            built = {}
            for wb, _ in precs:
                if wb not in built:
                    lin = random_linear(rng, N, K, wb, a.group)
                    built[wb] = (lin, be.prepare_linear(lin))
            for M in ms:
                xd = be.upload(rng.standard_normal((M, K), dtype=np.float32))
                act_out = 4 * (M * K + M * N)
                peer_med = None
                if lib_name:
                    for dt in ("fp16", "int8"):
                        try:
                            samp = gpu_peer_gemm(lib_name, lib, M, N, K, dt, reps=a.reps)
                        except PeerUnavailable as e:
                            notes.append(f"{model} {name} M={M} {dt}: {e}")
                            continue
                        width = 2 if dt == "fp16" else 1
                        r = _row(model, name, N, K, M, f"cublas-{dt}", samp, width * N * K + act_out, None, ceil)
                        rows.append({**r, "peer": True})
                        if dt == "fp16":
                            peer_med = r["time_s"]
                for wb, ab in precs:
                    h = built[wb][1]

                    def call(h=h, ab=ab):
                        be.linear(h, xd, abits=ab, agroup=a.group).close()
                    call()
                    stream.synchronize()
                    e0, e1 = driver.Event(), driver.Event()
                    samples, inner = [], 10
                    for _ in range(a.reps):
                        e0.record(stream)
                        for _ in range(inner):
                            call()
                        e1.record(stream)
                        e1.synchronize()
                        samples.append(e0.elapsed_ms(e1) / 1e3 / inner)
                    e0.close(), e1.close()
                    r = _row(model, name, N, K, M, f"w{wb}a{ab}", samples, built[wb][0].nbytes + act_out, peer_med, ceil)
                    r["path"] = be.last_path
                    rows.append(r)
                xd.close()
                _progress(rows, model, name, M)
            for _, h in built.values():
                h.close()
    return rows


# ---- command -----------------------------------------------------------------------------------------

def add_args(ap) -> None:
    ap.add_argument("--device", default="all", choices=["cpu", "cuda", "all"],
                    help="all: the CPU, and the GPU where one is usable")
    ap.add_argument("--models", default=None, help=f"comma list of {', '.join(SHAPES)} (default: the first "
                                                   "two; quick: smollm2-135m; --all: every one)")
    ap.add_argument("--precisions", default=None, help=f"default {DEFAULT_PRECISIONS}")
    ap.add_argument("--all", action="store_true", help="every shape, every W1..8 x A1..8/A16")
    ap.add_argument("--m", default=None, help="token counts, comma list (default 1,64; quick 1,16)")
    ap.add_argument("--group", type=int, default=64, help="weight and activation group (default 64)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    ap.add_argument("--isa", default=None, help="CPU kernel path (default: the best available)")
    ap.add_argument("--reps", type=int, default=None, help="minimum alternating rounds (default 7, quick 5)")
    ap.add_argument("--min-time", type=float, default=None, help="seconds per shape (default 1.0, quick 0.3)")
    ap.add_argument("--shape", default=None, help=argparse_hidden())


def argparse_hidden():
    import argparse
    return argparse.SUPPRESS


def select_shapes(a) -> list[tuple[str, str, int, int]]:
    if a.shape:                                     # "NxK" (tests and one-off checks)
        n, k = (int(v) for v in a.shape.lower().split("x"))
        return [("custom", f"{n}x{k}", n, k)]
    names = list(SHAPES) if a.all else (a.models.split(",") if a.models else
                                        (["smollm2-135m"] if a.quick else ["smollm2-135m", "llama-2-7b"]))
    for n in names:
        if n not in SHAPES:
            raise ValueError(f"unknown model {n!r}; choose from {', '.join(SHAPES)}")
    return [(m, name, N, K) for m in names for name, N, K in SHAPES[m]]


def run(a) -> dict:
    threads = a.threads or os.cpu_count() or 1
    a.threads = threads
    shapes = select_shapes(a)
    precs = parse_precisions(a.precisions or (ALL_PRECISIONS if a.all else QUICK_PRECISIONS if a.quick
                                              else DEFAULT_PRECISIONS))
    ms = [int(v) for v in (a.m or ("1,16" if a.quick else "1,64")).split(",")]
    a.reps = a.reps or (5 if a.quick else 7)
    a.min_time = a.min_time if a.min_time is not None else (0.3 if a.quick else 1.0)
    desc = machine.describe(threads)
    desc["load_average_start"] = machine.load_average()
    notes, rows = [], []
    ceil_cpu: dict = {}
    want_gpu = a.device in ("cuda", "all")
    gpu_ok = False
    if want_gpu:
        from runtime import driver
        gpu_ok = driver.available()
        if not gpu_ok:
            if a.device == "cuda":
                raise RuntimeError("--device cuda: no usable NVIDIA GPU (driver, device or cuda-python missing)")
            notes.append("GPU backend skipped: no usable NVIDIA GPU")
    results = {}
    if a.device in ("cpu", "all"):
        bw = cpu_bandwidth((64 if a.quick else 256) << 20)
        cc = cpu_compute(512 if a.quick else 1024)
        ceil_cpu.update(bandwidth_gbps=bw["gbps"], compute_tops=cc["tops"], memcpy=bw, sgemm=cc)
        rows_cpu = run_cpu(a, shapes, precs, ms, ceil_cpu)
        best_peer = max(r["tops"] for r in rows_cpu if r.get("peer"))
        ceil_cpu["compute_tops"] = max(cc["tops"], best_peer)           # the peer's best GEMM
        for r in rows_cpu:                                              # recompute with the final ceiling
            r["frac_compute"] = r["tops"] / ceil_cpu["compute_tops"]
        results["cpu"] = {"backend": "runtime.cpu.backend.CpuBackend", "threads": threads,
                          "peer": "numpy float32 matmul", "ceilings": ceil_cpu, "rows": rows_cpu}
    if gpu_ok:
        ceil_gpu = {"bandwidth_gbps": gpu_ceilings(1 << 30)["gbps"], "compute_tops": None}
        rows_gpu = run_gpu(a, shapes, precs, ms, ceil_gpu, notes)
        peers_t = [r["tops"] for r in rows_gpu if r.get("peer")]
        ceil_gpu["compute_tops"] = max(peers_t) if peers_t else None
        for r in rows_gpu:
            r["frac_compute"] = r["tops"] / ceil_gpu["compute_tops"] if ceil_gpu["compute_tops"] else None
        results["cuda"] = {"backend": "runtime.gpu_backend.GpuBackend", "peer": "cuBLAS (fp16, int8)",
                           "ceilings": ceil_gpu, "rows": rows_gpu}
    desc["load_average_end"] = machine.load_average()
    return {"schema": 1, "bench": "kernels", "machine": desc, "notes": notes,
            "settings": {"group": a.group, "agroup": a.group, "m": ms, "reps": a.reps, "min_time": a.min_time,
                         "quick": a.quick, "precisions": [f"w{w}a{x}" for w, x in precs],
                         "shapes": [f"{m} {n} {N}x{K}" for m, n, N, K in shapes]},
            "devices": results}


def print_report(doc: dict) -> None:
    for dev, res in doc["devices"].items():
        c = res["ceilings"]
        ct = f"{c['compute_tops'] * 1e3:.0f} GOPS" if c.get("compute_tops") else "n/a"
        print(f"\nkernels on {dev} ({doc['machine']['kind']}): ceilings {c['bandwidth_gbps']:.1f} GB/s memcpy, "
              f"{ct} peer GEMM; median (min-max) of alternating rounds")
        hdr = ["shape", "M", "precision", "us", "GOPS", "GB/s", "x peer (best)", "%BW", "%peak"]
        rows = []
        for r in res["rows"]:
            s = r["time_s"]
            rows.append([f"{r['model']} {r['layer']} {r['N']}x{r['K']}", r["M"], r["precision"],
                         f"{s['median'] * 1e6:.1f} ({s['min'] * 1e6:.0f}-{s['max'] * 1e6:.0f})",
                         f"{r['tops'] * 1e3:.1f}", f"{r['gbps']:.1f}",
                         "peer" if r.get("peer") else
                         f"{r.get('vs_peer', float('nan')):.2f} ({r.get('vs_peer_best', float('nan')):.2f})",
                         f"{100 * r['frac_bandwidth']:.0f}",
                         f"{100 * r['frac_compute']:.0f}" if r.get("frac_compute") is not None else "-"])
        print_table(hdr, rows)
    for n in doc["notes"]:
        print(f"note: {n}")
    print("x peer: peer median / our median (> 1: faster); best: fastest sample against fastest sample")


def main(a) -> int:
    doc = run(a)
    print_report(doc)
    if not a.no_save:
        print(f"wrote {write_result(doc, result_path('kernels', doc['machine'], directory=a.out))}")
    return 0

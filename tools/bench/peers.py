"""Peers measured in the same run: llama.cpp (through llama-cpp-python, in its own interpreter) and the
GPU libraries (cuBLAS through torch or cupy). None of them is a dependency of anybit: each is looked
for, used where found, and skipped with a note otherwise.

llama-cpp-python runs in a subprocess (`--llama-python PATH`, an importable llama_cpp, or a venv that
`--install-peers` builds under the cache directory), driven over JSON lines by WORKER_SCRIPT below.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

# Build flags for the on-demand llama.cpp build: native code for this CPU, but no AMX (some
# toolchains advertise AMX that the kernel cannot enable, and the build then crashes at run time).
LLAMA_CMAKE_ARGS = "-DGGML_NATIVE=ON"
LLAMA_CFLAGS = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"

# Runs inside the llama.cpp interpreter. Protocol: one JSON request per stdin line, one JSON reply per
# stdout line. {"cmd": "run", "ids": [...], "max_tokens": n} -> prefill/decode seconds, greedy decode.
WORKER_SCRIPT = r'''
import json, resource, sys, time
import numpy as np
import llama_cpp

def rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

cfg = json.loads(sys.argv[1])
if not cfg.get("repack", True):
    # llama.cpp's CPU "extra buffer types" repack some types (Q4_0, Q4_K, IQ4_NL, ...) into an interleaved
    # copy at load: faster products, but the copy sits beside the mapped file. Off: the file's own blocks.
    import llama_cpp.llama_cpp as _ll
    _defaults = _ll.llama_model_default_params
    def _no_repack():
        p = _defaults()
        p.use_extra_bufts = False
        return p
    _ll.llama_model_default_params = _no_repack
t0 = time.perf_counter()
llm = llama_cpp.Llama(model_path=cfg["model"], n_threads=cfg["threads"], n_threads_batch=cfg["threads"],
                      n_ctx=cfg["n_ctx"], n_batch=cfg["n_ctx"], verbose=False)
print(json.dumps({"ready": True, "load_s": time.perf_counter() - t0, "version": llama_cpp.__version__,
                  "rss_after_load": rss()}), flush=True)

def perf():
    # llama.cpp's own counters (prompt eval and eval milliseconds), where this binding exposes them
    try:
        d = llama_cpp.llama_perf_context(llm._ctx.ctx)
        return {"t_p_eval_ms": d.t_p_eval_ms, "n_p_eval": d.n_p_eval, "t_eval_ms": d.t_eval_ms,
                "n_eval": d.n_eval}
    except Exception:
        return None

for line in sys.stdin:
    req = json.loads(line)
    if req.get("cmd") != "run":
        break
    ids, n = req["ids"], req["max_tokens"]
    llm.reset()
    try:
        llama_cpp.llama_perf_context_reset(llm._ctx.ctx)
    except Exception:
        pass
    t0 = time.perf_counter()
    llm.eval(ids)
    tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    t1 = time.perf_counter()                    # first token known: prefill + one sampling
    out = [tok]
    while len(out) < n:
        llm.eval([tok])
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(tok)
    t2 = time.perf_counter()
    p = perf()
    rep = {"prompt_tokens": len(ids), "generated_tokens": len(out), "ttft_s": t1 - t0,
           "prompt_tok_s": len(ids) / (t1 - t0), "decode_tok_s": (len(out) - 1) / (t2 - t1) if len(out) > 1 else 0.0,
           "peak_rss_bytes": rss(), "ids": out, "llama_perf": p}
    if p and p["t_p_eval_ms"] > 0 and p["t_eval_ms"] > 0:
        rep["own_prompt_tok_s"] = p["n_p_eval"] / p["t_p_eval_ms"] * 1e3
        rep["own_decode_tok_s"] = p["n_eval"] / p["t_eval_ms"] * 1e3
    print(json.dumps(rep), flush=True)
'''


class PeerUnavailable(RuntimeError):
    """A peer is not installed or failed to start; the message says how to get it."""


class JsonWorker:
    """A subprocess that answers one JSON line per request line (ours or a peer's, same protocol)."""

    def __init__(self, argv: list[str], env: dict | None = None, name: str = "worker"):
        self.name = name
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env)
        self.ready = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read()[-2000:]
            self.proc.wait()
            raise PeerUnavailable(f"{self.name} exited (status {self.proc.returncode}): {err.strip()}")
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            raise PeerUnavailable(f"{self.name} printed something that is not JSON: {line[:200]!r}") from None

    def request(self, req: dict) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def thread_env(threads: int) -> dict:
    """Environment that pins BLAS/OpenMP pools to `threads`, so that every side uses the same cores."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    return env


def _has_llama(python: str) -> str | None:
    """llama_cpp's version when `python` can import it, else None."""
    try:
        r = subprocess.run([python, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                           capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def llama_venv_dir() -> Path:
    from loader.fetch import cache_dir
    return cache_dir() / "bench" / "llama-venv"


def install_llama(log=sys.stderr) -> str:
    """Build llama-cpp-python into a venv of its own under the cache dir (minutes: it compiles C++)."""
    venv = llama_venv_dir()
    py = venv / "bin" / "python"
    if not py.exists():
        print(f"creating {venv} ...", file=log, flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = dict(os.environ, CMAKE_ARGS=LLAMA_CMAKE_ARGS, CFLAGS=LLAMA_CFLAGS, CXXFLAGS=LLAMA_CFLAGS)
    print("installing llama-cpp-python (builds llama.cpp from source; several minutes on few cores) ...",
          file=log, flush=True)
    r = subprocess.run([str(py), "-m", "pip", "install", "--disable-pip-version-check", "llama-cpp-python", "numpy"],
                       env=env, stdout=log, stderr=log)
    if r.returncode != 0:
        raise PeerUnavailable(f"pip install llama-cpp-python failed (status {r.returncode}); see the log above")
    return str(py)


def find_llama(python: str | None = None, install: bool = False) -> tuple[str | None, str]:
    """(interpreter with llama_cpp, note). Order: the given PATH, $ANYBIT_LLAMA_PYTHON, this interpreter,
    the cache venv; --install-peers builds the venv when none is found."""
    cands = [python] if python else []
    if os.environ.get("ANYBIT_LLAMA_PYTHON"):
        cands.append(os.environ["ANYBIT_LLAMA_PYTHON"])
    cands += [sys.executable, str(llama_venv_dir() / "bin" / "python")]
    for c in cands:
        if c and Path(c).exists():
            v = _has_llama(c)
            if v:
                return c, f"peer: llama-cpp-python {v}"
            if c == python:
                return None, f"{python} cannot import llama_cpp"
    if install:
        try:
            py = install_llama()
        except (PeerUnavailable, OSError, subprocess.SubprocessError) as e:
            return None, f"llama.cpp peer skipped: {e}"
        v = _has_llama(py)
        return (py, f"peer: llama-cpp-python {v}") if v else (None, "llama.cpp peer skipped: installed but not importable")
    return None, ("llama.cpp peer skipped: llama_cpp not found (give --llama-python PATH, or --install-peers to "
                  "build it into a venv under the cache dir)")


def start_llama(python: str, model: str, threads: int, n_ctx: int = 512, repack: bool = True) -> JsonWorker:
    """repack False: llama.cpp without its repacked weight copies (use_extra_bufts off)."""
    cfg = json.dumps({"model": str(model), "threads": threads, "n_ctx": n_ctx, "repack": repack})
    return JsonWorker([python, "-c", WORKER_SCRIPT, cfg], env=thread_env(threads), name="llama.cpp worker")


# ---- GPU peers: cuBLAS through torch or cupy ---------------------------------------------------------

def gpu_peer():
    """(module name, module) of the first importable GPU array library with a working device, or
    (None, note)."""
    try:
        import torch
        if torch.cuda.is_available():
            return "torch", torch
        note = "torch present but sees no CUDA device"
    except ImportError:
        note = "torch not installed"
    try:
        import cupy
        cupy.cuda.runtime.getDeviceCount()
        return "cupy", cupy
    except Exception as e:                      # ImportError, or cupy without a usable device
        note += f"; cupy unavailable ({type(e).__name__})"
    return None, f"cuBLAS peer skipped: {note} (pip install torch or cupy to compare)"


def gpu_peer_gemm(lib_name: str, lib, M: int, N: int, K: int, dtype: str, reps: int = 20) -> list[float]:
    """Seconds per call of cuBLAS x(M,K) @ w(N,K)^T in fp16 or int8, timed with CUDA events."""
    if lib_name == "torch":
        torch = lib
        if dtype == "fp16":
            x = torch.randn(M, K, device="cuda", dtype=torch.float16)
            w = torch.randn(N, K, device="cuda", dtype=torch.float16)
            fn = lambda: x @ w.t()                               # noqa: E731
        else:
            if M <= 16 or K % 8 or N % 8:
                raise PeerUnavailable("torch._int_mm needs M > 16 and K, N multiples of 8")
            x = torch.randint(-127, 127, (M, K), device="cuda", dtype=torch.int8)
            w = torch.randint(-127, 127, (K, N), device="cuda", dtype=torch.int8)
            fn = lambda: torch._int_mm(x, w)                     # noqa: E731
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        sync = torch.cuda.synchronize
    else:
        cp = lib
        if dtype != "fp16":
            raise PeerUnavailable("int8 GEMM through cupy is not wired up")
        x = cp.random.standard_normal((M, K), dtype=cp.float32).astype(cp.float16)
        w = cp.random.standard_normal((N, K), dtype=cp.float32).astype(cp.float16)
        fn = lambda: x @ w.T                                      # noqa: E731
        start, end = cp.cuda.Event(), cp.cuda.Event()
        sync = cp.cuda.Device().synchronize
    for _ in range(3):
        fn()
    sync()
    out = []
    inner = 10
    for _ in range(reps):
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        ms = start.elapsed_time(end) if lib_name == "torch" else lib.cuda.get_elapsed_time(start, end)
        out.append(ms / 1e3 / inner)
    return out

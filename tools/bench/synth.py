"""synth: decode speed of a random-weight decoder with the shapes of a large model (default Llama-2-7B).

No such model can be fetched here, and decode speed depends on shapes and bit widths, not on the values:
random planes and scales run the same kernels as real weights. Per precision: prefill of a short prompt,
then single-token decode steps through the engine's decoder (engine.decoder.Decoder: the compiled graph, the C
forward on the CPU, the device-resident forward with CUDA graphs on a GPU), each step timed alone.
Figures: tokens/s (median step, with spread), the packed weight bytes every step streams, that rate in
GB/s, and its fraction of the machine's measured copy bandwidth (host memcpy on the CPU, a device copy
on the GPU): how close decode comes to the memory-bound ceiling. There is no peer in this bench (no
other runtime can load these random weights); the ratio is to the bandwidth ceiling.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

from tools.bench import machine
from tools.bench.stats import print_table, report_and_save, summarize

SYNTH = {   # Llama-family shapes: d, layers, heads, kv heads, ffn, vocab
    "llama-2-7b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008, vocab_size=32000),
    "llama-3-8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336, vocab_size=128256),
    "smollm2-135m": dict(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536, vocab_size=49152),
}
DEFAULT_PRECISIONS = "w4a16,w2a16"


def synth_model(shape: str, wbits: int, group: int, layers: int | None = None, seed: int = 0):
    """A PackedModel of random planes with `shape`'s dimensions; the output head at
    loader.pack.default_head_bits, tied to the embedding as in the default model."""
    from loader.pack import PackedModel, default_head_bits
    from loader.source import ModelConfig
    from tools.bench.kernels import random_linear
    if shape not in SYNTH:
        raise ValueError(f"unknown shape {shape!r}; choose from {', '.join(SYNTH)}")
    s = dict(SYNTH[shape])
    if layers is not None:
        if layers <= 0:
            raise ValueError(f"--layers must be positive, got {layers}")
        s["n_layers"] = layers
    cfg = ModelConfig(arch="llama", max_seq_len=4096, norm_eps=1e-5, tied_embeddings=True, **s)
    rng = np.random.default_rng(seed)
    d, F, hd = cfg.dim, cfg.ffn_dim, cfg.head_dim
    qd, kd = cfg.n_heads * hd, cfg.n_kv_heads * hd
    t = {"norm": np.ones(d, np.float32),
         "output": random_linear(rng, cfg.vocab_size, d, default_head_bits(wbits, None), group)}
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        t[p + "attn_norm"] = t[p + "ffn_norm"] = np.ones(d, np.float32)
        for name, N, K in (("wq", qd, d), ("wk", kd, d), ("wv", kd, d), ("wo", d, qd), ("w_gate", F, d),
                           ("w_up", F, d), ("w_down", d, F)):
            t[p + name] = random_linear(rng, N, K, wbits, group)
        print(f"\r  random {shape} W{wbits}: layer {i + 1}/{cfg.n_layers}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return PackedModel(cfg, t, "", {"wbits": wbits, "group": group, "synthetic": shape})


def weight_bytes_per_token(pm) -> int:
    """Bytes a decode step reads: every packed linear once (the tied table only for the head)."""
    from loader.bipolar import PackedLinear
    return sum(t.nbytes for t in pm.tensors.values() if isinstance(t, PackedLinear))


def run_one(pm, device: str, threads: int, abits: int, prompt: int, steps: int) -> dict:
    from engine.decoder import Decoder
    from runtime.interpret import Interpreter
    from runtime.select import select_backend
    be = select_backend(device, threads)
    try:
        t0 = time.perf_counter()
        dec = Decoder(pm, be, abits=abits, context=prompt + steps + 8)
        prep = time.perf_counter() - t0
        cache = dec.new_cache()
        V = pm.config.vocab_size
        ids = [(7 * i + 1) % V for i in range(prompt)]
        t0 = time.perf_counter()
        dec.forward(ids, cache)
        prefill = time.perf_counter() - t0
        samples = []
        for i in range(steps + 2):                     # two warm-up steps (the GPU's first captures)
            t0 = time.perf_counter()
            dec.forward([(13 * i + 5) % V], cache)
            if i >= 2:
                samples.append(time.perf_counter() - t0)
        cache.close()
        return {"fast": not isinstance(dec.program, Interpreter), "prepare_s": prep, "prefill_tok_s": prompt / prefill, "step_s": summarize(samples)}
    finally:
        be.close()


def run(a) -> dict:
    from tools.bench.kernels import cpu_bandwidth, gpu_ceilings, parse_precisions
    threads = a.threads or os.cpu_count() or 1
    if a.device == "cuda":
        from runtime import driver
        if not driver.available():
            raise RuntimeError("--device cuda: no usable NVIDIA GPU (driver, device or cuda-python missing)")
        bw = gpu_ceilings(1 << 30)["gbps"]
    else:
        bw = cpu_bandwidth(256 << 20)["gbps"]
    steps = a.steps or (8 if a.quick else 32)
    rows = []
    for wb, ab in parse_precisions(a.precisions or DEFAULT_PRECISIONS):
        pm = synth_model(a.shape, wb, a.group, a.layers)
        nbytes = weight_bytes_per_token(pm)
        r = run_one(pm, a.device, threads, ab, a.prompt_tokens, steps)
        del pm
        t = r["step_s"]["median"]
        row = {"precision": f"w{wb}a{ab}", "layers": a.layers or SYNTH[a.shape]["n_layers"], "fast": r["fast"],
               "decode_tok_s": 1.0 / t, "decode_tok_s_best": 1.0 / r["step_s"]["min"], "step_s": r["step_s"],
               "prefill_tok_s": r["prefill_tok_s"], "prepare_s": r["prepare_s"], "weight_bytes": nbytes,
               "gbps": nbytes / t / 1e9, "frac_bandwidth": nbytes / t / 1e9 / bw}
        rows.append(row)
        print(f"  {row['precision']}: {row['decode_tok_s']:.2f} tok/s, {row['gbps']:.1f} GB/s "
              f"({100 * row['frac_bandwidth']:.0f}% of {bw:.1f} GB/s)", file=sys.stderr, flush=True)
    desc = machine.describe(threads, gpu=a.device == "cuda")
    return {"bench": "synth", "schema": 1, "machine": desc, "device": a.device, "shape": a.shape,
            "group": a.group, "threads": threads, "prompt_tokens": a.prompt_tokens, "steps": steps,
            "bandwidth_gbps": bw, "rows": rows}


def print_report(doc: dict) -> None:
    print(f"\nsynth {doc['shape']} ({doc['rows'][0]['layers'] if doc['rows'] else '?'} layers, random weights) "
          f"on {doc['device']} ({doc['machine']['kind']}), copy bandwidth {doc['bandwidth_gbps']:.1f} GB/s")
    print_table(["precision", "decode tok/s", "best", "weights MB/token", "GB/s", "of bandwidth", "prefill tok/s"],
                [[r["precision"], f"{r['decode_tok_s']:.2f}", f"{r['decode_tok_s_best']:.2f}",
                  f"{r['weight_bytes'] / 1e6:.0f}", f"{r['gbps']:.1f}", f"{100 * r['frac_bandwidth']:.0f}%",
                  f"{r['prefill_tok_s']:.1f}"] for r in doc["rows"]])


def add_args(ap) -> None:
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--shape", default="llama-2-7b", choices=list(SYNTH))
    ap.add_argument("--precisions", default=None, help=f"comma list (default {DEFAULT_PRECISIONS})")
    ap.add_argument("--group", type=int, default=64, help="weight group (default 64)")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers than the shape has (quick runs)")
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--steps", type=int, default=None, help="timed decode steps (default 32, quick 8)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    ap.add_argument("--write-gguf", type=Path, default=None, metavar="PATH",
                    help="instead of timing: write a random Q4_0 GGUF of --shape (--layers) with the default "
                         "model's tokenizer, for `tools.bench e2e --model PATH` beside llama.cpp")
    ap.add_argument("--qtype", default="Q4_0", help="GGUF type of --write-gguf's weights: Q4_0, or Q4_K, Q5_0, "
                                                    "Q6_K, ... (loader/kquant.py)")


def _type_bits(qtype: str) -> int:
    """The precision that imports a --qtype file exactly (its own bits)."""
    from loader.pack import EXACT_BITS
    return EXACT_BITS.get(qtype, 4)


def main(a) -> int:
    if a.write_gguf is not None:
        from loader.fetch import default_model_path
        from tools.bench.synth_gguf import write_random_gguf
        shape = dict(SYNTH[a.shape], name=a.shape, **({"n_layers": a.layers} if a.layers else {}))
        path = write_random_gguf(shape, a.write_gguf, default_model_path("decoder"), qtype=a.qtype)
        print(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB); time it beside llama.cpp with\n"
              f"  python -m tools.bench e2e --model {path} --precisions w{_type_bits(a.qtype)}a16")
        return 0
    return report_and_save(a, run(a), "synth", print_report)

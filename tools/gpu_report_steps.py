"""The steps of tools.gpu_report, each run in its own process: `fn(ctx) -> dict` with an "ok" key.

ctx: `out` (the --out folder or None), `tmp` (a private scratch folder), `dry_run` (no GPU: run against
the PTX interpreter, or return {"skipped": reason}), `seed`. A step imports only what it needs, so a
missing optional package (gguf, cffi, torch) fails or skips that step alone, with its name.
"""
from __future__ import annotations

import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
GPU_TEST_MODULES = ("tests/test_gpu_runtime.py", "tests/test_kernels_gpu.py")
OPTIONAL = ("torch", "gguf", "cffi", "pycparser", "cuda.bindings", "nvidia.nvjitlink", "safetensors",
            "tokenizers", "hypothesis", "matplotlib")


def _has(mod: str) -> bool:
    try:
        return importlib.util.find_spec(mod) is not None
    except (ImportError, ValueError):
        return False


# ---- 1. the machine ----------------------------------------------------------------------------------

def step_device(ctx) -> dict:
    from runtime import driver
    info = {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count(),
            "numpy": np.__version__, "packages": {m: _has(m) for m in OPTIONAL}}
    if ctx["dry_run"]:
        try:
            driver.init()
            info["gpu"] = "present (not used: --dry-run)"
        except Exception as e:                 # NoGpuError and friends: the reason is the record
            info["gpu"] = f"none: {e}"
        return {"ok": True, **info}
    p = driver.query_props(0)
    info["device"] = {**p.__dict__, "arch": p.arch}
    if _has("torch"):
        import torch
        info["torch"] = {"version": torch.__version__, "cuda": torch.version.cuda,
                         "cuda_available": bool(torch.cuda.is_available())}
    return {"ok": True, **info}


# ---- 2. kernels: GPU against the interpreter, bit for bit on integer outputs ---------------------------

def step_kernels(ctx) -> dict:
    from tools import kernelcheck as kc
    runners = [kc.SimRunner()]
    if not ctx["dry_run"]:
        runners.append(kc.GpuRunner())
    try:
        res = kc.run_all(runners, ctx["seed"], True, None)
    finally:
        for r in runners:
            r.close()
    rows = [{"case": r.case, "shape": r.shape, "ok": bool(r.ok), "err": float(r.err), "note": r.note}
            for r in res]
    bad = [f"{r['case']} {r['shape']}: {r['note']}" for r in rows if not r["ok"]]
    return {"ok": not bad, "runners": [r.name for r in runners], "seed": ctx["seed"],
            "passed": len(rows) - len(bad), "failed": len(bad), "failures": bad[:50], "rows": rows}


# ---- 3. engine: greedy tokens and logits, GPU (or interpreter) against the host backends ----------------

def random_decoder(d: int, layers: int, heads: int, kv_heads: int, ffn: int, vocab: int, seed: int):
    """A llama-shaped SourceModel of random float32 weights (scaled like trained ones: unit-variance
    outputs), a BPE vocabulary of placeholder tokens t0, t1, ...: the engine runs on token ids. Nothing to download or carry."""
    from loader.source import ModelConfig, SourceModel, SourceTensor
    rng = np.random.default_rng(seed)
    hd = d // heads
    shapes = {"output": (vocab, d), "norm": (d,)}
    for i in range(layers):
        p = f"layers.{i}."
        shapes.update({p + "attn_norm": (d,), p + "ffn_norm": (d,), p + "wq": (heads * hd, d),
                       p + "wk": (kv_heads * hd, d), p + "wv": (kv_heads * hd, d), p + "wo": (d, heads * hd),
                       p + "w_gate": (ffn, d), p + "w_up": (ffn, d), p + "w_down": (d, ffn)})
    arrays = {n: (1 + 0.1 * rng.standard_normal(s) if len(s) == 1 else rng.standard_normal(s) / np.sqrt(s[-1]))
              .astype(np.float32) for n, s in shapes.items()}
    cfg = ModelConfig(arch="llama", dim=d, n_layers=layers, n_heads=heads, n_kv_heads=kv_heads, ffn_dim=ffn,
                      vocab_size=vocab, max_seq_len=256, norm_eps=1e-5, rope_theta=10000.0,
                      rope_style="adjacent", tied_embeddings=True, eos_ids=[])
    tensors = {n: SourceTensor(n, a.shape, (lambda a=a: a)) for n, a in arrays.items()}
    tok = json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {f"t{i}": i for i in range(vocab)},
                                                  "merges": []}})
    return SourceModel(cfg, tensors, tok, "random")


# (wbits, abits, group, agroup): the paths the engine takes on the device: gemv_a16 / gemv_a16_m1,
# per-token activations on rotated inputs (gemv_q, bgemm_b1 for the prompt), grouped activations.
ENGINE_PRECISIONS = ((4, 16, 32, None), (8, 8, 32, "token"), (4, 8, 128, 128))
ENGINE_SHAPE = dict(d=576, layers=4, heads=9, kv_heads=3, ffn=1536, vocab=8192)      # SmolLM2-135M widths
ENGINE_SHAPE_SIM = dict(d=64, layers=1, heads=2, kv_heads=1, ffn=64, vocab=32)        # interpreter-sized


ROW_TOL = 1e-2        # relative error of a logits row beyond which the row is wrong, tie or not


def _compare_logits(got: np.ndarray, ref: np.ndarray) -> dict:
    """Per-row relative error and argmax agreement. A disagreement is a tie, not a failure, where the row
    is otherwise accurate (error < ROW_TOL) and the reference's top two are closer than twice that error."""
    scale = np.abs(ref).max(axis=1)
    err = np.abs(got - ref).max(axis=1) / np.maximum(scale, 1e-30)
    top2 = np.sort(ref, axis=1)[:, -2:]
    margin = (top2[:, 1] - top2[:, 0]) / np.maximum(scale, 1e-30)
    differ = got.argmax(1) != ref.argmax(1)
    return {"max_rel_err": float(err.max()), "argmax_differs": int(differ.sum()),
            "argmax_differs_not_tie": int((differ & ((err >= ROW_TOL) | (margin >= 2 * err))).sum())}


def step_engine(ctx) -> dict:
    """Per precision: greedy tokens on the device (engine.Model over GpuBackend; in --dry-run over the
    interpreter) and on the host (NumPy backend; the C backend too where cffi and a compiler exist), and
    all prompt+generated logits of both (teacher-forced on the host's tokens)."""
    from engine.api import Model
    from engine.model_store import default_recipe
    from loader.pack import quantize_model
    from runtime.gpu_backend import GpuBackend
    from runtime.numpy_backend import NumpyBackend
    # the interpreter takes seconds per launch: in a dry run one precision, one prompt token, two steps
    shape = ENGINE_SHAPE_SIM if ctx["dry_run"] else ENGINE_SHAPE
    n_prompt, n_gen = (1, 2) if ctx["dry_run"] else (24, 16)
    precisions = ENGINE_PRECISIONS[:1] if ctx["dry_run"] else ENGINE_PRECISIONS
    src = random_decoder(**shape, seed=ctx["seed"])
    prompt = [int(i) for i in np.random.default_rng(ctx["seed"]).integers(0, shape["vocab"], n_prompt)]
    n_check = 1 if ctx["dry_run"] else n_gen        # generated tokens in the teacher-forced logits check
    out = {"shape": shape, "prompt_tokens": n_prompt, "max_tokens": n_gen, "precisions": {},
           "device_is": "the PTX interpreter (tools.ptxsim)" if ctx["dry_run"] else "the GPU"}

    def device_backend():
        if ctx["dry_run"]:
            from tools.kernel_runners import SimDevice
            return GpuBackend(dev=SimDevice())
        return GpuBackend()

    backends = {"numpy": NumpyBackend, "device": device_backend}     # the reference first
    try:
        from runtime.cpu.backend import CpuBackend
        CpuBackend(threads=1).close()
        backends["cpu"] = CpuBackend
    except Exception as e:                     # no cffi, no compiler: the NumPy backend is the reference
        out["cpu_backend"] = f"unavailable ({type(e).__name__}: {e}); compared with the NumPy backend only"
    for wbits, abits, group, agroup in precisions:
        recipe = default_recipe("decoder", wbits, abits, group, agroup)
        pm = quantize_model(src, recipe)
        runs, logits = {}, {}
        for label, make in backends.items():
            be = make()
            with Model(pm, be, wbits=wbits, abits=abits, agroup=agroup) as m:
                g = m.generate(prompt, max_tokens=n_gen)
                runs[label] = {"backend": be.name, "ids": [int(i) for i in g.ids],
                               "decode_tok_s": round(g.decode_tok_s, 2), "prompt_tok_s": round(g.prompt_tok_s, 2)}
                if label in ("numpy", "device"):     # teacher-forced on the reference's tokens
                    logits[label] = np.asarray(m.logits(prompt + runs["numpy"]["ids"][:n_check]), np.float64)
        cmp = _compare_logits(logits["device"], logits["numpy"])
        out["precisions"][f"W{wbits}A{abits}" + (f"-{agroup}" if agroup else "")] = {
            "recipe": {"group": recipe.group, "agroup": recipe.agroup, "rotate": recipe.rotate},
            "runs": runs, "same_tokens_as_numpy": {k: v["ids"] == runs["numpy"]["ids"] for k, v in runs.items()
                                                   if k != "numpy"},
            "logits_vs_numpy": cmp, "ok": cmp["argmax_differs_not_tie"] == 0 and cmp["max_rel_err"] < ROW_TOL}
    out["ok"] = all(r["ok"] for r in out["precisions"].values())
    return out


# ---- 4. pytest on the GPU test modules only -----------------------------------------------------------

def step_pytest(ctx) -> dict:
    """`pytest -m gpu` over the GPU test modules only: collecting all of tests/ would import modules that
    need gguf or cffi. The interpreter-equality test is left to the kernels step (it ran there)."""
    junit = Path(ctx["out"] or ctx["tmp"]) / "gpu-junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "-k",
           "not equal_interpreter", f"--junitxml={junit}", *GPU_TEST_MODULES]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    print(p.stdout[-20000:], p.stderr[-5000:], sep="\n")
    import xml.etree.ElementTree as ET
    if not junit.exists():
        return {"ok": False, "returncode": p.returncode, "error": "pytest wrote no junit file",
                "tail": (p.stdout + p.stderr)[-3000:]}
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    failed = [tc.get("classname", "") + "::" + tc.get("name", "") for tc in suite.iter("testcase")
              if tc.find("failure") is not None or tc.find("error") is not None]
    counts = {k if k == "tests" else f"n_{k}": int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    # collection errors (an import that fails) show up as errors with no test run: never ok
    ok = p.returncode == 0 and counts["n_errors"] == 0
    if ctx["dry_run"]:                         # collected, and every test skipped for want of a GPU
        ok = ok and counts["tests"] > 0 and counts["n_skipped"] == counts["tests"]
    return {"ok": ok, "returncode": p.returncode, **counts, "failed": failed, "junit": junit.name,
            "tail": p.stdout[-1500:]}


# ---- 5. benchmarks (GPU only: interpreter timings mean nothing) ----------------------------------------

def _bench(ctx, sub: str, args: list[str], tag: str) -> dict:
    if ctx["dry_run"]:
        return {"ok": True, "skipped": f"bench {sub} times the GPU; the interpreter's timings mean nothing"}
    tmp = Path(ctx["tmp"]) / f"bench-{sub}"
    tmp.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "tools.bench", sub, "--device", "cuda", "--quick", "--out", str(tmp), *args]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    print(p.stdout[-20000:], p.stderr[-5000:], sep="\n")
    results = []
    for f in sorted(tmp.glob("*.json")):
        results.append(json.loads(f.read_text()))
        for dest in ([Path(ctx["out"])] if ctx["out"] else []) + ([ROOT / "bench" / "results"]):
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, dest / (f"bench-{tag}.json" if dest != ROOT / "bench" / "results" else f.name))
    return {"ok": p.returncode == 0, "returncode": p.returncode, "command": " ".join(cmd[1:]),
            "results": results, "tail": (p.stdout + p.stderr)[-3000:]}


def step_bench_kernels(ctx) -> dict:
    """Our linears against cuBLAS fp16 / int8 through torch, at the default model's shapes."""
    return _bench(ctx, "kernels", [], "kernels")


def step_bench_synth(ctx) -> dict:
    """Decode speed at the default model's shapes (random weights: the 94 MB model cannot be carried)
    and at Llama-2-7B's with two layers (its per-layer host-side packing costs seconds)."""
    a = _bench(ctx, "synth", ["--shape", "smollm2-135m"], "synth-smollm2")
    if a.get("skipped") or not a["ok"]:
        return a
    b = _bench(ctx, "synth", ["--shape", "llama-2-7b", "--layers", "2"], "synth-llama7b")
    return {"ok": b["ok"], "smollm2_135m": a, "llama_2_7b_2layers": b}

"""llama.cpp's logits for given token ids, for any GGUF file: the oracle side of the architecture tests.

    python -m tools.llama_logits MODEL.gguf --ids 5,17,42 --text "Hello" [--greedy 32] --out logits.npz

llama-cpp-python runs in its own interpreter (found by tools.bench.peers.find_llama: $ANYBIT_LLAMA_PYTHON
or the venv under the cache dir), in a subprocess, since anybit does not depend on it. Per prompt it
evaluates the ids from position 0 (no BOS is added: the ids are the whole input) and returns the logits
of every position, float32 (len(ids), vocab); with --greedy N also llama.cpp's greedy continuation.
K and V are cached in float32 where the binding allows, so the comparison is not blurred by float16 keys.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# runs inside the llama-cpp-python interpreter: stdlib, numpy and llama_cpp only
WORKER = r'''
import inspect, json, sys
import numpy as np
from llama_cpp import Llama
req = json.loads(sys.argv[1])
kw = dict(model_path=req["model"], n_ctx=req["n_ctx"], n_batch=req["n_ctx"], logits_all=True,
          n_threads=req["threads"], verbose=False, seed=0)
params = inspect.signature(Llama.__init__).parameters
for k, v in (("use_extra_bufts", False), ("type_k", 0), ("type_v", 0), ("flash_attn", False),
             ("n_ubatch", req["n_ctx"])):
    if k in params:
        kw[k] = v          # 0 = GGML_TYPE_F32
llm = Llama(**kw)
out = {}
for i, ids in enumerate(req["prompts"]):
    if isinstance(ids, str):        # text: llama.cpp's own tokenizer, with the BOS it wants
        ids = llm.tokenize(ids.encode("utf-8"), add_bos=True, special=True)
    out[f"ids{i}"] = np.array(ids, dtype=np.int64)
    llm.reset()
    llm.eval(ids)
    out[f"logits{i}"] = np.array(llm.scores[:len(ids)], dtype=np.float32)
    greedy = []
    for _ in range(req["greedy"]):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        greedy.append(tok)
        llm.eval([tok])
    out[f"greedy{i}"] = np.array(greedy, dtype=np.int64)
np.savez(req["out"], **out)
'''


class LlamaUnavailable(RuntimeError):
    """No interpreter with llama_cpp (tests skip on it)."""


@dataclass
class LlamaResult:
    ids: list[int]             # the prompt's ids (tokenized by llama.cpp when the prompt was text)
    logits: np.ndarray         # (len(ids), vocab) float32
    greedy: list[int]          # llama.cpp's greedy continuation


def llama_logits(model, prompts: list, *, greedy: int = 0, python: str | None = None,
                 threads: int = 2, timeout: float = 900) -> list[LlamaResult]:
    """llama.cpp's logits per prompt; a prompt is a list of ids or a text (tokenized by llama.cpp)."""
    from tools.bench.peers import find_llama

    py, note = find_llama(python)
    if py is None:
        raise LlamaUnavailable(note)
    n_ctx = max(len(p) * (2 if isinstance(p, str) else 1) for p in prompts) + greedy + 16
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "logits.npz"
        req = {"model": str(model), "greedy": int(greedy),
               "prompts": [p if isinstance(p, str) else [int(i) for i in p] for p in prompts],
               "n_ctx": n_ctx, "threads": threads, "out": str(out)}
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        r = subprocess.run([py, "-c", WORKER, json.dumps(req)], capture_output=True, text=True, env=env,
                           timeout=timeout)
        if r.returncode != 0 or not out.exists():
            tail = (r.stderr or r.stdout).strip().splitlines()[-5:]
            raise RuntimeError(f"llama.cpp on {model} failed (status {r.returncode}): " + " | ".join(tail))
        data = np.load(out)
        return [LlamaResult(data[f"ids{i}"].tolist(), data[f"logits{i}"], data[f"greedy{i}"].tolist())
                for i in range(len(prompts))]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.llama_logits", description=__doc__.split("\n")[0])
    p.add_argument("model")
    p.add_argument("--ids", action="append", default=[], help="comma-separated token ids (repeatable)")
    p.add_argument("--text", action="append", default=[], help="a text prompt, tokenized by llama.cpp (repeatable)")
    p.add_argument("--greedy", type=int, default=0, help="also continue each prompt greedily N tokens")
    p.add_argument("--out", required=True, help=".npz with logits0.. and greedy0..")
    p.add_argument("--llama-python", default=None)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    try:
        prompts = [[int(t) for t in s.split(",") if t.strip()] for s in a.ids] + list(a.text)
    except ValueError as e:
        print(f"error: --ids must be comma-separated integers ({e})", file=sys.stderr)
        return 2
    if not prompts or any(len(p) == 0 for p in prompts):
        print("error: give at least one non-empty --ids or --text", file=sys.stderr)
        return 2
    try:
        res = llama_logits(a.model, prompts, greedy=a.greedy, python=a.llama_python, threads=a.threads)
    except (LlamaUnavailable, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    np.savez(a.out, **{f"logits{i}": r.logits for i, r in enumerate(res)},
             **{f"greedy{i}": np.array(r.greedy, np.int64) for i, r in enumerate(res)},
             **{f"ids{i}": np.array(r.ids, np.int64) for i, r in enumerate(res)})
    print(f"wrote {a.out}: {len(res)} prompts")
    return 0


if __name__ == "__main__":
    sys.exit(main())

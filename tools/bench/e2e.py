"""End to end: prompt-processing and decode tokens/s, time to first token, peak RSS and weight bytes of
the default decoder at several precisions, beside llama.cpp on the same GGUF and thread count.

Each precision runs in a worker process of its own (tools/bench/worker.py: its peak RSS is its own);
the llama.cpp worker lives through the whole run, and the two are asked in turn (ours, peer, peer,
ours, ...), so that load from other processes falls on both. Figures are medians over the repetitions.
"""
from __future__ import annotations

import json
import os
import sys

from loader.precision import check_bits, check_wbits
from tools.bench import machine, peers
from tools.bench.stats import print_table, report_and_save, summarize

DEFAULT_PRECISIONS = "w8a16,w4a16,w2a16,w8a8g32,w4a8g32,w8a8g128t"


def parse_precision(s: str) -> dict:
    """'w4a8g32' -> wbits 4, abits 8, group = agroup = 32; 'w8a8g128t' -> weight group 128 and one
    activation scale per token (as tools.eval names it); 'w4a16' -> groups left to the engine;
    'wsourcea16' -> each tensor at its source type's own bits."""
    t = s.strip().lower()
    try:
        if not t.startswith("w") or "a" not in t:
            raise ValueError
        w, rest = t[1:].split("a", 1)
        a, _, g = rest.partition("g")
        per_token = g.endswith("t")
        g = g[:-1] if per_token else g
        cfg = {"name": t, "wbits": "source" if w == "source" else int(w), "abits": int(a),
               "group": int(g) if g else None,
               "agroup": "token" if per_token else (int(g) if g else None)}
    except ValueError:
        raise ValueError(f"precision {s!r}: expected w<bits>a<bits>[g<group>[t]], e.g. w4a16, w4a8g32, "
                         "w8a8g128t or wsourcea16") from None
    try:
        check_wbits(cfg["wbits"], "wbits"), check_bits(cfg["abits"], "abits")
    except ValueError as e:
        raise ValueError(f"precision {s!r}: {e}") from None
    return cfg


def _worker(cfg: dict, a, threads: int, prepare: bool = False) -> peers.JsonWorker:
    spec = {"wbits": cfg["wbits"], "abits": cfg["abits"], "group": cfg["group"], "agroup": cfg["agroup"],
            "device": a.device, "threads": threads, "model": a.model, "prepare_only": prepare}
    return peers.JsonWorker([sys.executable, "-m", "tools.bench.worker", json.dumps(spec)],
                            env=peers.thread_env(threads), name=f"anybit worker {cfg['name']}")


def _summ(samples: list[dict]) -> dict:
    out = {k: summarize(s[k] for s in samples) for k in ("prompt_tok_s", "decode_tok_s", "ttft_s")}
    # what else ran during each sample (tools/bench/machine.py other_cores), sample by sample
    out["other_cores"] = [s.get("other_cores") for s in samples]
    out["decode_tok_s_samples"] = [round(s["decode_tok_s"], 3) for s in samples]
    out["load_average"] = [s.get("load_average") for s in samples]
    return out


def _agree(a: list[int], b: list[int]) -> int:
    """Leading greedy tokens two engines agree on (a cheap sanity check that both ran the model)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _synth_name(model: str) -> str:
    """general.name of a GGUF written by tools/bench/synth_gguf.py, else ''."""
    if not str(model).endswith(".gguf"):
        return ""
    from loader.gguf_reader import GGUFFile
    try:
        name = str(GGUFFile(model).meta.get("general.name", ""))
    except Exception:                       # the worker reports unreadable files with its own error
        return ""
    return name if "anybit synth" in name else ""


def run(a) -> dict:
    from engine.texts import eval_text
    threads = a.threads or os.cpu_count() or 1
    desc = machine.describe(threads)
    desc["load_average_start"] = machine.load_average()
    model = a.model
    if model is None:
        from loader.fetch import default_model_path
        model = str(default_model_path("decoder"))
    notes = []
    synth = _synth_name(model)
    if synth:
        notes.append(f"{os.path.basename(model)}: random weights ({synth}; `tools.bench synth --write-gguf`): "
                     "the text is noise, the speed that of a real model of these shapes")
    llama_py, note = (None, "llama.cpp peer skipped: --no-peers") if a.no_peers else \
        peers.find_llama(a.llama_python, a.install_peers)
    notes.append(note)
    if a.device == "cuda":
        notes.append("transformers fp16 peer: not measured by this tool yet")
    if not model.endswith(".gguf") and llama_py:
        notes.append(f"llama.cpp peer skipped: {model} is not a GGUF file")
        llama_py = None
    configs = [parse_precision(s) for s in a.precisions.split(",") if s.strip()]
    notes.append("other_cores (per sample, in the rows and peer_interleaved): the CPU that other processes "
                 "took while each sample ran, for a machine shared with other work")

    peer = None
    if llama_py:
        try:
            peer = peers.start_llama(llama_py, model, threads, n_ctx=max(512, a.prompt_tokens + a.max_tokens + 8),
                                     repack=not getattr(a, "llama_no_repack", False))
            if getattr(a, "llama_no_repack", False):
                notes.append("llama.cpp ran without its repacked weight copies (--llama-no-repack: use_extra_bufts off)")
        except peers.PeerUnavailable as e:
            notes.append(f"llama.cpp peer failed to start: {e}")
    ids, rows, peer_samples = None, [], []
    try:
        for cfg in configs:
            print(f"[e2e] {cfg['name']}: loading ...", file=sys.stderr, flush=True)
            _worker(cfg, a, threads, prepare=True).close()             # pack into the cache outside the RSS
            with _worker(cfg, a, threads) as w:
                if ids is None:
                    ids = w.request({"cmd": "tokenize", "text": eval_text(), "n": a.prompt_tokens})["ids"]
                    if peer is not None:
                        peer.request({"cmd": "run", "ids": ids, "max_tokens": 4})   # warm-up
                w.request({"cmd": "run", "ids": ids, "max_tokens": 4})              # warm-up
                ours, theirs = [], []
                for r in range(a.reps):
                    order = [("ours", w), ("peer", peer)] if r % 2 == 0 else [("peer", peer), ("ours", w)]
                    for who, wk in order:
                        if wk is None:
                            continue
                        mark = machine.cpu_mark(wk.proc.pid)
                        res = wk.request({"cmd": "run", "ids": ids, "max_tokens": a.max_tokens})
                        res["other_cores"] = machine.other_cores(mark, wk.proc.pid)
                        res["load_average"] = machine.load_average()
                        (ours if who == "ours" else theirs).append(res)
                peer_samples += theirs
                row = {"precision": cfg["name"], "wbits": cfg["wbits"], "abits": cfg["abits"],
                       "group": cfg["group"], "agroup": cfg["agroup"], "device": w.ready["device"],
                       "weight_bytes": w.ready["weight_bytes"], "load_s": round(w.ready["load_s"], 3),
                       "peak_rss_bytes": max(s["peak_rss_bytes"] for s in ours),
                       "generated_tokens": min(s["generated_tokens"] for s in ours),
                       **_summ(ours)}
                if theirs:
                    row["agree_with_peer_tokens"] = _agree(ours[-1]["ids"], theirs[-1]["ids"])
                    row["peer_interleaved"] = _summ(theirs)
                rows.append(row)
                print(f"[e2e] {cfg['name']}: decode {row['decode_tok_s']['median']:.1f} tok/s, "
                      f"prompt {row['prompt_tok_s']['median']:.1f} tok/s", file=sys.stderr, flush=True)
    finally:
        if peer is not None:
            peer.close()
    peer_row = None
    if peer_samples:
        peer_row = {"name": "llama.cpp", "version": peer.ready.get("version"), "model": os.path.basename(model),
                    "peak_rss_bytes": max(s["peak_rss_bytes"] for s in peer_samples),
                    "weight_bytes": os.path.getsize(model), **_summ(peer_samples)}
        own = [s for s in peer_samples if "own_decode_tok_s" in s]
        if own:                                  # llama.cpp's own counters, beside our wall-clock view
            peer_row["own_timings"] = {k: summarize(s[k] for s in own) for k in ("own_prompt_tok_s", "own_decode_tok_s")}
        for row in rows:
            for k in ("prompt_tok_s", "decode_tok_s"):
                row[f"{k}_vs_peer"] = row[k]["median"] / peer_row[k]["median"]
                row[f"{k}_vs_peer_best"] = row[k]["max"] / peer_row[k]["max"]      # best run against best run
            row["ttft_vs_peer"] = row["ttft_s"]["median"] / peer_row["ttft_s"]["median"]
    desc["load_average_end"] = machine.load_average()
    return {"schema": 1, "bench": "e2e", "machine": desc, "notes": notes,
            "settings": {"model": os.path.basename(model), "threads": threads, "device": a.device,
                         "prompt_tokens": len(ids or []), "max_tokens": a.max_tokens, "reps": a.reps,
                         "quick": a.quick, "sampling": "greedy", "llama_python": llama_py},
            "rows": rows, "peer": peer_row}


def print_report(doc: dict) -> None:
    s, p = doc["settings"], doc["peer"]
    print(f"\ne2e on {doc['machine']['kind']} ({doc['machine']['cpu']['model']}), {s['threads']} threads, "
          f"prompt {s['prompt_tokens']} tokens, {s['max_tokens']} generated, median of {s['reps']} (min-max)")
    hdr, rows = table(doc, mm=_mm, peer_label=lambda p: f"llama.cpp {p.get('version') or ''} (GGUF)".strip())
    print_table(hdr, rows)
    for n in doc["notes"]:
        print(f"note: {n}")
    for r in doc["rows"]:
        oc = lambda d: ", ".join("-" if v is None else f"{v:.2f}" for v in d.get("other_cores", []))
        dec = lambda d: ", ".join(f"{v:.1f}" for v in d.get("decode_tok_s_samples", []))
        line = f"{r['precision'].upper()} runs: decode tok/s {dec(r)}, other processes' cores {oc(r)}"
        if "peer_interleaved" in r:
            p_ = r["peer_interleaved"]
            line += f"; llama.cpp runs: decode tok/s {dec(p_)}, other processes' cores {oc(p_)}"
        print(f"note: {line}")
    if p:
        print("x: our median / llama.cpp median (> 1: faster); best: our fastest run / llama.cpp's fastest run")


def _mm(s: dict) -> str:
    return f"{s['median']:.1f} ({s['min']:.0f}-{s['max']:.0f})"


def table(doc: dict, *, mm, peer_label, x: str = "",
          ratio_hdr=("prompt x", "decode x", "decode x best")) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the e2e table (our precisions, then the peer), for the terminal and the README."""
    p = doc.get("peer")
    hdr = ["precision", "prompt tok/s", "decode tok/s", "TTFT ms", "peak RSS MB", "weights MB"]
    if p:
        hdr += list(ratio_hdr)

    def cells(r, name):
        return [name, mm(r["prompt_tok_s"]), mm(r["decode_tok_s"]), f"{r['ttft_s']['median'] * 1e3:.0f}",
                f"{r['peak_rss_bytes'] / 2**20:.0f}", f"{r['weight_bytes'] / 2**20:.1f}"]
    rows = []
    for r in doc["rows"]:
        line = cells(r, r["precision"].upper())
        if p:
            line += [f"{r['prompt_tok_s_vs_peer']:.2f}{x}", f"{r['decode_tok_s_vs_peer']:.2f}{x}",
                     f"{r['decode_tok_s']['max'] / p['decode_tok_s']['max']:.2f}{x}"]
        rows.append(line)
    if p:
        rows.append(cells(p, peer_label(p)) + [f"1.00{x}"] * 3)
    return hdr, rows


def add_args(ap) -> None:
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=None, help="threads for us and the peer (default: all cores)")
    ap.add_argument("--model", default=None, help="decoder (default SmolLM2-135M GGUF; the peer needs a GGUF)")
    ap.add_argument("--precisions", default=None, help=f"comma list (default {DEFAULT_PRECISIONS})")
    ap.add_argument("--prompt-tokens", type=int, default=None, help="prompt length (default 128, quick 32)")
    ap.add_argument("--max-tokens", type=int, default=None, help="tokens generated (default 64, quick 16)")
    ap.add_argument("--reps", type=int, default=None, help="repetitions (default 5, quick 3)")
    ap.add_argument("--llama-python", default=None, help="an interpreter that can import llama_cpp")
    ap.add_argument("--install-peers", action="store_true",
                    help="build llama-cpp-python into a venv under the cache dir if none is found")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--llama-no-repack", action="store_true",
                    help="llama.cpp without the interleaved copies it makes of some weight types at load "
                         "(use_extra_bufts off): its memory is then the mapped file's")


def main(a) -> int:
    a.precisions = a.precisions or DEFAULT_PRECISIONS
    a.prompt_tokens = a.prompt_tokens or (32 if a.quick else 128)
    a.max_tokens = a.max_tokens or (16 if a.quick else 64)
    a.reps = a.reps or (3 if a.quick else 5)
    return report_and_save(a, run(a), "e2e", print_report)

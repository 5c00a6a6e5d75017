"""Serving throughput: `python -m tools.bench_serve [--model GGUF] [--threads 2] [--out FILE.json]`.

In one run, alternating rounds so that a shared machine's noise falls on every side alike:
- ours, 8 concurrent greedy streams: `python -m engine.serve` in a subprocess (W4A16, --threads),
  8 clients streaming chat completions at once. Two figures: end to end (all completion tokens over the
  wall time from the first request to the last [DONE], prompts included) and decode (the streamed
  pieces, a token each, that arrive while all 8 streams are decoding, from the last stream's first
  token to the first stream's end, over that time: the rate of the batched decode step itself);
- ours, one stream: the first of those requests alone, the same two figures (decode: pieces after the
  first over the time from the first to the last);
- llama.cpp serving the same 8 requests: llama-cpp-python (same GGUF, same threads) in its own
  interpreter; its server runs one request at a time, so the 8 run back to back, greedy, each for as
  many tokens as ours produced for it; decode: its tokens after the first over its decode time;
- the prefix cache: a completion whose prompt is a 400-token prefix plus a question, then another
  with the same prefix and another question: time to the first streamed token of each;
- the engine alone, in this process while the server idles: the decode step of one sequence and the
  batched step of 8 (contexts 40-69), in alternating blocks, so that the HTTP side's share of the ratio shows.

A streamed piece is one token's text unless a token ends inside a UTF-8 character or a held-back stop
string (neither happens in these greedy English stories with no stop strings).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

TOPICS = ["a dragon who learns to cook", "a lighthouse keeper", "a robot gardener", "two rival chess players",
          "a lost city under the sea", "a cat who runs a bakery", "the first day on Mars", "a haunted library"]
PREFIX_TEXT = ("The following is the full handbook of the Northwind Cooperative. Section {i}: members meet "
               "on the first Monday of each month, keep records of every shared tool, and vote on new "
               "projects by a simple majority. ")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m engine.serve` in a subprocess, waited for on /health."""

    def __init__(self, model: str, threads: int, parallel: int, extra=()):
        import httpx
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [sys.executable, "-m", "engine.serve", "--model", model, "--threads", str(threads),
                "--parallel", str(parallel), "--port", str(self.port), "--model-name", "m", *extra]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        t0 = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: {self.proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() - t0 > 300:
                raise RuntimeError("the server did not come up in 300 s")
            time.sleep(0.2)

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def stream_one(url: str, body: dict) -> dict:
    """One streamed request: time to first token, end time, completion tokens."""
    import httpx
    t0 = time.perf_counter()
    first, n, text, times = None, 0, [], []
    body = dict(body, stream=True, stream_options={"include_usage": True})
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    with httpx.stream("POST", url + path, json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            d = json.loads(line[5:])
            if d.get("usage"):
                n = d["usage"]["completion_tokens"]
            for c in d.get("choices", []):
                piece = c.get("delta", {}).get("content") if "delta" in c else c.get("text")
                if piece:
                    times.append(time.perf_counter())
                    if first is None:
                        first = times[-1]
                    text.append(piece)
    return {"t0": t0, "ttft_s": (first or time.perf_counter()) - t0, "t_end": time.perf_counter(),
            "completion_tokens": n, "text": "".join(text), "times": times}


def decode_rate(res: list[dict]) -> float | None:
    """Pieces per second while every stream is decoding: from the last stream's first piece to the
    first stream's last piece (one stream: from its first piece to its last)."""
    t_a = max(r["times"][0] for r in res if r["times"])
    t_b = min(r["times"][-1] for r in res if r["times"])
    n = sum(sum(1 for t in r["times"] if t_a < t <= t_b) for r in res)
    return n / (t_b - t_a) if t_b > t_a and n else None


def requests_for(max_tokens: int) -> list[dict]:
    return [{"model": "m", "temperature": 0, "max_tokens": max_tokens,
             "messages": [{"role": "user", "content": f"Write a long story about {t}."}]} for t in TOPICS]


def run_ours_concurrent(url: str, reqs: list[dict]) -> dict:
    res = [None] * len(reqs)

    def go(i):
        res[i] = stream_one(url, reqs[i])
    ts = [threading.Thread(target=go, args=(i,)) for i in range(len(reqs))]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    wall = max(r["t_end"] for r in res) - t0
    toks = sum(r["completion_tokens"] for r in res)
    return {"streams": len(reqs), "wall_s": wall, "completion_tokens": toks, "agg_tok_s": toks / wall,
            "decode_tok_s": decode_rate(res), "decode_window_s": min(r["times"][-1] for r in res)
            - max(r["times"][0] for r in res), "ttft_s": [r["ttft_s"] for r in res],
            "per_request_tokens": [r["completion_tokens"] for r in res]}


def engine_steps(model, blocks: int = 6, per: int = 8) -> dict:
    """Median times of model's decode step for one sequence and for 8 at once, in this process: blocks of
    `per` steps of each kind in turn (a step right after a step of the other kind would find the caches
    holding that one's data, not its own previous step's, as a steady decode does)."""
    d = model.decoder
    caches = [d.new_cache() for _ in range(8)]
    times = {1: [], 8: []}
    try:
        for i, c in enumerate(caches):
            d.forward(list(range(100 + i, 140 + i)), c)
        for blk in range(blocks):
            for n in (1, 8):
                for c in caches:
                    c.n = 40 + 4 * blk
                for k in range(per + 1):
                    t = time.perf_counter()
                    if n == 1:
                        d.forward([5], caches[0])
                    else:
                        d.step_batch([5] * 8, caches)
                    if k:                       # the first step of a block warms it
                        times[n].append(time.perf_counter() - t)
    finally:
        for c in caches:
            c.close()
    m1, m8 = (sorted(v)[len(v) // 2] for v in (times[1], times[8]))
    return {"step_1_ms": m1 * 1e3, "step_8_ms": m8 * 1e3, "decode_8_vs_1": 8 * m1 / m8}


def run_llama(worker, model_tok, reqs: list[dict], n_tokens: list[int]) -> dict:
    t0 = time.perf_counter()
    toks, dec_toks, dec_s = 0, 0, 0.0
    for body, n in zip(reqs, n_tokens):
        ids = model_tok(body["messages"])
        r = worker.request({"cmd": "run", "ids": ids, "max_tokens": max(1, n)})
        toks += r["generated_tokens"]
        if r["generated_tokens"] > 1 and r["decode_tok_s"] > 0:
            dec_toks += r["generated_tokens"] - 1
            dec_s += (r["generated_tokens"] - 1) / r["decode_tok_s"]
    wall = time.perf_counter() - t0
    return {"requests": len(reqs), "wall_s": wall, "completion_tokens": toks, "agg_tok_s": toks / wall,
            "decode_tok_s": dec_toks / dec_s if dec_s else None}


def summary(report: dict) -> dict:
    """Medians over the rounds, and the ratios the issue asks for."""
    def med(key, sub):
        v = sorted(r[key][sub] for r in report["rounds"] if key in r and r[key].get(sub) is not None)
        return v[len(v) // 2] if v else None
    s = {"rounds": len(report["rounds"]), "ours_8_agg_tok_s": med("ours_8", "agg_tok_s"),
         "ours_8_decode_tok_s": med("ours_8", "decode_tok_s"), "ours_1_decode_tok_s": med("ours_1", "decode_tok_s"),
         "llama_8_decode_tok_s": med("llama_8", "decode_tok_s"),
         "ours_1_tok_s": med("ours_1", "agg_tok_s"), "llama_8_agg_tok_s": med("llama_8", "agg_tok_s"),
         "prefix_ttft_speedup": med("prefix", "speedup"), "prefix_first_ttft_s": med("prefix", "first_ttft_s"),
         "prefix_second_ttft_s": med("prefix", "second_ttft_s")}
    s["ours_8_vs_1"] = s["ours_8_agg_tok_s"] / s["ours_1_tok_s"] if s["ours_1_tok_s"] else None
    s["ours_8_vs_llama_8"] = (s["ours_8_agg_tok_s"] / s["llama_8_agg_tok_s"]) if s["llama_8_agg_tok_s"] else None
    d8, d1, dl = s["ours_8_decode_tok_s"], s["ours_1_decode_tok_s"], s["llama_8_decode_tok_s"]
    s["decode_8_vs_1"] = d8 / d1 if d8 and d1 else None
    s["decode_8_vs_llama_8"] = d8 / dl if d8 and dl else None
    s["prefix_tokens"] = report["rounds"][0]["prefix"]["prefix_tokens"] if report["rounds"] else None
    # each round's own ratio: its 8-stream and 1-stream runs are seconds apart, so a slow period of a shared
    # machine falls on both sides of it (the medians above may pair a fast side with a slow one)
    per = [r["ours_8"]["decode_tok_s"] / r["ours_1"]["decode_tok_s"] for r in report["rounds"]
           if r.get("ours_8", {}).get("decode_tok_s") and r.get("ours_1", {}).get("decode_tok_s")]
    s["decode_8_vs_1_per_round"] = per
    s["decode_8_vs_1_paired_median"] = sorted(per)[len(per) // 2] if per else None
    s["engine_step_1_ms"], s["engine_step_8_ms"] = med("engine", "step_1_ms"), med("engine", "step_8_ms")
    s["engine_decode_8_vs_1"] = med("engine", "decode_8_vs_1")
    return s


def write_report(report: dict, out: Path) -> dict:
    report["summary"] = s = summary(report)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    return s


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.bench_serve", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="GGUF (default: the SmolLM2 default model)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prefix-tokens", type=int, default=400, help="the shared prefix's length (default 400)")
    ap.add_argument("--llama-python", default=None)
    ap.add_argument("--no-peer", action="store_true", help="skip llama.cpp")
    ap.add_argument("--out", default=None, help="JSON file (default bench/results/serve-<time>.json)")
    args = ap.parse_args(argv)
    from loader.fetch import default_model_path
    from tools.bench.peers import PeerUnavailable, find_llama, start_llama
    from tools.bench.stats import free_path
    model = args.model or str(default_model_path("decoder"))
    import engine
    ref = engine.load(model, wbits=4, progress=False, threads=args.threads)  # tokenizer, template, engine_steps
    if args.prefix_tokens + 64 > ref.decoder.context:
        ap.error(f"--prefix-tokens {args.prefix_tokens} does not fit the context of {ref.decoder.context}")

    def chat_ids(msgs):
        return ref.tokenize(ref.tokenizer.apply_chat_template(msgs))
    reqs = requests_for(args.max_tokens)
    prefix = "".join(PREFIX_TEXT.format(i=i) for i in range(1, 40))
    pids = ref.tokenize(prefix)
    prefix = ref.detokenize(pids[:args.prefix_tokens])
    report = {"model": Path(model).name, "wbits": 4, "abits": 16, "threads": args.threads,
              "max_tokens": args.max_tokens, "machine": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "note": "shared machine (2 cores, several sessions): compare ratios "
              "within this run only", "batched_decode": True, "rounds": []}
    py, note = (None, "llama.cpp peer skipped (--no-peer)") if args.no_peer else find_llama(args.llama_python)
    report["llama_note"] = note
    llama = None
    if py:
        try:
            llama = start_llama(py, model, args.threads, n_ctx=1024)
        except PeerUnavailable as e:
            report["llama_note"] = f"llama.cpp peer failed to start: {e}"
    out = Path(args.out) if args.out else free_path(Path(f"bench/results/serve-{time.strftime('%Y%m%d-%H%M')}.json"))
    srv = Server(model, args.threads, parallel=8)
    try:
        for k in range(args.rounds):
            rnd = {"loadavg_start": os.getloadavg()}
            rnd["ours_8"] = run_ours_concurrent(srv.url, reqs)
            print(f"round {k}: ours 8 streams {rnd['ours_8']['agg_tok_s']:.1f} tok/s end to end, decode "
                  f"{rnd['ours_8']['decode_tok_s'] or 0:.1f} tok/s", file=sys.stderr)
            one = stream_one(srv.url, reqs[0])
            rnd["ours_1"] = {"completion_tokens": one["completion_tokens"], "wall_s": one["t_end"] - one["t0"],
                             "agg_tok_s": one["completion_tokens"] / (one["t_end"] - one["t0"]),
                             "decode_tok_s": decode_rate([one])}
            print(f"round {k}: ours 1 stream {rnd['ours_1']['agg_tok_s']:.1f} tok/s end to end, decode "
                  f"{rnd['ours_1']['decode_tok_s'] or 0:.1f} tok/s", file=sys.stderr)
            if llama is not None:
                rnd["llama_8"] = run_llama(llama, chat_ids, reqs, rnd["ours_8"]["per_request_tokens"])
                print(f"round {k}: llama.cpp 8 requests {rnd['llama_8']['agg_tok_s']:.1f} tok/s", file=sys.stderr)
            # the prefix cache: a fresh 400-token prefix each round (the round number makes it new)
            head = f"Round {k}. " + prefix
            a = stream_one(srv.url, {"model": "m", "temperature": 0, "max_tokens": 4,
                                     "prompt": head + "\nQuestion: when do members meet?\nAnswer:"})
            b = stream_one(srv.url, {"model": "m", "temperature": 0, "max_tokens": 4,
                                     "prompt": head + "\nQuestion: how are projects chosen?\nAnswer:"})
            rnd["prefix"] = {"prefix_tokens": len(ref.tokenize(head)), "first_ttft_s": a["ttft_s"],
                             "second_ttft_s": b["ttft_s"], "speedup": a["ttft_s"] / b["ttft_s"]}
            print(f"round {k}: prefix TTFT {a['ttft_s']:.3f} s -> {b['ttft_s']:.3f} s", file=sys.stderr)
            rnd["engine"] = engine_steps(ref)
            print(f"round {k}: engine alone 1 row {rnd['engine']['step_1_ms']:.2f} ms, 8 rows "
                  f"{rnd['engine']['step_8_ms']:.2f} ms", file=sys.stderr)
            report["rounds"].append(rnd)
            write_report(report, out)           # after every round: a run cut short keeps what it measured
    finally:
        srv.close()
        if llama is not None:
            llama.close()
        ref.close()

    s = write_report(report, out)
    print(json.dumps(s, indent=1))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Our side of the e2e benchmark, in a process of its own (so that its peak RSS is its own).

    python -m tools.bench.worker '{"wbits": 4, "abits": 16, "group": null, "agroup": null,
                                   "device": "cpu", "threads": 2, "model": null, "prepare_only": false}'

Speaks the JSON-lines protocol of tools.bench.peers.JsonWorker: a first line when the model is loaded,
then one reply per request ({"cmd": "tokenize", "text", "n"} or {"cmd": "run", "ids", "max_tokens"}).
"""
from __future__ import annotations

import json
import sys
import time


def main(argv=None) -> int:
    cfg = json.loads((argv or sys.argv[1:])[0])
    import engine
    from engine.api import peak_rss_bytes
    t0 = time.perf_counter()
    m = engine.load(cfg.get("model"), wbits=cfg["wbits"], abits=cfg["abits"], group=cfg.get("group"),
                    agroup=cfg.get("agroup"), device=cfg.get("device", "cpu"), threads=cfg.get("threads"),
                    progress=False)
    print(json.dumps({"ready": True, "load_s": time.perf_counter() - t0, "weight_bytes": int(m.weight_bytes),
                      "device": m.device, "wbits": m.wbits, "abits": m.abits,
                      "rss_after_load": peak_rss_bytes()}), flush=True)
    if cfg.get("prepare_only"):
        m.close()
        return 0
    try:
        for line in sys.stdin:
            req = json.loads(line)
            cmd = req.get("cmd")
            if cmd == "tokenize":
                ids = m.tokenize(req["text"])
                while len(ids) < req["n"]:                     # a short text is repeated, never padded
                    ids += m.tokenize(" " + req["text"])[1 if m.tokenizer.bos_id is not None else 0:]
                print(json.dumps({"ids": ids[:req["n"]]}), flush=True)
            elif cmd == "run":
                r = m.generate(req["ids"], max_tokens=req["max_tokens"])
                print(json.dumps({"prompt_tokens": r.prompt_tokens, "generated_tokens": r.generated_tokens,
                                  "prompt_tok_s": r.prompt_tok_s, "decode_tok_s": r.decode_tok_s,
                                  "ttft_s": r.ttft_s, "stop_reason": r.stop_reason,
                                  "peak_rss_bytes": peak_rss_bytes(), "ids": r.ids}), flush=True)
            else:
                break
    finally:
        m.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Plot: PNG charts of the recorded results, written beside their JSON in bench/results/.

    e2e      -> <stem>.png            decode and prompt tokens/s against precision, llama.cpp as a line
    kernels  -> <stem>-roofline.png   GOPS against arithmetic intensity under the measured ceilings
                <stem>-speed.png      ratio to the peer against precision, per token count M
    embed    -> <stem>.png            sentences/s against precision, one line per batch size

By default the newest result of each bench per machine kind is drawn; give files to draw those.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from tools.bench.stats import RESULTS_DIR, latest, load_results


def _plt():
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("matplotlib is not installed: pip install 'anybit[bench]' (or pip install matplotlib)") from None
    matplotlib.use("Agg")                                   # files only, never a window
    import matplotlib.pyplot as plt
    return plt


def _title(doc: dict, what: str) -> str:
    m = doc["machine"]
    gpu = f", {m['gpu']['name']}" if m.get("gpu") and m["gpu"].get("name") else ""
    return f"{what} - {m['cpu']['model']} ({m['cpu']['logical_cores']} cores{gpu}), {m['date'][:10]}"


def _err(summaries):
    lo = [max(0.0, s["median"] - s["min"]) for s in summaries]
    hi = [max(0.0, s["max"] - s["median"]) for s in summaries]
    return [lo, hi]


def plot_e2e(doc: dict, out: Path) -> list[Path]:
    plt = _plt()
    rows, peer = doc["rows"], doc.get("peer")
    names = [r["precision"].upper() for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "decode_tok_s", "decode tokens/s"), (axes[1], "prompt_tok_s", "prompt tokens/s")):
        s = [r[key] for r in rows]
        ax.bar(names, [v["median"] for v in s], yerr=_err(s), capsize=3, color="#3b7dd8", label="anybit")
        if peer:
            ax.axhline(peer[key]["median"], color="#d2452e", ls="--",
                       label=f"llama.cpp {peer.get('version') or ''} ({peer.get('model', 'GGUF')})")
        ax.set_ylabel(label)
        ax.set_xlabel("precision")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(_title(doc, f"SmolLM2-135M end to end, {doc['settings']['threads']} threads"), fontsize=10)
    fig.tight_layout()
    path = out.with_suffix(".png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def plot_kernels(doc: dict, out: Path) -> list[Path]:
    plt = _plt()
    paths = []
    for dev, res in doc["devices"].items():
        rows, c = res["rows"], res["ceilings"]
        suffix = "" if len(doc["devices"]) == 1 else f"-{dev}"
        # roofline
        fig, ax = plt.subplots(figsize=(10, 5.5))
        xs = [r["intensity"] for r in rows]
        lo, hi = min(xs) / 2, max(xs) * 2
        grid = [lo * (hi / lo) ** (i / 100) for i in range(101)]
        comp = c.get("compute_tops")
        roof = [min(c["bandwidth_gbps"] * x, comp * 1e3 if comp else math.inf) for x in grid]
        ax.plot(grid, roof, color="k", lw=1.2, label=f"ceiling: memcpy {c['bandwidth_gbps']:.0f} GB/s"
                + (f", peer GEMM {comp * 1e3:.0f} GOPS" if comp else ""))
        precs = sorted({r["precision"] for r in rows if not r.get("peer")})
        cmap = plt.get_cmap("viridis", max(len(precs), 2))
        for i, p in enumerate(precs):
            for big in (False, True):
                sel = [r for r in rows if r["precision"] == p and (r["M"] > 1) == big]
                if sel:
                    ax.scatter([r["intensity"] for r in sel], [r["tops"] * 1e3 for r in sel], color=cmap(i),
                               marker="s" if big else "o", s=22, label=p.upper() if not big else None)
        pr = [r for r in rows if r.get("peer")]
        ax.scatter([r["intensity"] for r in pr], [r["tops"] * 1e3 for r in pr], color="#d2452e", marker="x",
                   s=30, label=res.get("peer", "peer"))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("arithmetic intensity (ops per byte moved)")
        ax.set_ylabel("effective GOPS (2MNK / time)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, title="o: M = 1 (GEMV)\ns: M > 1 (GEMM)", title_fontsize=7, loc="upper left",
                  bbox_to_anchor=(1.01, 1.0))          # outside the axes: the points fill the corners
        ax.set_title(_title(doc, f"kernels on {dev}: roofline"), fontsize=9)
        fig.tight_layout()
        p1 = out.with_name(out.stem + suffix + "-roofline.png")
        fig.savefig(p1, dpi=110)
        plt.close(fig)
        # speed against precision: geometric mean over shapes of the ratio to the peer, per M
        fig, ax = plt.subplots(figsize=(8, 4))
        for M in sorted({r["M"] for r in rows}):
            vals = []
            for p in precs:
                rs = [r["vs_peer"] for r in rows if r["precision"] == p and r["M"] == M and r.get("vs_peer")]
                vals.append(math.exp(sum(map(math.log, rs)) / len(rs)) if rs else float("nan"))
            ax.plot([p.upper() for p in precs], vals, marker="o", label=f"M = {M}")
        ax.axhline(1.0, color="#d2452e", ls="--", lw=1, label="peer")
        ax.set_yscale("log")
        ax.set_ylabel("speed vs peer (geomean over shapes)")
        ax.set_xlabel("precision")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        ax.set_title(_title(doc, f"kernels on {dev}: ratio to {res.get('peer', 'peer')}"), fontsize=9)
        fig.tight_layout()
        p2 = out.with_name(out.stem + suffix + "-speed.png")
        fig.savefig(p2, dpi=110)
        plt.close(fig)
        paths += [p1, p2]
    return paths


def plot_embed(doc: dict, out: Path) -> list[Path]:
    plt = _plt()
    rows = doc["rows"]
    precs = list(dict.fromkeys(r["precision"] for r in rows))
    fig, ax = plt.subplots(figsize=(7, 4))
    for b in sorted({r["batch"] for r in rows}):
        sel = {r["precision"]: r["sentences_per_s"]["median"] for r in rows if r["batch"] == b}
        ax.plot([p.upper() for p in precs], [sel.get(p, float("nan")) for p in precs], marker="o", label=f"batch {b}")
    ax.set_ylabel("sentences/s")
    ax.set_xlabel("precision")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title(_title(doc, f"{doc['settings']['model']} embeddings, {doc['settings']['threads']} threads"), fontsize=9)
    fig.tight_layout()
    path = out.with_suffix(".png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


PLOTTERS = {"e2e": plot_e2e, "kernels": plot_kernels, "embed": plot_embed}


def plot_file(doc: dict, json_path: Path) -> list[Path]:
    return PLOTTERS[doc["bench"]](doc, Path(json_path))


def add_args(ap) -> None:
    ap.add_argument("files", nargs="*", type=Path, help="result JSON files (default: the newest per bench and machine)")


def main(a) -> int:
    if a.files:
        docs = [dict(json.loads(p.read_text(encoding="utf-8")), _path=str(p)) for p in a.files]
    else:
        all_docs = load_results(a.out)
        docs = [d for b in PLOTTERS for d in latest(all_docs, b).values()]
        if not docs:
            raise FileNotFoundError(f"no result files in {a.out or RESULTS_DIR}: run a measuring command first")
    for d in docs:
        if d.get("bench") not in PLOTTERS:
            raise ValueError(f"{d['_path']}: not a tools.bench result")
        for p in plot_file(d, Path(d["_path"])):
            print(f"wrote {p}")
    return 0

"""Readme: regenerate README.md's performance section from the recorded results (never typed by hand).

The section lies between the lines `<!-- bench:begin -->` and `<!-- bench:end -->`; everything outside
them is left byte for byte. Without both markers (in that order) the command fails and writes nothing.
Per machine kind, the newest e2e, kernels, embed and synth results are tabulated, with links to their charts.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path

from tools.bench.e2e import table
from tools.bench.stats import REPO, latest, load_results

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def _rel(path: str, readme: Path) -> str:
    return os.path.relpath(path, readme.parent).replace(os.sep, "/")


def _machine_line(doc: dict) -> str:
    m = doc["machine"]
    gpu = f", GPU {m['gpu']['name']} (driver CUDA {m['gpu'].get('driver_cuda_version')})" \
        if m.get("gpu") and m["gpu"].get("name") else ", no GPU"
    commit = (m.get("git") or {}).get("commit") or "unknown"
    dirty = " (uncommitted changes)" if (m.get("git") or {}).get("dirty") else ""
    v = m.get("versions", {})
    return (f"{m['cpu']['model']}, {m['cpu']['logical_cores']} logical cores{gpu}; Python {v.get('python')}, "
            f"NumPy {v.get('numpy')}; commit `{commit[:10]}`{dirty}; {m['date']}")


def _img(doc: dict, suffix: str, readme: Path, alt: str) -> list[str]:
    p = Path(doc["_path"])
    png = p.with_name(p.stem + suffix + ".png")
    return [f"![{alt}]({_rel(str(png), readme)})", ""] if png.exists() else []


def _mm(s: dict, d: int = 1) -> str:
    return f"{s['median']:.{d}f} ({s['min']:.{d}f}-{s['max']:.{d}f})"


def e2e_section(doc: dict, readme: Path) -> list[str]:
    s = doc["settings"]
    out = [f"**End to end** ({s['model']}, {s['device']}, {s['threads']} threads, prompt {s['prompt_tokens']} "
           f"tokens, {s['max_tokens']} generated greedily; median (min-max) of {s['reps']} runs, "
           f"alternating with the peer). Source: `{_rel(doc['_path'], readme)}`", ""]
    hdr, rows = table(doc, mm=_mm, x="x", ratio_hdr=("prompt vs llama.cpp", "decode vs llama.cpp", "decode, best runs"),
                      peer_label=lambda p: f"llama.cpp {p.get('version') or ''} ({p.get('model')})")
    out += ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    out += ["| " + " | ".join(cells) + " |" for cells in rows]
    out.append("")
    # local interpreter paths say nothing to a reader: drop "(/abs/path)" from notes
    out += [f"Note: {re.sub(r' ?[(]/[^)]*[)]', '', n)}" for n in doc.get("notes", [])] + ([""] if doc.get("notes") else [])
    return out + _img(doc, "", readme, "end-to-end tokens/s against precision")


def kernels_section(doc: dict, readme: Path) -> list[str]:
    out = []
    for dev, res in doc["devices"].items():
        c = res["ceilings"]
        comp = f"{c['compute_tops'] * 1e3:.0f} GOPS" if c.get("compute_tops") else "n/a"
        out += [f"**Kernels on {dev}** (speed ratio to {res.get('peer')}: peer time / our time, > 1 is faster; "
                f"weight group {doc['settings']['group']}; ceilings measured in the same run: memcpy "
                f"{c['bandwidth_gbps']:.1f} GB/s, peer GEMM {comp}). Source: `{_rel(doc['_path'], readme)}`", ""]
        rows = [r for r in res["rows"] if not r.get("peer")]
        precs = list(dict.fromkeys(r["precision"] for r in rows))
        keys = list(dict.fromkeys((r["model"], r["layer"], r["N"], r["K"], r["M"]) for r in rows))
        out += ["| shape | M | " + " | ".join(p.upper() for p in precs) + " |", "|" + "---|" * (len(precs) + 2)]
        for k in keys:
            cell = {r["precision"]: r for r in rows if (r["model"], r["layer"], r["N"], r["K"], r["M"]) == k}
            vals = [f"{cell[p]['vs_peer']:.2f}" if p in cell and cell[p].get("vs_peer") else "-" for p in precs]
            out.append(f"| {k[0]} {k[1]} {k[2]}x{k[3]} | {k[4]} | " + " | ".join(vals) + " |")
        gm = []
        for p in precs:
            v = [r["vs_peer"] for r in rows if r["precision"] == p and r.get("vs_peer")]
            gm.append(f"**{math.exp(sum(map(math.log, v)) / len(v)):.2f}**" if v else "-")
        out += ["| geometric mean | | " + " | ".join(gm) + " |", ""]
        suffix = "" if len(doc["devices"]) == 1 else f"-{dev}"
        out += _img(doc, suffix + "-roofline", readme, f"roofline of the {dev} kernels")
        out += _img(doc, suffix + "-speed", readme, f"{dev} kernel speed against precision")
    return out


def embed_section(doc: dict, readme: Path) -> list[str]:
    s = doc["settings"]
    rows = doc["rows"]
    batches = sorted({r["batch"] for r in rows})
    precs = list(dict.fromkeys(r["precision"] for r in rows))
    out = [f"**Embeddings** ({s['model']}, {s['device']}, {s['threads']} threads, {s['texts']} sentences; "
           f"sentences/s, median of {s['reps']}; min cos = lowest cosine to the float embeddings). "
           f"Source: `{_rel(doc['_path'], readme)}`", "",
           "| precision | " + " | ".join(f"batch {b}" for b in batches) + " | min cos |",
           "|" + "---|" * (len(batches) + 2)]
    for p in precs:
        cell = {r["batch"]: r for r in rows if r["precision"] == p}
        cos = next((f"{r['cos_min']:.4f}" for r in cell.values() if "cos_min" in r), "-")
        out.append(f"| {p.upper()} | " + " | ".join(f"{cell[b]['sentences_per_s']['median']:.1f}" if b in cell
                                                    else "-" for b in batches) + f" | {cos} |")
    return out + [""] + _img(doc, "", readme, "embedding sentences/s against precision")


def synth_section(doc: dict, readme: Path) -> list[str]:
    layers = doc["rows"][0]["layers"] if doc["rows"] else "?"
    out = [f"**Large-model shapes** ({doc['shape']}, {layers} layers of random weights, {doc['device']}, "
           f"{doc['threads']} threads; {doc['steps']} single-token decode steps after a {doc['prompt_tokens']}-token "
           f"prompt; GB/s = packed weight bytes per step / median step time, against a memcpy of "
           f"{doc['bandwidth_gbps']:.1f} GB/s that counts read + write, so a read-only stream can pass 100%; "
           f"no peer reads these packed planes: `synth --write-gguf` writes random Q4_0 weights of the same "
           f"shapes as a GGUF that the end-to-end bench times beside llama.cpp). Source: `{_rel(doc['_path'], readme)}`", "",
           "| precision | decode tok/s, median (best) | weights MB/token | GB/s | of memcpy | prefill tok/s |",
           "|---|---|---|---|---|---|"]
    out += [f"| {r['precision'].upper()} | {r['decode_tok_s']:.2f} ({r['decode_tok_s_best']:.2f}) | "
            f"{r['weight_bytes'] / 1e6:.0f} | {r['gbps']:.1f} | {100 * r['frac_bandwidth']:.0f}% | "
            f"{r['prefill_tok_s']:.1f} |" for r in doc["rows"]]
    return out + [""]


def render(docs: list[dict], readme: Path) -> str:
    kinds = sorted({d["machine"]["kind"] for d in docs})
    lines = ["", "_Generated by `python -m tools.bench readme` from the JSON results in `bench/results/`; "
             "rerun the benchmarks and this command instead of editing by hand._", ""]
    if not kinds:
        return "\n".join(lines + ["No benchmark results are recorded yet.", ""])
    for kind in kinds:
        per = {b: latest(docs, b).get(kind) for b in ("e2e", "kernels", "embed", "synth")}
        anyd = next(d for d in per.values() if d)
        lines += [f"### Machine: {kind}", "", f"Measured on {_machine_line(anyd)}.", ""]
        # end to end: the newest run per model and thread count; smaller models first, most threads first
        newest: dict[tuple, dict] = {}
        for d in docs:
            if d["bench"] == "e2e" and d["machine"]["kind"] == kind:
                newest[(d["settings"].get("model"), int(d["settings"].get("threads") or 0))] = d   # last wins
        size = {m: min((r.get("weight_bytes") or 0 for r in d["rows"]), default=0) for (m, _), d in newest.items()}
        for key in sorted(newest, key=lambda k: (size[k[0]], str(k[0]), -k[1])):
            lines += e2e_section(newest[key], readme)
        if per["kernels"]:
            lines += kernels_section(per["kernels"], readme)
        if per["embed"]:
            lines += embed_section(per["embed"], readme)
        if per["synth"]:
            lines += synth_section(per["synth"], readme)
    return "\n".join(lines)


def replace_section(text: str, body: str) -> str:
    """text with the lines between the markers replaced by body; ValueError when markers are missing."""
    i, j = text.find(BEGIN), text.find(END)
    if i < 0 or j < 0:
        missing = " and ".join(m for m, k in ((BEGIN, i), (END, j)) if k < 0)
        raise ValueError(f"README has no {missing} marker: add the lines {BEGIN} and {END} where the "
                         "performance section belongs")
    if j < i:
        raise ValueError(f"README markers are out of order: {END} comes before {BEGIN}")
    if text.count(BEGIN) > 1 or text.count(END) > 1:
        raise ValueError("README has more than one bench marker pair")
    return text[:i + len(BEGIN)] + "\n" + body.strip("\n") + "\n" + text[j:]


def add_args(ap) -> None:
    ap.add_argument("--readme", type=Path, default=REPO / "README.md", help="file to update (default README.md)")


def main(a) -> int:
    readme = a.readme.resolve()
    if not readme.exists():
        raise FileNotFoundError(f"{readme} does not exist")
    text = readme.read_text(encoding="utf-8")
    new = replace_section(text, render(load_results(a.out), readme))       # raises before writing anything
    if new != text:
        readme.write_text(new, encoding="utf-8")
    print(f"updated {readme}" if new != text else f"{readme} is up to date")
    return 0

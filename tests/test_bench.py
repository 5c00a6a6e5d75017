"""tools.bench: result schema of a tiny kernels run, statistics, plots of fixture results, README section
replacement, machine description. Fast (no model, no llama.cpp build)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tools.bench import e2e, readme, stats
from tools.bench.__main__ import main as bench_main
from tools.bench.machine import describe


def _s(med, lo=None, hi=None):
    lo = med if lo is None else lo
    hi = med if hi is None else hi
    return {"median": med, "min": lo, "max": hi, "q1": lo, "q3": hi, "n": 3}


def _machine(kind="cpu-test-2c"):
    return {"kind": kind, "date": "2026-01-02T03:04:05+00:00", "cpu": {"model": "Test CPU", "logical_cores": 2},
            "gpu": None, "versions": {"python": "3.11", "numpy": "2.0"}, "git": {"commit": "abcdef0123456789", "dirty": False}}


def fixture_docs():
    e2e_doc = {"schema": 1, "bench": "e2e", "machine": _machine(), "notes": ["peer note"],
               "settings": {"model": "m.gguf", "threads": 2, "device": "cpu", "prompt_tokens": 8, "max_tokens": 4,
                            "reps": 3, "quick": True},
               "rows": [{"precision": p, "wbits": w, "abits": 16, "weight_bytes": w * 2**20, "peak_rss_bytes": 300 * 2**20,
                         "prompt_tok_s": _s(100.0 * w, 95.0 * w, 110.0 * w),
                         "decode_tok_s": _s(10.0 * w, 9.0 * w, 11.0 * w),
                         "ttft_s": _s(0.1), "prompt_tok_s_vs_peer": w * 1.0, "decode_tok_s_vs_peer": w / 2}
                        for p, w in (("w4a16", 4), ("w2a16", 2))],
               "peer": {"name": "llama.cpp", "version": "0.0", "model": "m.gguf", "peak_rss_bytes": 2**27,
                        "weight_bytes": 2**26, "prompt_tok_s": _s(100.0), "decode_tok_s": _s(20.0), "ttft_s": _s(0.2)}}
    krows = []
    for M in (1, 4):
        krows.append({"model": "t", "layer": "l", "N": 64, "K": 64, "M": M, "precision": "numpy-f32", "peer": True,
                      "time_s": _s(1e-5), "tops": 1e-3, "gbps": 2.0, "bytes": 20000, "intensity": 0.4,
                      "frac_bandwidth": 0.1, "frac_compute": 0.5})
        for p, r in (("w2a16", 2.0), ("w4a4", 0.5)):
            krows.append({"model": "t", "layer": "l", "N": 64, "K": 64, "M": M, "precision": p, "time_s": _s(1e-5 / r),
                          "tops": 1e-3 * r, "gbps": 1.0, "bytes": 2000, "intensity": 4.0, "vs_peer": r,
                          "frac_bandwidth": 0.05, "frac_compute": 0.2})
    kern = {"schema": 1, "bench": "kernels", "machine": _machine(), "notes": [],
            "settings": {"group": 64, "m": [1, 4]},
            "devices": {"cpu": {"peer": "numpy float32 matmul", "rows": krows,
                                "ceilings": {"bandwidth_gbps": 20.0, "compute_tops": 0.1}}}}
    emb = {"schema": 1, "bench": "embed", "machine": _machine(), "notes": [],
           "settings": {"model": "mini", "device": "cpu", "threads": 2, "texts": 16, "reps": 2},
           "rows": [{"precision": p, "batch": b, "sentences_per_s": _s(10.0 * b), "cos_min": 0.99}
                    for p in ("w16a16", "w8a8") for b in (1, 8)]}
    return {"e2e": e2e_doc, "kernels": kern, "embed": emb}


def test_summarize_against_hand_values():
    s = stats.summarize([4.0, 1.0, 3.0, 2.0, 5.0])
    assert (s["median"], s["min"], s["max"], s["q1"], s["q3"], s["n"]) == (3.0, 1.0, 5.0, 2.0, 4.0, 5)
    with pytest.raises(ValueError):
        stats.summarize([])


def test_alternate_rounds_each_candidate():
    calls = []
    out = stats.alternate({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, reps=3,
                          min_time=0.0, sample_s=0.0)
    assert len(out["a"]) == len(out["b"]) == 3 and all(t >= 0 for t in out["a"] + out["b"])
    assert calls[-6:] == ["a", "b"] * 3                         # round robin, not a block of a then b


def test_machine_description_fields():
    d = describe(threads=2, gpu=False)
    assert d["kind"] and d["kind"] == d["kind"].lower() and " " not in d["kind"]
    assert d["cpu"]["model"] and d["cpu"]["logical_cores"] >= 1
    assert d["versions"]["python"].count(".") == 2 and "numpy" in d["versions"]
    assert set(d["git"]) == {"commit", "dirty"} and d["threads"] == 2 and d["gpu"] is None
    assert d["date"].endswith("+00:00")


def test_kernels_tiny_run_schema(tmp_path):
    rc = bench_main(["kernels", "--device", "cpu", "--shape", "64x64", "--m", "1,2", "--precisions", "w2a16,w2a2",
                     "--group", "64", "--reps", "2", "--min-time", "0", "--threads", "1", "--out", str(tmp_path)])
    assert rc == 0
    files = list(tmp_path.glob("kernels-*.json"))
    assert len(files) == 1
    doc = json.loads(files[0].read_text())
    assert doc["schema"] == stats.SCHEMA and doc["bench"] == "kernels" and doc["machine"]["kind"] in files[0].name
    cpu = doc["devices"]["cpu"]
    assert cpu["ceilings"]["bandwidth_gbps"] > 0 and cpu["ceilings"]["compute_tops"] > 0
    rows = cpu["rows"]
    assert [(r["M"], r["precision"]) for r in rows] == [(1, "numpy-f32"), (1, "w2a16"), (1, "w2a2"),
                                                        (2, "numpy-f32"), (2, "w2a16"), (2, "w2a2")]
    for r in rows:
        t = r["time_s"]
        assert t["min"] <= t["q1"] <= t["median"] <= t["q3"] <= t["max"] and t["n"] >= 2
        assert r["tops"] == pytest.approx(2 * r["M"] * 64 * 64 / t["median"] / 1e12)
        assert r["gbps"] == pytest.approx(r["bytes"] / t["median"] / 1e9)
    peer = {r["M"]: r for r in rows if r.get("peer")}
    for r in rows:
        if not r.get("peer"):
            # 2 planes of 64x64 bits + one float32 scale per row (one group of 64) + x in + y out
            assert r["bytes"] == 2 * 64 * 64 // 8 + 64 * 4 + 4 * (r["M"] * 64 + r["M"] * 64)
            assert r["vs_peer"] == pytest.approx(peer[r["M"]]["time_s"]["median"] / r["time_s"]["median"])
    assert peer[1]["bytes"] == 4 * 64 * 64 + 4 * (64 + 64)


def test_e2e_precision_parsing_and_report(capsys):
    assert e2e.parse_precision("W4A8g32") == {"name": "w4a8g32", "wbits": 4, "abits": 8, "group": 32, "agroup": 32}
    assert e2e.parse_precision("w8a16")["group"] is None
    assert e2e.parse_precision("w8a8g128t") == {"name": "w8a8g128t", "wbits": 8, "abits": 8, "group": 128,
                                                "agroup": "token"}
    assert e2e.parse_precision("wsourcea16")["wbits"] == "source"          # each tensor at its GGUF type's bits
    for bad in ("4a16", "w9a16", "wxa8", "w4", "w8a8gt1", "wsauce16"):
        with pytest.raises(ValueError):
            e2e.parse_precision(bad)
    e2e.print_report(fixture_docs()["e2e"])
    out = capsys.readouterr().out
    assert "W4A16" in out and "llama.cpp" in out and "4.00" in out     # ratios printed


def test_json_worker_protocol():
    from tools.bench.peers import JsonWorker
    script = ("import json,sys\nprint(json.dumps({'ready': True}), flush=True)\n"
              "for l in sys.stdin:\n r = json.loads(l)\n if r['cmd'] != 'run': break\n"
              " print(json.dumps({'twice': 2 * r['x']}), flush=True)\n")
    with JsonWorker([sys.executable, "-c", script]) as w:
        assert w.ready == {"ready": True}
        assert w.request({"cmd": "run", "x": 21}) == {"twice": 42}


def test_plots_render_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    from tools.bench.plot import plot_file
    for name, doc in fixture_docs().items():
        paths = plot_file(doc, tmp_path / f"{name}-cpu-test-2c-20260102-0304.json")
        assert paths and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)
    assert {p.name for p in tmp_path.iterdir()} >= {"kernels-cpu-test-2c-20260102-0304-roofline.png",
                                                    "e2e-cpu-test-2c-20260102-0304.png"}


def test_readme_section_replacement(tmp_path):
    results = tmp_path / "results"
    for name, doc in fixture_docs().items():
        stats.write_result(doc, results / f"{name}-cpu-test-2c-20260102-0304.json")
    (results / "e2e-cpu-test-2c-20260102-0304.png").write_bytes(b"\x89PNG")
    before, after = "# Title\n\nintro text\n<!-- bench:begin -->\nold table\n", "<!-- bench:end -->\n\n## Rest\ntail\n"
    md = tmp_path / "README.md"
    md.write_text(before + after)
    assert bench_main(["readme", "--readme", str(md), "--out", str(results)]) == 0
    text = md.read_text()
    assert text.startswith("# Title\n\nintro text\n<!-- bench:begin -->\n") and text.endswith(after)
    assert "old table" not in text
    section = text[text.index(readme.BEGIN):text.index(readme.END)]
    assert "### Machine: cpu-test-2c" in section and "Test CPU" in section and "abcdef0123" in section
    assert "| W4A16 | 400.0 (380.0-440.0) | 40.0 (36.0-44.0) |" in section
    assert "](results/e2e-cpu-test-2c-20260102-0304.png)" in section        # image link, relative to the README
    assert "| t l 64x64 | 1 | 2.00 | 0.50 |" in section
    # idempotent: a second run changes nothing
    assert bench_main(["readme", "--readme", str(md), "--out", str(results)]) == 0 and md.read_text() == text


def test_readme_without_markers_fails_and_writes_nothing(tmp_path, capsys):
    md = tmp_path / "README.md"
    md.write_text("# no markers here\n")
    assert bench_main(["readme", "--readme", str(md), "--out", str(tmp_path)]) == 2
    assert "bench:begin" in capsys.readouterr().err and md.read_text() == "# no markers here\n"
    with pytest.raises(ValueError):
        readme.replace_section("<!-- bench:end -->\n<!-- bench:begin -->\n", "x")


def test_synth_model_shapes_and_bytes_per_token():
    from tools.bench.synth import SYNTH, synth_model, weight_bytes_per_token
    pm = synth_model("smollm2-135m", 2, 64, layers=2)
    s = SYNTH["smollm2-135m"]
    d, F, V, hd = s["dim"], s["ffn_dim"], s["vocab_size"], s["dim"] // s["n_heads"]
    assert pm.config.n_layers == 2 and pm.linear("layers.1.w_down").K == F
    shapes = [(s["n_heads"] * hd, d), (s["n_kv_heads"] * hd, d), (s["n_kv_heads"] * hd, d), (d, s["n_heads"] * hd),
              (F, d), (F, d), (d, F)]

    def nbytes(N, K, p, G=64):
        Kp = -(-K // G) * G
        return p * N * Kp // 8 + 4 * N * (Kp // G)          # planes + float32 group scales
    want = 2 * sum(nbytes(N, K, 2) for N, K in shapes) + nbytes(V, d, 4)    # the head at 4 bits below W4
    assert weight_bytes_per_token(pm) == want
    with pytest.raises(ValueError, match="unknown shape"):
        synth_model("gpt-9", 4, 64)


def test_synth_bench_runs_on_cpu(capsys):
    pytest.importorskip("cffi")
    rc = bench_main(["synth", "--shape", "smollm2-135m", "--layers", "1", "--steps", "2", "--prompt-tokens", "2",
                     "--precisions", "w4a16", "--no-save", "--threads", "1"])
    out = capsys.readouterr().out
    assert rc == 0 and "w4a16" in out and "of bandwidth" in out


def test_random_gguf_reads_back_with_its_shapes_and_q4_0_values(tmp_path, default_gguf):
    """The synth GGUF parses as a llama model of the asked shape, with the template's tokenizer, and its
    Q4_0 blocks decode to (nibble - 8) * scale as the GGML format defines them."""
    from loader.gguf_reader import GGUFFile, read_gguf
    from tools.bench.synth_gguf import write_random_gguf
    shape = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96)
    path = write_random_gguf(shape, tmp_path / "r.gguf", default_gguf)
    src = read_gguf(path)
    c = src.config
    assert (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.ffn_dim) == (64, 2, 4, 2, 96)
    assert c.vocab_size == len(GGUFFile(default_gguf).meta["tokenizer.ggml.tokens"]) and c.tied_embeddings
    raw = GGUFFile(path).raw("blk.1.ffn_down.weight")                      # (64 rows, 3 blocks of 18 bytes)
    b = raw.reshape(64, 3, 18)
    d = b[:, :, :2].copy().view(np.float16).astype(np.float64)            # (64, 3, 1)
    q = b[:, :, 2:]
    nib = np.concatenate([q & 15, q >> 4], axis=-1).astype(np.float64)   # low nibbles: weights 0..15
    want = ((nib - 8) * d).reshape(64, 96)
    np.testing.assert_array_equal(src.tensors["layers.1.w_down"].load(), want.astype(np.float32))
    assert np.all(np.abs(d) < 1) and np.all(d > 0)


def test_e2e_notes_a_synth_gguf(tmp_path, default_gguf):
    from tools.bench.e2e import _synth_name
    from tools.bench.synth_gguf import write_random_gguf
    path = write_random_gguf(dict(name="tiny", dim=64, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=64),
                             tmp_path / "r.gguf", default_gguf)
    assert "tiny shapes" in _synth_name(str(path)) and _synth_name(str(default_gguf)) == ""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_other_cores_counts_a_busy_neighbour():
    """The CPU that other processes took while one was timed (e2e records it per sample): a busy child
    shows, this idle process does not count."""
    import time

    from tools.bench import machine
    child = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 1.5: pass"])
    try:
        time.sleep(0.3)
        mark = machine.cpu_mark(os.getpid())
        time.sleep(0.8)
        v = machine.other_cores(mark, os.getpid())
    finally:
        child.wait()
    assert v is not None and 0.3 <= v <= (os.cpu_count() or 1) + 0.5, v


def test_result_path_never_names_an_existing_record(tmp_path):
    # a second run in the same minute gets its own file; the first one's record stays as it was
    from datetime import datetime, timezone
    from tools.bench.stats import result_path
    when = datetime(2026, 12, 1, 3, 4, tzinfo=timezone.utc)
    first = result_path("e2e", {"kind": "m"}, when, tmp_path)
    assert first.name == "e2e-m-20261201-0304.json"
    first.write_text("{}")
    second = result_path("e2e", {"kind": "m"}, when, tmp_path)
    assert second.name == "e2e-m-20261201-0304-2.json"
    second.write_text("{}")
    assert result_path("e2e", {"kind": "m"}, when, tmp_path).name == "e2e-m-20261201-0304-3.json"
    assert first.read_text() == "{}"

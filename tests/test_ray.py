"""Scale-out on a local one-node Ray cluster (issue: Ray Serve replicas and Ray Data batch embedding).

One cluster for the module, started by the test process; the batch-embedding CLI joins it from a
subprocess (RAY_ADDRESS) so that it can be killed with SIGKILL and run again. Every test here is slow:
starting Ray and its Serve proxy takes tens of seconds on 2 cores.
"""
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="the ray extra is not installed")
pytest.importorskip("ray.serve")
pytest.importorskip("pyarrow")

from engine.deploy_ray import ReplicaConfig, serve_app  # noqa: E402
from engine.embed_dataset import read_output, run  # noqa: E402
from tests.data_gen import tiny_models  # noqa: E402
from tests.serve_fixtures import write_tiny_chat_gguf  # noqa: E402

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    try:
        from ray import serve
        serve.shutdown()
    finally:
        ray.shutdown()


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    subj = "the cat|a dog|my neighbour|the old ship|every student|a red kite|the river|our team".split("|")
    verb = "sees|chases|builds|remembers|paints|crosses|follows|ignores|loves|measures".split("|")
    obj = "the moon|a small house|three apples|the long road|an empty box|the city lights|a quiet song".split("|")
    tail = ["", " today", " again", " before dawn", " with care", " in the rain", "!", "?"]
    return [f"{rng.choice(subj)} {rng.choice(verb)} {rng.choice(obj)}{rng.choice(tail)} #{i}" for i in range(n)]


# ---- Ray Serve -------------------------------------------------------------------------------------

def test_replicas_answer_like_engine_serve_and_survive_a_killed_replica(cluster, tmp_path):
    from openai import OpenAI
    import engine
    from engine.server.host import ServerThread, make_state

    gguf = tmp_path / "tiny-chat.gguf"
    write_tiny_chat_gguf(gguf)
    prompts = [f"story {i}: once" for i in range(8)]

    # the reference: engine.serve's app on one process
    m = engine.load(gguf, wbits=8, progress=False, threads=1)
    with ServerThread(make_state(m, model_id="tiny-chat")) as srv:
        c = OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        want = [c.completions.create(model="tiny-chat", prompt=p, max_tokens=12, temperature=0).choices[0].text
                for p in prompts]
        want_chat = c.chat.completions.create(model="tiny-chat", max_tokens=10, temperature=0,
                                              messages=[{"role": "user", "content": "hi"}]).choices[0].message.content
    m.close()

    import socket
    with socket.socket() as s:          # a free port for Ray's HTTP proxy
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = serve_app(ReplicaConfig(model=str(gguf), wbits=8, threads=1), replicas=2, port=port)
    client = OpenAI(base_url=url + "/v1", api_key="x", max_retries=5, timeout=60)
    assert [x.id for x in client.models.list().data] == ["tiny-chat"]
    got = [client.completions.create(model="tiny-chat", prompt=p, max_tokens=12, temperature=0).choices[0].text
           for p in prompts]
    assert got == want
    # streaming through Ray's proxy gives the same text as engine.serve's non-streamed answer
    pieces = client.chat.completions.create(model="tiny-chat", max_tokens=10, temperature=0, stream=True,
                                            messages=[{"role": "user", "content": "hi"}])
    assert "".join(ch.choices[0].delta.content or "" for ch in pieces if ch.choices) == want_chat

    # both replicas served: Serve spreads requests; kill one while requests keep coming
    from ray.util import list_named_actors
    names = [a for a in list_named_actors(all_namespaces=True) if "SERVE_REPLICA" in a["name"]]
    assert len(names) == 2, names
    victim = ray.get_actor(names[0]["name"], namespace=names[0]["namespace"])
    results = []
    for i, p in enumerate(prompts * 2):
        if i == 3:
            ray.kill(victim, no_restart=False)
        results.append(client.completions.create(model="tiny-chat", prompt=p, max_tokens=12,
                                                 temperature=0).choices[0].text)
    assert results == want * 2          # no request lost, none mixed up
    # Serve brings the killed replica back
    t0 = time.monotonic()
    while time.monotonic() - t0 < 120:
        alive = [a for a in list_named_actors(all_namespaces=True) if "SERVE_REPLICA" in a["name"]]
        if len(alive) == 2:
            break
        time.sleep(1)
    assert len(alive) == 2


# ---- Ray Data batch embedding ----------------------------------------------------------------------

def test_batch_embedding_20000_rows_equal_engine_embed(cluster, tmp_path):
    from engine.embed import load_embedder
    texts = sentences(20000)
    src = tmp_path / "corpus.txt"
    src.write_text("\n".join(texts) + "\n")
    r = run(src, tmp_path / "out", replicas=2, shard_rows=2000)
    assert r["rows"] == 20000 and r["embedded_rows"] == 20000
    rows, got_texts, emb = read_output(tmp_path / "out")
    assert rows.tolist() == list(range(20000)) and got_texts == texts
    with load_embedder(threads=2) as e:
        want = e.embed(texts)
    assert emb.shape == want.shape
    np.testing.assert_allclose(emb, want, rtol=0, atol=1e-6)


def _cli(args, env):
    return subprocess.Popen([sys.executable, "-m", "engine.embed_dataset", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_batch_embedding_killed_and_rerun_is_lossless(cluster, tmp_path):
    from engine.embed import load_embedder
    bert = tmp_path / "bert"
    tiny_models.write_tiny_bert(bert)
    texts = sentences(3000, seed=5)
    src = tmp_path / "corpus.jsonl"
    import json
    src.write_text("".join(json.dumps({"id": i, "body": t}) + "\n" for i, t in enumerate(texts)))
    out = tmp_path / "out"
    env = dict(os.environ, RAY_ADDRESS=cluster, PYTHONPATH=str(ROOT))
    args = [str(src), str(out), "--column", "body", "--model", str(bert), "--shard-rows", "100", "--replicas", "2"]
    p = _cli(args, env)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 300:          # kill the driver once some, not all, shards are written
        done = list(out.glob("part-*.parquet")) if out.exists() else []
        if len(done) >= 3 or p.poll() is not None:
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait(60)
    first = len(list(out.glob("part-*.parquet")))
    assert 0 < first < 30, first
    assert not (out / "_SUCCESS").exists()
    p = _cli(args, env)
    log = p.communicate(timeout=600)[0]
    assert p.returncode == 0, log
    assert f"{first} already done" in log or f"{first + 1} already done" in log or "already done" in log
    rows, got_texts, emb = read_output(out)
    assert rows.tolist() == list(range(3000))       # every row exactly once
    assert got_texts == texts
    with load_embedder(bert, threads=1) as e:
        want = e.embed(texts)
    np.testing.assert_allclose(emb, want, rtol=0, atol=1e-6)
    # a rerun on the finished output does nothing and changes nothing
    before = {f.name: f.stat().st_mtime_ns for f in out.glob("part-*.parquet")}
    p = _cli(args, env)
    log = p.communicate(timeout=300)[0]
    assert p.returncode == 0 and "30 already done, 0 to embed" in log, log
    assert before == {f.name: f.stat().st_mtime_ns for f in out.glob("part-*.parquet")}


def test_batch_embedding_refuses_a_foreign_output(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    (tmp_path / "in.txt").write_text("a\nb\n")
    r = subprocess.run([sys.executable, "-m", "engine.embed_dataset", str(tmp_path / "in.txt"), str(tmp_path / "out")],
                       cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 2 and "not an embed_dataset output" in r.stderr
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"

"""tools.bench firstuse / commands: the process timing and the fresh caches they run in."""
import shutil
import sys

from tools.bench.commands import _shared_cache
from tools.bench.firstuse import fresh_cache, run_timed


def test_run_timed_reports_status_time_memory_and_output():
    r = run_timed([sys.executable, "-c", "import sys; b = bytearray(64 << 20); print('hi'); sys.exit(3)"], env=None)
    assert r["status"] == 3 and r["stdout"].strip() == "hi"
    assert r["wall_s"] > 0 and r["cpu_s"] >= 0
    assert r["peak_rss_bytes"] > 64 << 20                    # the child's own peak, from wait4


def test_fresh_cache_shares_only_the_compiled_modules(tmp_path):
    real = tmp_path / "real"
    for d in ("cpu", "pack", "packed", "llm-x"):
        (real / d).mkdir(parents=True)
    fresh = fresh_cache(real)
    assert sorted(p.name for p in fresh.iterdir()) == ["cpu", "pack"]
    shared = _shared_cache(real)
    assert sorted(p.name for p in shared.iterdir()) == ["cpu", "llm-x", "pack"]     # models yes, packs no
    shutil.rmtree(fresh)
    shutil.rmtree(shared)

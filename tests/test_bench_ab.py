"""tools/bench/ab.py: refuses what is not a source tree (exit 2, nothing written); the A/B run itself is
measured by hand (it loads the default model twice)."""
from tools.bench import ab


def test_ab_refuses_a_directory_that_is_not_a_source_tree(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert ab.main(["--base", str(tmp_path), "--out", str(out)]) == 2
    assert "not an anybit source tree" in capsys.readouterr().err and not out.exists()

"""tools.eval: configuration parsing, and the README section rendered from recorded rows."""
import json

import numpy as np
import pytest

from tools import eval as ev


def test_parse_config():
    assert ev.parse_config("W8A8g128t") == {"name": "W8A8g128t", "wbits": 8, "abits": 8, "group": 128,
                                            "agroup": "token"}
    assert ev.parse_config("W4A8g128a32")["agroup"] == 32
    assert ev.parse_config("W4A16")["group"] is None
    with pytest.raises(ValueError, match="bad configuration"):
        ev.parse_config("W4")


def test_log_softmax_normalises():
    z = np.array([[1.0, 2.0, 3.0], [1000.0, 0.0, -1000.0]])
    assert np.allclose(np.exp(ev.log_softmax(z)).sum(-1), 1.0)


def test_readme_section_is_rendered_between_markers(tmp_path):
    rows = [{"config": "W16A16", "ppl": 20.5, "ppl_rel": 0.0, "kl": 0.0, "top1": 1.0, "weight_bytes": 2**20,
             "device": "cpu", "tokens": 100},
            {"config": "W4A16", "ppl": 20.6, "ppl_rel": 0.005, "kl": 0.01, "top1": 0.9, "weight_bytes": 2**19,
             "device": "cpu", "tokens": 100}]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- eval:begin -->\nold\n<!-- eval:end -->\nend\n")
    assert ev.main(["--readme", str(tmp_path / "rows.json"), str(readme)]) == 0
    text = readme.read_text()
    assert "old" not in text and "| W4A16 | 20.60 | +0.50% | 0.0100 | 90.0% | 0.5 | cpu |" in text
    assert text.startswith("intro\n") and text.endswith("end\n")
    readme.write_text("no markers")
    with pytest.raises(ValueError, match="markers"):
        ev.main(["--readme", str(tmp_path / "rows.json"), str(readme)])

"""The evaluation and calibration texts ship with Python and never overlap."""
from engine.texts import calibration_text, eval_text, zen


def test_texts_are_disjoint_english_and_long_enough():
    ev, cal = eval_text(), calibration_text()
    assert ev.startswith("The Zen of Python") and zen() in ev
    assert len(ev) > 5000 and len(cal) > 3000
    ev_lines = {ln.strip() for ln in ev.splitlines() if len(ln.strip()) > 30}
    cal_lines = {ln.strip() for ln in cal.splitlines() if len(ln.strip()) > 30}
    assert not ev_lines & cal_lines

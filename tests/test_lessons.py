"""mdlib.lessons: a lesson's advanced settings, merged over their defaults, with unknown names refused."""

import pytest

from mdlib import lessons


def test_settings_merge_and_refuse(monkeypatch):
    fake = lessons._settings(batch_size=(4, "images per batch"), protocol=("mdlib", "how images are prepared"))
    monkeypatch.setattr(lessons, "ADVANCED", {**lessons.ADVANCED, "99": fake})
    s = lessons.settings("99", {"batch_size": 8, "protocol": None})
    assert (s.batch_size, s.protocol) == (8, "mdlib")                # None keeps the default
    assert vars(lessons.settings("99")) == {"batch_size": 4, "protocol": "mdlib"}
    with pytest.raises(KeyError, match="no advanced setting 'batchsize'; known: batch_size, protocol"):
        lessons.settings("99", {"batchsize": 8})
    with pytest.raises(KeyError, match="no lesson '07'"):
        lessons.settings("07")
    t = lessons.table("99")
    assert list(t.index) == ["batch_size", "protocol"] and t.loc["batch_size", "default"] == "4"


def test_every_lesson_has_an_entry():
    from pathlib import Path

    notebooks = sorted(p.name[:2] for p in (Path(__file__).parents[1] / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    assert list(lessons.ADVANCED) == notebooks
    for lesson in lessons.ADVANCED:
        for name, setting in lessons.ADVANCED[lesson].items():
            assert name.islower() and setting.help, (lesson, name)

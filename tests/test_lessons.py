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
    with pytest.raises(KeyError, match="no lesson '08'"):
        lessons.settings("08")
    t = lessons.table("99")
    assert list(t.index) == ["batch_size", "protocol"] and t.loc["batch_size", "default"] == "4"


def test_every_lesson_has_an_entry():
    from pathlib import Path

    notebooks = sorted(p.name[:2] for p in (Path(__file__).parents[1] / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    assert list(lessons.ADVANCED) == notebooks
    for lesson in lessons.ADVANCED:
        for name, setting in lessons.ADVANCED[lesson].items():
            assert name.islower() and setting.help, (lesson, name)


# ------------------------------------------------------------------------------ the notebooks as lessons

def _notebooks():
    import json
    from pathlib import Path

    for path in sorted((Path(__file__).parents[1] / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        yield path, json.loads(path.read_text())


def _source(cell) -> str:
    return "".join(cell["source"])


def _assignments(cell) -> list[str]:
    import ast

    return [t.id for node in ast.parse(_source(cell)).body if isinstance(node, ast.Assign)
            for t in node.targets if isinstance(t, ast.Name)]


def test_lessons_carry_no_preset_branches_and_no_model_literals():
    """What differs between the mini and real paths lives in mdlib.presets, not in the lessons."""
    for path, nb in _notebooks():
        for k, cell in enumerate(nb["cells"]):
            if cell["cell_type"] != "code":
                continue
            src = _source(cell)
            for needle in ('PRESET ==', 'PRESET !=', '"tiny-trained"', "'tiny-trained'"):
                assert needle not in src, f"{path.name} cell {k}: {needle}"


def test_parameters_cells_stay_small_and_cells_short():
    import statistics

    for path, nb in _notebooks():
        tagged = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
        assert len(tagged) == 1, path.name
        names = _assignments(tagged[0])
        # About 8 settings a learner changes; lesson 06 has 11 (its subjects, protocol and DEVICE, which `mdlib
        # course -p DEVICE=...` must reach in every lesson that runs models).
        assert len([n for n in names if n != "ADVANCED"]) <= 11, (path.name, names)
        code = [c for c in nb["cells"] if c["cell_type"] == "code" and c is not tagged[0]]
        lines = [len([line for line in _source(c).splitlines() if line.strip()]) for c in code]
        assert statistics.median(lines) <= 7, (path.name, sorted(lines))
        assert max(lines) <= 20, (path.name, sorted(lines))


def test_lessons_open_with_goals_and_end_with_exercises_and_no_outputs():
    for path, nb in _notebooks():
        first = _source(nb["cells"][0]).lower()
        assert nb["cells"][0]["cell_type"] == "markdown" and ("you will" in first or "goals" in first), path.name
        tail = " ".join(_source(c).lower() for c in nb["cells"][-3:] if c["cell_type"] == "markdown")
        assert "exercise" in tail and "recap" in tail, path.name
        for cell in nb["cells"]:
            if cell["cell_type"] == "code":
                assert not cell.get("outputs") and cell.get("execution_count") is None, path.name

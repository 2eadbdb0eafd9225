"""The `mdlib` command, the data-root rules and the results files the lessons write."""

import json
import math

import numpy as np
import pytest

from mdlib import cli, paths
from mdlib.nsd import layout
from mdlib.record import Results, load_results, to_jsonable, write_json_atomic


def test_data_root_follows_env_and_overrides(tmp_path, monkeypatch):
    monkeypatch.setenv(paths.ENV_VAR, str(tmp_path / "home"))
    assert paths.data_root(None, "nsd") == tmp_path / "home" / "nsd"
    assert paths.data_root("", "mini") == tmp_path / "home" / "mini-nsd"
    assert paths.data_root(tmp_path / "x", "mini") == tmp_path / "x"
    monkeypatch.delenv(paths.ENV_VAR)
    assert paths.home() == paths.Path.home() / "mdlib-data"
    with pytest.raises(ValueError, match="preset"):
        paths.data_root(None, "full")


def test_mdlib_mini_writes_nsd_files(tmp_path, capsys):
    root = tmp_path / "mini"
    rc = cli.main(["mini", str(root), "--subjects", "2", "--n-shared", "6", "--n-per-subject", "24",
                   "--trials-per-session", "18", "--stim-size", "32", "--quiet"])
    assert rc == 0
    for rel in (layout.expdesign(), layout.stim_info(), layout.stimuli(), layout.roi_file(2, "nsdgeneral"),
                layout.betas_file(2, 4, "hdf5"), layout.betas_file(2, 4, "nii.gz"), layout.coco_captions("val2017")):
        assert (root / rel).is_file(), rel
    assert not (root / layout.betas_file(2, 5, "hdf5")).exists()  # 3 x 24 / 18 = 4 sessions
    assert json.loads((root / "mini_nsd.json").read_text())["parameters"]["n_per_subject"] == 24
    assert "mini-NSD written" in capsys.readouterr().out


def test_mdlib_info(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv(paths.ENV_VAR, str(tmp_path))
    assert cli.main(["info"]) == 0
    assert str(tmp_path / "mini-nsd") in capsys.readouterr().out


def test_course_parameters_parse_as_literals():
    assert cli._literal("37") == 37 and cli._literal("'nsd'") == "nsd" and cli._literal("nsd") == "nsd"
    assert cli._literal("[1, 2]") == [1, 2]


def test_results_are_plain_json(tmp_path):
    rec = Results("lesson", tmp_path)
    rec.update(a=np.float32(0.5), b=np.int64(3), c=np.array([1, 2]), d=np.bool_(True), e=float("nan"),
               f={"g": (np.float64(1.5), tmp_path)})
    path = rec.save(display=False)
    data = json.loads(path.read_text())
    assert data == {"a": 0.5, "b": 3, "c": [1, 2], "d": True, "e": None, "f": {"g": [1.5, str(tmp_path)]}}
    assert load_results(tmp_path) == {"lesson": data}
    assert to_jsonable(math.inf) is None


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    path = write_json_atomic(tmp_path / "r.json", {"ok": 1})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"ok": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_every_number_is_flattened_in_order(tmp_path):
    from mdlib.record import flatten_numbers, write_numbers_csv

    results = {"05": {"loss": {"stage1": 0.5, "note": "text", "ok": True}, "curve": [1, 2.5], "nan": None},
               "06": {"table": {"full": {"SSIM": np.float32(0.25)}}}}
    flat = flatten_numbers(results)
    assert [k for k, _ in flat] == ["05.loss.stage1", "05.curve[0]", "05.curve[1]", "05.nan", "06.table.full.SSIM"]
    assert [v for _, v in flat][:3] == [0.5, 1.0, 2.5] and math.isnan(flat[3][1]) and flat[4][1] == 0.25
    path = write_numbers_csv(tmp_path / "summary.csv", results)
    lines = path.read_text().splitlines()
    assert lines[0] == "key,value" and lines[1] == "05.loss.stage1,0.5" and lines[4] == "05.nan,nan"



def test_atomic_writes_have_the_permissions_of_an_ordinary_open(tmp_path):
    """Run outputs, caches and results must be readable by the other users of a shared file system: an atomic
    write gives its file what open() would (0o666 less the umask), not mkstemp's 0o600."""
    import os
    import stat

    from mdlib.record import _process_umask, write_json_atomic, write_npz_atomic

    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    expected = stat.S_IMODE(plain.stat().st_mode)
    assert expected == 0o666 & ~_process_umask()
    for path in (write_json_atomic(tmp_path / "r.json", {"a": 1}), write_npz_atomic(tmp_path / "a.npz", x=[1])):
        assert stat.S_IMODE(os.stat(path).st_mode) == expected, path

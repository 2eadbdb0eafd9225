"""mdlib.runstate: a run's saved state on disk: round trip, atomic saves, the run key and the errors."""

import json
import os
import stat

import numpy as np
import pytest

from mdlib import record, runstate


def _arrays(rng, iteration=3):
    return {"iteration": np.array(iteration), "lr": np.array(0.0125),
            "z": rng.normal(size=(2, 4, 3, 3)).astype(np.float32), "snap0": rng.integers(0, 256, size=(2, 8, 8, 3), dtype=np.uint8), "name": np.array("adam")}


def test_saved_arrays_come_back_as_saved_with_a_summary_beside_them(tmp_path, rng):
    store = runstate.stores_under(tmp_path / "runs")("k1")
    assert store.path == tmp_path / "runs" / "k1" / "stage2_state.npz" and store.load() is None
    arrays = _arrays(rng)
    store.save(arrays, {"iteration": 3, "mean_loss": [0.5, np.float32(0.25)]})
    got = store.load(required=("z", "lr"))
    assert sorted(got) == sorted(arrays)                     # the run key is the store's, not returned
    for k, v in arrays.items():
        assert got[k].dtype == v.dtype
        np.testing.assert_array_equal(got[k], v)
    assert json.loads(store.summary_path.read_text()) == {"key": "k1", "iteration": 3, "mean_loss": [0.5, 0.25]}
    with np.load(store.path, allow_pickle=False) as f:        # the layout stage 2 has always written
        assert str(f["key"]) == "k1" and "z" in f.files
    # another run key is another folder: nothing shared
    other = runstate.stores_under(tmp_path / "runs")("k2")
    assert other.folder == tmp_path / "runs" / "k2" and other.load() is None
    with pytest.raises(ValueError, match="'key' is the store's own entry"):
        store.save({"key": np.array("x")}, {})


def test_a_failed_save_leaves_the_previous_state_whole(tmp_path, rng):
    store = runstate.StateStore(tmp_path / "s", "k")
    store.save(_arrays(rng, iteration=2), {"iteration": 2})
    before = store.path.read_bytes()

    class Unsaveable:            # np.savez fails on it part-way through writing the archive
        def __array__(self, *a, **k):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        store.save({"z": np.zeros(3), "bad": Unsaveable()}, {"iteration": 4})
    assert store.path.read_bytes() == before
    assert int(store.load()["iteration"]) == 2
    assert json.loads(store.summary_path.read_text())["iteration"] == 2   # the summary was not written either
    assert sorted(p.name for p in store.folder.iterdir()) == ["stage2_state.json", "stage2_state.npz"]  # no temp


def test_files_get_the_mode_an_ordinary_open_gives(tmp_path, rng):
    plain = tmp_path / "plain"
    plain.write_text("x")
    store = runstate.StateStore(tmp_path / "s", "k")
    store.save(_arrays(rng), {})
    expected = stat.S_IMODE(plain.stat().st_mode)
    assert expected == record.FILE_MODE == 0o666 & ~record._process_umask()
    for path in (store.path, store.summary_path):
        assert stat.S_IMODE(os.stat(path).st_mode) == expected, path


def test_bad_files_are_refused_naming_the_file_and_the_fix(tmp_path, rng):
    store = runstate.StateStore(tmp_path / "s", "mine")
    store.save(_arrays(rng), {})
    good = store.path.read_bytes()
    # truncated (say, copied while written by another tool), or not an npz at all
    for content in (good[: len(good) // 2], b"not an archive", good[:10]):
        store.path.write_bytes(content)
        with pytest.raises(ValueError, match="cannot be read") as err:
            store.load()
        assert str(store.path) in str(err.value) and "delete it to start this run over" in str(err.value)
        assert store.path.read_bytes() == content                # nothing deleted behind the user's back
    # another run's state in this folder
    runstate.StateStore(tmp_path / "s", "theirs").save(_arrays(rng), {})
    with pytest.raises(ValueError, match="belongs to another run") as err:
        store.load()
    assert str(store.path) in str(err.value) and "theirs" in str(err.value) and "mine" in str(err.value)
    assert "delete that folder to start this run over" in str(err.value)
    # an older format: no run key, or an entry the algorithm needs is missing
    record.write_npz_atomic(store.path, z=np.zeros(2))
    with pytest.raises(ValueError, match=r"older mdlib \(no key\).*delete it to start this run over"):
        store.load()
    store.save({"z": np.zeros(2)}, {})
    assert sorted(store.load(required=("z",))) == ["z"]
    with pytest.raises(ValueError, match=r"older mdlib \(no cost, lr\)") as err:
        store.load(required=("z", "cost", "lr"))
    assert str(store.path) in str(err.value)
    # pickled objects are never read
    with open(store.path, "wb") as f:
        np.savez(f, key=np.array("mine"), obj=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="cannot be read"):
        store.load()

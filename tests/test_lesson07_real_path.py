"""Lesson 07 on the real path's route (PRESET "nsd"), on files in NSD's formats: a mini-NSD root read as NSD,
with the tiny models named in ADVANCED (the real path's SD v1-4 and CLIP cannot be loaded here). What it
checks: every cell runs with the nsd preset's rows (no mini-NSD sidecar is needed or read), and the design's
counts it shows and records are those computed from the root's own nsd_expdesign.mat.

It runs in the unit tests' worker (not in tests/test_notebooks.py's), beside the lessons.
"""

import numpy as np
import pytest

from mdlib import course, transfer
from mdlib.nsd.design import load_design

pytestmark = pytest.mark.slow

TINY_MODELS = {"sd_model": "tiny-trained", "clip_model": "tiny-trained"}


def test_lesson_07_on_the_nsd_preset_shows_the_design_counts_of_the_root(mini_nsd, tmp_path):
    root = mini_nsd()                         # make demo's: subjects 1, 2, 5 and 7, the default sizes
    (root / "mini_nsd.json").unlink()         # nothing of mini-NSD's own: the real path must not need it
    summary = course.run_course("nsd", data_root=root, out=tmp_path / "out", only=["07"], progress=False,
                                parameters={"SUBJECT": 5, "SESSIONS": [1, 2], "N_IMAGES": 2,
                                            "ADVANCED": {**TINY_MODELS, "families": ["z", "c"]}})
    r = summary["results"]["07_new_subject"]
    assert (r["subject"], r["references"], r["sessions"]) == (5, [1, 2, 7], [1, 2])
    want = transfer.shared_per_session(load_design(root), 5, references=[1, 2, 7])
    assert r["design"]["usable_shared_images"] == want["usable_shared_images"].tolist()
    assert r["design"]["shared_images"] == want["shared_images"].tolist()
    for k in (1, 2):
        split = transfer.transfer_split(load_design(root), 5, sessions=range(1, k + 1), references=[1, 2, 7])
        assert r["amounts"][str(k)]["test_ids"] == split.test_ids.tolist()
        assert set(r["amounts"][str(k)]["median_r"]["shared"]) == {"z", "c"}
    assert r["n_images"] == 2 and set(r["metrics"]) == {"align", "shared", "scratch", "full", "another test image"}
    assert all(np.isfinite(r["metrics"][m]["PixCorr"]) for m in r["metrics"])

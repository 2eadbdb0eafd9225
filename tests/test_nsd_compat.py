"""mini-NSD holds what community code reads from the real NSD, where it reads it, and mdlib finds NSD's files
where the real NSD and community trees keep them (docs/data.md):

- each subject's behavioural record ``nsddata/ppdata/subjNN/behav/responses.tsv`` (NSD's columns, values
  consistent with the design, plausible simulated behaviour) and :func:`mdlib.nsd.design.load_responses`;
- ``Design.completed_sessions``, true of the files on disk for every subject;
- the ROI colour tables ``<atlas>.mgz.ctab`` in the subject's and fsaverage's label folders, and
  :func:`mdlib.nsd.rois.roi_labels`' lookup (subject, fsaverage, NSD's built-in names);
- the COCO captions in ``coco/annotations/`` or ``nsddata_stimuli/stimuli/nsd/annotations/``.

The files are read here with pandas / scipy / nibabel directly where a test checks a format, and every
expected value is computed in the test from the design file (an independent reference), never taken from the
code under test.
"""

from __future__ import annotations

import json
import re
import shutil

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import scipy.io

from mdlib.nsd import layout, rois
from mdlib.nsd.design import RESPONSE_COLUMNS, Design, load_design, load_responses, scaled_sessions_completed
from mdlib.nsd.stimuli import caption_file, load_captions
from mdlib.synth import behaviour, brain
from mdlib.synth import write as synth_write
from mdlib.synth.write import SIDECAR, make_design

#: A small mini-NSD with the default's 12 sessions (so subjects 3/6 and 4/8 complete 10 and 9): betas for
#: subjects 1 and 7, behaviour for all eight. About 2-3 s to write.
MINI = dict(subjects=(1, 7), n_shared=8, n_per_subject=40, trials_per_session=10, stim_size=16, grid_scale=0.16,
            n_unseen=2, seed=5)
T = MINI["trials_per_session"]
#: What mini-NSD's subjects complete with 12 sessions: NSD's 40/32/30 scaled (docs/data.md).
EXPECTED_COMPLETED = {1: 12, 2: 12, 3: 10, 4: 9, 5: 12, 6: 10, 7: 12, 8: 9}
#: responses.tsv's header as NSD's data manual lists the columns (1..19).
NSD_MANUAL_COLUMNS = ["SUBJECT", "SESSION", "RUN", "TRIAL", "73KID", "10KID", "TIME", "ISOLD", "ISCORRECT", "RT",
                      "CHANGEMIND", "MEMORYRECENT", "MEMORYFIRST", "ISOLDCURRENT", "ISCORRECTCURRENT", "TOTAL1",
                      "TOTAL2", "BUTTON", "MISSINGDATA"]
WHOLE = ["SUBJECT", "SESSION", "RUN", "TRIAL", "73KID", "10KID", "ISOLD", "ISOLDCURRENT", "TOTAL1", "TOTAL2",
         "MISSINGDATA"]


@pytest.fixture(scope="module")
def root(mini_nsd):
    return mini_nsd(**MINI)


@pytest.fixture(scope="module")
def mat(root):
    m = scipy.io.loadmat(root / str(layout.expdesign()))
    return {k: m[k].astype(np.int64) for k in ("masterordering", "subjectim", "sharedix", "basiccnt")}


@pytest.fixture(scope="module")
def responses(root):
    """Every subject's responses.tsv as pandas reads it (the way nsd_access does)."""
    return {s: pd.read_csv(root / str(layout.behav_responses(s)), delimiter="\t") for s in layout.ALL_SUBJECTS}


# -- responses.tsv: format -------------------------------------------------------------------------------------
def test_responses_text_is_nsds_format(root):
    text = (root / str(layout.behav_responses(1))).read_text(encoding="ascii")
    lines = text.split("\n")
    assert lines[0].split("\t") == NSD_MANUAL_COLUMNS == list(RESPONSE_COLUMNS)
    assert lines[-1] == "" and len(lines) - 2 == EXPECTED_COMPLETED[1] * T  # header, rows, final newline
    rows = [line.split("\t") for line in lines[1:-1]]
    assert {len(r) for r in rows} == {19}
    cells = {name: [r[i] for r in rows] for i, name in enumerate(NSD_MANUAL_COLUMNS)}
    assert all(c != "" for column in cells.values() for c in column)  # missing values are spelled NaN
    for name in WHOLE:  # never missing, whole numbers without a decimal point
        assert all(re.fullmatch(r"\d+", c) for c in cells[name]), name
    for name in ("ISCORRECT", "CHANGEMIND", "ISCORRECTCURRENT", "BUTTON", "MEMORYRECENT", "MEMORYFIRST"):
        assert all(re.fullmatch(r"\d+|NaN", c) for c in cells[name]), name
    assert "NaN" in cells["MEMORYRECENT"] and "NaN" in cells["BUTTON"]  # novel images; unanswered trials
    assert all(re.fullmatch(r"\d+\.\d+|NaN", c) for c in cells["RT"] + cells["TIME"])


def test_nsd_access_style_reading(root, responses):
    """nsd_access reads the file with pandas (tab-delimited) and selects a session by its 1-based SESSION;
    other community code reads column 4 for 73KID."""
    behaviour_of_1 = responses[1]
    for session in range(1, EXPECTED_COMPLETED[1] + 1):
        assert len(behaviour_of_1[behaviour_of_1["SESSION"] == session]) == T
    assert len(responses[4][responses[4]["SESSION"] == EXPECTED_COMPLETED[4] + 1]) == 0
    ids = pd.read_csv(root / str(layout.behav_responses(1)), delimiter="\t", usecols=[4])["73KID"]
    assert ids.equals(behaviour_of_1["73KID"])
    assert behaviour_of_1["73KID"].dtype.kind == "i" and behaviour_of_1["RT"].dtype.kind == "f"


# -- responses.tsv: consistent with the design ---------------------------------------------------------------
@pytest.mark.parametrize("subject", layout.ALL_SUBJECTS)
def test_responses_follow_the_design(root, mat, responses, subject):
    table = responses[subject]
    n = EXPECTED_COMPLETED[subject] * T
    mo = mat["masterordering"].ravel()[:n]
    assert len(table) == n
    assert (table["SUBJECT"] == subject).all()
    np.testing.assert_array_equal(table["SESSION"], np.arange(n) // T + 1)
    np.testing.assert_array_equal(table["10KID"], mo)                                   # 1-based column
    np.testing.assert_array_equal(table["73KID"], mat["subjectim"][subject - 1, mo - 1])  # 1-based nsdId
    # the reader gives the same, and its 73KID - 1 is the design's nsd_id trial for trial
    read = load_responses(root, subject)
    trials = load_design(root).trials(subject)
    np.testing.assert_array_equal(read["73KID"].to_numpy() - 1, trials["nsd_id"])
    np.testing.assert_array_equal(read["10KID"], trials["image_index"])
    np.testing.assert_array_equal(read["SESSION"], trials["session"])


def test_runs_and_trial_numbers(responses):
    table = responses[2]
    for (session, run), rows in table.groupby(["SESSION", "RUN"]):
        assert rows["TRIAL"].tolist() == list(range(1, len(rows) + 1))  # 1-based within the run
    assert sorted(table.groupby("SESSION")["RUN"].max().unique()) == [len(behaviour.run_lengths(T))]
    # NSD's own layout: 12 runs of 63 (odd runs) and 62 (even runs) stimulus trials in a 750-trial session
    assert behaviour.run_lengths(750) == [63, 62] * 6
    assert behaviour.run_lengths(100) == [50, 50] and behaviour.run_lengths(10) == [10]
    assert behaviour.run_lengths(125) == [63, 62] and sum(behaviour.run_lengths(101)) == 101


@pytest.mark.parametrize("subject", [1, 4])
def test_memory_columns_by_brute_force(responses, subject):
    """ISOLD, MEMORYRECENT, MEMORYFIRST and ISOLDCURRENT from a plain loop over the subject's own trials."""
    table = responses[subject]
    shown: dict[int, list[int]] = {}
    for k, (nsd_id, session) in enumerate(zip(table["73KID"], table["SESSION"])):
        before = shown.setdefault(int(nsd_id), [])
        row = table.iloc[k]
        assert row["ISOLD"] == (len(before) > 0)
        if before:
            assert row["MEMORYRECENT"] == k - before[-1] - 1
            assert row["ISOLDCURRENT"] == (table["SESSION"].iloc[before[-1]] == session)
        else:
            assert np.isnan(row["MEMORYRECENT"]) and row["ISOLDCURRENT"] == 0
        if len(before) >= 2:
            assert row["MEMORYFIRST"] == k - before[0] - 1
        else:
            assert np.isnan(row["MEMORYFIRST"])  # on a second showing the first is the most recent
        before.append(k)


@pytest.mark.parametrize("subject", layout.ALL_SUBJECTS)
def test_answers_are_self_consistent(responses, subject):
    t = responses[subject]
    answered = t["BUTTON"].notna()
    for name in ("ISCORRECT", "RT", "CHANGEMIND", "ISCORRECTCURRENT"):
        assert t[name].notna().equals(answered), name
    assert ((t["TOTAL1"] + t["TOTAL2"] > 0) == answered).all()
    b = t.loc[answered]
    assert set(b["BUTTON"].unique()) <= {1.0, 2.0}
    said_old = b["BUTTON"] == 2
    assert (b["ISCORRECT"] == (said_old == (b["ISOLD"] == 1))).all()
    assert (b["ISCORRECTCURRENT"] == (said_old == (b["ISOLDCURRENT"] == 1))).all()
    assert (np.where(said_old, b["TOTAL2"], b["TOTAL1"]) >= 1).all()  # the final button was pressed
    assert (b["CHANGEMIND"] == ((b["TOTAL1"] > 0) & (b["TOTAL2"] > 0))).all()
    assert b["RT"].between(200, 4000).all() and (t["MISSINGDATA"] == 0).all()
    # TIME: days, increasing, trials at least 4 s apart in multiples of 4 s within a run, sessions on other days
    time = t["TIME"].to_numpy()
    assert (np.diff(time) > 0).all()
    for _, rows in t.groupby(["SESSION", "RUN"]):
        gaps = np.diff(rows["TIME"].to_numpy()) * 86400
        np.testing.assert_allclose(gaps / 4, np.round(gaps / 4), atol=1e-3)
        assert gaps.min() >= 4 - 1e-3
    day = t.groupby("SESSION")["TIME"].agg(["min", "max"]).apply(np.floor)
    assert (day["min"] == day["max"]).all() and day["min"].is_unique


def test_behaviour_is_plausible(responses):
    """Pooled over the 8 subjects: old images are called old far more often than new ones (a hit rate well
    above the false-alarm rate), recent repeats (same session) are recognised better than older ones, few
    trials go unanswered, and hits on recent repeats are faster than correct rejections."""
    t = pd.concat(responses.values())
    answered = t[t["BUTTON"].notna()]
    old, new = answered[answered["ISOLD"] == 1], answered[answered["ISOLD"] == 0]
    hit, fa = (old["BUTTON"] == 2).mean(), (new["BUTTON"] == 2).mean()
    assert 0.55 < hit < 0.95 and 0.03 < fa < 0.3 and hit - fa > 0.35
    within, across = old[old["ISOLDCURRENT"] == 1], old[old["ISOLDCURRENT"] == 0]
    assert (within["BUTTON"] == 2).mean() > (across["BUTTON"] == 2).mean() + 0.05
    assert t["BUTTON"].isna().mean() < 0.05
    recent_hits, rejections = within[within["BUTTON"] == 2], new[new["BUTTON"] == 1]
    assert recent_hits["RT"].median() < rejections["RT"].median()


def test_behaviour_is_seeded_and_its_own_stream(root, mat, mini_nsd, tmp_path, monkeypatch):
    """The same seed gives the same bytes; another seed other answers on the same trials; and writing the
    behaviour changes no other file of mini-NSD (its random stream is its own)."""
    mo, im = mat["masterordering"].ravel(), mat["subjectim"]
    one = behaviour.responses_tsv(behaviour.simulate_responses(mo, im, T, 3, 10, seed=MINI["seed"]))
    assert one == (root / str(layout.behav_responses(3))).read_bytes()
    other = behaviour.simulate_responses(mo, im, T, 3, 10, seed=MINI["seed"] + 1)
    again = pd.read_csv(root / str(layout.behav_responses(3)), delimiter="\t")
    design_columns = ["SESSION", "RUN", "TRIAL", "73KID", "10KID", "ISOLD", "MEMORYRECENT", "ISOLDCURRENT"]
    pd.testing.assert_frame_equal(other[design_columns], again[design_columns], check_dtype=False)
    assert not np.array_equal(other["BUTTON"].fillna(0), again["BUTTON"].fillna(0))

    def no_behaviour(root, design, seed):  # empty files in place of the simulated ones: no draws at all
        for s in layout.ALL_SUBJECTS:
            (root / str(layout.behav_responses(s))).parent.mkdir(parents=True, exist_ok=True)
            (root / str(layout.behav_responses(s))).write_bytes(b"")

    monkeypatch.setattr(synth_write, "_write_responses", no_behaviour)
    without = tmp_path / "without-behaviour"
    synth_write.write_mini_nsd(without, **MINI, progress=False)
    listed = json.loads((root / SIDECAR).read_text())["files"]
    behav = {str(layout.behav_responses(s)) for s in layout.ALL_SUBJECTS}
    compared = [rel for rel in listed if rel not in behav]
    assert len(compared) > 30
    for rel in compared:
        assert (without / rel).read_bytes() == (root / rel).read_bytes(), rel
    assert (without / str(layout.behav_responses(1))).read_bytes() == b""


def test_load_responses_errors(root, tmp_path):
    with pytest.raises(FileNotFoundError, match="nsddata/ppdata/subj02/behav/responses.tsv") as err:
        load_responses(tmp_path, 2)
    assert "s3://natural-scenes-dataset/" in str(err.value)
    path = tmp_path / str(layout.behav_responses(2))
    path.parent.mkdir(parents=True)
    good = pd.read_csv(root / str(layout.behav_responses(2)), delimiter="\t")
    good.drop(columns=["RT", "BUTTON"]).to_csv(path, sep="\t", index=False)
    with pytest.raises(ValueError, match=r"missing column\(s\) \['RT', 'BUTTON'\]") as err:
        load_responses(tmp_path, 2)
    assert str(path) in str(err.value)
    good.assign(SUBJECT=3).to_csv(path, sep="\t", index=False)
    with pytest.raises(ValueError, match=r"rows of subject\(s\) \[3\]"):
        load_responses(tmp_path, 2)
    good.assign(SESSION=0.5).to_csv(path, sep="\t", index=False)
    with pytest.raises(ValueError, match="SESSION must hold whole numbers"):
        load_responses(tmp_path, 2)
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="cannot read it as NSD's responses.tsv"):
        load_responses(tmp_path, 2)
    with pytest.raises(ValueError, match="subjects 1..8"):
        load_responses(root, 9)


# -- sessions completed ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("subject", layout.ALL_SUBJECTS)
def test_completed_sessions_are_what_the_files_say(root, responses, subject):
    design = load_design(root)
    n = design.completed_sessions(subject)
    assert n == EXPECTED_COMPLETED[subject]
    assert n == responses[subject]["SESSION"].max()
    assert n == json.loads((root / SIDECAR).read_text())["sizes"]["sessions_completed"][str(subject)]
    assert design.completed_sessions_source(subject) == str(root / str(layout.behav_responses(subject)))
    # the stimulus table's presentations stop at the last trial of the last session completed
    info = pd.read_csv(root / str(layout.stim_info("csv")))
    last = info[[f"subject{subject}_rep{r}" for r in range(3)]].to_numpy().max()
    assert (n - 1) * T < last <= n * T
    # betas: exactly sessions 1..n, in both formats, for the subjects mini-NSD wrote betas for
    found = sorted(int(p.name[13:15]) for p in (root / str(layout.betas_dir(subject))).glob("betas_session*.hdf5")) \
        if (root / str(layout.betas_dir(subject))).is_dir() else []
    nifti = sorted((root / str(layout.betas_dir(subject))).glob("betas_session*.nii.gz")) if found else []
    if subject in MINI["subjects"]:
        assert found == list(range(1, n + 1)) and len(nifti) == n
    else:
        assert found == []
    assert design.trials(subject)["session"].max() == n
    with pytest.raises(ValueError, match=rf"subject {subject} has sessions 1..{n} .*responses.tsv"):
        design.trials(subject, sessions=[n + 1])


@pytest.mark.parametrize("n_shared, n_per_subject, trials_per_session", [
    (4, 20, 60), (4, 20, 30), (8, 40, 24), (8, 40, 10), (8, 40, 8), (20, 50, 6), (40, 100, 10), (40, 400, 30)])
def test_without_a_record_the_design_scales_nsds_counts_as_mini_nsd_does(n_shared, n_per_subject,
                                                                        trials_per_session):
    d = make_design(n_shared, n_per_subject, trials_per_session, seed=1)
    design = Design(d.masterordering, d.subjectim, d.sharedix, d.basiccnt.sum(axis=0))  # no data root
    assert {s: design.completed_sessions(s) for s in layout.ALL_SUBJECTS} == d.sessions_completed
    assert "scaled" in design.completed_sessions_source(3)


def test_nsds_own_design_gets_nsds_counts():
    assert {s: scaled_sessions_completed(s, 40) for s in layout.ALL_SUBJECTS} == \
        {1: 40, 2: 40, 3: 32, 4: 30, 5: 40, 6: 32, 7: 40, 8: 30}


def test_the_record_wins_and_is_reread(root, tmp_path):
    shutil.copytree(root / "nsddata/experiments", tmp_path / "nsddata/experiments")
    design = load_design(tmp_path)
    assert design.completed_sessions(3) == 10  # no record here: the scaled count
    path = tmp_path / str(layout.behav_responses(3))
    path.parent.mkdir(parents=True)
    record = pd.read_csv(root / str(layout.behav_responses(3)), delimiter="\t")
    record[record["SESSION"] <= 4].to_csv(path, sep="\t", index=False)
    assert design.completed_sessions(3) == 4
    with pytest.raises(ValueError, match=r"sessions 1..4 .*subj03/behav/responses.tsv.*got \[5\]"):
        design.split(3, sessions=range(1, 6))
    record.assign(SESSION=13).to_csv(path, sep="\t", index=False)
    with pytest.raises(ValueError, match="lists session 13, but the design .* has 12 sessions"):
        design.completed_sessions(3)
    path.write_text("no\theader\n")
    with pytest.raises(ValueError, match="cannot read it as NSD's responses.tsv"):
        design.completed_sessions(3)


# -- ROI label tables --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("atlas", layout.ROI_ATLASES)
def test_ctab_files_in_the_subject_and_fsaverage_folders(root, atlas):
    fsaverage = root / str(layout.fsaverage_roi_ctab(atlas))
    text = fsaverage.read_text()
    expected = ["0 Unknown"] + [f"{k} {name}" for k, name in enumerate(rois.NSD_LABEL_NAMES[atlas], start=1)]
    assert text == "\n".join(expected) + "\n"  # 'N name', one space, no leading spaces, final newline
    for s in MINI["subjects"]:
        assert (root / str(layout.roi_ctab(s, atlas))).read_text() == text
        labels = np.asanyarray(nib.load(root / str(layout.roi_file(s, atlas))).dataobj)
        assert labels.max() <= len(expected) - 1
    # the way nsd_access (read_atlas_results) and the Algonauts scripts read a ctab
    mapping = pd.read_csv(fsaverage, delimiter=" ", header=None, index_col=0).to_dict()[1]
    assert mapping == dict(enumerate(["Unknown", *rois.NSD_LABEL_NAMES[atlas]]))


def test_writer_and_reader_agree_on_nsds_label_names():
    assert {a: tuple(names) for a, names in brain.ROI_LABELS.items()} == rois.NSD_LABEL_NAMES
    assert tuple(rois.NSD_LABEL_NAMES) == layout.ROI_ATLASES


def test_roi_labels_lookup_order(tmp_path):
    subject_ctab = tmp_path / str(layout.roi_ctab(2, "streams"))
    fsaverage_ctab = tmp_path / str(layout.fsaverage_roi_ctab("streams"))
    built_in = {0: "Unknown", **dict(enumerate(rois.NSD_LABEL_NAMES["streams"], start=1))}
    assert rois.roi_labels_source(tmp_path, 2, "streams") is None
    assert rois.roi_labels(tmp_path, 2, "streams") == built_in
    fsaverage_ctab.parent.mkdir(parents=True)
    fsaverage_ctab.write_text("0 Unknown\n1 from-fsaverage\n")
    assert rois.roi_labels(tmp_path, 2, "streams") == {0: "Unknown", 1: "from-fsaverage"}
    subject_ctab.parent.mkdir(parents=True)
    subject_ctab.write_text("1 from-subject 255 0 0 0\n")
    assert rois.roi_labels_source(tmp_path, 2, "streams") == subject_ctab
    assert rois.roi_labels(tmp_path, 2, "streams") == {1: "from-subject"}
    assert rois.roi_labels(tmp_path, 1, "streams") == {0: "Unknown", 1: "from-fsaverage"}  # not subject 2's
    with pytest.raises(FileNotFoundError) as err:
        rois.roi_labels(tmp_path, 2, "floc-faces")
    message = str(err.value)
    assert "subj02/label/floc-faces.mgz.ctab" in message and "fsaverage/label/floc-faces.mgz.ctab" in message
    assert "aws s3 cp" in message


def test_label_choices_work_without_any_ctab_file(root, mini_nsd):
    bare = mini_nsd(**MINI)  # a copy of its own: the ctab files are removed from it
    for path in (bare / "nsddata/freesurfer").rglob("*.mgz.ctab"):
        path.unlink()
    labels = np.asanyarray(nib.load(bare / str(layout.roi_file(1, "Kastner2015"))).dataobj)
    expected = np.isin(labels, [brain.KASTNER2015.index("V1v") + 1, brain.KASTNER2015.index("hV4") + 1])
    assert expected.any()
    np.testing.assert_array_equal(rois.roi_mask(bare, 1, "Kastner2015:V1v,hV4"), expected)
    np.testing.assert_array_equal(rois.roi_mask(root, 1, "Kastner2015:V1v,hV4"), expected)


# -- captions ------------------------------------------------------------------------------------------------------
COCO = {0: (501, "train2017"), 1: (702, "val2017")}  # nsdId -> (cocoId, split)


def _stim_info(root):
    path = root / str(layout.stim_info("csv"))
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame([{"nsdId": i, "cocoId": c, "cocoSplit": s, "cropBox": "(0, 0, 0, 0)", "shared1000": False}
                  for i, (c, s) in COCO.items()]).to_csv(path)


def _captions(root, place, split, text):
    path = root / str(place(split))
    path.parent.mkdir(parents=True, exist_ok=True)
    coco_id = next(c for c, s in COCO.values() if s == split)
    path.write_text(json.dumps({"images": [{"id": coco_id}],
                                "annotations": [{"id": 1, "image_id": coco_id, "caption": text}]}))


def test_captions_beside_the_stimuli_are_found(tmp_path):
    _stim_info(tmp_path)
    for split in ("train2017", "val2017"):
        _captions(tmp_path, layout.nsd_coco_captions, split, f"community {split}")
    assert load_captions(tmp_path, [1, 0]) == [["community val2017"], ["community train2017"]]
    assert caption_file(tmp_path, "val2017") == layout.nsd_coco_captions("val2017")
    assert str(layout.nsd_coco_captions("val2017")) == "nsddata_stimuli/stimuli/nsd/annotations/captions_val2017.json"


def test_mdlibs_place_comes_first_and_the_places_may_mix(tmp_path):
    _stim_info(tmp_path)
    _captions(tmp_path, layout.nsd_coco_captions, "train2017", "community train")
    _captions(tmp_path, layout.nsd_coco_captions, "val2017", "community val")
    _captions(tmp_path, layout.coco_captions, "val2017", "mdlib val")
    assert load_captions(tmp_path, [0, 1]) == [["community train"], ["mdlib val"]]
    assert caption_file(tmp_path, "val2017") == layout.coco_captions("val2017")


def test_missing_captions_name_both_places_and_the_fix(tmp_path):
    _stim_info(tmp_path)
    _captions(tmp_path, layout.coco_captions, "train2017", "mdlib train")
    assert load_captions(tmp_path, [0]) == [["mdlib train"]]
    with pytest.raises(FileNotFoundError) as err:
        load_captions(tmp_path, [1])
    message = str(err.value)
    assert str(tmp_path / "coco/annotations/captions_val2017.json") in message
    assert str(tmp_path / "nsddata_stimuli/stimuli/nsd/annotations/captions_val2017.json") in message
    assert "mdlib fetch" in message and "annotations_trainval2017.zip" in message
    assert caption_file(tmp_path, "val2017") is None

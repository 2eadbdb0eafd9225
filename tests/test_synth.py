"""mini-NSD: the files are NSD's formats, consistent with each other, reproducible, and the simulated brain's
reliability is what its ground truth says.

Files are read here with scipy / h5py / nibabel / pandas directly (not through mdlib's loaders), so these
tests check the formats against docs/data.md independently. One small mini-NSD is written per module.
"""

from __future__ import annotations

import ast
import hashlib
import json

import h5py
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import scipy.io

from mdlib.nsd import layout
from mdlib.synth import brain, scenes
from mdlib.synth.write import (SCENES_TRUTH, SIDECAR, load_truth, make_design, truth_file, write_mini_nsd,
                               DEFAULTS)

SMALL = dict(subjects=(1, 2), n_shared=10, n_per_subject=60, trials_per_session=45, stim_size=48,
             grid_scale=0.2, n_unseen=6, seed=3, progress=False)
N_TRIALS = 3 * SMALL["n_per_subject"]
N_SESSIONS = N_TRIALS // SMALL["trials_per_session"]


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    root = tmp_path_factory.mktemp("mini")
    summary = write_mini_nsd(root, **SMALL)
    return root, summary


@pytest.fixture(scope="module")
def design(mini):
    root, _ = mini
    m = scipy.io.loadmat(root / layout.expdesign())
    return {k: m[k].astype(np.int64) for k in ("masterordering", "subjectim", "sharedix", "basiccnt")}


def _nii(path):
    img = nib.load(path)
    return img, np.asanyarray(img.dataobj)


def _zscore_sessions(root, subject, mask, n_sessions):
    """(n_voxels_in_mask, n_trials) betas in %, z-scored per voxel within each session."""
    out = []
    for s in range(1, n_sessions + 1):
        _, b = _nii(root / layout.betas_file(subject, s))
        b = b[mask].astype(np.float64) / layout.BETA_SCALE
        out.append((b - b.mean(1, keepdims=True)) / b.std(1, keepdims=True))
    return np.concatenate(out, axis=1)


# ------------------------------------------------------------------------------------------------ design

def test_design_shapes_and_repeats(design):
    mo, si, sh = design["masterordering"], design["subjectim"], design["sharedix"]
    assert mo.shape == (1, N_TRIALS) and si.shape == (8, SMALL["n_per_subject"]) and sh.shape == (1, SMALL["n_shared"])
    counts = np.bincount(mo.ravel(), minlength=SMALL["n_per_subject"] + 1)
    assert counts[0] == 0 and (counts[1:] == 3).all()  # values 1..n, each exactly 3 times
    assert (mo[0, 1:] != mo[0, :-1]).all()  # never the same image twice in a row


def test_subjectim_shared_and_disjoint(mini, design):
    si, sh = design["subjectim"], design["sharedix"].ravel()
    n_stim = mini[1]["n_stimuli"]
    assert (si[:, : SMALL["n_shared"]] == sh[None, :]).all()
    assert (np.diff(sh) > 0).all() and sh.min() >= 1 and si.max() <= n_stim
    own = si[:, SMALL["n_shared"]:]
    assert np.unique(own).size == own.size  # distinct within and across subjects
    assert not np.isin(own, sh).any()
    assert n_stim == SMALL["n_shared"] + 8 * (SMALL["n_per_subject"] - SMALL["n_shared"]) + SMALL["n_unseen"]


def test_basiccnt_counts_presentations(design):
    mo, bc = design["masterordering"].ravel(), design["basiccnt"]
    T = SMALL["trials_per_session"]
    assert bc.shape == (3, N_SESSIONS)
    assert (bc.sum(0) == T).all()  # the loader derives the session length from these sums
    seen, expected = {}, np.zeros_like(bc)
    for t, c in enumerate(mo):
        expected[seen.get(c, 0), t // T] += 1
        seen[c] = seen.get(c, 0) + 1
    np.testing.assert_array_equal(bc, expected)


def test_sessions_mix_shared_and_spread_repeats(design):
    mo = design["masterordering"].ravel()
    ns, T = SMALL["n_shared"], SMALL["trials_per_session"]
    sess = mo.reshape(N_SESSIONS, T)
    assert ((sess <= ns).any(1) & (sess > ns).any(1)).all()
    # repeats spread: many images are seen in more than one session
    session_of = np.arange(mo.size) // T
    n_sessions_per_image = [np.unique(session_of[mo == c]).size for c in range(1, mo.max() + 1)]
    assert np.mean(np.array(n_sessions_per_image) > 1) > 0.5


def test_default_design_early_sessions_leave_incomplete_test_images():
    """Like NSD's public sessions 1-37 of 40: keeping the first 37/40 of the sessions leaves some shared (test)
    images with fewer than 3 repeats, but every kept session still has test and train trials."""
    d = make_design(DEFAULTS["n_shared"], DEFAULTS["n_per_subject"], DEFAULTS["trials_per_session"], seed=0)
    n_pub = int(round(d.n_sessions * 37 / 40))
    assert n_pub < d.n_sessions
    mo = d.masterordering[: n_pub * d.trials_per_session]
    reps = np.bincount(mo[mo <= d.n_shared], minlength=d.n_shared + 1)[1:]
    assert (reps < 3).any() and (reps >= 1).sum() > 0.8 * d.n_shared


# ----------------------------------------------------------------------------------------- stimulus info

def test_stim_info_columns_and_consistency(mini, design):
    root, summary = mini
    df = pd.read_csv(root / layout.stim_info("csv"))
    expected_cols = (["Unnamed: 0", "cocoId", "cocoSplit", "cropBox", "loss", "nsdId", "flagged", "BOLD5000",
                      "shared1000"] + [f"subject{k}" for k in range(1, 9)]
                     + [f"subject{k}_rep{r}" for k in range(1, 9) for r in range(3)])
    assert list(df.columns) == expected_cols
    n = summary["n_stimuli"]
    assert len(df) == n and (df["nsdId"].to_numpy() == np.arange(n)).all()
    assert (df["Unnamed: 0"].to_numpy() == np.arange(n)).all()
    assert df["cocoId"].is_unique and set(df["cocoSplit"]) == {"train2017", "val2017"}
    for box in df["cropBox"]:
        t = ast.literal_eval(box)
        assert len(t) == 4 and all(0 <= v < 0.5 for v in t)
    assert df["shared1000"].dtype == bool and df["flagged"].dtype == bool
    sh = design["sharedix"].ravel() - 1
    np.testing.assert_array_equal(np.flatnonzero(df["shared1000"]), np.sort(sh))
    assert not (root / layout.stim_info("pkl")).exists()  # mdlib never writes pickles


def test_stim_info_reps_equal_actual_trial_numbers(mini, design):
    """Every subjectK_repR is the 1-based trial of that presentation, recomputed here from masterordering."""
    root, _ = mini
    df = pd.read_csv(root / layout.stim_info("csv"))
    meta = json.loads((root / SIDECAR).read_text())
    mo, si = design["masterordering"].ravel(), design["subjectim"]
    T = SMALL["trials_per_session"]
    for k in range(1, 9):
        done = meta["sizes"]["sessions_completed"][str(k)]
        expected = np.zeros((len(df), 3), np.int64)
        count = {}
        for t, c in enumerate(mo):
            nsd = si[k - 1, c - 1] - 1
            r = count.get(nsd, 0)
            count[nsd] = r + 1
            if t // T < done:
                expected[nsd, r] = t + 1
        got = df[[f"subject{k}_rep{r}" for r in range(3)]].to_numpy()
        np.testing.assert_array_equal(got, expected)
        np.testing.assert_array_equal(df[f"subject{k}"].to_numpy(), np.isin(np.arange(len(df)), si[k - 1] - 1))
    unseen = ~df[[f"subject{k}" for k in range(1, 9)]].any(axis=1)
    assert unseen.sum() == SMALL["n_unseen"]
    # subjects 3, 4, 6, 8 did fewer sessions, as in NSD: some of their trials are missing
    assert meta["sizes"]["sessions_completed"]["1"] == N_SESSIONS
    assert meta["sizes"]["sessions_completed"]["4"] < N_SESSIONS


# ---------------------------------------------------------------------------------- captions and images

def test_captions_five_per_stimulus_and_state_the_scene(mini):
    root, summary = mini
    df = pd.read_csv(root / layout.stim_info("csv"))
    truth = np.load(root / SCENES_TRUTH)
    caps, ann_ids = {}, []
    for split in ("train2017", "val2017"):
        js = json.loads((root / layout.coco_captions(split)).read_text())
        assert set(js) >= {"images", "annotations"}
        ids = [im["id"] for im in js["images"]]
        assert len(ids) == len(set(ids))
        assert all(set(im) >= {"id", "file_name", "width", "height"} for im in js["images"])
        for a in js["annotations"]:
            caps.setdefault(a["image_id"], []).append(a["caption"])
            ann_ids.append(a["id"])
        in_split = set(df.loc[df["cocoSplit"] == split, "cocoId"])
        assert in_split <= set(ids)  # each stimulus is listed in its own split's file
    assert len(ann_ids) == len(set(ann_ids))
    shapes, colours = truth["shape_names"], truth["colour_names"]
    for nsd, coco in enumerate(df["cocoId"]):
        c = caps[int(coco)]
        assert len(c) == 5 and len(set(c)) == 5
        for k in range(int(truth["n_objects"][nsd])):
            shape, colour = shapes[truth["shape"][nsd, k]], colours[truth["colour"][nsd, k]]
            assert all(shape in x and colour in x for x in c), (c, shape, colour)


def test_image_brick_format_and_content(mini):
    root, summary = mini
    S = SMALL["stim_size"]
    with h5py.File(root / layout.stimuli(), "r") as f:
        ds = f["imgBrick"]
        assert ds.shape == (summary["n_stimuli"], S, S, 3) and ds.dtype == np.uint8
        assert ds.chunks is None and ds.compression is None and ds.id.get_offset() is not None  # contiguous
        rows = [0, 7, summary["n_stimuli"] - 1]
        imgs = ds[rows]
    sc = scenes.scenes_from_arrays(np.load(root / SCENES_TRUTH))
    for r, img in zip(rows, imgs):
        np.testing.assert_array_equal(img, scenes.render(sc[r], S))


# ------------------------------------------------------------------------------------ betas and volumes

def test_betas_nifti_and_hdf5_agree(mini, design):
    root, summary = mini
    T = int(design["basiccnt"].sum(0)[0])
    for s in SMALL["subjects"]:
        _, mask = _nii(root / layout.anatomy_file(s, "brainmask"))
        dims = tuple(summary["subjects"][s]["grid"])
        for sess in (1, N_SESSIONS):
            img, b = _nii(root / layout.betas_file(s, sess, "nii.gz"))
            assert b.dtype == np.int16 and b.shape == dims + (T,)
            assert img.header.get_data_dtype() == np.int16
            assert not np.isfinite(img.header["scl_slope"]) or img.header["scl_slope"] in (0, 1)
            with h5py.File(root / layout.betas_file(s, sess, "hdf5"), "r") as f:
                h = f["betas"]
                assert h.dtype == np.int16 and h.shape == (T,) + dims[::-1] and h.chunks == (T, 1, 1, 1)
                np.testing.assert_array_equal(h[()], b.transpose(3, 2, 1, 0))
            assert (b[mask == 0] == 0).all()
            assert (b[mask == 1] != 0).mean() > 0.95
            psc = b[mask == 1] / layout.BETA_SCALE
            assert 1 < psc.std() < 15  # a few percent signal change


def test_affine_follows_nsd_formula(mini):
    root, summary = mini
    for s in SMALL["subjects"]:
        dims = np.array(summary["subjects"][s]["grid"])
        assert tuple(dims) == brain.subject_grid(s, SMALL["grid_scale"])
        expected = np.diag([1.8, 1.8, 1.8, 1.0])
        expected[:3, 3] = -((dims - 1) / 2) * 1.8
        files = [layout.betas_file(s, 1), layout.anatomy_file(s, "T1_to_func1pt8mm"), layout.anatomy_file(s, "mean"),
                 layout.anatomy_file(s, "brainmask")] + [layout.roi_file(s, a) for a in layout.ROI_ATLASES]
        for rel in files:
            img = nib.load(root / rel)
            np.testing.assert_allclose(img.affine, expected, atol=1e-4)
            assert nib.aff2axcodes(img.affine) == ("R", "A", "S") and img.shape[:3] == tuple(dims)
    # and for the real subj01 grid the formula gives the numbers in docs/data.md
    np.testing.assert_allclose(brain.nsd_affine(layout.NSD_GRIDS[1])[:3, 3], [-72.0, -92.7, -73.8])


def test_roi_labels_ctab_and_anatomy(mini):
    root, _ = mini
    for s in SMALL["subjects"]:
        _, mask = _nii(root / layout.anatomy_file(s, "brainmask"))
        assert set(np.unique(mask)) == {0, 1}
        img_t1, t1 = _nii(root / layout.anatomy_file(s, "T1_to_func1pt8mm"))
        cortex = None
        for atlas, names in brain.ROI_LABELS.items():
            img, roi = _nii(root / layout.roi_file(s, atlas))
            assert roi.dtype == np.int16
            assert set(np.unique(roi)) <= set(range(-1, len(names) + 1))
            lines = (root / layout.roi_ctab(s, atlas)).read_text().splitlines()
            assert lines == [f"{k} {n}" for k, n in enumerate(("Unknown",) + names)]
            cortex = roi >= 0 if cortex is None else cortex
            np.testing.assert_array_equal(roi >= 0, cortex)  # one cortex mask for all atlases
            assert (mask[cortex] == 1).all()
        kastner = _nii(root / layout.roi_file(s, "Kastner2015"))[1]
        prf = _nii(root / layout.roi_file(s, "prf-visualrois"))[1]
        gen = _nii(root / layout.roi_file(s, "nsdgeneral"))[1]
        assert np.unique(kastner[kastner > 0]).size >= 20  # most of the 25 areas have voxels
        assert set(np.unique(prf[prf > 0])) == set(range(1, 8))
        assert (gen[prf > 0] == 1).mean() > 0.9  # nsdgeneral covers the early visual areas
        # visual ROIs are posterior (negative Y in RAS world coordinates)
        aff = img_t1.affine
        y_world = lambda m: (aff @ np.c_[np.argwhere(m), np.ones(m.sum())].T)[1]  # noqa: E731
        assert y_world(gen == 1).mean() < y_world(cortex).mean() - 5
        assert y_world((prf == 1) | (prf == 2)).mean() < 0
        # T1-weighted contrast: white > grey > CSF; nothing outside the head
        tissue = load_truth(root, s)["tissue"]
        np.testing.assert_array_equal(tissue == 2, cortex)
        assert np.median(t1[tissue == 3]) > np.median(t1[tissue == 2]) > np.median(t1[tissue == 1]) > 0
        assert t1[0, 0, 0] == 0


# ------------------------------------------------------------------------------------------ reproducible

def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_same_seed_same_bytes_and_subjects_independent(mini, tmp_path):
    """Writing subject 2 alone with the same seed reproduces the shared files and subject 2's files byte for
    byte: the output is a deterministic function of the seed, and of nothing else."""
    root, _ = mini
    other = tmp_path / "again"
    write_mini_nsd(other, **{**SMALL, "subjects": (2,)})
    rels = [layout.expdesign(), layout.stim_info("csv"), layout.stimuli(), SCENES_TRUTH, truth_file(2),
            layout.coco_captions("train2017"), layout.coco_captions("val2017"),
            layout.anatomy_file(2, "T1_to_func1pt8mm"), layout.roi_file(2, "Kastner2015"),
            layout.roi_ctab(2, "Kastner2015")]
    rels += [layout.betas_file(2, k, f) for k in range(1, N_SESSIONS + 1) for f in ("nii.gz", "hdf5")]
    for rel in rels:
        assert _digest(root / rel) == _digest(other / rel), rel
    assert not (other / layout.betas_file(1, 1)).exists()
    a = make_design(10, 60, 45, seed=3)
    b = make_design(10, 60, 45, seed=4)
    assert not np.array_equal(a.masterordering, b.masterordering)


# -------------------------------------------------------------------------------- the simulated signal

def _split_half(x, reps):
    """Per-voxel mean correlation across images between the 3 pairs of repeats. x: (n_vox, n_trials)."""
    out = []
    for i, j in ((0, 1), (0, 2), (1, 2)):
        a, b = x[:, reps[:, i]], x[:, reps[:, j]]
        a, b = a - a.mean(1, keepdims=True), b - b.mean(1, keepdims=True)
        out.append((a * b).sum(1) / np.sqrt((a ** 2).sum(1) * (b ** 2).sum(1)))
    return np.mean(out, axis=0)


def _repeat_trials(design):
    mo = design["masterordering"].ravel()
    return np.stack([np.flatnonzero(mo == c) for c in range(1, mo.max() + 1)])  # (n_images, 3) trials


def test_session_drifts_present_and_as_the_truth_says(mini):
    """Per-session means of a voxel differ by far more than sampling noise (so per-session z-scoring matters),
    and follow the per-session offsets recorded in the ground truth."""
    root, _ = mini
    s = 1
    _, mask = _nii(root / layout.anatomy_file(s, "brainmask"))
    inside = mask == 1
    means, sems = [], []
    for sess in range(1, N_SESSIONS + 1):
        b = _nii(root / layout.betas_file(s, sess))[1][inside].astype(np.float64) / layout.BETA_SCALE
        means.append(b.mean(1))
        sems.append(b.std(1) / np.sqrt(b.shape[1]))
    means = np.array(means)  # (n_sessions, n_voxels)
    ratio = means.std(0) / np.mean(sems, axis=0)
    assert np.median(ratio) > 1.5  # about 0.9 if there were no drifts
    offsets = load_truth(root, s)["session_offset"][:, inside]
    measured = means - means.mean(0)
    expected = offsets - offsets.mean(0)
    assert np.corrcoef(measured.ravel(), expected.ravel())[0, 1] > 0.7


def test_reliability_follows_the_truth(mini, design):
    """Split-half reliability measured from the written betas matches the ground truth's theory."""
    root, _ = mini
    reps = _repeat_trials(design)
    for s in SMALL["subjects"]:
        _, mask = _nii(root / layout.anatomy_file(s, "brainmask"))
        inside = mask == 1
        r = _split_half(_zscore_sessions(root, s, inside, N_SESSIONS), reps)  # per voxel
        truth = load_truth(root, s)
        theory = truth["reliability"][inside]
        gen = _nii(root / layout.roi_file(s, "nsdgeneral"))[1][inside] == 1
        assert r[gen].mean() > r[~gen].mean() + 0.05
        assert abs(r[~gen].mean()) < 0.03  # no signal outside the visual cortex
        assert np.corrcoef(r, theory)[0, 1] > 0.6
        assert abs(r[gen].mean() - theory[gen].mean()) < 0.04


def test_truth_sidecar_is_self_consistent(mini, design):
    root, _ = mini
    for s in SMALL["subjects"]:
        t = load_truth(root, s)
        m = t["brainmask"] == 1
        np.testing.assert_allclose(t["ncsnr"][m], t["signal_sd"][m] / t["noise_sd"][m], rtol=1e-5)
        n2 = t["ncsnr"].astype(np.float64) ** 2
        np.testing.assert_allclose(t["reliability"], n2 / (1 + n2), rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(t["nc3"], 100 * n2 / (n2 + 1 / 3), rtol=1e-4, atol=1e-5)
        # signal_sd is the sd of the noiseless responses over the subject's images
        i, j, k = t["signal_voxels"].T.astype(int)
        np.testing.assert_allclose(t["signal"].std(0), t["signal_sd"][i, j, k], rtol=1e-3)
        np.testing.assert_array_equal(t["signal_nsd_ids"], design["subjectim"][s - 1] - 1)
        assert t["session_offset"].shape == (N_SESSIONS,) + tuple(t["dims"])
        # signal lives in the visual cortex; early visual pRFs are near the image
        gen = _nii(root / layout.roi_file(s, "nsdgeneral"))[1] == 1
        assert t["signal_sd"][gen].mean() > 10 * t["signal_sd"][m & ~gen].mean()
        early = np.isin(t["area"], range(1, 8))
        assert np.nanmedian(np.abs(t["prf_x"][early] - 0.5)) < 0.4
        assert list(t["area_names"][1:]) == list(brain.KASTNER2015)


def test_metadata_sidecar(mini):
    root, summary = mini
    meta = json.loads((root / SIDECAR).read_text())
    assert meta["format"] == "mini-NSD" and meta["seed"] == SMALL["seed"]
    assert meta["sizes"]["n_stimuli"] == summary["n_stimuli"]
    assert meta["sizes"]["n_sessions"] == N_SESSIONS
    assert meta["parameters"]["n_per_subject"] == SMALL["n_per_subject"]
    assert summary["bytes"] > 0 and summary["n_files"] > 10


# ------------------------------------------------------------------------------------------- parameters

@pytest.mark.parametrize("kwargs, match", [
    (dict(trials_per_session=50), "divide"),
    (dict(n_shared=60), "exceed"),
    (dict(subjects=(3,)), "grid"),
    (dict(grid_scale=0.05), "at least 12"),
    (dict(grid_scale=1.5), "grid_scale"),
    (dict(stim_size=8), "stim_size"),
    (dict(subjects=(1, 1)), "distinct"),
])
def test_bad_parameters_are_refused(tmp_path, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        write_mini_nsd(tmp_path, **{**SMALL, **kwargs})


def test_rewriting_removes_the_previous_mini_nsd(tmp_path):
    tiny = dict(subjects=(1,), n_shared=4, n_per_subject=20, stim_size=16, grid_scale=0.2, n_unseen=0,
                progress=False)
    write_mini_nsd(tmp_path, trials_per_session=15, **tiny)  # 4 sessions
    (tmp_path / "mine.txt").write_text("not mini-NSD's")
    assert (tmp_path / layout.betas_file(1, 4)).exists()
    write_mini_nsd(tmp_path, trials_per_session=20, **tiny)  # 3 sessions
    assert (tmp_path / layout.betas_file(1, 3)).exists() and not (tmp_path / layout.betas_file(1, 4)).exists()
    assert (tmp_path / "mine.txt").exists()


def test_refuses_to_overwrite_a_real_nsd(tmp_path):
    (tmp_path / layout.expdesign()).parent.mkdir(parents=True)
    (tmp_path / layout.expdesign()).write_bytes(b"real")
    with pytest.raises(FileExistsError):
        write_mini_nsd(tmp_path, **SMALL)


# ------------------------------------------------------------------------------------------------ scenes

def test_scene_rendering_and_captions():
    rng = np.random.default_rng(0)
    sc = scenes.Scene((scenes.SceneObject("bar", "red", 0.2, 0.8, 0.3, 90),), background="grey")
    img = scenes.render(sc, 64)
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    assert (scenes.render(sc, 64) == img).all()
    colours = {tuple(c) for c in img.reshape(-1, 3)}
    assert len(colours) > 2  # anti-aliased edges blend the two colours
    red = (img[..., 0] > 150) & (img[..., 1] < 80)
    ys, xs = np.nonzero(red)
    assert xs.mean() < 32 and ys.mean() > 32  # bottom left
    assert np.ptp(ys) > 3 * np.ptp(xs)  # a vertical bar
    caps = scenes.captions(sc, rng)
    assert len(caps) == 5 and len(set(caps)) == 5
    assert all("red" in c and "bar" in c and "bottom left" in c for c in caps)
    assert all(("vertical" in c) or ("upright" in c) for c in caps)
    v = scenes.encode(sc)
    assert v.shape == (len(scenes.FEATURE_NAMES),) and v[scenes.FEATURE_NAMES.index("shape=bar")] == 1
    assert scenes.position_words(0.5, 0.5) == "centre" and scenes.position_words(0.8, 0.2) == "top right"
    with pytest.raises(ValueError):
        scenes.SceneObject("blob", "red", 0.5, 0.5, 0.2)


# ------------------------------------------------------------------------------------ layouts (issue 27)

def test_layouts_are_off_by_default_and_only_add_a_layout_to_the_same_scene():
    """With ``layout_share`` 0 (the default) no layout draw is made; with layouts on, each generator gives the
    very scene it gives without them, plus a layout drawn within its stated ranges."""
    import dataclasses

    lo, hi = scenes.LAYOUT_POSITION_RANGE
    with_layout = 0
    for i in range(200):
        plain = scenes.random_scene(np.random.default_rng((9, i)))
        rng = np.random.default_rng((9, i))
        assert scenes.random_scene(rng, layout_share=0.0) == plain and plain.layout is None
        sc = scenes.random_scene(np.random.default_rng((9, i)), layout_share=1.0)
        assert dataclasses.replace(sc, layout=None) == plain
        if sc.layout is None:
            continue
        with_layout += 1
        lay = sc.layout
        assert lo <= lay.position <= hi and abs(lay.tilt) <= scenes.LAYOUT_MAX_TILT
        rgb = scenes.BACKGROUNDS[lay.colour]
        assert np.linalg.norm(np.subtract(rgb, scenes.BACKGROUNDS[sc.background], dtype=float)) >= 80
        assert all(np.linalg.norm(np.subtract(rgb, scenes.COLOURS[o.colour], dtype=float)) >= 110 for o in sc.objects)
    assert with_layout >= 190     # None only where no background colour suits both regions and the objects
    # A generator left in the same state: layout-off draws nothing more than before layouts existed.
    a, b = np.random.default_rng(4), np.random.default_rng(4)
    scenes.random_scene(a)
    scenes.random_scene(b, layout_share=0.0, layout_kinds=("wall",))
    assert a.random() == b.random()
    share = np.mean([scenes.random_scene(np.random.default_rng((8, i)), layout_share=0.3).layout is not None
                     for i in range(400)])
    assert 0.22 < share < 0.38
    walls = [scenes.random_scene(np.random.default_rng((7, i)), layout_share=1.0, layout_kinds=("wall",)).layout
             for i in range(30)]
    assert {w.kind for w in walls if w is not None} == {"wall"}
    for bad, match in ((1.5, "layout_share"), (-0.1, "layout_share")):
        with pytest.raises(ValueError, match=match):
            scenes.random_scene(np.random.default_rng(0), layout_share=bad)
    with pytest.raises(ValueError, match="layout_kinds"):
        scenes.random_scene(np.random.default_rng(0), layout_share=0.5, layout_kinds=("sky",))


def _two_region_scene(kind, position, tilt, first="navy", second="beige"):
    """A scene whose only object is small and far from the boundary, on plain regions."""
    obj = scenes.SceneObject("circle", "red", 0.1, 0.1, 0.08)
    return scenes.Scene((obj,), background=first, texture="plain",
                        layout=scenes.Layout(kind, position, tilt, second, "plain"))


def test_a_layout_puts_each_region_on_its_side_with_an_anti_aliased_boundary():
    S = 64
    c1, c2 = np.array(scenes.BACKGROUNDS["navy"], float), np.array(scenes.BACKGROUNDS["beige"], float)
    # A level horizon at 0.4 of the height: the boundary is 25.6 pixels down, so row 25 is 60% the first
    # region's (above) and 40% the second's, every row above is the first colour and every row below the second.
    img = scenes.render(_two_region_scene("horizon", 0.4, 0.0), S).astype(float)
    col = img[:, 40]
    np.testing.assert_array_equal(col[12:25], np.tile(c1, (13, 1)))
    np.testing.assert_array_equal(col[26:], np.tile(c2, (S - 26, 1)))
    np.testing.assert_allclose(col[25], np.rint(0.6 * c1 + 0.4 * c2), atol=1)
    # A wall leaning left by 20 degrees: on each row the edge is at x = 0.55 + (y - 0.5) tan(20 deg).
    img = scenes.render(_two_region_scene("wall", 0.55, 20.0), S).astype(float)
    for row in (10, 32, 54):
        y = (row + 0.5) / S
        edge = (0.55 + (y - 0.5) * np.tan(np.deg2rad(20.0))) * S
        assert (img[row, : int(edge) - 1] == c1).all() and (img[row, int(edge) + 2:] == c2).all()
    # A horizon rising to the right is higher on the right; the first region covers `position` of the image.
    lay = scenes.Layout("horizon", 0.5, 15.0, "beige")
    img = scenes.render(scenes.Scene((scenes.SceneObject("circle", "red", 0.5, 0.1, 0.05),), "navy", layout=lay), S)
    first = (np.abs(img.astype(float) - c1).sum(-1) < 1)
    assert first[:, 8].sum() > first[:, 56].sum() + 10    # fewer upper-region rows where it is higher
    assert lay.first_area() == pytest.approx(0.5, abs=1e-9)
    assert scenes.Layout("horizon", 0.35, 25.0, "beige").first_area() == pytest.approx(0.35, abs=1e-9)


def test_layout_captions_state_both_regions_the_boundary_and_the_objects():
    sc = _two_region_scene("horizon", 0.62, -14.0, first="sky blue", second="dark green")
    caps = scenes.captions(sc, np.random.default_rng(0), n=7)
    assert len(set(caps)) == 7
    for c in caps:
        assert "sky blue" in c and "dark green" in c and "red circle" in c
        assert "horizon low and rising to the left" in c
        assert c.index("sky blue") < c.index("dark green")          # the upper region is named first
    wall = scenes.captions(_two_region_scene("wall", 0.4, 10.0), np.random.default_rng(1))
    assert all("left of centre and leaning to the left" in c and "navy" in c and "beige" in c for c in wall)
    level = scenes.captions(_two_region_scene("horizon", 0.5, 3.0), np.random.default_rng(2))
    assert all("horizon in the middle and level" in c for c in level)


def test_layout_arrays_round_trip_and_are_absent_without_layouts():
    rng = np.random.default_rng(3)
    mixed = [scenes.random_scene(rng, layout_share=0.5) for _ in range(40)]
    assert any(s.layout is not None for s in mixed) and any(s.layout is None for s in mixed)
    arrays = scenes.scene_arrays(mixed)
    assert scenes.scenes_from_arrays(arrays) == mixed
    assert (arrays["layout_kind"] >= 0).sum() == sum(s.layout is not None for s in mixed)
    plain = [scenes.random_scene(rng) for _ in range(5)]
    assert not any(k.startswith("layout") for k in scenes.scene_arrays(plain))


def test_the_default_mini_nsd_does_not_mention_layouts(mini):
    root, summary = mini
    assert not any(k.startswith("layout") for k in json.loads((root / SIDECAR).read_text())["parameters"])
    assert not any(k.startswith("layout") for k in np.load(root / SCENES_TRUTH).files)
    assert "layout_share" not in summary["parameters"]


def test_a_mini_nsd_with_layouts_records_them_and_draws_them(mini, tmp_path):
    root_default, _ = mini
    root = tmp_path / "layouts"
    params = {**SMALL, "subjects": (1,)}
    summary = write_mini_nsd(root, **params, layout_share=0.5, layout_kinds=("horizon",))
    meta = json.loads((root / SIDECAR).read_text())
    assert meta["parameters"]["layout_share"] == 0.5 and meta["parameters"]["layout_kinds"] == ["horizon"]
    assert summary["parameters"]["layout_share"] == 0.5
    truth = np.load(root / SCENES_TRUTH)
    assert list(truth["layout_kind_names"]) == list(scenes.LAYOUT_KINDS)
    has = truth["layout_kind"] >= 0
    assert 0.3 < has.mean() < 0.7 and (truth["layout_kind"][has] == 0).all()
    # Each stimulus is the default mini-NSD's scene plus its layout; the design is untouched.
    default = scenes.scenes_from_arrays(np.load(root_default / SCENES_TRUTH))
    mine = scenes.scenes_from_arrays(truth)
    import dataclasses
    assert [dataclasses.replace(s, layout=None) for s in mine] == default
    assert _digest(root / layout.expdesign()) == _digest(root_default / layout.expdesign())
    with h5py.File(root / layout.stimuli(), "r") as f:
        rows = np.flatnonzero(has)[:3].tolist() + np.flatnonzero(~has)[:2].tolist()
        imgs = f["imgBrick"][sorted(rows)]
    for r, img in zip(sorted(rows), imgs):
        np.testing.assert_array_equal(img, scenes.render(mine[r], SMALL["stim_size"]))
    df = pd.read_csv(root / layout.stim_info("csv"))
    caps = {}
    for split in ("train2017", "val2017"):
        for a in json.loads((root / layout.coco_captions(split)).read_text())["annotations"]:
            caps.setdefault(a["image_id"], []).append(a["caption"])
    for nsd in np.flatnonzero(has)[:10]:
        colour = truth["background_names"][truth["layout_colour"][nsd]]
        assert all("horizon" in c and colour in c for c in caps[int(df["cocoId"][nsd])])
    with pytest.raises(ValueError, match="layout_share"):
        write_mini_nsd(tmp_path / "bad", **params, layout_share=2)


def test_the_brain_sees_layouts_through_its_surfaces_and_their_geometry():
    """:func:`brain._layout_drive`: rows of scenes without a layout are untouched; a layout's two surfaces
    weigh in by their areas, and its geometry through weights scaled by the voxel's scene-selective gain."""
    obj = (scenes.SceneObject("circle", "red", 0.2, 0.2, 0.1),)
    lay = scenes.Layout("horizon", 0.4, 10.0, "beige", "stripes")
    scs = [scenes.Scene(obj, "navy"), scenes.Scene(obj, "navy", layout=lay),
           scenes.Scene(obj, "navy", layout=scenes.Layout("horizon", 0.4, -10.0, "beige", "stripes"))]
    arr = scenes.scene_arrays(scs)
    rng = np.random.default_rng(0)
    n_sig = 5
    Bg = rng.standard_normal((n_sig, len(scenes.BACKGROUNDS))).astype(np.float32)
    Tx = rng.standard_normal((n_sig, len(scenes.TEXTURES))).astype(np.float32)
    sem = Bg.T[arr["background"]] + Tx.T[arr["texture"]]
    no_gain = brain._layout_drive(sem, arr, Bg, Tx, np.zeros(n_sig, np.float32), (0, 1, 2))
    np.testing.assert_array_equal(no_gain[0], sem[0])
    navy, beige = list(scenes.BACKGROUNDS).index("navy"), list(scenes.BACKGROUNDS).index("beige")
    plain, stripes = 0, list(scenes.TEXTURES).index("stripes")
    expect = 0.4 * (Bg[:, navy] + Tx[:, plain]) + 0.6 * (Bg[:, beige] + Tx[:, stripes])
    np.testing.assert_allclose(no_gain[1], expect, rtol=1e-6)
    np.testing.assert_allclose(no_gain[2], expect, rtol=1e-6)      # surfaces alone do not see the tilt
    gain = np.array([0, 1, 1, 2, 0.5], np.float32)
    with_gain = brain._layout_drive(sem, arr, Bg, Tx, gain, (0, 1, 2))
    np.testing.assert_array_equal(with_gain[0], sem[0])
    diff = with_gain[1] - with_gain[2]                                  # the tilt: +10 against -10 degrees
    sd_tilt = 2 * scenes.LAYOUT_MAX_TILT / np.sqrt(12)
    G = np.random.default_rng((0, 1, 2, 3)).standard_normal((n_sig, 6)).astype(np.float32) * gain[:, None]
    np.testing.assert_allclose(diff, G[:, 2] * 20 / sd_tilt, rtol=1e-5, atol=1e-6)
    assert diff[0] == 0 and np.abs(diff[1:]).min() > 0
    geom = brain.layout_geometry(arr)
    np.testing.assert_allclose(geom[1], [1, -0.1 / (0.3 / np.sqrt(12)), 10 / sd_tilt, 0, 0, 0], rtol=1e-6)
    assert not geom[0].any()


def test_simulated_responses_follow_the_layout_where_each_pathway_looks():
    """End to end: V1's retinotopic low-level drive changes with a horizon's height only where its receptive
    fields see the change (between the two heights), not far from both; PHC, through its large fields and
    the layout's geometry, responds to a mirrored tilt (+15 against -15 degrees) across the area."""
    obj = (scenes.SceneObject("circle", "red", 0.1, 0.1, 0.08),)
    rng = np.random.default_rng(1)
    base = [scenes.random_scene(rng) for _ in range(30)]
    pairs = [scenes.Layout("horizon", p, t, "beige") for p, t in ((0.5, 15.0), (0.5, -15.0), (0.38, 0.0), (0.62, 0.0))]
    scs = base + [scenes.Scene(obj, "navy", layout=lay) for lay in pairs]
    b = brain.simulate_brain(1, brain.subject_grid(1, 0.2), np.stack([scenes.render(s, 48) for s in scs]), scs,
                             seed=0)
    sig = b.signal_sd > 0
    names = np.array(("none",) + brain.KASTNER2015)[b.area]
    sd = np.maximum(b.signal_sd, 1e-12)
    tilt = np.abs(b.signal[-4] - b.signal[-3]) / sd       # in units of each voxel's signal sd
    height = np.abs(b.signal[-2] - b.signal[-1]) / sd
    v1 = sig & np.isin(names, ("V1v", "V1d"))
    y, s = b.prf_y, b.prf_sigma
    between = v1 & (y > 0.38 + 2 * s) & (y < 0.62 - 2 * s)
    far = v1 & ((y < 0.38 - 3 * s - 0.05) | (y > 0.62 + 3 * s + 0.05))
    assert between.sum() >= 5 and far.sum() >= 5
    assert np.median(height[between]) > 0.15 and height[far].max() < 0.1
    phc = sig & np.isin(names, ("PHC1", "PHC2"))
    assert phc.sum() >= 5 and np.median(tilt[phc]) > 0.3

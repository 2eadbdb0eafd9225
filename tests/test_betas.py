"""mdlib.nsd.betas: both file formats, scaling, z-scoring, repeat averaging, the cache and the errors.

Every test reads small files written here in NSD's formats: int16 NIfTI (X, Y, Z, T) with NSD's affine, the
transposed HDF5 (T, Z, Y, X) with chunks (T, 1, 1, 1), an nsdgeneral ROI, and an nsd_expdesign.mat whose
basiccnt column sums give the (unequal) session lengths. The references are computed here independently:
straight numpy indexing of the full arrays, scipy.stats.zscore and loops over trials.
"""

import os
import warnings

import h5py
import nibabel as nib
import numpy as np
import pytest
import scipy.io
import scipy.stats

from mdlib.nsd import betas as B
from mdlib.nsd import layout

SUBJECT = 1
GRID = (7, 8, 6)
SESSION_LENGTHS = (12, 12, 10)
N_IMAGES, N_SHARED = 16, 4


def affine_for(shape):
    affine = np.diag([1.8, 1.8, 1.8, 1.0])
    affine[:3, 3] = -(np.asarray(shape[:3]) - 1) / 2 * 1.8
    return affine


def write_nifti(path, data, affine=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(data, affine_for(data.shape) if affine is None else affine)
    img.header.set_data_dtype(data.dtype)
    nib.save(img, path)


def write_hdf5(path, data):
    """NSD's HDF5 layout: the NIfTI axes reversed, one chunk per voxel time series."""
    path.parent.mkdir(parents=True, exist_ok=True)
    flipped = np.ascontiguousarray(data.transpose(3, 2, 1, 0))  # (X, Y, Z, T) -> (T, Z, Y, X)
    with h5py.File(path, "w") as f:
        f.create_dataset("betas", data=flipped, chunks=(flipped.shape[0], 1, 1, 1))


def write_mini(root, seed=0, session_lengths=SESSION_LENGTHS):
    """Write design, ROI and betas (both formats); return the arrays they hold."""
    rng = np.random.default_rng(seed)
    n_trials = sum(session_lengths)
    masterordering = rng.permutation(np.repeat(np.arange(1, N_IMAGES + 1), 3))[:n_trials]
    masterordering[1] = masterordering[0]  # an image shown twice in one session
    sharedix = np.array([5, 17, 30, 41])
    subjectim = np.zeros((8, N_IMAGES), dtype=int)
    for s in range(8):
        own = rng.choice(np.arange(100, 400), N_IMAGES - N_SHARED, replace=False)
        subjectim[s] = np.concatenate([sharedix, own])
    basiccnt = np.array([[n - 2 for n in session_lengths], [1] * len(session_lengths), [1] * len(session_lengths)])
    design_path = root / str(layout.expdesign())
    design_path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(design_path, {"masterordering": masterordering[None].astype(float),
                                   "subjectim": subjectim.astype(float), "sharedix": sharedix[None].astype(float),
                                   "basiccnt": basiccnt.astype(float)})

    brain = np.zeros(GRID, dtype=bool)
    brain[1:, 1:-1, :] = True  # the x = 0 plane and two y planes are "outside the brain": betas 0 there
    labels = np.where(rng.random(GRID) < 0.6, 1, 0)
    labels[:, :, 0] = -1
    write_nifti(root / str(layout.roi_file(SUBJECT, "nsdgeneral")), labels.astype(np.int16))

    sessions = {}
    for s, n in enumerate(session_lengths, start=1):
        data = rng.integers(-3000, 3000, GRID + (n,)).astype(np.int16) * brain[..., None]
        sessions[s] = data
        write_nifti(root / str(layout.betas_file(SUBJECT, s, "nii.gz")), data)
        write_hdf5(root / str(layout.betas_file(SUBJECT, s, "hdf5")), data)
    return {"masterordering": masterordering, "subjectim": subjectim, "mask": labels > 0, "betas": sessions,
            "session_lengths": session_lengths}


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    root = tmp_path_factory.mktemp("nsd")
    return root, write_mini(root)


@pytest.fixture
def fresh(tmp_path):
    """A private data root for tests that damage files or need an empty cache."""
    return tmp_path, write_mini(tmp_path)


def masked_reference(data, mask):
    """(T, n_vox) by direct indexing of the full 4-D array at np.nonzero(mask)."""
    i, j, k = np.nonzero(mask)
    return data[i, j, k, :].T


def trial_table(truth, sessions):
    """(session, volume, nsd_id, shared) per trial, straight from the design arrays (docs/data.md's formulas,
    "The design")."""
    rows, start = [], 0
    for s, n in enumerate(truth["session_lengths"], start=1):
        for v in range(n):
            mo = truth["masterordering"][start + v]
            if s in sessions:
                rows.append((s, v, truth["subjectim"][SUBJECT - 1, mo - 1] - 1, mo <= N_SHARED))
        start += n
    return rows


def reference_matrix(truth, sessions, zscore=True):
    """Brute force: z-score each session with scipy, then average each image's trials in a loop."""
    per_session = {}
    for s in sessions:
        x = masked_reference(truth["betas"][s], truth["mask"]).astype(np.float64) / 300.0
        if zscore:
            with np.errstate(invalid="ignore"):
                x = np.nan_to_num(scipy.stats.zscore(x, axis=0, ddof=0))  # constant voxels -> 0 (documented)
        per_session[s] = x
    sums, counts, shared = {}, {}, {}
    for s, v, nsd_id, is_shared in trial_table(truth, sessions):
        sums[nsd_id] = sums.get(nsd_id, 0.0) + per_session[s][v]
        counts[nsd_id] = counts.get(nsd_id, 0) + 1
        shared[nsd_id] = is_shared
    ids = sorted(sums)
    return (np.array(ids), np.stack([sums[i] / counts[i] for i in ids]), np.array([counts[i] for i in ids]),
            np.array([shared[i] for i in ids]))


# -- read_session -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("session", [1, 2, 3])
def test_nifti_and_hdf5_give_identical_matrices_equal_to_direct_indexing(mini, session):
    root, truth = mini
    mask = truth["mask"]
    from_hdf5 = B.read_session(root, SUBJECT, session, mask, "hdf5")
    from_nifti = B.read_session(root, SUBJECT, session, mask, "nii.gz")
    assert from_hdf5.dtype == np.float32 and from_hdf5.shape == (SESSION_LENGTHS[session - 1], mask.sum())
    np.testing.assert_array_equal(from_hdf5, from_nifti)  # bit for bit, same voxel order
    raw = masked_reference(truth["betas"][session], mask)
    np.testing.assert_array_equal(from_nifti, raw.astype(np.float32) / np.float32(300))
    np.testing.assert_allclose(from_nifti, raw / 300.0, rtol=1e-6)  # percent signal change = int16 / 300


def test_nifti_block_size_does_not_change_the_result(mini):
    root, truth = mini
    whole = B.read_session(root, SUBJECT, 1, truth["mask"], "nii.gz", block_size=1000)
    for block_size in (1, 5, 7):
        np.testing.assert_array_equal(
            B.read_session(root, SUBJECT, 1, truth["mask"], "nii.gz", block_size=block_size), whole)


def test_roi_string_and_known_values(tmp_path):
    data = np.zeros(GRID + (2,), dtype=np.int16)
    data[3, 4, 2] = [300, -150]
    write_hdf5(tmp_path / str(layout.betas_file(SUBJECT, 1, "hdf5")), data)
    write_nifti(tmp_path / str(layout.roi_file(SUBJECT, "nsdgeneral")), np.ones(GRID, dtype=np.int16))
    x = B.read_session(tmp_path, SUBJECT, 1, "nsdgeneral", "hdf5")
    column = np.ravel_multi_index((3, 4, 2), GRID)  # all voxels in the mask: column = C-order flat index
    np.testing.assert_array_equal(x[:, column], [1.0, -0.5])


def test_grid_mismatch_names_both_shapes(mini):
    root, truth = mini
    small = truth["mask"][:, :, :5]
    for fmt in ("hdf5", "nii.gz"):
        with pytest.raises(ValueError, match=r"\(7, 8, 6\).*\(7, 8, 5\)"):
            B.read_session(root, SUBJECT, 1, small, fmt)
    shifted = affine_for(GRID)
    shifted[2, 3] += 3.6
    with pytest.raises(ValueError, match="different affines"):
        B.read_session(root, SUBJECT, 1, truth["mask"], "nii.gz", affine=shifted)


@pytest.mark.parametrize("fmt", ["nii.gz", "hdf5"])
def test_truncated_file_error_names_the_file(fresh, fmt):
    root, truth = fresh
    path = root / str(layout.betas_file(SUBJECT, 2, fmt))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=rf"betas_session02\.{fmt.replace('.', '[.]')}.*(truncated|corrupt)"):
        B.read_session(root, SUBJECT, 2, truth["mask"], fmt)


@pytest.mark.parametrize("fmt", ["nii.gz", "hdf5"])
def test_corrupt_file_error_names_the_file_and_suggests_redownload(fresh, fmt):
    root, truth = fresh
    path = root / str(layout.betas_file(SUBJECT, 1, fmt))
    blob = bytearray(path.read_bytes())
    if fmt == "nii.gz":
        blob[len(blob) // 2: len(blob) // 2 + 64] = b"\xff" * 64  # inside the deflate stream
    else:
        blob[:8] = b"garbage!"  # not an HDF5 signature any more
    path.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match=r"betas_session01.*download it again"):
        B.read_session(root, SUBJECT, 1, truth["mask"], fmt)


def test_missing_file_names_the_nsd_path(mini):
    root, truth = mini
    with pytest.raises(FileNotFoundError, match="betas_session09.hdf5"):
        B.read_session(root, SUBJECT, 9, truth["mask"], "hdf5")


def test_float_betas_with_nan_are_zeroed_with_a_warning_or_raise(tmp_path):
    data = np.full(GRID + (3,), 600.0, dtype=np.float32)
    data[0, 0, 0, 1] = np.nan
    write_nifti(tmp_path / str(layout.betas_file(SUBJECT, 1, "nii.gz")), data)
    mask = np.ones(GRID, dtype=bool)
    with pytest.warns(RuntimeWarning, match="1 NaN/inf values in 1 voxels"):
        x = B.read_session(tmp_path, SUBJECT, 1, mask, "nii.gz")
    assert np.isfinite(x).all() and x[1, 0] == 0.0 and x[0, 0] == 2.0
    with pytest.raises(ValueError, match="NaN"):
        B.read_session(tmp_path, SUBJECT, 1, mask, "nii.gz", nan="raise")


# -- z-scoring --------------------------------------------------------------------------------------------
def test_zscore_matches_scipy(rng):
    x = (rng.normal(size=(40, 25)) * rng.uniform(0.1, 5, 25) + rng.normal(size=25)).astype(np.float32)
    z = B.zscore_per_session(x)
    assert z.dtype == np.float32
    np.testing.assert_allclose(z, scipy.stats.zscore(x.astype(np.float64), axis=0, ddof=0), atol=1e-5)


def test_constant_voxels_become_zero_and_are_counted(rng):
    x = rng.normal(size=(30, 6)).astype(np.float32)
    x[:, 1] = 0.0
    x[:, 4] = 7.3
    with pytest.warns(RuntimeWarning, match="2 of 6 voxels are constant"):
        z = B.zscore_per_session(x)
    assert np.isfinite(z).all() and not z[:, [1, 4]].any()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        z2, constant = B.zscore_per_session(x, return_constant=True)
    np.testing.assert_array_equal(constant, [False, True, False, False, True, False])
    np.testing.assert_array_equal(z, z2)


# -- load_betas -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sessions", [None, [2, 3], range(1, 3)])
def test_load_betas_equals_brute_force(mini, sessions):
    root, truth = mini
    chosen = [1, 2, 3] if sessions is None else list(sessions)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the zero-beta voxels are constant, by design
        betas = B.load_betas(root, SUBJECT, "nsdgeneral", sessions=sessions, cache=False, progress=False)
    ids, expected, counts, shared = reference_matrix(truth, chosen)
    np.testing.assert_array_equal(betas.nsd_ids, ids)
    np.testing.assert_array_equal(betas.n_repeats, counts)
    np.testing.assert_array_equal(betas.shared, shared)
    np.testing.assert_allclose(betas.responses, expected, atol=1e-5)
    assert betas.responses.dtype == np.float32 and np.isfinite(betas.responses).all()
    assert betas.sessions == tuple(chosen) and betas.subject == SUBJECT and betas.roi == "nsdgeneral"
    np.testing.assert_array_equal(betas.coords, np.stack(np.nonzero(truth["mask"]), axis=1))
    np.testing.assert_allclose(betas.affine, affine_for(GRID))
    assert counts.max() >= 2  # repeats really were averaged


def test_constant_voxels_are_reported_and_never_nan(mini):
    root, truth = mini
    with pytest.warns(RuntimeWarning, match="constant within at least one session"):
        betas = B.load_betas(root, SUBJECT, sessions=[1], cache=False, progress=False)
    zero_voxels = np.all(masked_reference(truth["betas"][1], truth["mask"]) == 0, axis=0)
    assert zero_voxels.any()
    np.testing.assert_array_equal(betas.constant, zero_voxels)
    assert np.isfinite(betas.responses).all() and not betas.responses[:, zero_voxels].any()


def test_trial_rows_without_averaging_or_zscoring(mini):
    root, truth = mini
    betas = B.load_betas(root, SUBJECT, sessions=[1, 3], zscore=False, average_repeats=False, cache=False,
                         progress=False)
    table = trial_table(truth, [1, 3])
    assert betas.n_rows == len(table) and betas.trials is not None
    assert np.all(np.diff(betas.nsd_ids) >= 0)
    for row, trial in enumerate(betas.trials):
        session = 1 if trial < SESSION_LENGTHS[0] else 3
        volume = trial - (0 if session == 1 else SESSION_LENGTHS[0] + SESSION_LENGTHS[1])
        expected = masked_reference(truth["betas"][session], truth["mask"])[volume] / 300.0
        np.testing.assert_allclose(betas.responses[row], expected, rtol=1e-6)
    assert sorted(zip(betas.nsd_ids.tolist(), betas.shared.tolist())) == sorted((r[2], r[3]) for r in table)


def test_hdf5_and_nifti_load_betas_identical(mini):
    root, _ = mini
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        a = B.load_betas(root, SUBJECT, fmt="hdf5", cache=False, progress=False)
        b = B.load_betas(root, SUBJECT, fmt="nii.gz", cache=False, progress=False)
    np.testing.assert_array_equal(a.responses, b.responses)
    np.testing.assert_array_equal(a.nsd_ids, b.nsd_ids)


def test_mask_array_and_image_match_the_roi_string(mini):
    root, truth = mini
    kwargs = dict(sessions=[1], zscore=False, cache=False, progress=False)
    by_name = B.load_betas(root, SUBJECT, "nsdgeneral", **kwargs)
    by_array = B.load_betas(root, SUBJECT, truth["mask"], **kwargs)
    by_image = B.load_betas(root, SUBJECT, nib.Nifti1Image(truth["mask"].astype(np.int16), affine_for(GRID)),
                            **kwargs)
    for other in (by_array, by_image):
        np.testing.assert_array_equal(other.responses, by_name.responses)
        assert other.roi == "custom"


def test_split_follows_the_papers_rule(mini):
    root, truth = mini
    betas = B.load_betas(root, SUBJECT, zscore=False, cache=False, progress=False)
    train, test = betas.split()
    assert test.shared.all() and not train.shared.any()
    assert train.n_rows + test.n_rows == betas.n_rows
    shared_ids = set((truth["subjectim"][0, :N_SHARED] - 1).tolist())
    assert set(test.nsd_ids.tolist()) <= shared_ids and not set(train.nsd_ids.tolist()) & shared_ids
    np.testing.assert_array_equal(test.responses, betas.responses[betas.test_rows])


def test_missing_session_file_is_reported_before_reading(fresh, monkeypatch):
    root, _ = fresh
    os.remove(root / str(layout.betas_file(SUBJECT, 3, "hdf5")))
    monkeypatch.setattr(B, "read_session", lambda *a, **k: pytest.fail("read before checking files"))
    with pytest.raises(FileNotFoundError, match=r"nsddata_betas/ppdata/subj01/.*betas_session03\.hdf5"):
        B.load_betas(root, SUBJECT, cache=False, progress=False)


def test_session_outside_the_design_is_an_error(mini):
    root, _ = mini
    with pytest.raises(ValueError, match="sessions 1..3"):
        B.load_betas(root, SUBJECT, sessions=[4], cache=False, progress=False)


def test_betas_with_a_different_number_of_trials_than_the_design(fresh):
    root, truth = fresh
    longer = np.concatenate([truth["betas"][2], truth["betas"][2][..., :1]], axis=3)
    write_hdf5(root / str(layout.betas_file(SUBJECT, 2, "hdf5")), longer)
    with pytest.raises(ValueError, match="13 volumes but the design lists 12 trials in session 2"):
        B.load_betas(root, SUBJECT, zscore=False, cache=False, progress=False)


# -- the cache --------------------------------------------------------------------------------------------
def cache_files(root):
    return sorted((root / "mdlib_cache" / "subj01").glob("*"))


def test_cache_hit_is_identical_and_reads_nothing(fresh, monkeypatch):
    root, _ = fresh
    kwargs = dict(sessions=[1, 2], zscore=False, progress=False)
    first = B.load_betas(root, SUBJECT, **kwargs)
    files = cache_files(root)
    assert len(files) == 1 and files[0].suffix == ".npz"
    with np.load(files[0], allow_pickle=False) as npz:  # plain arrays only, parameters as JSON
        assert '"sessions": [1, 2]' in str(npz["params"])
    monkeypatch.setattr(B, "read_session", lambda *a, **k: pytest.fail("cache hit should not read betas"))
    second = B.load_betas(root, SUBJECT, **kwargs)
    for name in ("responses", "nsd_ids", "n_repeats", "shared", "coords", "mask", "affine", "constant"):
        a, b = getattr(first, name), getattr(second, name)
        assert a.dtype == b.dtype and np.array_equal(a, b), name
    assert (second.subject, second.sessions, second.roi, second.trials) == (SUBJECT, (1, 2), "nsdgeneral", None)
    assert second.params == first.params


def test_cache_misses_on_parameter_or_file_change(fresh):
    root, _ = fresh
    kwargs = dict(sessions=[1, 2], progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        B.load_betas(root, SUBJECT, zscore=False, **kwargs)
        B.load_betas(root, SUBJECT, zscore=True, **kwargs)
        assert len(cache_files(root)) == 2
        B.load_betas(root, SUBJECT, zscore=False, average_repeats=False, **kwargs)
        assert len(cache_files(root)) == 3
        path = root / str(layout.betas_file(SUBJECT, 2, "hdf5"))
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))  # "re-downloaded"
        B.load_betas(root, SUBJECT, zscore=False, **kwargs)
        assert len(cache_files(root)) == 4


def test_interrupted_cache_write_leaves_no_cache(fresh, monkeypatch):
    root, _ = fresh

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(B.np, "savez", crash)
    with pytest.raises(KeyboardInterrupt):
        B.load_betas(root, SUBJECT, zscore=False, progress=False)
    assert cache_files(root) == []
    monkeypatch.undo()
    B.load_betas(root, SUBJECT, zscore=False, progress=False)
    assert len(cache_files(root)) == 1


def test_damaged_cache_is_rebuilt(fresh):
    root, _ = fresh
    first = B.load_betas(root, SUBJECT, zscore=False, progress=False)
    (target,) = cache_files(root)
    target.write_bytes(b"not a zip file")
    with pytest.warns(RuntimeWarning, match="unreadable cache"):
        again = B.load_betas(root, SUBJECT, zscore=False, progress=False)
    np.testing.assert_array_equal(again.responses, first.responses)
    with np.load(target, allow_pickle=False) as npz:
        np.testing.assert_array_equal(npz["responses"], first.responses)


def test_design_can_be_passed_in(mini, monkeypatch):
    from mdlib.nsd import design as D

    root, truth = mini
    design = D.load_design(root)
    monkeypatch.setattr(D, "load_design", lambda *a, **k: pytest.fail("the given design should be used"))
    betas = B.load_betas(root, SUBJECT, truth["mask"], sessions=[2], zscore=False, cache=False, progress=False,
                         fmt="nii.gz", design=design)
    assert betas.sessions == (2,)
    np.testing.assert_allclose(betas.affine, affine_for(GRID))  # a bare mask array gets NSD's affine

"""mdlib.nsd.rois: ROI files, label names, the ROI choices and the canonical voxel order.

Small NSD-format files are written here with nibabel (func1pt8mm affine: 1.8 mm, centred) and plain text.
"""

import nibabel as nib
import numpy as np
import pytest

from mdlib.nsd import layout, rois

GRID = (6, 7, 5)
SUBJECT = 1

KASTNER_CTAB = "\n".join(f"{i} {name}" for i, name in enumerate(
    ["Unknown", "V1v", "V1d", "V2v", "V2d", "V3v", "V3d", "hV4", "VO1", "VO2", "PHC1", "PHC2", "TO2", "TO1",
     "LO2", "LO1", "V3B", "V3A", "IPS0", "IPS1", "IPS2", "IPS3", "IPS4", "IPS5", "SPL1", "FEF"]))
# FreeSurfer-style: colour columns, a comment and blank lines, which the parser must tolerate.
PRF_CTAB = """# prf-visualrois labels
0  Unknown   0 0 0 0
1  V1v  255 0 0 0

2  V1d  255 0 0 0
3  V2v  0 255 0 0
4  V2d  0 255 0 0
5  V3v  0 0 255 0
6  V3d  0 0 255 0
7  hV4  255 255 0 0
"""


def affine_for(shape):
    """NSD's func1pt8mm affine, written out independently of mdlib."""
    affine = np.diag([1.8, 1.8, 1.8, 1.0])
    affine[:3, 3] = -(np.asarray(shape[:3]) - 1) / 2 * 1.8
    return affine


def write_volume(root, rel, data, dtype=np.int16, affine=None):
    path = root / str(rel)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.asarray(data).astype(dtype), affine_for(data.shape) if affine is None else affine)
    img.header.set_data_dtype(dtype)
    nib.save(img, path)
    return path


def write_text(root, rel, text):
    path = root / str(rel)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def atlases(tmp_path, rng):
    """A data root with nsdgeneral, prf-visualrois and Kastner2015 volumes (+ ctabs), returned as arrays."""
    cortex = rng.random(GRID) < 0.8
    labels = {
        "nsdgeneral": np.where(cortex, rng.integers(0, 2, GRID), -1),
        "prf-visualrois": np.where(cortex, rng.integers(0, 8, GRID), -1),
        "Kastner2015": np.where(cortex, rng.integers(0, 26, GRID), -1),
    }
    for atlas, values in labels.items():
        write_volume(tmp_path, layout.roi_file(SUBJECT, atlas), values)
    write_text(tmp_path, layout.roi_ctab(SUBJECT, "Kastner2015"), KASTNER_CTAB)
    write_text(tmp_path, layout.roi_ctab(SUBJECT, "prf-visualrois"), PRF_CTAB)
    return tmp_path, labels


def test_load_roi_returns_int_labels_and_nsd_affine(atlases):
    root, labels = atlases
    values, affine = rois.load_roi(root, SUBJECT, "Kastner2015")
    assert values.shape == GRID and np.issubdtype(values.dtype, np.integer)
    np.testing.assert_array_equal(values, labels["Kastner2015"])
    np.testing.assert_allclose(affine, affine_for(GRID))
    np.testing.assert_allclose(rois.nsd_affine(GRID), affine_for(GRID))


def test_float_roi_files_are_rounded_to_labels(tmp_path, rng):
    labels = rng.integers(-1, 8, GRID)
    write_volume(tmp_path, layout.roi_file(SUBJECT, "prf-visualrois"), labels + 1e-4, dtype=np.float32)
    values, _ = rois.load_roi(tmp_path, SUBJECT, "prf-visualrois")
    np.testing.assert_array_equal(values, labels)


def test_ctab_parsing_tolerates_colours_comments_and_blank_lines(atlases):
    root, _ = atlases
    prf = rois.roi_labels(root, SUBJECT, "prf-visualrois")
    assert prf == {0: "Unknown", 1: "V1v", 2: "V1d", 3: "V2v", 4: "V2d", 5: "V3v", 6: "V3d", 7: "hV4"}
    kastner = rois.roi_labels(root, SUBJECT, "Kastner2015")
    assert kastner[23] == "IPS5" and kastner[24] == "SPL1" and kastner[25] == "FEF" and len(kastner) == 26
    with pytest.raises(ValueError, match="line 2"):
        rois.parse_ctab("1 V1v\nV2v\n")


def test_masks_for_atlases_and_named_labels(atlases):
    root, labels = atlases
    np.testing.assert_array_equal(rois.roi_mask(root, SUBJECT, "nsdgeneral"), labels["nsdgeneral"] > 0)
    np.testing.assert_array_equal(rois.roi_mask(root, SUBJECT, "Kastner2015"), labels["Kastner2015"] > 0)
    v1 = rois.roi_mask(root, SUBJECT, "prf-visualrois:V1v, v1d")  # case-insensitive, spaces ignored
    np.testing.assert_array_equal(v1, np.isin(labels["prf-visualrois"], [1, 2]))
    assert v1.dtype == bool and v1.shape == GRID


def test_unknown_label_name_lists_valid_names(atlases):
    root, _ = atlases
    with pytest.raises(ValueError, match=r"V7.*valid names: V1v, V1d, V2v"):
        rois.roi_mask(root, SUBJECT, "prf-visualrois:V1v,V7")


def test_unknown_atlas_and_missing_file(atlases):
    root, _ = atlases
    with pytest.raises(ValueError, match="unknown ROI atlas"):
        rois.roi_mask(root, SUBJECT, "not-an-atlas")
    with pytest.raises(FileNotFoundError, match="roi/streams.nii.gz"):
        rois.roi_mask(root, SUBJECT, "streams")


def test_mindiffuser_mask_is_prf_or_kastner_1_to_23(atlases):
    root, labels = atlases
    prf, kastner = labels["prf-visualrois"], labels["Kastner2015"]
    expected = np.zeros(GRID, dtype=bool)
    for ijk in np.ndindex(GRID):  # brute force, voxel by voxel
        expected[ijk] = prf[ijk] > 0 or 1 <= kastner[ijk] <= 23
    mask = rois.roi_mask(root, SUBJECT, "mindiffuser")
    np.testing.assert_array_equal(mask, expected)
    # SPL1 (24) and FEF (25) alone do not qualify; any prf label does, whatever Kastner says.
    assert not mask[(prf <= 0) & (kastner >= 24)].any()
    assert mask[prf > 0].all()


def test_mindiffuser_grid_mismatch_is_an_error(atlases):
    root, _ = atlases
    write_volume(root, layout.roi_file(SUBJECT, "Kastner2015"), np.ones((6, 7, 4), dtype=np.int16))
    with pytest.raises(ValueError, match=r"\(6, 7, 5\).*\(6, 7, 4\)"):
        rois.roi_mask(root, SUBJECT, "mindiffuser")


def test_check_grid_names_both_shapes_and_affines():
    with pytest.raises(ValueError, match=r"betas.*\(81, 104, 83\).*mask.*\(82, 106, 84\)"):
        rois.check_grid((81, 104, 83, 750), (82, 106, 84), "betas", "mask")
    shifted = affine_for(GRID)
    shifted[0, 3] += 1.8
    with pytest.raises(ValueError, match="different affines"):
        rois.check_grid(GRID, GRID, "a", "b", affine_for(GRID), shifted)
    rois.check_grid(GRID + (3,), GRID, "a", "b", affine_for(GRID), affine_for(GRID))  # no error


def test_voxel_coords_is_nonzero_order_and_matches_boolean_indexing(rng):
    mask = rng.random(GRID) < 0.3
    coords = rois.voxel_coords(mask)
    assert coords.shape == (mask.sum(), 3) and np.issubdtype(coords.dtype, np.integer)
    np.testing.assert_array_equal(coords, np.stack(np.nonzero(mask), axis=1))
    volume = rng.random(GRID)
    np.testing.assert_array_equal(volume[mask], volume[coords[:, 0], coords[:, 1], coords[:, 2]])
    # C order over (X, Y, Z): the last axis varies fastest.
    flat = np.ravel_multi_index(tuple(coords.T), GRID)
    assert np.all(np.diff(flat) > 0)


def test_load_anatomy(tmp_path, rng):
    t1 = rng.random(GRID).astype(np.float32)
    write_volume(tmp_path, layout.anatomy_file(SUBJECT), t1, dtype=np.float32)
    img = rois.load_anatomy(tmp_path, SUBJECT)
    assert img.shape == GRID
    np.testing.assert_allclose(img.get_fdata(), t1)
    with pytest.raises(FileNotFoundError, match="brainmask.nii.gz"):
        rois.load_anatomy(tmp_path, SUBJECT, "brainmask")


def test_truncated_roi_file_names_the_file(atlases):
    root, _ = atlases
    path = root / str(layout.roi_file(SUBJECT, "nsdgeneral"))
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match=r"nsdgeneral\.nii\.gz.*re-download"):
        rois.load_roi(root, SUBJECT, "nsdgeneral")


def test_a_subject_missing_from_a_mini_nsd_names_mdlib_mini(tmp_path):
    """On a mini-NSD (written for subject 1 only), subject 2's files are missing: the message says to write the
    mini-NSD again with that subject, not to fetch the real NSD."""
    from mdlib.nsd import layout
    from mdlib.synth.write import write_mini_nsd

    root = tmp_path / "mini-nsd"
    write_mini_nsd(root, subjects=(1,), n_shared=6, n_per_subject=24, trials_per_session=18, stim_size=32,
                   progress=False)
    with pytest.raises(FileNotFoundError) as err:
        layout.require(root, layout.roi_file(2, "nsdgeneral"))
    message = str(err.value)
    assert f"mdlib mini {root} --subjects 1 N" in message and "mdlib fetch" not in message
    with pytest.raises(FileNotFoundError, match="mdlib fetch"):          # a real (empty) root: fetch
        layout.require(tmp_path / "nsd", layout.roi_file(2, "nsdgeneral"))

"""mdlib.nsd.stimuli on small files written here by hand in NSD's formats (csv, COCO json, HDF5)."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mdlib.nsd import layout
from mdlib.nsd.stimuli import StimulusReader, load_captions, load_stim_info, resize

N_IMAGES, SIDE = 12, 20

# nsdId -> (cocoId, cocoSplit): both splits, cocoIds unrelated to nsdIds
COCO = {i: (1000 + 7 * i, "val2017" if i % 3 == 0 else "train2017") for i in range(N_IMAGES)}


def captions_of(coco_id: int) -> list[str]:
    return [f"photo {coco_id}, caption {k}" for k in range(5)]


def write_stim_info(root, drop=()):
    """nsd_stim_info_merged.csv as NSD writes it: an unnamed index column, cropBox as a string."""
    rows = []
    for nsd_id in range(N_IMAGES):
        coco_id, split = COCO[nsd_id]
        row = {"cocoId": coco_id, "cocoSplit": split, "cropBox": f"(0, 0, 0.{nsd_id + 1}, 0.125)",
               "loss": 0.0, "nsdId": nsd_id, "flagged": False, "BOLD5000": False, "shared1000": nsd_id < 3}
        for s in range(1, 9):
            row[f"subject{s}"] = 1
            for r in range(3):
                row[f"subject{s}_rep{r}"] = 0
        rows.append(row)
    table = pd.DataFrame(rows).iloc[::-1]  # rows out of order: the loader sorts by nsdId
    path = root / str(layout.stim_info("csv"))
    path.parent.mkdir(parents=True, exist_ok=True)
    table.drop(columns=list(drop)).to_csv(path)
    return path


def write_coco(root, skip=()):
    """captions_{train,val}2017.json with each image's annotations interleaved with others'."""
    for split in ("train2017", "val2017"):
        coco_ids = [c for c, s in COCO.values() if s == split] + [999999]  # plus an image NSD does not use
        annotations = [{"id": len(coco_ids) * k + j, "image_id": c, "caption": captions_of(c)[k] + " \n"}
                       for k in range(5) for j, c in enumerate(coco_ids) if c not in skip]
        path = root / str(layout.coco_captions(split))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"images": [{"id": c} for c in coco_ids], "annotations": annotations}))


def make_images(rng, n=N_IMAGES):
    return rng.integers(0, 256, size=(n, SIDE, SIDE, 3), dtype=np.uint8)


def write_brick(path, images, nsd_ids=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("imgBrick", data=images)
        if nsd_ids is not None:
            f.create_dataset("nsd_ids", data=np.asarray(nsd_ids, dtype=np.int64))
    return path


@pytest.fixture
def root(tmp_path):
    write_stim_info(tmp_path)
    write_coco(tmp_path)
    return tmp_path


@pytest.fixture
def brick(tmp_path, rng):
    images = make_images(rng)
    write_brick(tmp_path / str(layout.stimuli()), images)
    return tmp_path, images


# -- stimulus table ------------------------------------------------------------------------------------------
def test_stim_info_indexed_by_nsd_id(root):
    info = load_stim_info(root)
    assert info.index.name == "nsdId"
    assert info.index.tolist() == list(range(N_IMAGES))
    assert "Unnamed: 0" not in info.columns
    assert info.loc[4, "cocoId"] == COCO[4][0] and info.loc[4, "cocoSplit"] == COCO[4][1]
    assert info["shared1000"].dtype == bool and info["shared1000"].sum() == 3


def test_crop_box_parsed_to_floats(root):
    info = load_stim_info(root)
    box = info.loc[4, "cropBox"]
    assert box == (0.0, 0.0, 0.5, 0.125)
    assert all(isinstance(v, float) for v in box)


def test_stim_info_missing_columns_are_listed(tmp_path):
    path = write_stim_info(tmp_path, drop=("cocoId", "cropBox"))
    with pytest.raises(ValueError, match=r"missing column\(s\) \['cocoId', 'cropBox'\]") as err:
        load_stim_info(tmp_path)
    assert str(path) in str(err.value)


def test_stim_info_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nsddata/experiments/nsd/nsd_stim_info_merged.csv"):
        load_stim_info(tmp_path)


# -- captions ------------------------------------------------------------------------------------------------
def test_captions_by_nsd_id_across_splits_in_any_order(root):
    ids = [7, 0, 3, 11, 7, 2]  # train and val images, a repeat, any order
    captions = load_captions(root, ids)
    assert captions == [captions_of(COCO[i][0]) for i in ids]  # stripped, in the file's order
    assert {COCO[i][1] for i in ids} == {"train2017", "val2017"}


def test_captions_with_given_stim_info_and_array_ids(root):
    info = load_stim_info(root)
    assert load_captions(root, np.array([5, 6]), stim_info=info) == [captions_of(COCO[5][0]),
                                                                      captions_of(COCO[6][0])]


def test_captions_are_reread_when_the_file_changes(root):
    assert load_captions(root, [1])[0][0] == captions_of(COCO[1][0])[0]
    path = root / str(layout.coco_captions(COCO[1][1]))
    coco = json.loads(path.read_text())
    coco["annotations"] = [{"image_id": COCO[1][0], "caption": "changed"}] * 2
    path.write_text(json.dumps(coco))
    assert load_captions(root, [1]) == [["changed", "changed"]]


def test_missing_captions_name_both_ids(tmp_path):
    write_stim_info(tmp_path)
    write_coco(tmp_path, skip={COCO[4][0]})
    with pytest.raises(KeyError, match=rf"nsdId 4 \(cocoId {COCO[4][0]}"):
        load_captions(tmp_path, [3, 4])


def test_unknown_nsd_id_for_captions(root):
    with pytest.raises(KeyError, match=r"\[99\] not in the stimulus table"):
        load_captions(root, [1, 99])


def test_missing_coco_file_says_how_to_get_it(tmp_path):
    write_stim_info(tmp_path)
    with pytest.raises(FileNotFoundError, match="coco/annotations/captions_") as err:
        load_captions(tmp_path, [0])
    assert "COCO" in str(err.value)


# -- images --------------------------------------------------------------------------------------------------
def test_reader_sizes(brick):
    root, images = brick
    with StimulusReader(root) as reader:
        assert reader.n_stimuli == N_IMAGES
        assert reader.image_size == (SIDE, SIDE)
        assert reader.nsd_ids.tolist() == list(range(N_IMAGES))


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_read_shuffled_ids_with_repeats(brick, rng, batch_size):
    root, images = brick
    ids = np.concatenate([rng.permutation(N_IMAGES), [5, 5, 0, 11, 5]])
    with StimulusReader(root, batch_size=batch_size) as reader:
        out = reader.read(ids)
    assert out.dtype == np.uint8 and out.shape == (len(ids), SIDE, SIDE, 3)
    np.testing.assert_array_equal(out, images[ids])


def test_read_contiguous_and_empty(brick):
    root, images = brick
    with StimulusReader(root) as reader:
        np.testing.assert_array_equal(reader.read(range(3, 9)), images[3:9])
        assert reader.read([]).shape == (0, SIDE, SIDE, 3)


def test_resize_matches_pil(brick):
    root, images = brick
    ids = [9, 2, 9]
    with StimulusReader(root, batch_size=2) as reader:
        out = reader.read(ids, size=7)
    expected = np.stack([np.asarray(Image.fromarray(images[i]).resize((7, 7), Image.Resampling.BICUBIC))
                         for i in ids])
    assert out.shape == (3, 7, 7, 3)
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(resize(images[9], 7), expected[0])


@pytest.mark.parametrize("bad", [[N_IMAGES], [-1], [0, 100]])
def test_out_of_range_ids(brick, bad):
    root, _ = brick
    with StimulusReader(root) as reader, pytest.raises(IndexError, match=rf"0\.\.{N_IMAGES - 1}"):
        reader.read(bad)


def test_subset_file_maps_ids_to_rows(tmp_path, rng):
    held = np.array([70, 3, 512, 9])  # rows of the file hold these nsdIds, not in order
    images = make_images(rng, len(held))
    path = write_brick(tmp_path / "subj01_stimuli.hdf5", images, nsd_ids=held)
    with StimulusReader(tmp_path, path=path) as reader:
        assert reader.n_stimuli == 4
        assert reader.nsd_ids.tolist() == held.tolist()
        out = reader.read([512, 70, 9, 512, 3])
        np.testing.assert_array_equal(out, images[[2, 0, 3, 2, 1]])
        with pytest.raises(IndexError, match=r"\[4\] not in .*subset"):
            reader.read([3, 4])


def test_explicit_file_without_ids_is_row_equals_nsd_id(tmp_path, rng):
    images = make_images(rng, 5)
    path = write_brick(tmp_path / "other.hdf5", images)
    with StimulusReader(None, path=path) as reader:
        np.testing.assert_array_equal(reader.read([4, 0]), images[[4, 0]])


def test_subset_ids_must_match_rows(tmp_path, rng):
    path = write_brick(tmp_path / "bad.hdf5", make_images(rng, 3), nsd_ids=[1, 1, 2])
    with pytest.raises(ValueError, match="distinct"):
        StimulusReader(tmp_path, path=path)


def test_missing_stimuli_names_the_nsd_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5"):
        StimulusReader(tmp_path)


def test_truncated_hdf5(brick):
    root, _ = brick
    path = root / str(layout.stimuli())
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="cannot") as err:
        with StimulusReader(root) as reader:
            reader.read([N_IMAGES - 1])
    assert str(path) in str(err.value)


def test_not_an_image_brick(tmp_path):
    path = tmp_path / str(layout.stimuli())
    path.parent.mkdir(parents=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("imgBrick", data=np.zeros((2, 4, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"\(n, H, W, 3\) uint8"):
        StimulusReader(tmp_path)


def test_reader_closes(brick):
    root, _ = brick
    reader = StimulusReader(root)
    with reader:
        pass
    assert not reader._file.id.valid
    reader.close()  # closing twice is harmless


@pytest.mark.parametrize("content", [b"", b"\xff\xfe\x00garbage\x00\n", b"nsdId,cocoId\n0,1\n"])
def test_stim_info_empty_damaged_or_cut_names_the_file_and_the_fix(tmp_path, content):
    """An empty file, binary junk, or a table without NSD's columns (shared1000 among them): a ValueError naming
    the file and how to get it again, never pandas' bare EmptyDataError or a KeyError later."""
    from mdlib.nsd import layout

    path = tmp_path / layout.stim_info("csv")
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    with pytest.raises(ValueError) as err:
        load_stim_info(tmp_path)
    assert str(path) in str(err.value) and "mdlib fetch" in str(err.value)
    assert path.read_bytes() == content                      # nothing is touched

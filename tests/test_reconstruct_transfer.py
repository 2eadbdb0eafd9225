"""mdlib reconstruct --transfer: a new subject reconstructed from its first sessions (docs/new_subject.md).

On a small mini-NSD with two subjects and the shipped tiny models: the decoded features are those of
mdlib.transfer_data.decode_new_subject, written once beside the stages' folders and read by both stages; the
images are the common test set of mdlib.transfer.transfer_split; bad combinations of options stop before any work.
"""

from pathlib import Path

import numpy as np
import pytest

from mdlib import cli, method, models, reconstruct, transfer
from mdlib.nsd.design import load_design
from mdlib.transfer_data import decode_new_subject

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHORT = ["--num-steps", "10", "--noise-index", "6", "--denoise-steps", "5"]


@pytest.fixture(scope="module")
def mini_root(mini_nsd):
    return mini_nsd(subjects=(1, 2), n_shared=8, n_per_subject=40, trials_per_session=24, stim_size=64)


def _args(root, out, *extra):
    return ["reconstruct", "--preset", "mini", "--data-root", str(root), "--subject", "2", "--out", str(out),
            *SHORT, "-q", *extra]


def test_the_methods_are_mdlib_transfers():
    assert reconstruct.TRANSFER_METHODS == transfer.METHODS


def test_stage_1_then_stage_2_of_a_new_subject_from_one_session(mini_root, tmp_path, capsys):
    out = tmp_path / "runs"
    common = ["--transfer", "shared", "--sessions", "1", "--from", "1"]
    assert cli.main(_args(mini_root, out, "--stage", "1", *common, "--images", "0..2")) == 0
    folder = out / "subj02" / "shared-ses1-from1"
    decoded_file = folder / "decoded.npz"
    split = transfer.transfer_split(load_design(mini_root), 2, sessions=[1], references=[1])
    saved = reconstruct.load_decoded(decoded_file)
    # the common test set: the shared images subject 2 saw outside its first session
    np.testing.assert_array_equal(saved.nsd_ids, split.test_ids)
    assert sorted(int(p.name) for p in (folder / "stage1").iterdir() if p.name.isdigit()) == split.test_ids[:2].tolist()
    # the features are the shared-space method's, every family, with its selection scores
    config = method.configure("mdlib", "mini")
    sd = models.load_sd(config.sd_model, device="cpu")
    clip = models.load_clip_vision(config.clip_model, device="cpu", normalization=config.clip_normalization)
    want, result = decode_new_subject(mini_root, 2, "shared", sessions=1, references=[1], sd=sd, clip=clip,
                                      config=config, device="cpu", progress=False)
    assert set(saved.pred) == set(want.pred) >= {"z", "c", "clip_block1", "clip_embedding"}
    for fam in want.pred:
        np.testing.assert_allclose(saved.pred[fam], want.pred[fam], rtol=1e-5, atol=1e-6, err_msg=fam)
        np.testing.assert_allclose(saved.score[fam], result.score["shared"][fam], rtol=1e-6, err_msg=fam)
    assert saved.params["method"] == "shared" and saved.params["select_by"] == "loo-r2"
    assert saved.params["made_with"]["sessions"] == 1 and saved.params["made_with"]["references"] == [1]
    run = reconstruct.read_settings(folder / "stage1")
    assert run["test_ids"] == split.test_ids.tolist()

    # stage 2 reads the same file: not recomputed, byte for byte
    before, stamp = decoded_file.read_bytes(), decoded_file.stat().st_mtime_ns
    assert cli.main(_args(mini_root, out, "--stage", "2", "--mode", "fast", *common, "--images", "0..1")) == 0
    assert decoded_file.read_bytes() == before and decoded_file.stat().st_mtime_ns == stamp
    assert (folder / "stage2-fast" / str(split.test_ids[0]) / "image.png").is_file()

    # another amount of data is another folder with its own decoded features
    assert cli.main(_args(mini_root, out, "--stage", "1", "--transfer", "scratch", "--sessions", "2",
                          "--trials", "30", "--decode-only")) == 0
    printed = capsys.readouterr().out
    split2 = transfer.transfer_split(load_design(mini_root), 2, sessions=[1, 2], n_trials=30, references=[1])
    other = reconstruct.load_decoded(out / "subj02" / "scratch-ses2-tr30" / "decoded.npz")
    assert other.params["method"] == "scratch" and "decoded subject 2" in printed
    assert (f"method 'scratch' from 30 trials of sessions 1, 2: {split2.hour_ids.size} images; "
            f"{split2.test_ids.size} test images") in printed
    np.testing.assert_array_equal(other.nsd_ids, split2.test_ids)
    assert split2.test_ids.size < split.test_ids.size and not (out / "subj02" / "scratch-ses2-tr30" / "stage1").exists()


def test_the_default_references_are_the_papers_subjects_but_the_new_one():
    job = reconstruct.Job(subject=2, preset="mini", transfer=reconstruct.TransferSpec("align"))
    assert job.transfer.references == (1, 5, 7)
    assert job.folder.parts[-3:] == ("subj02", "align-ses1-from1.5.7", "stage1")
    assert reconstruct.TransferSpec("shared", 4, 375, (1, 5)).tag == "shared-ses4-tr375-from1.5"
    # scratch and full use no reference: none in the folder's name, none given to mdlib.transfer
    job = reconstruct.Job(subject=2, preset="mini", transfer=reconstruct.TransferSpec("scratch", 2, None, (1,)))
    assert job.transfer.references == () and job.folder.parts[-2] == "scratch-ses2"


@pytest.mark.parametrize("extra, message", [
    (["--transfer", "shared", "--decoded", "x.npz"], "--decoded and --transfer both say"),
    (["--sessions", "2"], "go with --transfer"),
    (["--from", "1"], "go with --transfer"),
    (["--transfer", "shared", "--from", "2", "1"], "cannot be its own reference"),
    (["--transfer", "shared", "--sessions", "0"], "--sessions is the number"),
    (["--transfer", "shared", "--last-session", "3"], "--last-session limits"),
])
def test_bad_transfer_options_stop_before_any_work(mini_root, tmp_path, capsys, extra, message):
    assert cli.main(_args(mini_root, tmp_path, "--stage", "1", *extra)) == 1
    assert message in capsys.readouterr().err
    assert not any(Path(tmp_path).iterdir())


def test_too_few_sessions_for_alignment_names_the_fix(mini_root, tmp_path, capsys):
    design = load_design(mini_root)
    pairs = transfer.transfer_split(design, 2, n_trials=1, references=[1]).align_ids.size
    assert pairs < transfer.MIN_IMAGES
    assert cli.main(_args(mini_root, tmp_path, "--stage", "1", "--transfer", "align", "--sessions", "1",
                          "--trials", "1", "--from", "1")) == 1
    assert "give more sessions or trials" in capsys.readouterr().err

"""mdlib.presets: the one place where the mini and real paths differ, read by the method, the paths, the
evaluation and the commands; preparing a data root writes mini-NSD only where no other data are, and a missing
real NSD is named with the command that fetches it."""

import pytest

from mdlib import method, paths, presets


def test_the_two_presets():
    assert presets.NAMES == ("mini", "nsd") == tuple(presets.PRESETS)
    mini, nsd = presets.get("mini"), presets.get("nsd")
    assert (mini.sd_model, mini.clip_model, mini.eval_clip) == ("tiny-trained", "tiny-trained", "tiny-trained")
    assert (nsd.sd_model, nsd.clip_model, nsd.eval_clip) == ("CompVis/stable-diffusion-v1-4", "openai", None)
    assert mini.synthetic and not nsd.synthetic and dict(nsd.method_changes) == {}
    assert presets.get(mini) is mini
    with pytest.raises(ValueError, match="preset must be one of"):
        presets.get("imagenet")
    with pytest.raises(TypeError):
        mini.method_changes["iterations"] = 3          # read-only


def test_everything_reads_its_defaults_from_the_presets(monkeypatch, tmp_path):
    monkeypatch.setenv(paths.ENV_VAR, str(tmp_path))
    for name in presets.NAMES:
        p = presets.get(name)
        assert paths.data_root(None, name) == tmp_path / p.data_dir == p.data_root("")
        config = method.configure("mdlib", name)
        assert (config.sd_model, config.clip_model) == (p.sd_model, p.clip_model)
        changed = {row for row, why in config.changes if why == f"preset {name}"}
        assert changed == set(p.method_changes) - {"lr_scale"} | ({"lr"} if "lr_scale" in p.method_changes else set())
    assert paths.data_root(tmp_path / "x", "nsd") == tmp_path / "x"


def test_prepare_names_a_missing_nsd_and_its_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="mdlib fetch") as err:
        presets.get("nsd").prepare(tmp_path / "empty")
    assert str(tmp_path / "empty") in str(err.value) and "nsd_expdesign.mat" in str(err.value)
    assert presets.get("nsd").truth(tmp_path, 1) is None


def test_prepare_mini_reuses_an_existing_mini_nsd(mini_nsd):
    mini_root = mini_nsd(subjects=(1,), n_shared=6, n_per_subject=24, trials_per_session=18, stim_size=32)
    assert presets.get("mini").prepare(mini_root) == mini_root
    truth = presets.get("mini").truth(mini_root, 1)
    assert truth["brainmask"].ndim == 3


def test_mini_nsd_is_never_written_over_other_data(tmp_path):
    """A fetched NSD root (here: one betas file where NSD keeps them, no mini-NSD sidecar) is left untouched by
    the mini preset and by `mdlib mini`, with an error that says what to do."""
    from mdlib import cli
    from mdlib.nsd import layout

    root = tmp_path / "nsd"
    betas = root / layout.betas_file(1, 1, fmt="hdf5")
    betas.parent.mkdir(parents=True)
    betas.write_bytes(b"real data")
    with pytest.raises(FileExistsError, match="looks like a real NSD") as err:
        presets.get("mini").prepare(root)
    assert "mdlib mini OTHER_FOLDER" in str(err.value)
    assert cli.main(["mini", str(root), "-q"]) == 1
    assert betas.read_bytes() == b"real data" and not (root / "mini_nsd.json").exists()

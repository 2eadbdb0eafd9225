"""mdlib.pipeline: each ablation condition is exactly the stage-1 / stage-2 call it names, on the right rows of
the decoded features, and a rerun reads its images and states back."""

import numpy as np
import pytest
from PIL import Image

from mdlib import method, pipeline, stage1, stage2
from mdlib.decoding import Decoded
from mdlib.sampler import SamplerConfig, image_seed

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHORT = SamplerConfig(num_steps=10, noise_index=6, denoise_steps=5)


@pytest.fixture(scope="module")
def decoded(sd, clip):
    """Decoded features of 3 test images (nsdIds 3, 8, 15), the shapes of the tiny models."""
    rng = np.random.default_rng(0)
    n = 3

    def fam():
        out = {"z": rng.normal(size=(n, *sd.latent_shape)), "c": rng.normal(size=(n, 14, sd.text_width)),
               "clip_embedding": rng.normal(size=(n, clip.embed_dim))}
        out.update({f"clip_block{b}": rng.normal(size=(n, clip.n_tokens, clip.width)) for b in range(1, 7)})
        return {k: v.astype(np.float32) for k, v in out.items()}

    pred, true = fam(), fam()
    cv = {k: rng.random(int(np.prod(v.shape[1:]))) for k, v in pred.items()}
    return Decoded(nsd_ids=np.array([3, 8, 15]), pred=pred, true=true, cv_r2=cv)


def _config(**kw):
    return method.configure("mdlib", "nsd", **SHORT.as_dict(), batch_size=2, **kw)


def _read(folder, ids):
    return np.stack([np.asarray(Image.open(folder / f"{i}.png").convert("RGB")) for i in ids])


@pytest.mark.parametrize("condition", ["true (z, c)", "without control", "without z"])
def test_stage1_conditions_are_stage1_on_the_right_inputs(condition, decoded, sd, clip, tmp_path):
    ids = [15, 3]
    out = pipeline.reconstruct_condition(condition, decoded, sd, clip, ids, _config(), tmp_path / "s1",
                                         tmp_path / "s2", subject=1, progress=False)
    rows = [2, 0]
    src = decoded.true if condition == "true (z, c)" else decoded.pred
    z = None if condition == "without z" else src["z"][rows]
    cfg = SamplerConfig.text_to_image(10) if condition == "without z" else SHORT
    ref = stage1.img2img(sd, z, src["c"][rows], [image_seed(i) for i in ids], config=cfg, progress=False)
    np.testing.assert_array_equal(out.images, ref.images)
    np.testing.assert_array_equal(out.nsd_ids, ids)
    np.testing.assert_array_equal(_read(out.image_dir, ids), out.images)
    assert out.image_dir.parent.name == pipeline.STAGE1_FOLDERS[condition]
    assert np.isnan(out.loss).all() and out.subject == 1


def test_fast_condition_is_the_fast_mode_on_the_decoded_targets(decoded, sd, clip, tmp_path):
    cfg = _config(fast_scale=2.0)
    out = pipeline.reconstruct_condition("fast", decoded, sd, clip, [3, 8, 15], cfg, tmp_path / "s1",
                                         tmp_path / "s2", progress=False)
    targets = stage2.FeatureTargets.from_decoded(decoded)
    seeds = [image_seed(i) for i in (3, 8, 15)]
    parts = [stage2.guide_fast(sd, clip, decoded.pred["z"][p], decoded.pred["c"][p], targets.subset(p), seeds[p],
                               config=cfg.fast, sampler_config=SHORT, progress=False)
             for p in (slice(0, 2), slice(2, 3))]
    np.testing.assert_array_equal(out.images, np.concatenate([p.images for p in parts]))
    np.testing.assert_allclose(out.loss, np.concatenate([p.loss[-1] for p in parts]), rtol=1e-6)
    assert out.cost["unet_passes"] == sum(p.cost["unet_passes"] for p in parts)
    np.testing.assert_array_equal(_read(out.image_dir, [3, 8, 15]), out.images)


def test_full_condition_resumes_from_its_saved_states(decoded, sd, clip, tmp_path, monkeypatch):
    cfg = _config(iterations=2, snapshots=(0, 2))
    args = ("full", decoded, sd, clip, [8, 15], cfg, tmp_path / "s1", tmp_path / "s2")
    first = pipeline.reconstruct_condition(*args, progress=False)
    assert len(list((tmp_path / "s2" / "published").glob("*/stage2_state.npz"))) == 1   # one batch of 2

    def no_sampling(*a, **k):
        raise AssertionError("a finished run must be read back, not recomputed")

    monkeypatch.setattr(stage2, "render_loss", no_sampling)
    again = pipeline.reconstruct_condition(*args, progress=False)
    np.testing.assert_array_equal(again.images, first.images)
    np.testing.assert_array_equal(again.loss, first.loss)


def test_rows_and_common_ids(decoded):
    np.testing.assert_array_equal(pipeline.subject_rows(decoded, [15, 8]), [2, 1])
    with pytest.raises(ValueError, match=r"nsdIds \[4\] are not test images"):
        pipeline.subject_rows(decoded, [3, 4])
    other = Decoded(nsd_ids=np.array([1, 3, 15]), pred={}, true={})
    np.testing.assert_array_equal(pipeline.common_test_ids({1: decoded, 2: other}), [3, 15])
    with pytest.raises(ValueError, match="condition must be one of"):
        pipeline.reconstruct_condition("oracle", decoded, None, None, [3], _config(), "a", "b")


def test_run_folders_are_the_lessons(tmp_path):
    s1, s2 = pipeline.run_folders(method.configure("released", "mini"), 2, tmp_path)
    assert s1 == tmp_path / "stage1" / "mini_released_subj02" and s2 == tmp_path / "stage2" / "mini_released_subj02"
    assert s1.is_dir() and s2.is_dir()

"""mdlib.stage1: img2img from (z, c) with the published sampler; per-image seeds; the resumable run folder."""

import numpy as np
import pytest
import torch

from mdlib import features, models, stage1
from mdlib.sampler import DDIMSampler, SamplerConfig, generators, image_seed

pytestmark = pytest.mark.usefixtures("one_torch_thread")

QUICK = SamplerConfig(num_steps=10, noise_index=7, denoise_steps=7)


def _inputs(sd, n=3, tokens=15, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, *sd.latent_shape, generator=g)
    c_tail = torch.randn(n, tokens - 1, sd.text_width, generator=g)
    return z, c_tail


def test_with_bos_and_unconditional(sd):
    _, c_tail = _inputs(sd)
    cond = stage1.with_bos(sd, c_tail)
    assert cond.shape == (3, 15, sd.text_width)
    torch.testing.assert_close(cond[:, 1:], c_tail)
    torch.testing.assert_close(cond[:, 0], features.bos_embedding(sd).expand(3, -1))
    u = stage1.unconditional(sd, 15)
    torch.testing.assert_close(u, features.prompt_embeddings(sd, [""], n_tokens=15))
    # the empty prompt's BOS row is the constant row too
    torch.testing.assert_close(u[0, 0], features.bos_embedding(sd))


def test_reconstruct_is_sampler_then_vae(sd):
    z, c_tail = _inputs(sd)
    seeds = [image_seed(i) for i in (3, 4, 5)]
    out = stage1.img2img(sd, z, c_tail, seeds, config=QUICK, progress=False)
    s = DDIMSampler(sd.unet, sd.scheduler, QUICK)
    with torch.no_grad():
        lat = s.sample(z, stage1.with_bos(sd, c_tail), stage1.unconditional(sd, 15), generators(seeds))
        img = features.decode_latents(sd, lat).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(out.latents, lat.numpy(), rtol=1e-5, atol=1e-5)
    assert out.images.dtype == np.uint8 and out.images.shape == (3, sd.image_size, sd.image_size, 3)
    assert np.abs(out.images.astype(int) - np.round(img * 255)).max() <= 1
    assert out.computed.all() and list(out.seeds) == seeds and out.config == QUICK


def test_batches_and_published_default(sd):
    z, c_tail = _inputs(sd, n=3, seed=1)
    seeds = [11, 12, 13]
    one = stage1.img2img(sd, z, c_tail, seeds, batch_size=1, progress=False)
    three = stage1.img2img(sd, z, c_tail, seeds, batch_size=3, progress=False)
    assert one.config == SamplerConfig()                     # the published sampler is the default
    np.testing.assert_allclose(one.latents, three.latents, rtol=1e-4, atol=1e-4)
    assert np.abs(one.images.astype(int) - three.images.astype(int)).max() <= 1
    without_z = stage1.img2img(sd, None, c_tail, seeds, batch_size=3, progress=False)
    assert without_z.config == SamplerConfig.text_to_image()
    assert not np.allclose(without_z.latents, three.latents)


def test_run_folder_resumes_and_refuses_other_settings(sd, tmp_path):
    z, c_tail = _inputs(sd, n=4, seed=2)
    names = ["100", "101", "102", "103"]
    first = stage1.img2img(sd, z, c_tail, range(4), config=QUICK, out_dir=tmp_path, names=names, progress=False)
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [f"{n}.png" for n in names]
    again = stage1.img2img(sd, z, c_tail, range(4), config=QUICK, out_dir=tmp_path, names=names, progress=False)
    assert not again.computed.any()
    np.testing.assert_array_equal(again.images, first.images)
    np.testing.assert_array_equal(again.latents, first.latents)
    # a changed input and a truncated file are recomputed; the rest is read back
    c2 = c_tail.clone()
    c2[1] += 1.0
    (tmp_path / "102.png").write_bytes((tmp_path / "102.png").read_bytes()[:20])
    third = stage1.img2img(sd, z, c2, range(4), config=QUICK, out_dir=tmp_path, names=names, progress=False)
    assert third.computed.tolist() == [False, True, True, False]
    np.testing.assert_array_equal(third.images[2], first.images[2])
    assert not np.array_equal(third.latents[1], first.latents[1])
    with pytest.raises(ValueError, match=str(tmp_path.name) + ".*config differ"):
        stage1.img2img(sd, z, c_tail, range(4), out_dir=tmp_path, names=names, progress=False)


def test_errors(sd):
    z, c_tail = _inputs(sd)
    with pytest.raises(ValueError, match="3 embeddings"):
        stage1.img2img(sd, z[:2], c_tail, range(3), progress=False)
    with pytest.raises(ValueError, match="z must be"):
        stage1.img2img(sd, torch.zeros(3, 4, 8, 8), c_tail, range(3), progress=False)
    with pytest.raises(ValueError, match="seeds"):
        stage1.img2img(sd, z, c_tail, range(2), progress=False)
    with pytest.raises(ValueError, match="c must be"):
        stage1.img2img(sd, z, c_tail[..., :5], range(3), progress=False)


def test_run_tag_tells_settings_and_models_apart(sd, tiny_dir):
    tag = stage1.run_tag(sd, SamplerConfig())
    assert tag.startswith("ddim50_i37_s35_g5_eta0_unet")
    assert stage1.run_tag(sd, SamplerConfig(guidance_scale=7.5)) != tag
    assert stage1.run_tag(sd, SamplerConfig.text_to_image()) != tag
    other = models.load_sd(tiny_dir, device="cpu")
    with torch.no_grad():
        next(other.unet.parameters()).add_(1.0)
    other._fingerprints.clear()
    assert stage1.run_tag(other, SamplerConfig()) != tag

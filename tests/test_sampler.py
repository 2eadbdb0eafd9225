"""mdlib.sampler: the published DDIM schedule, and equality with diffusers' pipelines wherever they do the same
thing (img2img at a strength; text-to-image from noise), on the tiny models."""

import numpy as np
import pytest
import torch

from mdlib import models
from mdlib.sampler import PUBLISHED, DDIMSampler, SamplerConfig, counting, generators, image_seed

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sd64(tiny_dir):
    return models.load_sd(tiny_dir, device="cpu", dtype=torch.float64)


def _embeddings(sd, n, tokens=15, seed=0):
    g = torch.Generator().manual_seed(seed)
    cond = torch.randn(n, tokens, sd.text_width, generator=g, dtype=sd.dtype)
    uncond = torch.randn(1, tokens, sd.text_width, generator=g, dtype=sd.dtype).expand(n, -1, -1)
    return cond, uncond


# ------------------------------------------------------------------------------------------ the schedule

def test_published_schedule_is_methods(sd):
    s = DDIMSampler(sd.unet, sd.scheduler)
    assert s.config.as_dict() == PUBLISHED
    assert s.timesteps == list(range(1, 1000, 20))              # CompVis: [1, 21, ..., 981]
    assert s.noise_timestep == 741                               # stochastic_encode(z, 37)
    assert s.denoise_timesteps == list(range(681, 0, -20))       # decode(.., 35): 681 ... 1
    assert len(s.denoise_timesteps) == 35
    # the final step's "previous" alpha is alphas_cumprod[0] (set_alpha_to_one false in SD v1-4's config)
    assert s.previous_timestep(1) == -1 and s.alpha(-1) == pytest.approx(float(sd.scheduler.alphas_cumprod[0]))
    # diffusers' descending timesteps: 741 at position 12, 681 at 15 (docs/method.md)
    sched = type(sd.scheduler).from_config(sd.scheduler.config)
    sched.set_timesteps(50)
    desc = sched.timesteps.tolist()
    assert desc.index(741) == 12 and desc.index(681) == 15
    # the scaled-linear betas of SD v1-4 (0.00085 ... 0.012)
    betas = (torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2)
    np.testing.assert_allclose(s.alphas_cumprod.numpy(), torch.cumprod(1 - betas, 0).numpy(), rtol=1e-6)


def test_strength_mapping():
    pub = SamplerConfig()
    assert pub.diffusers_strength() is None                      # 741 vs 681: no pipeline does that
    seventy = SamplerConfig.from_strength(0.70)
    assert (seventy.noise_index, seventy.denoise_steps) == (34, 35)
    assert seventy.diffusers_strength() == pytest.approx(0.70)
    # the published noise level (index 37 -> t 741) is where strength 0.76 noises: int(50 x 0.76) = 38 steps
    assert SamplerConfig.from_strength(0.76).noise_index == 37
    full = SamplerConfig.text_to_image()
    assert (full.noise_index, full.denoise_steps) == (49, 50) and full.diffusers_strength() == 1.0
    assert pub.unet_evaluations(3) == 3 * 35 * 2
    assert SamplerConfig(guidance_scale=1.0).unet_evaluations() == 35
    for bad in ({"noise_index": 50}, {"denoise_steps": 0}, {"eta": -1.0}, {"num_steps": 0}):
        with pytest.raises(ValueError):
            SamplerConfig(**bad)
    with pytest.raises(ValueError, match="no step"):
        SamplerConfig.from_strength(0.01)


def test_step_is_ddim_formula_float64(sd64):
    """One step against the DDIM update written out independently (eq. 12 of Song et al.), eta 0 and 0.5."""
    for eta in (0.0, 0.5):
        s = DDIMSampler(sd64.unet, sd64.scheduler, SamplerConfig(eta=eta))
        g = torch.Generator().manual_seed(1)
        x, eps, noise = (torch.randn(2, 4, 16, 16, generator=g, dtype=torch.float64) for _ in range(3))
        a = s.alphas_cumprod
        at, ap = float(a[681]), float(a[661])
        x0 = (x - np.sqrt(1 - at) * eps) / np.sqrt(at)
        var = (1 - ap) / (1 - at) * (1 - at / ap)
        want = np.sqrt(ap) * x0 + np.sqrt(1 - ap - eta ** 2 * var) * eps + eta * np.sqrt(var) * noise
        torch.testing.assert_close(s.step(x, eps, 681, noise), want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(s.predict_x0(x, eps, 681), x0, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- equality with diffusers

def _img2img_pipeline(sd):
    from diffusers import StableDiffusionImg2ImgPipeline

    return StableDiffusionImg2ImgPipeline(vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer,
                                          unet=sd.unet, scheduler=type(sd.scheduler).from_config(sd.scheduler.config),
                                          safety_checker=None, feature_extractor=None, requires_safety_checker=False)


@pytest.mark.parametrize("strength,eta,guidance", [(0.70, 0.0, 5.0), (0.5, 0.0, 1.0), (0.9, 0.5, 3.0)])
def test_equals_diffusers_img2img(sd, strength, eta, guidance):
    n = 3
    z = torch.randn(n, *sd.latent_shape, generator=torch.Generator().manual_seed(5))
    cond, uncond = _embeddings(sd, n)
    seeds = [image_seed(i) for i in (10, 11, 12)]
    pipe = _img2img_pipeline(sd)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(image=z, prompt_embeds=cond, negative_prompt_embeds=uncond if guidance > 1 else None,
               strength=strength, num_inference_steps=50, guidance_scale=guidance, eta=eta,
               generator=generators(seeds), output_type="latent").images
    s = DDIMSampler(sd.unet, sd.scheduler, SamplerConfig.from_strength(strength, eta=eta, guidance_scale=guidance))
    with torch.no_grad(), counting(s) as count:
        ours = s.sample(z, cond, uncond if guidance != 1.0 else None, generators(seeds))
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    assert count["unet"] == s.config.unet_evaluations(n)


def test_equals_diffusers_text_to_image(sd):
    from diffusers import StableDiffusionPipeline

    n = 2
    cond, uncond = _embeddings(sd, n, tokens=77, seed=3)
    seeds = [image_seed(i, seed=4) for i in range(n)]
    pipe = StableDiffusionPipeline(vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer, unet=sd.unet,
                                   scheduler=type(sd.scheduler).from_config(sd.scheduler.config),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=50, guidance_scale=5.0,
               height=sd.image_size, width=sd.image_size, generator=generators(seeds), output_type="latent").images
    s = DDIMSampler(sd.unet, sd.scheduler, SamplerConfig.text_to_image())
    with torch.no_grad():
        ours = s.sample(None, cond, uncond, generators(seeds))
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_published_differs_from_strength_070_only_by_noise_level(sd64):
    """Same 35 steps; only the starting noise level differs (741 vs 681): with that level swapped in by hand,
    the published sampler is the strength-0.70 one."""
    z = torch.randn(2, *sd64.latent_shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    cond, uncond = _embeddings(sd64, 2)
    pub = DDIMSampler(sd64.unet, sd64.scheduler)
    ref = DDIMSampler(sd64.unet, sd64.scheduler, SamplerConfig.from_strength(0.70))
    assert pub.denoise_timesteps == ref.denoise_timesteps
    with torch.no_grad():
        a = pub.sample(z, cond, uncond, generators([1, 2]))
        b = ref.sample(z, cond, uncond, generators([1, 2]))
        assert not torch.allclose(a, b)
        ref.add_noise = pub.add_noise                      # noise to 741 instead of 681
        torch.testing.assert_close(ref.sample(z, cond, uncond, generators([1, 2])), a, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------ seeds, batches, errors

def test_per_image_seeds_make_results_batch_independent(sd64):
    z = torch.randn(3, *sd64.latent_shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cond, uncond = _embeddings(sd64, 3)
    seeds = [image_seed(i) for i in (7, 8, 9)]
    s = DDIMSampler(sd64.unet, sd64.scheduler, SamplerConfig(num_steps=10, noise_index=7, denoise_steps=7, eta=0.3))
    with torch.no_grad():
        together = s.sample(z, cond, uncond, generators(seeds))
        alone = torch.cat([s.sample(z[k:k + 1], cond[k:k + 1], uncond[:1], generators(seeds[k:k + 1]))
                           for k in range(3)])
        again = s.sample(z, cond, uncond, generators(seeds))
        other = s.sample(z, cond, uncond, generators([image_seed(i, seed=1) for i in (7, 8, 9)]))
    torch.testing.assert_close(together, alone, rtol=1e-10, atol=1e-10)
    assert torch.equal(together, again)
    assert not torch.allclose(together, other)
    assert image_seed(7) != image_seed(8) and image_seed(7) != image_seed(7, seed=1)


def test_checkpointing_keeps_gradients(sd64):
    """Stage 2 differentiates the sampler; checkpointed steps give the same gradient (float64)."""
    z = torch.randn(1, *sd64.latent_shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cond, uncond = _embeddings(sd64, 1)
    s = DDIMSampler(sd64.unet, sd64.scheduler, SamplerConfig(num_steps=10, noise_index=5, denoise_steps=4))
    grads = []
    for ckpt in (False, True):
        zz = z.clone().requires_grad_(True)
        out = s.sample(zz, cond, uncond, generators([3]), checkpoint=ckpt)
        (out ** 2).mean().backward()
        grads.append(zz.grad)
    assert torch.isfinite(grads[0]).all() and grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-10, atol=1e-12)


def test_errors_are_clear(sd):
    s = DDIMSampler(sd.unet, sd.scheduler)
    cond, uncond = _embeddings(sd, 2)
    with pytest.raises(ValueError, match="generators"):
        s.sample(None, cond, uncond, generators([1]))
    with pytest.raises(ValueError, match="do not fit this UNet"):
        s.sample(torch.zeros(2, 4, 8, 8), cond, uncond, generators([1, 2]))
    with pytest.raises(ValueError, match="empty prompt"):
        s.sample(None, cond, uncond[:, :5], generators([1, 2]))
    with pytest.raises(ValueError, match="unconditional"):
        s.sample(None, cond, None, generators([1, 2]))


def test_callback_sees_each_step_and_the_clean_estimate(sd64):
    z = torch.randn(1, *sd64.latent_shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cond, uncond = _embeddings(sd64, 1)
    s = DDIMSampler(sd64.unet, sd64.scheduler, SamplerConfig(num_steps=10, noise_index=6, denoise_steps=5))
    seen = []

    def spy(i, t, x, x0):
        seen.append((i, t, x.clone(), x0.clone()))

    with torch.no_grad():
        out = s.sample(z, cond, uncond, generators([1]), callback=spy)
        x = s.add_noise(z, torch.randn((1, *sd64.latent_shape), generator=torch.Generator().manual_seed(1),
                                       dtype=torch.float64))
        for i, t in enumerate(s.denoise_timesteps):
            eps = s.eps(x, t, cond, uncond)
            torch.testing.assert_close(seen[i][3], s.predict_x0(x, eps, t))
            x = s.step(x, eps, t)
            assert seen[i][:2] == (i, t)
            torch.testing.assert_close(seen[i][2], x)
    torch.testing.assert_close(out, x)


def test_full_size_sd_v1_4_shapes_on_meta_device(sd):
    """The real path's shapes: SD v1-4's UNet (built from its published config, no weights) through the
    sampler with 4 x 64 x 64 latents and 15-token, 768-wide embeddings."""
    unet = models.sd_v1_4_architecture("meta", parts=("unet",))["unet"]
    s = DDIMSampler(unet, sd.scheduler, SamplerConfig(num_steps=50, noise_index=37, denoise_steps=2))
    z = torch.empty(2, 4, 64, 64, device="meta")
    cond = torch.empty(2, 15, 768, device="meta")
    uncond = torch.empty(1, 15, 768, device="meta")
    with torch.no_grad():
        out = s.sample(z, cond, uncond, generators([1, 2]))
    assert out.shape == (2, 4, 64, 64) and out.device.type == "meta"
    assert s.unet_calls == 2 * 2 * 2

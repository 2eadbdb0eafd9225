"""The DDIM sampler of MindDiffuser's stages 1 and 2: our own loop, differentiable end to end (lesson 04).

Stage 2 backpropagates through every denoising step, so the loop is written here in plain torch on
diffusers' UNet and DDIM schedule, instead of calling a pipeline (pipelines run under ``no_grad``).

The published sampler (docs/method.md, CompVis' ``DDIMSampler`` in the released code):

- 50 DDIM steps, eta 0. CompVis' DDIM timesteps, ascending: ``[1, 21, ..., 981]``; diffusers' DDIMScheduler
  with SD v1-4's config (``steps_offset`` 1, "leading" spacing) has the same ones, descending.
- ``stochastic_encode(z, 37)``: the decoded z is noised to the level of ``timesteps[37]`` = 741:
  ``x = sqrt(a_741) z + sqrt(1 - a_741) noise`` (``a`` = ``alphas_cumprod``).
- ``decode(x, c, 35)``: 35 steps over ``timesteps[:35]`` reversed: 681, 661, ..., 1. The first step starts
  one noise level *below* the one z was noised to (681 < 741); the published results include that mismatch.
- Classifier-free guidance 5.0 against the empty prompt's embedding: ``eps = eps_u + 5 (eps_c - eps_u)``.

**Strength.** diffusers' img2img with ``strength`` s runs ``k = int(50 s)`` steps and noises z to the level
of the first one (no mismatch): in our terms ``noise_index = k - 1, denoise_steps = k``
(:meth:`SamplerConfig.from_strength`). diffusers' strength 0.70 (k = 35) is the published run without the
mismatch: same 35 steps from 681, but z noised to 681 instead of 741. The published noise level 741 is where
diffusers' strength 0.76 would noise (k = 38): the paper's "strength about 0.70-0.74" is 35/50 steps and
741/1000 of the noise schedule. :meth:`SamplerConfig.diffusers_strength` says which configurations a
diffusers pipeline can reproduce; ``tests/test_sampler.py`` checks equality with
``StableDiffusionImg2ImgPipeline`` (and, for ``z=None``, ``StableDiffusionPipeline``) on those.

**Noise.** Each image has its own ``torch.Generator`` seeded from (seed, nsdId) (:func:`image_seed`), drawn
on the CPU, so an image's result does not depend on its batch or the device: first the starting noise, then
(eta > 0 only) one draw per step, in the order diffusers' pipelines draw them.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint as _checkpoint

from mdlib.progress import bar as progress_bar

#: The published sampler (docs/method.md): 50 DDIM steps, z noised to index 37, 35 steps, guidance 5.0, eta 0.
PUBLISHED = {"num_steps": 50, "noise_index": 37, "denoise_steps": 35, "guidance_scale": 5.0, "eta": 0.0}


@dataclass(frozen=True)
class SamplerConfig:
    """The sampler's parameters; the defaults are the published ones (docs/method.md, lesson 04).

    Attributes:
        num_steps: DDIM steps of the full schedule (50).
        noise_index: index into the ascending DDIM timesteps whose noise level z is noised to (37 -> t 741).
        denoise_steps: DDIM steps run, from ``timesteps[denoise_steps - 1]`` down to ``timesteps[0]``
            (35 -> 681 ... 1).
        guidance_scale: classifier-free guidance weight (5.0); 1.0 runs the conditional branch only.
        eta: DDIM stochasticity (0: deterministic, as published).
    """

    num_steps: int = PUBLISHED["num_steps"]
    noise_index: int = PUBLISHED["noise_index"]
    denoise_steps: int = PUBLISHED["denoise_steps"]
    guidance_scale: float = PUBLISHED["guidance_scale"]
    eta: float = PUBLISHED["eta"]

    def __post_init__(self) -> None:
        if int(self.num_steps) != self.num_steps or self.num_steps < 1:
            raise ValueError(f"num_steps must be a positive int, got {self.num_steps!r}")
        if not 0 <= self.noise_index < self.num_steps:
            raise ValueError(f"noise_index must be in 0..{self.num_steps - 1}, got {self.noise_index}")
        if not 1 <= self.denoise_steps <= self.num_steps:
            raise ValueError(f"denoise_steps must be in 1..{self.num_steps}, got {self.denoise_steps}")
        if not (math.isfinite(self.eta) and self.eta >= 0):
            raise ValueError(f"eta must be a finite number >= 0, got {self.eta}")
        if not math.isfinite(self.guidance_scale):
            raise ValueError(f"guidance_scale must be a finite number, got {self.guidance_scale}")

    @classmethod
    def from_strength(cls, strength: float, num_steps: int = 50, **kw) -> SamplerConfig:
        """What diffusers' img2img runs for ``strength``: ``k = int(num_steps x strength)`` steps, z noised
        to the first one's level (``noise_index = k - 1``)."""
        k = min(int(num_steps * strength), num_steps)
        if k < 1:
            raise ValueError(f"strength {strength} runs no step with num_steps={num_steps}")
        return cls(num_steps=num_steps, noise_index=k - 1, denoise_steps=k, **kw)

    @classmethod
    def text_to_image(cls, num_steps: int = 50, **kw) -> SamplerConfig:
        """Sampling from pure noise over the whole schedule (the paper's "without z" ablation)."""
        return cls(num_steps=num_steps, noise_index=num_steps - 1, denoise_steps=num_steps, **kw)

    def diffusers_strength(self) -> float | None:
        """The img2img ``strength`` at which diffusers does exactly this, or None (e.g. the published 37/35)."""
        if self.noise_index != self.denoise_steps - 1:
            return None
        return self.denoise_steps / self.num_steps

    def unet_evaluations(self, n_images: int = 1) -> int:
        """UNet passes (per image, counting each guidance branch): steps x (2 with guidance, else 1)."""
        return n_images * self.denoise_steps * (1 if self.guidance_scale == 1.0 else 2)

    def as_dict(self) -> dict:
        return asdict(self)


def image_seed(nsd_id: int, seed: int = 0) -> int:
    """The sampler's noise seed of one image: a function of (seed, nsdId), different from the VAE posterior
    seed (:func:`mdlib.features.latent_seed`) of the same image."""
    return int(np.random.SeedSequence([int(seed), int(nsd_id), 2]).generate_state(1)[0])


def generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU ``torch.Generator`` per image."""
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def draw_noise(gens: Sequence[torch.Generator], shape: Sequence[int], device: torch.device | str,
               dtype: torch.dtype) -> torch.Tensor:
    """(n, *shape) standard normal noise, image i from ``gens[i]`` (as diffusers' ``randn_tensor`` with a list
    of generators draws it: on the CPU, in the latents' dtype, then moved)."""
    return torch.cat([torch.randn((1, *shape), generator=g, dtype=dtype) for g in gens]).to(device)


class DDIMSampler:
    """DDIM on a diffusers UNet with a diffusers DDIM schedule; every step differentiable (lessons 04-05).

    Args:
        unet: diffusers ``UNet2DConditionModel`` (``SDModels.unet``).
        scheduler: a diffusers ``DDIMScheduler`` (``SDModels.scheduler``): only its config is read.
        config: :class:`SamplerConfig` (default: the published sampler).
    """

    def __init__(self, unet, scheduler, config: SamplerConfig | None = None) -> None:
        from diffusers import DDIMScheduler

        self.unet = unet
        self.config = config or SamplerConfig()
        sched = DDIMScheduler.from_config(scheduler.config)
        sched.set_timesteps(self.config.num_steps)
        #: DDIM timesteps, ascending as CompVis writes them ([1, 21, ..., 981] for SD v1-4 and 50 steps).
        self.timesteps = [int(t) for t in sched.timesteps.flip(0)]
        self.alphas_cumprod = sched.alphas_cumprod.double().cpu()
        # After the last step (t = 1 for SD) the "previous" alpha is alphas_cumprod[0] (set_alpha_to_one
        # False in SD's config; CompVis' ddim_alphas_prev[0] too) or 1.
        self.final_alpha = 1.0 if sched.config.set_alpha_to_one else float(self.alphas_cumprod[0])
        #: UNet forward passes made so far (each guidance branch counts); reset it at will.
        self.unet_calls = 0

    # -------------------------------------------------------------------------------- the schedule
    @property
    def noise_timestep(self) -> int:
        """The timestep whose noise level z gets (741 for the published sampler)."""
        return self.timesteps[self.config.noise_index]

    @property
    def denoise_timesteps(self) -> list[int]:
        """Timesteps denoised, in order (681, 661, ..., 1 for the published sampler)."""
        return self.timesteps[:self.config.denoise_steps][::-1]

    def alpha(self, t: int) -> float:
        """``alphas_cumprod[t]``, or the final alpha for t < 0."""
        return float(self.alphas_cumprod[t]) if t >= 0 else self.final_alpha

    def previous_timestep(self, t: int) -> int:
        """The timestep after t in the reverse process (-1 after the first)."""
        k = self.timesteps.index(t)
        return self.timesteps[k - 1] if k > 0 else -1

    # ------------------------------------------------------------------------------------ the steps
    def add_noise(self, z: torch.Tensor, noise: torch.Tensor, t: int | None = None) -> torch.Tensor:
        """Forward diffusion of clean latents to timestep t (default :attr:`noise_timestep`):
        ``sqrt(a_t) z + sqrt(1 - a_t) noise`` (CompVis ``stochastic_encode``; diffusers ``add_noise``)."""
        a = self.alpha(self.noise_timestep if t is None else t)
        return a ** 0.5 * z + (1 - a) ** 0.5 * noise

    def eps(self, x: torch.Tensor, t: int, cond: torch.Tensor, uncond: torch.Tensor | None) -> torch.Tensor:
        """Guided noise prediction at timestep t: ``eps_u + g (eps_c - eps_u)``; both branches in one UNet
        batch ``[uncond, cond]`` as diffusers and CompVis run them. x (n, 4, h, w); cond (n, tokens, width);
        uncond (n or 1, tokens, width)."""
        g = self.config.guidance_scale
        timestep = torch.tensor(t, device=x.device)
        if g == 1.0 or uncond is None:
            if g != 1.0:
                raise ValueError("guidance_scale != 1 needs the unconditional embedding")
            self.unet_calls += len(x)
            return self.unet(x, timestep, encoder_hidden_states=cond.to(x.dtype)).sample
        uncond = uncond.expand(len(x), -1, -1)
        # Counted before the pass: a checkpointed step's recomputation stops early, as soon as the tensors the
        # backward pass needs exist again, and would never reach a line after the UNet call.
        self.unet_calls += 2 * len(x)
        both = self.unet(torch.cat([x, x]), timestep,
                         encoder_hidden_states=torch.cat([uncond, cond]).to(x.dtype)).sample
        eps_u, eps_c = both.chunk(2)
        return eps_u + g * (eps_c - eps_u)

    def step(self, x: torch.Tensor, eps: torch.Tensor, t: int, noise: torch.Tensor | None = None) -> torch.Tensor:
        """One DDIM update from t to the previous timestep (Song et al. 2021, eq. 12; diffusers ``step``):
        ``x0 = (x - sqrt(1 - a_t) eps) / sqrt(a_t)``; ``x' = sqrt(a') x0 + sqrt(1 - a' - s^2) eps + s noise``
        with ``s = eta sqrt((1 - a') / (1 - a_t)) sqrt(1 - a_t / a')``."""
        a_t, a_prev = self.alpha(t), self.alpha(self.previous_timestep(t))
        x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5
        sigma = self.config.eta * ((1 - a_prev) / (1 - a_t)) ** 0.5 * (1 - a_t / a_prev) ** 0.5
        out = a_prev ** 0.5 * x0 + (1 - a_prev - sigma ** 2) ** 0.5 * eps
        if sigma > 0:
            if noise is None:
                raise ValueError("eta > 0 needs noise for every step")
            out = out + sigma * noise
        return out

    def predict_x0(self, x: torch.Tensor, eps: torch.Tensor, t: int) -> torch.Tensor:
        """The model's estimate of the clean latent at timestep t (used by stage 2's fast mode)."""
        a_t = self.alpha(t)
        return (x - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5

    # ------------------------------------------------------------------------------------- sampling
    def sample(self, z: torch.Tensor | None, cond: torch.Tensor, uncond: torch.Tensor | None,
               gens: Sequence[torch.Generator], checkpoint: bool = False,
               callback: Callable[[int, int, torch.Tensor, torch.Tensor], None] | None = None,
               progress: bool = False) -> torch.Tensor:
        """Clean latents from (z, c): noise z to :attr:`noise_timestep`, then run the DDIM steps.

        Args:
            z: (n, 4, h, w) scaled clean latents (decoded from fMRI), or None to start from pure noise
                (the "without z" ablation; use :meth:`SamplerConfig.text_to_image`).
            cond: (n, tokens, width) text embeddings c (BOS row included).
            uncond: (n or 1, tokens, width) unconditional embedding (the empty prompt's), or None when
                ``guidance_scale`` is 1.
            gens: one ``torch.Generator`` per image (:func:`generators`); the starting noise, then the
                per-step noise (eta > 0), are drawn from them.
            checkpoint: recompute each step's activations in the backward pass instead of storing them
                (stage 2: memory stays flat in the number of steps). Gradients are unchanged.
            callback: called as ``callback(i, t, x, x0)`` after step i at timestep t: x the latents at the next
                (lower) level, x0 the model's estimate of the clean latent at t (:meth:`predict_x0`).
            progress: a tqdm bar over the steps.
        Returns (n, 4, h, w) latents in the UNet's dtype, with autograd graph if grad mode is on.
        """
        n = len(cond)
        if len(gens) != n:
            raise ValueError(f"got {len(gens)} generators for {n} images")
        p = next(self.unet.parameters())
        device, dtype = p.device, p.dtype
        shape = (int(self.unet.config.in_channels), int(self.unet.config.sample_size),
                 int(self.unet.config.sample_size))
        if z is not None and tuple(z.shape) != (n, *shape):
            if tuple(z.shape[1:]) == shape:
                raise ValueError(f"got {len(z)} latents for {n} text embeddings")
            raise ValueError(f"latents of shape {tuple(z.shape[1:])} do not fit this UNet, which expects {shape}")
        noise = draw_noise(gens, shape, device, dtype)
        if z is None:
            x = noise  # pure noise: diffusers' init_noise_sigma is 1 for DDIM
        else:
            x = self.add_noise(z.to(device=device, dtype=dtype), noise)
        cond = cond.to(device=device, dtype=dtype)
        if uncond is not None:
            uncond = uncond.to(device=device, dtype=dtype).expand(n, -1, -1)
            if uncond.shape[1:] != cond.shape[1:]:
                raise ValueError(f"unconditional embedding {tuple(uncond.shape[1:])} and c {tuple(cond.shape[1:])} "
                                 f"differ: embed the empty prompt with c's token count")
        steps = self.denoise_timesteps
        bar = progress_bar(total=len(steps), desc="DDIM", leave=False, progress=progress)
        for i, t in enumerate(steps):
            step_noise = None
            if self.config.eta > 0:
                step_noise = draw_noise(gens, shape, device, dtype)
            if checkpoint and torch.is_grad_enabled():
                x, x0 = _checkpoint(self._one_step, x, cond, uncond, step_noise, t, use_reentrant=False)
            else:
                x, x0 = self._one_step(x, cond, uncond, step_noise, t)
            if callback is not None:
                callback(i, t, x, x0)
            bar.update()
        bar.close()
        return x

    def _one_step(self, x, cond, uncond, step_noise, t):
        eps = self.eps(x, t, cond, uncond)
        return self.step(x, eps, t, step_noise), self.predict_x0(x, eps, t)


@contextlib.contextmanager
def counting(sampler: DDIMSampler):
    """Count the UNet passes of a block: ``with counting(s) as c: ...; c["unet"]``."""
    start = sampler.unet_calls
    box = {"unet": 0}
    try:
        yield box
    finally:
        box["unet"] = sampler.unet_calls - start

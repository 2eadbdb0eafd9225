"""Training the tiny models on mini-NSD's scenes, so that the mini path reconstructs (``mdlib train-mini``).

The tiny models of :mod:`mdlib.models` have the real models' classes and seeded random weights. This module
trains every one of them on procedural scenes and captions drawn from the same distribution as mini-NSD's
stimuli (:mod:`mdlib.synth.scenes`; a seed stream of their own, so the mini-NSD stimuli themselves are not
in the training set), in the order Stable Diffusion's parts depend on each other:

1. **VAE** (``AutoencoderKL``): images (64 px, [-1, 1]) -> 4 x 16 x 16 latents -> images; loss = mean squared
   error + ``kl_weight`` x KL (SD's VAE: a small KL term keeps the latent space smooth). Afterwards its
   ``scaling_factor`` is set to 1 / (standard deviation of the training latents), as SD v1 did (0.18215),
   so the diffusion model sees latents of unit variance.
2. **CLIP pair and SD's text encoder** (open_clip ``CLIP``: the ViT whose blocks give stage 2's structural
   features, and a text tower; ``CLIPTextModel``): the symmetric contrastive (InfoNCE) loss of CLIP on
   (scene, one of its captions) pairs, twice: the ViT against CLIP's own text tower, and the ViT against SD's
   text encoder (its pooled EOS state through a linear head that is then discarded; captions cut to
   ``n_tokens`` as the UNet will see them). SD v1 used OpenAI's CLIP text encoder, trained contrastively on
   image-caption pairs, frozen; this gives the tiny one the same origin.
3. **UNet** (``UNet2DConditionModel``): the diffusion loss of SD (noise prediction, MSE, optionally weighted
   towards the noisy timesteps where the caption decides the layout: :func:`diffusion_loss`) on the VAE's
   latents at timesteps of SD v1-4's schedule, conditioned on the frozen text encoder's token states of a
   caption (``n_tokens`` tokens, as the lessons use); the caption is replaced by the empty prompt with
   probability ``uncond_prob`` so that classifier-free guidance works. The trained UNet has the tiny build's
   config except for its attention heads and an optional pooled-caption path (:func:`trained_unet_config`).
   (Training the text encoder along with the UNet from scratch does not work: it learns to give every caption
   the same states, and the UNet ignores them: docs/mini_world.md, "The training recipe".)

Every stage saves a checkpoint every ``save_every`` steps (weights and AdamW state as safetensors, step and
losses as JSON, written atomically) and resumes from it: an interrupted run loses at most that many steps.
The result is a model folder in :func:`mdlib.models.build_tiny_models`' layout that ``load_sd`` and
``load_clip_vision`` read like any other.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mdlib import models
from mdlib.progress import bar as progress_bar
from mdlib.record import write_json_atomic

STAGES = ("vae", "clip", "unet")


@dataclass(frozen=True)
class TrainMiniConfig:
    """The training recipe (defaults: the shipped weights' recipe, under an hour on 2 CPU cores).

    Attributes:
        seed: seeds the scenes, the initial weights (:func:`mdlib.models.make_tiny_components`) and the batches.
        n_scenes, n_heldout: training scenes and held-out scenes (quality measures), rendered once.
        *_steps, *_batch, *_lr: per stage. kl_weight: the VAE's KL term. uncond_prob: caption dropout.
        x0_weight_cap: the noise-prediction loss at timestep t is weighted by clamp(1 / SNR(t), 1, cap): the
            truncated-SNR weighting (Salimans & Ho 2022, capped). 1 = SD's plain loss. At high noise the plain
            loss is tiny (predicting the noise from a nearly pure-noise input is easy), yet that is where the
            caption decides what is drawn; the weight lets those steps drive the learning.
        high_t_prob: probability that a timestep is drawn from the noisier half of the schedule (else uniform).
        n_tokens: caption tokens the UNet is conditioned on (the lessons' N_TOKENS, 15 as released).
        unet_channels: the trained UNet's ``block_out_channels``, one per resolution (16x16 and 8x8 latents
            at 64 px): the tiny build's (32, 64) by default; a multiple of 32 each (its group norm's groups).
        unet_heads: attention heads of the trained UNet's attention layers (the tiny build's 8 heads are 4 wide
            at 32 channels, which learned captions slowly and ran slowly on a CPU; 2 heads are 16 and 32 wide).
        unet_pooled_text: also add the caption's attention-pooled embedding to the UNet's timestep embedding
            (diffusers' ``addition_embed_type="text"``), as Imagen does: a global path for what the caption
            says about the whole image (background, colours). SD v1-4 conditions by cross-attention only; the
            cross-attention is still there and still what the lessons' c feeds.
        unet_ema: decay of an exponential moving average of the UNet's weights, which is what is saved (0: the
            last weights). The average is over the last ~1 / (1 - decay) steps, with the usual warm-up of the
            decay, min(decay, (1 + n) / (10 + n)) after n updates, so early weights fade fast. Diffusion models
            are sampled from such an average (DDPM, SD) because the last weights carry the noise of the last
            batches; at this short training it matters more.
        save_every: steps between checkpoints.
        layout_share, layout_kinds: the share of training scenes given a large-scale layout and its kinds
            (:func:`mdlib.synth.scenes.random_scene`'s options; docs/mini_world.md, "Scene layouts"). 0, the
            default, draws the very scenes drawn before layouts existed; the held-out scenes of :func:`quality`
            follow the trained folder's settings. The record (and a resumed run's work folder) keeps them.
    """

    seed: int = 0
    image_size: int = models.TINY_IMAGE_SIZE
    n_scenes: int = 8000
    n_heldout: int = 512
    vae_steps: int = 1400
    vae_batch: int = 16
    vae_lr: float = 2e-3
    kl_weight: float = 1e-6
    clip_steps: int = 800
    clip_batch: int = 128
    clip_lr: float = 1e-3
    unet_steps: int = 3600
    unet_batch: int = 32
    unet_lr: float = 1e-3
    uncond_prob: float = 0.1
    x0_weight_cap: float = 20.0
    high_t_prob: float = 0.0
    n_tokens: int = 15
    unet_channels: tuple[int, ...] = (32, 64)
    unet_heads: int = 2
    unet_pooled_text: bool = True
    unet_ema: float = 0.999
    save_every: int = 250
    layout_share: float = 0.0
    layout_kinds: tuple[str, ...] = ("horizon", "wall")   # mdlib.synth.scenes.LAYOUT_KINDS (imported lazily)

    def __post_init__(self):
        from mdlib.synth.scenes import check_layout_options

        share, kinds = check_layout_options(self.layout_share, self.layout_kinds)
        object.__setattr__(self, "layout_share", share)   # frozen: normalised once, here
        object.__setattr__(self, "layout_kinds", kinds)


def scene_settings(config: TrainMiniConfig) -> dict[str, Any]:
    """The recipe's layout options as the record keeps them: ``{}`` for scenes without layouts (share 0, the
    default, so the default recipe's record is the one written before layouts existed), else ``layout_share``
    and ``layout_kinds`` (a list)."""
    if config.layout_share == 0:
        return {}
    return {"layout_share": float(config.layout_share), "layout_kinds": list(config.layout_kinds)}


def recipe_record(config: TrainMiniConfig) -> dict[str, Any]:
    """The recipe as ``mdlib_trained.json`` records it: every field, the layout options only when non-zero."""
    rec = {k: v for k, v in asdict(config).items() if k not in ("layout_share", "layout_kinds")}
    return {**rec, **scene_settings(config)}


def recorded_scene_settings(folder: str | os.PathLike) -> dict[str, Any]:
    """The layout options a trained folder's record (``mdlib_trained.json``) holds: ``{}`` when it holds none
    (the default scenes; also for a folder without a record, such as the untrained tiny build)."""
    path = Path(folder) / "mdlib_trained.json"
    if not path.is_file():
        return {}
    recipe = json.loads(path.read_text()).get("config", {})
    if not recipe.get("layout_share"):
        return {}
    return {"layout_share": float(recipe["layout_share"]),
            "layout_kinds": list(recipe.get("layout_kinds", TrainMiniConfig.layout_kinds))}


# ------------------------------------------------------------------------------------------------ scenes

@dataclass
class ScenePool:
    """Rendered scenes: ``images`` (n, S, S, 3) uint8, 5 ``captions`` per scene and the ``scenes`` themselves
    (:class:`mdlib.synth.scenes.Scene`)."""

    images: np.ndarray
    captions: list[list[str]]
    scenes: list = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)


def scene_pool(n: int, seed: int, image_size: int, stream: int = 0, progress: bool = False,
               layout_share: float = 0.0, layout_kinds: Sequence[str] = ("horizon", "wall")) -> ScenePool:
    """``n`` scenes of mini-NSD's distribution from seed stream ``(seed, 7, stream)`` (0: training, 1: held
    out), rendered at ``image_size`` px. Deterministic. ``layout_share`` of them get a large-scale layout of
    ``layout_kinds`` (:func:`mdlib.synth.scenes.random_scene`); at 0, the default, no layout draw is made, so
    the pool is the one drawn before layouts existed."""
    from mdlib.synth import scenes

    rng = np.random.default_rng([int(seed), 7, int(stream)])
    images = np.zeros((n, image_size, image_size, 3), np.uint8)
    caps, drawn = [], []
    for k in progress_bar(range(n), desc="rendering scenes", unit="scene", progress=progress, mininterval=2):
        scene = scenes.random_scene(rng, layout_share=layout_share, layout_kinds=layout_kinds)
        images[k] = scenes.render(scene, size=image_size)
        caps.append(scenes.captions(scene, rng))
        drawn.append(scene)
    return ScenePool(images, caps, drawn)


# A work folder's scene settings: a resumed run must train on the scenes its checkpoints were trained on.
WORK_SCENES = "scenes.json"
#: Besides the layout options, what a work folder's checkpoints depend on, recorded with them: the scenes drawn
#: (seed, size, count) and the networks' shapes. Steps, batches and rates may change on a resume (a longer run).
WORK_KEYS = ("seed", "image_size", "n_scenes", "n_tokens", "unet_channels", "unet_heads", "unet_pooled_text")
_LAYOUT_KEYS = ("layout_share", "layout_kinds")


class RecipeMismatch(ValueError):
    """A work folder holds checkpoints of another recipe than the one asked for (:func:`claim_work_folder`)."""


def _describe(settings: dict) -> tuple[str, str]:
    """Scene settings in words, and as ``mdlib train-mini``'s options."""
    if not settings:
        return "scenes without layouts (layout_share 0)", "--layout-share 0 (the default)"
    kinds = " ".join(settings["layout_kinds"])
    return (f"layout_share {settings['layout_share']:g}, layout_kinds {kinds}",
            f"--layout-share {settings['layout_share']:g} --layout-kinds {kinds}")


def work_settings(config: TrainMiniConfig) -> dict[str, Any]:
    """What ``scenes.json`` records: :func:`scene_settings` plus the :data:`WORK_KEYS` (tuples as lists)."""
    rec = {k: getattr(config, k) for k in WORK_KEYS}
    return {**scene_settings(config), **{k: list(v) if isinstance(v, tuple) else v for k, v in rec.items()}}


def claim_work_folder(work: str | os.PathLike, config: TrainMiniConfig) -> None:
    """Check that the checkpoints in ``work`` (if any) were trained on ``config``'s scenes and network shapes,
    then record those settings there (``scenes.json``, :func:`work_settings`). Checkpoints without that file
    predate layouts: default scenes; a file without a :data:`WORK_KEYS` entry (written before they were
    recorded) accepts any value of it.

    Raises :class:`RecipeMismatch` (naming the folder and the fix) when they differ; nothing is written then.
    """
    work = Path(work)
    wanted = work_settings(config)
    path = work / WORK_SCENES
    if path.is_file():
        have = json.loads(path.read_text())
    elif any((work / stage / "state.json").is_file() for stage in STAGES):
        have = {}
    else:
        have = None
    if have is not None:
        had_scenes = {k: have[k] for k in _LAYOUT_KEYS if k in have}
        if had_scenes != scene_settings(config):
            (had, had_flags), (asked, _) = _describe(had_scenes), _describe(scene_settings(config))
            raise RecipeMismatch(
                f"{work} holds checkpoints trained on {had}, but this run asks for {asked}; resuming would mix "
                f"the two. To resume, rerun with {had_flags}; to start over, train into another folder (another "
                f"OUT, or another work folder) or delete {work} first.")
        other = [k for k in WORK_KEYS if k in have and have[k] != wanted[k]]
        if other:
            said = ", ".join(f"{k} {have[k]} (asked: {wanted[k]})" for k in other)
            raise RecipeMismatch(
                f"{work} holds checkpoints trained with {said}; resuming would mix the two. To resume, rerun "
                f"with those values; to start over, train into another folder or delete {work} first.")
    write_json_atomic(path, wanted)


def _unit(images: np.ndarray) -> torch.Tensor:
    """uint8 (n, S, S, 3) -> float (n, 3, S, S) in [-1, 1] (the VAE's input range, as vae_latents scales it)."""
    from mdlib.features import to_unit_images

    return to_unit_images(images) * 2.0 - 1.0


# ------------------------------------------------------------------------------------------- checkpoints

def save_checkpoint(folder: str | os.PathLike, modules: dict[str, torch.nn.Module],
                    optimizer: torch.optim.Optimizer, step: int, losses: Sequence[float], extra: dict | None = None
                    ) -> Path:
    """Weights, AdamW state (safetensors) and step/losses (JSON) into ``folder``, replacing it atomically."""
    from safetensors.torch import save_file

    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, module in modules.items():
        save_file({k: v.detach().contiguous() for k, v in module.state_dict().items()},
                  str(tmp / f"{name}.safetensors"))
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    write_json_atomic(tmp / "state.json", {"step": int(step), "losses": [float(x) for x in losses],
                                            "param_groups": state["param_groups"], "scalars": scalars,
                                            **(extra or {})})
    return _move_into_place(tmp, folder)


def _move_into_place(tmp: Path, folder: Path) -> Path:
    """Replace ``folder`` by the finished folder ``tmp`` (renames: a reader sees the old or the new, whole)."""
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def load_checkpoint(folder: str | os.PathLike, modules: dict[str, torch.nn.Module],
                    optimizer: torch.optim.Optimizer) -> dict | None:
    """Restore what :func:`save_checkpoint` wrote; returns its JSON (step, losses), or None if there is none."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / "state.json").is_file():
        return None
    info = json.loads((folder / "state.json").read_text())
    for name, module in modules.items():
        module.load_state_dict(load_file(str(folder / f"{name}.safetensors")))
    tensors = load_file(str(folder / "optimizer.safetensors"))
    state: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(info["scalars"].items()):
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": info["param_groups"]})
    return info


# ---------------------------------------------------------------------------------------------- training

def _schedule(steps: int, warmup: int = 100) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to 10% (a multiplier of the learning rate at each step)."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return factor


def ema_model(module: torch.nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel:
    """An exponential moving average of ``module``'s weights (torch's ``AveragedModel``): after n updates the
    average moves towards the current weights by 1 - min(decay, (1 + n) / (10 + n))."""
    from torch.optim.swa_utils import AveragedModel

    def update(averaged, current, n):
        d = min(float(decay), (1.0 + float(n)) / (10.0 + float(n)))
        torch._foreach_lerp_(averaged, current, 1.0 - d)

    return AveragedModel(module, multi_avg_fn=update, use_buffers=True)


def _loop(name: str, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer, steps: int,
          loss_fn: Callable[[np.random.Generator], torch.Tensor], ckpt: Path, seed: int, save_every: int,
          progress: bool, ema: torch.optim.swa_utils.AveragedModel | None = None) -> list[float]:
    """The shared training loop: resumes from ``ckpt``, one seeded batch generator per step (so a resumed run
    draws the same batches as an uninterrupted one), a tqdm bar, checkpoints every ``save_every`` steps (with
    the stage's training seconds so far, summed over resumptions: :func:`stage_seconds`). With ``ema`` (an
    :func:`ema_model` of the one module in ``modules``), it is updated after every step and checkpointed too."""
    saved = {**modules, "ema": ema} if ema is not None else modules
    info = load_checkpoint(ckpt, saved, optimizer)
    start, losses = (info["step"], info["losses"]) if info else (0, [])
    # Training seconds add up across resumptions (saved with each checkpoint), so the record of a resumed
    # run still says what the whole stage cost.
    seconds, t_start = (float(info.get("seconds", 0.0)) if info else 0.0), time.perf_counter()
    # Resuming: the schedule continues at `start` (the restored param groups carry its initial_lr).
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(steps), last_epoch=start - 1)
    for m in modules.values():
        m.train()
    bar = progress_bar(total=steps, initial=start, desc=f"train {name}", unit="step", progress=progress,
                       mininterval=2)
    for step in range(start, steps):
        rng = np.random.default_rng([seed, STAGES.index(name), step])
        loss = loss_fn(rng)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for m in modules.values() for p in m.parameters()], 1.0)
        optimizer.step()
        sched.step()
        if ema is not None:
            ema.update_parameters(next(iter(modules.values())))
        losses.append(float(loss.detach()))
        bar.update(1)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        if (step + 1) % save_every == 0 or step + 1 == steps:
            save_checkpoint(ckpt, saved, optimizer, step + 1, losses,
                            {"seconds": seconds + time.perf_counter() - t_start})
    bar.close()
    for m in modules.values():
        m.eval()
    return losses


def stage_seconds(ckpt: str | os.PathLike) -> float:
    """The training seconds a stage's checkpoint records (summed over every run that resumed it; 0 if none)."""
    path = Path(ckpt) / "state.json"
    return float(json.loads(path.read_text()).get("seconds", 0.0)) if path.is_file() else 0.0


def trained_unet_config(config: TrainMiniConfig) -> dict[str, Any]:
    """The trained UNet's diffusers config: the tiny build's (:func:`mdlib.models.tiny_configs`) with the
    recipe's attention heads and, if ``unet_pooled_text``, the pooled caption embedding added to the timestep
    embedding (``addition_embed_type="text"``, pooled by ``unet_heads``-head attention)."""
    cfg = dict(models.tiny_configs(config.image_size)["unet"])
    channels = [int(w) for w in config.unet_channels]
    if len(channels) != len(cfg["block_out_channels"]) or any(w < 32 or w % cfg["norm_num_groups"] for w in channels):
        raise ValueError(f"unet_channels must be {len(cfg['block_out_channels'])} multiples of "
                         f"{cfg['norm_num_groups']}, got {tuple(config.unet_channels)}")
    cfg["block_out_channels"] = channels
    widths = cfg["block_out_channels"] + [cfg["cross_attention_dim"]]
    if config.unet_heads < 1 or any(w % config.unet_heads for w in widths):
        raise ValueError(f"unet_heads must divide every attention width {widths}, got {config.unet_heads}")
    cfg["attention_head_dim"] = int(config.unet_heads)   # diffusers' legacy name: it sets the number of heads
    if config.unet_pooled_text:
        cfg.update(addition_embed_type="text", addition_embed_type_num_heads=int(config.unet_heads))
    return cfg


def train_vae(vae, pool: ScenePool, config: TrainMiniConfig, ckpt: Path, progress: bool = True) -> list[float]:
    """Stage 1 of the recipe: reconstruction MSE + kl_weight x KL, then the latent scaling factor."""
    opt = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)

    def loss_fn(rng):
        x = _unit(pool.images[rng.integers(0, len(pool), config.vae_batch)])
        dist = vae.encode(x).latent_dist
        z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(
            int(rng.integers(2**31))))
        recon = vae.decode(z).sample
        return F.mse_loss(recon, x) + config.kl_weight * dist.kl().mean()

    return _loop("vae", {"vae": vae}, opt, config.vae_steps, loss_fn, ckpt, config.seed, config.save_every,
                 progress)


def latent_stats(vae, pool: ScenePool, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """The posterior means and standard deviations of every pool image (unscaled), (n, 4, h, w) each."""
    means, stds = [], []
    with torch.no_grad():
        for s in range(0, len(pool), batch):
            dist = vae.encode(_unit(pool.images[s:s + batch])).latent_dist
            means.append(dist.mean)
            stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def train_clip(clip_model, pool: ScenePool, tokenizer: Callable, config: TrainMiniConfig, ckpt: Path,
               text_encoder=None, sd_tokenizer=None, progress: bool = True) -> list[float]:
    """Stage 2: CLIP's symmetric InfoNCE on (scene, caption) pairs, with the learned temperature; with
    ``text_encoder`` (and its ``sd_tokenizer``), a second InfoNCE of the same image embeddings against SD's text
    encoder (pooled state, linear head to CLIP's embedding width, the same caption cut to ``n_tokens``)."""
    wrapped = models.wrap_clip(clip_model)
    modules: dict[str, torch.nn.Module] = {"clip": clip_model}
    if text_encoder is not None:
        modules["text_encoder"] = text_encoder
        with models._seeded(config.seed):   # the head's initial weights, without touching the global RNG
            modules["text_head"] = torch.nn.Linear(text_encoder.config.hidden_size,
                                                   clip_model.text_projection.shape[1], bias=False)
    opt = torch.optim.AdamW([p for m in modules.values() for p in m.parameters()], lr=config.clip_lr,
                            weight_decay=0.1)

    def info_nce(img, txt):
        logits = clip_model.logit_scale.exp() * img @ txt.T
        target = torch.arange(len(img))
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2

    def loss_fn(rng):
        from mdlib.features import clip_preprocess

        idx = rng.integers(0, len(pool), config.clip_batch)
        prompts = [pool.captions[i][rng.integers(5)] for i in idx]
        img = clip_model.encode_image(clip_preprocess(wrapped, pool.images[idx]), normalize=True)
        loss = info_nce(img, clip_model.encode_text(tokenizer(prompts), normalize=True))
        if text_encoder is not None:
            pooled = text_encoder(caption_tokens(sd_tokenizer, prompts, config.n_tokens)).pooler_output
            loss = loss + info_nce(img, F.normalize(modules["text_head"](pooled), dim=-1))
        return loss

    return _loop("clip", modules, opt, config.clip_steps, loss_fn, ckpt, config.seed, config.save_every, progress)


def caption_tokens(tokenizer, prompts: Sequence[str], n_tokens: int) -> torch.Tensor:
    """Token ids (n, n_tokens) as SD's pipeline makes them: padded to ``max_length``, truncated."""
    return tokenizer(list(prompts), padding="max_length", max_length=n_tokens, truncation=True,
                     return_tensors="pt").input_ids


def diffusion_loss(unet, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                   alphas_cumprod: torch.Tensor, x0_weight_cap: float = 1.0) -> torch.Tensor:
    """SD's training loss on a batch: noise ``x0`` (n, 4, h, w) to timesteps ``t`` (n,) with ``noise``,
    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, and score the UNet's noise estimate (conditioned on
    ``cond``, (n, tokens, width)) by its mean squared error, each image's weighted by
    clamp(1 / SNR(t), 1, ``x0_weight_cap``) with SNR(t) = abar_t / (1 - abar_t) (1 / SNR turns the noise error
    into the error of the implied x0; the cap keeps the noisiest steps from swamping the rest)."""
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
    weight = ((1 - a) / a).clamp(1.0, max(1.0, float(x0_weight_cap))).flatten()
    per_item = ((unet(xt, t, encoder_hidden_states=cond).sample - noise) ** 2).mean(dim=(1, 2, 3))
    return (weight * per_item).mean()


def train_unet(unet, text_encoder, tokenizer, scheduler, means: torch.Tensor, stds: torch.Tensor, scale: float,
               pool: ScenePool, config: TrainMiniConfig, ckpt: Path, progress: bool = True) -> list[float]:
    """Stage 3: SD's noise-prediction loss on scaled posterior samples, conditioned on the frozen text
    encoder's states of the captions."""
    opt = torch.optim.AdamW(unet.parameters(), lr=config.unet_lr, weight_decay=0.0)
    abar = scheduler.alphas_cumprod.float()
    n_train = scheduler.config.num_train_timesteps
    text_encoder.eval().requires_grad_(False)

    def loss_fn(rng):
        idx = rng.integers(0, len(pool), config.unet_batch)
        g = torch.Generator().manual_seed(int(rng.integers(2**31)))
        x0 = scale * (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=g))
        prompts = ["" if rng.random() < config.uncond_prob else pool.captions[i][rng.integers(5)] for i in idx]
        with torch.no_grad():
            cond = text_encoder(caption_tokens(tokenizer, prompts, config.n_tokens)).last_hidden_state
        low = np.where(rng.random(len(idx)) < config.high_t_prob, n_train // 2, 0)
        t = torch.from_numpy(rng.integers(low, n_train))
        noise = torch.randn(x0.shape, generator=g)
        return diffusion_loss(unet, x0, noise, t, cond, abar, config.x0_weight_cap)

    ema = ema_model(unet, config.unet_ema) if config.unet_ema > 0 else None
    losses = _loop("unet", {"unet": unet}, opt, config.unet_steps, loss_fn, ckpt, config.seed, config.save_every,
                   progress, ema)
    if ema is not None:   # the averaged weights are the trained UNet
        unet.load_state_dict(ema.module.state_dict())
    return losses


def train_mini(out: str | os.PathLike, config: TrainMiniConfig | None = None, work: str | os.PathLike | None = None,
               progress: bool = True) -> dict:
    """Train all tiny models and write them to ``out`` (a model folder); returns the training record.

    ``work`` keeps the checkpoints (default: ``<out>.work``); rerunning after an interruption resumes there.
    The record (recipe, losses, times, latent scale) is saved as ``<out>/mdlib_trained.json``.
    """
    from open_clip import get_tokenizer

    config = config or TrainMiniConfig()
    out = Path(out).expanduser()
    work = Path(work).expanduser() if work else out.with_name(out.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    claim_work_folder(work, config)   # before anything is trained: refuses checkpoints of other scenes
    torch.manual_seed(config.seed)
    t0 = time.perf_counter()
    before = {stage: stage_seconds(work / stage) for stage in STAGES}   # trained in earlier runs
    pool = scene_pool(config.n_scenes, config.seed, config.image_size, stream=0, progress=progress,
                      layout_share=config.layout_share, layout_kinds=config.layout_kinds)
    parts = models.make_tiny_components(seed=config.seed, image_size=config.image_size)
    tiny = models.tiny_models_dir()   # the tokenizer files (CLIP's BPE) of the tiny build
    from transformers import CLIPTokenizer

    sd_tokenizer = CLIPTokenizer.from_pretrained(tiny / "tokenizer", model_max_length=77, local_files_only=True)
    clip_tokenizer = get_tokenizer("ViT-B-32")   # open_clip's CLIP BPE tokenizer, 77 tokens
    from diffusers import UNet2DConditionModel

    with models._seeded(config.seed):   # the recipe's UNet architecture, seeded like the tiny build's
        parts["unet"] = UNet2DConditionModel.from_config(trained_unet_config(config))
    for m in (parts["vae"], parts["unet"], parts["text_encoder"], parts["clip"]):
        m.requires_grad_(True)
    record: dict[str, Any] = {"config": recipe_record(config), "seconds": {}, "final_loss": {}}

    losses = train_vae(parts["vae"], pool, config, work / "vae", progress)
    record["final_loss"]["vae"] = float(np.mean(losses[-100:]))
    parts["vae"].requires_grad_(False)
    means, stds = latent_stats(parts["vae"], pool)
    scale = float(1.0 / means.std())
    parts["vae"].register_to_config(scaling_factor=scale)
    record["vae_scaling_factor"] = scale

    losses = train_clip(parts["clip"], pool, clip_tokenizer, config, work / "clip", parts["text_encoder"],
                        sd_tokenizer, progress)
    record["final_loss"]["clip"] = float(np.mean(losses[-100:]))

    losses = train_unet(parts["unet"], parts["text_encoder"], sd_tokenizer, parts["scheduler"], means, stds, scale,
                        pool, config, work / "unet", progress)
    record["final_loss"]["unet"] = float(np.mean(losses[-100:]))
    # Each stage's training seconds (over every run that resumed it), and this run's other work (rendering the
    # scenes, the latent statistics); their sum is what the recipe costs from scratch.
    record["seconds"] = {stage: stage_seconds(work / stage) for stage in STAGES}
    record["seconds"]["other"] = time.perf_counter() - t0 - sum(
        record["seconds"][stage] - before[stage] for stage in STAGES)
    record["seconds"]["total"] = sum(record["seconds"].values())
    for m in (parts["vae"], parts["unet"], parts["text_encoder"], parts["clip"]):
        m.eval().requires_grad_(False)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    recipe = {"version": models.TINY_VERSION, "seed": config.seed, "image_size": config.image_size, "trained": True}
    models.save_tiny_components(tmp, parts, recipe,
                                note="mdlib tiny models trained on mini-NSD's scenes (mdlib.train_mini)")
    write_json_atomic(tmp / "mdlib_trained.json", record)
    _move_into_place(tmp, out)
    return record


# ----------------------------------------------------------------------------------------------- quality

def quality(folder: str | os.PathLike, n_heldout: int = 512, n_samples: int = 64, seed: int = 0,
            n_tokens: int = 15, device: str | torch.device | None = "cpu", progress: bool = True,
            layout_share: float | None = None, layout_kinds: Sequence[str] | None = None) -> dict:
    """How well trained tiny models work, on held-out scenes (seed stream 1, never trained on).

    The held-out scenes have the layout options the folder was trained with (its ``mdlib_trained.json``:
    :func:`recorded_scene_settings`), unless ``layout_share`` / ``layout_kinds`` say otherwise; non-zero
    ones are returned with the numbers.

    - ``vae_psnr``: PSNR (dB) of the VAE's reconstruction (posterior mean) of the held-out images in [0, 1].
    - ``clip_top1`` / ``clip_top5``: for each held-out image, whether its own caption ranks first / in the top
      5 among the ``n_heldout`` captions by the CLIP pair's cosine (chance: 1 / n_heldout, 5 / n_heldout).
    - ``sample_top1``: text-to-image samples (the published sampler's 50 steps, guidance 5) of the first
      ``n_samples`` captions; the fraction whose own caption ranks first among those ``n_samples`` by the CLIP
      pair (chance 1 / n_samples), next to ``real_top1``, the same for the real images (the ceiling).
    Returns the numbers and, under ``"samples"``, the (n_samples, S, S, 3) uint8 images.
    """
    from open_clip import get_tokenizer

    from mdlib import features, stage1
    from mdlib.sampler import SamplerConfig

    settings = recorded_scene_settings(folder)
    if layout_share is not None or layout_kinds is not None:
        settings = scene_settings(TrainMiniConfig(
            layout_share=settings.get("layout_share", 0.0) if layout_share is None else layout_share,
            layout_kinds=settings.get("layout_kinds", TrainMiniConfig.layout_kinds) if layout_kinds is None
            else layout_kinds))
    sd = models.load_sd(folder, device=device)
    clip = models.load_clip_vision(folder, device=sd.device)
    pool = scene_pool(n_heldout, seed, sd.image_size, stream=1, **settings)
    with torch.no_grad():
        x = _unit(pool.images).to(sd.device)
        recon = torch.cat([sd.vae.decode(sd.vae.encode(x[s:s + 64]).latent_dist.mean).sample
                           for s in range(0, len(x), 64)])
        mse = (((recon.clamp(-1, 1) - x) / 2) ** 2).mean(dim=(1, 2, 3))
        psnr = float((10 * torch.log10(1.0 / mse)).mean())
        tok = get_tokenizer("ViT-B-32")
        first = [c[0] for c in pool.captions]

        def embed_images(images):
            return clip.model.encode_image(features.clip_preprocess(clip, images), normalize=True)

        text = clip.model.encode_text(tok(first).to(sd.device), normalize=True)
        sims = embed_images(pool.images) @ text.T                    # (image, caption)
        rank = (sims > sims.diag()[:, None]).sum(1)                  # captions scoring above the image's own
        prompts = first[:n_samples]
        cond = features.prompt_embeddings(sd, prompts, n_tokens=n_tokens)
        samples = stage1.img2img(sd, None, cond, list(range(n_samples)), c_includes_bos=True,
                                     config=SamplerConfig.text_to_image(50), progress=progress).images
        s_sims = embed_images(samples) @ text[:n_samples].T
        r_sims = sims[:n_samples, :n_samples]
    return {"vae_psnr": psnr, "clip_top1": float((rank == 0).float().mean()),
            "clip_top5": float((rank < 5).float().mean()), "n_heldout": n_heldout,
            "sample_top1": float((s_sims.argmax(1) == torch.arange(n_samples)).float().mean()),
            "real_top1": float((r_sims.argmax(1) == torch.arange(n_samples)).float().mean()),
            "n_samples": n_samples, **settings, "samples": samples, "prompts": prompts}


def ship(folder: str | os.PathLike, dest: str | os.PathLike | None = None, n_heldout: int = 512,
         n_samples: int = 64, progress: bool = True) -> dict:
    """Measure trained models' :func:`quality` and install them as the package's shipped weights.

    ``dest`` (default :data:`mdlib.models.SHIPPED_TRAINED_DIR`, i.e. ``mdlib/weights/tiny-trained``) receives a
    copy of ``folder`` (the model files and ``mdlib_trained.json``, not the checkpoints), ``mdlib_quality.json``
    (the numbers docs/mini_world.md quotes under "Quality" and the tests reproduce), ``samples.png`` (the
    text-to-image samples with their captions) and ``mdlib_weights.json`` (each file's size and SHA-256), written
    beside and renamed into place. Returns the quality numbers.
    """
    import matplotlib.pyplot as plt

    from mdlib import viz

    folder = Path(folder).expanduser()
    dest = Path(dest) if dest is not None else models.SHIPPED_TRAINED_DIR
    q = quality(folder, n_heldout=n_heldout, n_samples=n_samples, progress=progress)
    numbers = {k: v for k, v in q.items() if k not in ("samples", "prompts")}
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(folder, tmp, ignore=shutil.ignore_patterns("mdlib_weights.json", "mdlib_quality.json",
                                                               "samples.png"))
    write_json_atomic(tmp / "mdlib_quality.json", {**numbers, "prompts": q["prompts"]})
    fig = viz.image_grid(q["samples"][:16], titles=q["prompts"][:16], ncols=8, size=1.9,
                         title="text-to-image samples of the trained tiny models (held-out captions)")
    fig.savefig(tmp / "samples.png", dpi=80)
    plt.close(fig)
    models.write_weights_list(tmp)
    _move_into_place(tmp, dest)
    return numbers

"""Stage 2: structural control by backpropagation through the sampler (docs/method.md; lesson 05).

Stage 1 keeps the semantics but loses where things are and how they are oriented. Stage 2 restores them with
the fMRI-decoded low-level CLIP features (blocks 1-6 ``c_proj`` outputs and the image embedding of
ViT-B/32): it generates an image from (z, c), extracts the same features from it, and changes z (and c) so
that they come closer to the decoded ones.

**Published mode** (:func:`guide_published`): every iteration runs the whole stage-1 sampler (35 DDIM steps,
guidance 5.0), the VAE decoder and CLIP, then backpropagates the feature loss through all of it into z (and
c, as the paper's Algorithm 1 does) with Adam or plain gradient steps (:class:`PublishedConfig`; the method
variants of :mod:`mdlib.method` set it). Each denoising step is checkpointed
(:class:`mdlib.sampler.DDIMSampler` ``checkpoint=True``), so the activations of only one step live at a
time and memory does not grow with the number of steps. The cost is iterations x 35 steps x 2 guidance
branches UNet passes forward, and as many again recomputed and backpropagated (measured per image in
benchmarks/README.md, ``bench_reconstruct.py`` and ``bench_stage2.py``).

**Fast mode** (:func:`guide_fast`): one sampling pass; at every step the model's estimate of the clean
latent ``x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)`` is decoded, its features compared with the decoded
ones, and the noise estimate is shifted along the loss gradient (universal guidance's forward guidance,
Bansal et al. 2023: ``eps' = eps + s sqrt(1 - a_t) grad_x L``) before the DDIM update. Cost: one sampling
pass plus one backward pass per step.

**The loss** (:class:`FeatureTargets`): per block, the squared error between the image's features and the
decoded ones over the kept features (the best-decoded share, :mod:`mdlib.selection`), reduced as the default
variant (a mean per block), the released code (``MSE_CLIP_mask``) or the paper (a sum) does, plus a weighted
``1 - cosine`` between the image embeddings. Images in a batch are independent: the loss is a sum over images
and Adam works element-wise, so a batch gives what separate runs would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import resource
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from mdlib import features
from mdlib.cachekey import cache_key, float32_bytes
from mdlib.models import ClipVision, SDModels
from mdlib.progress import bar as progress_bar
from mdlib.record import write_png_atomic
from mdlib.sampler import DDIMSampler, SamplerConfig, draw_noise, generators
from mdlib.selection import RELEASED_KEEP, best_decoded_mask

if TYPE_CHECKING:  # where the state is kept is the caller's business (mdlib.runstate); stage 2 only names it
    from mdlib.runstate import StoreFactory

#: The released code's weight of (1 - cosine) on the image embedding (``0.1 * loss_CLIP_weight`` there).
RELEASED_COS_WEIGHT = 0.1
#: The released loss's extra factors on blocks 1-6 (``a1`` in ``MSE_CLIP_mask``); 1 for any other block.
RELEASED_BLOCK_FACTORS = {1: 1.5, 2: 1.2, 3: 1.0, 4: 1.0, 5: 1.0, 6: 1.0}
#: How the block terms of the loss are reduced (docs/method.md, row "loss"):
#: ``"mean"``: each block's mean squared error over its kept features (the default variant);
#: ``"released"``: the released ``MSE_CLIP_mask``: per image, block weights ``a_b (1/||t_b||) / sum_j (1/||t_j||)``
#: times the mean squared error over *all* the block's features (the unkept ones contribute 0);
#: ``"sum"``: the sum of squared errors over the kept features (the paper's Algorithm 1, line 5).
REDUCTIONS = ("mean", "released", "sum")
#: Iterations at which the paper's figure shows the image.
PAPER_SNAPSHOTS = (0, 30, 90, 180)
#: Stage 2's optimisers: the released code's Adam, the paper's plain gradient steps.
OPTIMIZERS = ("adam", "sgd")


# ------------------------------------------------------------------------------------------- the loss

@dataclass
class FeatureTargets:
    """Decoded structural features of n images, which features count, and how the loss weighs them (lesson 05).

    The loss of an image with features f (docs/method.md, row "loss")::

        L = sum over blocks b of  s_b * sum over kept features of (f_b - t_b)^2   +   cos_weight (1 - cos(e, t_e))

    with ``s_b = 1 / kept_b`` (``reduction="mean"``), ``1`` (``"sum"``), or, as released,
    ``block_scale * a_b (1/||t_b||) / sum_j (1/||t_j||) / size_b`` (``"released"``; ``||t_b||`` over the kept
    features of this image's target, ``size_b`` all of the block's features, ``a`` =
    :data:`RELEASED_BLOCK_FACTORS`).

    Attributes:
        blocks: name (``block1`` ...) -> (n, tokens, width) float32 decoded features.
        embedding: (n, dim) decoded image embedding, or None (no cosine term).
        masks: name -> (tokens, width) bool: the features kept (default: all).
        cos_weight: weight of ``1 - cos(embedding)``.
        reduction: one of :data:`REDUCTIONS`. block_scale: a factor on every block term (released:
            ``1 - loss_CLIP_weight``).
        resize, clamp: how a generated image reaches CLIP (:func:`mdlib.features.clip_preprocess`).
    """

    blocks: dict[str, torch.Tensor]
    embedding: torch.Tensor | None = None
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    cos_weight: float = RELEASED_COS_WEIGHT
    reduction: str = "mean"
    block_scale: float = 1.0
    resize: str = features.DEFAULT_RESIZE
    clamp: bool = False

    def __post_init__(self) -> None:
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")

    @classmethod
    def from_decoded(cls, decoded, rows=None, keep: float = RELEASED_KEEP, cos_weight: float = RELEASED_COS_WEIGHT,
                     device=None, use: str = "pred", **loss) -> FeatureTargets:
        """From :class:`mdlib.decoding.Decoded` (its ``clip_*`` families): rows (default all) of
        ``decoded.pred`` (or ``decoded.true`` with ``use="true"``, the oracle), keeping per block the ``keep``
        share of features best scored on the training images (``decoded.score``, by the rule the scores were
        made for: :func:`mdlib.selection.best_decoded_mask`). ``loss``: ``reduction``, ``block_scale``,
        ``resize``, ``clamp`` (see the class)."""
        src = decoded.pred if use == "pred" else decoded.true
        rows = slice(None) if rows is None else rows
        names = sorted((k[5:] for k in src if k.startswith("clip_block")), key=lambda s: int(s[5:]))
        if not names:
            raise ValueError("decoded has no clip_block* families: decode them with a CLIP model first")
        as_t = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float32), device=device)  # noqa: E731
        blocks = {n: as_t(src[f"clip_{n}"][rows]) for n in names}
        rule = "percentile" if decoded.params.get("select_by") == "cv5-r" else "top"
        masks = {n: torch.as_tensor(best_decoded_mask(decoded.score[f"clip_{n}"], keep, rule), device=device)
                 .reshape(blocks[n].shape[1:]) for n in names}
        emb = as_t(src["clip_embedding"][rows]) if "clip_embedding" in src else None
        return cls(blocks=blocks, embedding=emb, masks=masks, cos_weight=cos_weight if emb is not None else 0.0,
                   **loss)

    def __len__(self) -> int:
        return len(next(iter(self.blocks.values())))

    def subset(self, rows) -> FeatureTargets:
        return dataclasses.replace(self, blocks={k: v[rows] for k, v in self.blocks.items()},
                                   embedding=None if self.embedding is None else self.embedding[rows])

    def per_image_loss(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        """(n,) loss of each image from its features (:func:`mdlib.features.clip_lowlevel_features`)."""
        return self.per_token_loss(feats).sum(1) + self.cosine_term(feats)

    def cosine_term(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        """(n,) ``cos_weight * (1 - cos)`` between the images' embeddings and the targets' (0 without them)."""
        emb = feats["embedding"]
        if self.embedding is None or not self.cos_weight:
            return torch.zeros(len(emb), device=emb.device)
        cos = torch.nn.functional.cosine_similarity(emb, self.embedding.to(emb), dim=1)
        return self.cos_weight * (1.0 - cos)

    def block_weights(self) -> dict[str, torch.Tensor]:
        """name -> (n,) ``s_b``: the factor on each block's sum of squared errors over its kept features."""
        kept = {name: (self.masks[name].sum() if name in self.masks else torch.tensor(t[0].numel()))
                .to(t.device, torch.float32) for name, t in self.blocks.items()}
        n = len(self)
        if self.reduction == "mean":
            return {name: (self.block_scale / kept[name]).expand(n) for name in self.blocks}
        if self.reduction == "sum":
            return {name: torch.full((n,), float(self.block_scale), device=t.device)
                    for name, t in self.blocks.items()}
        inv = {}
        for name, t in self.blocks.items():  # released: 1 / ||target||, the target zero outside the mask
            m = self.masks.get(name)
            kept_t = t if m is None else t * m.to(t.device)
            inv[name] = 1.0 / kept_t.reshape(n, -1).norm(dim=1).clamp_min(1e-30)
        total = sum(inv.values())
        return {name: self.block_scale * RELEASED_BLOCK_FACTORS.get(int(name[5:]), 1.0) * inv[name] / total
                / t[0].numel() for name, t in self.blocks.items()}

    def per_token_loss(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        """(n, tokens): where in the image the block terms of :meth:`per_image_loss` come from.

        Each block's term is ``s_b`` times a sum of squared errors over kept features; this keeps that sum per
        token (token 0 is the class token, then the patches row by row: 7 x 7 for ViT-B/32 at 224 px and for
        the tiny CLIP), summed over the blocks. So ``per_token_loss(f).sum(1) + cosine_term(f)`` is
        ``per_image_loss(f)``. ``benchmarks/bench_stage2.py`` (part 5) uses it to ask whether the loss lives
        on the objects or on the background.
        """
        total = 0.0
        for name, w in self.block_weights().items():
            target = self.blocks[name]
            diff = (feats[name] - target.to(feats[name])) ** 2                   # (n, tokens, width)
            mask = self.masks.get(name)
            if mask is not None:
                diff = diff * mask.to(diff.device)
            total = total + diff.sum(-1) * w.to(diff)[:, None]
        return total


def image_features(sd: SDModels, clip: ClipVision, latents: torch.Tensor, targets: FeatureTargets) -> tuple:
    """Latents -> VAE decoder -> images (n, 3, S, S) in [0, 1] and their CLIP structural features, both
    differentiable (the chain stage 2 inverts), brought to CLIP as ``targets`` says (resize, clamp)."""
    images = features.decode_latents(sd, latents, grad=True)
    nums = [int(b[5:]) for b in targets.blocks]
    return images, features.clip_lowlevel_features(clip, images, differentiable=True, blocks=nums,
                                                   resize=targets.resize, clamp=targets.clamp)


def render_loss(sd: SDModels, clip: ClipVision, sampler: DDIMSampler, z: torch.Tensor, cond: torch.Tensor,
                uncond: torch.Tensor | None, targets: FeatureTargets, gens, checkpoint: bool = True) -> tuple:
    """One forward pass of the published objective: (z, c) -> sampler -> VAE -> CLIP -> per-image loss (n,).
    Returns (loss, images, latents), with the autograd graph back to z and cond."""
    with torch.enable_grad():
        latents = sampler.sample(z, cond, uncond, gens, checkpoint=checkpoint)
        images, feats = image_features(sd, clip, latents, targets)
        return targets.per_image_loss(feats), images, latents


# ------------------------------------------------------------------------------------------- the run

@dataclass
class Stage2Output:
    """Results of :func:`guide_published` / :func:`guide_fast`.

    Attributes:
        images: (n, S, S, 3) uint8 final images; latents: (n, 4, h, w) float32 (the sampled latents).
        z: (n, 4, h, w) float32 the optimised z (published mode; the input z in fast mode).
        loss: per-image feature loss. Published mode: (iterations + 1, n), at each iteration's image (row 0:
            stage 1's image). Fast mode: (guided steps + 1, n), of the clean-latent estimate at each guided
            step, then (last row) of the final image.
        snapshots: iteration -> (n, S, S, 3) uint8 images (published mode).
        cost: ``unet_passes`` (forward passes, as counted by the sampler, checkpoint recomputations included),
            ``unet_backward`` (passes backpropagated), ``wall_s``, ``peak_memory_bytes`` (CUDA's max allocated, or
            the process' peak RSS on the CPU).
    """

    images: np.ndarray
    latents: np.ndarray
    z: np.ndarray
    loss: np.ndarray
    snapshots: dict[int, np.ndarray]
    cost: dict


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _autocast(device: torch.device, autocast: str | None):
    if not autocast:
        return contextlib.nullcontext()
    dt = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if autocast not in dt:
        raise ValueError(f"autocast must be None, 'bf16' or 'fp16', got {autocast!r}")
    return torch.autocast(device_type=device.type, dtype=dt[autocast])


def _inputs(sd: SDModels, z, c, targets: FeatureTargets, seeds, sampler_config: SamplerConfig | None,
            c_includes_bos: bool) -> tuple:
    """Both modes' inputs on the models' device: (sampler, z (n, 4, h, w), cond (n, tokens, width) with the
    BOS row, uncond (1, tokens, width) or None without guidance), with one row per image checked."""
    from mdlib.stage1 import unconditional, with_bos

    sampler = DDIMSampler(sd.unet, sd.scheduler, sampler_config or SamplerConfig())
    z0 = torch.as_tensor(np.asarray(z, dtype=np.float32), device=sd.device)
    c = torch.as_tensor(np.asarray(c, dtype=np.float32), device=sd.device)
    cond = c if c_includes_bos else with_bos(sd, c)
    n = len(z0)
    if len(cond) != n or len(targets) != n or len(seeds) != n:
        raise ValueError(f"z ({n}), c ({len(cond)}), targets ({len(targets)}) and seeds ({len(seeds)}) must "
                         "have one row per image")
    uncond = unconditional(sd, cond.shape[1]) if sampler.config.guidance_scale != 1.0 else None
    return sampler, z0, cond, uncond


def snapshot_iterations(iterations: int) -> tuple[int, ...]:
    """The iterations whose images a run keeps: the paper's figure's 0, 30, 90 and 180 when the run is that
    long, else the same fractions of a shorter run (0, 1/6, 1/2 and the end), as lessons 05 and 06 show."""
    if iterations >= PAPER_SNAPSHOTS[-1]:
        return tuple(k for k in PAPER_SNAPSHOTS if k <= iterations)
    return tuple(sorted({0, iterations // 6, iterations // 2, iterations}))


@dataclass(frozen=True)
class PublishedConfig:
    """The published optimisation (docs/method.md, rows "stage 2"); the variants set it
    (:func:`mdlib.method.configure`).

    Attributes:
        iterations: optimisation steps (released code: 300; the paper's figures: 90-180).
        optimizer: ``"adam"`` (released code) or ``"sgd"`` (plain gradient steps, the paper's Algorithm 1).
        lr, gamma: the learning rate (0.01 in both) and ExponentialLR's decay per iteration (released: 0.999;
            1.0: constant).
        lr_decay_first: decay the lr once before the first step, as the released loop does (it calls
            ``scheduler.step()`` before ``optimizer.step()``: iteration k steps with ``lr gamma^(k+1)``).
        update: which inputs change: ``("z",)`` (released code) or ``("z", "c")`` (paper, Algorithm 1).
        fresh_noise: draw new sampler noise every iteration (the released code and Algorithm 1 noise z anew
            in every iteration; False: the same seeded noise each time). Either way reproducible from the
            image's seed: iteration k's noise is seeded by ``seed + 7919 k``.
        checkpoint: recompute each step's activations in the backward pass (memory flat in the steps).
        autocast: None, ``"bf16"`` or ``"fp16"`` (CUDA) mixed precision of the forward passes.
        snapshots: iterations whose image is kept (the paper's figure: 0, 30, 90, 180).
    """

    iterations: int = 300
    optimizer: str = "adam"
    lr: float = 0.01
    gamma: float = 0.999
    lr_decay_first: bool = False
    update: tuple[str, ...] = ("z",)
    fresh_noise: bool = False
    checkpoint: bool = True
    autocast: str | None = None
    snapshots: tuple[int, ...] = PAPER_SNAPSHOTS

    def __post_init__(self) -> None:
        if not set(self.update) <= {"z", "c"} or not self.update:
            raise ValueError(f"update must be ('z',), ('c',) or ('z', 'c'), got {self.update}")
        if self.iterations < 0:
            raise ValueError(f"iterations must be >= 0, got {self.iterations}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if not (math.isfinite(self.lr) and self.lr > 0) or not (math.isfinite(self.gamma) and 0 < self.gamma <= 1):
            raise ValueError(f"need lr > 0 and 0 < gamma <= 1, got lr={self.lr}, gamma={self.gamma}")


def make_optimizer(config: PublishedConfig, z_var: torch.Tensor, c_var: torch.Tensor) -> tuple:
    """(optimiser, lr schedule) of a published run over those of z and c that require grad (z first): Adam or
    plain gradient steps at ``lr`` (times ``gamma`` with ``lr_decay_first``), decayed by ``gamma`` per step."""
    params = [p for p in (z_var, c_var) if p.requires_grad]
    lr0 = config.lr * (config.gamma if config.lr_decay_first else 1.0)
    opt = torch.optim.Adam(params, lr=lr0) if config.optimizer == "adam" else torch.optim.SGD(params, lr=lr0)
    return opt, torch.optim.lr_scheduler.ExponentialLR(opt, gamma=config.gamma)


def guide_published(sd: SDModels, clip: ClipVision, z, c, targets: FeatureTargets, seeds: Sequence[int], *,
                    config: PublishedConfig | None = None, sampler_config: SamplerConfig | None = None,
                    c_includes_bos: bool = False, state: StoreFactory | None = None, save_every: int = 10,
                    progress: bool = True) -> Stage2Output:
    """Stage 2 as published: optimise z (and c) through the whole sampler (lesson 05).

    Args:
        sd, clip: the models (on the same device). z: (n, 4, h, w) decoded latents; c: (n, tokens - 1, width)
            decoded caption embeddings (BOS row added here) or (n, tokens, width) with ``c_includes_bos``.
        targets: :class:`FeatureTargets` of the same n images. seeds: one per image (the sampler's noise).
        config: :class:`PublishedConfig`; sampler_config: the stage-1 sampler (default: published).
        state: where the optimisation state is kept, or None (not kept): a function run key -> store
            (:data:`mdlib.runstate.StoreFactory`), e.g. ``mdlib.runstate.stores_under(folder)`` for
            ``<folder>/<run key>/stage2_state.npz`` + ``.json``. The state (z, c, the optimiser's moments, lr,
            losses, snapshots, cost; :func:`state_arrays`) is saved every ``save_every`` iterations and at the
            end, and a run resumes from it: an interrupted run loses at most ``save_every`` iterations and ends
            with the uninterrupted run's result; a finished one is read back without sampling. The run key
            (:func:`run_key`, also ``cost["run_key"]``) hashes the models, inputs, targets, seeds and settings,
            so a run with anything changed gets a store of its own.
        progress: a tqdm bar over iterations (postfix: the mean loss).
    """
    config = config or PublishedConfig()
    device = sd.device
    sampler, z0, cond0, uncond = _inputs(sd, z, c, targets, seeds, sampler_config, c_includes_bos)
    z_var = z0.clone().requires_grad_("z" in config.update)
    c_var = cond0.clone().requires_grad_("c" in config.update)
    opt, sched = make_optimizer(config, z_var, c_var)
    seeds = [int(s) for s in seeds]
    evals = sampler.config.unet_evaluations(len(z0))
    losses: list[np.ndarray] = []
    snapshots: dict[int, np.ndarray] = {}
    start_it, prior = 0, dict.fromkeys(STATE_COST_KEYS, 0.0)
    store = key = final = None
    if state is not None:
        key = run_key(sd, clip, z0, cond0, targets, seeds, config, sampler.config)
        store = state(key)
        saved = store.load(required=STATE_FIELDS)
        if saved is not None:
            got = restore_state(saved, z_var, c_var, opt, sched)
            start_it, losses, snapshots, prior = got["iteration"], got["losses"], got["snapshots"], got["cost"]
            final = got["final"]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0, calls0 = time.perf_counter(), sampler.unet_calls

    def cost_so_far(steps_done: int) -> dict:
        """The whole run's cost, earlier (interrupted) sessions included; each UNet pass of an optimisation
        step's graph is backpropagated once."""
        return {"unet_passes": prior["unet_passes"] + sampler.unet_calls - calls0,
                "unet_backward": prior["unet_backward"] + (steps_done - start_it) * evals,
                "wall_s": prior["wall_s"] + time.perf_counter() - t0}

    def save(iteration: int, cost: dict, finished=None) -> None:
        arrays = state_arrays(iteration, z_var, c_var, opt, losses, snapshots, cost, finished)
        store.save(arrays, state_summary(arrays))

    bar = progress_bar(total=config.iterations + 1, initial=start_it, desc="stage 2 (published)",
                       progress=progress and final is None)
    for it in range(start_it if final is None else config.iterations + 1, config.iterations + 1):
        # Iteration `it` scores the image of the current z; the last one (it == iterations) only scores.
        gens = generators([s + it * 7919 if config.fresh_noise else s for s in seeds])
        with _autocast(device, config.autocast):
            per_image, images, lat = render_loss(sd, clip, sampler, z_var, c_var, uncond, targets, gens,
                                                 checkpoint=config.checkpoint)
        losses.append(per_image.detach().float().cpu().numpy())
        if it in config.snapshots or it == config.iterations:
            snapshots[it] = features.to_uint8_images(images)
        if it < config.iterations:
            opt.zero_grad(set_to_none=True)
            per_image.sum().backward()
            opt.step()
            sched.step()
        else:
            final = (lat.detach().float().cpu().numpy(), features.to_uint8_images(images))
        bar.update()
        bar.set_postfix(loss=f"{float(losses[-1].mean()):.4g}")
        if store is not None and (it + 1) % save_every == 0 and it < config.iterations:
            save(it + 1, cost_so_far(it + 1))
    bar.close()
    steps_done = max(start_it, config.iterations)
    cost = cost_so_far(steps_done) if start_it <= config.iterations else prior
    if store is not None and start_it <= config.iterations:
        save(config.iterations + 1, cost, finished=final)
    cost = {**cost, "unet_passes": int(cost["unet_passes"]), "unet_backward": int(cost["unet_backward"]),
            "peak_memory_bytes": _peak_memory(device), "iterations": config.iterations, "resumed_at": start_it,
            "run_key": key}
    return Stage2Output(images=final[1], latents=final[0], z=z_var.detach().float().cpu().numpy(),
                        loss=np.stack(losses), snapshots=snapshots, cost=cost)


@dataclass(frozen=True)
class FastConfig:
    """The fast mode: feature guidance at every step of one sampling pass (universal guidance's forward
    guidance through the clean-latent estimate).

    Attributes:
        scale: step size s of ``eps' = eps + s sqrt(1 - a_t) grad_x L`` (larger: stronger control).
        normalize: divide each image's gradient by its RMS (s is then a step in noise-standard-deviations,
            independent of the loss' scale).
        through_unet: backpropagate through the UNet's noise estimate (True, exact gradient of L(x0(x_t)));
            False treats eps as constant (``grad_x = grad_x0 / sqrt(a_t)``): no UNet backward pass at all.
        repeats: forward-guidance recurrences per step (universal guidance's k; each costs one more UNet pass).
        start, stop: guide only steps start..stop-1 of the denoising (default: all).
        autocast: as in :class:`PublishedConfig`.
    """

    scale: float = 1.0
    normalize: bool = True
    through_unet: bool = True
    repeats: int = 1
    start: int = 0
    stop: int | None = None
    autocast: str | None = None

    def __post_init__(self) -> None:
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats}")
        if not math.isfinite(self.scale):
            raise ValueError(f"scale must be a finite number, got {self.scale}")
        if self.start < 0 or (self.stop is not None and self.stop < self.start):
            raise ValueError(f"need 0 <= start <= stop, got start={self.start}, stop={self.stop}")


def guide_fast(sd: SDModels, clip: ClipVision, z, c, targets: FeatureTargets, seeds: Sequence[int], *,
               config: FastConfig | None = None, sampler_config: SamplerConfig | None = None,
               c_includes_bos: bool = False, progress: bool = True) -> Stage2Output:
    """Stage 2, fast: one guided sampling pass (lesson 05). Arguments as :func:`guide_published`."""

    config = config or FastConfig()
    device = sd.device
    sampler, z0, cond, uncond = _inputs(sd, z, c, targets, seeds, sampler_config, c_includes_bos)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0, calls0 = time.perf_counter(), sampler.unet_calls
    gens = generators([int(s) for s in seeds])
    shape = tuple(z0.shape[1:])
    x = sampler.add_noise(z0.to(sd.dtype), draw_noise(gens, shape, device, sd.dtype))
    steps = sampler.denoise_timesteps
    stop = len(steps) if config.stop is None else config.stop
    bar = progress_bar(total=len(steps), desc="stage 2 (fast)", progress=progress)
    step_losses = []
    backward = 0  # UNet passes backpropagated (through_unet: one per guided evaluation)
    for i, t in enumerate(steps):
        a_t = sampler.alpha(t)
        guided = config.start <= i < stop
        for r in range(config.repeats if guided else 1):
            if guided:
                x_in = x.detach().requires_grad_(True)
                with torch.enable_grad(), _autocast(device, config.autocast):
                    with torch.set_grad_enabled(config.through_unet):   # else eps is a constant
                        eps = sampler.eps(x_in, t, cond, uncond)
                    x0 = sampler.predict_x0(x_in, eps, t)
                    per_image = targets.per_image_loss(image_features(sd, clip, x0, targets)[1])
                grad = torch.autograd.grad(per_image.sum(), x_in)[0]
                if config.through_unet:
                    backward += (1 if uncond is None else 2) * len(x_in)
                if r == 0:
                    step_losses.append(per_image.detach().float().cpu().numpy())
                if config.normalize:
                    rms = grad.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt().clamp_min(1e-12)
                    grad = grad / rms
                eps = eps.detach() + config.scale * math.sqrt(1 - a_t) * grad
            else:
                with torch.no_grad():
                    eps = sampler.eps(x, t, cond, uncond)
            step_noise = draw_noise(gens, shape, device, sd.dtype) if sampler.config.eta > 0 else None
            with torch.no_grad():
                x_next = sampler.step(x.detach(), eps.detach(), t, step_noise)
            # universal guidance's recurrence: go back to level t with fresh noise and guide again
            if guided and r < config.repeats - 1:
                a_prev = sampler.alpha(sampler.previous_timestep(t))
                renoise = draw_noise(gens, shape, device, sd.dtype)
                x = (a_t / a_prev) ** 0.5 * x_next + (1 - a_t / a_prev) ** 0.5 * renoise
            else:
                x = x_next
        bar.update()
    bar.close()
    with torch.no_grad():
        images = features.decode_latents(sd, x)
    cost = {"unet_passes": sampler.unet_calls - calls0, "unet_backward": backward,
            "wall_s": time.perf_counter() - t0, "peak_memory_bytes": _peak_memory(device)}
    step_losses.append(score_images(clip, targets, images))
    return Stage2Output(images=features.to_uint8_images(images), latents=x.float().cpu().numpy(), z=z0.cpu().numpy(),
                        loss=np.stack(step_losses), snapshots={}, cost=cost)


def score_latents(sd: SDModels, clip: ClipVision, targets: FeatureTargets, latents) -> np.ndarray:
    """(n,) feature loss of the images of sampled latents (e.g. stage 1's, to compare with stage 2's)."""
    with torch.no_grad():
        images = features.decode_latents(sd, torch.as_tensor(np.asarray(latents, dtype=np.float32), device=sd.device))
    return score_images(clip, targets, images)


def score_images(clip: ClipVision, targets: FeatureTargets, images) -> np.ndarray:
    """(n,) feature loss of images: float (n, 3, S, S) in [0, 1] or uint8 (n, H, W, 3), e.g. the stimuli."""
    with torch.no_grad():
        feats = features.clip_lowlevel_features(clip, images, differentiable=False,
                                                blocks=[int(b[5:]) for b in targets.blocks],
                                                resize=targets.resize, clamp=targets.clamp)
        return targets.per_image_loss(feats).float().cpu().numpy()


# --------------------------------------------------------------------------------------- resumable state

def run_key(sd: SDModels, clip: ClipVision, z0: torch.Tensor, cond0: torch.Tensor, targets: FeatureTargets,
            seeds: Sequence[int], config: PublishedConfig, sampler_config: SamplerConfig) -> str:
    """A 24-hex-digit hash of everything a published run's result depends on (the models' fingerprints, z, c
    with BOS, the targets and masks, seeds and settings; not the snapshot list): which saved state is this run's
    (:mod:`mdlib.runstate`)."""
    fingerprints = f"{sd.fingerprint('unet')}|{sd.fingerprint('vae')}|{clip.fingerprint()}"
    tensors = [z0, cond0, *targets.blocks.values(), *targets.masks.values()]
    if targets.embedding is not None:
        tensors.append(targets.embedding)
    settings = repr((list(targets.blocks), targets.cos_weight, targets.reduction, targets.block_scale,
                     targets.resize, targets.clamp, [int(s) for s in seeds],
                     asdict(config) | {"snapshots": None}, sampler_config.as_dict()))
    return cache_key(fingerprints, *(float32_bytes(t) for t in tensors), settings, n=24)


#: The cost entries a saved state carries: the whole run's so far, interrupted sessions included.
STATE_COST_KEYS = ("unet_passes", "unet_backward", "wall_s")
#: The entries every saved state has (a file without one was written by an older mdlib).
STATE_FIELDS = ("iteration", "lr", "cost", "z", "c", "losses")


def state_arrays(iteration: int, z_var: torch.Tensor, c_var: torch.Tensor, opt: torch.optim.Optimizer,
                 losses: Sequence[np.ndarray], snapshots: dict[int, np.ndarray], cost: dict,
                 final: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """The published optimisation's state as named arrays (what a :mod:`mdlib.runstate` store keeps).

    ``iteration``: the next iteration to run (``iterations + 1`` once finished); ``z``, ``c``: (n, 4, h, w)
    and (n, tokens, width) float32; ``lr``: the current learning rate; ``losses``: (iteration, n) the losses so
    far; ``cost``: :data:`STATE_COST_KEYS` as float64; ``snap<k>``: iteration k's (n, S, S, 3) uint8 images;
    per optimised tensor k (z first, then c, those that change), the optimiser's ``step<k>``, ``exp_avg<k>``,
    ``exp_avg_sq<k>`` (Adam; plain gradient steps have no state); finished runs: ``final_latents``,
    ``final_images``. :func:`restore_state` reverses it.
    """
    arrays = {"iteration": np.array(int(iteration)), "lr": np.array(float(opt.param_groups[0]["lr"])),
              "cost": np.array([float(cost[k]) for k in STATE_COST_KEYS]),
              "z": z_var.detach().float().cpu().numpy(), "c": c_var.detach().float().cpu().numpy(),
              "losses": np.stack(losses), **{f"snap{k}": v for k, v in snapshots.items()}}
    if final is not None:
        arrays["final_latents"], arrays["final_images"] = final
    for k, p in enumerate(opt.param_groups[0]["params"]):
        st = opt.state.get(p, {})
        if st:
            arrays[f"step{k}"] = np.array(float(st["step"]))
            arrays[f"exp_avg{k}"] = st["exp_avg"].detach().cpu().numpy()
            arrays[f"exp_avg_sq{k}"] = st["exp_avg_sq"].detach().cpu().numpy()
    return arrays


def restore_state(arrays: dict[str, np.ndarray], z_var: torch.Tensor, c_var: torch.Tensor,
                  opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler) -> dict:
    """Put :func:`state_arrays`' state back into z, c, the optimiser and its lr schedule (made as the run
    makes them), so that the next step is the one an uninterrupted run would take. Returns ``iteration``,
    ``losses`` (list of (n,)), ``snapshots``, ``cost`` (dict) and ``final`` ((latents, images), or None while
    the run is not finished)."""
    with torch.no_grad():
        z_var.copy_(torch.as_tensor(arrays["z"]))
        c_var.copy_(torch.as_tensor(arrays["c"]))
    opt_state = opt.state_dict()
    for k, p in enumerate(opt.param_groups[0]["params"]):
        if f"step{k}" in arrays:
            opt_state["state"][k] = {"step": torch.tensor(float(arrays[f"step{k}"])),
                                     "exp_avg": torch.as_tensor(arrays[f"exp_avg{k}"], device=p.device),
                                     "exp_avg_sq": torch.as_tensor(arrays[f"exp_avg_sq{k}"], device=p.device)}
    opt.load_state_dict(opt_state)
    iteration, lr = int(arrays["iteration"]), float(arrays["lr"])
    sched.load_state_dict({**sched.state_dict(), "last_epoch": iteration, "_last_lr": [lr]})
    for g in opt.param_groups:
        g["lr"] = lr
    final = (arrays["final_latents"], arrays["final_images"]) if "final_latents" in arrays else None
    return {"iteration": iteration, "losses": list(arrays["losses"]),
            "snapshots": {int(k[4:]): v for k, v in arrays.items() if k.startswith("snap")},
            "cost": {k: float(v) for k, v in zip(STATE_COST_KEYS, arrays["cost"])}, "final": final}


def state_summary(arrays: dict[str, np.ndarray]) -> dict:
    """The state's progress for people (the store's JSON): iteration, finished, lr, cost, mean loss per
    iteration."""
    cost = {k: float(v) for k, v in zip(STATE_COST_KEYS, arrays["cost"])}
    cost.update({k: int(cost[k]) for k in ("unet_passes", "unet_backward")})
    return {"iteration": int(arrays["iteration"]), "finished": "final_latents" in arrays,
            "lr": float(arrays["lr"]), "cost": cost, "mean_loss": [float(np.mean(v)) for v in arrays["losses"]]}


# ---------------------------------------------------------------------------------------- memory meter

@contextlib.contextmanager
def saved_for_backward(*modules: torch.nn.Module):
    """Count what autograd keeps for the backward pass of the code inside: ``with saved_for_backward(unet) as
    m: ...; m["bytes"]`` is the size of the distinct storages saved, the modules' weights excluded.

    Tensors saved inside a checkpointed region (:meth:`mdlib.sampler.DDIMSampler.sample` with
    ``checkpoint=True``) are not kept (checkpoint's own hooks drop them and the backward pass recomputes them),
    so they do not count: exactly the memory checkpointing saves; what remains per step is one latent. Exact
    and machine-independent, unlike a peak-memory reading (``benchmarks/bench_stage2.py``, lesson 05). Works
    on fake tensors too (``torch._subclasses.FakeTensorMode``: shapes without memory), so that the account of
    the full-size models at 512 px needs no RAM (``benchmarks/bench_memory.py``). Under autocast the
    half-precision copies of the weights that operations save count: they are not the weights' storages."""
    weights = {_storage_key(p) for m in modules for p in m.parameters()}
    storages: dict[int, int] = {}
    meter = {"bytes": 0, "tensors": 0}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in weights and key not in storages:
            storages[key] = t.untyped_storage().nbytes()
            meter["bytes"] += storages[key]
            meter["tensors"] = len(storages)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield meter


def _storage_key(t: torch.Tensor) -> int:
    """A tensor's storage identity (its ``StorageImpl``), shared by its views. Not the data pointer: fake and
    meta tensors have none (all 0)."""
    return t.untyped_storage()._cdata


@contextlib.contextmanager
def live_memory():
    """The memory that tensors made inside take, over time: ``with live_memory() as m: ...``; ``m["peak"]`` is
    the most bytes alive at any moment (forward and backward passes alike), ``m["now"]`` those still alive.

    Counts every storage an operation creates, from that operation until the storage is freed (views and
    in-place results of an existing storage add nothing); what existed before (weights, inputs) and constants
    made from Python values (``torch.tensor(t)``: they exist before an operation sees them) are not counted.
    Exact for the operations run, on real or fake tensors (full size without the memory:
    ``benchmarks/bench_memory.py``). A GPU adds what this cannot see: the CUDA context, the caching
    allocator's rounding and fragmentation, library workspaces (docs/reconstruct.md, "GPU memory")."""
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    meter = {"peak": 0, "now": 0}
    sizes: dict[int, int] = {}
    constants = (torch.ops.aten.lift_fresh.default, torch.ops.aten.lift_fresh_copy.default)

    def free(key: int) -> None:
        meter["now"] -= sizes.pop(key)

    class _Track(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in constants:   # a fake mode's copy of a real constant: real tensors have none
                return out
            inputs = {_storage_key(a) for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)}
            for t in tree_flatten(out)[0]:
                if not isinstance(t, torch.Tensor):
                    continue
                st = t.untyped_storage()
                key = st._cdata
                if key in sizes or key in inputs:
                    continue
                sizes[key] = st.nbytes()
                meter["now"] += sizes[key]
                meter["peak"] = max(meter["peak"], meter["now"])
                # storages keep their Python object while the C++ one lives (autograd's saved tensors included),
                # so this runs when the memory is freed
                weakref.finalize(st, free, key)
            return out

    with _Track():
        yield meter


# ------------------------------------------------------------------------------------------- saving

def save_images(folder: str | os.PathLike, names: Sequence[str], images: np.ndarray) -> Path:
    """Write (n, S, S, 3) uint8 images as ``<folder>/<name>.png``, each atomically. Returns the folder."""
    folder = Path(folder).expanduser()
    names = [str(x) for x in names]
    if len(names) != len(images):
        raise ValueError(f"{len(names)} names for {len(images)} images")
    for name, image in zip(names, images):
        write_png_atomic(folder / f"{name}.png", image)
    return folder

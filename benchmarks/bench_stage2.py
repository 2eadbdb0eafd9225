"""Benchmark of stage 2 (mdlib.stage2): memory and time against the number of denoising steps, and the
published mode against the fast mode on the mini path.

Prints markdown tables (paste them into benchmarks/README.md). Not a test: timings depend on the machine.

    python benchmarks/bench_stage2.py            # full: parts 1-2 about 40 min, 3-4 26 min, 5 12 min, 6 6 min (2 cores)
    python benchmarks/bench_stage2.py --quick    # the same code paths at small sizes: a few minutes

Parts (``--parts``, default all six):

1. ``memory``: one iteration of the published objective (sampler -> VAE decoder -> CLIP features -> loss,
   then the backward pass into z) for 5, 10, 20 and 35 denoising steps, with and without checkpointing each
   step. Each configuration runs in a fresh process: on the CPU its peak memory is the peak resident set
   above what the process held after loading the models and one sampling pass without gradients (Linux'
   VmHWM, reset through /proc/self/clear_refs); on CUDA, ``max_memory_allocated`` above the allocation
   before the iteration. The models are the tiny ones built at 128 px (latents 4 x 32 x 32; at 256 px they
   would be SD's 4 x 64 x 64, but self-attention over 4,096 positions makes one step take ~10 s on 2 CPU
   cores), so activations, not weights, dominate.
2. ``modes``: the course's mini path (mini-NSD subject 1, its decoded CLIP features, the tiny models): stage 1,
   the published mode (``--iterations``, released settings: Adam lr 0.01, ExponentialLR 0.999, z only) and
   the fast mode at a few guidance scales, on the same test images and seeds. Reports the feature loss
   reached, its reduction from stage 1, the share of the published mode's reduction, PixCorr and SSIM
   against the stimuli, UNet passes (forward, as counted; backward), wall time and peak memory.
3. ``lr``: the published mode's Adam learning rate on the mini path's trained models (``"tiny-trained"``) at the
   lessons' 10 iterations (lr 0.01, 0.03, 0.05, 0.1) on 16 test images, next to stage 1 and the fast mode
   (scale 4, as lesson 05): PixCorr, SSIM, the feature loss, and whether it falls at every iteration. Why
   lessons 05-06 use lr 0.05 on the mini path.
4. ``layout``: where the objects are and which way they point (:mod:`mdlib.placement`'s position and axis
   errors) on 16 test images: stage 1 from the true and the decoded (z, c), and the published mode (lr 0.05)
   after 10 and 20 iterations guided by the decoded CLIP features and by the stimuli's own (the oracle).
   Whether stage 2, as the tiny models do it, restores layout, and whether decoding is what limits it.
5. ``landscape``: why it does not, with the stimuli's own features as the target (the oracle) on 16 test
   images: the loss of stage 1's image along the straight path from the decoded z to the stimulus's true z
   (the true end has the right layout), against the loss and layout the published mode reaches (z only, and
   z and c as in the paper's Algorithm 1), and against optimising the image's pixels directly (no sampler,
   no VAE: what the CLIP features alone ask for); then where that loss lives: the class token, the patches the
   stimulus's objects touch, the other (background) patches and the cosine term.
6. ``variants``: the three variants of :mod:`mdlib.method` (``"mdlib"``, ``"released"``, ``"paper"``, each
   ``configure(variant, "mini")``) end to end on 8 test images: each decodes with its own settings (ROI,
   standardisation, decoder, feature selection, CLIP normalisation), runs stage 1 from its decoded (z, c) and
   the published stage 2 with its own loss, optimiser and iterations (10 on the mini preset). Per variant and
   stage: its own loss (first, last, reduction), a common yardstick (the mdlib variant's loss against the
   mdlib-decoded targets), PixCorr, SSIM, position and axis errors, UNet passes per image and wall time. A
   variant that fails or diverges gets its row with the failure; the others still run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

from bench_ridge import fmt_time, load, machine  # noqa: E402  (a sibling script: benchmarks/ is on sys.path)

FULL = dict(steps=(5, 10, 20, 35), batch=1, image_size=128, images=4, iterations=300, scales=(1.0, 2.0, 4.0),
            lr_images=16, lr_iterations=10, lrs=(0.01, 0.03, 0.05, 0.1), layout_images=16, layout_iterations=20,
            landscape_images=16, landscape_alphas=6, pixel_steps=200, variant_images=8, variant_iterations=None)
QUICK = dict(steps=(2, 4), batch=1, image_size=64, images=2, iterations=10, scales=(2.0,),
             lr_images=2, lr_iterations=3, lrs=(0.01, 0.1), layout_images=3, layout_iterations=10,
             landscape_images=3, landscape_alphas=3, pixel_steps=10, variant_images=2, variant_iterations=2)


def _rss_peak_bytes() -> int:
    """Peak resident set since the last :func:`_reset_rss_peak` (Linux VmHWM), else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss_now_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmRSS in /proc/self/status")


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# -- part 1 -----------------------------------------------------------------------------------------------------
def one_iteration(steps: int, checkpoint: bool, batch: int, image_size: int, device: str) -> dict:
    """Forward and backward of the published objective once, in this (fresh) process."""
    from mdlib import models, stage2
    from mdlib.sampler import DDIMSampler, SamplerConfig, generators
    from mdlib.stage1 import unconditional, with_bos

    folder = models.tiny_models_dir(image_size=image_size)
    sd = models.load_sd(folder, device=device)
    clip = models.load_clip_vision(folder, device=device)
    # The published structure: z noised two DDIM levels above the first denoising step (37 -> 35 steps).
    cfg = SamplerConfig(num_steps=50, noise_index=min(steps + 2, 49), denoise_steps=steps)
    sampler = DDIMSampler(sd.unet, sd.scheduler, cfg)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(batch, *sd.latent_shape, generator=g).to(sd.device)
    cond = with_bos(sd, torch.randn(batch, 14, sd.text_width, generator=g))
    uncond = unconditional(sd, 15)
    blocks = [f"block{b}" for b in range(1, 7)]
    probe = stage2.FeatureTargets({b: torch.zeros(1) for b in blocks})   # which features, and how images reach CLIP
    with torch.no_grad():
        _, feats = stage2.image_features(sd, clip, torch.randn(batch, *sd.latent_shape, generator=g).to(sd.device),
                                         probe)
        targets = stage2.FeatureTargets({b: feats[b] for b in blocks}, feats["embedding"])
        sampler.sample(z, cond, uncond, generators(range(batch)))          # warm-up: allocator, kernels
    if sd.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base, exact = _rss_now_bytes(), _reset_rss_peak()
    zz = z.clone().requires_grad_(True)
    calls0 = sampler.unet_calls
    t0 = time.perf_counter()
    with stage2.saved_for_backward(sd.unet, sd.vae, clip.model) as saved:
        loss, _, _ = stage2.render_loss(sd, clip, sampler, zz, cond, uncond, targets, generators(range(batch)),
                                        checkpoint=checkpoint)
    loss.sum().backward()
    if sd.device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _rss_peak_bytes() - base if exact else float("nan")
    wall = time.perf_counter() - t0
    assert torch.isfinite(zz.grad).all()
    latent_bytes = z.numel() * z.element_size()
    return dict(steps=steps, checkpoint=checkpoint, wall_s=wall, peak_bytes=peak, latent_bytes=latent_bytes,
                saved_bytes=saved["bytes"],
                unet_forward=sampler.unet_calls - calls0, batch=batch, latent_shape=list(sd.latent_shape),
                device=str(sd.device))


def part_memory(args, cfg) -> None:
    rows = []
    for steps in cfg["steps"]:
        for ckpt in (False, True):
            cmd = [sys.executable, __file__, "--child", json.dumps(dict(steps=steps, checkpoint=ckpt,
                                                                        batch=cfg["batch"],
                                                                        image_size=cfg["image_size"],
                                                                        device=args.device))]
            out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(f"  {steps} steps, checkpoint {ckpt}: {rows[-1]['wall_s']:.1f} s", file=sys.stderr, flush=True)
    r0 = rows[0]
    print("## 1. One published iteration (forward + backward) against the number of denoising steps\n")
    print(f"Tiny models at {cfg['image_size']} px (latents {' x '.join(map(str, r0['latent_shape']))}), "
          f"{r0['batch']} image(s), guidance 5 (2 UNet passes per step and image), {r0['device']}; peak memory "
          "above the models and a no-grad sampling pass.\n")
    print("| denoising steps | checkpointing | UNet forward passes | wall time | peak memory | per step "
          "| saved for backward |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        mb = r["peak_bytes"] / 2**20
        print(f"| {r['steps']} | {'yes' if r['checkpoint'] else 'no'} | {r['unet_forward']} | {fmt_time(r['wall_s'])} "
              f"| {mb:.0f} MB | {mb / r['steps']:.1f} MB | {r['saved_bytes'] / 2**20:.1f} MB |")
    print(f"\nOne latent batch is {r0['latent_bytes'] / 2**10:.0f} KB. Peak memory: the resident set (CPU) or the "
          "CUDA allocation above the baseline, allocator slack included. Saved for backward: the distinct tensors "
          "autograd keeps outside checkpointed steps (exact; the latents between checkpointed steps, "
          f"one latent per step, are in it). {load()}.\n", flush=True)


# -- part 2 -----------------------------------------------------------------------------------------------------
def mini_decoded(args, n_images: int, source: str) -> tuple:
    """The mini path's models ``source``, subject 1's decoded features (posterior mean, as the lessons), the
    rows of its first ``n_images`` test images and their stimuli: (sd, clip, decoded, rows, stimuli)."""
    from mdlib import decoding, models, paths
    from mdlib.nsd.stimuli import StimulusReader
    from mdlib.synth.write import ensure_mini_nsd

    root = paths.data_root(args.data_root, "mini")
    ensure_mini_nsd(root)
    sd = models.load_sd(source, device=args.device)
    clip = models.load_clip_vision(source, device=args.device)
    dec = decoding.decode_features(root, 1, sd, clip, posterior="mean", progress=False)
    rows = list(range(min(n_images, len(dec.nsd_ids))))
    with StimulusReader(root) as reader:
        stim = reader.read(dec.nsd_ids[rows])
    return sd, clip, dec, rows, stim


def mini_inputs(args, n_images: int, source: str) -> tuple:
    """The mini path's stage-2 inputs for subject 1's first ``n_images`` test images, with models ``source``:
    (sd, clip, z, c, targets, seeds, scores) where scores(images) -> (PixCorr, SSIM) against the stimuli."""
    from mdlib import metrics, stage2
    from mdlib.sampler import image_seed

    sd, clip, dec, rows, stim = mini_decoded(args, n_images, source)
    ids = dec.nsd_ids[rows]
    targets = stage2.FeatureTargets.from_decoded(dec, rows, device=sd.device)

    def scores(images) -> tuple[float, float]:
        return float(metrics.pixcorr(images, stim)), float(metrics.ssim(images, stim))

    return sd, clip, dec.pred["z"][rows], dec.pred["c"][rows], targets, [image_seed(i) for i in ids], scores


def part_modes(args, cfg) -> None:
    from mdlib import stage1, stage2

    sd, clip, z, c, targets, seeds, scores = mini_inputs(args, cfg["images"], "tiny")
    rows = list(range(len(seeds)))

    t0 = time.perf_counter()
    s1 = stage1.img2img(sd, z, c, seeds, progress=False)
    s1_wall = time.perf_counter() - t0
    base = stage2.score_latents(sd, clip, targets, s1.latents)
    table = [dict(mode="stage 1 (no control)", loss=float(base.mean()), backward=0, wall=s1_wall, peak=float("nan"),
                  forward=s1.config.unet_evaluations(len(rows)), scores=scores(s1.images))]
    iters = cfg["iterations"]
    print(f"  published mode, {iters} iterations ...", file=sys.stderr, flush=True)
    pub = stage2.guide_published(sd, clip, z, c, targets, seeds, progress=not args.no_progress,
                                 config=stage2.PublishedConfig(iterations=iters, snapshots=()))
    curve = pub.loss.mean(1)
    for k in sorted({k for k in (30, 90, 180) if k < iters} | {iters}):
        frac = k / iters
        table.append(dict(mode=f"published, {k} iterations", loss=float(curve[k]),
                          forward=round(pub.cost["unet_passes"] * frac),
                          backward=round(pub.cost["unet_backward"] * frac),
                          wall=pub.cost["wall_s"] * frac, peak=pub.cost["peak_memory_bytes"],
                          scores=scores(pub.images) if k == iters else None))
    for through in (True, False):
        for s in cfg["scales"]:
            out = stage2.guide_fast(sd, clip, z, c, targets, seeds, progress=False,
                                    config=stage2.FastConfig(scale=s, through_unet=through))
            table.append(dict(mode=f"fast, scale {s:g}{'' if through else ', eps held constant'}",
                              loss=float(out.loss[-1].mean()), forward=out.cost["unet_passes"],
                              backward=out.cost["unet_backward"], wall=out.cost["wall_s"],
                              peak=out.cost["peak_memory_bytes"], scores=scores(out.images)))
    pub_red = table[0]["loss"] - float(curve[-1])
    pub_passes = pub.cost["unet_passes"] + pub.cost["unet_backward"]
    print(f"## 2. Published vs fast mode on the mini path: {len(rows)} test images of mini-NSD subject 1\n")
    print("Feature loss: the masked per-block MSE + 0.1 (1 - cos) of each image's CLIP features against the "
          "fMRI-decoded ones, mean over images. Published rows before the last are the same run read at that "
          "iteration (cost pro rata). UNet passes: the totals over the images.\n")
    print("| mode | feature loss | reduction from stage 1 | share of the published reduction | PixCorr | SSIM "
          "| UNet passes: forward + backward | share of the published passes | wall time |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in table:
        red = table[0]["loss"] - r["loss"]
        passes = r["forward"] + r["backward"]
        sc = "" if r["scores"] is None else r["scores"]
        pc, ss = ("-", "-") if not sc else (f"{sc[0]:.3f}", f"{sc[1]:.3f}")
        print(f"| {r['mode']} | {r['loss']:.4f} | {100 * red / table[0]['loss']:.1f}% "
              f"| {100 * red / pub_red:.0f}% | {pc} | {ss} | {r['forward']} + {r['backward']} "
              f"| 1/{pub_passes / passes:.0f} | {fmt_time(r['wall'])} |" if passes else "")
    print(f"\nStage 1 PixCorr/SSIM are the first row's; the published run's peak memory (RSS, whole process): "
          f"{pub.cost['peak_memory_bytes'] / 2**30:.2f} GB. {load()}.\n", flush=True)


def _print_table(columns, formats, rows) -> None:
    """A markdown table (one format string per column), then the machine's load."""
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(f.format(v) for f, v in zip(formats, row)) + " |")
    print(f"\n{load()}.\n", flush=True)


def part_lr(args, cfg) -> None:
    """The published mode's Adam learning rate on the mini path's trained models, at the mini path's iteration
    count: how far each lr gets in PixCorr, SSIM and feature loss, next to stage 1 and the fast mode."""
    from mdlib import stage1, stage2

    sd, clip, z, c, targets, seeds, scores = mini_inputs(args, cfg["lr_images"], "tiny-trained")
    iters = cfg["lr_iterations"]
    s1 = stage1.img2img(sd, z, c, seeds, progress=False)
    rows = [("stage 1", *scores(s1.images), float(stage2.score_latents(sd, clip, targets, s1.latents).mean()), "")]
    fast = stage2.guide_fast(sd, clip, z, c, targets, seeds, progress=False, config=stage2.FastConfig(scale=4.0))
    rows.append(("fast, scale 4 (one pass)", *scores(fast.images), float(fast.loss[-1].mean()), ""))
    for lr in cfg["lrs"]:
        print(f"  published, lr {lr:g}, {iters} iterations ...", file=sys.stderr, flush=True)
        out = stage2.guide_published(sd, clip, z, c, targets, seeds, progress=False,
                                     config=stage2.PublishedConfig(iterations=iters, lr=lr, snapshots=()))
        curve = out.loss.mean(1)
        rows.append((f"published, lr {lr:g}", *scores(out.images), float(curve[-1]),
                     "yes" if (np.diff(curve) < 0).all() else "no"))
    print(f"## 3. The published mode's learning rate on the mini path: {len(seeds)} test images of mini-NSD "
          f"subject 1, trained tiny models, {iters} iterations\n")
    _print_table(("run", "PixCorr", "SSIM", "feature loss", "loss falls at every iteration"),
                 ("{}", "{:.3f}", "{:.3f}", "{:.4f}", "{}"), rows)


def _placement_errors(images, stim) -> tuple[float, float]:
    """Mean position error (image sides) and mean axis error (degrees) of images against the stimuli."""
    from mdlib import placement

    return (float(np.nanmean(placement.position_error(images, stim))),
            float(np.nanmean(placement.axis_error(images, stim))))


def part_layout(args, cfg) -> None:
    """What stage 2 restores of the layout on the mini path: position and axis errors (:mod:`mdlib.placement`)
    of stage 1 and of the published mode (lr 0.05, the lessons' mini setting) after 10 and
    ``layout_iterations`` iterations, guided by the decoded CLIP features and by the stimuli's own (the oracle:
    what perfect decoding of the features would give), next to PixCorr and SSIM."""
    from mdlib import metrics, placement, stage1, stage2
    from mdlib.sampler import image_seed

    sd, clip, dec, rows, stim = mini_decoded(args, cfg["layout_images"], "tiny-trained")
    seeds = [image_seed(i) for i in dec.nsd_ids[rows]]
    z, c = dec.pred["z"][rows], dec.pred["c"][rows]
    iters = cfg["layout_iterations"]
    others = stim[np.roll(np.arange(len(rows)), 1)]

    def row(name, images):
        return (name, float(metrics.pixcorr(images, stim)), float(metrics.ssim(images, stim)),
                *_placement_errors(images, stim))

    table = [row("another test image (chance)", others),
             row("stage 1, true (z, c) (the img2img ceiling)",
                 stage1.img2img(sd, dec.true["z"][rows], dec.true["c"][rows], seeds, progress=False).images),
             row("stage 1, decoded (z, c)", stage1.img2img(sd, z, c, seeds, progress=False).images)]
    for use, label in (("pred", "decoded features"), ("true", "the stimuli's own features (oracle)")):
        print(f"  published, {label}, {iters} iterations ...", file=sys.stderr, flush=True)
        targets = stage2.FeatureTargets.from_decoded(dec, rows, device=sd.device, use=use)
        out = stage2.guide_published(sd, clip, z, c, targets, seeds, progress=not args.no_progress,
                                     config=stage2.PublishedConfig(iterations=iters, lr=0.05, snapshots=(10,)))
        for it in sorted(out.snapshots):
            table.append(row(f"published, {label}, {it} iterations", out.snapshots[it]))
    n_axes = int(np.isfinite(placement.axis_error(stim, stim)).sum())
    print(f"## 4. Layout: what stage 2 restores on the mini path ({len(rows)} test images of mini-NSD subject 1, "
          f"trained tiny models; the axis error counts the {n_axes} stimuli whose objects have an axis)\n")
    _print_table(("images", "PixCorr", "SSIM", "position error (image sides)", "axis error (degrees)"),
                 ("{}", "{:.3f}", "{:.3f}", "{:.3f}", "{:.1f}"), table)


def part_landscape(args, cfg) -> None:
    """Why stage 2 leaves the objects where stage 1 put them on the mini path. With the stimuli's own features
    as the target, the loss of stage 1's image is followed along ``z(a) = (1 - a) z_decoded + a z_true``: at
    a = 1 the image has the stimulus's layout. If the published mode reaches a lower loss than that end with
    the layout unchanged, the objective itself prefers re-colouring to moving objects among the images the
    tiny models draw. Optimising the pixels directly shows what the CLIP features alone ask for."""
    from mdlib import features, metrics, stage1, stage2
    from mdlib.sampler import image_seed

    sd, clip, dec, rows, stim = mini_decoded(args, cfg["landscape_images"], "tiny-trained")
    seeds = [image_seed(i) for i in dec.nsd_ids[rows]]
    z, c, z_true = dec.pred["z"][rows], dec.pred["c"][rows], dec.true["z"][rows]
    targets = stage2.FeatureTargets.from_decoded(dec, rows, device=sd.device, use="true")

    def oracle_loss(images) -> float:
        with torch.no_grad():
            feats = features.clip_lowlevel_features(clip, images, differentiable=False)
            return float(targets.per_image_loss(feats).mean())

    def row(name, images):
        return (name, oracle_loss(images), float(metrics.pixcorr(images, stim)), *_placement_errors(images, stim))

    alphas = np.linspace(0.0, 1.0, cfg["landscape_alphas"])
    path = [stage1.img2img(sd, (1.0 - a) * z + a * z_true, c, seeds, progress=False).images for a in alphas]
    table = [row(f"stage 1 from z({a:.1f})", images) for a, images in zip(alphas, path)]
    start = path[0]  # stage 1 from the decoded z: where the pixel optimisation below begins
    split = {"stage 1 from z(0.0) (decoded)": start, "stage 1 from z(1.0) (true z)": path[-1]}
    for update in (("z",), ("z", "c")):
        print(f"  published, oracle, update {update}, 10 iterations ...", file=sys.stderr, flush=True)
        out = stage2.guide_published(sd, clip, z, c, targets, seeds, progress=not args.no_progress,
                                     config=stage2.PublishedConfig(iterations=10, lr=0.05, update=update,
                                                                   snapshots=()))
        table.append(row(f"published from z(0.0), update {' and '.join(update)}, 10 iterations", out.images))
        split[f"published, update {' and '.join(update)}, 10 iterations"] = out.images
    # The pixels themselves as the parameters (through a sigmoid, so they stay in [0, 1]), from stage 1's image.
    x = features.to_unit_images(start, sd.device).clamp(0.01, 0.99)
    param = torch.logit(x).clone().requires_grad_(True)
    opt = torch.optim.Adam([param], lr=0.02)
    for _ in range(cfg["pixel_steps"]):
        loss = targets.per_image_loss(features.clip_lowlevel_features(clip, torch.sigmoid(param))).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    pixels = features.to_uint8_images(torch.sigmoid(param.detach()))
    table.append(row(f"pixels optimised directly from z(0.0)'s image, {cfg['pixel_steps']} Adam steps", pixels))
    split[f"pixels, {cfg['pixel_steps']} Adam steps"] = pixels
    print(f"## 5. Why the objects stay put: the oracle objective's landscape ({len(rows)} test images of mini-NSD "
          "subject 1, trained tiny models, published mode lr 0.05)\n")
    print("Oracle loss: the stage-2 loss (25% best-decoded features per block, + 0.1 (1 - cos)) against the "
          "stimuli's own CLIP features, mean over images. z(a) = (1 - a) z_decoded + a z_true, decoded c.\n")
    _print_table(("images", "oracle loss", "PixCorr", "position error (image sides)", "axis error (degrees)"),
                 ("{}", "{:.4f}", "{:.3f}", "{:.3f}", "{:.1f}"), table)
    _print_loss_by_region(clip, targets, stim, split)


def _print_loss_by_region(clip, targets, stim, images_by_name: dict) -> None:
    """Where the oracle loss lives: the class token, the patches the stimulus's objects touch, the other
    (background) patches, and the cosine term (mean over images; the four add up to the oracle loss)."""
    from mdlib import features, placement

    grid = int(round((clip.n_tokens - 1) ** 0.5))
    touched = placement.patch_coverage(placement.object_masks(stim, size=16 * grid), grid).reshape(len(stim), -1) > 0
    touched = torch.as_tensor(touched)
    rows = []
    for name, images in images_by_name.items():
        with torch.no_grad():
            feats = features.clip_lowlevel_features(clip, images, differentiable=False)
            per_token = targets.per_token_loss(feats).cpu()
            cos = targets.cosine_term(feats).cpu()
        patches = per_token[:, 1:]
        rows.append((name, float(per_token[:, 0].mean()), float((patches * touched).sum(1).mean()),
                     float((patches * ~touched).sum(1).mean()), float(cos.mean()),
                     float((per_token.sum(1) + cos).mean())))
    print(f"\nWhere the oracle loss lives: the {grid} x {grid} patch tokens that the stimulus's objects touch "
          f"({float(touched.sum(1).float().mean()):.1f} of {grid * grid} on average) against the others.\n")
    _print_table(("images", "class token", "object patches", "background patches", "0.1 (1 - cos)", "total"),
                 ("{}", "{:.4f}", "{:.4f}", "{:.4f}", "{:.4f}", "{:.4f}"), rows)


# -- part 6 -----------------------------------------------------------------------------------------------------
def _variant_models(config, device: str, loaded: dict) -> tuple:
    """(sd, clip) for a :class:`mdlib.method.MethodConfig`, loading each model once: the SD models per
    ``sd_model``, CLIP per (``clip_model``, ``clip_normalization``) (the variants differ in the latter)."""
    from mdlib import models

    sd_key, clip_key = ("sd", config.sd_model), ("clip", config.clip_model, config.clip_normalization)
    if sd_key not in loaded:
        loaded[sd_key] = models.load_sd(config.sd_model, device=device)
    if clip_key not in loaded:
        loaded[clip_key] = models.load_clip_vision(config.clip_model, device=device,
                                                   normalization=config.clip_normalization)
    return loaded[sd_key], loaded[clip_key]


def _failure(err: BaseException) -> str:
    """A table cell for an exception (its traceback goes to stderr)."""
    import traceback

    traceback.print_exception(type(err), err, err.__traceback__, file=sys.stderr)
    text = " ".join(f"{type(err).__name__}: {err}".split())
    return "failed: " + (text if len(text) <= 160 else text[:157] + "...").replace("|", "/")


def part_variants(args, cfg) -> None:
    """The three variants of :mod:`mdlib.method` (``"mdlib"``, ``"released"``, ``"paper"``, each with the
    ``"mini"`` preset) end to end on the mini path: each decodes with its own settings, runs stage 1 from its
    decoded (z, c) and the published stage 2 with its own optimiser, loss and targets, on the same test images
    and seeds. Each row gives the variant's own loss, one common yardstick (the "mdlib" variant's loss against
    the mdlib-decoded targets, scored with the mdlib variant's CLIP), PixCorr, SSIM, layout errors and cost."""
    from mdlib import decoding, method, metrics, paths, placement, stage1, stage2
    from mdlib.nsd.stimuli import StimulusReader
    from mdlib.sampler import image_seed
    from mdlib.synth.write import ensure_mini_nsd

    root = paths.data_root(args.data_root, "mini")
    ensure_mini_nsd(root)
    n, loaded, table, notes = cfg["variant_images"], {}, [], []
    ids = stim = yard = None   # set by the "mdlib" variant, which runs first
    for variant in method.VARIANTS:
        config = method.configure(variant, "mini")
        if cfg["variant_iterations"]:
            config = config.replace(iterations=cfg["variant_iterations"])
        pub, smp = config.published, config.sampler
        iters = pub.iterations
        label = (f"{variant}: {config.decoder}, {config.roi}, {config.clip_normalization} normalisation, "
                 f"loss {config.loss}, {pub.optimizer} lr {pub.lr:g} (gamma {pub.gamma:g}), update "
                 f"{' and '.join(pub.update)}, {'fresh' if pub.fresh_noise else 'fixed'} noise")
        notes.append(label)
        print(f"  variant {variant}: decoding ...", file=sys.stderr, flush=True)
        s1_row = s2_row = None
        try:
            sd, clip = _variant_models(config, args.device, loaded)
            cached = set((paths.cache_dir(root) / "decoded").glob("*.npz"))
            t0 = time.perf_counter()
            dec = decoding.decode_features(root, 1, sd, clip, device=args.device, progress=False,
                                           **config.decode_kwargs())
            decode_wall = time.perf_counter() - t0
            fitted = len(set((paths.cache_dir(root) / "decoded").glob("*.npz")) - cached)
            if variant == "mdlib":
                ids = dec.nsd_ids[:n].copy()
            if ids is None:
                raise RuntimeError("the mdlib variant, which runs first and fixes the test images, failed")
            where = {int(i): k for k, i in enumerate(dec.nsd_ids)}
            missing = [int(i) for i in ids if int(i) not in where]
            if missing:
                raise ValueError(f"the {variant} variant's test set lacks nsdIds {missing} of the mdlib run's")
            rows = [where[int(i)] for i in ids]
            if stim is None:
                with StimulusReader(root) as reader:
                    stim = reader.read(ids)
            seeds = [image_seed(i, config.seed) for i in ids]
            z, c = dec.pred["z"][rows], dec.pred["c"][rows]
            targets = config.targets(dec, rows=rows, device=sd.device)
            if variant == "mdlib":
                yard = (clip, targets)   # the common yardstick: mdlib's loss, mdlib's CLIP, mdlib's targets
            notes[-1] += (f"; decoded in {fmt_time(decode_wall)} ({fitted} families fitted, "
                          f"{len(dec.pred) - fitted} read from the cache)")
        except Exception as err:  # noqa: BLE001  (reported in the table and on stderr)
            cell = _failure(err)
            table += [(variant, "stage 1", cell), (variant, f"stage 2, {iters} iterations", cell)]
            continue

        def scores(images, own_first, own_last, z_change, passes, backward, wall, status):
            yard_loss = (float(stage2.score_images(yard[0], yard[1], images).mean()) if yard is not None
                         else float("nan"))
            red = "-" if own_last is None else f"{100 * (own_first - own_last) / own_first:.1f}%"
            return (f"{own_first:.4g}", "-" if own_last is None else f"{own_last:.4g}", red, f"{yard_loss:.4f}",
                    f"{metrics.pixcorr(images, stim):.3f}", f"{metrics.ssim(images, stim):.3f}",
                    *(f"{e:.3f}" if k == 0 else f"{e:.1f}" for k, e in enumerate(_placement_errors(images, stim))),
                    "-" if z_change is None else f"{z_change:.3f}", f"{passes:g} + {backward:g}", fmt_time(wall),
                    status)

        try:
            print(f"  variant {variant}: stage 1 ...", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            s1 = stage1.img2img(sd, z, c, seeds, config=smp, progress=False)
            s1_wall = time.perf_counter() - t0
            own = float(stage2.score_images(clip, targets, s1.images).mean())
            s1_row = (variant, "stage 1", *scores(s1.images, own, None, None, smp.unet_evaluations(1), 0, s1_wall,
                                                  "ok"))
        except Exception as err:  # noqa: BLE001
            s1_row = (variant, "stage 1", _failure(err))
        noise_row = None
        if pub.fresh_noise:   # what the last iteration's fresh noise alone does to stage 1's image (z unchanged)
            name = f"stage 1, iteration {iters}'s noise (z unchanged)"
            try:
                t0 = time.perf_counter()
                last = stage1.img2img(sd, z, c, [s + iters * 7919 for s in seeds], config=smp, progress=False)
                wall = time.perf_counter() - t0
                own = float(stage2.score_images(clip, targets, last.images).mean())
                noise_row = (variant, name, *scores(last.images, own, None, None, smp.unet_evaluations(1), 0, wall,
                                                    "ok"))
            except Exception as err:  # noqa: BLE001
                noise_row = (variant, name, _failure(err))
        try:
            print(f"  variant {variant}: published stage 2, {iters} iterations ...", file=sys.stderr, flush=True)
            out = stage2.guide_published(sd, clip, z, c, targets, seeds, config=pub, sampler_config=smp,
                                         progress=not args.no_progress)
            curve = out.loss.mean(1)
            z0 = np.asarray(z, dtype=np.float64)
            z_change = float(np.sqrt(((out.z - z0) ** 2).mean() / (z0 ** 2).mean()))
            bad = np.flatnonzero(~np.isfinite(out.loss).all(1))
            status = "ok" if not len(bad) else f"diverged: non-finite loss from iteration {bad[0]}"
            if 0 in out.snapshots and s1_row is not None and len(s1_row) > 3:
                diff = int(np.abs(out.snapshots[0].astype(int) - s1.images.astype(int)).max())
                notes[-1] += f"; stage 2's iteration-0 image vs stage 1's: max pixel difference {diff}"
            s2_row = (variant, f"stage 2, {iters} iterations",
                      *scores(out.images, float(curve[0]), float(curve[-1]), z_change, out.cost["unet_passes"] / n,
                              out.cost["unet_backward"] / n, out.cost["wall_s"], status))
        except Exception as err:  # noqa: BLE001
            s2_row = (variant, f"stage 2, {iters} iterations", _failure(err))
        table += [r for r in (s1_row, noise_row, s2_row) if r is not None]

    columns = ("variant", "images", "own loss: first", "own loss: last", "own reduction", "yardstick loss",
               "PixCorr", "SSIM", "position error (image sides)", "axis error (degrees)", "z change (relative)",
               "UNet passes per image: forward + backward", "wall time", "status")
    width = len(columns)
    n_axes = "no" if stim is None else int(np.isfinite(placement.axis_error(stim, stim)).sum())
    print(f"## 6. The three variants end to end on the mini path ({n} test images of mini-NSD subject 1, trained "
          "tiny models, each variant's own decoding and published stage 2; the axis error counts the "
          f"{n_axes} stimuli whose objects have an axis)\n")
    print("Own loss: the variant's stage-2 loss against its own decoded targets, mean over images (stage 1: of its "
          "image; stage 2: at iteration 0 (stage 1's image) and at the last iteration). Yardstick: the mdlib "
          "variant's loss (mean over the kept features + 0.1 (1 - cos)) against the mdlib-decoded targets, with "
          "the mdlib variant's CLIP (CLIP normalisation), for every row. Same nsdIds and sampler seeds in every "
          "row; the stimuli are the reference of PixCorr, SSIM and the layout errors. z change: RMS(z_final - z) / "
          "RMS(z) of stage 2's z against the decoded z (c's change, in the paper's variant, is not returned). "
          "Variants with fresh noise get a control row: stage 1 from the unchanged z with the noise of stage 2's "
          "last iteration (seed + 7919 x iterations, PublishedConfig.fresh_noise).\n")
    rows = [r if len(r) == width else (*r[:2], *(["-"] * (width - 3)), r[2]) for r in table]
    _print_table(columns, ["{}"] * width, rows)
    print(f"Test images (nsdIds): {', '.join(str(int(i)) for i in ids) if ids is not None else 'none'}.\n")
    for line in notes:
        print(f"- {line}")
    print(flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, same code paths")
    ap.add_argument("--parts", default="memory,modes,lr,layout,landscape,variants")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--data-root", default="",
                    help="mini-NSD root (default: $MDLIB_DATA/mini-nsd, written if missing)")
    ap.add_argument("--iterations", type=int, default=None, help="published-mode iterations (default 300; quick 10)")
    ap.add_argument("--images", type=int, default=None, help="test images in part 2 (default 4; quick 2)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.child:
        print(json.dumps(one_iteration(**json.loads(args.child))))
        return
    cfg = dict(QUICK if args.quick else FULL)
    if args.iterations:
        cfg["iterations"] = args.iterations
    if args.images:
        cfg["images"] = args.images
    parts = args.parts.split(",")
    print(f"# mdlib.stage2 benchmark{' (--quick)' if args.quick else ''}, {datetime.date.today()}\n")
    print(f"Machine: {machine()}\n")
    if "memory" in parts:
        part_memory(args, cfg)
    if "modes" in parts:
        part_modes(args, cfg)
    if "lr" in parts:
        part_lr(args, cfg)
    if "layout" in parts:
        part_layout(args, cfg)
    if "landscape" in parts:
        part_landscape(args, cfg)
    if "variants" in parts:
        part_variants(args, cfg)


if __name__ == "__main__":
    main()

"""Issue 27's experiment: does stage 2 restore a scene's large-scale layout on the mini path?

A mini-NSD written with layouts (``write_mini_nsd(..., layout_share=...)``, docs/mini_world.md, "Scene
layouts") and tiny models trained on such scenes are needed; this script measures, it does not train.
Prints markdown tables (paste them into benchmarks/README.md). Not a test: the numbers depend on the models.

    python benchmarks/bench_layout.py --data-root ~/mdlib-data/mini-nsd-layout \\
        --models ~/mdlib-data/models/tiny-layout          # 16 test images with a layout, subject 1
    python benchmarks/bench_layout.py --quick --data-root ... --models tiny-trained   # 3 images: does it run

On the first ``--images`` test images of the subject whose stimulus has a boundary (:func:`mdlib.placement.
fit_boundary`), with the method's mini settings (``mdlib.method.configure("mdlib", "mini")``: the lessons'
decoding, sampler and published stage 2, lr 0.05), it reports:

1. the measure against the renderer: :func:`~mdlib.placement.fit_boundary` on the stimuli against the
   boundaries mini-NSD drew (``mini_truth/scenes.npz``), so that the errors below are errors of the images;
2. the layout errors (:func:`mdlib.placement.layout_errors`: the region error, the share of the image on the
   wrong side of the boundary; the angle error; the position error, the horizon's height error) of: another
   test image (chance), stage 1 from the true (z, c) (the img2img ceiling), stage 1 from the decoded (z, c),
   the published stage 2 after 10 and ``--iterations`` iterations guided by the decoded CLIP features and by
   the stimuli's own (the oracle), and the fast mode; with PixCorr beside them;
3. the tiny CLIP's mirror correlation per block: the Pearson correlation between a stimulus's patch-token
   features and its left-right mirror image's, mean over the images, next to the correlation with another
   test image's (the issue found 0.87-0.91 on mini-NSD's layout-free scenes: CLIP's blocks barely told a
   scene from its mirror image, so a loss on them could not ask for a layout); with ``--models`` a folder,
   for the shipped CLIP (before) and that folder's (after), on the same stimuli;
4. whether the objective itself asks for the layout (:func:`landscape`): the oracle loss (against the
   stimuli's own CLIP features) of every image above, of stage 1 along the path from the decoded z to the
   true one, and of the pixels optimised directly on it, each with its region error;
5. the success test, fixed before any run (issue 27): *the published stage 2 (10 iterations, decoded
   features, the lessons' setting) lowers the region error of stage 1 from the decoded (z, c) by at least a
   quarter of the way to the ceiling (stage 1 from the true (z, c)), on the mean over the test images, and
   a one-sided paired Wilcoxon signed-rank test across the images gives p < 0.05.* The fraction, the test's
   statistic and p-value (and a paired t-test's, for reference) are printed with the verdict.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import sys
import time

import numpy as np
import torch

from bench_ridge import fmt_time, machine  # noqa: E402  (a sibling script: benchmarks/ is on sys.path)
from bench_stage2 import _print_table  # noqa: E402  (the same tables as bench_stage2.py's)

FULL = dict(images=16, iterations=20, scan=200, pixel_steps=200)
QUICK = dict(images=3, iterations=4, scan=60, pixel_steps=10)
#: The success test (issue 27), fixed in advance: the share of the way from stage 1 (decoded) to the ceiling
#: that the published stage 2 must cover on the mean region error, and the paired test's level.
SUCCESS_FRACTION = 0.25
SUCCESS_ALPHA = 0.05
#: The published run the success test reads: the lessons' 10 iterations.
SUCCESS_ITERATIONS = 10


def select_images(root, decoded, n_images: int, scan: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows (into ``decoded``'s test images) and stimuli of the first ``n_images`` test images whose stimulus
    has a boundary, looking at the first ``scan`` test images at most."""
    from mdlib import placement
    from mdlib.nsd.stimuli import StimulusReader

    ids = decoded.nsd_ids[:scan]
    with StimulusReader(root) as reader:
        stim = reader.read(ids)
    found = np.flatnonzero(placement.fit_boundary(stim).found)[:n_images]
    if len(found) < 2:
        raise SystemExit(f"only {len(found)} of the first {len(ids)} test images of {root} have a layout: write "
                         "mini-NSD with layouts (write_mini_nsd(..., layout_share=0.5)) or raise --scan")
    return found, stim[found]


def measure_vs_truth(root, ids: np.ndarray, stim: np.ndarray) -> str:
    """One line: the boundary fitted on the stimuli against the one the renderer drew (scenes.npz)."""
    from mdlib import placement
    from mdlib.synth import scenes
    from mdlib.synth.write import SCENES_TRUTH

    path = root / SCENES_TRUTH
    if not path.is_file():
        return f"no {SCENES_TRUTH} under {root}: the measure is not checked against the renderer"
    with np.load(path, allow_pickle=False) as z:
        if "layout_kind" not in z.files:
            return f"{SCENES_TRUTH} records no layouts: this mini-NSD was written without them"
        drawn = scenes.scenes_from_arrays({k: z[k] for k in z.files})
    fit = placement.fit_boundary(stim)
    ang, pos = [], []
    for i, nsd in enumerate(ids):
        lay = drawn[int(nsd)].layout
        if lay is None:
            continue
        angle = lay.line()[2]
        d = abs(fit.angle[i] - angle) % 180.0
        ang.append(min(d, 180.0 - d))
        pos.append(abs((fit.height[i] if lay.kind == "horizon" else fit.across[i]) - lay.position))
    if not ang:
        return "none of these stimuli has a drawn layout"
    return (f"the measure on the {len(ang)} stimuli against the boundaries mini-NSD drew: angle error mean "
            f"{np.mean(ang):.2f} (max {np.max(ang):.2f}) degrees, position error mean {np.mean(pos):.4f} "
            f"(max {np.max(pos):.4f}) image sides")


def mirror_correlations(clip, stim: np.ndarray) -> list[tuple]:
    """Per CLIP block: mean over images of the Pearson r between the stimulus's patch-token features and
    its mirror image's, and between it and another test image's (rows: block, r mirror, r other)."""
    from mdlib import features

    others = stim[np.roll(np.arange(len(stim)), 1)]
    with torch.no_grad():
        f = features.clip_lowlevel_features(clip, stim, differentiable=False)
        fm = features.clip_lowlevel_features(clip, np.ascontiguousarray(stim[:, :, ::-1]), differentiable=False)
        fo = features.clip_lowlevel_features(clip, others, differentiable=False)

    def r(a, b):
        a = a[:, 1:].reshape(len(a), -1).double()
        b = b[:, 1:].reshape(len(b), -1).double()
        a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
        return float(((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).mean())

    blocks = sorted((k for k in f if k.startswith("block")), key=lambda k: int(k[5:]))
    return [(k, r(f[k].cpu(), fm[k].cpu()), r(f[k].cpu(), fo[k].cpu())) for k in blocks]


def landscape(sd, clip, config, dec, rows, stim, seeds, images: dict, pixel_steps: int) -> tuple[list, list]:
    """Does the objective itself ask for the stimulus's layout? Scored with the *oracle* loss (stage 2's loss
    against the stimuli's own CLIP features, so decoding errors play no part): every image of ``images``, stage 1
    along z(a) = (1 - a) z_decoded + a z_true (decoded c; at a = 1 the stimulus's layout), and the pixels
    optimised directly on that loss from stage 1's image (no sampler, no VAE). Rows: (name, oracle loss,
    region error, PixCorr) for the images, then for the path."""
    from mdlib import features, metrics, placement, stage1

    targets = config.targets(dec, rows=rows, device=sd.device, use="true")

    def row(name, imgs):
        with torch.no_grad():
            loss = float(targets.per_image_loss(features.clip_lowlevel_features(clip, imgs,
                                                                                differentiable=False)).mean())
        return (name, loss, float(np.nanmean(placement.layout_errors(imgs, stim).region)),
                float(metrics.pixcorr(imgs, stim)))

    scored = [row(name, imgs) for name, imgs in images.items()]
    z, c, z_true = dec.pred["z"][rows], dec.pred["c"][rows], dec.true["z"][rows]
    start = images["stage 1, decoded (z, c)"]           # z(0): drawn above, with the same seeds
    path = [row("stage 1 from z(0.00), decoded c", start)]
    for a in np.linspace(0.0, 1.0, 5)[1:]:
        imgs = stage1.img2img(sd, (1.0 - a) * z + a * z_true, c, seeds, config=config.sampler, progress=False).images
        path.append(row(f"stage 1 from z({a:.2f}), decoded c", imgs))
    # The pixels as the parameters (through a sigmoid, so they stay in [0, 1]), from stage 1's decoded image.
    param = torch.logit(features.to_unit_images(start, sd.device).clamp(0.01, 0.99)).clone().requires_grad_(True)
    opt = torch.optim.Adam([param], lr=0.02)
    for _ in range(pixel_steps):
        loss = targets.per_image_loss(features.clip_lowlevel_features(clip, torch.sigmoid(param))).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    path.append(row(f"pixels optimised directly from stage 1 (decoded), {pixel_steps} Adam steps",
                    features.to_uint8_images(torch.sigmoid(param.detach()))))
    return scored, path


def success_test(errors: dict, s1: str, pub: str, ceiling: str) -> list[str]:
    """The fixed success test on the per-image region errors: lines to print."""
    from scipy import stats

    e1, e2, e0 = errors[s1], errors[pub], errors[ceiling]
    keep = np.isfinite(e1) & np.isfinite(e2) & np.isfinite(e0)
    e1, e2, e0 = e1[keep], e2[keep], e0[keep]
    gap = e1.mean() - e0.mean()
    fraction = (e1.mean() - e2.mean()) / gap if gap > 0 else float("nan")
    diff = e1 - e2
    if np.any(diff != 0):
        w = stats.wilcoxon(e1, e2, alternative="greater")
        w_stat, w_p = float(w.statistic), float(w.pvalue)
    else:
        w_stat, w_p = float("nan"), 1.0
    t = stats.ttest_rel(e1, e2, alternative="greater")
    passed = bool(np.isfinite(fraction) and fraction >= SUCCESS_FRACTION and w_p < SUCCESS_ALPHA)
    return [
        f"Region error on {int(keep.sum())} images: stage 1 (decoded) {e1.mean():.4f}, published stage 2 "
        f"{e2.mean():.4f}, ceiling (stage 1, true (z, c)) {e0.mean():.4f}.",
        f"Fraction of the way from stage 1 (decoded) to the ceiling that stage 2 covers: {fraction:.3f} "
        f"(needed: at least {SUCCESS_FRACTION:g})" + ("; the ceiling is no better than stage 1, so the fraction "
                                                      "is undefined" if not gap > 0 else "") + ".",
        f"Paired Wilcoxon signed-rank test, one-sided (stage 2 lower): statistic {w_stat:.1f}, p = {w_p:.4g} "
        f"(needed: p < {SUCCESS_ALPHA:g}); paired t-test, one-sided: t = {float(t.statistic):.3f}, "
        f"p = {float(t.pvalue):.4g}.",
        f"**Success test: {'PASSED' if passed else 'FAILED'}.**",
    ]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-root", required=True, help="a mini-NSD written with layouts")
    ap.add_argument("--models", default="tiny-trained",
                    help="the tiny models: a folder (mdlib train-mini's output) or 'tiny-trained' (the shipped ones)")
    ap.add_argument("--subject", type=int, default=1)
    ap.add_argument("--images", type=int, default=None, help="test images with a layout (default 16; quick 3)")
    ap.add_argument("--iterations", type=int, default=None,
                    help=f"the longer published run (default 20; quick 4); the success test reads iteration "
                         f"{SUCCESS_ITERATIONS}")
    ap.add_argument("--scan", type=int, default=None, help="look for them among this many test images")
    ap.add_argument("--quick", action="store_true", help="small sizes, same code paths")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = dict(QUICK if args.quick else FULL)
    for key in ("images", "iterations", "scan"):
        if getattr(args, key):
            cfg[key] = getattr(args, key)

    from pathlib import Path

    from mdlib import decoding, method, metrics, models, placement, stage1, stage2
    from mdlib.sampler import image_seed

    root = Path(args.data_root).expanduser()
    config = method.configure("mdlib", "mini")
    iters = max(cfg["iterations"], SUCCESS_ITERATIONS) if not args.quick else cfg["iterations"]
    snap = min(SUCCESS_ITERATIONS, iters)
    print(f"# Layout benchmark (issue 27){' (--quick)' if args.quick else ''}, {datetime.date.today()}\n")
    print(f"Machine: {machine()}. Data: {root}; models: {args.models}; subject {args.subject}.\n", flush=True)

    t0 = time.perf_counter()
    sd = models.load_sd(args.models, device=args.device)
    clip = models.load_clip_vision(args.models, device=args.device, normalization=config.clip_normalization)
    print("  decoding ...", file=sys.stderr, flush=True)
    dec = decoding.decode_features(root, args.subject, sd, clip, device=args.device, progress=False,
                                   **config.decode_kwargs())
    rows, stim = select_images(root, dec, cfg["images"], cfg["scan"])
    ids = dec.nsd_ids[rows]
    seeds = [image_seed(i, config.seed) for i in ids]
    z, c = dec.pred["z"][rows], dec.pred["c"][rows]
    print(f"Test images with a layout: {len(ids)} (nsdIds {', '.join(str(int(i)) for i in ids)}), found among "
          f"the first {min(cfg['scan'], len(dec.nsd_ids))} test images; decoded in "
          f"{fmt_time(time.perf_counter() - t0)}.\n")
    print(measure_vs_truth(root, ids, stim) + ".\n", flush=True)

    images = {"another test image (chance)": stim[np.roll(np.arange(len(stim)), 1)]}
    print("  stage 1 ...", file=sys.stderr, flush=True)
    images["stage 1, true (z, c) (the ceiling)"] = stage1.img2img(
        sd, dec.true["z"][rows], dec.true["c"][rows], seeds, config=config.sampler, progress=False).images
    images["stage 1, decoded (z, c)"] = stage1.img2img(sd, z, c, seeds, config=config.sampler,
                                                       progress=False).images
    pub = config.published
    walls = {}
    for use, label in (("pred", "decoded features"), ("true", "the stimuli's own features (oracle)")):
        print(f"  published, {label}, {iters} iterations ...", file=sys.stderr, flush=True)
        targets = config.targets(dec, rows=rows, device=sd.device, use=use)
        t1 = time.perf_counter()
        out = stage2.guide_published(sd, clip, z, c, targets, seeds, sampler_config=config.sampler,
                                     config=dataclasses.replace(pub, iterations=iters, snapshots=(snap,)),
                                     progress=not args.no_progress)
        walls[label] = time.perf_counter() - t1
        for it in sorted(set(out.snapshots) | {iters}):
            images[f"published, {label}, {it} iterations"] = out.snapshots.get(it, out.images)
        if use == "pred":
            print("  fast mode ...", file=sys.stderr, flush=True)
            images["fast mode, decoded features"] = stage2.guide_fast(
                sd, clip, z, c, targets, seeds, config=config.fast, sampler_config=config.sampler,
                progress=False).images

    errors, table = {}, []
    for name, imgs in images.items():
        e = placement.layout_errors(imgs, stim)
        errors[name] = e.region
        table.append((name, float(np.nanmean(e.region)), float(np.nanmean(e.angle)) if e.found.any() else np.nan,
                      float(np.nanmean(e.position)) if e.found.any() else np.nan, f"{int(e.found.sum())}/{len(stim)}",
                      float(metrics.pixcorr(imgs, stim))))
    print(f"## Layout errors on {len(stim)} test images with a layout (mini-NSD subject {args.subject}, models "
          f"{args.models}; published stage 2: {pub.optimizer}, lr {pub.lr:g}, updating {' and '.join(pub.update)})\n")
    print("Region error: the share of the image on the wrong side of the stimulus's boundary (0 perfect; a "
          "reconstruction without a boundary scores the stimulus's smaller side). Angle and position errors: "
          "over the reconstructions with a boundary (degrees; image sides along the stimulus's central axis "
          "across its boundary: a horizon's height).\n")
    _print_table(("images", "region error", "angle error (degrees)", "position error (image sides)",
                  "with a boundary", "PixCorr"), ("{}", "{:.4f}", "{:.1f}", "{:.3f}", "{}", "{:.3f}"), table)
    print("Wall time of the published runs: " + "; ".join(f"{k}: {fmt_time(v)}" for k, v in walls.items()) + ".\n")

    print(f"## The tiny CLIP's mirror correlation ({len(stim)} stimuli, patch tokens)\n")
    after = mirror_correlations(clip, stim)
    if args.models == "tiny-trained":
        _print_table(("block", "r with its mirror image", "r with another test image"), ("{}", "{:.3f}", "{:.3f}"),
                     after)
    else:     # before (the shipped CLIP, trained without layouts) and after (these models'), same stimuli
        shipped = models.load_clip_vision("tiny-trained", device=args.device, normalization=config.clip_normalization)
        before = mirror_correlations(shipped, stim)
        print("Before: the shipped tiny CLIP (trained on scenes without layouts); after: --models's CLIP.\n")
        _print_table(("block", "mirror r, before", "mirror r, after", "other image r, before",
                      "other image r, after"), ("{}", "{:.3f}", "{:.3f}", "{:.3f}", "{:.3f}"),
                     [(b[0], b[1], a[1], b[2], a[2]) for b, a in zip(before, after)])

    print("  the oracle landscape ...", file=sys.stderr, flush=True)
    scored, path = landscape(sd, clip, config, dec, rows, stim, seeds, images, cfg["pixel_steps"])
    print(f"## Does the objective ask for the layout? The oracle loss ({len(stim)} stimuli)\n")
    print("Oracle loss: stage 2's loss against the stimuli's own CLIP features (decoding errors play no part), mean "
          "over images; region error as above. z(a) = (1 - a) z_decoded + a z_true with the decoded c: at a = 1 "
          "stage 1 draws the stimulus's layout.\n")
    _print_table(("images", "oracle loss", "region error", "PixCorr"), ("{}", "{:.4f}", "{:.4f}", "{:.3f}"),
                 scored + path)

    print(f"## The success test (fixed in advance: stage 2 covers at least {SUCCESS_FRACTION:g} of the way to the "
          f"ceiling, paired one-sided p < {SUCCESS_ALPHA:g})\n")
    s2 = f"published, decoded features, {snap} iterations"
    for line in success_test(errors, "stage 1, decoded (z, c)", s2, "stage 1, true (z, c) (the ceiling)"):
        print(line)
    if snap != SUCCESS_ITERATIONS:
        print(f"\n(--quick: the published run stopped at {snap} iterations, not the test's {SUCCESS_ITERATIONS}.)")
    print(flush=True)


if __name__ == "__main__":
    main()

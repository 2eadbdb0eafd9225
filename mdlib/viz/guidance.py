"""Figures, tables and sentences of lesson 05 (stage 2: guidance by decoded CLIP features).

The lesson keeps its cells short: what it computes with :mod:`mdlib.stage2` it shows with these functions.
Figures take arrays (or DataFrames) and return a matplotlib Figure; tables are pandas DataFrames; the
``*_sentence`` functions return the plain sentences the lesson prints about its own run, so that no number a
run computes is written in the lesson's prose.

Conventions: ``n`` test images; per-image losses are stage 2's feature loss L (unitless, on the scale of the
variant's loss, docs/method.md, row "loss"); images are (n, H, W, 3) uint8.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import SimpleNamespace

import matplotlib.pyplot as plt
import numpy as np

from mdlib.stats import pearson

#: The rows of the method (docs/method.md) that lesson 05 uses, in the order the lesson meets them.
METHOD_ROWS = ("roi", "decoder", "posterior", "n_tokens", "clip_normalization", "clip_resize_stimuli", "keep",
               "select_by", "loss", "cos_weight", "loss_clip_weight", "clip_resize_generated", "clamp_generated",
               "num_steps", "noise_index", "denoise_steps", "guidance_scale", "eta", "update", "optimizer", "lr",
               "gamma", "lr_decay_first", "iterations", "fresh_noise", "checkpoint", "autocast", "save_every",
               "fast_scale", "fast_through_unet", "fast_autocast", "batch_size")

#: How each loss is built (docs/method.md, row "loss").
LOSSES = {
    "mdlib": "per block, the mean squared error over the kept features, summed over the blocks, plus "
             "cos_weight x (1 - cos) between the image embeddings",
    "released": "the released MSE_CLIP_mask: per image, block weights (1/||target||, normalised) x (1.5, 1.2, 1, "
                "1, 1, 1) on the mean squared error over all of a block's features (the unkept ones count 0), "
                "all x (1 - W), plus 0.1 W (1 - cos)",
    "paper": "Algorithm 1: the squared error summed over the kept features, no embedding term",
}

#: How each variant picks the features that count (docs/method.md, row "feature selection").
SELECTIONS = {
    "loo-r2": "the leave-one-out R² of the decoder on the training images; the top {keep:.0%} kept",
    "cv5-r": "the |r| of the decoder over 5 consecutive folds of the training images, averaged; kept at or above "
             "its {pct:g}th percentile",
}

_OPTIMIZERS = {"adam": "Adam", "sgd": "plain gradient steps (SGD)"}


# ------------------------------------------------------------------------------------------ running

def join_runs(outputs: Sequence) -> SimpleNamespace:
    """Batches of :func:`mdlib.stage2.guide_published` / :func:`~mdlib.stage2.guide_fast` outputs as one run.

    Returns ``images`` (n, S, S, 3) uint8; ``loss`` (rows, n): each batch's rows side by side (published:
    iterations + 1 rows; fast: guided steps + 1); ``snapshots``: iteration -> (n, S, S, 3); ``cost``: the
    batches' ``unet_passes``, ``unet_backward`` and ``wall_s`` summed.
    """
    snaps = sorted({k for o in outputs for k in o.snapshots})
    return SimpleNamespace(
        images=np.concatenate([o.images for o in outputs]),
        loss=np.concatenate([o.loss for o in outputs], axis=1),
        snapshots={k: np.concatenate([o.snapshots[k] for o in outputs]) for k in snaps},
        cost={k: sum(o.cost[k] for o in outputs) for k in ("unet_passes", "unet_backward", "wall_s")})


# --------------------------------------------------------------------------- 1. the mirror test

def _array(x) -> np.ndarray:
    """float64 array of an array or a (CPU or CUDA) tensor."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def mirror_table(feats: Mapping[str, np.ndarray], mirrored: Mapping[str, np.ndarray]):
    """How much a scene's features change when it is mirrored left-right, against another scene.

    Args:
        feats, mirrored: name (``block1`` ..., ``embedding``) -> (n, ...) features of n images and of the same
            images mirrored (:func:`mdlib.features.clip_lowlevel_features`); "another scene" is the next image
            (image i against image i + 1, cyclically), so n >= 2.
    Returns a DataFrame, one row per feature name: ``mirrored`` and ``another image`` (mean over images of the
    Pearson r between the flattened features and the original's) and ``position share``, (1 - r mirrored) /
    (1 - r another image): how far mirroring moves the features, as a share of how far another scene does (0:
    blind to where things are; about 1: where things are matters as much as what they are).
    """
    import pandas as pd

    rows = {}
    for name in feats:
        a = _array(feats[name]).reshape(len(feats[name]), -1)
        m = _array(mirrored[name]).reshape(len(a), -1)
        r_m, r_o = float(np.mean(pearson(a, m, axis=1))), float(np.mean(pearson(a, np.roll(a, -1, axis=0), axis=1)))
        rows[name] = {"mirrored": r_m, "another image": r_o, "position share": (1 - r_m) / (1 - r_o)}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("features")


def plot_mirror_table(table, title: str = "Features of a scene against its mirror image and another scene"):
    """Grouped bars of :func:`mirror_table`'s two correlations per feature name; the legend sits beside the
    axes, clear of the bars. Returns the Figure."""
    fig, ax = plt.subplots(figsize=(8.5, 3), layout="constrained")
    x = np.arange(len(table))
    for k, (col, label, color) in enumerate((("mirrored", "the same scene, mirrored", "C0"),
                                             ("another image", "another test image", "C7"))):
        ax.bar(x + (k - 0.5) * 0.38, table[col].to_numpy(), 0.38, label=label, color=color)
    ax.axhline(0, color="0.3", lw=0.8)
    ax.set_xticks(x, list(table.index))
    ax.set_ylim(min(0.0, float(table[["mirrored", "another image"]].to_numpy().min())) - 0.05, 1.05)
    ax.set_ylabel("r with the scene's\nown features")
    ax.set_xlabel("CLIP features (MLP output of each block; the image embedding)")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    return fig


def mirror_sentence(table) -> str:
    """What :func:`mirror_table` found, in words, with its numbers."""
    blocks = table.drop(index="embedding", errors="ignore")
    share = float(blocks["position share"].mean())
    verdict = ("mostly blind to where things are" if share < 0.35 else
               "partly sensitive to where things are" if share < 0.7 else "sensitive to where things are")
    text = (f"Mirrored scenes: r = {blocks['mirrored'].min():.2f}-{blocks['mirrored'].max():.2f} per block; "
            f"another test image: r = {blocks['another image'].min():.2f}-{blocks['another image'].max():.2f}. "
            f"Mirroring moves the block features {share:.0%} as far as swapping in another scene does "
            f"(mean over blocks): these features are {verdict}.")
    if "embedding" in table.index:
        e = table.loc["embedding"]
        text += (f"\nThe image embedding: r = {e['mirrored']:.2f} mirrored, {e['another image']:.2f} for another "
                 f"image ({e['position share']:.0%}).")
    return text


# ------------------------------------------------------------------------------ 2. feature selection

def selection_sentence(select_by: str, keep: float, variant: str) -> str:
    """Which criterion chose the features that count (docs/method.md, row "feature selection")."""
    rule = SELECTIONS[select_by].format(keep=keep, pct=100 * (1 - keep))
    return f"The {variant} variant selects by {select_by!r}: per block, {rule}."


def kept_table(decoded, masks: Mapping[str, np.ndarray]):
    """Per CLIP block: features, how many are kept, and the median selection score (training images) and test
    r (decoded against true, over the test images) of the kept and the dropped ones.

    Args:
        decoded: :class:`mdlib.decoding.Decoded` (its ``score`` and ``r`` for ``clip_<block>``).
        masks: block name (``block1`` ...) -> bool array of the block's features (any shape), True = kept.
    """
    import pandas as pd

    rows = []
    for b, mask in masks.items():
        m = np.asarray(mask, dtype=bool).ravel()
        score, r = decoded.score[f"clip_{b}"], decoded.r[f"clip_{b}"]

        def med(values, sel):
            return float(np.nanmedian(values[sel])) if sel.any() else np.nan

        rows.append({"block": b, "features": m.size, "kept": int(m.sum()),
                     "selection score, kept (median)": med(score, m),
                     "selection score, dropped (median)": med(score, ~m),
                     "test r, kept (median)": med(r, m), "test r, dropped (median)": med(r, ~m)})
    return pd.DataFrame(rows).set_index("block")


def plot_selection(score: np.ndarray, r: np.ndarray, mask: np.ndarray, block: str, select_by: str, keep: float):
    """Two histograms for one block: the selection score on the training images, and the test r, each for the
    kept and the dropped features. score, r: (features,); mask: bool, the same number of features."""
    m = np.asarray(mask, dtype=bool).ravel()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3), layout="constrained")
    panels = ((axes[0], score, f"selection score ({select_by}), training images",
               f"{block}: how the features were chosen"),
              (axes[1], r, "r of decoded and true feature, test images", f"{block}: how well they decode"))
    for ax, values, xlabel, title in panels:
        values = np.asarray(values, dtype=float).ravel()
        for sel, label, color in ((~m, "dropped", "C7"), (m, f"kept ({keep:.0%})", "C2")):
            v = values[sel]
            ax.hist(v[np.isfinite(v)], bins=40, alpha=0.7, density=True, color=color, label=label)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("density (features)")
        ax.set_title(title, fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize=8, frameon=False)
    return fig


# ------------------------------------------------------------------------------------------- 3. the loss

def loss_sentence(config, targets) -> str:
    """The loss this run uses and how generated images reach CLIP (``config``: a MethodConfig; ``targets``:
    its :class:`mdlib.stage2.FeatureTargets`)."""
    w = f" (W = {config.loss_clip_weight:g})" if config.loss == "released" else ""
    return (f"Loss {config.loss!r}: {LOSSES[config.loss]}.\n"
            f"This run: reduction {targets.reduction!r}, weight of (1 - cos) {targets.cos_weight:g}{w}; generated "
            f"images reach CLIP resized {targets.resize!r}, {'clamped' if targets.clamp else 'not clamped'} to "
            f"[0, 1].")


def loss_table(ids: Sequence[int], columns: Mapping[str, np.ndarray]):
    """Per-image losses side by side: ``columns`` name -> (n,), rows ``nsdId <id>``."""
    import pandas as pd

    return pd.DataFrame({k: np.asarray(v, dtype=float) for k, v in columns.items()},
                        index=[f"nsdId {i}" for i in ids])


def shrunk_features(true: Mapping[str, np.ndarray], names: Sequence[str], factor: float, rows=slice(None)) -> dict:
    """The true features of ``rows`` pulled toward their mean over all the test images, ``m + factor (f - m)``, as
    torch tensors keyed as :meth:`mdlib.stage2.FeatureTargets.per_image_loss` wants them (``factor`` 1: the
    stimuli's own features; 0: the average test image's, for every image).

    true: :attr:`mdlib.decoding.Decoded.true` (``clip_block1`` ... (N, tokens, width), ``clip_embedding``
    (N, dim)); names: the block names (``block1`` ...) and ``embedding``."""
    import torch

    out = {}
    for k in names:
        f = np.asarray(true[f"clip_{k}"], dtype=np.float32)
        m = f.mean(0, keepdims=True)
        out[k] = torch.as_tensor(m + np.float32(factor) * (f[rows] - m))
    return out


def spread_ratio(decoded, masks: Mapping[str, np.ndarray]) -> float:
    """How much the decoded features vary across the test images, as a share of how much the true ones do: the
    median over the kept features of every block of sd(decoded) / sd(true) across images. Below 1 when the
    decoder's predictions are pulled toward the mean (regression to the mean)."""
    ratios = []
    for b, mask in masks.items():
        m = np.asarray(mask, dtype=bool).ravel()
        pred = np.asarray(decoded.pred[f"clip_{b}"]).reshape(len(decoded.nsd_ids), -1)[:, m]
        true = np.asarray(decoded.true[f"clip_{b}"]).reshape(len(decoded.nsd_ids), -1)[:, m]
        sd_true = true.std(0)
        ok = sd_true > 0
        ratios.append(pred.std(0)[ok] / sd_true[ok])
    return float(np.median(np.concatenate(ratios)))


def regression_sentence(loss_stimulus: np.ndarray, loss_stage1: np.ndarray, loss_shrunk: np.ndarray,
                        spread: float) -> str:
    """Stage 1 against the stimulus, and what regression to the mean does to the targets, with the run's
    numbers. Arrays: (n,) per-image losses against the decoded features, of the stimuli, of stage 1's images and
    of the stimuli's features pulled toward the mean by ``spread`` (:func:`shrunk_features`)."""
    n = len(loss_stimulus)
    return (f"Stage 1's image scores below the stimulus itself on {int(np.sum(loss_stage1 < loss_stimulus))} of "
            f"{n} images.\n"
            f"The decoded features vary across the test images {spread:.0%} as much as the true ones (median over "
            f"the kept features): they are pulled toward the mean.\n"
            f"The stimuli's own features, pulled toward the mean as much, score L = {np.mean(loss_shrunk):.3f} "
            f"(mean over images) against {np.mean(loss_stimulus):.3f} as they are: lower on "
            f"{int(np.sum(loss_shrunk < loss_stimulus))} of {n} images.")


# --------------------------------------------------------------------------- 4. the published mode

def published_sentence(config) -> str:
    """The published optimisation's settings in words (``config``: a MethodConfig)."""
    pc = config.published
    decay = (f"x {pc.gamma:g} per iteration, {'before' if pc.lr_decay_first else 'after'} each step"
             if pc.gamma < 1 else "none")
    noise = "new sampler noise in every iteration" if pc.fresh_noise else "stage 1's noise in every iteration"
    return (f"Published mode ({config.variant} variant, {config.preset} preset): {pc.iterations} iterations of "
            f"{_OPTIMIZERS[pc.optimizer]} on {' and '.join(pc.update)}, lr {pc.lr:g} (decay: {decay}); {noise}; "
            f"checkpointing {'on' if pc.checkpoint else 'off'}; images kept at iterations {list(pc.snapshots)}.")


def plot_loss_curve(loss: np.ndarray, loss_name: str):
    """The published optimisation's loss: loss (iterations + 1, n), row 0 = stage 1's image. One thin line per
    image, the mean in bold; the legend beside the axes."""
    loss = np.asarray(loss, dtype=float)
    it = np.arange(len(loss))
    fig, ax = plt.subplots(figsize=(7.5, 3), layout="constrained")
    for k in range(loss.shape[1]):
        ax.plot(it, loss[:, k], color="0.65", lw=0.8, label="one image" if k == 0 else None)
    ax.plot(it, loss.mean(1), color="C3", lw=2.2, label=f"mean over {loss.shape[1]} images")
    ax.set_xlabel("iteration (0: stage 1's image)")
    ax.set_ylabel(f"feature loss L ({loss_name})")
    ax.set_xticks(it if len(it) <= 12 else np.linspace(0, it[-1], 7).round().astype(int))
    ax.set_title("Published stage 2: the loss of each iteration's image", fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    return fig


# ------------------------------------------------------------------------------------- 5. the fast mode

def plot_fast_loss(fast_loss: np.ndarray, stage1: float, published: float, iterations: int, loss_name: str):
    """The fast mode's loss along its one sampling pass against the two other images' losses.

    fast_loss: (guided steps + 1, n): rows 0.. the loss of the clean-latent estimate at each guided step, the
    last row the final image's. stage1, published: mean losses of stage 1's image and of the published mode's
    after ``iterations``."""
    fast_loss = np.asarray(fast_loss, dtype=float)
    steps = np.arange(1, len(fast_loss))
    fig, ax = plt.subplots(figsize=(7.5, 3), layout="constrained")
    ax.plot(steps, fast_loss[:-1].mean(1), color="C0", label="fast: L of the clean-latent\nestimate at each step")
    ax.axhline(fast_loss[-1].mean(), color="C0", ls="--", label="fast: L of the final image")
    ax.axhline(stage1, color="0.4", ls=":", label="stage 1's image")
    ax.axhline(published, color="C3", ls="--", label=f"published, {iterations} iterations")
    ax.set_xlabel("denoising step of the one guided pass")
    ax.set_ylabel(f"feature loss L ({loss_name})")
    ax.set_title("Fast stage 2: the loss along one sampling pass (mean over images)", fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    return fig


# ---------------------------------------------------------------------------------- 6. side by side

def metrics_table(modes: Mapping[str, tuple], stimuli: np.ndarray, base_loss: float, n: int):
    """One row per mode: feature loss, loss reduction (share of ``base_loss``, stage 1's mean loss), PixCorr
    and SSIM against ``stimuli`` (:mod:`mdlib.metrics`), UNet passes per image (forward + backward) and wall
    seconds.

    modes: name -> (images (n, H, W, 3) uint8, mean loss, UNet forward passes, backward passes, wall seconds
    (NaN: not measured)), for all n images together."""
    import pandas as pd

    from mdlib import metrics

    return pd.DataFrame({name: {"feature loss": loss, "loss reduction": (base_loss - loss) / base_loss,
                                "PixCorr": metrics.pixcorr(imgs, stimuli), "SSIM": metrics.ssim(imgs, stimuli),
                                "UNet passes per image (fwd + bwd)": (fwd + bwd) / n, "wall time (s)": wall}
                         for name, (imgs, loss, fwd, bwd, wall) in modes.items()}).T


def cost_sentence(table, variant: str, loss_name: str, iterations: int, real_iterations: int,
                  passes_per_sampling: int) -> str:
    """The two modes' loss reductions and their cost, on this path and projected onto the real one.

    table: :func:`metrics_table` with rows ``stage 1``, ``published`` and ``fast``; passes_per_sampling: UNet
    passes of one sampling of one image (35 steps x 2 guidance branches = 70)."""
    pub, fast = table.loc["published"], table.loc["fast"]
    ratio = pub["UNet passes per image (fwd + bwd)"] / fast["UNet passes per image (fwd + bwd)"]
    share = (f" ({fast['loss reduction'] / pub['loss reduction']:.1f} times the published reduction)"
             if pub["loss reduction"] > 0 else "")
    per_image_real = real_iterations * passes_per_sampling * 3
    return (f"{variant} variant, loss {loss_name!r}: the published mode ({iterations} iterations) lowered the "
            f"feature loss by {pub['loss reduction']:.1%} of stage 1's, the fast mode by {fast['loss reduction']:.1%}"
            f"{share}, with 1/{ratio:.0f} of the UNet passes.\n"
            f"On the real path, this variant's {real_iterations} iterations are {per_image_real:,} UNet "
            f"pass-equivalents per image (forward, recomputed, backward), against {2 * passes_per_sampling} for the "
            f"fast mode.")


def floor_table(stimuli: np.ndarray, others: np.ndarray):
    """What PixCorr and SSIM give images that show nothing of the stimulus: ``others`` (n, H, W, 3), each an
    unrelated image paired with its stimulus (e.g. the next test image), and a uniform mid-grey image (its
    PixCorr is undefined: NaN, not computed). Returns a DataFrame with rows ``another test image`` and ``a flat
    grey image`` and columns ``PixCorr``, ``SSIM``."""
    import pandas as pd

    from mdlib import metrics

    grey = np.full_like(np.asarray(stimuli), 128, dtype=np.uint8)
    return pd.DataFrame({"another test image": {"PixCorr": metrics.pixcorr(others, stimuli),
                                                "SSIM": metrics.ssim(others, stimuli)},
                         "a flat grey image": {"PixCorr": np.nan, "SSIM": metrics.ssim(grey, stimuli)}}).T


def floor_sentence(table, floors) -> str:
    """Each mode's PixCorr and SSIM (``table``: :func:`metrics_table`) beside the floors (:func:`floor_table`):
    PixCorr above another image's, SSIM above the flat grey image's."""
    other, grey = floors.loc["another test image"], floors.loc["a flat grey image"]
    lines = [f"Floors: another test image scores PixCorr {other['PixCorr']:.2f} and SSIM {other['SSIM']:.2f} "
             f"against each stimulus; a flat grey image, which shows nothing, scores SSIM {grey['SSIM']:.2f}."]
    lines += [f"  {m}: PixCorr {table.loc[m, 'PixCorr']:.2f} ({table.loc[m, 'PixCorr'] - other['PixCorr']:+.2f} "
              f"above another image's), SSIM {table.loc[m, 'SSIM']:.3f} "
              f"({table.loc[m, 'SSIM'] - grey['SSIM']:+.3f} above the grey image's)" for m in table.index]
    return "\n".join(lines)


def plot_change(before: np.ndarray, after: np.ndarray, titles: Sequence[str], what: str = "published - stage 1"):
    """Where an image changed: per image, the mean over RGB of |after - before| (grey levels, 0-255), on one
    colour scale with a colorbar. before, after: (n, H, W, 3) uint8; titles: n strings. Returns the Figure."""
    diff = np.abs(np.asarray(after, dtype=float) - np.asarray(before, dtype=float)).mean(-1)
    n = len(diff)
    fig, axes = plt.subplots(1, n, figsize=(1.6 * n + 1.2, 2.2), layout="constrained", squeeze=False)
    vmax = max(float(np.percentile(diff, 99)), 1.0)
    for ax, d, t in zip(axes[0], diff, titles):
        im = ax.imshow(d, cmap="magma", vmin=0, vmax=vmax)
        ax.set_title(t, fontsize=7)
        ax.axis("off")
    fig.colorbar(im, ax=axes[0].tolist(), label="|change|, mean over RGB\n(grey levels, 0-255)", shrink=0.85)
    fig.suptitle(f"Where stage 2 changed the image: |{what}|", fontsize=10)
    return fig


def paper_sentence(published=None) -> str:
    """MindDiffuser's own numbers for stage 1 and stage 1 + 2 (its Table 2, subject 1, real NSD), from
    :data:`mdlib.evaluation.PUBLISHED`."""
    from mdlib import evaluation

    rows = {p.method: p.values for p in (published or evaluation.PUBLISHED) if p.subjects == "1"}
    return ("The paper's numbers (its Table 2, subject 1, real NSD): "
            + "; ".join(f"{label}, PCC {rows[name]['PCC']:.3f} and SSIM {rows[name]['SSIM']:.3f}"
                        for label, name in (("stage 1", "MindDiffuser, without control"),
                                            ("stage 1 + stage 2", "MindDiffuser, full"))) + ".")


__all__ = ["LOSSES", "METHOD_ROWS", "SELECTIONS", "cost_sentence", "floor_sentence",
           "floor_table", "join_runs", "kept_table", "loss_sentence", "loss_table", "metrics_table", "mirror_sentence",
           "mirror_table", "paper_sentence", "plot_change", "plot_fast_loss", "plot_loss_curve", "plot_mirror_table",
           "plot_selection", "published_sentence", "regression_sentence", "selection_sentence", "shrunk_features",
           "spread_ratio"]

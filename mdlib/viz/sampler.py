"""Figures, tables and sentences of lesson 04 (stage 1: the published DDIM sampler, img2img from (z, c)).

The lesson keeps its cells short: what it computes with :mod:`mdlib.sampler` and :mod:`mdlib.stage1` it shows
with these functions. Figures take arrays (or DataFrames) and return a matplotlib Figure; tables are pandas
DataFrames; the ``*_sentence`` functions return the plain sentences the lesson prints about its own run, so
that no number a run computes is written in the lesson's prose.

Conventions: timesteps are Stable Diffusion's integer noise levels t (0-999); ``alphas_cumprod`` is the
schedule's ᾱ_t, indexed by t; images are (n, H, W, 3) uint8 (stimuli and reconstructions may differ in size).
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np

#: The rows of the method (docs/method.md) that lesson 04 uses, in the order the lesson meets them.
METHOD_ROWS = ("roi", "sessions", "n_train", "standardize", "posterior", "n_tokens", "n_captions", "decoder",
               "n_select", "scale_n_select", "num_steps", "noise_index", "denoise_steps", "guidance_scale", "eta",
               "seed")

#: Bar colours of the lesson's conditions (the references are drawn as lines).
COLOURS = {"true (z, c)": "C2", "decoded (z, c)": "C0", "without z": "C1", "VAE(decoded z)": "0.6"}
_LINES = ("--", ":", "-.")


# ------------------------------------------------------------------------------------ 1. the schedule

def _levels(ts: Sequence[int]) -> str:
    ts = [int(t) for t in ts]
    return ", ".join(map(str, ts)) if len(ts) <= 4 else f"{ts[0]}, {ts[1]}, {ts[2]}, ..., {ts[-1]}"


def _and(items: Sequence) -> str:
    items = [str(i) for i in items]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def schedule_sentence(timesteps: Sequence[int], noise_index: int, denoise_steps: int) -> str:
    """What the sampler does, in words: the DDIM levels, the level z is noised to, the steps run and how the
    first step sits against the noise (levels skipped between them, or none).

    timesteps: the ascending DDIM timesteps (:attr:`mdlib.sampler.DDIMSampler.timesteps`); noise_index,
    denoise_steps: :class:`mdlib.sampler.SamplerConfig`'s.
    """
    ts = [int(t) for t in timesteps]
    spacing = np.unique(np.diff(ts))
    every = f" (every {spacing[0]} timesteps)" if spacing.size == 1 else ""
    noise_t, first = ts[noise_index], ts[denoise_steps - 1]
    steps = ts[:denoise_steps][::-1]
    lines = [f"The {len(ts)} DDIM levels: t = {_levels(ts)}{every}.",
             f"z is noised to the level of DDIM index {noise_index}: t = {noise_t}.",
             f"The {denoise_steps} denoising steps run t = {_levels(steps)}."]
    gap = noise_index - (denoise_steps - 1)
    if gap > 0:
        skipped = ts[denoise_steps:noise_index][::-1]
        lines.append(f"So the first step starts at t = {first}, {gap} DDIM level{'s' if gap > 1 else ''} "
                     f"({noise_t - first} timesteps) below the noise z was given"
                     + (f": the level{'s' if len(skipped) > 1 else ''} {_and(skipped)} "
                        f"{'are' if len(skipped) > 1 else 'is'} never visited." if skipped else "."))
    elif gap == 0:
        lines.append(f"The first step starts at t = {first}, the level z was noised to (as diffusers' img2img does).")
    else:
        lines.append(f"The first step starts at t = {first}, {-gap} DDIM level{'s' if -gap > 1 else ''} above "
                     f"the noise z was given.")
    return "\n".join(lines)


def signal_sentence(alphas_cumprod, noise_timestep: int, strength: float | None, unet_passes: int) -> str:
    """How much of z is left in the sampler's input, whether diffusers' img2img can do the same, and the
    UNet passes per image."""
    a = float(np.asarray(alphas_cumprod)[noise_timestep])
    out = [f"At t = {noise_timestep} the UNet's input is x = {a ** 0.5:.3f} z + {(1 - a) ** 0.5:.3f} noise "
           f"(ᾱ = {a:.3f}): the noise is {((1 - a) / a) ** 0.5:.1f} times as strong as z (z is scaled to about unit "
           f"variance, like the noise)."]
    if strength is None:
        out.append("diffusers' img2img cannot do exactly this at any strength: it always starts sampling at the level "
                   "it noises to.")
    else:
        out.append(f"diffusers' img2img does exactly this at strength = {strength:g}.")
    out.append(f"Each image costs {unet_passes} UNet passes.")
    return "\n".join(out)


def schedule_figure(alphas_cumprod, timesteps: Sequence[int], noise_timestep: int,
                    denoise_timesteps: Sequence[int]):
    """ᾱ_t over the whole schedule (left) and around where sampling starts (right): the DDIM levels, those
    denoised, the level z is noised to and the levels in between that no step visits.

    alphas_cumprod: (1000,) ᾱ_t; timesteps: the ascending DDIM levels; denoise_timesteps: those denoised, in
    the order run (descending).
    """
    abar = np.asarray(alphas_cumprod, dtype=float)
    ts, den = np.asarray(timesteps), np.asarray(denoise_timesteps)
    first = int(den[0])
    skipped = ts[(ts > first) & (ts < noise_timestep)]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), gridspec_kw={"width_ratios": [1.6, 1]})
    spacing = int(np.median(np.diff(ts))) if len(ts) > 1 else 20
    lo, hi = min(first, noise_timestep) - 3 * spacing, max(first, noise_timestep) + 3 * spacing
    for ax, (x0, x1) in zip(axes, ((0, len(abar) - 1), (lo, hi))):
        t = np.arange(max(x0, 0), min(x1, len(abar) - 1) + 1)
        ax.plot(t, abar[t], color="0.7", lw=1.5, label="ᾱ_t")
        near = ts[(ts >= x0) & (ts <= x1)]
        ax.plot(near, abar[near], ".", color="0.35", ms=4, label=f"the {len(ts)} DDIM levels")
        d = den[(den >= x0) & (den <= x1)]
        ax.plot(d, abar[d], "o", mfc="none", color="C0", ms=6,
                label=f"denoised, t = {den[0]} ... {den[-1]} ({len(den)} steps)")
        if skipped.size:
            s = skipped[(skipped >= x0) & (skipped <= x1)]
            ax.plot(s, abar[s], "x", color="C3", ms=7, mew=1.5, label="levels no step visits")
        ax.plot([noise_timestep], [abar[noise_timestep]], "*", color="C3", ms=12,
                label=f"z noised to t = {noise_timestep}")
        ax.set_xlabel("timestep t (noise level)")
        ax.set_ylabel("ᾱ_t (share of z's variance left)")
    axes[0].set_title("the whole schedule", fontsize=10)
    axes[1].set_title("zoom: where sampling starts", fontsize=10)
    axes[1].set_xlim(lo, hi)
    zoom = abar[max(lo, 0):min(hi, len(abar) - 1) + 1]
    axes[1].set_ylim(zoom.min() * 0.9, zoom.max() * 1.1)
    axes[1].annotate(f"first step\nt = {first}", (first, abar[first]), xytext=(0, 22), textcoords="offset points",
                     ha="center", fontsize=8, arrowprops={"arrowstyle": "-", "color": "0.4"})
    axes[1].annotate(f"z noised\nt = {noise_timestep}", (noise_timestep, abar[noise_timestep]), xytext=(0, 22),
                     textcoords="offset points", ha="center", fontsize=8,
                     arrowprops={"arrowstyle": "-", "color": "0.4"})
    handles, labels = axes[0].get_legend_handles_labels()
    more = [(h, l) for h, l in zip(*axes[1].get_legend_handles_labels()) if l not in labels]
    handles += [h for h, _ in more]
    labels += [lab for _, lab in more]
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    return fig


def sizes_table(real: Mapping[str, float], here: Mapping[str, float], label: str):
    """Parameters in millions per part, SD v1-4's beside this run's models (``{part: count}`` each)."""
    import pandas as pd

    table = pd.DataFrame({"SD v1-4 (real path)": {k: real[k] / 1e6 for k in real},
                          f"this run ({label})": {k: here[k] / 1e6 for k in real}})
    return table.rename_axis("parameters (millions)")


# ----------------------------------------------------------------------------- 3. reconstructions

def reconstruction_grid(rows: Mapping[str, np.ndarray], column_titles: Sequence[str] | None = None,
                        size: float = 1.45, wrap: int = 16):
    """Images in a grid, one labelled row per entry of ``rows`` (label -> (k, H, W, 3) images; every row the
    same k), ``column_titles`` above the first row. Each line of a row label is wrapped at ``wrap`` characters
    (the caller's line breaks are kept)."""
    names = list(rows)
    k = len(rows[names[0]])
    if any(len(rows[r]) != k for r in names):
        raise ValueError(f"every row needs {k} images, got {[len(rows[r]) for r in names]}")
    fig, axes = plt.subplots(len(names), k, figsize=(size * k + 1.1, size * len(names) + 0.3), squeeze=False)
    for i, name in enumerate(names):
        for j in range(k):
            ax = axes[i, j]
            ax.imshow(np.asarray(rows[name][j]))
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0 and column_titles is not None:
                ax.set_title(column_titles[j], fontsize=8)
        label = "\n".join(w for part in name.split("\n") for w in textwrap.wrap(part, wrap) or [""])
        axes[i, 0].set_ylabel(label, fontsize=8)
    fig.tight_layout(pad=0.4, w_pad=0.2, h_pad=0.3)
    return fig


def mean_colour_images(images: np.ndarray) -> np.ndarray:
    """(n, H, W, 3) uint8: each image replaced by a flat image of its own mean colour (a reference that
    has the right colour and nothing else)."""
    images = np.asarray(images)
    mean = images.reshape(len(images), -1, images.shape[-1]).mean(1)
    return np.broadcast_to(np.round(mean)[:, None, None, :], images.shape).astype(np.uint8)


# ------------------------------------------------------------------------------------- 4. the scores

def metrics_table(per_image: Mapping[str, Mapping[str, np.ndarray]]):
    """Per row (a condition or a reference), the mean and the standard error of each metric over the
    images (NaN images left out). per_image: name -> metric -> (n,) values."""
    import pandas as pd

    out = {}
    for name, values in per_image.items():
        row = {}
        for m, v in values.items():
            v = np.asarray(v, dtype=float)
            ok = v[np.isfinite(v)]
            row[f"{m} mean"] = ok.mean() if ok.size else np.nan
            row[f"{m} sem"] = ok.std() / np.sqrt(ok.size) if ok.size > 1 else np.nan
        out[name] = row
    table = pd.DataFrame(out).T
    metrics = list(dict.fromkeys(c.rsplit(" ", 1)[0] for c in table.columns))
    return table[[f"{m} {s}" for m in metrics for s in ("mean", "sem")]]


def metrics_figure(table, references: Sequence[str] = (), metrics: Sequence[str] = ("PixCorr", "SSIM")):
    """One panel per metric: a bar per condition (mean +- standard error over the images) and a horizontal
    line per reference row (e.g. "another test image": the floor), from :func:`metrics_table`."""
    conditions = [r for r in table.index if r not in references]
    units = {"PixCorr": "PixCorr (Pearson r, mean)", "SSIM": "SSIM (mean)"}
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 3.6), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        x = np.arange(len(conditions))
        ax.bar(x, table.loc[conditions, f"{m} mean"], yerr=table.loc[conditions, f"{m} sem"], capsize=3,
               color=[COLOURS.get(c, "0.5") for c in conditions])
        for ref, ls in zip(references, _LINES):
            ax.axhline(table.loc[ref, f"{m} mean"], color="k", ls=ls, lw=1.2, label=ref)
        ax.axhline(0, color="0.3", lw=0.6)
        ax.set_xticks(x, conditions, rotation=15, fontsize=8)
        ax.set_ylabel(units.get(m, m))
        ax.set_title(m, fontsize=10)
    if references:
        handles, labels = axes[0, 0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=len(references), fontsize=8, frameon=False)
        fig.tight_layout(rect=(0, 0.08, 1, 1))
    else:
        fig.tight_layout()
    return fig


def ssim_sentence(table, condition: str = "decoded (z, c)", floor: str = "another test image",
                  flat: str | None = None, floor_native: float | None = None, native_size: int | None = None,
                  eval_size: int = 425) -> str:
    """This run's mean SSIM of ``condition`` beside the floor (and the flat reference), from
    :func:`metrics_table`; and, when the stimuli are smaller than ``eval_size``, the floor at their own size
    (``floor_native``)."""
    s = table["SSIM mean"]
    text = (f"SSIM, mean over the images: {condition} {s[condition]:.2f}; {floor} {s[floor]:.2f} (the floor: "
            f"it shows nothing of the stimulus)")
    if flat is not None:
        text += f"; {flat} {s[flat]:.2f} (the right colour and nothing else)"
    text += "."
    if floor_native is not None and native_size is not None and native_size != eval_size:
        text += (f"\nAt the stimuli's own {native_size} px instead of {eval_size} px, {floor} scores "
                 f"{floor_native:.2f}: upsampling smooths both images, and smooth images look alike to SSIM.")
    return text


def published_sentence(published: Sequence) -> str:
    """The paper's stage-1 numbers (:data:`mdlib.evaluation.PUBLISHED`, MindDiffuser's Table 2) in one line."""
    rows = {p.method: p.values for p in published}
    parts = [f"{name.split(', ')[1]}, SSIM {rows[name]['SSIM']:.3f} and PCC {rows[name]['PCC']:.3f}"
             for name in ("MindDiffuser, without control", "MindDiffuser, without z") if name in rows]
    return "The paper's stage 1 (real NSD, subject 1, its Table 2): " + "; ".join(parts) + "."


def latent_sentence(latent_r: Mapping[str, float]) -> str:
    """The mean correlation of each condition's output latent (and of the decoded z) with the true z."""
    return "Mean r with the stimulus' true z: " + "; ".join(f"{k} {v:.3f}" for k, v in latent_r.items()) + "."


# ----------------------------------------------------------------------------------- the seed's part

def seed_sentence(same: float, other: float, moved: float, n: int) -> str:
    """Where the blobs are, as distances between centroids of object pixels (:mod:`mdlib.placement`, in
    image sides): "without z" against "decoded (z, c)" with the same seed (``same``) and another seed
    (``other``), and "decoded (z, c)" against itself with the other seed (``moved``); then what the first
    two say (no verdict when either is NaN: no objects found)."""
    rows = [("without z, the same seed", same), ("without z, another seed", other),
            ("decoded (z, c), another seed", moved)]
    width = max(len(label) for label, _ in rows) + 1
    lines = [f"Distance between the objects' centroids (mdlib.placement, in image sides; mean over the {n} images "
             f"shown) and those of decoded (z, c) with the lesson's seed:"]
    lines += [f"  {label + ':':<{width}} {value:.2f}" for label, value in rows]
    if np.isfinite(same) and np.isfinite(other):
        lines.append("Sharing the seed brings without z closer to decoded (z, c): the noise, not only z, places the blobs."
                     if same < other else
                     "Sharing the seed does not bring without z closer to decoded (z, c) here: the noise is not what "
                     "places these blobs.")
    return "\n".join(lines)


# ------------------------------------------------------------------------------- 5. the trajectory

def rms_distance(a, b) -> np.ndarray:
    """Root mean square difference of images over their last three axes (H, W, 3), in the images' units
    (0-255 grey levels for uint8); ``a`` and ``b`` broadcast against each other."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    return np.sqrt((d ** 2).mean(axis=(-3, -2, -1)))


def trajectory_figure(distance: np.ndarray, timesteps: Sequence[int], start: np.ndarray, noise_timestep: int,
                      vae: np.ndarray | None = None):
    """How far the model's clean estimate x̂₀ is from the final image, step by step, per image (thin) and on
    average (thick).

    distance: (n, steps) RMS difference (grey levels) of each step's x̂₀ from the final image;
    timesteps: (steps,) the timestep of each step, in the order run; start: (n,) the same for the UNet's
    input (z noised to ``noise_timestep``, through the VAE decoder); vae: (n,) the same for the decoded z
    through the VAE alone (a dotted line), or None.
    """
    distance = np.atleast_2d(np.asarray(distance, dtype=float))
    t = np.concatenate([[noise_timestep], np.asarray(timesteps)])
    curves = np.concatenate([np.asarray(start, dtype=float)[:, None], distance], axis=1)
    fig, ax = plt.subplots(figsize=(9, 3.6))
    for c in curves:
        ax.plot(t, c, color="0.75", lw=0.8)
    ax.plot(t, curves.mean(0), "o-", color="C0", ms=3, lw=2, label=f"mean over {len(curves)} images")
    ax.plot([], [], color="0.75", lw=0.8, label="one image")
    if vae is not None:
        ax.axhline(float(np.mean(vae)), color="C7", ls=":", lw=1.5, label="VAE(decoded z), no diffusion (mean)")
    ax.annotate("UNet input\n(z noised)", (noise_timestep, curves[:, 0].mean()), xytext=(8, 6),
                textcoords="offset points", fontsize=8, va="bottom")
    ax.set_xlim(t.max() + 15, min(t.min(), 0) - 15)   # sampling runs from high t to low t: left to right
    ax.set_ylim(0, None)
    ax.set_xlabel("timestep t of the step (sampling runs left to right)")
    ax.set_ylabel("RMS difference from the\nfinal image (grey levels)")
    ax.set_title("how far the model's clean estimate x̂₀ is from the final image", fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    return fig


def trajectory_frames(stimulus, vae_image, noised_image, estimates, final, timesteps: Sequence[int],
                      noise_timestep: int, gain: float = 4.0) -> tuple[list, list[str]]:
    """The few frames worth showing of one image's sampling, with their titles, for
    :func:`mdlib.viz.image_grid`: the stimulus, the decoded z through the VAE, the UNet's input, x̂₀ after
    the first step, x̂₀ after the step that brings it halfway from there to the final image, the final image,
    and the difference final - first estimate (absolute, times ``gain``).

    estimates: (steps, S, S, 3) uint8 x̂₀ per step; final: (S, S, 3) uint8; timesteps: (steps,) in the order run.
    """
    estimates = np.asarray(estimates)
    d = rms_distance(estimates, final)
    half = int(np.argmax(d <= d[0] / 2)) if (d <= d[0] / 2).any() else len(d) - 1
    diff = np.clip(np.abs(final.astype(float) - estimates[0].astype(float)) * gain, 0, 255).astype(np.uint8)
    images = [stimulus, vae_image, noised_image, estimates[0], estimates[half], final, diff]
    titles = ["stimulus", "VAE(decoded z)\nno diffusion", f"UNet input\nz noised to t = {noise_timestep}",
              f"x̂₀ at step 1\n(t = {timesteps[0]})", f"x̂₀ at step {half + 1}\n(t = {timesteps[half]})",
              f"final image\n(after step {len(d)})", f"|final - step 1|\nx {gain:g}"]
    return images, titles


def trajectory_sentence(distance: np.ndarray, start: np.ndarray, vae: np.ndarray) -> str:
    """The mean RMS differences from the final image (grey levels) at the input, after the first step and
    after the middle step, beside the decoded z's through the VAE; then the share of the way from the input
    to the final image that the first step covers."""
    distance = np.atleast_2d(np.asarray(distance, dtype=float))
    steps, mid = distance.shape[1], distance.shape[1] // 2
    s0, first = float(np.mean(start)), float(distance[:, 0].mean())
    text = (f"RMS difference from the final image, mean over {len(distance)} images (grey levels, 0-255): "
            f"the UNet's input {s0:.1f}; VAE(decoded z) {np.mean(vae):.1f}; x̂₀ after step 1 {first:.1f}, "
            f"after step {mid + 1} of {steps} {distance[:, mid].mean():.1f}.")
    if s0 > 0:
        text += f"\nThe first step covers {(s0 - first) / s0:.0%} of the way from the UNet's input to the final image."
    return text


__all__ = ["COLOURS", "METHOD_ROWS", "latent_sentence", "mean_colour_images", "metrics_figure", "metrics_table", "published_sentence",
           "reconstruction_grid", "rms_distance", "schedule_figure", "schedule_sentence", "seed_sentence",
           "signal_sentence", "sizes_table", "ssim_sentence", "trajectory_figure", "trajectory_frames",
           "trajectory_sentence"]

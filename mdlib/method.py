"""The method's settings in one object, and the three variants that set them all at once (docs/method.md).

MindDiffuser exists twice: as the paper describes it (Algorithm 1 and its text) and as the authors' released
code does it, and the two differ. :class:`MethodConfig` holds every choice the method makes (one row each of
the table in docs/method.md), and :func:`configure` fills it from one name:

- ``"released"``: the authors' code, row by row (its file and line in docs/method.md);
- ``"paper"``: Algorithm 1 where it says something (z and c updated by plain gradient steps, lr 0.01, the
  summed squared error of the CLIP features, the noise drawn anew in every iteration); the released code
  elsewhere;
- ``"mdlib"`` (the default): this course's choices, each departure from the released code with its reason in
  docs/method.md.

The preset (``"nsd"``: the real data and models; ``"mini"``: mini-NSD and the tiny models) then adapts the few
rows the mini world cannot run as they are (:attr:`mdlib.presets.Preset.method_changes`), and keyword overrides change single rows. Every
change is listed in :attr:`MethodConfig.changes`, and :func:`describe` gives every row's value for run records
(``mdlib reconstruct`` writes it into ``run.json``; the lessons print it).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from mdlib import decoding, presets, selection
from mdlib.sampler import SamplerConfig
from mdlib.stage2 import FastConfig, PublishedConfig, snapshot_iterations

VARIANTS = ("mdlib", "released", "paper")
DEFAULT_VARIANT = "mdlib"
LOSSES = ("mdlib", "released", "paper")
@dataclass(frozen=True)
class MethodConfig:
    """Every choice of the method (docs/method.md has one row for each, with the paper's and the released
    code's). Build it with :func:`configure`; change a copy with :meth:`replace`.

    Attributes:
        variant, preset: what :func:`configure` started from. changes: ``(field, why)`` for every field that
            differs from the variant's table value (``"preset mini"`` or ``"override"``).
        roi, sessions: the voxels (:func:`mdlib.nsd.betas.load_betas`). standardize: ``"train"`` or ``"test"``
            (test voxels with their own statistics). n_train: fit on the first n training images (None: all).
        posterior, n_tokens, n_captions: the targets z and c (:func:`mdlib.features.extract_targets`).
        decoder: ``"ridge"`` (alpha per feature by leave-one-out) or ``"fastl2lir"``. n_select: FastL2LiR's
            voxels per family key (z, c, clip); scale_n_select: in proportion to the ROI's size.
        keep, select_by: stage 2's features: the share kept per block and the score it is chosen by
            (:mod:`mdlib.selection`).
        clip_normalization, clip_resize_stimuli, clip_resize_generated, clamp_generated: how images reach CLIP
            (:func:`mdlib.features.clip_preprocess`).
        loss: ``"mdlib"`` (mean over kept features + cos_weight (1 - cos)), ``"released"`` (``MSE_CLIP_mask``
            with its ``loss_CLIP_weight`` = loss_clip_weight) or ``"paper"`` (summed squared error).
        sampler, published, fast: stage 1's sampler and stage 2's two modes.
        seed: every seed derives from it. batch_size, save_every: how the work is cut (no effect on results).
    """

    variant: str = DEFAULT_VARIANT
    preset: str = "nsd"
    changes: tuple[tuple[str, str], ...] = ()
    roi: str = "nsdgeneral"
    sessions: tuple[int, ...] | None = None
    standardize: str = "train"
    n_train: int | None = None
    posterior: str = "sample"
    n_tokens: int = 15
    n_captions: int | None = None
    decoder: str = "ridge"
    n_select: dict[str, int] | None = None
    scale_n_select: bool = False
    keep: float = 0.25
    select_by: str = "loo-r2"
    clip_normalization: str = "clip"
    clip_resize_stimuli: str = "bicubic-aa"
    clip_resize_generated: str = "bicubic-aa"
    clamp_generated: bool = False
    loss: str = "mdlib"
    cos_weight: float = 0.1
    loss_clip_weight: float = 0.5
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    published: PublishedConfig = field(default_factory=PublishedConfig)
    fast: FastConfig = field(default_factory=lambda: FastConfig(scale=4.0))   # lesson 05's step
    seed: int = 0
    batch_size: int = 4
    save_every: int = 10

    def __post_init__(self) -> None:
        checks = {"variant": VARIANTS, "preset": presets.NAMES, "loss": LOSSES, "standardize": decoding.STANDARDIZE,
                  "decoder": decoding.METHODS, "select_by": selection.SCORES, "posterior": ("sample", "mean")}
        for name, allowed in checks.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not 0 < self.keep <= 1:
            raise ValueError(f"keep must be in (0, 1], got {self.keep}")
        if self.decoder == "fastl2lir" and self.select_by == "loo-r2" and self.keep < 1:
            raise ValueError("the FastL2LiR decoder gives no leave-one-out R^2: with decoder='fastl2lir' select "
                             "the features by 'cv5-r' (the released criterion), or keep = 1")
        if not (math.isfinite(self.cos_weight) and self.cos_weight >= 0):
            raise ValueError(f"cos_weight must be a finite number >= 0, got {self.cos_weight}")
        if not 0 <= self.loss_clip_weight <= 1:
            raise ValueError(f"loss_clip_weight must be in [0, 1], got {self.loss_clip_weight}")

    def replace(self, **overrides) -> MethodConfig:
        """A copy with some rows changed (the flat names of :func:`configure`), recorded in ``changes``."""
        return _apply(self, overrides, "override")

    # -- what the stages take -----------------------------------------------------------------------------
    def decode_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`mdlib.decoding.decode_features` that this configuration sets."""
        return {"roi": self.roi, "sessions": self.sessions, "method": self.decoder, "n_select": self.n_select,
                "scale_n_select": self.scale_n_select, "n_tokens": self.n_tokens, "posterior": self.posterior,
                "seed": self.seed, "standardize": self.standardize, "n_train": self.n_train,
                "n_captions": self.n_captions, "clip_resize": self.clip_resize_stimuli, "select_by": self.select_by}

    def loss_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :meth:`mdlib.stage2.FeatureTargets.from_decoded` for this loss."""
        common = {"keep": self.keep, "resize": self.clip_resize_generated, "clamp": self.clamp_generated}
        if self.loss == "released":   # MSE_CLIP_mask: (1 - W) x blocks, 0.1 W x (1 - cos)
            return {**common, "reduction": "released", "block_scale": 1.0 - self.loss_clip_weight,
                    "cos_weight": 0.1 * self.loss_clip_weight}
        if self.loss == "paper":      # Algorithm 1, line 5: the summed squared error, no embedding term
            return {**common, "reduction": "sum", "cos_weight": 0.0}
        return {**common, "reduction": "mean", "cos_weight": self.cos_weight}

    def targets(self, decoded, rows=None, device=None, use: str = "pred"):
        """Stage 2's :class:`mdlib.stage2.FeatureTargets` for ``rows`` of a subject's ``decoded`` features."""
        from mdlib.stage2 import FeatureTargets

        return FeatureTargets.from_decoded(decoded, rows=rows, device=device, use=use, **self.loss_kwargs())

    @property
    def sd_model(self) -> str:
        return presets.get(self.preset).sd_model

    @property
    def clip_model(self) -> str:
        return presets.get(self.preset).clip_model


# ------------------------------------------------------------------------------------------------ variants

#: Each variant's rows, as flat names (see :func:`configure`); rows a variant does not name take the
#: MethodConfig defaults, which are the "mdlib" variant's. Sources: docs/method.md.
_VARIANT_ROWS: dict[str, dict[str, Any]] = {
    "mdlib": {},
    "released": {
        "roi": "mindiffuser", "standardize": "test", "n_train": 8000, "posterior": "sample", "n_tokens": 15,
        "n_captions": 5, "decoder": "fastl2lir", "n_select": {"z": 4000, "c": 125, "clip": 850},
        "keep": 0.25, "select_by": "cv5-r", "clip_normalization": "imagenet", "clip_resize_stimuli": "bilinear",
        "clip_resize_generated": "bicubic", "clamp_generated": True, "loss": "released", "loss_clip_weight": 0.5,
        "iterations": 300, "optimizer": "adam", "lr": 0.01, "gamma": 0.999, "lr_decay_first": True,
        "update": ("z",), "fresh_noise": True,
    },
}
# The paper: the released code, except where Algorithm 1 says otherwise.
_VARIANT_ROWS["paper"] = {**_VARIANT_ROWS["released"], "loss": "paper", "optimizer": "sgd", "lr": 0.01,
                          "gamma": 1.0, "lr_decay_first": False, "update": ("z", "c"), "fresh_noise": True}

_PUBLISHED = {f.name for f in dataclasses.fields(PublishedConfig)}
_SAMPLER = {f.name for f in dataclasses.fields(SamplerConfig)}
_FAST = {"fast_" + f.name: f.name for f in dataclasses.fields(FastConfig)}
_OWN = {f.name for f in dataclasses.fields(MethodConfig)} - {"variant", "preset", "changes", "sampler", "published",
                                                             "fast"}


def names() -> list[str]:
    """Every flat name :func:`configure` and :meth:`MethodConfig.replace` accept."""
    return sorted(_OWN | _PUBLISHED | _SAMPLER | set(_FAST) | {"lr_scale"})


def _get(config: MethodConfig, name: str) -> Any:
    if name in _OWN:
        return getattr(config, name)
    if name in _PUBLISHED:
        return getattr(config.published, name)
    if name in _SAMPLER:
        return getattr(config.sampler, name)
    return getattr(config.fast, _FAST[name])


def _apply(config: MethodConfig, rows: dict[str, Any], why: str | None) -> MethodConfig:
    """Set flat-named rows; ``why`` (None: silently) is recorded for those that change a value."""
    rows = dict(rows)
    unknown = sorted(set(rows) - set(names()))
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown}: the method's settings are {names()}")
    lr_scale = rows.pop("lr_scale", None)
    if lr_scale is not None and "lr" not in rows:
        rows["lr"] = config.published.lr * float(lr_scale)
    if "update" in rows and isinstance(rows["update"], str):
        rows["update"] = tuple(u.strip() for u in rows["update"].split(",") if u.strip())
    if "sessions" in rows and rows["sessions"] is not None:
        rows["sessions"] = tuple(int(s) for s in rows["sessions"])
    if "iterations" in rows and "snapshots" not in rows:
        rows["snapshots"] = snapshot_iterations(int(rows["iterations"]))
    changed = [k for k, v in rows.items() if _get(config, k) != v]
    own = {k: v for k, v in rows.items() if k in _OWN}
    published = dataclasses.replace(config.published, **{k: v for k, v in rows.items() if k in _PUBLISHED})
    sampler = dataclasses.replace(config.sampler, **{k: v for k, v in rows.items() if k in _SAMPLER})
    fast = dataclasses.replace(config.fast, **{_FAST[k]: v for k, v in rows.items() if k in _FAST})
    changes = config.changes
    if why is not None:
        done = dict(changes)   # the last change of a row names why it has its value
        done.update((k, why) for k in changed if k != "snapshots")
        changes = tuple(done.items())
    return dataclasses.replace(config, **own, published=published, sampler=sampler, fast=fast, changes=changes)


def configure(variant: str = DEFAULT_VARIANT, preset: str = "nsd", **overrides) -> MethodConfig:
    """The method's settings for a variant (``"mdlib"``, ``"released"``, ``"paper"``) on a preset (``"nsd"``,
    ``"mini"``), then ``overrides`` (flat names: the fields of :class:`MethodConfig`, of
    :class:`mdlib.stage2.PublishedConfig` (``iterations``, ``lr``, ``update``, ...), of
    :class:`mdlib.sampler.SamplerConfig` (``noise_index``, ``guidance_scale``, ...), ``fast_<field>`` for
    :class:`mdlib.stage2.FastConfig`, and ``lr_scale``). Overrides equal to None are ignored, so optional CLI
    options can be passed as they are.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    preset = presets.get(preset).name
    base = MethodConfig(variant=variant, preset=preset, published=PublishedConfig(iterations=300))
    config = _apply(base, _VARIANT_ROWS[variant], None)
    config = _apply(config, presets.get(preset).method_changes, f"preset {preset}")
    return _apply(config, {k: v for k, v in overrides.items() if v is not None}, "override")


def describe(config: MethodConfig) -> dict[str, Any]:
    """Every row's value (flat names, JSON-able), with ``variant``, ``preset`` and ``changes``: what a run
    record holds so that a result can be traced to each choice."""
    rows = {name: _get(config, name) for name in names() if name != "lr_scale"}
    rows = {k: (list(v) if isinstance(v, tuple) else v) for k, v in rows.items()}
    return {"variant": config.variant, "preset": config.preset, "changes": {k: why for k, why in config.changes},
            "rows": rows}


def table(config: MethodConfig, rows=None):
    """The rows as a pandas DataFrame for a lesson to show: ``value`` and ``set by`` (the variant, the preset or
    an override). ``rows``: the flat names to show (default: all)."""
    import pandas as pd

    d = describe(config)
    names_ = list(d["rows"]) if rows is None else list(rows)
    return pd.DataFrame({"value": [str(d["rows"][k]) for k in names_],
                         "set by": [d["changes"].get(k, f"variant {config.variant}") for k in names_]},
                        index=pd.Index(names_, name=f"{config.variant} on {config.preset}"))

"""The two paths through the course, in one place: everything that differs between the mini and the real path.

A lesson, ``mdlib reconstruct`` and the CLI read their defaults here and never branch on the preset's name:

- ``"mini"``: mini-NSD (synthetic, in NSD's formats, written on first use by :mod:`mdlib.synth.write`) and the
  tiny models trained on its scenes, shipped in ``mdlib/weights`` (docs/mini_world.md). Runs on a laptop CPU.
- ``"nsd"``: the real Natural Scenes Dataset under the data root (``mdlib fetch``; docs/fetch.md), Stable
  Diffusion v1-4 and OpenAI's CLIP from the Hugging Face cache, a CUDA GPU.

:func:`get` gives a :class:`Preset`; :meth:`Preset.prepare` resolves and checks the data root (writing
mini-NSD when it is missing, never over other data); :data:`NAMES` lists them. The method's rows that a preset
changes (the mini path's shorter stage 2, for instance) are :attr:`Preset.method_changes`, applied by
:func:`mdlib.method.configure` (docs/method.md, "The mini path").
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

NAMES = ("mini", "nsd")


@dataclass(frozen=True)
class Preset:
    """One path through the course.

    Attributes:
        name, title: ``"mini"`` or ``"nsd"``; a readable name.
        data_dir: the data root's folder under ``$MDLIB_DATA`` (:func:`mdlib.paths.home`).
        sd_model, clip_model: stage 1's and stage 2's models (:func:`mdlib.models.load_sd`,
            :func:`mdlib.models.load_clip_vision`).
        eval_clip: the CLIP column of the evaluation: None for OpenAI's ViT-L/14 (by the weight policy), or a
            :func:`mdlib.models.load_clip_vision` source put in its place (:mod:`mdlib.evalnets`).
        synthetic: the data are simulated, so the ground truth of each voxel is known
            (:func:`mdlib.synth.write.load_truth`) and scenes are flat shapes whose placement can be measured
            (:mod:`mdlib.placement`).
        method_changes: rows of the method this preset changes in every variant, with why
            (:func:`mdlib.method.configure`).
        notes: what to say when the data root is missing.
    """

    name: str
    title: str
    data_dir: str
    sd_model: str
    clip_model: str
    eval_clip: str | None
    synthetic: bool
    method_changes: Mapping[str, Any] = field(default_factory=dict)
    notes: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "method_changes", MappingProxyType(dict(self.method_changes)))

    def data_root(self, data_root: str | os.PathLike | None = None) -> Path:
        """``data_root`` if given, else ``<$MDLIB_DATA>/<data_dir>`` (not checked: see :meth:`prepare`)."""
        from mdlib import paths

        if data_root not in (None, ""):
            return Path(data_root).expanduser()
        return paths.home() / self.data_dir

    def prepare(self, data_root: str | os.PathLike | None = None, progress: bool = True) -> Path:
        """The data root, ready to read: mini-NSD is written there on first use; the real NSD must have been
        fetched. Raises a :class:`FileNotFoundError` naming the folder and the command that fills it."""
        root = self.data_root(data_root)
        if self.synthetic:
            from mdlib.synth.write import ensure_mini_nsd

            return ensure_mini_nsd(root, progress=progress)
        from mdlib.nsd import layout

        if not (root / layout.expdesign()).is_file():
            raise FileNotFoundError(f"no NSD at {root} (missing {layout.expdesign()}). {self.notes}")
        return root

    def truth(self, data_root: str | os.PathLike | None, subject: int) -> dict | None:
        """The simulated brain's ground truth for ``subject`` (:func:`mdlib.synth.write.load_truth`), or None
        on real data, where no truth exists."""
        if not self.synthetic:
            return None
        from mdlib.synth.write import load_truth

        return load_truth(self.data_root(data_root), subject)


PRESETS: Mapping[str, Preset] = MappingProxyType({
    "mini": Preset(
        name="mini", title="mini-NSD and the trained tiny models", data_dir="mini-nsd",
        sd_model="tiny-trained", clip_model="tiny-trained", eval_clip="tiny-trained", synthetic=True,
        method_changes={
            # The tiny VAE's posterior is wide (sd ~0.6 per value against ~0.9 across images): its mean is z.
            "posterior": "mean",
            # 10 iterations stand in for 300 on a CPU; a 5x larger step lets them move z as far
            # (benchmarks/README.md, bench_stage2.py part 3).
            "iterations": 10, "lr_scale": 5.0,
            # The tiny models' activations over 35 steps take a few MB: keeping them costs nothing, while
            # checkpointing would run every step's forward pass twice (benchmarks/README.md, bench_levers.py).
            "checkpoint": False,
            # FastL2LiR's voxel counts were chosen for 11,694 voxels: keep the same share of mini's fewer.
            "scale_n_select": True,
        },
        notes="mini-NSD is written there on first use (mdlib mini ROOT; docs/data.md, \"mini-NSD\")."),
    "nsd": Preset(
        name="nsd", title="the real NSD, Stable Diffusion v1-4 and CLIP", data_dir="nsd",
        sd_model="CompVis/stable-diffusion-v1-4", clip_model="openai", eval_clip=None, synthetic=False,
        notes="Fetch it first: `mdlib fetch --subject 1 --what full --models` (docs/fetch.md), or pass its folder "
              "as DATA_ROOT / --data-root."),
})


def get(preset: str | Preset) -> Preset:
    """The :class:`Preset` named ``preset`` (``"mini"`` or ``"nsd"``); a Preset is returned as is."""
    if isinstance(preset, Preset):
        return preset
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {NAMES}, got {preset!r}")
    return PRESETS[preset]


__all__ = ["NAMES", "PRESETS", "Preset", "get"]

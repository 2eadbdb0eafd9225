"""Each lesson's settings in one place: the handful in its parameters cell, and the advanced ones here.

A lesson's parameters cell holds what a learner changes (``PRESET``, ``SUBJECT``, ``N_IMAGES``, ``SEED``,
``DEVICE``, ...) and one dict, ``ADVANCED``, for everything else. :func:`settings` merges ``ADVANCED`` into the
lesson's defaults below and refuses names it does not know, listing the known ones; :func:`table` shows them
with their defaults and meaning. A papermill run sets them the same way::

    papermill notebooks/06_evaluation.ipynb out.ipynb -p PRESET nsd -y "ADVANCED: {eval_weights: pretrained}"

The defaults are the lesson's; the method's own rows (the paper's and the released code's choices) are set by
``VARIANT`` and live in :mod:`mdlib.method` (docs/method.md), not here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType, SimpleNamespace
from typing import Any


@dataclass(frozen=True)
class Setting:
    """One advanced setting: its default and what it does (one line)."""

    default: Any
    help: str


def _settings(**entries: tuple[Any, str]) -> Mapping[str, Setting]:
    return MappingProxyType({name: Setting(*entry) for name, entry in entries.items()})


#: Per lesson (its two-digit number), the advanced settings and their defaults.
ADVANCED: Mapping[str, Mapping[str, Setting]] = MappingProxyType({
    "01": _settings(),
    "02": _settings(),
    "03": _settings(
        overrides=({}, 'single rows of the method, e.g. {"roi": "prf-visualrois"} (names: mdlib.method.names())'),
        sd_model=("", "Stable Diffusion weights for z and c; empty: the preset's"),
        clip_model=("", "CLIP weights for the structural features; empty: the preset's"),
        alpha_log10_range=((-1, 5), "the ridge alpha grid runs from 10**a to 10**b (a, b)"),
        n_alphas=(13, "alphas in the grid, log-spaced"),
        n_show=(6, "test images in the decoded-latents figure"),
    ),
    "04": _settings(
        overrides=({}, "single rows of the method, e.g. {'noise_index': 24, 'denoise_steps': 25}; names: "
                       "mdlib.method.names()"),
        batch_size=(8, "images per UNet batch (no effect on the images: each has its own seed)"),
        n_show=(8, "test images in the figures, spread over the test set"),
        out_dir=("", "where the stage-1 images go (resumable); empty: $MDLIB_DATA/runs/stage1/"
                     "<preset>_<variant>_subjNN (lesson 06 reads it)"),
        sd_model=("", "Stable Diffusion to load; empty: the preset's"),
        dtype=("", "model dtype; empty: float32; 'float16' halves memory and time on a GPU"),
    ),
    "05": _settings(
        batch_size=(4, "test images optimised together (lesson 06 reads the published states back only with its "
                       "own batch_size the same)"),
        overrides=({}, "single rows of the method, e.g. {'iterations': 20, 'update': 'z,c'}; names: "
                       "mdlib.method.names()"),
        out_dir=("", "images and resumable stage-2 state; empty: $MDLIB_DATA/runs/stage2/<preset>_<variant>_subjNN "
                     "(lesson 06 reads it)"),
        sd_model=("", "Stable Diffusion to load; empty: the preset's"),
        clip_model=("", "CLIP image encoder to load; empty: the preset's"),
        dtype=("", "model dtype; empty: float32 (every variant's stage 2)"),
        autocast=("", "'bf16' or 'fp16': mixed precision of both modes' forward passes (CUDA); empty: none"),
        attention=("sdpa", "'sdpa' (PyTorch's memory-efficient attention) or 'xformers' (CUDA, needs xformers)"),
    ),
    "06": _settings(
        overrides=({}, "single rows of the method, e.g. {'iterations': 20}; names: mdlib.method.names()"),
        batch_size=(4, "images per batch, as in lesson 05: the same value reads its saved stage-2 states back"),
        cross_subject_condition=("fast", "the pipeline run per subject: 'fast', 'full' (published) or "
                                 "'without control'"),
        n_stage1_images=(0, "stage 1 alone on this many common test images, 0 for all (lesson 04 made them)"),
        eval_weights=("auto", "'auto': networks whose pretrained files are here, the others left out; "
                      "'pretrained' downloads them"),
        eval_batch_size=(16, "images per forward pass of the evaluation networks"),
        runs_root=("", "where lessons 04/05's folders are (stage1|stage2/<preset>_<variant>_subjNN); "
                   "empty: $MDLIB_DATA/runs"),
        dtype=("", "the models' dtype; empty: float32"),
    ),
    "07": _settings(
        variant=("mdlib", "the method's rows (the features decoded, the sampler): 'mdlib', 'released' or 'paper' "
                          "(docs/method.md)"),
        families=([], "feature families decoded, e.g. ['z', 'c'] (stage 1 needs both); empty: z, c and every CLIP "
                      "family (on NSD each costs memory: docs/new_subject.md, 'Using it')"),
        protocol=("mdlib", "how images reach the metrics: 'mdlib', 'mindeye' or 'braindiffuser' "
                           "(docs/evaluation.md)"),
        eval_weights=("auto", "'auto': evaluation networks whose pretrained files are here, the others left out; "
                              "'pretrained' downloads them"),
        batch_size=(8, "images per UNet batch in stage 1 (no effect on the images: each has its own seed)"),
        out_dir=("", "where the stage-1 images go (resumable); empty: $MDLIB_DATA/runs/transfer/"
                     "<preset>_<variant>_subjNN_s<sessions>_refs<references>"),
        sd_model=("", "Stable Diffusion for z, c and stage 1; empty: the preset's"),
        clip_model=("", "CLIP for the structural features; empty: the preset's"),
    ),
})


def settings(lesson: str, advanced: Mapping[str, Any] | None = None) -> SimpleNamespace:
    """The advanced settings of ``lesson`` ("01" ... "07"): its defaults, with ``advanced`` (a dict of
    ``name: value``, names as in :data:`ADVANCED`) applied. Unknown names raise a ``KeyError`` that lists the
    known ones; ``None`` values keep the default."""
    known = _lesson(lesson)
    given = dict(advanced or {})
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise KeyError(f"lesson {lesson} has no advanced setting {', '.join(map(repr, unknown))}; known: "
                       f"{', '.join(known) or 'none'} (mdlib.lessons.table({lesson!r}) lists them)")
    values = {name: s.default for name, s in known.items()}
    values.update({k: v for k, v in given.items() if v is not None})
    return SimpleNamespace(**values)


def table(lesson: str):
    """The advanced settings of ``lesson`` as a DataFrame: default and meaning, one row per name."""
    import pandas as pd

    known = _lesson(lesson)
    return pd.DataFrame({"default": [repr(s.default) for s in known.values()],
                         "what it does": [s.help for s in known.values()]},
                        index=pd.Index(list(known), name="ADVANCED"))


def _lesson(lesson: str) -> Mapping[str, Setting]:
    if lesson not in ADVANCED:
        raise KeyError(f"no lesson {lesson!r}; lessons: {', '.join(ADVANCED)}")
    return ADVANCED[lesson]


__all__ = ["ADVANCED", "Setting", "settings", "table"]

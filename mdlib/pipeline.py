"""The whole method for one subject and a set of test images, under each of the paper's conditions (lesson 06).

:func:`reconstruct_condition` chains what lessons 03-05 teach: decode the subject's features
(:func:`mdlib.decoding.decode_features`, cached), run stage 1 (:func:`mdlib.stage1.img2img`, resumable)
and, for the stage-2 conditions, the guidance (:mod:`mdlib.stage2`, the published mode resumable too). The
conditions are the paper's ablations (its Table 2) plus a ceiling and our fast mode:

- ``"true (z, c)"``: stage 1 from the stimulus' own z and c: what perfect decoding would give;
- ``"without z"``: stage 1 from noise and the decoded c (text-to-image, all 50 steps);
- ``"without control"``: stage 1 from the decoded (z, c), no stage 2;
- ``"full"``: stage 1 then the published stage 2 (backpropagation through the sampler);
- ``"fast"``: stage 1's inputs with the fast stage 2 (guidance inside one sampling pass).

Outputs go to the lessons' own folders (``<runs>/stage1/<preset>_<variant>_subjNN/...`` and
``<runs>/stage2/...``), so what lessons 04 and 05 computed is read back, not recomputed. The method's rows
are in docs/method.md; how the conditions are scored, in docs/evaluation.md.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mdlib import paths
from mdlib.cachekey import cache_key
from mdlib.sampler import SamplerConfig, image_seed

if TYPE_CHECKING:
    from mdlib.method import MethodConfig

CONDITIONS = ("true (z, c)", "without z", "without control", "full", "fast")
#: stage-1 folder of each stage-1 condition (lesson 04's names).
STAGE1_FOLDERS = {"true (z, c)": "true", "without control": "decoded", "without z": "without_z"}


@dataclass
class Reconstruction:
    """One condition's images for one subject.

    Attributes:
        condition, subject: what was run. nsd_ids: (n,) the test images (0-based nsdIds).
        images: (n, S, S, 3) uint8. image_dir: the folder holding them as ``<nsdId>.png``.
        loss: (n,) stage 2's feature loss of the final images (NaN for stage-1 conditions).
        cost: UNet forward and backward passes, wall seconds (stage-2 conditions).
    """

    condition: str
    subject: int
    nsd_ids: np.ndarray
    images: np.ndarray
    image_dir: Path
    loss: np.ndarray
    cost: dict


def run_folders(config: MethodConfig, subject: int, runs_root: str | os.PathLike | None = None
                ) -> tuple[Path, Path]:
    """The folders of lessons 04, 05 and 06 for a subject under a method configuration: (stage-1 folder,
    stage-2 folder), ``<runs>/stage1/<preset>_<variant>_subjNN`` and the same under ``stage2``. Inside them,
    images and states are keyed by their inputs and settings, so overridden rows never read stale results."""
    name = f"{config.preset}_{config.variant}_subj{int(subject):02d}"
    return paths.runs_dir(f"stage1/{name}", runs_root), paths.runs_dir(f"stage2/{name}", runs_root)


def subject_rows(decoded, nsd_ids: Sequence[int]) -> np.ndarray:
    """Positions of ``nsd_ids`` among a subject's decoded test images; a clear error for any it lacks."""
    ids = np.asarray(nsd_ids, dtype=np.int64)
    pos = np.searchsorted(decoded.nsd_ids, ids)
    pos = np.clip(pos, 0, len(decoded.nsd_ids) - 1)
    missing = ids[decoded.nsd_ids[pos] != ids]
    if missing.size:
        raise ValueError(f"nsdIds {missing[:10].tolist()} are not test images of this subject "
                         f"({len(decoded.nsd_ids)} test images); use ids every subject saw (common_test_ids)")
    return pos


def common_test_ids(decoded_by_subject: dict) -> np.ndarray:
    """The test images every subject saw (ascending nsdIds): cross-subject comparisons use these."""
    sets = [set(d.nsd_ids.tolist()) for d in decoded_by_subject.values()]
    return np.array(sorted(set.intersection(*sets)), dtype=np.int64)


def _settings_tag(*configs) -> str:
    text = json.dumps([c if isinstance(c, dict) else asdict(c) for c in configs], sort_keys=True, default=str)
    return cache_key(text, n=8, algorithm="sha1")


def reconstruct_condition(condition: str, decoded, sd, clip, nsd_ids: Sequence[int], config: MethodConfig,
                          stage1_dir: str | os.PathLike, stage2_dir: str | os.PathLike, subject: int = 0,
                          progress: bool = True) -> Reconstruction:
    """Reconstruct ``nsd_ids`` under one condition (see the module docstring) from a subject's ``decoded``.

    Args:
        condition: one of :data:`CONDITIONS`. decoded: :func:`mdlib.decoding.decode_features`' result (with
            the CLIP families for ``"full"`` and ``"fast"``). sd, clip: the models (clip unused by stage 1).
        nsd_ids: test images of this subject. config: :class:`mdlib.method.MethodConfig`.
        stage1_dir, stage2_dir: the subject's folders (:func:`run_folders`): images and states are saved
            there as they are done and read back on a rerun.
    """
    from mdlib import runstate, stage1, stage2

    if condition not in CONDITIONS:
        raise ValueError(f"condition must be one of {CONDITIONS}, got {condition!r}")
    rows = subject_rows(decoded, nsd_ids)
    ids = decoded.nsd_ids[rows]
    names = [str(i) for i in ids]
    seeds = [image_seed(i, config.seed) for i in ids]
    n, bs = len(ids), config.batch_size
    source = decoded.true if condition == "true (z, c)" else decoded.pred
    z, c = source["z"][rows], source["c"][rows]
    nan = np.full(n, np.nan)
    if condition in STAGE1_FOLDERS:
        cfg = config.sampler
        if condition == "without z":
            s = config.sampler
            cfg = SamplerConfig.text_to_image(s.num_steps, guidance_scale=s.guidance_scale, eta=s.eta)
            z = None
        folder = Path(stage1_dir) / STAGE1_FOLDERS[condition] / stage1.run_tag(sd, cfg)
        out = stage1.img2img(sd, z, c, seeds, config=cfg, batch_size=bs, out_dir=folder, names=names,
                             progress=progress)
        return Reconstruction(condition, subject, ids, out.images, folder, nan, {})

    if clip is None:
        raise ValueError(f"condition {condition!r} needs the CLIP model of stage 2")
    targets = config.targets(decoded, rows=rows, device=sd.device)
    images, losses, cost = [], [], {"unet_passes": 0, "unet_backward": 0, "wall_s": 0.0}
    for start in range(0, n, bs):
        part = slice(start, min(start + bs, n))
        if condition == "full":
            out = stage2.guide_published(sd, clip, z[part], c[part], targets.subset(part), seeds[part],
                                         config=config.published, sampler_config=config.sampler,
                                         state=runstate.stores_under(Path(stage2_dir) / "published"),
                                         save_every=config.save_every, progress=progress)
        else:
            out = stage2.guide_fast(sd, clip, z[part], c[part], targets.subset(part), seeds[part],
                                    config=config.fast, sampler_config=config.sampler, progress=progress)
        images.append(out.images)
        losses.append(out.loss[-1])
        for k in cost:
            cost[k] += out.cost[k]
    images = np.concatenate(images)
    mode = "published" if condition == "full" else "fast"
    settings = config.published if condition == "full" else config.fast
    tag = _settings_tag(settings, config.sampler, config.loss_kwargs())
    folder = stage2.save_images(Path(stage2_dir) / "images" / f"{mode}_{tag}", names, images)
    return Reconstruction(condition, subject, ids, images, folder, np.concatenate(losses), cost)

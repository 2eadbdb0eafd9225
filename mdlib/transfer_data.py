"""Read what :mod:`mdlib.transfer`'s methods need from a data root: betas of the new subject and its references,
and the features of every image involved (lesson 07; docs/new_subject.md).

- :func:`load_inputs`: the :class:`mdlib.transfer.TransferInputs` of a split. The hour's responses come from
  the hour's trials only (read per trial, then averaged per image), so that ``n_trials`` can cut a session;
  the test and training responses average every trial of their sessions (:func:`mdlib.nsd.betas.load_betas`,
  z-scored per session, cached).
- :func:`load_targets`: the :class:`mdlib.transfer.TargetTable` (:func:`mdlib.features.extract_targets`,
  cached; c without its BOS token, as the decoders fit it).
- :func:`run`: the split, the inputs, the targets and :func:`mdlib.transfer.compare`, in one call.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import numpy as np

from mdlib import features
from mdlib.nsd.betas import load_betas
from mdlib.nsd.design import load_design
from mdlib.ridge import DEFAULT_ALPHAS
from mdlib.transfer import (MAX_COMPONENTS, METHODS, Responses, TargetTable, TransferInputs,
                            TransferResult, TransferSplit, compare, transfer_split)

PathLike = str | os.PathLike


def hour_responses(data_root: PathLike, split: TransferSplit, roi: str = "nsdgeneral",
                   progress: bool = True) -> Responses:
    """The new subject's responses to ``split.hour_ids``: each image's mean over its trials in the hour only.

    Betas are z-scored within each session over all its trials (NSD's practice, :func:`load_betas`), also
    when the hour is only the first trials of a session.
    """
    betas = load_betas(data_root, split.subject, roi, split.sessions, average_repeats=False, progress=progress)
    keep = np.isin(betas.trials, split.hour["trial"].to_numpy(np.int64))
    ids, inverse = np.unique(betas.nsd_ids[keep], return_inverse=True)
    X = np.zeros((ids.size, betas.n_voxels), dtype=np.float64)
    np.add.at(X, inverse, betas.responses[keep])
    X /= np.bincount(inverse, minlength=ids.size)[:, None]
    return Responses(X=X.astype(np.float32), nsd_ids=ids)


def load_inputs(data_root: PathLike, split: TransferSplit, roi: str = "nsdgeneral", full: bool = True,
                references: bool = True, progress: bool = True) -> TransferInputs:
    """The responses :func:`mdlib.transfer.compare` reads, for ``split``.

    Args:
        data_root: the NSD (or mini-NSD) root. split: :func:`mdlib.transfer.transfer_split`.
        roi: the voxels of every subject (:func:`mdlib.nsd.rois.roi_mask`).
        full: also the new subject's training images over ``split.test_sessions`` (method ``"full"``).
        references: also the references' responses (methods ``"align"`` and ``"shared"``).

    Raises FileNotFoundError naming a missing betas file (a mini-NSD written without that subject, say).
    """
    hour = hour_responses(data_root, split, roi, progress)
    whole = load_betas(data_root, split.subject, roi, split.test_sessions, progress=progress)
    test = Responses(X=whole.responses, nsd_ids=whole.nsd_ids)     # every image of those sessions: compare
    train = _rows(whole, whole.nsd_ids[~whole.shared]) if full else None   # takes the test ones it needs
    refs = {}
    for r in (split.references if references else ()):
        b = load_betas(data_root, r, roi, split.reference_sessions[r], progress=progress)
        refs[r] = (_rows(b, b.nsd_ids[~b.shared]), _rows(b, b.nsd_ids[b.shared]))
    return TransferInputs(hour=hour, test=test, full=train, references=refs)


def _rows(betas, ids) -> Responses:
    ids = np.unique(np.asarray(ids, dtype=np.int64))
    pos = np.searchsorted(betas.nsd_ids, ids)
    return Responses(X=betas.responses[pos], nsd_ids=ids)


def needed_ids(split: TransferSplit, inputs: TransferInputs) -> np.ndarray:
    """Every nsdId whose features :func:`mdlib.transfer.compare` may read, sorted: every image of the new
    subject's test sessions and of the references' sessions. The set does not change with the amount of the
    new subject's data, so :func:`load_targets` extracts (and caches) the features once for all amounts."""
    parts = [split.hour_ids, inputs.test.nsd_ids]
    if inputs.full is not None:
        parts.append(inputs.full.nsd_ids)
    for train, align in inputs.references.values():
        parts += [train.nsd_ids, align.nsd_ids]
    return np.unique(np.concatenate(parts))


def load_targets(data_root: PathLike, nsd_ids, sd=None, clip=None, config=None, families: Sequence[str] | None = None,
                 progress: bool = True) -> TargetTable:
    """The features of ``nsd_ids`` as a :class:`mdlib.transfer.TargetTable` (cached memory maps).

    Args:
        sd, clip: the models (:func:`mdlib.models.load_sd`, :func:`mdlib.models.load_clip_vision`).
        config: a :class:`mdlib.method.MethodConfig` (posterior, n_tokens, n_captions, clip_resize_stimuli,
            seed); None: ``mdlib.method.configure()``'s.
        families: ``z``, ``c``, ``clip_block1`` ... ``clip_block6``, ``clip_embedding`` (default: every family
            of the models given).
    """
    from mdlib import method
    from mdlib.decoding import family_names

    config = method.configure() if config is None else config
    available = family_names(sd, clip)
    families = list(available if families is None else families)
    unknown = [f for f in families if f not in available]
    if unknown or not families:
        raise ValueError(f"cannot read families {unknown or families}: available from the given models: {available} "
                         "(z and c need sd, the clip_* families need clip)")
    groups = sorted({"clip" if f.startswith("clip_") else f for f in families})
    ids = np.unique(np.asarray(nsd_ids, dtype=np.int64))
    t = features.extract_targets(data_root, ids, sd, clip, targets=groups, n_tokens=config.n_tokens,
                                 posterior=config.posterior, seed=config.seed, n_captions=config.n_captions,
                                 resize=config.clip_resize_stimuli, progress=progress)
    arrays = {f: (features.drop_bos(t[f]) if f == "c" else t[f]) for f in families}
    return TargetTable(nsd_ids=ids, arrays=arrays)


def run(data_root: PathLike, subject: int, *, sessions: Iterable[int] | None = None, n_trials: int | None = None,
        references: Sequence[int] = (), sd=None, clip=None, config=None, families: Sequence[str] | None = None,
        methods: Sequence[str] = METHODS, reference_sessions=None, test_sessions=None,
        n_components: int | None = None, max_components: int = MAX_COMPONENTS, reference_models=None,
        alphas=DEFAULT_ALPHAS, device=None, progress: bool = True) -> TransferResult:
    """Decode ``subject``'s common test images from a small amount of its data, with every method.

    Example (lesson 07)::

        res = run(root, 2, sessions=range(1, 2), references=[1, 5, 7], sd=sd, clip=clip, config=config)
        res.table()                       # methods x families: median r over each family's targets
        more = run(root, 2, sessions=range(1, 5), references=[1, 5, 7], sd=sd, clip=clip, config=config,
                   reference_models=res.reference_models)     # the references' models are fitted once

    The arguments are those of :func:`mdlib.transfer.transfer_split`, :func:`load_targets` and
    :func:`mdlib.transfer.compare` (``reference_models``: its ``references``); the voxels are ``config.roi``.
    """
    from mdlib import method

    config = method.configure() if config is None else config
    design = load_design(data_root)
    split = transfer_split(design, subject, sessions, n_trials, references, reference_sessions, test_sessions)
    needs_refs = bool({"align", "shared"} & set(methods))
    inputs = load_inputs(data_root, split, config.roi, full="full" in methods, references=needs_refs,
                         progress=progress)
    targets = load_targets(data_root, needed_ids(split, inputs), sd, clip, config, families, progress)
    result = compare(split, inputs, targets, families=families, methods=methods, references=reference_models,
                     n_components=n_components, max_components=max_components, alphas=alphas, device=device,
                     progress=progress)
    result.params.update(roi=config.roi, variant=config.variant, preset=config.preset)
    return result


def default_references(subject: int) -> list[int]:
    """The reference subjects when none are given: the papers' four subjects (those with all 40 sessions:
    1, 2, 5 and 7) other than ``subject``."""
    from mdlib.nsd.layout import FULL_SUBJECTS

    return [s for s in FULL_SUBJECTS if s != int(subject)]


def decode_new_subject(data_root: PathLike, subject: int, method: str = "shared", *, sessions: int = 1,
                       n_trials: int | None = None, references: Sequence[int] | None = None, sd=None, clip=None,
                       config=None, compare_with: Sequence[str] = (), device=None, progress: bool = True):
    """A new subject's test images decoded by one method from its first ``sessions`` sessions (``mdlib
    transfer``, ``mdlib reconstruct --transfer``; docs/new_subject.md).

    Args:
        method: one of :data:`mdlib.transfer.METHODS`. sessions: the new subject's first N sessions.
        n_trials: only the first N trials of them (None: all). references: None: :func:`default_references`.
        sd, clip: the models whose features are decoded (every family of both: what stages 1 and 2 read).
        compare_with: other methods run on the same test images, for the table (e.g. ``["scratch"]``).

    Returns ``(decoded, result)``: the method's :class:`mdlib.decoding.Decoded` (with its selection scores,
    for :func:`mdlib.reconstruct.save_decoded`) and the whole :class:`mdlib.transfer.TransferResult`.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if isinstance(sessions, bool) or int(sessions) != sessions or sessions < 1:
        raise ValueError(f"sessions is the number of the new subject's first sessions (>= 1), got {sessions!r}")
    refs = default_references(subject) if references is None else list(references)
    methods = [m for m in METHODS if m == method or m in set(compare_with)]
    result = run(data_root, subject, sessions=range(1, int(sessions) + 1), n_trials=n_trials,
                 references=refs if {"align", "shared"} & set(methods) else (), sd=sd, clip=clip, config=config,
                 methods=methods, device=device, progress=progress)
    return result.decoded(method), result


__all__ = ["decode_new_subject", "default_references", "hour_responses", "load_inputs", "load_targets",
           "needed_ids", "run"]

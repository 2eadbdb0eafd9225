"""A new subject decoded from a small amount of its data, helped by subjects scanned at length (lesson 07).

MindDiffuser fits every decoder on one subject's 37 sessions. A new subject may have one session (an hour:
750 trials in NSD). NSD's design adds a constraint: the only images that several subjects saw are the shared
ones, which are also the test set, and one session holds only a few dozen of them. docs/new_subject.md
describes the methods, their sources and the maths; this module holds them, as arrays in and arrays out
(:mod:`mdlib.transfer_data` reads the betas and the features).

Vocabulary: the *new* subject has "the hour" (a few sessions, or its first trials); the *references* have
their full data.

- The design: :func:`hour_trials` (the trials of the hour), :func:`shared_per_session` (how many shared
  images each session holds), :func:`transfer_split` (the hour's images, the alignment images, and the
  common test set: shared images the new subject saw outside the hour; every shared image of the hour is
  removed from the test set of every method).
- ``"align"``, alignment (Ferrante et al. 2024): :class:`Alignment`, ridge from the new subject's voxels to a
  reference's voxels, fitted on the images of the hour that the reference saw too (shared images); the
  reference's full-data decoders then read the aligned responses; the predictions are averaged over
  references.
- ``"shared"``, a shared space (MindEye2's shared-subject model, kept linear): :class:`SharedSpace`, per
  feature family the few directions along which the references' decoders explain the most variance of the
  features on images they were not fitted on (:func:`fit_references`); the new subject gets only
  :class:`SpaceDecoder`, ridge from its voxels to the coordinates in that space, fitted on every image of its
  hour.
- baselines: ``"scratch"`` (ridge on the hour, the same images) and ``"full"`` (ridge on all the new
  subject's training images, what lessons 03-06 do).

:func:`compare` runs them on the same test images and :class:`TransferResult` holds the predictions and the
accuracy (Pearson r per target across the test images, as in lesson 03).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from mdlib.decoding import voxel_mean_sd
from mdlib.progress import bar as progress_bar
from mdlib.ridge import DEFAULT_ALPHAS, RidgeDecoder, loo_predictions, pearson_per_target, r2_from_mse

#: The methods :func:`compare` runs, in the order of its tables.
METHODS = ("align", "shared", "scratch", "full")
#: What each method is, for tables and figures.
METHOD_TITLES = {
    "align": "alignment to the references (Ferrante et al. 2024)",
    "shared": "shared space of the references (linear MindEye2)",
    "scratch": "ridge on the same data, from scratch",
    "full": "ridge on all the new subject's training images",
}
#: At most this many components in a :class:`SharedSpace` (their selection: :meth:`SharedSpace.fit`).
MAX_COMPONENTS = 256
#: Fewest images an alignment or a decoder is fitted on (leave-one-out needs two).
MIN_IMAGES = 2


# -- the design ---------------------------------------------------------------------------------------------
def hour_trials(design, subject: int, sessions: Iterable[int] | None = None,
                n_trials: int | None = None) -> pd.DataFrame:
    """The trials of the new subject's small amount of data, "the hour", in presentation order.

    Args:
        design: :class:`mdlib.nsd.design.Design`.
        subject: 1..8.
        sessions: 1-based session numbers (``range(1, 2)``: its first session, NSD's hour), or None for
            every session the subject completed (then give ``n_trials``).
        n_trials: keep only the first ``n_trials`` trials of those sessions (375: half an NSD session);
            None: all of them.

    Returns the rows of :meth:`Design.trials` (columns ``trial``, ``session``, ``volume``, ``nsd_id``,
    ``shared``, ...).

    Raises:
        ValueError: an unknown subject or session (the design's message), ``n_trials`` < 1 or more than the
            sessions hold, or neither ``sessions`` nor ``n_trials`` given (that would be all its data).
    """
    if sessions is None and n_trials is None:
        raise ValueError("give the amount of the new subject's data: sessions (e.g. range(1, 2) for its first "
                         "session) and/or n_trials (its first n trials)")
    table = design.trials(subject, sessions)
    if n_trials is not None:
        if isinstance(n_trials, bool) or not isinstance(n_trials, (int, np.integer)) or n_trials < 1:
            raise ValueError(f"n_trials must be a positive integer, got {n_trials!r}")
        if n_trials > len(table):
            raise ValueError(f"n_trials={n_trials}, but subject {subject}'s sessions "
                             f"{_compact(np.unique(table['session']))} hold only {len(table)} trials")
        table = table.iloc[:int(n_trials)]
    return table.reset_index(drop=True)


def shared_per_session(design, subject: int, sessions: Iterable[int] | None = None,
                       references: Sequence[int] = (), reference_sessions=None) -> pd.DataFrame:
    """Per session of ``subject``: how many shared images it holds, and how many are left to test on after it.

    Args:
        design, subject: as :func:`hour_trials`. sessions: the sessions to count (None: all it completed).
        references, reference_sessions: with references, the column ``usable_shared_images`` counts the
            session's shared images that every reference saw in its sessions (``reference_sessions``: see
            :func:`transfer_split`), the pairs an alignment can be fitted on.

    Returns a DataFrame indexed by ``session`` with columns
    ``trials``, ``shared_trials`` (trials showing a shared image), ``shared_images`` (distinct shared images
    shown in the session), ``new_shared_images`` (those not shown in an earlier session of the range),
    ``cumulative_shared_images`` (distinct shared images in the sessions up to this one),
    ``test_images_left`` (distinct shared images of the whole range not among those: the test set if the
    new subject's data were the sessions up to this one), ``other_images`` (distinct non-shared images),
    [``usable_shared_images``].
    """
    table = design.trials(subject, sessions)
    refs = _check_references(design, subject, references)
    seen_by_refs = _seen_by_all(design, refs, reference_sessions) if refs else None
    all_shared = np.unique(table.loc[table["shared"], "nsd_id"])
    rows, seen = [], set()
    for s, part in table.groupby("session", sort=True):
        shared = np.unique(part.loc[part["shared"], "nsd_id"])
        new = [i for i in shared.tolist() if i not in seen]
        seen.update(new)
        row = {"session": int(s), "trials": len(part), "shared_trials": int(part["shared"].sum()),
               "shared_images": int(shared.size), "new_shared_images": len(new),
               "cumulative_shared_images": len(seen), "test_images_left": int(all_shared.size - len(seen)),
               "other_images": int(part.loc[~part["shared"], "nsd_id"].nunique())}
        if seen_by_refs is not None:
            row["usable_shared_images"] = int(np.isin(shared, seen_by_refs).sum())
        rows.append(row)
    return pd.DataFrame(rows).set_index("session")


@dataclass(eq=False)
class TransferSplit:
    """Which images each method may use, and the common test set (:func:`transfer_split`).

    Attributes:
        subject: the new subject. references: the reference subjects (may be empty).
        hour: the trial table of the hour (:func:`hour_trials`).
        hour_ids: (n,) sorted 0-based nsdIds of every image shown in the hour: what "scratch" and "shared"
            are fitted on.
        align_ids: sorted nsdIds of the hour's shared images that every reference saw: the alignment pairs.
        excluded_ids: sorted nsdIds of every shared image shown in the hour; none of them is a test image.
        test_ids: sorted nsdIds of the common test set: the shared images the new subject saw in
            ``test_sessions``, less ``excluded_ids``.
        test_sessions: the new subject's sessions its test responses come from (1-based).
        reference_sessions: reference -> the sessions its decoders and alignment responses come from.
    """

    subject: int
    references: tuple[int, ...]
    hour: pd.DataFrame
    hour_ids: np.ndarray
    align_ids: np.ndarray
    excluded_ids: np.ndarray
    test_ids: np.ndarray
    test_sessions: tuple[int, ...]
    reference_sessions: dict[int, tuple[int, ...]] = field(default_factory=dict)

    @property
    def sessions(self) -> tuple[int, ...]:
        """The sessions the hour's trials come from."""
        return tuple(int(s) for s in np.unique(self.hour["session"]))

    @property
    def n_trials(self) -> int:
        return len(self.hour)

    def __repr__(self) -> str:
        return (f"TransferSplit(subject {self.subject}: {self.n_trials} trials in sessions "
                f"{_compact(self.sessions)}, {self.hour_ids.size} images ({self.excluded_ids.size} shared, "
                f"{self.align_ids.size} of them seen by references {list(self.references)}); "
                f"{self.test_ids.size} test images)")


def transfer_split(design, subject: int, sessions: Iterable[int] | None = None, n_trials: int | None = None,
                   references: Sequence[int] = (), reference_sessions=None,
                   test_sessions: Iterable[int] | None = None) -> TransferSplit:
    """The images of the hour, the alignment pairs and the common test set (docs/new_subject.md, "What NSD's
    design allows").

    Args:
        design, subject, sessions, n_trials: the hour (:func:`hour_trials`).
        references: the subjects with full data (not ``subject``).
        reference_sessions: the references' sessions: None (every session each completed), an iterable
            (the same for all; ``range(1, 38)``: the papers' sessions 1-37), or a dict reference -> iterable.
        test_sessions: the new subject's sessions its test images are taken from (None: all it completed).

    The test set is the same for every method: shared images the new subject saw in ``test_sessions`` and
    not in the hour. A shared image of the hour is excluded even from the methods that do not fit on it, so
    that every method is scored on the same images.

    Raises:
        ValueError: an unknown subject or session, the subject among its references, a repeated reference,
            or no test image left (the hour holds every shared image of ``test_sessions``).
    """
    hour = hour_trials(design, subject, sessions, n_trials)
    refs = _check_references(design, subject, references)
    ref_sessions = _reference_sessions(design, refs, reference_sessions)
    hour_ids = np.unique(hour["nsd_id"].to_numpy(np.int64))
    excluded = np.unique(hour.loc[hour["shared"], "nsd_id"].to_numpy(np.int64))
    align = excluded
    for r in refs:
        t = design.trials(r, ref_sessions[r])
        align = np.intersect1d(align, t.loc[t["shared"], "nsd_id"].to_numpy(np.int64))
    test_table = design.trials(subject, test_sessions)
    candidates = np.unique(test_table.loc[test_table["shared"], "nsd_id"].to_numpy(np.int64))
    test = np.setdiff1d(candidates, excluded)
    if test.size == 0:
        raise ValueError(f"subject {subject}: the hour ({len(hour)} trials in sessions "
                         f"{_compact(np.unique(hour['session']))}) shows every one of the {candidates.size} "
                         f"shared images of sessions {_compact(np.unique(test_table['session']))}, so no test "
                         "image is left: use fewer sessions or trials")
    return TransferSplit(subject=int(subject), references=refs, hour=hour, hour_ids=hour_ids, align_ids=align,
                         excluded_ids=excluded, test_ids=test,
                         test_sessions=tuple(int(s) for s in np.unique(test_table["session"])),
                         reference_sessions=ref_sessions)


def _check_references(design, subject: int, references: Sequence[int]) -> tuple[int, ...]:
    if isinstance(references, (int, np.integer)):
        raise TypeError(f"references must be a sequence of subjects, got {references!r}; write [{references}]")
    refs = tuple(int(r) for r in references)
    for r in refs:
        design.completed_sessions(r)  # raises on a subject outside 1..8
    if int(subject) in refs:
        raise ValueError(f"subject {subject} is the new subject and cannot be its own reference "
                         f"(references: {list(refs)})")
    if len(set(refs)) != len(refs):
        raise ValueError(f"references must not repeat a subject, got {list(refs)}")
    return refs


def _reference_sessions(design, refs: tuple[int, ...], reference_sessions) -> dict[int, tuple[int, ...]]:
    """reference -> sorted 1-based sessions, checked against what it completed."""
    out = {}
    for r in refs:
        chosen = reference_sessions.get(r) if isinstance(reference_sessions, Mapping) else reference_sessions
        if chosen is not None:
            chosen = list(chosen)
        out[r] = tuple(int(s) for s in np.unique(design.trials(r, chosen)["session"]))
    return out


def _seen_by_all(design, refs: tuple[int, ...], reference_sessions) -> np.ndarray:
    """Sorted nsdIds of the shared images every reference saw in its sessions."""
    seen = None
    for r, ses in _reference_sessions(design, refs, reference_sessions).items():
        t = design.trials(r, ses)
        ids = np.unique(t.loc[t["shared"], "nsd_id"].to_numpy(np.int64))
        seen = ids if seen is None else np.intersect1d(seen, ids)
    return seen


# -- arrays of responses and features -----------------------------------------------------------------------
@dataclass(eq=False)
class Responses:
    """One subject's responses to some images: what the methods read (:mod:`mdlib.transfer_data` builds them).

    Attributes:
        X: (n, p) float32 responses (NSD's betas z-scored per session, repeats averaged).
        nsd_ids: (n,) int64 0-based nsdIds, ascending and unique.
    """

    X: np.ndarray
    nsd_ids: np.ndarray

    def __post_init__(self) -> None:
        self.nsd_ids = np.asarray(self.nsd_ids, dtype=np.int64).ravel()
        if np.asarray(self.X).ndim != 2 or len(self.X) != self.nsd_ids.size:
            raise ValueError(f"Responses: X must be (n_images, n_voxels) with one row per nsdId; got X "
                             f"{np.shape(self.X)} for {self.nsd_ids.size} nsdIds")
        if self.nsd_ids.size > 1 and np.any(np.diff(self.nsd_ids) <= 0):
            raise ValueError("Responses: nsd_ids must be ascending and unique")

    def take(self, ids, what: str = "these images") -> np.ndarray:
        """The rows of ``ids`` (any order), (len(ids), p); KeyError naming the missing ones."""
        return self.X[_positions(self.nsd_ids, ids, what)]


@dataclass(eq=False)
class TargetTable:
    """The decoding targets of a set of images, by family (:mod:`mdlib.transfer_data` builds it).

    Attributes:
        nsd_ids: (N,) ascending 0-based nsdIds, the rows of every array.
        arrays: family -> (N, *shape) array (a numpy array or a read-only memory map), e.g. ``z``
            (N, 4, h, w), ``c`` (N, n_tokens - 1, width) without its BOS token, ``clip_block1`` (N, 50, width).
    """

    nsd_ids: np.ndarray
    arrays: dict

    def __post_init__(self) -> None:
        self.nsd_ids = np.asarray(self.nsd_ids, dtype=np.int64).ravel()
        for fam, a in self.arrays.items():
            if len(a) != self.nsd_ids.size:
                raise ValueError(f"TargetTable: family {fam!r} has {len(a)} rows for {self.nsd_ids.size} nsdIds")

    @property
    def families(self) -> list[str]:
        return list(self.arrays)

    def shape(self, family: str) -> tuple[int, ...]:
        """The shape of one image's features of ``family``."""
        return tuple(self._array(family).shape[1:])

    def get(self, family: str, ids) -> np.ndarray:
        """(len(ids), t) float32: the flattened features of ``ids``."""
        pos = _positions(self.nsd_ids, ids, f"the targets of family {family!r}")
        a = np.asarray(self._array(family)[pos], dtype=np.float32)
        return a.reshape(len(a), -1)

    def _array(self, family: str):
        if family not in self.arrays:
            raise KeyError(f"no targets of family {family!r}; have {self.families}")
        return self.arrays[family]


def _positions(sorted_ids: np.ndarray, ids, what: str) -> np.ndarray:
    ids = np.asarray(ids, dtype=np.int64).ravel()
    pos = np.searchsorted(sorted_ids, ids)
    ok = (pos < sorted_ids.size) & (sorted_ids[np.minimum(pos, sorted_ids.size - 1)] == ids) if sorted_ids.size \
        else np.zeros(ids.size, dtype=bool)
    if not ok.all():
        missing = ids[~ok]
        raise KeyError(f"{what}: no row for nsdId(s) {missing[:8].tolist()}{' ...' if missing.size > 8 else ''} "
                       f"({missing.size} of {ids.size} missing)")
    return pos


def standardize(X: np.ndarray, by: np.ndarray) -> np.ndarray:
    """``X`` with each voxel centred and scaled by its mean and sd (ddof 0) over the rows ``by`` (a constant
    voxel: sd 1), float32: lesson 03's ``standardize="train"``, with ``by`` the images a method is fitted on."""
    mu, sd = voxel_mean_sd(np.asarray(by, dtype=np.float64))
    return ((np.asarray(X, dtype=np.float64) - mu) / sd).astype(np.float32)


# -- the methods --------------------------------------------------------------------------------------------
def _ridge(alphas, device) -> RidgeDecoder:
    return RidgeDecoder(alphas=alphas, cv="loo", device=device, progress=False)


def _check_rows(n: int, what: str) -> None:
    if n < MIN_IMAGES:
        raise ValueError(f"{what}: {n} image(s), at least {MIN_IMAGES} are needed (leave-one-out chooses the "
                         "ridge penalty); give the new subject more sessions or trials")


class Alignment:
    """A linear map from one subject's voxels to another's, fitted on images both saw (Ferrante et al. 2024).

    Ridge regression from the source's voxels to each of the target's voxels, with each target voxel's alpha
    chosen by leave-one-out (:class:`mdlib.ridge.RidgeDecoder`). With n pairs, the aligned responses are
    combinations of the target's n measured responses: the map can be no better than the pairs are many.

    Args:
        alphas: the ridge grid. device: where it runs (None: CUDA when available).
    Fitted attributes: ``ridge_`` (the RidgeDecoder), ``n_pairs_``.
    """

    def __init__(self, alphas=DEFAULT_ALPHAS, device=None):
        self.alphas, self.device = alphas, device
        self.ridge_: RidgeDecoder | None = None
        self.n_pairs_ = 0

    def fit(self, X_source: np.ndarray, X_target: np.ndarray) -> Alignment:
        """``X_source`` (n, p_s), ``X_target`` (n, p_t): row i of both is the same image."""
        X_source, X_target = np.asarray(X_source), np.asarray(X_target)
        if len(X_source) != len(X_target):
            raise ValueError(f"Alignment.fit: {len(X_source)} source rows but {len(X_target)} target rows; row i "
                             "of both must be the same image")
        _check_rows(len(X_source), "alignment pairs (images both subjects saw)")
        self.ridge_ = _ridge(self.alphas, self.device).fit(X_source, X_target)
        self.n_pairs_ = len(X_source)
        return self

    def transform(self, X_source: np.ndarray) -> np.ndarray:
        """(n, p_t) float32: the target subject's predicted responses."""
        if self.ridge_ is None:
            raise RuntimeError("Alignment is not fitted: call fit(X_source, X_target) first")
        return np.asarray(self.ridge_.predict(X_source), dtype=np.float32)


class SharedSpace:
    """A few directions of a feature family that other subjects' brains predict: the space their decoders share.

    Fitted on the reference subjects' true features T and their decoders' leave-one-out predictions P (each
    image predicted by a decoder not fitted on it). The components are the directions v along which the
    predictions explain the most variance of the truth out of sample: the leading eigenvectors of the
    symmetrised cross-covariance (T'P + P'T) / 2n over all references, sought among the ``max_components``
    principal directions of P (exactly, or by a randomised SVD for large problems). That is the feature-side
    factor of a reduced-rank regression shared by every reference (docs/new_subject.md, "(b) A shared space").
    Directions where the features vary a lot but no brain follows them explain nothing out of sample and come
    last.

    How many to keep (``n_components=None``): as many leading components as predict a held-out reference
    better than its mean. Each reference in turn is held out, the directions are found on the others, and
    the held-out reference's R^2 along each (by rank) is averaged over references; k is the number of leading
    ranks with a positive average. With one reference, its two halves of images play the references' part.
    Choosing the directions and scoring them on the same images would flatter them: among many candidates,
    some have a positive cross-covariance by chance.

    Args:
        n_components: keep the first that many components; None: the held-out rule above.
        max_components: candidates examined. seed: of the randomised SVD.
        standardize: work in units of each feature's sd over the references' images, so that every feature
            weighs the same (as in lesson 03's accuracy, a correlation per feature), not only the few with
            the largest variance (CLIP's layers have a few channels far larger than the rest).

    Fitted attributes:
        mean_, scale_: (t,) float64, the features' mean and the unit of each (its sd over the references'
            images; 1 everywhere without ``standardize``).
        components_: (k, t) float32, orthonormal rows (in those units), by decreasing explained variance.
        explained_: (k,) the variance each explains out of sample (in those units, squared).
        r2_: (k,) the held-out references' R^2 along each rank (mean over references).
        n_candidates_: the candidate directions examined.
    """

    def __init__(self, n_components: int | None = None, max_components: int = MAX_COMPONENTS, seed: int = 0,
                 standardize: bool = True):
        if n_components is not None and (isinstance(n_components, bool) or int(n_components) != n_components
                                         or n_components < 1):
            raise ValueError(f"n_components must be a positive integer or None (chosen on held-out references), "
                             f"got {n_components!r}")
        if int(max_components) < 1:
            raise ValueError(f"max_components must be >= 1, got {max_components!r}")
        self.n_components, self.max_components, self.seed = n_components, int(max_components), int(seed)
        self.standardize = bool(standardize)
        self.mean_ = self.scale_ = self.components_ = self.r2_ = self.explained_ = None
        self.n_candidates_ = 0

    @property
    def k(self) -> int:
        """The number of components kept."""
        if self.components_ is None:
            raise RuntimeError("SharedSpace is not fitted")
        return int(self.components_.shape[0])

    def fit(self, Y_true: Sequence[np.ndarray], Y_pred: Sequence[np.ndarray]) -> SharedSpace:
        """Fit on each reference's true features ``Y_true[s]`` (n_s, t) and out-of-fold predictions
        ``Y_pred[s]`` (n_s, t) of the same images (:func:`mdlib.ridge.loo_predictions`)."""
        Y_true, Y_pred = list(Y_true), list(Y_pred)
        if not Y_true or len(Y_true) != len(Y_pred):
            raise ValueError(f"SharedSpace.fit needs one (true, predicted) pair per reference; got {len(Y_true)} "
                             f"true and {len(Y_pred)} predicted arrays")
        t = np.shape(Y_true[0])[1]
        for a, b in zip(Y_true, Y_pred):
            if np.shape(a) != np.shape(b) or np.shape(a)[1] != t or len(a) < 2:
                raise ValueError(f"SharedSpace.fit: true and predicted features must have equal shapes with "
                                 f"{t} columns and at least 2 rows; got {np.shape(a)} and {np.shape(b)}")
        T = np.concatenate([np.asarray(a, dtype=np.float64) for a in Y_true])
        P = np.concatenate([np.asarray(b, dtype=np.float64) for b in Y_pred])
        self.mean_ = T.mean(0)
        T -= self.mean_
        P -= self.mean_
        self.scale_ = T.std(0) if self.standardize else np.ones(t)
        self.scale_[self.scale_ == 0] = 1.0
        T /= self.scale_
        P /= self.scale_
        V0, _ = _principal_axes(P, min(self.max_components, *P.shape), self.seed)   # (t, m) candidates
        LT, LP = T @ V0, P @ V0                       # everything below happens in the candidates' m coordinates
        bounds = np.cumsum([0] + [len(a) for a in Y_true])
        groups = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
        if len(groups) == 1:                          # one reference: its two halves of images
            half = len(LT) // 2
            groups = [slice(0, half), slice(half, len(LT))]
        lam, Q = _explained_directions(LT, LP)
        held = []
        for g in groups:
            rest = np.ones(len(LT), dtype=bool)
            rest[g] = False
            _, Qg = _explained_directions(LT[rest], LP[rest])
            held.append(_r2(LT[g] @ Qg, LP[g] @ Qg))
        r2 = np.mean(held, axis=0)
        if self.n_components is not None:
            k = min(int(self.n_components), Q.shape[1])
        else:
            bad = np.flatnonzero(~(r2 > 0))
            k = max(1, int(bad[0]) if bad.size else r2.size)
        self.n_candidates_ = int(V0.shape[1])
        self.components_ = np.ascontiguousarray((V0 @ Q[:, :k]).T, dtype=np.float32)
        self.r2_, self.explained_ = r2[:k], lam[:k]
        return self

    def project(self, Y: np.ndarray) -> np.ndarray:
        """(n, k) float32 coordinates of features ``Y`` (n, t) in the space."""
        self.k  # noqa: B018 (checks it is fitted)
        Z = (np.asarray(Y, dtype=np.float64) - self.mean_) / self.scale_
        return (Z @ self.components_.T.astype(np.float64)).astype(np.float32)

    def reconstruct(self, L: np.ndarray) -> np.ndarray:
        """(n, t) float32 features from coordinates ``L`` (n, k): the mean plus the components' combination."""
        self.k  # noqa: B018
        Z = np.asarray(L, dtype=np.float64) @ self.components_.astype(np.float64)
        return (Z * self.scale_ + self.mean_).astype(np.float32)

    def __repr__(self) -> str:
        if self.components_ is None:
            return "SharedSpace(not fitted)"
        return (f"SharedSpace({self.k} of {self.n_candidates_} components of {self.components_.shape[1]} "
                f"features; references' out-of-fold R^2 {self.r2_.max():.2f} .. {self.r2_.min():.2f})")


def _explained_directions(LT: np.ndarray, LP: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (descending) and eigenvectors of the symmetrised cross-covariance of truth LT and prediction
    LP (both (n, m), centred): the variance each direction's prediction explains out of sample."""
    C = (LT.T @ LP + LP.T @ LT) / (2 * len(LT))
    lam, Q = np.linalg.eigh(C)
    order = np.argsort(lam)[::-1]
    return lam[order], Q[:, order]


def _r2(L: np.ndarray, L_hat: np.ndarray) -> np.ndarray:
    """(m,) R^2 of each column's prediction (-inf for a constant column)."""
    resid = ((L - L_hat) ** 2).sum(0)
    total = ((L - L.mean(0)) ** 2).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, 1.0 - resid / np.where(total > 0, total, 1.0), -np.inf)


def _principal_axes(P: np.ndarray, m: int, seed: int, exact_limit: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """The first ``m`` right singular vectors of P (n, t) as (t, m) float64, and the variance along each
    (squared singular value / n).

    Exact (the eigenvectors of the smaller Gram matrix) when min(n, t) <= ``exact_limit``; else a randomised
    SVD (Halko et al. 2011, torch.svd_lowrank with 4 power iterations), seeded.
    """
    n, t = P.shape
    if min(n, t) <= exact_limit:
        G = torch.as_tensor(P.T @ P if t <= n else P @ P.T)
        lam, Q = torch.linalg.eigh(G)
        order = torch.argsort(lam, descending=True)[:m]
        lam, Q = lam[order].clamp_min(0).numpy(), Q[:, order].numpy()
        if t <= n:
            V = Q
        else:  # right singular vectors from the left ones: V = P' U / s
            s = np.sqrt(lam)
            V = (P.T @ Q) / np.where(s > 0, s, 1.0)
        return V, lam / n
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _, s, V = torch.svd_lowrank(torch.as_tensor(P), q=min(m + 10, n, t), niter=4)
    return V[:, :m].numpy(), (s[:m].numpy() ** 2) / n


class SpaceDecoder:
    """The new subject's decoder through a :class:`SharedSpace`: ridge from its voxels to the k coordinates.

    fit(X, Y): the coordinates of the true features ``space.project(Y)``, each regressed on the voxels with
    its own alpha by leave-one-out; predict(X): ``space.reconstruct`` of the predicted coordinates. Only
    the map into the space (p x k weights) is learned from the new subject's data.
    """

    def __init__(self, space: SharedSpace, alphas=DEFAULT_ALPHAS, device=None):
        self.space, self.alphas, self.device = space, alphas, device
        self.ridge_: RidgeDecoder | None = None

    def fit(self, X: np.ndarray, Y: np.ndarray) -> SpaceDecoder:
        """X (n, p) voxels, Y (n, t) features of the same images."""
        if len(X) != len(Y):
            raise ValueError(f"SpaceDecoder.fit: {len(X)} rows of voxels but {len(Y)} rows of features")
        _check_rows(len(X), "the new subject's images")
        self.ridge_ = _ridge(self.alphas, self.device).fit(X, self.space.project(Y))
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        """(n, t) float32 predicted features."""
        if self.ridge_ is None:
            raise RuntimeError("SpaceDecoder is not fitted: call fit(X, Y) first")
        return self.space.reconstruct(self.ridge_.predict(X))

    def loo_r2(self, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
        """(t,) each feature's leave-one-out R^2 on the images it was fitted on (``X``, ``Y`` of :meth:`fit`):
        every image's coordinates predicted without it (:func:`mdlib.ridge.loo_predictions`, the fitted
        alphas), then mapped back to the features. Stage 2's selection score (:meth:`TransferResult.decoded`)."""
        if self.ridge_ is None:
            raise RuntimeError("SpaceDecoder is not fitted: call fit(X, Y) first")
        L = loo_predictions(X, self.space.project(Y), self.ridge_.alpha_, self.ridge_.device)
        r2 = _r2(np.asarray(Y, dtype=np.float64), self.space.reconstruct(L).astype(np.float64))
        return np.where(np.isfinite(r2), r2, np.nan)       # a constant feature: NaN, as lesson 03's cv_r2


@dataclass(eq=False)
class ReferenceModels:
    """What the references give a new subject, for one feature family (:func:`fit_references`).

    Attributes:
        family: the feature family.
        decoders: reference -> its full-data :class:`mdlib.ridge.RidgeDecoder` (voxels standardised with its
            training images' statistics; coefficients kept: p x t float32 each), for ``"align"``.
        space: the :class:`SharedSpace` fitted on their leave-one-out predictions, for ``"shared"`` (None if
            not asked for).
        loo_r2: reference -> (t,) each feature's leave-one-out R^2 on its training images (its decoder's
            ``cv_mse_``), for ``"align"``'s selection score.
    """

    family: str
    decoders: dict
    space: SharedSpace | None = None
    loo_r2: dict = field(default_factory=dict)


def fit_references(references: Mapping[int, tuple[Responses, Responses]], targets: TargetTable,
                   families: Sequence[str], shared: bool = True, n_components: int | None = None,
                   max_components: int = MAX_COMPONENTS, alphas=DEFAULT_ALPHAS, device=None,
                   progress: bool = True, keep_coefficients: bool = True) -> dict[str, ReferenceModels]:
    """Fit each reference's decoders on its training images and, with ``shared``, the shared spaces.

    They do not depend on the new subject: fit them once and pass them to :func:`compare` for every amount
    of its data. ``references``: :attr:`TransferInputs.references`. Memory: with ``keep_coefficients`` (what
    ``"align"`` needs), the decoders' coefficients, (references x voxels x targets) float32 per family; without,
    only their alphas and leave-one-out errors (what ``"shared"`` needs).
    """
    if not references:
        raise ValueError("fit_references needs at least one reference subject")
    out = {}
    bar = progress_bar(total=len(families) * len(references), desc="references", unit="fit", progress=progress)
    for f in families:
        decoders, r2, Yt, Yp = {}, {}, [], []
        for r, (train, _) in references.items():
            _check_rows(len(train.nsd_ids), f"reference {r}'s training images")
            X_r = standardize(train.X, train.X)
            Y_r = targets.get(f, train.nsd_ids)
            decoders[r] = _ridge(alphas, device)
            if keep_coefficients:
                decoders[r].fit(X_r, Y_r)
            else:     # the alphas and errors, chunk by chunk, no p x t coefficients kept
                decoders[r].fit_predict(X_r, Y_r, X_r[:1])
            r2[r] = r2_from_mse(decoders[r].cv_mse_, Y_r)
            if shared:
                Yt.append(Y_r)
                Yp.append(loo_predictions(X_r, Y_r, decoders[r].alpha_, device))
            bar.update(1)
        space = SharedSpace(n_components, max_components).fit(Yt, Yp) if shared else None
        out[f] = ReferenceModels(family=f, decoders=decoders, space=space, loo_r2=r2)
    bar.close()
    return out


# -- all methods on the same test images --------------------------------------------------------------------
@dataclass(eq=False)
class TransferInputs:
    """The responses :func:`compare` needs (raw: z-scored per session, not yet standardised).

    Attributes:
        hour: the new subject's responses to ``split.hour_ids``, from the hour's trials only.
        test: its responses to ``split.test_ids`` (from trials outside the hour).
        full: its responses to its training images over all its sessions (the ``"full"`` baseline), or None.
        references: reference -> (training responses: its non-shared images; alignment responses: at
            least ``split.align_ids``).
    """

    hour: Responses
    test: Responses
    full: Responses | None
    references: dict[int, tuple[Responses, Responses]]


@dataclass(eq=False)
class TransferResult:
    """Every method's predictions of the common test images' features (:func:`compare`).

    Attributes:
        split: the :class:`TransferSplit`.
        families: the feature families, in order; shapes: family -> one image's shape.
        true: family -> (n_test, t) float32 true features of ``split.test_ids``.
        pred: method -> family -> (n_test, t) float32 predictions.
        r: method -> family -> (t,) Pearson r per target across the test images (NaN: constant target).
        score: method -> family -> (t,) float64 each feature's leave-one-out R^2 on the data the method learned
            from, never on the test images: stage 2 keeps the best-scored features of each CLIP block by it
            (``"scratch"``, ``"full"``: their ridge's; ``"shared"``: :meth:`SpaceDecoder.loo_r2` on the hour;
            ``"align"``: the mean over references of their decoders' own, on their training images).
        spaces: family -> the fitted :class:`SharedSpace` (method ``"shared"``).
        n_align: the alignment pairs used (method ``"align"``).
        params: how it was run (JSON-able).
        reference_models: family -> the references' :class:`ReferenceModels` it used (pass them to the next
            :func:`compare` with other amounts of the new subject's data).
    """

    split: TransferSplit
    families: list[str]
    shapes: dict[str, tuple[int, ...]]
    true: dict[str, np.ndarray]
    pred: dict[str, dict[str, np.ndarray]]
    r: dict[str, dict[str, np.ndarray]]
    score: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    spaces: dict[str, SharedSpace] = field(default_factory=dict)
    n_align: int = 0
    params: dict = field(default_factory=dict)
    reference_models: dict = field(default_factory=dict)

    @property
    def methods(self) -> list[str]:
        return list(self.pred)

    def table(self, stat: Callable[[np.ndarray], float] = np.nanmedian) -> pd.DataFrame:
        """Methods x families: ``stat`` (default the median, lesson 03's) of r over each family's targets."""
        return pd.DataFrame({fam: {m: float(stat(self.r[m][fam])) for m in self.methods} for fam in self.families})

    def decoded(self, method: str):
        """One method's predictions as a :class:`mdlib.decoding.Decoded`, the input of stages 1 and 2 (lessons
        04-05; :func:`mdlib.reconstruct.save_decoded`): its ``score`` is the method's :attr:`score`, its
        ``params["select_by"]`` ``"loo-r2"``."""
        from mdlib.decoding import Decoded

        if method not in self.pred:
            raise KeyError(f"no method {method!r} in this result; have {self.methods}")
        n = self.split.test_ids.size
        return Decoded(nsd_ids=self.split.test_ids.copy(),
                       pred={f: self.pred[method][f].reshape(n, *self.shapes[f]) for f in self.families},
                       true={f: self.true[f].reshape(n, *self.shapes[f]) for f in self.families},
                       r={f: self.r[method][f] for f in self.families},
                       cv_r2={f: self.score[method][f] for f in self.score.get(method, {})},
                       params={**self.params, "method": method, "select_by": "loo-r2"})

    def __repr__(self) -> str:
        med = self.table()
        cols = ", ".join(f"{m} " + "/".join(f"{med.loc[m, f]:.2f}" for f in self.families) for m in self.methods)
        return f"TransferResult({self.split.test_ids.size} test images; median r ({'/'.join(self.families)}): {cols})"


def compare(split: TransferSplit, inputs: TransferInputs, targets: TargetTable, families: Sequence[str] | None = None,
            methods: Sequence[str] = METHODS, references: Mapping[str, ReferenceModels] | None = None,
            n_components: int | None = None, max_components: int = MAX_COMPONENTS, alphas=DEFAULT_ALPHAS,
            device=None, progress: bool = True) -> TransferResult:
    """Decode the common test images with each method (docs/new_subject.md); arrays in, arrays out.

    Voxels are standardised with the statistics of the images each model is fitted on: the new subject's
    with its hour's (``"align"``, ``"shared"``, ``"scratch"``) or its training images' (``"full"``), each
    reference's with its training images'.

    Args:
        split: :func:`transfer_split`. inputs: :class:`TransferInputs`. targets: the features of every image
            involved (:class:`TargetTable`).
        families: the feature families (default: all of ``targets``).
        methods: any of :data:`METHODS`.
        references: :func:`fit_references`' result, to reuse over several splits; None: fitted here from
            ``inputs.references`` (with ``n_components``, ``max_components``).
        alphas, device: the ridge grid and where the fits run.

    Raises:
        ValueError: an unknown method or family; ``"align"`` or ``"shared"`` without references; too few
            images for a method (:data:`MIN_IMAGES`); ``"full"`` without ``inputs.full``.
    """
    methods = list(methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"methods must be a non-empty subset of {METHODS}, got {methods}")
    families = list(targets.families if families is None else families)
    missing = [f for f in families if f not in targets.arrays]
    if missing or not families:
        raise ValueError(f"families {missing or families} not in the targets ({targets.families})")
    refs = list(split.references)
    uses_refs = bool({"align", "shared"} & set(methods))
    if uses_refs and not refs:
        raise ValueError("methods 'align' and 'shared' need reference subjects: give references to transfer_split")
    if "align" in methods and split.align_ids.size < MIN_IMAGES:
        raise ValueError(f"alignment needs at least {MIN_IMAGES} images seen by the new subject in its hour and by "
                         f"every reference {refs}; sessions {_compact(split.sessions)} hold "
                         f"{split.align_ids.size}: give more sessions or trials, or leave 'align' out")
    if "full" in methods and inputs.full is None:
        raise ValueError("method 'full' needs the new subject's responses to all its training images (inputs.full)")
    _check_rows(split.hour_ids.size, "the new subject's hour")
    missing_refs = [r for r in refs if r not in inputs.references]
    if uses_refs and missing_refs:
        raise ValueError(f"no responses for references {missing_refs} in inputs.references")
    if uses_refs and references is None:
        references = fit_references({r: inputs.references[r] for r in refs}, targets, families,
                                    shared="shared" in methods, n_components=n_components,
                                    max_components=max_components, alphas=alphas, device=device, progress=progress,
                                    keep_coefficients="align" in methods)
    if uses_refs:
        absent = [f for f in families if f not in references or set(references[f].decoders) != set(refs)
                  or ("shared" in methods and references[f].space is None)
                  or ("align" in methods and any(d.coef_ is None for d in references[f].decoders.values()))]
        if absent:
            raise ValueError(f"the references' models do not cover families {absent} with references {refs}"
                             + (" and a shared space" if "shared" in methods else "")
                             + (" and coefficients (fitted for 'align')" if "align" in methods else "")
                             + ": refit them")

    test_ids = split.test_ids
    X_hour_raw = inputs.hour.take(split.hour_ids, f"subject {split.subject}'s hour")
    X_test_raw = inputs.test.take(test_ids, f"subject {split.subject}'s test images")
    X_hour, X_test = standardize(X_hour_raw, X_hour_raw), standardize(X_test_raw, X_hour_raw)
    true = {f: targets.get(f, test_ids) for f in families}
    pred: dict[str, dict[str, np.ndarray]] = {m: {} for m in methods}
    score: dict[str, dict[str, np.ndarray]] = {m: {} for m in methods}
    steps = progress_bar(total=len(families) * len(methods), desc="new subject", unit="fit", progress=progress)

    aligned = {}
    if "align" in methods:   # the new subject's test responses, as each reference's voxels
        src = X_hour[_positions(split.hour_ids, split.align_ids, "the hour")]
        for r in refs:
            train, align_resp = inputs.references[r]
            dst = standardize(align_resp.take(split.align_ids, f"reference {r}'s alignment images"), train.X)
            aligned[r] = Alignment(alphas, device).fit(src, dst).transform(X_test)
    for f in families:
        if "align" in methods:
            acc = sum(np.asarray(references[f].decoders[r].predict(aligned[r]), dtype=np.float64) for r in refs)
            pred["align"][f] = (acc / len(refs)).astype(np.float32)
            score["align"][f] = np.mean([references[f].loo_r2[r] for r in refs], axis=0)
            steps.update(1)
        if "shared" in methods:
            Y_hour = targets.get(f, split.hour_ids)
            space_decoder = SpaceDecoder(references[f].space, alphas, device).fit(X_hour, Y_hour)
            pred["shared"][f] = space_decoder.predict(X_test)
            score["shared"][f] = space_decoder.loo_r2(X_hour, Y_hour)
            steps.update(1)
        if "scratch" in methods:
            pred["scratch"][f], score["scratch"][f] = _fit_predict(X_hour, targets.get(f, split.hour_ids), X_test,
                                                                   alphas, device)
            steps.update(1)
        if "full" in methods:
            full = inputs.full
            _check_rows(len(full.nsd_ids), f"subject {split.subject}'s training images")
            if np.isin(full.nsd_ids, test_ids).any():
                raise ValueError("inputs.full holds test images: the 'full' decoder must not be fitted on them")
            pred["full"][f], score["full"][f] = _fit_predict(standardize(full.X, full.X),
                                                             targets.get(f, full.nsd_ids),
                                                             standardize(X_test_raw, full.X), alphas, device)
            steps.update(1)
    steps.close()
    r = {m: {f: pearson_per_target(true[f], pred[m][f]) for f in families} for m in methods}
    params = {"subject": split.subject, "sessions": list(split.sessions), "n_trials": split.n_trials,
              "references": refs, "n_hour_images": int(split.hour_ids.size), "n_align": int(split.align_ids.size),
              "n_test": int(test_ids.size), "methods": methods,
              "alphas": [float(a) for a in np.atleast_1d(alphas)]}
    spaces = {f: references[f].space for f in families} if "shared" in methods else {}
    return TransferResult(split=split, families=families, shapes={f: targets.shape(f) for f in families},
                          true=true, pred=pred, r=r, score=score, spaces=spaces,
                          n_align=int(split.align_ids.size) if "align" in methods else 0, params=params,
                          reference_models=dict(references) if uses_refs else {})


def _fit_predict(X, Y, X_test, alphas, device) -> tuple[np.ndarray, np.ndarray]:
    """Ridge fitted on (X, Y): the predictions of X_test (float32) and each target's leave-one-out R^2."""
    dec = _ridge(alphas, device)
    pred = np.asarray(dec.fit_predict(X, Y, X_test), dtype=np.float32)
    return pred, r2_from_mse(dec.cv_mse_, Y)   # the score lesson 03's decoders select stage 2's features by


def _compact(sessions) -> str:
    """'1-4' for a contiguous run of session numbers, else the list."""
    s = [int(x) for x in sessions]
    if len(s) == 1:
        return str(s[0])
    if s and s == list(range(s[0], s[-1] + 1)):
        return f"{s[0]}-{s[-1]}"
    return str(s)


__all__ = ["METHODS", "METHOD_TITLES", "Alignment", "ReferenceModels", "Responses", "SharedSpace", "SpaceDecoder",
           "TargetTable", "TransferInputs", "TransferResult", "TransferSplit", "compare", "fit_references",
           "hour_trials", "shared_per_session", "standardize", "transfer_split"]

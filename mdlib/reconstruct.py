"""Reconstructing a whole test set: one image at a time, sharded over processes, resumable (``mdlib reconstruct``).

One subject's 982 test images through the published stage 2 are tens of thousands of UNet passes each (the
cost per image: docs/reconstruct.md, "Cost per image"), far too much for one process, so the work is cut per
image: each image is reconstructed on its own (batch of one: its result never depends on its neighbours), with its
own seed (:func:`mdlib.sampler.image_seed` of its nsdId, never of the process), and written to a folder of
its own::

    <out>/subjNN/<tag>/                  tag: stage1, stage2-published or stage2-fast
    <out>/subjNN/<transfer>/<tag>/       a new subject decoded from its first sessions (``--transfer``):
        ../decoded.npz                   its decoded features, shared by both stages (docs/new_subject.md)
        run.json                         the settings every image here is made with (checked on every start)
        <nsdId>/image.png                the reconstruction
        <nsdId>/outputs.npz              latents (4, h, w), z (the optimised one in published mode), loss (per
                                         iteration / guided step), published mode: snapshots and their iterations
        <nsdId>/record.json              status ("done" or "failed" with the error), seed, parameters, cost,
                                         versions, which process made it and when
        .state/<nsdId>/                  the published optimisation's saved state while the image is in progress
        results.csv, results.json, metrics.csv     written by :func:`gather`

**Atomic, resumable.** An image's files are written into a hidden temporary folder beside its own and renamed
into place, so an image's folder is either complete or absent: an image is *finished* when its
``record.json`` exists. A run killed at any moment (``kill -9`` included) and started again skips the
finished images and redoes the interrupted one (the published mode resumes it from its last saved state,
:func:`mdlib.stage2.guide_published`), and ends with the outputs of an uninterrupted run.

**Failures.** An exception while reconstructing an image (non-finite inputs or outputs, e.g. NaN latents, or
CUDA running out of memory) is recorded as that image's ``record.json`` with status ``"failed"`` and the
error (the traceback's last line; the whole traceback beside it), and the run goes on with the next image.
Failed images are finished too: a rerun retries them only with ``retry_failed`` (``--retry-failed``), so
that a deterministic failure does not cost its time again on every resume.

**Sharding.** :func:`shard_from_env` reads the launcher's environment: ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``
(``torchrun``, ``accelerate launch``), ``SLURM_PROCID``/``SLURM_NTASKS`` (``srun``) and
``SLURM_ARRAY_TASK_ID``/``SLURM_ARRAY_TASK_COUNT`` (job arrays; combined with the others, each array task a
group of processes). A process takes ``images[rank::world]`` of the selected images sorted by nsdId.
``torch.distributed`` is never initialised: the shards are fixed by rank alone and the file system does the
rest, so the same command runs under every launcher, and a resumed run may use another number of processes.

**Decoding, once.** Each process needs the subject's decoded features. They come from
:func:`mdlib.decoding.decode_features` (cached in the data root), called under an exclusive lock on a file
in that cache (``fcntl.flock``, released by the OS if its holder dies): the first process decodes and fills
the cache, the others wait for the lock and then read the cache. Every process thus uses the same bytes,
whatever its device, which is what makes the shards' union equal a one-process run; and it works without
any rank being alive at the same time as another (job arrays). ``run.json`` holds a hash of the decoded
features: a process that decoded something else (another data root, say) refuses to add to the folder. A job
can instead read them from a file (``--decoded``, :func:`save_decoded` / :func:`load_decoded`), checked against
the models before anything is written (:func:`check_decoded`). A new subject with only its first sessions
(``--transfer``, :class:`TransferSpec`) is decoded once in the same way, by :mod:`mdlib.transfer` under a
lock, into ``decoded.npz`` beside the stages' folders (:func:`decode_transfer`).

**Progress.** Each process shows a bar over its shard and ends with a line for its shard; the first process
adds one for the whole selection (:func:`summarize`: done, failed, remaining, images per hour).
:func:`gather` turns the records into a results table and scores the images (:mod:`mdlib.evaluation`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import re
import shutil
import socket
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mdlib import paths, presets
from mdlib.cachekey import cache_key
from mdlib.progress import bar as progress_bar
from mdlib.record import _write_atomic, to_jsonable, write_json_atomic, write_npz_atomic, write_png_atomic

if TYPE_CHECKING:  # the heavy modules are imported where they are used: `mdlib info` needs no torch
    from mdlib.method import MethodConfig


#: Bump when the layout or meaning of a run folder changes.
FORMAT_VERSION = 2   # 2: run.json records image_size and each model's revision and resolved commit
MODES = ("published", "fast")
RECORD, IMAGE, OUTPUTS, SETTINGS = "record.json", "image.png", "outputs.npz", "run.json"


# ------------------------------------------------------------------------------------------------- sharding

@dataclass(frozen=True)
class Shard:
    """Which part of the images this process does: ``images[rank::world]``.

    Attributes:
        rank, world: this process' index and the number of processes, over every launcher level.
        local_rank: index among the processes of this machine (chooses the GPU: ``cuda:<local_rank>``).
        source: where rank and world came from (for the records).
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    source: str = "single process"

    def __post_init__(self) -> None:
        if self.world < 1 or not 0 <= self.rank < self.world:
            raise ValueError(f"need 0 <= rank < world, got rank {self.rank}, world {self.world}")

    def take(self, ids: Sequence[int]) -> np.ndarray:
        """This process' images: every ``world``-th of the ascending nsdIds, from the ``rank``-th."""
        return np.sort(np.asarray(ids, dtype=np.int64))[self.rank::self.world]


def shard_from_env(env: Mapping[str, str] | None = None) -> Shard:
    """The shard of this process from its launcher's environment (``os.environ`` by default).

    - ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``: ``torchrun`` and ``accelerate launch`` (processes, GPUs, nodes);
    - else ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID`` when ``srun`` started several tasks;
    - ``SLURM_ARRAY_TASK_ID`` (with ``SLURM_ARRAY_TASK_MIN``, ``_STEP``, ``_COUNT``): a job array's task is a
      group of the processes above: rank = task index x group size + rank in the group.
    Nothing set: one process, rank 0 of 1.
    """
    env = os.environ if env is None else env

    def num(name: str) -> int | None:
        text = str(env.get(name, "")).strip()
        if not text:
            return None
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"environment variable {name}={text!r} is not an integer") from None

    rank, world, local, source = 0, 1, 0, []
    if num("WORLD_SIZE") is not None:
        rank, world, local = num("RANK") or 0, num("WORLD_SIZE"), num("LOCAL_RANK") or 0
        source.append(f"RANK {rank} of WORLD_SIZE {world}")
    elif (num("SLURM_NTASKS") or 1) > 1 and num("SLURM_PROCID") is not None:
        rank, world, local = num("SLURM_PROCID"), num("SLURM_NTASKS"), num("SLURM_LOCALID") or 0
        source.append(f"SLURM_PROCID {rank} of SLURM_NTASKS {world}")
    task = num("SLURM_ARRAY_TASK_ID")
    if task is not None:
        first, step = num("SLURM_ARRAY_TASK_MIN") or 0, num("SLURM_ARRAY_TASK_STEP") or 1
        count = num("SLURM_ARRAY_TASK_COUNT")
        if count is None and num("SLURM_ARRAY_TASK_MAX") is not None:
            count = (num("SLURM_ARRAY_TASK_MAX") - first) // step + 1
        index = (task - first) // step
        if count is None or (task - first) % step or not 0 <= index < count:
            raise ValueError(f"SLURM_ARRAY_TASK_ID {task} is not in an evenly spaced array (min {first}, step "
                             f"{step}, count {count}): use --array=0-N, or give --rank and --world-size")
        rank, world = index * world + rank, count * world
        source.append(f"SLURM array task {index} of {count}")
    return Shard(rank, world, local, ", ".join(source) or "single process")


def select_images(test_ids: Sequence[int], spec: str = "test") -> np.ndarray:
    """The images to reconstruct among a subject's test images, by ``spec``:

    - ``"test"``: all of them;
    - ``"N..M"``: positions N (included) to M (excluded) in the ascending list of nsdIds, as Python's
      ``ids[N:M]``; ``"N.."`` to the end, ``"..M"`` the first M (``0..8``: the first 8).
    """
    ids = np.sort(np.asarray(test_ids, dtype=np.int64))
    spec = str(spec).strip()
    if spec in ("test", "all"):
        return ids
    m = re.fullmatch(r"(\d*)\.\.(\d*)", spec)
    if not m:
        raise ValueError(f"images must be 'test' or 'N..M' (positions among the test images), got {spec!r}")
    start = int(m[1]) if m[1] else 0
    stop = int(m[2]) if m[2] else len(ids)
    if start >= stop or start >= len(ids):
        raise ValueError(f"images {spec!r} selects nothing from {len(ids)} test images (positions 0..{len(ids)})")
    if stop > len(ids):   # never clamped in silence: a range written for another subject or split is a mistake
        raise ValueError(f"images {spec!r} reaches position {stop}, but there are {len(ids)} test images "
                         f"(positions 0..{len(ids)}): use {start}..{len(ids)} or {start}.. for the rest")
    return ids[start:stop]


# ------------------------------------------------------------------------------------------------------ job

#: The methods of ``--transfer`` (:data:`mdlib.transfer.METHODS`, repeated here so that building the parser
#: imports no torch; a test checks they agree).
TRANSFER_METHODS = ("align", "shared", "scratch", "full")


@dataclass(frozen=True)
class TransferSpec:
    """A new subject decoded from its first sessions instead of all of them (``mdlib reconstruct --transfer``;
    docs/new_subject.md): the method, the first ``sessions`` sessions (only their first ``n_trials`` trials
    if given) and the reference subjects (empty: the papers' subjects other than the new one)."""

    method: str = "shared"
    sessions: int = 1
    n_trials: int | None = None
    references: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.method not in TRANSFER_METHODS:
            raise ValueError(f"--transfer must be one of {', '.join(TRANSFER_METHODS)}, got {self.method!r}")
        if isinstance(self.sessions, bool) or int(self.sessions) != self.sessions or self.sessions < 1:
            raise ValueError(f"--sessions is the number of the new subject's first sessions (>= 1), "
                             f"got {self.sessions!r}")
        if self.n_trials is not None and (int(self.n_trials) != self.n_trials or self.n_trials < 1):
            raise ValueError(f"--trials must be >= 1, got {self.n_trials!r}")
        object.__setattr__(self, "references", tuple(int(r) for r in self.references))

    @property
    def tag(self) -> str:
        """The folder name, e.g. ``shared-ses1-from1.5.7`` (``-tr375`` with a number of trials; no ``-from`` for
        the methods that use no reference, ``scratch`` and ``full``)."""
        trials = f"-tr{self.n_trials}" if self.n_trials else ""
        refs = f"-from{'.'.join(map(str, self.references))}" if self.uses_references else ""
        return f"{self.method}-ses{self.sessions}{trials}{refs}"

    @property
    def uses_references(self) -> bool:
        return self.method in ("align", "shared")


@dataclass(frozen=True)
class Job:
    """What to reconstruct and how (the arguments of ``mdlib reconstruct``).

    Attributes:
        subject: NSD subject. stage: 1 (img2img from the decoded (z, c)) or 2 (feature guidance).
        mode: stage 2's ``"published"`` (backpropagation through the sampler) or ``"fast"``; ignored for stage 1.
        out: output root (``<out>/subjNN/<tag>/``). data_root, preset: the data (``paths.data_root``).
        sd_model, clip_model: model sources (empty: the preset's; :func:`mdlib.models.load_sd`).
        dtype: the models' dtype (None: float32). images: which test images (:func:`select_images`).
        config: the method's settings, every row of docs/method.md (:func:`mdlib.method.configure`: a variant
            on the job's preset; None: the default variant); its ``batch_size`` is not used (one image at a time), ``save_every`` is the
            published mode's state-saving period.
        decoded: a file of decoded features (:func:`save_decoded`) to reconstruct from instead of decoding the
            subject's betas ("": decode, :func:`decode`).
        image_size: sample at this image side in pixels instead of the model's own (None), the decoded z resized
            to the latent size (:func:`fit_latents`): rehearsals and previews (:func:`mdlib.models.load_sd`).
        transfer: decode the subject from its first sessions with :mod:`mdlib.transfer` (:class:`TransferSpec`;
            its references filled in); None: from all its data, as MindDiffuser does.
    """

    subject: int
    stage: int = 1
    mode: str = "published"
    out: str | os.PathLike = ""
    data_root: str | os.PathLike = ""
    preset: str = "nsd"
    sd_model: str = ""
    clip_model: str = ""
    dtype: str | None = None
    images: str = "test"
    config: MethodConfig | None = None
    decoded: str | os.PathLike = ""
    image_size: int | None = None
    transfer: TransferSpec | None = None

    def __post_init__(self) -> None:
        if self.stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {self.stage}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        presets.get(self.preset)   # a clear error for an unknown preset
        if self.config is None:   # the default variant on the job's preset
            object.__setattr__(self, "config", _configure("mdlib", self.preset))
        if self.config.preset != self.preset:
            raise ValueError(f"the job's preset is {self.preset!r} but its config was made for "
                             f"{self.config.preset!r}: build it with mdlib.method.configure(variant, {self.preset!r})")
        if self.transfer is not None:
            if self.decoded:
                raise ValueError("--decoded and --transfer both say where the decoded features come from: give one")
            if not self.transfer.uses_references:
                object.__setattr__(self, "transfer", dataclasses.replace(self.transfer, references=()))
            elif not self.transfer.references:   # the papers' subjects other than the new one
                from mdlib.transfer_data import default_references

                refs = tuple(default_references(self.subject))
                object.__setattr__(self, "transfer", dataclasses.replace(self.transfer, references=refs))
            if int(self.subject) in self.transfer.references:
                raise ValueError(f"--from: subject {self.subject} is the new subject and cannot be its own reference")

    @property
    def tag(self) -> str:
        return "stage1" if self.stage == 1 else f"stage2-{self.mode}"

    @property
    def label(self) -> str:
        """The stage, and with ``transfer`` its folder name: what progress lines and summaries say."""
        return f"{self.tag}, {self.transfer.tag}" if self.transfer else self.tag

    @property
    def root(self) -> Path:
        return paths.data_root(self.data_root or None, self.preset)

    @property
    def folder(self) -> Path:
        base = Path(self.out).expanduser() if self.out else paths.home() / "runs" / "reconstruct" / self.preset
        subject = base / f"subj{int(self.subject):02d}"
        return (subject / self.transfer.tag if self.transfer else subject) / self.tag

    @property
    def sd_source(self) -> str:
        return self.sd_model or self.config.sd_model

    @property
    def clip_source(self) -> str:
        return self.clip_model or self.config.clip_model

    @property
    def families(self) -> list[str] | None:
        """The decoded families needed: z and c for stage 1, every family for stage 2 (None)."""
        return ["z", "c"] if self.stage == 1 else None


def pick_device(device: str | None, shard: Shard):
    """``device`` (None or ``"auto"``: CUDA when available, else the CPU); a bare ``"cuda"`` is this process'
    GPU, ``cuda:<local_rank>`` (modulo the GPUs visible)."""
    import torch

    from mdlib.device import resolve_device

    if device in (None, "", "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA GPU is visible to this process (torch.cuda.is_available() is "
                         "False); run on a GPU node, check CUDA_VISIBLE_DEVICES, or pass --device cpu")
    if dev.type == "cuda" and dev.index is None and torch.cuda.is_available():
        dev = torch.device("cuda", shard.local_rank % torch.cuda.device_count())
    return resolve_device(dev)


def load_models(job: Job, device) -> tuple:
    """(sd, clip) for the job on ``device``: clip is None for stage 1."""
    from mdlib import models

    sd = models.load_sd(job.sd_source, device=device, dtype=job.dtype, image_size=job.image_size)
    clip = None
    if job.stage == 2:
        clip = models.load_clip_vision(job.clip_source, device=sd.device, dtype=job.dtype,
                                       normalization=job.config.clip_normalization)
    return sd, clip


class BusyError(RuntimeError):
    """Another process holds the lock; the message says which work and what to do."""


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, waiting: str = "", busy: str | None = None):
    """An exclusive ``fcntl.flock`` on ``path`` (created) for the block; prints ``waiting`` to stderr when
    another process holds it and waits, or, with ``busy``, raises ``BusyError(busy)`` instead of waiting.
    The OS releases it when its holder exits, however it exits (works on local file systems and NFS; Lustre
    needs the ``flock`` mount option)."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if busy is not None:
                raise BusyError(busy) from None
            if waiting:
                print(waiting, file=sys.stderr, flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def decode(job: Job, sd, clip, device=None, progress: bool = True, shard: Shard | None = None):
    """The subject's decoded features (:func:`mdlib.decoding.decode_features`), one process at a time: under
    :func:`file_lock` on ``<data root>/mdlib_cache/locks/decode_subjNN.lock``, so the first process decodes and
    caches, the others read its cache. A job with a ``decoded`` file reads that file instead (:func:`load_decoded`)."""
    from mdlib import decoding

    if job.decoded:
        return load_decoded(job.decoded)
    if job.transfer is not None:
        return decode_transfer(job, sd, clip, device, progress, shard)
    cfg, root = job.config, job.root
    lock = paths.cache_dir(root) / "locks" / f"decode_subj{int(job.subject):02d}.lock"
    who = f"rank {shard.rank}: " if shard is not None and shard.world > 1 else ""
    with file_lock(lock, f"{who}waiting for another process decoding subject {job.subject} ({lock})"):
        return decoding.decode_features(root, job.subject, sd, clip, families=job.families, device=device,
                                        progress=progress, **cfg.decode_kwargs())


def decode_transfer(job: Job, sd, clip, device=None, progress: bool = True, shard: Shard | None = None):
    """The new subject's decoded features by ``job.transfer`` (:func:`mdlib.transfer_data.decode_new_subject`),
    computed once under a lock and kept in ``<folder>/../decoded.npz`` with every family, so that stages 1 and
    2 read the same file (stage 1 loads the CLIP model for it); a file made with other settings or models is
    computed again and replaced."""
    from mdlib import models
    from mdlib.transfer_data import decode_new_subject

    spec, cfg = job.transfer, job.config
    if clip is None:
        clip = models.load_clip_vision(job.clip_source, device=sd.device, dtype=job.dtype,
                                       normalization=cfg.clip_normalization)
    path = job.folder.parent / "decoded.npz"
    made_with = {"subject": int(job.subject), "method": spec.method, "sessions": int(spec.sessions),
                 "n_trials": spec.n_trials, "references": list(spec.references), "data_root": str(job.root),
                 "method_config": cache_key(cfg.decode_kwargs()),
                 "sd": [sd.fingerprint("vae"), sd.fingerprint("text_encoder")], "clip": clip.fingerprint()}
    who = f"rank {shard.rank}: " if shard is not None and shard.world > 1 else ""
    with file_lock(path.with_suffix(".lock"), f"{who}waiting for another process decoding {path}"):
        if path.is_file():
            decoded = load_decoded(path)
            if decoded.params.get("made_with") == made_with:     # the same settings and models
                return decoded
        decoded, _ = decode_new_subject(job.root, job.subject, spec.method, sessions=spec.sessions,
                                        n_trials=spec.n_trials, references=spec.references, sd=sd,
                                        clip=clip, config=cfg, device=device, progress=progress)
        decoded.params["made_with"] = made_with
        save_decoded(path, decoded)
        return load_decoded(path)     # what every other process will read: the same bytes


def transfer_sentence(params: Mapping) -> str:
    """What a new subject's decoded features were made from, in one sentence (``params`` of
    :meth:`mdlib.transfer.TransferResult.decoded`)."""
    p = params
    ses = p["sessions"]
    where = f"session {ses[0]}" if len(ses) == 1 else f"sessions {', '.join(map(str, ses))}"
    pairs = (f", {p['n_align']} of them shown to references {', '.join(map(str, p['references']))} too (the "
             "alignment pairs)") if p["method"] in ("align", "shared") else ""
    return (f"method {p['method']!r} from {p['n_trials']} trials of {where}: {p['n_hour_images']} images{pairs}; "
            f"{p['n_test']} test images (the shared images the subject saw outside those trials)")


# ------------------------------------------------------------------------------------ decoded features in a file

#: The ``params`` entry's ``format`` in a file of decoded features (:func:`save_decoded`).
DECODED_FORMAT = "mdlib.decoded"


def save_decoded(path: str | os.PathLike, decoded) -> Path:
    """Write a subject's decoded features (:class:`mdlib.decoding.Decoded`) to one ``.npz`` that ``mdlib
    reconstruct --decoded`` reads (atomically; no pickles). Arrays:

    - ``nsd_ids`` (n,) int64: the test images (0-based nsdIds);
    - each family's predictions under its name: ``z`` (n, 4, 64, 64) for SD v1-4, ``c`` (n, n_tokens - 1, 768)
      without the BOS row (:func:`mdlib.features.drop_bos`), ``clip_block1`` ... ``clip_block6`` (n, 50, 768) and
      ``clip_embedding`` (n, 512) for ViT-B/32;
    - ``score_<family>`` (features,): the selection score of each feature, flattened (stage 2 keeps the best
      ``--keep`` share of each block by it; :mod:`mdlib.selection`), where known;
    - ``params``: JSON, how they were made (``select_by`` chooses the selection rule).
    """
    arrays = {"nsd_ids": np.asarray(decoded.nsd_ids, dtype=np.int64)}
    for fam, value in decoded.pred.items():
        arrays[fam] = np.asarray(value, dtype=np.float32)
        if fam in decoded.score:
            arrays[f"score_{fam}"] = np.asarray(decoded.score[fam], dtype=np.float64).ravel()
    arrays["params"] = np.array(json.dumps({**to_jsonable(decoded.params), "format": DECODED_FORMAT}))
    path = Path(path).expanduser()
    write_npz_atomic(path, **arrays)
    return path


def load_decoded(path: str | os.PathLike):
    """The features of a :func:`save_decoded` file as :class:`mdlib.decoding.Decoded` (rows sorted by nsdId; no
    true features; a CLIP block without scores gets NaN ones, which only ``keep = 1`` accepts).

    Raises ``FileNotFoundError`` or ``ValueError`` naming the file and what is wrong in it; whether the shapes
    fit the models is :func:`check_decoded`'s business."""
    from mdlib.decoding import Decoded

    path = Path(path).expanduser()
    where = f"--decoded {path}"
    if not path.is_file():
        raise FileNotFoundError(f"{where}: no such file (write one with mdlib.reconstruct.save_decoded; "
                                "docs/reconstruct.md, \"Decoded features from a file\")")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError) as err:
        raise ValueError(f"{where}: not a readable .npz file ({err})") from None
    try:
        params = json.loads(str(arrays.pop("params"))) if "params" in arrays else {}
    except ValueError as err:
        raise ValueError(f"{where}: its 'params' entry is not JSON ({err})") from None
    ids = arrays.pop("nsd_ids", None)
    if ids is None or ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer) or len(np.unique(ids)) != len(ids):
        raise ValueError(f"{where}: needs 'nsd_ids', the distinct integer nsdIds of its rows (n,)")
    scores = {k[len("score_"):]: arrays.pop(k) for k in list(arrays) if k.startswith("score_")}
    unknown = [k for k in arrays if not re.fullmatch(r"z|c|clip_block\d+|clip_embedding", k)]
    if unknown:
        raise ValueError(f"{where}: unknown entries {unknown}; expected nsd_ids, z, c, clip_block<k>, clip_embedding, "
                         "score_<family> and params")
    wrong = {k: v.shape for k, v in arrays.items() if v.ndim < 2 or len(v) != len(ids)}
    if wrong:
        raise ValueError(f"{where}: {len(ids)} nsd_ids but entries of shapes {wrong}: one row per image")
    order = np.argsort(ids, kind="stable")
    pred = {k: np.asarray(v[order], dtype=np.float32) for k, v in arrays.items()}
    for fam in pred:
        size = int(np.prod(pred[fam].shape[1:]))
        score = scores.get(fam)
        if score is not None and score.size != size:
            raise ValueError(f"{where}: score_{fam} has {score.size} values for {size} features")
        if fam.startswith("clip_block"):
            scores[fam] = np.full(size, np.nan) if score is None else score.astype(np.float64).ravel()
    return Decoded(nsd_ids=ids[order].astype(np.int64), pred=pred, true={}, score=scores, params=params)


def check_decoded(job: Job, decoded, sd, clip=None) -> None:
    """Raise a ``ValueError`` naming the source (``--decoded`` file) and each problem when decoded features do
    not fit the job: z (n, 4, h, w) with the model's latent side (any side with ``--image-size``), c (n, n_tokens
    - 1, width), and for stage 2 the CLIP blocks (n, tokens, width), the embedding (n, dim) and, unless
    ``--keep 1``, each block's selection scores."""
    where = f"--decoded {job.decoded}" if job.decoded else "the decoded features"
    cfg, pred, problems = job.config, decoded.pred, []

    def shape(fam: str) -> tuple:
        return tuple(np.shape(pred[fam])[1:])

    for fam in ("z", "c"):
        if fam not in pred:
            problems.append(f"no {fam}")
    if "z" in pred:
        want = tuple(sd.latent_shape)
        fits = shape("z") == want if not job.image_size else len(shape("z")) == 3 and shape("z")[0] == want[0]
        if not fits:
            problems.append(f"z is {shape('z')}, the model needs {want}"
                            + ("" if job.image_size else " (or pass --image-size to sample at another size)"))
    if "c" in pred and shape("c") != (cfg.n_tokens - 1, sd.text_width):
        problems.append(f"c is {shape('c')}, needs ({cfg.n_tokens - 1}, {sd.text_width}): --n-tokens {cfg.n_tokens} "
                        "less the BOS row, by the text encoder's width")
    if job.stage == 2:
        blocks = sorted((k for k in pred if k.startswith("clip_block")), key=lambda k: int(k[len("clip_block"):]))
        if not blocks:
            problems.append("no clip_block<k> features (stage 2 needs them)")
        for fam in blocks:
            if not 1 <= int(fam[len("clip_block"):]) <= clip.n_blocks or shape(fam) != (clip.n_tokens, clip.width):
                problems.append(f"{fam} is {shape(fam)}, CLIP has {clip.n_blocks} blocks of ({clip.n_tokens}, "
                                f"{clip.width})")
            elif cfg.keep < 1 and np.isnan(decoded.score.get(fam, np.array([np.nan]))).all():
                problems.append(f"no score_{fam}: stage 2 keeps the best-decoded {cfg.keep:g} of each block's "
                                "features by these scores (give them, or --keep 1 to keep every feature)")
        if "clip_embedding" in pred and shape("clip_embedding") != (clip.embed_dim,):
            problems.append(f"clip_embedding is {shape('clip_embedding')}, CLIP's is ({clip.embed_dim},)")
    if problems:
        raise ValueError(f"{where} does not fit {job.sd_source}"
                         + (f" and {job.clip_source}" if job.stage == 2 else "") + ": " + "; ".join(problems))


def fit_latents(z: np.ndarray, latent_shape: Sequence[int]) -> np.ndarray:
    """Decoded latents (n, 4, h, w) resized to ``latent_shape`` (4, H, W) (``--image-size``): averaged over
    areas when shrinking (each latent position covers 8 x 8 pixels, so this is the latent of a smaller image,
    approximately), bilinear when growing; unchanged when they fit."""
    import torch
    import torch.nn.functional as F

    z = np.asarray(z, dtype=np.float32)
    size = tuple(int(s) for s in latent_shape[1:])
    if z.shape[2:] == size:
        return z
    mode = "area" if z.shape[2] >= size[0] else "bilinear"
    return F.interpolate(torch.from_numpy(z), size=size, mode=mode).numpy()


# ------------------------------------------------------------------------------------------------- settings

def _digest(arrays: Mapping[str, np.ndarray]) -> str:
    """24 hex digits of the named arrays (sorted by name), each as ``"name|dtype|shape|"`` and its values."""
    parts = []
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        parts += [f"{name}|{a.dtype}|{a.shape}|", a.tobytes()]
    return cache_key(*parts, n=24)


def run_settings(job: Job, sd, clip, decoded) -> dict:
    """What every image of a run folder shares (``run.json``): the method's settings, the models'
    fingerprints and dtype, a hash of the decoded features used and the subject's test images (sorted)."""
    from mdlib import method

    cfg = job.config
    families = sorted(decoded.pred) if job.families is None else job.families
    settings = {
        "format": "mdlib.reconstruct", "version": FORMAT_VERSION, "subject": int(job.subject), "stage": job.stage,
        "mode": job.mode if job.stage == 2 else None, "seed": cfg.seed, "sampler": cfg.sampler.as_dict(),
        "method": method.describe(cfg),
        "decoded_sha256": _digest({f: decoded.pred[f] for f in families}),
        "test_ids": [int(i) for i in np.sort(decoded.nsd_ids)], "image_size": sd.image_size,
        "models": {"unet": sd.fingerprint("unet"), "vae": sd.fingerprint("vae"),
                   "text_encoder": sd.fingerprint("text_encoder"), "dtype": str(sd.dtype).replace("torch.", ""),
                   "sd": _provenance(sd.source, sd.revision, sd.folder)},
    }
    if job.stage == 2:
        settings["stage2"] = {"mode": job.mode, **cfg.loss_kwargs(), "clip_normalization": cfg.clip_normalization,
                              **dataclasses.asdict(cfg.published if job.mode == "published" else cfg.fast)}
        settings["models"]["clip"] = clip.fingerprint()
        settings["models"]["clip_model"] = _provenance(clip.source, clip.revision, clip.weights)
    return json.loads(json.dumps(to_jsonable(settings)))


def _provenance(source: str, revision: str | None, path) -> dict:
    """Where a model came from: what was asked for, the hub revision, and the commit it resolved to in the
    Hugging Face cache (None for tiny models and folders)."""
    from mdlib.models import hub_commit

    return {"source": str(source), "revision": revision, "commit": hub_commit(path)}


def open_run(folder: str | os.PathLike, settings: dict) -> Path:
    """Create the run folder with its ``run.json``, or check that the one there has the same settings."""
    folder = Path(folder)
    path = folder / SETTINGS
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("version") != settings.get("version"):
            raise ValueError(f"{folder} was made by another version of mdlib reconstruct ({path}: format version "
                             f"{old.get('version')}, this one writes {settings.get('version')}): use another --out, "
                             "or delete that folder to start over")
        if old != settings:
            diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            raise ValueError(f"{folder} holds images made with other settings ({', '.join(diff)} differ; see "
                             f"{path}): use another --out, or delete that folder to start over")
    else:
        write_json_atomic(path, settings)
    return folder


def read_settings(folder: str | os.PathLike) -> dict:
    path = Path(folder) / SETTINGS
    if not path.is_file():
        raise FileNotFoundError(f"no run in {folder} (no {SETTINGS}): run `mdlib reconstruct` first")
    return json.loads(path.read_text())


def versions() -> dict:
    """Versions of what made an image (the records')."""
    import platform
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in ("mdlib", "torch", "diffusers", "transformers", "open_clip_torch", "numpy", "pillow"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


# ---------------------------------------------------------------------------------------------- one image

def read_record(folder: str | os.PathLike, nsd_id: int) -> dict | None:
    """An image's record, or None while it is not finished."""
    path = Path(folder) / str(int(nsd_id)) / RECORD
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def _check_finite(what: str, a) -> None:
    a = np.asarray(a)
    bad = int(a.size - np.isfinite(a).sum())
    if bad:
        raise FloatingPointError(f"{bad} of {a.size} values of the {what} are not finite")


def _now() -> tuple[float, str]:
    t = time.time()
    return t, datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat(timespec="seconds")


def reconstruct_image(job: Job, sd, clip, decoded, row: int, seed: int, state_dir: Path | None = None,
                      progress: bool = False) -> tuple[np.ndarray, dict, dict]:
    """One image (row ``row`` of ``decoded``): (image (S, S, 3) uint8, the arrays of ``outputs.npz``, cost).
    ``state_dir``: where the published optimisation keeps its state (:func:`mdlib.runstate.stores_under`).
    Raises ``FloatingPointError`` on non-finite inputs or outputs."""
    from mdlib import runstate, stage1, stage2

    cfg = job.config
    part = slice(row, row + 1)
    z, c = decoded.pred["z"][part], decoded.pred["c"][part]
    if job.image_size:
        z = fit_latents(z, sd.latent_shape)
    _check_finite("decoded z", z)
    _check_finite("decoded c", c)
    if job.stage == 1:
        out = stage1.img2img(sd, z, c, [seed], config=cfg.sampler, batch_size=1, progress=False)
        arrays = {"latents": out.latents[0], "z": np.asarray(z[0], dtype=np.float32),
                  "loss": np.zeros(0, dtype=np.float32)}
        cost = {"unet_passes": cfg.sampler.unet_evaluations(1), "unet_backward": 0,
                "peak_memory_bytes": stage2._peak_memory(sd.device)}
        image = out.images[0]
    else:
        targets = cfg.targets(decoded, rows=part, device=sd.device)
        for name, t in targets.blocks.items():
            _check_finite(f"decoded CLIP {name}", t.cpu().numpy())
        kw = dict(sampler_config=cfg.sampler, progress=progress)
        if job.mode == "published":
            state = None if state_dir is None else runstate.stores_under(state_dir)
            out = stage2.guide_published(sd, clip, z, c, targets, [seed], config=cfg.published, state=state,
                                         save_every=cfg.save_every, **kw)
        else:
            out = stage2.guide_fast(sd, clip, z, c, targets, [seed], config=cfg.fast, **kw)
        arrays = {"latents": out.latents[0], "z": out.z[0], "loss": out.loss[:, 0].astype(np.float32)}
        if out.snapshots:
            its = sorted(out.snapshots)
            arrays["snapshots"] = np.stack([out.snapshots[k][0] for k in its])
            arrays["snapshot_iterations"] = np.array(its, dtype=np.int64)
        cost = {k: v for k, v in out.cost.items() if k not in ("run_key", "wall_s")}
        image = out.images[0]
    _check_finite("latents", arrays["latents"])
    _check_finite("optimised z", arrays["z"])
    _check_finite("feature loss", arrays["loss"][-1:])
    return image, arrays, cost


def _clean_leftovers(folder: Path, nsd_id: int) -> None:
    for p in (*folder.glob(f".tmp-{nsd_id}-*"), *folder.glob(f".old-{nsd_id}-*")):
        shutil.rmtree(p, ignore_errors=True)


def commit(folder: str | os.PathLike, nsd_id: int, record: dict, image: np.ndarray | None = None,
           arrays: dict | None = None) -> Path:
    """Write an image's files into a temporary folder, then rename it to ``<folder>/<nsdId>`` (replacing a
    failed attempt's folder): readers, and a rerun after a kill, see all of it or none."""
    folder = Path(folder)
    final = folder / str(int(nsd_id))
    token = f"{socket.gethostname()}-{os.getpid()}-{time.monotonic_ns()}"
    tmp = folder / f".tmp-{nsd_id}-{token}"
    tmp.mkdir(parents=True)
    if image is not None:
        write_png_atomic(tmp / IMAGE, image)
        write_npz_atomic(tmp / OUTPUTS, **arrays)
    write_json_atomic(tmp / RECORD, record)
    old = None
    if final.exists():
        old = folder / f".old-{nsd_id}-{token}"
        os.rename(final, old)
    try:
        os.rename(tmp, final)
    except OSError:
        if (final / RECORD).is_file():    # another process committed this image meanwhile: keep its result
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


# ------------------------------------------------------------------------------------------------- the run

def run(job: Job, shard: Shard | None = None, device: str | None = None, *, retry_failed: bool = False,
        progress: bool = True, sd=None, clip=None, decoded=None, log=print) -> dict:
    """Reconstruct this process' shard of the job's images, skipping the finished ones.

    Args:
        job: :class:`Job`. shard: default :func:`shard_from_env`. device: :func:`pick_device`.
        retry_failed: redo images recorded as failed (default: they count as finished).
        progress: a bar over this shard (the inner stage-2 bars too when there is one process).
        sd, clip, decoded: models and decoded features already at hand (default: loaded and decoded here).
        log: where the summary lines go.
    Returns ``{"shard": this process' numbers, "overall": summarize(...) of the whole selection}``.
    Raises :class:`BusyError` when another process holds this shard of the folder.
    """
    from mdlib.pipeline import subject_rows

    shard = shard or shard_from_env()
    if sd is None:
        sd, clip = load_models(job, pick_device(device, shard))
    if decoded is None:
        decoded = decode(job, sd, clip, device=sd.device, progress=progress and shard.rank == 0, shard=shard)
    check_decoded(job, decoded, sd, clip)
    ids = select_images(decoded.nsd_ids, job.images)
    settings = run_settings(job, sd, clip, decoded)
    folder = open_run(job.folder, settings)
    mine = shard.take(ids)
    rows = subject_rows(decoded, mine)
    # One process per shard and folder: a second one (say, started without RANK/WORLD_SIZE beside the first)
    # would redo every image of the same shard; it stops here, saying why.
    busy = (f"another process is already reconstructing shard {shard.rank} of {shard.world} in {folder}. To share "
            "the images among processes give each its own rank (torchrun, accelerate launch or a SLURM array set "
            "RANK/WORLD_SIZE; or --rank/--world-size); to run this one anyway, use another --out")
    with file_lock(folder / ".locks" / f"shard{shard.rank}of{shard.world}.lock", busy=busy):
        return _run_shard(job, shard, folder, settings, ids, mine, rows, sd, clip, decoded, retry_failed, progress,
                          log)


def _run_shard(job, shard, folder, settings, ids, mine, rows, sd, clip, decoded, retry_failed, progress, log) -> dict:
    """The loop of :func:`run` over this process' images, under its shard's lock."""
    import torch

    from mdlib.sampler import image_seed

    def pending(nsd_id) -> bool:
        rec = read_record(folder, nsd_id)
        return rec is None or (retry_failed and rec.get("status") == "failed")

    todo = [(int(r), int(i)) for r, i in zip(rows, mine) if pending(i)]
    process = {"rank": shard.rank, "world": shard.world, "local_rank": shard.local_rank, "launcher": shard.source,
               "host": socket.gethostname(), "pid": os.getpid(), "device": str(sd.device),
               "torch_threads": torch.get_num_threads()}
    common = {"subject": int(job.subject), "stage": job.stage, "mode": settings["mode"], "tag": job.tag,
              "sd_model": job.sd_source, "clip_model": job.clip_source if job.stage == 2 else None,
              "settings": {k: v for k, v in settings.items() if k != "test_ids"}, "versions": versions(),
              "process": process}
    for old in folder.glob(".old-*"):     # a replaced attempt whose removal a kill interrupted: always garbage
        shutil.rmtree(old, ignore_errors=True)
    bar = progress_bar(total=len(mine), initial=len(mine) - len(todo), position=shard.local_rank, unit="image",
                       desc=f"subj{int(job.subject):02d} {job.label} rank {shard.rank}/{shard.world}",
                       progress=progress, dynamic_ncols=True)
    done = failed = 0
    t_start = time.perf_counter()
    for row, nsd_id in todo:
        seed = image_seed(nsd_id, job.config.seed)
        state_dir = folder / ".state" / str(nsd_id)
        _clean_leftovers(folder, nsd_id)
        started, started_iso = _now()
        t0 = time.perf_counter()
        image = arrays = None
        try:
            image, arrays, cost = reconstruct_image(job, sd, clip, decoded, row, seed, state_dir,
                                                    progress=progress and shard.world == 1)
            status, error, tb = "done", None, None
        except Exception as exc:   # noqa: BLE001 - recorded as this image's failure; the run goes on
            status, cost, tb = "failed", {}, traceback.format_exc()
            error = traceback.format_exception_only(exc)[-1].strip()
            if sd.device.type == "cuda":
                torch.cuda.empty_cache()
        finished, finished_iso = _now()
        loss = arrays["loss"] if arrays is not None else np.zeros(0)
        record = {**common, "nsd_id": nsd_id, "row": row, "seed": seed, "status": status, "error": error,
                  "traceback": tb, "cost": {**cost, "wall_s": time.perf_counter() - t0},
                  "loss_first": float(loss[0]) if loss.size else None,
                  "loss_final": float(loss[-1]) if loss.size else None,
                  "files": {"image": IMAGE, "outputs": OUTPUTS} if status == "done" else {},
                  "started_at": started_iso, "finished_at": finished_iso, "started_unix": started,
                  "finished_unix": finished}
        commit(folder, nsd_id, record, image, arrays)
        if status == "done":
            shutil.rmtree(state_dir, ignore_errors=True)
            done += 1
        else:
            failed += 1
            log(f"rank {shard.rank}: nsdId {nsd_id} failed: {error}")
        bar.update()
        bar.set_postfix(failed=failed, refresh=False)
    bar.close()
    elapsed = time.perf_counter() - t_start
    remaining = sum(1 for i in mine if read_record(folder, i) is None)
    mine_summary = {"rank": shard.rank, "world": shard.world, "images": len(mine), "done_now": done,
                    "failed_now": failed, "skipped": len(mine) - len(todo), "remaining": remaining,
                    "seconds": elapsed, "images_per_hour": 3600.0 * (done + failed) / elapsed if elapsed > 0 and
                    (done + failed) else None}
    log(f"rank {shard.rank}/{shard.world}: {len(mine)} images in this shard: {done} reconstructed, {failed} failed "
        f"now, {len(mine) - len(todo)} finished before, {remaining} remaining"
        + (f"; {mine_summary['images_per_hour']:.1f} images/hour" if mine_summary["images_per_hour"] else ""))
    overall = summarize(folder, ids)
    if shard.rank == 0:
        log(format_summary(overall, job, others_running=shard.world > 1))
    return {"shard": mine_summary, "overall": overall}


def summarize(folder: str | os.PathLike, ids: Sequence[int]) -> dict:
    """The state of ``ids`` in a run folder, from their records: counts (``done``, ``failed``, ``remaining``),
    the failed images with their errors, ``seconds_per_image`` (mean wall time of the done ones, i.e. one
    process' speed), ``images_per_hour`` (finished images over the span from the first start to the last
    finish: all processes together), ``processes`` (distinct processes in the records) and an estimate of
    the time left at that rate."""
    recs = {int(i): read_record(folder, i) for i in ids}
    done = [r for r in recs.values() if r and r.get("status") == "done"]
    failed = {i: r.get("error") for i, r in recs.items() if r and r.get("status") == "failed"}
    finished = [r for r in recs.values() if r]
    remaining = len(recs) - len(done) - len(failed)
    per_image = float(np.mean([r["cost"]["wall_s"] for r in done])) if done else None
    rate = None
    if finished:
        span = max(r["finished_unix"] for r in finished) - min(r["started_unix"] for r in finished)
        rate = 3600.0 * len(finished) / span if span > 0 else None
    procs = {(r["process"]["host"], r["process"]["pid"]) for r in finished}
    return {"images": len(recs), "done": len(done), "failed": len(failed), "remaining": remaining,
            "failed_images": failed, "seconds_per_image": per_image, "images_per_hour": rate,
            "processes": len(procs), "hours_left_at_this_rate": remaining / rate if rate else None}


def format_summary(s: dict, job: Job | None = None, others_running: bool = False) -> str:
    head = f"subject {job.subject}, {job.label}: " if job is not None else ""
    text = f"{head}{s['images']} images: {s['done']} done, {s['failed']} failed, {s['remaining']} remaining"
    if s["images_per_hour"]:
        n = s["processes"]
        text += f"; {s['images_per_hour']:.1f} images/hour over the run ({n} process{'es' if n != 1 else ''})"
    if s["seconds_per_image"]:
        text += f", {s['seconds_per_image']:.1f} s per image and process"
    if s["hours_left_at_this_rate"] and s["remaining"]:
        text += f"; about {s['hours_left_at_this_rate']:.1f} h left at this rate"
    if others_running and s["remaining"]:
        text += " (other processes may still be running)"
    if s["failed"]:
        first = list(s["failed_images"].items())[:5]
        text += "\nfailed: " + "; ".join(f"{i}: {e}" for i, e in first) + (" ..." if s["failed"] > 5 else "")
        text += "\n(rerun with --retry-failed to try them again)"
    return text


# ---------------------------------------------------------------------------------------------- gathering

def read_image(folder: str | os.PathLike, nsd_id: int) -> np.ndarray:
    from PIL import Image

    with Image.open(Path(folder) / str(int(nsd_id)) / IMAGE) as im:
        return np.asarray(im.convert("RGB"))


def read_outputs(folder: str | os.PathLike, nsd_id: int) -> dict[str, np.ndarray]:
    with np.load(Path(folder) / str(int(nsd_id)) / OUTPUTS, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def gather(job: Job, metrics: Sequence[str] | None = ("PixCorr", "SSIM"), eval_weights: str = "auto",
           device: str | None = None, batch_size: int = 16, progress: bool = True, protocol: str = "mdlib") -> dict:
    """The per-image records of a run folder as a results table, and the evaluation metrics of the done images
    against their stimuli under ``protocol`` (:func:`mdlib.evaluation.evaluate`; ``metrics`` from
    :data:`mdlib.evaluation.ALL_METRICS`; the networks as lesson 06 has them: ``eval_weights``, the preset's CLIP
    column by :meth:`mdlib.evalnets.EvalNetworks.for_preset`; metrics without pretrained weights here are left
    out under ``"auto"``, and the header says which).

    Writes ``results.csv`` (one row per image: status, error, seed, cost, losses, per-image metrics),
    ``results.json`` (the same rows, the summary, the means and the header naming every network's weights)
    and ``metrics.csv`` (the means, :func:`mdlib.evaluation.write_table`) into the run folder. Identification
    metrics need at least 2 done images. Returns the contents of ``results.json`` plus ``table`` (a DataFrame).
    """
    import pandas as pd

    from mdlib import evaluation, protocols
    from mdlib.nsd.stimuli import StimulusReader

    protocol = protocols.get(protocol).name
    folder = job.folder
    settings = read_settings(folder)
    ids = select_images(settings["test_ids"], job.images)
    status = summarize(folder, ids)
    recs = {int(i): read_record(folder, i) for i in ids}
    done = [i for i, r in recs.items() if r and r["status"] == "done"]
    names = list(metrics) if metrics is not None else list(evaluation.ALL_METRICS)
    if len(done) < 2:
        names = [m for m in names if m not in evaluation.IDENTIFICATION]
    report = None
    if done and names:
        nets = None
        if set(names) - {"PixCorr", "SSIM", "PCC"}:
            from mdlib.evalnets import EvalNetworks

            nets = EvalNetworks.for_preset(job.preset, weights=eval_weights, protocol=protocol, device=device,
                                           seed=settings["seed"], batch_size=batch_size, progress=progress)
        recons = np.stack([read_image(folder, i) for i in done])
        with StimulusReader(job.root) as reader:
            stims = reader.read(done)
        report = evaluation.evaluate(recons, stims, nets, metrics=names, protocol=protocol)
    rows = []
    for i, r in recs.items():
        row = {"nsd_id": i, "status": "missing" if r is None else r["status"],
               "error": None if r is None else r.get("error"), "seed": None if r is None else r["seed"]}
        if r is not None:
            row.update({"loss_first": r.get("loss_first"), "loss_final": r.get("loss_final"),
                        **{k: r["cost"].get(k) for k in ("wall_s", "unet_passes", "unet_backward")},
                        "device": r["process"]["device"], "rank": r["process"]["rank"],
                        "image": str(folder / str(i) / IMAGE) if r["status"] == "done" else None})
        if report is not None and i in done:
            k = done.index(i)
            row.update({m: float(v[k]) for m, v in report.per_image.items()})
        rows.append(row)
    table = pd.DataFrame(rows).set_index("nsd_id")
    means = {} if report is None else dict(report.values)
    header = (f"mdlib reconstruct: subject {job.subject}, {job.label}, {len(done)} of {len(ids)} images done"
              + ("" if report is None else "\n" + report.header))
    result = {"subject": int(job.subject), "tag": job.tag, "images": [int(i) for i in ids], "summary": status,
              "protocol": protocol, "left_out": [] if report is None else report.left_out, "metrics": means,
              "metrics_images": len(done), "header": header, "settings": settings,
              "rows": json.loads(table.reset_index().to_json(orient="records"))}
    text = table.to_csv(na_rep="")
    _write_atomic(folder / "results.csv", lambda f: f.write(text), mode="w")
    write_json_atomic(folder / "results.json", result)
    if report is not None:
        means_table = evaluation.table({job.tag: report}, "all")
        means_table.attrs["header"] = header
        evaluation.write_table(folder / "metrics.csv", means_table)
    return {**result, "table": table}


# --------------------------------------------------------------------------------------------- the command

def add_arguments(p: argparse.ArgumentParser) -> None:
    """``mdlib reconstruct``'s options (standard library only: building the parser imports no torch)."""
    p.add_argument("--subject", type=int, required=True, help="NSD subject (1, 2, 5, 7: all 40 sessions)")
    p.add_argument("--stage", type=int, choices=(1, 2), required=True,
                   help="1: img2img from the decoded (z, c); 2: stage 2's feature guidance (--mode)")
    p.add_argument("--mode", choices=MODES, default=None,
                   help="stage 2: published (backpropagation through the sampler, default) or fast")
    p.add_argument("--images", default="test",
                   help="'test' (every test image) or N..M: positions N (included) to M (excluded) among the "
                        "subject's test images sorted by nsdId, e.g. 0..100")
    p.add_argument("--out", default="", help="output root (default: $MDLIB_DATA/runs/reconstruct/<preset>)")
    p.add_argument("--preset", choices=("nsd", "mini"), default="nsd",
                   help="nsd: the real NSD, SD v1-4, CLIP ViT-B/32 (default); mini: mini-NSD and the tiny models")
    p.add_argument("--variant", choices=("mdlib", "released", "paper"), default="mdlib",
                   help="the method: mdlib (this course's choices, default), released (the authors' code) or "
                        "paper (Algorithm 1); every row in docs/method.md. The options below change single rows")
    p.add_argument("--data-root", default="", help="dataset root (default: from the preset and $MDLIB_DATA)")
    p.add_argument("--device", default=None,
                   help="cpu, cuda or cuda:N (default: cuda:$LOCAL_RANK when CUDA is available, else cpu)")
    p.add_argument("--dtype", default=None, help="the models' dtype: float32 (default), float16, bfloat16")
    p.add_argument("--retry-failed", action="store_true", help="redo the images recorded as failed")
    p.add_argument("--decoded", default="",
                   help="reconstruct from this file of decoded features (.npz written by "
                        "mdlib.reconstruct.save_decoded) instead of decoding the subject's betas")
    p.add_argument("--image-size", type=int, default=None,
                   help="sample at this image side in pixels (SD v1-4: a multiple of 64) instead of the model's "
                        "512, the decoded z resized to fit: rehearsals and previews, not the published setting")
    t = p.add_argument_group("a new subject from its first sessions (docs/new_subject.md)")
    t.add_argument("--transfer", choices=TRANSFER_METHODS, default=None,
                   help="decode the subject from its first --sessions only: shared (a space shared by the "
                        "references, fitted to the subject), align (alignment to the references), scratch (ridge "
                        "on those sessions) or full (all its training images, for comparison)")
    t.add_argument("--sessions", type=int, default=1, help="with --transfer: the subject's first N sessions (default 1)")
    t.add_argument("--trials", type=int, default=None, help="with --transfer: only the first N trials of them")
    t.add_argument("--from", dest="references", type=int, nargs="+", default=None, metavar="SUBJECT",
                   help="with --transfer: the reference subjects (default: 1, 2, 5, 7 less --subject)")
    g = p.add_argument_group("what to do instead of reconstructing")
    g.add_argument("--gather", action="store_true",
                   help="build the results table (CSV + JSON) from the records and run the evaluation metrics")
    g.add_argument("--status", action="store_true", help="print done / failed / remaining and the speed")
    g.add_argument("--decode-only", action="store_true", help="decode the subject's features into the cache, then stop")
    e = p.add_argument_group("gathering")
    e.add_argument("--metrics", default="all",
                   help="'all' (default: MindDiffuser's three and the eight-metric table, as lesson 06), 'none', "
                        "or comma-separated names of mdlib.evaluation, e.g. PixCorr,SSIM")
    e.add_argument("--eval-weights", choices=("auto", "pretrained", "random"), default="auto",
                   help="the evaluation networks' weights (auto: pretrained where the files are here; the other "
                        "networks' metrics are left out)")
    e.add_argument("--protocol", choices=("mdlib", "mindeye", "braindiffuser"), default="mdlib",
                   help="how images are prepared for the metrics: mdlib (default), mindeye or braindiffuser, as "
                        "the published tables were made (docs/evaluation.md)")
    s = p.add_argument_group("sharding (default: from torchrun / accelerate / SLURM environment variables)")
    s.add_argument("--rank", type=int, default=None)
    s.add_argument("--world-size", type=int, default=None)
    m = p.add_argument_group("single rows of the method (default: the variant's; docs/method.md)")
    m.add_argument("--sd-model", default="", help="default: CompVis/stable-diffusion-v1-4 (nsd), tiny-trained (mini)")
    m.add_argument("--clip-model", default="", help="default: openai ViT-B/32 (nsd), tiny-trained (mini)")
    m.add_argument("--clip-normalization", choices=("clip", "imagenet"), default=None)
    m.add_argument("--roi", default=None)
    m.add_argument("--last-session", type=int, default=0, help="sessions 1..N (0: all)")
    m.add_argument("--decoder", choices=("ridge", "fastl2lir"), default=None)
    m.add_argument("--select-by", choices=("loo-r2", "cv5-r"), default=None,
                   help="stage 2's feature selection score (FastL2LiR needs cv5-r)")
    m.add_argument("--n-tokens", type=int, default=None)
    m.add_argument("--posterior", choices=("sample", "mean"), default=None, help="default: sample (nsd), mean (mini)")
    m.add_argument("--seed", type=int, default=None)
    for name in ("num_steps", "noise_index", "denoise_steps"):
        m.add_argument("--" + name.replace("_", "-"), dest=name, type=int, default=None)
    m.add_argument("--guidance-scale", type=float, default=None)
    m.add_argument("--eta", type=float, default=None)
    m.add_argument("--keep", type=float, default=None, help="stage 2: share of features per block in the loss")
    m.add_argument("--loss", choices=("mdlib", "released", "paper"), default=None, help="stage 2's loss")
    m.add_argument("--cos-weight", type=float, default=None, help="the mdlib loss's weight of (1 - cosine)")
    m.add_argument("--iterations", type=int, default=None, help="published mode (default: 300 nsd, 10 mini)")
    m.add_argument("--optimizer", choices=("adam", "sgd"), default=None, help="published mode's optimiser")
    m.add_argument("--lr", type=float, default=None, help="published mode's lr (default: 0.01 nsd, 0.05 mini)")
    m.add_argument("--gamma", type=float, default=None)
    m.add_argument("--update", default=None, help="published mode: z (released code) or z,c (the paper)")
    m.add_argument("--fresh-noise", choices=("yes", "no"), default=None,
                   help="published mode: new sampler noise at every iteration (released, paper) or not (mdlib)")
    m.add_argument("--save-every", type=int, default=None, help="published mode: iterations between saved states")
    m.add_argument("--fast-scale", type=float, default=None, help="fast mode's guidance step (lesson 05's 4.0)")
    m.add_argument("--fast-eps-constant", action="store_true",
                   help="fast mode: hold the noise estimate constant (no backward pass through the UNet)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def _configure(variant: str = "mdlib", preset: str = "nsd", **overrides) -> MethodConfig:
    from mdlib.method import configure

    return configure(variant, preset, **overrides)


def job_from_args(args: argparse.Namespace) -> Job:
    if args.stage == 1 and args.mode is not None:
        raise ValueError("--mode is for stage 2")
    rows = {name: getattr(args, name) for name in (
        "roi", "decoder", "select_by", "n_tokens", "posterior", "seed", "num_steps", "noise_index", "denoise_steps",
        "guidance_scale", "eta", "keep", "loss", "cos_weight", "iterations", "optimizer", "lr", "gamma", "update",
        "save_every", "clip_normalization")}
    rows["sessions"] = tuple(range(1, args.last_session + 1)) if args.last_session else None
    rows["fresh_noise"] = None if args.fresh_noise is None else args.fresh_noise == "yes"
    rows["fast_scale"] = args.fast_scale
    rows["fast_through_unet"] = False if args.fast_eps_constant else None
    config = _configure(args.variant, args.preset, **rows)
    transfer = None
    if args.transfer:
        if args.last_session:
            raise ValueError("--last-session limits the sessions of the full-data decoders; with --transfer the "
                             "subject's data is its first --sessions")
        transfer = TransferSpec(args.transfer, args.sessions, args.trials, tuple(args.references or ()))
    elif args.references is not None or args.trials is not None or args.sessions != 1:
        raise ValueError("--sessions, --trials and --from go with --transfer METHOD (docs/new_subject.md)")
    return Job(subject=args.subject, stage=args.stage, mode=args.mode or "published", out=args.out,
               data_root=args.data_root, preset=args.preset, sd_model=args.sd_model, clip_model=args.clip_model,
               dtype=args.dtype, images=args.images, config=config, decoded=args.decoded, image_size=args.image_size,
               transfer=transfer)


def main(args: argparse.Namespace) -> int:
    """``mdlib reconstruct``: reconstruct this process' shard, or ``--gather``, ``--status``, ``--decode-only``."""
    job = job_from_args(args)
    progress = not args.quiet
    if args.gather or args.status:
        if args.status:
            settings = read_settings(job.folder)
            print(format_summary(summarize(job.folder, select_images(settings["test_ids"], job.images)), job))
            return 0
        names = {"all": None, "none": []}.get(args.metrics, [m.strip() for m in args.metrics.split(",") if m.strip()])
        out = gather(job, metrics=names, eval_weights=args.eval_weights, device=args.device, progress=progress,
                     protocol=args.protocol)
        print(format_summary(out["summary"], job))
        print(f"protocol {out['protocol']!r} (docs/evaluation.md)"
              + (f"; left out for want of pretrained weights: {', '.join(out['left_out'])}" if out["left_out"] else ""))
        for name, value in out["metrics"].items():
            print(f"  {name}: {value:.4f}" if math.isfinite(value) else f"  {name}: nan")
        print(f"results: {job.folder / 'results.csv'}, {job.folder / 'results.json'}")
        return 0
    shard = shard_from_env()
    if args.rank is not None or args.world_size is not None:
        if args.rank is None or args.world_size is None:
            raise ValueError("give both --rank and --world-size")
        shard = Shard(args.rank, args.world_size, shard.local_rank, "--rank/--world-size")
    if args.decode_only:
        if job.decoded:
            raise ValueError("--decode-only decodes the subject's betas; with --decoded there is nothing to decode")
        sd, clip = load_models(job, pick_device(args.device, shard))
        decoded = decode(job, sd, clip, device=sd.device, progress=progress, shard=shard)
        print(f"decoded subject {job.subject}: {decoded}")
        if job.transfer is not None:
            print(transfer_sentence(decoded.params))
        return 0
    out = run(job, shard, args.device, retry_failed=args.retry_failed, progress=progress)
    mine = out["shard"]
    if mine["failed_now"] and not mine["done_now"]:
        # Every image this process tried failed: a setting or the machine, not one image. (A few failures among
        # successes exit 0: they are in the records, and a non-zero code would make torchrun stop the others.)
        print(f"rank {shard.rank}: all {mine['failed_now']} images tried failed; the records say why "
              f"(mdlib reconstruct ... --status), e.g. {job.folder}", file=sys.stderr)
        return 1
    return 0

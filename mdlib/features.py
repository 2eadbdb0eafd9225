"""MindDiffuser's decoding targets: VAE latents z, caption embeddings c, CLIP ViT-B/32 low-level features.

What is decoded from fMRI (docs/method.md), per stimulus:

- **z** (:func:`vae_latents`): the VAE latent of the stimulus at the model's image size (512 px real, 64 px
  tiny), pixels scaled to [-1, 1], posterior sample (or mean) times the VAE scaling factor:
  (n, 4, 64, 64) = 16,384 values real; (n, 4, 16, 16) tiny. Taught in lesson 03.
- **c** (:func:`caption_embeddings`): SD's CLIP text-encoder output (``last_hidden_state``) of each COCO
  caption, padded/truncated to ``n_tokens`` (15 as released, 77 as in SD), averaged over the image's captions:
  (n, n_tokens, 768) real; (n, n_tokens, 32) tiny. Token 0 (BOS) is the same for every caption
  (causal attention: it sees only itself), so decoders fit tokens 1.. (:func:`drop_bos`) and stage 1 puts the
  constant row back (:func:`restore_bos`, :func:`bos_embedding`). Taught in lesson 03.
- **structural features** (:func:`clip_lowlevel_features`): the outputs of the MLP (``c_proj``) of CLIP
  ViT-B/32's transformer blocks 1-6, (n, 50, 768) each, and its final image embedding (n, 512), read with
  forward hooks on the very model that stage 2 differentiates; tiny CLIP: (n, 50, 64) and (n, 64). The
  released code's hook names ``Linear-2, Linear-4, ..., Linear-12`` count the Linear modules that run (per
  block ``c_fc`` then ``c_proj``; attention's projection is not called as a module), so they are the
  ``c_proj`` of blocks 1-6; ``VisionTransformer-1`` is the embedding. Taught in lessons 03 and 05.

:func:`extract_targets` computes them for a subject's images in batches (on the models' device, CUDA when
they were loaded there), with progress bars, cached on disk in chunks so that an interrupted run resumes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mdlib import paths
from mdlib.cachekey import cache_key
from mdlib.models import ClipVision, SDModels, normalization_stats
from mdlib.nsd import layout
from mdlib.nsd.stimuli import StimulusReader, caption_file, load_captions, load_stim_info
from mdlib.progress import bar as progress_bar
from mdlib.record import write_json_atomic

#: Blocks whose MLP output is a structural feature (1-based; docs/method.md: blocks 1-6 of ViT-B/32's 12).
CLIP_BLOCKS = (1, 2, 3, 4, 5, 6)
#: Caption length of the released code (BOS + 13 tokens + EOS/padding); SD itself uses 77.
RELEASED_N_TOKENS = 15
#: How images are brought to a network's input size (:func:`resize_images`): torch ``interpolate`` mode and
#: antialiasing. "bicubic-aa" (the default variant's, close to PIL's bicubic that CLIP's own preprocessing
#: uses); the released code resizes generated images with "bicubic" (``antialias=False``,
#: Reconstruction.py line 71) and stimuli with torchvision's tensor ``Resize`` default of its time,
#: "bilinear" without antialiasing (Structural_feature_extraction.py line 35, torchvision 0.12). All are
#: differentiable; none clamps, so bicubic may overshoot [0, 1] slightly.
RESIZES = {"bicubic-aa": ("bicubic", True), "bicubic": ("bicubic", False), "bilinear-aa": ("bilinear", True),
           "bilinear": ("bilinear", False)}
DEFAULT_RESIZE = "bicubic-aa"
#: Target groups and the model each needs.
GROUPS = ("z", "c", "clip")
#: Bump when cached targets change meaning.
CACHE_VERSION = 1


# ----------------------------------------------------------------------------------------------- images

def to_unit_images(images: np.ndarray | torch.Tensor, device: str | torch.device | None = None) -> torch.Tensor:
    """Images as a float32 tensor (n, 3, H, W) in [0, 1].

    Accepts uint8 (n, H, W, 3) arrays or tensors (as :meth:`StimulusReader.read` returns: converted, not
    differentiable) or float tensors (n, 3, H, W) already in [0, 1] (returned as they are, autograd kept).
    """
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be an array or tensor, got {type(images).__name__}")
    if images.dtype == torch.uint8:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"uint8 images must be (n, H, W, 3), got {tuple(images.shape)}")
        images = images.permute(0, 3, 1, 2).float() / 255.0
    elif not images.is_floating_point():
        raise TypeError(f"images must be uint8 (n, H, W, 3) or float (n, 3, H, W) in [0, 1], got {images.dtype}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"float images must be (n, 3, H, W), got {tuple(images.shape)}")
    return images.to(device) if device is not None else images


def resize_images(images: torch.Tensor, size: int, mode: str = DEFAULT_RESIZE) -> torch.Tensor:
    """Differentiable resize of (n, 3, H, W) images to (n, 3, size, size), computed in float32.

    ``mode``: a key of :data:`RESIZES` (e.g. ``"bicubic-aa"``: torch ``interpolate(mode="bicubic",
    antialias=True)``; antialiasing matters when shrinking, e.g. 512 -> 224). Unchanged if already that size.
    """
    if mode not in RESIZES:
        raise ValueError(f"resize must be one of {sorted(RESIZES)}, got {mode!r}")
    if images.shape[-2:] == (size, size):
        return images
    dtype = images.dtype
    interp, antialias = RESIZES[mode]
    out = F.interpolate(images.float(), size=(int(size), int(size)), mode=interp, align_corners=False,
                        antialias=antialias)
    return out.to(dtype)


# ---------------------------------------------------------------------------------------------------- z

def latent_seed(nsd_id: int, seed: int = 0) -> int:
    """The seed of one image's posterior-sample noise: a function of (seed, nsdId) only, so a latent never
    depends on which other images share its batch."""
    return int(np.random.SeedSequence([int(seed), int(nsd_id)]).generate_state(1)[0])


def vae_latents(sd: SDModels, images: np.ndarray | torch.Tensor, posterior: str = "sample",
                seeds: Sequence[int] | None = None, grad: bool = False) -> torch.Tensor:
    """z: the scaled VAE latents of images, (n, 4, S/f, S/f) float32 on ``sd.device`` (lesson 03).

    Args:
        images: uint8 (n, H, W, 3) or float (n, 3, H, W) in [0, 1]; resized (bicubic, antialiased) to
            ``sd.image_size`` if needed (extract_targets reads them at that size with PIL already).
        posterior: ``"sample"`` (docs/method.md: the released code samples the posterior) or ``"mean"``.
        seeds: one int per image for the sample's noise (extract_targets uses :func:`latent_seed` of the
            nsdId); None: 0..n-1. The noise is drawn on the CPU, so it is the same on every device.
        grad: keep the autograd graph (default: no_grad).
    Returns ``vae.encode(2 x images - 1).latent_dist`` (mean, or mean + std x noise) times ``sd.vae_scale``.
    """
    if posterior not in ("sample", "mean"):
        raise ValueError(f"posterior must be 'sample' or 'mean', got {posterior!r}")
    x = resize_images(to_unit_images(images, sd.device), sd.image_size)
    x = (x * 2.0 - 1.0).to(device=sd.device, dtype=sd.dtype)
    with contextlib.nullcontext() if grad else torch.no_grad():
        dist = sd.vae.encode(x).latent_dist
        latent = dist.mean
        if posterior == "sample":
            seeds = list(range(len(x))) if seeds is None else [int(s) for s in seeds]
            if len(seeds) != len(x):
                raise ValueError(f"got {len(seeds)} seeds for {len(x)} images")
            noise = torch.stack([torch.randn(tuple(latent.shape[1:]), generator=torch.Generator().manual_seed(s))
                                 for s in seeds]).to(device=latent.device, dtype=latent.dtype)
            latent = latent + dist.std * noise
        return (latent * sd.vae_scale).float()


def decode_latents(sd: SDModels, z: torch.Tensor, grad: bool = False) -> torch.Tensor:
    """Images from scaled latents z (n, 4, h, w): (n, 3, S, S) float32 in [0, 1] (clamped), on ``sd.device``."""
    with contextlib.nullcontext() if grad else torch.no_grad():
        x = sd.vae.decode(z.to(device=sd.device, dtype=sd.dtype) / sd.vae_scale).sample
        return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)


def to_uint8_images(images: torch.Tensor) -> np.ndarray:
    """Images (n, 3, S, S) float in [0, 1], as :func:`decode_latents` returns them -> (n, S, S, 3) uint8
    (rounded), the layout of the stimuli and of saved PNGs."""
    return (images.detach().permute(0, 2, 3, 1).float().cpu().numpy() * 255.0 + 0.5).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------- c

def prompt_embeddings(sd: SDModels, prompts: Sequence[str], n_tokens: int = 77, batch_size: int = 64) -> torch.Tensor:
    """SD's text embeddings of prompts: (n, n_tokens, width) float32 on ``sd.device`` (width 768 real).

    Tokenized as SD does (``padding="max_length"``, truncation to ``n_tokens``, BOS first, EOS then padding
    with EOS), encoded without an attention mask (as SD v1 does), ``last_hidden_state``. The unconditional
    embedding of classifier-free guidance is ``prompt_embeddings(sd, [""])``.
    """
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not one string")
    n_tokens = _check_n_tokens(sd, n_tokens)
    out = []
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            ids = sd.tokenizer(list(prompts[start:start + batch_size]), padding="max_length", max_length=n_tokens,
                               truncation=True, return_tensors="pt").input_ids.to(sd.device)
            out.append(sd.text_encoder(ids).last_hidden_state.float())
    if not out:
        return torch.zeros((0, n_tokens, sd.text_width), device=sd.device)
    return torch.cat(out)


def _check_n_tokens(sd: SDModels, n_tokens: int) -> int:
    limit = int(sd.text_encoder.config.max_position_embeddings)
    if int(n_tokens) != n_tokens or not 2 <= n_tokens <= limit:
        raise ValueError(f"n_tokens must be an int in 2..{limit} (BOS + at least EOS), got {n_tokens!r}")
    return int(n_tokens)


def caption_embeddings(sd: SDModels, captions: Sequence[Sequence[str]], n_tokens: int = RELEASED_N_TOKENS,
                       batch_size: int = 64, n_captions: int | None = None) -> torch.Tensor:
    """c: each image's caption embeddings averaged over its captions (lesson 03).

    ``captions[i]``: the captions of image i (as :func:`mdlib.nsd.stimuli.load_captions` returns them, in
    the COCO file's order; COCO has 5-7 per image). ``n_captions``: use only the first n of each image (the
    released code averages the first 5); None: all. Returns (n_images, n_tokens, width) float32 on
    ``sd.device``: the mean over image i's captions of :func:`prompt_embeddings`. Row 0 (BOS) is the same
    for every image.
    """
    if n_captions is not None:
        if int(n_captions) != n_captions or n_captions < 1:
            raise ValueError(f"n_captions must be a positive int or None, got {n_captions!r}")
        captions = [list(c)[:int(n_captions)] for c in captions]
    counts = [len(c) for c in captions]
    if any(n == 0 for n in counts):
        raise ValueError(f"image(s) {[i for i, n in enumerate(counts) if n == 0][:10]} have no captions")
    flat = [str(text) for caps in captions for text in caps]
    emb = prompt_embeddings(sd, flat, n_tokens=n_tokens, batch_size=batch_size)
    if not counts:
        return emb
    return torch.stack([part.mean(dim=0) for part in torch.split(emb, counts)])


def bos_embedding(sd: SDModels) -> torch.Tensor:
    """The constant row 0 of every text embedding (the BOS token's output): (width,) float32.

    With causal attention token 0 sees only itself, so it does not depend on the caption or on n_tokens.
    """
    return prompt_embeddings(sd, [""], n_tokens=2)[0, 0]


def drop_bos(c: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """(n, n_tokens, width) -> (n, n_tokens - 1, width): the rows the decoders fit (tokens 1..)."""
    return c[:, 1:]


def restore_bos(c_tail: torch.Tensor | np.ndarray, bos: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """(n, n_tokens - 1, width) decoded rows + the constant BOS row (width,) -> (n, n_tokens, width) (stage 1)."""
    if isinstance(c_tail, np.ndarray):
        bos = np.asarray(bos.detach().cpu() if isinstance(bos, torch.Tensor) else bos, dtype=c_tail.dtype)
        return np.concatenate([np.broadcast_to(bos, (len(c_tail), 1, c_tail.shape[-1])), c_tail], axis=1)
    bos = torch.as_tensor(bos, dtype=c_tail.dtype, device=c_tail.device)
    return torch.cat([bos.expand(len(c_tail), 1, c_tail.shape[-1]), c_tail], dim=1)


# ------------------------------------------------------------------------------------------------- CLIP

def clip_feature_names(blocks: Sequence[int] = CLIP_BLOCKS) -> list[str]:
    """Names of the structural features: ``block1`` ... ``block6`` then ``embedding``."""
    return [f"block{int(b)}" for b in blocks] + ["embedding"]


def clip_preprocess(clip: ClipVision, images: np.ndarray | torch.Tensor, normalization: str | None = None,
                    resize: str = DEFAULT_RESIZE, clamp: bool = False) -> torch.Tensor:
    """Images -> the ViT's input: clamped to [0, 1] if ``clamp`` (the released code clamps generated images,
    which stops the gradient at saturated pixels), resized to ``clip.input_size`` (:func:`resize_images`,
    ``resize`` a key of :data:`RESIZES`) and normalised ``(x - mean) / std`` with CLIP's statistics
    (``"clip"``) or ImageNet's (``"imagenet"``); None: ``clip.normalization``. Returns (n, 3, S, S) in the
    model's dtype on its device (docs/method.md, row "CLIP input")."""
    mean, std = normalization_stats(normalization or clip.normalization)
    x = to_unit_images(images, clip.device)
    x = resize_images(x.clamp(0.0, 1.0) if clamp else x, clip.input_size, resize).float()
    mean_t = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return ((x - mean_t) / std_t).to(dtype=clip.dtype)


def clip_lowlevel_features(clip: ClipVision, images: np.ndarray | torch.Tensor, differentiable: bool = True,
                           blocks: Sequence[int] = CLIP_BLOCKS, normalization: str | None = None,
                           resize: str = DEFAULT_RESIZE, clamp: bool = False) -> dict[str, torch.Tensor]:
    """The structural features of images, differentiable with respect to them (lessons 03 and 05).

    Args:
        clip: from :func:`mdlib.models.load_clip_vision`; its parameters stay frozen.
        images: float (n, 3, H, W) in [0, 1] (any size: resized to ``clip.input_size`` inside, e.g. a
            generated 512-px image), or uint8 (n, H, W, 3).
        differentiable: keep the autograd graph so that a loss on the features back-propagates to the images
            (stage 2); False runs under no_grad (targets).
        blocks: 1-based block numbers whose MLP output (``mlp.c_proj``) is returned.
        normalization: ``"clip"`` / ``"imagenet"``; None: ``clip.normalization``. resize, clamp: how the
            images reach the ViT's input size (:func:`clip_preprocess`).

    Returns ``{"block<k>": (n, n_tokens, width), ..., "embedding": (n, embed_dim)}`` float32 ((n, 50, 768) and
    (n, 512) for ViT-B/32), batch first whatever open_clip's internal layout (older versions run the
    transformer sequence-first; the hooks' outputs are transposed back then). The hooks are registered on
    ``clip.model`` for this call only and always removed.
    """
    blocks = tuple(int(b) for b in blocks)
    bad = [b for b in blocks if not 1 <= b <= clip.n_blocks]
    if bad:
        raise ValueError(f"blocks must be in 1..{clip.n_blocks}, got {bad}")
    captured: dict[str, torch.Tensor] = {}

    def keep(name: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> None:
            captured[name] = output
        return hook

    handles = [clip.blocks[b - 1].mlp.c_proj.register_forward_hook(keep(f"block{b}")) for b in blocks]
    try:
        with torch.enable_grad() if differentiable else torch.no_grad():
            embedding = clip.visual(clip_preprocess(clip, images, normalization, resize, clamp))
    finally:
        for handle in handles:
            handle.remove()
    # open_clip >= 2.2x: transformer.batch_first (True by default); older ones had no flag and ran (L, N, D).
    seq_first = not getattr(clip.visual.transformer, "batch_first", False)
    out = {}
    for b in blocks:
        tokens = captured[f"block{b}"]
        out[f"block{b}"] = (tokens.transpose(0, 1) if seq_first else tokens).float()
    out["embedding"] = embedding.float()
    return out


# ------------------------------------------------------------------------------------------- extraction

def extract_targets(data_root: str | os.PathLike, nsd_ids: Sequence[int] | np.ndarray, sd: SDModels | None = None,
                    clip: ClipVision | None = None, *, targets: Sequence[str] | None = None,
                    cache_dir: str | os.PathLike | None = None, batch_size: int = 16, chunk_size: int = 256,
                    n_tokens: int = RELEASED_N_TOKENS, posterior: str = "sample", seed: int = 0,
                    blocks: Sequence[int] = CLIP_BLOCKS, normalization: str | None = None,
                    resize: str = DEFAULT_RESIZE, n_captions: int | None = None,
                    device: str | torch.device | None = None, progress: bool = True,
                    on_chunk: Callable[[str, int, int, bool], None] | None = None) -> dict[str, np.ndarray]:
    """The decoding targets of ``nsd_ids`` (0-based, in the order given), cached and resumable (lesson 03).

    Args:
        data_root: the NSD (or mini-NSD) root: images from ``nsd_stimuli.hdf5``, captions from COCO's files.
        sd: :class:`~mdlib.models.SDModels` for ``z`` and ``c``; clip: :class:`~mdlib.models.ClipVision` for
            ``clip``.
        targets: any of ``"z"``, ``"c"``, ``"clip"``; None: those whose model is given.
        cache_dir: None: ``<data_root>/mdlib_cache/targets``.
        batch_size: images per forward pass; chunk_size: images per cached chunk (the unit of resumption).
        n_tokens: caption length for c (15 as released, 77 as in SD). posterior, seed: for z
            (:func:`vae_latents`; the noise of image i is seeded by (seed, nsdId)). n_captions: the captions
            averaged into c (:func:`caption_embeddings`). blocks, normalization, resize: for the CLIP features
            (:func:`clip_lowlevel_features`).
        device: None: compute where the models are; else they are moved there first.
        progress: tqdm bars (one per target group). on_chunk: called as ``on_chunk(group, index, n_chunks,
            computed)`` after each chunk is ready (``computed`` False: read from the cache).

    Returns a dict of float32 arrays with one row per nsdId (read-only memory maps of the cache files):
    ``nsd_ids`` (n,) int64; ``z`` (n, 4, h, w); ``c`` (n, n_tokens, width); ``clip_block1`` ...
    ``clip_block6`` (n, n_tokens, width) and ``clip_embedding`` (n, embed_dim).

    Cache: each group's results live in ``<cache_dir>/<group>-<key>/``, ``key`` hashing the model's weights
    (:func:`mdlib.models.module_fingerprint`), its dtype, the parameters, the nsdIds and the data files'
    sizes and modification times. Chunks are written as they finish (``chunk-00000.safetensors``, ...;
    atomically), so a rerun after an interruption computes only the missing ones; the last step assembles
    one ``<name>.npy`` per array plus ``manifest.json`` and removes the chunks.
    """
    ids = np.asarray(nsd_ids).ravel()
    if ids.size == 0:
        raise ValueError("no nsdIds given")
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"nsdIds must be integers (0-based), got dtype {ids.dtype}")
    ids = ids.astype(np.int64)
    if targets is None:
        targets = (("z", "c") if sd is not None else ()) + (("clip",) if clip is not None else ())
    targets = tuple(targets)
    unknown = [t for t in targets if t not in GROUPS]
    if unknown or not targets:
        raise ValueError(f"targets must be a non-empty subset of {GROUPS}, got {targets!r}")
    if ("z" in targets or "c" in targets) and sd is None:
        raise ValueError("targets 'z' and 'c' need sd (mdlib.models.load_sd)")
    if "clip" in targets and clip is None:
        raise ValueError("target 'clip' needs clip (mdlib.models.load_clip_vision)")
    if int(batch_size) < 1 or int(chunk_size) < 1:
        raise ValueError(f"batch_size and chunk_size must be >= 1, got {batch_size}, {chunk_size}")
    if device is not None:
        for model in (sd, clip):
            if model is not None:
                model.to(device)
    if posterior not in ("sample", "mean"):
        raise ValueError(f"posterior must be 'sample' or 'mean', got {posterior!r}")
    if "c" in targets:
        n_tokens = _check_n_tokens(sd, n_tokens)
    blocks = tuple(int(b) for b in blocks)
    if "clip" in targets:
        normalization = normalization or clip.normalization
        normalization_stats(normalization)  # validates
    root = Path(data_root).expanduser()
    cache_root = Path(cache_dir).expanduser() if cache_dir is not None else paths.cache_dir(root) / "targets"

    out: dict[str, np.ndarray] = {"nsd_ids": ids.copy()}
    for group in targets:
        if group == "z":
            params = {"model": sd.fingerprint("vae"), "dtype": str(sd.dtype), "image_size": sd.image_size,
                      "vae_scale": sd.vae_scale, "posterior": posterior,
                      "seed": int(seed) if posterior == "sample" else None, "resize": "PIL bicubic"}
            compute = _z_computer(root, sd, posterior, seed, batch_size)
            data_files = layout.stimuli_sources(root) or [layout.stimuli()]
        elif group == "c":
            params = {"model": sd.fingerprint("text_encoder"), "tokenizer": sd.fingerprint("tokenizer"),
                      "dtype": str(sd.dtype), "n_tokens": n_tokens,
                      **({} if n_captions is None else {"n_captions": int(n_captions)})}
            compute = _c_computer(root, sd, n_tokens, batch_size, n_captions)
            data_files = [layout.stim_info("csv"), *_present_caption_files(root)]
        else:
            params = {"model": clip.fingerprint(), "dtype": str(clip.dtype), "input_size": clip.input_size,
                      "blocks": list(blocks), "normalization": normalization, "resize": resize}
            compute = _clip_computer(root, clip, blocks, normalization, resize, batch_size)
            data_files = layout.stimuli_sources(root) or [layout.stimuli()]
        spec = {"cache_version": CACHE_VERSION, "group": group, "params": params, "n": int(ids.size),
                "nsd_ids_sha256": cache_key(ids.tobytes(), n=None), "chunk_size": int(chunk_size),
                "data": [_file_stamp(root, rel) for rel in data_files]}
        arrays = _cached_group(cache_root, spec, ids, compute, int(chunk_size), progress, on_chunk)
        out.update(arrays)
    return out


def _present_caption_files(root: Path) -> list:
    """The caption files :func:`load_captions` reads (either place it looks), so the cache key follows them."""
    found = [caption_file(root, split) for split in ("train2017", "val2017")]
    return [rel for rel in found if rel is not None]


def _file_stamp(root: Path, rel: Any) -> list:
    path = layout.require(root, rel)
    stat = path.stat()
    return [str(rel), int(stat.st_size), int(stat.st_mtime_ns)]


def _batches(n: int, batch_size: int) -> list[slice]:
    return [slice(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]


def _z_computer(root: Path, sd: SDModels, posterior: str, seed: int, batch_size: int):
    def compute(chunk_ids: np.ndarray, bar: Any) -> dict[str, np.ndarray]:
        with StimulusReader(root) as reader:
            images = reader.read(chunk_ids, size=sd.image_size)
        parts = []
        for part in _batches(len(chunk_ids), batch_size):
            seeds = [latent_seed(i, seed) for i in chunk_ids[part]]
            parts.append(vae_latents(sd, images[part], posterior=posterior, seeds=seeds).cpu().numpy())
            bar.update(part.stop - part.start)
        return {"z": np.concatenate(parts)}

    return compute


def _c_computer(root: Path, sd: SDModels, n_tokens: int, batch_size: int, n_captions: int | None):
    info = load_stim_info(root)

    def compute(chunk_ids: np.ndarray, bar: Any) -> dict[str, np.ndarray]:
        captions = load_captions(root, chunk_ids, stim_info=info)
        parts = []
        for part in _batches(len(chunk_ids), batch_size):
            parts.append(caption_embeddings(sd, captions[part], n_tokens=n_tokens, n_captions=n_captions)
                         .cpu().numpy())
            bar.update(part.stop - part.start)
        return {"c": np.concatenate(parts)}

    return compute


def _clip_computer(root: Path, clip: ClipVision, blocks: tuple[int, ...], normalization: str, resize: str,
                   batch_size: int):
    def compute(chunk_ids: np.ndarray, bar: Any) -> dict[str, np.ndarray]:
        with StimulusReader(root) as reader:
            images = reader.read(chunk_ids)
        parts: dict[str, list[np.ndarray]] = {}
        for part in _batches(len(chunk_ids), batch_size):
            feats = clip_lowlevel_features(clip, images[part], differentiable=False, blocks=blocks,
                                           normalization=normalization, resize=resize)
            for name, value in feats.items():
                parts.setdefault(f"clip_{name}", []).append(value.cpu().numpy())
            bar.update(part.stop - part.start)
        return {name: np.concatenate(values) for name, values in parts.items()}

    return compute


def _cached_group(cache_root: Path, spec: dict[str, Any], ids: np.ndarray, compute: Callable, chunk_size: int,
                  progress: bool, on_chunk: Callable | None) -> dict[str, np.ndarray]:
    """One target group through its chunked cache: load the assembled arrays, or compute what is missing."""
    from safetensors.numpy import load_file, save_file

    folder = cache_root / f"{spec['group']}-{cache_key(spec)}"
    manifest_path = folder / "manifest.json"
    n_chunks = -(-len(ids) // chunk_size)
    manifest = _read_json(manifest_path)
    if manifest is not None and manifest.get("complete") and manifest.get("spec") == spec:
        try:
            arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r", allow_pickle=False)
                      for name in manifest["arrays"]}
            if all(len(a) == len(ids) for a in arrays.values()):
                for leftover in folder.glob("chunk-*"):  # an assembly stopped before its clean-up
                    leftover.unlink(missing_ok=True)
                for index in range(n_chunks):
                    if on_chunk is not None:
                        on_chunk(spec["group"], index, n_chunks, False)
                return arrays
        except (OSError, ValueError):
            pass  # damaged: rebuild from chunks / recompute
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / "spec.json", spec)
    bar = progress_bar(total=len(ids), desc=f"targets {spec['group']}", unit="img", progress=progress)
    names: list[str] | None = None
    try:
        for index in range(n_chunks):
            chunk_ids = ids[index * chunk_size:(index + 1) * chunk_size]
            path = folder / f"chunk-{index:05d}.safetensors"
            arrays = None
            if path.is_file():
                try:
                    arrays = load_file(str(path))
                    if not np.array_equal(arrays.pop("nsd_ids"), chunk_ids):
                        arrays = None
                except Exception:  # a damaged chunk (e.g. a disk filled up): compute it again
                    arrays = None
            computed = arrays is None
            if computed:
                arrays = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in compute(chunk_ids, bar).items()}
                tmp = path.with_name(path.name + ".tmp")
                save_file({**arrays, "nsd_ids": chunk_ids}, str(tmp))
                os.replace(tmp, path)
            else:
                bar.update(len(chunk_ids))
            names = sorted(arrays)
            if on_chunk is not None:
                on_chunk(spec["group"], index, n_chunks, computed)
    finally:
        bar.close()
    return _assemble(folder, spec, ids, names or [], n_chunks, chunk_size)


def _assemble(folder: Path, spec: dict[str, Any], ids: np.ndarray, names: list[str], n_chunks: int,
              chunk_size: int) -> dict[str, np.ndarray]:
    """Chunks -> one ``<name>.npy`` per array (written through memory maps, never all in memory), the
    manifest, then the chunks are removed. Returns read-only memory maps."""
    from safetensors import safe_open

    outputs: dict[str, np.memmap] = {}
    for index in range(n_chunks):
        with safe_open(str(folder / f"chunk-{index:05d}.safetensors"), framework="np") as f:
            for name in names:
                block = f.get_tensor(name)
                if name not in outputs:
                    outputs[name] = np.lib.format.open_memmap(folder / f"{name}.npy.tmp", mode="w+",
                                                              dtype=np.float32, shape=(len(ids), *block.shape[1:]))
                outputs[name][index * chunk_size:index * chunk_size + len(block)] = block
    for array in outputs.values():
        array.flush()
    outputs.clear()  # closes the memory maps
    for name in names:
        os.replace(folder / f"{name}.npy.tmp", folder / f"{name}.npy")
    write_json_atomic(folder / "manifest.json", {"spec": spec, "arrays": names, "complete": True,
                                                  "n": int(len(ids))})
    for index in range(n_chunks):
        (folder / f"chunk-{index:05d}.safetensors").unlink(missing_ok=True)
    return {name: np.load(folder / f"{name}.npy", mmap_mode="r", allow_pickle=False) for name in names}


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def clear_target_cache(data_root: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None) -> int:
    """Delete cached targets (``<data_root>/mdlib_cache/targets`` or ``cache_dir``); returns folders removed."""
    if cache_dir is None:
        if data_root is None:
            raise ValueError("give data_root or cache_dir")
        cache_dir = Path(data_root).expanduser() / "mdlib_cache" / "targets"
    base = Path(cache_dir).expanduser()
    removed = 0
    if base.is_dir():
        for child in base.iterdir():
            if child.is_dir() and child.name.split("-")[0] in GROUPS:
                shutil.rmtree(child)
                removed += 1
    return removed

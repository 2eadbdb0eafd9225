"""Stage 1: Stable Diffusion img2img from the fMRI-decoded (z, c) (docs/method.md; lesson 04).

The decoded latent z sets the layout and colours, the decoded caption embedding c the semantics: z is
noised to DDIM timestep 741 and denoised for 35 steps (681 ... 1) with classifier-free guidance 5.0 against
the empty prompt (:mod:`mdlib.sampler`), then the VAE decodes the result. The paper's "without z" ablation
starts from pure noise instead (``z=None``: all 50 steps).

:func:`img2img` runs it in batches with per-image seeds (an image's result never depends on its batch)
and, given ``out_dir``, saves every image as it is done (``<name>.png`` plus ``<name>.npz`` with its latent
and a hash of its inputs), so an interrupted run resumes where it stopped and a changed input is recomputed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mdlib import features
from mdlib.cachekey import cache_key, float32_bytes
from mdlib.models import SDModels
from mdlib.progress import bar as progress_bar
from mdlib.record import write_json_atomic, write_npz_atomic, write_png_atomic
from mdlib.sampler import DDIMSampler, SamplerConfig, generators

#: Bump when saved stage-1 outputs change meaning.
FORMAT_VERSION = 1


@dataclass
class Stage1Output:
    """Results of :func:`img2img`.

    Attributes:
        images: (n, S, S, 3) uint8 reconstructions (S = the model's image size: 512 real, 64 tiny).
        latents: (n, 4, h, w) float32 sampled latents, before the VAE decoder.
        seeds: (n,) int64 the noise seed of each image.
        config: the sampler configuration used.
        computed: (n,) bool: False where the image was read back from ``out_dir``.
    """

    images: np.ndarray
    latents: np.ndarray
    seeds: np.ndarray
    config: SamplerConfig
    computed: np.ndarray


def with_bos(sd: SDModels, c_tail: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Decoded c (n, n_tokens - 1, width) without token 0 -> the UNet's conditioning (n, n_tokens, width),
    float32 on ``sd.device``: the constant BOS row put back (:func:`mdlib.features.restore_bos`)."""
    c_tail = torch.as_tensor(np.asarray(c_tail) if not isinstance(c_tail, torch.Tensor) else c_tail)
    return features.restore_bos(c_tail.to(device=sd.device, dtype=torch.float32), features.bos_embedding(sd))


def unconditional(sd: SDModels, n_tokens: int) -> torch.Tensor:
    """The empty prompt's embedding, (1, n_tokens, width): classifier-free guidance's unconditional branch
    (docs/method.md; truncated to c's token count, as the two are batched together)."""
    return features.prompt_embeddings(sd, [""], n_tokens=n_tokens)


def img2img(sd: SDModels, z, c, seeds: Sequence[int], *, config: SamplerConfig | None = None,
                c_includes_bos: bool = False, batch_size: int = 8, out_dir: str | os.PathLike | None = None,
                names: Sequence[str] | None = None, progress: bool = True) -> Stage1Output:
    """Stage 1 images from (z, c) (lesson 04).

    Args:
        sd: :func:`mdlib.models.load_sd`'s models (device and dtype are theirs).
        z: (n, 4, h, w) scaled latents (decoded, or true for the ceiling), or None for the "without z"
            ablation (pure noise; then ``config`` defaults to :meth:`SamplerConfig.text_to_image`).
        c: (n, n_tokens - 1, width) decoded caption embeddings without the BOS row (as decoded by
            :func:`mdlib.decoding.decode_features`), or (n, n_tokens, width) with ``c_includes_bos``.
        seeds: one int per image (:func:`mdlib.sampler.image_seed` of its nsdId).
        config: :class:`SamplerConfig`; default: the published sampler (docs/method.md).
        batch_size: images per UNet batch (x2 with guidance).
        out_dir: save each image as it is done and reuse what is already there (resume).
        names: file names per image in ``out_dir`` (default: ``"0000"``, ``"0001"``...; use nsdIds).
        progress: a tqdm bar over images.
    Raises:
        ValueError: mismatched counts or shapes; ``out_dir`` holds images made with other models or another
            sampler configuration (the message names the folder).
    """
    c = torch.as_tensor(np.asarray(c) if not isinstance(c, torch.Tensor) else c).float()
    n = len(c)
    if c.ndim != 3 or c.shape[-1] != sd.text_width:
        raise ValueError(f"c must be (n, tokens, {sd.text_width}), got {tuple(c.shape)}")
    cond = c.to(sd.device) if c_includes_bos else with_bos(sd, c)
    if z is not None:
        z = torch.as_tensor(np.asarray(z) if not isinstance(z, torch.Tensor) else z).float()
        if len(z) != n:
            raise ValueError(f"got {len(z)} latents z for {n} embeddings c")
        if tuple(z.shape[1:]) != tuple(sd.latent_shape):
            raise ValueError(f"z must be (n, {', '.join(map(str, sd.latent_shape))}) for this model, "
                             f"got {tuple(z.shape)}")
    seeds = np.asarray([int(s) for s in seeds], dtype=np.int64)
    if len(seeds) != n:
        raise ValueError(f"got {len(seeds)} seeds for {n} images")
    config = config or (SamplerConfig.text_to_image() if z is None else SamplerConfig())
    sampler = DDIMSampler(sd.unet, sd.scheduler, config)
    uncond = unconditional(sd, cond.shape[1]) if config.guidance_scale != 1.0 else None
    names = [f"{k:04d}" for k in range(n)] if names is None else [str(x) for x in names]
    if len(names) != n or len(set(names)) != n:
        raise ValueError(f"names must be {n} distinct strings")
    folder = _open_folder(out_dir, sd, config) if out_dir is not None else None

    S = sd.image_size
    images = np.zeros((n, S, S, 3), dtype=np.uint8)
    latents = np.zeros((n, *sd.latent_shape), dtype=np.float32)
    computed = np.zeros(n, dtype=bool)
    keys = [_input_key(None if z is None else z[k], cond[k], seeds[k]) for k in range(n)]
    todo = []
    for k in range(n):
        got = _load_one(folder, names[k], keys[k]) if folder is not None else None
        if got is None:
            todo.append(k)
        else:
            images[k], latents[k] = got
    bar = progress_bar(total=n, initial=n - len(todo), desc="stage 1", unit="image", progress=progress and bool(todo))
    with torch.no_grad():
        for start in range(0, len(todo), batch_size):
            idx = todo[start:start + batch_size]
            zb = None if z is None else z[idx].to(sd.device)
            lat = sampler.sample(zb, cond[idx], uncond, generators(seeds[idx]))
            img = features.to_uint8_images(features.decode_latents(sd, lat))
            for j, k in enumerate(idx):
                images[k], latents[k], computed[k] = img[j], lat[j].float().cpu().numpy(), True
                if folder is not None:
                    _save_one(folder, names[k], keys[k], images[k], latents[k])
            bar.update(len(idx))
    bar.close()
    return Stage1Output(images=images, latents=latents, seeds=seeds, config=config, computed=computed)


# ---------------------------------------------------------------------------------------- the run folder

def run_tag(sd: SDModels, config: SamplerConfig) -> str:
    """A folder name that tells runs apart: the sampler's settings and the UNet's fingerprint, e.g.
    ``ddim50_i37_s35_g5_eta0_unet1a2b3c4d`` (so changing a parameter never collides with an earlier run)."""
    c = config
    return (f"ddim{c.num_steps}_i{c.noise_index}_s{c.denoise_steps}_g{c.guidance_scale:g}_eta{c.eta:g}"
            f"_unet{sd.fingerprint('unet')[:8]}")


def _open_folder(out_dir, sd: SDModels, config: SamplerConfig) -> Path:
    folder = Path(out_dir).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"format": "mdlib.stage1", "version": FORMAT_VERSION, "config": config.as_dict(),
            "unet": sd.fingerprint("unet"), "vae": sd.fingerprint("vae"), "dtype": str(sd.dtype).replace("torch.", "")}
    path = folder / "stage1.json"
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            old = None
        if old != meta:
            diff = sorted(k for k in meta if old is None or old.get(k) != meta[k])
            raise ValueError(f"{folder} holds stage-1 images made with other settings ({', '.join(diff)} differ; "
                             f"see {path}): use another out_dir, or delete that folder to recompute")
    else:
        write_json_atomic(path, meta)
    return folder


def _input_key(z: torch.Tensor | None, cond: torch.Tensor, seed: int) -> str:
    return cache_key(str(int(seed)), *(b"none" if t is None else float32_bytes(t) for t in (z, cond)), n=24)


def _load_one(folder: Path, name: str, key: str):
    npz, png = folder / f"{name}.npz", folder / f"{name}.png"
    if not (npz.is_file() and png.is_file()):
        return None
    from PIL import Image

    try:
        with np.load(npz) as f:
            if str(f["key"]) != key:
                return None       # the inputs changed: recompute (and overwrite)
            latent = f["latent"]
        with Image.open(png) as im:
            image = np.asarray(im.convert("RGB"))
    except (OSError, ValueError, KeyError):
        return None               # truncated by an interrupted write: recompute
    return image, latent


def _save_one(folder: Path, name: str, key: str, image: np.ndarray, latent: np.ndarray) -> None:
    # The image first, the npz (which marks the pair complete) last, each written atomically.
    write_png_atomic(folder / f"{name}.png", image)
    write_npz_atomic(folder / f"{name}.npz", latent=latent, key=np.array(key))

"""Stable Diffusion v1-4 and CLIP, real or tiny, behind one interface.

MindDiffuser needs two models (docs/method.md):

- **Stable Diffusion v1-4** (``CompVis/stable-diffusion-v1-4``): the VAE (z targets, decoding images), the
  UNet and DDIM sampler (stage 1 and 2), and its CLIP ViT-L/14 text encoder + tokenizer (c targets).
  :func:`load_sd` returns them as an :class:`SDModels`. Taught in ``notebooks/04_*.ipynb`` (lesson 04).
- **CLIP ViT-B/32** with OpenAI's weights (open_clip ``ViT-B-32-quickgelu`` / ``openai``): the structural
  features of stage 2. :func:`load_clip_vision` returns it as a :class:`ClipVision`; its differentiable
  features are in :mod:`mdlib.features` (lesson 05).

Each can come from three *sources*, read through the same code path:

- ``"tiny"``: the same classes built from small configs with seeded random weights (:func:`build_tiny_models`),
  saved once under :func:`tiny_models_dir` in the diffusers folder layout, then loaded with
  ``from_pretrained`` like the real ones. Offline, seconds on a CPU; the tests use it.
- ``"tiny-trained"``: the same tiny models trained on mini-NSD's scenes (:mod:`mdlib.train_mini`), shipped
  in the package (:func:`trained_tiny_dir`, 23 MB of safetensors): the mini path's default, so that its
  reconstructions resemble their stimuli.
- a model id (``"CompVis/stable-diffusion-v1-4"``; ``"openai"`` for CLIP): the files named in
  ``data_manifest/models.yaml`` are taken from the Hugging Face cache (downloaded first when online). Offline
  and not cached, :class:`WeightsNotFoundError` says at once which command fetches them.
- a local folder holding the same layout (a saved pipeline, an ``hf download --local-dir`` copy, a tiny set).

:func:`write_random_hub_cache` writes stand-ins for the real models (their published configurations, random
weights) into a Hugging Face cache, so that the model ids resolve offline: a rehearsal of the real path at full
size without the download (docs/reconstruct.md).

The tiny models (choices, documented once here):

- images 64 px (``image_size``, a parameter; mini-NSD stimuli are 128 px), VAE with 3 levels, i.e. a
  down-sampling factor 4 (SD: 8), 4 latent channels: latents 4 x 16 x 16 (SD: 4 x 64 x 64 at 512 px);
  ``scaling_factor`` 0.18215 as in SD (a trained tiny VAE may set its own in its config).
- UNet: 2 levels (32, 64 channels), cross-attention at both, ``cross_attention_dim`` = the text encoder's
  width (32); SD's scheduler config verbatim (DDIM is built from it, as for the real model).
- text encoder: ``CLIPTextModel`` with CLIP's real vocabulary (49,408 tokens), 77 positions, width 32,
  4 layers; tokenizer: the real CLIP BPE tokenizer, built offline from the BPE file open_clip ships
  (:func:`write_clip_tokenizer`), with SD v1-4's tokenizer config.
- CLIP: an open_clip ``CLIP`` (both towers, QuickGELU like OpenAI's): vision 56 px, patch 8, i.e. 7 x 7 + 1 =
  50 tokens like ViT-B/32 at 224 px, width 64, 8 blocks (the features use blocks 1-6, as for ViT-B/32's 12),
  embedding 64-d (ViT-B/32: 512); text tower width 16, 2 layers.
- 5.4 M parameters in all (VAE 0.95 M, UNet 1.54 M, text encoder 1.63 M, CLIP 1.22 M of which the ViT
  0.42 M), 23 MB on disk in float32, most of it the two 49,408-row token embeddings.
  docs/mini_world.md, "The tiny models", describes them and their training.

Lower layer: knows nothing of notebooks, the CLI or jobs; imports only :mod:`mdlib.paths`.
"""

from __future__ import annotations

import contextlib
import copy
import gzip
import hashlib
import json
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mdlib import paths
from mdlib.cachekey import cache_key, file_sha256
from mdlib.device import resolve_device

# ----------------------------------------------------------------------------------------------- constants

#: Version of the tiny models' recipe (bump when the configs or the seeding change): ``tiny-v<N>``.
TINY_VERSION = 1
#: Default seed and image size of the tiny models.
TINY_SEED = 0
TINY_IMAGE_SIZE = 64
#: SD v1's VAE latent scaling factor (``vae.config.scaling_factor``).
SD_VAE_SCALE = 0.18215

#: CLIP's own image normalisation (OpenAI's dataset statistics) and ImageNet's (the released code's choice).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALIZATIONS = {"clip": (CLIP_MEAN, CLIP_STD), "imagenet": (IMAGENET_MEAN, IMAGENET_STD)}

#: The trained tiny models shipped inside the package (``mdlib train-mini``'s output; docs/mini_world.md, "The tiny
#: models"): source ``"tiny-trained"``, the mini path's default. ``mdlib_weights.json`` there lists every file's
#: size and SHA-256, checked before loading.
TRAINED_TINY = "tiny-trained"
SHIPPED_TRAINED_DIR = Path(__file__).resolve().parent / "weights" / "tiny-trained"
_WEIGHTS_LIST = "mdlib_weights.json"

#: ``data_manifest/models.yaml`` beside the package (an editable install; see :func:`model_manifest`).
MANIFEST_PATH = Path(__file__).resolve().parents[1] / "data_manifest" / "models.yaml"

#: The manifest's content, used when the YAML file is not beside the package (a wheel install).
#: tests/test_models.py checks that the two agree.
DEFAULT_MANIFEST: dict[str, dict[str, Any]] = {
    "stable_diffusion": {
        "id": "CompVis/stable-diffusion-v1-4",
        "revision": "main",
        "files": [
            "model_index.json",
            "scheduler/scheduler_config.json",
            "tokenizer/vocab.json",
            "tokenizer/merges.txt",
            "tokenizer/tokenizer_config.json",
            "tokenizer/special_tokens_map.json",
            "text_encoder/config.json",
            "text_encoder/model.safetensors",
            "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors",
            "vae/config.json",
            "vae/diffusion_pytorch_model.safetensors",
        ],
    },
    "clip_text": {
        "id": "openai/clip-vit-large-patch14",
        "revision": "main",
        "files": [],
    },
    "clip_vision": {
        "id": "timm/vit_base_patch32_clip_224.openai",
        "revision": "main",
        "open_clip_name": "ViT-B-32-quickgelu",
        "open_clip_pretrained": "openai",
        "files": ["open_clip_model.safetensors"],
        "fallback_files": ["open_clip_pytorch_model.bin"],
    },
    "clip_eval": {
        "id": "timm/vit_large_patch14_clip_224.openai",
        "revision": "main",
        "open_clip_name": "ViT-L-14-quickgelu",
        "open_clip_pretrained": "openai",
        "files": ["open_clip_model.safetensors"],
        "fallback_files": ["open_clip_pytorch_model.bin"],
    },
}

# SD v1-4's published configs (CompVis/stable-diffusion-v1-4, diffusers layout), embedded so that the
# full-size architectures can be built offline anywhere (lesson 04; tests). Keys starting with "_" dropped.
SD_V1_4_CONFIGS: dict[str, dict[str, Any]] = {
    "unet": {
        "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
        "center_input_sample": False, "cross_attention_dim": 768,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                             "DownBlock2D"],
        "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
        "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
        "out_channels": 4, "sample_size": 64,
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    },
    "vae": {
        "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4,
        "layers_per_block": 2, "out_channels": 3, "sample_size": 512, "scaling_factor": 0.18215,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
    },
    "text_encoder": {
        "architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0,
        "eos_token_id": 2, "hidden_act": "quick_gelu", "hidden_size": 768, "initializer_factor": 1.0,
        "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05,
        "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 12,
        "num_hidden_layers": 12, "pad_token_id": 1, "vocab_size": 49408,
    },
    "scheduler": {
        "_class_name": "PNDMScheduler", "_diffusers_version": "0.7.0.dev0", "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
        "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
        "clip_sample": False,
    },
}
_SPECIAL = {"lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
#: SD v1-4's ``tokenizer/tokenizer_config.json`` and ``special_tokens_map.json``, verbatim.
SD_V1_4_TOKENIZER_CONFIG: dict[str, Any] = {
    "add_prefix_space": False,
    "bos_token": {"__type": "AddedToken", "content": "<|startoftext|>", **_SPECIAL},
    "do_lower_case": True,
    "eos_token": {"__type": "AddedToken", "content": "<|endoftext|>", **_SPECIAL},
    "errors": "replace",
    "model_max_length": 77,
    "name_or_path": "openai/clip-vit-large-patch14",
    "pad_token": "<|endoftext|>",
    "special_tokens_map_file": "./special_tokens_map.json",
    "tokenizer_class": "CLIPTokenizer",
    "unk_token": {"__type": "AddedToken", "content": "<|endoftext|>", **_SPECIAL},
}
SD_V1_4_SPECIAL_TOKENS_MAP: dict[str, Any] = {
    "bos_token": {"content": "<|startoftext|>", **_SPECIAL},
    "eos_token": {"content": "<|endoftext|>", **_SPECIAL},
    "pad_token": "<|endoftext|>",
    "unk_token": {"content": "<|endoftext|>", **_SPECIAL},
}
#: open_clip's ``ViT-B-32-quickgelu`` config (the OpenAI ViT-B/32).
VIT_B_32_QUICKGELU: dict[str, Any] = {
    "embed_dim": 512, "quick_gelu": True,
    "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12},
}

#: CLIP's BPE: 256 byte tokens, 256 end-of-word byte tokens, 48,894 merges, 2 special tokens.
CLIP_VOCAB_SIZE = 49408
_CLIP_N_MERGES = 49152 - 256 - 2
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"

_TINY_MARKER = "mdlib_tiny.json"
_SD_COMPONENTS = ("vae", "unet", "text_encoder", "tokenizer", "scheduler")


class WeightsNotFoundError(FileNotFoundError):
    """A model's weights are not on this machine and cannot be downloaded now (offline).

    The message names the model id and the one command that fetches it; ``.model_id`` and ``.command`` hold
    them too.
    """

    def __init__(self, message: str, model_id: str = "", command: str = "") -> None:
        super().__init__(message)
        self.model_id = model_id
        self.command = command


# ---------------------------------------------------------------------------------------------- manifest

def model_manifest(path: str | os.PathLike | None = None) -> dict[str, dict[str, Any]]:
    """The models mdlib uses, by role: ``stable_diffusion``, ``clip_text`` (reference), ``clip_vision``.

    Read from ``data_manifest/models.yaml`` (or ``path``); each entry has ``id``, ``revision`` and ``files``
    (the files fetched; the CLIP entry also its open_clip name and pretrained tag). Falls back to
    :data:`DEFAULT_MANIFEST` when the YAML file is not beside the package.
    """
    source = Path(path) if path is not None else MANIFEST_PATH
    if not source.is_file():
        if path is not None:
            raise FileNotFoundError(f"model manifest missing: {source}")
        return copy.deepcopy(DEFAULT_MANIFEST)
    import yaml

    with open(source, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    models = data.get("models", data)
    manifest = copy.deepcopy(DEFAULT_MANIFEST)
    for role, entry in models.items():
        manifest.setdefault(role, {}).update(entry or {})
    return manifest


def fetch_command(role: str = "stable_diffusion", revision: str | None = None) -> str:
    """The one shell command that downloads a model's files into the Hugging Face cache.

    ``role``: ``"stable_diffusion"`` or ``"clip_vision"`` (see :func:`model_manifest`). Uses the ``hf`` CLI of
    huggingface_hub (``hf download <id> <files...> --revision <rev>``); :func:`fetch_models` does the same
    from Python.
    """
    entry = _manifest_entry(role)
    rev = revision or entry.get("revision") or "main"
    files = " ".join(entry.get("files") or [])
    return f"hf download {entry['id']} {files} --revision {rev}".replace("  ", " ")


def fetch_models(roles: Sequence[str] = ("stable_diffusion", "clip_vision"),
                 cache_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """Download the models' files (as :func:`fetch_command` would) and return each role's local folder.

    Needs the network (not for tests). Returns ``{role: snapshot folder}``; files already cached are not
    downloaded again.
    """
    from huggingface_hub import snapshot_download

    out = {}
    for role in roles:
        entry = _manifest_entry(role)
        folder = Path(snapshot_download(entry["id"], revision=entry.get("revision") or "main",
                                        allow_patterns=list(entry.get("files") or []),
                                        cache_dir=_hub_cache_dir(cache_dir)))
        out[role] = folder
    return out


def _manifest_entry(role: str) -> dict[str, Any]:
    manifest = model_manifest()
    if role not in manifest:
        raise KeyError(f"unknown model role {role!r}; the manifest has {sorted(manifest)}")
    return manifest[role]


def _hub_cache_dir(cache_dir: str | os.PathLike | None) -> str | None:
    """The Hugging Face cache to use: ``cache_dir``, else ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else the
    library default. Read at call time (huggingface_hub reads the environment once, at import)."""
    if cache_dir not in (None, ""):
        return str(Path(cache_dir).expanduser())
    if os.environ.get("HF_HUB_CACHE"):
        return str(Path(os.environ["HF_HUB_CACHE"]).expanduser())
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]).expanduser() / "hub")
    return None


def hub_offline() -> bool:
    """True when downloads are off: ``HF_HUB_OFFLINE`` (read now) or huggingface_hub's own flag."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover
        return False


def _missing_error(model_id: str, revision: str, command: str, cache: str | None, reason: str) -> \
        WeightsNotFoundError:
    where = cache or "the default Hugging Face cache (~/.cache/huggingface/hub, or $HF_HOME/hub)"
    return WeightsNotFoundError(
        f"weights of {model_id} (revision {revision}) are not on this machine ({reason}; looked in {where}).\n"
        f"Fetch them once, online, with:\n    {command}\n"
        f"(or in Python: mdlib.models.fetch_models()); or pass a local folder holding them; or use "
        f"source='tiny' for the offline tiny models.", model_id=model_id, command=command)


def _resolve_hub_folder(role: str, revision: str | None, local_files_only: bool | None,
                        cache_dir: str | os.PathLike | None, model_id: str | None = None,
                        required: Sequence[str] | None = None) -> tuple[Path, str, str]:
    """Local snapshot folder of a manifest model (downloaded first when allowed): (folder, id, revision).

    Offline (``local_files_only`` or ``HF_HUB_OFFLINE``) this only looks in the cache and fails at once.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    entry = _manifest_entry(role)
    model_id = model_id or entry["id"]
    rev = revision or (entry.get("revision") if model_id == entry["id"] else None) or "main"
    files = list(required if required is not None else entry.get("files") or [])
    offline = hub_offline() if local_files_only is None else bool(local_files_only)
    cache = _hub_cache_dir(cache_dir)
    command = fetch_command(role, rev) if model_id == entry["id"] else \
        f"hf download {model_id} {' '.join(files)} --revision {rev}"
    try:
        folder = Path(snapshot_download(model_id, revision=rev, allow_patterns=files or None,
                                        cache_dir=cache, local_files_only=offline))
    except LocalEntryNotFoundError as err:
        reason = "offline: HF_HUB_OFFLINE / local_files_only" if offline else f"download failed: {err}"
        raise _missing_error(model_id, rev, command, cache, reason) from None
    except OSError as err:  # network errors, HTTP errors, gated repos...
        raise _missing_error(model_id, rev, command, cache, f"{type(err).__name__}: {err}") from None
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise _missing_error(model_id, rev, command, cache, f"cached snapshot {folder} lacks {missing}")
    return folder, model_id, rev


# ------------------------------------------------------------------------------------------------ device



def _resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
                 "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
        if dtype not in names:
            raise ValueError(f"dtype must be one of {sorted(names)} or a torch.dtype, got {dtype!r}")
        dtype = names[dtype]
    if dtype == torch.float16 and device.type == "cpu":
        warnings.warn("float16 on the CPU is slow and some operations lack it; float32 is advised",
                      RuntimeWarning, stacklevel=3)
    return dtype


def n_params(module: torch.nn.Module) -> int:
    """Number of parameters of a module."""
    return sum(p.numel() for p in module.parameters())


def module_fingerprint(*modules: torch.nn.Module, n_samples: int = 4096) -> str:
    """A short hash identifying modules' weights (names, shapes, dtypes and values), cheap even for SD.

    Each tensor contributes its name, shape, dtype and up to ``n_samples`` evenly strided values (all of
    them for small tensors), copied to the CPU exactly: the same weights give the same fingerprint on any
    device; different weights (another checkpoint, a fine-tune, another seed) give another. Used to key
    cached targets (:mod:`mdlib.features`).
    """
    parts = []
    for module in modules:
        for name, tensor in sorted(module.state_dict().items()):
            parts.append(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|")
            if tensor.is_meta:
                continue
            flat = tensor.detach().reshape(-1)
            step = max(1, flat.numel() // n_samples)
            sample = flat[::step][:n_samples].to("cpu")
            if sample.dtype == torch.bfloat16:
                sample = sample.float()
            parts.append(sample.contiguous().numpy().tobytes())
    return cache_key(*parts)


# ------------------------------------------------------------------------------------------------ tokenizer

def clip_bpe_path() -> Path:
    """open_clip's copy of OpenAI's CLIP BPE file (``bpe_simple_vocab_16e6.txt.gz``)."""
    from open_clip.tokenizer import default_bpe

    return Path(default_bpe())


def clip_vocab_and_merges(bpe_path: str | os.PathLike | None = None) -> tuple[list[str], list[tuple[str, str]]]:
    """CLIP's 49,408-token vocabulary (in id order) and its 48,894 BPE merges, as OpenAI's tokenizer builds
    them: the 256 byte characters, the same with ``</w>``, one token per merge, then BOS and EOS."""
    from open_clip.tokenizer import bytes_to_unicode

    path = Path(bpe_path) if bpe_path is not None else clip_bpe_path()
    with gzip.open(path) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:_CLIP_N_MERGES + 1]]
    if len(merges) != _CLIP_N_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{path}: not CLIP's BPE file (expected {_CLIP_N_MERGES} merges)")
    byte_tokens = list(bytes_to_unicode().values())
    vocab = byte_tokens + [t + "</w>" for t in byte_tokens] + ["".join(m) for m in merges] + [CLIP_BOS, CLIP_EOS]
    if len(vocab) != CLIP_VOCAB_SIZE or len(set(vocab)) != CLIP_VOCAB_SIZE:
        raise ValueError(f"{path}: built {len(vocab)} tokens ({len(set(vocab))} distinct), not {CLIP_VOCAB_SIZE}")
    return vocab, merges  # type: ignore[return-value]


def write_clip_tokenizer(folder: str | os.PathLike, bpe_path: str | os.PathLike | None = None) -> Path:
    """Write SD v1-4's tokenizer folder offline: ``vocab.json`` + ``merges.txt`` built from CLIP's BPE file
    (as Hugging Face's ``openai/clip-vit-*`` tokenizers hold them) and SD's tokenizer config.

    Load it with ``CLIPTokenizer.from_pretrained(folder, model_max_length=77)`` (under transformers 5, giving
    ``vocab_file=`` to the constructor silently yields a useless tokenizer). Returns the folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges(bpe_path)
    _write_json(folder / "vocab.json", {token: i for i, token in enumerate(vocab)}, indent=None)
    with open(folder / "merges.txt", "w", encoding="utf-8", newline="\n") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    _write_json(folder / "tokenizer_config.json", SD_V1_4_TOKENIZER_CONFIG)
    _write_json(folder / "special_tokens_map.json", SD_V1_4_SPECIAL_TOKENS_MAP)
    return folder


def _write_json(path: Path, data: Any, indent: int | None = 2) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        json.dump(data, f, indent=indent, ensure_ascii=False, sort_keys=indent is not None)
        f.write("\n")


# ----------------------------------------------------------------------------------------------- tiny models

def tiny_configs(image_size: int = TINY_IMAGE_SIZE) -> dict[str, dict[str, Any]]:
    """The tiny models' configs: ``vae``, ``unet`` (diffusers ``from_config`` dicts), ``text_encoder``
    (``CLIPTextConfig`` kwargs), ``clip`` (open_clip ``model_cfg``) and ``scheduler`` (SD v1-4's).

    ``image_size``: SD image side in pixels, a multiple of 8 (VAE factor 4 x the UNet's one down-sampling);
    latents are 4 x image_size/4 x image_size/4.
    """
    if int(image_size) != image_size or image_size < 16 or image_size % 8:
        raise ValueError(f"image_size must be a multiple of 8 pixels, >= 16, got {image_size!r}")
    image_size = int(image_size)
    text_width = 32
    return {
        "vae": {
            "in_channels": 3, "out_channels": 3, "latent_channels": 4, "act_fn": "silu",
            "down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3,
            "block_out_channels": [32, 64, 64], "layers_per_block": 1, "norm_num_groups": 32,
            "sample_size": image_size, "scaling_factor": SD_VAE_SCALE,
        },
        "unet": {
            "sample_size": image_size // 4, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
            "block_out_channels": [32, 64], "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"], "cross_attention_dim": text_width,
            "attention_head_dim": 8, "norm_num_groups": 32, "act_fn": "silu", "flip_sin_to_cos": True,
            "freq_shift": 0,
        },
        "text_encoder": {
            "vocab_size": CLIP_VOCAB_SIZE, "max_position_embeddings": 77, "hidden_size": text_width,
            "intermediate_size": 4 * text_width, "num_hidden_layers": 4, "num_attention_heads": 4,
            "hidden_act": "quick_gelu", "layer_norm_eps": 1e-05, "bos_token_id": 0, "eos_token_id": 2,
            "pad_token_id": 1,
        },
        "clip": {
            "embed_dim": 64, "quick_gelu": True,
            "vision_cfg": {"image_size": 56, "patch_size": 8, "width": 64, "layers": 8, "head_width": 16},
            "text_cfg": {"context_length": 77, "vocab_size": CLIP_VOCAB_SIZE, "width": 16, "heads": 2,
                         "layers": 2},
        },
        "scheduler": copy.deepcopy(SD_V1_4_CONFIGS["scheduler"]),
    }


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' per-file progress bars ("Loading weights", "Writing model shards") off inside."""
    from transformers.utils import logging as tf_logging

    was_on = tf_logging.is_progress_bar_enabled()
    if was_on:
        tf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            tf_logging.enable_progress_bar()


@contextlib.contextmanager
def _seeded(seed: int):
    """torch's global RNG seeded inside, restored after (the caller's random stream is left alone)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        yield


def make_tiny_components(seed: int = TINY_SEED, image_size: int = TINY_IMAGE_SIZE) -> dict[str, Any]:
    """The tiny models in memory, with seeded random weights: ``vae`` (AutoencoderKL), ``unet``
    (UNet2DConditionModel), ``text_encoder`` (CLIPTextModel), ``clip`` (open_clip CLIP), ``scheduler``
    (DDIMScheduler from SD v1-4's config). Each is built after ``torch.manual_seed(seed)``: same seed, same
    weights. (:func:`build_tiny_models` saves them; the tokenizer needs files, so it is built there.)
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from open_clip.model import CLIP
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = tiny_configs(image_size)
    out: dict[str, Any] = {}
    with _seeded(seed):
        out["vae"] = AutoencoderKL.from_config(cfg["vae"])
    with _seeded(seed):
        out["unet"] = UNet2DConditionModel.from_config(cfg["unet"])
    with _seeded(seed):
        out["text_encoder"] = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))
    with _seeded(seed):
        out["clip"] = CLIP(**copy.deepcopy(cfg["clip"]))
    out["scheduler"] = DDIMScheduler.from_config(cfg["scheduler"])
    for name in ("vae", "unet", "text_encoder", "clip"):
        out[name].eval()
    return out


def build_tiny_models(folder: str | os.PathLike, seed: int = TINY_SEED, image_size: int = TINY_IMAGE_SIZE,
                      overwrite: bool = False) -> Path:
    """Build the tiny models (:func:`make_tiny_components`) and save them to ``folder``; returns the folder.

    Layout (diffusers' ``StableDiffusionPipeline`` folder, plus open_clip's local-dir layout under ``clip/``)::

        model_index.json  scheduler/  tokenizer/  text_encoder/  unet/  vae/    (safetensors + JSON configs)
        clip/open_clip_config.json  clip/open_clip_model.safetensors
        mdlib_tiny.json   recipe version, seed, image size, parameter counts (written last)

    Deterministic: the same seed and size give identical weights. An existing complete build with the same
    recipe is kept as is (unless ``overwrite``); the folder is written beside and renamed into place, so a
    reader never sees half a build. Takes about a second on a CPU.
    """
    folder = Path(folder).expanduser()
    recipe = {"version": TINY_VERSION, "seed": int(seed), "image_size": int(image_size)}
    marker = _read_marker(folder)
    if marker is not None and not overwrite and all(marker.get(k) == v for k, v in recipe.items()):
        return folder
    if folder.exists() and any(folder.iterdir()) and not overwrite and marker is None:
        raise FileExistsError(f"{folder} exists and is not a tiny-model folder; choose another folder or "
                              f"pass overwrite=True")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        _save_tiny(tmp, seed=int(seed), image_size=int(image_size), recipe=recipe)
        _chmod_like_umask(tmp)  # mkdtemp makes a private (0700) folder
        if folder.exists():
            if not overwrite and _read_marker(folder) == _read_marker(tmp):
                return folder  # another process finished the same build first
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _save_tiny(folder: Path, seed: int, image_size: int, recipe: dict[str, Any]) -> None:
    save_tiny_components(folder, make_tiny_components(seed=seed, image_size=image_size), recipe,
                         note="mdlib tiny models: seeded random weights (mdlib.models)")


def save_tiny_components(folder: str | os.PathLike, parts: dict[str, Any], recipe: dict[str, Any],
                         note: str) -> Path:
    """Save :func:`make_tiny_components`' parts (random or trained) in the tiny-model layout of
    :func:`build_tiny_models`, the marker ``mdlib_tiny.json`` (``recipe`` + sizes + ``note``) written last."""
    import diffusers
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    image_size = int(recipe["image_size"])
    parts["vae"].save_pretrained(folder / "vae", safe_serialization=True)
    parts["unet"].save_pretrained(folder / "unet", safe_serialization=True)
    with _quiet_transformers():
        parts["text_encoder"].save_pretrained(folder / "text_encoder", safe_serialization=True)
    write_clip_tokenizer(folder / "tokenizer")
    (folder / "scheduler").mkdir()
    _write_json(folder / "scheduler" / "scheduler_config.json", SD_V1_4_CONFIGS["scheduler"])
    _write_json(folder / "model_index.json", _sd_model_index(diffusers.__version__))
    clip_dir = folder / "clip"
    clip_dir.mkdir()
    clip_cfg = tiny_configs(image_size)["clip"]
    _write_json(clip_dir / "open_clip_config.json", {
        "model_cfg": clip_cfg,
        "preprocess_cfg": {"size": clip_cfg["vision_cfg"]["image_size"], "mean": list(CLIP_MEAN),
                           "std": list(CLIP_STD), "interpolation": "bicubic", "resize_mode": "shortest"},
    })
    state = {k: v.detach().contiguous() for k, v in parts["clip"].state_dict().items()}
    save_file(state, str(clip_dir / "open_clip_model.safetensors"), metadata={"format": "pt"})
    sizes = {name: n_params(parts[name]) for name in ("vae", "unet", "text_encoder", "clip")}
    sizes["clip_vision"] = n_params(parts["clip"].visual)
    n_bytes = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    _write_json(folder / _TINY_MARKER, {**recipe, "n_params": sizes, "bytes": n_bytes, "note": note})
    return folder


def _sd_model_index(diffusers_version: str) -> dict[str, Any]:
    """A ``StableDiffusionPipeline`` folder's ``model_index.json`` (no safety checker, as mdlib loads it)."""
    return {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers_version,
        "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False,
        "safety_checker": [None, None], "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
    }


def _chmod_like_umask(folder: Path) -> None:
    mask = os.umask(0)
    os.umask(mask)
    for path in [folder, *folder.rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def _read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        with open(folder / _TINY_MARKER, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def tiny_models_dir(create: bool = True, seed: int = TINY_SEED, image_size: int = TINY_IMAGE_SIZE) -> Path:
    """``<mdlib home>/models/tiny-v<TINY_VERSION>`` (:func:`mdlib.paths.home`), built on first use when
    ``create`` (deterministic, about a second). Non-default seeds or sizes get their own sub-name."""
    name = f"tiny-v{TINY_VERSION}"
    if (int(seed), int(image_size)) != (TINY_SEED, TINY_IMAGE_SIZE):
        name += f"-seed{int(seed)}-{int(image_size)}px"
    folder = paths.home() / "models" / name
    if create:
        build_tiny_models(folder, seed=seed, image_size=image_size)
    return folder


def write_weights_list(folder: str | os.PathLike) -> Path:
    """Record every file of a model folder (relative path -> bytes, SHA-256) in ``mdlib_weights.json``, which
    :func:`verify_weights_list` checks. Used when the trained tiny models are committed."""
    folder = Path(folder)
    files = {p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != _WEIGHTS_LIST}
    _write_json(folder / _WEIGHTS_LIST, {"files": files})
    return folder / _WEIGHTS_LIST


def verify_weights_list(folder: str | os.PathLike) -> Path:
    """Check a folder against its ``mdlib_weights.json``: every file present, with its size and SHA-256.

    Raises:
        FileNotFoundError / ValueError: naming the missing, truncated or altered file and how to restore it.
    """
    folder = Path(folder)
    fix = ("restore it with `git checkout -- mdlib/weights` (a clone without those files: fetch them with "
           "git), or retrain with `mdlib train-mini` and load the result by its folder")
    try:
        listed = json.loads((folder / _WEIGHTS_LIST).read_text())["files"]
    except (OSError, ValueError, KeyError) as err:
        raise FileNotFoundError(f"{folder / _WEIGHTS_LIST}: the list of the trained tiny models' files is "
                                f"missing or unreadable ({err}); {fix}") from err
    for name, want in listed.items():
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing from the trained tiny models; {fix}")
        size = path.stat().st_size
        if size != want["bytes"]:
            raise ValueError(f"{path}: {size} bytes, expected {want['bytes']} (truncated or replaced); {fix}")
        if file_sha256(path) != want["sha256"]:
            raise ValueError(f"{path}: SHA-256 differs from {_WEIGHTS_LIST} (altered file); {fix}")
    return folder


_VERIFIED: set[tuple[str, float]] = set()


def trained_tiny_dir(folder: str | os.PathLike | None = None) -> Path:
    """The trained tiny models shipped with mdlib (``mdlib/weights/tiny-trained``), verified against their
    ``mdlib_weights.json`` (once per process and modification time). ``folder`` overrides the location."""
    folder = Path(folder) if folder is not None else SHIPPED_TRAINED_DIR
    key = (str(folder), (folder / _WEIGHTS_LIST).stat().st_mtime if (folder / _WEIGHTS_LIST).exists() else 0.0)
    if key not in _VERIFIED:
        verify_weights_list(folder)
        _VERIFIED.add(key)
    return folder


# ----------------------------------------------------------------------------------------- Stable Diffusion

@dataclass(repr=False)
class SDModels:
    """Stable Diffusion's parts, frozen (``eval()``, ``requires_grad_(False)``) on one device and dtype.

    Attributes:
        vae: diffusers ``AutoencoderKL``: images (n, 3, S, S) in [-1, 1] <-> latents (n, 4, S/f, S/f).
        unet: diffusers ``UNet2DConditionModel``: noise prediction from (latents, timestep, text embeddings).
        text_encoder: transformers ``CLIPTextModel`` (SD v1: CLIP ViT-L/14's, width 768; tiny: 32).
        tokenizer: transformers ``CLIPTokenizer`` (CLIP BPE, 49,408 tokens, ``model_max_length`` 77).
        scheduler: diffusers ``DDIMScheduler`` built from SD v1-4's scheduler config (docs/method.md).
        image_size: image side in pixels (512 real; 64 tiny).
        latent_shape: (channels, height, width) of one latent (4, 64, 64 real; 4, 16, 16 tiny).
        vae_scale: latent scaling factor, ``vae.config.scaling_factor`` (0.18215 for SD v1).
        device, dtype: where and in which precision the parts live.
        source: what was asked for ("tiny", a model id or a folder); folder: the folder read;
        revision: the hub revision (None for folders).
    Taught in lesson 04.
    """

    vae: Any
    unet: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    image_size: int
    latent_shape: tuple[int, int, int]
    vae_scale: float
    device: torch.device
    dtype: torch.dtype
    source: str = ""
    folder: Path | None = None
    revision: str | None = None
    _fingerprints: dict[str, str] = field(default_factory=dict)

    @property
    def text_width(self) -> int:
        """Width of the text embeddings (768 real; 32 tiny)."""
        return int(self.text_encoder.config.hidden_size)

    @property
    def vae_factor(self) -> int:
        """Pixels per latent position along each side (8 real; 4 tiny)."""
        return self.image_size // self.latent_shape[1]

    def fingerprint(self, part: str) -> str:
        """:func:`module_fingerprint` of one part (``vae``, ``unet``, ``text_encoder``), computed once; for
        ``tokenizer``: a hash of its vocabulary size and the ids of a probe sentence."""
        if part not in self._fingerprints:
            if part == "tokenizer":
                probe = self.tokenizer("a photo of a cat, 2 dogs & café!").input_ids
                text = f"{len(self.tokenizer)}|{self.tokenizer.model_max_length}|{list(probe)}"
                self._fingerprints[part] = cache_key(text)
            else:
                self._fingerprints[part] = module_fingerprint(getattr(self, part))
        return self._fingerprints[part]

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> SDModels:
        """Move the parts (in place) and return self."""
        device = resolve_device(device) if device is not None else self.device
        dtype = dtype or self.dtype
        for name in ("vae", "unet", "text_encoder"):
            getattr(self, name).to(device=device, dtype=dtype)
        if dtype != self.dtype:
            self._fingerprints.clear()
        self.device, self.dtype = device, dtype
        return self

    def __repr__(self) -> str:
        sizes = ", ".join(f"{n}={n_params(getattr(self, n)) / 1e6:.1f}M" for n in ("unet", "vae", "text_encoder"))
        return (f"SDModels(source={self.source!r}, image_size={self.image_size}, latent_shape={self.latent_shape}, "
                f"vae_scale={self.vae_scale:.6g}, text_width={self.text_width}, device={self.device}, "
                f"dtype={self.dtype}, {sizes})")


def load_sd(source: str | os.PathLike = "tiny", device: str | torch.device | None = None,
            dtype: torch.dtype | str | None = None, revision: str | None = None, *,
            local_files_only: bool | None = None, cache_dir: str | os.PathLike | None = None,
            attention: str = "sdpa", image_size: int | None = None) -> SDModels:
    """Stable Diffusion's VAE, UNet, text encoder, tokenizer and DDIM scheduler (lesson 04).

    Args:
        source: ``"tiny"`` (built under :func:`tiny_models_dir` on first use), ``"tiny-trained"`` (shipped,
            :func:`trained_tiny_dir`), a folder in the diffusers layout, or a hub model id
            (``"CompVis/stable-diffusion-v1-4"``; its files per ``data_manifest/models.yaml``, taken from the
            Hugging Face cache, downloaded first when online).
        device: None: CUDA if available, else the CPU.
        dtype: None: float32 (stage 2 of the released code runs in fp32); ``torch.float16`` halves memory on
            CUDA.
        revision: hub revision (branch, tag or commit); None: the manifest's.
        local_files_only: never download; None: follow ``HF_HUB_OFFLINE``.
        cache_dir: the Hugging Face cache; None: ``$HF_HUB_CACHE``, ``$HF_HOME/hub`` or the default.
        attention: ``"sdpa"`` (PyTorch's scaled-dot-product attention, memory-efficient and the diffusers
            default) or ``"xformers"`` (needs the xformers package and CUDA).
        image_size: sample images of this side in pixels instead of the model's own (512 for SD v1-4): the
            UNet is convolutional and runs at any multiple of its down-sampling, so ``latent_shape`` becomes
            (4, image_size / 8, image_size / 8). For rehearsals and previews (``mdlib reconstruct
            --image-size``); SD v1-4 was trained at 512 px, and the published results are at that size.

    Raises:
        WeightsNotFoundError: the weights are not cached and cannot be downloaded now (offline); the message
            names the id and the ``hf download`` command that fetches them. Raised at once, never hangs.
        ValueError: an ``image_size`` the model cannot sample (the message gives the multiple it needs).
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    device = resolve_device(device)
    dtype = _resolve_dtype(dtype, device)
    if attention not in ("sdpa", "xformers"):
        raise ValueError(f"attention must be 'sdpa' or 'xformers', got {attention!r}")
    label = str(source)
    rev = None
    if label == "tiny":
        folder = tiny_models_dir()
    elif label == TRAINED_TINY:
        folder = trained_tiny_dir()
    elif Path(source).expanduser().is_dir():
        folder = Path(source).expanduser()
    elif _looks_like_path(label):
        raise FileNotFoundError(f"model folder not found: {label}")
    else:
        folder, _, rev = _resolve_hub_folder("stable_diffusion", revision, local_files_only, cache_dir,
                                             model_id=label)
    missing = [c for c in ("vae", "unet", "text_encoder", "tokenizer", "scheduler") if not (folder / c).is_dir()]
    if missing:
        raise FileNotFoundError(f"{folder} is not a Stable Diffusion folder: missing {missing} (expected the "
                                f"diffusers layout: {', '.join(_SD_COMPONENTS)})")
    kw = {"dtype": dtype, "local_files_only": True}
    vae = AutoencoderKL.from_pretrained(folder / "vae", **kw)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", **kw)
    with _quiet_transformers():
        text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", **kw)
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer", model_max_length=77, local_files_only=True)
    scheduler = DDIMScheduler.from_config(DDIMScheduler.load_config(folder / "scheduler"))
    for module in (vae, unet, text_encoder):
        module.to(device).eval().requires_grad_(False)
    if attention == "xformers":
        try:
            unet.enable_xformers_memory_efficient_attention()
            vae.enable_xformers_memory_efficient_attention()
        except Exception as err:  # ModuleNotFoundError, or no CUDA
            raise RuntimeError(f"attention='xformers' needs the xformers package and a CUDA device "
                               f"({type(err).__name__}: {err}); use attention='sdpa'") from err
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    latent = int(unet.config.sample_size)
    if image_size is not None and int(image_size) != latent * factor:
        # the UNet halves the latent side at each of its down-sampling blocks but the last
        step = factor * 2 ** (len(unet.config.block_out_channels) - 1)
        if int(image_size) != image_size or image_size < step or image_size % step:
            raise ValueError(f"image_size must be a positive multiple of {step} pixels for {label} (its VAE "
                             f"divides by {factor}, its UNet by {step // factor}), got {image_size!r}")
        latent = int(image_size) // factor
        unet.register_to_config(sample_size=latent)   # the sampler reads the latent side from the config
    return SDModels(vae=vae, unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
                    image_size=latent * factor, latent_shape=(int(unet.config.in_channels), latent, latent),
                    vae_scale=float(vae.config.scaling_factor), device=device, dtype=dtype, source=label,
                    folder=folder, revision=rev)


def _looks_like_path(text: str) -> bool:
    """A hub id is ``owner/name``; anything with more parts, a leading dot, tilde or slash is a path."""
    return text.startswith((".", "~", "/", "\\")) or text.count("/") != 1 or os.sep in text.replace("/", "")


def sd_v1_4_architecture(device: str | torch.device = "meta", parts: Sequence[str] = ("vae", "unet",
                         "text_encoder")) -> dict[str, torch.nn.Module]:
    """SD v1-4's full-size VAE, UNet and text encoder built from the published configs, without weights.

    ``device="meta"`` (default) allocates nothing: parameter counts and output shapes (a meta forward pass)
    in well under a second. On a real device the weights are random (building all three takes ~13 s and
    5.3 GB on a CPU). Lesson 04 uses it to show the model's sizes before any download.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    builders = {
        "vae": lambda: AutoencoderKL.from_config(SD_V1_4_CONFIGS["vae"]),
        "unet": lambda: UNet2DConditionModel.from_config(SD_V1_4_CONFIGS["unet"]),
        "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**SD_V1_4_CONFIGS["text_encoder"])),
    }
    unknown = [p for p in parts if p not in builders]
    if unknown:
        raise ValueError(f"unknown parts {unknown}; choose from {sorted(builders)}")
    out = {}
    with torch.device(device):
        for part in parts:
            out[part] = builders[part]().eval()
    return out


# ------------------------------------------------------------------------------ random stand-ins in the hub cache

#: Uniform numbers in the pool the random stand-ins' weights are cut from (:func:`write_random_hub_cache`).
_POOL_SIZE = 2 ** 24
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64"}


def write_random_hub_cache(cache_dir: str | os.PathLike, roles: Sequence[str] = ("stable_diffusion", "clip_vision"),
                           seed: int = 0) -> dict[str, Path]:
    """The real path's models as stand-ins with random weights, written into a Hugging Face cache offline.

    Each role of :func:`model_manifest` (``stable_diffusion``: SD v1-4; ``clip_vision``: CLIP ViT-B/32 with
    QuickGELU; ``clip_eval``: ViT-L/14) is built from its published configuration (:data:`SD_V1_4_CONFIGS`, SD
    v1-4's tokenizer from CLIP's BPE file, open_clip's registry) with seeded random weights, and every file the
    manifest lists is written as a download lays it out::

        <cache_dir>/models--<owner>--<name>/refs/<revision>            the commit (a made-up hash of the seed,
                                                                       or the manifest's, if it pins one)
        <cache_dir>/models--<owner>--<name>/snapshots/<commit>/<file>   relative symlinks to the blobs
        <cache_dir>/models--<owner>--<name>/blobs/<id>                   sha256 (weights) or git blob id

    so that :func:`load_sd` and :func:`load_clip_vision` resolve the real ids with ``HF_HUB_OFFLINE=1``
    (``HF_HUB_CACHE`` or ``cache_dir`` pointing here) exactly as they do after ``mdlib fetch --models``: a
    rehearsal of the real path at full size without the download (docs/reconstruct.md, "A rehearsal without
    the downloads"). The images it makes are noise; its shapes, memory and time are the real models'.

    Weights: float32 safetensors written tensor by tensor (memory: one tensor at a time; disk: 4.3 GB for SD,
    0.6 GB for ViT-B/32). Linear and convolution weights and biases are uniform in +-1/sqrt(fan_in) (PyTorch's
    default initialisation), normalisation layers 1 and 0, the other parameters of scale 0.02. The values are
    cut at random offsets from one seeded pool of 2^24 uniform numbers: a billion separate draws would cost
    most of the time, and the stand-ins need no more randomness than that. Same seed, same bytes.

    Returns ``{role: snapshot folder}``. An existing snapshot of the same commit is replaced.
    """
    cache = Path(cache_dir).expanduser()
    out = {}
    for role in roles:
        entry = _manifest_entry(role)
        rev = str(entry.get("revision") or "main")
        pinned = len(rev) == 40 and all(ch in "0123456789abcdef" for ch in rev)
        commit = rev if pinned else cache_key(f"mdlib random stand-in|{entry['id']}|{int(seed)}", n=40)
        repo = cache / ("models--" + entry["id"].replace("/", "--"))
        snapshot = repo / "snapshots" / commit
        if snapshot.exists():
            shutil.rmtree(snapshot)
        (repo / "blobs").mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".mdlib-stand-in-", dir=repo))
        try:
            written = _write_stand_in_files(role, entry, staging, int(seed))
            missing = [f for f in entry.get("files") or [] if f not in written]
            if missing:
                raise ValueError(f"the manifest's {role} entry lists {missing}, which write_random_hub_cache "
                                 f"does not make (it writes {sorted(written)})")
            for rel, blob_id in written.items():
                blob = repo / "blobs" / blob_id
                os.replace(staging / rel, blob)
                link = snapshot / rel
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(os.path.relpath(blob, link.parent))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if not pinned:
            (repo / "refs").mkdir(exist_ok=True)
            (repo / "refs" / rev).write_text(commit)
        out[role] = snapshot
    return out


def hub_commit(folder: str | os.PathLike | None) -> str | None:
    """The commit of a Hugging Face cache snapshot (``.../snapshots/<commit>``, or a file in one), else None."""
    if folder is None:
        return None
    path = Path(folder)
    for part in (path, *path.parents):
        if part.parent.name == "snapshots" and part.parent.parent.name.startswith("models--"):
            return part.name
    return None


def _write_stand_in_files(role: str, entry: dict[str, Any], folder: Path, seed: int) -> dict[str, str]:
    """Write one role's files under ``folder`` (paths as in the hub repository); returns {path: blob id}."""
    gen = torch.Generator().manual_seed(int.from_bytes(bytes.fromhex(cache_key(f"{seed}|{role}", n=16)), "little"))
    pool = torch.rand(_POOL_SIZE, generator=gen) * 2.0 - 1.0
    ids: dict[str, str] = {}

    def weights(rel: str, module: torch.nn.Module) -> None:
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        ids[rel] = _write_random_safetensors(folder / rel, module, pool, gen)

    def text(rel: str, data: Any) -> None:
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        if not isinstance(data, str):
            data = json.dumps(data, indent=2, sort_keys=True) + "\n"
        (folder / rel).write_text(data, encoding="utf-8")

    if role == "stable_diffusion":
        import diffusers
        import transformers

        # the configs as published (only the keys the repository's files hold; the loaders fill in the rest)
        parts = sd_v1_4_architecture("meta")
        text("model_index.json", _sd_model_index(diffusers.__version__))
        text("scheduler/scheduler_config.json", SD_V1_4_CONFIGS["scheduler"])
        write_clip_tokenizer(folder / "tokenizer")
        for name in ("unet", "vae"):
            text(f"{name}/config.json", {"_class_name": type(parts[name]).__name__,
                                         "_diffusers_version": diffusers.__version__, **SD_V1_4_CONFIGS[name]})
            weights(f"{name}/diffusion_pytorch_model.safetensors", parts[name])
        text("text_encoder/config.json", {"_name_or_path": "openai/clip-vit-large-patch14",
                                          **SD_V1_4_CONFIGS["text_encoder"], "torch_dtype": "float32",
                                          "transformers_version": transformers.__version__})
        weights("text_encoder/model.safetensors", parts["text_encoder"])
    elif entry.get("open_clip_name"):
        import open_clip
        from open_clip.model import CLIP

        cfg = open_clip.get_model_config(entry["open_clip_name"])
        if cfg is None:
            raise ValueError(f"open_clip has no model {entry['open_clip_name']!r} (manifest role {role})")
        with torch.device("meta"):
            model = CLIP(**copy.deepcopy(cfg))
        weights((entry.get("files") or ["open_clip_model.safetensors"])[0], model)
    else:
        raise ValueError(f"write_random_hub_cache cannot make the {role!r} role's files")
    for path in folder.rglob("*"):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and rel not in ids:
            data = path.read_bytes()   # small files live in git, named by their git blob id
            ids[rel] = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    return ids


def _random_fill(owner: torch.nn.Module, local: str, like: torch.Tensor, pool: torch.Tensor, gen: torch.Generator,
                 buffer: torch.Tensor) -> torch.Tensor:
    """One tensor of a random stand-in (rules in :func:`write_random_hub_cache`), float32 (written into the
    front of ``buffer``, reused from tensor to tensor) or, for index buffers, its own integer dtype."""
    shape = tuple(like.shape)
    n = like.numel()
    if not like.dtype.is_floating_point:          # index buffers (position ids): 0, 1, 2, ... along the last axis
        return torch.arange(shape[-1], dtype=like.dtype).expand(shape).contiguous()
    out = buffer[:n]
    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.BatchNorm2d)
    if isinstance(owner, norms):
        return out.fill_(1.0 if local == "weight" else 0.0).view(shape)
    if local == "logit_scale":                      # CLIP's temperature, as initialised: log(1 / 0.07)
        return out.fill_(math.log(1 / 0.07)).view(shape)
    if isinstance(owner, (torch.nn.Linear, torch.nn.Conv2d)):
        bound = 1.0 / math.sqrt(max(1, owner.weight[0].numel()))
    elif local.endswith("bias"):
        return out.zero_().view(shape)
    else:                                           # embeddings, positions, projections: std 0.02
        bound = 0.02 * math.sqrt(3.0)
    start, done = int(torch.randint(_POOL_SIZE, (1,), generator=gen)), 0
    while done < n:                                 # the pool, from a random offset, wrapping around
        take = min(_POOL_SIZE - start, n - done)
        torch.mul(pool[start:start + take], bound, out=out[done:done + take])
        done, start = done + take, 0
    return out.view(shape)


def _write_random_safetensors(path: Path, module: torch.nn.Module, pool: torch.Tensor,
                              gen: torch.Generator) -> str:
    """A module's state dict (built on the meta device) as a safetensors file of random values, written one tensor
    at a time; returns the file's sha256 (the hub's blob name for a weights file).

    Written by hand in safetensors' layout (8-byte header length, JSON header, raw data) because
    ``safetensors.torch.save_file`` needs every tensor in memory at once: 4.3 GB for SD v1-4's UNet."""
    state = module.state_dict()
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in sorted(state):
        t = state[name]
        dtype = t.dtype if not t.dtype.is_floating_point else torch.float32
        size = t.numel() * dtype.itemsize
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)                 # the data start 8-byte aligned
    digest = hashlib.sha256()
    buffer = torch.empty(max(t.numel() for t in state.values()))
    with open(path, "wb") as f:
        for chunk in (len(head).to_bytes(8, "little"), head):
            f.write(chunk)
            digest.update(chunk)
        for name in sorted(state):
            owner_name, _, local = name.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            data = memoryview(_random_fill(owner, local, state[name], pool, gen, buffer).numpy()).cast("B")
            f.write(data)
            digest.update(data)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------- CLIP

@dataclass(repr=False)
class ClipVision:
    """A CLIP model (open_clip) for the structural features of stage 2, frozen, with its preprocessing.

    Attributes:
        model: the open_clip ``CLIP`` (both towers; ``model.visual`` is the ViT whose blocks are hooked).
        input_size: the image side the ViT expects (224 real; 56 tiny).
        n_tokens: tokens per image, class token included (50 for both: 7 x 7 patches + 1).
        width: token width (768 real; 64 tiny); embed_dim: image embedding size (512 real; 64 tiny).
        n_blocks: transformer blocks (12 real; 8 tiny).
        normalization: ``"clip"`` (CLIP's own mean/std, the default) or ``"imagenet"`` (the released code's);
        mean, std: the corresponding per-channel values for images in [0, 1].
        device, dtype, source: where it lives, its precision, what was asked for.
        weights, revision: the weights file read for a manifest CLIP (``"openai"``: in the hub cache, its
            commit is :func:`hub_commit` of it) and the manifest's revision; None for tiny models and folders.
    Taught in lesson 05 (features in :func:`mdlib.features.clip_lowlevel_features`).
    """

    model: Any
    input_size: int
    n_tokens: int
    width: int
    embed_dim: int
    n_blocks: int
    normalization: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    device: torch.device
    dtype: torch.dtype
    source: str = ""
    weights: Path | None = None
    revision: str | None = None
    _fingerprint: str | None = None

    @property
    def visual(self) -> Any:
        """The vision transformer (open_clip ``VisionTransformer``)."""
        return self.model.visual

    @property
    def blocks(self) -> Any:
        """Its transformer blocks (``visual.transformer.resblocks``); block k (1-based) is ``blocks[k - 1]``."""
        return self.model.visual.transformer.resblocks

    def fingerprint(self) -> str:
        """:func:`module_fingerprint` of the whole model, computed once."""
        if self._fingerprint is None:
            self._fingerprint = module_fingerprint(self.model)
        return self._fingerprint

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> ClipVision:
        """Move the model (in place) and return self."""
        device = resolve_device(device) if device is not None else self.device
        dtype = dtype or self.dtype
        self.model.to(device=device, dtype=dtype)
        if dtype != self.dtype:
            self._fingerprint = None
        self.device, self.dtype = device, dtype
        return self

    def __repr__(self) -> str:
        return (f"ClipVision(source={self.source!r}, input_size={self.input_size}, n_tokens={self.n_tokens}, "
                f"width={self.width}, embed_dim={self.embed_dim}, n_blocks={self.n_blocks}, "
                f"normalization={self.normalization!r}, device={self.device}, dtype={self.dtype}, "
                f"vision params={n_params(self.visual) / 1e6:.1f}M)")


def normalization_stats(normalization: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) for ``"clip"`` or ``"imagenet"``."""
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {sorted(NORMALIZATIONS)}, got {normalization!r}")
    return NORMALIZATIONS[normalization]


def load_clip_vision(source: str | os.PathLike = "tiny", device: str | torch.device | None = None,
                     dtype: torch.dtype | str | None = None, normalization: str = "clip", *,
                     local_files_only: bool | None = None, cache_dir: str | os.PathLike | None = None) -> ClipVision:
    """The CLIP model of stage 2's structural features (lesson 05).

    Args:
        source: ``"tiny"`` (the tiny CLIP under :func:`tiny_models_dir`), ``"tiny-trained"`` (the shipped
            trained one, :func:`trained_tiny_dir`), ``"openai"`` (ViT-B/32 with OpenAI's
            weights: open_clip ``ViT-B-32-quickgelu`` / ``openai``, whose file is on the hub as
            ``timm/vit_base_patch32_clip_224.openai``), or a folder in open_clip's local-dir layout
            (``open_clip_config.json`` + weights; a tiny-model folder's ``clip/`` is found too).
        device: None: CUDA if available, else the CPU. dtype: None: float32.
        normalization: ``"clip"`` (CLIP's mean/std, default) or ``"imagenet"`` (the released code's).
        local_files_only, cache_dir: as for :func:`load_sd`.

    Raises:
        WeightsNotFoundError: OpenAI's weights are not cached and cannot be downloaded now (offline).
    """
    import open_clip

    device = resolve_device(device)
    dtype = _resolve_dtype(dtype, device)
    normalization_stats(normalization)  # a bad name fails before any weights are read
    label = str(source)
    weights = revision = None
    if label == "tiny":
        model = open_clip.create_model(f"local-dir:{tiny_models_dir() / 'clip'}")
    elif label == TRAINED_TINY:
        model = open_clip.create_model(f"local-dir:{trained_tiny_dir() / 'clip'}")
    elif label == "openai":
        entry = _manifest_entry("clip_vision")
        weights = resolve_clip_weights("clip_vision", local_files_only, cache_dir)
        revision = entry.get("revision") or "main"
        model = open_clip.create_model(entry.get("open_clip_name", "ViT-B-32-quickgelu"), pretrained=str(weights))
    else:
        folder = Path(source).expanduser()
        if (folder / "clip" / "open_clip_config.json").is_file():
            folder = folder / "clip"
        if not (folder / "open_clip_config.json").is_file():
            raise FileNotFoundError(f"{folder}: expected an open_clip folder (open_clip_config.json + weights), "
                                    f"or source='tiny' / 'tiny-trained' / 'openai'")
        model = open_clip.create_model(f"local-dir:{folder}")
    clip = wrap_clip(model.to(device=device, dtype=dtype).eval().requires_grad_(False), normalization, label)
    clip.weights, clip.revision = weights, revision
    return clip


def wrap_clip(model: Any, normalization: str = "clip", source: str = "") -> ClipVision:
    """An open_clip ``CLIP`` as a :class:`ClipVision` (its sizes read from the model; device and dtype from its
    parameters). The model is used as it is: frozen by :func:`load_clip_vision`, trainable in
    :mod:`mdlib.train_mini`."""
    mean, std = normalization_stats(normalization)
    visual = model.visual
    grid = tuple(visual.grid_size)
    first = next(model.parameters())
    return ClipVision(model=model, input_size=int(visual.image_size[0]), n_tokens=grid[0] * grid[1] + 1,
                      width=int(visual.positional_embedding.shape[-1]), embed_dim=int(visual.output_dim),
                      n_blocks=len(visual.transformer.resblocks), normalization=normalization,
                      mean=tuple(mean), std=tuple(std), device=first.device, dtype=first.dtype, source=source)


def resolve_clip_weights(role: str = "clip_vision", local_files_only: bool | None = None,
                         cache_dir: str | os.PathLike | None = None) -> Path:
    """The weights file of a manifest CLIP (``clip_vision``: OpenAI ViT-B/32 for stage 2; ``clip_eval``:
    OpenAI ViT-L/14 for evaluation) in the hub cache: safetensors, else the .bin twin. Downloads it first
    unless offline (``local_files_only`` or ``HF_HUB_OFFLINE``).

    Raises:
        WeightsNotFoundError: not cached and not downloadable now; the message has the fetch command.
    """
    entry = _manifest_entry(role)
    first_error: WeightsNotFoundError | None = None
    for names in (entry.get("files") or [], entry.get("fallback_files") or []):
        if not names:
            continue
        try:
            folder, _, _ = _resolve_hub_folder(role, None, local_files_only, cache_dir, required=names)
            return folder / names[0]
        except WeightsNotFoundError as err:
            first_error = first_error or err
    assert first_error is not None
    raise first_error

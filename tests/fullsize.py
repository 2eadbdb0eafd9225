"""Full-size stand-ins of the real path, for tests and benchmarks (not a test module).

- :func:`hub_cache`: a Hugging Face cache holding Stable Diffusion v1-4 and CLIP ViT-B/32 built from their
  published configurations with seeded random weights (:func:`mdlib.models.write_random_hub_cache`), laid out
  as a download lays it out, so that the real model ids resolve offline.
- :func:`nsd_shaped_decoded`: decoded features with the real path's shapes (z 4 x 64 x 64, c 14 x 768 for the
  15 tokens of the default variant, CLIP ViT-B/32 blocks 50 x 768 and embedding 512), random values, with
  selection scores, for :func:`mdlib.reconstruct.save_decoded` and ``mdlib reconstruct --decoded``.
- :func:`offline_hub_env`: the environment of a user whose ``HF_HOME`` holds that cache, offline.

A benchmark reuses them with ``sys.path.insert(0, "tests")``; ``tests/test_fullsize.py`` runs the real path's
stage 1 and stage 2 on them through ``mdlib reconstruct --preset nsd``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

#: The real path's model ids (data_manifest/models.yaml) and what ``mdlib reconstruct --preset nsd`` loads.
SD_ID = "CompVis/stable-diffusion-v1-4"
CLIP_ID = "timm/vit_base_patch32_clip_224.openai"
#: Shapes of one image's decoded features on the real path (docs/method.md): z at 512 px, c without its BOS
#: row for 15 tokens, the six CLIP ViT-B/32 blocks and its image embedding.
NSD_SHAPES = {"z": (4, 64, 64), "c": (14, 768), **{f"clip_block{b}": (50, 768) for b in range(1, 7)},
              "clip_embedding": (512,)}
#: nsdIds (0-based) of a few images of NSD's shared test set, in no particular order.
SOME_TEST_IDS = (2950, 73, 46002)


def hub_cache(cache: str | os.PathLike, seed: int = 0) -> dict[str, Path]:
    """Write the stand-ins of SD v1-4 and CLIP ViT-B/32 into ``cache`` (a hub cache folder: ``$HF_HOME/hub``);
    returns ``{role: snapshot folder}`` (:func:`mdlib.models.write_random_hub_cache`)."""
    from mdlib import models

    return models.write_random_hub_cache(cache, roles=("stable_diffusion", "clip_vision"), seed=seed)


def nsd_shaped_decoded(n_tokens: int = 15, ids=SOME_TEST_IDS, seed: int = 0):
    """:class:`mdlib.decoding.Decoded` for ``ids`` with the real path's shapes (``c`` for ``n_tokens``), values
    of the real features' scale (z and the features roughly unit normal), and a random selection score for
    each CLIP feature (``select_by`` "loo-r2")."""
    from mdlib.decoding import Decoded

    rng = np.random.default_rng(seed)
    shapes = {**NSD_SHAPES, "c": (n_tokens - 1, NSD_SHAPES["c"][1])}
    pred = {k: rng.standard_normal((len(ids), *s)).astype(np.float32) for k, s in shapes.items()}
    score = {k: rng.random(int(np.prod(s))) for k, s in shapes.items() if k.startswith("clip_block")}
    return Decoded(nsd_ids=np.asarray(ids, dtype=np.int64), pred=pred, true={}, score=score,
                   params={"select_by": "loo-r2", "note": "random, NSD-shaped (tests/fullsize.py)"})


def offline_hub_env(hf_home: str | os.PathLike) -> dict[str, str]:
    """The environment variables of a user whose Hugging Face home is ``hf_home`` (the cache in its ``hub/``),
    offline; ``HF_HUB_CACHE`` is left unset, as most users leave it (None: remove it)."""
    return {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_CACHE": None}


class CudaAutocastNorms:
    """Under CPU autocast, group and layer normalisation run in float32, as CUDA's autocast runs them (they are on
    its float32 list; the CPU's runs them in the low precision): their inputs, saved for the backward pass, are
    then float32 copies, as on a GPU. ``with CudaAutocastNorms():`` around the forward and backward passes whose
    memory is counted for a GPU (``benchmarks/bench_memory.py``).

    It replaces ``torch.nn.functional.group_norm`` and ``layer_norm`` for the block (diffusers' and open_clip's
    normalisation layers call them), not a function mode: checkpointed steps are recomputed in the backward
    pass, where a mode entered in the forward pass is not active."""

    def __enter__(self):
        import torch
        import torch.nn.functional as F

        self._saved = {name: getattr(F, name) for name in ("group_norm", "layer_norm")}

        def in_float32(original):
            def norm(*args, **kwargs):
                if not torch.is_autocast_enabled("cpu"):
                    return original(*args, **kwargs)

                def up(a):
                    return a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a

                with torch.autocast("cpu", enabled=False):
                    return original(*map(up, args), **{k: up(v) for k, v in kwargs.items()})
            return norm

        for name, original in self._saved.items():
            setattr(F, name, in_float32(original))
        return self

    def __exit__(self, *exc):
        import torch.nn.functional as F

        for name, original in self._saved.items():
            setattr(F, name, original)
        return False

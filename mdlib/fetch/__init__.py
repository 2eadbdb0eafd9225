"""``mdlib fetch``: the real data and models, resumable and verified (docs/fetch.md).

- :func:`fetch_nsd`: the NSD files ``data_manifest/nsd.yaml`` lists for some subjects and a purpose
  (``minimal``: lessons 01-02; ``full``: every lesson), each subject's 10,000 images read out of the bucket's
  39.6 GB brick into a 5.4 GB per-subject file, and the COCO caption files; from the public bucket
  anonymously (or from another S3 endpoint), in parallel, continuing partial files, checking sizes and MD5s,
  moving each file into place only when complete. A second run transfers nothing.
- :func:`fetch_model_weights`: the models of ``data_manifest/models.yaml`` into the Hugging Face cache
  (``mdlib.models.fetch_models``), so that the lessons then run offline.

Modules: :mod:`~mdlib.fetch.manifest` (the manifest), :mod:`~mdlib.fetch.remote` (S3 and HTTP sources, ranged
file objects, the fetch state, one verified download), :mod:`~mdlib.fetch.subset` (a subject's images),
:mod:`~mdlib.fetch.coco` (captions), :mod:`~mdlib.fetch.run` (the whole fetch).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

from mdlib.fetch.manifest import MANIFEST_PATH, PURPOSES, STIMULI_CHOICES, Item, NSDManifest, load_manifest
from mdlib.fetch.remote import STATE_FILE, FetchError, MissingKeyError, S3Store, s3_client
from mdlib.fetch.run import FetchReport, fetch_nsd, human

__all__ = ["MANIFEST_PATH", "PURPOSES", "STIMULI_CHOICES", "STATE_FILE", "FetchError", "FetchReport", "Item",
           "MissingKeyError", "NSDManifest", "S3Store", "fetch_model_weights", "fetch_nsd", "human",
           "load_manifest", "model_plan", "s3_client"]


def model_plan(roles: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
    """``{role: {id, revision, files, command}}`` for the models of ``data_manifest/models.yaml`` that have
    files to fetch (Stable Diffusion v1-4, CLIP ViT-B/32, CLIP ViT-L/14 for the evaluation), or ``roles``."""
    from mdlib import models

    manifest = models.model_manifest()
    chosen = list(roles) if roles is not None else [r for r, e in manifest.items() if e.get("files")]
    unknown = [r for r in chosen if r not in manifest]
    if unknown:
        raise KeyError(f"unknown model role(s) {unknown}; data_manifest/models.yaml has {sorted(manifest)}")
    return {r: {"id": manifest[r]["id"], "revision": manifest[r].get("revision") or "main",
                "files": list(manifest[r].get("files") or []), "command": models.fetch_command(r)} for r in chosen}


def fetch_model_weights(roles: Iterable[str] | None = None, cache_dir: str | os.PathLike | None = None,
                        dry_run: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Download the models' files into the Hugging Face cache (``mdlib.models.fetch_models``; needs the
    network, and HF_HUB_OFFLINE unset). ``dry_run`` only lists them with the equivalent ``hf download``
    commands. Returns :func:`model_plan`'s dict, with each role's local ``folder`` after a download."""
    from mdlib import models

    plan = model_plan(roles)
    for role, p in plan.items():
        log(f"model {role}: {p['id']} at revision {p['revision']}, {len(p['files'])} file(s)\n  {p['command']}")
    if dry_run:
        return plan
    if models.hub_offline():
        raise FetchError("HF_HUB_OFFLINE is set, so the models cannot be downloaded: unset it (and "
                         "TRANSFORMERS_OFFLINE) for `mdlib fetch --models`, then set it again to run offline")
    folders = models.fetch_models(roles=tuple(plan), cache_dir=cache_dir)
    for role, folder in folders.items():
        plan[role]["folder"] = str(folder)
        log(f"model {role}: {folder}")
    return plan

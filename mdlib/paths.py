"""Where mdlib keeps things: one home folder, chosen by the environment variable ``MDLIB_DATA``.

Layout under the home folder (default ``~/mdlib-data``)::

    nsd/        the real NSD, mirroring s3://natural-scenes-dataset/ (plus coco/annotations/)
    mini-nsd/   the synthetic mini-NSD written by ``mdlib mini``
    runs/       executed notebooks, results, reconstructions

Every function that reads data takes a ``data_root`` argument that overrides this, and every notebook has a
``DATA_ROOT`` parameter. Derived, cached matrices go in ``<data root>/mdlib_cache/`` beside the data they
come from, so a cache can never be mistaken for another dataset's. docs/data.md, "Where the data lives", has
the layout of a data root.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "MDLIB_DATA"


def home() -> Path:
    """The mdlib home folder: ``$MDLIB_DATA`` or ``~/mdlib-data``."""
    env = os.environ.get(ENV_VAR, "").strip()
    return Path(env).expanduser() if env else Path.home() / "mdlib-data"


def data_root(data_root: str | os.PathLike | None = None, preset: str = "nsd") -> Path:
    """The dataset root to read: ``data_root`` if given, else the preset's folder under :func:`home`.

    ``preset='nsd'`` -> ``<home>/nsd`` (the real NSD); ``preset='mini'`` -> ``<home>/mini-nsd``.
    """
    from mdlib import presets

    return presets.get(preset).data_root(data_root)


def runs_dir(name: str = "", runs_root: str | os.PathLike | None = None) -> Path:
    """A folder for a run's outputs, ``<home>/runs/<name>`` unless ``runs_root`` is given; created."""
    base = Path(runs_root).expanduser() if runs_root not in (None, "") else home() / "runs"
    path = base / name if name else base
    path.mkdir(parents=True, exist_ok=True)
    return path


def cache_dir(data_root: str | os.PathLike) -> Path:
    """``<data root>/mdlib_cache``: prepared matrices derived from that dataset; created."""
    path = Path(data_root) / "mdlib_cache"
    path.mkdir(parents=True, exist_ok=True)
    return path

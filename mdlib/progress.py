"""Progress bars, through one switch.

Every progress bar in mdlib comes from :func:`bar`: a plain ``tqdm.tqdm`` (never ``tqdm.auto``, which in
Jupyter without ipywidgets warns "IProgress not found", then draws a text bar anyway), disabled when the caller passes
``progress=False`` or when the environment variable ``MDLIB_PROGRESS`` is ``0``, ``false``, ``off`` or ``no``.
``mdlib course`` sets ``MDLIB_PROGRESS=0`` for the lesson kernels it starts (:func:`mdlib.course.kernel_environ`),
so executed lessons keep no bars in their outputs. The commands that show bars are listed in
README.md, "The `mdlib` command"; ``mdlib reconstruct``'s bar and log lines are described in docs/reconstruct.md.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

#: The environment variable that turns every mdlib progress bar off.
ENV_SWITCH = "MDLIB_PROGRESS"
_OFF = frozenset({"0", "false", "off", "no"})


def enabled(progress: bool = True) -> bool:
    """Whether a bar asked for with ``progress`` is shown: ``progress`` and not switched off by ``MDLIB_PROGRESS``."""
    return bool(progress) and os.environ.get(ENV_SWITCH, "").strip().lower() not in _OFF


def bar(iterable: Iterable | None = None, *, progress: bool = True, **tqdm_kwargs: Any):
    """A plain ``tqdm.tqdm(iterable, **tqdm_kwargs)``, disabled unless :func:`enabled` (``progress``).

    A disabled bar still iterates, updates and closes as a no-op, so callers use it the same either way.
    ``disable`` in ``tqdm_kwargs`` (tqdm's own switch) is combined with the others: any one turns it off.
    """
    from tqdm import tqdm

    disable = bool(tqdm_kwargs.pop("disable", False)) or not enabled(progress)
    return tqdm(iterable, disable=disable, **tqdm_kwargs)

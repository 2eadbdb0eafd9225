"""Each lesson's settings in one place: the handful in its parameters cell, and the advanced ones here.

A lesson's parameters cell holds what a learner changes (``PRESET``, ``SUBJECT``, ``N_IMAGES``, ``SEED``,
``DEVICE``, ...) and one dict, ``ADVANCED``, for everything else. :func:`settings` merges ``ADVANCED`` into the
lesson's defaults below and refuses names it does not know, listing the known ones; :func:`table` shows them
with their defaults and meaning. A papermill run sets them the same way::

    papermill notebooks/06_evaluation.ipynb out.ipynb -p PRESET nsd -y "ADVANCED: {protocol: mindeye}"

The defaults are the lesson's; the method's own rows (the paper's and the released code's choices) are set by
``VARIANT`` and live in :mod:`mdlib.method` (docs/method.md), not here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType, SimpleNamespace
from typing import Any


@dataclass(frozen=True)
class Setting:
    """One advanced setting: its default and what it does (one line)."""

    default: Any
    help: str


def _settings(**entries: tuple[Any, str]) -> Mapping[str, Setting]:
    return MappingProxyType({name: Setting(*entry) for name, entry in entries.items()})


#: Per lesson (its two-digit number), the advanced settings and their defaults.
ADVANCED: Mapping[str, Mapping[str, Setting]] = MappingProxyType({
    "01": _settings(),
    "02": _settings(),
    "03": _settings(),
    "04": _settings(),
    "05": _settings(),
    "06": _settings(),
})


def settings(lesson: str, advanced: Mapping[str, Any] | None = None) -> SimpleNamespace:
    """The advanced settings of ``lesson`` ("01" ... "06"): its defaults, with ``advanced`` (a dict of
    ``name: value``, names as in :data:`ADVANCED`) applied. Unknown names raise a ``KeyError`` that lists the
    known ones; ``None`` values keep the default."""
    known = _lesson(lesson)
    given = dict(advanced or {})
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise KeyError(f"lesson {lesson} has no advanced setting {', '.join(map(repr, unknown))}; known: "
                       f"{', '.join(known) or 'none'} (mdlib.lessons.table({lesson!r}) lists them)")
    values = {name: s.default for name, s in known.items()}
    values.update({k: v for k, v in given.items() if v is not None})
    return SimpleNamespace(**values)


def table(lesson: str):
    """The advanced settings of ``lesson`` as a DataFrame: default and meaning, one row per name."""
    import pandas as pd

    known = _lesson(lesson)
    return pd.DataFrame({"default": [repr(s.default) for s in known.values()],
                         "what it does": [s.help for s in known.values()]},
                        index=pd.Index(list(known), name="ADVANCED"))


def _lesson(lesson: str) -> Mapping[str, Setting]:
    if lesson not in ADVANCED:
        raise KeyError(f"no lesson {lesson!r}; lessons: {', '.join(ADVANCED)}")
    return ADVANCED[lesson]


__all__ = ["ADVANCED", "Setting", "settings", "table"]

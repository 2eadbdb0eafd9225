"""Evaluating reconstructions as the field does (docs/evaluation.md; taught in lesson 06).

Two families of numbers, computed on the same images:

- MindDiffuser's three (paper, Table 2): ``CLIP-cos`` (cosine of the final CLIP image embeddings of
  reconstruction and stimulus), ``SSIM`` and ``PCC`` (pixel-wise Pearson correlation, the same computation as
  ``PixCorr``).
- The eight-metric table of Brain-Diffuser, MindEye and later papers: ``PixCorr``, ``SSIM`` (both at 425 px;
  :mod:`mdlib.metrics`), two-way identification in percent for ``AlexNet(2)``, ``AlexNet(5)``,
  ``InceptionV3`` and ``CLIP`` (chance 50%), and correlation distances for ``EffNet-B`` and ``SwAV`` (lower is
  better); the networks are :mod:`mdlib.evalnets`'.

:func:`evaluate` gives a :class:`Report` per set of reconstructions; :func:`table` puts reports side by side
with one header that states the SSIM computed and every network's weights (random ones loudly);
:data:`PUBLISHED` holds the published real-NSD numbers for comparison; :func:`write_table` saves a table as
CSV with its header as ``#`` lines.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mdlib import metrics as M
from mdlib.evalnets import METRICS_BY_NAME, EvalNetworks

EIGHT_METRICS = ("PixCorr", "SSIM", "AlexNet(2)", "AlexNet(5)", "InceptionV3", "CLIP", "EffNet-B", "SwAV")
MINDDIFFUSER_METRICS = ("CLIP-cos", "SSIM", "PCC")
ALL_METRICS = ("CLIP-cos", "PCC", *EIGHT_METRICS)
IDENTIFICATION = frozenset(m.name for m in METRICS_BY_NAME.values() if m.kind == "identification")
VIEWS = {"eight": EIGHT_METRICS, "minddiffuser": MINDDIFFUSER_METRICS,
         "all": ("CLIP-cos", "SSIM", "PCC", *EIGHT_METRICS[2:])}


def ssim_note() -> str:
    """What SSIM and PixCorr mean here: stated on every table (docs/evaluation.md: old SSIM numbers were column SSIMs)."""
    import skimage

    return (f"SSIM: true 2-D SSIM of grey images at {M.EVAL_SIZE} px (scikit-image {skimage.__version__} "
            "structural_similarity, Gaussian window sigma 1.5, data_range 1). PixCorr = PCC: Pearson r of the "
            f"RGB pixels at {M.EVAL_SIZE} px.")


@dataclass
class Report:
    """The metrics of one set of reconstructions against its stimuli.

    Attributes:
        values: metric -> mean over images (identification in percent; ``PCC`` equals ``PixCorr``).
        per_image: metric -> (n,) values per image (identification: percent of the other stimuli beaten).
        n_images: n.
        header: the SSIM computed and the weights of every network used (see :func:`table`).
    """

    values: dict[str, float]
    per_image: dict[str, np.ndarray] = field(repr=False)
    n_images: int
    header: str = field(repr=False)


def evaluate(recons, stims, nets: EvalNetworks | None = None, metrics: Iterable[str] | None = None,
             size: int = M.EVAL_SIZE) -> Report:
    """Evaluate paired reconstructions and stimuli (lesson 06).

    Args:
        recons, stims: (n, H, W, 3) uint8 or (n, 3, H, W) float images in [0, 1], paired by row (sizes may
            differ: each metric resizes both).
        nets: the evaluation networks (needed for any feature metric). metrics: names from
            :data:`ALL_METRICS` (default: all of them with ``nets``, else PixCorr, SSIM and PCC).
        size: PixCorr's and SSIM's comparison size (425: NSD's stimuli).
    """
    names = list(metrics) if metrics is not None else list(ALL_METRICS if nets is not None else
                                                           ("PixCorr", "SSIM", "PCC"))
    unknown = [n for n in names if n not in ALL_METRICS]
    if unknown:
        raise KeyError(f"unknown metrics {unknown}; known: {ALL_METRICS}")
    if len(recons) != len(stims):
        raise ValueError(f"{len(recons)} reconstructions for {len(stims)} stimuli: they must be paired one to one")
    per: dict[str, np.ndarray] = {}
    if {"PixCorr", "PCC"} & set(names):
        per["PixCorr"] = M.pixcorr_per_image(recons, stims, size)
    if "SSIM" in names:
        per["SSIM"] = M.ssim_per_image(recons, stims, size)
    feats = [n for n in names if n in METRICS_BY_NAME]
    if "CLIP-cos" in names and "CLIP" not in feats:
        feats.append("CLIP")
    header = ssim_note()
    if feats:
        if nets is None:
            raise ValueError(f"metrics {feats} need the evaluation networks: pass nets=EvalNetworks(...)")
        fr, fs = nets.features(recons, feats), nets.features(stims, feats)
        for n in feats:
            if n not in names:
                continue
            if METRICS_BY_NAME[n].kind == "identification":
                per[n] = 100.0 * M.two_way_identification(fr[n], fs[n])
            else:
                per[n] = M.correlation_distance(fr[n], fs[n])
        if "CLIP-cos" in names:
            per["CLIP-cos"] = M.cosine_similarity(fr["CLIP"], fs["CLIP"])
        header = nets.header(feats) + "\n" + header
    values = {n: float(np.nanmean(v)) for n, v in per.items()}
    if "PCC" in names:
        values["PCC"] = values["PixCorr"]
        if "PixCorr" not in names:
            del values["PixCorr"]
    return Report(values=values, per_image=per, n_images=len(recons), header=header)


def table(reports: Mapping[str, Report], view: str = "eight"):
    """Reports side by side: a pandas DataFrame, one row per report, the view's metric columns plus ``images``.

    ``view``: ``"eight"`` (the eight-metric table), ``"minddiffuser"`` (CLIP-cos, SSIM, PCC) or ``"all"``.
    The header (``df.attrs["header"]``) states the SSIM and every network's weights. Reports made with other
    weights cannot share a table: a metric never silently mixes weight sources.
    """
    import pandas as pd

    if view not in VIEWS:
        raise ValueError(f"view must be one of {list(VIEWS)}, got {view!r}")
    headers = {r.header for r in reports.values()}
    # Reports without feature metrics carry only the SSIM note: they fit any table.
    with_nets = {h for h in headers if h != ssim_note()}
    if len(with_nets) > 1:
        raise ValueError("these reports were computed with different evaluation weights; put them in separate "
                         "tables:\n\n" + "\n\n".join(sorted(with_nets)))
    cols = VIEWS[view]
    df = pd.DataFrame([{"images": r.n_images, **{c: r.values.get(c, math.nan) for c in cols}}
                       for r in reports.values()], index=list(reports))
    df.attrs["header"] = next(iter(with_nets)) if with_nets else ssim_note()
    return df


def styled(df, caption: str | None = None):
    """A table for the notebook: identification as percent, the rest to 3 decimals, its header as caption."""
    numeric = df.select_dtypes("number").columns
    formats = {c: ("{:.1f}%" if c in IDENTIFICATION else "{:.3f}") for c in numeric if c != "images"}
    text = caption if caption is not None else df.attrs.get("header", "")
    return df.style.format(formats, na_rep="").set_caption(text.replace("\n", "<br>"))


# ------------------------------------------------------------------------------------- published numbers

@dataclass(frozen=True)
class Published:
    """A published result on the real NSD, with pretrained evaluation networks (docs/evaluation.md)."""

    method: str
    subjects: str
    images: str
    source: str
    values: Mapping[str, float]


def _eight(*v: float) -> dict[str, float]:
    return dict(zip(EIGHT_METRICS, v))


def _mindd(clip_cos: float, ssim: float, pcc: float) -> dict[str, float]:
    return {"CLIP-cos": clip_cos, "SSIM": ssim, "PCC": pcc, "PixCorr": pcc}


#: Published numbers (real NSD, pretrained networks): subject 1, then four-subject means (1, 2, 5, 7).
PUBLISHED: tuple[Published, ...] = (
    Published("MindEye", "1", "982", "MindEye (NeurIPS 2023)",
              _eight(.392, .347, 97.4, 98.7, 94.5, 94.3, .635, .358)),
    Published("MindEye2 (40 sessions)", "1", "1000", "MindEye2 (ICML 2024)",
              _eight(.374, .439, 97.9, 99.1, 96.0, 93.7, .607, .336)),
    Published("MindDiffuser, full", "1", "", "MindDiffuser arXiv v1, Table 2", _mindd(.765, .354, .278)),
    Published("MindDiffuser, without control", "1", "", "MindDiffuser arXiv v1, Table 2", _mindd(.597, .253, .183)),
    Published("MindDiffuser, without z", "1", "", "MindDiffuser arXiv v1, Table 2", _mindd(.616, .292, .066)),
    Published("Takagi & Nishimoto (re-run by MindDiffuser)", "1", "", "MindDiffuser arXiv v1, Table 2",
              _mindd(.642, .300, .175)),
    Published("Takagi & Nishimoto", "1, 2, 5, 7 (mean)", "", "as tabulated in the ZEBRA paper, Table 1",
              _eight(.246, .410, 78.9, 85.6, 83.8, 82.1, .811, .504)),
    Published("Brain-Diffuser", "1, 2, 5, 7 (mean)", "", "as tabulated in the ZEBRA paper, Table 1",
              _eight(.273, .365, 94.4, 96.6, 91.3, 90.9, .728, .422)),
    Published("MindEye2 (40 h)", "1, 2, 5, 7 (mean)", "", "as tabulated in the ZEBRA paper, Table 1",
              _eight(.322, .431, 96.1, 98.6, 95.4, 93.0, .619, .344)),
    Published("MindEye2 (1 h)", "1, 2, 5, 7 (mean)", "", "as tabulated in the ZEBRA paper, Table 1",
              _eight(.195, .419, 84.2, 90.6, 81.2, 79.2, .810, .468)),
    Published("Brain-IT (40 h)", "1, 2, 5, 7 (mean)", "", "Brain-IT (ICLR 2026)",
              _eight(.386, .486, 98.4, 99.5, 97.3, 96.4, .564, .320)),
)

PUBLISHED_HEADER = ("PUBLISHED numbers: the real NSD, pretrained evaluation networks, each paper's own test set "
                    "and SSIM implementation (some used scikit-image <= 0.19, whose SSIM on grey images was a "
                    "mean of 1-D column SSIMs): each paper's tables; protocols in docs/evaluation.md.")


def published_table(view: str = "all", rows: Iterable[Published] = PUBLISHED):
    """The published numbers as a DataFrame (metric columns of ``view`` plus subjects, images, source)."""
    import pandas as pd

    cols = VIEWS[view]
    df = pd.DataFrame([{"subjects": p.subjects, "images": p.images, "source": p.source,
                        **{c: p.values.get(c, math.nan) for c in cols}} for p in rows],
                      index=[p.method for p in rows])
    df.attrs["header"] = PUBLISHED_HEADER
    return df


def beside_published(ours, label: str, view: str = "all"):
    """Our rows (a :func:`table`) above the published ones, with a ``source`` column saying which is which."""
    import pandas as pd

    mine = ours.copy()
    mine.insert(0, "source", label)
    mine["images"] = mine["images"].astype(str)
    theirs = published_table(view)
    cols = ["source", "subjects", "images", *VIEWS[view]]
    mine["subjects"] = ours.attrs.get("subjects", "")
    out = pd.concat([mine.reindex(columns=cols), theirs.reindex(columns=cols)])
    out.attrs["header"] = f"OURS ({label}):\n{ours.attrs.get('header', '')}\n\n{PUBLISHED_HEADER}"
    return out


# ------------------------------------------------------------------------------------------------ files

def write_table(path: str | os.PathLike, df) -> Path:
    """Save a table as CSV, its header first as ``# `` lines (read back with :func:`read_table`), atomically."""
    from mdlib.record import _write_atomic

    buf = io.StringIO()
    for line in df.attrs.get("header", "").splitlines():
        buf.write(f"# {line}\n")
    df.to_csv(buf, index_label="row")
    text = buf.getvalue()
    return _write_atomic(path, lambda f: f.write(text), mode="w")


def read_table(path: str | os.PathLike):
    """A table written by :func:`write_table`, with its header back in ``attrs``."""
    import pandas as pd

    header, body = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            (header if line.startswith("# ") and not body else body).append(line)
    df = pd.read_csv(io.StringIO("".join(body)), index_col="row")
    df.index.name = None
    df.attrs["header"] = "".join(h[2:] for h in header).rstrip("\n")
    return df

"""Evaluating reconstructions as the field does (docs/evaluation.md; taught in lesson 06).

Two families of numbers, computed on the same images:

- MindDiffuser's three (paper, Table 2): ``CLIP-cos`` (cosine of the final CLIP image embeddings of
  reconstruction and stimulus), ``SSIM`` and ``PCC`` (pixel-wise Pearson correlation, the same computation as
  ``PixCorr``).
- The eight-metric table of Brain-Diffuser, MindEye and later papers: ``PixCorr``, ``SSIM`` (both at 425 px;
  :mod:`mdlib.metrics`), two-way identification in percent for ``AlexNet(2)``, ``AlexNet(5)``,
  ``InceptionV3`` and ``CLIP`` (chance 50%), and correlation distances for ``EffNet-B`` and ``SwAV`` (lower is
  better); the networks are :mod:`mdlib.evalnets`'.

:func:`evaluate` gives a :class:`Report` per set of reconstructions under one evaluation protocol
(``"mdlib"``, ``"mindeye"``, ``"braindiffuser"``: :mod:`mdlib.protocols`); :func:`table` puts reports side by
side with one header that names the protocol, the SSIM computed, the metrics left out for want of pretrained
weights and every network's weights (random ones loudly); :data:`PUBLISHED` holds the published real-NSD
numbers, each with the protocol that made it; :func:`write_table` saves a table as CSV with its header as
``#`` lines.
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
from mdlib import protocols as P
from mdlib.evalnets import FETCH_HINT, METRICS_BY_NAME, RANDOM_SOURCE, EvalNetworks

EIGHT_METRICS = ("PixCorr", "SSIM", "AlexNet(2)", "AlexNet(5)", "InceptionV3", "CLIP", "EffNet-B", "SwAV")
MINDDIFFUSER_METRICS = ("CLIP-cos", "SSIM", "PCC")
ALL_METRICS = ("CLIP-cos", "PCC", *EIGHT_METRICS)
IDENTIFICATION = frozenset(m.name for m in METRICS_BY_NAME.values() if m.kind == "identification")
VIEWS = {"eight": EIGHT_METRICS, "minddiffuser": MINDDIFFUSER_METRICS,
         "all": ("CLIP-cos", "SSIM", "PCC", *EIGHT_METRICS[2:])}


def ssim_note(protocol: str = "mdlib") -> str:
    """What SSIM and PixCorr mean under ``protocol``: stated on every table (docs/evaluation.md)."""
    import skimage

    p = P.get(protocol)
    if p.ssim == "2d":
        ssim = (f"true 2-D SSIM of grey images (scikit-image {skimage.__version__} structural_similarity, "
                "Gaussian window sigma 1.5, data_range 1)")
    else:
        ssim = ("the mean over image columns of 1-D SSIMs of grey images (what scikit-image 0.17 computed with "
                "multichannel=True; mdlib.protocols.ssim_columns)")
    return f"SSIM: {ssim} at {p.pixel_size} px. PixCorr = PCC: Pearson r of the RGB pixels at {p.pixel_size} px."


def protocol_note(protocol: str = "mdlib") -> str:
    """One line naming the protocol and how it brings images to PixCorr's and SSIM's size."""
    p = P.get(protocol)
    chain = " -> ".join(step.describe() for step in p.pixel_chain)
    return (f"PROTOCOL {p.name!r} ({p.title}; docs/evaluation.md): "
            f"{'8-bit images; ' if p.quantize else ''}PixCorr/SSIM images {chain}.")


def header_text(protocol: str, sources: Mapping[str, str], left_out: Iterable[str] = (),
                labels: Mapping[str, str] | None = None) -> str:
    """A table's header: random weights first (loudly), the metrics left out, the protocol, each network's
    weight source (``sources``: network key -> line, as :meth:`EvalNetworks.source_lines` gives), the SSIM."""
    lines = []
    # A source line reads "<title> (<size> px...): <weight source>" (EvalNetworks.source_lines).
    random = [line.split(" (", 1)[0] for line in sources.values() if f": {RANDOM_SOURCE}" in line]
    if random:
        lines.append(f"RANDOM-WEIGHT NETWORKS: {', '.join(random)}. Their columns measure untrained networks: "
                     "compare rows of this table with each other, never with published numbers.")
    left_out = list(left_out)
    if left_out:
        lines.append(f"LEFT OUT: {', '.join(left_out)}. No pretrained weights for them on this machine: {FETCH_HINT}.")
    named = list((labels or {}).values())
    if named:
        lines.append(f"{' and '.join(named)}: computed by a substitute for CLIP ViT-L/14 (named below); these "
                     "columns compare rows of this table, never published CLIP numbers.")
    lines.append(protocol_note(protocol))
    lines += list(sources.values())
    lines.append(ssim_note(protocol))
    return "\n".join(lines)


@dataclass
class Report:
    """The metrics of one set of reconstructions against its stimuli, under one protocol.

    Attributes:
        values: metric -> mean over images (identification in percent; ``PCC`` equals ``PixCorr``).
        per_image: metric -> (n,) values per image (identification: percent of the other stimuli beaten).
        n_images: n.
        protocol: the evaluation protocol (:data:`mdlib.protocols.PROTOCOLS`).
        sources: network key -> its input size and weight source (:meth:`EvalNetworks.source_lines`).
        left_out: feature metrics asked for but not computed (no pretrained weights here).
        labels: column labels that differ from the metric names (a substitute CLIP's columns).
    """

    values: dict[str, float]
    per_image: dict[str, np.ndarray] = field(repr=False)
    n_images: int
    protocol: str = "mdlib"
    sources: dict[str, str] = field(default_factory=dict, repr=False)
    left_out: list[str] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def header(self) -> str:
        """The protocol, the SSIM computed, the metrics left out and the weights of every network used."""
        return header_text(self.protocol, self.sources, self.left_out, self.labels)


def evaluate(recons, stims, nets: EvalNetworks | None = None, metrics: Iterable[str] | None = None,
             protocol: str | None = None) -> Report:
    """Evaluate paired reconstructions and stimuli under one protocol (lesson 06; docs/evaluation.md).

    Args:
        recons, stims: (n, H, W, 3) uint8 or (n, 3, H, W) float images in [0, 1], paired by row (sizes may
            differ: each metric resizes both as the protocol does).
        nets: the evaluation networks (needed for any feature metric); their protocol is the evaluation's.
        metrics: names from :data:`ALL_METRICS` (default: all of them with ``nets``, else PixCorr, SSIM and
            PCC). Feature metrics whose networks have no weights on this machine (``weights="auto"``) are left
            out and named in the report's header.
        protocol: ``"mdlib"`` (default), ``"mindeye"`` or ``"braindiffuser"``; with ``nets``, it must be theirs.
    """
    names = list(metrics) if metrics is not None else list(ALL_METRICS if nets is not None else
                                                           ("PixCorr", "SSIM", "PCC"))
    unknown = [n for n in names if n not in ALL_METRICS]
    if unknown:
        raise KeyError(f"unknown metrics {unknown}; known: {ALL_METRICS}")
    if nets is not None:
        if protocol is not None and P.get(protocol).name != nets.protocol.name:
            raise ValueError(f"protocol {protocol!r} differs from the networks' ({nets.protocol.name!r}): build "
                             f"EvalNetworks(protocol={protocol!r})")
        protocol = nets.protocol.name
    protocol = P.get(protocol or "mdlib").name
    if len(recons) != len(stims):
        raise ValueError(f"{len(recons)} reconstructions for {len(stims)} stimuli: they must be paired one to one")
    wanted = [n for n in names if n in METRICS_BY_NAME]
    if "CLIP-cos" in names and "CLIP" not in wanted:
        wanted.append("CLIP")
    if wanted and nets is None:
        raise ValueError(f"metrics {wanted} need the evaluation networks: pass nets=EvalNetworks(...)")
    feats = nets.usable(wanted) if wanted else []
    left_out = [n for n in names if n in METRICS_BY_NAME and n not in feats]
    if "CLIP-cos" in names and "CLIP" not in feats:
        left_out.append("CLIP-cos")
    per: dict[str, np.ndarray] = {}
    if {"PixCorr", "PCC"} & set(names):
        per["PixCorr"] = M.pixcorr_per_image(recons, stims, protocol=protocol)
    if "SSIM" in names:
        per["SSIM"] = M.ssim_per_image(recons, stims, protocol=protocol)
    sources: dict[str, str] = {}
    if feats:
        fr, fs = nets.features(recons, feats), nets.features(stims, feats)
        for n in feats:
            if n not in names:
                continue
            if METRICS_BY_NAME[n].kind == "identification":
                per[n] = 100.0 * M.two_way_identification(fr[n], fs[n])
            else:
                per[n] = M.correlation_distance(fr[n], fs[n])
        if "CLIP-cos" in names and "CLIP" in feats:
            per["CLIP-cos"] = M.cosine_similarity(fr["CLIP"], fs["CLIP"])
        sources = nets.source_lines(feats)
    values = {n: float(np.nanmean(v)) for n, v in per.items()}
    if "PCC" in names:
        values["PCC"] = values["PixCorr"]
        if "PixCorr" not in names:
            del values["PixCorr"]
    labels = {k: v for k, v in (nets.labels() if nets is not None else {}).items() if k in per}
    return Report(values=values, per_image=per, n_images=len(recons), protocol=protocol, sources=sources,
                  left_out=left_out, labels=labels)


def table(reports: Mapping[str, Report], view: str = "eight"):
    """Reports side by side: a pandas DataFrame, one row per report, the view's metric columns plus ``images``.

    ``view``: ``"eight"`` (the eight-metric table), ``"minddiffuser"`` (CLIP-cos, SSIM, PCC) or ``"all"``.
    ``df.attrs``: ``"header"`` (the protocol, the SSIM, the metrics left out and every network's weights),
    ``"protocol"``, ``"labels"`` (column labels for display). Reports of different protocols, or whose
    networks carry different weights, cannot share a table: a column never silently mixes them.
    """
    import pandas as pd

    if view not in VIEWS:
        raise ValueError(f"view must be one of {list(VIEWS)}, got {view!r}")
    if not reports:
        raise ValueError("no reports to tabulate")
    protos = {r.protocol for r in reports.values()}
    if len(protos) > 1:
        raise ValueError(f"these reports were computed under different protocols {sorted(protos)}; put them in "
                         "separate tables")
    sources: dict[str, str] = {}
    for r in reports.values():
        for k, line in r.sources.items():
            if sources.setdefault(k, line) != line:
                raise ValueError("these reports were computed with different evaluation weights; put them in "
                                 f"separate tables:\n\n{sources[k]}\n{line}")
    cols = VIEWS[view]
    left_out = [m for m in cols if any(m in r.left_out for r in reports.values())]
    labels = {k: v for r in reports.values() for k, v in r.labels.items() if k in cols}
    df = pd.DataFrame([{"images": r.n_images, **{c: r.values.get(c, math.nan) for c in cols}}
                       for r in reports.values()], index=list(reports))
    protocol = protos.pop()
    df.attrs.update(header=header_text(protocol, sources, left_out, labels), protocol=protocol, labels=labels)
    return df


def _shown_table_class():
    """pandas' Styler with a plain-text form: Jupyter keeps an output's ``text/plain`` beside its HTML, and a bare
    Styler's is ``<pandas.io.formats.style.Styler at 0x...>``, which text views of a notebook would show."""
    from pandas.io.formats.style import Styler

    class ShownTable(Styler):
        def __repr__(self) -> str:
            caption = (self.caption or "").replace("<br>", "\n")
            return (caption + "\n" if caption else "") + self.to_string(delimiter="  ")

    return ShownTable


def styled(df, caption: str | None = None):
    """A table for the notebook: identification as percent, the rest to 3 decimals, its header as caption, the
    columns of metrics left out (all empty) dropped, and columns relabelled where ``df.attrs["labels"]`` says
    (a substitute CLIP's). A pandas Styler (HTML in Jupyter) whose ``repr`` is the same table as text."""
    def metric(column: str) -> str:          # "CLIP (tiny CLIP)" -> "CLIP"
        return str(column).split(" (")[0]

    df = df.drop(columns=[c for c in df.columns if metric(c) in ALL_METRICS and df[c].isna().all()])
    numeric = df.select_dtypes("number").columns
    formats = {c: ("{:.1f}%" if metric(c) in IDENTIFICATION else "{:.3f}") for c in numeric if c != "images"}
    text = caption if caption is not None else df.attrs.get("header", "")
    labels = df.attrs.get("labels", {})
    return (_shown_table_class()(df).format(formats, na_rep="").set_caption(text.replace("\n", "<br>"))
            .relabel_index([labels.get(c, c) for c in df.columns], axis=1))


# ------------------------------------------------------------------------------------- published numbers

@dataclass(frozen=True)
class Published:
    """A published result on the real NSD, with pretrained evaluation networks (docs/evaluation.md).

    ``protocol``: the protocol that made the numbers (a key of :data:`mdlib.protocols.PROTOCOLS`), or a
    sentence saying why it is not known."""

    method: str
    subjects: str
    images: str
    source: str
    values: Mapping[str, float]
    protocol: str


def _eight(*v: float) -> dict[str, float]:
    values = dict(zip(EIGHT_METRICS, v))
    values["PCC"] = values["PixCorr"]     # the same computation under MindDiffuser's name
    return values


def _mindd(clip_cos: float, ssim: float, pcc: float) -> dict[str, float]:
    return {"CLIP-cos": clip_cos, "SSIM": ssim, "PCC": pcc, "PixCorr": pcc}


_MD = ("unknown: MindDiffuser's code has no image-metric script (resize, SSIM variant and the CLIP of its "
       "CLIP similarity unstated)")
_ZEBRA = "unknown: copied or recomputed by the ZEBRA paper, which does not say"

#: Published numbers (real NSD, pretrained networks): subject 1, then four-subject means (1, 2, 5, 7).
PUBLISHED: tuple[Published, ...] = (
    Published("MindEye", "1", "982", "MindEye (NeurIPS 2023)",
              _eight(.392, .347, 97.4, 98.7, 94.5, 94.3, .635, .358), "mindeye"),
    Published("MindEye2 (40 sessions)", "1", "1000", "MindEye2 (ICML 2024)",
              _eight(.374, .439, 97.9, 99.1, 96.0, 93.7, .607, .336), "mindeye"),
    Published("MindDiffuser, full", "1", "", "MindDiffuser arXiv v1, Table 2", _mindd(.765, .354, .278), _MD),
    Published("MindDiffuser, without control", "1", "", "MindDiffuser arXiv v1, Table 2",
              _mindd(.597, .253, .183), _MD),
    Published("MindDiffuser, without z", "1", "", "MindDiffuser arXiv v1, Table 2", _mindd(.616, .292, .066), _MD),
    Published("Takagi & Nishimoto (re-run by MindDiffuser)", "1", "", "MindDiffuser arXiv v1, Table 2",
              _mindd(.642, .300, .175), _MD),
    Published("Takagi & Nishimoto", "1, 2, 5, 7 (mean)", "", "as tabulated in the ZEBRA paper, Table 1",
              _eight(.246, .410, 78.9, 85.6, 83.8, 82.1, .811, .504), _ZEBRA),
    Published("Brain-Diffuser", "1, 2, 5, 7 (mean)", "", "as tabulated in the ZEBRA paper, Table 1",
              _eight(.273, .365, 94.4, 96.6, 91.3, 90.9, .728, .422), _ZEBRA),
    Published("MindEye2 (40 h)", "1, 2, 5, 7 (mean)", "", "as tabulated in the ZEBRA paper, Table 1",
              _eight(.322, .431, 96.1, 98.6, 95.4, 93.0, .619, .344), _ZEBRA),
    Published("MindEye2 (1 h)", "1, 2, 5, 7 (mean)", "", "as tabulated in the ZEBRA paper, Table 1",
              _eight(.195, .419, 84.2, 90.6, 81.2, 79.2, .810, .468), _ZEBRA),
    Published("Brain-IT (40 h)", "1, 2, 5, 7 (mean)", "", "Brain-IT (ICLR 2026)",
              _eight(.386, .486, 98.4, 99.5, 97.3, 96.4, .564, .320), "unknown: not checked against its code"),
)

PUBLISHED_HEADER = ("PUBLISHED numbers: the real NSD, pretrained evaluation networks, each paper's own test set; "
                    "each row's protocol in its 'protocol' column (docs/evaluation.md). PCC = PixCorr (one "
                    "computation). MindDiffuser's CLIP similarity: which CLIP computed it is not stated.")


def published_table(view: str = "all", rows: Iterable[Published] = PUBLISHED):
    """The published numbers as a DataFrame (metric columns of ``view`` plus subjects, images, source, protocol)."""
    import pandas as pd

    cols = VIEWS[view]
    df = pd.DataFrame([{"subjects": p.subjects, "images": p.images, "source": p.source, "protocol": p.protocol,
                        **{c: p.values.get(c, math.nan) for c in cols}} for p in rows],
                      index=[p.method for p in rows])
    df.attrs["header"] = PUBLISHED_HEADER
    return df


def beside_published(ours, label: str, view: str = "all"):
    """Our rows (a :func:`table`) above the published ones, with ``source`` and ``protocol`` columns saying which
    is which. A table, never a chart: numbers of other data or other networks are read, not drawn, beside them."""
    import pandas as pd

    # A substitute CLIP's columns get their own labelled columns: they never share one with ViT-L/14's numbers.
    labels = ours.attrs.get("labels", {})
    mine = ours.rename(columns=labels)
    mine.insert(0, "source", label)
    mine["images"] = mine["images"].astype(str)
    mine["protocol"] = ours.attrs.get("protocol", "")
    mine["subjects"] = ours.attrs.get("subjects", "")
    theirs = published_table(view)
    metric_cols = [name for c in VIEWS[view] for name in ((c, labels[c]) if c in labels else (c,))]
    cols = ["source", "protocol", "subjects", "images", *metric_cols]
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

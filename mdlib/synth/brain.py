"""A simulated brain for mini-NSD: anatomy, ROI atlases and single-trial betas from a KNOWN encoding model.

Everything a lesson later estimates from the betas (reliability, noise ceilings, decodability, retinotopy) is
fixed here in advance, so mini-NSD can check that the estimates come out right.

Anatomy (per subject, on the func1pt8mm grid scaled by ``grid_scale``; voxel size stays 1.8 mm)
    Two ellipsoidal hemispheres separated by a midline fissure; cortex = the outer ~2 voxels of each
    hemisphere (medial faces included), white matter inside, CSF around. Each cortical voxel gets map
    coordinates on its hemisphere: ``theta`` (degrees from the occipital pole, which points to -Y) and ``phi``
    (degrees around the pole axis: 0 = medial horizontal, i.e. the calcarine sulcus; +90 dorsal; -90 ventral;
    +-180 lateral). Visual areas are bands in (theta, phi), arranged as in human cortex: V1 around the
    calcarine, V2/V3 dorsal and ventral of it, hV4/VO/PHC ventral, LO/TO lateral, V3A/V3B/IPS dorsal, FEF
    frontal.

Encoding model (per voxel, deterministic given the seed)
    ``signal[i, v] = signal_sd[v] * zscore_i( sqrt(m_v) z(low_v(i)) + sqrt(1 - m_v) z(sem_v(i)) )``

    - ``low_v``: a Gaussian population receptive field (pRF; centre from retinotopy, size growing with
      eccentricity and along the hierarchy) pooling 8 low-level feature maps of the rendered image:
      luminance, red-green, blue-yellow, local contrast and orientation energy at 0/45/90/135 degrees, with
      voxel-specific weights (orientation preference, colour-opponent sign) whose mix depends on the area.
    - ``sem_v``: semantic tuning: each object inside the voxel's (large) receptive field adds a weight for its
      shape category and its colour name, scaled by its size; scene-selective areas (PHC) also weight the
      background colour and texture; parietal areas weight object presence (position).
    - scenes with a large-scale layout (:class:`mdlib.synth.scenes.Layout`; none in the default mini-NSD)
      reach the same two pathways. The low-level one needs nothing new: the boundary is in the feature maps
      (luminance, colour, contrast and orientation change along it). In the scene-selective weights, each
      region's colour and texture weigh in by the share of the image it covers (one region: share 1, the
      weights above), and the layout's geometry adds a term of its own, as scene-selective cortex encodes
      the spatial layout of a scene, the place and slant of its large boundaries, besides its surfaces
      (:func:`_layout_drive`).
    - ``m_v``: the low-level share, 1 in V1 falling to ~0.3 in ventral areas.
    - z-scoring is over the subject's own images, so ``signal_sd`` is exactly the sd of the noiseless response
      across those images (percent signal change).

Single-trial betas, in percent signal change (%)::

    beta[t, v] = gain[s, v] * (baseline[v] + signal[image(t), v] + noise[t, v]) + offset[s, v]

with ``noise ~ N(0, noise_sd[v]^2)`` (a fraction ``noise_shared`` of its variance shared by all voxels on a
trial, like NSD's global fluctuations) and a per-session, per-voxel gain and offset (``s`` = session): the
drifts that per-session z-scoring removes. Repeats of an image differ only by noise.
So the NSD-style noise-ceiling SNR is ``ncsnr = signal_sd / noise_sd``; the expected correlation between two
single trials of the same images (split-half reliability) is ``ncsnr^2 / (1 + ncsnr^2)``; NSD's noise ceiling
for the average of n trials is ``100 * ncsnr^2 / (ncsnr^2 + 1/n)`` percent.

docs/mini_world.md, "The simulated brains", describes it for the lessons' readers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from mdlib.nsd import layout
from mdlib.synth import scenes as _scenes

# ------------------------------------------------------------------------------------------- atlas labels

#: Label names of each ROI atlas, in label order (label value = index + 1), as in NSD's ``.mgz.ctab`` files.
KASTNER2015 = ("V1v", "V1d", "V2v", "V2d", "V3v", "V3d", "hV4", "VO1", "VO2", "PHC1", "PHC2", "TO2", "TO1",
               "LO2", "LO1", "V3B", "V3A", "IPS0", "IPS1", "IPS2", "IPS3", "IPS4", "IPS5", "SPL1", "FEF")
PRF_VISUALROIS = ("V1v", "V1d", "V2v", "V2d", "V3v", "V3d", "hV4")
STREAMS = ("early", "midventral", "midlateral", "midparietal", "ventral", "lateral", "parietal")
ROI_LABELS = {
    "nsdgeneral": ("nsdgeneral",),
    "prf-visualrois": PRF_VISUALROIS,
    "Kastner2015": KASTNER2015,
    "streams": STREAMS,
}
assert tuple(ROI_LABELS) == layout.ROI_ATLASES

# Where each true area lies on a hemisphere's map: (phi ranges in degrees, theta range in degrees).
# phi: 0 medial horizontal (calcarine), +90 dorsal, -90 ventral, +-180 lateral; theta: 0 at the occipital pole.
_AREA_MAP = {
    "V1v": ([(-30, 0)], (0, 60)), "V1d": ([(0, 30)], (0, 60)),
    "V2v": ([(-60, -30)], (0, 60)), "V2d": ([(30, 60)], (0, 60)),
    "V3v": ([(-90, -60)], (0, 60)), "V3d": ([(60, 90)], (0, 60)),
    "hV4": ([(-125, -90)], (10, 58)),
    "VO1": ([(-125, -90)], (58, 68)), "VO2": ([(-125, -90)], (68, 78)),
    "PHC1": ([(-90, -50)], (60, 70)), "PHC2": ([(-90, -50)], (70, 82)),
    "LO1": ([(130, 160)], (15, 42)), "LO2": ([(130, 160)], (42, 58)),
    "TO1": ([(160, 180.1), (-180.1, -160)], (42, 58)), "TO2": ([(160, 180.1), (-180.1, -160)], (58, 72)),
    "V3A": ([(90, 115)], (8, 48)), "V3B": ([(115, 130)], (8, 48)),
    "IPS0": ([(90, 130)], (48, 58)), "IPS1": ([(90, 130)], (58, 66)), "IPS2": ([(90, 130)], (66, 74)),
    "IPS3": ([(90, 130)], (74, 82)), "IPS4": ([(90, 130)], (82, 90)), "IPS5": ([(90, 130)], (90, 98)),
    "SPL1": ([(45, 90)], (62, 88)),
    "FEF": ([(100, 150)], (132, 150)),
}
_STREAM_MAP = {
    "early": ([(-90, 90)], (0, 60)),
    "midventral": ([(-135, -90)], (0, 58)),
    "midlateral": ([(125, 180.1), (-180.1, -155)], (0, 45)),
    "midparietal": ([(90, 125)], (0, 48)),
    "ventral": ([(-155, -50)], (58, 88)),
    "lateral": ([(125, 180.1), (-180.1, -155)], (45, 80)),
    "parietal": ([(40, 125)], (48, 95)),
}
#: nsdgeneral: the posterior visual cap, theta below this (degrees).
_NSDGENERAL_THETA = 80.0
#: prf-visualrois only reaches as far into the periphery as the pRF-mapping stimulus did (theta, degrees).
_PRF_MAPPED_THETA = 55.0

# Early areas with a retinotopic map: (hemifield half: +1 lower/dorsal, -1 upper/ventral; polar-angle
# direction: True if angle runs from the horizontal meridian (f=0) to the vertical one (f=1)).
_RETINOTOPIC = {
    "V1v": (-1, True), "V1d": (+1, True), "V2v": (-1, False), "V2d": (+1, False),
    "V3v": (-1, True), "V3d": (+1, True), "hV4": (-1, False), "V3A": (+1, False), "V3B": (+1, True),
}

# Per-area encoding properties:
#   mix: low-level share of the signal variance; ncsnr: mean single-trial noise-ceiling SNR (times snr_scale);
#   s0, s1: pRF size (sd, fraction of the image side) = s0 + s1 * eccentricity;
#   w: low-level weights (luminance, colour-opponent, contrast, orientation) scales;
#   sem: semantic gains (shape, colour, background/texture, object presence).
_AREA_PROPS = {}
for _n in ("V1v", "V1d"):
    _AREA_PROPS[_n] = dict(mix=1.0, ncsnr=0.65, s0=0.02, s1=0.10, w=(0.3, 0.25, 1.0, 1.0), sem=(0, 0, 0, 0))
for _n in ("V2v", "V2d"):
    _AREA_PROPS[_n] = dict(mix=0.95, ncsnr=0.65, s0=0.025, s1=0.14, w=(0.3, 0.3, 1.0, 0.9), sem=(.3, .5, 0, 0))
for _n in ("V3v", "V3d"):
    _AREA_PROPS[_n] = dict(mix=0.9, ncsnr=0.6, s0=0.03, s1=0.2, w=(0.3, 0.4, 1.0, 0.8), sem=(.4, .6, 0, 0))
_AREA_PROPS["hV4"] = dict(mix=0.6, ncsnr=0.6, s0=0.05, s1=0.3, w=(0.3, 1.0, 0.6, 0.4), sem=(0.4, 1.0, 0, 0))
for _n in ("VO1", "VO2"):
    _AREA_PROPS[_n] = dict(mix=0.3, ncsnr=0.5, s0=0.2, s1=0.0, w=(0.2, 0.8, 0.5, 0.3), sem=(0.8, 1.0, .2, 0))
for _n in ("PHC1", "PHC2"):
    _AREA_PROPS[_n] = dict(mix=0.3, ncsnr=0.5, s0=0.25, s1=0.0, w=(0.5, 0.5, 0.5, 0.5), sem=(0.3, 0.3, 1, 0))
for _n in ("LO1", "LO2"):
    _AREA_PROPS[_n] = dict(mix=0.45, ncsnr=0.6, s0=0.08, s1=0.35, w=(0.2, 0.3, 0.8, 0.8), sem=(1, 0.5, 0, .2))
for _n in ("TO1", "TO2"):
    _AREA_PROPS[_n] = dict(mix=0.4, ncsnr=0.45, s0=0.2, s1=0.0, w=(0.3, 0.2, 1.0, 0.6), sem=(0.6, 0.4, 0, .5))
for _n in ("V3A", "V3B"):
    _AREA_PROPS[_n] = dict(mix=0.7, ncsnr=0.5, s0=0.05, s1=0.3, w=(0.3, 0.3, 1.0, 0.7), sem=(0.3, 0.3, 0, .5))
for _k, _n in enumerate(("IPS0", "IPS1", "IPS2", "IPS3", "IPS4", "IPS5")):
    _AREA_PROPS[_n] = dict(mix=0.5, ncsnr=0.45 - 0.05 * _k, s0=0.2, s1=0.0, w=(0.2, 0.2, 1.0, 0.4),
                           sem=(0.3, 0.1, 0, 1.0))
_AREA_PROPS["SPL1"] = dict(mix=0.4, ncsnr=0.2, s0=0.3, s1=0.0, w=(0.2, 0.2, 1.0, 0.3), sem=(0.2, 0.1, 0, 1))
_AREA_PROPS["FEF"] = dict(mix=0.3, ncsnr=0.15, s0=0.3, s1=0.0, w=(0.2, 0.2, 1.0, 0.3), sem=(0.2, 0.1, 0, 1))
#: Visual cortex outside every labelled area but inside nsdgeneral: weak, broad responses (partial volume).
_UNLABELLED_VISUAL = dict(mix=0.5, ncsnr=0.12, s0=0.3, s1=0.0, w=(0.3, 0.3, 1.0, 0.5), sem=(0.3, 0.3, .3, .3))
assert set(_AREA_PROPS) == set(KASTNER2015) == set(_AREA_MAP)

#: The low-level feature channels of :func:`low_level_feature_maps`, in order.
FEATURE_CHANNELS = ("luminance", "red-green", "blue-yellow", "contrast", "ori0", "ori45", "ori90", "ori135")
_ECC_MAX = 0.6  # eccentricity (fraction of the image side) at the anterior edge of V1-V3's map
_CORTEX_DEPTH = 2.5  # voxels: cortical ribbon thickness (distance from the hemisphere's surface)


# --------------------------------------------------------------------------------------------------- grid

def subject_grid(subject: int, grid_scale: float) -> tuple[int, int, int]:
    """The (X, Y, Z) grid of a subject: NSD's func1pt8mm grid (``layout.NSD_GRIDS``) times ``grid_scale``."""
    if int(subject) not in layout.NSD_GRIDS:
        raise ValueError(f"mini-NSD simulates subjects with a known func1pt8mm grid {tuple(layout.NSD_GRIDS)}; "
                         f"got subject {subject!r}")
    dims = tuple(max(1, int(round(d * float(grid_scale)))) for d in layout.NSD_GRIDS[int(subject)])
    if min(dims) < 12:
        raise ValueError(f"grid_scale={grid_scale} gives subject {subject} a {dims} grid; each side must be at "
                         "least 12 voxels for the anatomy and ROIs to fit (use grid_scale >= 0.16)")
    return dims


nsd_affine = layout.nsd_affine

def _smooth_field(rng: np.random.Generator, dims, sigma: float) -> np.ndarray:
    """A smooth Gaussian random field with mean 0 and sd 1 over the grid, (X, Y, Z) float32."""
    f = ndimage.gaussian_filter(rng.standard_normal(dims).astype(np.float32), sigma, mode="wrap")
    return ((f - f.mean()) / (f.std() + 1e-12)).astype(np.float32)


# ----------------------------------------------------------------------------------------------- anatomy

@dataclass
class Anatomy:
    """A subject's simulated anatomy on its func1pt8mm grid. Volumes are (X, Y, Z) in NIfTI voxel order.

    ``brainmask`` (bool): brain incl. CSF; ``cortex`` (bool): the cortical ribbon; ``white`` (bool): white
    matter; ``hemi`` (int8): -1 left (x < 0, RAS), +1 right, 0 elsewhere; ``theta``, ``phi`` (float32,
    degrees, NaN off cortex): map coordinates (see the module docstring); ``t1``, ``mean`` (int16): a
    T1-weighted image and a mean EPI image; ``affine`` (4, 4).
    """

    dims: tuple[int, int, int]
    affine: np.ndarray
    brainmask: np.ndarray
    cortex: np.ndarray
    white: np.ndarray
    hemi: np.ndarray
    theta: np.ndarray
    phi: np.ndarray
    t1: np.ndarray
    mean: np.ndarray


def make_anatomy(dims, rng: np.random.Generator) -> Anatomy:
    """Build the anatomy for a grid ``dims`` = (X, Y, Z); random shape details come from ``rng``."""
    dims = tuple(int(d) for d in dims)
    X, Y, Z = dims
    c = (np.asarray(dims, float) - 1) / 2
    ii, jj, kk = np.meshgrid(*(np.arange(d, dtype=np.float32) for d in dims), indexing="ij")
    # Brain half-extents (voxels): the func grids are cropped tightly around the brain, as NSD's are.
    bx, by, bz = 0.45 * X, 0.44 * Y, 0.41 * Z
    gap = 0.5  # half-width of the interhemispheric fissure (voxels)
    ax = (bx - gap) / 2
    bump = 0.04 * _smooth_field(rng, dims, 1.5)  # a slightly irregular outer surface
    brain_r = np.sqrt(((ii - c[0]) / (bx + 1)) ** 2 + ((jj - c[1]) / (by + 1)) ** 2 + ((kk - c[2]) / (bz + 1)) ** 2)
    brainmask = brain_r <= 1.0 + bump
    hemi = np.zeros(dims, np.int8)
    theta = np.full(dims, np.nan, np.float32)
    phi = np.full(dims, np.nan, np.float32)
    cortex = np.zeros(dims, bool)
    white = np.zeros(dims, bool)
    for side in (-1, +1):
        hc = c[0] + side * (gap + ax)
        q = np.stack([(ii - hc) / ax, (jj - c[1]) / by, (kk - c[2]) / bz])
        r = np.sqrt((q ** 2).sum(0))
        inside = (r <= 1.0 + bump) & brainmask
        # depth from the surface (voxels), per hemisphere so that the medial wall is cortex too
        depth = ndimage.distance_transform_edt(np.pad(inside, 1))[1:-1, 1:-1, 1:-1]
        ribbon = inside & (depth < _CORTEX_DEPTH)
        hemi[inside] = side
        cortex |= ribbon
        white |= inside & ~ribbon
        u = q / np.maximum(r, 1e-6)
        medial = -side * u[0]  # the component pointing toward the midline
        th = np.degrees(np.arccos(np.clip(-u[1], -1, 1)))  # angle from the occipital pole (-Y)
        ph = np.degrees(np.arctan2(u[2], medial))
        theta[ribbon], phi[ribbon] = th[ribbon], ph[ribbon]
    # ventricles: CSF in the middle of each hemisphere's white matter
    vent = (((ii - c[0]) / (0.28 * bx)) ** 2 + ((jj - c[1] - 0.05 * Y) / (0.3 * by)) ** 2
            + ((kk - c[2] - 0.05 * Z) / (0.15 * bz)) ** 2) <= 1
    white &= ~vent
    csf = brainmask & ~cortex & ~white

    # T1-weighted: white > grey > CSF, skull dark, scalp bright-ish; smooth bias field and a little noise.
    head_r = np.sqrt(((ii - c[0]) / (0.5 * X + 1)) ** 2 + ((jj - c[1]) / (0.5 * Y + 1)) ** 2
                     + ((kk - c[2]) / (0.5 * Z + 1.5)) ** 2)
    head = (head_r <= 1.0) | brainmask
    t1 = np.zeros(dims, np.float32)
    t1[head] = 650.0  # scalp
    skull = head & ~brainmask & (ndimage.distance_transform_edt(~brainmask) <= 1.5)
    t1[skull] = 150.0
    t1[csf] = 250.0
    t1[cortex] = 700.0
    t1[white] = 1100.0
    t1 = ndimage.gaussian_filter(t1, 0.5)  # partial-volume blur
    t1 *= 1.0 + 0.08 * _smooth_field(rng, dims, 4.0)
    t1 += 20.0 * rng.standard_normal(dims).astype(np.float32)
    t1[~head] = 0.0
    # Mean EPI: CSF bright (T2*), grey > white, signal dropout near the ventral-anterior brain (sinuses).
    epi = np.zeros(dims, np.float32)
    epi[white], epi[cortex], epi[csf] = 900.0, 1150.0, 1500.0
    epi = ndimage.gaussian_filter(epi, 0.7)
    drop = np.exp(-(((jj - (c[1] + 0.35 * Y)) / (0.2 * Y)) ** 2 + ((kk - (c[2] - 0.3 * Z)) / (0.2 * Z)) ** 2))
    epi *= (1.0 - 0.6 * drop) * (1.0 + 0.1 * _smooth_field(rng, dims, 4.0))
    epi += 15.0 * rng.standard_normal(dims).astype(np.float32)
    epi[~head] = 0.0
    epi[head & ~brainmask] *= 0.15
    return Anatomy(dims=dims, affine=nsd_affine(dims), brainmask=brainmask, cortex=cortex, white=white,
                   hemi=hemi * (cortex | white), theta=theta, phi=phi,
                   t1=np.clip(np.rint(t1), 0, 32767).astype(np.int16),
                   mean=np.clip(np.rint(epi), 0, 32767).astype(np.int16))


def _in_map(theta, phi, phi_ranges, theta_range) -> np.ndarray:
    ok = (theta >= theta_range[0]) & (theta < theta_range[1])
    in_phi = np.zeros_like(ok)
    for lo, hi in phi_ranges:
        in_phi |= (phi >= lo) & (phi < hi)
    return ok & in_phi


def _label_map(theta, phi, cortex, names, table) -> np.ndarray:
    """int16 (X, Y, Z): -1 outside cortex, 0 unlabelled cortex, k+1 where ``names[k]``'s map region holds."""
    vol = np.where(cortex, 0, -1).astype(np.int16)
    th, ph = np.nan_to_num(theta, nan=-1e3), np.nan_to_num(phi, nan=-1e3)
    for k, name in enumerate(names):
        sel = cortex & (vol == 0) & _in_map(th, ph, *table[name])
        vol[sel] = k + 1
    return vol


def true_areas(anat: Anatomy) -> np.ndarray:
    """The simulation's true visual areas, int16 (X, Y, Z): -1 off cortex, 0 none, k = KASTNER2015[k-1]."""
    return _label_map(anat.theta, anat.phi, anat.cortex, KASTNER2015, _AREA_MAP)


def make_rois(anat: Anatomy, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The four ROI atlases of NSD as int16 volumes (X, Y, Z): -1 outside cortex, 0 unlabelled, 1..N labels.

    Like the real atlases, each is an *estimate* of the true areas: the boundaries of Kastner2015 and
    prf-visualrois are jittered by different smooth fields (a few degrees of map angle), and prf-visualrois
    covers only the part of the visual field its mapping stimulus reached. So their union differs from either.
    """
    d = anat.dims
    out = {}
    th_g = anat.theta + 3.0 * _smooth_field(rng, d, 2.0)
    out["nsdgeneral"] = np.where(anat.cortex, 0, -1).astype(np.int16)
    out["nsdgeneral"][anat.cortex & (th_g < _NSDGENERAL_THETA)] = 1
    jitter = {name: (4.0 * _smooth_field(rng, d, 2.0), 3.0 * _smooth_field(rng, d, 2.0))
              for name in ("prf-visualrois", "Kastner2015", "streams")}
    prf_table = {n: (_AREA_MAP[n][0], (_AREA_MAP[n][1][0], min(_AREA_MAP[n][1][1], _PRF_MAPPED_THETA)))
                 for n in PRF_VISUALROIS}
    for name, names, table in (("prf-visualrois", PRF_VISUALROIS, prf_table),
                               ("Kastner2015", KASTNER2015, _AREA_MAP),
                               ("streams", STREAMS, _STREAM_MAP)):
        dphi, dth = jitter[name]
        out[name] = _label_map(anat.theta + dth, anat.phi + dphi, anat.cortex, names, table)
    return out


def ctab_text(atlas: str) -> str:
    """The ``<atlas>.mgz.ctab`` text: '0 Unknown' then one 'N name' line per label."""
    if atlas not in ROI_LABELS:
        raise ValueError(f"atlas must be one of {tuple(ROI_LABELS)}, got {atlas!r}")
    return "".join(f"{k} {n}\n" for k, n in enumerate(("Unknown",) + ROI_LABELS[atlas]))


# ---------------------------------------------------------------------------------------- image features

def _pool_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) area-averaging matrix: output bin r averages input pixels over [r, r+1) * n_in / n_out."""
    edges = np.linspace(0, n_in, n_out + 1)
    lo = np.maximum(edges[:-1, None], np.arange(n_in)[None, :])
    hi = np.minimum(edges[1:, None], np.arange(1, n_in + 1)[None, :])
    w = np.clip(hi - lo, 0, None)
    return (w / w.sum(1, keepdims=True)).astype(np.float32)


def low_level_feature_maps(images: np.ndarray, res: int = 32, batch: int = 128) -> np.ndarray:
    """Low-level feature maps of images: (n, 8, res, res) float32, channels :data:`FEATURE_CHANNELS`.

    ``images``: (n, S, S, 3) uint8. Channels: luminance, red-green and blue-yellow opponency (all in 0..1
    units), local contrast (|luminance - its Gaussian blur|), and orientation energy (modulus of an analytic,
    i.e. quadrature-pair, log-Gabor filter centred on 12 cycles/image) for edges at 0, 45, 90, 135 degrees
    (counter-clockwise on screen; ori0 = horizontal edges). Each map is area-averaged down to res x res.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] != images.shape[2]:
        raise ValueError(f"images must be (n, S, S, 3), got {images.shape}")
    n, S = images.shape[0], images.shape[1]
    res = min(int(res), S)
    P = _pool_matrix(S, res)
    f = np.fft.fftfreq(S) * S  # cycles per image
    fx, fy_rows = np.meshgrid(f, f, indexing="xy")
    fy = -fy_rows  # screen "up" is decreasing row index
    fr = np.hypot(fx, fy)
    f0 = min(12.0, S / 4)
    radial = np.exp(-0.5 * (np.log(np.maximum(fr, 1e-6) / f0) / 0.45) ** 2) * (fr > 0)
    ang = np.arctan2(fy, fx)
    filters = []
    for edge_deg in (0, 45, 90, 135):
        # an edge at angle a modulates luminance along a + 90 degrees; keep one side of the frequency plane
        # (an analytic filter), so the modulus of the complex response is the quadrature energy.
        a = np.deg2rad(edge_deg + 90)
        dang = np.angle(np.exp(1j * (ang - a)))
        filters.append(radial * np.exp(-0.5 * (dang / 0.45) ** 2))
    filters = np.stack(filters).astype(np.float32)
    blur = np.exp(-2 * (np.pi * fr / S * (S / 24)) ** 2).astype(np.float32)  # Gaussian, sd S/24 pixels
    out = np.empty((n, len(FEATURE_CHANNELS), res, res), np.float32)
    for s0 in range(0, n, batch):
        x = images[s0:s0 + batch].astype(np.float32) / 255.0
        R, G, B = x[..., 0], x[..., 1], x[..., 2]
        L = 0.299 * R + 0.587 * G + 0.114 * B
        maps = [L, R - G, B - 0.5 * (R + G)]
        FL = np.fft.fft2(L)
        maps.append(np.abs(L - np.fft.ifft2(FL * blur).real))
        for h in filters:
            maps.append(np.abs(np.fft.ifft2(FL * h)))
        for c, m in enumerate(maps):
            out[s0:s0 + batch, c] = P @ m.astype(np.float32) @ P.T
    return out


# ---------------------------------------------------------------------------------------- the brain itself

@dataclass
class SimulatedBrain:
    """One subject's simulated brain: anatomy, ROIs and the encoding model's ground truth.

    Voxel-wise arrays over the brain are indexed by ``voxels``: the flat (C-order, NIfTI (X, Y, Z)) indices
    of ``anat.brainmask``. ``signal``: (n_images, n_brain) float32, the noiseless response (%) to each of the
    subject's images (rows in the order given to :func:`simulate_brain`, i.e. the subject's ``subjectim``
    columns). Others are (n_brain,) float32 in percent signal change unless said: ``signal_sd``,
    ``noise_sd``, ``ncsnr`` (ratio), ``baseline``, ``prf_x``, ``prf_y``, ``prf_sigma`` (fractions of the
    image side; NaN without a pRF), ``lowlevel_fraction``; ``area`` (int16, true Kastner2015 label, 0 none).
    """

    subject: int
    anat: Anatomy
    rois: dict
    voxels: np.ndarray
    area: np.ndarray
    signal: np.ndarray
    signal_sd: np.ndarray
    noise_sd: np.ndarray
    baseline: np.ndarray
    prf_x: np.ndarray
    prf_y: np.ndarray
    prf_sigma: np.ndarray
    lowlevel_fraction: np.ndarray
    noise_shared: float
    drift_sd: float
    gain_sd: float
    seed_key: tuple = field(default=())

    @property
    def ncsnr(self) -> np.ndarray:
        """signal_sd / noise_sd per brain voxel: NSD's noise-ceiling SNR of single trials."""
        return (self.signal_sd / self.noise_sd).astype(np.float32)

    @property
    def reliability(self) -> np.ndarray:
        """Expected correlation across images between two single-trial responses: ncsnr^2 / (1 + ncsnr^2)."""
        s = self.ncsnr.astype(np.float64) ** 2
        return (s / (1 + s)).astype(np.float32)

    def noise_ceiling(self, n_trials: int) -> np.ndarray:
        """NSD's noise ceiling (%) for responses averaged over ``n_trials``: 100 ncsnr^2 / (ncsnr^2 + 1/n)."""
        s = self.ncsnr.astype(np.float64) ** 2
        return (100 * s / (s + 1.0 / n_trials)).astype(np.float32)

    def session_drift(self, session: int) -> tuple[np.ndarray, np.ndarray]:
        """(gain, offset) of a session (1-based), each (n_brain,) float32: smooth in space, new each session.

        Gains are about exp(N(0, gain_sd)); offsets are in % with sd ``drift_sd`` (half shared by the whole
        brain, half a smooth spatial pattern), like scanner drift between NSD sessions.
        """
        rng = np.random.default_rng(self.seed_key + (1, int(session)))
        d = self.anat.dims
        gain = np.exp(self.gain_sd * _smooth_field(rng, d, 3.0).ravel()[self.voxels])
        offset = self.drift_sd * (np.sqrt(0.5) * rng.standard_normal()
                                  + np.sqrt(0.5) * _smooth_field(rng, d, 3.0).ravel()[self.voxels])
        return gain.astype(np.float32), offset.astype(np.float32)

    def session_betas(self, columns: np.ndarray, session: int) -> np.ndarray:
        """Single-trial betas of one session: (n_brain, T) float32 percent signal change.

        ``columns``: (T,) 0-based rows of ``signal`` (the image shown on each trial, i.e. masterordering - 1).
        The noise is drawn from a generator keyed by (seed, subject, session), so a session's betas do not
        depend on which other sessions or subjects are written.
        """
        columns = np.asarray(columns, int)
        rng = np.random.default_rng(self.seed_key + (2, int(session)))
        T = columns.size
        nv = self.voxels.size
        # independent noise per voxel plus one trial-wise fluctuation common to all voxels; total sd noise_sd
        sd_indep = self.noise_sd * np.sqrt(1 - self.noise_shared)
        sd_shared = self.noise_sd * np.sqrt(self.noise_shared)
        noise = rng.standard_normal((nv, T), dtype=np.float32) * sd_indep[:, None]
        noise += sd_shared[:, None] * rng.standard_normal(T).astype(np.float32)[None, :]
        gain, offset = self.session_drift(session)
        resp = self.baseline[:, None] + self.signal[columns].T + noise
        return gain[:, None] * resp + offset[:, None]

    def volume(self, values: np.ndarray, fill=0) -> np.ndarray:
        """Scatter (n_brain, ...) values into a (X, Y, Z, ...) volume, ``fill`` outside the brain."""
        values = np.asarray(values)
        out = np.full((int(np.prod(self.anat.dims)),) + values.shape[1:], fill, dtype=values.dtype)
        out[self.voxels] = values
        return out.reshape(self.anat.dims + values.shape[1:])


def _zscore_cols(a: np.ndarray) -> np.ndarray:
    """z-score each column over rows (population sd); columns with no variance become 0."""
    a = a - a.mean(0, keepdims=True)
    sd = a.std(0, keepdims=True)
    return np.where(sd > 1e-8, a / np.maximum(sd, 1e-12), 0.0).astype(np.float32)


def layout_geometry(arrays) -> np.ndarray:
    """(n, 3 x len(LAYOUT_KINDS)) float32: each scene's layout geometry as the scene-selective pathway sees
    it, from :func:`mdlib.synth.scenes.scene_arrays`' ``layout_*`` arrays. Per kind (columns 3k..3k+2 for
    ``LAYOUT_KINDS[k]``): 1 (the kind is present), the boundary's position and its tilt, each standardised by
    the range they are drawn from (uniform, so divided by its sd: range / sqrt(12)); zeros for the other kind
    and for scenes without a layout."""
    kinds = np.asarray(arrays["layout_kind"])
    out = np.zeros((kinds.size, 3 * len(_scenes.LAYOUT_KINDS)), np.float32)
    lo, hi = _scenes.LAYOUT_POSITION_RANGE
    sd_pos = (hi - lo) / np.sqrt(12.0)
    sd_tilt = 2 * _scenes.LAYOUT_MAX_TILT / np.sqrt(12.0)
    for i in np.flatnonzero(kinds >= 0):
        k = 3 * int(kinds[i])
        out[i, k:k + 3] = (1.0, (arrays["layout_position"][i] - 0.5 * (lo + hi)) / sd_pos,
                           arrays["layout_tilt"][i] / sd_tilt)
    return out


def _layout_drive(sem: np.ndarray, arr: dict, Bg: np.ndarray, Tx: np.ndarray, scene_gain: np.ndarray,
                  key: tuple) -> np.ndarray:
    """The scene-selective drive ``sem`` (n, n_sig) with the rows of scenes that have a layout replaced.

    Surfaces: a voxel tuned to background colours and textures (``Bg``, ``Tx``: (n_sig, n_colours) and
    (n_sig, n_textures)) responds to each region's by the share of the image the region covers
    (:meth:`mdlib.synth.scenes.Layout.first_area`), as it would pool a surface over its large receptive field.
    Geometry: a linear tuning to :func:`layout_geometry`, with weights N(0, 1) times the voxel's
    scene-selective gain (``scene_gain``, (n_sig,): the background gain of ``_AREA_PROPS``), the same scale as
    its tuning to one background colour. The weights come from a generator of their own, keyed by the
    subject's ``key`` and 3, so no other draw of the brain changes: a scene without a layout gets exactly the
    response it had before layouts existed.
    """
    rows = np.flatnonzero(np.asarray(arr["layout_kind"]) >= 0)
    if rows.size == 0:
        return sem
    share = np.array([_scenes.layout_from_arrays(arr, int(i)).first_area() for i in rows], np.float32)[:, None]
    first = Bg.T[arr["background"][rows]] + Tx.T[arr["texture"][rows]]
    second = Bg.T[arr["layout_colour"][rows]] + Tx.T[arr["layout_texture"][rows]]
    geometry = layout_geometry(arr)[rows]
    rng = np.random.default_rng(key + (3,))
    G = rng.standard_normal((scene_gain.size, geometry.shape[1])).astype(np.float32) * scene_gain[:, None]
    sem = sem.copy()
    sem[rows] = share * first + (1.0 - share) * second + geometry @ G.T
    return sem


def simulate_brain(subject: int, dims, images: np.ndarray, scene_list: list, seed: int,
                   snr_scale: float = 1.0, noise_shared: float = 0.1, drift_sd: float = 4.0,
                   gain_sd: float = 0.15, feature_res: int = 32) -> SimulatedBrain:
    """Build subject ``subject``'s brain on grid ``dims`` and its noiseless responses to ``images``.

    ``images``: (n, S, S, 3) uint8, the subject's images in ``subjectim`` column order; ``scene_list``: the
    :class:`~mdlib.synth.scenes.Scene` of each. ``snr_scale`` multiplies every voxel's ncsnr (1.0: NSD-like
    0.2-0.9 in visual cortex). ``noise_shared``: fraction of noise variance common to all voxels of a trial.
    ``drift_sd`` (%) and ``gain_sd`` (log units): per-session offsets and gains. Randomness is keyed by
    (seed, subject), so a subject's brain does not depend on which other subjects are simulated.
    """
    if snr_scale < 0:
        raise ValueError(f"snr_scale must be >= 0, got {snr_scale}")
    if not 0 <= noise_shared < 1:
        raise ValueError(f"noise_shared is a fraction of the noise variance in [0, 1), got {noise_shared}")
    key = (int(seed), 7919, int(subject))
    rng = np.random.default_rng(key + (0,))
    anat = make_anatomy(dims, rng)
    rois = make_rois(anat, rng)
    areas = true_areas(anat)
    voxels = np.flatnonzero(anat.brainmask)
    nv = voxels.size
    area = areas.ravel()[voxels]
    cortex = anat.cortex.ravel()[voxels]
    theta = anat.theta.ravel()[voxels]
    phi = anat.phi.ravel()[voxels]
    hemi = anat.hemi.ravel()[voxels]
    visual = cortex & (rois["nsdgeneral"].ravel()[voxels] == 1)

    # Noise level (%): smooth across the brain, a little higher in cortex than in white matter.
    noise_sd = (3.5 + 0.5 * cortex) * np.exp(0.2 * _smooth_field(rng, dims, 2.5).ravel()[voxels])
    baseline = np.where(cortex, 0.5, 0.0) + 0.4 * _smooth_field(rng, dims, 2.0).ravel()[voxels]
    ncsnr_jitter = np.exp(0.3 * _smooth_field(rng, dims, 1.5).ravel()[voxels])

    # Which voxels carry signal, with which properties.
    props = [None] * nv
    for v in np.flatnonzero(cortex):
        if area[v] > 0:
            props[v] = _AREA_PROPS[KASTNER2015[area[v] - 1]]
        elif visual[v]:
            props[v] = _UNLABELLED_VISUAL
    sig = np.array([p is not None for p in props])
    sv = np.flatnonzero(sig)

    # pRFs: retinotopic in early areas (contralateral hemifield; dorsal -> lower field, ventral -> upper),
    # coarse and large elsewhere. Coordinates: fractions of the image side, x from the left, y from the top.
    prf_x = np.full(nv, np.nan, np.float32)
    prf_y = np.full(nv, np.nan, np.float32)
    prf_s = np.full(nv, np.nan, np.float32)
    for v in sv:
        p = props[v]
        side = -int(hemi[v])  # left hemisphere (-1) sees the right visual field (+1)
        name = KASTNER2015[area[v] - 1] if area[v] > 0 else ""
        if name in _RETINOTOPIC:
            half, h_to_v = _RETINOTOPIC[name]
            lo, hi = _AREA_MAP[name][0][0]
            th_hi = _AREA_MAP[name][1][1]
            frac = np.clip((abs(phi[v]) - min(abs(lo), abs(hi))) / abs(hi - lo), 0, 1)
            alpha = np.deg2rad(90 * (frac if h_to_v else 1 - frac))
            # Eccentricity from the share of the map's cortical area nearer the pole (uniform over voxels),
            # raised to a power > 1: the fovea gets more cortex than the periphery (cortical magnification).
            area_frac = (1 - np.cos(np.deg2rad(theta[v]))) / (1 - np.cos(np.deg2rad(th_hi)))
            ecc = _ECC_MAX * np.clip(area_frac, 0, 1.2) ** 1.3
            jx, jy = 0.015 * rng.standard_normal(2)
            prf_x[v] = 0.5 + side * ecc * np.cos(alpha) + jx
            prf_y[v] = 0.5 + half * ecc * np.sin(alpha) + jy
            prf_s[v] = p["s0"] + p["s1"] * ecc
        else:
            half = 1 if (phi[v] > 0) else -1  # dorsal areas prefer the lower field, ventral the upper
            ecc_x, ecc_y = np.abs(rng.normal(0.12, 0.1, 2))
            prf_x[v] = 0.5 + side * ecc_x
            prf_y[v] = 0.5 + half * ecc_y
            prf_s[v] = p["s0"] * np.exp(0.2 * rng.standard_normal())
    prf_s = np.maximum(prf_s, 0.7 / min(feature_res, images.shape[1]))  # at least ~a feature pixel

    # Low-level drive: Gaussian pRF pooling of z-scored feature maps with voxel-specific channel weights.
    feats = low_level_feature_maps(images, res=feature_res)  # (n, 8, r, r)
    n, C, r, _ = feats.shape
    mu = feats.mean(axis=(0, 2, 3), keepdims=True)
    sd = feats.std(axis=(0, 2, 3), keepdims=True) + 1e-8
    feats = ((feats - mu) / sd).reshape(n, C, r * r)
    centres = (np.arange(r) + 0.5) / r
    gx, gy = np.meshgrid(centres, centres, indexing="xy")  # gx: column (x), gy: row (y)
    d2 = (gx.ravel()[None, :] - prf_x[sv, None]) ** 2 + (gy.ravel()[None, :] - prf_y[sv, None]) ** 2
    Gs = np.exp(-0.5 * d2 / prf_s[sv, None] ** 2).astype(np.float32)  # (n_sig, r*r)
    # fraction of the pRF inside the image: voxels looking mostly off-screen are less reliable, as in NSD
    coverage = Gs.sum(1) / (2 * np.pi * (prf_s[sv] * r) ** 2)
    Gs /= Gs.sum(1, keepdims=True) + 1e-12
    W = np.zeros((sv.size, C), np.float32)
    for k, v in enumerate(sv):
        w_lum, w_col, w_con, w_ori = props[v]["w"]
        pref = rng.uniform(0, np.pi)
        bias = rng.uniform(0.3, 1.0)
        ori = 0.5 + 0.5 * bias * np.cos(2 * (np.deg2rad([0, 45, 90, 135]) - pref))
        W[k] = [w_lum * rng.standard_normal(), w_col * rng.standard_normal(), w_col * rng.standard_normal(),
                w_con * (1 + 0.2 * rng.standard_normal()), *(w_ori * ori)]
    low = np.zeros((n, sv.size), np.float32)
    for c in range(C):
        low += (feats[:, c, :] @ Gs.T) * W[None, :, c]

    # Semantic drive: objects in a voxel's (large) field, weighted by shape and colour tuning and size.
    arr = _scenes.scene_arrays(list(scene_list))
    n_shapes, n_cols = len(_scenes.SHAPES), len(_scenes.COLOURS)
    gains = np.array([props[v]["sem"] for v in sv], np.float32)  # (n_sig, 4)
    A = rng.standard_normal((sv.size, n_shapes)).astype(np.float32) * gains[:, :1]
    Bc = rng.standard_normal((sv.size, n_cols)).astype(np.float32) * gains[:, 1:2]
    Bg = rng.standard_normal((sv.size, len(_scenes.BACKGROUNDS))).astype(np.float32) * gains[:, 2:3]
    Tx = rng.standard_normal((sv.size, len(_scenes.TEXTURES))).astype(np.float32) * gains[:, 2:3]
    presence = gains[:, 3] * (1 + 0.2 * rng.standard_normal(sv.size)).astype(np.float32)
    sem_sigma = np.maximum(prf_s[sv], 0.15)
    sem = Bg.T[arr["background"]] + Tx.T[arr["texture"]]  # (n, n_sig)
    if "layout_kind" in arr:   # only scenes with a layout change, with weights from a stream of their own
        sem = _layout_drive(sem, arr, Bg, Tx, gains[:, 2], key)
    for k in range(_scenes.MAX_OBJECTS):
        present = arr["shape"][:, k] >= 0
        if not present.any():
            continue
        ox, oy = np.nan_to_num(arr["x"][:, k]), np.nan_to_num(arr["y"][:, k])
        osz = np.nan_to_num(arr["size"][:, k])
        g = np.exp(-0.5 * ((ox[:, None] - prf_x[sv]) ** 2 + (oy[:, None] - prf_y[sv]) ** 2) / sem_sigma ** 2)
        g *= (np.sqrt(osz / 0.25) * present)[:, None]
        tune = A.T[np.maximum(arr["shape"][:, k], 0)] + Bc.T[np.maximum(arr["colour"][:, k], 0)] + presence
        sem += g * tune
    mix = np.array([props[v]["mix"] for v in sv], np.float32)
    drive = np.sqrt(mix) * _zscore_cols(low) + np.sqrt(1 - mix) * _zscore_cols(sem)
    z = _zscore_cols(drive)

    ncsnr = np.zeros(nv, np.float32)
    ncsnr[sv] = np.array([props[v]["ncsnr"] for v in sv]) * ncsnr_jitter[sv] * (0.35 + 0.65 * np.clip(
        coverage, 0, 1)) * float(snr_scale)
    ncsnr[sv] = np.where(z.std(0) > 0.5, ncsnr[sv], 0.0)  # a voxel with no stimulus drive has no signal
    signal_sd = (ncsnr * noise_sd).astype(np.float32)
    signal = np.zeros((n, nv), np.float32)
    signal[:, sv] = z * signal_sd[sv][None, :]
    low_frac = np.full(nv, np.nan, np.float32)
    low_frac[sv] = mix
    return SimulatedBrain(
        subject=int(subject), anat=anat, rois=rois, voxels=voxels, area=area.astype(np.int16),
        signal=signal, signal_sd=signal_sd, noise_sd=noise_sd.astype(np.float32),
        baseline=baseline.astype(np.float32), prf_x=prf_x, prf_y=prf_y, prf_sigma=prf_s,
        lowlevel_fraction=low_frac, noise_shared=float(noise_shared), drift_sd=float(drift_sd),
        gain_sd=float(gain_sd), seed_key=key,
    )

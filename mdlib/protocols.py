"""Evaluation protocols: how each group's code prepared images before the eight-metric table (docs/evaluation.md).

The metrics themselves (:mod:`mdlib.metrics`, :mod:`mdlib.evalnets`) agree with Brain-Diffuser's and MindEye's
code when fed the same arrays; the published numbers differ in what those arrays were. This module states,
per protocol, every step between a stimulus or reconstruction and the numbers compared, and implements it:

- ``"mindeye"``: MindEye 1 and 2 (``src/Reconstruction_Metrics.ipynb`` of MedARC-AI/fMRI-reconstruction-NSD,
  ``src/final_evaluations.ipynb`` of MedARC-AI/MindEyeV2). Both images go to 256 px with torchvision's
  tensor ``Resize`` (bilinear) of the pinned torchvision (0.15.2 / 0.16.0), whose tensor path did *not*
  antialias (``antialias="warn"`` meant ``None``, i.e. ``False`` for tensors), then to each network's size
  the same way; PixCorr and SSIM at 425 px; true 2-D SSIM (scikit-image 0.20 / 0.22 drop the
  ``multichannel=True`` they pass); EfficientNet-B1 ``DEFAULT`` (= ``IMAGENET1K_V2``) weights.
- ``"braindiffuser"``: Brain-Diffuser (ozcelikfu/brain-diffuser, ``scripts/eval_extract_features.py``,
  ``scripts/evaluate_reconstruction.py``). 8-bit PNGs; every network gets 224 px made by PIL bilinear
  (torchvision 0.13.1's ``resize`` of a PIL image); the reconstruction goes to 425 px with PIL's default filter
  (bicubic), the stimulus is already 425 px; SSIM with scikit-image 0.17.2 and ``multichannel=True`` on grey
  images, which is the mean over image columns of 1-D SSIMs (:func:`ssim_columns`); EfficientNet-B1
  ``IMAGENET1K_V1`` weights (``weights=True`` maps to the legacy default).
- ``"mdlib"``: this library's own default (:func:`mdlib.metrics.prepare`, :meth:`EvalNetworks.preprocess`):
  one direct resize from the image's size to the target size, bilinear with antialiasing (torch
  ``interpolate(antialias=True)``), clamped to [0, 1]; MindEye's network sizes; 2-D SSIM;
  EfficientNet-B1 ``IMAGENET1K_V2``.

Functions: :func:`pixel_images` (PixCorr/SSIM inputs), :func:`network_inputs` (a network's input before its
normalisation), :func:`ssim_columns` (old scikit-image's column-wise SSIM), :func:`ssim_grey` (either variant),
:func:`get` (a protocol's :class:`Protocol`). Pure functions of arrays: no file I/O, no network weights.

Inputs, as elsewhere in mdlib: uint8 ``(n, H, W, 3)`` arrays or tensors, or float ``(n, 3, H, W)`` in [0, 1].
A chain's step whose size the image already has is skipped (torchvision's ``resize`` returns the input
unchanged then, PIL's ``resize`` a copy, mdlib's resize the input).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType

import numpy as np
import torch
import torch.nn.functional as F

PROTOCOLS = ("mindeye", "braindiffuser", "mdlib")
#: The evaluation networks, keyed as :data:`mdlib.evalnets.NETWORKS` is.
NETWORK_KEYS = ("alexnet", "inception", "clip", "effnet", "swav")
SSIM_VARIANTS = ("2d", "columns")
CLIP_PRECISIONS = ("clip.load", "float32", "networks")
#: SSIM settings common to all three protocols (Wang et al. 2004 as scikit-image spells them).
SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5  # scikit-image's, giving an 11-sample window at sigma 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


@dataclass(frozen=True)
class Resize:
    """One resize step to ``size`` x ``size``.

    ``library``: ``"torch"`` (``torch.nn.functional.interpolate`` on float32 tensors, ``align_corners=False``,
    what torchvision's tensor ``Resize`` calls) or ``"pil"`` (``PIL.Image.resize`` on 8-bit RGB images, whose
    filters always widen with the scale factor, i.e. antialias, when shrinking; the result is 8-bit again).
    ``interpolation``: ``"bilinear"`` or ``"bicubic"``. ``source``: where the step comes from.
    """

    size: int
    interpolation: str
    antialias: bool
    library: str
    source: str = ""

    def __post_init__(self) -> None:
        if self.library not in ("torch", "pil"):
            raise ValueError(f"library must be 'torch' or 'pil', got {self.library!r}")
        if self.interpolation not in ("bilinear", "bicubic"):
            raise ValueError(f"interpolation must be 'bilinear' or 'bicubic', got {self.interpolation!r}")
        if self.library == "pil" and not self.antialias:
            raise ValueError("PIL's resize always antialiases when shrinking: antialias must be True")

    def describe(self) -> str:
        lib = "PIL Image.resize" if self.library == "pil" else "torch interpolate"
        aa = "antialiased" if self.antialias else "no antialiasing"
        return f"{self.size} px ({lib}, {self.interpolation}, {aa})"


@dataclass(frozen=True)
class Protocol:
    """Every preprocessing step of one protocol.

    Attributes:
        name, title: key in :data:`PROTOCOLS`; a readable name.
        pixel_size: the size PixCorr and SSIM compare at (NSD's 425 px in all three).
        pixel_chain: the resizes bringing either image to ``pixel_size``, in order.
        ssim: ``"2d"`` (true 2-D SSIM) or ``"columns"`` (mean of 1-D SSIMs down each column: :func:`ssim_columns`).
        network_chains: per network key (:data:`NETWORK_KEYS`), the resizes bringing an image to its input.
        effnet_weights: the torchvision ``EfficientNet_B1_Weights`` member used (``"IMAGENET1K_V1"``/``"_V2"``).
        quantize: images pass through 8 bits (PNG files) before any step; float input is converted as
            torchvision's ``to_pil_image`` does, ``(x * 255).byte()`` (truncation).
        clamp: the float result is clamped to [0, 1].
        clip_precision: the dtype CLIP ViT-L/14 ran in, as a rule: ``"clip.load"`` (OpenAI's ``clip.load``:
            float16 on a CUDA device, float32 on the CPU), ``"float32"``, or ``"networks"`` (the dtype the
            evaluation networks run in); :meth:`clip_dtype` applies it.
        sources: the files the steps were read from (docs/evaluation.md has the lines).
    """

    name: str
    title: str
    pixel_size: int
    pixel_chain: tuple[Resize, ...]
    ssim: str
    network_chains: Mapping[str, tuple[Resize, ...]]
    effnet_weights: str
    quantize: bool
    clamp: bool
    clip_precision: str
    sources: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.ssim not in SSIM_VARIANTS:
            raise ValueError(f"ssim must be one of {SSIM_VARIANTS}, got {self.ssim!r}")
        if set(self.network_chains) != set(NETWORK_KEYS):
            raise ValueError(f"network_chains must cover {NETWORK_KEYS}, got {sorted(self.network_chains)}")
        if self.clip_precision not in CLIP_PRECISIONS:
            raise ValueError(f"clip_precision must be one of {CLIP_PRECISIONS}, got {self.clip_precision!r}")
        if self.pixel_chain[-1].size != self.pixel_size:
            raise ValueError("pixel_chain must end at pixel_size")
        object.__setattr__(self, "network_chains", MappingProxyType(dict(self.network_chains)))

    def clip_dtype(self, device: torch.device | str, networks_dtype: torch.dtype) -> torch.dtype:
        """The dtype CLIP ViT-L/14 runs in under this protocol on ``device`` (see ``clip_precision``)."""
        if self.clip_precision == "clip.load":
            return torch.float16 if torch.device(device).type == "cuda" else torch.float32
        return torch.float32 if self.clip_precision == "float32" else networks_dtype

    def network_size(self, net: str) -> int:
        """The input size (px) of network ``net``."""
        return _chain(self, net)[-1].size

    @property
    def network_sizes(self) -> dict[str, int]:
        return {k: self.network_size(k) for k in NETWORK_KEYS}

    def describe(self) -> str:
        """A few lines stating the protocol (for table headers and notebooks)."""
        def chain(c: tuple[Resize, ...]) -> str:
            return " -> ".join(s.describe() for s in c)

        ssim = ("true 2-D SSIM" if self.ssim == "2d" else
                "mean over columns of 1-D SSIMs (scikit-image 0.17, multichannel=True on grey images)")
        lines = [f"{self.title} protocol" + (" (8-bit images)" if self.quantize else ""),
                 f"PixCorr/SSIM at {self.pixel_size} px: {chain(self.pixel_chain)}; SSIM: {ssim}"]
        lines += [f"{k}: {chain(_chain(self, k))}" for k in NETWORK_KEYS]
        clip = {"clip.load": "float16 on CUDA, float32 on the CPU (clip.load)", "float32": "float32",
                "networks": "the evaluation networks' dtype"}[self.clip_precision]
        lines.append(f"EfficientNet-B1 weights: {self.effnet_weights}; CLIP ViT-L/14 in {clip}")
        return "\n".join(lines)


def _chain(p: Protocol, net: str) -> tuple[Resize, ...]:
    if net not in p.network_chains:
        raise KeyError(f"unknown evaluation network {net!r}; known: {list(NETWORK_KEYS)}")
    return p.network_chains[net]


# --------------------------------------------------------------------------------------------- the three

_ME1 = "MedARC-AI/fMRI-reconstruction-NSD src/Reconstruction_Metrics.py (.ipynb twin)"
_ME2 = "MedARC-AI/MindEyeV2 src/final_evaluations.ipynb"
_ME_SIZES = {"alexnet": 256, "inception": 342, "clip": 224, "effnet": 255, "swav": 224}


def _me(size: int, what: str) -> Resize:
    return Resize(size, "bilinear", False, "torch",
                  f"{what}: transforms.Resize(..., BILINEAR) on tensors, torchvision 0.15.2/0.16.0 (no antialias)")


_MINDEYE = Protocol(
    name="mindeye",
    title="MindEye 1/2",
    pixel_size=425,
    pixel_chain=(_me(256, "both images to 256"), _me(425, "PixCorr/SSIM")),
    ssim="2d",
    network_chains={k: (_me(256, "both images to 256"), _me(s, k)) for k, s in _ME_SIZES.items()},
    effnet_weights="IMAGENET1K_V2",
    quantize=False,
    clamp=False,
    clip_precision="clip.load",
    sources=(_ME1, _ME2, "fMRI-reconstruction-NSD src/environment.yaml; MindEyeV2 src/setup.sh"),
)

_BD_NET = Resize(224, "bilinear", True, "pil",
                 "eval_extract_features.py: T.functional.resize(PIL image, (224, 224)), torchvision 0.13.1")
_BRAINDIFFUSER = Protocol(
    name="braindiffuser",
    title="Brain-Diffuser",
    pixel_size=425,
    pixel_chain=(Resize(425, "bicubic", True, "pil",
                        "evaluate_reconstruction.py: Image.open(...).resize((425, 425)), Pillow 9.2 default"),),
    ssim="columns",
    network_chains={k: (_BD_NET,) for k in NETWORK_KEYS},
    effnet_weights="IMAGENET1K_V1",
    quantize=True,
    clamp=False,
    clip_precision="float32",
    sources=("ozcelikfu/brain-diffuser scripts/eval_extract_features.py",
             "ozcelikfu/brain-diffuser scripts/evaluate_reconstruction.py", "brain-diffuser environment.yml"),
)


def _md(size: int, what: str) -> Resize:
    return Resize(size, "bilinear", True, "torch", f"mdlib {what}: interpolate(bilinear, antialias=True)")


_MDLIB = Protocol(
    name="mdlib",
    title="mdlib",
    pixel_size=425,
    pixel_chain=(_md(425, "metrics.prepare"),),
    ssim="2d",
    network_chains={k: (_md(s, "EvalNetworks.preprocess"),) for k, s in _ME_SIZES.items()},
    effnet_weights="IMAGENET1K_V2",
    quantize=False,
    clamp=True,
    clip_precision="networks",
    sources=("mdlib/metrics.py", "mdlib/evalnets.py"),
)

SPECS: Mapping[str, Protocol] = MappingProxyType({p.name: p for p in (_MINDEYE, _BRAINDIFFUSER, _MDLIB)})


def get(protocol: str | Protocol) -> Protocol:
    """The :class:`Protocol` named ``protocol`` (one of :data:`PROTOCOLS`); a Protocol is returned as is."""
    if isinstance(protocol, Protocol):
        return protocol
    if protocol not in SPECS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    return SPECS[protocol]


# ------------------------------------------------------------------------------------------ the steps

def _as_batch(images) -> np.ndarray | torch.Tensor:
    """uint8 (n, H, W, 3) as a numpy array, or float (n, 3, H, W) as a CPU tensor (dtype kept)."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be an array or tensor, got {type(images).__name__}")
    images = images.detach().cpu()
    if images.dtype == torch.uint8:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"uint8 images must be (n, H, W, 3), got {tuple(images.shape)}")
        return images.numpy()
    if not images.is_floating_point():
        raise TypeError(f"images must be uint8 (n, H, W, 3) or float (n, 3, H, W) in [0, 1], got {images.dtype}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"float images must be (n, 3, H, W), got {tuple(images.shape)}")
    return images


def _to_uint8(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    # torchvision's to_pil_image: pic.mul(255).byte(), i.e. truncation towards zero.
    return x.float().clamp(0.0, 1.0).mul(255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def _to_float(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255.0
    return x.float()


def _pil_resize(u8: np.ndarray, step: Resize) -> np.ndarray:
    from PIL import Image

    resample = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}[step.interpolation]
    return np.stack([np.asarray(Image.fromarray(im).resize((step.size, step.size), resample)) for im in u8])


def _torch_resize(x: torch.Tensor, step: Resize) -> torch.Tensor:
    return F.interpolate(x, size=(step.size, step.size), mode=step.interpolation, align_corners=False,
                         antialias=step.antialias)


def _apply(images, p: Protocol, chain: tuple[Resize, ...]) -> np.ndarray | torch.Tensor:
    """Run ``chain`` on ``images``: a uint8 (n, S, S, 3) array for an 8-bit protocol (or after a PIL step), else
    a float32 (n, 3, S, S) tensor (uint8 input divided by 255 in float32, as :func:`mdlib.features.to_unit_images`)."""
    x = _as_batch(images)
    x = _to_uint8(x) if p.quantize else _to_float(x)
    for step in chain:
        size = x.shape[1:3] if isinstance(x, np.ndarray) else tuple(x.shape[-2:])
        if tuple(size) == (step.size, step.size):
            continue
        if step.library == "pil":
            x = _pil_resize(_to_uint8(x), step)
        else:
            x = _torch_resize(_to_float(x), step)
    return x


def _resized(chain: tuple[Resize, ...], size: int | None) -> tuple[Resize, ...]:
    """``chain`` with its last step's size replaced by ``size`` (None: unchanged)."""
    if size is None or int(size) == chain[-1].size:
        return chain
    if int(size) < 1:
        raise ValueError(f"size must be a positive number of pixels, got {size}")
    return (*chain[:-1], replace(chain[-1], size=int(size)))


def pixel_images(images, protocol: str | Protocol, size: int | None = None) -> np.ndarray:
    """Images as ``protocol`` compares them in PixCorr and SSIM: (n, S, S, 3) float64 in [0, 1], S = 425.

    "mindeye": float32 tensors, 256 px then 425 px (bilinear, no antialiasing); "braindiffuser": 8-bit,
    PIL bicubic to 425 px (skipped at 425 px), then ``/ 255.0`` in float64; "mdlib": one antialiased
    bilinear resize (:func:`mdlib.metrics.prepare` is this). ``size``: another final size S (the last step's;
    for small test images), None for the protocol's.
    """
    p = get(protocol)
    x = _apply(images, p, _resized(p.pixel_chain, size))
    if isinstance(x, np.ndarray):
        return x.astype(np.float64) / 255.0
    x = x.float()
    if p.clamp:
        x = x.clamp(0.0, 1.0)
    return x.permute(0, 2, 3, 1).double().numpy()


def network_inputs(images, protocol: str | Protocol, net: str, size: int | None = None) -> torch.Tensor:
    """Images as ``protocol`` fed network ``net`` (a key of :data:`NETWORK_KEYS`), before the network's
    mean/std normalisation: float32 (n, 3, S, S) on the CPU, in [0, 1].

    "braindiffuser": ``to_tensor`` of the PIL-resized 8-bit image (multiples of 1/255). ``size``: another
    input size S for the last step (a substitute network with its own input size, e.g. the tiny CLIP's 56 px).
    """
    p = get(protocol)
    x = _apply(images, p, _resized(_chain(p, net), size))
    x = _to_float(x)
    if p.clamp:
        x = x.clamp(0.0, 1.0)
    return x


# ------------------------------------------------------------------------------------------------ SSIM

def _ssim_radius(sigma: float, truncate: float = SSIM_TRUNCATE) -> int:
    return int(truncate * sigma + 0.5)  # scipy.ndimage's kernel radius, and scikit-image's crop


def ssim_columns(a, b, *, sigma: float = SSIM_SIGMA, data_range: float = 1.0) -> float:
    """SSIM of two grey (H, W) images as scikit-image 0.17.2 computed it with ``multichannel=True``.

    That release took the last axis as channels: for each column j they ran the 1-D SSIM of
    ``a[:, j]`` and ``b[:, j]`` (Gaussian weights, sigma 1.5, truncate 3.5, scipy's ``reflect`` boundary,
    population covariance, K1 = 0.01, K2 = 0.03), averaged the SSIM map over its samples after cropping
    ``pad`` = 5 from each end, and returned the mean over columns. No smoothing across columns, no crop of
    the first and last columns. Computed in float64.
    """
    from scipy.ndimage import gaussian_filter1d

    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"ssim_columns needs two grey (H, W) images of one shape, got {a.shape} and {b.shape}")
    pad = _ssim_radius(sigma)
    if a.shape[0] < 2 * pad + 1:
        raise ValueError(f"images need at least {2 * pad + 1} rows, got {a.shape[0]}")

    def filt(x: np.ndarray) -> np.ndarray:
        return gaussian_filter1d(x, sigma, axis=0, mode="reflect", truncate=SSIM_TRUNCATE)

    ux, uy = filt(a), filt(b)
    vx = filt(a * a) - ux * ux
    vy = filt(b * b) - uy * uy
    vxy = filt(a * b) - ux * uy
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux ** 2 + uy ** 2 + c1) * (vx + vy + c2))
    per_column = s[pad:a.shape[0] - pad].mean(axis=0)
    return float(per_column.mean())


def ssim_grey(a, b, variant: str = "2d") -> float:
    """SSIM of two grey (H, W) images in [0, 1]: ``"2d"`` (scikit-image's ``structural_similarity`` with the
    settings of :mod:`mdlib.metrics`) or ``"columns"`` (:func:`ssim_columns`)."""
    if variant == "columns":
        return ssim_columns(a, b)
    if variant != "2d":
        raise ValueError(f"variant must be one of {SSIM_VARIANTS}, got {variant!r}")
    from skimage.metrics import structural_similarity

    return float(structural_similarity(np.asarray(a, np.float64), np.asarray(b, np.float64), gaussian_weights=True,
                                       sigma=SSIM_SIGMA, use_sample_covariance=False, data_range=1.0))


def grey(images: np.ndarray) -> np.ndarray:
    """(n, H, W, 3) float RGB -> (n, H, W) grey with scikit-image's ``rgb2gray`` (0.2125 R + 0.7154 G + 0.0721 B,
    the same weights in 0.17 and today)."""
    from skimage.color import rgb2gray

    return rgb2gray(np.asarray(images))


__all__ = ["PROTOCOLS", "NETWORK_KEYS", "SSIM_VARIANTS", "SPECS", "Resize", "Protocol", "get", "pixel_images",
           "network_inputs", "ssim_columns", "ssim_grey", "grey"]

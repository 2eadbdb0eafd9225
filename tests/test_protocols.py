"""mdlib.protocols against independent implementations written here with the peers' own calls spelled out:
torchvision's ``resize`` of tensors without antialiasing (MindEye's pinned torchvision 0.15/0.16), PIL's
``Image.resize`` / torchvision's ``resize`` of PIL images (Brain-Diffuser), mdlib's ``prepare`` and
``EvalNetworks.preprocess`` ("mdlib"); the column-wise SSIM of old scikit-image against a float64 loop over
columns written from the SSIM formula."""

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from scipy.ndimage import gaussian_filter
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from mdlib import protocols as P

ME_SIZES = {"alexnet": 256, "inception": 342, "clip": 224, "effnet": 255, "swav": 224}


# ------------------------------------------------------------------------------------------------ images

def _noise(shape, seed):
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def _edges(size=512):
    """Sharp edges: an 8-px checkerboard, a diagonal half-plane, one-pixel lines (aliasing shows here)."""
    y, x = np.mgrid[:size, :size]
    img = np.zeros((size, size, 3), np.uint8)
    img[..., 0] = np.where(((y // 8) + (x // 8)) % 2 == 0, 255, 0)
    img[..., 1] = np.where(x > y, 230, 20)
    img[..., 2] = np.where(x % 5 == 0, 255, 0)
    return img[None]


IMAGES = {
    "noise-300x360": _noise((2, 300, 360, 3), 1),
    "noise-425": _noise((1, 425, 425, 3), 2),
    "edges-512": _edges(),
}


@pytest.fixture(params=sorted(IMAGES))
def image(request):
    return IMAGES[request.param]


def _float(u8):
    return torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255.0


# ---------------------------------------------------------------------------------------------- the specs

def test_specs():
    assert P.PROTOCOLS == ("mindeye", "braindiffuser", "mdlib")
    assert tuple(P.SPECS) == P.PROTOCOLS
    me, bd, md = (P.get(n) for n in P.PROTOCOLS)
    assert me.network_sizes == ME_SIZES and md.network_sizes == ME_SIZES
    assert bd.network_sizes == {k: 224 for k in ME_SIZES}
    assert [s.size for s in me.pixel_chain] == [256, 425]
    assert all(not s.antialias and s.library == "torch" and s.interpolation == "bilinear"
               for k in P.NETWORK_KEYS for s in me.network_chains[k] + me.pixel_chain)
    assert all(c[0].size == 256 for c in me.network_chains.values())
    assert bd.pixel_chain == (bd.pixel_chain[0],) and bd.pixel_chain[0].interpolation == "bicubic"
    assert all(c == (P.Resize(224, "bilinear", True, "pil", c[0].source),) for c in bd.network_chains.values())
    assert (me.ssim, bd.ssim, md.ssim) == ("2d", "columns", "2d")
    assert (me.effnet_weights, bd.effnet_weights, md.effnet_weights) == ("IMAGENET1K_V2", "IMAGENET1K_V1",
                                                                         "IMAGENET1K_V2")
    assert bd.quantize and not me.quantize and not md.quantize
    assert all(p.pixel_size == 425 for p in P.SPECS.values())
    assert "columns" in bd.describe() and "no antialiasing" in me.describe()
    with pytest.raises(ValueError):
        P.get("minddiffuser")
    with pytest.raises(KeyError):
        P.network_inputs(IMAGES["noise-425"], "mdlib", "vgg")
    with pytest.raises(TypeError):
        me.network_chains["clip"] = ()  # read-only


def test_mdlib_spec_is_evalnets_and_metrics():
    from torchvision.models import EfficientNet_B1_Weights

    from mdlib import evalnets, metrics

    md = P.get("mdlib")
    assert set(P.NETWORK_KEYS) == set(evalnets.NETWORKS)
    assert md.network_sizes == {k: s.size for k, s in evalnets.NETWORKS.items()}
    assert md.pixel_size == metrics.EVAL_SIZE
    assert evalnets.weights_url("effnet") == EfficientNet_B1_Weights[md.effnet_weights].url


# --------------------------------------------------------------------------------------------- MindEye

def _mindeye_reference(u8, size):
    """MindEye: transforms.Resize((256, 256)) of float tensors, then Resize(size), both bilinear; antialias
    spelled out as False (what torchvision 0.15/0.16's "warn" default meant for tensors)."""
    x = _float(u8)
    if x.shape[-2:] != (256, 256):
        x = TF.resize(x, [256, 256], interpolation=InterpolationMode.BILINEAR, antialias=False)
    return transforms.Resize(size, interpolation=InterpolationMode.BILINEAR, antialias=False)(x)


def test_mindeye_pixels(image):
    ref = _mindeye_reference(image, 425).permute(0, 2, 3, 1).double().numpy()
    out = P.pixel_images(image, "mindeye")
    assert out.shape == (len(image), 425, 425, 3) and out.dtype == np.float64
    np.testing.assert_allclose(out, ref, atol=1e-6)
    np.testing.assert_allclose(P.pixel_images(_float(image), "mindeye"), ref, atol=1e-6)


@pytest.mark.parametrize("net", P.NETWORK_KEYS)
def test_mindeye_networks(image, net):
    ref = _mindeye_reference(image, ME_SIZES[net])
    out = P.network_inputs(image, "mindeye", net)
    assert out.shape == (len(image), 3, ME_SIZES[net], ME_SIZES[net]) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------- Brain-Diffuser

def test_braindiffuser_pixels(image):
    # evaluate_reconstruction.py: Image.open(png).resize((425, 425)) for reconstructions (Pillow's default
    # filter), the 425-px stimulus as it is; np.array(img) / 255.0.
    ref = []
    for im in image:
        pil = Image.fromarray(im)
        if pil.size != (425, 425):
            pil = pil.resize((425, 425))
        ref.append(np.array(pil) / 255.0)
    out = P.pixel_images(image, "braindiffuser")
    np.testing.assert_array_equal(out, np.stack(ref))
    explicit = np.stack([np.array(Image.fromarray(im).resize((425, 425), Image.BICUBIC)) for im in image]) / 255.0
    np.testing.assert_array_equal(out, explicit)


@pytest.mark.parametrize("net", P.NETWORK_KEYS)
def test_braindiffuser_networks(image, net):
    # eval_extract_features.py: T.functional.resize(PIL image, (224, 224)); T.functional.to_tensor(img).
    ref = torch.stack([TF.to_tensor(TF.resize(Image.fromarray(im), (224, 224))) for im in image])
    out = P.network_inputs(image, "braindiffuser", net)
    torch.testing.assert_close(out, ref, atol=1e-7, rtol=0)
    pil = torch.stack([TF.to_tensor(Image.fromarray(im).resize((224, 224), Image.BILINEAR)) for im in image])
    torch.testing.assert_close(out, pil, atol=0, rtol=0)


def test_braindiffuser_float_input_is_quantised_as_to_pil_image():
    u8 = IMAGES["noise-300x360"]
    x = _float(u8) * 0.999 + 0.0004  # between 8-bit levels
    pil = [TF.to_pil_image(im) for im in x]  # what Brain-Diffuser's reconstruction script saved as PNG
    ref = torch.stack([TF.to_tensor(TF.resize(im, (224, 224))) for im in pil])
    torch.testing.assert_close(P.network_inputs(x, "braindiffuser", "clip"), ref, atol=1e-7, rtol=0)


# ------------------------------------------------------------------------------------------------ mdlib

def test_mdlib_pixels_are_prepare(image):
    from mdlib.metrics import prepare

    np.testing.assert_array_equal(P.pixel_images(image, "mdlib"), prepare(image))
    fl = _float(image)
    np.testing.assert_array_equal(P.pixel_images(fl, "mdlib"), prepare(fl))


@pytest.mark.parametrize("net", P.NETWORK_KEYS)
def test_mdlib_networks_are_evalnets(image, net):
    from mdlib.evalnets import IMAGENET_STATS, NETWORKS, EvalNetworks
    from mdlib.features import resize_images
    from mdlib.models import normalization_stats

    out = P.network_inputs(image, "mdlib", net)
    ref = resize_images(_float(image), NETWORKS[net].size, mode="bilinear-aa").clamp(0, 1)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    nets = EvalNetworks(weights="random", device="cpu", progress=False)
    mean, std = IMAGENET_STATS if NETWORKS[net].normalization == "imagenet" else normalization_stats("clip")
    normalised = (out - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(nets.preprocess(net, image), normalised, atol=1e-6, rtol=0)


def test_protocols_on_sharp_edges():
    """Aliasing: MindEye's unfiltered 512 -> 256 -> 224 differs from both antialiased resizes, which agree with
    each other up to Brain-Diffuser's 8-bit rounding (torch's antialiased bilinear follows PIL's filter)."""
    img = IMAGES["edges-512"]
    me, bd, md = (P.network_inputs(img, p, "clip") for p in P.PROTOCOLS)
    assert (me - md).abs().max() > 0.1 and (me - bd).abs().max() > 0.1
    assert (bd - md).abs().max() < 1.5 / 255


# ------------------------------------------------------------------------------------------------- SSIM

def _ssim_columns_loop(a, b, sigma=1.5):
    """Per column: Gaussian-weighted (sigma 1.5, radius int(3.5 sigma + 0.5) = 5, reflected ends) means,
    variances and covariance, the SSIM map, its ends cropped by the radius, averaged; then the mean over
    columns. float64 throughout."""
    r = int(3.5 * sigma + 0.5)
    k = np.arange(-r, r + 1, dtype=np.float64)
    w = np.exp(-0.5 * (k / sigma) ** 2)
    w /= w.sum()
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    means = []
    for j in range(a.shape[1]):
        x = np.pad(a[:, j], r, mode="symmetric")  # scipy's "reflect": d c b a | a b c d | d c b a
        y = np.pad(b[:, j], r, mode="symmetric")
        s = []
        for i in range(a.shape[0]):
            wx, wy = x[i:i + 2 * r + 1], y[i:i + 2 * r + 1]
            mx, my = w @ wx, w @ wy
            vx = w @ (wx * wx) - mx * mx
            vy = w @ (wy * wy) - my * my
            cxy = w @ (wx * wy) - mx * my
            s.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx * mx + my * my + c1) * (vx + vy + c2)))
        means.append(np.mean(s[r:a.shape[0] - r]))
    return float(np.mean(means))


def _natural_pair(shape, seed=0):
    """A smooth 'natural-like' grey image (blurred noise at several scales) and a degraded copy."""
    rng = np.random.default_rng(seed)
    a = sum(gaussian_filter(rng.standard_normal(shape), s) * s for s in (1, 3, 8))
    a = (a - a.min()) / (a.max() - a.min())
    b = np.clip(gaussian_filter(a, 1.2) + 0.05 * rng.standard_normal(shape), 0, 1)
    return a, b


def test_ssim_columns_is_the_formula():
    a, b = _natural_pair((40, 23))
    assert P.ssim_columns(a, b) == pytest.approx(_ssim_columns_loop(a, b), abs=1e-12)
    assert P.ssim_columns(a, a) == pytest.approx(1.0, abs=1e-12)


def test_ssim_columns_is_modern_skimage_channel_axis():
    """Today's scikit-image spells old ``multichannel=True`` as ``channel_axis=-1``: on a 2-D grey image that
    loops over the columns, exactly as 0.17 did."""
    from skimage.metrics import structural_similarity

    a, b = _natural_pair((425, 425), seed=1)
    ref = structural_similarity(a, b, channel_axis=-1, gaussian_weights=True, sigma=1.5,
                                use_sample_covariance=False, data_range=1.0)
    assert P.ssim_columns(a, b) == pytest.approx(ref, abs=1e-12)


def test_ssim_columns_differs_from_2d():
    a, b = _natural_pair((425, 425), seed=2)
    cols, two_d = P.ssim_grey(a, b, "columns"), P.ssim_grey(a, b, "2d")
    assert cols == P.ssim_columns(a, b)
    assert abs(cols - two_d) > 0.01
    with pytest.raises(ValueError):
        P.ssim_grey(a, b, "3d")
    with pytest.raises(ValueError):
        P.ssim_columns(a[:5], b[:5])


def test_ssim_2d_is_mdlib_metrics():
    from mdlib import metrics

    u8 = IMAGES["noise-425"]
    rec = np.clip(u8.astype(int) + 40, 0, 255).astype(np.uint8)
    g = P.grey(P.pixel_images(rec, "mdlib"))[0], P.grey(P.pixel_images(u8, "mdlib"))[0]
    assert P.ssim_grey(*g, "2d") == pytest.approx(metrics.ssim_per_image(rec, u8)[0], abs=1e-12)


# ------------------------------------------------------------------------ the protocols in the evaluation

def _reference_pixels(u8, protocol):
    """PixCorr's and SSIM's 425-px images under each protocol, from the calls spelled out above, float64."""
    if protocol == "mindeye":
        return _mindeye_reference(u8, 425).permute(0, 2, 3, 1).double().numpy()
    if protocol == "braindiffuser":
        return np.stack([np.array(Image.fromarray(im).resize((425, 425), Image.BICUBIC)) for im in u8]) / 255.0
    x = torch.nn.functional.interpolate(_float(u8), size=(425, 425), mode="bilinear", antialias=True)
    return x.clamp(0, 1).permute(0, 2, 3, 1).double().numpy()


@pytest.mark.parametrize("protocol", P.PROTOCOLS)
def test_each_protocol_s_pixel_metrics_are_the_float64_formulas(protocol):
    """evaluate(..., protocol=p): PixCorr = Pearson r of the reference pixels (np.corrcoef, float64); SSIM =
    the 2-D SSIM of their grey images (MindEye, mdlib) or the column loop written above (Brain-Diffuser)."""
    from skimage.metrics import structural_similarity

    from mdlib import evaluation

    stim = IMAGES["noise-425"]
    rec = np.clip(np.asarray(Image.fromarray(stim[0]).resize((300, 300)).resize((512, 512))).astype(int) - 25,
                  0, 255).astype(np.uint8)[None]
    report = evaluation.evaluate(rec, stim, protocol=protocol)
    a, b = _reference_pixels(rec, protocol), _reference_pixels(stim, protocol)
    r = np.corrcoef(a.ravel(), b.ravel())[0, 1]
    assert report.values["PixCorr"] == pytest.approx(r, abs=1e-6) and report.values["PCC"] == report.values["PixCorr"]
    weights = np.array([0.2125, 0.7154, 0.0721])          # rgb2gray's (ITU-R 709)
    ga, gb = a @ weights, b @ weights
    if protocol == "braindiffuser":
        ssim = _ssim_columns_loop(ga[0], gb[0])
    else:
        ssim = structural_similarity(ga[0], gb[0], gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                     data_range=1.0)
    assert report.values["SSIM"] == pytest.approx(ssim, abs=1e-6)
    assert report.protocol == protocol and f"PROTOCOL {protocol!r}" in report.header


@pytest.mark.parametrize("protocol", P.PROTOCOLS)
@pytest.mark.parametrize("net", P.NETWORK_KEYS)
def test_evalnets_feeds_each_network_as_the_protocol_does(protocol, net):
    """EvalNetworks(protocol=p).preprocess = the protocol's reference resize chain, then the network's
    normalisation (ImageNet's; CLIP's own for CLIP)."""
    from mdlib.evalnets import IMAGENET_STATS, EvalNetworks
    from mdlib.models import normalization_stats

    u8 = IMAGES["noise-300x360"]
    if protocol == "mindeye":
        ref = _mindeye_reference(u8, ME_SIZES[net])
    elif protocol == "braindiffuser":
        ref = torch.stack([TF.to_tensor(Image.fromarray(im).resize((224, 224), Image.BILINEAR)) for im in u8])
    else:
        ref = torch.nn.functional.interpolate(_float(u8), size=(ME_SIZES[net],) * 2, mode="bilinear",
                                              antialias=True).clamp(0, 1)
    mean, std = normalization_stats("clip") if net == "clip" else IMAGENET_STATS
    ref = (ref - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    nets = EvalNetworks(weights="random", protocol=protocol, device="cpu", progress=False)
    torch.testing.assert_close(nets.preprocess(net, u8), ref, atol=1e-6, rtol=0)


def test_a_final_size_can_be_replaced():
    """A substitute network's own input size (the tiny CLIP's 56 px) replaces the last step only."""
    u8 = IMAGES["edges-512"]
    out = P.network_inputs(u8, "mindeye", "clip", size=56)
    ref = TF.resize(_mindeye_reference(u8, 256), [56, 56], interpolation=InterpolationMode.BILINEAR, antialias=False)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    assert P.pixel_images(u8, "braindiffuser", size=40).shape == (1, 40, 40, 3)
    with pytest.raises(ValueError, match="positive"):
        P.pixel_images(u8, "mdlib", size=0)


def test_clip_precision_per_protocol():
    """MindEye's clip.load keeps CLIP in float16 on CUDA and casts it to float32 on the CPU; Brain-Diffuser
    casts to float32; mdlib runs CLIP in the networks' dtype."""
    me, bd, md = (P.get(n) for n in P.PROTOCOLS)
    assert me.clip_dtype("cuda", torch.float32) == torch.float16
    assert me.clip_dtype("cpu", torch.bfloat16) == torch.float32
    assert bd.clip_dtype("cuda", torch.bfloat16) == torch.float32
    assert md.clip_dtype("cuda", torch.bfloat16) == torch.bfloat16
    assert "float16 on CUDA" in me.describe()

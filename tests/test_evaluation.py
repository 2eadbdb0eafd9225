"""The eight-metric table and MindDiffuser's three metrics, against independent computations.

- layers: each network's extracted features equal the torchvision/open_clip modules run by hand up to the
  layer docs/evaluation.md names;
- known answers: identical images give PixCorr = SSIM = CLIP-cos = 1, 100% identification and distance 0; a
  set shuffled against its stimuli identifies at about 50%; hand-made feature matrices give the fractions
  worked out by hand;
- weights: the policy's sources (a local file is used, never a download in "auto"), reproducible seeds, and a
  table never mixes weight sources.
"""

import numpy as np
import pytest
import torch

from mdlib import evalnets, evaluation, metrics
from mdlib.synth import scenes


@pytest.fixture(scope="module")
def nets():
    """All five networks with random weights (what CI has), shared by the module's tests."""
    return evalnets.EvalNetworks(weights="random", device="cpu", seed=0, batch_size=8, progress=False)


@pytest.fixture(scope="module")
def scene_images():
    """24 mini-NSD-like scenes at 96 px, uint8."""
    rng = np.random.default_rng(3)
    return np.stack([scenes.render(scenes.random_scene(rng), size=96) for _ in range(24)])


# --------------------------------------------------------------------------------------------- layers

def test_each_metric_reads_the_layer_evaluation_md_names(nets, scene_images):
    x = scene_images[:3]
    feats = nets.features(x)
    alex = nets.models["alexnet"]
    assert isinstance(alex.features[4], torch.nn.ReLU) and alex.features[3].out_channels == 192   # conv2
    assert isinstance(alex.features[11], torch.nn.ReLU) and alex.features[10].out_channels == 256  # conv5
    with torch.no_grad():
        a = nets.preprocess("alexnet", x)
        np.testing.assert_allclose(feats["AlexNet(2)"], alex.features[:5](a).flatten(1).numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(feats["AlexNet(5)"], alex.features[:12](a).flatten(1).numpy(), rtol=1e-5, atol=1e-6)

        effnet = nets.models["effnet"]
        e = nets.preprocess("effnet", x)
        np.testing.assert_allclose(feats["EffNet-B"], effnet.avgpool(effnet.features(e)).flatten(1).numpy(),
                                   rtol=1e-4, atol=1e-6)

        swav = nets.models["swav"]
        s = nets.preprocess("swav", x)
        trunk = torch.nn.Sequential(*list(swav.children())[:-1])          # everything up to avgpool
        np.testing.assert_allclose(feats["SwAV"], trunk(s).flatten(1).numpy(), rtol=1e-4, atol=1e-6)

        inception = nets.models["inception"]
        seen = {}
        hook = inception.avgpool.register_forward_hook(lambda m, i, o: seen.setdefault("avgpool", o))
        inception(nets.preprocess("inception", x))
        hook.remove()
        np.testing.assert_allclose(feats["InceptionV3"], seen["avgpool"].flatten(1).numpy(), rtol=1e-4, atol=1e-6)

        clip = nets.models["clip"]
        np.testing.assert_allclose(feats["CLIP"], clip(nets.preprocess("clip", x)).numpy(), rtol=1e-4, atol=1e-6)
    assert {k: v.shape[1] for k, v in feats.items()} == {
        "AlexNet(2)": 192 * 31 * 31, "AlexNet(5)": 256 * 15 * 15, "InceptionV3": 2048, "CLIP": 768,
        "EffNet-B": 1280, "SwAV": 2048}


def test_inputs_are_resized_and_normalised_per_network(nets, scene_images):
    x = nets.preprocess("inception", scene_images[:2])
    assert x.shape == (2, 3, 342, 342)
    # The ImageNet normalisation, recomputed: a uniform grey image of value v maps to (v - mean) / std.
    grey = np.full((1, 40, 40, 3), 128, np.uint8)
    expect = (128 / 255 - np.array(evalnets.IMAGENET_STATS[0])) / np.array(evalnets.IMAGENET_STATS[1])
    np.testing.assert_allclose(nets.preprocess("alexnet", grey)[0, :, 5, 5].numpy(), expect, rtol=1e-5)
    from mdlib.models import normalization_stats

    mean, std = normalization_stats("clip")
    np.testing.assert_allclose(nets.preprocess("clip", grey)[0, :, 5, 5].numpy(),
                               (128 / 255 - np.array(mean)) / np.array(std), rtol=1e-5)
    assert nets.preprocess("clip", grey).shape[-1] == 224
    # The protocol sets the sizes: Brain-Diffuser's 224 px for every network.
    bd = evalnets.EvalNetworks(weights="random", protocol="braindiffuser")
    assert bd.sizes == {k: 224 for k in evalnets.NETWORKS} and bd.preprocess("inception", grey).shape[-1] == 224


# ------------------------------------------------------------------------------------------ known answers

def test_identical_images_score_perfectly(nets, scene_images):
    x = scene_images[:6]
    report = evaluation.evaluate(x, x.copy(), nets)
    v = report.values
    assert v["PixCorr"] == pytest.approx(1.0) and v["PCC"] == v["PixCorr"]
    assert v["SSIM"] == pytest.approx(1.0)
    assert v["CLIP-cos"] == pytest.approx(1.0, abs=1e-6)
    for m in ("AlexNet(2)", "AlexNet(5)", "InceptionV3", "CLIP"):
        assert v[m] == 100.0
    for m in ("EffNet-B", "SwAV"):
        assert v[m] == pytest.approx(0.0, abs=1e-6)
    assert report.n_images == 6 and all(len(p) == 6 for p in report.per_image.values())


def test_a_shuffled_set_identifies_at_chance(nets, scene_images):
    """Reconstructions that are other stimuli: each one's own stimulus ranks like any other (about 50%)."""
    rng = np.random.default_rng(0)
    n = len(scene_images)
    values = []
    for _ in range(5):
        perm = rng.permutation(n)
        while (perm == np.arange(n)).any():       # a derangement: no image is paired with itself
            perm = rng.permutation(n)
        values.append(evaluation.evaluate(scene_images[perm], scene_images, nets,
                                          metrics=["AlexNet(2)", "AlexNet(5)"]).values)
    for m in ("AlexNet(2)", "AlexNet(5)"):
        assert 40.0 < np.mean([v[m] for v in values]) < 60.0


def test_identification_of_hand_made_features():
    # corr(recon i, stim j) by construction: recon 0 matches stim 0 best; recon 1 matches stim 2 better than
    # stim 1, and stim 0 worse; recon 2 matches stim 2 best.
    stim = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]], float)
    recon = np.array([[1, 0, 0, 0], [0, 1, 2, 0], [0, 0, 1, 0]], float)
    # Pearson over 4 features: C = [[1, -1/3, -1/3], [-.52, .17, .87], [-1/3, -1/3, 1]] -> wins 2, 1, 2.
    frac = metrics.two_way_identification(recon, stim)
    np.testing.assert_allclose(frac, [1.0, 0.5, 1.0])
    np.testing.assert_allclose(frac.mean(), 2.5 / 3)


def test_distances_and_cosines_against_numpy(rng):
    a, b = rng.normal(size=(5, 30)), rng.normal(size=(5, 30))
    ref = [1 - np.corrcoef(x, y)[0, 1] for x, y in zip(a, b)]
    np.testing.assert_allclose(metrics.correlation_distance(a, b), ref, rtol=1e-12)
    cos = [x @ y / np.linalg.norm(x) / np.linalg.norm(y) for x, y in zip(a, b)]
    np.testing.assert_allclose(metrics.cosine_similarity(a, b), cos, rtol=1e-12)
    with pytest.raises(ValueError, match="paired"):
        metrics.correlation_distance(a, b[:4])


def test_evaluate_agrees_with_scikit_image_and_numpy(scene_images):
    """PixCorr and SSIM straight from numpy and scikit-image at 425 px, without mdlib's helpers."""
    from skimage.color import rgb2gray
    from skimage.metrics import structural_similarity
    from skimage.transform import resize

    recon, stim = scene_images[:4], scene_images[4:8]
    report = evaluation.evaluate(recon, stim)
    assert set(report.values) == {"PixCorr", "SSIM", "PCC"}
    up = lambda im: resize(im / 255.0, (425, 425), order=1, anti_aliasing=False)   # noqa: E731
    r = [np.corrcoef(up(x).ravel(), up(y).ravel())[0, 1] for x, y in zip(recon, stim)]
    s = [structural_similarity(rgb2gray(up(x)), rgb2gray(up(y)), gaussian_weights=True, sigma=1.5,
                               use_sample_covariance=False, data_range=1.0) for x, y in zip(recon, stim)]
    # Upsampling 96 -> 425: torch's and scikit-image's bilinear grids differ by a fraction of a pixel.
    assert report.values["PixCorr"] == pytest.approx(np.mean(r), abs=0.01)
    assert report.values["SSIM"] == pytest.approx(np.mean(s), abs=0.02)
    with pytest.raises(ValueError, match="need the evaluation networks"):
        evaluation.evaluate(recon, stim, metrics=["CLIP"])
    with pytest.raises(KeyError, match="unknown metrics"):
        evaluation.evaluate(recon, stim, metrics=["FID"])
    with pytest.raises(ValueError, match="paired one to one"):
        evaluation.evaluate(recon, stim[:3])


# ------------------------------------------------------------------------------------------------ weights

def test_random_weights_are_seeded(scene_images):
    x = scene_images[:2]
    f = [evalnets.EvalNetworks(weights="random", seed=s, progress=False).features(x, ["AlexNet(5)"])["AlexNet(5)"]
         for s in (0, 0, 1)]
    np.testing.assert_array_equal(f[0], f[1])
    assert not np.allclose(f[0], f[2])


def test_auto_uses_a_local_file_and_never_downloads(tmp_path, monkeypatch, scene_images):
    """A torchvision weights file where torch hub keeps downloads is used; a network whose file is missing is
    left out (its metrics are not computed, the header says so and how to get them), and nothing is downloaded."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    calls = []
    real_load = torch.hub.load_state_dict_from_url

    def spy(url, *args, **kwargs):
        calls.append(url)
        return real_load(url, *args, **kwargs)

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", spy)
    torch.manual_seed(123)
    import torchvision

    from mdlib.models import WeightsNotFoundError

    stand_in = torchvision.models.alexnet(weights=None).state_dict()
    target = evalnets.cached_weights_file("alexnet")
    assert target.parent == tmp_path / "torch" / "hub" / "checkpoints"
    target.parent.mkdir(parents=True)
    torch.save(stand_in, target)

    nets = evalnets.EvalNetworks(weights="auto", progress=False)
    assert nets.usable() == ["AlexNet(2)", "AlexNet(5)"]
    assert nets.left_out() == ["InceptionV3", "CLIP", "EffNet-B", "SwAV"]
    nets.load("alexnet")
    assert nets.pretrained["alexnet"] and nets.sources["alexnet"].startswith("pretrained")
    for k, v in nets.models["alexnet"].state_dict().items():
        torch.testing.assert_close(v, stand_in[k])
    with pytest.raises(WeightsNotFoundError, match="mdlib eval-weights"):
        nets.load("effnet")                    # no file: no random weights, no download
    assert calls == [evalnets.weights_url("alexnet")]
    header = nets.header(["AlexNet(2)", "EffNet-B"])
    assert header.startswith("LEFT OUT: EffNet-B. No pretrained weights for them on this machine")
    assert "AlexNet (256 px): pretrained" in header and "RANDOM" not in header
    report = evaluation.evaluate(scene_images[:3], scene_images[3:6], nets)
    assert set(report.values) == {"PixCorr", "SSIM", "PCC", "AlexNet(2)", "AlexNet(5)"}
    assert report.left_out == ["InceptionV3", "CLIP", "EffNet-B", "SwAV", "CLIP-cos"]
    df = evaluation.table({"r": report}, "eight")
    assert df["SwAV"].isna().all() and "LEFT OUT: InceptionV3, CLIP, EffNet-B, SwAV" in df.attrs["header"]
    assert "SwAV" not in evaluation.styled(df).data.columns        # a left-out column is not drawn
    # Brain-Diffuser's EfficientNet-B1 weights are another file (IMAGENET1K_V1): found only when present.
    bd = evalnets.EvalNetworks(weights="auto", protocol="braindiffuser", progress=False)
    assert evalnets.weights_url("effnet", "braindiffuser") != evalnets.weights_url("effnet")
    assert not bd.available("effnet")
    torch.save(torchvision.models.efficientnet_b1(weights=None).state_dict(),
               evalnets.cached_weights_file("effnet", "braindiffuser"))
    assert evalnets.EvalNetworks(weights="auto", protocol="braindiffuser").available("effnet")
    assert not evalnets.EvalNetworks(weights="auto", protocol="mindeye").available("effnet")

    rnd = evalnets.EvalNetworks(weights="random", progress=False)
    rnd.load("alexnet")
    assert not rnd.pretrained["alexnet"] and rnd.sources["alexnet"].startswith("RANDOM weights")


def test_pretrained_fails_clearly_when_the_download_fails(tmp_path, monkeypatch):
    import urllib.error

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    nets = evalnets.EvalNetworks(weights="pretrained", progress=False)
    with pytest.raises(RuntimeError, match="could not load the AlexNet weights") as err:
        nets.load("alexnet")
    assert str(evalnets.cached_weights_file("alexnet")) in str(err.value)
    with pytest.raises(ValueError, match="weights must be one of"):
        evalnets.EvalNetworks(weights="imagenet")
    with pytest.raises(ValueError, match="protocol must be one of"):
        evalnets.EvalNetworks(protocol="takagi")


def test_swav_checkpoint_keys_are_mapped(tmp_path, monkeypatch):
    """SwAV's file (DistributedDataParallel prefixes, projection head, prototypes, no fc) loads into ResNet-50."""
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    torch.manual_seed(7)
    trunk = {k: v for k, v in torchvision.models.resnet50(weights=None).state_dict().items()
             if not k.startswith("fc.")}
    saved = {f"module.{k}": v for k, v in trunk.items()}
    saved["module.projection_head.0.weight"] = torch.zeros(3, 3)
    saved["module.prototypes.weight"] = torch.zeros(3, 3)
    target = evalnets.cached_weights_file("swav")
    target.parent.mkdir(parents=True)
    torch.save(saved, target)
    nets = evalnets.EvalNetworks(weights="auto", progress=False)
    nets.load("swav")
    assert nets.pretrained["swav"]
    state = nets.models["swav"].state_dict()
    for k, v in trunk.items():
        torch.testing.assert_close(state[k], v)


def test_eval_clip_weights_come_from_the_hub_cache(tiny_dir, clip_stand_in):
    """The CLIP column's weights: the manifest's clip_eval file in the hub cache (a tiny stand-in here)."""
    from mdlib import models

    cache, snapshot = clip_stand_in("clip_eval")
    assert snapshot.parts[-3] == "models--timm--vit_large_patch14_clip_224.openai"
    nets = evalnets.EvalNetworks(weights="auto", cache_dir=cache, progress=False)
    assert not nets.available("clip") and nets.usable(["CLIP"]) == []     # not cached yet: left out
    with pytest.raises(models.WeightsNotFoundError, match="hf download timm/vit_large_patch14_clip_224.openai"):
        evalnets.EvalNetworks(weights="pretrained", cache_dir=cache, progress=False).load("clip")

    name = "open_clip_model.safetensors"
    (snapshot / name).write_bytes((tiny_dir / "clip" / name).read_bytes())
    nets = evalnets.EvalNetworks(weights="auto", cache_dir=cache, progress=False)
    nets.load("clip")
    assert nets.pretrained["clip"] and "pretrained: OpenAI mdlib-test-clip" in nets.sources["clip"]
    tiny = models.load_clip_vision(tiny_dir, device="cpu").model.visual.state_dict()
    for k, v in nets.models["clip"].state_dict().items():
        torch.testing.assert_close(v, tiny[k])


# ------------------------------------------------------------------------------------------------- tables

def test_tables_state_their_weights_and_never_mix_them(nets, scene_images, tmp_path):
    x, y = scene_images[:4], scene_images[4:8]
    reports = {"a": evaluation.evaluate(x, y, nets), "b": evaluation.evaluate(y, x, nets)}
    df = evaluation.table(reports, "eight")
    assert list(df.columns) == ["images", *evaluation.EIGHT_METRICS]
    assert df.loc["a", "AlexNet(2)"] == reports["a"].values["AlexNet(2)"]
    assert df.attrs["header"].startswith("RANDOM-WEIGHT NETWORKS")
    assert "true 2-D SSIM" in df.attrs["header"]
    md = evaluation.table(reports, "minddiffuser")
    assert list(md.columns) == ["images", "CLIP-cos", "SSIM", "PCC"]

    assert "PROTOCOL 'mdlib'" in df.attrs["header"] and df.attrs["protocol"] == "mdlib"
    # A report with a subset of the metrics, from the same networks, fits the same table.
    subset = {**reports, "s": evaluation.evaluate(x, y, nets, metrics=["AlexNet(2)"])}
    assert evaluation.table(subset).attrs["header"] == df.attrs["header"]

    other = evalnets.EvalNetworks(weights="random", seed=5, progress=False)
    with pytest.raises(ValueError, match="different evaluation weights"):
        evaluation.table({**reports, "c": evaluation.evaluate(x, y, other, metrics=["AlexNet(2)"])})
    with pytest.raises(ValueError, match="different protocols"):
        evaluation.table({**reports, "m": evaluation.evaluate(x, y, protocol="mindeye")})
    with pytest.raises(ValueError, match="differs from the networks'"):
        evaluation.evaluate(x, y, nets, protocol="braindiffuser")

    path = evaluation.write_table(tmp_path / "t.csv", df)
    back = evaluation.read_table(path)
    assert back.attrs["header"] == df.attrs["header"]
    np.testing.assert_allclose(back.to_numpy(float), df.to_numpy(float))
    assert list(back.index) == ["a", "b"]
    assert evaluation.styled(df).caption.startswith("RANDOM-WEIGHT")


def test_published_numbers_are_evaluation_md_s(scene_images):
    pub = evaluation.published_table("all")
    assert pub.loc["MindEye", "AlexNet(2)"] == 97.4 and pub.loc["MindEye", "SwAV"] == .358
    assert pub.loc["MindDiffuser, full", ["CLIP-cos", "SSIM", "PCC"]].tolist() == [.765, .354, .278]
    assert pub.loc["MindDiffuser, without z", "PCC"] == .066
    assert pub.loc["Brain-IT (40 h)", "InceptionV3"] == 97.3
    assert "PUBLISHED" in pub.attrs["header"]
    # PCC is PixCorr (one computation) wherever a paper reports PixCorr; each row names its protocol.
    assert pub.loc["MindEye", "PCC"] == .392 and pub.loc["Brain-IT (40 h)", "PCC"] == .386
    assert pub.loc["MindEye", "protocol"] == "mindeye" and pub.loc["MindEye2 (40 sessions)", "protocol"] == "mindeye"
    assert pub.loc["MindDiffuser, full", "protocol"].startswith("unknown")
    ours = evaluation.table({"stage 1": evaluation.evaluate(scene_images[:2], scene_images[2:4])}, "all")
    both = evaluation.beside_published(ours, "mini-NSD, this run")
    assert both.index[0] == "stage 1" and both.loc["stage 1", "source"] == "mini-NSD, this run"
    assert both.loc["MindEye", "source"] == "MindEye (NeurIPS 2023)"
    assert both.loc["stage 1", "protocol"] == "mdlib"
    assert both.attrs["header"].startswith("OURS (mini-NSD, this run)")


def test_fetch_weights_gets_every_network_once(tmp_path, monkeypatch, tiny_dir, clip_stand_in):
    """fetch_weights asks torch hub for each torchvision/SwAV file and resolves CLIP in the hub cache; the
    downloads are stand-ins here (the networks' own fresh weights)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    urls = {evalnets.weights_url(k, p): k for k in ("alexnet", "inception", "effnet", "swav")
            for p in ("mdlib", "braindiffuser")}
    asked = []

    def download(url, *args, weights_only=False, **kwargs):
        assert weights_only, "weights are loaded with weights_only=True"
        asked.append(urls[url])
        state = evalnets._architecture(urls[url], "ViT-B-32").state_dict()
        return {f"module.{k}": v for k, v in state.items()} if urls[url] == "swav" else state

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", download)
    cache, snapshot = clip_stand_in("clip_eval")
    name = "open_clip_model.safetensors"
    (snapshot / name).write_bytes((tiny_dir / "clip" / name).read_bytes())
    sources = evalnets.fetch_weights(cache_dir=cache, progress=False)
    assert sorted(asked) == ["alexnet", "effnet", "effnet", "inception", "swav"]   # EfficientNet-B1 V2 and V1
    assert set(sources) == {*evalnets.NETWORKS, "effnet@IMAGENET1K_V1"}
    assert all(v.startswith("pretrained") for v in sources.values())
    assert sources["effnet@IMAGENET1K_V1"] != sources["effnet"]


# ------------------------------------------------------------------------------- substitute CLIP, caching

def test_the_mini_path_puts_its_tiny_clip_in_the_clip_column(scene_images):
    """for_preset("mini"): the trained tiny CLIP computes CLIP and CLIP-cos (at its own 56 px and normalisation),
    labelled wherever they are shown, in their own columns beside published numbers; the other networks are
    left out without pretrained files."""
    from mdlib import models

    nets = evalnets.EvalNetworks.for_preset("mini", device="cpu", progress=False)
    tiny = models.load_clip_vision("tiny-trained", device="cpu")
    assert nets.sizes["clip"] == tiny.input_size == 56 and nets.available("clip")
    x, y = scene_images[:5], scene_images[5:10]
    report = evaluation.evaluate(x, y, nets, metrics=["CLIP", "CLIP-cos", "PixCorr"])
    # Reference: the tiny CLIP's image embedding of the images resized (one antialiased bilinear resize) and
    # normalised with its own statistics, written out here.
    def embed(u8):
        t = torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255
        t = torch.nn.functional.interpolate(t, size=(56, 56), mode="bilinear", antialias=True).clamp(0, 1)
        t = (t - torch.tensor(tiny.mean).view(1, 3, 1, 1)) / torch.tensor(tiny.std).view(1, 3, 1, 1)
        with torch.no_grad():
            return tiny.visual(t).double().numpy()
    a, b = embed(x), embed(y)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    np.testing.assert_allclose(report.per_image["CLIP-cos"], cos, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(report.per_image["CLIP"], 100 * metrics.two_way_identification(a, b), atol=1e-9)
    assert report.labels == {"CLIP": "CLIP (tiny CLIP)", "CLIP-cos": "CLIP-cos (tiny CLIP)"}
    df = evaluation.table({"r": report}, "all")
    assert "CLIP (tiny CLIP) and CLIP-cos (tiny CLIP): computed by a substitute for CLIP ViT-L/14" in df.attrs["header"]
    shown = evaluation.styled(df)
    assert "CLIP (tiny CLIP)" in shown.to_html()
    # its text form (a notebook's text/plain) is the same table, formatted, under its header; no object address
    text = repr(shown)
    assert text.startswith(df.attrs["header"].splitlines()[0]) and " at 0x" not in text
    assert "CLIP (tiny CLIP)" in text and f"{report.values['CLIP']:.1f}%" in text
    both = evaluation.beside_published(df, "mini")
    assert np.isnan(both.loc["r", "CLIP"]) and both.loc["r", "CLIP (tiny CLIP)"] == report.values["CLIP"]
    assert np.isnan(both.loc["MindEye", "CLIP (tiny CLIP)"]) and both.loc["MindEye", "CLIP"] == 94.3
    assert evalnets.EvalNetworks.for_preset("nsd", device="cpu").clip is None
    with pytest.raises(ValueError, match="preset"):
        evalnets.EvalNetworks.for_preset("imagenet")


def test_the_stimuli_s_features_are_computed_once(scene_images, monkeypatch):
    """Several conditions (and subjects) scored against one set of stimuli: each network sees the stimuli once."""
    from mdlib.cachekey import cache_key

    nets = evalnets.EvalNetworks(weights="random", device="cpu", seed=0, batch_size=8, progress=False)
    seen = []
    real = nets.preprocess

    def spy(key, images):
        seen.append((key, cache_key(np.asarray(images), n=None)))
        return real(key, images)

    monkeypatch.setattr(nets, "preprocess", spy)
    stim = scene_images[10:14].copy()
    for k in range(3):
        evaluation.evaluate(scene_images[k * 4:k * 4 + 4], stim, nets, metrics=["AlexNet(2)", "SwAV"])
    stim_key = cache_key(stim, n=None)
    assert sum(1 for key, c in seen if c == stim_key) == 2        # alexnet and swav, once each
    assert len(seen) == 3 * 2 + 2                                  # three reconstruction sets, the stimuli once


def test_eval_weights_command(monkeypatch, capsys):
    """`mdlib eval-weights` prints each file's source, or the download's error and exit status 1."""
    from mdlib import cli

    monkeypatch.setattr(evalnets, "fetch_weights", lambda cache_dir=None, progress=True: {"alexnet": "pretrained: x"})
    assert cli.main(["eval-weights", "-q"]) == 0
    assert "alexnet: pretrained: x" in capsys.readouterr().out

    def offline(cache_dir=None, progress=True):
        raise RuntimeError("could not load the AlexNet weights from https://... (URLError: no network)")

    monkeypatch.setattr(evalnets, "fetch_weights", offline)
    assert cli.main(["eval-weights"]) == 1
    assert "mdlib eval-weights: could not load the AlexNet weights" in capsys.readouterr().err

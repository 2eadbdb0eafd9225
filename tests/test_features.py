"""mdlib.features: z, c and the CLIP structural features on a small mini-NSD with the tiny models; the
chunked, resumable target cache."""

import numpy as np
import pytest
import torch

from mdlib import features, models
from mdlib.nsd.stimuli import StimulusReader, load_captions


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def mini_root(mini_nsd):
    return mini_nsd(subjects=(1,), n_shared=6, n_per_subject=24, trials_per_session=18, stim_size=32)


@pytest.fixture(scope="module")
def sd64(tiny_dir):
    """float64: batch-composition checks without float32 rounding (a random-weight VAE amplifies it ~1e3x on
    mini-NSD's flat scenes, through GroupNorm of near-constant groups)."""
    return models.load_sd(tiny_dir, device="cpu", dtype=torch.float64)


# ---------------------------------------------------------------------------------------------------- z

def test_z_shape_and_mean_matches_manual(sd, mini_root):
    with StimulusReader(mini_root) as reader:
        images = reader.read([0, 3, 5], size=sd.image_size)
    z = features.vae_latents(sd, images, posterior="mean")
    assert z.shape == (3, *sd.latent_shape) == (3, 4, 16, 16) and z.dtype == torch.float32
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    with torch.no_grad():
        manual = sd.vae.encode(x).latent_dist.mean * sd.vae_scale
    torch.testing.assert_close(z, manual)


def test_z_sample_is_seeded_per_image(sd64, mini_root):
    sd = sd64
    with StimulusReader(mini_root) as reader:
        images = reader.read([1, 2, 4], size=sd.image_size)
    seeds = [features.latent_seed(i, 0) for i in (1, 2, 4)]
    together = features.vae_latents(sd, images, posterior="sample", seeds=seeds)
    alone = torch.cat([features.vae_latents(sd, images[k:k + 1], posterior="sample", seeds=seeds[k:k + 1])
                       for k in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-6, atol=1e-7)
    mean = features.vae_latents(sd, images, posterior="mean")
    assert not torch.allclose(together, mean)
    other_seed = features.vae_latents(sd, images, posterior="sample",
                                      seeds=[features.latent_seed(i, 1) for i in (1, 2, 4)])
    assert not torch.allclose(together, other_seed)
    assert features.latent_seed(7, 0) == features.latent_seed(7, 0) != features.latent_seed(8, 0)
    with pytest.raises(ValueError, match="posterior"):
        features.vae_latents(sd, images, posterior="mode")


def test_z_resizes_and_decodes(sd):
    x = torch.rand(2, 3, 40, 40)
    z = features.vae_latents(sd, x, posterior="mean")
    assert z.shape == (2, 4, 16, 16)
    back = features.decode_latents(sd, z)
    assert back.shape == (2, 3, 64, 64) and float(back.min()) >= 0 and float(back.max()) <= 1


# ---------------------------------------------------------------------------------------------------- c

def test_c_is_the_average_over_captions(sd, mini_root):
    ids = [0, 2, 7]
    captions = load_captions(mini_root, ids)
    assert all(len(c) >= 2 for c in captions)
    c = features.caption_embeddings(sd, captions, n_tokens=15)
    assert c.shape == (3, 15, sd.text_width) and c.dtype == torch.float32
    for k, caps in enumerate(captions):
        ids_k = sd.tokenizer(caps, padding="max_length", max_length=15, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            manual = sd.text_encoder(ids_k).last_hidden_state.mean(dim=0)
        torch.testing.assert_close(c[k], manual)
    c77 = features.caption_embeddings(sd, captions, n_tokens=77)
    assert c77.shape == (3, 77, sd.text_width)


def test_bos_row_is_constant_and_restorable(sd, mini_root):
    captions = load_captions(mini_root, [0, 1, 2, 3])
    per_caption = features.prompt_embeddings(sd, [t for caps in captions for t in caps], n_tokens=15)
    bos = features.bos_embedding(sd)
    assert bos.shape == (sd.text_width,)
    torch.testing.assert_close(per_caption[:, 0], bos.expand(len(per_caption), -1), rtol=0, atol=1e-6)
    c = features.caption_embeddings(sd, captions, n_tokens=15)
    tail = features.drop_bos(c)
    assert tail.shape == (4, 14, sd.text_width)
    torch.testing.assert_close(features.restore_bos(tail, bos), c, rtol=0, atol=1e-6)
    restored = features.restore_bos(tail.numpy(), bos)
    assert isinstance(restored, np.ndarray) and restored.shape == (4, 15, sd.text_width)
    np.testing.assert_allclose(restored, c.numpy(), atol=1e-6)


def test_short_prompts_15_tokens_are_a_prefix_of_77(sd):
    """Causal attention: with <= 13 word tokens, the 15-token embedding is the first 15 rows of the 77-token one."""
    prompts = ["a red square", "two dogs on grass"]
    torch.testing.assert_close(features.prompt_embeddings(sd, prompts, n_tokens=15),
                               features.prompt_embeddings(sd, prompts, n_tokens=77)[:, :15])
    with pytest.raises(ValueError, match="n_tokens"):
        features.prompt_embeddings(sd, prompts, n_tokens=78)
    with pytest.raises(TypeError):
        features.prompt_embeddings(sd, "one string")


# ------------------------------------------------------------------------------------------------- CLIP

def _manual_features(clip, x_normalised, blocks):
    """c_proj outputs by running the blocks by hand (open_clip 3.x: batch first)."""
    visual = clip.visual
    with torch.no_grad():
        h = visual._embeds(x_normalised)
        out = {}
        for k, block in enumerate(visual.transformer.resblocks, start=1):
            h = h + block.ls_1(block.attention(q_x=block.ln_1(h)))
            mlp = block.mlp(block.ln_2(h))
            if k in blocks:
                out[f"block{k}"] = mlp
            h = h + block.ls_2(mlp)
        pooled, _ = visual._pool(h)
        out["embedding"] = pooled @ visual.proj
    return out


def test_hooks_give_the_c_proj_outputs(clip):
    torch.manual_seed(0)
    images = torch.rand(3, 3, 56, 56)
    feats = features.clip_lowlevel_features(clip, images, differentiable=False)
    assert list(feats) == features.clip_feature_names() == [f"block{k}" for k in range(1, 7)] + ["embedding"]
    for k in range(1, 7):
        assert feats[f"block{k}"].shape == (3, 50, clip.width) == (3, 50, 64)
    assert feats["embedding"].shape == (3, clip.embed_dim)
    manual = _manual_features(clip, features.clip_preprocess(clip, images), set(range(1, 7)))
    for name, value in manual.items():
        torch.testing.assert_close(feats[name], value, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(feats["embedding"], clip.model.encode_image(features.clip_preprocess(clip, images)))
    # hooks are removed after the call
    assert all(not block.mlp.c_proj._forward_hooks for block in clip.blocks)
    assert not feats["block1"].requires_grad


def test_gradients_flow_to_the_image(clip):
    torch.manual_seed(1)
    image = torch.rand(2, 3, 64, 64, requires_grad=True)  # a generated image at the tiny SD size
    feats = features.clip_lowlevel_features(clip, image, differentiable=True)
    target = {k: torch.randn_like(v) for k, v in feats.items()}
    loss = sum(torch.nn.functional.mse_loss(feats[k], target[k]) for k in feats)
    loss.backward()
    assert image.grad is not None and torch.isfinite(image.grad).all() and image.grad.abs().sum() > 0
    assert all(p.grad is None for p in clip.model.parameters())


def test_differentiable_even_under_no_grad_and_selectable_blocks(clip):
    image = torch.rand(1, 3, 56, 56, requires_grad=True)
    with torch.no_grad():
        feats = features.clip_lowlevel_features(clip, image, blocks=(2, 7))
    assert set(feats) == {"block2", "block7", "embedding"} and feats["block7"].requires_grad
    with pytest.raises(ValueError, match="blocks"):
        features.clip_lowlevel_features(clip, image, blocks=(0,))


def test_normalisation_option(clip):
    torch.manual_seed(2)
    images = torch.rand(2, 3, 56, 56)
    x_clip = features.clip_preprocess(clip, images)
    x_imagenet = features.clip_preprocess(clip, images, normalization="imagenet")
    mean, std = torch.tensor(models.IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(models.IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(x_imagenet, (images - mean) / std)
    mean, std = torch.tensor(models.CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(models.CLIP_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(x_clip, (images - mean) / std)
    a = features.clip_lowlevel_features(clip, images, differentiable=False)
    b = features.clip_lowlevel_features(clip, images, differentiable=False, normalization="imagenet")
    assert not torch.allclose(a["block1"], b["block1"])
    with pytest.raises(ValueError, match="normalization"):
        features.clip_preprocess(clip, images, normalization="none")


def test_resize_to_input_size(clip):
    big = torch.rand(1, 3, 224, 224)
    assert features.clip_preprocess(clip, big).shape == (1, 3, 56, 56)
    uint8 = (np.random.default_rng(0).random((2, 32, 32, 3)) * 255).astype(np.uint8)
    x = features.clip_preprocess(clip, uint8)
    assert x.shape == (2, 3, 56, 56)
    same = features.resize_images(torch.rand(1, 3, 56, 56), 56)
    assert same.shape == (1, 3, 56, 56)


def test_sequence_first_transformers_give_batch_first_features(clip, tiny_dir):
    """Older open_clip ran the ViT sequence-first: the hooked outputs are still (batch, tokens, width)."""
    seq_first = models.load_clip_vision(tiny_dir, device="cpu")
    seq_first.visual.transformer.batch_first = False
    for block in seq_first.blocks:
        block.attn.batch_first = False
    images = torch.rand(2, 3, 56, 56)
    a = features.clip_lowlevel_features(clip, images, differentiable=False)
    b = features.clip_lowlevel_features(seq_first, images, differentiable=False)
    for name in a:
        assert b[name].shape == a[name].shape
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------- extraction

IDS = np.array([5, 0, 11, 3, 8, 1, 2, 9, 4], dtype=np.int64)


def test_extract_targets_shapes_and_values(sd64, clip, mini_root, tmp_path):
    sd = sd64
    out = features.extract_targets(mini_root, IDS, sd, clip, cache_dir=tmp_path, batch_size=4, chunk_size=4,
                                   progress=False)
    assert np.array_equal(out["nsd_ids"], IDS)
    assert out["z"].shape == (9, 4, 16, 16) and out["z"].dtype == np.float32
    assert out["c"].shape == (9, 15, 32)
    for k in range(1, 7):
        assert out[f"clip_block{k}"].shape == (9, 50, 64)
    assert out["clip_embedding"].shape == (9, 64)
    # rows follow the nsdIds given, whatever the chunking
    with StimulusReader(mini_root) as reader:
        images = reader.read(IDS[[2, 6]], size=sd.image_size)
        native = reader.read(IDS[[2, 6]])
    seeds = [features.latent_seed(i, 0) for i in IDS[[2, 6]]]
    np.testing.assert_allclose(out["z"][[2, 6]], features.vae_latents(sd, images, seeds=seeds).numpy(),
                               rtol=1e-5, atol=1e-6)
    c = features.caption_embeddings(sd, load_captions(mini_root, IDS[[2, 6]]), n_tokens=15).numpy()
    np.testing.assert_allclose(out["c"][[2, 6]], c, rtol=1e-5, atol=1e-6)
    feats = features.clip_lowlevel_features(clip, native, differentiable=False)
    np.testing.assert_allclose(out["clip_block3"][[2, 6]], feats["block3"].numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out["clip_embedding"][[2, 6]], feats["embedding"].numpy(), rtol=1e-4, atol=1e-5)


def test_extract_targets_resumes_after_interruption(sd, mini_root, tmp_path):
    kwargs = dict(targets=("z",), batch_size=2, chunk_size=2, progress=False)
    reference = features.extract_targets(mini_root, IDS, sd, cache_dir=tmp_path / "fresh", **kwargs)
    calls = []

    def interrupt_after_two(group, index, n_chunks, computed):
        calls.append((index, computed))
        if len(calls) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        features.extract_targets(mini_root, IDS, sd, cache_dir=tmp_path / "run", on_chunk=interrupt_after_two,
                                 **kwargs)
    assert calls == [(0, True), (1, True)]
    folder = next((tmp_path / "run").glob("z-*"))
    assert sorted(p.name for p in folder.glob("chunk-*")) == ["chunk-00000.safetensors", "chunk-00001.safetensors"]
    assert not (folder / "manifest.json").exists()

    calls.clear()
    resumed = features.extract_targets(mini_root, IDS, sd, cache_dir=tmp_path / "run",
                                       on_chunk=lambda g, i, n, computed: calls.append((i, computed)), **kwargs)
    assert calls == [(0, False), (1, False), (2, True), (3, True), (4, True)]  # 9 images in chunks of 2
    np.testing.assert_array_equal(resumed["z"], reference["z"])
    assert (folder / "manifest.json").is_file() and not list(folder.glob("chunk-*"))

    # complete: a third run computes nothing
    calls.clear()
    again = features.extract_targets(mini_root, IDS, sd, cache_dir=tmp_path / "run",
                                     on_chunk=lambda g, i, n, computed: calls.append((i, computed)), **kwargs)
    assert [computed for _, computed in calls] == [False] * 5
    np.testing.assert_array_equal(again["z"], reference["z"])


def test_deleted_chunk_is_recomputed(sd, mini_root, tmp_path):
    kwargs = dict(targets=("c",), batch_size=3, chunk_size=3, progress=False)

    def stop_at_end(group, index, n_chunks, computed):
        if index == n_chunks - 1:
            raise RuntimeError("stop before assembling")

    with pytest.raises(RuntimeError):
        features.extract_targets(mini_root, IDS, sd, cache_dir=tmp_path, on_chunk=stop_at_end, **kwargs)
    folder = next(tmp_path.glob("c-*"))
    (folder / "chunk-00001.safetensors").unlink()
    calls = []
    out = features.extract_targets(mini_root, IDS, sd, cache_dir=tmp_path,
                                   on_chunk=lambda g, i, n, computed: calls.append((i, computed)), **kwargs)
    assert calls == [(0, False), (1, True), (2, False)]
    direct = features.caption_embeddings(sd, load_captions(mini_root, IDS), n_tokens=15).numpy()
    np.testing.assert_allclose(out["c"], direct, rtol=1e-5, atol=1e-6)


def test_cache_key_follows_parameters_models_and_ids(sd, clip, mini_root, tmp_path):
    cache = tmp_path / "cache"
    kwargs = dict(cache_dir=cache, batch_size=8, chunk_size=8, progress=False)
    features.extract_targets(mini_root, IDS, sd, targets=("z",), posterior="mean", **kwargs)
    features.extract_targets(mini_root, IDS, sd, targets=("z",), posterior="mean", **kwargs)
    assert len(list(cache.glob("z-*"))) == 1
    features.extract_targets(mini_root, IDS, sd, targets=("z",), posterior="sample", **kwargs)
    features.extract_targets(mini_root, IDS[::-1], sd, targets=("z",), posterior="mean", **kwargs)
    assert len(list(cache.glob("z-*"))) == 3
    other = models.load_sd(models.build_tiny_models(tmp_path / "tiny-seed1", seed=1), device="cpu")
    features.extract_targets(mini_root, IDS, other, targets=("z",), posterior="mean", **kwargs)
    assert len(list(cache.glob("z-*"))) == 4
    a = features.extract_targets(mini_root, IDS, clip=clip, **kwargs)
    b = features.extract_targets(mini_root, IDS, clip=clip, normalization="imagenet", **kwargs)
    assert len(list(cache.glob("clip-*"))) == 2 and not np.allclose(a["clip_block1"], b["clip_block1"])
    assert features.clear_target_cache(cache_dir=cache) == 6 and not list(cache.glob("*-*"))


def test_extract_targets_argument_checks(sd, mini_root, tmp_path):
    with pytest.raises(ValueError, match="need sd"):
        features.extract_targets(mini_root, IDS, targets=("z",), cache_dir=tmp_path)
    with pytest.raises(ValueError, match="needs clip"):
        features.extract_targets(mini_root, IDS, sd, targets=("clip",), cache_dir=tmp_path)
    with pytest.raises(ValueError, match="subset"):
        features.extract_targets(mini_root, IDS, sd, targets=("pixels",), cache_dir=tmp_path)
    with pytest.raises(ValueError, match="no nsdIds"):
        features.extract_targets(mini_root, [], sd, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="n_tokens"):
        features.extract_targets(mini_root, IDS, sd, targets=("c",), n_tokens=1, cache_dir=tmp_path)


def test_resize_modes_equal_torchvision():
    """The released code's resizes: torchvision's tensor Resize, bicubic without antialiasing (generated images)
    and bilinear without (stimuli, torchvision 0.12's default); and the antialiased default."""
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode as IM

    x = torch.rand(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    for mode, (interp, aa) in {"bicubic": (IM.BICUBIC, False), "bilinear": (IM.BILINEAR, False),
                               "bicubic-aa": (IM.BICUBIC, True), "bilinear-aa": (IM.BILINEAR, True)}.items():
        torch.testing.assert_close(features.resize_images(x, 56, mode), TF.resize(x, [56, 56], interp, antialias=aa))
    with pytest.raises(ValueError, match="resize"):
        features.resize_images(x, 56, "lanczos")


def test_clip_preprocess_clamps_only_when_asked(clip):
    x = torch.full((1, 3, clip.input_size, clip.input_size), 1.5)
    mean, std = models.normalization_stats(clip.normalization)
    clamped = features.clip_preprocess(clip, x, clamp=True)
    assert torch.allclose(clamped[0, 0], torch.full_like(clamped[0, 0], (1.0 - mean[0]) / std[0]))
    assert torch.allclose(features.clip_preprocess(clip, x)[0, 0], torch.full_like(clamped[0, 0], (1.5 - mean[0]) / std[0]))

"""mdlib.models: tiny models (deterministic, saved and reloaded through from_pretrained), the offline CLIP
tokenizer, SD v1-4's full-size shapes on the meta device, the real loaders' offline error, the manifest."""

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from mdlib import models

#: The published SD v1-4 and open_clip configs (JSON only, no weights), copied into the repository.
PUBLISHED_CONFIGS = Path(__file__).resolve().parent / "data" / "model_configs"
CAPTIONS = [
    "A man riding a wave on top of a surfboard.",
    "Two dogs  playing in the SNOW!!",
    "a café's naïve résumé: 3.5 km/h, isn't it?",
    "",
    "A red double-decker bus parked next to a tall building with many windows and a clock on its tower.",
    "zebra " * 40,
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def deadline():
    """Fail (instead of hanging) if a test that must not touch the network takes more than 30 s."""
    def _timeout(signum, frame):
        raise TimeoutError("took more than 30 s: a network call?")
    old = signal.signal(signal.SIGALRM, _timeout)
    signal.alarm(30)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


# ------------------------------------------------------------------------------------------------ tokenizer

def test_clip_vocab_is_clips():
    vocab, merges = models.clip_vocab_and_merges()
    assert len(vocab) == models.CLIP_VOCAB_SIZE == 49408
    assert len(merges) == 48894
    assert vocab[49406:] == ["<|startoftext|>", "<|endoftext|>"]
    assert vocab[:3] == ["!", '"', "#"]


@pytest.mark.parametrize("length", [77, 15])
def test_tokenizer_matches_open_clip(sd, length):
    """The offline-built tokenizer gives open_clip's own CLIP token ids (open_clip pads with 0, SD with EOS)."""
    import open_clip

    reference = open_clip.get_tokenizer("ViT-B-32")(CAPTIONS, context_length=length)
    ours = sd.tokenizer(CAPTIONS, padding="max_length", max_length=length, truncation=True,
                        return_tensors="pt").input_ids
    assert ours.shape == reference.shape == (len(CAPTIONS), length)
    for mine, ref in zip(ours.tolist(), reference.tolist()):
        n = sum(1 for t in ref if t != 0)
        assert mine[:n] == ref[:n]
        assert mine[n:] == [49407] * (length - n)
        assert mine[0] == 49406 and 49407 in mine
    assert len(sd.tokenizer) == 49408 and sd.tokenizer.model_max_length == 77


# ---------------------------------------------------------------------------------------------- tiny models

def test_tiny_build_is_deterministic(tmp_path, tiny_dir):
    from safetensors.torch import load_file

    again = models.build_tiny_models(tmp_path / "again")
    other = models.build_tiny_models(tmp_path / "seed1", seed=1)
    files = sorted(p.relative_to(tiny_dir) for p in tiny_dir.rglob("*.safetensors"))
    assert len(files) == 4
    for rel in files:
        assert (again / rel).read_bytes() == (tiny_dir / rel).read_bytes(), rel
        a, b = load_file(tiny_dir / rel), load_file(other / rel)
        assert any(not torch.equal(a[k], b[k]) for k in a), f"seed 1 gave seed 0's weights in {rel}"
    for sub in ("tokenizer", "scheduler"):
        for path in (tiny_dir / sub).iterdir():
            assert (again / sub / path.name).read_bytes() == path.read_bytes()
    # an existing complete build is kept, not rebuilt
    stamp = (again / "mdlib_tiny.json").stat().st_mtime_ns
    assert models.build_tiny_models(again) == again
    assert (again / "mdlib_tiny.json").stat().st_mtime_ns == stamp


def test_tiny_layout_and_sizes(tiny_dir):
    marker = json.loads((tiny_dir / "mdlib_tiny.json").read_text())
    assert marker["version"] == models.TINY_VERSION and marker["seed"] == 0 and marker["image_size"] == 64
    assert marker["bytes"] < 30e6  # the tiny models are committed later: a few MB each, <= 30 MB in all
    for rel in ("model_index.json", "scheduler/scheduler_config.json", "tokenizer/vocab.json",
                "tokenizer/merges.txt", "text_encoder/config.json", "unet/config.json", "vae/config.json",
                "clip/open_clip_config.json", "clip/open_clip_model.safetensors"):
        assert (tiny_dir / rel).is_file(), rel
    assert json.loads((tiny_dir / "scheduler/scheduler_config.json").read_text()) == \
        models.SD_V1_4_CONFIGS["scheduler"]
    umask = os.umask(0)
    os.umask(umask)
    assert tiny_dir.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's private 0700


def test_tiny_reload_gives_identical_outputs(sd, tiny_dir):
    fresh = models.make_tiny_components(seed=0)
    torch.manual_seed(1)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    ids = sd.tokenizer(CAPTIONS[:2], padding="max_length", max_length=77, truncation=True,
                       return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(sd.vae.encode(x).latent_dist.mean, fresh["vae"].encode(x).latent_dist.mean)
        z = torch.randn(2, 4, 16, 16)
        assert torch.equal(sd.vae.decode(z).sample, fresh["vae"].decode(z).sample)
        h = sd.text_encoder(ids).last_hidden_state
        assert torch.equal(h, fresh["text_encoder"](ids).last_hidden_state)
        assert torch.equal(sd.unet(z, 500, encoder_hidden_states=h).sample,
                           fresh["unet"](z, 500, encoder_hidden_states=h).sample)
        clip = models.load_clip_vision(tiny_dir, device="cpu")
        img = torch.rand(2, 3, 56, 56)
        assert torch.equal(clip.model.encode_image(img), fresh["clip"].encode_image(img))


def test_tiny_sd_interface(sd):
    assert sd.image_size == 64 and sd.latent_shape == (4, 16, 16) and sd.vae_factor == 4
    assert sd.vae_scale == pytest.approx(0.18215)
    assert sd.text_width == 32 == sd.unet.config.cross_attention_dim
    assert sd.text_encoder.config.vocab_size == 49408 and sd.text_encoder.config.max_position_embeddings == 77
    assert sd.device == torch.device("cpu") and sd.dtype == torch.float32
    assert not any(p.requires_grad for m in (sd.vae, sd.unet, sd.text_encoder) for p in m.parameters())
    assert type(sd.scheduler).__name__ == "DDIMScheduler"
    # docs/method.md: SD v1-4's config + DDIM, 50 steps -> 981 ... 1; 741 at position 12, 681 at position 15
    sd.scheduler.set_timesteps(50)
    steps = sd.scheduler.timesteps.tolist()
    assert steps[0] == 981 and steps[-1] == 1 and steps[12] == 741 and steps[15] == 681
    assert "image_size=64" in repr(sd)


def test_tiny_clip_interface(tiny_dir):
    clip = models.load_clip_vision(tiny_dir, device="cpu")
    assert (clip.input_size, clip.n_tokens, clip.width, clip.embed_dim) == (56, 50, 64, 64)
    assert clip.n_blocks >= 6 and len(clip.blocks) == clip.n_blocks
    assert clip.mean == models.CLIP_MEAN and clip.normalization == "clip"
    assert not any(p.requires_grad for p in clip.model.parameters())
    imagenet = models.load_clip_vision(tiny_dir / "clip", device="cpu", normalization="imagenet")
    assert (imagenet.mean, imagenet.std) == (models.IMAGENET_MEAN, models.IMAGENET_STD)
    assert imagenet.fingerprint() == clip.fingerprint()
    with pytest.raises(ValueError, match="normalization"):
        models.load_clip_vision(tiny_dir, normalization="laion")


def test_default_tiny_dir_is_built_once(tmp_path, monkeypatch):
    monkeypatch.setenv("MDLIB_DATA", str(tmp_path / "home"))
    sd = models.load_sd("tiny", device="cpu")
    folder = tmp_path / "home" / "models" / f"tiny-v{models.TINY_VERSION}"
    assert sd.folder == folder and (folder / "mdlib_tiny.json").is_file()
    stamp = (folder / "mdlib_tiny.json").stat().st_mtime_ns
    clip = models.load_clip_vision("tiny", device="cpu")
    assert clip.n_tokens == 50
    assert (folder / "mdlib_tiny.json").stat().st_mtime_ns == stamp
    assert not list(folder.parent.glob(".*tmp*"))


def test_fingerprint_tracks_weights(sd):
    before = sd.fingerprint("vae")
    assert before == models.module_fingerprint(sd.vae) and len(before) == 16
    other = models.make_tiny_components(seed=3)["vae"]
    assert models.module_fingerprint(other) != before
    assert sd.fingerprint("tokenizer") == sd.fingerprint("tokenizer")


def test_pipeline_layout_loads_in_diffusers(tiny_dir):
    """The tiny folder is a valid StableDiffusionPipeline folder (the same layout as CompVis' repository)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir, local_files_only=True, safety_checker=None)
    assert pipe.unet.config.sample_size == 16 and pipe.tokenizer.vocab_size == 49408


# -------------------------------------------------------------------------------------------- full-size SD

def test_full_size_sd_on_meta_device():
    """SD v1-4's architectures from the published configs, no memory allocated: sizes and shapes."""
    parts = models.sd_v1_4_architecture("meta")
    counts = {name: models.n_params(m) / 1e6 for name, m in parts.items()}
    assert counts["unet"] == pytest.approx(859.5, abs=0.05)
    assert counts["vae"] == pytest.approx(83.7, abs=0.05)
    assert counts["text_encoder"] == pytest.approx(123.1, abs=0.05)
    with torch.no_grad():
        image = torch.empty(1, 3, 512, 512, device="meta")
        latent = parts["vae"].encode(image).latent_dist.mean
        assert tuple(latent.shape) == (1, 4, 64, 64)  # 16,384 values (docs/method.md)
        text = parts["text_encoder"](torch.zeros(1, 77, dtype=torch.long, device="meta")).last_hidden_state
        assert tuple(text.shape) == (1, 77, 768)
        eps = parts["unet"](latent, torch.tensor([741], device="meta"), encoder_hidden_states=text).sample
        assert tuple(eps.shape) == (1, 4, 64, 64)
        assert tuple(parts["vae"].decode(latent).sample.shape) == (1, 3, 512, 512)
    assert parts["vae"].config.scaling_factor == models.SD_VAE_SCALE


def test_embedded_configs_match_published():
    def load(rel):
        data = json.loads((PUBLISHED_CONFIGS / rel).read_text())
        dropped = ("torch_dtype", "transformers_version")
        return {k: v for k, v in data.items() if not k.startswith("_") and k not in dropped}

    assert load("sd-v1-4/unet/config.json") == models.SD_V1_4_CONFIGS["unet"]
    assert load("sd-v1-4/vae/config.json") == models.SD_V1_4_CONFIGS["vae"]
    text = load("sd-v1-4/text_encoder/config.json")
    text.pop("_name_or_path", None)
    assert text == models.SD_V1_4_CONFIGS["text_encoder"]
    scheduler = json.loads((PUBLISHED_CONFIGS / "sd-v1-4/scheduler/scheduler_config.json").read_text())
    assert scheduler == models.SD_V1_4_CONFIGS["scheduler"]
    assert json.loads((PUBLISHED_CONFIGS / "sd-v1-4/tokenizer/tokenizer_config.json").read_text()) == \
        models.SD_V1_4_TOKENIZER_CONFIG
    assert json.loads((PUBLISHED_CONFIGS / "sd-v1-4/tokenizer/special_tokens_map.json").read_text()) == \
        models.SD_V1_4_SPECIAL_TOKENS_MAP
    assert json.loads((PUBLISHED_CONFIGS / "open_clip/ViT-B-32-quickgelu.json").read_text()) == \
        models.VIT_B_32_QUICKGELU


# ---------------------------------------------------------------------------------------- real, offline

@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return tmp_path / "hf"


def test_real_sd_missing_offline_names_id_and_command(empty_hub, deadline):
    start = time.perf_counter()
    with pytest.raises(models.WeightsNotFoundError) as err:
        models.load_sd("CompVis/stable-diffusion-v1-4", device="cpu")
    assert time.perf_counter() - start < 5
    message = str(err.value)
    assert "CompVis/stable-diffusion-v1-4" in message
    assert "hf download CompVis/stable-diffusion-v1-4 " in message
    assert "unet/diffusion_pytorch_model.safetensors" in message and "--revision main" in message
    assert str(empty_hub) in message
    assert err.value.model_id == "CompVis/stable-diffusion-v1-4"
    assert err.value.command == models.fetch_command("stable_diffusion")
    assert isinstance(err.value, FileNotFoundError)
    assert not (empty_hub / "hub").exists() or not any((empty_hub / "hub").rglob("*.safetensors"))


def test_real_clip_missing_offline_names_id_and_command(empty_hub, deadline):
    start = time.perf_counter()
    with pytest.raises(models.WeightsNotFoundError) as err:
        models.load_clip_vision("openai", device="cpu")
    assert time.perf_counter() - start < 5
    assert "timm/vit_base_patch32_clip_224.openai" in str(err.value)
    assert "hf download timm/vit_base_patch32_clip_224.openai open_clip_model.safetensors" in str(err.value)


def test_local_files_only_is_honoured_without_env(tmp_path, monkeypatch, deadline):
    """local_files_only=True never downloads, whatever HF_HUB_OFFLINE says."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert not models.hub_offline()
    with pytest.raises(models.WeightsNotFoundError, match="hf download"):
        models.load_sd("CompVis/stable-diffusion-v1-4", local_files_only=True)


def test_loads_a_hub_cache_snapshot(tmp_path, tiny_dir, monkeypatch, deadline):
    """A model id resolves to its cached snapshot (here: a fake cache entry holding the tiny files)."""
    import shutil

    cache = tmp_path / "hub"
    commit = "0" * 40
    repo = cache / "models--CompVis--stable-diffusion-v1-4"
    shutil.copytree(tiny_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    weights = repo / "snapshots" / commit / "text_encoder" / "model.safetensors"
    weights.rename(tmp_path / "moved")  # an incomplete snapshot is reported, with the command
    with pytest.raises(models.WeightsNotFoundError, match="lacks.*text_encoder/model.safetensors"):
        models.load_sd("CompVis/stable-diffusion-v1-4", device="cpu", cache_dir=cache)
    (tmp_path / "moved").rename(weights)
    sd = models.load_sd("CompVis/stable-diffusion-v1-4", device="cpu", cache_dir=cache)
    assert sd.revision == "main" and sd.folder == repo / "snapshots" / commit and sd.image_size == 64


@pytest.mark.parametrize("weights_file", ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"])
def test_openai_clip_resolves_from_the_hub_cache(tiny_dir, clip_stand_in, deadline, weights_file):
    """source='openai' takes the manifest's file from the hub cache (safetensors, else the .bin twin) and
    builds the manifest's open_clip architecture (here a stand-in: the tiny CLIP's, registered for the test)."""
    from safetensors.torch import load_file

    cache, snapshot = clip_stand_in("clip_vision")
    state = load_file(tiny_dir / "clip" / "open_clip_model.safetensors")
    if weights_file.endswith(".bin"):
        torch.save(state, snapshot / weights_file)
    else:
        (snapshot / weights_file).write_bytes((tiny_dir / "clip" / weights_file).read_bytes())
    clip = models.load_clip_vision("openai", device="cpu", cache_dir=cache)
    assert clip.source == "openai" and clip.n_tokens == 50
    assert clip.fingerprint() == models.load_clip_vision(tiny_dir, device="cpu").fingerprint()


def test_not_a_folder_and_bad_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        models.load_sd(str(tmp_path / "missing" / "deeper" / "folder"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a Stable Diffusion folder"):
        models.load_sd(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="open_clip"):
        models.load_clip_vision(tmp_path / "empty")
    with pytest.raises(ValueError, match="attention"):
        models.load_sd("tiny", attention="flash")
    with pytest.raises(ValueError, match="multiple of 8"):
        models.tiny_configs(60)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file.txt").write_text("x")
    with pytest.raises(FileExistsError):
        models.build_tiny_models(tmp_path / "busy")


def test_device_defaults_and_fallback():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert models.resolve_device(None).type == expected
    if not torch.cuda.is_available():
        with pytest.warns(RuntimeWarning, match="CUDA"):
            assert models.resolve_device("cuda").type == "cpu"


# ---------------------------------------------------------------------------------------------- manifest

def test_manifest_file_matches_defaults():
    assert models.MANIFEST_PATH.is_file()
    manifest = models.model_manifest()
    assert manifest == models.DEFAULT_MANIFEST
    assert manifest["stable_diffusion"]["id"] == "CompVis/stable-diffusion-v1-4"
    assert manifest["stable_diffusion"]["revision"]
    assert manifest["clip_vision"]["open_clip_name"] == "ViT-B-32-quickgelu"
    assert manifest["clip_text"]["id"] == "openai/clip-vit-large-patch14"


def test_manifest_matches_open_clip_registry():
    """The hub repository of open_clip's ViT-B-32 'openai' weights is the one the manifest names."""
    from open_clip.pretrained import get_pretrained_cfg

    cfg = get_pretrained_cfg("ViT-B-32-quickgelu", "openai") or get_pretrained_cfg("ViT-B-32", "openai")
    assert cfg["hf_hub"].rstrip("/") == models.model_manifest()["clip_vision"]["id"]
    assert cfg.get("quick_gelu", True)
    assert tuple(cfg["mean"]) == models.CLIP_MEAN and tuple(cfg["std"]) == models.CLIP_STD

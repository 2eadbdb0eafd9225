"""The real path at full size, rehearsed offline: SD v1-4 and CLIP ViT-B/32 with random weights in a Hugging
Face cache laid out as a download lays it out, resolved by their real ids with HF_HUB_OFFLINE=1, and stage 1
and the published stage 2 run through ``mdlib reconstruct --preset nsd`` on NSD-shaped decoded features read
from a file (``--decoded``), small (``--image-size 128``: latents 4 x 16 x 16) and short (2 DDIM steps, 1
iteration).

The fast tests check the pieces on the tiny models: the decoded-features file (round trip, errors that name
the file and the fix, a run from it without any data root), ``--image-size`` (the latent resize's known
answer, the sizes a model accepts), and the memory meters that ``benchmarks/bench_memory.py`` runs on fake
tensors (fake counts equal real ones; live memory's known answer).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import fullsize
from mdlib import cli, models, reconstruct

PUBLISHED_CONFIGS = Path(__file__).resolve().parent / "data" / "model_configs"
#: The published sampler's schedule (50 steps, z noised to index 37) cut to its first 2 denoising steps.
SHORT = ["--num-steps", "50", "--noise-index", "37", "--denoise-steps", "2"]


# ------------------------------------------------------------------------------------------ full size (slow)

@pytest.fixture(scope="session")
def stand_ins(tmp_path_factory):
    """The stand-in cache, written once per session under ``<HF_HOME>/hub`` and removed at the end (4.9 GB)."""
    home = tmp_path_factory.mktemp("hf-home")
    t0 = time.perf_counter()
    snapshots = fullsize.hub_cache(home / "hub")
    yield {"home": home, "snapshots": snapshots, "build_s": time.perf_counter() - t0}
    shutil.rmtree(home, ignore_errors=True)


def _offline_as_a_user(monkeypatch, home):
    for name, value in fullsize.offline_hub_env(home).items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)


def _settings(path):
    """A config file's settings: its keys less the writer's marks (``_class_name``, versions, ...)."""
    data = json.loads(Path(path).read_text())
    return {k: v for k, v in data.items() if not k.startswith("_") and k not in ("torch_dtype", "transformers_version")}


@pytest.mark.slow
def test_the_stand_in_cache_has_the_published_models_where_a_download_puts_them(stand_ins, monkeypatch):
    from safetensors import safe_open

    from mdlib.cachekey import file_sha256

    _offline_as_a_user(monkeypatch, stand_ins["home"])
    sd_snap, clip_snap = stand_ins["snapshots"]["stable_diffusion"], stand_ins["snapshots"]["clip_vision"]
    for snap, repo_id in ((sd_snap, fullsize.SD_ID), (clip_snap, fullsize.CLIP_ID)):
        repo = stand_ins["home"] / "hub" / ("models--" + repo_id.replace("/", "--"))
        assert snap.parent == repo / "snapshots" and (repo / "refs" / "main").read_text() == snap.name
        assert models.hub_commit(snap) == snap.name and len(snap.name) == 40
        for f in (p for p in snap.rglob("*") if not p.is_dir()):
            assert f.is_symlink() and not Path(f.readlink()).is_absolute()   # relative links into blobs/, as hub's
            blob = f.resolve()
            assert blob.parent == repo / "blobs"
            if f.name == "diffusion_pytorch_model.safetensors" and f.parent.name == "vae":   # the smallest
                assert blob.name == file_sha256(blob)                         # weights: named by their sha256
    # the ids resolve offline through mdlib's own resolution, from HF_HOME alone
    assert models._resolve_hub_folder("stable_diffusion", None, None, None)[0] == sd_snap
    assert models.resolve_clip_weights("clip_vision") == clip_snap / "open_clip_model.safetensors"
    assert all((sd_snap / f).is_file() for f in models.model_manifest()["stable_diffusion"]["files"])
    # the configs are the published ones, the weights have the architectures' names and shapes
    for part in ("unet", "vae", "text_encoder"):
        assert _settings(sd_snap / part / "config.json") == _settings(PUBLISHED_CONFIGS / f"sd-v1-4/{part}/config.json")
    assert json.loads((sd_snap / "scheduler" / "scheduler_config.json").read_text()) == \
        json.loads((PUBLISHED_CONFIGS / "sd-v1-4/scheduler/scheduler_config.json").read_text())
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        assert json.loads((sd_snap / "tokenizer" / name).read_text()) == \
            json.loads((PUBLISHED_CONFIGS / "sd-v1-4/tokenizer" / name).read_text())
    arch = models.sd_v1_4_architecture("meta")
    for part, rel in (("unet", "unet/diffusion_pytorch_model.safetensors"),
                      ("vae", "vae/diffusion_pytorch_model.safetensors"), ("text_encoder", "text_encoder/model.safetensors")):
        want = {k: tuple(v.shape) for k, v in arch[part].state_dict().items()}
        with safe_open(str(sd_snap / rel), framework="pt") as f:
            assert {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()} == want
            if part == "unet":   # PyTorch's default init bound 1/sqrt(fan_in); norms 1 and 0
                w = f.get_tensor("conv_in.weight")
                bound = 1 / np.sqrt(4 * 3 * 3)
                assert float(w.abs().max()) <= bound and float(w.abs().max()) > 0.99 * bound
                assert float(w.std()) == pytest.approx(bound / np.sqrt(3), rel=0.05)
                assert f.get_tensor("conv_norm_out.weight").eq(1).all() and f.get_tensor("conv_norm_out.bias").eq(0).all()
    print(f"stand-in cache written in {stand_ins['build_s']:.1f} s")


@pytest.mark.slow
def test_stage1_and_published_stage2_run_at_full_size_through_the_cli(stand_ins, tmp_path, monkeypatch):
    """``mdlib reconstruct --preset nsd`` for one image: the ids resolve offline, the features come from a file of
    the real shapes, and stage 2's first image is stage 1's (same z, c, seed and sampler)."""
    _offline_as_a_user(monkeypatch, stand_ins["home"])
    decoded = fullsize.nsd_shaped_decoded()
    path = reconstruct.save_decoded(tmp_path / "decoded.npz", decoded)
    out = tmp_path / "out"
    base = ["reconstruct", "--preset", "nsd", "--subject", "1", "--decoded", str(path), "--image-size", "128",
            "--images", "0..1", "--device", "cpu", "--out", str(out), "-q", *SHORT]
    t0 = time.perf_counter()
    assert cli.main([*base, "--stage", "1"]) == 0
    t1 = time.perf_counter()
    assert cli.main([*base, "--stage", "2", "--mode", "published", "--iterations", "1"]) == 0
    t2 = time.perf_counter()
    nsd_id = int(np.sort(decoded.nsd_ids)[0])
    commits = {role: snap.name for role, snap in stand_ins["snapshots"].items()}

    s1, s2 = out / "subj01" / "stage1", out / "subj01" / "stage2-published"
    for folder in (s1, s2):
        settings = json.loads((folder / "run.json").read_text())
        assert settings["method"]["preset"] == "nsd" and settings["image_size"] == 128
        assert settings["models"]["sd"] == {"source": fullsize.SD_ID, "revision": "main",
                                            "commit": commits["stable_diffusion"]}
        assert settings["test_ids"] == sorted(int(i) for i in decoded.nsd_ids)
        record = json.loads((folder / str(nsd_id) / "record.json").read_text())
        assert record["status"] == "done", record["error"]
        image = reconstruct.read_image(folder, nsd_id)
        assert image.shape == (128, 128, 3) and image.dtype == np.uint8
    assert settings["models"]["clip_model"] == {"source": "openai", "revision": "main", "commit": commits["clip_vision"]}
    assert json.loads((s1 / "run.json").read_text())["models"]["unet"] == settings["models"]["unet"]

    rec1 = json.loads((s1 / str(nsd_id) / "record.json").read_text())
    assert rec1["cost"]["unet_passes"] == 2 * 2                      # 2 steps x 2 guidance branches
    out1 = reconstruct.read_outputs(s1, nsd_id)
    z0 = decoded.pred["z"][list(decoded.nsd_ids).index(nsd_id)].reshape(4, 16, 4, 16, 4).mean(axis=(2, 4))
    np.testing.assert_allclose(out1["z"], z0, rtol=1e-5, atol=1e-6)   # the 4 x 4 means of the 64 x 64 z
    assert out1["latents"].shape == (4, 16, 16) and np.isfinite(out1["latents"]).all()

    rec2 = json.loads((s2 / str(nsd_id) / "record.json").read_text())
    cost = rec2["cost"]
    # iteration 0: 4 passes forward, recomputed once by the checkpoints, backpropagated once; iteration 1 scores
    assert (cost["iterations"], cost["unet_passes"], cost["unet_backward"]) == (1, 4 + 4 + 4, 4)
    out2 = reconstruct.read_outputs(s2, nsd_id)
    assert out2["loss"].shape == (2,) and np.isfinite(out2["loss"]).all() and out2["loss"][0] > 0
    assert rec2["loss_first"] == pytest.approx(float(out2["loss"][0]))
    # Adam's first step moves each element of z by lr (0.01) along the sign of its gradient: the loss reached z
    # through CLIP, the VAE decoder and both checkpointed UNet steps, everywhere
    step = np.abs(out2["z"] - z0)
    assert step.max() == pytest.approx(0.01, rel=1e-3) and np.median(step) == pytest.approx(0.01, rel=1e-2)
    assert list(out2["snapshot_iterations"]) == [0, 1]
    np.testing.assert_array_equal(out2["snapshots"][0], reconstruct.read_image(s1, nsd_id))
    print(f"stage 1: {t1 - t0:.1f} s, stage 2 (1 iteration): {t2 - t1:.1f} s, "
          f"peak memory {cost['peak_memory_bytes'] / 2**30:.1f} GiB")


# ----------------------------------------------------------------------------------- the pieces (fast, tiny)

def _tiny_decoded(n_tokens=15, latent=16, width=32, ids=(7, 3, 5), seed=0):
    """Decoded features of the tiny models' shapes (the shipped tiny-trained set: latents 4 x 16 x 16, text
    width 32, CLIP blocks 50 x 64, embedding 64)."""
    from mdlib.decoding import Decoded

    rng = np.random.default_rng(seed)
    shapes = {"z": (4, latent, latent), "c": (n_tokens - 1, width), **{f"clip_block{b}": (50, 64) for b in range(1, 7)},
              "clip_embedding": (64,)}
    pred = {k: rng.standard_normal((len(ids), *s)).astype(np.float32) for k, s in shapes.items()}
    score = {k: rng.random(int(np.prod(s))) for k, s in shapes.items() if k.startswith("clip_block")}
    return Decoded(nsd_ids=np.asarray(ids, dtype=np.int64), pred=pred, true={}, score=score,
                   params={"select_by": "loo-r2"})


def test_a_decoded_file_round_trips_sorted_by_nsd_id(tmp_path):
    decoded = _tiny_decoded()
    path = reconstruct.save_decoded(tmp_path / "d.npz", decoded)
    back = reconstruct.load_decoded(path)
    order = np.argsort(decoded.nsd_ids)
    np.testing.assert_array_equal(back.nsd_ids, [3, 5, 7])
    assert sorted(back.pred) == sorted(decoded.pred)
    for fam, value in decoded.pred.items():
        np.testing.assert_array_equal(back.pred[fam], value[order])
    for fam, value in decoded.score.items():
        np.testing.assert_array_equal(back.score[fam], value)     # per feature: not reordered
    assert back.params["select_by"] == "loo-r2" and back.params["format"] == reconstruct.DECODED_FORMAT
    with np.load(path, allow_pickle=False) as f:                  # plain arrays, no pickles
        assert {f[k].dtype.kind for k in f.files} <= {"i", "f", "U"}


def _mini(path, out, *extra):
    return ["reconstruct", "--preset", "mini", "--subject", "1", "--decoded", str(path), "--out", str(out),
            "--device", "cpu", "-q", "--num-steps", "10", "--noise-index", "6", "--denoise-steps", "2", *extra]


def test_a_run_from_a_decoded_file_needs_no_data_root(tmp_path, monkeypatch):
    """Stage 1 on the tiny-trained models from a file, at half the model's size: z enters as its 2 x 2 block means."""
    monkeypatch.setenv("MDLIB_DATA", str(tmp_path / "empty-home"))      # no mini-NSD anywhere
    decoded = _tiny_decoded()
    path = reconstruct.save_decoded(tmp_path / "d.npz", decoded)
    assert cli.main(_mini(path, tmp_path / "out", "--stage", "1", "--image-size", "32", "--images", "0..2")) == 0
    folder = tmp_path / "out" / "subj01" / "stage1"
    assert not (tmp_path / "empty-home" / "mini-nsd").exists()
    for row, nsd_id in enumerate([3, 5]):
        assert reconstruct.read_image(folder, nsd_id).shape == (32, 32, 3)
        z = decoded.pred["z"][list(decoded.nsd_ids).index(nsd_id)]
        block_means = z.reshape(4, 8, 2, 8, 2).mean(axis=(2, 4))
        np.testing.assert_allclose(reconstruct.read_outputs(folder, nsd_id)["z"], block_means, rtol=1e-6, atol=1e-6)
    assert json.loads((folder / "run.json").read_text())["models"]["sd"] == \
        {"source": "tiny-trained", "revision": None, "commit": None}


@pytest.mark.parametrize("case, message", [
    ("missing", "no such file (write one with mdlib.reconstruct.save_decoded"),
    ("latent", "z is (4, 32, 32), the model needs (4, 16, 16) (or pass --image-size"),
    ("tokens", "c is (76, 32), needs (14, 32): --n-tokens 15"),
    ("scores", "no score_clip_block1: stage 2 keeps the best-decoded 0.25 of each block's features"),
    ("stray", "unknown entries ['clip_block2_old']"),
])
def test_a_bad_decoded_file_stops_before_any_work_naming_it_and_the_fix(tmp_path, capsys, case, message):
    decoded = _tiny_decoded(latent=32 if case == "latent" else 16, n_tokens=77 if case == "tokens" else 15)
    if case == "scores":
        decoded.score.clear()
    if case == "stray":
        decoded.pred["clip_block2_old"] = decoded.pred["clip_block2"]
    path = tmp_path / "d.npz"
    if case != "missing":
        reconstruct.save_decoded(path, decoded)
    stage = ["--stage", "2", "--mode", "fast"] if case == "scores" else ["--stage", "1"]
    assert cli.main(_mini(path, tmp_path / "out", *stage)) == 1
    err = capsys.readouterr().err
    assert message in err and str(path) in err
    assert not (tmp_path / "out").exists()                               # nothing written
    if case == "scores":                                                 # the fix given works
        assert cli.main(_mini(path, tmp_path / "out", *stage, "--keep", "1", "--images", "0..1")) == 0


def test_decode_only_with_a_decoded_file_is_refused(tmp_path, capsys):
    path = reconstruct.save_decoded(tmp_path / "d.npz", _tiny_decoded())
    assert cli.main(_mini(path, tmp_path / "out", "--stage", "1", "--decode-only")) == 1
    assert "with --decoded there is nothing to decode" in capsys.readouterr().err


def test_image_size_sets_the_latent_side_and_refuses_sizes_the_unet_cannot_halve():
    sd = models.load_sd(models.TRAINED_TINY, device="cpu", image_size=96)
    assert (sd.image_size, sd.latent_shape) == (96, (4, 24, 24)) and sd.unet.config.sample_size == 24
    assert models.load_sd(models.TRAINED_TINY, device="cpu").latent_shape == (4, 16, 16)   # the folder is untouched
    with pytest.raises(ValueError, match="multiple of 8 pixels for tiny-trained"):
        models.load_sd(models.TRAINED_TINY, device="cpu", image_size=36)


def test_fit_latents_averages_areas_and_keeps_fitting_latents():
    z = np.arange(2 * 4 * 4 * 4, dtype=np.float32).reshape(2, 4, 4, 4)
    np.testing.assert_array_equal(reconstruct.fit_latents(z, (4, 4, 4)), z)
    small = reconstruct.fit_latents(z, (4, 2, 2))
    np.testing.assert_allclose(small, z.reshape(2, 4, 2, 2, 2, 2).mean(axis=(3, 5)))
    assert reconstruct.fit_latents(z, (4, 8, 8)).shape == (2, 4, 8, 8)


# -------------------------------------------------------------------- the memory meters on fake tensors (fast)

def _tiny_models(fake: bool):
    """The tiny SD and CLIP (seeded), on real tensors or on fake ones (shapes only), with the context every later
    tensor must be made in."""
    import contextlib

    from torch._subclasses.fake_tensor import FakeTensorMode

    ctx = FakeTensorMode() if fake else contextlib.nullcontext()
    with ctx:
        parts = models.make_tiny_components()
        for name in ("vae", "unet", "clip"):
            parts[name].requires_grad_(False)
    sd = models.SDModels(vae=parts["vae"], unet=parts["unet"], text_encoder=None, tokenizer=None,
                         scheduler=parts["scheduler"], image_size=64, latent_shape=(4, 16, 16),
                         vae_scale=models.SD_VAE_SCALE, device=torch.device("cpu"), dtype=torch.float32)
    return ctx, sd, models.wrap_clip(parts["clip"])


def _one_iteration(ctx, sd, clip, autocast, checkpointing):
    from mdlib import stage2
    from mdlib.sampler import DDIMSampler, SamplerConfig, generators

    sampler = DDIMSampler(sd.unet, sd.scheduler, SamplerConfig(num_steps=10, noise_index=3, denoise_steps=2))
    sampler.alphas_cumprod = sampler.alphas_cumprod.tolist()   # read as floats, outside the fake mode
    with ctx:
        g = torch.Generator().manual_seed(0)
        z = torch.randn(1, 4, 16, 16, generator=g).requires_grad_(True)
        cond, uncond = torch.randn(1, 15, 32, generator=g), torch.randn(1, 15, 32, generator=g)
        targets = stage2.FeatureTargets(blocks={f"block{b}": torch.randn(1, 50, 64, generator=g) for b in (1, 2, 3)},
                                        embedding=torch.randn(1, 64, generator=g))
        with stage2.live_memory() as live, fullsize.CudaAutocastNorms():
            with stage2.saved_for_backward(sd.unet, sd.vae, clip.model) as saved, stage2._autocast(sd.device, autocast):
                loss = stage2.render_loss(sd, clip, sampler, z, cond, uncond, targets, generators([0]),
                                          checkpoint=checkpointing)[0]
            loss.sum().backward()
            del loss
    return saved["bytes"], live["peak"], live["now"]



@pytest.mark.parametrize("autocast", [None, "bf16"])
def test_memory_meters_count_fake_tensors_as_real_ones(autocast):
    """benchmarks/bench_memory.py counts SD v1-4 at 512 px on fake tensors: on the tiny models, an iteration of
    the published objective gives the same saved bytes and the same peak on fake tensors as on real ones."""
    real, fake = _tiny_models(False), _tiny_models(True)
    for checkpointing in (False, True):
        got_real = _one_iteration(*real, autocast, checkpointing)
        got_fake = _one_iteration(*fake, autocast, checkpointing)
        assert got_fake == got_real and got_real[0] > 0 and got_real[1] >= got_real[0]


def test_live_memory_follows_storages_from_creation_to_release():
    from mdlib import stage2

    x = torch.randn(1000, 1000, requires_grad=True)        # 4 MB each, made before: not counted
    w = torch.randn(1000, 1000)
    with stage2.live_memory() as live:
        y = torch.tanh(x @ w)          # the product (4 MB), then tanh's output (4 MB, saved); the product freed
        assert (live["now"], live["peak"]) == (4_000_000, 8_000_000)
        y.mul(2).sum().backward()      # a 4 MB temporary, then x.grad (4 MB) and tanh's gradient
        assert live["now"] >= 8_000_000 and live["peak"] >= 12_000_000
        del y
        x.grad = None
    assert live["now"] < 4_000_000 + 100

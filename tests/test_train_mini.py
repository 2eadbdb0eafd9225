"""mdlib.train_mini: checkpoints restore weights and optimizer exactly, an interrupted stage resumes to the
weights of an uninterrupted one, and a few steps of every stage give a folder the loaders read."""

import numpy as np
import pytest
import torch

from mdlib import models, train_mini

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pool():
    return train_mini.scene_pool(24, seed=0, image_size=32)


def _vae():
    return models.make_tiny_components(seed=0, image_size=32)["vae"].requires_grad_(True)


def test_scene_pools_are_deterministic_and_disjoint_streams():
    a = train_mini.scene_pool(6, seed=0, image_size=32)
    b = train_mini.scene_pool(6, seed=0, image_size=32)
    held = train_mini.scene_pool(6, seed=0, image_size=32, stream=1)
    np.testing.assert_array_equal(a.images, b.images)
    assert a.captions == b.captions and len(a.captions[0]) == 5
    assert not any((held.images[i] == a.images[j]).all() for i in range(6) for j in range(6))


def test_checkpoint_round_trip_restores_weights_and_adam(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        net(torch.randn(4, 3)).pow(2).sum().backward()
        opt.step()
    train_mini.save_checkpoint(tmp_path / "ck", {"net": net}, opt, 3, [1.0, 0.5, 0.25])
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["net.safetensors", "optimizer.safetensors",
                                                                   "state.json"]
    other = torch.nn.Linear(3, 2)
    opt2 = torch.optim.AdamW(other.parameters(), lr=0.1)
    info = train_mini.load_checkpoint(tmp_path / "ck", {"net": other}, opt2)
    assert info["step"] == 3 and info["losses"] == [1.0, 0.5, 0.25]
    torch.testing.assert_close(other.weight, net.weight)
    for a, b in zip(opt.state_dict()["state"].values(), opt2.state_dict()["state"].values()):
        for k in a:
            torch.testing.assert_close(torch.as_tensor(a[k]), torch.as_tensor(b[k]))
    assert train_mini.load_checkpoint(tmp_path / "none", {"net": other}, opt2) is None


def test_an_interrupted_stage_resumes_to_the_same_weights(pool, tmp_path, monkeypatch):
    cfg = train_mini.TrainMiniConfig(vae_steps=4, vae_batch=4, save_every=2)
    straight = _vae()
    train_mini.train_vae(straight, pool, cfg, tmp_path / "a", progress=False)

    real_save = train_mini.save_checkpoint
    calls = []

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        calls.append(1)
        raise KeyboardInterrupt  # the run is killed right after its first checkpoint (step 2)

    monkeypatch.setattr(train_mini, "save_checkpoint", save_then_die)
    interrupted = _vae()
    with pytest.raises(KeyboardInterrupt):
        train_mini.train_vae(interrupted, pool, cfg, tmp_path / "b", progress=False)
    monkeypatch.setattr(train_mini, "save_checkpoint", real_save)
    resumed = _vae()
    losses = train_mini.train_vae(resumed, pool, cfg, tmp_path / "b", progress=False)
    assert calls == [1] and len(losses) == 4
    for (k, v), w in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(v, w, msg=k)


def test_the_vae_learns(pool, tmp_path):
    cfg = train_mini.TrainMiniConfig(vae_steps=40, vae_batch=8, vae_lr=2e-3, save_every=100)
    losses = train_mini.train_vae(_vae(), pool, cfg, tmp_path / "vae", progress=False)
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])


def test_train_mini_writes_a_loadable_model_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("MDLIB_DATA", str(tmp_path / "home"))
    cfg = train_mini.TrainMiniConfig(n_scenes=16, vae_steps=2, vae_batch=4, clip_steps=2, clip_batch=4,
                                     unet_steps=2, unet_batch=4, save_every=1)
    record = train_mini.train_mini(tmp_path / "trained", cfg, progress=False)
    assert set(record["final_loss"]) == {"vae", "clip", "unet"}
    sd = models.load_sd(tmp_path / "trained", device="cpu")
    assert sd.vae_scale == pytest.approx(record["vae_scaling_factor"]) and sd.image_size == 64
    clip = models.load_clip_vision(tmp_path / "trained", device="cpu")
    assert clip.n_tokens == 50
    marker = models._read_marker(tmp_path / "trained")
    assert marker["trained"] is True and "train_mini" in marker["note"]
    assert (tmp_path / "trained.work" / "unet" / "state.json").is_file()
    # Quality on held-out scenes: PSNR as scikit-image computes it; retrieval fractions in [0, 1].
    from skimage.metrics import peak_signal_noise_ratio

    q = train_mini.quality(tmp_path / "trained", n_heldout=8, n_samples=2, progress=False)
    held = train_mini.scene_pool(8, seed=0, image_size=64, stream=1)
    with torch.no_grad():
        x = torch.from_numpy(held.images).permute(0, 3, 1, 2).float() / 127.5 - 1
        rec = ((sd.vae.decode(sd.vae.encode(x).latent_dist.mean).sample.clamp(-1, 1) + 1) / 2).numpy()
    ref = np.mean([peak_signal_noise_ratio(((x[i] + 1) / 2).numpy(), rec[i], data_range=1.0) for i in range(8)])
    assert q["vae_psnr"] == pytest.approx(ref, rel=1e-4)
    assert 0 <= q["clip_top1"] <= q["clip_top5"] <= 1 and q["samples"].shape == (2, 64, 64, 3)
    assert q["prompts"] == [c[0] for c in held.captions[:2]]

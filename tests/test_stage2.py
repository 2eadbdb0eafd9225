"""mdlib.stage2: the feature loss, gradients through the whole sampler (checkpointed or not), both modes
lowering the loss, and an interrupted published run resuming to the same result."""

import numpy as np
import pytest
import torch

from mdlib import models, runstate, stage2
from mdlib.sampler import DDIMSampler, SamplerConfig, generators
from mdlib.stage1 import unconditional, with_bos

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: A short sampler with the published structure (noise one level above the first step, guidance 5).
SHORT = SamplerConfig(num_steps=10, noise_index=6, denoise_steps=5)


def _problem(sd, clip, n=2, seed=0, dtype=torch.float32):
    """Inputs and decoded-feature targets: the targets are the features of other random latents' images."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, *sd.latent_shape, generator=g, dtype=dtype)
    c = torch.randn(n, 14, sd.text_width, generator=g, dtype=dtype)
    with torch.no_grad():
        other = torch.randn(n, *sd.latent_shape, generator=g, dtype=dtype)
        probe = stage2.FeatureTargets({f"block{b}": torch.zeros(1) for b in range(1, 7)})
        _, feats = stage2.image_features(sd, clip, other, probe)
    targets = stage2.FeatureTargets({f"block{b}": feats[f"block{b}"] for b in range(1, 7)}, feats["embedding"])
    return z, c, targets


def test_loss_is_masked_mse_plus_cosine(rng):
    t = {"block1": torch.as_tensor(rng.normal(size=(2, 5, 4)), dtype=torch.float32),
         "block2": torch.as_tensor(rng.normal(size=(2, 5, 4)), dtype=torch.float32)}
    emb = torch.as_tensor(rng.normal(size=(2, 3)), dtype=torch.float32)
    mask = torch.as_tensor(rng.random((5, 4)) < 0.3)
    targets = stage2.FeatureTargets(t, emb, masks={"block1": mask}, cos_weight=0.1)
    f = {k: torch.as_tensor(rng.normal(size=(2, 5, 4)), dtype=torch.float32) for k in t}
    f["embedding"] = torch.as_tensor(rng.normal(size=(2, 3)), dtype=torch.float32)
    got = targets.per_image_loss(f).numpy()
    for i in range(2):
        a = ((f["block1"][i].numpy() - t["block1"][i].numpy()) ** 2)[mask.numpy()].mean()
        b = ((f["block2"][i].numpy() - t["block2"][i].numpy()) ** 2).mean()
        e, d = f["embedding"][i].numpy(), emb[i].numpy()
        cos = e @ d / np.linalg.norm(e) / np.linalg.norm(d)
        assert got[i] == pytest.approx(a + b + 0.1 * (1 - cos), rel=1e-5)


def test_the_per_token_loss_splits_the_block_terms_by_token(rng):
    """Summed over tokens and with the cosine term added back, the split is the loss; each token's share is
    its own masked squared errors over the kept features' count (float64 reference)."""
    t = {"block1": torch.as_tensor(rng.normal(size=(3, 5, 4)), dtype=torch.float32),
         "block2": torch.as_tensor(rng.normal(size=(3, 5, 4)), dtype=torch.float32)}
    emb = torch.as_tensor(rng.normal(size=(3, 6)), dtype=torch.float32)
    mask = torch.as_tensor(rng.random((5, 4)) < 0.4)
    f = {k: torch.as_tensor(rng.normal(size=(3, 5, 4)), dtype=torch.float32) for k in t}
    f["embedding"] = torch.as_tensor(rng.normal(size=(3, 6)), dtype=torch.float32)
    for cos_weight in (0.1, 0.0):
        targets = stage2.FeatureTargets(t, emb, masks={"block1": mask}, cos_weight=cos_weight)
        split = targets.per_token_loss(f)
        assert split.shape == (3, 5)
        whole = targets.per_image_loss(f)
        assert torch.allclose(split.sum(1) + targets.cosine_term(f), whole, rtol=1e-5)
        m = mask.numpy()
        for i in range(3):
            d1 = (f["block1"][i].numpy().astype(np.float64) - t["block1"][i].numpy()) ** 2
            d2 = (f["block2"][i].numpy().astype(np.float64) - t["block2"][i].numpy()) ** 2
            ref = (d1 * m).sum(1) / m.sum() + d2.sum(1) / d2.size
            np.testing.assert_allclose(split[i].numpy(), ref, rtol=1e-5)
    assert torch.equal(stage2.FeatureTargets(t).cosine_term(f), torch.zeros(3))   # no embedding target


def _released_loss_float64(masks, target, generated, weight):
    """MSE_CLIP_mask of the released Reconstruction.py (lines 98-123), rewritten in float64 numpy for one image:
    block targets are the decoded features with zeros outside the mask, the generated features are masked,
    nn.MSELoss averages over all of a block's features; block weights 1/||target|| normalised to sum 1, times
    (1.5, 1.2, 1, 1, 1, 1); the embedding term 0.1 * weight * (1 - cos)."""
    layers = [k for k in target if k != "emb"]
    norms = np.array([np.linalg.norm(target[k]) for k in layers])
    w = (1.0 / norms) / (1.0 / norms).sum() * np.array([1.5, 1.2, 1, 1, 1, 1])[:len(layers)]
    e, d = generated["emb"], target["emb"]
    total = 0.1 * weight * (1.0 - e @ d / np.linalg.norm(e) / np.linalg.norm(d))
    for k, wk in zip(layers, w):
        total += wk * (1 - weight) * np.mean((target[k] - generated[k] * masks[k]) ** 2)
    return total


def test_released_loss_equals_the_released_formula(rng):
    n, shape = 3, (6, 5)
    t = {f"block{b}": torch.as_tensor(rng.normal(size=(n, *shape)) * b, dtype=torch.float32) for b in range(1, 7)}
    emb = torch.as_tensor(rng.normal(size=(n, 4)), dtype=torch.float32)
    masks = {k: torch.as_tensor(rng.random(shape) < 0.25) for k in t}
    f = {k: torch.as_tensor(rng.normal(size=(n, *shape)), dtype=torch.float32) for k in t}
    f["embedding"] = torch.as_tensor(rng.normal(size=(n, 4)), dtype=torch.float32)
    for weight in (0.5, 0.2):
        targets = stage2.FeatureTargets(t, emb, masks=masks, cos_weight=0.1 * weight, reduction="released",
                                        block_scale=1 - weight)
        got = targets.per_image_loss(f).numpy()
        assert torch.allclose(targets.per_token_loss(f).sum(1) + targets.cosine_term(f), targets.per_image_loss(f))
        for i in range(n):
            m = {k: masks[k].numpy().astype(np.float64) for k in t}
            target = {k: t[k][i].numpy().astype(np.float64) * m[k] for k in t} | {"emb": emb[i].numpy()}
            gen = {k: f[k][i].numpy().astype(np.float64) for k in t} | {"emb": f["embedding"][i].numpy()}
            assert got[i] == pytest.approx(_released_loss_float64(m, target, gen, weight), rel=1e-5)


def test_paper_loss_is_the_summed_squared_error(rng):
    t = {"block1": torch.as_tensor(rng.normal(size=(2, 5, 4)), dtype=torch.float32)}
    mask = torch.as_tensor(rng.random((5, 4)) < 0.5)
    f = {"block1": torch.as_tensor(rng.normal(size=(2, 5, 4)), dtype=torch.float32), "embedding": torch.zeros(2, 3)}
    got = stage2.FeatureTargets(t, masks={"block1": mask}, reduction="sum", cos_weight=0.0).per_image_loss(f)
    ref = (((f["block1"] - t["block1"]).double() ** 2) * mask).sum((1, 2))
    np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="reduction"):
        stage2.FeatureTargets(t, reduction="median")


def test_gradients_reach_z_and_c_and_checkpointing_changes_nothing(tiny_dir):
    """float64: the gradient of the loss with respect to z and c, through every step, the VAE and CLIP."""
    sd = models.load_sd(tiny_dir, device="cpu", dtype=torch.float64)
    clip = models.load_clip_vision(tiny_dir, device="cpu", dtype=torch.float64)
    z, c, targets = _problem(sd, clip, dtype=torch.float64)
    sampler = DDIMSampler(sd.unet, sd.scheduler, SHORT)
    cond0 = with_bos(sd, c).double()
    uncond = unconditional(sd, 15).double()
    grads = []
    for ckpt in (False, True):
        zz, cc = z.clone().requires_grad_(True), cond0.clone().requires_grad_(True)
        loss, _, _ = stage2.render_loss(sd, clip, sampler, zz, cc, uncond, targets, generators([1, 2]), checkpoint=ckpt)
        loss.sum().backward()
        grads.append((zz.grad, cc.grad))
    (gz, gc), (gz_ck, gc_ck) = grads
    for g in (gz, gc):
        assert torch.isfinite(g).all() and g.abs().sum() > 0
    torch.testing.assert_close(gz_ck, gz, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(gc_ck, gc, rtol=1e-6, atol=1e-12)
    # per-image independence: image 0's loss does not depend on image 1's inputs
    zz = z.clone().requires_grad_(True)
    loss, _, _ = stage2.render_loss(sd, clip, sampler, zz, cond0, uncond, targets, generators([1, 2]))
    loss[0].backward()
    assert zz.grad[1].abs().max() == 0 and zz.grad[0].abs().max() > 0


def test_published_mode_lowers_the_loss_and_updates_what_it_is_told(sd, clip):
    z, c, targets = _problem(sd, clip)
    cfg = stage2.PublishedConfig(iterations=4, lr=0.05, snapshots=(0, 2))
    out = stage2.guide_published(sd, clip, z, c, targets, [5, 6], config=cfg, sampler_config=SHORT, progress=False)
    assert out.loss.shape == (5, 2)
    assert (out.loss[-1] < out.loss[0]).all()
    assert set(out.snapshots) == {0, 2, 4} and out.snapshots[0].shape == (2, sd.image_size, sd.image_size, 3)
    assert not np.allclose(out.z, z.numpy())
    # iterations x (35-step equivalents: forward + recomputed in the backward) + the final scoring pass
    assert out.cost["unet_passes"] == 4 * 2 * SHORT.unet_evaluations(2) + SHORT.unet_evaluations(2)
    # row 0 is stage 1's image: the same loss as scoring stage 1's latents
    from mdlib import stage1

    s1 = stage1.img2img(sd, z, c, [5, 6], config=SHORT, progress=False)
    np.testing.assert_allclose(out.loss[0], stage2.score_latents(sd, clip, targets, s1.latents), rtol=1e-4)
    np.testing.assert_array_equal(out.snapshots[0], s1.images)
    only_c = stage2.guide_published(sd, clip, z, c, targets, [5, 6], sampler_config=SHORT, progress=False,
                                    config=stage2.PublishedConfig(iterations=2, update=("c",)))
    np.testing.assert_array_equal(only_c.z, z.numpy())
    assert only_c.loss[-1].mean() != only_c.loss[0].mean()


def test_fast_mode_lowers_the_loss_with_one_pass(sd, clip):
    z, c, targets = _problem(sd, clip, seed=1)
    from mdlib import stage1

    s1 = stage1.img2img(sd, z, c, [5, 6], config=SHORT, progress=False)
    before = stage2.score_latents(sd, clip, targets, s1.latents)
    for through_unet in (True, False):
        out = stage2.guide_fast(sd, clip, z, c, targets, [5, 6], sampler_config=SHORT, progress=False,
                                config=stage2.FastConfig(scale=2.0, through_unet=through_unet))
        assert out.loss.shape == (SHORT.denoise_steps + 1, 2)
        assert (out.loss[-1] < before).all()
        assert out.cost["unet_passes"] == SHORT.unet_evaluations(2)
    off = stage2.guide_fast(sd, clip, z, c, targets, [5, 6], sampler_config=SHORT, progress=False,
                            config=stage2.FastConfig(scale=0.0))
    np.testing.assert_allclose(off.latents, s1.latents, rtol=1e-4, atol=1e-5)   # no guidance: stage 1


def test_interrupted_run_resumes_to_the_same_result(sd, clip, tmp_path, monkeypatch):
    z, c, targets = _problem(sd, clip, seed=2)
    cfg = stage2.PublishedConfig(iterations=5, lr=0.05, snapshots=(0, 3))
    kw = dict(config=cfg, sampler_config=SHORT, progress=False)
    whole = stage2.guide_published(sd, clip, z, c, targets, [1, 2], **kw)

    calls = {"n": 0}
    real = stage2.FeatureTargets.per_image_loss

    def dies_at_the_fifth(self, feats):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(self, feats)

    monkeypatch.setattr(stage2.FeatureTargets, "per_image_loss", dies_at_the_fifth)
    state = runstate.stores_under(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        stage2.guide_published(sd, clip, z, c, targets, [1, 2], state=state, save_every=2, **kw)
    key = stage2.run_key(sd, clip, z, with_bos(sd, c), targets, [1, 2], cfg, SHORT)
    saved = state(key).load()
    assert int(saved["iteration"]) == 4 and "final_latents" not in saved   # saved after iterations 1 and 3
    monkeypatch.setattr(stage2.FeatureTargets, "per_image_loss", real)
    resumed = stage2.guide_published(sd, clip, z, c, targets, [1, 2], state=state, save_every=2, **kw)
    assert resumed.cost["resumed_at"] == 4
    np.testing.assert_allclose(resumed.z, whole.z, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(resumed.loss, whole.loss, rtol=1e-5)
    assert set(resumed.snapshots) == {0, 3, 5}
    np.testing.assert_array_equal(resumed.snapshots[0], whole.snapshots[0])
    assert resumed.cost["run_key"] == key and (tmp_path / key / "stage2_state.npz").is_file()
    # Other inputs (or settings, or targets) make another run, in a folder of its own: nothing is resumed.
    other = stage2.guide_published(sd, clip, z + 1, c, targets, [1, 2], state=state, **kw)
    assert other.cost["resumed_at"] == 0 and other.cost["run_key"] != key
    assert (tmp_path / other.cost["run_key"] / "stage2_state.npz").is_file()
    assert stage2.run_key(sd, clip, z, with_bos(sd, c), targets.subset([1, 0]), [1, 2], cfg, SHORT) != \
        stage2.run_key(sd, clip, z, with_bos(sd, c), targets, [1, 2], cfg, SHORT)
    # The cost is the whole run's, the interrupted session's saved part included
    for key in ("unet_passes", "unet_backward"):
        assert resumed.cost[key] == whole.cost[key]
    # A finished run is read back, result and cost, without running the sampler again
    monkeypatch.setattr(stage2, "render_loss", lambda *a, **k: pytest.fail("a finished run was recomputed"))
    again = stage2.guide_published(sd, clip, z, c, targets, [1, 2], state=state, save_every=2, **kw)
    assert again.cost["resumed_at"] == cfg.iterations + 1
    for key in ("unet_passes", "unet_backward"):
        assert again.cost[key] == whole.cost[key]
    np.testing.assert_allclose(again.loss, whole.loss, rtol=1e-5)
    np.testing.assert_array_equal(again.images, resumed.images)
    np.testing.assert_array_equal(again.latents, resumed.latents)
    assert set(again.snapshots) == {0, 3, 5}


def _toy_steps(z_var, c_var, opt, sched, steps, a):
    """Optimisation steps as guide_published takes them, on a toy loss of z and c (no models)."""
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = ((z_var - a) ** 2).sum() + (c_var ** 4).sum() + (z_var.sum() * c_var.mean()) ** 2
        loss.backward()
        opt.step()
        sched.step()


def _through_npz(arrays):
    """The arrays as a store writes and reads them: one npz, no pickles."""
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    buf.seek(0)
    with np.load(buf, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


@pytest.mark.parametrize("cfg", [stage2.PublishedConfig(lr=0.05, gamma=0.9, update=("z", "c")),
                                 stage2.PublishedConfig(lr=0.05, gamma=0.9, lr_decay_first=True),
                                 stage2.PublishedConfig(lr=0.05, gamma=0.95, optimizer="sgd", update=("z", "c"))],
                         ids=["adam-z-c", "adam-z-decay-first", "sgd"])
def test_state_arrays_round_trip_continues_the_optimisation_exactly(cfg):
    """Steps after state_arrays -> (npz) -> restore_state into fresh tensors and a fresh optimiser are the
    uninterrupted run's steps, bit for bit: z, c, Adam's moments and step count, the lr schedule."""
    g = torch.Generator().manual_seed(0)
    z0, c0 = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 5, 6, generator=g)
    a = torch.randn(2, 4, 3, 3, generator=g)

    def fresh(z, c):
        z_var = z.clone().requires_grad_("z" in cfg.update)
        c_var = c.clone().requires_grad_("c" in cfg.update)
        return (z_var, c_var, *stage2.make_optimizer(cfg, z_var, c_var))

    straight = fresh(z0, c0)
    _toy_steps(*straight, 6, a)

    first = fresh(z0, c0)
    _toy_steps(*first, 3, a)
    losses = [np.array([1.0, 2.0]), np.array([0.5, 1.5]), np.array([0.25, 1.0])]
    snaps = {0: np.zeros((2, 4, 4, 3), np.uint8)}
    cost = {"unet_passes": 120, "unet_backward": 60, "wall_s": 1.5}
    arrays = _through_npz(stage2.state_arrays(3, *first[:3], losses, snaps, cost))
    assert ("step0" in arrays) == (cfg.optimizer == "adam") and "final_latents" not in arrays
    resumed = fresh(torch.zeros_like(z0), torch.zeros_like(c0))       # restored, not taken from the inputs
    got = stage2.restore_state(arrays, *resumed)
    assert got["iteration"] == 3 and got["cost"] == cost and got["final"] is None
    np.testing.assert_array_equal(np.stack(got["losses"]), np.stack(losses))
    assert list(got["snapshots"]) == [0] and got["snapshots"][0].dtype == np.uint8
    assert resumed[2].param_groups[0]["lr"] == first[2].param_groups[0]["lr"]
    _toy_steps(*resumed, 3, a)
    for x, y in zip(resumed[:2], straight[:2]):
        assert torch.equal(x, y)
    assert resumed[2].param_groups[0]["lr"] == straight[2].param_groups[0]["lr"]
    assert resumed[3].last_epoch == straight[3].last_epoch == 6
    for p, q in zip(resumed[2].param_groups[0]["params"], straight[2].param_groups[0]["params"]):
        assert resumed[2].state[p].keys() == straight[2].state[q].keys()
        for k, v in straight[2].state[q].items():
            assert torch.equal(resumed[2].state[p][k], v), k

    if cfg.optimizer == "adam":   # the moments matter: restoring only z and c would take another step
        bare = fresh(torch.zeros_like(z0), torch.zeros_like(c0))
        stage2.restore_state({k: v for k, v in arrays.items() if not k.startswith(("step", "exp_avg"))}, *bare)
        _toy_steps(*bare, 3, a)
        assert not torch.equal(bare[0], straight[0])


def test_a_finished_state_carries_the_result_and_a_summary():
    z_var, c_var = torch.ones(1, 4, 2, 2, requires_grad=True), torch.zeros(1, 3, 5)
    opt, sched = stage2.make_optimizer(stage2.PublishedConfig(lr=0.01), z_var, c_var)
    final = (np.full((1, 4, 2, 2), 0.5, np.float32), np.full((1, 8, 8, 3), 7, np.uint8))
    losses = [np.array([3.0]), np.array([1.0])]
    arrays = stage2.state_arrays(2, z_var, c_var, opt, losses, {}, {"unet_passes": 7, "unet_backward": 4,
                                                                    "wall_s": 0.25}, final)
    got = stage2.restore_state(_through_npz(arrays), z_var, c_var, opt, sched)
    np.testing.assert_array_equal(got["final"][0], final[0])
    np.testing.assert_array_equal(got["final"][1], final[1])
    assert stage2.state_summary(arrays) == {"iteration": 2, "finished": True, "lr": 0.01, "mean_loss": [3.0, 1.0],
                                            "cost": {"unet_passes": 7, "unet_backward": 4, "wall_s": 0.25}}
    assert set(stage2.STATE_FIELDS) <= set(arrays)


def test_from_decoded_keeps_the_best_decoded_quarter(rng):
    from mdlib.decoding import Decoded

    n, shape = 3, (50, 8)
    pred = {f"clip_block{b}": rng.normal(size=(n, *shape)).astype(np.float32) for b in range(1, 7)}
    pred["clip_embedding"] = rng.normal(size=(n, 16)).astype(np.float32)
    cv = {k: rng.random(int(np.prod(v.shape[1:]))) for k, v in pred.items()}
    d = Decoded(nsd_ids=np.arange(n), pred=pred, true=pred, cv_r2=cv)
    t = stage2.FeatureTargets.from_decoded(d, rows=[0, 2])
    assert list(t.blocks) == [f"block{b}" for b in range(1, 7)] and len(t) == 2
    m = t.masks["block3"].numpy().ravel()
    assert m.sum() == 100 and cv["clip_block3"][m].min() > cv["clip_block3"][~m].max()
    np.testing.assert_array_equal(t.blocks["block1"].numpy(), pred["clip_block1"][[0, 2]])
    assert t.cos_weight == 0.1
    with pytest.raises(ValueError, match="clip_block"):
        stage2.FeatureTargets.from_decoded(Decoded(nsd_ids=np.arange(n), pred={}, true={}))
    # scores made by the released criterion are cut by its percentile rule
    d.params["select_by"] = "cv5-r"
    t = stage2.FeatureTargets.from_decoded(d, keep=0.25)
    thr = np.percentile(cv["clip_block3"], 75)
    np.testing.assert_array_equal(t.masks["block3"].numpy().ravel(), cv["clip_block3"] >= thr)


def test_checkpointing_keeps_memory_flat_in_the_number_of_steps(sd, clip):
    """What autograd keeps for the backward pass, counted exactly: without checkpointing it grows by one
    step's activations per step; with it, by one latent per step at most (the latents between steps)."""
    z, c, targets = _problem(sd, clip, n=1)
    cond, uncond = with_bos(sd, c), unconditional(sd, 15)
    saved = {}
    for steps in (2, 6):
        cfg = SamplerConfig(num_steps=10, noise_index=steps + 1, denoise_steps=steps)
        for ckpt in (False, True):
            zz = z.clone().requires_grad_(True)
            with stage2.saved_for_backward(sd.unet, sd.vae, clip.model) as meter:
                loss, _, _ = stage2.render_loss(sd, clip, DDIMSampler(sd.unet, sd.scheduler, cfg), zz, cond, uncond,
                                                targets, generators([3]), checkpoint=ckpt)
            loss.sum().backward()
            assert torch.isfinite(zz.grad).all()
            saved[steps, ckpt] = meter["bytes"]
    per_step = (saved[6, False] - saved[2, False]) / 4
    latent = z.numel() * z.element_size()
    assert per_step > 100 * latent                      # a UNet step's activations, twice (guidance)
    assert saved[6, True] - saved[2, True] <= 4 * latent    # flat but for the latents themselves
    assert saved[2, True] < saved[2, False] - 1.5 * per_step


def test_mixed_precision_and_fast_mode_options(sd, clip):
    """autocast (bf16 runs on the CPU too), universal guidance's recurrence and a guided window."""
    z, c, targets = _problem(sd, clip, n=1, seed=3)
    out = stage2.guide_published(sd, clip, z, c, targets, [4], sampler_config=SHORT, progress=False,
                                 config=stage2.PublishedConfig(iterations=2, lr=0.05, autocast="bf16"))
    assert np.isfinite(out.loss).all() and out.loss[-1, 0] != out.loss[0, 0]
    assert not np.allclose(out.z, z.numpy())
    with pytest.raises(ValueError, match="autocast"):
        stage2.guide_published(sd, clip, z, c, targets, [4], sampler_config=SHORT, progress=False,
                               config=stage2.PublishedConfig(iterations=1, autocast="fp8"))
    # repeats=2 on steps 1..2 only: one extra UNet evaluation (2 branches) per guided step
    fast = stage2.guide_fast(sd, clip, z, c, targets, [4], sampler_config=SHORT, progress=False,
                             config=stage2.FastConfig(scale=2.0, repeats=2, start=1, stop=3))
    per_step = SHORT.unet_evaluations(1) // SHORT.denoise_steps
    assert fast.cost["unet_passes"] == SHORT.unet_evaluations(1) + 2 * per_step
    assert fast.cost["unet_backward"] == 2 * 2 * per_step
    assert fast.loss.shape == (2 + 1, 1)               # the guided steps' losses, then the final image's
    s1 = stage2.score_latents(sd, clip, targets, stage2.guide_fast(
        sd, clip, z, c, targets, [4], sampler_config=SHORT, progress=False,
        config=stage2.FastConfig(scale=0.0)).latents)
    assert fast.loss[-1, 0] < s1[0]
    for bad in ({"repeats": 0}, {"start": 3, "stop": 1}):
        with pytest.raises(ValueError):
            stage2.FastConfig(**bad)

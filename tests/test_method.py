"""mdlib.method: the three variants set every row at once, as docs/method.md tabulates them; the preset and
overrides change rows only where they say, and the record names each change."""

import dataclasses

import numpy as np
import pytest
import torch

from mdlib import method, presets, stage2
from mdlib.sampler import SamplerConfig, generators

SHORT = dict(num_steps=10, noise_index=6, denoise_steps=5)


def test_every_variant_records_every_row():
    for variant in method.VARIANTS:
        for preset in presets.NAMES:
            d = method.describe(method.configure(variant, preset))
            assert d["variant"] == variant and d["preset"] == preset
            assert set(d["rows"]) == set(method.names()) - {"lr_scale"}
            # the record is JSON as it is
            import json
            assert json.loads(json.dumps(d)) == d


def test_the_variants_rows():
    released, paper, ours = (method.configure(v, "nsd") for v in ("released", "paper", "mdlib"))
    # released: the authors' code (docs/method.md)
    assert (released.roi, released.standardize, released.n_train, released.n_captions) == ("mindiffuser", "test", 8000, 5)
    assert (released.decoder, released.n_select, released.select_by) == ("fastl2lir", {"z": 4000, "c": 125, "clip": 850},
                                                                         "cv5-r")
    assert (released.clip_normalization, released.clip_resize_stimuli, released.clip_resize_generated,
            released.clamp_generated) == ("imagenet", "bilinear", "bicubic", True)
    p = released.published
    assert (p.optimizer, p.lr, p.gamma, p.lr_decay_first, p.update, p.fresh_noise, p.iterations) == \
        ("adam", 0.01, 0.999, True, ("z",), True, 300)
    assert released.loss_kwargs() == {"keep": 0.25, "resize": "bicubic", "clamp": True, "reduction": "released",
                                      "block_scale": 0.5, "cos_weight": 0.05}
    # paper: Algorithm 1 (z and c, plain gradient steps, lr 0.01, summed squared error), the code elsewhere
    p = paper.published
    assert (p.optimizer, p.lr, p.gamma, p.update, p.fresh_noise) == ("sgd", 0.01, 1.0, ("z", "c"), True)
    assert paper.loss_kwargs()["reduction"] == "sum" and paper.loss_kwargs()["cos_weight"] == 0.0
    assert paper.decoder == released.decoder and paper.roi == released.roi
    # the same sampler in all three: 50 DDIM steps, noised to index 37, 35 steps, guidance 5, eta 0
    assert released.sampler == paper.sampler == ours.sampler == SamplerConfig()
    assert ours.changes == released.changes == ()


def test_the_preset_and_overrides_are_recorded():
    mini = method.configure("released", "mini")
    assert mini.published.iterations == 10 and mini.published.lr == pytest.approx(0.05)
    assert mini.posterior == "mean" and mini.scale_n_select
    assert dict(mini.changes) == {"posterior": "preset mini", "iterations": "preset mini", "lr": "preset mini",
                                  "scale_n_select": "preset mini", "checkpoint": "preset mini"}
    assert not mini.published.checkpoint and method.configure("released", "nsd").published.checkpoint
    assert mini.published.snapshots == stage2.snapshot_iterations(10)
    c = mini.replace(lr=0.2, update="z,c", keep=0.5)
    assert c.published.lr == 0.2 and c.published.update == ("z", "c") and c.keep == 0.5
    assert dict(c.changes)["update"] == "override" and dict(c.changes)["lr"] == "override"
    assert dict(mini.replace(keep=0.5).changes)["lr"] == "preset mini"     # untouched rows keep their reason
    assert method.configure("mdlib", "nsd", lr=None).published.lr == 0.01      # None: not given
    with pytest.raises(ValueError, match="unknown setting"):
        method.configure("mdlib", "nsd", learning_rate=0.1)
    with pytest.raises(ValueError, match="variant"):
        method.configure("ours")
    with pytest.raises(ValueError, match="cv5-r"):
        method.configure("mdlib", "nsd", decoder="fastl2lir")              # FastL2LiR needs the released score


def test_fresh_noise_differs_per_iteration_and_is_reproducible(sd, clip, monkeypatch):
    """The released code draws the sampler's noise anew in every iteration: iteration k is seeded by
    seed + 7919 k, so it differs between iterations and a second run repeats it exactly."""
    seen = []

    def spy(seeds):
        seen.append(list(seeds))
        return generators(seeds)

    monkeypatch.setattr(stage2, "generators", spy)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, *sd.latent_shape, generator=g)
    c = torch.randn(1, 14, sd.text_width, generator=g)
    t = stage2.FeatureTargets({"block1": torch.randn(1, clip.n_tokens, clip.width, generator=g)})
    runs = {}
    for fresh in (True, False, True):
        seen.clear()
        cfg = stage2.PublishedConfig(iterations=2, fresh_noise=fresh, snapshots=(0,))
        out = stage2.guide_published(sd, clip, z, c, t, [11], config=cfg, sampler_config=SamplerConfig(**SHORT),
                                     progress=False)
        runs.setdefault(fresh, []).append((out, [s[0] for s in seen]))
    assert runs[True][0][1] == [11, 11 + 7919, 11 + 2 * 7919] and runs[False][0][1] == [11, 11, 11]
    np.testing.assert_array_equal(runs[True][0][0].images, runs[True][1][0].images)
    np.testing.assert_array_equal(runs[True][0][0].loss, runs[True][1][0].loss)
    assert not np.array_equal(runs[True][0][0].images, runs[False][0][0].images)


def test_plain_gradient_steps_and_the_released_lr_schedule(sd, clip):
    """SGD (the paper): z_1 = z_0 - lr grad L(z_0); the released loop decays the lr before its first step."""
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, *sd.latent_shape, generator=g)
    c = torch.randn(1, 14, sd.text_width, generator=g)
    t = stage2.FeatureTargets({"block2": torch.randn(1, clip.n_tokens, clip.width, generator=g)}, reduction="sum",
                              cos_weight=0.0)
    cfg = stage2.PublishedConfig(iterations=1, optimizer="sgd", lr=1e-3, gamma=0.5, lr_decay_first=True,
                                 snapshots=())
    out = stage2.guide_published(sd, clip, z, c, t, [3], config=cfg, sampler_config=SamplerConfig(**SHORT),
                                 progress=False)
    sampler, z0, cond, uncond = stage2._inputs(sd, z, c, t, [3], SamplerConfig(**SHORT), False)
    zz = z0.clone().requires_grad_(True)
    loss, _, _ = stage2.render_loss(sd, clip, sampler, zz, cond, uncond, t, generators([3]))
    loss.sum().backward()
    np.testing.assert_allclose(out.z, (z0 - 1e-3 * 0.5 * zz.grad).numpy(), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="optimizer"):
        dataclasses.replace(cfg, optimizer="lbfgs")


def test_table_says_what_set_each_row():
    t = method.table(method.configure("paper", "mini", keep=0.5), ["update", "lr", "keep", "roi"])
    assert t["set by"].to_dict() == {"update": "variant paper", "lr": "preset mini", "keep": "override",
                                     "roi": "variant paper"}
    assert t.loc["update", "value"] == "['z', 'c']" and t.loc["roi", "value"] == "mindiffuser"

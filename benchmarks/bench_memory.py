"""Benchmark: the published stage 2's memory at full size (SD v1-4 and CLIP ViT-B/32, 512 px), counted exactly
on the CPU without the memory it counts.

Prints markdown tables (paste them into the ``bench_memory.py`` section of benchmarks/README.md). Not a test.

    python benchmarks/bench_memory.py            # the account at 512 px: 1-2 min on 2 cores, about 1 GB of RAM
    python benchmarks/bench_memory.py --check    # first, the same on real tensors at 128 px: ~10 min, the models 4.4 GB

The models are built from their published configurations on *fake tensors* (``torch._subclasses.FakeTensorMode``:
shapes, dtypes and the CPU's choice of kernels, no data), and the code that runs is mdlib's own: one iteration
of the published objective, :func:`mdlib.stage2.render_loss` (sampler, VAE decoder, CLIP features, loss) and its
backward pass into z, under the same autocast as ``PublishedConfig.autocast`` (with CUDA's rule for group and
layer normalisation, which run in float32 on a GPU: ``tests/fullsize.py``, ``CudaAutocastNorms``). Two meters
of :mod:`mdlib.stage2` count:

- :func:`mdlib.stage2.saved_for_backward`: the storages autograd keeps for the backward pass, weights excluded
  (under autocast the half-precision copies of the weights that operations save do count);
- :func:`mdlib.stage2.live_memory`: every storage an operation makes, from its creation to its release, whose
  peak over the forward and backward passes is the largest live set.

Tables: (1) per part (one denoising step of the UNet, both guidance branches, with and without checkpointing;
the VAE decoder from 64 x 64 latents to 512 px; CLIP from a 512-px image) and precision (float32; fp16 and
bf16 autocast; float16 models, ``--dtype float16``), the bytes saved for backward and the part's weights; (2) per
precision and checkpointing, one image's iteration at the published 35 steps: the saved bytes at the end of the
forward pass, the peak live set, the weights of the four models as loaded (UNet, VAE, text encoder, CLIP with
both towers), and their sum with Adam's state: the GPU memory one image needs, before the CUDA context and the
allocator's slack. The 35-step rows are measured at 2 and 3 steps and extended by their difference (every step
is the same computation: exact).

``--check`` runs the same measurements at 128 px (latents 4 x 16 x 16, 2 steps) on real tensors (random
weights) and on fake ones and prints both: equal byte for byte, or the table would not be worth printing.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import sys
import time

from pathlib import Path

import torch

from bench_ridge import fmt_time, load, machine  # noqa: E402  (a sibling script: benchmarks/ is on sys.path)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import fullsize  # noqa: E402  (tests/fullsize.py: the stand-ins shared with the tests)

GB = 2 ** 30
#: Kept free on a card for what the count cannot see: the CUDA context, the caching allocator's rounding and
#: fragmentation, cuDNN's workspaces (an allowance, not a measurement).
MARGIN = 1.5 * GB
#: Precisions: (label, autocast of PublishedConfig, the models' dtype).
PRECISIONS = (("float32", None, torch.float32), ("fp16 autocast", "fp16", torch.float32),
              ("bf16 autocast", "bf16", torch.float32), ("float16 models", None, torch.float16))
#: The published sampler: z noised to index 37 of 50 DDIM steps, 35 steps denoised, guidance 5.
PUBLISHED_STEPS = 35


def build(fake: bool, image_size: int = 512, dtype: torch.dtype = torch.float32, seed: int = 0):
    """(context, sd, clip): SD v1-4 (UNet, VAE; no text encoder: c is given) and open_clip ViT-B/32 with
    QuickGELU, full size, from their published configurations, frozen, on the CPU. ``fake``: on fake tensors
    (the context is the FakeTensorMode every later tensor must be made in); else real, random weights (the
    context does nothing)."""
    from diffusers import DDIMScheduler
    from open_clip.model import CLIP
    from torch._subclasses.fake_tensor import FakeTensorMode

    from mdlib import models

    ctx = FakeTensorMode() if fake else contextlib.nullcontext()
    default = torch.get_default_dtype()
    with ctx, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_default_dtype(dtype)   # made in dtype (a fake module cannot be converted after)
        try:
            parts = models.sd_v1_4_architecture("cpu", parts=("unet", "vae"))
            clip_model = CLIP(**copy.deepcopy(models.VIT_B_32_QUICKGELU)).eval()
        finally:
            torch.set_default_dtype(default)
        for module in (*parts.values(), clip_model):
            module.requires_grad_(False)
    latent = image_size // 8
    parts["unet"].register_to_config(sample_size=latent)
    sd = models.SDModels(vae=parts["vae"], unet=parts["unet"], text_encoder=None, tokenizer=None,
                         scheduler=DDIMScheduler.from_config(models.SD_V1_4_CONFIGS["scheduler"]),
                         image_size=image_size, latent_shape=(4, latent, latent), vae_scale=models.SD_VAE_SCALE,
                         device=torch.device("cpu"), dtype=dtype, source="fake" if fake else "random")
    return ctx, sd, models.wrap_clip(clip_model)


def sampler_for(sd, steps: int):
    """The published schedule cut to ``steps`` denoising steps. Its alphas are read as Python floats, outside
    any fake mode (the sampler indexes a real tensor of them)."""
    from mdlib.sampler import DDIMSampler, SamplerConfig

    s = DDIMSampler(sd.unet, sd.scheduler, SamplerConfig(num_steps=50, noise_index=37, denoise_steps=steps))
    s.alphas_cumprod = s.alphas_cumprod.tolist()
    return s


def problem(sd, clip, seed: int = 0):
    """z (1, 4, h, w) to optimise, c and the empty prompt (1, 15, 768) and stage 2's targets (six blocks with the
    default variant's 25 % of features kept, and the embedding): made in the current (fake or real) mode."""
    from mdlib import stage2

    g = torch.Generator().manual_seed(seed)
    z = torch.randn((1, *sd.latent_shape), generator=g).requires_grad_(True)
    cond, uncond = torch.randn(1, 15, 768, generator=g), torch.randn(1, 15, 768, generator=g)
    blocks = {f"block{b}": torch.randn(1, clip.n_tokens, clip.width, generator=g) for b in range(1, 7)}
    masks = {k: torch.rand(v.shape[1:], generator=g) < 0.25 for k, v in blocks.items()}
    targets = stage2.FeatureTargets(blocks=blocks, embedding=torch.randn(1, clip.embed_dim, generator=g), masks=masks)
    return z, cond, uncond, targets


def parts_account(ctx, sd, clip, autocast: str | None) -> dict[str, int]:
    """Bytes saved for backward by each part, alone: one UNet step (2 branches) without and with
    checkpointing, the VAE decoder, CLIP's features of a decoded-size image."""
    from torch.utils.checkpoint import checkpoint

    from mdlib import features, stage2

    sampler = sampler_for(sd, 1)
    t = sampler.denoise_timesteps[0]
    out = {}
    with ctx:
        z, cond, uncond, _ = problem(sd, clip)
        # the sampler's state in the models' dtype, as DDIMSampler.sample makes it
        x, cond, uncond = (t_.to(sd.dtype) for t_ in (z.detach(), cond, uncond))
        x.requires_grad_(True)
        weights = (sd.unet, sd.vae, clip.model)
        for name, run in (
                ("unet step", lambda: sampler._one_step(x, cond, uncond, None, t)),
                ("unet step, checkpointed", lambda: checkpoint(sampler._one_step, x, cond, uncond, None, t,
                                                               use_reentrant=False)),
                ("vae decoder", lambda: features.decode_latents(sd, z, grad=True)),
                ("clip", lambda: features.clip_lowlevel_features(
                    clip, torch.rand(1, 3, sd.image_size, sd.image_size).requires_grad_(True)))):
            with fullsize.CudaAutocastNorms(), stage2.saved_for_backward(*weights) as saved, \
                    stage2._autocast(sd.device, autocast):
                result = run()
            out[name] = saved["bytes"]
            del result
    return out


def iteration_account(ctx, sd, clip, steps: int, autocast: str | None, checkpointing: bool) -> dict[str, int]:
    """One iteration of the published objective with ``steps`` steps: render_loss under autocast, then the
    backward pass into z (as :func:`mdlib.stage2.guide_published` runs it). Returns ``saved`` (bytes saved for
    backward at the end of the forward pass), ``forward_end`` (alive then) and ``peak`` (most alive, forward and
    backward), all above what existed before (weights, inputs)."""
    from mdlib import stage2
    from mdlib.sampler import generators

    sampler = sampler_for(sd, steps)
    with ctx:
        z, cond, uncond, targets = problem(sd, clip)
        with stage2.live_memory() as live, fullsize.CudaAutocastNorms():
            with stage2.saved_for_backward(sd.unet, sd.vae, clip.model) as saved, stage2._autocast(sd.device, autocast):
                loss, images, latents = stage2.render_loss(sd, clip, sampler, z, cond, uncond, targets,
                                                           generators([0]), checkpoint=checkpointing)
            forward_end = live["now"]
            loss.sum().backward()
            del loss, images, latents
    return {"saved": saved["bytes"], "forward_end": forward_end, "peak": live["peak"]}


def weights_bytes(dtype: torch.dtype) -> dict[str, int]:
    """The four models as :func:`mdlib.reconstruct.load_models` loads them for stage 2, in ``dtype``."""
    from open_clip.model import CLIP

    from mdlib import models

    parts = models.sd_v1_4_architecture("meta")
    with torch.device("meta"):
        clip_model = CLIP(**copy.deepcopy(models.VIT_B_32_QUICKGELU))
    size = torch.tensor([], dtype=dtype).element_size()
    out = {name: models.n_params(m) * size for name, m in parts.items()}
    out["clip"] = models.n_params(clip_model) * size
    out["vae decoder"] = (models.n_params(parts["vae"].decoder) + models.n_params(parts["vae"].post_quant_conv)) * size
    return out


def gb(n: float) -> str:
    return f"{n / GB:.2f} GiB"


def check(image_size: int = 128, steps: int = 2, precisions=PRECISIONS[:3]) -> bool:
    """The same account on real tensors (random weights) and on fake ones, at a small size: printed side by side.
    ``precisions``: float32-model rows of :data:`PRECISIONS` (one pair of models serves them all)."""
    print(f"## Fake against real tensors: {image_size} px (latents 4 x {image_size // 8} x {image_size // 8}), "
          f"{steps} steps\n")
    print("| precision | measure | fake | real | equal |")
    print("|---|---|---|---|---|")
    built = {fake: build(fake, image_size) for fake in (True, False)}
    same = True
    for label, autocast, dtype in precisions:
        if dtype != torch.float32:
            raise ValueError(f"check() compares float32 models (under autocast or not), not {label}")
        rows = {}
        for fake, (ctx, sd, clip) in built.items():
            got = {f"saved: {k}": v for k, v in parts_account(ctx, sd, clip, autocast).items()}
            for ck in (False, True):
                it = iteration_account(ctx, sd, clip, steps, autocast, ck)
                got.update({f"iteration{' (checkpointed)' if ck else ''}: {k}": v for k, v in it.items()})
            rows[fake] = got
        for key in rows[True]:
            eq = rows[True][key] == rows[False][key]
            same &= eq
            print(f"| {label} | {key} | {rows[True][key]:,} | {rows[False][key]:,} | {'yes' if eq else '**no**'} |",
                  flush=True)
    print(f"\nFake and real counts {'agree exactly' if same else 'DIFFER'}.\n")
    return same


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="first compare fake and real tensors at 128 px")
    ap.add_argument("--image-size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=PUBLISHED_STEPS, help="denoising steps of the published sampler")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    print(f"# Stage 2's memory at full size, {datetime.date.today()}\n")
    print(f"Machine: {machine()}; {load()}. Counted on fake tensors (no memory used), CPU kernels.\n")
    if args.check and not check():
        sys.exit(1)
    size, lat = args.image_size, args.image_size // 8
    parts, iterations = {}, {}
    for label, autocast, dtype in PRECISIONS:
        ctx, sd, clip = build(True, size, dtype)
        parts[label] = parts_account(ctx, sd, clip, autocast)
        for ck in (True, False):
            at = {k: iteration_account(ctx, sd, clip, k, autocast, ck) for k in (2, 3)}
            iterations[label, ck] = {m: at[2][m] + (args.steps - 2) * (at[3][m] - at[2][m]) for m in at[2]}
        print(f"  {label}: {fmt_time(time.perf_counter() - t0)}", file=sys.stderr, flush=True)

    print(f"## One part at a time ({size} px, latents 4 x {lat} x {lat}; one image, 2 guidance branches)\n")
    print("| part | precision | checkpointing | saved for backward | weights |")
    print("|---|---|---|---|---|")
    for label, autocast, dtype in PRECISIONS:
        w = weights_bytes(dtype)
        p = parts[label]
        print(f"| UNet, one step | {label} | no | {gb(p['unet step'])} | {gb(w['unet'])} |")
        print(f"| UNet, one step | {label} | yes | {p['unet step, checkpointed'] / 2**10:.0f} KiB | {gb(w['unet'])} |")
        print(f"| VAE decoder | {label} | no | {gb(p['vae decoder'])} | {gb(w['vae decoder'])} |")
        print(f"| CLIP ViT-B/32 | {label} | no | {gb(p['clip'])} | {gb(w['clip'])} |")
    print("\nWeights in the models' dtype (autocast keeps float32 weights and casts them per operation; the casts "
          "an operation saves for its backward pass are in the saved column).\n")

    print(f"## One image, one iteration of the published stage 2 ({args.steps} steps, {size} px)\n")
    print("| precision | checkpointing | saved at the end of the forward pass | peak live set | weights (4 models) "
          "| Adam | weights + peak + Adam | fits 16 GB | fits 24 GB |")
    print("|---|---|---|---|---|---|---|---|---|")
    adam = 3 * 4 * 4 * lat * lat        # z's gradient and Adam's two moments, float32
    for label, autocast, dtype in PRECISIONS:
        weights = sum(v for k, v in weights_bytes(dtype).items() if k != "vae decoder")
        for ck in (True, False):
            it = iterations[label, ck]
            total = weights + it["peak"] + adam
            print(f"| {label} | {'yes' if ck else 'no'} | {gb(it['saved'])} | {gb(it['peak'])} | {gb(weights)} "
                  f"| {adam / 2**10:.0f} KiB | {gb(total)} | {'yes' if total + MARGIN <= 16 * GB else 'no'} "
                  f"| {'yes' if total + MARGIN <= 24 * GB else 'no'} |")
    print(f"\nPeak live set: the most bytes alive at once during the forward and backward passes, above the "
          f"weights and inputs. A card fits when the sum plus {MARGIN / GB:g} GiB (the CUDA context, the caching "
          f"allocator's rounding and fragmentation, cuDNN's workspaces: an allowance, not measured here) is at "
          f"most its size (16 GB and 24 GB cards hold 16 and 24 GiB). {fmt_time(time.perf_counter() - t0)} in all.\n")


if __name__ == "__main__":
    main()

"""Benchmark of `mdlib reconstruct` (mdlib.reconstruct): the measured cost per image of each mode, on this device.

Prints a markdown table (paste it into docs/reconstruct.md, "Cost per image"). Not a test: timings
depend on the machine and on what else runs on it.

    python benchmarks/bench_reconstruct.py                      # mini path, CPU or the GPU: a few minutes on 2 cores
    python benchmarks/bench_reconstruct.py --device cuda --preset nsd --synthetic   # SD v1-4 + CLIP ViT-B/32 on a GPU

Each mode reconstructs the same ``--images`` test images through :func:`mdlib.reconstruct.run`, the code path
of ``mdlib reconstruct`` (one image at a time, files written, records kept), and the table is read from the
images' records: stage 1; stage 2 fast; stage 2 published with ``--iterations`` iterations, from which the cost
of one iteration and of the released 300 are derived. The first image of each mode warms up (allocations,
kernel selection) and is left out of the means when there are several.

- ``--preset mini`` (default): mini-NSD subject 1 (written under ``$MDLIB_DATA`` if missing), its decoded
  features, the shipped tiny-trained models (64 px), the published sampler (35 steps, guidance 5).
- ``--preset nsd``: Stable Diffusion v1-4 and CLIP ViT-B/32 (from the Hugging Face cache); the decoded
  features of the real NSD, or with ``--synthetic`` random features of the right shapes (the cost does not
  depend on their values), so that a GPU with the model weights and no NSD can measure the real cost.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile

import numpy as np
import torch

from bench_ridge import fmt_time, load, machine  # noqa: E402  (a sibling script: benchmarks/ is on sys.path)


def synthetic_decoded(sd, clip, n: int, n_tokens: int = 15, seed: int = 0):
    """Random decoded features of n images, the models' shapes (timing only: values do not change the cost)."""
    from mdlib.decoding import Decoded

    rng = np.random.default_rng(seed)
    pred = {"z": rng.normal(size=(n, *sd.latent_shape)), "c": rng.normal(size=(n, n_tokens - 1, sd.text_width))}
    if clip is not None:
        pred["clip_embedding"] = rng.normal(size=(n, clip.embed_dim))
        pred.update({f"clip_block{b}": rng.normal(size=(n, clip.n_tokens, clip.width)) for b in range(1, 7)})
    pred = {k: v.astype(np.float32) for k, v in pred.items()}
    cv = {k: rng.random(int(np.prod(v.shape[1:]))) for k, v in pred.items()}
    return Decoded(nsd_ids=np.arange(n, dtype=np.int64), pred=pred, true=pred, cv_r2=cv)


def measure(job, sd, clip, decoded, device) -> dict:
    """Run one mode on every image of ``job`` and read the cost back from the records."""
    from mdlib import reconstruct

    out = reconstruct.run(job, reconstruct.Shard(), device, sd=sd, clip=clip, decoded=decoded, progress=False,
                          log=lambda line: print("  " + line, file=sys.stderr, flush=True))
    ids = reconstruct.select_images(decoded.nsd_ids, job.images)
    recs = [reconstruct.read_record(job.folder, i) for i in ids]
    failed = [r["error"] for r in recs if r["status"] != "done"]
    if failed:
        raise RuntimeError(f"{job.tag}: {len(failed)} images failed: {failed[0]}")
    timed = recs[1:] if len(recs) > 1 else recs
    return {"images": len(recs), "timed": len(timed), "wall_s": float(np.mean([r["cost"]["wall_s"] for r in timed])),
            "unet_passes": recs[0]["cost"]["unet_passes"], "unet_backward": recs[0]["cost"]["unet_backward"],
            "peak": max(r["cost"].get("peak_memory_bytes", 0) for r in recs), "summary": out["overall"]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=("mini", "nsd"), default="mini")
    ap.add_argument("--data-root", default="", help="default: $MDLIB_DATA/mini-nsd (written if missing) or /nsd")
    ap.add_argument("--synthetic", action="store_true", help="random decoded features instead of decoding")
    ap.add_argument("--subject", type=int, default=1)
    ap.add_argument("--device", default=None, help="default: CUDA when available, else the CPU")
    ap.add_argument("--dtype", default=None, help="the models' dtype (default float32)")
    ap.add_argument("--sd-model", default="")
    ap.add_argument("--clip-model", default="")
    ap.add_argument("--images", type=int, default=4, help="test images per mode (the first one warms up)")
    ap.add_argument("--iterations", type=int, default=5, help="published-mode iterations measured")
    ap.add_argument("--fast-scale", type=float, default=4.0)
    ap.add_argument("--modes", default="stage1,fast,published")
    ap.add_argument("--out", default="", help="where the images go (default: a temporary folder, removed)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads on the CPU (default: torch's)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)

    from mdlib import method, paths, reconstruct

    shard = reconstruct.Shard()
    device = reconstruct.pick_device(args.device, shard)
    config = method.configure("mdlib", args.preset, iterations=args.iterations, snapshots=(),
                              fast_scale=args.fast_scale)
    base = dict(subject=args.subject, preset=args.preset, data_root=args.data_root, sd_model=args.sd_model,
                clip_model=args.clip_model, dtype=args.dtype, images=f"0..{args.images}", config=config)
    probe = reconstruct.Job(stage=2, **base)
    sd, clip = reconstruct.load_models(probe, device)
    if args.synthetic:
        decoded = synthetic_decoded(sd, clip, args.images, config.n_tokens)
    else:
        if args.preset == "mini" and not args.data_root:
            from mdlib.synth.write import ensure_mini_nsd

            ensure_mini_nsd(paths.data_root(None, "mini"), progress=False)
        print("decoding ...", file=sys.stderr, flush=True)
        decoded = reconstruct.decode(probe, sd, clip, device=sd.device, progress=False)
    tmp = tempfile.TemporaryDirectory(prefix="bench_reconstruct-") if not args.out else None
    out = args.out or tmp.name
    modes = args.modes.split(",")
    rows = {}
    for mode in modes:
        stage, m = (1, "published") if mode == "stage1" else (2, mode)
        job = reconstruct.Job(stage=stage, mode=m, out=out, **base)
        print(f"{job.tag}: {args.images} images ...", file=sys.stderr, flush=True)
        rows[mode] = measure(job, sd, clip if stage == 2 else None, decoded, device)

    s = config.sampler
    print(f"# mdlib reconstruct: cost per image, {datetime.date.today()}\n")
    print(f"Machine: {machine()}; device {device}, {sd.dtype}, torch threads: {torch.get_num_threads()}; "
          f"{load()}.\n")
    print(f"Models: {probe.sd_source} ({sd.image_size} px, latents {' x '.join(map(str, sd.latent_shape))}), "
          f"CLIP {probe.clip_source}; {'synthetic' if args.synthetic else f'subject {args.subject} decoded'} "
          f"features; sampler: {s.num_steps} DDIM steps, z noised to index {s.noise_index}, {s.denoise_steps} "
          f"steps, guidance {s.guidance_scale:g}. Means over {max(1, args.images - 1)} image(s) "
          "after a warm-up image, one image at a time, files included.\n")
    print("| mode | UNet passes per image: forward + backward | time per image | images per hour, one process "
          "| peak memory |")
    print("|---|---|---|---|---|")

    def line(name, fwd, bwd, secs, peak, rate=True):
        mem = f"{peak / 2**30:.2f} GB" if peak else "-"
        print(f"| {name} | {fwd:,} + {bwd:,} | {fmt_time(secs)} | {f'{3600 / secs:,.1f}' if rate else '-'} "
              f"| {mem} |")

    for mode, r in rows.items():
        if mode == "stage1":
            line("stage 1 (img2img, no control)", r["unet_passes"], r["unet_backward"], r["wall_s"], r["peak"])
        elif mode == "fast":
            line(f"stage 2 fast (one guided pass, scale {args.fast_scale:g})", r["unet_passes"], r["unet_backward"],
                 r["wall_s"], r["peak"])
        else:
            k = args.iterations
            line(f"stage 2 published, {k} iterations (measured)", r["unet_passes"], r["unet_backward"], r["wall_s"],
                 r["peak"])
            # The run renders k + 1 images (the last one only scored): one iteration costs the rest after a
            # stage-1-like pass, divided by k.
            first = rows.get("stage1", {}).get("wall_s", 0.0)
            per = (r["wall_s"] - first) / k
            fwd, bwd = (r["unet_passes"] - s.unet_evaluations(1)) // k, r["unet_backward"] // k
            line("stage 2 published, per iteration", fwd, bwd, per, r["peak"], rate=False)
            for total in (90, 300):
                line(f"stage 2 published, {total} iterations (extrapolated)", fwd * total + s.unet_evaluations(1),
                     bwd * total, first + per * total, r["peak"])
    print("\nPeak memory: the process' resident set on the CPU (whole process, models included), CUDA's "
          "max_memory_allocated on a GPU. Published mode: released settings (Adam lr 0.01, ExponentialLR 0.999, "
          "z only, checkpointed steps); 300 iterations is the released code's maximum, 90 the paper's earliest "
          "figure.\n")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()

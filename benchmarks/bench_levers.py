"""Benchmark of the levers on the course's UNet-bound cells (issue 26): each lever measured on the lessons' own
calls, on the mini path, each configuration in a fresh process.

Prints markdown tables (paste them into benchmarks/README.md). Not a test: timings depend on the machine.

    python benchmarks/bench_levers.py --root /tmp/bench_course_data     # every part: about 15 min on 2 cores
    python benchmarks/bench_levers.py --parts published --repeats 1

``--root`` is a mini-NSD data root (written on first use). Parts (``--parts``, default all):

1. ``published``: lesson 05's published stage 2 (subject 1's first 4 test images in one batch, the mini
   preset's 10 iterations), with and without checkpointing the denoising steps
   (``PublishedConfig.checkpoint``), and with 1 or 2 torch threads. The loss curves of each pair must agree
   (checkpointing recomputes, it does not change the arithmetic): the script says by how much they differ.
2. ``stage1``: lesson 04's stage 1 (40 test images in batches of 8, the published sampler) with 1 or 2 torch
   threads, and with the UNet's weights and inputs in ``channels_last`` memory format.
3. ``batch``: lesson 06's remainder, the published stage 2 of 2 images in a batch of 2, against the same 2 in a
   batch of 4 with 2 other images, to show what an image costs in each batch shape.
4. ``omp``: how torch's OpenMP threads wait between parallel regions (``OMP_WAIT_POLICY`` and libgomp's
   ``GOMP_SPINCOUNT``, read when torch is first imported), on three cells: the published stage 2 of part 1
   (mini preset: no checkpointing), the stage 1 of part 2, and lesson 03's decoding of subject 1 (every
   family, ridge with leave-one-out alphas, nothing cached), where numpy's BLAS threads and torch's take
   turns on the same cores.

Parts 1-3 run with libgomp's default waiting (each child imports torch before mdlib, which would otherwise
set ``OMP_WAIT_POLICY=PASSIVE``); part 4 compares the policies.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def child(spec: dict) -> dict:
    """One configuration, in this process: returns its timings and outputs' digests."""
    import numpy as np
    import torch

    from mdlib import decoding, method, models, presets, stage1, stage2
    from mdlib.sampler import image_seed

    torch.set_num_threads(spec.get("threads", 2))
    root = presets.get("mini").prepare(spec["root"], progress=False)
    config = method.configure("mdlib", "mini", checkpoint=spec.get("checkpoint", True))
    sd = models.load_sd(config.sd_model, device="cpu")
    clip = models.load_clip_vision(config.clip_model, device="cpu", normalization=config.clip_normalization)
    if spec["part"] == "decode":
        t0 = time.perf_counter()
        decoding.decode_features(root, 1, sd, clip, device="cpu", progress=False, cache=False,
                                 **config.decode_kwargs())
        return {"wall_s": time.perf_counter() - t0}
    decoded = decoding.decode_features(root, 1, sd, clip, device="cpu", progress=False, **config.decode_kwargs())
    rows = np.asarray(spec["rows"])
    ids = decoded.nsd_ids[rows]
    seeds = [image_seed(i, config.seed) for i in ids]
    z, c = decoded.pred["z"][rows], decoded.pred["c"][rows]
    if spec.get("channels_last"):
        sd.unet.to(memory_format=torch.channels_last)
    out = {}
    t0 = time.perf_counter()
    if spec["part"] == "stage1":
        res = stage1.img2img(sd, z, c, seeds, config=config.sampler, batch_size=spec["batch"])
        out["digest"] = float(np.abs(res.latents).sum())
    else:
        targets = config.targets(decoded, device=sd.device).subset(rows)
        res = stage2.guide_published(sd, clip, z, c, targets, seeds, config=config.published,
                                     sampler_config=config.sampler)
        out["loss_curve"] = [float(v) for v in res.loss.mean(1)]
        out["per_image_final_loss"] = [float(v) for v in res.loss[-1]]
        out["unet_forward"], out["unet_backward"] = int(res.cost["unet_passes"]), int(res.cost["unet_backward"])
    out["wall_s"] = time.perf_counter() - t0
    return out


def run_child(spec: dict) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MDLIB_PROGRESS": "0"}
    env.pop("OMP_WAIT_POLICY", None)
    env.pop("GOMP_SPINCOUNT", None)
    env.update(spec.get("env", {}))
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env, capture_output=True,
                          text=True, timeout=3600)
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def best(spec: dict, repeats: int) -> dict:
    runs = [run_child(spec) for _ in range(repeats)]
    out = min(runs, key=lambda r: r["wall_s"])
    out["all_wall_s"] = [round(r["wall_s"], 1) for r in runs]
    return out


def part_published(root: str, repeats: int) -> None:
    print("\n### Published stage 2 (lesson 05: 4 images in one batch, 10 iterations)\n")
    print("| checkpoint | torch threads | wall s (best of runs) | runs | UNet forward | UNet backward | final mean loss |")
    print("|---|---|---|---|---|---|---|")
    curves = {}
    for ckpt in (True, False):
        for threads in (2, 1):
            r = best({"part": "published", "root": root, "rows": [0, 1, 2, 3], "checkpoint": ckpt,
                      "threads": threads}, repeats)
            curves[(ckpt, threads)] = r["loss_curve"]
            print(f"| {'on' if ckpt else 'off'} | {threads} | {r['wall_s']:.1f} | {r['all_wall_s']} | "
                  f"{r['unet_forward']} | {r['unet_backward']} | {r['loss_curve'][-1]:.6f} |", flush=True)
    import numpy as np

    diff = max(float(np.max(np.abs(np.subtract(curves[(True, t)], curves[(False, t)])))) for t in (1, 2))
    print(f"\nLargest difference between the loss curves with and without checkpointing: {diff:.2e}")


def part_stage1(root: str, repeats: int) -> None:
    print("\n### Stage 1 (lesson 04: 40 images, batches of 8)\n")
    print("| torch threads | channels_last | wall s (best of runs) | runs | s per image |")
    print("|---|---|---|---|---|")
    for threads in (2, 1):
        for cl in (False, True):
            r = best({"part": "stage1", "root": root, "rows": list(range(40)), "batch": 8, "threads": threads,
                      "channels_last": cl}, repeats)
            print(f"| {threads} | {'yes' if cl else 'no'} | {r['wall_s']:.1f} | {r['all_wall_s']} | "
                  f"{r['wall_s'] / 40:.2f} |", flush=True)


def part_batch(root: str, repeats: int) -> None:
    print("\n### Batch shape of the published stage 2 (lesson 06's remainder)\n")
    print("| images | batch | wall s (best of runs) | runs | s per image | the 2 images' final losses |")
    print("|---|---|---|---|---|---|")
    for rows in ([4, 5], [2, 3, 4, 5]):
        r = best({"part": "published", "root": root, "rows": rows, "checkpoint": True, "threads": 2}, repeats)
        print(f"| {rows} | {len(rows)} | {r['wall_s']:.1f} | {r['all_wall_s']} | {r['wall_s'] / len(rows):.1f} | "
              f"{[round(v, 6) for v in r['per_image_final_loss'][-2:]]} |", flush=True)


#: The waiting policies of part 4: name -> environment.
OMP_POLICIES = {"passive (mdlib's default until now)": {"OMP_WAIT_POLICY": "PASSIVE"},
                "libgomp's default (spin 300,000, then sleep)": {},
                "GOMP_SPINCOUNT=10000": {"GOMP_SPINCOUNT": "10000"},
                "active": {"OMP_WAIT_POLICY": "ACTIVE"}}


def part_omp(root: str, repeats: int) -> None:
    print("\n### How OpenMP threads wait (OMP_WAIT_POLICY, GOMP_SPINCOUNT)\n")
    print("| waiting | published stage 2, 4 images, s | stage 1, 40 images, s | decoding subject 1, s |")
    print("|---|---|---|---|")
    cells = [{"part": "published", "rows": [0, 1, 2, 3], "checkpoint": False},
             {"part": "stage1", "rows": list(range(40)), "batch": 8},
             {"part": "decode", "rows": [0]}]
    for name, env in OMP_POLICIES.items():
        times = [best({**cell, "root": root, "env": env}, repeats)["wall_s"] for cell in cells]
        print(f"| {name} | " + " | ".join(f"{t:.1f}" for t in times) + " |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default="/tmp/bench_course_data", help="mini-NSD data root (written on first use)")
    ap.add_argument("--parts", default="published,stage1,batch,omp")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each configuration (the best is reported)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    import torch

    load = os.getloadavg()
    print(f"bench_levers.py, {datetime.date.today()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, torch {torch.__version__}, load {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}")
    for part in args.parts.split(","):
        parts = {"published": part_published, "stage1": part_stage1, "batch": part_batch, "omp": part_omp}
        parts[part.strip()](args.root, args.repeats)
    load = os.getloadavg()
    print(f"\nload after: {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}")


if __name__ == "__main__":
    main()

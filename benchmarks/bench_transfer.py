"""Benchmark of a new subject decoded from a small amount of its data (mdlib.transfer; docs/new_subject.md).

Prints markdown tables (paste them into benchmarks/README.md). Not a test: the figures depend on the data.

    python benchmarks/bench_transfer.py                      # every part on both mini-NSDs: about 25 min (2 cores)
    python benchmarks/bench_transfer.py --quick              # parts 1-2 on the default mini-NSD, 2 families

Two mini-NSDs, written under ``--root`` on first use (``write_mini_nsd``; the simulation itself is unchanged):

- ``mini``: the course's default (``mdlib.presets.get("mini")``): 40 shared images, 400 per subject, 12
  sessions of 100 trials;
- ``mini100``: NSD's proportions at a tenth of its size: 100 shared images, 1,000 per subject, 30 sessions of
  100 trials (NSD: 1,000, 10,000, 40 of 750). Its test set stays large after 4 sessions.

Parts (``--parts``, default all):

1. ``design``: per session of subject 2, the shared images it holds, the new ones, and the test images left
   (:func:`mdlib.transfer.shared_per_session`), on both mini-NSDs.
2. ``methods``: subject 2 as the new subject with 1, 2 and 4 sessions, subjects 1, 5 and 7 as references:
   the median r over each family's targets on the common test images (:func:`mdlib.transfer.compare`), for
   the two methods, the two baselines and two controls: ``shared, feature PCA`` (the same number of
   components, but the principal directions of the references' true features: no brain in it) and
   ``scratch, alignment images`` (ridge on the hour's alignment images only: what the alignment pairs give
   without the references' decoders).
3. ``structure``: whether the simulated subjects share stimulus-driven structure an alignment can find
   (``mini100``; the shared images split into halves, alignment on one half, scored on the other): for
   subject 2 -> 1, the median over subject 1's voxels of r between aligned and target responses, from the
   noiseless responses (the simulation's truth) and from the measured ones; and the decoding accuracy of
   alignment against scratch when both are fitted on the same shared images (Ferrante et al.'s comparison).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mdlib import method, models, presets, transfer, transfer_data  # noqa: E402
from mdlib.nsd.design import load_design  # noqa: E402
from mdlib.ridge import pearson_per_target  # noqa: E402
from mdlib.viz.transfer import summary_table  # noqa: E402

NEW, REFS = 2, (1, 5, 7)
ALL_FAMILIES = ["z", "c"] + [f"clip_block{i}" for i in range(1, 7)] + ["clip_embedding"]
ROOTS = {"mini": {}, "mini100": dict(n_shared=100, n_per_subject=1000, trials_per_session=100)}


def prepare(root: Path, name: str) -> Path:
    """The mini-NSD ``name`` under ``root``, written on first use."""
    path = root / name
    if name == "mini":
        return presets.get("mini").prepare(path, progress=False)
    if not (path / "mini_nsd.json").is_file():
        from mdlib.synth.write import write_mini_nsd

        print(f"writing {name} to {path} ...", file=sys.stderr)
        write_mini_nsd(path, progress=False, **ROOTS[name])
    return path


def md_table(df, digits: int = 3) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join([df.index.name or ""] + [str(c) for c in cols]) + " |",
             "|" + "---|" * (len(cols) + 1)]
    for idx, row in df.iterrows():
        cells = [f"{v:.{digits}f}" if isinstance(v, float) else str(v) for v in row.tolist()]
        lines.append("| " + " | ".join([str(idx)] + cells) + " |")
    return "\n".join(lines)


# -- part 1 ----------------------------------------------------------------------------------------------------
def part_design(roots: dict) -> None:
    print("## 1. Shared images per session of subject 2 (references 1, 5, 7)\n")
    for name, root in roots.items():
        d = load_design(root)
        t = transfer.shared_per_session(d, NEW, references=REFS)
        print(f"{name}: {d.n_shared} shared images, {d.n_sessions} sessions of {int(d.trials_per_session[0])} trials; "
              f"first 6 sessions and the mean over all {len(t)}:\n")
        show = t.head(6).astype(float)
        show.loc["mean"] = t.mean().round(1)
        show.index.name = "session"
        print(md_table(show.astype(object), 1) + "\n")


# -- part 2 ----------------------------------------------------------------------------------------------------
def controls(split, inputs, targets, families, result, alphas, device) -> dict:
    """The two controls of part 2: a shared space without brains, and scratch on the alignment images only."""
    X_hour_raw = inputs.hour.take(split.hour_ids)
    X_hour = transfer.standardize(X_hour_raw, X_hour_raw)
    X_test = transfer.standardize(inputs.test.take(split.test_ids), X_hour_raw)
    out = {"shared, feature PCA": {}, "scratch, alignment images": {}}
    rows = np.searchsorted(split.hour_ids, split.align_ids)
    for f in families:
        Yt = [targets.get(f, tr.nsd_ids) for tr, _ in inputs.references.values()]
        k = result.spaces[f].k
        space = transfer.SharedSpace(n_components=k).fit(Yt, Yt)
        Yh = targets.get(f, split.hour_ids)
        out["shared, feature PCA"][f] = transfer.SpaceDecoder(space, alphas, device).fit(X_hour, Yh).predict(X_test)
        from mdlib.ridge import RidgeDecoder

        dec = RidgeDecoder(alphas=alphas, device=device, progress=False)
        out["scratch, alignment images"][f] = dec.fit_predict(X_hour[rows], Yh[rows], X_test)
    return out


def part_methods(roots: dict, families: list[str], sessions: list[int], sd, clip, config, device) -> None:
    print("## 2. Subject 2 from 1, 2 and 4 sessions, references 1, 5, 7: median r on the common test images\n")
    alphas = np.logspace(-1, 5, 13)
    for name, root in roots.items():
        design = load_design(root)
        models_ = None
        for n in sessions:
            t0 = time.time()
            try:
                split = transfer.transfer_split(design, NEW, range(1, n + 1), references=REFS)
            except ValueError as e:
                print(f"{name}, {n} session(s): {e}\n")
                continue
            inputs = transfer_data.load_inputs(root, split, config.roi, progress=False)
            targets = transfer_data.load_targets(root, transfer_data.needed_ids(split, inputs), sd, clip, config,
                                                 families, progress=False)
            t1 = time.time()
            if models_ is None:
                models_ = transfer.fit_references(inputs.references, targets, families, alphas=alphas,
                                                  device=device, progress=False)
            t2 = time.time()
            res = transfer.compare(split, inputs, targets, families, references=models_, alphas=alphas,
                                   device=device, progress=False)
            t3 = time.time()
            extra = controls(split, inputs, targets, families, res, alphas, device)
            table = res.table()
            for m, p in extra.items():
                for f in families:
                    table.loc[m, f] = float(np.nanmedian(pearson_per_target(res.true[f], p[f])))
            if sum(f.startswith("clip_") for f in families) > 1:    # lesson 07's summary: the families' mean
                table["CLIP (mean of families)"] = summary_table(table)["CLIP"]
            table.index.name = "method"
            ks = ", ".join(f"{f} {s.k}" for f, s in res.spaces.items())
            print(f"**{name}, {n} session(s)**: {split.hour_ids.size} images in the hour "
                  f"({split.excluded_ids.size} shared = alignment pairs), {split.test_ids.size} test images, "
                  f"{len(inputs.full.nsd_ids)} training images for `full`; shared-space components: {ks}. "
                  f"Seconds: data {t1 - t0:.0f}, references {t2 - t1:.0f} (once per dataset), methods "
                  f"{t3 - t2:.0f}\n")
            print(md_table(table) + "\n", flush=True)


# -- part 3 ----------------------------------------------------------------------------------------------------
def part_structure(root: Path, sd, clip, config, device, families: list[str]) -> None:
    from mdlib.nsd.betas import load_betas
    from mdlib.ridge import RidgeDecoder
    from mdlib.synth.write import load_truth
    from mdlib.viz.decoding import noiseless_responses

    print("## 3. Do the simulated subjects share structure an alignment can find? (mini100, subject 2 -> 1)\n")
    alphas = np.logspace(-1, 5, 13)
    b = {s: load_betas(root, s, "nsdgeneral", progress=False) for s in (NEW, 1)}
    shared = b[1].nsd_ids[b[1].shared]
    rng = np.random.default_rng(0)
    perm = rng.permutation(shared)
    fit_ids, test_ids = np.sort(perm[: shared.size // 2]), np.sort(perm[shared.size // 2:])
    meas = {s: transfer.Responses(b[s].responses, b[s].nsd_ids) for s in b}
    clean = {s: transfer.Responses(noiseless_responses(load_truth(root, s), b[s].nsd_ids, b[s].coords),
                                   b[s].nsd_ids) for s in b}
    print(f"{fit_ids.size} shared images to fit on, {test_ids.size} to score on; subject 1's voxels with signal "
          f"in the simulation: {int((clean[1].X.std(0) > 0).sum())} of {clean[1].X.shape[1]}.\n")
    print("| responses | alignment images | median r over subject 1's voxels with signal (aligned vs measured "
          "target) | the same against the target's noiseless responses |\n|---|---|---|---|")
    signal = clean[1].X.std(0) > 0
    for label, src in (("noiseless", clean), ("measured", meas)):
        for n in (10, 25, fit_ids.size):
            ids = fit_ids[:n]
            Xs = src[NEW].take(ids)
            A = transfer.Alignment(alphas, device).fit(transfer.standardize(Xs, Xs),
                                                      transfer.standardize(src[1].take(ids), src[1].take(ids)))
            got = A.transform(transfer.standardize(src[NEW].take(test_ids), Xs))
            r_meas = pearson_per_target(transfer.standardize(meas[1].take(test_ids), meas[1].take(ids)), got)
            r_clean = pearson_per_target(clean[1].take(test_ids), got)
            print(f"| {label} | {n} | {np.nanmedian(r_meas[signal]):.3f} | {np.nanmedian(r_clean[signal]):.3f} |")
    print()

    # Ferrante et al.'s comparison: alignment + subject 1's full decoders vs ridge on the same shared images.
    design = load_design(root)
    every = np.unique(np.concatenate([design.trials(s)["nsd_id"].to_numpy() for s in (NEW,) + REFS]))
    targets = transfer_data.load_targets(root, every, sd, clip, config, families, progress=False)  # part 2's set
    train1 = b[1].nsd_ids[~b[1].shared]
    X1 = meas[1].take(train1)
    X1s = transfer.standardize(X1, X1)
    print("Decoding subject 2's held-out shared images, median r; both fitted on the same n shared images of "
          "subject 2 (alignment: then subject 1's decoders, fitted on its 900 training images):\n")
    print("| n shared images | method | " + " | ".join(families) + " |\n|---|---|" + "---|" * len(families))
    for n in (10, 25, fit_ids.size):
        ids = fit_ids[:n]
        Xs = meas[NEW].take(ids)
        Xs_std, Xt_std = transfer.standardize(Xs, Xs), transfer.standardize(meas[NEW].take(test_ids), Xs)
        A = transfer.Alignment(alphas, device).fit(Xs_std, transfer.standardize(meas[1].take(ids), X1))
        aligned = A.transform(Xt_std)
        rows = {"alignment": [], "scratch": []}
        for f in families:
            Yt = targets.get(f, test_ids)
            p_al = RidgeDecoder(alphas=alphas, device=device, progress=False).fit_predict(
                X1s, targets.get(f, train1), aligned)
            p_sc = RidgeDecoder(alphas=alphas, device=device, progress=False).fit_predict(
                Xs_std, targets.get(f, ids), Xt_std)
            rows["alignment"].append(np.nanmedian(pearson_per_target(Yt, p_al)))
            rows["scratch"].append(np.nanmedian(pearson_per_target(Yt, p_sc)))
        for m, v in rows.items():
            print(f"| {n} | {m} | " + " | ".join(f"{x:.3f}" for x in v) + " |")
    print()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default="/tmp/mdlib-bench-transfer", help="where the two mini-NSDs are written")
    ap.add_argument("--parts", nargs="+", default=["design", "methods", "structure"],
                    choices=["design", "methods", "structure"])
    ap.add_argument("--datasets", nargs="+", default=list(ROOTS), choices=list(ROOTS))
    ap.add_argument("--sessions", nargs="+", type=int, default=[1, 2, 4])
    ap.add_argument("--families", nargs="+", default=ALL_FAMILIES)
    ap.add_argument("--quick", action="store_true", help="parts 1-2, the default mini-NSD, z and clip_block1")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.quick:
        args.parts, args.datasets, args.families = ["design", "methods"], ["mini"], ["z", "clip_block1"]
    warnings.filterwarnings("ignore", category=RuntimeWarning)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    root = Path(args.root)
    roots = {name: prepare(root, name) for name in args.datasets}
    print(f"<!-- bench_transfer.py {' '.join(sys.argv[1:])}: {datetime.date.today()}, {platform.processor() or 'cpu'}, "
          f"{os.cpu_count()} cores, torch {torch.__version__} -->\n")
    config = method.configure("mdlib", "mini")
    sd = models.load_sd(config.sd_model)
    clip = models.load_clip_vision(config.clip_model, normalization=config.clip_normalization)
    t0 = time.time()
    if "design" in args.parts:
        part_design(roots)
    if "methods" in args.parts:
        part_methods(roots, args.families, args.sessions, sd, clip, config, args.device)
    if "structure" in args.parts and "mini100" in roots:
        part_structure(roots["mini100"], sd, clip, config, args.device, args.families)
    print(f"<!-- {time.time() - t0:.0f} s -->")


if __name__ == "__main__":
    main()

"""Benchmark of mdlib.ridge: speed against scikit-learn and himalaya, and memory at subject 1's real shape.

Prints markdown tables (paste them into benchmarks/README.md). Not a test: timings depend on the machine.

    python benchmarks/bench_ridge.py            # full: about 45 min on 2 CPU cores
    python benchmarks/bench_ridge.py --quick    # the same code paths at small sizes: under 2 min

Parts (``--parts``, default all three):

1. ``compare``: one synthetic problem (full: 2,000 train + 500 test samples, 4,000 voxels, 16,384 targets,
   10 alphas), fitted and predicted by mdlib.ridge (float32 and float64), scikit-learn's
   RidgeCV(alpha_per_target=True) and himalaya's RidgeCV and KernelRidgeCV (torch backend, CPU). Reports the
   wall time, the speed-up over scikit-learn, the largest relative difference of the test predictions from
   scikit-learn's (max over targets of max |diff| / max |sklearn|) and the fraction of identical alphas.
   himalaya's cross-validation is 5-fold, not leave-one-out, so its alphas and predictions differ.
   ``--sklearn-targets`` runs scikit-learn on the first k targets only, and its time is extrapolated
   linearly (the table says so).
2. ``real``: subject 1's shape with synthetic numbers: 8,859 x 15,724 voxels (nsdgeneral), a 982-row test
   set, targets z 16,384 + c 15 x 768 + 6 CLIP layers x 38,400 = 258,304, read lazily (a ColumnStack of
   generated feature blocks, so Y itself, 9 GB in float32, never sits in memory) and decoded with one
   ``fit_predict`` (LOO, 13 alphas 1e2-1e8). Runs in a fresh process; reports the time and the peak resident
   memory (ru_maxrss: the whole process, X and the 1 GB of predictions included).
3. ``fastl2lir``: the released code's decoder (per-target voxel selection, alpha 0.15) at the real shape,
   for z (n_select 3,000), CLIP layers (850) and c (450), on a few targets each; the per-target time is
   extrapolated to the full target counts. Also in a fresh process.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np
import torch

from mdlib.ridge import ColumnStack, RidgeDecoder

ALPHAS_COMPARE = np.logspace(0, 6, 10)
# 13 alphas like mdlib's default grid, shifted up: on these synthetic voxels (eigenvalues of Xc Xc' up to
# ~1e7) the default grid's top, 1e5, wins for every target, and LOO's cost depends on where the optima lie.
ALPHAS_REAL = np.logspace(2, 8, 13)

FULL = dict(compare=dict(n=2000, p=4000, t=16384, n_test=500),
            real=dict(n=8859, p=15724, n_test=982, groups=[("z", 16384), ("c", 15 * 768)]
                      + [(f"clip{i}", 38400) for i in range(1, 7)]),
            fastl2lir=dict(n=8859, p=15724, n_test=982, runs=[("z", 3000, 16384, 24), ("clip layer", 850, 38400, 96),
                                                              ("c", 450, 15 * 768, 128)]))
QUICK = dict(compare=dict(n=1000, p=2000, t=4096, n_test=200),
             real=dict(n=1000, p=2000, n_test=100, groups=[("z", 2048), ("c", 1440)]
                       + [(f"clip{i}", 1200) for i in range(1, 7)]),
             fastl2lir=dict(n=1000, p=2000, n_test=100, runs=[("z", 400, 2048, 32), ("clip layer", 110, 4800, 64),
                                                              ("c", 60, 1440, 64)]))


# -- synthetic data -------------------------------------------------------------------------------------------
N_LATENT = 64


def make_x(n: int, p: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """fMRI-like voxels: 64 shared latent factors (the "images") plus independent noise, float32.

    Returns (X (n, p), F (n, 64)): the latent factors drive the targets too.
    """
    rng = np.random.default_rng(seed)
    F = rng.standard_normal((n, N_LATENT), dtype=np.float32)
    A = rng.standard_normal((N_LATENT, p), dtype=np.float32) * np.float32(0.3)
    X = F @ A
    X += rng.standard_normal((n, p), dtype=np.float32)
    return X, F


class SyntheticTargets:
    """Features of the latent factors plus noise, generated on demand in blocks of 512 columns.

    Column j is the same whatever slice asks for it (each block has its own seed). Signal-to-noise ratios
    are log-uniform over 0.03-10 (amplitude), so that many different alphas win, as across real feature maps.
    """

    BLOCK = 512

    def __init__(self, F: np.ndarray, t: int, seed: int):
        self.F, self.seed = F, seed
        self.shape = (F.shape[0], t)
        self.ndim = 2

    def _block(self, b: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, b])
        width = min(self.BLOCK, self.shape[1] - b * self.BLOCK)
        S = self.F @ rng.standard_normal((N_LATENT, width), dtype=np.float32)
        S *= (10 ** rng.uniform(-1.5, 1.0, width)).astype(np.float32) / np.float32(np.sqrt(N_LATENT))
        S += rng.standard_normal(S.shape, dtype=np.float32)
        return S

    def __getitem__(self, key):
        j0, j1, _ = key[1].indices(self.shape[1])
        blocks = range(j0 // self.BLOCK, (j1 - 1) // self.BLOCK + 1)
        out = np.concatenate([self._block(b) for b in blocks], axis=1)
        off = blocks[0] * self.BLOCK
        return out[:, j0 - off:j1 - off]


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30  # Linux: KiB


# -- part 1 ---------------------------------------------------------------------------------------------------
def part_compare(cfg: dict, sklearn_targets: int | None, skip: set[str]) -> dict:
    from sklearn.linear_model import RidgeCV as SkRidgeCV

    n, p, t, n_test = cfg["n"], cfg["p"], cfg["t"], cfg["n_test"]
    X, F = make_x(n + n_test, p, seed=1)
    Y = SyntheticTargets(F, t, seed=2)[:, 0:t]
    Xtr, Xte, Ytr = X[:n], X[n:], Y[:n]
    rows = []

    k = t if not sklearn_targets else min(t, sklearn_targets)
    t0 = time.perf_counter()
    sk = SkRidgeCV(alphas=ALPHAS_COMPARE, alpha_per_target=True).fit(Xtr, Ytr[:, :k])
    ref = sk.predict(Xte)
    sk_time = (time.perf_counter() - t0) * t / k
    ref_alpha = np.asarray(sk.alpha_)
    rows.append(dict(method="scikit-learn RidgeCV (LOO, float64)", time=sk_time, extrapolated=k < t,
                     speedup=1.0, rel=0.0, rel_median=0.0, agree=1.0, targets=k))

    def add(name, fit_predict, alphas_of):
        t0 = time.perf_counter()
        pred = fit_predict()
        el = time.perf_counter() - t0
        pred = np.asarray(pred)[:, :k]
        rel_j = np.abs(pred - ref).max(0) / np.abs(ref).max(0)
        agree = float(np.mean(np.isclose(alphas_of()[:k], ref_alpha, rtol=1e-6)))  # himalaya's are float32
        rows.append(dict(method=name, time=el, extrapolated=False, speedup=sk_time / el, rel=float(rel_j.max()),
                         rel_median=float(np.median(rel_j)), agree=agree, targets=t))
        print(f"  {name}: {el:.1f} s", file=sys.stderr, flush=True)

    for dtype in (torch.float32, torch.float64):
        m = RidgeDecoder(ALPHAS_COMPARE, dtype=dtype, progress=False)
        add(f"mdlib RidgeDecoder (LOO, {str(dtype)[6:]})", lambda m=m: m.fit_predict(Xtr, Ytr, Xte),
            lambda m=m: m.alpha_)
    m_gcv = RidgeDecoder(ALPHAS_COMPARE, cv="gcv", progress=False)
    add("mdlib RidgeDecoder (GCV, float32)", lambda: m_gcv.fit_predict(Xtr, Ytr, Xte), lambda: m_gcv.alpha_)

    if "himalaya" not in skip:
        from himalaya.backend import set_backend
        from himalaya.kernel_ridge import KernelRidgeCV
        from himalaya.ridge import RidgeCV as HiRidgeCV

        backend = set_backend("torch", on_error="warn")
        for name, cls in [("himalaya RidgeCV (5-fold, torch CPU)", HiRidgeCV),
                          ("himalaya KernelRidgeCV (5-fold, torch CPU)", KernelRidgeCV)]:
            model = cls(alphas=ALPHAS_COMPARE, fit_intercept=True, cv=5)

            def fp(model=model):
                model.fit(Xtr, Ytr)
                return backend.to_numpy(model.predict(Xte))
            add(name, fp, lambda model=model: backend.to_numpy(model.best_alphas_))
    return dict(rows=rows, shape=dict(n=n, p=p, t=t, n_test=n_test, alphas=len(ALPHAS_COMPARE)),
                alpha_hist={f"{a:g}": int(c) for a, c in zip(*np.unique(ref_alpha, return_counts=True))})


# -- part 2 ---------------------------------------------------------------------------------------------------
def part_real(cfg: dict, memory_gb: float) -> dict:
    n, p, n_test = cfg["n"], cfg["p"], cfg["n_test"]
    X, F = make_x(n + n_test, p, seed=3)
    Xtr, Xte = X[:n], np.ascontiguousarray(X[n:])
    Ftr = np.ascontiguousarray(F[:n])
    del X, F
    Y = ColumnStack([SyntheticTargets(Ftr, t, seed=10 + i) for i, (_, t) in enumerate(cfg["groups"])])
    m = RidgeDecoder(ALPHAS_REAL, memory_gb=memory_gb, progress=sys.stderr.isatty())
    t0 = time.perf_counter()
    pred = m.fit_predict(Xtr, Y, Xte)
    el = time.perf_counter() - t0
    return dict(time=el, peak_gb=peak_gb(), shape=dict(n=n, p=p, n_test=n_test, t=Y.shape[1]),
                x_gb=(Xtr.nbytes + Xte.nbytes) / 2**30,
                timings=m.timings_, memory_gb=memory_gb, pred_gb=pred.nbytes / 2**30,
                alpha_hist={float(a): int(c) for a, c in zip(*np.unique(m.alpha_, return_counts=True))})


# -- part 3 ---------------------------------------------------------------------------------------------------
def part_fastl2lir(cfg: dict, memory_gb: float) -> dict:
    n, p, n_test = cfg["n"], cfg["p"], cfg["n_test"]
    X, F = make_x(n + n_test, p, seed=4)
    Xtr, Xte = X[:n], X[n:]
    rows = []
    for name, n_select, t_full, t_run in cfg["runs"]:
        Y = SyntheticTargets(np.ascontiguousarray(F[:n]), t_run, seed=20)
        m = RidgeDecoder.fastl2lir(n_select, memory_gb=memory_gb, progress=False)
        t0 = time.perf_counter()
        m.fit_predict(Xtr, Y, Xte)
        el = time.perf_counter() - t0
        per = m.timings_["targets_s"] / t_run
        setup = m.timings_["setup_s"]
        rows.append(dict(features=name, n_select=n_select, t_run=t_run, t_full=t_full, time=el, setup=setup,
                         per_target=per, full_estimate=setup + per * t_full))
        print(f"  FastL2LiR {name}: {el:.1f} s", file=sys.stderr, flush=True)
    return dict(rows=rows, peak_gb=peak_gb(), shape=dict(n=n, p=p, n_test=n_test))


# -- driver ---------------------------------------------------------------------------------------------------
def run_child(part: str, args) -> dict:
    """Run one part in a fresh process, so that its peak memory is its own."""
    cmd = [sys.executable, __file__, "--child", part, "--memory-gb", str(args.memory_gb)]
    if args.quick:
        cmd.append("--quick")
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def load() -> str:
    """The 1-minute load average: other processes on the machine slow every method down."""
    return f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"


def fmt_time(s: float) -> str:
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GB RAM, {dev}; torch {torch.__version__}"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, same code paths (< 2 min)")
    ap.add_argument("--parts", default="compare,real,fastl2lir")
    ap.add_argument("--sklearn-targets", type=int, default=None,
                    help="run scikit-learn on this many targets and extrapolate (default: all; --quick: 1024)")
    ap.add_argument("--skip", default="", help="comma-separated: himalaya")
    ap.add_argument("--memory-gb", type=float, default=3.0, help="RidgeDecoder's memory_gb for parts 2 and 3")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    cfg = QUICK if args.quick else FULL

    if args.child:
        res = part_real(cfg["real"], args.memory_gb) if args.child == "real" else \
            part_fastl2lir(cfg["fastl2lir"], args.memory_gb)
        print(json.dumps(res))
        return

    parts = args.parts.split(",")
    sk_targets = args.sklearn_targets or (1024 if args.quick else None)
    print(f"# mdlib.ridge benchmark{' (--quick)' if args.quick else ''}, {datetime.date.today()}\n")
    print(f"Machine: {machine()}\n")
    if "compare" in parts:
        before = load()
        res = part_compare(cfg["compare"], sk_targets, set(filter(None, args.skip.split(","))))
        s = res["shape"]
        print(f"## 1. Against scikit-learn and himalaya: {s['n']} train x {s['p']} voxels, {s['t']} targets, "
              f"{s['alphas']} alphas, {s['n_test']} test rows\n")
        print("| method | wall time | speed-up vs sklearn | rel. diff of predictions vs sklearn: max (median) "
              "| alphas equal to sklearn's |")
        print("|---|---|---|---|---|")
        for r in res["rows"]:
            tm = fmt_time(r["time"]) + (f" (extrapolated from {r['targets']} targets)" if r["extrapolated"] else "")
            print(f"| {r['method']} | {tm} | {r['speedup']:.1f}x | {r['rel']:.1e} ({r['rel_median']:.1e}) "
                  f"| {100 * r['agree']:.2f}% |")
        print(f"\nscikit-learn's chosen alphas (counts): {res['alpha_hist']}. Relative difference: max over "
              "targets (median) of max |pred - sklearn| / max |sklearn| on the test rows. "
              f"Before: {before}; after: {load()}.\n", flush=True)
    if "real" in parts:
        before = load()
        res = run_child("real", args)
        s = res["shape"]
        tm = res["timings"]
        print(f"## 2. Subject 1's shape (synthetic numbers): {s['n']} x {s['p']} voxels, {s['t']:,} targets "
              f"(z + c + 6 CLIP layers), {s['n_test']} test rows, LOO over 13 alphas (1e2-1e8), float32, one "
              "fit_predict\n")
        print("| wall time | decomposition | targets | chunk size | LOO evaluations per target "
              "| peak memory (RSS, whole process) |")
        print("|---|---|---|---|---|---|")
        print(f"| {fmt_time(res['time'])} | {fmt_time(tm['setup_s'])} | {fmt_time(tm['targets_s'])} "
              f"| {tm['chunk_size']} | {tm['loo_evals_per_target']:.2f} of 13 | {res['peak_gb']:.2f} GB "
              f"(memory_gb={res['memory_gb']}; X {res['x_gb']:.2f} GB, predictions {res['pred_gb']:.2f} GB) |")
        hist = {f"{float(a):g}": c for a, c in res["alpha_hist"].items()}
        print(f"\nChosen alphas (counts): {hist}. Before: {before}; after: {load()}.\n", flush=True)
    if "fastl2lir" in parts:
        before = load()
        res = run_child("fastl2lir", args)
        s = res["shape"]
        print(f"## 3. FastL2LiR mode (per-target voxel selection, alpha 0.15, float32 + refinement): "
              f"{s['n']} x {s['p']} voxels\n")
        print("| features | n_select | targets run | X'X set-up | per target | estimate for all targets |")
        print("|---|---|---|---|---|---|")
        for r in res["rows"]:
            print(f"| {r['features']} | {r['n_select']} | {r['t_run']} | {fmt_time(r['setup'])} "
                  f"| {1000 * r['per_target']:.0f} ms | {fmt_time(r['full_estimate'])} ({r['t_full']:,} targets) |")
        print(f"\nPeak memory (RSS): {res['peak_gb']:.2f} GB. Before: {before}; after: {load()}.\n", flush=True)


if __name__ == "__main__":
    main()

"""mdlib reconstruct: a whole test set one image at a time, sharded over processes, resumable, failures recorded.

On the mini path (a small mini-NSD, the shipped tiny-trained models, a short sampler): two processes under
torchrun make disjoint shards whose union is byte for byte a one-process run; a run killed with SIGKILL in the
middle of an image resumes to the outputs of an uninterrupted run; an image with NaN inputs or outputs is
recorded as failed while the others complete; gather's table and metrics equal a direct computation.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mdlib import cli, evaluation, method, metrics, reconstruct
from mdlib.reconstruct import Shard
from mdlib.sampler import image_seed

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BIN = Path(sys.executable).parent
#: The published sampler's structure (z noised two levels above the first step) at 5 steps instead of 35.
SHORT = ["--num-steps", "10", "--noise-index", "6", "--denoise-steps", "5"]


@pytest.fixture(scope="module")
def mini_root(mini_nsd):
    return mini_nsd(subjects=(1,), n_shared=8, n_per_subject=40, trials_per_session=24, stim_size=64)


def _args(root, out, *extra):
    return ["reconstruct", "--preset", "mini", "--data-root", str(root), "--subject", "1", "--out", str(out),
            *SHORT, "-q", *extra]


def _env():
    # one thread per process, as torchrun gives its workers: the same arithmetic in every run compared here
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _folder(out, tag):
    return Path(out) / "subj01" / tag


def _image_ids(folder):
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


def _assert_same_outputs(a: Path, b: Path, ids):
    for i in ids:
        assert (a / str(i) / "image.png").read_bytes() == (b / str(i) / "image.png").read_bytes(), i
        x, y = reconstruct.read_outputs(a, i), reconstruct.read_outputs(b, i)
        assert sorted(x) == sorted(y)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=f"nsdId {i}, {k}")


@pytest.fixture(scope="module")
def sharded(mini_root, tmp_path_factory):
    """Stage 2 (fast) of the first 5 test images: by 2 processes under torchrun, then by one process."""
    base = tmp_path_factory.mktemp("sharded")
    t0 = time.perf_counter()
    cmd = ["nice", "-n", "10", str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "mdlib.cli",
           *_args(mini_root, base / "two", "--stage", "2", "--mode", "fast", "--images", "0..5")]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    two_s = time.perf_counter() - t0
    assert cli.main(_args(mini_root, base / "one", "--stage", "2", "--mode", "fast", "--images", "0..5")) == 0
    return {"two": _folder(base / "two", "stage2-fast"), "one": _folder(base / "one", "stage2-fast"),
            "log": done.stdout + done.stderr, "two_s": two_s}


def test_two_processes_make_disjoint_shards_whose_union_is_a_one_process_run(sharded):
    two, one = sharded["two"], sharded["one"]
    settings = json.loads((one / "run.json").read_text())
    ids = settings["test_ids"][:5]
    assert _image_ids(two) == _image_ids(one) == ids
    recs = {i: reconstruct.read_record(two, i) for i in ids}
    by_rank = {r: sorted(i for i in ids if recs[i]["process"]["rank"] == r) for r in (0, 1)}
    assert by_rank == {0: ids[0::2], 1: ids[1::2]}                   # disjoint, and together every image
    assert len({recs[i]["process"]["pid"] for i in ids}) == 2
    for i in ids:
        rec, rec1 = recs[i], reconstruct.read_record(one, i)
        assert rec["status"] == rec1["status"] == "done"
        assert rec["process"]["world"] == 2 and "RANK" in rec["process"]["launcher"]
        assert rec1["process"]["world"] == 1
        assert rec["seed"] == rec1["seed"] == image_seed(i, 0)       # the image's seed, not the rank's
        assert rec["settings"] == rec1["settings"] == {k: v for k, v in settings.items() if k != "test_ids"}
        assert rec["cost"]["unet_passes"] == 10 and rec["cost"]["unet_backward"] == 10
        assert set(rec["versions"]) >= {"torch", "diffusers", "mdlib"}
    _assert_same_outputs(two, one, ids)
    assert json.loads((two / "run.json").read_text()) == settings
    # the record names the method: its variant, every row's value, and what the preset changed
    assert settings["method"] == method.describe(method.configure("mdlib", "mini", **_short_sampler().as_dict()))
    assert settings["method"]["changes"]["iterations"] == "preset mini"
    # the summaries: one line per process, one for the whole selection
    assert "rank 0/2: 3 images in this shard: 3 reconstructed" in sharded["log"]
    assert "rank 1/2: 2 images in this shard: 2 reconstructed" in sharded["log"]
    assert "5 images: 5 done, 0 failed, 0 remaining" in sharded["log"]
    print(f"torchrun, 2 processes, 5 images (stage 2 fast): {sharded['two_s']:.1f} s")


def test_accelerate_launch_and_the_slurm_example_shard_like_torchrun(mini_root, tmp_path):
    """``accelerate launch --multi_gpu`` starts its processes through torch.distributed.run, which sets RANK and
    WORLD_SIZE as torchrun does (on a machine without GPUs too, where each process takes the CPU); the SLURM
    example, run as the two tasks of an array, shards by SLURM_ARRAY_TASK_ID. Both equal a one-process run."""
    args = ["--stage", "1", "--images", "0..4"]
    cmd = ["nice", "-n", "10", str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "mdlib.cli",
           *_args(mini_root, tmp_path / "accelerate", *args)]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    script = Path(__file__).resolve().parents[1] / "examples" / "slurm_reconstruct.sh"
    extra = " ".join(["--data-root", str(mini_root), *SHORT, "-q", "--images", "0..4"])
    for task in (1, 0):       # array tasks need not run together, nor in order
        env = {**_env(), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "MDLIB_DATA": str(tmp_path / "data"),
               "SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_COUNT": "2",
               "PRESET": "mini", "STAGE": "1", "OUT": str(tmp_path / "slurm"), "EXTRA": extra}
        done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout + done.stderr
    assert cli.main(_args(mini_root, tmp_path / "one", *args)) == 0
    one = _folder(tmp_path / "one", "stage1")
    ids = json.loads((one / "run.json").read_text())["test_ids"][:4]
    for launcher, source in (("accelerate", "RANK"), ("slurm", "SLURM array task")):
        two = _folder(tmp_path / launcher, "stage1")
        assert _image_ids(two) == _image_ids(one) == ids, launcher
        procs = {i: reconstruct.read_record(two, i)["process"] for i in ids}
        assert {i: p["rank"] for i, p in procs.items()} == {i: k % 2 for k, i in enumerate(ids)}, launcher
        assert all(p["world"] == 2 and p["device"] == "cpu" and source in p["launcher"] for p in procs.values())
        _assert_same_outputs(two, one, ids)


def test_a_killed_run_resumes_to_the_outputs_of_an_uninterrupted_one(mini_root, tmp_path):
    args = ["--stage", "2", "--mode", "published", "--iterations", "3", "--save-every", "1", "--images", "0..3"]
    folder = _folder(tmp_path / "killed", "stage2-published")
    proc = subprocess.Popen(["nice", "-n", "10", sys.executable, "-m", "mdlib.cli",
                             *_args(mini_root, tmp_path / "killed", *args)],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        first = second = second_state = None
        while time.monotonic() < deadline and proc.poll() is None:
            if folder.joinpath("run.json").is_file():
                first, second = json.loads(folder.joinpath("run.json").read_text())["test_ids"][:2]
                second_state = list(folder.glob(f".state/{second}/*/stage2_state.npz"))
                if (folder / str(first) / "record.json").is_file() and second_state:
                    break   # the first image is done, the second is in the middle of its optimisation
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()[0]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert _image_ids(folder) == [first]                           # the second never reached its folder
    with np.load(second_state[0]) as state:
        assert int(state["iteration"]) >= 1                         # saved after at least one iteration

    assert cli.main(_args(mini_root, tmp_path / "killed", *args)) == 0      # started again
    assert cli.main(_args(mini_root, tmp_path / "whole", *args)) == 0       # never interrupted
    whole = _folder(tmp_path / "whole", "stage2-published")
    ids = json.loads((whole / "run.json").read_text())["test_ids"][:3]
    assert _image_ids(folder) == _image_ids(whole) == ids
    _assert_same_outputs(folder, whole, ids)
    recs = {i: reconstruct.read_record(folder, i) for i in ids}
    assert recs[first]["process"]["pid"] == proc.pid                # kept, not redone
    assert recs[second]["cost"]["resumed_at"] >= 1                  # resumed from its saved state
    assert recs[ids[2]]["cost"]["resumed_at"] == 0
    for i in ids:
        assert recs[i]["cost"]["unet_passes"] == reconstruct.read_record(whole, i)["cost"]["unet_passes"]
        assert reconstruct.read_outputs(folder, i)["loss"].shape == (4,)       # iterations 0..3
    leftovers = [p.name for p in folder.iterdir() if p.name.startswith((".tmp", ".old"))]
    assert leftovers == [] and not any((folder / ".state").iterdir())


def test_a_failed_image_is_recorded_and_the_others_complete(mini_root, tmp_path, monkeypatch):
    from mdlib import stage1

    job = reconstruct.Job(subject=1, stage=1, out=tmp_path, data_root=mini_root, preset="mini", images="0..4",
                          config=method.configure("mdlib", "mini", **_short_sampler().as_dict()))
    sd, _ = reconstruct.load_models(job, "cpu")
    decoded = reconstruct.decode(job, sd, None, device="cpu", progress=False)
    ids = list(decoded.nsd_ids[:4])
    decoded.pred["z"] = decoded.pred["z"].copy()
    decoded.pred["z"][1, 0, 2, 3] = np.nan                          # the second image's input
    real = stage1.img2img

    def nan_latents_for_the_fourth(sd_, z, c, seeds, **kw):
        out = real(sd_, z, c, seeds, **kw)
        if seeds[0] == image_seed(ids[3]):
            out.latents[:] = np.nan
        return out

    monkeypatch.setattr(stage1, "img2img", nan_latents_for_the_fourth)
    lines = []
    out = reconstruct.run(job, Shard(), sd=sd, decoded=decoded, progress=False, log=lines.append)
    folder = job.folder
    assert out["shard"]["done_now"] == 2 and out["shard"]["failed_now"] == 2
    assert [out["overall"][k] for k in ("images", "done", "failed", "remaining")] == [4, 2, 2, 0]
    assert sorted(out["overall"]["failed_images"]) == [ids[1], ids[3]]
    bad, worse = reconstruct.read_record(folder, ids[1]), reconstruct.read_record(folder, ids[3])
    assert bad["status"] == worse["status"] == "failed"
    assert bad["error"] == "FloatingPointError: 1 of 1024 values of the decoded z are not finite"
    assert worse["error"] == "FloatingPointError: 1024 of 1024 values of the latents are not finite"
    assert "Traceback" in bad["traceback"] and bad["files"] == {}
    assert sorted(p.name for p in (folder / str(ids[1])).iterdir()) == ["record.json"]
    for i in (ids[0], ids[2]):
        assert reconstruct.read_record(folder, i)["status"] == "done"
        assert reconstruct.read_image(folder, i).shape == (64, 64, 3)
    assert any(f"nsdId {ids[1]} failed: FloatingPointError" in line for line in lines)
    assert "2 failed" in lines[-1] and "--retry-failed" in lines[-1]
    # A rerun leaves the finished images alone, failed ones included; --retry-failed tries those again.
    again = reconstruct.run(job, Shard(), sd=sd, decoded=decoded, progress=False, log=lines.append)
    assert again["shard"]["skipped"] == 4 and again["shard"]["done_now"] == again["shard"]["failed_now"] == 0
    monkeypatch.setattr(stage1, "img2img", real)
    retried = reconstruct.run(job, Shard(), sd=sd, decoded=decoded, progress=False, log=lines.append,
                              retry_failed=True)
    assert retried["shard"]["done_now"] == 1 and retried["shard"]["failed_now"] == 1
    assert reconstruct.read_record(folder, ids[3])["status"] == "done"
    assert reconstruct.read_record(folder, ids[1])["status"] == "failed"
    assert not [p for p in folder.iterdir() if p.name.startswith((".tmp", ".old"))]


def _short_sampler():
    from mdlib.sampler import SamplerConfig

    return SamplerConfig(num_steps=10, noise_index=6, denoise_steps=5)


def test_gather_builds_the_table_and_its_metrics_equal_a_direct_computation(sharded, mini_root, capsys):
    from mdlib.evalnets import EvalNetworks
    from mdlib.nsd.stimuli import StimulusReader

    one = sharded["one"]
    job = reconstruct.Job(subject=1, stage=2, mode="fast", out=one.parent.parent, data_root=mini_root,
                          preset="mini", images="0..6")
    names = ["PixCorr", "SSIM", "AlexNet(2)"]
    got = reconstruct.gather(job, metrics=names, eval_weights="random", device="cpu", progress=False)
    ids = got["images"]
    done = ids[:5]
    table = got["table"]
    assert list(table.index) == ids and list(table["status"]) == ["done"] * 5 + ["missing"]
    assert [got["summary"][k] for k in ("images", "done", "failed", "remaining")] == [6, 5, 0, 1]
    recons = np.stack([reconstruct.read_image(one, i) for i in done])
    with StimulusReader(mini_root) as reader:
        stims = reader.read(done)
    np.testing.assert_allclose(table.loc[done, "PixCorr"], metrics.pixcorr_per_image(recons, stims), rtol=1e-12)
    np.testing.assert_allclose(table.loc[done, "SSIM"], metrics.ssim_per_image(recons, stims), rtol=1e-12)
    direct = evaluation.evaluate(recons, stims, EvalNetworks(weights="random", device="cpu", seed=0, progress=False),
                                 metrics=names)
    for m in names:
        assert got["metrics"][m] == pytest.approx(direct.values[m], rel=1e-12)
    assert got["metrics"]["PixCorr"] == pytest.approx(metrics.pixcorr(recons, stims), rel=1e-12)
    assert "AlexNet" in got["header"] and "random" in got["header"].lower()
    for i in done:
        rec = reconstruct.read_record(one, i)
        assert table.loc[i, "seed"] == rec["seed"] and table.loc[i, "loss_final"] == pytest.approx(rec["loss_final"])
    # the files: the per-image table as CSV, everything as JSON, the means with their header
    import pandas as pd

    csv = pd.read_csv(one / "results.csv", index_col="nsd_id")
    np.testing.assert_allclose(csv.loc[done, "SSIM"], table.loc[done, "SSIM"])
    saved = json.loads((one / "results.json").read_text())
    assert saved["metrics"] == pytest.approx(got["metrics"]) and len(saved["rows"]) == 6
    means = evaluation.read_table(one / "metrics.csv")
    assert means.loc["stage2-fast", "SSIM"] == pytest.approx(got["metrics"]["SSIM"])
    # --status and --gather through the command
    base = _args(mini_root, one.parent.parent, "--stage", "2", "--mode", "fast", "--images", "0..6")
    assert cli.main([*base, "--status"]) == 0
    assert "6 images: 5 done, 0 failed, 1 remaining" in capsys.readouterr().out
    assert cli.main([*base, "--gather", "--metrics", "PixCorr,SSIM"]) == 0
    assert f"SSIM: {got['metrics']['SSIM']:.4f}" in capsys.readouterr().out
    # Another protocol: Brain-Diffuser's 8-bit PIL resizes and column SSIM, named in the files and the output.
    assert cli.main([*base, "--gather", "--metrics", "PixCorr,SSIM", "--protocol", "braindiffuser"]) == 0
    printed = capsys.readouterr().out
    bd_ssim = metrics.ssim(recons, stims, protocol="braindiffuser")
    assert "protocol 'braindiffuser'" in printed and f"SSIM: {bd_ssim:.4f}" in printed
    assert abs(bd_ssim - got["metrics"]["SSIM"]) > 1e-4
    saved = json.loads((one / "results.json").read_text())
    assert saved["protocol"] == "braindiffuser" and "PROTOCOL 'braindiffuser'" in saved["header"]
    assert "PROTOCOL 'braindiffuser'" in evaluation.read_table(one / "metrics.csv").attrs["header"]


def test_decode_only_fills_the_cache_and_stops(mini_root, tmp_path, capsys):
    assert cli.main(_args(mini_root, tmp_path, "--stage", "1", "--decode-only")) == 0
    assert "decoded subject 1: Decoded(8 test images: z (4, 16, 16)" in capsys.readouterr().out
    assert not (tmp_path / "subj01").exists()
    assert (mini_root / "mdlib_cache" / "locks" / "decode_subj01.lock").is_file()
    assert len(list((mini_root / "mdlib_cache" / "decoded").glob("subj01_z_*.npz"))) == 1


def test_shards_from_the_launchers_environment():
    assert reconstruct.shard_from_env({}) == Shard(0, 1, 0, "single process")
    s = reconstruct.shard_from_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"})
    assert (s.rank, s.world, s.local_rank) == (3, 8, 1)
    s = reconstruct.shard_from_env({"SLURM_PROCID": "2", "SLURM_NTASKS": "4", "SLURM_LOCALID": "2"})
    assert (s.rank, s.world, s.local_rank) == (2, 4, 2)
    assert reconstruct.shard_from_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}).world == 1
    array = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "8"}
    s = reconstruct.shard_from_env(array)
    assert (s.rank, s.world) == (4, 8) and "array task 4 of 8" in s.source
    s = reconstruct.shard_from_env({**array, "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert (s.rank, s.world, s.local_rank) == (9, 16, 1)          # a node of 2 GPUs per array task
    s = reconstruct.shard_from_env({"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_MIN": "0",
                                    "SLURM_ARRAY_TASK_MAX": "6", "SLURM_ARRAY_TASK_STEP": "2"})
    assert (s.rank, s.world) == (2, 4)
    with pytest.raises(ValueError, match="evenly spaced"):
        reconstruct.shard_from_env({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_STEP": "2",
                                    "SLURM_ARRAY_TASK_COUNT": "4"})
    with pytest.raises(ValueError, match="rank < world"):
        Shard(2, 2)
    ids = [30, 10, 20, 50, 40]
    shards = [Shard(r, 2).take(ids) for r in (0, 1)]
    assert [s.tolist() for s in shards] == [[10, 30, 50], [20, 40]]


def test_image_selection_and_settings_guard(tmp_path, capsys):
    ids = [9, 3, 7, 1]
    assert reconstruct.select_images(ids).tolist() == [1, 3, 7, 9]
    assert reconstruct.select_images(ids, "1..3").tolist() == [3, 7]
    assert reconstruct.select_images(ids, "..2").tolist() == [1, 3]
    assert reconstruct.select_images(ids, "2..").tolist() == [7, 9]
    with pytest.raises(ValueError, match=r"reaches position 100, but there are 4 test images .* use 0..4 or 0.."):
        reconstruct.select_images(ids, "0..100")                  # never clamped in silence
    for bad in ("4..5", "2..2", "first", "1-3"):
        with pytest.raises(ValueError):
            reconstruct.select_images(ids, bad)
    reconstruct.open_run(tmp_path, {"seed": 0, "sampler": {"num_steps": 50}})
    reconstruct.open_run(tmp_path, {"seed": 0, "sampler": {"num_steps": 50}})
    with pytest.raises(ValueError, match=r"other settings \(sampler differ"):
        reconstruct.open_run(tmp_path, {"seed": 0, "sampler": {"num_steps": 10}})
    # a folder of an older run.json format is refused as such, whatever else differs
    reconstruct.open_run(tmp_path / "old", {"version": 1, "seed": 0})
    with pytest.raises(ValueError, match=rf"another version of mdlib reconstruct .*format version 1, this one "
                                         rf"writes {reconstruct.FORMAT_VERSION}\): use another --out"):
        reconstruct.open_run(tmp_path / "old", {"version": reconstruct.FORMAT_VERSION, "seed": 0})
    # the published mode's lr: the preset's (lessons 05-06: 0.05 for the mini path's 10 iterations), or --lr
    import argparse

    parser = argparse.ArgumentParser()
    reconstruct.add_arguments(parser)
    for preset, extra, lr, iterations in (("mini", [], 0.05, 10), ("nsd", [], 0.01, 300),
                                          ("mini", ["--lr", "0.2"], 0.2, 10)):
        job = reconstruct.job_from_args(parser.parse_args(["--subject", "1", "--stage", "2", "--preset", preset,
                                                           *extra]))
        assert (job.config.published.lr, job.config.published.iterations) == (lr, iterations), preset
    assert method.configure("mdlib", "mini").published.lr == 0.05
    # --variant sets every row; single options override one row and say so
    job = reconstruct.job_from_args(parser.parse_args(["--subject", "1", "--stage", "2", "--preset", "mini",
                                                       "--variant", "released", "--fresh-noise", "no"]))
    assert job.config == method.configure("released", "mini", fresh_noise=False)
    assert dict(job.config.changes)["fresh_noise"] == "override" and job.config.decoder == "fastl2lir"
    assert cli.main(["reconstruct", "--subject", "1", "--stage", "1", "--mode", "fast"]) == 1
    assert "--mode is for stage 2" in capsys.readouterr().err


@pytest.mark.parametrize("option, value, message", [
    ("--lr", "-1", "need lr > 0"), ("--lr", "nan", "need lr > 0"),
    ("--guidance-scale", "nan", "guidance_scale must be a finite number"),
    ("--device", "cuda", "no CUDA GPU is visible"),
])
def test_bad_settings_stop_before_any_work(mini_root, tmp_path, capsys, option, value, message):
    """A setting that cannot work is refused at once, with exit status 1 and the reason, before any model is
    loaded or any image sampled; nothing is written."""
    import torch

    if option == "--device" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = tmp_path / "out"
    assert cli.main(_args(mini_root, out, "--stage", "2", option, value)) == 1
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_a_second_process_on_the_same_shard_stops_with_the_fix(mini_root, tmp_path, capsys):
    """Two processes started without RANK on one --out: the second finds the shard's lock held and stops."""
    import fcntl

    job = reconstruct.Job(subject=1, stage=1, out=tmp_path, data_root=mini_root, preset="mini", images="0..2",
                          config=method.configure("mdlib", "mini", **_short_sampler().as_dict()))
    sd, _ = reconstruct.load_models(job, "cpu")
    decoded = reconstruct.decode(job, sd, None, device="cpu", progress=False)
    lock = job.folder / ".locks" / "shard0of1.lock"
    lock.parent.mkdir(parents=True)
    with open(lock, "a+") as held:                                # the first process, still running
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(reconstruct.BusyError, match="already reconstructing shard 0 of 1.*RANK/WORLD_SIZE"):
            reconstruct.run(job, Shard(), sd=sd, decoded=decoded, progress=False, log=lambda line: None)
    assert not [p for p in job.folder.iterdir() if p.name.isdigit()]   # it did no image
    out = reconstruct.run(job, Shard(), sd=sd, decoded=decoded, progress=False, log=lambda line: None)
    assert out["shard"]["done_now"] == 2                          # once the first is gone, it runs


def test_exit_status_is_1_when_every_image_tried_failed(mini_root, tmp_path, capsys, monkeypatch):
    from mdlib import stage1

    def broken(*args, **kwargs):
        raise RuntimeError("a setting that breaks every image")

    monkeypatch.setattr(stage1, "img2img", broken)
    assert cli.main(_args(mini_root, tmp_path, "--stage", "1", "--images", "0..2")) == 1
    assert "all 2 images tried failed" in capsys.readouterr().err

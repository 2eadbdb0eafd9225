"""Shared test set-up: offline, headless, seeded.

Tests never touch the network: HF_HUB_OFFLINE is set before anything imports huggingface_hub, and figures
use the Agg backend and are closed after each test (as nilearn's own tests do).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
if "OMP_WAIT_POLICY" not in os.environ:               # before torch is imported: see mdlib/__init__.py
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


#: Test files that run in one pytest-xdist worker, in this order: the lessons (later ones read what earlier ones
#: cached), then the browser tests, which build the course site from the lessons that worker executed.
LESSON_FILES = ("tests/test_notebooks.py", "tests/test_browser.py")


def pytest_collection_modifyitems(config, items):
    """Browser tests run last: they build the course site from the lessons the notebook tests executed."""
    items.sort(key=lambda item: item.get_closest_marker("browser") is not None)   # a stable sort


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`make test`'s two workers (pytest-xdist): every test of :data:`LESSON_FILES` goes to one worker, every
    other test is handed out one at a time to whichever worker is free. (xdist's own ``xdist_group`` mark does
    this by renaming the tests, which pytest 9 no longer allows.)"""
    from xdist.scheduler import LoadScopeScheduling

    class LessonsTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "lessons" if nodeid.split("::", 1)[0] in LESSON_FILES else nodeid

    return LessonsTogether(config, log)


@pytest.fixture(scope="session")
def executed_lessons():
    """Where this session's lesson runs left their work: tests/test_notebooks.py sets ``folder`` (the
    executed lessons) and ``data_root`` (their mini-NSD); tests/test_browser.py reads them instead of running
    the lessons again."""
    return {}


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    import sys

    if "matplotlib.pyplot" in sys.modules:
        sys.modules["matplotlib.pyplot"].close("all")


@pytest.fixture(scope="session", autouse=True)
def _mdlib_home(tmp_path_factory):
    """Tests never write into the user's ~/mdlib-data: the home folder (tiny models, runs) is a temporary one.

    Set in os.environ, so the lesson kernels that papermill starts inherit it too.
    """
    previous = os.environ.get("MDLIB_DATA")
    os.environ["MDLIB_DATA"] = str(tmp_path_factory.mktemp("mdlib-home"))
    yield
    if previous is None:
        os.environ.pop("MDLIB_DATA", None)
    else:
        os.environ["MDLIB_DATA"] = previous


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of tiny-model tests: they gain nothing from intra-op threads, and on a
    busy 2-core machine spare threads only contend. Restored after the module."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def mini_nsd(tmp_path_factory):
    """A factory: ``mini_nsd(**params)`` -> the root of a mini-NSD written by ``write_mini_nsd(root, **params)``.

    Each distinct parameter set is written once per session; every call returns a copy of its own (a new
    ``<tmp>/mini*/mini-nsd`` folder), so what a test module adds there (caches under ``mdlib_cache/``, fetched
    files) never reaches another module's data. ``progress`` defaults to False.
    """
    import shutil

    from mdlib.synth.write import write_mini_nsd

    written = {}

    def make(**params):
        params.setdefault("progress", False)
        key = repr(sorted(params.items()))
        if key not in written:
            written[key] = tmp_path_factory.mktemp("mini-nsd-source") / "mini-nsd"
            write_mini_nsd(written[key], **params)
        root = tmp_path_factory.mktemp("mini") / "mini-nsd"
        shutil.copytree(written[key], root)
        return root

    return make


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """The tiny offline Stable Diffusion + CLIP set, built (seeded) once per test module."""
    from mdlib import models

    return models.build_tiny_models(tmp_path_factory.mktemp("tiny") / "tiny-v1")


@pytest.fixture(scope="module")
def sd(tiny_dir):
    """The tiny Stable Diffusion set on the CPU, float32."""
    from mdlib import models

    return models.load_sd(tiny_dir, device="cpu")


@pytest.fixture(scope="module")
def clip(tiny_dir):
    """The tiny CLIP vision model on the CPU, float32."""
    from mdlib import models

    return models.load_clip_vision(tiny_dir, device="cpu")


@pytest.fixture
def clip_stand_in(tiny_dir, monkeypatch, tmp_path):
    """A manifest CLIP (``clip_vision`` or ``clip_eval``) whose hub repository is an empty stand-in cache.

    ``clip_stand_in(role)`` registers the tiny CLIP's architecture under the role's open_clip name, sets
    HF_HUB_OFFLINE and returns ``(cache, snapshot folder)``: copy weight files into the folder to "download"
    them. No network is involved.
    """
    import copy
    import json

    import open_clip

    from mdlib import models

    model_cfg = json.loads((tiny_dir / "clip" / "open_clip_config.json").read_text())["model_cfg"]
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "mdlib-test-clip", model_cfg)
    manifest = models.model_manifest()
    monkeypatch.setattr(models, "model_manifest", lambda path=None: copy.deepcopy(manifest))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def make(role: str):
        manifest[role]["open_clip_name"] = "mdlib-test-clip"
        cache, commit = tmp_path / f"hub-{role}", "1" * 40
        repo = cache / ("models--" + manifest[role]["id"].replace("/", "--"))
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(commit)
        return cache, repo / "snapshots" / commit

    return make

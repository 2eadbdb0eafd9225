"""mdlib.progress: one switch for every bar (the caller's ``progress`` and MDLIB_PROGRESS), plain tqdm only, and
the lesson kernels that ``mdlib course`` starts get MDLIB_PROGRESS=0."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tqdm

from mdlib import course, progress

MDLIB = Path(__file__).resolve().parent.parent / "mdlib"


@pytest.fixture
def no_switch(monkeypatch):
    monkeypatch.delenv(progress.ENV_SWITCH, raising=False)


def test_on_by_default_off_when_asked(no_switch):
    on = progress.bar(total=3)
    off = progress.bar(total=3, progress=False)
    assert type(on) is tqdm.std.tqdm and not on.disable   # the plain bar, never tqdm.notebook
    assert off.disable
    assert progress.bar(total=3, disable=True).disable    # tqdm's own switch still works
    on.close()
    off.close()


@pytest.mark.parametrize("value", ["0", "false", "OFF", " no ", "False"])
def test_the_environment_variable_turns_every_bar_off(monkeypatch, value):
    monkeypatch.setenv(progress.ENV_SWITCH, value)
    assert progress.bar(total=3).disable and not progress.enabled()
    assert progress.bar(range(4)).disable


@pytest.mark.parametrize("value", ["1", "", "true", "yes"])
def test_other_values_leave_bars_on(monkeypatch, value):
    monkeypatch.setenv(progress.ENV_SWITCH, value)
    bar = progress.bar(total=3)
    assert not bar.disable and progress.enabled() and not progress.enabled(False)
    bar.close()


def test_a_disabled_bar_still_iterates_and_updates(monkeypatch):
    monkeypatch.setenv(progress.ENV_SWITCH, "0")
    assert list(progress.bar(range(3), desc="x")) == [0, 1, 2]
    with progress.bar(total=5) as bar:
        bar.update(2)
        bar.set_postfix_str("fine")


def test_every_mdlib_bar_goes_through_the_switch():
    """tqdm is imported only by mdlib.progress (and by mdlib.evalnets until its bar is routed here)."""
    allowed = {"progress.py"}
    importers = {p.relative_to(MDLIB).as_posix() for p in MDLIB.rglob("*.py")
                 if re.search(r"^\s*(from tqdm|import tqdm)", p.read_text(), re.M)}
    assert importers <= allowed, importers - allowed


def test_course_kernels_run_without_progress_bars(monkeypatch):
    base = {"PATH": "/usr/bin", progress.ENV_SWITCH: "1", "HF_HUB_OFFLINE": "0", "KEEP": "me"}
    env = course.kernel_environ(base)
    assert env[progress.ENV_SWITCH] == "0"                     # forced, whatever the caller had
    assert env["PATH"] == str(Path(sys.executable).parent) + os.pathsep + "/usr/bin"
    assert env["HF_HUB_OFFLINE"] == "0" and env["KEEP"] == "me"  # the caller's choices otherwise kept
    assert env["MPLBACKEND"] == "module://matplotlib_inline.backend_inline"
    assert base[progress.ENV_SWITCH] == "1" and len(base) == 4  # the caller's mapping is not changed
    defaults = course.kernel_environ({})
    assert defaults["HF_HUB_OFFLINE"] == "1" and defaults["GOMP_SPINCOUNT"] == "10000"
    assert "GOMP_SPINCOUNT" not in course.kernel_environ({"OMP_WAIT_POLICY": "PASSIVE"})   # the user's policy wins
    assert defaults[progress.ENV_SWITCH] == "0"

    monkeypatch.setenv(progress.ENV_SWITCH, "1")
    before = dict(os.environ)
    with course._kernel_environment():
        assert os.environ[progress.ENV_SWITCH] == "0" and not progress.enabled()
    assert dict(os.environ) == before                       # restored afterwards


def test_iprogress_warning_is_silenced_by_importing_mdlib():
    """In a fresh interpreter, as in a lesson's kernel (pytest restores the warning filters after collecting)."""
    code = ("import mdlib, warnings, tqdm; "
            "warnings.warn('IProgress not found. Please update jupyter and ipywidgets.', tqdm.TqdmWarning); "
            "warnings.warn('another tqdm warning', tqdm.TqdmWarning)")
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=MDLIB.parent).stderr
    assert "another tqdm warning" in err and "IProgress" not in err

"""Run the course: every lesson notebook in order with papermill, and one summary of their numbers.

``mdlib course --preset mini`` (what ``make demo`` calls) writes mini-NSD if it is missing, executes
``notebooks/NN_*.ipynb`` in order into an output folder, and gathers each lesson's recorded numbers
(``mdlib.record``) into ``summary.json``, and every number, one per line, into ``summary.csv``. A failing lesson
stops the run with the notebook, the cell and the error, and the executed notebook (with the traceback in it)
is kept for reading. How to run it: README.md, "Two commands" (the mini path) and docs/fetch.md (the real one).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from . import paths, presets
from .progress import ENV_SWITCH as PROGRESS_SWITCH
from .record import load_results, write_json_atomic, write_numbers_csv

#: papermill parameters every lesson declares in its ``parameters`` cell.
COMMON_PARAMETERS = ("PRESET", "DATA_ROOT", "RESULTS_DIR")


class CourseError(RuntimeError):
    """A lesson failed; the message names the notebook, the cell and the executed copy to read."""


def notebooks_dir() -> Path:
    """The ``notebooks/`` folder of the course (beside the ``mdlib`` package in a source checkout)."""
    env = os.environ.get("MDLIB_NOTEBOOKS", "").strip()
    here = Path(env) if env else Path(__file__).resolve().parent.parent / "notebooks"
    if not here.is_dir():
        raise FileNotFoundError(
            f"course notebooks not found at {here}: run from a checkout of the course repository, or set "
            "MDLIB_NOTEBOOKS to its notebooks/ folder")
    return here


def lesson_notebooks(folder: str | os.PathLike | None = None, only: Iterable[str] | None = None) -> list[Path]:
    """The lessons in reading order (``NN_name.ipynb``); ``only`` keeps those whose name starts with an item."""
    folder = Path(folder) if folder else notebooks_dir()
    found = sorted(p for p in folder.glob("[0-9][0-9]_*.ipynb"))
    if only:
        keep = tuple(str(o) for o in only)
        found = [p for p in found if p.name.startswith(keep)]
    return found


def kernel_environ(base: Mapping[str, str]) -> dict[str, str]:
    """The environment the lesson kernels start with: ``base`` (the caller's environment) plus

    - PATH starting with this interpreter's folder: the 'python3' kernel spec starts "python" from PATH, and
      it must be the one with this mdlib installed even when the virtual environment is not activated.
    - Matplotlib's inline backend, so the executed notebooks keep their figures (it renders headless; a
      plain MPLBACKEND=Agg inherited from a test run would leave them empty).
    - HF_HUB_OFFLINE=1 unless set: the mini path never reaches a model hub.
    - GOMP_SPINCOUNT=10000 unless it or OMP_WAIT_POLICY is set: see ``mdlib/__init__.py``.
    - MDLIB_PROGRESS=0: no progress bars (:mod:`mdlib.progress`), whose redrawn lines would fill the executed
      lessons' outputs.
    """
    env = dict(base)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    env.setdefault("HF_HUB_OFFLINE", "1")
    if "OMP_WAIT_POLICY" not in env:
        env.setdefault("GOMP_SPINCOUNT", "10000")
    env[PROGRESS_SWITCH] = "0"
    return env


@contextlib.contextmanager
def _kernel_environment():
    """:func:`kernel_environ` as this process's environment (which the kernels inherit), restored afterwards."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(kernel_environ(saved))
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


#: Arguments for the lessons' kernels: the kernel application logs errors only, so a terminal running the course
#: does not show ipykernel's warning that a local kernel talks over TCP without encryption (papermill starts
#: every kernel on 127.0.0.1); what the lessons print goes into the executed notebooks as before.
KERNEL_ARGUMENTS = ["--IPKernelApp.log_level=ERROR"]


def run_notebook(nb: Path, out_dir: Path, parameters: Mapping[str, Any], kernel: str = "python3",
                 timeout: int | None = 1800, progress: bool = True) -> Path:
    """Execute one lesson with papermill, passing only the parameters it declares."""
    import papermill as pm

    declared = pm.inspect_notebook(str(nb))
    params = {k: v for k, v in parameters.items() if k in declared}
    out = out_dir / nb.name
    try:
        with _kernel_environment():
            pm.execute_notebook(str(nb), str(out), parameters=params, kernel_name=kernel, cwd=str(nb.parent),
                                execution_timeout=timeout, progress_bar=progress, log_output=False,
                                extra_arguments=KERNEL_ARGUMENTS)
    except pm.PapermillExecutionError as err:
        raise CourseError(
            f"lesson {nb.name} failed in cell {err.exec_count} ({err.ename}: {err.evalue}).\n"
            f"  The executed notebook with the traceback: {out}") from None
    return out


def run_course(preset: str = "mini", data_root: str | os.PathLike | None = None,
               out: str | os.PathLike | None = None, parameters: Mapping[str, Any] | None = None,
               only: Iterable[str] | None = None, kernel: str = "python3", timeout: int | None = 1800,
               progress: bool = True) -> dict:
    """Run the lessons in order; returns (and writes to ``<out>/summary.json``) every recorded number.

    preset: ``mini`` (mini-NSD, tiny offline models, CPU) or ``nsd`` (the real NSD under the data root).
    parameters: extra papermill parameters (e.g. ``{"SUBJECT": 2}``), given to each lesson that declares them.
    """
    if preset not in presets.NAMES:
        raise ValueError(f"preset must be one of {presets.NAMES}, got {preset!r}")
    root = paths.data_root(data_root, preset).resolve()
    if preset == "mini":
        from .synth.write import ensure_mini_nsd

        ensure_mini_nsd(root, progress=progress)
    out_dir = Path(out).resolve() if out else paths.runs_dir(f"course-{preset}").resolve()
    results_dir = out_dir / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    params = {"PRESET": preset, "DATA_ROOT": str(root), "RESULTS_DIR": str(results_dir), **(parameters or {})}
    lessons = lesson_notebooks(only=only)
    if not lessons:
        raise FileNotFoundError(f"no lesson notebooks matched {list(only or [])} in {notebooks_dir()}")
    timings = {}
    for nb in lessons:
        print(f"[course] {nb.name} ...", flush=True)
        t0 = time.perf_counter()
        run_notebook(nb, out_dir, params, kernel=kernel, timeout=timeout, progress=progress)
        timings[nb.stem] = round(time.perf_counter() - t0, 1)
        print(f"[course] {nb.name} done in {timings[nb.stem]:.0f} s", flush=True)
    summary = {"preset": preset, "data_root": str(root), "parameters": params, "seconds": timings,
               "results": load_results(results_dir)}
    write_json_atomic(out_dir / "summary.json", summary)
    write_numbers_csv(out_dir / "summary.csv", summary["results"])
    print(f"[course] executed notebooks: {out_dir}\n[course] recorded numbers: {out_dir / 'summary.json'} "
          f"(flat: {out_dir / 'summary.csv'})")
    return summary

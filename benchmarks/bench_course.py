"""Where the course's time goes: per-lesson wall time and each lesson's slowest cells (mini path).

Prints markdown tables (paste them into benchmarks/README.md). Not a test: the figures depend on the machine
and on what else runs on it, which is why the machine and its load are printed with them.

    python benchmarks/bench_course.py                       # the course on a fresh mini-NSD: about 10 min (2 cores)
    python benchmarks/bench_course.py --root /tmp/bench     # the same, mini-NSD under /tmp/bench (written if missing)
    python benchmarks/bench_course.py --from ~/.mdlib/runs/course-mini   # read notebooks already executed

Papermill records each executed cell's duration (``cell.metadata.papermill.duration``, seconds) and the whole
notebook's (``metadata.papermill.duration``); this script reads them back from the executed notebooks that
:func:`mdlib.course.run_course` writes. Each slow cell is named by the first line of the markdown cell just
before it (what the lesson says the cell does), or else by its first code line. Cell indices count every
cell of the executed notebook, papermill's injected-parameters cell included (one more than in notebooks/
from the parameters cell on).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import tempfile
import time
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--from", dest="from_dir", type=Path, default=None,
                    help="a folder of executed lessons (NN_*.ipynb) to read instead of running the course")
    ap.add_argument("--root", type=Path, default=None,
                    help="mini-NSD data root (written if missing); default: a fresh temporary folder")
    ap.add_argument("--out", type=Path, default=None,
                    help="folder for the executed lessons; default: <root>/course-run")
    ap.add_argument("--top", type=int, default=5, help="slowest cells shown per lesson (default 5)")
    ap.add_argument("--overall", type=int, default=10, help="slowest cells shown across the course (default 10)")
    return ap.parse_args(argv)


def machine_line() -> str:
    """CPU model and count, Python and torch versions, torch's intra-op threads, and the thread variables set."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    threads = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
               if k in os.environ}
    return (f"{cpu}, {os.cpu_count()} cores; Python {platform.python_version()}, torch {torch.__version__}, "
            f"torch threads {torch.get_num_threads()} (interop {torch.get_num_interop_threads()}); "
            f"thread variables: {threads or 'none set'}")


def load_line() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f} (1 / 5 / 15 min)"


def run_lessons(root: Path | None, out: Path | None) -> tuple[Path, float]:
    """Write mini-NSD under ``root`` if missing and run every lesson; returns (executed folder, set-up seconds)."""
    from mdlib.course import run_course
    from mdlib.synth.write import ensure_mini_nsd

    root = (root or Path(tempfile.mkdtemp(prefix="bench_course_"))).resolve()
    out = (out or root / "course-run").resolve()
    t0 = time.perf_counter()
    ensure_mini_nsd(root, progress=False)  # timed apart from the lessons: it is set-up, not a lesson
    setup = time.perf_counter() - t0
    run_course("mini", data_root=root, out=out, progress=False)
    return out, setup


def first_line(source: str) -> str:
    """The first non-empty line of a cell, without markdown heading marks, cut to 90 characters."""
    for line in source.splitlines():
        line = line.strip().lstrip("#").strip()
        if line:
            return line if len(line) <= 90 else line[:87] + "..."
    return ""


def cell_times(path: Path) -> tuple[float, list[dict]]:
    """A lesson's wall time (s) and one record per code cell: index, seconds, label."""
    nb = json.loads(path.read_text())
    cells, rows, last_markdown = nb["cells"], [], ""
    for i, cell in enumerate(cells):
        source = "".join(cell.get("source", ""))
        if cell["cell_type"] == "markdown":
            last_markdown = first_line(source)
            continue
        if cell["cell_type"] != "code":
            continue
        seconds = (cell.get("metadata", {}).get("papermill", {}) or {}).get("duration") or 0.0
        label = f"(md) {last_markdown}" if last_markdown else f"(code) {first_line(source)}"
        rows.append({"lesson": path.stem, "cell": i, "seconds": float(seconds), "label": label})
        last_markdown = ""  # a markdown line names only the code cell right after it
    total = (nb.get("metadata", {}).get("papermill", {}) or {}).get("duration")
    return float(total if total is not None else sum(r["seconds"] for r in rows)), rows


def print_tables(folder: Path, top: int, overall: int) -> None:
    lessons = sorted(folder.glob("[0-9][0-9]_*.ipynb"))
    if not lessons:
        raise SystemExit(f"no executed lessons (NN_*.ipynb) in {folder}: pass the folder run_course wrote")
    timed = {p.stem: cell_times(p) for p in lessons}
    course = sum(total for total, _ in timed.values())

    print("\n| lesson | wall s | share of course | cells s | code cells |\n|---|---|---|---|---|")
    for name, (total, rows) in timed.items():
        cells = sum(r["seconds"] for r in rows)
        print(f"| {name} | {total:.0f} | {100 * total / course:.0f}% | {cells:.0f} | {len(rows)} |")
    print(f"| **all** | **{course:.0f}** | 100% | | |")

    for name, (total, rows) in timed.items():
        print(f"\n**{name}** ({total:.0f} s): slowest cells\n\n| cell | s | share of lesson | what it does |"
              "\n|---|---|---|---|")
        for r in sorted(rows, key=lambda r: -r["seconds"])[:top]:
            print(f"| {r['cell']} | {r['seconds']:.1f} | {100 * r['seconds'] / total:.0f}% | {r['label']} |")

    every = sorted((r for _, rows in timed.values() for r in rows), key=lambda r: -r["seconds"])[:overall]
    shown = sum(r["seconds"] for r in every)
    print(f"\n**The {overall} slowest cells of the course** ({shown:.0f} s, {100 * shown / course:.0f}% of it)\n"
          "\n| lesson | cell | s | share of course | what it does |\n|---|---|---|---|---|")
    for r in every:
        print(f"| {r['lesson']} | {r['cell']} | {r['seconds']:.1f} | {100 * r['seconds'] / course:.1f}% | "
              f"{r['label']} |")


def main(argv=None) -> None:
    args = parse_args(argv)
    print(f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"machine: {machine_line()}")
    print(f"load before: {load_line()}")
    if args.from_dir:
        folder = args.from_dir
    else:
        t0 = time.perf_counter()
        folder, setup = run_lessons(args.root, args.out)
        print(f"mini-NSD set-up {setup:.0f} s; set-up + course {time.perf_counter() - t0:.0f} s wall")
        print(f"load after: {load_line()}")
    print(f"executed lessons: {folder}")
    print_tables(folder, args.top, args.overall)


if __name__ == "__main__":
    main()

"""Build the course as a static HTML site: the lessons as `make demo` executed them, then the docs/ pages.

    python book/build.py [--executed DIR] [--out DIR]   build (default: `make demo`'s lessons into _build/book)
    python book/build.py --check [--executed DIR]       exit 0 if the executed lessons are there and current

The site is Sphinx with MyST-NB (book/conf.py; why this builder: docs/book.md). Nothing is executed here: the
lessons' outputs are those of the executed copies (``mdlib course --preset mini`` writes them to
``$MDLIB_DATA/runs/course-mini/``). An executed copy is used only if it runs the code of the lesson as committed
now (same cells, same code); if only the prose (markdown cells) changed since, the committed prose is used with
the executed outputs. `make book` runs `make demo` first when ``--check`` fails.

The sources are assembled in ``<out>-src/`` with the repository's relative layout (``notebooks/``, ``docs/``,
``benchmarks/``, ``examples/``), so that the links between pages work as they do on GitHub.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
BOOK = ROOT / "book"
DEFAULT_OUT = ROOT / "_build" / "book"

#: README's section whose table lists the documentation pages in reading order.
DOCS_SECTION = "## Documentation"
#: Files the pages link to that are not pages: copied so their links resolve (Sphinx offers them as downloads).
LINKED_FILES = ("docs/*.png", "examples/*", "benchmarks/*.py", "data_manifest/*", "mdlib/**/*.py")
#: papermill's tag on the cell it adds with the run's parameters (machine-specific paths): not shown in the book.
INJECTED_TAG = "injected-parameters"


class BookError(RuntimeError):
    """The book cannot be built as asked; the message says why and what to run."""


@dataclass(frozen=True)
class Freshness:
    """How an executed lesson relates to the committed one: ``current``, ``prose`` (only markdown cells
    differ: the committed prose can be used), ``stale`` (code or cells differ) or ``missing``."""

    state: str
    reason: str = ""


def executed_default() -> Path:
    """Where `make demo` (``mdlib course --preset mini``) writes the executed lessons."""
    from mdlib import paths

    return paths.home() / "runs" / "course-mini"


def committed_lessons() -> list[Path]:
    """The lessons as committed, in reading order (``notebooks/NN_*.ipynb``)."""
    return sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def _cells_without_injected(nb) -> list:
    return [c for c in nb.cells if INJECTED_TAG not in c.get("metadata", {}).get("tags", [])]


def freshness(committed: Path, executed: Path) -> Freshness:
    """Compare an executed copy with the committed lesson, cell by cell (papermill's injected cell aside)."""
    if not executed.is_file():
        return Freshness("missing", f"{executed} does not exist")
    ours = nbformat.read(committed, as_version=4).cells
    theirs = _cells_without_injected(nbformat.read(executed, as_version=4))
    if [c.cell_type for c in ours] != [c.cell_type for c in theirs]:
        return Freshness("stale", f"{executed.name}: cells were added, removed or moved since it was executed")
    for k, (a, b) in enumerate(zip(ours, theirs)):
        if a.cell_type == "code" and a.source != b.source:
            return Freshness("stale", f"{executed.name}: the code of cell {k} changed since it was executed")
    if any(a.source != b.source for a, b in zip(ours, theirs)):
        return Freshness("prose", f"{executed.name}: only prose changed since it was executed")
    return Freshness("current")


def check_executed(executed: Path, stale_ok: bool = False) -> list[str]:
    """Why the executed lessons in ``executed`` cannot be used (an empty list: they can). ``stale_ok``: only
    missing lessons count (a developer's preview of older outputs)."""
    lessons = committed_lessons()
    if not lessons:
        return [f"no lessons found in {ROOT / 'notebooks'}"]
    if not any((executed / nb.name).is_file() for nb in lessons):
        return [f"no executed lessons in {executed}"]
    bad = ("missing",) if stale_ok else ("missing", "stale")
    return [f.reason for f in (freshness(nb, executed / nb.name) for nb in lessons) if f.state in bad]


def lesson_for_book(committed: Path, executed: Path):
    """The executed lesson without papermill's injected cell; with the committed prose if only that changed."""
    nb = nbformat.read(executed, as_version=4)
    cells = _cells_without_injected(nb)
    if freshness(committed, executed).state == "prose":
        for ours, cell in zip(nbformat.read(committed, as_version=4).cells, cells):
            cell.source = ours.source
    nb.cells = cells
    return nb


def doc_pages() -> list[str]:
    """The pages after the lessons, as paths relative to the repository: those README's documentation table
    links (docs/*.md, benchmarks/README.md), in its order, then any docs/*.md page it does not list."""
    readme = (ROOT / "README.md").read_text()
    start = readme.find(f"\n{DOCS_SECTION}\n")
    end = readme.find("\n## ", start + 1) if start >= 0 else -1
    section = readme[start:end if end >= 0 else None] if start >= 0 else ""
    listed = []
    for target in re.findall(r"\]\(((?:docs/|benchmarks/)[^)#\s]+\.md)[)#]", section):
        if target not in listed and (ROOT / target).is_file():
            listed.append(target)
    others = sorted(p for p in (f"docs/{q.name}" for q in (ROOT / "docs").glob("*.md")) if p not in listed)
    return listed + others


def _toctree(caption: str, entries: list[str]) -> str:
    lines = "\n".join(str(Path(e).with_suffix("")) for e in entries)
    return f"\n```{{toctree}}\n:caption: {caption}\n:hidden:\n:maxdepth: 1\n\n{lines}\n```\n"


def assemble(executed: Path, src: Path, stale_ok: bool = False) -> list[str]:
    """Write the book's sources into ``src`` (emptied first); returns the lessons' names in order."""
    problems = check_executed(executed, stale_ok)
    if problems:
        raise BookError("the executed lessons cannot be used:\n  " + "\n  ".join(problems)
                        + f"\n  Run `make demo` (it writes them to {executed_default()}) or pass --executed DIR.")
    if src.exists():
        shutil.rmtree(src)
    (src / "notebooks").mkdir(parents=True)
    names = []
    for nb in committed_lessons():
        nbformat.write(lesson_for_book(nb, executed / nb.name), src / "notebooks" / nb.name)
        names.append(f"notebooks/{nb.name}")
    pages = doc_pages()
    for rel in pages:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, src / rel)
    for pattern in LINKED_FILES:
        for path in (p for p in ROOT.glob(pattern) if p.is_file() and "__pycache__" not in p.parts):
            (src / path.relative_to(ROOT)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, src / path.relative_to(ROOT))
    # The landing page is the README, with the navigation (hidden tables of contents) after it.
    index = (ROOT / "README.md").read_text() + _toctree("Lessons", names) + _toctree("Documentation", pages)
    (src / "index.md").write_text(index)
    return names


def build(executed: Path, out: Path, quiet: bool = True, stale_ok: bool = False) -> Path:
    """Assemble the sources in ``<out>-src`` and run Sphinx into ``out``; returns ``out/index.html``."""
    src = out.parent / f"{out.name}-src"
    assemble(executed, src, stale_ok)
    cmd = [sys.executable, "-m", "sphinx", "-b", "html", "-c", str(BOOK), "-d", str(src / ".doctrees"),
           "--fail-on-warning", "--keep-going", *(["-q"] if quiet else []), str(src), str(out)]
    done = subprocess.run(cmd, cwd=ROOT)
    if done.returncode != 0:
        raise BookError(f"Sphinx failed (exit {done.returncode}): see the warnings above. Command: {' '.join(cmd)}")
    return out / "index.html"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="book/build.py", description=__doc__.splitlines()[0])
    p.add_argument("--executed", type=Path, default=None,
                   help="folder of the executed lessons (default: `make demo`'s, $MDLIB_DATA/runs/course-mini)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: _build/book)")
    p.add_argument("--check", action="store_true", help="only check that the executed lessons are usable")
    p.add_argument("--verbose", action="store_true", help="Sphinx's progress, not only its warnings")
    p.add_argument("--stale-ok", action="store_true",
                   help="use executed lessons older than the committed code as they are (a preview)")
    args = p.parse_args(argv)
    executed = (args.executed or executed_default()).expanduser().resolve()
    if args.check:
        problems = check_executed(executed)
        for line in problems:
            print(f"[book] {line}", file=sys.stderr)
        if problems:
            print("[book] `make demo` executes them (`make book` runs it first when this check fails)",
                  file=sys.stderr)
        return 1 if problems else 0
    try:
        index = build(executed, args.out.expanduser().resolve(), quiet=not args.verbose, stale_ok=args.stale_ok)
    except BookError as err:
        print(f"[book] {err}", file=sys.stderr)
        return 2
    print(f"[book] the course: {index}  (open it in a browser; it needs no network)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

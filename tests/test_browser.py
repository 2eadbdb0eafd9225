"""The course in a browser: the course site (`make book`) and JupyterLab (`make lab`), in headless Chromium.

- The site is built by book/build.py from the lessons this session's notebook tests executed
  (tests/test_notebooks.py hands them over through conftest's ``executed_lessons``; the browser tests run last).
  Every page opens from disk with no console error and no request off the disk, every image has loaded, every
  figure of every executed lesson is on its page, and the navigation lists the lessons in order, then docs/.
- JupyterLab is started by `make lab` itself (its recipe and environment, plus a free port, a token and
  --no-browser): lesson 01 opens, its cells run on a kernel one after the other up to the first figure, and the
  figure is shown.

Chromium is Debian's (``/usr/bin/chromium``, or ``$MDLIB_CHROMIUM``), driven by the playwright package; no
browser is ever downloaded. Where Chromium, playwright or the book's builder is missing, these tests are skipped
with the reason, unless ``MDLIB_REQUIRE_BROWSER=1`` (set by .ci/run) makes that a failure. Screenshots are kept
under ``$MDLIB_TEST_ARTIFACTS`` (default ``test-artifacts/``). Run alone, the site test executes the lessons
itself (about 10 minutes) unless ``MDLIB_BOOK_LESSONS`` names a folder of executed lessons (`make demo`'s).

The first tests check the builder's rules on small notebooks, without a browser.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(os.environ.get("MDLIB_TEST_ARTIFACTS") or ROOT / "test-artifacts")
#: Chromium's flags on a machine without network: no background requests, no first-run set-up, no GPU.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
BOOK_BUILDER = ("sphinx", "myst_nb", "sphinx_book_theme", "latex2mathml")
#: The tests that start Chromium: slow (the site's build and pages, JupyterLab and a kernel), run last.
def in_chromium(test):
    return pytest.mark.browser(pytest.mark.slow(test))


def _load_builder():
    spec = importlib.util.spec_from_file_location("book_build", ROOT / "book" / "build.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module          # before running it: its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


build = _load_builder()


def _missing(what: str):
    """Skip with the reason, or fail where the browser tests are required (CI)."""
    if os.environ.get("MDLIB_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{what} (MDLIB_REQUIRE_BROWSER=1: the browser tests must run here)")
    pytest.skip(what)


# ---------------------------------------------------------------------------------------------------------------
# The builder's rules, on small notebooks (fast, no browser)


def _lesson(cells) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    for kind, source in cells:
        nb.cells.append(nbformat.v4.new_markdown_cell(source) if kind == "md" else nbformat.v4.new_code_cell(source))
    nb.cells[1].metadata["tags"] = ["parameters"]
    return nb


def _executed(committed: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """What papermill leaves: an injected-parameters cell after the parameters cell, outputs on the code cells."""
    nb = nbformat.from_dict(json.loads(nbformat.writes(committed)))
    injected = nbformat.v4.new_code_cell('DATA_ROOT = "/somewhere/on/the/runner"')
    injected.metadata["tags"] = [build.INJECTED_TAG]
    nb.cells.insert(2, injected)
    for k, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=f"out {k}\n")]
    return nb


LESSON = [("md", "# Lesson 01 · A title\n\nProse."), ("code", 'PRESET = "mini"'), ("md", "More prose."),
          ("code", "x = 1\nprint(x)")]


@pytest.fixture
def lesson_pair(tmp_path):
    committed, executed = tmp_path / "committed.ipynb", tmp_path / "executed.ipynb"
    nbformat.write(_lesson(LESSON), committed)
    nbformat.write(_executed(_lesson(LESSON)), executed)
    return committed, executed


def test_freshness_compares_cells_without_the_injected_one(lesson_pair, tmp_path):
    committed, executed = lesson_pair
    assert build.freshness(committed, executed).state == "current"
    assert build.freshness(committed, tmp_path / "absent.ipynb").state == "missing"

    edits = {
        "prose": [("md", "# Lesson 01 · A better title\n\nProse."), *LESSON[1:]],
        "stale": [*LESSON[:3], ("code", "x = 2\nprint(x)")],                     # code changed
    }
    for expected, cells in edits.items():
        nbformat.write(_lesson(cells), committed)
        assert build.freshness(committed, executed).state == expected, cells
    nbformat.write(_lesson([*LESSON, ("md", "An added cell.")]), committed)
    stale = build.freshness(committed, executed)
    assert stale.state == "stale" and "added" in stale.reason and executed.name in stale.reason


def test_lesson_for_book_keeps_outputs_takes_the_new_prose_and_drops_the_injected_cell(lesson_pair):
    committed, executed = lesson_pair
    new_prose = [("md", "# Lesson 01 · A better title\n\nProse."), *LESSON[1:]]
    nbformat.write(_lesson(new_prose), committed)
    nb = build.lesson_for_book(committed, executed)
    assert [(c.cell_type, c.source) for c in nb.cells] == [("markdown" if k == "md" else "code", s)
                                                           for k, s in new_prose]
    outputs = [c.outputs[0].text for c in nb.cells if c.cell_type == "code"]
    assert outputs == ["out 1\n", "out 4\n"]           # the executed copy's, from its cells 1 and 4
    assert not [c for c in nb.cells if build.INJECTED_TAG in c.metadata.get("tags", [])]


def test_unusable_lessons_are_named_with_the_fix_and_nothing_is_deleted(tmp_path, monkeypatch):
    committed, executed = tmp_path / "notebooks", tmp_path / "executed"
    committed.mkdir(), executed.mkdir()
    for name in ("01_first.ipynb", "02_second.ipynb"):
        nbformat.write(_lesson(LESSON), committed / name)
    nbformat.write(_executed(_lesson(LESSON)), executed / "01_first.ipynb")          # lesson 02 never ran
    monkeypatch.setattr(build, "committed_lessons", lambda: sorted(committed.glob("*.ipynb")))
    src = tmp_path / "book-src"
    (src / "keep").mkdir(parents=True)
    with pytest.raises(build.BookError, match=r"(?s)02_second\.ipynb does not exist.*make demo") as err:
        build.assemble(executed, src)
    assert "01_first" not in str(err.value)
    assert (src / "keep").is_dir()                  # the check comes before anything is written
    assert build.check_executed(executed, stale_ok=True) == [f"{executed / '02_second.ipynb'} does not exist"]


def test_doc_pages_follow_the_readme_table_then_any_other_docs_page():
    pages = build.doc_pages()
    every = {f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")}
    assert every <= set(pages) and len(pages) == len(set(pages)) and "benchmarks/README.md" in pages
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("\n## Documentation\n"):]
    rows = [line for line in table.splitlines() if line.startswith("| [")]
    in_table = [p for p in pages if any(f"]({p})" in row for row in rows)]
    assert pages[:len(in_table)] == in_table                      # the table's pages first ...
    assert in_table == sorted(in_table, key=lambda p: next(k for k, row in enumerate(rows) if f"]({p})" in row))
    assert pages[len(in_table):] == sorted(pages[len(in_table):])  # ... in its order, then the others


# ---------------------------------------------------------------------------------------------------------------
# In Chromium


def _chromium_path() -> str | None:
    path = os.environ.get("MDLIB_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    return path if Path(path).is_file() else None


@pytest.fixture(scope="module")
def chromium():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("the playwright package is not installed (it is in mdlib's [dev] extra)")
    path = _chromium_path()
    if path is None:
        _missing("Chromium not found: install Debian's package (apt-get install chromium) or set MDLIB_CHROMIUM")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def _first_heading(markdown: str) -> str:
    line = next(line for line in markdown.splitlines() if line.startswith("# "))
    return re.sub(r"[`*]", "", line[2:]).strip()


def _lesson_titles() -> list[str]:
    return [_first_heading(next(c.source for c in nbformat.read(nb, as_version=4).cells if c.cell_type == "markdown"))
            for nb in build.committed_lessons()]


def _image_outputs(executed: Path) -> int:
    """Figures in an executed lesson: its outputs with a PNG (what the page must show as images)."""
    nb = nbformat.read(executed, as_version=4)
    return sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)


@pytest.fixture(scope="module")
def book(executed_lessons, tmp_path_factory):
    """The course site built from this session's executed lessons: (site folder, executed lessons folder)."""
    absent = [m for m in BOOK_BUILDER if importlib.util.find_spec(m) is None]
    if absent:
        _missing(f"make book's builder is missing ({', '.join(absent)}): pip install -e '.[book]'")
    folder = executed_lessons.get("folder") or os.environ.get("MDLIB_BOOK_LESSONS")
    if not folder:     # run alone: execute the lessons here, as `make demo` does
        from mdlib import course

        tmp = tmp_path_factory.mktemp("lessons")
        course.run_course("mini", data_root=tmp / "mini-nsd", out=tmp / "course", progress=False)
        executed_lessons.update(folder=tmp / "course", data_root=tmp / "mini-nsd")
        folder = tmp / "course"
    out = tmp_path_factory.mktemp("book") / "book"
    done = subprocess.run([sys.executable, str(ROOT / "book" / "build.py"), "--executed", str(folder),
                           "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return out, Path(folder)


def _site_pages(site: Path) -> list[Path]:
    return sorted(p for p in site.rglob("*.html") if not {"_static", "_images", "_downloads"} & set(p.parts))


@in_chromium
def test_every_page_of_the_book_loads_from_disk_with_its_figures(chromium, book):
    site, executed = book
    pages = _site_pages(site)
    lessons = [site / "notebooks" / f"{nb.stem}.html" for nb in build.committed_lessons()]
    assert set(lessons) <= set(pages) and site / "index.html" in pages
    shots = ARTIFACTS / "book"
    problems = []
    for path in pages:
        name = str(path.relative_to(site))
        context = chromium.new_context(viewport={"width": 1280, "height": 900})   # a first visit: empty storage
        page = context.new_page()
        errors, off_disk = [], []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("requestfailed", lambda r: errors.append(f"failed: {r.url}"))
        page.on("request", lambda r: off_disk.append(r.url) if not r.url.startswith(("file:", "data:", "blob:"))
                else None)
        page.goto(path.as_uri(), wait_until="load")
        images = page.evaluate("Array.from(document.images).map(i => [i.getAttribute('src'), i.complete, "
                               "i.naturalWidth])")
        figures = page.locator(".cell_output img").count()
        if figures:                       # the screenshot shows the page's first figure
            page.locator(".cell_output img").first.evaluate("i => i.scrollIntoView({block: 'center'})")
        (shots / name).parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str((shots / name).with_suffix(".png")))
        context.close()
        problems += [f"{name}: console error {e!r}" for e in errors]
        problems += [f"{name}: request off the disk {u}" for u in off_disk]
        problems += [f"{name}: image not loaded {src}" for src, complete, width in images if not (complete and width)]
        if path in lessons:
            expected = _image_outputs(executed / f"{path.stem}.ipynb")
            if figures != expected or expected == 0:
                problems.append(f"{name}: {figures} figures on the page, {expected} in the executed lesson")
    assert not problems, "\n".join(problems)


@in_chromium
def test_the_book_loads_no_script_style_or_font_from_the_network(book):
    site, _ = book
    remote = re.compile(r"""(?:<(?:script|img|iframe|source|video|audio)\b[^>]*\bsrc|<link\b[^>]*\bhref)\s*=\s*["']?"""
                        r"""(?:https?:)?//""", re.I)
    css_remote = re.compile(r"""(?:url\(\s*["']?|@import\s+["']?)(?:https?:)?//""", re.I)
    found = []
    for path in _site_pages(site):
        text = path.read_text()
        found += [f"{path.name}: {m.group(0)}" for m in remote.finditer(text)]
        found += [f"{path.name}: {m.group(0)}" for m in css_remote.finditer(text)]
        if re.search(r"<script[^>]*mathjax", text, re.I):
            found.append(f"{path.name}: loads MathJax")
    for path in site.rglob("*.css"):
        found += [f"{path.relative_to(site)}: {m.group(0)}" for m in css_remote.finditer(path.read_text())]
    assert not found, "\n".join(found)
    # The lessons' math is there, as MathML (lesson 01 writes the design's indexing as a formula).
    assert "<math" in (site / "notebooks" / f"{build.committed_lessons()[0].stem}.html").read_text()


def _navigation(page) -> list[tuple[str, str, str]]:
    """The left navigation: (kind, text, href) for each caption and link, in order."""
    return page.evaluate("""() => Array.from(document.querySelectorAll(
        'nav.bd-docs-nav p.caption, nav.bd-docs-nav li.toctree-l1 > a')).map(e =>
        [e.tagName === 'A' ? 'link' : 'caption', e.textContent.replace(/\\s+/g, ' ').trim(),
         e.getAttribute('href') || ''])""")


@in_chromium
def test_the_navigation_lists_the_lessons_in_order_then_the_docs(chromium, book):
    site, _ = book
    lessons = build.committed_lessons()
    pages = build.doc_pages()
    expected = ([("caption", "Lessons")] + [("link", t) for t in _lesson_titles()]
                + [("caption", "Documentation")] + [("link", _first_heading((ROOT / p).read_text())) for p in pages])
    page = chromium.new_page()
    page.goto((site / "index.html").as_uri())
    nav = _navigation(page)
    start = next(k for k, (kind, text, _) in enumerate(nav) if kind == "caption")   # after the home page's link
    assert [(kind, text) for kind, text, _ in nav[start:]] == expected
    hrefs = [href for kind, _, href in nav[start:] if kind == "link"]
    assert hrefs == [f"notebooks/{nb.stem}.html" for nb in lessons] + [str(Path(p).with_suffix(".html"))
                                                                       for p in pages]
    # On a lesson's page, that lesson is the one marked current.
    page.goto((site / "notebooks" / f"{lessons[1].stem}.html").as_uri())
    current = page.locator("nav.bd-docs-nav li.toctree-l1.current > a").all_inner_texts()
    assert [" ".join(t.split()) for t in current] == [_lesson_titles()[1]]
    page.close()


# ---------------------------------------------------------------------------------------------------------------
# JupyterLab, as `make lab` starts it


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.load(r)


def _wait_for(condition, timeout: float, what: str, server=None):
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = condition()
            if value:
                return value
        except OSError:
            pass
        if server is not None and server.poll() is not None:
            raise AssertionError(f"`make lab` exited ({server.returncode}) while waiting for {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.5)


@pytest.fixture
def lab(tmp_path, executed_lessons):
    """`make lab` on a copy of notebooks/ (nothing is saved into the repository): (base URL, token, log path).

    Its own MDLIB_DATA and Jupyter folders; mini-NSD is the notebook tests' (else lesson 01 writes one)."""
    work, home = tmp_path / "work", tmp_path / "home"
    shutil.copytree(ROOT / "notebooks", work / "notebooks", ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    home.mkdir()
    if executed_lessons.get("data_root"):
        (home / "mini-nsd").symlink_to(executed_lessons["data_root"])
    port, token = _free_port(), secrets.token_hex(16)
    args = f"--no-browser --ip=127.0.0.1 --port={port} --IdentityProvider.token={token}"
    if os.geteuid() == 0:            # CI runs as root, which Jupyter refuses without this
        args += " --allow-root"
    venv = Path(sys.prefix)
    # The Makefile's own recipe and environment; -o: never reinstall the environment from a test.
    cmd = ["make", "--no-print-directory", "-f", str(ROOT / "Makefile"), "-C", str(work),
           "-o", str(venv / ".mdlib-installed"), "lab", f"VENV={venv}", f"LAB_ARGS={args}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE")}
    env.update(MDLIB_DATA=str(home), JUPYTER_CONFIG_DIR=str(tmp_path / "jupyter-config"),
               JUPYTER_RUNTIME_DIR=str(tmp_path / "jupyter-runtime"))
    log_path = tmp_path / "lab.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_for(lambda: _get_json(f"{base}/api/status?token={token}"), 120, "JupyterLab to answer", server)
        yield base, token, server
    finally:
        try:
            urllib.request.urlopen(urllib.request.Request(f"{base}/api/shutdown?token={token}", method="POST"),
                                   timeout=10)
            server.wait(30)
        except (OSError, subprocess.TimeoutExpired):
            os.killpg(server.pid, signal.SIGTERM)      # the group this fixture started: make and its server
            server.wait(30)
        ARTIFACTS.joinpath("lab").mkdir(parents=True, exist_ok=True)
        shutil.copy(log_path, ARTIFACTS / "lab" / "lab.log")


@in_chromium
def test_make_lab_runs_lesson_01_on_a_kernel_and_shows_its_first_figure(chromium, lab):
    base, token, server = lab
    lesson = build.committed_lessons()[0].name
    page = chromium.new_page(viewport={"width": 1400, "height": 900})
    try:
        page.goto(f"{base}/lab/tree/{lesson}?token={token}")
        page.locator(".jp-NotebookPanel .jp-Cell").first.wait_for(timeout=90_000)

        def kernel_idle():
            sessions = _get_json(f"{base}/api/sessions?token={token}")
            return [(s["kernel"]["name"], s["kernel"]["execution_state"]) for s in sessions
                    if s["path"].endswith(lesson)] == [("python3", "idle")]

        # Cells run before the kernel is connected are dropped: wait for it, on the server and in the page.
        _wait_for(kernel_idle, 120, "lesson 01's kernel", server)
        page.locator(".jp-StatusBar-Widget", has_text="Idle").first.wait_for(timeout=60_000)

        # As a learner would: Shift+Enter from the first cell, each cell finished before the next, to a figure.
        page.locator(".jp-Notebook .jp-Cell").first.click()
        page.keyboard.press("Escape")
        figures = page.locator(".jp-OutputArea-output img")
        for _ in range(60):
            page.keyboard.press("Shift+Enter")
            page.wait_for_timeout(200)
            page.locator(".jp-InputPrompt", has_text="[*]").first.wait_for(state="detached", timeout=300_000)
            if figures.count():
                break
        assert figures.count() > 0, "no figure after running the lesson's first 60 cells"
        page.wait_for_timeout(500)
        (ARTIFACTS / "lab").mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "lab" / "lesson01.png"))
        width, height = figures.first.evaluate("i => [i.complete ? i.naturalWidth : 0, i.naturalHeight]")
        assert width > 100 and height > 100, (width, height)
        # Every code cell up to the figure's ran once, in order, on the kernel ([1], [2], ...), without an error.
        cells = page.evaluate("""() => Array.from(document.querySelectorAll('.jp-Notebook .jp-CodeCell')).map(c =>
            [(c.querySelector('.jp-InputPrompt') || {}).textContent || '', !!c.querySelector('.jp-OutputArea-output img'),
             Array.from(c.querySelectorAll('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]'))
                  .map(o => o.textContent).join('')])""")
        upto = next(k for k, (_, has_figure, _) in enumerate(cells) if has_figure) + 1
        assert [prompt.strip() for prompt, _, _ in cells[:upto]] == [f"[{n}]:" for n in range(1, upto + 1)]
        assert not [err for _, _, err in cells[:upto] if "Error" in err or "Traceback" in err]
    finally:
        page.close()

"""The documentation holds together: every link in README.md and docs/ resolves (file and heading), every
``docs/...`` or ``benchmarks/...`` path the project mentions exists, every ``README, "Section"`` pointer names a
section the README has, and nothing cites a file the project does not ship (the developers' old spec files).

Plain text only: no torch, no data, a fraction of a second.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

DOCS = sorted((ROOT / "docs").glob("*.md"))
DOC_PAGES = [ROOT / "README.md", *DOCS]


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _files(*patterns: str) -> list[Path]:
    found = {p for pattern in patterns for p in ROOT.glob(pattern) if p.is_file()}
    return sorted(p for p in found if "__pycache__" not in p.parts)


#: Where the project cites files: its code, tests, lessons, benchmarks, manifests and documentation.
CITING = _files("mdlib/**/*.py", "tests/*.py", "notebooks/*.ipynb", "benchmarks/*.py", "data_manifest/*.yaml",
                "README.md", "docs/*.md")
#: The same places plus the other text files that travel with the project.
SCANNED = _files("mdlib/**/*.py", "tests/*.py", "notebooks/*.ipynb", "benchmarks/*.py", "benchmarks/*.md",
                 "data_manifest/*.yaml", "README.md", "docs/*.md", "examples/*", "tests/data/**/*", "Makefile",
                 "pyproject.toml", "environment.yml", ".ci/*")

#: The developers' spec files, which are not part of the project. Built from pieces so that this file does not
#: match itself.
SPEC_NAMES = [name + ".md" for name in ("NSD", "METHOD", "EVALUATION", "STYLE", "ARCHITECTURE")]
FORBIDDEN = SPEC_NAMES + ["/work" + "/shared", ".." + "/shared"]


def _text(path: Path) -> str:
    """A file's text; for a notebook, the raw JSON and then every cell's source joined (unescaped)."""
    raw = path.read_text(encoding="utf-8")
    if path.suffix != ".ipynb":
        return raw
    cells = json.loads(raw)["cells"]
    return raw + "\n" + "\n".join("".join(cell["source"]) for cell in cells)


# ------------------------------------------------------------------------------------------- markdown

_FENCE = re.compile(r"^\s*(```|~~~)")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1")
_INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REF_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)")


def _prose_lines(text: str) -> list[str]:
    """The lines of a markdown text outside fenced code blocks."""
    lines, fenced = [], None
    for line in text.splitlines():
        m = _FENCE.match(line)
        if m:
            if fenced is None:
                fenced = m.group(1)
            elif m.group(1) == fenced:
                fenced = None
            continue
        if fenced is None:
            lines.append(line)
    return lines


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading's text: markup dropped, lower case, punctuation other than '-' and '_'
    removed, each space made a '-'."""
    text = _CODE_SPAN.sub(lambda m: m.group(2), heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)       # links and images: their text
    text = re.sub(r"<[^>]+>", "", text)                            # inline HTML tags
    text = re.sub(r"(\*+|(?<!\w)_+|_+(?!\w))", "", text)           # emphasis markers
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a markdown file, with GitHub's -1, -2, ... for repeated headings."""
    seen: dict[str, int] = {}
    out = set()
    for line in _prose_lines(path.read_text(encoding="utf-8")):
        m = re.match(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = github_slug(m.group(2))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def links(path: Path) -> list[str]:
    """The targets of the inline and reference links of a markdown file, code excluded."""
    found = []
    for line in _prose_lines(path.read_text(encoding="utf-8")):
        prose = _CODE_SPAN.sub("``", line)
        found += _INLINE_LINK.findall(prose)
        found += _REF_LINK.findall(prose)
    return found


def test_slug_rules():
    assert github_slug("`mdlib`, the library's default") == "mdlib-the-librarys-default"
    assert github_slug('SSIM "columns": what scikit-image 0.17 computed') == \
        "ssim-columns-what-scikit-image-017-computed"
    assert github_slug("The design: `nsd_expdesign.mat`") == "the-design-nsd_expdesignmat"
    assert github_slug("Reconstructing a whole test set: `mdlib reconstruct`") == \
        "reconstructing-a-whole-test-set-mdlib-reconstruct"
    assert github_slug("MindEye 1 and 2, step by step") == "mindeye-1-and-2-step-by-step"


def test_link_parsing(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\nSee [a](a.md#x), ![img](pic.png \"t\") and `[not](code.md)`.\n"
                    "[ref]: other.md\n```\n[fenced](fenced.md)\n# not a heading\n```\n## Title\n")
    assert links(page) == ["a.md#x", "pic.png", "other.md"]
    assert anchors(page) == {"title", "title-1"}


@pytest.mark.parametrize("page", DOC_PAGES, ids=_rel)
def test_relative_links_resolve(page):
    broken = []
    for target in links(page):
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):              # http:, https:, mailto:, ...
            continue
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor:
            if dest.suffix != ".md":
                broken.append(f"{target}: an anchor into a file that is not markdown")
            elif anchor not in anchors(dest):
                broken.append(f"{target}: {_rel(dest)} has no heading with the anchor #{anchor}")
    assert not broken, f"{_rel(page)}: " + "; ".join(broken)


def test_doc_pages_are_linked():
    for name in ("data", "evaluation", "fetch", "method", "mini_world", "reconstruct"):
        assert (ROOT / "docs" / f"{name}.md").is_file()
    readme_links = {(ROOT / t.partition("#")[0]).resolve() for t in links(ROOT / "README.md")}
    unlinked = [_rel(p) for p in DOCS if p.resolve() not in readme_links]
    assert not unlinked, f"README.md links no page of its documentation: {unlinked}"


# ----------------------------------------------------------------------------- paths the project cites

_MENTIONED_PATH = re.compile(r"(?<![\w./-])(?:\.\./)*((?:docs|benchmarks)/[\w.-]*\w)")


@pytest.mark.parametrize("path", CITING, ids=_rel)
def test_mentioned_docs_and_benchmarks_exist(path):
    missing = sorted({m for m in _MENTIONED_PATH.findall(_text(path)) if not (ROOT / m).exists()})
    assert not missing, f"{_rel(path)} mentions files the project does not have: {missing}"


_README_POINTER = re.compile(r"""README(?:\.md)?\s*[,:]\s*\\?["“]([^"”\\]+)\\?["”]""")


def test_readme_pointer_regex():
    assert _README_POINTER.findall('(README, "The mini world")') == ["The mini world"]
    assert _README_POINTER.findall('see README.md: "Two commands".') == ["Two commands"]
    assert _README_POINTER.findall(r'(README, \"The mini world\")') == ["The mini world"]


# docs/ pages are left out: there "README" can be another project's (docs/evaluation.md quotes Brain-Diffuser's),
# and their own links are checked above. So is this file, whose examples are pointers.
@pytest.mark.parametrize("path", [p for p in CITING if p.parent != ROOT / "docs" and p != Path(__file__).resolve()],
                         ids=_rel)
def test_readme_pointers_name_readme_sections(path):
    """``README, "Section"`` must name a section README.md still has (most moved into docs/ pages)."""
    headings = {re.sub(r"^#+\s*", "", line).strip() for line in _prose_lines((ROOT / "README.md").read_text())
                if line.startswith("#")}
    stale = sorted({s for s in _README_POINTER.findall(_text(path)) if s.strip() not in headings})
    assert not stale, f"{_rel(path)} points at README sections that are not there (see docs/): {stale}"


# ------------------------------------------------------------------------------ files the project lacks

@pytest.mark.parametrize("path", SCANNED, ids=_rel)
def test_no_citation_of_the_developers_spec_files(path):
    try:
        text = _text(path)
    except UnicodeDecodeError:
        pytest.skip("not a text file")
    found = [s for s in FORBIDDEN if s in text]
    assert not found, f"{_rel(path)} cites files the project does not have: {found} (point at docs/ instead)"

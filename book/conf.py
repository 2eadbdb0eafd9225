"""Sphinx configuration of the course site (`make book`; book/build.py assembles the sources it reads).

Why Sphinx with MyST-NB and the book theme, and what was measured: docs/book.md. The site must open from disk
with no network: nothing here may load a script, a stylesheet or a font from another host, so math is
rendered to MathML when the site is built (below), not by MathJax from a CDN.
"""

from docutils import nodes

project = "MindDiffuser, the notebook course"
author = "the mdlib authors"
copyright = "the mdlib authors; NSD images are not part of this course"

extensions = ["myst_nb"]

# The lessons are shown as `make demo` executed them: never run here.
nb_execution_mode = "off"
# One output area per stream (papermill may split a cell's printed lines into several outputs).
nb_merge_streams = True
myst_enable_extensions = ["dollarmath", "amsmath"]
# Headings become link targets, as on GitHub, so that links like data.md#mini-nsd resolve.
myst_heading_anchors = 3
# The text as written: straight quotes stay straight (the lessons quote code and file names).
smartquotes = False

html_theme = "sphinx_book_theme"
html_title = "MindDiffuser course"
html_theme_options = {
    "show_navbar_depth": 1,
    "show_toc_level": 2,
    "home_page_in_toc": True,
    "use_download_button": False,
    "use_fullscreen_button": False,
    "use_repository_button": False,
}
# The theme's script reads the colour mode from this; without it, a first visit logs a console error.
html_context = {"default_mode": "light"}
html_static_path = ["_static"]
html_css_files = ["course.css"]
html_last_updated_fmt = None
html_copy_source = False
html_show_sourcelink = False
html_math_renderer = "mathml"

# Folders copied only so that links into them resolve (as downloads), never pages.
exclude_patterns = [".doctrees", "**/.ipynb_checkpoints", "mdlib", "data_manifest", "examples"]


def _mathml(latex: str, block: bool) -> str:
    """LaTeX -> MathML, which browsers render without a script (latex2mathml)."""
    from latex2mathml.converter import convert

    return convert(latex, display="block" if block else "inline")


def _visit_math(self, node):
    self.body.append(self.starttag(node, "span", "", CLASS="math notranslate"))
    self.body.append(_mathml(node.astext(), block=False))
    self.body.append("</span>")
    raise nodes.SkipNode


def _visit_displaymath(self, node):
    self.body.append(self.starttag(node, "div", CLASS="math notranslate"))
    if node.get("number"):
        self.body.append(f'<span class="eqno">({node["number"]})</span>')
    self.body.append(_mathml(node.astext(), block=True))
    self.body.append("</div>\n")
    raise nodes.SkipNode


def setup(app):
    app.add_html_math_renderer("mathml", (_visit_math, None), (_visit_displaymath, None))

"""Sphinx configuration of the tl_vlm docs (built by ``scripts/docs``, offline).

Sphinx with autodoc + napoleon (Google-style docstrings) and the furo theme, as
TransformerLens' own docs; notebooks are rendered by MyST-NB from copies that
``docs/build.py`` executed first (so nothing is executed, or fetched, by Sphinx).
"""

import re

import tl_vlm

project = "tl_vlm"
author = "tl_vlm authors"
release = version = tl_vlm.__version__
copyright = "tl_vlm authors"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "myst_nb",
]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "**.ipynb_checkpoints", "images/README.md"]

# Notebooks arrive executed (docs/build.py); never execute them here.
nb_execution_mode = "off"
nb_merge_streams = True
# The tutorials' figures are drawn from their text/html (their plotly JSON is for
# JupyterLab); pages with figures load plotly.js from _static (docs/build.py puts it
# there; _templates/page.html adds it to their head).
html_static_path = ["_static"]
templates_path = ["_templates"]
myst_enable_extensions = ["colon_fence"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": True, "show-inheritance": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True

html_theme = "furo"
html_title = f"tl_vlm {release}"
# Everything the pages need ships with the site: no web fonts, no CDN scripts.
html_theme_options = {"navigation_with_keys": True}


# Docstrings write absolute values as |cos|; reST would read a substitution reference.
_BARS = re.compile(r"(?<![\\`|\w])\|(?=[^\s|`])([^|`\n]*?[^\s|`\\])\|(?![\w`|])")


def _escape_bars(app, what, name, obj, options, lines):
    lines[:] = [line if line.lstrip().startswith((">>>", "...")) else _BARS.sub(r"\\|\1\\|", line)
                for line in lines]


def setup(app):
    app.connect("autodoc-process-docstring", _escape_bars)

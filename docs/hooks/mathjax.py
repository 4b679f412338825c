"""MkDocs hook: serve MathJax from an installed package, never from the network.

The ``django-static-mathjax`` wheel (in the ``docs`` extra) ships MathJax 3 as static
files of its ``mathjax`` package; this hook adds its self-contained ``es5/tex-svg.js``
(SVG output, no font files to fetch) to the site as ``javascripts/tex-svg.js``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

TARGET = "javascripts/tex-svg.js"


def _mathjax_script() -> Path:
    spec = importlib.util.find_spec("mathjax")
    if spec is None or not spec.submodule_search_locations:
        raise PluginError("MathJax is not installed: pip install -e '.[docs]' (it brings django-static-mathjax)")
    for root in spec.submodule_search_locations:
        script = Path(root) / "static" / "mathjax" / "es5" / "tex-svg.js"
        if script.is_file():
            return script
    raise PluginError("the installed `mathjax` package has no static/mathjax/es5/tex-svg.js; "
                      "reinstall django-static-mathjax")


def on_files(files, config):
    files.append(File.generated(config, TARGET, abs_src_path=str(_mathjax_script())))
    return files

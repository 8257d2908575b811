"""Sphinx configuration for thpguard's documentation."""

import thpguard

project = "thpguard"
author = "thpguard developers"
copyright = "2026, thpguard developers"
release = thpguard.__version__
version = ".".join(release.split(".")[:2])

extensions = ["sphinx.ext.autodoc", "sphinx.ext.doctest"]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
nitpicky = False
html_theme = "alabaster"
html_static_path = ["_static"]
exclude_patterns = ["_build"]

"""Sphinx configuration for thpguard's documentation."""

import thpguard

project = "thpguard"
author = "thpguard contributors"
copyright = "2026, thpguard contributors"
release = thpguard.__version__
version = ".".join(release.split(".")[:2])

extensions = ["sphinx.ext.autodoc", "sphinx.ext.doctest"]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
# Every cross-reference must resolve (CI builds with -W). The standard
# library and numpy are not linked: intersphinx would fetch their inventories
# over the network at build time. Those names stay plain text.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(os|mmap|subprocess|time|signal|multiprocessing|faulthandler|numpy|threading|_thread)(\..*)?"),
]
nitpick_ignore = [
    # Documented where they are used, not as API entries of their own.
    ("py:func", "default_policy"),
    ("py:class", "thpguard.kernel.BuddyZone"),
    ("py:class", "thpguard.kernel.procfs.BuddyZone"),
]
html_theme = "alabaster"
html_static_path = ["_static"]
exclude_patterns = ["_build"]

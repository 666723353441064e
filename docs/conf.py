"""Sphinx configuration of rectrain's documentation: Markdown pages (MyST) in the furo theme.

`make docs` builds it with warnings as errors (-W) and nitpicky references (-n), so that a broken
link, a missing heading anchor or a page outside the toctree fails the build.
"""

project = "rectrain"
author = "rectrain contributors"
copyright = "rectrain contributors"

extensions = ["myst_parser"]
source_suffix = {".md": "markdown"}
root_doc = "index"
# GitHub-style anchors for headings down to ####, so that `page.md#a-section` links resolve (and a
# link to a heading that does not exist is a warning, hence an error under -W).
myst_heading_anchors = 4
exclude_patterns = ["_build"]

html_theme = "furo"
html_title = "rectrain"

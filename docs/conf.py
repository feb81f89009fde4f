"""Sphinx configuration for meshline's documentation."""

project = "meshline"
author = "meshline developers"
copyright = "2026, meshline developers"
extensions = ["sphinx.ext.autodoc", "sphinx.ext.intersphinx"]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_preserve_defaults = True
html_theme = "alabaster"
exclude_patterns = ["_build"]
intersphinx_mapping: dict[str, tuple[str, None]] = {}

"""Builds the optional compiled chunk decoder (``lrwatch.daemon._jsonl``). Everything else is in
pyproject.toml. ``optional=True``: without a working C compiler the build only warns, and the
daemon uses msgspec or the general path instead (see lrwatch/daemon/columnar.py)."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("lrwatch.daemon._jsonl", ["lrwatch/daemon/_jsonl.c"],
                             optional=True)])

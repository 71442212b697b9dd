"""Installed package versions, for cache keys and reports (torch-free, imports nothing heavy)."""

from __future__ import annotations

import importlib.metadata


def package_version(name: str) -> str:
    """The installed version of distribution ``name`` (e.g. "gensim"), or "not installed"."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"

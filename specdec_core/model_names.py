"""A ``--model`` argument: a local checkpoint directory or a Hugging Face hub name? No MLX here:
``scripts/up`` asks before it starts anything."""

from __future__ import annotations

import os
from pathlib import Path


def looks_local(name: str | os.PathLike[str]) -> bool:
    """True if ``name`` reads as a local path, so that a missing one is "does not exist" and
    not a hub download that fails 40 lines later: it starts with ``.``, ``/`` or ``~``, has more
    than one ``/`` (a hub name is ``owner/name``), or has a ``/`` and its first part is an
    existing directory here (``models/t5-small`` when ``models/`` exists)."""
    text = os.fspath(name)
    if not text or text.startswith((".", "/", "~")) or text.count("/") > 1:
        return True
    return "/" in text and Path(text.split("/", 1)[0]).is_dir()


def missing_model(name: str | os.PathLike[str]) -> str | None:
    """Why ``name`` cannot be a model directory here (None: it is one, or it is a hub name)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return None
    if path.exists():
        return f"{os.fspath(name)} is a file; --model takes a checkpoint directory or a hub name"
    if looks_local(name):
        return f"checkpoint directory {os.fspath(name)} does not exist"
    return None

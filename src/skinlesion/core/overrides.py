"""``key=value`` overrides of a config: parsed (YAML-typed) into a nested tree, merged over the
YAML file's tree, and numbers written as ints or YAML 1.1 strings made floats where the schema
declares a float."""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import BaseModel

from skinlesion.core.errors import ConfigError


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{key}': '{'.'.join(parts[: i + 1])}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ``["train.lr=1e-3", "cv.folds_to_run=[0,1]"]`` into a nested dict (YAML-typed)."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as err:
            raise ConfigError(f"override '{item}': value is not valid YAML ({err})") from err
        _set_dotted(tree, key.strip(), value)
    return tree


def merge_trees(base: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_trees(out[key], value)
        else:
            out[key] = value
    return out


def coerce_numbers(tree: Any, schema: type[BaseModel]) -> Any:
    """Let an int stand where a float is declared (``lr: 1``), nothing looser."""
    if not isinstance(tree, dict):
        return tree
    out = {}
    for key, value in tree.items():
        field = schema.model_fields.get(key)
        ann = field.annotation if field else None
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out[key] = coerce_numbers(value, ann)
        elif isinstance(value, int) and not isinstance(value, bool) and _accepts_float(ann):
            out[key] = float(value)
        elif isinstance(value, str) and _accepts_float(ann) and _is_float_text(value):
            # YAML 1.1 reads ``3e-4`` as a string.
            out[key] = float(value)
        elif isinstance(value, list) and _accepts_float_list(ann):
            out[key] = [
                float(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value
            ]
        else:
            out[key] = value
    return out


def _is_float_text(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _accepts_float(ann: Any) -> bool:
    return ann is float or (
        hasattr(ann, "__args__") and float in ann.__args__ and int not in ann.__args__
    )


def _accepts_float_list(ann: Any) -> bool:
    text = str(ann)
    return "list[float]" in text or "tuple[float, float]" in text

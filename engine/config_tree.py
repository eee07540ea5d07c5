"""A tree of dataclasses filled from plain values (YAML), with type checks and dotted overrides; generic: it
knows no field of the run config (hcd.engine.config holds those)."""
import dataclasses
import types
import typing
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """Bad configuration; the message names the offending key path (or file)."""


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(path: str, tp, value: Any):
    """Check (and minimally coerce: int -> float) one YAML value against a field type."""
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is getattr(types, "UnionType", ()):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(path, arg, value)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{path}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping of fields, got {type(value).__name__}")
        return build(tp, value, path)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 5e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    if tp in (list, dict):
        if not isinstance(value, tp):
            raise ConfigError(f"{path}: expected a {tp.__name__}, got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported field type {_type_name(tp)}")


def build(cls, values: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(f"{path}: unknown key (known: {', '.join(sorted(names))})")
        kwargs[key] = _coerce(path, hints[key], value)
    try:
        return cls(**kwargs)
    except ValueError as e:  # a dataclass's own __post_init__ check, "field: message"
        raise ConfigError(f"{prefix}.{e}" if prefix else str(e)) from None


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def set_dotted(root, tree: dict, dotted: str, value: Any):
    keys = dotted.split(".")
    node = tree
    for i, key in enumerate(keys[:-1]):
        child = node.get(key)
        if key not in node:
            raise ConfigError(f"{'.'.join(keys[:i + 1])}: unknown key (known: {', '.join(sorted(node))})")
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(keys[:i + 1])}: not a section, cannot set {dotted}")
        node = child
    if keys[-1] not in node and (len(keys) == 1 or is_section(root, ".".join(keys[:-1]))):
        raise ConfigError(f"{dotted}: unknown key")
    node[keys[-1]] = value


def parse_override(text: str):
    """'a.b=value' -> ('a.b', YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"--set {text}: expected dotted.key=value")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ConfigError(f"--set {text}: no key before '='; expected dotted.key=value")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def merge(root, base: dict, new: dict, prefix: str = ""):
    for key, value in new.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in base:
            raise ConfigError(f"{path}: unknown key (known: {', '.join(sorted(base))})")
        if isinstance(base[key], dict) and isinstance(value, dict) and base[key] and is_section(root, path):
            merge(root, base[key], value, path)
        else:
            base[key] = value


def is_section(root, path: str) -> bool:
    """True for dataclass sections (merged key by key); free-form dict fields are replaced whole."""
    cls = root
    for key in path.split("."):
        hints = typing.get_type_hints(cls)
        tp = hints.get(key)
        if not dataclasses.is_dataclass(tp):
            return False
        cls = tp
    return True

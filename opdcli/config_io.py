"""The strict config builder: dataclass defaults <- a YAML file <- `--set a.b=c` overrides.

An unknown key is a `ConfigError` that names the key and suggests the closest valid one; a value
of the wrong type is a `ConfigError` naming the expected type. The config sections themselves
live in `opdcli.config`, which re-exports these functions.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from opdcli.errors import ConfigError

T = TypeVar("T")

# ---------------------------------------------------------------------------- the builder


def _closest(name: str, options: list[str]) -> str:
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f" Did you mean '{match[0]}'?" if match else ""


def unknown_key_error(key: str, prefix: str, options: list[str]) -> ConfigError:
    where = f"{prefix}{key}"
    return ConfigError(
        f"unknown config key '{where}'.{_closest(key, options)} "
        f"Valid keys{' under ' + prefix.rstrip('.') if prefix else ''}: {', '.join(options)}"
    )


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            names = ", ".join(repr(a) for a in allowed)
            raise ConfigError(
                f"config key '{where}' is {value!r}; allowed values: {names}."
                f"{_closest(str(value), [str(a) for a in allowed])}"
            )
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{where}' must be a mapping of its fields, got {value!r}")
        return build_dataclass(tp, value, prefix=f"{where}.")
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(get_args(tp)):
            raise ConfigError(f"config key '{where}' must be a list of {len(get_args(tp))} values")
        return tuple(_coerce(v, a, where) for v, a in zip(value, get_args(tp), strict=True))
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key '{where}' must be a list, got {value!r}")
        (arg,) = get_args(tp)
        return [_coerce(v, arg, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{where}' must be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{where}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{where}' must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads 1e-3 as a string
            except ValueError:
                pass
        raise ConfigError(f"config key '{where}' must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key '{where}' must be a string, got {value!r}")
    raise AssertionError(f"unsupported config type {tp} at {where}")


def build_dataclass(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Construct `cls` from a nested dict, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in hints:
            raise unknown_key_error(str(key), prefix, names)
        kwargs[key] = _coerce(value, hints[key], f"{prefix}{key}")
    return cls(**kwargs)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ["a.b=1", "c=x"] into a nested dict; values are parsed as YAML scalars."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value, e.g. optim.lr=1e-4")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with another override of '{part}'")
        node[parts[-1]] = value
    return tree


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "options":
            out[key] = deep_merge(out[key], value)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file '{p}' does not exist; pass an existing YAML file to --config")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"config file '{p}' is not valid YAML{where}: {problem}; fix the syntax") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file '{p}' is not UTF-8 text; pass a YAML file") from None
    if data is None:  # an empty file (or only comments) is almost always the wrong path
        raise ConfigError(f"config file '{p}' is empty; pass a config with at least one key, or leave out "
                          "--config for the defaults")
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{p}' must hold a mapping at the top level, got {type(data).__name__}")
    return data


def flatten_keys(tree: dict[str, Any], prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for key, value in tree.items():
        keys.add(f"{prefix}{key}")
        if isinstance(value, dict) and key != "options":
            keys |= flatten_keys(value, f"{prefix}{key}.")
    return keys


def load_config(
    cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None
) -> tuple[T, set[str]]:
    """Load `cls` from defaults <- YAML file <- overrides, strictly.

    Returns:
        The frozen config and the set of dotted keys the user set explicitly (file or flags),
        which cross-field validation uses to refuse flags that cannot take effect.
    """
    tree: dict[str, Any] = read_yaml(path) if path is not None else {}
    tree = deep_merge(tree, parse_overrides(overrides or []))
    cfg = build_dataclass(cls, tree)
    return cfg, flatten_keys(tree)


def to_dict(cfg: Any) -> dict[str, Any]:
    def convert(obj: Any) -> Any:
        if isinstance(obj, tuple):
            return [convert(o) for o in obj]
        if isinstance(obj, dict):
            return {k: convert(v) for k, v in obj.items()}
        return obj

    return convert(dataclasses.asdict(cfg))


def dump_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")

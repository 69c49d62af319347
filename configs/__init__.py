"""Config loading: YAML files and `key=value` overrides into (nested) `*Config` dataclasses.

All defaults live in the dataclasses. A YAML file and the command line only override them, and both are
checked at load time: an unknown key or a value of the wrong type fails with the key (and the file) named.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

C = TypeVar("C")

CONFIG_DIR = Path(__file__).resolve().parent


class ConfigError(ValueError):
    """A config file or override that does not fit its dataclass."""


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] | None = None) -> C:
    """Build `cls` from its defaults, then the YAML at `path`, then `key=value` overrides (dotted keys nest)."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError as err:
            raise ConfigError(f"config file not found: {path}") from err
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from err
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of keys at the top level, got {type(loaded).__name__}")
        data = loaded or {}
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value")
        _set_dotted(data, key.strip(), yaml.safe_load(raw) if raw.strip() else "")
        source = f"{source} + overrides" if "overrides" not in source else source
    return from_dict(cls, data, where=source)


def from_dict(cls: type[C], data: dict[str, Any], where: str = "config") -> C:
    """Instantiate dataclass `cls` from a plain dict, checking keys and types recursively."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping for {cls.__name__}, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {unknown} for {cls.__name__}; known keys: {sorted(fields)}"
        )
    kwargs = {name: _coerce(hints[name], value, f"{where}: key '{name}'") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {err}") from err


def to_dict(config: Any) -> dict[str, Any]:
    """The resolved config as plain data (for printing and saving with a run's outputs)."""
    return dataclasses.asdict(config)


def save_config(config: Any, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key!r}: '{part}' is not a section")
    node[leaf] = value


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Check `value` against type hint `tp`; the only conversions are int->float and a dict->dataclass."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{where}: expected {_name(tp)}, got {value!r}")
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: expected one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where=where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        items = [_coerce(item_tp, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected float, got {value!r}") from None
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {_name(tp)}, got {value!r} ({type(value).__name__})")
    return value


def _name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))

"""The config loader: YAML files and `key=value` overrides into (nested) `*Config` dataclasses.

All defaults live in the dataclasses. A YAML file and the command line only override them. OmegaConf reads
the YAML, parses the dotted overrides (`OmegaConf.from_dotlist`) and merges the two; the dataclass is then
built here, so that every error names the key, where it came from (the file or the override) and what was
expected, with a "did you mean" for a misspelt key. After building, every dataclass's `check()` runs, so
out-of-range values and impossible combinations fail at load time, before any model, Ray or data work.

A field typed as a `transformers.TrainingArguments` subclass (TRL's `GRPOConfig`, `SFTConfig`) is a recipe's
`training:` section in TRL's own terms: it is built as `cls(**section)` from exactly the keys given (TRL's
names, defaults and validation for the rest), and saved as the keys that differ from the class defaults.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import inspect
import logging
import sys
import types
import typing
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

C = TypeVar("C")

CONFIG_DIR = Path(__file__).resolve().parent

# dotted key -> where its value came from (a file, an override, both), for error messages
Origin = Callable[[str], str]


class UserError(ValueError):
    """A mistake in what the user gave (a config, a data file, a path, a value). `run.py` prints its message on
    one line and exits 2, without a traceback (`--traceback` or LOOPRL_TRACEBACK=1 shows it); any other
    exception is a bug in the program and keeps its traceback. The message says what, where and what was
    expected."""


class ConfigError(UserError):
    """A config file or override that does not fit its dataclass."""


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] | None = None) -> C:
    """Build `cls` from its defaults, then the YAML at `path`, then `key=value` overrides (dotted keys nest)."""
    node = _read_yaml(path) if path is not None else OmegaConf.create({})
    overrides = list(overrides or [])
    if overrides:
        try:
            node = OmegaConf.merge(node, _parse_overrides(overrides))
        except OmegaConfBaseException as err:
            raise ConfigError(f"overrides {overrides}: cannot be merged into {path or 'the defaults'}: {err}") from err
    try:
        data = OmegaConf.to_container(node, resolve=True)
    except OmegaConfBaseException as err:  # a ${...} interpolation that does not resolve
        raise ConfigError(f"{path or 'overrides'}: {err}") from err
    return _build_checked(cls, data, _origin(path, overrides), "")


def from_dict(cls: type[C], data: dict[str, Any], where: str = "config") -> C:
    """Instantiate dataclass `cls` from a plain dict, checking keys, types and each dataclass's `check()`."""
    return _build_checked(cls, data, lambda _key: where, "")


def to_dict(config: Any) -> dict[str, Any]:
    """The resolved config as plain data (for printing and saving); `load_config` reads it back unchanged."""
    return _plain(config)


def save_config(config: Any, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


# ----------------------------------------------------------------------------------------------------------
# Reading


def _read_yaml(path: str | Path) -> DictConfig:
    if not Path(path).is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        node = OmegaConf.load(path)
    except (yaml.YAMLError, OmegaConfBaseException) as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, got a list")
    return node


def _parse_overrides(overrides: list[str]) -> DictConfig:
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected key=value")
    try:
        return OmegaConf.from_dotlist(overrides)
    except (yaml.YAMLError, OmegaConfBaseException) as err:
        raise ConfigError(f"overrides {overrides}: {err}") from err


def _origin(path: str | Path | None, overrides: list[str]) -> Origin:
    """Name the source of a dotted key: the override that set it, else the file (or the defaults)."""
    given = {item.partition("=")[0].strip(): item for item in overrides}
    base = str(path) if path is not None else "defaults"

    def origin(key: str) -> str:
        for name, item in given.items():
            if key == name or key.startswith(name + "."):
                return f"override {item!r}"
        if key and any(name.startswith(key + ".") for name in given):
            return f"{base} + overrides"
        return base if key or not given else f"{base} + overrides"

    return origin


# ----------------------------------------------------------------------------------------------------------
# Building and type checks


def _build_checked(cls: type[C], data: Any, origin: Origin, prefix: str) -> C:
    config = _build(cls, data, origin, prefix)
    _run_checks(config, origin, prefix)
    return config


def _build(cls: type[C], data: Any, origin: Origin, prefix: str) -> C:
    """`cls(**data)` with every key known and every value of its field's type (nested dataclasses built)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{origin(prefix)}: {_key(prefix)}expected a mapping for {cls.__name__}, got {data!r:.80}")
    fields = [f.name for f in dataclasses.fields(cls) if f.init]
    _reject_unknown(data, fields, cls.__name__, origin, prefix)
    hints = typing.get_type_hints(cls)
    kwargs = {name: _coerce(hints[name], value, origin, prefix + name) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{origin(prefix.rstrip('.'))}: {_key(prefix)}{err}") from err


def _reject_unknown(data: dict[str, Any], known: list[str], owner: str, origin: Origin, prefix: str) -> None:
    unknown = sorted(set(data) - set(known), key=str)
    if not unknown:
        return
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(str(key), known, n=3, cutoff=0.6)
        if close:
            hints.append(f"'{key}': did you mean {' or '.join(repr(c) for c in close)}?")
    listing = f"; known keys: {sorted(known)}" if len(known) <= 40 else ""
    raise ConfigError(
        f"{origin(prefix + str(unknown[0]))}: unknown key(s) {[prefix + str(k) for k in unknown]} for {owner}"
        + (f" ({'; '.join(hints)})" if hints else "") + listing
    )


def _coerce(tp: Any, value: Any, origin: Origin, key: str) -> Any:
    """Check `value` against type hint `tp`; the only conversions are int->float and a dict->dataclass."""
    where = f"{origin(key)}: key '{key}'"
    origin_type = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin_type in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, origin, key)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: expected {_name(tp)}, got {value!r}")
    if origin_type is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: expected one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if _is_training_args(tp):
        return _training_args(tp, value, origin, key)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, origin, key + ".")
    if origin_type in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        items = [_coerce(item_tp, v, origin, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin_type is list else tuple(items)
    if origin_type is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # a quoted number, or a YAML 1.1 "1e-3" read elsewhere
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected float, got {value!r}") from None
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {_name(tp)}, got {value!r} ({type(value).__name__})")
    return value


def _run_checks(config: Any, origin: Origin, prefix: str) -> None:
    """Call `check()` on every dataclass in the tree (deepest first), naming the section that failed."""
    if isinstance(config, (list, tuple)):
        for i, item in enumerate(config):
            _run_checks(item, origin, f"{prefix.rstrip('.')}[{i}].")
        return
    if not dataclasses.is_dataclass(config) or _is_training_args(type(config)):
        return
    for f in dataclasses.fields(config):
        _run_checks(getattr(config, f.name), origin, f"{prefix}{f.name}.")
    check = getattr(config, "check", None)
    if callable(check) and _callable_without_arguments(check):
        try:
            check()
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{origin(prefix.rstrip('.'))}: {_key(prefix)}{err}") from err


def _callable_without_arguments(fn: Callable[..., Any]) -> bool:
    params = inspect.signature(fn).parameters.values()
    return all(p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params)


def _key(prefix: str) -> str:
    return f"key '{prefix.rstrip('.')}': " if prefix else ""


def _name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


# ----------------------------------------------------------------------------------------------------------
# transformers.TrainingArguments sections (TRL's GRPOConfig, SFTConfig)


def _is_training_args(tp: Any) -> bool:
    # transformers is imported only by recipes that use it; a type hint of its class means it is loaded.
    if not isinstance(tp, type) or "transformers" not in sys.modules:
        return False
    from transformers import TrainingArguments

    return issubclass(tp, TrainingArguments)


def _training_args(cls: type[Any], section: Any, origin: Origin, key: str) -> Any:
    """`cls(**section)`: TRL's defaults for the keys not given; its own __post_init__ validates the values."""
    if not isinstance(section, dict):
        raise ConfigError(f"{origin(key)}: key '{key}': expected a mapping of {cls.__name__} options, got {section!r:.80}")
    _reject_unknown(section, [f.name for f in dataclasses.fields(cls) if f.init], cls.__name__, origin, key + ".")
    section = _yaml_no_as_string(cls, section)
    try:
        with warnings.catch_warnings():  # TRL's own defaults trip transformers' deprecation warnings
            warnings.simplefilter("ignore", FutureWarning)
            return cls(**section)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{origin(key)}: section '{key}' ({cls.__name__}): {err}") from err


def _yaml_no_as_string(cls: type[Any], section: dict[str, Any]) -> dict[str, Any]:
    """YAML 1.1 (and so an unquoted `save_strategy=no` override) reads `no` as false: give a string-valued
    option (a strategy such as save_strategy, eval_strategy) the string it meant."""
    text_fields = {f.name for f in dataclasses.fields(cls) if isinstance(_declared_default(f), (str, enum.Enum))}
    return {k: "no" if v is False and k in text_fields else v for k, v in section.items()}


def _training_args_diff(args: Any) -> dict[str, Any]:
    """The fewest keys that rebuild `args`: start from every field that differs from its declared default,
    then drop each one that `__post_init__` derives from the others (output_dir, report_to, ...)."""
    cls = type(args)
    fields = [f for f in dataclasses.fields(cls) if f.init]
    state = _fields_state(args, fields)
    kept = {f.name: state[f.name] for f in fields if state[f.name] != _plain(_declared_default(f))}
    changed = True
    while changed:  # repeat: some pairs may not both be given (generation_batch_size, steps_per_generation)
        changed = False
        for name in list(kept):
            trial = {k: v for k, v in kept.items() if k != name}
            if _rebuilds(cls, trial, fields, state):
                kept, changed = trial, True
    return kept


def _rebuilds(cls: type[Any], kwargs: dict[str, Any], fields: list[dataclasses.Field], state: dict[str, Any]) -> bool:
    # A trial build sets up devices: under torchrun, one without use_cpu warns that the process group does not
    # match its parallel mode. Trials are not the run's arguments: drop that warning (the logger's level stays, as
    # disable_tqdm's default is derived from it).
    args_logger = logging.getLogger("transformers.training_args")
    args_logger.addFilter(_no_parallel_mode_warning)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _fields_state(cls(**kwargs), fields) == state
    except (TypeError, ValueError):
        return False
    finally:
        args_logger.removeFilter(_no_parallel_mode_warning)


def _no_parallel_mode_warning(record: logging.LogRecord) -> bool:
    return "parallel_mode" not in record.getMessage()


def _fields_state(args: Any, fields: list[dataclasses.Field]) -> dict[str, Any]:
    return {f.name: _plain(getattr(args, f.name)) for f in fields}


def _declared_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


# ----------------------------------------------------------------------------------------------------------
# Help text


def describe(cls: type[Any], prefix: str = "") -> list[tuple[str, str, Any]]:
    """Every key of dataclass `cls` as (dotted key, type, default), nested sections expanded; a
    TrainingArguments section is one entry (its class), whose own keys `describe_training_args` lists."""
    hints = typing.get_type_hints(cls)
    rows: list[tuple[str, str, Any]] = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp, default = hints[f.name], _declared_default(f)
        if _is_training_args(tp):
            rows.append((prefix + f.name, f"{tp.__module__.split('.')[0]}.{tp.__name__}", dataclasses.MISSING))
        elif dataclasses.is_dataclass(tp):
            rows.extend(describe(tp, prefix + f.name + "."))
        else:
            rows.append((prefix + f.name, _type_text(tp), _plain(default)))
    return rows


def describe_training_args(cls: type[Any], defaults: Any = None) -> list[tuple[str, str, Any]]:
    """A TrainingArguments subclass's keys as (key, type, default); `defaults`, an instance, supplies the
    recipe's own defaults where they differ from the class's."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if not f.init or f.name.startswith("_"):
            continue
        default = _plain(getattr(defaults, f.name)) if defaults is not None else _plain(_declared_default(f))
        rows.append((f.name, _type_text(hints.get(f.name, Any)), default))
    return rows


def _type_text(tp: Any) -> str:
    origin_type, args = typing.get_origin(tp), typing.get_args(tp)
    if origin_type in (typing.Union, types.UnionType):
        return " | ".join(_type_text(a) for a in args)
    if origin_type is typing.Literal:
        return "{" + ", ".join(map(str, args)) + "}"
    if origin_type in (list, tuple, dict):
        return f"{origin_type.__name__}[{', '.join(_type_text(a) for a in args)}]" if args else origin_type.__name__
    if tp is type(None):
        return "None"
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


# ----------------------------------------------------------------------------------------------------------
# Plain data for saving


def _plain(value: Any) -> Any:
    if _is_training_args(type(value)):
        return _training_args_diff(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


__all__ = [
    "CONFIG_DIR", "ConfigError", "UserError", "describe", "describe_training_args", "from_dict", "load_config", "save_config",
    "to_dict",
]

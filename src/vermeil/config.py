"""YAML <-> dataclasses: a strict converter, YAML 1.2 floats, dotted overrides and atomic saves.

Configs are plain dataclasses (validated in `__post_init__`); YAML maps one to one onto them. Nothing is
coerced silently: `dim: '512'` is rejected, an int is accepted where a float is expected, and `norm: no`
(a YAML 1.1 boolean) is rejected for a string field. PyYAML is an optional extra (`pip install vermeil[train]`).

A leaf every layer may import, models included (`HybridConfig.from_yaml`): standard library only (PyYAML
lazily, and `vermeil.checkpoint`'s atomic write), no model, training or distributed code.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import enum
import functools
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

T = TypeVar("T")

__all__ = [
    "ConfigError",
    "ConfigTypeError",
    "apply_overrides",
    "did_you_mean",
    "from_dict",
    "load_config",
    "load_yaml",
    "merge_preset",
    "parse_yaml_value",
    "pick_preset",
    "save_yaml",
    "to_dict",
]


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the dotted key, the value and the rule."""


class ConfigTypeError(ConfigError, TypeError):
    """A config value has the wrong type (also a `TypeError`)."""


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "None"
    if isinstance(tp, type) and get_origin(tp) is None:
        return tp.__name__
    return repr(tp).replace("typing.", "")


def did_you_mean(name: object, choices: Sequence[str], *, cutoff: float = 0.6) -> str:
    """` (did you mean 'heads'?)` for the choice closest to `name` (difflib ratio >= cutoff), else ""."""
    if not isinstance(name, str):
        return ""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=cutoff)
    return f" (did you mean {close[0]!r}?)" if close else ""


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    """Resolved type hints of the init fields of a dataclass (handles `from __future__ import annotations`)."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception as e:  # a forward reference that cannot be resolved from the class's module
        raise TypeError(f"cannot resolve the type hints of config class {cls.__qualname__}: {e}") from e
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init}


def from_dict(cls: type[T], data: Mapping[str, Any], path: str = "") -> T:
    """Build the dataclass `cls` (nested ones from nested dicts) from a plain dict, strictly.

    Errors name the dotted key (`path` is `data`'s prefix, e.g. "model"), the value and the rule:
    `unknown config key 'n_head' (did you mean 'n_heads'?); allowed: [...]`, `model.dim='512' must be int,
    got str` (a ConfigTypeError); a `ValueError` of `cls.__post_init__` becomes a ConfigError.
    """
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"from_dict needs a dataclass type, got {cls!r}")
    if not isinstance(data, Mapping):
        where = path or "the config"
        raise ConfigTypeError(
            f"{where} must be a mapping of keys to values for {cls.__name__}, got {type(data).__name__}: {data!r}"
        )
    types_ = _field_types(cls)
    allowed = list(types_)
    unknown = [k for k in data if k not in types_]
    if unknown:
        where = f" in {path}" if path else ""
        if len(unknown) == 1:
            head = f"unknown config key {unknown[0]!r}{where}{did_you_mean(str(unknown[0]), allowed)}"
        else:
            parts = ", ".join(f"{k!r}{did_you_mean(str(k), allowed)}" for k in unknown)
            head = f"unknown config keys{where}: {parts}"
        raise ConfigError(f"{head}; allowed: {allowed}")

    missing = dataclasses.MISSING
    for f in dataclasses.fields(cls):
        if f.init and f.name not in data and f.default is missing and f.default_factory is missing:
            raise ConfigError(
                f"missing required config key {_join(path, f.name)!r} ({cls.__name__}.{f.name})"
            )
    kwargs = {k: _convert(data[k], tp, _join(path, k)) for k, tp in types_.items() if k in data}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except TypeError as e:
        raise ConfigTypeError(f"{path}: {e}" if path else str(e)) from e
    except ValueError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from e


def _bool_hint(value: Any) -> str:
    yaml_11 = " (YAML reads yes/no/on/off/true/false as booleans: quote the word to get a string)"
    return yaml_11 if isinstance(value, bool) else ""


def _looks_numeric(text: str) -> bool:
    # "512", "3e-4", "1_000", "inf": a number someone quoted; "fast" or "" is not.
    try:
        float(text.strip().replace("_", ""))
    except ValueError:
        return False
    return bool(text.strip())


def _wrong_type(key: str, value: Any, expected: str) -> ConfigTypeError:
    hint = _bool_hint(value) if expected == "str" else ""
    if isinstance(value, str) and expected in ("int", "float") and _looks_numeric(value):
        hint = " (a quoted number is a string in YAML: write it without quotes)"
    return ConfigTypeError(f"{key}={value!r} must be {expected}, got {type(value).__name__}{hint}")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the type hint `tp` and return it in its config form (nested dataclasses built)."""
    if tp is Any or tp is object:
        return value
    origin, args = get_origin(tp) or tp, get_args(tp)  # a bare `list` or `Mapping` is its own origin

    if origin in (Union, types.UnionType):
        return _convert_union(value, args, key)
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        hint = _bool_hint(value) if any(isinstance(a, str) for a in args) else ""
        raise ConfigError(f"{key}={value!r} must be one of {list(args)}{hint}")
    if tp is type(None):
        if value is None:
            return None
        raise _wrong_type(key, value, "null")
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else from_dict(tp, value, key)
    if tp in (bool, int, float, str):
        # A bool is an int to Python, never to a config; an int is accepted where a float is expected.
        if isinstance(value, (int, float) if tp is float else tp) and (
            tp is bool or not isinstance(value, bool)
        ):
            return float(value) if tp is float else value
        raise _wrong_type(key, value, "bool (true or false)" if tp is bool else tp.__name__)
    if origin in (list, tuple, Sequence):
        if not isinstance(value, (list, tuple)):
            raise _wrong_type(key, value, f"a list ({_type_name(tp)})")
        if origin is not tuple:
            return [_convert(v, args[0] if args else Any, f"{key}[{i}]") for i, v in enumerate(value)]
        if not args:
            return tuple(value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key}={list(value)!r} must have {len(args)} items ({_type_name(tp)})")
        return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise _wrong_type(key, value, f"a mapping ({_type_name(tp)})")
        kt, vt = args if args else (Any, Any)
        out = {}
        for k, v in value.items():
            _convert(k, kt, f"{key} key {k!r}")
            out[k] = _convert(v, vt, _join(key, k))
        return out
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        for member in tp:
            if value == member.value or value == member.name or value is member:
                return member
        raise ConfigError(f"{key}={value!r} must be one of {[m.value for m in tp]}")
    if tp is Path or (isinstance(tp, type) and issubclass(tp, os.PathLike)):
        if isinstance(value, (str, os.PathLike)):
            return tp(value)
        raise _wrong_type(key, value, "a path (str)")
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise _wrong_type(key, value, _type_name(tp))
    raise TypeError(f"{key}: unsupported type hint {tp!r} in a config dataclass")


def _convert_union(value: Any, args: tuple[Any, ...], key: str) -> Any:
    if value is None:
        if type(None) in args:
            return None
        raise ConfigTypeError(
            f"{key}=None is not allowed (must be {' | '.join(_type_name(a) for a in args)})"
        )
    arms = [a for a in args if a is not type(None)]
    if len(arms) == 1:  # Optional[X]: X's own error is the clearest one
        return _convert(value, arms[0], key)
    # Exact type matches first, so that `int | float` keeps an int and `bool | int` keeps a bool.
    for arm in arms:
        if arm in (bool, int, float, str) and type(value) is arm:
            return value
    for arm in arms:
        with contextlib.suppress(ConfigError, TypeError):
            return _convert(value, arm, key)
    expected = " | ".join(_type_name(a) for a in args)
    raise ConfigTypeError(f"{key}={value!r} must be {expected}, got {type(value).__name__}")


def _is_instance(value: Any) -> bool:  # a dataclass instance, not a dataclass type
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


def _plain(value: Any) -> Any:
    if _is_instance(value):
        return to_dict(value)
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def to_dict(obj: Any) -> dict[str, Any]:
    """The plain-dict form of a config dataclass (init fields only; tuples become lists), for YAML and JSON."""
    if not _is_instance(obj):
        raise TypeError(f"to_dict needs a dataclass instance, got {type(obj).__name__}")
    return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}


# YAML 1.2 floats that YAML 1.1 (PyYAML) reads as strings: `1e-3`, `3.0e4` (no dot or no exponent sign).
_FLOAT_12 = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")


def _yaml() -> Any:
    try:
        import yaml
    except ImportError as e:
        raise ImportError(
            "reading and writing YAML configs needs PyYAML: pip install vermeil[train] (or pip install pyyaml)"
        ) from e
    return yaml


@functools.lru_cache(maxsize=1)
def _loader() -> type:
    """A SafeLoader subclass: YAML 1.2 exponent floats, duplicate keys rejected."""
    yaml = _yaml()

    class StrictLoader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            seen: set[str] = set()
            for key_node, _ in node.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                    if key_node.value in seen:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"duplicate key {key_node.value!r}", key_node.start_mark
                        )
                    seen.add(key_node.value)
            return super().construct_mapping(node, deep=deep)

    # add_implicit_resolver copies the resolver table onto the subclass: yaml.SafeLoader itself is unchanged.
    StrictLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_12, list("-+.0123456789"))
    return StrictLoader


@functools.lru_cache(maxsize=1)
def _dumper() -> type:
    """A SafeDumper subclass that knows the same floats, so it quotes a string such as '1e3' when writing it."""
    dumper = type("Dumper", (_yaml().SafeDumper,), {})
    dumper.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_12, list("-+.0123456789"))
    return dumper


def parse_yaml_value(text: str, source: str | None = None) -> Any:
    """Parse one YAML scalar or flow value (`1e-3` -> 0.001, `[1, 2]`, `null`); errors name `source`."""
    yaml = _yaml()
    try:
        return yaml.load(text, Loader=_loader())  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        context = getattr(e, "context", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        detail = f"{context}, {problem}" if context else problem
        source = repr(text) if source is None else source
        raise ConfigError(f"malformed YAML in {source}{where}: {detail}") from e


def load_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML config file into a plain dict (`yaml.safe_load`, YAML 1.2 floats, no duplicate keys)."""
    _yaml()  # a missing PyYAML is reported before a missing file
    data = parse_yaml_value(Path(path).read_text(encoding="utf-8"), os.fspath(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{os.fspath(path)}: the top level of a config must be a mapping, got {type(data).__name__}"
        )
    return data


def load_config(cls: type[T], path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> T:
    """`from_dict(cls, apply_overrides(load_yaml(path), overrides))`: a config file plus command-line overrides."""
    return from_dict(cls, apply_overrides(load_yaml(path), overrides))


def save_yaml(obj_or_dict: Any, path: str | os.PathLike[str]) -> None:
    """Write a config dataclass (through `to_dict`) or a plain dict to YAML, atomically, keys in field order."""
    from vermeil.checkpoint import atomic_write

    yaml = _yaml()
    if not (_is_instance(obj_or_dict) or isinstance(obj_or_dict, Mapping)):
        raise TypeError(f"save_yaml needs a dataclass instance or a dict, got {type(obj_or_dict).__name__}")
    text = yaml.dump(
        _plain(obj_or_dict), Dumper=_dumper(), sort_keys=False, default_flow_style=False, allow_unicode=True
    )
    with atomic_write(path, "w") as f:
        f.write(text)


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply `key.sub=value` overrides (values parsed as YAML) to a copy of a config dict.

    Missing intermediate mappings are created, so that an unknown key reaches `from_dict`, which names it.
    """
    if isinstance(overrides, str):
        raise TypeError("overrides must be a list of 'key=value' strings, got one str")
    out: dict[str, Any] = copy.deepcopy(dict(data))
    for item in overrides:
        if not isinstance(item, str) or "=" not in item:
            raise ConfigError(
                f"malformed override {item!r}: expected key=value with a dotted key, e.g. train.lr=1e-3"
            )
        dotted, text = item.split("=", 1)
        dotted = dotted.strip()
        parts = dotted.split(".")
        if not dotted or any(not p for p in parts):
            raise ConfigError(f"malformed override {item!r}: the key {dotted!r} has an empty part")
        value = parse_yaml_value(text)
        node: dict[str, Any] = out
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                prefix = ".".join(parts[: i + 1])
                raise ConfigError(
                    f"override {item!r}: {prefix}={child!r} is not a mapping, so it has no key {parts[i + 1]!r}"
                )
            node = child
        node[parts[-1]] = value
    return out


def pick_preset(presets: Mapping[str, T], name: str, *, what: str = "preset") -> T:
    """A copy of the preset of exactly this name (ConfigError with the nearest and available names)."""
    if not isinstance(name, str) or name not in presets:
        names = sorted(presets)
        raise ConfigError(f"unknown {what} {name!r}{did_you_mean(name, names)}; available: {names}")
    return copy.deepcopy(presets[name])


def merge_preset(data: Mapping[str, Any], presets: Mapping[str, Any], path: str = "") -> dict[str, Any]:
    """Resolve a `preset: name` key: `{"preset": "debug", "n_layers": 4}` -> the "debug" preset's fields with
    `n_layers=4` on top (nested dicts merge key by key); `data` unchanged without one."""
    out = dict(data)
    if "preset" not in out:
        return out
    name = out.pop("preset")
    base = pick_preset(presets, name, what=f"preset for {path}" if path else "preset")
    if not (_is_instance(base) or isinstance(base, Mapping)):
        raise TypeError(f"preset {name!r} must be a dataclass instance or a dict, got {type(base).__name__}")
    return _deep_merge(_plain(base), out)


def _deep_merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(out.get(k), dict) and isinstance(v, Mapping) else v
    return out

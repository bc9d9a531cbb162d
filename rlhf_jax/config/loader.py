"""Typed configs from YAML plus `key=value` overrides, with errors that name the key.

Generic over frozen dataclasses: field types are read from the annotations, so adding a field
to a section needs no change here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from rlhf_jax.config.schema import MOVED_KEYS, PATHS, RANGES, Config, DPOConfig, PPOConfig
from rlhf_jax.errors import RlhfJaxError

T = TypeVar("T")


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, default: Any = None) -> Any:
    """Check `value` against annotation `tp`; ints are accepted where floats are expected.

    A mapping given for a dataclass-typed key is merged into `default` (the section as it
    stands without the mapping), not into the class defaults: `sft.optim.lr=1e-4` changes
    only the learning rate of SFT's optimizer, whose own defaults differ from OptimConfig's.
    """
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, default)
            except RlhfJaxError as e:
                errors.append(str(e))
        expected = " or ".join(
            _type_name(a)
            for a in (
                *[a for a in args if a is not type(None)],
                *[a for a in args if a is type(None)],
            )
        )
        raise RlhfJaxError(f"config key '{key}': expected {expected}, got {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        # `True == 1`: a bool is only one of the choices when a choice is a bool
        is_bool = isinstance(value, bool) and not any(isinstance(a, bool) for a in allowed)
        if is_bool or value not in allowed:
            raise RlhfJaxError(
                f"config key '{key}': {value!r} is not one of {list(typing.get_args(tp))}"
            )
        return value
    if dataclasses.is_dataclass(tp):
        if value is None:  # an empty section in YAML (`ppo:` and nothing under it)
            value = {}
        if not isinstance(value, dict):
            raise RlhfJaxError(f"config key '{key}': expected a mapping, got {value!r}")
        base = default if isinstance(default, tp) else None
        return from_dict(tp, value, prefix=key + ".", base=base)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise RlhfJaxError(f"config key '{key}': expected a mapping, got {value!r}")
        return dict(value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise RlhfJaxError(f"config key '{key}': expected a list, got {value!r}")
        (item_tp, *_rest) = typing.get_args(tp)
        return tuple(_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RlhfJaxError(f"config key '{key}': expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RlhfJaxError(f"config key '{key}': expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise RlhfJaxError(f"config key '{key}': expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise RlhfJaxError(f"config key '{key}': expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config annotation {tp!r} for '{key}'")  # a bug, not user input


def _unknown_key(key: str, known: list[str]) -> RlhfJaxError:
    if key in MOVED_KEYS:
        return RlhfJaxError(
            f"config key '{key}' has moved: set '{MOVED_KEYS[key]}' (a hyperparameter of the "
            "part that uses it, see docs/algorithms.md)"
        )
    leaf = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(leaf, known, n=1)
    hint = (
        f"; did you mean '{key.rsplit('.', 1)[0] + '.' if '.' in key else ''}{close[0]}'?"
        if close
        else f" (valid keys here: {', '.join(known)})"
    )
    return RlhfJaxError(f"config key '{key}' is unknown{hint}")


def _default_of(cls: type, name: str, base: Any) -> Any:
    """The value field `name` has before any override: `base`'s, else the field's default."""
    if base is not None:
        return getattr(base, name)
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "", base: T | None = None) -> T:
    """Build dataclass `cls` from a nested dict; unknown keys and wrong types are errors.

    Keys absent from `data` keep their value in `base` (default: the class's defaults), also
    inside nested sections.
    """
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise _unknown_key(prefix + str(key), names)
        default = _default_of(cls, key, base)
        kwargs[key] = _coerce(value, hints[key], prefix + key, default)
        if key in PATHS.get(cls.__name__, ()) and kwargs[key] is not None:
            kwargs[key] = _path(kwargs[key], prefix + key)
    for key in kwargs:
        _check_range(cls, key, kwargs[key], prefix)
    try:
        if base is not None:
            return dataclasses.replace(base, **kwargs)
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise RlhfJaxError(f"config section '{prefix.rstrip('.') or 'top'}': {e}") from None


def _path(value: str, key: str) -> str:
    """A file or folder path as the user means it: `~` expanded (YAML and key=value overrides
    never pass through a shell that would); an empty one names its key here, not as a bare
    "No such file: ''" later."""
    if not value.strip():
        raise RlhfJaxError(
            f"config key '{key}' is an empty path; name a file or folder, or set null for none"
        )
    return os.path.expanduser(value)


def _check_range(cls: type, name: str, value: Any, prefix: str) -> None:
    """A numeric value outside its field's declared range (RANGES) names the key."""
    allowed = RANGES.get(cls.__name__, {}).get(name)
    if allowed is None or value is None or isinstance(value, bool):
        return
    if isinstance(value, int | float) and not allowed.contains(value):
        raise RlhfJaxError(f"config key '{prefix}{name}' must be {allowed}, got {value!r}")


def to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dict (for writing the resolved config next to a run's outputs)."""
    return dataclasses.asdict(config)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` strings; values are parsed as YAML scalars (`0.05`, `true`, `null`)."""
    for item in overrides:
        if "=" not in item:
            raise RlhfJaxError(f"override '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if node.get(part) is None:  # absent, or an empty section in the YAML file
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise RlhfJaxError(f"override '{item}': '{part}' is not a section")
        node[parts[-1]] = value
    return data


class _DuplicateKey(Exception):
    def __init__(self, key: Any, first: int, again: int):
        super().__init__(key)
        self.key, self.first, self.again = key, first, again


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys in a mapping and drops the first without a
    word; a config that sets a section, a key or a compare row twice is refused instead."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False):
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` merges, by design
            continue
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        with contextlib.suppress(TypeError):  # an unhashable key fails in PyYAML's own way
            if key in seen:
                raise _DuplicateKey(key, seen[key], line)
            seen[key] = line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def _read_yaml(file: Path) -> Any:
    try:
        return yaml.load(file.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except _DuplicateKey as e:
        raise RlhfJaxError(
            f"{file}:{e.again}: key '{e.key}' is set twice in the same mapping (first at line "
            f"{e.first}); YAML would keep only the second. Merge the two into one"
        ) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{file}:{mark.line + 1}" if mark else str(file)
        raise RlhfJaxError(f"{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    except UnicodeDecodeError:
        raise RlhfJaxError(f"{file}: not UTF-8 text") from None


def load_config(cls: type[T], path: str | Path | None, overrides: list[str] = ()) -> T:
    """Read YAML file `path` (or defaults when None), apply overrides, validate into `cls`."""
    data: dict[str, Any] = {}
    if path is not None:
        file = Path(path)
        if file.is_dir():
            raise RlhfJaxError(f"{file}: is a folder; --config takes a YAML file (see configs/)")
        if not file.is_file():
            raise RlhfJaxError(f"{file}: config file not found")
        data = _read_yaml(file) or {}
        if not isinstance(data, dict):
            raise RlhfJaxError(f"{file}: the top level must be a mapping of sections")
        try:  # `ppo.beta: 0.1` in the file means what the override ppo.beta=0.1 means
            data = nest_dotted(data)
        except RlhfJaxError as e:
            raise RlhfJaxError(f"{file}: {e}") from None
    data = apply_overrides(data, list(overrides))
    try:
        return from_dict(cls, data)
    except RlhfJaxError as e:
        if path is not None:
            raise RlhfJaxError(f"{path}: {e}") from None
        raise


def nest_dotted(data: dict[Any, Any], prefix: str = "") -> dict[Any, Any]:
    """`{"a.b": 1, "c": {"d": 2}}` -> `{"a": {"b": 1}, "c": {"d": 2}}`, at every level. A key
    given twice (`a.b` beside `a: {b: ...}`) is refused: neither spelling silently wins."""
    out: dict[Any, Any] = {}
    for key, value in data.items():
        parts = key.split(".") if isinstance(key, str) else [key]
        if isinstance(value, dict):
            value = nest_dotted(value, f"{prefix}{key}.")
        nested: Any = value
        for part in reversed(parts[1:]):
            nested = {part: nested}
        _merge_into(out, parts[0], nested, prefix)
    return out


def _merge_into(node: dict, key: Any, value: Any, prefix: str) -> None:
    old = node.get(key)
    if key not in node or (old is None and isinstance(value, dict)):  # `ppo:` left empty
        node[key] = value
    elif isinstance(old, dict) and isinstance(value, dict):
        for k, v in value.items():
            _merge_into(old, k, v, f"{prefix}{key}.")
    else:
        raise RlhfJaxError(
            f"config key '{prefix}{key}' is set twice, as a dotted key and inside its section; "
            "keep one"
        )


def _section_runs(cfg: Config, key: str, section: str, cls: type) -> dict[str, Config]:
    """{name: cfg with `compare.<key>.<name>`'s changes merged into `cfg.<section>`}."""
    runs: dict[str, Config] = {}
    for name, changes in getattr(cfg.compare, key).items():
        prefix = f"compare.{key}.{name}."
        if not isinstance(changes, dict):
            raise RlhfJaxError(f"config key '{prefix[:-1]}': expected a mapping of {section} keys")
        try:
            merged = from_dict(cls, nest_dotted(changes), prefix=prefix, base=getattr(cfg, section))
            runs[name] = dataclasses.replace(cfg, **{section: merged})
        except RlhfJaxError as e:
            raise RlhfJaxError(f"{e} (in {prefix[:-1]})") from None
    return runs


def compare_preference_runs(cfg: Config) -> dict[str, Config]:
    """The offline preference runs of `rlhf-jax compare`: for each `compare.preference` entry
    the config with its changes merged into the `dpo` section."""
    return _section_runs(cfg, "preference", "dpo", DPOConfig)


def compare_runs(cfg: Config) -> dict[str, Config]:
    """The runs of `rlhf-jax compare`: for each `compare.algorithms` entry the config with its
    changes merged into the `ppo` section, then (with `compare.reward_fn`) each once more with
    that reward function as `<name>_gold`. Errors name the key, e.g.
    'compare.algorithms.grpo.samples_per_prompt'."""
    runs = _section_runs(cfg, "algorithms", "ppo", PPOConfig)
    if cfg.compare.reward_fn is not None:
        for name, run in list(runs.items()):
            gold = dataclasses.replace(run.ppo, reward_fn=cfg.compare.reward_fn)
            runs[f"{name}_gold"] = dataclasses.replace(run, ppo=gold)
    return runs

"""Reading configs: TOML files, ``--set`` overrides, cattrs structuring, one-line errors."""

from __future__ import annotations

import difflib
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, get_args, get_origin

import attrs
import cattrs
from cattrs.errors import (
    AttributeValidationNote,
    ClassValidationError,
    ForbiddenExtraKeysError,
    IterableValidationNote,
)
from cattrs.gen import make_dict_structure_fn, make_mapping_structure_fn

from mmuemu.config.values import FieldError, Size, parse_size_value
from mmuemu.errors import ConfigError

__all__ = [
    "apply_overrides",
    "did_you_mean",
    "load_raw",
    "parse_overrides",
    "parse_value",
    "show",
    "split_key",
    "structure",
    "unstructure",
]


def load_raw(path: str | Path) -> dict[str, Any]:
    """The tables of a TOML file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")  # TOML is UTF-8 whatever the locale
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a config file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (configs are TOML)") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it ({e.strerror or e})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None


def parse_value(text: str) -> Any:
    """A ``--set`` value: a TOML value (``4``, ``true``, ``[0, 4]``, ``"x"``), else the
    text itself as a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_overrides(pairs: Iterable[str], source: str) -> dict[str, Any]:
    """``["machine.arch=arm64", ...]`` as a mapping of dotted keys to values."""
    out: dict[str, Any] = {}
    for item in pairs:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{source}: override {item!r} must look like key=value "
                              f"(e.g. machine.arch=arm64)")
        out[key.strip()] = parse_value(value.strip())
    return out


def apply_overrides(raw: dict[str, Any], pairs: Mapping[str, Any], source: str) -> None:
    """Set each dotted key of ``pairs`` in ``raw`` (creating tables on the way; a number
    selects a list element)."""
    for key, value in pairs.items():
        parts = split_key(key)
        if any(not p for p in parts):
            raise ConfigError(f"{source}: override key {key!r} has an empty part")
        node: Any = raw
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            where = ".".join(parts[: i + 1])
            if isinstance(node, list):
                if not (part.isascii() and part.isdigit()) or int(part) >= len(node):
                    raise ConfigError(f"{source}: {where}: index {part!r} out of range: the list "
                                      f"has {len(node)} element{'s' * (len(node) != 1)}")
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    if part not in node:
                        node[part] = {}
                    node = node[part]
            else:
                raise ConfigError(f"{source}: {'.'.join(parts[:i])} = {node!r} is not a table, "
                                  f"so {key!r} cannot be set")


def show(value: Any) -> str:
    """A value as a config spells it (``true``, ``'x'``, ``[0, 4]``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(map(show, value)) + "]"
    return repr(value)


def split_key(key: str) -> list[str]:
    """The parts of a dotted key; a double-quoted part may hold dots
    (``sweep."machine.arch"``)."""
    parts: list[str] = []
    cur: list[str] = []
    quoted = False
    for ch in key:
        if ch == '"':
            quoted = not quoted
        elif ch == "." and not quoted:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` when a choice is close to ``word``, else ``""``."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


# ---------------------------------------------------------------- structuring
def _strict(kind: type, what: str) -> Any:
    def hook(value: Any, _: Any) -> Any:
        if isinstance(value, bool) and kind is not bool:
            raise TypeError(what)
        if kind is float and isinstance(value, int):
            return float(value)
        if not isinstance(value, kind):
            raise TypeError(what)
        return value
    return hook


def _any(value: Any, _: Any) -> Any:
    return value


def _make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
    conv.register_structure_hook(int, _strict(int, "expected an integer"))
    conv.register_structure_hook(float, _strict(float, "expected a number"))
    conv.register_structure_hook(bool, _strict(bool, "expected true or false"))
    conv.register_structure_hook(str, _strict(str, "expected a string"))
    conv.register_structure_hook(Size, lambda v, _: parse_size_value(v))
    conv.register_structure_hook(Any, _any)
    conv.register_unstructure_hook(Size, int)

    def tables_only(inner: Any) -> Any:
        def hook(value: Any, t: Any) -> Any:
            if not isinstance(value, dict):
                raise TypeError("expected a table")
            return inner(value, t)
        return hook

    def class_hook(tp: Any) -> Any:
        return tables_only(make_dict_structure_fn(tp, conv, _cattrs_forbid_extra_keys=True,
                                                  _cattrs_detailed_validation=True))

    def mapping_hook(tp: Any) -> Any:
        # not conv.gen_structure_mapping: it registers its function for ``tp`` directly,
        # replacing this hook (and its type check) after the first use
        return tables_only(make_mapping_structure_fn(tp, conv, dict, detailed_validation=True))

    def list_hook(tp: Any) -> Any:
        (elem,) = get_args(tp) or (Any,)

        def hook(value: Any, t: Any) -> Any:
            if not isinstance(value, list):
                raise TypeError("expected a list")
            out, errors = [], []
            for i, v in enumerate(value):
                try:
                    out.append(conv.structure(v, elem))
                except Exception as e:
                    e.add_note(IterableValidationNote(f"@ index {i}", i, elem))
                    errors.append(e)
            if errors:
                raise cattrs.IterableValidationError("while structuring a list", errors, tp)
            return out
        return hook

    conv.register_structure_hook_factory(attrs.has, class_hook)
    conv.register_structure_hook_factory(lambda t: get_origin(t) is dict, mapping_hook)
    conv.register_structure_hook_factory(lambda t: get_origin(t) is list, list_hook)
    return conv


_CONV = _make_converter()


def unstructure(obj: Any) -> dict[str, Any]:
    """A config as plain tables (``None`` values left out, as TOML has no null)."""
    def strip(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if v is not None}
        if isinstance(x, list):
            return [strip(v) for v in x]
        return x
    return strip(_CONV.unstructure(obj))


def structure(raw: dict[str, Any], cls: type, source: str) -> Any:
    """``raw`` as ``cls``; a ConfigError naming the first bad key otherwise."""
    try:
        return _CONV.structure(raw, cls)
    except Exception as e:
        path, leaf = _first_leaf(e, ())
        raise ConfigError(_describe(source, raw, cls, path, leaf)) from None


def _first_leaf(e: BaseException, path: tuple[Any, ...]) -> tuple[tuple[Any, ...], BaseException]:
    for note in getattr(e, "__notes__", ()):
        if isinstance(note, AttributeValidationNote):
            path = (*path, note.name)
        elif isinstance(note, IterableValidationNote):
            path = (*path, note.index)
    if isinstance(e, ClassValidationError | cattrs.IterableValidationError) and e.exceptions:
        return _first_leaf(e.exceptions[0], path)
    return path, e


def _lookup(raw: Any, path: tuple[Any, ...]) -> Any:
    for p in path:
        try:
            raw = raw[p]
        except (KeyError, IndexError, TypeError):
            return None
    return raw


def _dotted(path: Iterable[Any]) -> str:
    return ".".join(str(p) for p in path)


def _describe(source: str, raw: dict[str, Any], cls: type, path: tuple[Any, ...], leaf: BaseException) -> str:
    if isinstance(leaf, ForbiddenExtraKeysError):
        allowed = [f.name for f in attrs.fields(leaf.cl) if f.name != "source"]
        bad = sorted(map(str, leaf.extra_fields))[0]  # a dict source may have other keys
        key = _dotted((*path, bad))
        hint = did_you_mean(bad, allowed)
        if hint:
            hint = did_you_mean(key, [_dotted((*path, a)) for a in allowed])
        return (f"{source}: unknown key {key!r}{hint}; "
                f"allowed in {_dotted(path) or 'the top level'}: {', '.join(allowed)}")
    if isinstance(leaf, FieldError):
        path = (*path, leaf.name)
    value = _lookup(raw, path)
    msg = str(leaf) or type(leaf).__name__
    if isinstance(leaf, KeyError):
        key = leaf.args[0] if leaf.args else msg
        if path and path[-1] == key:
            path = path[:-1]
        return f"{source}: {_dotted(path) or 'config'}: missing required key {key!r}"
    if isinstance(leaf, TypeError) and "missing" in msg:
        missing = msg.rsplit(":", 1)[-1].strip()
        return f"{source}: {_dotted(path) or 'config'}: missing required key {missing}"
    return f"{source}: {_dotted(path)} = {show(value)}: {msg}"

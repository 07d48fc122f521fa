"""JSON documents to frozen dataclasses and back, checked once at the edge.

Every document of a build (manifest.json here; plan.json, coordinator.json and
deploy.json in ``llc.bundle.schema``) is a tree of frozen dataclasses. Reading
one checks every key against the dataclass: unknown keys, missing keys and
wrong types are one :class:`DocumentError` that names the file and the key, so
no reader absorbs drift with fallbacks. It lives on the device side because
the device reads its manifest without llc installed.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class DocumentError(ValueError):
    """A build document that is not what this llc writes: ``where`` is the file, then the key."""


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, where)
            except DocumentError as e:
                errors.append(e)
        raise errors[0]
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise DocumentError(f"{where}: expected a list, got {type(value).__name__}")
        items = [_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise DocumentError(f"{where}: expected a mapping, got {type(value).__name__}")
        return {str(k): _convert(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp in (int, str, bool) and isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise DocumentError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r:.60}")


def from_dict(cls: type[T], data: Any, where: str) -> T:
    """Build ``cls`` from parsed JSON; every problem names ``where`` and the key."""
    if not isinstance(data, dict):
        raise DocumentError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise DocumentError(f"{where}: unknown key {unknown[0]!r}")
    values = {}
    for name, f in fields.items():
        if name in data:
            values[name] = _convert(hints[name], data[name], f"{where}.{name}" if where else name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise DocumentError(f"{where}: missing key {name!r}")
    return cls(**values)


def to_dict(obj: Any) -> Any:
    """The JSON form of a document (dataclasses, tuples and dicts, recursively)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def read(cls: type[T], path: Path, fmt: int) -> T:
    """Read a document of format ``fmt``; an older or newer format is named as such."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise DocumentError(f"{path}: cannot read ({e.strerror or e})") from None
    except ValueError as e:
        raise DocumentError(f"{path}: not JSON ({e})") from None
    got = data.get("format") if isinstance(data, dict) else None
    if got != fmt:
        raise DocumentError(f"{path}: format {got!r}, this llc reads format {fmt}; "
                            f"compile the build again with this llc")
    return from_dict(cls, data, str(path))


def write(path: Path, doc: Any) -> None:
    """Write a document as stable, readable JSON (same document, same bytes)."""
    Path(path).write_text(json.dumps(to_dict(doc), indent=1) + "\n")

"""Checking a pruner's options against its dataclass fields before it is built.

Options reach a pruner from the CLI (``--option seed=3``, parsed as JSON or kept as text), from a calibration config,
from lmms-eval's ``model_args`` (always text) or from Python. Each value is converted to its field's declared type when
the conversion is exact (``"3"`` or ``3.0`` for an int, ``3`` for a float, ``"true"`` for a bool) and refused with a
message naming the option, the value and the type otherwise, so that ``seed=abc`` fails at once instead of deep inside
a generation.
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import fields
from typing import Any

from vlprune.errors import VlpruneError


def check_choice(option: str, value: object, valid: tuple[str, ...]) -> str:
    """``value`` if it is one of ``valid``; else a VlpruneError naming the option, the value and the choices."""
    if value not in valid:
        raise VlpruneError(f"{option}={value!r} is not valid; choose one of {', '.join(map(repr, valid))}")
    return value


class _MismatchError(Exception):
    """The value does not fit the type (internal: turned into a VlpruneError naming the option)."""


def coerce_options(cls: type, method: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with every value converted to the type of ``cls``'s field of the same name.

    Raises:
        VlpruneError: a value that does not fit its field's type; the message names the method, the option, the value
            and the expected type.
    """
    hints = typing.get_type_hints(cls)
    declared = {f.name: hints.get(f.name, Any) for f in fields(cls) if f.init}
    coerced = {}
    for name, value in options.items():
        annotation = declared.get(name, Any)
        try:
            coerced[name] = _coerce(value, annotation)
        except _MismatchError:
            raise VlpruneError(
                f"option {name}={value!r} of method {method!r} must be {_describe(annotation)}"
            ) from None
    return coerced


def _coerce(value: Any, annotation: Any) -> Any:
    if annotation is Any:
        return value
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, typing.get_args(annotation))
    if origin is typing.Literal:
        if value in typing.get_args(annotation):
            return value
        raise _MismatchError
    if origin in (list, tuple):
        return _coerce_sequence(value, origin, typing.get_args(annotation))
    if annotation is type(None):
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")):
            return None
        raise _MismatchError
    if annotation is bool:
        return _coerce_bool(value)
    if annotation is int:
        return _coerce_int(value)
    if annotation is float:
        return _coerce_float(value)
    if annotation is str:
        if isinstance(value, str):
            return value
        raise _MismatchError
    return value  # a type this module does not know: the pruner's own checks apply


def _coerce_union(value: Any, members: tuple[Any, ...]) -> Any:
    # None first, so that "none" is not read as a string; exact types before conversions (3 stays an int in int|float).
    ordered = sorted(members, key=lambda member: (member is not type(None), not _is_instance(value, member)))
    for member in ordered:
        try:
            return _coerce(value, member)
        except _MismatchError:
            continue
    raise _MismatchError


def _is_instance(value: Any, annotation: Any) -> bool:
    return isinstance(annotation, type) and isinstance(value, annotation) and not isinstance(value, bool)


def _coerce_sequence(value: Any, origin: type, args: tuple[Any, ...]) -> Any:
    if isinstance(value, str):
        text = value.strip()
        try:
            value = json.loads(text) if text.startswith("[") else [item for item in text.split(",") if item.strip()]
        except json.JSONDecodeError:
            raise _MismatchError from None
    if not isinstance(value, list | tuple):
        raise _MismatchError
    item_type = args[0] if args else Any
    items = [_coerce(item, item_type) for item in value]
    return tuple(items) if origin is tuple else items


def _coerce_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise _MismatchError


def _coerce_int(value: Any) -> int:
    if isinstance(value, bool):
        raise _MismatchError
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            raise _MismatchError from None
    raise _MismatchError


def _coerce_float(value: Any) -> float:
    if isinstance(value, bool):
        raise _MismatchError
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            raise _MismatchError from None
    raise _MismatchError


def _describe(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(member) for member in typing.get_args(annotation))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(choice) for choice in typing.get_args(annotation))
    if origin in (list, tuple):
        args = typing.get_args(annotation)
        return f"a list of {_describe(args[0]) if args else 'values'} (e.g. [2, 6])"
    names = {int: "an int", float: "a number", bool: "true or false", str: "a string", type(None): "none"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))

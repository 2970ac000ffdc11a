"""The one cattrs converter: wire dicts in, frozen models out, and back.

Structuring is strict about types (a number where a string belongs is an error, not a
silent ``str(5)``) and lenient about shape (unknown keys are ignored, optional keys may be
missing). The fast converter runs first; only when it fails does a detailed one run again to
name the offending field in :class:`~dedalus_async.ResponseDecodeError`.

Unstructuring (:func:`unstructure`) is the way back, for whoever prints models as JSON (the
command line): field names as the API spells them, ``None`` fields left out, tuples as
lists, times as RFC 3339 text in UTC with ``Z``. What it produces, :func:`structure` reads
back to an equal model.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import attrs
import cattrs
import cattrs.gen

from ._errors import ResponseDecodeError
from ._models import (
    ArtifactRef,
    Execution,
    ExecutionEvent,
    ExecutionOutput,
    LifecycleStatus,
    LogCapture,
    LogPublication,
    LogReadToken,
    LogStatus,
    Machine,
)

__all__ = ["structure", "unstructure", "unstructure_datetime"]

T = TypeVar("T")


def _structure_str(value: object, _: object) -> str:
    if type(value) is str:
        return value
    raise TypeError(f"expected a string, got {type(value).__name__}")


def _structure_int(value: object, _: object) -> int:
    # bool is an int subclass; a JSON true where a number belongs is a wrong type
    if type(value) is int:
        return value
    raise TypeError(f"expected an integer, got {type(value).__name__}")


def _structure_bool(value: object, _: object) -> bool:
    if type(value) is bool:
        return value
    raise TypeError(f"expected a boolean, got {type(value).__name__}")


# RFC 3339 (section 5.6): "T" and "Z" may be lower case, the time may carry any number of
# fractional digits and a leap second (:60). datetime.fromisoformat takes the common form
# directly; this is the fallback for the rest.
_RFC3339 = re.compile(
    r"(\d{4}-\d{2}-\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?([Zz]|[+-]\d{2}:\d{2})?"
)


def _structure_float(value: object, _: object) -> float:
    # a JSON number, integral or not (a machine's vcpu may be 1 or 0.5); not a bool, not text
    if type(value) is float or type(value) is int:
        return float(value)
    raise TypeError(f"expected a number, got {type(value).__name__}")


def _structure_datetime(value: object, _: object) -> datetime:
    if type(value) is not str:
        raise TypeError(f"expected an RFC 3339 date-time string, got {type(value).__name__}")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        parsed = _parse_rfc3339(value)
    # RFC 3339 requires an offset; tolerate a server that omits it by reading it as UTC
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _parse_rfc3339(value: str) -> datetime:
    match = _RFC3339.fullmatch(value)
    if match is None:
        raise ValueError(f"not an RFC 3339 date-time: {value[:40]!r}")
    date, hour, minute, second, fraction, offset = match.groups()
    leap = second == "60"
    text = f"{date}T{hour}:{minute}:{'59' if leap else second}"
    # fromisoformat (3.11+) reads any number of fractional digits (truncated to
    # microseconds) and an upper-case "Z"
    if fraction:
        text += "." + fraction
    if offset:
        text += offset.upper()
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"not an RFC 3339 date-time: {value[:40]!r}") from None
    # 23:59:60 is the leap second after 23:59:59: the same instant as the next 00:00:00
    return parsed + timedelta(seconds=1) if leap else parsed


_BYTE_COUNT = re.compile(r"[0-9]{1,20}")


def _structure_byte_count(value: object, _: object) -> int:
    # the API sends 64-bit byte counts as decimal strings (JSON numbers lose precision in
    # some languages); a plain integer is read too
    if type(value) is int and value >= 0:
        return value
    if type(value) is str and _BYTE_COUNT.fullmatch(value) is not None:
        return int(value)
    raise TypeError(f"expected a byte count (a string of digits), got {value!r:.40}")


def _structure_str_tuple(value: object, _: object) -> tuple[str, ...]:
    if type(value) is not list:
        raise TypeError(f"expected a list of strings, got {type(value).__name__}")
    for i, item in enumerate(value):
        if type(item) is not str:
            raise TypeError(f"item {i}: expected a string, got {type(item).__name__}")
    return tuple(value)


def _or_none(hook: Callable[[object, object], T]) -> Callable[[object, object], T | None]:
    """The hook for ``X | None``, given the hook for ``X``."""

    def structure_optional(value: object, type_: object) -> T | None:
        return None if value is None else hook(value, type_)

    return structure_optional


# The hooks of the commonest optional fields in one call, not two (``_or_none`` wraps the
# hook of X): a None or a value of exactly the right type is the answer; anything else goes
# to the hook of X, which raises its error.


def _structure_optional_str(value: object, type_: object) -> str | None:
    if value is None or type(value) is str:
        return value
    return _structure_str(value, type_)


def _structure_optional_int(value: object, type_: object) -> int | None:
    if value is None or type(value) is int:
        return value
    return _structure_int(value, type_)


def _structure_optional_bool(value: object, type_: object) -> bool | None:
    if value is None or type(value) is bool:
        return value
    return _structure_bool(value, type_)


def _equal_to(type_: Any) -> Callable[[Any], bool]:
    """A predicate for ``register_structure_hook_func``: exactly this type."""
    return lambda t: bool(t == type_)


def _make(detailed: bool) -> cattrs.Converter:
    conv = cattrs.Converter(detailed_validation=detailed, forbid_extra_keys=False)

    def structure_artifacts(value: object, _: object) -> tuple[ArtifactRef, ...]:
        if type(value) is not list:
            raise TypeError(f"expected a list, got {type(value).__name__}")
        return tuple(conv.structure(item, ArtifactRef) for item in value)

    def structure_object(value: object, type_: Any) -> Any:
        # a nested record must be a JSON object; cattrs would read a list or a string too
        if type(value) is not dict:
            raise TypeError(f"expected an object, got {type(value).__name__}")
        return nested[type_](value, type_)

    conv.register_structure_hook(str, _structure_str)
    conv.register_structure_hook(int, _structure_int)
    conv.register_structure_hook(bool, _structure_bool)
    conv.register_structure_hook(float, _structure_float)
    conv.register_structure_hook(datetime, _structure_datetime)
    conv.register_structure_hook_func(lambda t: t == tuple[str, ...], _structure_str_tuple)
    conv.register_structure_hook_func(lambda t: t == tuple[ArtifactRef, ...], structure_artifacts)
    # Most fields are optional. cattrs' generic hook for ``X | None`` looks the hook of X
    # up again on every call; binding it once here makes structuring an Execution about a
    # quarter cheaper (an ExecutionOutput a third), and that runs on every poll's response.
    for union, fused in (
        (str | None, _structure_optional_str),
        (int | None, _structure_optional_int),
        (bool | None, _structure_optional_bool),
    ):
        conv.register_structure_hook_func(_equal_to(union), fused)
    optional: list[tuple[Any, Callable[[object, object], Any]]] = [
        (float | None, _structure_float),
        (datetime | None, _structure_datetime),
        (tuple[str, ...] | None, _structure_str_tuple),
        (tuple[ArtifactRef, ...] | None, structure_artifacts),
    ]
    for union, hook in optional:
        conv.register_structure_hook_func(_equal_to(union), _or_none(hook))
    # Byte counts of the log capture are strings on the wire, ints in the model.
    byte_counts = cattrs.gen.make_dict_structure_fn(
        LogCapture,
        conv,
        lost_bytes=cattrs.gen.override(struct_hook=_or_none(_structure_byte_count)),
        unconfirmed_bytes=cattrs.gen.override(struct_hook=_or_none(_structure_byte_count)),
    )
    nested: dict[Any, Callable[[Any, Any], Any]] = {
        LogCapture: byte_counts,
        LogPublication: conv.get_structure_hook(LogPublication),
        LifecycleStatus: conv.get_structure_hook(LifecycleStatus),
    }
    for cls in (LogCapture, LogPublication, LifecycleStatus):
        conv.register_structure_hook(cls, structure_object)
        conv.register_structure_hook_func(
            _equal_to(cls | None), _or_none(_bound(structure_object, cls))
        )
    return conv


def _bound(hook: Callable[[object, Any], T], cls: type[T]) -> Callable[[object, object], T]:
    """``hook`` with its type argument fixed (the ``X | None`` hook passes the union)."""
    return lambda value, _: hook(value, cls)


# --- the way back: models to JSON-ready dicts ------------------------------------------


_MILLISECONDS = "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ"
_MICROSECONDS = "%04d-%02d-%02dT%02d:%02d:%02d.%06dZ"


def unstructure_datetime(value: datetime) -> str:
    """A time as :func:`unstructure` writes it."""
    # milliseconds, the API's own precision, when they lose nothing; microseconds otherwise,
    # so that structure() reads back the same instant
    if value.tzinfo is UTC:
        # what the decoder makes of the API's times: the text isoformat() writes, without
        # its printf (a journal writes 3 times a job; measured with benchmarks.journal_cost)
        micro = value.microsecond
        fields = (value.year, value.month, value.day, value.hour, value.minute, value.second)
        if micro % 1000 == 0:
            return _MILLISECONDS % (*fields, micro // 1000)
        return _MICROSECONDS % (*fields, micro)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)  # as the decoder reads a time without an offset
    utc = value.astimezone(UTC).replace(tzinfo=None)
    timespec = "milliseconds" if utc.microsecond % 1000 == 0 else "microseconds"
    return utc.isoformat(timespec=timespec) + "Z"


def _is_tuple(type_: Any) -> bool:
    # the fields say tuple[X, ...] | None; cattrs dispatches on the value's class, tuple
    return type_ is tuple or getattr(type_, "__origin__", None) is tuple


# field overrides travel as **kwargs beside cattrs' own keyword flags, which a dict of them
# cannot be checked against: typed loosely, on purpose
_make_unstructure_fn: Callable[..., Callable[[Any], dict[str, Any]]] = (
    cattrs.gen.make_dict_unstructure_fn
)


def _add_unstructure_hooks(conv: cattrs.Converter) -> None:
    def unstructure_tuple(value: tuple[Any, ...]) -> list[Any]:
        return [conv.unstructure(item) for item in value]

    def record_hook(cls: type[Any]) -> Callable[[Any], dict[str, Any]]:
        # a field whose default is None is absent when None: the API's optional fields
        omit = cattrs.gen.override(omit_if_default=True)
        none_default = {f.name: omit for f in attrs.fields(cls) if f.default is None}
        return _make_unstructure_fn(cls, conv, **none_default)

    conv.register_unstructure_hook(datetime, unstructure_datetime)
    conv.register_unstructure_hook_func(_is_tuple, unstructure_tuple)
    conv.register_unstructure_hook_factory(attrs.has, record_hook)


_FAST = _make(detailed=False)
_DETAILED = _make(detailed=True)
# One converter for both directions: the fast one also turns models back into dicts.
_add_unstructure_hooks(_FAST)

# Generated once per model: cattrs compiles a structuring function for each class.
_FAST_FNS: dict[type[Any], Callable[[Any, Any], Any]] = {
    cls: _FAST.get_structure_hook(cls)
    for cls in (
        Execution,
        ExecutionOutput,
        ExecutionEvent,
        ArtifactRef,
        LogStatus,
        LogReadToken,
        Machine,
        LifecycleStatus,
    )
}


def structure(data: object, cls: type[T]) -> T:
    """Turn a decoded JSON value into ``cls`` or raise :class:`ResponseDecodeError`."""
    if type(data) is not dict:
        raise ResponseDecodeError(
            f"expected a JSON object for {cls.__name__}, got {type(data).__name__}"
        )
    try:
        result: T = _FAST_FNS[cls](data, cls)
        return result
    except Exception:  # any failure: the detailed converter below says which field
        pass
    try:
        _DETAILED.structure(data, cls)
    except cattrs.BaseValidationError as exc:
        messages = cattrs.transform_error(exc, path=cls.__name__)
        first = messages[0] if messages else str(exc)
        field = _field_of(first)
        raise ResponseDecodeError(
            f"invalid {cls.__name__} in response: {'; '.join(messages[:3])}", field=field
        ) from exc
    except Exception as exc:
        raise ResponseDecodeError(f"invalid {cls.__name__} in response: {exc}") from exc
    # The fast path failed but the detailed one did not: should not happen; say so plainly.
    raise ResponseDecodeError(f"invalid {cls.__name__} in response")


def unstructure(model: attrs.AttrsInstance) -> dict[str, Any]:
    """``model`` as a JSON-ready dict; :func:`structure` turns it back into an equal one.

    Field names are the API's; ``None`` fields are left out; byte counts stay ints (the
    decoder reads an int where the wire has a string of digits).
    """
    result: dict[str, Any] = _FAST.unstructure(model)
    return result


def _field_of(message: str) -> str | None:
    # cattrs' messages end in "@ $.field.sub" style paths; report the path without the root
    at = message.rfind(" @ ")
    if at < 0:
        return None
    path = message[at + 3 :]
    head, _, rest = path.partition(".")
    return rest or head

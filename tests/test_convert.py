"""The converter's way back: models to JSON-ready dicts that the decoder reads back equal."""

from __future__ import annotations

import json
import types
import typing
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dedalus_async import (
    ArtifactRef,
    Execution,
    ExecutionEvent,
    ExecutionOutput,
    ExecutionRef,
    ExecutionResult,
    LogCapture,
    LogPublication,
    LogReadToken,
    LogStatus,
    WaitStats,
)
from dedalus_async._convert import _FAST, structure, unstructure

#: What the API sends: structure() decodes these directly.
WIRE_MODELS: list[type[Any]] = [
    Execution,
    ExecutionOutput,
    ExecutionEvent,
    ArtifactRef,
    LogStatus,
    LogReadToken,
]
#: Records of this library (and the API's nested objects): decoded by the same converter.
OTHER_MODELS: list[type[Any]] = [
    LogCapture,
    LogPublication,
    WaitStats,
    ExecutionResult,
    ExecutionRef,
]
PLUS_2 = timezone(timedelta(hours=2))
MINUS_5_30 = timezone(-timedelta(hours=5, minutes=30))


def _through_json(model: attrs.AttrsInstance) -> Any:
    """What a reader of the printed JSON gets."""
    return json.loads(json.dumps(unstructure(model), ensure_ascii=False))


def _read_back(data: Any, cls: type[Any]) -> Any:
    if cls in WIRE_MODELS:
        return structure(data, cls)
    return _FAST.structure(data, cls)


# --- strategies: one per field type, read from the models themselves ---------------------

_OFFSETS = st.builds(
    lambda minutes: timezone(timedelta(minutes=minutes)), st.integers(-23 * 60 - 59, 23 * 60 + 59)
)
_TIMES = st.datetimes(
    min_value=datetime(1970, 1, 2), max_value=datetime(2200, 1, 1), timezones=_OFFSETS
)
# the API's byte counts are never negative (the wire form is a string of digits)
_BYTE_COUNT_FIELDS = {"lost_bytes", "unconfirmed_bytes"}


def _strategy(type_: Any, name: str) -> st.SearchStrategy[Any]:
    if typing.get_origin(type_) in (typing.Union, types.UnionType):
        (inner,) = (arg for arg in typing.get_args(type_) if arg is not type(None))
        return st.none() | _strategy(inner, name)
    if typing.get_origin(type_) is tuple:
        return st.lists(_strategy(typing.get_args(type_)[0], name), max_size=3).map(tuple)
    if type_ is int:
        return st.integers(min_value=0) if name in _BYTE_COUNT_FIELDS else st.integers()
    if type_ is float:
        return st.floats(allow_nan=False, allow_infinity=False)
    simple: dict[Any, st.SearchStrategy[Any]] = {str: st.text(), bool: st.booleans()}
    if type_ in simple:
        return simple[type_]
    if type_ is datetime:
        return _TIMES
    assert attrs.has(type_), type_
    return _model(type_)


def _model(cls: type[Any]) -> st.SearchStrategy[Any]:
    hints = typing.get_type_hints(cls)
    fields = {f.name: _strategy(hints[f.name], f.name) for f in attrs.fields(cls)}
    return st.builds(cls, **fields)


@pytest.mark.parametrize("cls", WIRE_MODELS + OTHER_MODELS, ids=lambda cls: cls.__name__)
@given(data=st.data())
def test_unstructure_round_trips(cls: type[Any], data: st.DataObject) -> None:
    """Every field of every model, None or not, survives the way out and back."""
    model = data.draw(_model(cls))
    assert _read_back(_through_json(model), cls) == model


# --- representative instances ------------------------------------------------------------


def _execution(**fields: Any) -> Execution:
    base: dict[str, Any] = {
        "execution_id": "exe-1",
        "machine_id": "dm-e209e296-6cc2-5f4e-bf75-a5b1e5768ac0",
        "created_at": datetime(2026, 1, 1, 12, 0, 0, 250000, tzinfo=UTC),
        "status": "succeeded",
    }
    return Execution(**{**base, **fields})


FULL_EXECUTION = _execution(
    command=("sh", "-c", "echo ü"),
    started_at=datetime(2026, 1, 1, 14, 0, 1, 123456, tzinfo=PLUS_2),
    completed_at=datetime(2026, 1, 1, 6, 30, 2, tzinfo=MINUS_5_30),
    cwd="/home/machine",
    env_keys=(),
    exit_code=0,
    signal=None,
    stdout_bytes=3,
    stderr_bytes=0,
    stdout_truncated=False,
    stderr_truncated=False,
    artifacts=(ArtifactRef("art-1", "report.txt"),),
    log_capture=LogCapture(state="incomplete", lost_bytes=2**63, unconfirmed_bytes=0),
)


def test_an_execution_as_the_command_line_prints_it() -> None:
    """None fields are left out, tuples are lists, times are UTC with Z: the API's form."""
    assert unstructure(FULL_EXECUTION) == {
        "execution_id": "exe-1",
        "machine_id": "dm-e209e296-6cc2-5f4e-bf75-a5b1e5768ac0",
        "created_at": "2026-01-01T12:00:00.250Z",
        "status": "succeeded",
        "command": ["sh", "-c", "echo ü"],
        "started_at": "2026-01-01T12:00:01.123456Z",
        "completed_at": "2026-01-01T12:00:02.000Z",
        "cwd": "/home/machine",
        "env_keys": [],
        "exit_code": 0,
        "stdout_bytes": 3,
        "stderr_bytes": 0,
        "stdout_truncated": False,
        "stderr_truncated": False,
        "artifacts": [{"artifact_id": "art-1", "name": "report.txt"}],
        "log_capture": {"state": "incomplete", "lost_bytes": 2**63, "unconfirmed_bytes": 0},
    }


def test_a_minimal_execution_has_only_its_required_fields() -> None:
    assert unstructure(_execution()) == {
        "execution_id": "exe-1",
        "machine_id": "dm-e209e296-6cc2-5f4e-bf75-a5b1e5768ac0",
        "created_at": "2026-01-01T12:00:00.250Z",
        "status": "succeeded",
    }


@pytest.mark.parametrize(
    ("moment", "text"),
    [
        (datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC), "2026-03-04T05:06:07.000Z"),
        (datetime(2026, 3, 4, 5, 6, 7, 890000, tzinfo=UTC), "2026-03-04T05:06:07.890Z"),
        (datetime(2026, 3, 4, 5, 6, 7, 890001, tzinfo=UTC), "2026-03-04T05:06:07.890001Z"),
        (datetime(2026, 3, 4, 1, 6, 7, 5, tzinfo=PLUS_2), "2026-03-03T23:06:07.000005Z"),
        (datetime(2026, 3, 3, 23, 36, 7, tzinfo=MINUS_5_30), "2026-03-04T05:06:07.000Z"),
        # the decoder reads a time without an offset as UTC; so does the way back
        (datetime(2026, 3, 4, 5, 6, 7), "2026-03-04T05:06:07.000Z"),
    ],
)
def test_times_are_rfc3339_utc_without_losing_a_microsecond(moment: datetime, text: str) -> None:
    event = ExecutionEvent(at=moment, sequence=1, type="lifecycle")
    assert unstructure(event)["at"] == text
    assert structure(unstructure(event), ExecutionEvent).at == moment.replace(
        tzinfo=moment.tzinfo or UTC
    )


@pytest.mark.parametrize(
    "model",
    [
        FULL_EXECUTION,
        _execution(),
        _execution(status="failed", exit_code=None, signal=9, error_code="TIMEOUT"),
        ExecutionOutput(execution_id="exe-1"),
        ExecutionOutput(execution_id="exe-1", stdout="o", stderr="", stdout_bytes=1),
        ExecutionEvent(at=FULL_EXECUTION.created_at, sequence=7, type="stdout", chunk="x\n"),
        LogStatus(execution_id="exe-1", capture=LogCapture()),
        LogStatus(
            execution_id="exe-1",
            capture=LogCapture(state="pending", code="C", lost_bytes=5),
            code="LOGS",
            publication=LogPublication(complete=False, queued_messages=3, state="active"),
            stream_id="s-1",
        ),
        LogReadToken(
            access_token="t",
            base_url="https://logs.example",
            execution_id="exe-1",
            expires_at=datetime(2026, 1, 1, 0, 0, 0, 1, tzinfo=MINUS_5_30),
            stream_id="s-1",
            token_type="Bearer",
        ),
    ],
    ids=lambda model: type(model).__name__,
)
def test_representative_wire_models_round_trip(model: Any) -> None:
    assert structure(_through_json(model), type(model)) == model


def test_a_result_keeps_its_stats_and_leaves_out_a_missing_output() -> None:
    """ExecutionResult and WaitStats: zero counts are kept, only None is left out."""
    result = ExecutionResult(execution=_execution(), stdout="", stats=WaitStats(slept=0.25))
    document = unstructure(result)
    assert document["stats"] == {"polls": 0, "retries": 0, "slept": 0.25, "elapsed": 0.0}
    assert "output" not in document
    assert (document["stdout"], document["stderr"]) == ("", "")
    assert _read_back(_through_json(result), ExecutionResult) == result


def test_only_none_defaults_are_left_out() -> None:
    """The rule of leaving a field out is 'None by default': every optional field of every
    model has that default, so an absent key and a None field mean the same thing."""
    for cls in WIRE_MODELS + OTHER_MODELS:
        hints = typing.get_type_hints(cls)
        for field in attrs.fields(cls):
            optional = type(None) in typing.get_args(hints[field.name])
            assert optional == (field.default is None), f"{cls.__name__}.{field.name}"

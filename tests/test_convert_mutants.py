"""The converter at its edges: every hook with a right and a wrong value, the RFC 3339
forms only the fallback parser reads, and what a user sees when a field is wrong (the
field's name, and in the traceback the hook's own words). Found by mutation testing
(`nox -s mutation`, CONTRIBUTING.md).
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from dedalus_async import (
    ArtifactRef,
    Execution,
    ExecutionEvent,
    LogCapture,
    LogPublication,
    LogStatus,
    ResponseDecodeError,
)
from dedalus_async._convert import _field_of, structure, unstructure

BASE: dict[str, Any] = {
    "execution_id": "e",
    "machine_id": "m",
    "created_at": "2026-01-01T00:00:00Z",
    "status": "running",
}
CREATED = datetime(2026, 1, 1, tzinfo=UTC)


def _decode(**fields: Any) -> Execution:
    return structure({**BASE, **fields}, Execution)


def _refused(cls: type[Any], data: dict[str, Any]) -> ResponseDecodeError:
    with pytest.raises(ResponseDecodeError) as caught:
        structure(data, cls)
    return caught.value


def test_every_hook_reads_its_type() -> None:
    execution = _decode(
        command=["sh", "-c", "true"],
        env_keys=[],
        exit_code=0,
        signal=None,
        stdout_truncated=True,
        stderr_truncated=False,
        started_at="2026-01-01T00:00:01.5+01:00",
        artifacts=[{"artifact_id": "a", "name": "n"}],
        log_capture={"state": "incomplete", "lost_bytes": "12", "unconfirmed_bytes": 3},
    )
    assert execution == Execution(
        execution_id="e",
        machine_id="m",
        created_at=CREATED,
        status="running",
        command=("sh", "-c", "true"),
        env_keys=(),
        exit_code=0,
        stdout_truncated=True,
        stderr_truncated=False,
        started_at=datetime(2026, 1, 1, 0, 0, 1, 500000, tzinfo=timezone(timedelta(hours=1))),
        artifacts=(ArtifactRef("a", "n"),),
        log_capture=LogCapture(state="incomplete", lost_bytes=12, unconfirmed_bytes=3),
    )
    assert type(execution.command) is tuple
    assert type(execution.artifacts) is tuple


def test_absent_and_null_optional_fields_are_none() -> None:
    nulls = dict.fromkeys(("command", "started_at", "exit_code", "stdout_truncated"), None)
    nulls |= {"artifacts": None, "log_capture": None, "cwd": None}
    assert _decode(**nulls) == _decode() == Execution(**{**BASE, "created_at": CREATED})


def test_nested_records_and_their_optional_forms() -> None:
    status = structure(
        {
            "execution_id": "e",
            "capture": {"lost_bytes": "18446744073709551615"},
            "publication": {"complete": False, "queued_messages": 2, "state": "active"},
        },
        LogStatus,
    )
    assert status.capture == LogCapture(lost_bytes=2**64 - 1)
    assert status.publication == LogPublication(complete=False, queued_messages=2, state="active")
    bare = structure({"execution_id": "e", "capture": {}, "publication": None}, LogStatus)
    assert (bare.capture, bare.publication) == (LogCapture(), None)


@pytest.mark.parametrize(
    ("fields", "field", "hook_says"),
    [
        ({"execution_id": 5}, "execution_id", "expected a string, got int"),
        ({"cwd": 5}, "cwd", "expected a string, got int"),
        ({"exit_code": "1"}, "exit_code", "expected an integer, got str"),
        ({"exit_code": True}, "exit_code", "expected an integer, got bool"),
        ({"exit_code": 1.0}, "exit_code", "expected an integer, got float"),
        ({"stdout_truncated": 1}, "stdout_truncated", "expected a boolean, got int"),
        ({"created_at": 5}, "created_at", "expected an RFC 3339 date-time string, got int"),
        ({"started_at": 5}, "started_at", "expected an RFC 3339 date-time string, got int"),
        ({"started_at": "soon"}, "started_at", "not an RFC 3339 date-time: 'soon'"),
        ({"command": "ls"}, "command", "expected a list of strings, got str"),
        ({"command": ("ls",)}, "command", "expected a list of strings, got tuple"),
        ({"env_keys": ["A", 1]}, "env_keys", "item 1: expected a string, got int"),
        ({"artifacts": {}}, "artifacts", "expected a list, got dict"),
        ({"artifacts": [{"artifact_id": 1, "name": "n"}]}, "artifacts.artifact_id", None),
        ({"log_capture": []}, "log_capture", "expected an object, got list"),
        ({"log_capture": "full"}, "log_capture", "expected an object, got str"),
        ({"log_capture": {"lost_bytes": "-1"}}, "log_capture.lost_bytes", "got '-1'"),
        ({"log_capture": {"lost_bytes": -1}}, "log_capture.lost_bytes", "got -1"),
        ({"log_capture": {"lost_bytes": "1" * 21}}, "log_capture.lost_bytes", None),
        ({"log_capture": {"unconfirmed_bytes": "1.5"}}, "log_capture.unconfirmed_bytes", None),
        ({"log_capture": {"lost_bytes": True}}, "log_capture.lost_bytes", "got True"),
        ({"log_capture": {"state": 1}}, "log_capture.state", "expected a string, got int"),
    ],
)
def test_a_wrong_field_is_named(fields: dict[str, Any], field: str, hook_says: str | None) -> None:
    error = _refused(Execution, {**BASE, **fields})
    assert error.field == field
    assert str(error).startswith("invalid Execution in response: ")
    assert str(error).endswith(f" @ Execution.{field}")
    if hook_says is not None:  # the traceback shows the hook's own explanation
        assert hook_says in "".join(traceback.format_exception(error))


def test_byte_counts_take_twenty_digits() -> None:
    capture = _decode(log_capture={"lost_bytes": "0" * 20, "unconfirmed_bytes": "9"}).log_capture
    assert capture == LogCapture(lost_bytes=0, unconfirmed_bytes=9)
    assert _decode(log_capture={"lost_bytes": 0}).log_capture == LogCapture(lost_bytes=0)


def test_a_wrong_nested_publication_is_named() -> None:
    data = {"execution_id": "e", "capture": {}, "publication": {"complete": 1}}
    error = _refused(LogStatus, data)
    assert error.field == "publication.complete"
    assert "expected a boolean, got int" in "".join(traceback.format_exception(error))
    error = _refused(LogStatus, {"execution_id": "e", "capture": {}, "publication": []})
    assert error.field == "publication"
    error = _refused(LogStatus, {"execution_id": "e", "capture": "x"})
    assert error.field == "capture"


def test_several_wrong_fields_are_all_named_up_to_three() -> None:
    error = _refused(Execution, {"execution_id": 1, "machine_id": 2, "created_at": 3, "status": 4})
    assert error.field == "execution_id"
    assert str(error) == (
        "invalid Execution in response: invalid value for type, expected str @ "
        "Execution.execution_id; invalid value for type, expected str @ Execution.machine_id; "
        "invalid value for type, expected datetime @ Execution.created_at"
    )


def test_a_missing_field_is_named() -> None:
    error = _refused(Execution, {k: v for k, v in BASE.items() if k != "status"})
    assert error.field == "status"
    assert str(error) == (
        "invalid Execution in response: required field missing @ Execution.status"
    )


@pytest.mark.parametrize("data", [[], "x", None, 5])
def test_not_an_object(data: object) -> None:
    with pytest.raises(ResponseDecodeError) as caught:
        structure(data, Execution)
    assert str(caught.value) == f"expected a JSON object for Execution, got {type(data).__name__}"
    assert caught.value.field is None


@pytest.mark.parametrize(
    ("text", "moment"),
    [
        # what datetime.fromisoformat refuses and the RFC 3339 fallback reads
        ("2026-01-01t10:00:00z", datetime(2026, 1, 1, 10, tzinfo=UTC)),
        ("2026-01-01 10:00:00Z", datetime(2026, 1, 1, 10, tzinfo=UTC)),
        ("2026-01-01t10:00:00.5z", datetime(2026, 1, 1, 10, 0, 0, 500000, tzinfo=UTC)),
        ("2026-01-01t10:00:00.1234567z", datetime(2026, 1, 1, 10, 0, 0, 123456, tzinfo=UTC)),
        ("2026-01-01t10:00:00.000001z", datetime(2026, 1, 1, 10, 0, 0, 1, tzinfo=UTC)),
        ("2026-01-01t10:00:00", datetime(2026, 1, 1, 10, tzinfo=UTC)),
        (
            "2026-01-01t10:00:00-02:30",
            datetime(2026, 1, 1, 10, tzinfo=timezone(-timedelta(hours=2, minutes=30))),
        ),
        # a leap second is the instant after 23:59:59
        ("2016-12-31T23:59:60Z", datetime(2017, 1, 1, tzinfo=UTC)),
        ("2016-12-31t23:59:60.25z", datetime(2017, 1, 1, 0, 0, 0, 250000, tzinfo=UTC)),
        ("2016-06-30T23:59:60+01:00", datetime(2016, 7, 1, tzinfo=timezone(timedelta(hours=1)))),
    ],
)
def test_rfc3339_forms(text: str, moment: datetime) -> None:
    at = structure({"at": text, "sequence": 1, "type": "stdout"}, ExecutionEvent).at
    assert at == moment
    assert at.utcoffset() == moment.utcoffset()


@pytest.mark.parametrize(
    "text",
    ["2026-01-01t25:00:00z", "2026-02-30T00:00:00Z", "2026-1-1T00:00:00Z", "yesterday", ""],
)
def test_not_rfc3339(text: str) -> None:
    error = _refused(ExecutionEvent, {"at": text, "sequence": 1, "type": "stdout"})
    assert error.field == "at"
    shown = text[:40]
    assert f"not an RFC 3339 date-time: {shown!r}" in "".join(traceback.format_exception(error))


def test_a_long_bad_time_is_cut_to_forty_characters() -> None:
    text = "2026-01-01T00:00:00Z" + "x" * 60
    error = _refused(ExecutionEvent, {"at": text, "sequence": 1, "type": "stdout"})
    shown = "".join(traceback.format_exception(error))
    assert f"not an RFC 3339 date-time: {text[:40]!r}\n" in shown


@pytest.mark.parametrize(
    ("moment", "text"),
    [
        (datetime(2026, 1, 1, 0, 0, 0, 1000, tzinfo=UTC), "2026-01-01T00:00:00.001Z"),
        (datetime(2026, 1, 1, 0, 0, 0, 1, tzinfo=UTC), "2026-01-01T00:00:00.000001Z"),
        (datetime(2026, 1, 1, 0, 0, 0, 999999, tzinfo=UTC), "2026-01-01T00:00:00.999999Z"),
        (datetime(2026, 1, 1, 1, tzinfo=timezone(timedelta(hours=1))), "2026-01-01T00:00:00.000Z"),
        (datetime(2026, 1, 1, 0, 0, 0, 1000), "2026-01-01T00:00:00.001Z"),
    ],
)
def test_times_go_out_in_utc_with_z(moment: datetime, text: str) -> None:
    assert unstructure(ExecutionEvent(at=moment, sequence=1, type="x"))["at"] == text


def test_unstructure_lists_tuples_and_leaves_out_none() -> None:
    execution = Execution(
        execution_id="e",
        machine_id="m",
        created_at=CREATED,
        status="succeeded",
        command=("a", "b"),
        env_keys=(),
        artifacts=(ArtifactRef("x", "y"),),
        exit_code=0,
        stdout_truncated=False,
    )
    assert unstructure(execution) == {
        "execution_id": "e",
        "machine_id": "m",
        "created_at": "2026-01-01T00:00:00.000Z",
        "status": "succeeded",
        "command": ["a", "b"],
        "env_keys": [],
        "artifacts": [{"artifact_id": "x", "name": "y"}],
        "exit_code": 0,
        "stdout_truncated": False,
    }
    assert type(unstructure(execution)["command"]) is list


def test_a_long_bad_time_that_looks_like_rfc3339_is_cut_too() -> None:
    text = "2026-02-30T00:00:00." + "1" * 40 + "Z"  # the form is right, the date is not
    error = _refused(ExecutionEvent, {"at": text, "sequence": 1, "type": "stdout"})
    shown = "".join(traceback.format_exception(error))
    assert f"not an RFC 3339 date-time: {text[:40]!r}\n" in shown


def test_a_failure_that_is_not_a_validation_error_is_still_a_decode_error() -> None:
    """structure() never lets another exception out (here: a bare type, not a record)."""
    with pytest.raises(ResponseDecodeError) as caught:
        structure({}, int)
    assert str(caught.value) == "invalid int in response: expected an integer, got dict"


def test_a_record_without_a_fast_function_is_refused_plainly() -> None:
    """Should never happen (every decoded model has one): said plainly, not half-decoded."""
    with pytest.raises(ResponseDecodeError) as caught:
        structure({}, LogCapture)
    assert str(caught.value) == "invalid LogCapture in response"


@pytest.mark.parametrize(
    ("message", "field"),
    [
        ("invalid value @ Root.a.b", "a.b"),
        ("invalid value @ Root", "Root"),  # at the root there is nothing to strip
        (" @ Root.a", "a"),
        ("x.y @ Root.f", "f"),
        ("a @ b.c @ Root.f", "f"),  # the path follows the last " @ "
        ("no path here", None),
    ],
)
def test_field_of_reads_the_path_after_the_root(message: str, field: str | None) -> None:
    assert _field_of(message) == field


@pytest.fixture
def local_time_new_york(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The process's local time zone is not UTC (and comes back afterwards)."""
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.usefixtures("local_time_new_york")
def test_times_go_out_in_utc_whatever_the_local_zone() -> None:
    naive = datetime(2026, 1, 1, 12, 0, 0)  # read as UTC, like the decoder does
    assert unstructure(ExecutionEvent(at=naive, sequence=1, type="x"))["at"] == (
        "2026-01-01T12:00:00.000Z"
    )
    paris = datetime(2026, 1, 1, 13, 0, 0, tzinfo=timezone(timedelta(hours=1)))
    assert unstructure(ExecutionEvent(at=paris, sequence=1, type="x"))["at"] == (
        "2026-01-01T12:00:00.000Z"
    )

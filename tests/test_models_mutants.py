"""ExecutionRef's way to a dict and to JSON and back, with the messages a user reads when
the stored reference is wrong. Found by mutation testing (`nox -s mutation`).
"""

from __future__ import annotations

import json

import pytest

from dedalus_async import ExecutionRef

REF = ExecutionRef(machine_id="m-1", execution_id="e-1")
KEYED = ExecutionRef(machine_id="m-1", execution_id="e-1", idempotency_key="k-1")


def test_to_dict_leaves_out_a_missing_key() -> None:
    assert REF.to_dict() == {"machine_id": "m-1", "execution_id": "e-1"}
    assert KEYED.to_dict() == {"machine_id": "m-1", "execution_id": "e-1", "idempotency_key": "k-1"}


def test_to_json_is_compact() -> None:
    assert REF.to_json() == '{"machine_id":"m-1","execution_id":"e-1"}'
    assert KEYED.to_json() == '{"machine_id":"m-1","execution_id":"e-1","idempotency_key":"k-1"}'


@pytest.mark.parametrize("ref", [REF, KEYED])
def test_round_trips(ref: ExecutionRef) -> None:
    assert ExecutionRef.from_dict(ref.to_dict()) == ref
    assert ExecutionRef.from_json(ref.to_json()) == ref
    assert ExecutionRef.from_json(ref.to_json().encode()) == ref


def test_from_dict_ignores_unknown_keys_and_reads_the_key() -> None:
    data = {"machine_id": "m", "execution_id": "e", "idempotency_key": "k", "extra": 1}
    ref = ExecutionRef.from_dict(data)
    assert (ref.machine_id, ref.execution_id, ref.idempotency_key) == ("m", "e", "k")
    assert ExecutionRef.from_dict({"machine_id": "m", "execution_id": "e"}).idempotency_key is None


@pytest.mark.parametrize("missing", ["machine_id", "execution_id"])
def test_from_dict_names_the_missing_field(missing: str) -> None:
    data = {"machine_id": "m", "execution_id": "e"}
    del data[missing]
    with pytest.raises(ValueError, match=rf"^ExecutionRef needs '{missing}'$") as caught:
        ExecutionRef.from_dict(data)
    assert caught.value.__cause__ is None
    assert caught.value.__suppress_context__


@pytest.mark.parametrize("field", ["machine_id", "execution_id"])
def test_from_dict_refuses_a_non_string_id(field: str) -> None:
    data: dict[str, object] = {"machine_id": "m", "execution_id": "e", field: 7}
    with pytest.raises(TypeError, match=rf"^ExecutionRef {field} must be a str, not int$"):
        ExecutionRef.from_dict(data)


def test_from_dict_refuses_a_non_string_key() -> None:
    data = {"machine_id": "m", "execution_id": "e", "idempotency_key": 7}
    with pytest.raises(TypeError, match=r"^ExecutionRef idempotency_key must be a str or absent$"):
        ExecutionRef.from_dict(data)


def test_from_dict_needs_a_mapping() -> None:
    with pytest.raises(TypeError, match=r"^ExecutionRef.from_dict needs a dict, not list$"):
        ExecutionRef.from_dict([])  # type: ignore[arg-type]


def test_from_json_needs_text() -> None:
    with pytest.raises(TypeError, match=r"^ExecutionRef.from_json needs a str, not int$"):
        ExecutionRef.from_json(3)  # type: ignore[arg-type]


@pytest.mark.parametrize("text", ["{", "", "[" * 100_000])
def test_from_json_refuses_what_is_not_json(text: str) -> None:
    with pytest.raises(ValueError, match=r"^ExecutionRef JSON is not valid JSON: ") as caught:
        ExecutionRef.from_json(text)
    assert caught.value.__cause__ is None
    assert caught.value.__suppress_context__


@pytest.mark.parametrize("value", [[], "x", 1, None])
def test_from_json_needs_an_object(value: object) -> None:
    with pytest.raises(ValueError, match=r"^ExecutionRef JSON must be an object$"):
        ExecutionRef.from_json(json.dumps(value))

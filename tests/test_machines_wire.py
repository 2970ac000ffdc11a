"""The machine wire format without I/O: request building, argument checks, and decoding
recorded machine bodies in both shapes the API uses."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from multidict import CIMultiDict

from dedalus_async import (
    LifecycleStatus,
    Machine,
    MachineFailed,
    MachineStateError,
    ResponseDecodeError,
)
from dedalus_async import _wire as wire
from dedalus_async._machines import judge, settled

SAMPLES = Path(__file__).parent / "samples"
KEY = "0199a8f2c6c17abcdef0123456789ab"
UUID_ID = "017f22e2-79b0-7cc3-98c4-dc0c0c07398f"


def sample(name: str, status: int = 200, **headers: str) -> wire.Response:
    return wire.Response(status, CIMultiDict(headers), (SAMPLES / name).read_bytes())


# --- requests ------------------------------------------------------------------------


def test_create_sends_only_the_fields_given_in_the_sdks_order() -> None:
    request = wire.machine_create_request(
        vcpu=0.5, memory_mib=4096, storage_gib=10, autosleep="15m", idempotency_key=KEY
    )
    assert (request.method, request.path, request.idempotency_key) == ("POST", "/v1/machines", KEY)
    assert request.body == b'{"autosleep":"15m","memory_mib":4096,"storage_gib":10,"vcpu":0.5}'
    bare = wire.machine_create_request(idempotency_key=KEY)
    assert bare.body == b"{}"


@pytest.mark.parametrize("autosleep", ["30s", "15m", "2h", "1w3d", "7d3h4s", "1800", "0", "never"])
def test_every_autosleep_form_the_api_documents_is_accepted(autosleep: str) -> None:
    request = wire.machine_create_request(autosleep=autosleep, idempotency_key=KEY)
    assert json.loads(request.body or b"") == {"autosleep": autosleep}


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"vcpu": 0}, ValueError, "vcpu must be a positive"),
        ({"vcpu": -1.5}, ValueError, "vcpu must be a positive"),
        ({"vcpu": float("nan")}, ValueError, "vcpu"),
        ({"vcpu": float("inf")}, ValueError, "vcpu"),
        ({"vcpu": True}, TypeError, "vcpu must be a number"),
        ({"vcpu": "2"}, TypeError, "vcpu must be a number"),
        ({"memory_mib": 0}, ValueError, "memory_mib must be a whole number of MiB, at least 1"),
        ({"memory_mib": 1.5}, TypeError, "memory_mib must be a whole number of MiB"),
        ({"storage_gib": -3}, ValueError, "storage_gib must be a whole number of GiB"),
        ({"storage_gib": "10"}, TypeError, "storage_gib"),
        ({"autosleep": "5 minutes"}, ValueError, "autosleep '5 minutes' is not a duration"),
        ({"autosleep": "15x"}, ValueError, "'30s', '15m', '2h' or '1w3d'"),
        ({"autosleep": ""}, ValueError, "autosleep"),
        ({"autosleep": 300}, TypeError, "pass '300' for seconds"),
    ],
)
def test_bad_sizes_are_refused_naming_the_field_and_the_fix(
    kwargs: dict[str, object], error: type[Exception], words: str
) -> None:
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
        wire.machine_create_request(idempotency_key=KEY, **kwargs)
    with pytest.raises(error):
        wire.machine_update_request(UUID_ID, idempotency_key=KEY, **kwargs)


def test_an_update_needs_a_field_and_sends_only_those_given() -> None:
    with pytest.raises(ValueError, match="at least one of vcpu, memory_mib"):
        wire.machine_update_request(UUID_ID, idempotency_key=KEY)
    request = wire.machine_update_request(UUID_ID, autosleep="never", idempotency_key=KEY)
    assert (request.method, request.path) == ("PATCH", f"/v1/machines/{UUID_ID}")
    assert request.body == b'{"autosleep":"never"}'


def test_lifecycle_requests_carry_a_key_and_encode_the_id() -> None:
    wake = wire.machine_request("POST", "dm a", "/wake", idempotency_key=KEY)
    assert wake.path == "/v1/machines/dm%20a/wake"
    assert wire.machine_request("GET", UUID_ID, "/status/stream").idempotency_key is None
    with pytest.raises(ValueError, match="a DELETE request needs an Idempotency-Key"):
        wire.machine_request("DELETE", UUID_ID)
    with pytest.raises(ValueError, match="must not contain '/'"):
        wire.machine_request("GET", "dm-1/executions")
    with pytest.raises(ValueError, match="unknown machine route"):
        wire.machine_request("POST", UUID_ID, "/reboot", idempotency_key=KEY)


@pytest.mark.parametrize("until", ["running", "sleeping", "destroyed"])
def test_the_three_wait_targets_pass(until: str) -> None:
    assert wire.check_machine_target(until) == until


@pytest.mark.parametrize("until", ["starting", "RUNNING", "", None, 1])
def test_any_other_wait_target_is_refused(until: object) -> None:
    with pytest.raises(ValueError, match="until must be 'running', 'sleeping' or 'destroyed'"):
        wire.check_machine_target(until)


# --- decoding ------------------------------------------------------------------------


def test_the_flat_shape_has_its_phase_at_the_top_and_its_revision_in_the_etag() -> None:
    machine = wire.decode_machine(sample("machine_created.json", 202, ETag='W/"3"'))
    assert machine.machine_id == UUID_ID
    assert machine.phase == "placement_pending"
    assert machine.vcpu == 1.0
    assert isinstance(machine.vcpu, float)
    assert (machine.memory_mib, machine.storage_gib, machine.autosleep_seconds) == (4096, 10, 300)
    assert machine.status is None
    assert machine.revision == "3"


def test_the_get_shape_nests_the_lifecycle_in_status() -> None:
    machine = wire.decode_machine(sample("machine_get.json", ETag='"99"'))
    assert machine.phase == "starting"
    assert machine.status == LifecycleStatus(
        phase="starting",
        reason="wake_requested",
        retryable=False,
        revision="7",
        last_transition_at=datetime(2026, 1, 1, 0, 0, 1, 500000, tzinfo=UTC),
        last_progress_at=datetime(2026, 1, 1, 0, 0, 1, 500000, tzinfo=UTC),
        memory_configured_mib=4096,
    )
    assert machine.revision == "7"  # the status's own, not the header's
    assert machine.vcpu == 0.5


def test_a_page_of_machines_keeps_unknown_phases() -> None:
    items, cursor = wire.decode_machine_page(sample("page_machines.json"))
    assert cursor == "c2"
    assert [m.phase for m in items] == ["sleeping", "hibernating_v2"]
    assert items[0].created_at == datetime(2026, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("name", "field"), [("machine_vcpu_text.json", "vcpu"), ("machine_no_phase.json", "phase")]
)
def test_a_broken_machine_names_the_field(name: str, field: str) -> None:
    with pytest.raises(ResponseDecodeError) as caught:
        wire.decode_machine(sample(name))
    assert caught.value.field == field


def test_a_status_event_decodes_alone() -> None:
    event = wire.decode_lifecycle(b'{"phase":"running","reason":"converged","revision":"4"}')
    assert (event.phase, event.revision) == ("running", "4")
    with pytest.raises(ResponseDecodeError):
        wire.decode_lifecycle(b'{"reason":"no phase"}')


# --- the wait's judgement (rules M1-M4 of _machines) -----------------------------------


def machine(phase: str, desired: str = "running", error: str | None = None) -> Machine:
    status = LifecycleStatus(phase=phase, last_error=error)
    return Machine(machine_id="dm-1", phase=phase, desired_state=desired, status=status)


def test_reaching_the_phase_ends_the_wait() -> None:
    assert judge(machine("running"), "running") is True
    assert judge(machine("starting"), "running") is False
    assert judge(machine("some_new_phase"), "running") is False
    assert judge(machine("sleeping"), "running") is False  # someone may still wake it


def test_a_failed_machine_ends_every_wait_with_its_error() -> None:
    for until in ("running", "sleeping", "destroyed"):
        with pytest.raises(MachineFailed, match="host lost") as caught:
            judge(machine("failed", error="host lost"), until)
        assert caught.value.until == until
        assert caught.value.machine.phase == "failed"


def test_a_destroyed_machine_is_out_of_reach_of_running_and_sleeping() -> None:
    for phase in ("destroying", "destroyed"):
        with pytest.raises(MachineStateError, match="will never be 'sleeping'") as caught:
            judge(machine(phase, "destroyed"), "sleeping")
        assert not isinstance(caught.value, MachineFailed)
    assert judge(machine("destroying", "destroyed"), "destroyed") is False
    assert judge(machine("destroyed", "destroyed"), "destroyed") is True


def test_a_watch_settles_at_the_desired_state_or_an_end() -> None:
    assert settled(machine("running", "running"))
    assert not settled(machine("stopping", "sleeping"))
    assert settled(machine("failed", "running"))
    assert settled(machine("destroyed", "destroyed"))

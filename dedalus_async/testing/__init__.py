"""Testing kit for code that uses dedalus_async, shipped to users.

:class:`FakeDedalus` is a stateful fake of the executions API served over real loopback
HTTP; :class:`FakeClock` is a clock that moves only when someone sleeps. Give both the same
clock and a ten-minute wait runs in a millisecond::

    clock = FakeClock()
    async with FakeDedalus(clock=clock, script=Script.default()) as fake:
        async with fake.session() as session:  # FAKE_API_KEY, fake.base_url, same clock
            ...

What executions do is a :class:`Runner`'s business; the default :class:`ScriptedRunner`
plays :class:`Script` s (:class:`Phase` s, then an :class:`Outcome`) lazily against the
clock. :class:`Fault` injects drops, truncated or malformed bodies, error statuses and
delays; :class:`RecordedRequest` is what the fake saw; :class:`ExecutionRecord` is its
server-side state of one execution. Machines move through their phases on the same
clock: :class:`MachineTimings` says how long each phase lasts (``fake.machine_timings``),
:class:`MachineRecord` is the fake's state of one machine. :data:`FAKE_API_KEY` is the key a
fake accepts unless given another. The pytest fixtures are in
:mod:`dedalus_async.testing.pytest_plugin`.
"""

from dedalus_async._machine_records import MachineRecord, MachineTimings
from dedalus_async._records import ExecutionRecord, Runner

from ._clock import FakeClock
from ._fake import FAKE_API_KEY, FakeDedalus, Fault, RecordedRequest
from ._fake_script import Outcome, Phase, Script, ScriptedRunner

__all__ = [
    "FAKE_API_KEY",
    "ExecutionRecord",
    "FakeClock",
    "FakeDedalus",
    "Fault",
    "MachineRecord",
    "MachineTimings",
    "Outcome",
    "Phase",
    "RecordedRequest",
    "Runner",
    "Script",
    "ScriptedRunner",
]

"""The pytest plugin (dedalus_async.testing.pytest_plugin): what its fixtures are, and how they
behave in a user's project.

The first tests use the fixtures directly (this suite loads the plugin, in auto mode). The
others run pytest on a small project of their own with ``pytester``, in process: strict and
auto mode, configuration by the options fixtures, the teardown check of the fake's
handlers, warnings. tests/test_plugin_project.py runs the README's examples on the package
installed from a wheel.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest

from dedalus_async import Session, SystemClock
from dedalus_async.testing import FAKE_API_KEY, FakeClock, FakeDedalus, Outcome, Script

MACHINE = "dm-3b6f1c2e-8d4a-4f0b-9e7c-2a5d8c1f0b3e"

# --- the fixtures, used directly ----------------------------------------------------------


async def test_fake_dedalus_and_dedalus_session_share_the_fake_clock(
    fake_dedalus: FakeDedalus, dedalus_session: Session, dedalus_clock: FakeClock
) -> None:
    """A ten-minute job runs to its end in well under a second of real time."""
    fake_dedalus.set_script(Script.running(600, Outcome(stdout="done\n"), retry_after_ms=30_000))
    started = time.monotonic()
    result = await dedalus_session.run(MACHINE, ["make"], timeout=900)
    assert time.monotonic() - started < 2
    assert result.stdout == "done\n"
    assert fake_dedalus.clock is dedalus_clock
    assert 600 <= dedalus_clock.slept < 700
    assert dedalus_session.base_url == fake_dedalus.base_url
    assert fake_dedalus.api_key == FAKE_API_KEY


async def test_a_session_of_the_fake_shares_its_clock(
    fake_dedalus: FakeDedalus, dedalus_clock: FakeClock
) -> None:
    """Code that makes its own Session takes ``fake_dedalus.session()``: same clock."""
    fake_dedalus.set_script(Script.running(120))
    async with fake_dedalus.session() as session:
        result = await session.run(MACHINE, ["x"], timeout=300)
    assert result.ok
    assert dedalus_clock.slept >= 120


async def test_the_live_fixtures_run_on_the_real_clock(
    live_fake_dedalus: FakeDedalus, live_dedalus_session: Session
) -> None:
    """An execution scripted to run 0.2 s takes 0.2 s of real time."""
    live_fake_dedalus.set_script(Script.running(0.2, retry_after_ms=50))
    started = time.monotonic()
    result = await live_dedalus_session.run(MACHINE, ["x"], timeout=10)
    assert time.monotonic() - started >= 0.2
    assert result.ok
    assert isinstance(live_fake_dedalus.clock, SystemClock)
    assert live_dedalus_session.base_url == live_fake_dedalus.base_url


def test_fake_api_key_is_the_fakes_default_key() -> None:
    assert FakeDedalus().api_key == FAKE_API_KEY


# --- in a project of its own --------------------------------------------------------------

CONFTEST = 'pytest_plugins = ["dedalus_async.testing.pytest_plugin"]\n'
#: the one setting the README asks for
SETTINGS = '[tool.pytest.ini_options]\nasyncio_default_fixture_loop_scope = "function"\n'

#: Every fixture of the plugin, scripted by an options override and by a fixture of the
#: user's; marked for strict mode.
USER_TESTS = f"""
import asyncio
import time
from typing import Any

import pytest

from dedalus_async import Session, SystemClock
from dedalus_async.testing import FakeClock, FakeDedalus, Fault, Outcome, Script

MACHINE = "{MACHINE}"


@pytest.fixture
def dedalus_fake_options() -> dict[str, Any]:
    return {{"script": Script.running(300, Outcome(stdout="from the options\\n"))}}


@pytest.fixture
def dedalus_session_options() -> dict[str, Any]:
    return {{"request_timeout": 7.0}}


@pytest.fixture
def flaky(fake_dedalus: FakeDedalus) -> FakeDedalus:
    fake_dedalus.add_fault(Fault(method="POST", drop_after_commit=True))
    return fake_dedalus


@pytest.mark.asyncio
async def test_fake_clock(
    flaky: FakeDedalus, dedalus_session: Session, dedalus_clock: FakeClock
) -> None:
    result = await dedalus_session.run(MACHINE, ["x"], timeout=600)
    assert result.stdout == "from the options\\n"
    assert flaky.create_count == 1 and len(flaky.requests_for("POST")) == 2
    assert dedalus_clock.slept >= 300
    assert dedalus_session.request_timeout == 7.0


@pytest.mark.asyncio
async def test_live(live_fake_dedalus: FakeDedalus, live_dedalus_session: Session) -> None:
    assert isinstance(live_fake_dedalus.clock, SystemClock)
    assert live_dedalus_session.request_timeout == 7.0
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.1):
            await live_dedalus_session.run(MACHINE, ["x"])  # 300 s of real time


@pytest.mark.asyncio
async def test_local(local_backend: Any, tmp_path: Any) -> None:
    assert tmp_path in local_backend.machines_dir.parents
    async with local_backend.session() as session:
        result = await session.run(MACHINE, ["echo", "real"], timeout=30)
    assert result.stdout == "real\\n"
"""


def _project(pytester: pytest.Pytester, settings: str = SETTINGS, tests: str = USER_TESTS) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyprojecttoml(settings)
    pytester.makepyfile(test_user=tests)


@pytest.mark.parametrize("mode", ["strict", "auto"])
def test_every_fixture_works_in_strict_and_auto_mode_without_a_warning(
    pytester: pytest.Pytester, mode: str
) -> None:
    _project(pytester, SETTINGS + f'asyncio_mode = "{mode}"\n')
    result = pytester.runpytest("-p", "no:cacheprovider", "-W", "error")
    result.assert_outcomes(passed=3, warnings=0)
    result.stdout.no_fnmatch_line("*Warning*")


def test_unmarked_async_tests_run_in_auto_mode(pytester: pytest.Pytester) -> None:
    """The README: with ``asyncio_mode = "auto"`` the markers can go."""
    _project(
        pytester,
        SETTINGS + 'asyncio_mode = "auto"\n',
        USER_TESTS.replace("@pytest.mark.asyncio\n", ""),
    )
    pytester.runpytest("-p", "no:cacheprovider", "-W", "error").assert_outcomes(passed=3)


FAILING_HANDLER = f"""
import pytest

from dedalus_async import ServerError, Session
from dedalus_async.testing import FakeDedalus


def broken(body: object) -> object:
    raise RuntimeError("a bug in the user's script factory")


@pytest.mark.asyncio
async def test_does_not_see_the_bug(fake_dedalus: FakeDedalus, dedalus_session: Session) -> None:
    fake_dedalus.set_script(broken)
    with pytest.raises(ServerError):
        await dedalus_session.create_execution("{MACHINE}", ["x"])


@pytest.mark.asyncio
async def test_means_it(live_fake_dedalus: FakeDedalus, live_dedalus_session: Session) -> None:
    live_fake_dedalus.set_script(broken)
    with pytest.raises(ServerError):
        await live_dedalus_session.create_execution("{MACHINE}", ["x"])
    assert len(live_fake_dedalus.errors) >= 1
    live_fake_dedalus.errors.clear()


@pytest.mark.asyncio
async def test_api_errors_are_no_bugs(fake_dedalus: FakeDedalus, dedalus_session: Session) -> None:
    fake_dedalus.destroy_machine("{MACHINE}")
    with pytest.raises(Exception):
        await dedalus_session.create_execution("{MACHINE}", ["x"])  # 409
    with pytest.raises(Exception):
        await dedalus_session.get_execution("{MACHINE}", "exe-missing")  # 404
"""


def test_a_fake_whose_handlers_raised_fails_the_test_at_teardown(
    pytester: pytest.Pytester,
) -> None:
    """The test saw only a 500; the teardown names the exception and how to accept it.
    Cleared errors and the API's own error answers fail nothing."""
    _project(pytester, tests=FAILING_HANDLER)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_does_not_see_the_bug*",
            "fake_dedalus: the fake's request handlers raised * times (each answered with a 500,"
            " the tracebacks are in the captured log), first RuntimeError(\"a bug in the user's"
            ' script factory"). If the test means it, clear fake_dedalus.errors before it ends.',
        ]
    )


def test_a_clock_in_the_fake_options_is_refused_with_the_fix(pytester: pytest.Pytester) -> None:
    tests = """
import pytest
from typing import Any
from dedalus_async.testing import FakeClock, FakeDedalus

@pytest.fixture
def dedalus_fake_options() -> dict[str, Any]:
    return {"clock": FakeClock()}

@pytest.mark.asyncio
async def test_it(fake_dedalus: FakeDedalus) -> None: ...
"""
    _project(pytester, tests=tests)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        ["*dedalus_fake_options sets 'clock': override the dedalus_clock fixture*"]
    )


def test_without_pytest_asyncio_the_plugin_says_what_to_install() -> None:
    """A fresh interpreter in which pytest_asyncio cannot be imported."""
    code = textwrap.dedent(
        """
        import sys
        sys.modules["pytest_asyncio"] = None  # import pytest_asyncio -> ImportError
        try:
            import dedalus_async.testing.pytest_plugin
        except ImportError as exc:
            print(exc)
        """
    )
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert completed.stdout.strip() == (
        "dedalus_async.testing.pytest_plugin needs pytest-asyncio: "
        'pip install "dedalus-async[pytest]"'
    )

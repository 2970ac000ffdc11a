"""Automation: `nox` runs the default sessions (tests, lint, typing) on this interpreter.

`nox -s bench` and `nox -s soak` are opt-in and never part of the default run.
"""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "lint", "typing"]
nox.options.default_venv_backend = "venv"
nox.options.error_on_missing_interpreters = True

PYPROJECT = nox.project.load_toml("pyproject.toml")
# Branch coverage the tests session enforces on dedalus_async/.
COVERAGE_FLOOR = "95"


def _group(name: str) -> list[str]:
    return list(nox.project.dependency_groups(PYPROJECT, name))


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite with branch coverage (extra args go to pytest)."""
    session.install(".[fast]", *_group("test"))
    session.run("coverage", "erase")
    session.run("coverage", "run", "-m", "pytest", *session.posargs)
    session.run("coverage", "combine", "--quiet")
    session.run("coverage", "report", f"--fail-under={COVERAGE_FLOOR}")


@nox.session
def lint(session: nox.Session) -> None:
    """ruff: lint and formatting check."""
    session.install(*_group("lint"))
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typing(session: nox.Session) -> None:
    """mypy --strict over the package, the tests and the benchmarks."""
    session.install(".[fast]", *_group("typing"))
    session.run("mypy", "--strict")


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks against the fake server on loopback (not part of the default run)."""
    session.install(".[fast]", *_group("bench"))
    session.run("python", "-m", "benchmarks", *session.posargs)


@nox.session
def soak(session: nox.Session) -> None:
    """10,000 executions with random faults (not part of the default run)."""
    session.install(".[fast]", *_group("test"))
    session.run("pytest", "-m", "soak", "-p", "no:cacheprovider", *session.posargs)

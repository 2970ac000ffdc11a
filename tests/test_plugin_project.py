"""The README's pytest examples, run as a new user runs them: in a project of their own, on
the package installed from a wheel, with only the settings the README gives.

The wheel is built from this checkout by its build backend (hatchling, offline) and
installed with pip, without dependencies, into a fresh virtual environment; the
dependencies come from the environment running this suite through a ``.pth`` file, which
puts them *after* the environment's own site-packages, so ``dedalus_async`` is the
installed copy and never this source tree (checked in the process that runs pytest). The
wheel's metadata must declare the ``pytest`` extra the README tells users to install, and
the environment must satisfy it. Then pytest runs the README's pytest blocks (with their
``conftest.py``) in pytest-asyncio's strict mode, as the README's settings are, and in auto
mode, which the README says may be added: every test passes, nothing warns.
"""

from __future__ import annotations

import email.parser
import importlib.metadata
import os
import re
import subprocess
import sys
import sysconfig
import venv
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from .test_readme import BLOCKS, PYTEST_BLOCKS, README, ROOT, count_tests, pytest_files
from .test_readme import pytest_settings as readme_pytest_settings

TIMEOUT = 120


@dataclass(frozen=True)
class Installed:
    """The fresh environment with the wheel installed."""

    python: Path
    site_packages: Path
    metadata: email.message.Message


def _run(*args: str | Path, cwd: Path, env: dict[str, str] | None = None) -> str:
    completed = subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, f"{args}:\n{output}"
    return output


def _user_env() -> dict[str, str]:
    """This process's environment, without what would put the source tree on the path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DEDALUS_", "PYTHON"))}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """Build the wheel, make a fresh environment, install the wheel into it."""
    base = tmp_path_factory.mktemp("installed")
    dist = base / "dist"
    build = "import sys, hatchling.build as b; print(b.build_wheel(sys.argv[1]))"
    name = _run(sys.executable, "-c", build, dist, cwd=ROOT, env=_user_env()).strip()
    wheel = dist / name
    with zipfile.ZipFile(wheel) as archive:
        (path,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        metadata = email.parser.Parser().parsestr(archive.read(path).decode())

    environment = base / "venv"
    venv.EnvBuilder(with_pip=False).create(environment)
    _run(
        sys.executable,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--no-deps",
        "--no-index",
        "--no-compile",
        "--ignore-installed",
        "--disable-pip-version-check",
        "--prefix",
        environment,
        wheel,
        cwd=base,
        env=_user_env(),
    )
    python = environment / "bin" / "python"
    site_packages = Path(
        _run(
            python,
            "-c",
            "import sysconfig; print(sysconfig.get_paths()['purelib'])",
            cwd=base,
            env=_user_env(),
        ).strip()
    )
    # the dependencies: this environment's, after the fresh one's own site-packages
    paths = sysconfig.get_paths()
    (site_packages / "_dependencies.pth").write_text(
        "\n".join(dict.fromkeys([paths["purelib"], paths["platlib"]])) + "\n"
    )
    return Installed(python, site_packages, metadata)


def test_the_wheel_declares_the_extra_the_readme_installs(installed: Installed) -> None:
    """``pip install "dedalus-async[pytest]"`` brings pytest and pytest-asyncio, with lower
    bounds this environment (the one the examples run on) satisfies."""
    extras = set(installed.metadata.get_all("Provides-Extra") or [])
    named = set(re.findall(r'"dedalus-async\[(\w+)\]"', README.read_text(encoding="utf-8")))
    assert "pytest" in named
    assert named <= extras  # every extra the README names exists
    required = [Requirement(line) for line in installed.metadata.get_all("Requires-Dist") or []]
    for_pytest = {
        r.name: r
        for r in required
        if r.marker is not None and r.marker.evaluate({"extra": "pytest"})
    }
    assert set(for_pytest) == {"pytest", "pytest-asyncio"}
    for requirement in for_pytest.values():
        assert str(requirement.specifier).startswith(">="), requirement
        version = importlib.metadata.version(requirement.name)
        assert requirement.specifier.contains(version), (requirement, version)


@pytest.mark.parametrize("mode", ["strict", "auto"])
def test_the_readme_pytest_examples_pass_on_the_installed_package(
    installed: Installed, tmp_path: Path, mode: str
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    files: dict[str, str] = {}
    for block in PYTEST_BLOCKS:
        for name, code in pytest_files(block).items():
            assert files.setdefault(name, code) == code, f"two different {name} in README.md"
    assert "conftest.py" in files
    for name, code in files.items():
        (project / name).write_text(code)
    settings = readme_pytest_settings(BLOCKS)
    assert "asyncio_mode" not in settings  # strict, pytest-asyncio's default
    if mode == "auto":
        settings += 'asyncio_mode = "auto"\n'
    (project / "pyproject.toml").write_text(settings)

    # `python -m pytest`; then, in the same process, where dedalus_async was imported from
    run_pytest = (
        "import sys, pytest\n"
        "status = pytest.main(['-p', 'no:cacheprovider'])\n"
        "where = sys.modules['dedalus_async'].__file__\n"
        "assert where.startswith(sys.argv[1]), f'dedalus_async imported from {where}'\n"
        "sys.exit(status)\n"
    )
    output = _run(
        installed.python,
        "-c",
        run_pytest,
        installed.site_packages,
        cwd=project,
        env=_user_env(),
    )
    tests = sum(count_tests(block) for block in PYTEST_BLOCKS)
    # every test passed, nothing else in the summary (a skipped test, a warning)
    assert re.search(rf"^=+ {tests} passed in [\d.]+s =+$", output, re.M), output
    assert f"asyncio: mode=Mode.{mode.upper()}," in output, output
    assert "Warning" not in output, output

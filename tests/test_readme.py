"""README.md is tested: every ```python block runs and is type-checked (mypy --strict, one
run for all blocks), and the README's shell commands that can run here run.

Python blocks are of three kinds, told apart by their code:

* a **pytest file** defines ``test_*`` functions: it is written to a fresh project (split
  into files at ``# name.py`` comment lines; a block without a ``conftest.py`` gets the one
  an earlier block showed, which a reader has already) whose ``pyproject.toml`` is the
  README's ``# pyproject.toml`` block, and run by pytest in a subprocess, as a reader would
  (tests/test_plugin_project.py runs them all again on the package installed from a wheel);
* a **fragment** has a top-level ``await`` or imports nothing (a piece of a program): it
  runs as the body of ``async def readme_fragment(session, handle)`` under
  :data:`FRAGMENT_PRELUDE`, the setup a reader adds (imports, ``MACHINE_ID``, an open
  Session, a handle from an earlier block); the session talks to a FakeDedalus on the real
  clock whose executions take a few milliseconds;
* a **program** is everything else: it runs as ``__main__`` in a worker thread (so its
  ``asyncio.run`` has no loop running), with ``DEDALUS_API_KEY`` / ``DEDALUS_BASE_URL``
  pointing at that fake; :data:`AFTER_PROGRAM` then uses what it built, as a reader would
  (the FastAPI app gets a request).

The module run and the module type-checked are the same text, padded with blank lines so
that each line of a block keeps its README line number: tracebacks and mypy errors point
into README.md. A block that is not meant to run carries ``<!-- not run: why -->`` on the
line before its fence; there is no other way to leave one out.

Shell commands (``console`` blocks, one command per line, ``\\``-continued lines joined) are
each either in :data:`SHELL_RUN` (run by bash in a fresh HOME, with no API key, so on the
local backend; ``dedalus-async`` is this interpreter's ``-m dedalus_async``, the code under
test) or in :data:`SHELL_NOT_RUN` with the reason; a command in neither fails the test.

Why a collector of our own rather than a plugin: pytest-examples runs each block as a
module file (a top-level ``await`` is a syntax error there) and has no type checking;
mktestdocs and Sybil have no top-level ``await`` either; pytest-markdown-docs has it, but
needs ``--markdown-docs`` in every pytest run of the project (mutmut's and the soak's
included), README.md among the test paths, a root conftest.py for its setup, options in
the fence's info string, and no type checking, so the hidden setup would be written twice.
Here one prelude serves both the run and mypy, in one test module.
"""

from __future__ import annotations

import ast
import asyncio
import json
import linecache
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from types import CodeType
from typing import Any

import asyncpg
import httpx
import mypy.api
import pytest
from fastapi import FastAPI

from dedalus_async import ExecutionHandle, Session
from dedalus_async._local import machine_dirname
from dedalus_async.testing import FakeDedalus, Outcome, Phase, Script

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

MACHINE_ID = "dm-0199a8f2-6c1e-7d3a-9b42-5e8f1a2b3c4d"
API_KEY = "readme-key"
#: What every execution on the README's fake does: a few milliseconds, some output.
QUICK = Script(
    (Phase("queued", 0.01, 10), Phase("running", 0.02, 20, stdout="hello\n")),
    Outcome(stdout="world\n"),
)

#: Above every fragment: what a reader has in scope where the README writes a fragment
#: (with the wrapper's arguments).
FRAGMENT_PRELUDE = f"""\
import asyncio

from dedalus_async import ExecutionHandle, PollPolicy, RetryPolicy, Session

MACHINE_ID = "{MACHINE_ID}"
"""
#: The fragment is the body of this function (its line stands right above the block's).
FRAGMENT_WRAPPER = "async def readme_fragment(session: Session, handle: ExecutionHandle) -> None:\n"
#: Sections whose blocks need a PostgreSQL database: they run with the ``postgres_dsn``
#: fixture's (skipped without a server, as every PostgreSQL test is; failed under ``CI``),
#: exported as ``DSN`` (the recipe's ``export DSN=...``).
NEEDS_POSTGRES = {"Many workers"}
#: Above a fragment of these sections, after FRAGMENT_PRELUDE: what else its reader has.
SECTION_PRELUDE = {
    "Many workers": """\
import os

from dedalus_async import ExecutionRequest

DSN = os.environ["DSN"]
requests = [ExecutionRequest(machine_id=MACHINE_ID, command=["echo", f"job {i}"]) for i in range(5)]
""",
}


MARKER = re.compile(r"<!-- not run: (?P<reason>\S.*?) -->")
SHELL_LANGUAGES = {"console", "shell", "sh", "bash"}


# --- the README's blocks ----------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    """One fenced block: its language, its code and where it is."""

    language: str
    line: int  # README line of the block's first line of code
    source: str
    section: str
    not_run: str | None  # the reason in a `<!-- not run: ... -->` marker, if any

    @property
    def kind(self) -> str:
        """``pytest``, ``fragment`` or ``program`` (see the module docstring)."""
        tree = ast.parse(self.source)
        if any(
            isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            and node.name.startswith("test_")
            for node in tree.body
        ):
            return "pytest"
        try:
            compile(self.source, "README.md", "exec")
        except SyntaxError:
            return "fragment"  # a top-level await (or async for / async with)
        imports = any(isinstance(node, ast.Import | ast.ImportFrom) for node in tree.body)
        return "program" if imports else "fragment"

    def module_source(self) -> str:
        """The module that runs and that mypy checks; line N of the block is line N of the
        README."""
        head, wrapper, body = "", "", self.source
        if self.kind == "fragment":
            head = FRAGMENT_PRELUDE + SECTION_PRELUDE.get(self.section, "")
            wrapper = FRAGMENT_WRAPPER
            body = textwrap.indent(self.source, "    ")
        padding = self.line - 1 - head.count("\n") - wrapper.count("\n")
        assert padding >= 0, f"the prelude is longer than the README before line {self.line}"
        return head + "\n" * padding + wrapper + body

    def compiled(self) -> CodeType:
        """:meth:`module_source`, compiled; tracebacks show its lines (linecache has them)."""
        source = self.module_source()
        filename = f"README.md (block at line {self.line})"
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        return compile(source, filename, "exec")

    def __str__(self) -> str:
        return f"README.md:{self.line} ({self.section})"


def readme_blocks(text: str) -> list[Block]:
    """Every fenced block of ``text``, with the section it is in and its marker."""
    lines = text.splitlines()
    blocks: list[Block] = []
    section = ""
    index = 0
    while index < len(lines):
        line = lines[index]
        if line.startswith("#"):
            section = line.lstrip("#").strip()
        fence = re.fullmatch(r"```(\S*)\s*", line)
        if fence is None:
            index += 1
            continue
        end = next((j for j in range(index + 1, len(lines)) if lines[j].startswith("```")), None)
        assert end is not None, f"README.md:{index + 1}: a fence that is never closed"
        before = next((lines[j] for j in range(index - 1, -1, -1) if lines[j].strip()), "")
        marker = MARKER.fullmatch(before.strip())
        blocks.append(
            Block(
                language=fence.group(1),
                line=index + 2,
                source="\n".join(lines[index + 1 : end]) + "\n",
                section=section,
                not_run=marker.group("reason") if marker else None,
            )
        )
        index = end + 1
    return blocks


BLOCKS = readme_blocks(README.read_text(encoding="utf-8"))
PYTHON_BLOCKS = [block for block in BLOCKS if block.language == "python"]
PYTEST_BLOCKS = [block for block in PYTHON_BLOCKS if block.kind == "pytest"]
POSTGRES_BLOCKS = [block for block in PYTHON_BLOCKS if block.section in NEEDS_POSTGRES]


def pytest_settings(blocks: list[Block]) -> str:
    """The ``pyproject.toml`` the README tells a pytest user to write: its one ``toml``
    block that starts with a ``# pyproject.toml`` line."""
    found = [
        block.source
        for block in blocks
        if block.language == "toml" and block.source.startswith("# pyproject.toml\n")
    ]
    assert len(found) == 1, f"README.md has {len(found)} '# pyproject.toml' blocks, not 1"
    return found[0]


def pytest_files(block: Block) -> dict[str, str]:
    """A pytest block's files: a ``# name.py`` comment line starts each; before any, the
    code is one test module, named after the block's line. Without a ``conftest.py`` of its
    own, the block gets the one of the nearest pytest block above it that has one."""
    files: dict[str, list[str]] = {}
    current = f"test_readme_L{block.line}.py"
    for line in block.source.splitlines(keepends=True):
        header = re.fullmatch(r"# (\w+\.py)\s*", line)
        if header:
            current = header.group(1)
            continue
        files.setdefault(current, []).append(line)
    out = {name: "".join(lines) for name, lines in files.items()}
    if "conftest.py" not in out:
        earlier = [b for b in PYTEST_BLOCKS if b.line < block.line and "# conftest.py" in b.source]
        if earlier:
            out["conftest.py"] = pytest_files(earlier[-1])["conftest.py"]
    return out


def count_tests(block: Block) -> int:
    """How many ``test_*`` functions a pytest block defines."""
    return sum(
        isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test_")
        for node in ast.parse(block.source).body
    )


def shell_commands(block: Block) -> list[str]:
    """The commands of a shell block: comments dropped, ``\\``-continued lines joined."""
    joined = block.source.replace("\\\n", " ")
    commands = []
    for line in joined.splitlines():
        command = re.sub(r"\s+#\s.*$", "", line).strip()
        if command and not command.startswith("#"):
            commands.append(re.sub(r"\s+", " ", command))
    return commands


SHELL_COMMANDS = [
    command
    for block in BLOCKS
    if block.language in SHELL_LANGUAGES
    for command in shell_commands(block)
]


# --- what surrounds the blocks ----------------------------------------------------------


@pytest.fixture
async def readme_fake() -> AsyncIterator[FakeDedalus]:
    """The server every Python block talks to: real clock, executions of milliseconds."""
    async with FakeDedalus(api_key=API_KEY, script=QUICK) as server:
        yield server
    assert server.errors == [], "the fake's handlers raised"


@pytest.fixture
def readme_env(readme_fake: FakeDedalus, monkeypatch: pytest.MonkeyPatch) -> None:
    """The environment a reader configures: the key and the base URL of the fake."""
    for name in ("DEDALUS_X_API_KEY", "DEDALUS_ORG_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DEDALUS_API_KEY", API_KEY)
    monkeypatch.setenv("DEDALUS_BASE_URL", readme_fake.base_url)


async def _post_run_to_the_app(namespace: dict[str, Any], fake: FakeDedalus) -> None:
    """What a reader does with the FastAPI snippet: start the app, POST /run; and what the
    README says of its errors: input the library refuses is a 422 naming the field, before
    anything is sent; the API's own answer about the request (a 409) passes on."""
    app = namespace["app"]
    assert isinstance(app, FastAPI)
    destroyed = "dm-5d1e9a77-0b3c-4e2f-8a6d-9c4b2e7f1a05"
    fake.destroy_machine(destroyed)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            body = {"machine_id": MACHINE_ID, "command": ["echo", "hi"]}
            response = await client.post("/run", json=body)
            refused = await client.post("/run", json={**body, "machine_id": "a/b"})
            conflict = await client.post("/run", json={**body, "machine_id": destroyed})
    assert response.status_code == 200, response.text
    assert response.json() == {"exit_code": 0, "stdout": "hello\nworld\n"}
    assert refused.status_code == 422, refused.text
    assert refused.json()["detail"].startswith("machine_id must not contain '/'")
    assert (conflict.status_code, conflict.json()["error"]) == (409, "ConflictError")
    assert fake.create_count == 1
    assert len(fake.requests_for("POST")) == 2  # the refused one was never sent


#: After a program block runs, keyed by its README section: what a reader does next.
AFTER_PROGRAM: dict[str, Callable[[dict[str, Any], FakeDedalus], Awaitable[None]]] = {
    "FastAPI": _post_run_to_the_app,
}


def _without_dedalus_settings(env: dict[str, str]) -> dict[str, str]:
    return {name: value for name, value in env.items() if not name.startswith("DEDALUS_")}


def _run_pytest_block(block: Block, project: Path) -> None:
    tests = count_tests(block)
    for name, code in pytest_files(block).items():
        (project / name).write_text(code)
    (project / "pyproject.toml").write_text(pytest_settings(BLOCKS))
    completed = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(project)],
        cwd=project,
        env=_without_dedalus_settings(dict(os.environ)),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, f"{block}: pytest failed\n{output}"
    # every test passed: none skipped (an async test pytest-asyncio did not take is skipped)
    assert re.search(rf"^{tests} passed in ", completed.stdout, re.M), f"{block}:\n{output}"
    # and nothing warned, in the summary or before it (pytest-asyncio warns about its
    # settings on stderr, while pytest starts)
    assert "Warning" not in output, f"{block}:\n{output}"


# --- the Python blocks ------------------------------------------------------------------


@pytest.mark.parametrize(
    "block",
    [block for block in PYTHON_BLOCKS if block not in POSTGRES_BLOCKS],
    ids=lambda block: f"L{block.line}-{block.kind}",
)
async def test_readme_python_block_runs(
    block: Block,
    readme_fake: FakeDedalus,
    readme_env: None,
    tmp_path: Path,
) -> None:
    await _run_python_block(block, readme_fake, tmp_path)


@pytest.mark.parametrize("block", POSTGRES_BLOCKS, ids=lambda block: f"L{block.line}-{block.kind}")
async def test_readme_python_block_runs_on_postgres(
    block: Block,
    readme_fake: FakeDedalus,
    readme_env: None,
    postgres_dsn: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.setenv("DSN", postgres_dsn)
    await _run_python_block(block, readme_fake, tmp_path)
    # what the block submitted (SECTION_PRELUDE's requests) was run, each once
    conn = await asyncpg.connect(postgres_dsn)
    try:
        states = await conn.fetch("SELECT state, count(*) FROM dedalus_jobs GROUP BY 1")
    finally:
        await conn.close()
    assert {row[0]: row[1] for row in states} == {"finished": 5}
    commands = sorted(" ".join(record.command) for record in readme_fake.executions.values())
    assert commands == sorted(["echo hi", *(f"echo job {i}" for i in range(5))])


def test_the_postgres_blocks_are_found() -> None:
    assert [block.kind for block in POSTGRES_BLOCKS] == ["fragment"]


async def _run_python_block(block: Block, readme_fake: FakeDedalus, tmp_path: Path) -> None:
    if block.not_run is not None:
        pytest.skip(f"{block}: not run: {block.not_run}")
    if block.kind == "pytest":
        await asyncio.to_thread(_run_pytest_block, block, tmp_path)
        return
    code = block.compiled()
    if block.kind == "program":
        namespace: dict[str, Any] = {"__name__": "__main__"}
        await asyncio.to_thread(exec, code, namespace)
        after = AFTER_PROGRAM.get(block.section)
        if after is not None:
            await after(namespace, readme_fake)
        return
    fragment_namespace: dict[str, Any] = {"__name__": f"readme_{block.line}"}
    exec(code, fragment_namespace)
    async with Session(API_KEY, base_url=readme_fake.base_url) as session:
        handle: ExecutionHandle = await session.create_execution(MACHINE_ID, ["echo", "hi"])
        await fragment_namespace["readme_fragment"](session, handle)


def test_readme_python_blocks_type_check(tmp_path: Path) -> None:
    """mypy --strict with the project's settings, once over every block that runs."""
    files = []
    for block in PYTHON_BLOCKS:
        if block.not_run is None:
            path = tmp_path / f"readme_L{block.line}.py"
            path.write_text(block.module_source())
            files.append(str(path))
    stdout, stderr, status = mypy.api.run(
        [
            "--strict",
            "--config-file",
            str(ROOT / "pyproject.toml"),
            "--cache-dir",
            str(ROOT / ".mypy_cache"),
            "--no-error-summary",
            *files,
        ]
    )
    errors = re.sub(r"\S*readme_L\d+\.py:", "README.md:", stdout)
    assert (status, stderr) == (0, ""), f"mypy --strict on README.md's blocks:\n{errors}{stderr}"


def test_every_python_block_runs_or_says_why_not() -> None:
    """A marker is the only way to leave a Python block out (the others are all run, see
    above): each stands right before a Python block's fence and gives a reason."""
    text = README.read_text(encoding="utf-8")
    markers = [line for line in text.splitlines() if "<!-- not run" in line]
    assert len(markers) == sum(block.not_run is not None for block in PYTHON_BLOCKS)
    assert all(block.language == "python" for block in BLOCKS if block.not_run is not None)


def test_the_readme_names_what_its_pytest_blocks_run_with() -> None:
    """The settings block is there, and it is pytest's (a stray block would be refused by
    pytest_settings itself)."""
    assert "[tool.pytest.ini_options]\n" in pytest_settings(BLOCKS)


def test_every_follow_up_names_a_section_with_a_program() -> None:
    sections = {block.section for block in PYTHON_BLOCKS if block.kind == "program"}
    assert set(AFTER_PROGRAM) <= sections


# --- the shell commands -----------------------------------------------------------------


def _uname_printed(out: str, home: Path) -> None:
    assert out.startswith(os.uname().sysname), out


def _forty_two(out: str, home: Path) -> None:
    result = json.loads(out)
    assert (result["ok"], result["stdout"], result["execution"]["exit_code"]) == (True, "42\n", 0)


def _results_written(out: str, home: Path) -> None:
    lines = (home / "results.jsonl").read_text().splitlines()
    results = [json.loads(line) for line in lines]
    assert [(r["index"], r["ok"], r["stdout"]) for r in results] == [
        (0, True, "one\n"),
        (1, True, "two\n"),
    ]


def _run_then_listed(out: str, home: Path) -> None:
    printed, listed = out.splitlines()
    assert printed == "hi"
    execution = json.loads(listed)  # a later process found what the first one ran
    assert (execution["status"], execution["command"]) == ("succeeded", ["echo", "hi"])


def _machine_made_then_used(out: str, home: Path) -> None:
    waited, pwd = out.splitlines()
    machine_id, phase = waited.split()[:2]
    assert phase == "running"
    folders = home / ".local" / "share" / "dedalus-async" / "machines"
    assert pwd == os.path.realpath(folders / machine_dirname(machine_id))
    assert (folders / (machine_dirname(machine_id) + ".json")).is_file()


JOBS = '{"command": ["echo", "one"]}\n{"command": ["echo", "two"]}\n'


def _batch_status(out: str, home: Path) -> None:
    _results_written(out, home)
    assert out.splitlines()[:2] == [
        "batch 'default' in jobs.db: 2 jobs",
        "finished 2 (2 ok, 0 not ok), pending 0, sent 0, created 0",
    ], out


#: The commands that run here: each one's check of its stdout (exit status 0 is required).
SHELL_RUN: dict[str, Callable[[str, Path], None]] = {
    "dedalus-async run -- uname -a": _uname_printed,
    "dedalus-async run --json -- python -c 'print(42)'": _forty_two,
    # jobs.jsonl, the file a reader writes first, is the two lines of JOBS
    "dedalus-async run-many jobs.jsonl --concurrency 50 > results.jsonl": _results_written,
    "dedalus-async run-many jobs.jsonl --journal jobs.db > results.jsonl"
    " && dedalus-async batch status --journal jobs.db": _batch_status,
    "dedalus-async run -- echo hi && dedalus-async list --local dm-local": _run_then_listed,
    "ID=$(dedalus-async machines create --local --autosleep never | cut -d' ' -f1)"
    ' && dedalus-async machines wait --local "$ID" --until running --timeout 60'
    ' && dedalus-async run --local --machine-id "$ID" -- pwd': _machine_made_then_used,
}

_SUBMIT = "dedalus-async batch submit jobs.jsonl --journal $DSN --name nightly --rate 50"
_WORK = "dedalus-async batch work --journal $DSN --name nightly --concurrency 64"
_STATUS = "dedalus-async batch status --journal $DSN --name nightly"


def _nightly_done(out: str, home: Path) -> None:
    assert out.splitlines()[:2] == [
        f"batch 'nightly' in {os.environ['DSN']}: 2 jobs",
        "finished 2 (2 ok, 0 not ok), pending 0, sent 0, created 0",
    ], out


#: Recipes that need PostgreSQL (NEEDS_POSTGRES), run as one script each, with ``DSN``
#: exported as the ``postgres_dsn`` fixture's database: the steps one after the other, the
#: commands of a step side by side (two workers). The check gets the last step's stdout.
SHELL_RUN_ON_POSTGRES: dict[tuple[tuple[str, ...], ...], Callable[[str, Path], None]] = {
    ((_SUBMIT,), (_WORK, _WORK), (_STATUS,)): _nightly_done,
}

#: The commands that do not, and why.
SHELL_NOT_RUN: dict[str, str] = {
    "python -m pip install . && dedalus-async run -- uname -a": (
        "installs into the interpreter running the tests; its second half is run"
    ),
    "python -m pip install nox && python -m nox": "the whole suite, this test included",
    "python -m pip install nox": "installs into the interpreter running the tests",
    'python -m pip install "dedalus-async[pytest]"': (
        "installs into the interpreter running the tests; tests/test_plugin_project.py "
        "installs the built wheel into a fresh environment and runs the README's pytest "
        "examples there"
    ),
    "python -m nox": "the whole suite, this test included",
    "python -m nox -s tests -- -k wait": "a part of the suite",
    "dedalus-async run --machine-id dm-0199a8f2-6c1e-7d3a-9b42-5e8f1a2b3c4d --env A=1 --cwd src"
    " --timeout 60 -- make test": "needs a project with a Makefile in the machine's src/",
    "dedalus-async get|output|events|cancel|delete [--local] MACHINE_ID EXECUTION_ID": (
        "a synopsis, with placeholders"
    ),
    "dedalus-async list [--local] MACHINE_ID": "a synopsis, with a placeholder",
    "dedalus-async machines create|get|list|wake|sleep|delete|wait [--local] [MACHINE_ID]"
    " [--json]": "a synopsis, with placeholders",
    "dedalus-async events --follow --local dm-local EXECUTION_ID --cursor 7:c6": (
        "a placeholder for an execution ID; tests/test_cli.py runs the command events prints"
    ),
    "dedalus-async serve-local --port 8765": (
        "serves until stopped, on a fixed port that another test run here may hold; "
        "tests/test_cli.py runs serve-local"
    ),
    "export DSN=postgresql://postgres@127.0.0.1:5432/jobs": (
        "sets the DSN of the next lines; their test exports the DSN of a database of its own"
    ),
    "python -m nox -s bench -- --sizes 1000 --rounds 5": "benchmarks: minutes",
    "python -m benchmarks.workers --jobs 10000 --workers 1,2,4 --concurrency 100": (
        "benchmarks: minutes, and a PostgreSQL server"
    ),
    "python -m benchmarks --sizes 10000 --rounds 3 --cpu-executions 0 --lag-executions 0"
    " --drivers aiohttp,dedalus_async,dedalus_async-run_many,sdk-aiohttp": "benchmarks: minutes",
    "python -m benchmarks --sizes 50000 --rounds 2 --cpu-executions 0 --lag-executions 0"
    " --no-memory --drivers aiohttp,dedalus_async,dedalus_async-run_many": "benchmarks: minutes",
    "python -m benchmarks --sizes 1000,10000 --rounds 3 --cpu-executions 1000 --lag-executions 0"
    " --no-memory --drivers aiohttp,dedalus_async-run_many,dedalus_async-run_many-journal": (
        "benchmarks: minutes"
    ),
    "python -m benchmarks --sizes 5000 --rounds 3 --cpu-executions 0 --lag-executions 0"
    " --no-memory --drivers aiohttp,dedalus_async,dedalus_async-run_many"
    " --hints remaining --list-order newest --machines 8": "benchmarks: minutes",
}


def test_every_shell_command_runs_or_says_why_not() -> None:
    in_recipes = [c for recipe in SHELL_RUN_ON_POSTGRES for step in recipe for c in step]
    known = {*SHELL_RUN, *SHELL_NOT_RUN, *in_recipes}
    unknown = [c for c in SHELL_COMMANDS if c not in known]
    assert unknown == []
    stale = [c for c in known if c not in SHELL_COMMANDS]
    assert stale == []


@pytest.mark.parametrize("command", list(SHELL_RUN))
def test_readme_shell_command_runs(command: str, tmp_path: Path) -> None:
    completed = _bash(command, tmp_path, {})
    assert completed.returncode == 0, completed.stderr
    assert "local" in completed.stderr  # it said it runs on the local backend
    SHELL_RUN[command](completed.stdout, tmp_path / "home")


@pytest.mark.parametrize(
    "recipe", list(SHELL_RUN_ON_POSTGRES), ids=lambda recipe: " | ".join(s[0] for s in recipe)
)
async def test_readme_shell_recipe_runs_on_postgres(
    recipe: tuple[tuple[str, ...], ...],
    postgres_dsn: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.setenv("DSN", postgres_dsn)  # for the check, too
    lines = ["set -e"]
    for step in recipe:
        if len(step) == 1:
            lines.append(f"{step[0]} > out")
            continue
        pids = []
        for number, command in enumerate(step):
            lines.append(f"{command} & p{number}=$!")
            pids.append(f"$p{number}")
        lines.extend(f"wait {pid}" for pid in pids)
    # the README's jobs.jsonl has no machine_id: its reader names one (as serve-local says)
    env = {"DSN": postgres_dsn, "DEDALUS_MACHINE_ID": "dm-local"}
    completed = await asyncio.to_thread(_bash, "\n".join(lines), tmp_path, env)
    assert completed.returncode == 0, completed.stderr
    assert "local" in completed.stderr  # the workers ran on the local backend
    home = tmp_path / "home"
    SHELL_RUN_ON_POSTGRES[recipe]((home / "out").read_text(), home)


def _bash(
    script: str, tmp_path: Path, extra_env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    """``script`` run by bash in a fresh HOME (``tmp_path / "home"``, with jobs.jsonl), no
    API key, ``dedalus-async`` the code under test, ``extra_env`` added."""
    home = tmp_path / "home"
    bin_dir = tmp_path / "bin"
    home.mkdir()
    bin_dir.mkdir()
    # `dedalus-async` is the code under test: this interpreter's `-m dedalus_async`
    shim = bin_dir / "dedalus-async"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m dedalus_async "$@"\n')
    shim.chmod(0o755)
    (home / "jobs.jsonl").write_text(JOBS)
    env = _without_dedalus_settings(dict(os.environ))
    env.pop("XDG_DATA_HOME", None)
    env["HOME"] = str(home)
    env["PATH"] = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), env["PATH"]])
    env.update(extra_env)
    return subprocess.run(
        ["bash", "-c", script],
        cwd=home,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

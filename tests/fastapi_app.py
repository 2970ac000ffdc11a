"""An example FastAPI app on dedalus_async: one Session per app, opened in the lifespan.

Run it for real with ``uvicorn tests.fastapi_app:app`` (the Session reads
``DEDALUS_API_KEY`` / ``DEDALUS_BASE_URL`` when the app starts); tests build their own
with :func:`create_app` and a factory pointing at a FakeDedalus.

* ``POST /run`` runs a command and answers with its result (``cancel_remote`` in the body
  deletes the execution if the client goes away before it ends);
* ``POST /start`` starts one and answers with its reference at once;
* ``GET /executions/{machine_id}/{execution_id}/events`` streams its events as
  server-sent events until it ends (404 before the stream if there is no such execution).

The points it shows: the Session is made and closed in the lifespan, inside the server's
event loop, and every request borrows it through a dependency, so all requests share one
connection pool and one throttle; a client that disconnects cancels the work done for it.

What the client gets when something goes wrong, always JSON:

* 422 for input the library refuses (``machine_id`` ``"a/b"``, ``timeout_ms`` beyond
  2**53 - 1, ...), checked before anything is sent, in FastAPI's own shape:
  ``{"detail": [{"loc": ["body", "machine_id"], "msg": "machine_id must not ...", ...}]}``;
* the API's answer when it is about the client's request: 400, 404, 409, 422 (the
  ``error_code`` and message of the API); 429 with ``Retry-After`` when the API gave one;
* 502 when the API could not be used (unreachable, a 5xx, a garbled answer, or it refused
  the app's own key: 401/403 are the app's problem, not the client's);
* 504 with the execution's reference when a wait passed its ``timeout``;
* 503 while the app is not running (or stopping).

A stream that has started cannot change its status: an error after the first event ends it
with an ``error`` event carrying the same JSON.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Annotated, Any, TypeVar

import anyio
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field
from starlette.requests import ClientDisconnect

from dedalus_async import (
    APIStatusError,
    DedalusError,
    ExecutionEvent,
    ExecutionRequest,
    ExecutionResult,
    RateLimitedError,
    Session,
    SessionClosedError,
    WaitTimeout,
)

T = TypeVar("T")

#: Makes the app's Session; entered in the lifespan, exited at shutdown. A ``Session`` is
#: itself an async context manager, so ``Session`` (or ``lambda: Session(...)``) will do.
SessionFactory = Callable[[], AbstractAsyncContextManager[Session]]


class RunBody(BaseModel):
    """What to run; the fields of :meth:`Session.run`."""

    machine_id: str
    command: list[str] = Field(min_length=1)
    cwd: str | None = None
    env: dict[str, str] | None = None
    stdin: str | None = None
    timeout_ms: int | None = Field(default=None, gt=0)
    #: seconds to wait for the end; the execution keeps running remotely after that
    timeout: float | None = Field(default=60.0, gt=0)
    #: delete the execution if the client disconnects (or the wait times out) first
    cancel_remote: bool = False


#: API statuses that answer the client's request as they are; the others are the app's
#: trouble with the API (401/403: the app's key; 5xx: the API's) and become 502.
CLIENT_STATUSES = frozenset({400, 404, 409, 422, 429})


def refused(
    exc: ValueError | TypeError, where: str, fields: Iterable[str]
) -> RequestValidationError:
    """The library refused an argument: a 422 in FastAPI's own shape, located at the field
    the message names (every message of the library's checks starts with the argument)."""
    first = re.match(r"\w+", str(exc))
    named = first.group() if first is not None and first.group() in fields else None
    location = (where, named) if named is not None else (where,)
    return RequestValidationError(
        [{"type": "value_error", "loc": location, "msg": str(exc), "input": None}]
    )


def execution_request(body: RunBody) -> ExecutionRequest:
    """``body`` checked by the library's own rules, before anything is sent (422 if not)."""
    try:
        return ExecutionRequest(
            machine_id=body.machine_id,
            command=body.command,
            cwd=body.cwd,
            env=body.env,
            stdin=body.stdin,
            timeout_ms=body.timeout_ms,
            timeout=body.timeout,
        )
    except (TypeError, ValueError) as exc:
        raise refused(exc, "body", RunBody.model_fields) from exc


def error_json(exc: DedalusError) -> tuple[int, dict[str, Any]]:
    """The status and JSON body a client gets for an error of the library."""
    if isinstance(exc, WaitTimeout):
        ref = exc.ref.to_dict() if exc.ref is not None else None
        return 504, {"error": "timeout", "detail": str(exc), "ref": ref}
    if isinstance(exc, SessionClosedError):
        return 503, {"error": "shutting_down", "detail": "the app is stopping"}
    if isinstance(exc, APIStatusError) and exc.status in CLIENT_STATUSES:
        return exc.status, {"error": exc.error_code or f"HTTP_{exc.status}", "detail": str(exc)}
    return 502, {"error": "upstream", "detail": str(exc)}


def _result_json(result: ExecutionResult) -> dict[str, Any]:
    execution = result.execution
    return {
        "machine_id": execution.machine_id,
        "execution_id": execution.execution_id,
        "status": execution.status,
        "exit_code": execution.exit_code,
        "ok": result.ok,
        "stdout": result.stdout,
        "stderr": result.stderr,
    }


def _sse(kind: str, data: str) -> str:
    """One server-sent event (``data`` is one line of JSON)."""
    return f"event: {kind}\ndata: {data}\n\n"


def _event_json(event: ExecutionEvent) -> str:
    payload: dict[str, Any] = {
        "sequence": event.sequence,
        "type": event.type,
        "at": event.at.isoformat(),
    }
    for name in ("chunk", "status", "exit_code", "signal", "error_code", "error_message"):
        value = getattr(event, name)
        if value is not None:
            payload[name] = value
    return json.dumps(payload, separators=(",", ":"))


async def cancel_on_disconnect(request: Request, work: Callable[[], Awaitable[T]]) -> T:
    """Run ``work()``; if the client disconnects first, cancel it and raise ClientDisconnect.

    Starlette does not cancel a handler whose client went away, so this watches the
    request's ASGI channel: after the body, the next message is ``http.disconnect``.
    """
    outcome: list[T] = []
    error: Exception | None = None
    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            tg.cancel_scope.cancel()

        tg.start_soon(watch)
        try:
            outcome.append(await work())
        except Exception as exc:
            # raised after the task group, so that it is not wrapped in an ExceptionGroup
            error = exc
        tg.cancel_scope.cancel()  # done: stop watching
    if error is not None:
        raise error
    if not outcome:
        raise ClientDisconnect()
    return outcome[0]


def get_session(request: Request) -> Session:
    """The dependency: the app's one Session (503 while the app is not running)."""
    session = request.app.state.session
    if not isinstance(session, Session) or session.closed:
        raise HTTPException(503, "the app is not running")
    return session


# module level: FastAPI resolves the (string) annotations in the module's namespace
SessionDep = Annotated[Session, Depends(get_session)]


def create_app(session_factory: SessionFactory = Session) -> FastAPI:
    """The app; ``session_factory`` makes its one Session when the app starts."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Made here, inside the server's running loop, and closed when the app stops.
        async with session_factory() as session:
            app.state.session = session
            try:
                yield
            finally:
                app.state.session = None

    app = FastAPI(lifespan=lifespan)
    app.state.session = None

    @app.exception_handler(DedalusError)
    async def dedalus_error(request: Request, exc: DedalusError) -> JSONResponse:
        status, body = error_json(exc)
        headers = {}
        if isinstance(exc, RateLimitedError) and exc.retry_after is not None:
            headers["Retry-After"] = str(math.ceil(exc.retry_after))
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(ClientDisconnect)
    async def client_left(request: Request, exc: ClientDisconnect) -> Response:
        # nobody is there to read it; 499 is the customary "client closed request" in logs
        return Response(status_code=499)

    @app.post("/run")
    async def run(body: RunBody, session: SessionDep, request: Request) -> dict[str, Any]:
        """Run a command to its end; a client that leaves cancels the wait."""
        job = execution_request(body)

        async def work() -> ExecutionResult:
            return await session.run(
                job.machine_id,
                job.command,
                cwd=job.cwd,
                env=job.env,
                stdin=job.stdin,
                timeout_ms=job.timeout_ms,
                timeout=job.timeout,
                cancel_remote=body.cancel_remote,
            )

        return _result_json(await cancel_on_disconnect(request, work))

    @app.post("/start")
    async def start(body: RunBody, session: SessionDep) -> dict[str, Any]:
        """Start a command; answer at once with the reference to follow it by."""
        job = execution_request(body)
        handle = await session.create_execution(
            job.machine_id,
            job.command,
            cwd=job.cwd,
            env=job.env,
            stdin=job.stdin,
            timeout_ms=job.timeout_ms,
        )
        status = handle.last.status if handle.last is not None else None
        return {**handle.ref.to_dict(), "status": status}

    @app.get("/executions/{machine_id}/{execution_id}/events")
    async def events(
        machine_id: str, execution_id: str, session: SessionDep, cursor: str | None = None
    ) -> StreamingResponse:
        """The execution's events as server-sent events, until it ends."""
        try:
            handle = session.execution(machine_id, execution_id)
        except (TypeError, ValueError) as exc:
            raise refused(exc, "path", ("machine_id", "execution_id")) from exc
        # Once the stream has started its status is sent: look the execution up first, so
        # that a wrong ID is a 404 (or another error) the client can act on.
        await handle.refresh()
        stream = handle.events(cursor=cursor, follow=True)

        async def sse() -> AsyncIterator[str]:
            # Starlette stops iterating (cancels this) when the client disconnects
            try:
                async for event in stream:
                    yield f"id: {event.sequence}\n" + _sse(event.type, _event_json(event))
            except DedalusError as exc:
                status, body = error_json(exc)
                yield _sse("error", json.dumps({**body, "status": status}))
                return
            yield _sse("end", "{}")

        return StreamingResponse(sse(), media_type="text/event-stream")

    return app


#: For ``uvicorn tests.fastapi_app:app``: configured from the environment at startup.
app = create_app()

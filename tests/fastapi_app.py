"""An example FastAPI app on dedalus_async: one Session per app, opened in the lifespan.

Run it for real with ``uvicorn tests.fastapi_app:app`` (the Session reads
``DEDALUS_API_KEY`` / ``DEDALUS_BASE_URL`` when the app starts); tests build their own
with :func:`create_app` and a factory pointing at a FakeDedalus.

* ``POST /run`` runs a command and answers with its result (``cancel_remote`` in the body
  deletes the execution if the client goes away before it ends);
* ``POST /start`` starts one and answers with its reference at once;
* ``GET /executions/{machine_id}/{execution_id}/events`` streams its events as
  server-sent events until it ends.

The points it shows: the Session is made and closed in the lifespan, inside the server's
event loop, and every request borrows it through a dependency, so all requests share one
connection pool and one throttle; a client that disconnects cancels the work done for it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Annotated, Any, TypeVar

import anyio
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field
from starlette.requests import ClientDisconnect

from dedalus_async import (
    APIStatusError,
    ExecutionEvent,
    ExecutionResult,
    Session,
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

    @app.exception_handler(WaitTimeout)
    async def wait_timeout(request: Request, exc: WaitTimeout) -> JSONResponse:
        ref = exc.ref.to_dict() if exc.ref is not None else None
        return JSONResponse({"error": "timeout", "detail": str(exc), "ref": ref}, status_code=504)

    @app.exception_handler(ClientDisconnect)
    async def client_left(request: Request, exc: ClientDisconnect) -> Response:
        # nobody is there to read it; 499 is the customary "client closed request" in logs
        return Response(status_code=499)

    @app.exception_handler(APIStatusError)
    async def api_error(request: Request, exc: APIStatusError) -> JSONResponse:
        status = exc.status if 400 <= exc.status < 500 else 502
        return JSONResponse(
            {"error": exc.error_code or "upstream", "detail": str(exc)}, status_code=status
        )

    @app.post("/run")
    async def run(body: RunBody, session: SessionDep, request: Request) -> dict[str, Any]:
        """Run a command to its end; a client that leaves cancels the wait."""

        async def work() -> ExecutionResult:
            return await session.run(
                body.machine_id,
                body.command,
                cwd=body.cwd,
                env=body.env,
                stdin=body.stdin,
                timeout_ms=body.timeout_ms,
                timeout=body.timeout,
                cancel_remote=body.cancel_remote,
            )

        return _result_json(await cancel_on_disconnect(request, work))

    @app.post("/start")
    async def start(body: RunBody, session: SessionDep) -> dict[str, Any]:
        """Start a command; answer at once with the reference to follow it by."""
        handle = await session.create_execution(
            body.machine_id,
            body.command,
            cwd=body.cwd,
            env=body.env,
            stdin=body.stdin,
            timeout_ms=body.timeout_ms,
        )
        status = handle.last.status if handle.last is not None else None
        return {**handle.ref.to_dict(), "status": status}

    @app.get("/executions/{machine_id}/{execution_id}/events")
    async def events(
        machine_id: str, execution_id: str, session: SessionDep, cursor: str | None = None
    ) -> StreamingResponse:
        """The execution's events as server-sent events, until it ends."""
        stream = session.iter_events(machine_id, execution_id, cursor=cursor, follow=True)

        async def sse() -> AsyncIterator[str]:
            # Starlette stops iterating (cancels this) when the client disconnects
            async for event in stream:
                yield f"id: {event.sequence}\nevent: {event.type}\ndata: {_event_json(event)}\n\n"
            yield "event: end\ndata: {}\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

    return app


#: For ``uvicorn tests.fastapi_app:app``: configured from the environment at startup.
app = create_app()

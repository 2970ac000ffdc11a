"""The one place that talks to aiohttp's client.

It sends a :class:`~dedalus_async._wire.Request` and returns a
:class:`~dedalus_async._wire.Response`, and it maps every aiohttp and timeout failure into
:class:`~dedalus_async.TransportError` / :class:`~dedalus_async.RequestTimeout`, chained
to the original error without its traceback (aiohttp's frames hold the request headers in
their locals). It holds the credentials, so nothing else does, and no local variable of
its own holds them either: error reporters record a traceback's locals.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping

import aiohttp
from yarl import URL

from ._errors import RequestTimeout, TransportError
from ._wire import Request, Response

__all__ = ["AiohttpStream", "AiohttpTransport"]

_JSON_HEADERS = {"Content-Type": "application/json"}


class AiohttpTransport:
    """Sends requests over one ``aiohttp.ClientSession``.

    A borrowed ``client_session`` is used as it is and never closed here; otherwise one is
    created by :meth:`open`, inside the running event loop, and closed by :meth:`aclose`.
    Redirects are never followed, so credentials never reach another location.
    """

    __slots__ = (
        "_base",
        "_borrowed",
        "_gate",
        "_headers",
        "_idem_headers",
        "_limit",
        "_session",
        "_timeout",
    )

    def __init__(
        self,
        base_url: str,
        headers: Mapping[str, str],
        *,
        request_timeout: float,
        client_session: aiohttp.ClientSession | None = None,
        max_connections: int = 100,
    ) -> None:
        self._base = base_url.rstrip("/")
        self._headers = dict(headers)
        self._idem_headers = {**self._headers, **_JSON_HEADERS}
        self._timeout = aiohttp.ClientTimeout(total=request_timeout)
        if client_session is not None and not isinstance(client_session, aiohttp.ClientSession):
            kind = type(client_session).__name__
            raise TypeError(f"client_session must be an aiohttp.ClientSession, not {kind}")
        self._session = client_session
        self._borrowed = client_session is not None
        self._limit = max_connections
        self._gate: asyncio.Semaphore | None = None

    def __repr__(self) -> str:
        return f"AiohttpTransport({self._base!r}, borrowed={self._borrowed})"

    async def open(self) -> None:
        """Create the aiohttp session (inside the running loop) unless one was borrowed."""
        limit = self._limit
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=limit, ttl_dns_cache=300)
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=self._timeout,
                auto_decompress=True,
                raise_for_status=False,
            )
        else:
            borrowed = self._session.connector
            limit = borrowed.limit if borrowed is not None else 0
        # Requests beyond the pool's size queue here rather than inside aiohttp: a request
        # waiting for a connection then holds no aiohttp request object (memory, with
        # thousands waiting), and its timeout starts when it can actually be sent. Inside
        # aiohttp the queueing counted against the request timeout, so with 50,000
        # executions at once queued creates timed out, went to the back of the queue and
        # timed out again (59,340 retried creates in one run).
        self._gate = asyncio.Semaphore(limit) if limit > 0 else None

    async def aclose(self) -> None:
        """Close the aiohttp session if it is ours; leave a borrowed one open."""
        session, self._session = self._session, None
        if session is not None and not self._borrowed:
            await session.close()

    @contextlib.asynccontextmanager
    async def stream(
        self,
        request: Request,
        *,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
        read_timeout: float | None = None,
    ) -> AsyncIterator[AiohttpStream]:
        """Send one request and hand its response over as it arrives (see
        :class:`~dedalus_async._requester.StreamingTransport`). The connection is closed,
        not reused, when the caller leaves before the end."""
        session = self._session
        if session is None:
            raise TransportError("transport is closed", method=request.method, path=request.path)
        url = URL(self._base + request.path, encoded=True)
        if request.params:
            url = url.with_query(request.params)
        gate = self._gate
        if gate is not None:
            await gate.acquire()
        try:
            try:
                response = await session.request(
                    request.method,
                    url,
                    data=request.body,
                    headers={**self._headers_for(request), **(headers or {})},
                    allow_redirects=False,
                    timeout=aiohttp.ClientTimeout(total=timeout, sock_read=read_timeout),
                )
            except asyncio.CancelledError:
                raise
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                raise _stream_error(request, exc) from _cause(exc)
            try:
                yield AiohttpStream(response, request)
            finally:
                response.close()
        finally:
            if gate is not None:
                gate.release()

    def _headers_for(self, request: Request) -> dict[str, str]:
        if request.idempotency_key is not None:
            return {**self._idem_headers, "Idempotency-Key": request.idempotency_key}
        if request.body is not None:
            return self._idem_headers
        return self._headers

    async def send(self, request: Request, *, timeout: float | None = None) -> Response:
        """Send one request and read the whole response body."""
        session = self._session
        if session is None:
            raise TransportError("transport is closed", method=request.method, path=request.path)
        # the path is already percent-encoded: yarl need not parse or escape it again
        url = URL(self._base + request.path, encoded=True)
        if request.params:
            url = url.with_query(request.params)
        client_timeout = self._timeout
        default = client_timeout.total
        near_deadline: float | None = None
        if timeout is not None and timeout != default:
            # the session asks for less than the full request timeout only near a deadline
            client_timeout = aiohttp.ClientTimeout(total=timeout)
            if default is None or timeout < default:
                near_deadline = timeout
        gate = self._gate
        if gate is not None:
            if near_deadline is not None:
                # close to the caller's deadline, waiting for a connection counts too
                try:
                    async with asyncio.timeout(near_deadline):
                        await gate.acquire()
                except TimeoutError as exc:
                    raise RequestTimeout(
                        f"{request.method} {request.path} found no free connection "
                        f"within {near_deadline:g} s",
                        method=request.method,
                        path=request.path,
                    ) from exc.with_traceback(None)
            else:
                await gate.acquire()
        try:
            async with session.request(
                request.method,
                url,
                data=request.body,
                # built in place, never bound to a local of this frame: error reporters
                # that record a traceback's locals must not find the key there
                headers=self._headers_for(request),
                allow_redirects=False,
                timeout=client_timeout,
            ) as resp:
                body = await resp.read()
                return Response(resp.status, resp.headers, body)
        except TimeoutError as exc:  # includes asyncio.TimeoutError and aiohttp's own
            limit = timeout if timeout is not None else self._timeout.total
            raise RequestTimeout(
                f"{request.method} {request.path} got no complete response within {limit:g} s",
                method=request.method,
                path=request.path,
            ) from exc.with_traceback(None)
        except aiohttp.ClientResponseError as exc:
            # Its request_info holds the request headers, credentials included: the error
            # is raised below, outside this block, so that it neither chains nor keeps it.
            scrubbed = TransportError(
                f"{request.method} {request.path} failed: {type(exc).__name__}: "
                f"{exc.status}, {exc.message}",
                method=request.method,
                path=request.path,
            )
        except aiohttp.ClientError as exc:
            raise TransportError(
                f"{request.method} {request.path} failed: {type(exc).__name__}: {_reason(exc)}",
                method=request.method,
                path=request.path,
            ) from exc.with_traceback(None)  # aiohttp's frames hold the headers in locals
        except asyncio.CancelledError:
            raise
        except OSError as exc:  # a socket error that aiohttp let through unwrapped
            raise TransportError(
                f"{request.method} {request.path} failed: {type(exc).__name__}: {exc}",
                method=request.method,
                path=request.path,
            ) from exc.with_traceback(None)
        finally:
            if gate is not None:
                gate.release()
        raise scrubbed


class AiohttpStream:
    """An aiohttp response read line by line; its failures mapped as :meth:`send` maps
    them (a :class:`~dedalus_async._requester.Stream`)."""

    __slots__ = ("_request", "_response")

    def __init__(self, response: aiohttp.ClientResponse, request: Request) -> None:
        self._response = response
        self._request = request

    @property
    def status(self) -> int:
        return self._response.status

    @property
    def headers(self) -> Mapping[str, str]:
        return self._response.headers

    async def read(self) -> bytes:
        try:
            return await self._response.read()
        except asyncio.CancelledError:
            raise
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise _stream_error(self._request, exc) from _cause(exc)

    async def lines(self) -> AsyncIterator[bytes]:
        content = self._response.content
        while True:
            try:
                line = await content.readline()
            except asyncio.CancelledError:
                raise
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                raise _stream_error(self._request, exc) from _cause(exc)
            if not line:
                return
            yield line


def _stream_error(request: Request, exc: BaseException) -> TransportError:
    """The library's error for a failure while opening or reading a stream (never the
    aiohttp error's request details: they hold the headers)."""
    where = f"{request.method} {request.path}"
    if isinstance(exc, TimeoutError):
        return RequestTimeout(
            f"{where}: the stream went quiet or ran past its deadline",
            method=request.method,
            path=request.path,
        )
    if isinstance(exc, aiohttp.ClientResponseError):
        reason = f"{exc.status}, {exc.message}"
    elif isinstance(exc, aiohttp.ClientError):
        reason = _reason(exc)
    else:
        reason = str(exc)
    return TransportError(
        f"{where} failed: {type(exc).__name__}: {reason}", method=request.method, path=request.path
    )


def _cause(exc: BaseException) -> BaseException | None:
    # a ClientResponseError's request_info holds the request headers, credentials
    # included: it is not chained; the others are, without their frames (see send)
    if isinstance(exc, aiohttp.ClientResponseError):
        return None
    return exc.with_traceback(None)


def _reason(exc: aiohttp.ClientError) -> str:
    # aiohttp's messages name the URL and the failure, never request headers
    text = str(exc)
    return text or "connection closed"

"""The executions API on aiohttp's server: :class:`HTTPServer` serves an
:class:`~dedalus_async._server.ExecutionsServer` (the API's rules, no network code) on a
host and port.

The local backend and the test kit's :class:`~dedalus_async.testing.FakeDedalus` both
serve their API through it; the fake wraps its :attr:`HTTPServer.handler` with faults and
a request log. This is the package's only use of aiohttp's server side.

The default handler, :meth:`HTTPServer.answer` (the local backend's), checks the key
before it reads a byte of the body: a request without the right key gets the server's
401 and its body is never buffered. A body longer than ``max_body_size`` is refused with
an API-shaped 413 (``PAYLOAD_TOO_LARGE``), without being read when its Content-Length
says so up front, after at most ``max_body_size`` bytes when it is sent chunked.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Final

from aiohttp import web

from ._checks import check_count
from ._server import APIRequest, APIResponse, ExecutionsServer

__all__ = ["DEFAULT_MAX_BODY_SIZE", "HTTPServer", "Handler", "to_web_response"]

#: The body size :class:`HTTPServer` accepts unless told otherwise (what the test kit's
#: fake has always accepted; the local backend sets a smaller one).
DEFAULT_MAX_BODY_SIZE: Final = 64 * 1024 * 1024


#: What answers one HTTP request (the test kit puts faults and a request log around it).
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class HTTPServer:
    """Serves an :class:`~dedalus_async._server.ExecutionsServer` over HTTP, with aiohttp.

    Every request goes to ``handler``, by default :meth:`answer`: the key is checked, the
    body is read (at most ``max_body_size`` bytes), the server answers it, and the answer
    is sent as it is. :meth:`close` stops serving and closes the server's runner; the
    server's ``name`` appears in the messages.

    A request answered without reading its whole body (a wrong key, a body too large) is
    answered with ``Connection: close``; aiohttp then reads and drops what the client still
    sends for at most ``lingering_time`` seconds, so that the client gets to read the
    answer, and closes the connection. Nothing of that body is kept.
    """

    def __init__(
        self,
        server: ExecutionsServer,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        handler: Handler | None = None,
        max_body_size: int = DEFAULT_MAX_BODY_SIZE,
        lingering_time: float = 10.0,
    ) -> None:
        self.server = server
        self.host = host
        self.port = port
        #: the largest request body read, in bytes (a larger one is a 413)
        self.max_body_size = check_count("max_body_size", max_body_size)
        self.lingering_time = lingering_time
        self._handler: Handler = handler if handler is not None else self.answer
        self._app_runner: web.AppRunner | None = None
        self._base_url: str | None = None
        self._closed = False
        #: the application :meth:`start` serves (made here, so middlewares can be added)
        self.app: web.Application = self.make_app()

    def __repr__(self) -> str:
        return f"<HTTPServer {self._base_url or 'not started'} serving {self.server!r}>"

    def make_app(self) -> web.Application:
        """A new aiohttp application serving the same server (e.g. for aiohttp's
        ``TestServer``); :attr:`app` is one made at construction."""
        app = web.Application(client_max_size=self.max_body_size)
        # One catch-all route: the server routes on the raw path itself, so percent-encoded
        # ids (even an encoded "/") are split before they are decoded.
        app.router.add_route("*", "/{tail:.*}", self._handler)
        return app

    async def read(self, request: web.Request) -> APIRequest:
        """Read the body of ``request`` and give it the server's next request id.

        The whole body, before any check (the test kit's request log keeps it); a body
        over ``max_body_size`` raises aiohttp's ``HTTPRequestEntityTooLarge``.
        """
        return _api_request(request, await request.read(), self.server.next_request_id())

    async def answer(self, request: web.Request) -> web.Response:
        """The default handler: the key first, then the body, then the server's answer.

        A missing or wrong key is the server's 401, sent without reading the body; a body
        over ``max_body_size`` is a 413 ``PAYLOAD_TOO_LARGE`` (read up to the limit at most,
        not at all when its Content-Length is already too large).
        """
        server = self.server
        request_id = server.next_request_id()
        denied = server.authenticate(request.headers, request_id)
        if denied is not None:
            return self._refused(request, denied)
        length = request.content_length
        try:
            if length is not None and length > self.max_body_size:
                raise web.HTTPRequestEntityTooLarge(self.max_body_size, length)
            body = await request.read()  # stops past client_max_size (= max_body_size)
        except web.HTTPRequestEntityTooLarge:
            too_large = server.refuse(
                request_id,
                413,
                "PAYLOAD_TOO_LARGE",
                f"the request body is larger than {self.max_body_size} bytes",
            )
            return self._refused(request, too_large)
        api_request = _api_request(request, body, request_id)
        return to_web_response(server.handle(api_request, authenticated=True))

    @staticmethod
    def _refused(request: web.Request, response: APIResponse) -> web.Response:
        out = to_web_response(response)
        if not request.content.is_eof():
            # the rest of the body is never read: this connection cannot carry another
            # request, so say so (aiohttp drops what still comes, then closes it)
            out.force_close()
        return out

    async def start(self) -> None:
        """Bind ``host:port`` (port 0 = a free one) and serve; sets :attr:`base_url`."""
        name = self.server.name
        if self._app_runner is not None:
            raise RuntimeError(f"{name} is already started")
        if self._closed:
            raise RuntimeError(f"{name} is closed")
        # A short shutdown timeout: a request parked in a slow handler should not hold up
        # the end of the server.
        app_runner = web.AppRunner(
            self.app,
            access_log=None,
            handle_signals=False,
            shutdown_timeout=0.25,
            lingering_time=self.lingering_time,
        )
        await app_runner.setup()
        try:
            site = web.TCPSite(app_runner, self.host, self.port, backlog=4096)
            await site.start()
        except BaseException:
            await app_runner.cleanup()
            raise
        self._app_runner = app_runner
        host, port = app_runner.addresses[0][:2]
        self._base_url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
        self.server.public_url = self._base_url

    async def close(self) -> None:
        """Stop serving, then close the server's runner. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._app_runner is not None:
                await self._app_runner.cleanup()
                self._app_runner = None
        finally:
            await self.server.aclose()

    @property
    def base_url(self) -> str:
        """``http://HOST:PORT`` once started."""
        if self._base_url is None:
            raise RuntimeError(f"{self.server.name} is not started: use 'async with' or start()")
        return self._base_url


def _api_request(request: web.Request, body: bytes, request_id: str) -> APIRequest:
    return APIRequest(
        method=request.method,
        raw_path=request.rel_url.raw_path,
        path=request.path,
        query=request.query,
        headers=request.headers,
        body=body,
        request_id=request_id,
    )


def to_web_response(response: APIResponse) -> web.Response:
    """The aiohttp response that sends ``response``."""
    return web.Response(
        status=response.status,
        # a stream (server-sent events) is sent chunk by chunk as it is produced
        body=response.stream if response.stream is not None else response.body,
        content_type=response.content_type,
        headers=response.headers,
    )

"""The executions API on aiohttp's server: :class:`HTTPServer` serves an
:class:`~dedalus_async._server.ExecutionsServer` (the API's rules, no network code) on a
host and port.

The local backend and the test kit's :class:`~dedalus_async.testing.FakeDedalus` both
serve their API through it; the fake wraps its :attr:`HTTPServer.handler` with faults and
a request log. This is the package's only use of aiohttp's server side.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from ._server import APIRequest, APIResponse, ExecutionsServer

__all__ = ["HTTPServer", "Handler", "to_web_response"]


#: What answers one HTTP request (the test kit puts faults and a request log around it).
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class HTTPServer:
    """Serves an :class:`~dedalus_async._server.ExecutionsServer` over HTTP, with aiohttp.

    Every request goes to ``handler``, by default :meth:`answer`: the body is read, the
    server answers it, and the answer is sent as it is. :meth:`close` stops serving and
    closes the server's runner; the server's ``name`` appears in the messages.
    """

    def __init__(
        self,
        server: ExecutionsServer,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        handler: Handler | None = None,
    ) -> None:
        self.server = server
        self.host = host
        self.port = port
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
        app = web.Application(client_max_size=64 * 1024 * 1024)
        # One catch-all route: the server routes on the raw path itself, so percent-encoded
        # ids (even an encoded "/") are split before they are decoded.
        app.router.add_route("*", "/{tail:.*}", self._handler)
        return app

    async def read(self, request: web.Request) -> APIRequest:
        """Read the body of ``request`` and give it the server's next request id."""
        body = await request.read()
        return APIRequest(
            method=request.method,
            raw_path=request.rel_url.raw_path,
            path=request.path,
            query=request.query,
            headers=request.headers,
            body=body,
            request_id=self.server.next_request_id(),
        )

    async def answer(self, request: web.Request) -> web.Response:
        """The default handler: the server's answer, as it is."""
        return to_web_response(self.server.handle(await self.read(request)))

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
            self.app, access_log=None, handle_signals=False, shutdown_timeout=0.25
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


def to_web_response(response: APIResponse) -> web.Response:
    """The aiohttp response that sends ``response``."""
    return web.Response(
        status=response.status,
        body=response.body,
        content_type=response.content_type,
        headers=response.headers,
    )

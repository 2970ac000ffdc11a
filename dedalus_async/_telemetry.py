"""OpenTelemetry traces and metrics, when the application has configured them.

Optional (``pip install "dedalus-async[otel]"``, which brings ``opentelemetry-api``). A
Session decides when it opens: it uses the providers passed as
``Session(tracer_provider=..., meter_provider=...)``, else the global ones, but only those
an application really set (the API's default proxies, which would drop everything, do not
count). With neither, :func:`resolve` returns ``None`` and the Session runs as if this
module did not exist: OpenTelemetry is not even imported unless the application imported
it, and the request path pays one ``is not None`` test.

What is recorded (names follow OpenTelemetry's semantic conventions where they exist, the
rest is under ``dedalus.``):

* a span per HTTP attempt (kind CLIENT, ``{method} {url template}``), unless the
  application instruments aiohttp itself (opentelemetry-instrumentation-aiohttp-client),
  whose spans then take their place under ours;
* ``dedalus.wait`` per wait, with a ``dedalus.status_change`` event for each status seen;
* ``dedalus.execution`` per ``Session.run`` and per fan-out job (create, wait, output);
* ``dedalus.run_many`` / ``dedalus.as_completed`` around a fan-out;
* metrics: ``dedalus.executions`` (by final status), ``dedalus.wait.duration``,
  ``dedalus.wait.polls``, ``dedalus.retries``, ``dedalus.rate_limit.pauses``.

Never recorded: the API key (it lives in the transport's headers, which nothing here
reads), ``env`` values, stdin, the command's arguments, output.
"""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

from ._errors import ExecutionFailed, WaitTimeout
from ._version import __version__

if TYPE_CHECKING:
    from ._models import Execution
    from ._results import WaitStats
    from ._wire import Request, Response

__all__ = ["Telemetry", "resolve"]

_SCOPE: Final = "dedalus_async"
# an execution's path, with its IDs as the template's placeholders
_EXECUTIONS = re.compile(r"^/v1/machines/[^/]+/executions(/[^/]+)?")


def url_template(path: str) -> str:
    """The path with its IDs as placeholders (``url.template``): ``/v1/machines/dm-1/
    executions/ex-2/output`` → ``/v1/machines/{machine_id}/executions/{execution_id}/output``."""
    match = _EXECUTIONS.match(path)
    if match is None:
        return path
    head = "/v1/machines/{machine_id}/executions"
    if match.group(1):
        head += "/{execution_id}"
    return head + path[match.end() :]


def _real_tracer_provider(given: Any) -> Any:
    if given is not None:
        return given
    trace = sys.modules.get("opentelemetry.trace")
    if trace is None:
        return None  # nobody imported OpenTelemetry, so nobody configured it
    provider = trace.get_tracer_provider()
    if isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider)):
        return None
    return provider


def _real_meter_provider(given: Any) -> Any:
    if given is not None:
        return given
    metrics = sys.modules.get("opentelemetry.metrics")
    if metrics is None:
        return None
    provider = metrics.get_meter_provider()
    # the API's default is a private proxy class; a NoOp provider records nothing either
    if isinstance(provider, metrics.NoOpMeterProvider) or type(provider).__name__.startswith(
        "_Proxy"
    ):
        return None
    return provider


def _aiohttp_instrumented() -> bool:
    """Whether opentelemetry-instrumentation-aiohttp-client is on: its spans replace ours."""
    module = sys.modules.get("opentelemetry.instrumentation.aiohttp_client")
    if module is None:
        return False
    return bool(module.AioHttpClientInstrumentor().is_instrumented_by_opentelemetry)


def resolve(
    tracer_provider: Any, meter_provider: Any, base_url: str, *, over_aiohttp: bool = True
) -> Telemetry | None:
    """A :class:`Telemetry` if a provider is given or configured globally, else ``None``.

    ``over_aiohttp``: the requests go through aiohttp (so its instrumentation, if on, traces
    them); a custom transport's requests are always traced here.
    """
    tracer_provider = _real_tracer_provider(tracer_provider)
    meter_provider = _real_meter_provider(meter_provider)
    if tracer_provider is None and meter_provider is None:
        return None
    return Telemetry(tracer_provider, meter_provider, base_url, over_aiohttp=over_aiohttp)


class Telemetry:
    """The spans and instruments of one Session (see the module docstring)."""

    def __init__(
        self, tracer_provider: Any, meter_provider: Any, base_url: str, *, over_aiohttp: bool
    ) -> None:
        from opentelemetry import trace

        self._trace = trace
        self.tracer = (
            None if tracer_provider is None else tracer_provider.get_tracer(_SCOPE, __version__)
        )
        # our own HTTP spans, unless aiohttp's instrumentation makes them already
        self.http_spans = self.tracer is not None and not (over_aiohttp and _aiohttp_instrumented())
        url = urlsplit(base_url)
        self._base = base_url.rstrip("/")
        self._server: dict[str, Any] = {"server.address": url.hostname or ""}
        if url.port is not None:
            self._server["server.port"] = url.port
        else:
            self._server["server.port"] = 443 if url.scheme == "https" else 80
        self._meters = meter_provider is not None
        if meter_provider is not None:
            meter = meter_provider.get_meter(_SCOPE, __version__)
            self.executions = meter.create_counter(
                "dedalus.executions",
                unit="{execution}",
                description="Executions run to their end, by final status",
            )
            self.wait_duration = meter.create_histogram(
                "dedalus.wait.duration", unit="s", description="Time from a wait's start to its end"
            )
            self.wait_polls = meter.create_histogram(
                "dedalus.wait.polls", unit="{poll}", description="Looks at an execution per wait"
            )
            self.retries = meter.create_counter(
                "dedalus.retries", unit="{retry}", description="Requests sent again after a failure"
            )
            self.pauses = meter.create_counter(
                "dedalus.rate_limit.pauses",
                unit="{pause}",
                description="HTTP 429 answers, each pausing the whole Session",
            )

    # --- HTTP attempts (called from Requester.send) ------------------------------------

    async def send(
        self,
        send: Callable[..., Awaitable[Response]],
        request: Request,
        timeout: float | None,
        attempt: int,
    ) -> Response:
        """``send(request, timeout=timeout)`` (a transport's) in a CLIENT span, unless
        aiohttp's instrumentation makes that span."""
        if not self.http_spans:
            return await send(request, timeout=timeout)
        assert self.tracer is not None
        template = url_template(request.path)
        attributes: dict[str, Any] = {
            "http.request.method": request.method,
            "url.full": self._base + request.path,
            "url.template": template,
            **self._server,
        }
        if attempt > 1:
            attributes["http.request.resend_count"] = attempt - 1
        span = self.tracer.start_span(
            f"{request.method} {template}", kind=self._trace.SpanKind.CLIENT, attributes=attributes
        )
        try:
            response = await send(request, timeout=timeout)
        except BaseException as exc:
            span.set_attribute("error.type", type(exc).__qualname__)
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, type(exc).__name__))
            span.end()
            raise
        span.set_attribute("http.response.status_code", response.status)
        if response.status >= 400:
            span.set_attribute("error.type", str(response.status))
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR))
        span.end()
        return response

    def retried(self, request: Request) -> None:
        if self._meters:
            self.retries.add(1, {"http.request.method": request.method})

    def rate_limited(self) -> None:
        if self._meters:
            self.pauses.add(1)

    # --- waits, executions, fan-outs -----------------------------------------------------

    @contextlib.contextmanager
    def wait_span(
        self, machine_id: str, execution_id: str, stats: Callable[[], WaitStats | None]
    ) -> Iterator[Callable[[Execution], None]]:
        """Around one wait; yields the function the loop calls with every snapshot."""
        seen: list[str | None] = [None]
        span = None
        if self.tracer is not None:
            span = self.tracer.start_span(
                "dedalus.wait",
                attributes={"dedalus.machine_id": machine_id, "dedalus.execution_id": execution_id},
            )

        def observe(snapshot: Execution) -> None:
            if snapshot.status != seen[0]:
                seen[0] = snapshot.status
                if span is not None:
                    span.add_event(
                        "dedalus.status_change", {"dedalus.execution.status": snapshot.status}
                    )

        outcome = "error"
        try:
            with self.within(span):
                yield observe
            outcome = seen[0] or "unseen"
        except BaseException as exc:
            outcome = "timeout" if isinstance(exc, WaitTimeout) else "error"
            if span is not None:
                self._failed(span, exc)
            raise
        finally:
            done = stats()
            if span is not None:
                if seen[0] is not None:
                    span.set_attribute("dedalus.execution.status", seen[0])
                if done is not None:
                    span.set_attributes(_stats_attributes(done))
                span.end()
            if self._meters and done is not None:
                labels = {"dedalus.wait.outcome": outcome}
                self.wait_duration.record(done.elapsed, labels)
                self.wait_polls.record(done.polls, labels)

    @contextlib.contextmanager
    def execution_span(self, machine_id: str) -> Iterator[Callable[[Execution], None]]:
        """Around one execution's life (create, wait, output); yields the function that
        records each snapshot of it (the create's answer, the wait's end)."""
        span = None
        if self.tracer is not None:
            span = self.tracer.start_span(
                "dedalus.execution", attributes={"dedalus.machine_id": machine_id}
            )
        final: list[str] = ["unknown"]

        def note(execution: Execution) -> None:
            final[0] = execution.status
            if span is not None:
                span.set_attributes(_execution_attributes(execution))

        try:
            with self.within(span):
                yield note
        except BaseException as exc:
            # what the error knows of the execution: a timeout's last snapshot, a failed
            # check's result
            if isinstance(exc, WaitTimeout) and exc.last is not None:
                note(exc.last)
            elif isinstance(exc, ExecutionFailed):
                note(exc.result.execution)
            if self._meters:
                self.executions.add(
                    1,
                    {"dedalus.execution.status": final[0], "error.type": type(exc).__qualname__},
                )
            if span is not None:
                self._failed(span, exc)
                span.end()
            raise
        if self._meters:
            self.executions.add(1, {"dedalus.execution.status": final[0]})
        if span is not None:
            span.end()

    @contextlib.contextmanager
    def fanout_span(self, name: str, total: int, concurrency: int) -> Iterator[Any]:
        """Around a fan-out; yields its span (or None) for :meth:`within`."""
        if self.tracer is None:
            yield None
            return
        span = self.tracer.start_span(
            name,
            attributes={"dedalus.fanout.size": total, "dedalus.fanout.concurrency": concurrency},
        )
        try:
            with self.within(span):
                yield span
        except BaseException as exc:
            self._failed(span, exc)
            raise
        finally:
            span.end()

    def within(self, span: Any) -> contextlib.AbstractContextManager[Any]:
        """Make ``span`` current (tasks started inside are its children)."""
        if span is None:
            return contextlib.nullcontext()
        return self._trace.use_span(span, end_on_exit=False, record_exception=False)

    def _failed(self, span: Any, exc: BaseException) -> None:
        span.set_attribute("error.type", type(exc).__qualname__)
        span.record_exception(exc)
        span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, type(exc).__name__))


def _stats_attributes(stats: WaitStats) -> dict[str, Any]:
    out: dict[str, Any] = {
        "dedalus.wait.polls": stats.polls,
        "dedalus.wait.retries": stats.retries,
        "dedalus.wait.slept_s": stats.slept,
        "dedalus.wait.elapsed_s": stats.elapsed,
    }
    if stats.detection_lag is not None:
        out["dedalus.wait.detection_lag_s"] = stats.detection_lag
    return out


def _execution_attributes(execution: Execution) -> dict[str, Any]:
    out: dict[str, Any] = {
        "dedalus.execution_id": execution.execution_id,
        "dedalus.execution.status": execution.status,
    }
    for name, key in (
        ("exit_code", "dedalus.execution.exit_code"),
        ("error_code", "dedalus.execution.error_code"),
        ("creation_trace_id", "dedalus.creation_trace_id"),
        ("creation_request_id", "dedalus.creation_request_id"),
    ):
        value = getattr(execution, name)
        if value is not None:
            out[key] = value
    return out

"""OpenTelemetry spans and metrics (the ``otel`` extra), with the SDK's in-memory exporters.

Providers are passed to the Session explicitly: the global ones can be set once per process,
so the tests of the global path (and of "nothing imported without it") run in a subprocess.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from dedalus_async import ExecutionFailed, ExecutionRequest, Session, WaitTimeout
from dedalus_async._telemetry import url_template
from dedalus_async._transport import AiohttpTransport
from dedalus_async._wire import Request, Response
from dedalus_async.testing import FakeDedalus, Fault, Outcome, Script

from .conftest import API_KEY

MACHINE = "dm-0190a8f2-7c1e-7d2a-9b3c-4d5e6f708192"
OTHER_MACHINE = "dm-0190a8f2-7c1e-7d2a-9b3c-4d5e6f708193"


@pytest.fixture
def otel_spans() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


@pytest.fixture
def otel_metrics() -> Iterator[tuple[MeterProvider, InMemoryMetricReader]]:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    yield provider, reader
    provider.shutdown()


@pytest.fixture
async def traced_session(
    fake: FakeDedalus,
    otel_spans: tuple[TracerProvider, InMemorySpanExporter],
    otel_metrics: tuple[MeterProvider, InMemoryMetricReader],
) -> AsyncIterator[Session]:
    session = fake.session(
        random=lambda: 0.5, tracer_provider=otel_spans[0], meter_provider=otel_metrics[0]
    )
    async with session:
        yield session


def _finished(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    return list(exporter.get_finished_spans())


def _named(spans: list[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [span for span in spans if span.name == name]


def _parent_id(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def _span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    span_id: int = span.context.span_id
    return span_id


def _points(reader: InMemoryMetricReader) -> dict[str, list[Any]]:
    data = reader.get_metrics_data()
    out: dict[str, list[Any]] = {}
    assert data is not None
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            assert scope.scope.name == "dedalus_async"
            for metric in scope.metrics:
                out.setdefault(metric.name, []).extend(metric.data.data_points)
    return out


def test_url_template_replaces_the_ids() -> None:
    assert url_template(f"/v1/machines/{MACHINE}/executions") == (
        "/v1/machines/{machine_id}/executions"
    )
    assert url_template(f"/v1/machines/{MACHINE}/executions/ex-1/output") == (
        "/v1/machines/{machine_id}/executions/{execution_id}/output"
    )
    assert url_template(f"/v1/machines/{MACHINE}/executions/ex-1") == (
        "/v1/machines/{machine_id}/executions/{execution_id}"
    )
    assert url_template("/v1/other") == "/v1/other"


async def test_run_is_one_execution_span_with_its_wait_and_requests_inside(
    traced_session: Session,
    fake: FakeDedalus,
    otel_spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    result = await traced_session.run(MACHINE, ["echo", "hi"])
    spans = _finished(otel_spans[1])
    [execution] = _named(spans, "dedalus.execution")
    [wait] = _named(spans, "dedalus.wait")
    assert execution.parent is None
    assert _parent_id(wait) == _span_id(execution)
    assert execution.attributes is not None
    assert execution.attributes["dedalus.machine_id"] == MACHINE
    assert execution.attributes["dedalus.execution_id"] == result.execution.execution_id
    assert execution.attributes["dedalus.execution.status"] == "succeeded"
    assert execution.attributes["dedalus.execution.exit_code"] == 0
    assert execution.status.status_code is StatusCode.UNSET

    # every status the wait saw, once each, in order
    changes = [
        event.attributes["dedalus.execution.status"]
        for event in wait.events
        if event.name == "dedalus.status_change" and event.attributes is not None
    ]
    assert changes == ["wake_in_progress", "queued", "running", "succeeded"]
    assert wait.attributes is not None
    assert wait.attributes["dedalus.wait.polls"] == result.stats.polls
    assert wait.attributes["dedalus.execution.status"] == "succeeded"

    create = _named(spans, "POST /v1/machines/{machine_id}/executions")
    polls = _named(spans, "GET /v1/machines/{machine_id}/executions/{execution_id}")
    output = _named(spans, "GET /v1/machines/{machine_id}/executions/{execution_id}/output")
    assert len(create) == 1
    assert len(output) == 1
    assert len(polls) == result.stats.polls  # one GET per poll (the create answered first)
    assert _parent_id(create[0]) == _span_id(execution)
    assert _parent_id(output[0]) == _span_id(execution)
    assert {_parent_id(span) for span in polls} == {_span_id(wait)}
    post = create[0]
    assert post.kind is SpanKind.CLIENT
    assert post.attributes is not None
    assert post.attributes["http.request.method"] == "POST"
    assert post.attributes["http.response.status_code"] == 200
    assert post.attributes["server.address"] == "127.0.0.1"
    assert post.attributes["server.port"] == int(fake.base_url.rsplit(":", 1)[1])
    assert post.attributes["url.full"] == fake.base_url + f"/v1/machines/{MACHINE}/executions"
    assert "http.request.resend_count" not in post.attributes


async def test_metrics_count_executions_waits_and_polls(
    traced_session: Session, otel_metrics: tuple[MeterProvider, InMemoryMetricReader]
) -> None:
    ok = await traced_session.run(MACHINE, ["echo", "hi"])
    await traced_session.run(MACHINE, ["false"])
    points = _points(otel_metrics[1])
    by_status = {
        point.attributes["dedalus.execution.status"]: point.value
        for point in points["dedalus.executions"]
    }
    assert by_status == {"succeeded": 1, "failed": 1}
    durations = {
        point.attributes["dedalus.wait.outcome"]: point.count
        for point in points["dedalus.wait.duration"]
    }
    assert durations == {"succeeded": 1, "failed": 1}
    polls = {
        point.attributes["dedalus.wait.outcome"]: point.sum
        for point in points["dedalus.wait.polls"]
    }
    assert polls["succeeded"] == ok.stats.polls
    assert "dedalus.retries" not in points  # nothing was retried


async def test_retries_and_rate_limits_are_counted_and_marked_on_the_request_spans(
    traced_session: Session,
    fake: FakeDedalus,
    otel_spans: tuple[TracerProvider, InMemorySpanExporter],
    otel_metrics: tuple[MeterProvider, InMemoryMetricReader],
) -> None:
    fake.add_fault(Fault(method="POST", status=503, times=1))
    fake.add_fault(Fault(method="GET", status=429, headers={"Retry-After": "1"}, times=1))
    await traced_session.run(MACHINE, ["echo", "hi"])
    posts = _named(_finished(otel_spans[1]), "POST /v1/machines/{machine_id}/executions")
    assert [
        span.attributes and span.attributes.get("http.response.status_code") for span in posts
    ] == [
        503,
        200,
    ]
    first, second = posts
    assert first.status.status_code is StatusCode.ERROR
    assert first.attributes is not None
    assert first.attributes["error.type"] == "503"
    assert second.attributes is not None
    assert second.attributes["http.request.resend_count"] == 1
    points = _points(otel_metrics[1])
    retries = {p.attributes["http.request.method"]: p.value for p in points["dedalus.retries"]}
    assert retries == {"POST": 1, "GET": 1}
    assert sum(p.value for p in points["dedalus.rate_limit.pauses"]) == 1


async def test_a_wait_timeout_marks_the_execution_span_failed_with_what_was_known(
    traced_session: Session,
    fake: FakeDedalus,
    otel_spans: tuple[TracerProvider, InMemorySpanExporter],
    otel_metrics: tuple[MeterProvider, InMemoryMetricReader],
) -> None:
    fake.set_script(Script.stuck())
    with pytest.raises(WaitTimeout) as caught:
        await traced_session.run(MACHINE, ["sleep", "1000"], timeout=3)
    spans = _finished(otel_spans[1])
    [execution] = _named(spans, "dedalus.execution")
    [wait] = _named(spans, "dedalus.wait")
    assert execution.status.status_code is StatusCode.ERROR
    assert execution.attributes is not None
    assert execution.attributes["error.type"] == "WaitTimeout"
    assert execution.attributes["dedalus.execution_id"] == caught.value.ref.execution_id
    assert execution.attributes["dedalus.execution.status"] == "running"
    assert wait.status.status_code is StatusCode.ERROR
    points = _points(otel_metrics[1])
    [count] = points["dedalus.executions"]
    assert count.attributes == {"dedalus.execution.status": "running", "error.type": "WaitTimeout"}
    [duration] = points["dedalus.wait.duration"]
    assert duration.attributes == {"dedalus.wait.outcome": "timeout"}
    assert duration.sum == pytest.approx(3.0, abs=0.01)  # the fake clock: exactly the deadline


async def test_run_many_is_one_span_over_its_executions_and_page_reads(
    traced_session: Session, otel_spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    requests = [ExecutionRequest(machine_id=MACHINE, command=["sleep", "5"]) for _ in range(8)]
    requests.append(ExecutionRequest(machine_id=OTHER_MACHINE, command=["echo", "x"]))
    results = await traced_session.run_many(requests, concurrency=10)
    spans = _finished(otel_spans[1])
    [fanout] = _named(spans, "dedalus.run_many")
    assert fanout.parent is None
    assert fanout.attributes is not None
    assert fanout.attributes["dedalus.fanout.size"] == 9
    assert fanout.attributes["dedalus.fanout.done"] == 9
    assert fanout.attributes["dedalus.fanout.failed"] == 0
    executions = _named(spans, "dedalus.execution")
    assert len(executions) == 9
    assert {_parent_id(span) for span in executions} == {_span_id(fanout)}
    assert sorted(
        str(span.attributes["dedalus.execution_id"]) for span in executions if span.attributes
    ) == sorted(result.execution.execution_id for result in results)
    # eight waiters on one machine share list pages: those reads belong to the fan-out
    pages = _named(spans, "GET /v1/machines/{machine_id}/executions")
    assert pages, "the fan-out read no pages: the test no longer covers the refresher"
    assert {_parent_id(span) for span in pages} == {_span_id(fanout)}


async def test_as_completed_has_its_own_span(
    traced_session: Session, otel_spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    requests = [ExecutionRequest(machine_id=MACHINE, command=["echo", str(i)]) for i in range(3)]
    async with traced_session.as_completed(requests) as finished:
        seen = [item.index async for item in finished]
    assert sorted(seen) == [0, 1, 2]
    spans = _finished(otel_spans[1])
    [fanout] = _named(spans, "dedalus.as_completed")
    assert {_parent_id(span) for span in _named(spans, "dedalus.execution")} == {_span_id(fanout)}


async def test_secrets_never_reach_a_span_or_a_metric(
    traced_session: Session,
    fake: FakeDedalus,
    otel_spans: tuple[TracerProvider, InMemorySpanExporter],
    otel_metrics: tuple[MeterProvider, InMemoryMetricReader],
) -> None:
    env_secret = "env-value-7f3a9c"
    stdin_secret = "stdin-text-51be02"
    argv_secret = "argument-9d1e44"
    fake.set_script(
        lambda body: Script.immediate(
            Outcome(status="failed", exit_code=3, stderr=stdin_secret, stdout=env_secret)
        )
    )
    with pytest.raises(ExecutionFailed):
        await traced_session.run(
            MACHINE,
            ["sh", "-c", f"echo {argv_secret}"],
            env={"TOKEN": env_secret},
            stdin=stdin_secret,
            check=True,
        )
    fake.add_fault(Fault(method="GET", status=500, body={"error": API_KEY}, times=1))
    await traced_session.run(MACHINE, ["echo", "hi"], env={"TOKEN": env_secret})
    recorded = json.dumps([json.loads(span.to_json()) for span in _finished(otel_spans[1])])
    metrics = otel_metrics[1].get_metrics_data()
    assert metrics is not None
    recorded += metrics.to_json()
    assert "dedalus.execution" in recorded  # what is searched is really there
    for secret in (API_KEY, env_secret, stdin_secret, argv_secret):
        assert secret not in recorded


async def test_without_providers_the_session_records_nothing(fake: FakeDedalus) -> None:
    # OpenTelemetry is imported in this process, but no global provider is set in it
    async with fake.session() as session:
        assert session._requester.telemetry is None
        await session.run(MACHINE, ["echo", "hi"])


def _run_script(code: str) -> dict[str, Any]:
    completed = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    result: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    return result


_SERVE_AND_RUN = textwrap.dedent(
    """
    async def run_once():
        from dedalus_async.testing import FakeClock, FakeDedalus
        async with FakeDedalus(clock=FakeClock()) as fake:
            async with fake.session() as session:
                await session.run("dm-1", ["echo", "hi"])
                return session._requester.telemetry is not None
    """
)


def test_nothing_of_opentelemetry_is_imported_unless_the_application_did() -> None:
    out = _run_script(
        "import asyncio, json, sys\n"
        + _SERVE_AND_RUN
        + textwrap.dedent(
            """
            on = asyncio.run(run_once())
            print(json.dumps({"on": on, "imported": sorted(
                m for m in sys.modules if m.startswith("opentelemetry"))}))
            """
        )
    )
    assert out == {"on": False, "imported": []}


def test_the_global_providers_are_used_when_the_application_set_them() -> None:
    out = _run_script(
        textwrap.dedent(
            """
        import asyncio, json
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
            InMemorySpanExporter,
        )
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        """
        )
        + _SERVE_AND_RUN
        + textwrap.dedent(
            """
            on = asyncio.run(run_once())
            print(json.dumps({"on": on, "names": sorted(
                {s.name for s in exporter.get_finished_spans() if s.name.startswith("dedalus")})}))
            """
        )
    )
    assert out == {"on": True, "names": ["dedalus.execution", "dedalus.wait"]}


async def test_aiohttp_instrumentation_replaces_our_request_spans_instead_of_doubling_them(
    fake: FakeDedalus, otel_spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    from opentelemetry.instrumentation.aiohttp_client import AioHttpClientInstrumentor

    instrumentor = AioHttpClientInstrumentor()
    instrumentor.instrument(tracer_provider=otel_spans[0])
    try:
        async with fake.session(tracer_provider=otel_spans[0]) as session:
            await session.run(MACHINE, ["echo", "hi"])
    finally:
        instrumentor.uninstrument()
    spans = _finished(otel_spans[1])
    clients = [span for span in spans if span.kind is SpanKind.CLIENT]
    scopes = {span.instrumentation_scope.name for span in clients if span.instrumentation_scope}
    assert scopes == {"opentelemetry.instrumentation.aiohttp_client"}
    [execution] = _named(spans, "dedalus.execution")
    [wait] = _named(spans, "dedalus.wait")
    # theirs sit under ours: the POST and the output under the execution, polls under the wait
    parents = {_parent_id(span) for span in clients}
    assert parents == {_span_id(execution), _span_id(wait)}


class _Forwarding:
    """A custom transport (not aiohttp's class) that happens to forward to one."""

    def __init__(self, inner: AiohttpTransport) -> None:
        self.inner = inner

    async def open(self) -> None:
        await self.inner.open()

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def send(self, request: Request, *, timeout: float | None = None) -> Response:
        return await self.inner.send(request, timeout=timeout)


async def test_a_custom_transport_is_traced_by_us_even_when_aiohttp_is_instrumented(
    fake: FakeDedalus, otel_spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    from opentelemetry.instrumentation.aiohttp_client import AioHttpClientInstrumentor

    inner = AiohttpTransport(
        fake.base_url, {"Authorization": f"Bearer {API_KEY}"}, request_timeout=30
    )
    instrumentor = AioHttpClientInstrumentor()
    instrumentor.instrument(tracer_provider=otel_spans[0])
    try:
        async with fake.session(
            transport=_Forwarding(inner), tracer_provider=otel_spans[0]
        ) as session:
            await session.run(MACHINE, ["echo", "hi"])
    finally:
        instrumentor.uninstrument()
    ours = [
        span
        for span in _finished(otel_spans[1])
        if span.kind is SpanKind.CLIENT
        and span.instrumentation_scope is not None
        and span.instrumentation_scope.name == "dedalus_async"
    ]
    assert [span.name for span in ours][:1] == ["POST /v1/machines/{machine_id}/executions"]

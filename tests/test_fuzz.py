"""Schema-driven fuzzing: schemathesis builds requests, valid and invalid, from the app's own OpenAPI
document and sends them to the real app (talking to the fake vLLM); no answer may be a 5xx, and no stream
may end in a 5xx `error` event. Bounded (a fixed number of examples an operation) and derandomized, for CI.
"""

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from conftest import LiveServer
from fake_vllm import FakeVLLM
from hypothesis import HealthCheck, settings

from agent_app import Settings, create_app

EXAMPLES_PER_OPERATION = 50


class ServiceThread(threading.Thread):
    """The app and a fake vLLM on loopback, in a thread of their own: schemathesis calls block."""

    def __init__(self, database: Path) -> None:
        super().__init__(daemon=True)
        self.database = database
        self.url = ""
        self.ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._done: asyncio.Event | None = None

    def run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop, self._done = asyncio.get_running_loop(), asyncio.Event()
        async with FakeVLLM() as fake:
            service = Settings(_env_file=None, vllm_base_url=fake.url, vllm_retry_backoff_s=0.0,
                               database_url=f"sqlite+aiosqlite:///{self.database}")
            async with LiveServer(service) as server:
                self.url = server.url
                self.ready.set()
                await self._done.wait()

    def stop(self) -> None:
        assert self._loop is not None and self._done is not None
        self._loop.call_soon_threadsafe(self._done.set)
        self.join(timeout=30)


@pytest.fixture(scope="module")
def service_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    thread = ServiceThread(tmp_path_factory.mktemp("fuzz") / "conversations.db")
    thread.start()
    if not thread.ready.wait(timeout=30):
        raise RuntimeError("the service did not start")
    yield thread.url
    thread.stop()


# The document /openapi.json serves; built without starting the app (the lazy `from_fixture` loader of
# schemathesis 4.32 does not work with pytest 9: it sets `request.node._nodeid`, which pytest 9 removed).
schema = schemathesis.openapi.from_dict(create_app(Settings(_env_file=None)).openapi())


@schema.parametrize()
@settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_no_request_gets_a_server_error(case: schemathesis.Case, service_url: str) -> None:
    response = case.call(base_url=service_url, timeout=30)
    assert response.status_code < 500, f"{case.method} {case.formatted_path}: {response.text[:300]}"
    if response.headers.get("content-type", [""])[0].startswith("text/event-stream"):
        assert [status for status in error_event_statuses(response.text) if status >= 500] == []


def error_event_statuses(body: str) -> list[int]:
    """The `status` of every `error` event in an SSE body."""
    events = [json.loads(line[6:]) for line in body.splitlines() if line.startswith("data: ")]
    return [event["status"] for event in events if event["type"] == "error"]

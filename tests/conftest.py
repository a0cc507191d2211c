"""Shared fixtures and helpers: settings without .env, the fake vLLM on loopback, the real app served by uvicorn,
Hermes tool-call text for scripted replies, and reading an SSE turn."""

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fake_vllm import FakeVLLM

from agent_app import Settings, create_app

SettingsFactory = Callable[..., Settings]


@pytest.fixture
def make_settings(tmp_path: Path) -> SettingsFactory:
    """Settings that ignore the developer's .env; a fresh SQLite file per test; fast retries."""

    def build(**overrides: Any) -> Settings:
        values: dict[str, Any] = {"vllm_base_url": "http://vllm.test", "vllm_retry_backoff_s": 0.0,
                                  "database_url": f"sqlite+aiosqlite:///{tmp_path / 'conversations.db'}"}
        return Settings(_env_file=None, **(values | overrides))

    return build


@pytest.fixture
async def fake_vllm() -> AsyncIterator[FakeVLLM]:
    async with FakeVLLM() as fake:
        yield fake


class LiveServer:
    """The real app served by uvicorn on a free loopback port, in the test's event loop."""

    def __init__(self, settings: Settings) -> None:
        self.app = create_app(settings)
        # A browser may hold a streaming connection open after its page closed: at exit, wait 5 s for it, not for ever.
        self._server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning",
                                                     timeout_graceful_shutdown=5))
        self._task: asyncio.Task[None] | None = None
        self.url = ""

    async def __aenter__(self) -> "LiveServer":
        self._task = asyncio.create_task(self._server.serve())
        for _ in range(500):
            if self._server.started:
                break
            await asyncio.sleep(0.01)
        else:
            raise RuntimeError("uvicorn did not start")
        port = self._server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._server.should_exit = True
        if self._task is not None:
            await self._task


@pytest.fixture
def live_server(make_settings: SettingsFactory) -> Callable[..., LiveServer]:
    """Build a LiveServer for given settings: `async with live_server(vllm_base_url=fake.url) as server:`."""

    def build(**overrides: Any) -> LiveServer:
        return LiveServer(make_settings(**overrides))

    return build


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30) as client:
        yield client


def tool_call_text(name: str, arguments: dict[str, Any]) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


async def read_events(response: httpx.Response) -> list[tuple[str, dict[str, Any]]]:
    """Parse an SSE body into (event name, data) pairs, checking that every data `type` equals its name."""
    events, name = [], None
    async for line in response.aiter_lines():
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            data = json.loads(line[6:])
            assert data["type"] == name
            events.append((name, data))
    return events


async def stream_chat(http: httpx.AsyncClient, url: str, body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The turn's events after the `run` event that starts every stream."""
    async with http.stream("POST", f"{url}/api/v1/chat/stream", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = await read_events(response)
    assert events[0][0] == "run" and events[0][1]["run_id"] == response.headers["x-run-id"]
    return events[1:]

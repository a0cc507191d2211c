"""Impatient clients, long turns, crowds and shutdown: disconnects, the turn deadline, the vLLM queue, SIGTERM."""

import asyncio
import contextlib
import gc
import os
import signal
import socket
import sqlite3
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import stream_chat, tool_call_text
from fake_vllm import FakeVLLM, Reply
from test_memory_e2e import chat, stored, wait_until_free

from agent_app import YOUNG_GC_THRESHOLD
from tools import ToolRegistry

PROJECT = Path(__file__).resolve().parents[1]
LONG_ANSWER = " ".join(["word"] * 200)


async def poll(condition: Callable[[], bool], what: str, tries: int = 100) -> None:
    """Wait (at most `tries` × 10 ms) until `condition()` is true."""
    for _ in range(tries):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting until {what}")


async def read_until(http: httpx.AsyncClient, url: str, body: dict[str, Any], event: str) -> None:
    """Open a turn's stream, read until the first `event`, then hang up."""
    async with http.stream("POST", f"{url}/api/v1/chat/stream", json=body) as response:
        async for line in response.aiter_lines():
            if line == f"event: {event}":
                return
    raise AssertionError(f"the stream ended without a {event} event")


async def hang_up(task: asyncio.Task[None]) -> None:
    """Cancel a client task that is reading a stream, which closes its connection."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def established_to(port: int) -> int:
    """Open IPv4 TCP connections to a local port, from /proc/net/tcp (state 01 is ESTABLISHED)."""
    rows = [line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:]]
    return sum(1 for row in rows if row[3] == "01" and int(row[2].split(":")[1], 16) == port)


async def test_a_client_that_disconnects_mid_stream_closes_the_upstream_request_within_a_second(
    fake_vllm: FakeVLLM, live_server: Any, http: httpx.AsyncClient
) -> None:
    async with live_server(vllm_base_url=fake_vllm.url) as server:
        conversation_id = (await chat(http, server.url, "first")).json()["conversation_id"]
        before = await stored(http, server.url, conversation_id)
        fake_vllm.script(Reply(text=LONG_ANSWER, token_delay_s=0.01))
        await read_until(http, server.url, {"content": "long one", "conversation_id": conversation_id}, "token")
        await poll(lambda: (fake_vllm.disconnects, fake_vllm.open_streams) == (1, 0), "vLLM saw the hang-up")
        assert await stored(http, server.url, conversation_id) == before
        after = await wait_until_free(http, server.url, conversation_id)
    assert after.json()["content"] == "You said: after"


async def test_a_hundred_disconnects_leak_no_tasks_and_no_upstream_connections(
    fake_vllm: FakeVLLM, live_server: Any, http: httpx.AsyncClient
) -> None:
    port = int(fake_vllm.url.rsplit(":", 1)[1])
    async with live_server(vllm_base_url=fake_vllm.url) as server:
        kept = (await chat(http, server.url, "warm up")).json()["conversation_id"]
        tasks, connections = len(asyncio.all_tasks()), established_to(port)
        for n in range(100):
            fake_vllm.script(Reply(text=LONG_ANSWER, token_delay_s=0.01))  # 2 s: the hang-up must end it
            await read_until(http, server.url, {"content": f"hang up {n}"}, "token")
        await poll(lambda: (fake_vllm.disconnects, fake_vllm.open_streams) == (100, 0), "vLLM saw 100 hang-ups",
                   tries=300)
        await poll(lambda: len(asyncio.all_tasks()) <= tasks, "the tasks were back to the warm-up count", tries=300)
        assert established_to(port) <= connections
        listing = (await http.get(f"{server.url}/api/v1/conversations")).json()
    assert [c["id"] for c in listing["conversations"]] == [kept]


async def test_a_disconnect_cancels_the_running_tool(fake_vllm: FakeVLLM, live_server: Any,
                                                     http: httpx.AsyncClient) -> None:
    cancelled = asyncio.Event()

    async def slow() -> str:
        """Sleep for an hour, unless cancelled."""
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "slept an hour"

    registry = ToolRegistry()
    registry.register(slow)
    fake_vllm.script(tool_call_text("slow", {}))
    async with live_server(vllm_base_url=fake_vllm.url) as server:
        server.app.state.agent.registry = registry
        await read_until(http, server.url, {"content": "go"}, "tool_call")
        await asyncio.wait_for(cancelled.wait(), timeout=5)
        listing = (await http.get(f"{server.url}/api/v1/conversations")).json()
    assert listing == {"conversations": [], "next_cursor": None}


async def test_the_running_service_keeps_its_startup_heap_out_of_the_collector_and_restores_it_after(
    fake_vllm: FakeVLLM, live_server: Any, http: httpx.AsyncClient
) -> None:
    thresholds = gc.get_threshold()
    async with live_server(vllm_base_url=fake_vllm.url) as server:
        assert gc.get_freeze_count() > 10_000  # this process's modules, the app and Gradio's page
        assert gc.get_threshold() == (YOUNG_GC_THRESHOLD, *thresholds[1:])
        assert (await chat(http, server.url, "hello")).status_code == 200
    assert (gc.get_freeze_count(), gc.get_threshold()) == (0, thresholds)


@pytest.mark.parametrize("stream", [False, True], ids=["rest", "stream"])
async def test_the_whole_turn_deadline_bounds_a_turn_of_steps_that_are_each_in_time(
    stream: bool, fake_vllm: FakeVLLM, live_server: Any, http: httpx.AsyncClient
) -> None:
    """Three vLLM calls of 0.2, 0.2 and 0.9 s: each within VLLM_TIMEOUT_S and TURN_TIMEOUT_S, together over it."""
    async with live_server(vllm_base_url=fake_vllm.url, turn_timeout_s=1.0) as server:
        conversation_id = (await chat(http, server.url, "first")).json()["conversation_id"]
        before = await stored(http, server.url, conversation_id)
        fake_vllm.script(Reply(text=tool_call_text("calculator", {"expression": "1+1"}), delay_s=0.2),
                         Reply(text=tool_call_text("calculator", {"expression": "2+2"}), delay_s=0.2),
                         Reply(text="too late", delay_s=0.9))
        body = {"content": "second", "conversation_id": conversation_id}
        detail = "the turn did not finish within 1 s (TURN_TIMEOUT_S)"
        if stream:
            events = await stream_chat(http, server.url, body)
            assert events[-1] == ("error", {"type": "error", "status": 504, "detail": detail})
        else:
            response = await http.post(f"{server.url}/api/v1/chat", json=body)
            assert (response.status_code, response.json()) == (504, {"detail": detail})
        assert fake_vllm.remaining == 0
        assert await stored(http, server.url, conversation_id) == before
        assert (await chat(http, server.url, "third", conversation_id)).status_code == 200


async def test_beyond_the_vllm_concurrency_limit_a_request_gets_503_with_retry_after(
    fake_vllm: FakeVLLM, live_server: Any, http: httpx.AsyncClient
) -> None:
    fake_vllm.script(Reply(text=LONG_ANSWER, fault="stall"))
    async with live_server(vllm_base_url=fake_vllm.url, vllm_max_concurrency=1, vllm_queue_timeout_s=0.2) as server:
        holder = asyncio.create_task(read_until(http, server.url, {"content": "hold the slot"}, "done"))
        await poll(lambda: fake_vllm.open_streams == 1, "the first turn holds the only slot")
        busy = await http.post(f"{server.url}/api/v1/chat", json={"content": "no room"})
        busy_stream = await stream_chat(http, server.url, {"content": "no room either"})
        await hang_up(holder)
        await poll(lambda: fake_vllm.open_streams == 0, "the first turn let go of vLLM")
        after = await http.post(f"{server.url}/api/v1/chat", json={"content": "room again"})
    detail = "the service is at its limit of concurrent vLLM requests; retry shortly"
    assert (busy.status_code, busy.headers["retry-after"], busy.json()) == (503, "1", {"detail": detail})
    assert busy_stream == [("error", {"type": "error", "status": 503, "detail": detail})]
    assert after.json()["content"] == "You said: room again"
    assert len(fake_vllm.requests) == 2


async def test_a_request_beyond_the_limit_waits_in_the_queue_for_a_free_slot(
    fake_vllm: FakeVLLM, live_server: Any, http: httpx.AsyncClient
) -> None:
    """Only the semaphore knows that a turn waits: asyncio.Semaphore keeps its waiters in `_waiters`."""
    fake_vllm.script(Reply(text=LONG_ANSWER, fault="stall"))
    async with live_server(vllm_base_url=fake_vllm.url, vllm_max_concurrency=1, vllm_queue_timeout_s=30) as server:
        slots = server.app.state.agent.llm._slots
        holder = asyncio.create_task(read_until(http, server.url, {"content": "hold the slot"}, "done"))
        await poll(lambda: fake_vllm.open_streams == 1, "the first turn holds the only slot")
        queued = asyncio.create_task(http.post(f"{server.url}/api/v1/chat", json={"content": "queued"}))
        await poll(lambda: len(slots._waiters or ()) == 1, "the second turn waits for the slot")
        assert len(fake_vllm.requests) == 1
        await hang_up(holder)
        response = await queued
    assert (response.status_code, response.json()["content"]) == (200, "You said: queued")


class ServiceProcess:
    """`python -m uvicorn agent_app:app` as a real child process, configured by environment variables."""

    def __init__(self, tmp_path: Path, env: dict[str, str]) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        self.database = tmp_path / "service.db"
        self.log = tmp_path / "service.log"
        self.env = {**os.environ, "DATABASE_URL": f"sqlite+aiosqlite:///{self.database}", **env}
        self.process: asyncio.subprocess.Process | None = None

    async def start(self, http: httpx.AsyncClient) -> None:
        """Start it and wait (bounded) until /health answers."""
        with self.log.open("wb") as log:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "uvicorn", "agent_app:app", "--host", "127.0.0.1",
                "--port", self.url.rsplit(":", 1)[1], cwd=PROJECT, env=self.env, stdout=log, stderr=log)
        for _ in range(300):
            try:
                if (await http.get(f"{self.url}/api/v1/health")).status_code == 200:
                    return
            except httpx.TransportError:
                await asyncio.sleep(0.05)
        raise AssertionError(f"the service did not start: {self.log.read_text()}")

    async def terminate_while_streaming(self, fake: FakeVLLM) -> None:
        """Send SIGTERM once vLLM is streaming a turn to the service."""
        await poll(lambda: fake.open_streams == 1, "vLLM streams the turn", tries=500)
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)

    async def exited_gracefully(self) -> bool:
        """True when the process ended by itself (within 20 s) after uvicorn's orderly shutdown.

        uvicorn re-raises the SIGTERM it handled once it is done, so the status is -SIGTERM.
        """
        assert self.process is not None
        status = await asyncio.wait_for(self.process.wait(), timeout=20)
        return status == -signal.SIGTERM and "Application shutdown complete." in self.log.read_text()

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()

    def rows(self, query: str) -> list[tuple[Any, ...]]:
        with sqlite3.connect(self.database) as db:
            return db.execute(query).fetchall()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
async def service_process(tmp_path: Path, fake_vllm: FakeVLLM,
                          http: httpx.AsyncClient) -> AsyncIterator[Callable[..., Awaitable[ServiceProcess]]]:
    """Start the service as a child process talking to `fake_vllm`; `await service_process(TURN_TIMEOUT_S="1")`."""
    started: list[ServiceProcess] = []

    async def start(**env: str) -> ServiceProcess:
        service = ServiceProcess(tmp_path, {"VLLM_BASE_URL": fake_vllm.url, **env})
        started.append(service)
        await service.start(http)
        return service

    yield start
    for service in started:
        await service.stop()


async def test_sigterm_lets_the_in_flight_turn_finish_and_be_stored_then_the_process_exits(
    service_process: Any, fake_vllm: FakeVLLM, http: httpx.AsyncClient
) -> None:
    service = await service_process()
    answer = " ".join(["word"] * 40)
    fake_vllm.script(Reply(text=answer, token_delay_s=0.03))
    sigterm = asyncio.create_task(service.terminate_while_streaming(fake_vllm))
    events = await stream_chat(http, service.url, {"content": "slow"})
    await sigterm
    assert await service.exited_gracefully()
    done = events[-1][1]
    assert (events[-1][0], done["content"]) == ("done", answer)
    assert service.rows("SELECT id, message_count FROM conversations") == [(done["conversation_id"], 2)]
    assert service.rows("SELECT role, content FROM messages ORDER BY position") == [
        ("user", "slow"), ("assistant", answer)]


async def test_sigterm_during_a_turn_that_cannot_finish_ends_it_at_the_turn_deadline_with_nothing_stored(
    service_process: Any, fake_vllm: FakeVLLM, http: httpx.AsyncClient
) -> None:
    """In-flight turns get a bounded time after SIGTERM: TURN_TIMEOUT_S, after which nothing of them is written."""
    service = await service_process(TURN_TIMEOUT_S="1")
    fake_vllm.script(Reply(text=LONG_ANSWER, fault="stall"))
    sigterm = asyncio.create_task(service.terminate_while_streaming(fake_vllm))
    events = await stream_chat(http, service.url, {"content": "never ends"})
    await sigterm
    assert await service.exited_gracefully()
    detail = "the turn did not finish within 1 s (TURN_TIMEOUT_S)"
    assert events[-1] == ("error", {"type": "error", "status": 504, "detail": detail})
    assert service.rows("SELECT count(*) FROM conversations") == [(0,)]
    assert service.rows("SELECT count(*) FROM messages") == [(0,)]

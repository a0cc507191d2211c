"""Runs: a streamed turn outlives its connection; it is resumed by event id and cancelled from anywhere, on any
worker, and a run whose process died ends as interrupted."""

import asyncio
import inspect
import json
import os
import random
import re
import signal
import socket
import sqlite3
import sys
import time
from asyncio.subprocess import Process
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, closing
from pathlib import Path
from typing import Any

import httpx
import pytest
from fake_vllm import FakeVLLM, Reply
from sqlalchemy import create_engine
from test_store import postgres_url

from agent_app import sweep_runs

ROOT = Path(__file__).resolve().parent.parent
Frame = tuple[int, str, str]  # the event's id, its name, and the frame's text as sent
RUN_ID = re.compile(r"^[0-9a-f]{32}$")


async def read_frames(lines: AsyncIterator[str], stop_after: int | None = None) -> list[Frame]:
    """SSE frames (keep-alive comments left out) until the stream ends, or `stop_after` frames."""
    frames: list[Frame] = []
    block: list[str] = []
    async for line in lines:
        if line:
            block.append(line)
            continue
        if block and not block[0].startswith(":"):
            fields = dict(entry.split(": ", 1) for entry in block)
            frames.append((int(fields["id"]), fields["event"], "\n".join(block)))
            if len(frames) == stop_after:
                break
        block = []
    return frames


def data(frame: Frame) -> dict[str, Any]:
    return json.loads(frame[2].split("\ndata: ", 1)[1].split("\n", 1)[0])


async def follow(http: httpx.AsyncClient, url: str, run_id: str, after: int | None = None,
                 stop_after: int | None = None) -> list[Frame]:
    headers = {} if after is None else {"Last-Event-ID": str(after)}
    async with http.stream("GET", f"{url}/api/v1/runs/{run_id}/events", headers=headers) as response:
        assert response.status_code == 200
        assert response.headers["x-run-id"] == run_id
        return await read_frames(response.aiter_lines(), stop_after)


async def eventually(check: Callable[[], bool | Awaitable[bool]], tries: int = 300, pause_s: float = 0.1) -> None:
    """Wait, boundedly, for something that another task or process does."""
    for _ in range(tries):
        result = check()
        if await result if inspect.isawaitable(result) else result:
            return
        await asyncio.sleep(pause_s)
    raise AssertionError("the condition did not come true")


async def logged(http: httpx.AsyncClient, url: str, run_id: str) -> bool:
    """Whether the run is in the database, as a service that does not run it sees it."""
    return (await http.get(f"{url}/api/v1/runs/{run_id}")).status_code == 200


async def ended_there(http: httpx.AsyncClient, conversation_url: str) -> bool:
    return (await http.get(conversation_url)).json()["run_id"] is None


@pytest.fixture(params=["sqlite", "postgresql"])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'runs.db'}"
    return await postgres_url()


async def test_a_client_that_drops_and_resumes_gets_every_event_once(
        database_url: str, fake_vllm: FakeVLLM, live_server: Any, http: httpx.AsyncClient) -> None:
    rng = random.Random(16)
    fake_vllm.token_delay_s = 0.001
    async with live_server(vllm_base_url=fake_vllm.url, database_url=database_url) as server:
        conversation_id = None
        for cycle in range(100):
            answer = f"Answer {cycle}: " + "word " * rng.randint(3, 30)
            fake_vllm.script(answer)
            body = {"content": f"Question {cycle}", "conversation_id": conversation_id, "on_disconnect": "continue"}
            async with http.stream("POST", f"{server.url}/api/v1/chat/stream", json=body) as response:
                run_id = response.headers["x-run-id"]
                live = asyncio.create_task(follow(http, server.url, run_id))  # a client that never drops
                got = await read_frames(response.aiter_lines(), stop_after=rng.randint(1, 8))
            while got[-1][1] not in ("done", "error"):
                got += await follow(http, server.url, run_id, after=got[-1][0], stop_after=rng.randint(1, 10))
            assert got == await live == await follow(http, server.url, run_id, after=0)
            assert [frame[0] for frame in got] == list(range(1, len(got) + 1))
            assert data(got[-1])["content"] == "".join(data(frame)["content"] for frame in got if frame[1] == "token")
            assert data(got[-1])["content"] == answer
            conversation_id = data(got[0])["conversation_id"]
        conversation = f"{server.url}/api/v1/conversations/{conversation_id}"
        await eventually(lambda: ended_there(http, conversation))
        stored = (await http.get(conversation)).json()
    assert stored["message_count"] == 200


async def test_cancel_closes_upstream_stores_nothing_and_ends_with_one_error(
        fake_vllm: FakeVLLM, live_server: Any, http: httpx.AsyncClient) -> None:
    fake_vllm.script("First.", Reply(text="slow " * 200, token_delay_s=0.05), "Third.")
    async with live_server(vllm_base_url=fake_vllm.url) as server:
        conversation_id = (await http.post(f"{server.url}/api/v1/chat", json={"content": "One"})).json()[
            "conversation_id"]
        before = (await http.get(f"{server.url}/api/v1/conversations/{conversation_id}")).json()
        body = {"content": "Two", "conversation_id": conversation_id, "on_disconnect": "continue"}
        async with http.stream("POST", f"{server.url}/api/v1/chat/stream", json=body) as response:
            run_id = response.headers["x-run-id"]
            lines = response.aiter_lines()
            frames = await read_frames(lines, stop_after=2)
            running = (await http.get(f"{server.url}/api/v1/conversations/{conversation_id}")).json()
            cancel = await http.post(f"{server.url}/api/v1/runs/{run_id}/cancel")
            frames += await read_frames(lines)
        await eventually(lambda: fake_vllm.disconnects == 1, tries=100, pause_s=0.01)  # in 1 s
        again = await http.post(f"{server.url}/api/v1/runs/{run_id}/cancel")
        info = (await http.get(f"{server.url}/api/v1/runs/{run_id}")).json()
        conversation = f"{server.url}/api/v1/conversations/{conversation_id}"
        await eventually(lambda: ended_there(http, conversation))  # the run's end reaches the database
        after = (await http.get(conversation)).json()
        next_turn = await http.post(f"{server.url}/api/v1/chat",
                                    json={"content": "3", "conversation_id": conversation_id})
    names = [name for _, name, _ in frames]
    assert names[0] == "run" and set(names[1:-1]) == {"token"} and names[-1] == "error"
    cancelled = {"type": "error", "status": 499, "detail": f"run {run_id} was cancelled; the turn was not stored"}
    assert data(frames[-1]) == cancelled
    assert running["run_id"] == run_id and cancel.status_code == 202 and cancel.json()["id"] == run_id
    assert (again.status_code, again.json()) == (409, {
        "detail": f"run '{run_id}' has already ended (cancelled); there is nothing to cancel"})
    assert (info["status"], info["error"], info["done"]) == ("cancelled", cancelled, None)
    assert after["messages"] == before["messages"]
    assert next_turn.status_code == 200 and next_turn.json()["content"] == "Third."


async def test_a_dropped_connection_cancels_the_run_by_default(
        fake_vllm: FakeVLLM, live_server: Any, http: httpx.AsyncClient) -> None:
    fake_vllm.script(Reply(text="slow " * 200, token_delay_s=0.05))
    async with live_server(vllm_base_url=fake_vllm.url) as server:
        async with http.stream("POST", f"{server.url}/api/v1/chat/stream", json={"content": "Hi"}) as response:
            run_id = response.headers["x-run-id"]
            await read_frames(response.aiter_lines(), stop_after=2)
        await eventually(lambda: fake_vllm.disconnects == 1, tries=100, pause_s=0.01)
        frames = await follow(http, server.url, run_id, after=0)
        conversations = (await http.get(f"{server.url}/api/v1/conversations")).json()["conversations"]
    assert data(frames[-1])["status"] == 499 and conversations == []


async def test_a_hundred_cancels_leak_no_tasks_or_sockets(
        fake_vllm: FakeVLLM, live_server: Any, http: httpx.AsyncClient) -> None:
    async with live_server(vllm_base_url=fake_vllm.url) as server:
        runs = server.app.state.runs

        async def cancel_one(index: int) -> None:
            fake_vllm.script(Reply(fault="stall"))
            policy = "continue" if index % 2 else "cancel"
            body = {"content": f"q{index}", "on_disconnect": policy}
            async with http.stream("POST", f"{server.url}/api/v1/chat/stream", json=body) as response:
                lines = response.aiter_lines()
                await read_frames(lines, stop_after=1)
                if policy == "continue":  # else: the connection drops
                    assert (await http.post(f"{server.url}/api/v1/runs/{response.headers['x-run-id']}/cancel")
                            ).status_code == 202
                    assert data((await read_frames(lines))[-1])["status"] == 499

        async def settled() -> bool:
            return not runs.runs and fake_vllm.open_streams == 0

        def counts() -> tuple[int, int]:
            return len(asyncio.all_tasks()), len(os.listdir("/proc/self/fd"))

        for index in range(10):  # connection pools filled
            await cancel_one(index)
        await eventually(settled)
        tasks, sockets = counts()
        for index in range(100):
            await cancel_one(index)
        await eventually(settled)
        await eventually(lambda: counts()[0] <= tasks and counts()[1] <= sockets)


async def test_bad_run_ids_and_event_ids(fake_vllm: FakeVLLM, live_server: Any, http: httpx.AsyncClient) -> None:
    unknown = "0" * 32
    async with live_server(vllm_base_url=fake_vllm.url) as server:
        api = f"{server.url}/api/v1"
        answers = [await http.get(f"{api}/runs/{unknown}"), await http.get(f"{api}/runs/{unknown}/events"),
                   await http.post(f"{api}/runs/{unknown}/cancel")]
        malformed = [await http.get(f"{api}/runs/{unknown}/events", headers={"Last-Event-ID": value})
                     for value in ("abc", "-1", "1.5", "9" * 10)]
        bad_after = await http.get(f"{api}/runs/{unknown}/events", params={"after": "x"})
        bad_path = await http.get(f"{api}/runs/not%20an%20id")
        ids = [(await http.post(f"{api}/chat/stream", json={"content": "Hi"})).headers["x-run-id"] for _ in range(2)]
        finished = await follow(http, server.url, ids[0], after=10_000)  # most likely from the worker's memory
        await asyncio.sleep(1)  # the run's log is written and it has left its worker's memory
        finished += await follow(http, server.url, ids[0], after=10_000)
    assert [(response.status_code, response.json()) for response in answers] == [
        (404, {"detail": f"run '{unknown}' not found"})] * 3
    assert [response.status_code for response in malformed] == [422] * 4
    assert malformed[0].json()["detail"].startswith("header.last-event-id: String should match pattern")
    assert (bad_after.status_code, bad_path.status_code) == (422, 422)
    assert all(RUN_ID.match(run_id) for run_id in ids) and ids[0] != ids[1]  # 128 random bits each
    assert [(seq, name) for seq, name, _ in finished] == [(10_001, "done")] * 2  # an id past the end: how it ended


async def test_an_id_from_the_future_gives_the_live_tail(
        fake_vllm: FakeVLLM, live_server: Any, http: httpx.AsyncClient) -> None:
    fake_vllm.script(Reply(text="slow " * 40, token_delay_s=0.02))
    async with live_server(vllm_base_url=fake_vllm.url) as server:
        body = {"content": "Hi", "on_disconnect": "continue"}
        async with http.stream("POST", f"{server.url}/api/v1/chat/stream", json=body) as response:
            run_id = response.headers["x-run-id"]
            await read_frames(response.aiter_lines(), stop_after=3)
        tail = await follow(http, server.url, run_id, after=1_000)
        whole = await follow(http, server.url, run_id, after=0)
    assert tail[0][0] > 3 and tail == whole[len(whole) - len(tail):] and tail[-1][1] == "done"


@asynccontextmanager
async def service(tmp_path: Path, database_url: str, vllm_url: str) -> AsyncIterator[tuple[str, Process]]:
    """The service in a uvicorn process of its own, on a free port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DATABASE_URL": database_url, "VLLM_BASE_URL": vllm_url,
           "VLLM_MODEL": "Qwen/Qwen2.5-7B-Instruct", "LOG_LEVEL": "WARNING"}
    process = await asyncio.create_subprocess_exec(sys.executable, "-m", "uvicorn", "agent_app:app", "--port",
                                                   str(port), "--log-level", "warning", cwd=tmp_path, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient() as probe_client:
            async def up() -> bool:
                try:
                    return (await probe_client.get(f"{url}/api/v1/health")).status_code == 200
                except httpx.TransportError:
                    return process.returncode is not None
            await eventually(up)
        assert process.returncode is None, "the service did not start"
        yield url, process
    finally:
        if process.returncode is None:
            process.terminate()
            await process.wait()


async def test_two_workers_on_one_postgresql_resume_and_cancel_each_others_runs(
        fake_vllm: FakeVLLM, tmp_path: Path, http: httpx.AsyncClient) -> None:
    database_url = await postgres_url()
    answer = "A steady answer " * 30
    fake_vllm.script(Reply(text=answer, token_delay_s=0.01), Reply(text="slow " * 400, token_delay_s=0.05))
    async with (service(tmp_path, database_url, fake_vllm.url) as (one, _),
                service(tmp_path, database_url, fake_vllm.url) as (other, _)):
        body = {"content": "Hi", "on_disconnect": "continue"}
        async with http.stream("POST", f"{one}/api/v1/chat/stream", json=body) as response:
            run_id = response.headers["x-run-id"]
            got = await read_frames(response.aiter_lines(), stop_after=3)
        await eventually(lambda: logged(http, other, run_id))
        while got[-1][1] != "done":
            got += await follow(http, other, run_id, after=got[-1][0])
        assert got == await follow(http, one, run_id, after=0)
        assert data(got[-1])["content"] == answer

        async with http.stream("POST", f"{one}/api/v1/chat/stream", json=body) as response:
            run_id = response.headers["x-run-id"]
            lines = response.aiter_lines()
            frames = await read_frames(lines, stop_after=2)
            await eventually(lambda: logged(http, other, run_id))
            cancel = await http.post(f"{other}/api/v1/runs/{run_id}/cancel")
            frames += await read_frames(lines)
        await eventually(lambda: fake_vllm.disconnects == 1, tries=100, pause_s=0.02)

        async def cancelled() -> bool:
            return (await http.get(f"{other}/api/v1/runs/{run_id}")).json()["status"] == "cancelled"
        await eventually(cancelled)
    assert cancel.status_code == 202 and data(frames[-1])["status"] == 499
    assert [name for _, name, _ in frames].count("error") == 1


async def test_a_killed_server_leaves_its_run_interrupted_and_the_conversation_usable(
        fake_vllm: FakeVLLM, tmp_path: Path, http: httpx.AsyncClient) -> None:
    database = tmp_path / "conversations.db"
    database_url = f"sqlite+aiosqlite:///{database}"
    fake_vllm.script("First.", Reply(text="slow " * 400, token_delay_s=0.05), "Third.")
    async with service(tmp_path, database_url, fake_vllm.url) as (url, process):
        conversation_id = (await http.post(f"{url}/api/v1/chat", json={"content": "One"})).json()["conversation_id"]
        before = (await http.get(f"{url}/api/v1/conversations/{conversation_id}")).json()["messages"]
        body = {"content": "Two", "conversation_id": conversation_id, "on_disconnect": "continue"}
        async with http.stream("POST", f"{url}/api/v1/chat/stream", json=body) as response:
            run_id = response.headers["x-run-id"]
            got = await read_frames(response.aiter_lines(), stop_after=3)

            def logged_there() -> bool:
                with closing(sqlite3.connect(database)) as conn:
                    return conn.execute("SELECT 1 FROM runs WHERE id = ?", (run_id,)).fetchone() is not None
            await eventually(logged_there)
            process.send_signal(signal.SIGKILL)
            await process.wait()
    async with service(tmp_path, database_url, fake_vllm.url) as (url, _):
        async def interrupted() -> bool:
            return (await http.get(f"{url}/api/v1/runs/{run_id}")).json()["status"] == "interrupted"
        await eventually(interrupted, tries=400)
        rest = await follow(http, url, run_id, after=got[-1][0])
        after = (await http.get(f"{url}/api/v1/conversations/{conversation_id}")).json()
        next_turn = await http.post(f"{url}/api/v1/chat", json={"content": "3", "conversation_id": conversation_id})
    assert rest[-1][1] == "error" and data(rest[-1])["status"] == 503
    assert data(rest[-1])["detail"].startswith(f"run {run_id} was interrupted")
    ids = [frame[0] for frame in [*got, *rest]]
    assert ids == sorted(set(ids))  # no id twice, even where the dead process's log lost a tail
    assert after["messages"] == before and after["run_id"] is None
    assert next_turn.status_code == 200 and next_turn.json()["content"] == "Third."


async def test_a_run_swept_as_stalled_by_another_worker_ends_there_and_leaves_its_own_worker(
        fake_vllm: FakeVLLM, live_server: Any, http: httpx.AsyncClient, tmp_path: Path) -> None:
    """A worker that stalls past RUN_STALE_S is taken for dead: another worker's sweep ends its run as interrupted
    and frees the conversation. When the stalled worker wakes, its run still ends, logs nothing more and leaves
    it: every worker then answers with the database's account of the run."""
    database = tmp_path / "runs.db"
    fake_vllm.script("First.", Reply(text="slow " * 60, token_delay_s=0.02), "Third.")
    async with live_server(vllm_base_url=fake_vllm.url, database_url=f"sqlite+aiosqlite:///{database}") as server:
        conversation_id = (await http.post(f"{server.url}/api/v1/chat", json={"content": "One"})).json()[
            "conversation_id"]
        before = (await http.get(f"{server.url}/api/v1/conversations/{conversation_id}")).json()["messages"]
        body = {"content": "Two", "conversation_id": conversation_id, "on_disconnect": "continue"}
        async with http.stream("POST", f"{server.url}/api/v1/chat/stream", json=body) as response:
            run_id = response.headers["x-run-id"]
            lines = response.aiter_lines()
            seen = await read_frames(lines, stop_after=3)

            def logged_there() -> bool:
                with closing(sqlite3.connect(database)) as conn:
                    return conn.execute("SELECT 1 FROM runs WHERE id = ?", (run_id,)).fetchone() is not None
            await eventually(logged_there)
            engine = create_engine(f"sqlite:///{database}")
            with engine.begin() as conn:  # another worker's sweep, with this worker's heartbeat taken as stale
                sweep_runs(conn, stale_before=time.time() + 60, expired_before=0.0, now=time.time())
            engine.dispose()
            seen += await read_frames(lines)  # the stalled worker's own account, to the end

        async def interrupted() -> bool:
            return (await http.get(f"{server.url}/api/v1/runs/{run_id}")).json()["status"] == "interrupted"
        await eventually(interrupted, tries=100)
        logged_events = await follow(http, server.url, run_id, after=0)
        after = (await http.get(f"{server.url}/api/v1/conversations/{conversation_id}")).json()
        next_turn = await http.post(f"{server.url}/api/v1/chat",
                                    json={"content": "3", "conversation_id": conversation_id})
    assert seen[-1][1] == "error" and data(seen[-1])["status"] == 409  # its lease was taken: nothing stored
    assert logged_events[-1][1] == "error" and data(logged_events[-1])["status"] == 503
    assert [frame[0] for frame in logged_events] == list(range(1, len(logged_events) + 1))
    assert after["messages"] == before and after["run_id"] is None
    assert next_turn.status_code == 200 and next_turn.json()["content"] == "Third."

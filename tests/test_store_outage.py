"""The database goes away under a running service and comes back: 503s meanwhile, then normal turns.

The test runs a PostgreSQL cluster of its own (initdb on a free loopback port), so stopping it touches no
other test. It needs PostgreSQL's server binaries, which `.ci/run` installs.
"""

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

import httpx
import pytest
from fake_vllm import FakeVLLM

UNAVAILABLE = "the conversation store (PostgreSQL) is unavailable; retry shortly"


class Cluster:
    """A throwaway PostgreSQL cluster; run as the `postgres` user when the tests run as root."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self.dir = Path(tempfile.mkdtemp(prefix="agent-outage-", dir="/tmp"))
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.user = "postgres" if os.getuid() == 0 else os.environ.get("USER", "postgres")
        self.url = f"postgresql+asyncpg://{self.user}:secret-pw@127.0.0.1:{self.port}/postgres"
        if os.getuid() == 0:
            shutil.chown(self.dir, "postgres")
        self.run("initdb", "-D", str(self.dir / "data"), "-U", self.user, "--auth=trust", "-E", "UTF8")

    def run(self, tool: str, *args: str) -> None:
        command = [str(self.bin_dir / tool), *args]
        if os.getuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=60)

    def start(self) -> None:
        self.run("pg_ctl", "-D", str(self.dir / "data"), "-l", str(self.dir / "log"), "-w", "-o",
                 f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.dir} -c fsync=off", "start")

    def stop(self) -> None:
        self.run("pg_ctl", "-D", str(self.dir / "data"), "-m", "fast", "-w", "stop")


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL's server binaries are missing: .ci/run installs them")
        pytest.skip("no PostgreSQL server binaries (bash .ci/run installs them)")
    cluster = Cluster(Path(found[-1]).parent)
    cluster.start()
    yield cluster
    with suppress(subprocess.CalledProcessError):  # already stopped
        cluster.stop()
    shutil.rmtree(cluster.dir, ignore_errors=True)


async def chat(http: httpx.AsyncClient, url: str, content: str, conversation_id: str | None) -> httpx.Response:
    return await http.post(f"{url}/api/v1/chat", json={"content": content, "conversation_id": conversation_id})


async def test_a_stopped_database_gives_503s_and_degraded_health_then_the_service_recovers(
    cluster: Cluster, fake_vllm: FakeVLLM, live_server: Any, http: httpx.AsyncClient
) -> None:
    async with live_server(vllm_base_url=fake_vllm.url, database_url=cluster.url) as server:
        first = await chat(http, server.url, "Before", None)
        conversation_id = first.json()["conversation_id"]
        cluster.stop()
        refused = [await chat(http, server.url, "During", conversation_id), await chat(http, server.url, "New", None),
                   await http.get(f"{server.url}/api/v1/conversations/{conversation_id}")]
        async with http.stream("POST", f"{server.url}/api/v1/chat/stream", json={"content": "Streamed"}) as stream:
            streamed = [line async for line in stream.aiter_lines() if line.startswith("data: ")]
        down = (await http.get(f"{server.url}/api/v1/health")).json()
        cluster.start()
        after = None
        for _ in range(50):  # the pool replaces its broken connections on use: a 503 or two, then answers
            after = await chat(http, server.url, "After", conversation_id)
            if after.status_code != 503:
                break
        up = (await http.get(f"{server.url}/api/v1/health")).json()
        stored = (await http.get(f"{server.url}/api/v1/conversations/{conversation_id}")).json()
    assert first.status_code == 200
    for response in refused:
        assert (response.status_code, response.headers["retry-after"]) == (503, "5")
        assert response.json() == {"detail": UNAVAILABLE}
        assert "secret-pw" not in response.text and str(cluster.port) not in response.text
    assert streamed[-1] == f'data: {{"type":"error","status":503,"detail":"{UNAVAILABLE}"}}'
    assert (down["status"], down["database"]) == ("degraded", {"kind": "PostgreSQL", "reachable": False})
    assert after is not None and after.status_code == 200
    assert (up["status"], up["database"]) == ("ok", {"kind": "PostgreSQL", "reachable": True})
    assert [message["content"] for message in stored["messages"] if message["role"] == "user"] == ["Before", "After"]

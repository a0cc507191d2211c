"""Tests for the MCP part of tools.py: the config file, names, schemas and results, and McpServers running
tests/mcp_test_server.py over stdio (as a subprocess) and over Streamable HTTP (on loopback)."""

import asyncio
import dataclasses
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from conftest import tool_call_text
from fake_vllm import FakeVLLM
from mcp import types as mcp_types
from mcp.client.stdio import get_default_environment

from tools import (
    McpConfigError,
    McpServers,
    McpServerStatus,
    ToolDefinitionError,
    ToolRegistry,
    calculator,
    mcp_content_text,
    mcp_result_text,
    mcp_tool_name,
    mcp_tool_parameters,
)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SERVER_SCRIPT = PROJECT_ROOT / "tests" / "mcp_test_server.py"
SECRETS = {"API_KEY": "service-key", "VLLM_API_KEY": "vllm-key", "DATABASE_URL": "postgresql+asyncpg://u:pw@db/x"}
SEARCH_DESCRIPTION = "Search the records. " + "Very detailed guidance. " * 200


def stdio_entry(**fields: Any) -> dict[str, Any]:
    """A config entry that runs the test server as a subprocess."""
    return {"command": sys.executable, "args": [str(SERVER_SCRIPT)], **fields}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class HttpTestServer:
    """The test server over Streamable HTTP on a loopback port, as its own process."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}/mcp"
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        """Start it and poll (bounded) until the port accepts connections."""
        self.process = await asyncio.create_subprocess_exec(sys.executable, str(SERVER_SCRIPT), "--port",
                                                            str(self.port))
        for _ in range(300):
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            await writer.wait_closed()
            return
        raise RuntimeError("the HTTP test server did not start")

    async def stop(self) -> None:
        """Kill it and reap it."""
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()


@pytest.fixture
async def http_server() -> AsyncIterator[HttpTestServer]:
    server = HttpTestServer(free_port())
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
def registry() -> ToolRegistry:
    """A registry holding one built-in, as the service's holds its own."""
    registry = ToolRegistry()
    registry.register(calculator)
    return registry


ConfigWriter = Callable[[dict[str, Any]], Path]


@pytest.fixture
def write_config(tmp_path: Path) -> ConfigWriter:
    """Write `{"mcpServers": servers}` to a file and return its path."""

    def write(servers: dict[str, Any]) -> Path:
        path = tmp_path / "mcp_servers.json"
        path.write_text(json.dumps({"mcpServers": servers}))
        return path

    return write


@asynccontextmanager
async def started(config: Path, registry: ToolRegistry, **options: Any) -> AsyncIterator[McpServers]:
    async with McpServers.start(config, registry, connect_timeout_s=20, **options) as servers:
        yield servers


async def run(registry: ToolRegistry, name: str, arguments: Any, timeout_s: float = 20,
              max_result_chars: int = 16_000) -> tuple[str | None, str | None]:
    result = await registry.run(name, arguments, timeout_s=timeout_s, max_result_chars=max_result_chars)
    return result.result, result.error


async def wait_for_file(path: Path) -> None:
    """Poll (bounded) until a tool call has created the file: the call has reached the server."""
    for _ in range(1000):
        if await anyio.Path(path).exists():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{path} was never created")


def child_pids() -> set[int]:
    """This process's children, zombies included, from /proc."""
    children = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == os.getpid():
            children.add(int(stat.parent.name))
    return children


# --- the config file ---


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        pytest.param('{"mcpServers": {', " is not valid JSON: Expecting property name enclosed in double quotes: "
                     "line 1 column 17 (char 16)", id="bad-json"),
        pytest.param('{"mcpServers": {"files": {"args": ["x"]}}}',
                     ': server \'files\': give either "command" (a local server, over stdio) or "url" (a remote one, '
                     "over Streamable HTTP)", id="missing-command"),
        pytest.param('{"mcpServers": {"files": {"command": "x", "url": "http://h/mcp"}}}',
                     ': server \'files\': give either "command" (a local server, over stdio) or "url" (a remote one, '
                     "over Streamable HTTP)", id="command-and-url"),
        pytest.param('{"mcpServers": {"files": {"command": "x", "comand": "y"}}}',
                     ": server 'files', field 'comand': Extra inputs are not permitted", id="unknown-field"),
        pytest.param('{"mcpServers": {"files": {"command": "x"}, "files": {"command": "y"}}}',
                     ": 'files' given twice in one object", id="duplicate-name"),
        pytest.param('{"mcpServers": {"files": {"command": "x", "headers": {"a": "b"}, "env": {}}}}',
                     ": server 'files': 'headers' cannot be set for a local server", id="headers-for-local"),
        pytest.param('{"mcpServers": {"web": {"url": "http://h/mcp", "cwd": "/", "args": []}}}',
                     ": server 'web': 'args', 'cwd' cannot be set for a remote server", id="args-for-remote"),
        pytest.param('{"mcpServers": {"web": {"url": "ftp://h/mcp"}}}',
                     ": server 'web', field 'url': String should match pattern '^https?://\\S+$'", id="bad-url"),
        pytest.param('{"mcpServers": {"files": {"command": "x", "timeout_s": 0, "args": "a"}}}',
                     ": server 'files', field 'args': Input should be a valid list; server 'files', field "
                     "'timeout_s': Input should be greater than 0", id="bad-values"),
        pytest.param('{"servers": {}}', ": field 'mcpServers': Field required; field 'servers': Extra inputs are not "
                     "permitted", id="wrong-top-level-key"),
    ],
)
async def test_a_bad_config_file_stops_startup_naming_the_server_and_the_field(
    tmp_path: Path, registry: ToolRegistry, text: str, problem: str
) -> None:
    path = tmp_path / "mcp_servers.json"
    path.write_text(text)
    with pytest.raises(McpConfigError) as excinfo:
        async with McpServers.start(path, registry):
            pytest.fail("started with a bad config file")
    assert str(excinfo.value) == f"MCP_SERVERS file {str(path)!r}{problem}"


async def test_a_missing_config_file_stops_startup(tmp_path: Path, registry: ToolRegistry) -> None:
    path = tmp_path / "missing.json"
    with pytest.raises(McpConfigError) as excinfo:
        async with McpServers.start(path, registry):
            pytest.fail("started without its config file")
    assert str(excinfo.value) == f"MCP_SERVERS file {str(path)!r} cannot be read: No such file or directory"


async def test_without_a_config_file_there_are_no_servers(registry: ToolRegistry) -> None:
    async with McpServers.start(None, registry) as servers:
        assert (servers.status(), servers.unavailable(), [tool.name for tool in registry.tools]) == (
            {}, [], ["calculator"])


async def test_the_example_config_file_works_from_the_project_folder(
    registry: ToolRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(PROJECT_ROOT)  # its paths are relative to where the service runs, as in the README
    async with started(PROJECT_ROOT / "mcp_servers.example.json", registry) as servers:
        status = servers.status()
        greeting = await run(registry, "test__echo", {"text": "hello"})
    assert status == {"test": McpServerStatus(state="connected", transport="stdio", tools=3),
                      "filesystem": McpServerStatus(state="disabled", transport="stdio", tools=0)}
    assert greeting == ("hello", None)


# --- names, schemas and results: pure functions ---


@pytest.mark.parametrize(
    ("server", "tool", "taken", "expected"),
    [
        pytest.param("files", "read", set(), "files__read", id="plain"),
        pytest.param("my files", "read.file/v2", set(), "my_files__read_file_v2", id="unsafe-characters"),
        pytest.param("s", "ü", set(), "s___", id="non-ascii"),
        pytest.param("server", "t" * 80, set(), "server__" + "t" * 56, id="cut-to-64"),
        pytest.param("a", "b", {"a__b"}, "a__b_2", id="clash"),
        pytest.param("a", "b", {"a__b", "a__b_2"}, "a__b_3", id="second-clash"),
        pytest.param("s", "t" * 80, {"s__" + "t" * 61}, "s__" + "t" * 59 + "_2", id="clash-at-64"),
    ],
)
def test_mcp_tool_names_follow_openai_rules(server: str, tool: str, taken: set[str], expected: str) -> None:
    assert mcp_tool_name(server, tool, taken) == expected


@pytest.mark.parametrize(
    ("schema", "expected"),
    [
        pytest.param({}, {"type": "object", "properties": {}}, id="empty-becomes-an-object"),
        pytest.param(
            {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": "x", "$comment": "c",
             "title": "Args", "type": "object", "properties": {"title": {"type": "string", "title": "Title"}},
             "required": ["title"]},
            {"type": "object", "properties": {"title": {"type": "string"}}, "required": ["title"]},
            id="noise-dropped-but-a-property-named-title-kept",
        ),
        pytest.param(
            {"type": "object", "properties": {"p": {"$ref": "#/$defs/Point", "description": "Where."}},
             "$defs": {"Point": {"type": "object", "properties": {"x": {"type": "number"}}}}},
            {"type": "object", "properties": {"p": {"type": "object", "properties": {"x": {"type": "number"}},
                                                    "description": "Where."}}},
            id="ref-inlined",
        ),
        pytest.param(
            {"type": "object", "properties": {"n": {"$ref": "#/definitions/Node"}},
             "definitions": {"Node": {"type": "object", "properties": {"next": {"$ref": "#/definitions/Node"}}}}},
            {"type": "object", "properties": {"n": {"type": "object", "properties": {"next": {"type": "object"}}}}},
            id="recursion-cut-to-an-object",
        ),
        pytest.param(
            {"type": "object", "properties": {"q": {"type": "string", "description": "d" * 300,
                                                    "default": {"title": "kept", "description": "e" * 300}}}},
            {"type": "object", "properties": {"q": {"type": "string", "description": "d" * 255 + "…",
                                                    "default": {"title": "kept", "description": "e" * 300}}}},
            id="descriptions-capped-literals-untouched",
        ),
        pytest.param(
            {"type": "object", "properties": {"u": {"$ref": "https://example.com/schema"}}},
            {"type": "object", "properties": {"u": {"$ref": "https://example.com/schema"}}},
            id="remote-ref-passed-through",
        ),
    ],
)
def test_mcp_tool_parameters_trim_what_small_models_stumble_on(schema: dict[str, Any],
                                                               expected: dict[str, Any]) -> None:
    assert mcp_tool_parameters(schema) == expected


def test_a_reference_bomb_is_cut_after_64_expansions() -> None:
    # each definition refers to the next one twice, the last to the first: inlined whole, 2**30 copies
    definitions = {f"D{i}": {"type": "array", "prefixItems": [{"$ref": f"#/$defs/D{(i + 1) % 30}"}] * 2}
                   for i in range(30)}
    schema = {"type": "object", "properties": {"x": {"$ref": "#/$defs/D0"}}, "$defs": definitions}
    parameters = json.dumps(mcp_tool_parameters(schema))
    assert (parameters.count("prefixItems"), "$ref" in parameters) == (64, False)


@pytest.mark.parametrize(
    ("block", "expected"),
    [
        pytest.param(mcp_types.TextContent(type="text", text="hello"), "hello", id="text"),
        pytest.param(mcp_types.ImageContent(type="image", data="A" * 16384, mime_type="image/png"),
                     "[image: image/png, 12 KB]", id="image"),
        pytest.param(mcp_types.AudioContent(type="audio", data="QUJD", mime_type="audio/wav"),
                     "[audio: audio/wav, 3 bytes]", id="audio"),
        pytest.param(mcp_types.ResourceLink(type="resource_link", name="r", uri="file:///a.txt",
                                            mime_type="text/plain"),
                     "[resource link: file:///a.txt, text/plain]", id="resource-link"),
        pytest.param(mcp_types.EmbeddedResource(type="resource", resource=mcp_types.TextResourceContents(
            uri="file:///a.txt", text="line")), "[resource: file:///a.txt]\nline", id="embedded-text"),
        pytest.param(mcp_types.EmbeddedResource(type="resource", resource=mcp_types.BlobResourceContents(
            uri="file:///a.pdf", blob="A" * 4 * 1024 * 1024, mime_type="application/pdf")),
                     "[resource: file:///a.pdf, application/pdf, 3.0 MB]", id="embedded-blob"),
    ],
)
def test_mcp_content_becomes_text_and_binary_a_summary(block: mcp_types.ContentBlock, expected: str) -> None:
    assert mcp_content_text(block) == expected


def test_the_registry_refuses_a_ready_made_tool_whose_name_is_taken_or_invalid(registry: ToolRegistry) -> None:
    tool = registry.get("calculator")
    with pytest.raises(ToolDefinitionError) as taken:
        registry.add(tool)
    with pytest.raises(ToolDefinitionError) as invalid:
        registry.add(dataclasses.replace(tool, name="files.read"))
    assert (str(taken.value), str(invalid.value)) == (
        "a tool named 'calculator' is already registered",
        "tool 'files.read': the name must be 1-64 letters, digits, '_' or '-'",
    )


def test_a_result_with_only_structured_content_is_its_json() -> None:
    result = mcp_types.CallToolResult(content=[], structured_content={"temperature": 21.5, "sky": "맑음"})
    assert mcp_result_text(result) == '{"temperature": 21.5, "sky": "맑음"}'


# --- servers over stdio and Streamable HTTP ---


async def test_tools_of_both_transports_join_the_registry_beside_the_built_ins(
    write_config: ConfigWriter, registry: ToolRegistry, http_server: HttpTestServer, caplog: pytest.LogCaptureFixture
) -> None:
    config = write_config({
        "local": stdio_entry(allowed_tools=["echo", "files.read/v2", "search", "not-there"]),
        "remote": {"url": http_server.url, "allowed_tools": ["echo", "request_header"]},
        "off": stdio_entry(enabled=False),
    })
    with caplog.at_level(logging.WARNING, logger="tools"):
        async with started(config, registry) as servers:
            listed = [(tool.name, tool.source) for tool in registry.tools]
            status = servers.status()
            unavailable = servers.unavailable()
            search = registry.get("local__search")
    # the built-ins first; then each server's tools in its own order, the servers in the order they connected
    assert (listed[0], sorted(listed[1:])) == (("calculator", "builtin"), [
        ("local__echo", "mcp:local"), ("local__files_read_v2", "mcp:local"), ("local__search", "mcp:local"),
        ("remote__echo", "mcp:remote"), ("remote__request_header", "mcp:remote")])
    assert status == {"local": McpServerStatus(state="connected", transport="stdio", tools=3),
                      "remote": McpServerStatus(state="connected", transport="http", tools=2),
                      "off": McpServerStatus(state="disabled", transport="stdio", tools=0)}
    assert unavailable == []
    assert search.description == SEARCH_DESCRIPTION[:1023].rstrip() + "…"
    assert search.parameters["properties"]["where"]["anyOf"][0]["properties"]["inner"] == {
        "anyOf": [{"type": "object"}, {"type": "null"}], "default": None, "description": "A further filter."}
    assert [record.getMessage() for record in caplog.records if record.name == "tools"] == [
        "MCP server 'local' offers no tools named ['not-there'] (allowed_tools)",
        "MCP server 'local': tool 'files.read/v2' is registered as 'local__files_read_v2' (names are 1-64 "
        "letters, digits, '_' or '-', and unique)",
    ]
    assert [tool.name for tool in registry.tools] == ["calculator"]


async def test_a_stdio_tool_an_http_tool_and_a_built_in_run_concurrently(
    write_config: ConfigWriter, registry: ToolRegistry, http_server: HttpTestServer
) -> None:
    config = write_config({"local": stdio_entry(), "remote": {"url": http_server.url, "headers": {"X-Team": "a"}}})
    async with started(config, registry):
        results = await asyncio.gather(
            run(registry, "local__add", {"a": 2, "b": 3}),
            run(registry, "remote__request_header", {"name": "x-team"}),
            run(registry, "calculator", {"expression": "12*7"}),
        )
    assert results == [("5", None), ("a", None), ("84", None)]


async def test_results_are_text_with_images_summarised_and_is_error_an_error(
    write_config: ConfigWriter, registry: ToolRegistry
) -> None:
    async with started(write_config({"test": stdio_entry()}), registry):
        picture = await run(registry, "test__picture", {"kilobytes": 12})
        failure = await run(registry, "test__fail", {"message": "no such record"})
        bad_arguments = await run(registry, "test__echo", ["not", "an", "object"])
    assert (picture, failure, bad_arguments) == (
        ("a blank picture\n[image: image/png, 12 KB]", None),
        (None, "Error executing tool fail: no such record"),
        (None, "invalid arguments for test__echo: Input should be an object"),
    )


@pytest.mark.parametrize(("server_timeout_s", "caller_timeout_s", "cut_at"),
                         [pytest.param(None, 0.5, 0.5, id="caller-default"),
                          pytest.param(0.5, 30, 0.5, id="server-timeout_s")])
async def test_a_tool_that_hangs_is_cut_at_its_deadline_and_the_server_stays_usable(
    write_config: ConfigWriter, registry: ToolRegistry, tmp_path: Path, server_timeout_s: float | None,
    caller_timeout_s: float, cut_at: float
) -> None:
    entry = stdio_entry() if server_timeout_s is None else stdio_entry(timeout_s=server_timeout_s)
    async with started(write_config({"test": entry}), registry):
        hung = await run(registry, "test__wait", {"started_file": str(tmp_path / "started"), "seconds": 3600},
                         timeout_s=caller_timeout_s)
        after = await run(registry, "test__echo", {"text": "still here"})
    assert (hung, after) == ((None, f"tool 'test__wait' timed out after {cut_at} s"), ("still here", None))


@pytest.mark.parametrize("transport", ["stdio", "http"])
async def test_a_10_mb_result_is_cut_to_the_cap(
    write_config: ConfigWriter, registry: ToolRegistry, http_server: HttpTestServer, transport: str
) -> None:
    entry = stdio_entry() if transport == "stdio" else {"url": http_server.url}
    async with started(write_config({"test": entry}), registry):
        # the SDK's stdio reader takes seconds of CPU over 10 MB (bench/mcp_bench.py): room for a loaded CI
        result = await run(registry, "test__huge", {"chars": 10_000_000}, timeout_s=120, max_result_chars=1000)
    assert result == ("x" * 1000 + "\n…[truncated 9999000 characters]", None)


async def test_a_stdio_server_killed_mid_call_gives_an_error_and_the_next_call_reconnects(
    write_config: ConfigWriter, registry: ToolRegistry, tmp_path: Path
) -> None:
    started_file = tmp_path / "started"
    async with started(write_config({"test": stdio_entry()}), registry) as servers:
        first_pid = int((await run(registry, "test__process_id", {}))[0])
        call = asyncio.create_task(run(registry, "test__wait", {"started_file": str(started_file), "seconds": 3600}))
        await wait_for_file(started_file)
        os.kill(first_pid, signal.SIGKILL)
        killed = await call
        next_pid = int((await run(registry, "test__process_id", {}))[0])
        status = servers.status()
    assert killed == (None, "MCP server 'test' closed the connection during the call; the next call reconnects")
    assert next_pid != first_pid
    assert status == {"test": McpServerStatus(state="connected", transport="stdio", tools=11)}


async def test_an_http_server_killed_mid_call_is_unavailable_until_it_is_back(
    write_config: ConfigWriter, registry: ToolRegistry, tmp_path: Path
) -> None:
    server = HttpTestServer(free_port())
    await server.start()
    started_file = tmp_path / "started"
    try:
        async with started(write_config({"web": {"url": server.url}}), registry) as servers:
            call = asyncio.create_task(run(registry, "web__wait", {"started_file": str(started_file),
                                                                   "seconds": 3600}))
            await wait_for_file(started_file)
            await server.stop()
            killed = await call
            while_down = await run(registry, "web__echo", {"text": "anyone?"})
            status_while_down = (servers.unavailable(), servers.status()["web"])
            await server.start()
            after = await run(registry, "web__echo", {"text": "back"})
            status_after = (servers.unavailable(), servers.status()["web"])
    finally:
        await server.stop()
    assert killed == (None, "MCP server 'web' closed the connection during the call; the next call reconnects")
    assert while_down == (None, "MCP server 'web' is unavailable; the service keeps trying to reach it")
    assert status_while_down == (["web"], McpServerStatus(state="down", transport="http", tools=11))
    assert after == ("back", None)
    assert status_after == ([], McpServerStatus(state="connected", transport="http", tools=11))


async def test_a_server_down_at_startup_is_retried_and_its_tools_join_later(
    write_config: ConfigWriter, registry: ToolRegistry
) -> None:
    server = HttpTestServer(free_port())
    config = write_config({"web": {"url": server.url}})
    try:
        async with started(config, registry, retry_delay_s=0.05) as servers:
            registry.openai_schemas()  # cached now: the tools that join later must replace it
            at_startup = (servers.unavailable(), servers.status()["web"].state, registry.get("web__echo"))
            await server.start()
            for _ in range(400):
                if registry.get("web__echo") is not None:
                    break
                await asyncio.sleep(0.05)
            later = (servers.unavailable(), servers.status()["web"].state)
            sent_to_the_model = [schema["function"]["name"] for schema in registry.openai_schemas()]
            echoed = await run(registry, "web__echo", {"text": "joined"})
    finally:
        await server.stop()
    assert at_startup == (["web"], "down", None)
    assert later == ([], "connected")
    assert sent_to_the_model[:2] == ["calculator", "web__echo"]
    assert echoed == ("joined", None)


async def test_the_services_secrets_never_reach_a_stdio_server(
    write_config: ConfigWriter, registry: ToolRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    async with started(write_config({"test": stdio_entry(env={"GREETING": "hello"})}), registry):
        text, error = await run(registry, "test__environment", {})
    environment = json.loads(text)
    assert error is None
    assert not SECRETS.keys() & environment.keys()
    # Python's own locale coercion (PEP 538) may add LC_CTYPE inside the child; nothing else may appear.
    environment.pop("LC_CTYPE", None)
    assert environment == get_default_environment() | {"GREETING": "hello"}


async def test_shutdown_ends_every_stdio_process_and_removes_the_tools(
    write_config: ConfigWriter, registry: ToolRegistry
) -> None:
    before = child_pids()
    async with started(write_config({"one": stdio_entry(), "two": stdio_entry()}), registry):
        pids = {int((await run(registry, f"{name}__process_id", {}))[0]) for name in ("one", "two")}
        during = child_pids()
    assert pids <= during
    assert child_pids() == before
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert [tool.name for tool in registry.tools] == ["calculator"]



async def test_the_service_runs_a_stdio_tool_an_http_tool_and_a_built_in_in_one_turn(
    write_config: ConfigWriter, http_server: HttpTestServer, fake_vllm: FakeVLLM, live_server: Any,
    http: httpx.AsyncClient
) -> None:
    config = write_config({"local": stdio_entry(allowed_tools=["add"]),
                           "remote": {"url": http_server.url, "headers": {"X-Team": "a"},
                                      "allowed_tools": ["request_header"]}})
    fake_vllm.script(tool_call_text("local__add", {"a": 2, "b": 3})
                     + tool_call_text("remote__request_header", {"name": "x-team"})
                     + tool_call_text("calculator", {"expression": "12*7"}))
    async with live_server(vllm_base_url=fake_vllm.url, mcp_servers=config) as server:
        async with http.stream("POST", f"{server.url}/api/v1/chat/stream", json={"content": "all three"}) as response:
            events = [json.loads(line[6:]) async for line in response.aiter_lines() if line.startswith("data: ")]
        tools = (await http.get(f"{server.url}/api/v1/tools")).json()
        health = (await http.get(f"{server.url}/api/v1/health")).json()
    assert [event["type"] for event in events[:4]] == ["run"] + ["tool_call"] * 3
    assert {event["name"]: event["result"] for event in events if event["type"] == "tool_result"} == {
        "local__add": "5", "remote__request_header": "a", "calculator": "84"}
    assert events[-1]["type"] == "done"
    assert sorted((tool["name"], tool["source"]) for tool in tools) == [
        ("calculator", "builtin"), ("get_current_time", "builtin"), ("local__add", "mcp:local"),
        ("remote__request_header", "mcp:remote")]
    assert (health["status"], health["mcp"]) == ("ok", {
        "local": {"state": "connected", "transport": "stdio", "tools": 1},
        "remote": {"state": "connected", "transport": "http", "tools": 1}})


async def test_a_server_down_at_startup_leaves_the_service_up_and_degraded(
    write_config: ConfigWriter, fake_vllm: FakeVLLM, live_server: Any, http: httpx.AsyncClient
) -> None:
    config = write_config({"gone": {"url": f"http://127.0.0.1:{free_port()}/mcp"}})
    async with live_server(vllm_base_url=fake_vllm.url, mcp_servers=config) as server:
        health = (await http.get(f"{server.url}/api/v1/health")).json()
        answer = await http.post(f"{server.url}/api/v1/chat", json={"content": "still there?"})
    assert (health["status"], health["vllm"]["reachable"], health["mcp"]["gone"]["tools"]) == ("degraded", True, 0)
    assert health["mcp"]["gone"]["state"] != "connected"
    assert answer.status_code == 200


def test_the_service_does_not_start_with_a_bad_config_file(tmp_path: Path) -> None:
    """`uvicorn agent_app:app` with MCP_SERVERS naming a bad file exits, and its output names server and field."""
    config = tmp_path / "mcp_servers.json"
    config.write_text('{"mcpServers": {"files": {"command": "x", "comand": "y"}}}')
    env = {**os.environ, "MCP_SERVERS": str(config), "VLLM_BASE_URL": "http://127.0.0.1:9",
           "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'conversations.db'}"}
    started = subprocess.run([sys.executable, "-m", "uvicorn", "agent_app:app", "--port", str(free_port())],
                             cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert started.returncode != 0
    assert f"MCP_SERVERS file {str(config)!r}: server 'files', field 'comand': Extra inputs are not permitted" in (
        started.stdout + started.stderr)

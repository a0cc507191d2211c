"""An MCP server for the tests and bench/mcp_bench.py, built with the mcp SDK's MCPServer (FastMCP before mcp 2).

    python tests/mcp_test_server.py                 # over stdio, as a subprocess of the service
    python tests/mcp_test_server.py --port 8765     # over Streamable HTTP at http://127.0.0.1:8765/mcp

Its tools cover what the service must handle: plain text, a failing tool (`isError`), a tool that hangs,
one that returns megabytes, an image, the process's environment and id, a name OpenAI refuses, and a
long description over a deeply nested schema.
"""

import argparse
import asyncio
import json
import os

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.mcpserver.utilities.types import Image
from pydantic import BaseModel, Field

server = MCPServer("test-server", log_level="WARNING")


@server.tool()
def echo(text: str) -> str:
    """Return the text unchanged."""
    return text


@server.tool()
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@server.tool()
def environment() -> str:
    """Return this process's environment variables as a JSON object."""
    return json.dumps(dict(os.environ), sort_keys=True)


@server.tool()
def process_id() -> int:
    """Return this server's process id."""
    return os.getpid()


@server.tool()
async def wait(started_file: str, seconds: float) -> str:
    """Create `started_file`, so a test knows the call arrived, then sleep for `seconds`."""
    await anyio.Path(started_file).touch()
    await asyncio.sleep(seconds)
    return f"waited {seconds} s"


@server.tool()
def huge(chars: int) -> str:
    """Return `chars` characters of text."""
    return "x" * chars


@server.tool()
def fail(message: str) -> str:
    """Fail with the message; the SDK returns it as a result with isError set."""
    raise ToolError(message)


@server.tool()
def picture(kilobytes: int) -> list[str | Image]:
    """Return a caption and a PNG image of about `kilobytes` KB."""
    return ["a blank picture", Image(data=b"\x89PNG\r\n\x1a\n" + bytes(kilobytes * 1024 - 8), format="png")]


@server.tool()
def request_header(name: str, ctx: Context) -> str:
    """Return the HTTP request header `name` (Streamable HTTP only)."""
    request = ctx.request_context.request
    return request.headers.get(name, "") if request is not None else ""


@server.tool(name="files.read/v2")
def files_read(path: str) -> str:
    """A name with '.' and '/', which MCP allows and OpenAI does not."""
    return f"read {path}"


class Filter(BaseModel):
    """One level of a nested filter."""

    field: str = Field(title="Field", description="The field to compare.")
    inner: "Filter | None" = Field(default=None, title="Inner", description="A further filter.")


@server.tool(description="Search the records. " + "Very detailed guidance. " * 200)
def search(query: str, where: Filter | None = None) -> str:
    """A long description over a recursive schema with $defs, titles and a $ref."""
    return f"searched {query}"


def main() -> None:
    """Serve over stdio, or over Streamable HTTP on loopback when a port is given."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--port", type=int, help="serve Streamable HTTP on 127.0.0.1:PORT instead of stdio")
    options = parser.parse_args()
    if options.port is None:
        server.run("stdio")
    else:
        server.run("streamable-http", host="127.0.0.1", port=options.port)


if __name__ == "__main__":
    main()

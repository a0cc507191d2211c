"""What one MCP tool call adds, over stdio and over Streamable HTTP, next to the built-in tools.

Each call goes through ToolRegistry.run(), as the agent's do, one at a time, in this process (the
service's side) on uvloop (as under uvicorn). The MCP server is tests/mcp_test_server.py: a subprocess
over stdio, and a second process serving Streamable HTTP on loopback; the tool is `echo` with a short
text. Printed per call: latency (p50, p99), this process's CPU, the MCP server process's CPU, and what
the MCP calls add to the calculator's latency and CPU. Then the same for a few calls of `huge`, whose
10 MB result the registry cuts to TOOL_RESULT_MAX_CHARS only once it has been read. Nothing is asserted.

    .venv/bin/python bench/mcp_bench.py                  # 2,000 calls a tool after 200 warm-up calls
    .venv/bin/python bench/mcp_bench.py --calls 500
"""

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvloop

from harness import MAIN_DIR, ServerGroup, cpu_seconds, free_port, percentile, run_cli

sys.path.insert(0, str(MAIN_DIR))
from tools import REGISTRY, McpServers

TEST_SERVER = MAIN_DIR / "tests" / "mcp_test_server.py"


@dataclass(frozen=True)
class Measure:
    """Per call: latency percentiles in seconds, and CPU seconds of this process and of the tool's server."""

    name: str
    p50_s: float
    p99_s: float
    client_cpu_s: float
    server_cpu_s: float | None


async def measure(name: str, tool: str, arguments: dict[str, Any], calls: int, warmup: int,
                  server_pid: int | None) -> Measure:
    """Warm up, then time `calls` sequential calls and read both processes' CPU around them."""
    for _ in range(warmup):
        await call(tool, arguments)
    latencies = []
    server_before = cpu_seconds(server_pid) if server_pid is not None else 0.0
    client_before = time.process_time()
    for _ in range(calls):
        started = time.perf_counter()
        await call(tool, arguments)
        latencies.append(time.perf_counter() - started)
    client_cpu = (time.process_time() - client_before) / calls
    server_cpu = (cpu_seconds(server_pid) - server_before) / calls if server_pid is not None else None
    return Measure(name, percentile(latencies, 0.5), percentile(latencies, 0.99), client_cpu, server_cpu)


async def call(tool: str, arguments: dict[str, Any]) -> str:
    """One call through the registry; a failed one stops the benchmark."""
    result = await REGISTRY.run(tool, arguments, timeout_s=30, max_result_chars=16_000)
    if result.error is not None or result.result is None:
        raise SystemExit(f"{tool} failed: {result.error}")
    return result.result


def print_table(measures: list[Measure], unit: str, scale: float) -> None:
    """One row a tool; the rows after the first also say what they add to its figures."""
    base = measures[0]
    print(f"{'tool':<34} {'p50':>8} {'p99':>8} {'CPU here':>9} {'CPU server':>11} {'+p50':>8} {'+CPU here':>10}")
    for row in measures:
        server = f"{row.server_cpu_s * scale:>11.0f}" if row.server_cpu_s is not None else f"{'-':>11}"
        added = (f"{(row.p50_s - base.p50_s) * scale:>8.0f} {(row.client_cpu_s - base.client_cpu_s) * scale:>10.0f}"
                 if row is not base else f"{'':>8} {'':>10}")
        print(f"{row.name:<34} {row.p50_s * scale:>8.0f} {row.p99_s * scale:>8.0f} {row.client_cpu_s * scale:>9.0f} "
              f"{server} {added}")
    print(f"({unit} per call; '+' columns: added to the first row's)\n")


async def run(options: argparse.Namespace, http_url: str, http_pid: int, config_dir: Path) -> None:
    """Start both MCP servers in the registry, then measure each tool in turn."""
    config = config_dir / "mcp_servers.json"
    config.write_text(json.dumps({"mcpServers": {
        "local": {"command": sys.executable, "args": [str(TEST_SERVER)],
                  "allowed_tools": ["echo", "huge", "process_id"]},
        "remote": {"url": http_url, "allowed_tools": ["echo", "huge"]},
    }}))
    async with McpServers.start(config, REGISTRY) as servers:
        if unavailable := servers.unavailable():
            raise SystemExit(f"MCP servers not connected: {unavailable}")
        stdio_pid = int(await call("local__process_id", {}))
        text = {"text": "hello"}
        cases = [
            ("built-in calculator (async)", "calculator", {"expression": "12*7"}, None),
            ("built-in get_current_time (thread)", "get_current_time", {"timezone": "Asia/Seoul"}, None),
            ("MCP echo over stdio", "local__echo", text, stdio_pid),
            ("MCP echo over Streamable HTTP", "remote__echo", text, http_pid),
        ]
        measures = [await measure(name, tool, arguments, options.calls, options.warmup, pid)
                    for name, tool, arguments, pid in cases]
        big = {"chars": 10_000_000}
        big_measures = [
            await measure("built-in calculator (async)", "calculator", {"expression": "12*7"}, 3, 1, None),
            await measure("MCP huge (10 MB) over stdio", "local__huge", big, options.big_calls, 1, stdio_pid),
            await measure("MCP huge (10 MB) over HTTP", "remote__huge", big, options.big_calls, 1, http_pid),
        ]
    print_table(measures, "microseconds", 1e6)
    print_table(big_measures, "milliseconds", 1e3)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--calls", type=int, default=2000, help="measured calls a tool (default 2000)")
    parser.add_argument("--warmup", type=int, default=200, help="warm-up calls a tool (default 200)")
    parser.add_argument("--big-calls", type=int, default=3, help="measured 10 MB calls a transport (default 3)")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mcp-bench-") as work, ServerGroup(Path(work)) as group:
        port = free_port()
        http = group.start("mcp_http", [sys.executable, str(TEST_SERVER), "--port", str(port)], port)
        uvloop.run(run(options, f"{http.url}/mcp", http.pid, Path(work)))
    return 0


if __name__ == "__main__":
    run_cli(main)

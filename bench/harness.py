"""What the benchmarks share: server processes on loopback, /proc readings, the measured turn, one client POST.

  1. Processes  Server: one child process on a free loopback port; ServerGroup stops them all on exit
  2. /proc      cpu_seconds(), peak_rss_mib(), rss_mib(): another process's own CPU and memory
  3. Turn       the question, the model name and the calculator schema every system is sent
  4. Client     TurnResult and post_turn(): one timed POST, plain JSON or SSE, checked by the caller
"""

import contextlib
import ctypes
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

MAIN_DIR = Path(__file__).resolve().parent.parent
BENCH_DIR = MAIN_DIR / "bench"
FAKE_VLLM = MAIN_DIR / "tests" / "fake_vllm.py"
LOOPBACK = "127.0.0.1"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# --- 1. Processes ---


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def uvicorn_argv(app: str, port: int, *extra: str) -> list[str]:
    """One uvicorn worker in this interpreter, access log off (for the service and the reference alike)."""
    return [sys.executable, "-m", "uvicorn", app, "--host", LOOPBACK, "--port", str(port),
            "--log-level", "warning", "--no-access-log", *extra]


@dataclass
class Server:
    """A child process serving HTTP on a loopback port; its stdout and stderr go to `log`."""

    name: str
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Poll until the port accepts connections (uvicorn binds only after its lifespan started)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, self.port), timeout=0.5):
                return
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not listen on port {self.port} within {timeout_s} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the server's output, for a startup failure."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def error_lines(self, limit: int = 5) -> list[str]:
        """The first log lines that mention an error, long ones cut in the middle (a traceback ends with the
        exception); the log goes when the benchmark ends."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        lines = [line for line in text.splitlines() if "ERROR" in line or "Error" in line][:limit]
        return [line if len(line) <= 500 else f"{line[:150]} … {line[-350:]}" for line in lines]

    def stop(self, timeout_s: float = 5.0) -> None:
        """SIGTERM, then SIGKILL if it is still running after `timeout_s`."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout_s)


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the bench process dies, even by SIGKILL."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


@dataclass
class ServerGroup:
    """The servers of one benchmark; `with` stops every one of them, on errors and Ctrl-C too.

    `work_dir` (a temporary directory) holds each server's log and the service's SQLite database.
    """

    work_dir: Path
    servers: list[Server] = field(default_factory=list)

    def start(self, name: str, argv: list[str], port: int, env: dict[str, str] | None = None) -> Server:
        """Start a child in MAIN_DIR and wait until it listens on `port`."""
        log = self.work_dir / f"{name}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(argv, cwd=MAIN_DIR, env={**os.environ, **(env or {})}, stdout=out,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       preexec_fn=_die_with_parent)
        server = Server(name, process, port, log)
        self.servers.append(server)
        server.wait_ready()
        return server

    def start_fake_vllm(self, *options: str) -> Server:
        """tests/fake_vllm.py with its default responder; `options` go to its command line."""
        if not FAKE_VLLM.exists():
            raise SystemExit(f"{FAKE_VLLM} does not exist yet: the benchmark needs the fake vLLM server")
        port = free_port()
        return self.start("fake_vllm", [sys.executable, str(FAKE_VLLM), "--port", str(port), *options], port)

    def start_service(self, vllm: Server, name: str = "service", settings: dict[str, str] | None = None) -> Server:
        """The real service, `uvicorn agent_app:app` from MAIN_DIR, on the fake vLLM and a fresh database.

        `settings` are extra environment variables for it (e.g. {"VLLM_MAX_CONCURRENCY": "600"}).
        """
        port = free_port()
        env = {"VLLM_BASE_URL": vllm.url, "DATABASE_URL": f"sqlite+aiosqlite:///{self.work_dir / name}.db"}
        return self.start(name, uvicorn_argv("agent_app:app", port), port, env | (settings or {}))

    def start_reference(self, vllm: Server) -> Server:
        """bench/reference_app.py on the fake vLLM; it imports the calculator from MAIN_DIR's tools.py."""
        port = free_port()
        argv = uvicorn_argv("reference_app:app", port, "--app-dir", str(BENCH_DIR))
        return self.start("reference", argv, port, {"VLLM_BASE_URL": vllm.url, "PYTHONPATH": str(MAIN_DIR)})

    def stop(self, server: Server) -> None:
        """Stop one server before the others (e.g. to start a fresh service)."""
        server.stop()
        self.servers.remove(server)

    def __enter__(self) -> "ServerGroup":
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for server in reversed(self.servers):
            server.stop()
        self.servers.clear()


def _exit_on_sigterm(signum: int, frame: object) -> None:
    """Turn SIGTERM into SystemExit, so `with ServerGroup` still stops the children."""
    raise SystemExit(128 + signum)


# --- 2. /proc ---


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc/<pid>/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()  # the command name may hold spaces; fields start at 3
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime and stime are fields 14 and 15


def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/{pid}/status has no {key}")


def peak_rss_mib(pid: int) -> float:
    """Peak resident set size so far (VmHWM)."""
    return _status_kib(pid, "VmHWM") / 1024


def rss_mib(pid: int) -> float:
    """Resident set size now (VmRSS)."""
    return _status_kib(pid, "VmRSS") / 1024


@contextlib.contextmanager
def cpu_meter(pids: dict[str, int]) -> Iterator[dict[str, float]]:
    """Fill the yielded dict with each process's CPU seconds spent inside the block."""
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    used: dict[str, float] = {}
    yield used
    used.update({name: cpu_seconds(pid) - before[name] for name, pid in pids.items()})


# --- 3. Turn ---

PROMPT = "What is 12*7?"
MODEL = "Qwen/Qwen2.5-7B-Instruct"
CALCULATOR_TOOL = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression and return the result.",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string", "description": 'e.g. "12 * 7"'}},
            "required": ["expression"],
        },
    },
}


def answered_84(answer: dict[str, Any]) -> bool:
    """The measured turn's check: the answer says 84 and a calculator call was made."""
    calls = answer.get("tool_calls") or []
    return "84" in str(answer.get("content")) and bool(calls) and calls[0].get("name") == "calculator"


def answered_84_with_a_block(answer: dict[str, Any]) -> bool:
    """The same check for /v1/chat/completions: 84 in the content, after the calculator's tool block."""
    content = str(answer.get("content"))
    return "84" in content and '<details type="tool_calls" done="true"' in content and 'name="calculator"' in content


# --- 4. Client ---

Check = Callable[[dict[str, Any]], bool]


@dataclass(slots=True)
class TurnResult:
    """One request as the client saw it; `answer` is the JSON body, or the SSE `done` event's data."""

    ok: bool
    latency_s: float
    ttft_s: float | None = None
    answer: dict[str, Any] | None = None
    error: str = ""


async def post_turn(session: aiohttp.ClientSession, url: str, body: bytes, *, stream: bool,
                    check: Check, openai_stream: bool = False) -> TurnResult:
    """POST one turn and time it; a stream's first-token time is the first `event: token` line (the first
    content chunk of an OpenAI stream)."""
    started = time.perf_counter()
    try:
        async with session.post(url, data=body, headers={"content-type": "application/json"}) as response:
            if response.status != 200:
                text = (await response.read())[:200].decode(errors="replace")
                return TurnResult(False, time.perf_counter() - started, error=f"HTTP {response.status}: {text}")
            if stream:
                read = _read_openai_sse if openai_stream else _read_sse
                ttft, answer, error = await read(response, started)
            else:
                ttft, answer, error = None, json.loads(await response.read()), ""
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        return TurnResult(False, time.perf_counter() - started, error=f"{type(exc).__name__}: {exc}")
    latency = time.perf_counter() - started
    try:
        passed = answer is not None and check(answer)
    except (KeyError, IndexError, TypeError):
        passed = False
    if not passed:
        return TurnResult(False, latency, ttft, answer, error or f"unexpected answer: {str(answer)[:200]}")
    return TurnResult(True, latency, ttft, answer)


async def _read_sse(response: aiohttp.ClientResponse, started: float) -> tuple[float | None, Any, str]:
    """First-token time, the `done` event's data (None if it never came), and any `error` event's data.

    Reads to the end of the body, so the connection goes back to the pool rather than being closed.
    """
    ttft: float | None = None
    event, answer, error = b"", None, "the stream ended without a done event"
    async for line in response.content:
        if line.startswith(b"event:"):
            event = line[6:].strip()
            if event == b"token" and ttft is None:
                ttft = time.perf_counter() - started
        elif line.startswith(b"data:") and event == b"done":
            answer, error = json.loads(line[5:]), ""
        elif line.startswith(b"data:") and event == b"error":
            error = f"error event: {line[5:205].strip().decode(errors='replace')}"
    return ttft, answer, error


async def _read_openai_sse(response: aiohttp.ClientResponse, started: float) -> tuple[float | None, Any, str]:
    """First-content time, `{"content": …}` once `data: [DONE]` came, and any error frame's text."""
    ttft: float | None = None
    parts: list[str] = []
    answer, error = None, "the stream ended without [DONE]"
    async for line in response.content:
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            if not error.startswith("error frame"):
                answer, error = {"content": "".join(parts)}, ""
            continue
        chunk = json.loads(data)
        if "error" in chunk:
            error = f"error frame: {str(chunk['error'])[:200]}"
        for choice in chunk.get("choices") or ():
            if content := choice["delta"].get("content"):
                ttft = ttft if ttft is not None else time.perf_counter() - started
                parts.append(content)
    return ttft, answer, error


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))]


def run_cli(main: Callable[[], int]) -> None:
    """Exit with main()'s code; Ctrl-C exits 130 (ServerGroup has already stopped the servers)."""
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; the servers were stopped", file=sys.stderr)
        sys.exit(130)

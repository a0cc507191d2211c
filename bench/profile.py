"""Profile the service's hot path under load with py-spy: where a turn's CPU goes, by area and by function.

Starts tests/fake_vllm.py and the service as bench/run.py does, drives "What is 12*7?" turns at a fixed
concurrency, and samples the service with `py-spy record --gil` (only samples that hold the GIL: Python's
own CPU). Prints the share of samples per area (by the innermost frame's module), the share spent inside
the service's main parts (by any frame on the stack), and the functions with the most own time.

    .venv/bin/pip install py-spy                        # only this script needs it (not in requirements.txt)
    .venv/bin/python bench/profile.py                   # POST /api/v1/chat at C=16 for 15 s
    .venv/bin/python bench/profile.py --stream --concurrency 1
    .venv/bin/python bench/profile.py --raw stacks.txt  # keep py-spy's raw stacks (flamegraph.pl input)

py-spy attaches with ptrace: run as root or with kernel.yama.ptrace_scope=0.
"""

import argparse
import asyncio
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import aiohttp

from harness import PROMPT, ServerGroup, answered_84, post_turn, run_cli

WARMUP_S = 2.0
# Innermost frame's module -> area. First match wins; anything else is "other".
AREAS = [
    ("aiohttp (client sockets, HTTP parsing)", ("aiohttp/",)),
    ("httpx and httpx-aiohttp", ("httpx/", "httpx_aiohttp/")),
    ("uvicorn and httptools (server side)", ("uvicorn/", "httptools")),
    ("FastAPI and Starlette", ("fastapi/", "starlette/")),
    ("pydantic", ("pydantic",)),
    ("SQLAlchemy and sqlite", ("sqlalchemy/", "aiosqlite/", "sqlite3")),
    ("asyncio, threads, queues", ("asyncio/", "uvloop", "concurrent/", "threading.py", "queue.py")),
    ("json", ("json/",)),
    ("logging", ("logging/",)),
    ("agent_app.py (own code)", ("agent_app.py",)),
    ("tools.py (own code)", ("tools.py", "ast.py")),
]
# Any frame on the stack -> part of the service (inclusive time; the parts nest in the request path).
PARTS = [
    ("request middleware (request id, access log, body cap)", ("RequestContextMiddleware.",)),
    ("Agent turn (everything below the endpoint)", ("Agent.answer", "Agent.run_turn")),
    ("vLLM calls (VLLMClient)", ("VLLMClient.",)),
    ("tools (ToolRegistry)", ("ToolRegistry.",)),
    ("store (ConversationStore, SQLiteWriter)", ("ConversationStore.", "SQLiteWriter.")),
    ("SSE framing", ("sse_frames",)),
]
FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*):\d+\)$")


async def drive(url: str, concurrency: int, seconds: float, stream: bool) -> int:
    """Turns from `concurrency` clients for `seconds`; returns how many; stops at the first failure."""
    body = json.dumps({"content": PROMPT}).encode()
    done = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        deadline = time.monotonic() + seconds

        async def client() -> None:
            nonlocal done
            while time.monotonic() < deadline:
                result = await post_turn(session, url, body, stream=stream, check=answered_84)
                if not result.ok:
                    raise SystemExit(f"a turn failed: {result.error}")
                done += 1

        await asyncio.gather(*(client() for _ in range(concurrency)))
    return done


def read_stacks(path: Path) -> Counter[tuple[str, ...]]:
    """py-spy's raw output: one `frame;frame;... count` line per distinct stack, outermost frame first."""
    stacks: Counter[tuple[str, ...]] = Counter()
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks[tuple(stack.split(";"))] += int(count)
    return stacks


def frame_file(frame: str) -> str:
    match = FRAME.match(frame)
    return match["file"] if match else frame


def report(stacks: Counter[tuple[str, ...]], turns: int, top: int) -> None:
    total = sum(stacks.values())
    if not total:
        raise SystemExit("py-spy recorded no samples: is ptrace allowed (root, or yama ptrace_scope=0)?")
    areas: Counter[str] = Counter()
    parts: Counter[str] = Counter()
    own: Counter[str] = Counter()
    for stack, count in stacks.items():
        leaf = stack[-1]
        leaf_file = frame_file(leaf)
        areas[next((name for name, keys in AREAS if any(key in leaf_file for key in keys)), "other")] += count
        own[re.sub(r":\d+\)$", ")", leaf)] += count
        for name, keys in PARTS:
            if any(key in frame for frame in stack for key in keys):
                parts[name] += count
    print(f"\n{total} samples with the GIL held (1 per ms), {turns} turns: about {total / turns:.2f} ms of "
          "Python CPU per turn")
    print("\n== by area (innermost frame)")
    for name, count in areas.most_common():
        print(f"  {count / total * 100:5.1f}%  {name}")
    print("\n== inside the service's parts (any frame on the stack; parts nest)")
    for name, _ in PARTS:
        print(f"  {parts[name] / total * 100:5.1f}%  {name}")
    print(f"\n== top {top} functions by own time")
    for name, count in own.most_common(top):
        print(f"  {count / total * 100:5.1f}%  {name[:150]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=15.0, help="how long to sample")
    parser.add_argument("--stream", action="store_true", help="profile POST /api/v1/chat/stream instead")
    parser.add_argument("--top", type=int, default=25, help="how many functions to list")
    parser.add_argument("--raw", type=Path, help="also keep py-spy's raw stacks in this file")
    args = parser.parse_args()
    py_spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if py_spy is None:
        raise SystemExit("py-spy is not installed: .venv/bin/pip install py-spy")
    if args.concurrency < 1 or args.seconds <= 0:
        parser.error("concurrency must be at least 1 and seconds positive")
    with tempfile.TemporaryDirectory(prefix="agent-profile-") as work_dir, ServerGroup(Path(work_dir)) as group:
        service = group.start_service(group.start_fake_vllm())
        url = service.url + ("/api/v1/chat/stream" if args.stream else "/api/v1/chat")
        asyncio.run(drive(url, args.concurrency, WARMUP_S, args.stream))
        raw = args.raw or Path(work_dir) / "stacks.txt"
        spy = subprocess.Popen([py_spy, "record", "--pid", str(service.pid), "--rate", "1000", "--gil",
                                "--nonblocking", "--format", "raw", "--output", str(raw),
                                "--duration", str(round(args.seconds))],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        turns = asyncio.run(drive(url, args.concurrency, args.seconds, args.stream))
        _, errors = spy.communicate(timeout=args.seconds + 30)
        if spy.returncode != 0:
            raise SystemExit(f"py-spy failed: {errors.decode(errors='replace').strip()[-500:]}")
        print(f"{'POST /api/v1/chat/stream' if args.stream else 'POST /api/v1/chat'} at C={args.concurrency} "
              f"for {args.seconds:g} s")
        report(read_stacks(raw), turns, args.top)
    return 0


if __name__ == "__main__":
    run_cli(main)

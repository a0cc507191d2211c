"""A/B: the service at another commit against the working tree's, interleaved, on the measured turn.

For changes worth a few percent: bench/run.py measures against the reference loop, and the machine's
drift between its rounds is as large as such a change. Here both sides are the service, on one fake vLLM,
driven in rounds that alternate which side goes first; each round prints both sides' server CPU per turn
and their ratio, and the median ratio comes last (below 1: the working tree is cheaper).

    .venv/bin/python bench/ab.py HEAD                          # uncommitted changes vs the last commit
    .venv/bin/python bench/ab.py HEAD~1 --stream --rounds 8    # the last commit, streaming
    .venv/bin/python bench/ab.py HEAD --new-env LOG_LEVEL=WARNING   # what a setting costs

The other commit is checked out in a temporary git worktree, removed on exit.
"""

import argparse
import asyncio
import json
import statistics
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import aiohttp

from harness import (
    MAIN_DIR,
    PROMPT,
    Server,
    ServerGroup,
    answered_84,
    cpu_seconds,
    free_port,
    post_turn,
    run_cli,
    uvicorn_argv,
)

WARMUP_TURNS = 300


@contextmanager
def worktree(revision: str) -> Iterator[Path]:
    """The repository at `revision`, checked out beside this one for as long as the block runs."""
    with tempfile.TemporaryDirectory(prefix="agent-ab-") as parent:
        path = Path(parent) / "old"
        subprocess.run(["git", "-C", str(MAIN_DIR), "worktree", "add", "--detach", "-q", str(path), revision],
                       check=True)
        try:
            yield path
        finally:
            subprocess.run(["git", "-C", str(MAIN_DIR), "worktree", "remove", "--force", str(path)], check=False)


async def drive(url: str, turns: int, concurrency: int, stream: bool) -> None:
    """`turns` checked turns at `concurrency`; the first failure stops the run."""
    body = json.dumps({"content": PROMPT}).encode()
    left = turns
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                result = await post_turn(session, url, body, stream=stream, check=answered_84)
                if not result.ok:
                    raise SystemExit(f"a turn failed at {url}: {result.error}")

        await asyncio.gather(*(worker() for _ in range(concurrency)))


def cpu_per_turn_ms(server: Server, args: argparse.Namespace) -> float:
    """Warm up, then the server's own CPU over `args.turns` turns, per turn."""
    url = f"{server.url}/api/v1/chat{'/stream' if args.stream else ''}"
    asyncio.run(drive(url, WARMUP_TURNS, args.concurrency, args.stream))
    before = cpu_seconds(server.pid)
    asyncio.run(drive(url, args.turns, args.concurrency, args.stream))
    return (cpu_seconds(server.pid) - before) / args.turns * 1000


def env_pairs(pairs: list[str]) -> dict[str, str]:
    """KEY=VALUE arguments as environment variables."""
    return dict(pair.split("=", 1) for pair in pairs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("revision", help="the commit to compare the working tree against (e.g. HEAD)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--turns", type=int, default=3000, help="measured turns per side and round")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--stream", action="store_true", help="POST /api/v1/chat/stream instead")
    parser.add_argument("--new-env", nargs="*", default=[], metavar="KEY=VALUE", help="settings of the new side")
    parser.add_argument("--old-env", nargs="*", default=[], metavar="KEY=VALUE", help="settings of the old side")
    args = parser.parse_args()
    with worktree(args.revision) as old_dir, tempfile.TemporaryDirectory(prefix="agent-ab-") as work, \
            ServerGroup(Path(work)) as group:
        vllm = group.start_fake_vllm()
        new = group.start_service(vllm, "new", env_pairs(args.new_env))
        port = free_port()
        old = group.start("old", uvicorn_argv("agent_app:app", port, "--app-dir", str(old_dir)), port, {
            "VLLM_BASE_URL": vllm.url, "DATABASE_URL": f"sqlite+aiosqlite:///{Path(work) / 'old.db'}",
            "PYTHONPATH": str(old_dir), **env_pairs(args.old_env)})
        print(f"new: the working tree; old: {args.revision}; {args.turns} turns a side and round at "
              f"C={args.concurrency}, {'streaming' if args.stream else 'non-streaming'}; server CPU ms/turn")
        ratios = []
        for round_number in range(args.rounds):
            sides = [("new", new), ("old", old)] if round_number % 2 == 0 else [("old", old), ("new", new)]
            cpu = {name: cpu_per_turn_ms(server, args) for name, server in sides}
            ratios.append(cpu["new"] / cpu["old"])
            print(f"  round {round_number + 1}: new {cpu['new']:.3f}  old {cpu['old']:.3f}  new/old {ratios[-1]:.3f}",
                  flush=True)
        print(f"median new/old {statistics.median(ratios):.3f} (rounds {min(ratios):.3f} to {max(ratios):.3f})")
    return 0


if __name__ == "__main__":
    run_cli(main)

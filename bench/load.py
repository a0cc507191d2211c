"""Issue 5 load benchmark: hold 500 concurrent streaming conversations against a slowly streaming fake vLLM.

Starts tests/fake_vllm.py (50 answer tokens, 20 ms apart) and the service (`uvicorn agent_app:app`, one
worker), then opens every conversation at once on POST /api/v1/chat/stream. Each asks plain questions (no
tool call, so each turn is one streamed answer of 50 tokens, about a second), passing its conversation_id
back. Prints completed/failed turns, time to first token, the most streams open at once, the service's peak
RSS, and the write rate and size of its runs' event log. Loopback only; bounded in turns and in time.

    .venv/bin/python bench/load.py                # 500 conversations x 2 turns, about 30 s
    .venv/bin/python bench/load.py --reference    # the same load on bench/reference_app.py, for scale
"""

import argparse
import asyncio
import json
import os
import sqlite3
import tempfile
import time
from collections import Counter
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from harness import ServerGroup, TurnResult, cpu_meter, peak_rss_mib, percentile, post_turn, rss_mib, run_cli

RUN_TIMEOUT_S = 300.0
REQUEST_TIMEOUT_S = 120.0


@dataclass
class LoadStats:
    """What the conversations saw, gathered as they run."""

    results: dict[int, list[TurnResult]] = field(default_factory=dict)  # by turn number
    open_streams: int = 0
    most_open: int = 0


def answered(answer: dict[str, Any]) -> bool:
    """The fake's default responder echoes the question: `You said: ...`, padded to the token count."""
    return "You said" in str(answer.get("content"))


async def conversation(session: aiohttp.ClientSession, url: str, number: int, turns: int,
                       stats: LoadStats) -> None:
    """`turns` streamed turns of one conversation, one after another; stops at the first failure."""
    conversation_id: str | None = None
    for turn in range(1, turns + 1):
        body: dict[str, Any] = {"content": f"Tell me a story, please (conversation {number}, part {turn})."}
        if conversation_id is not None:
            body["conversation_id"] = conversation_id
        stats.open_streams += 1
        stats.most_open = max(stats.most_open, stats.open_streams)
        try:
            result = await post_turn(session, url, json.dumps(body).encode(), stream=True, check=answered)
        finally:
            stats.open_streams -= 1
        stats.results.setdefault(turn, []).append(result)
        if not result.ok or result.answer is None:
            return
        conversation_id = result.answer.get("conversation_id")  # the reference keeps no history: None


async def hold(url: str, conversations: int, turns: int) -> tuple[LoadStats, float]:
    """Start every conversation at once and wait for all of them; the stats and the wall time."""
    stats = LoadStats()
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session, \
            asyncio.timeout(RUN_TIMEOUT_S):
        started = time.perf_counter()
        await asyncio.gather(*(conversation(session, url, number, turns, stats)
                               for number in range(1, conversations + 1)))
        return stats, time.perf_counter() - started


def ttft_line(label: str, results: list[TurnResult]) -> str:
    ttfts = [result.ttft_s * 1000 for result in results if result.ok and result.ttft_s is not None]
    return f"  {label:<21} p50 {percentile(ttfts, 0.5):8.1f} ms   p99 {percentile(ttfts, 0.99):8.1f} ms"


def event_log_line(database: Path, turns: int, elapsed: float) -> str:
    """How fast the runs' event log was written, and the database's size (its files, WAL included) per 1,000 turns;
    the log keeps each run's events for RUN_RETENTION_S after it ended."""
    with closing(sqlite3.connect(database)) as conn:
        events, payload = conn.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(data)), 0) FROM run_events").fetchone()
    size = sum(path.stat().st_size for path in database.parent.glob(f"{database.name}*"))
    per_1000 = 1000 / max(1, turns) / 2**20
    return (f"  event log             {events / elapsed:.0f} events/s written, {events / max(1, turns):.0f} a turn; "
            f"database {size * per_1000:.1f} MiB per 1,000 turns ({payload * per_1000:.1f} MiB of it event data)")


def report(args: argparse.Namespace, stats: LoadStats, elapsed: float, cpu: dict[str, float],
           rss_before: float, peak: float, database: Path | None) -> bool:
    """Print the figures; True when no turn failed and every planned turn ran."""
    planned = args.conversations * args.turns
    results = [result for by_turn in stats.results.values() for result in by_turn]
    ok = [result for result in results if result.ok]
    failed = len(results) - len(ok)
    latencies = [result.latency_s * 1000 for result in ok]
    if args.reference:
        target = "the REFERENCE loop"
    else:
        limit = "service default" if args.vllm_max_concurrency is None else args.vllm_max_concurrency
        target = f"the service, VLLM_MAX_CONCURRENCY: {limit}"
    print(f"\n== {args.conversations} concurrent streaming conversations x {args.turns} turns, "
          f"{args.answer_tokens} tokens at {args.token_delay * 1000:.0f} ms each; {target}")
    print(f"  turns completed       {len(ok)} of {planned}   (target: all)")
    print(f"  turns failed          {failed}   (target: 0)   not run after a failure: {planned - len(results)}")
    print(f"  most streams open     {stats.most_open}")
    print(ttft_line("time to first token", ok))
    if args.turns > 1:
        for turn, by_turn in sorted(stats.results.items()):
            print(ttft_line(f"  turn {turn}" + (" (new)" if turn == 1 else ""), by_turn))
    print(f"  turn latency          p50 {percentile(latencies, 0.5):8.1f} ms   "
          f"p99 {percentile(latencies, 0.99):8.1f} ms   (streaming alone: "
          f"{args.answer_tokens * args.token_delay * 1000:.0f} ms)")
    print(f"  wall time             {elapsed:.1f} s   ({len(ok) / elapsed:.0f} turns/s)")
    print(f"  server CPU            {cpu['server']:.1f} s ({cpu['server'] / elapsed * 100:.0f}% of one core), "
          f"{cpu['server'] * 1000 / max(1, len(ok)):.1f} ms per turn; "
          f"fake vLLM {cpu['fake']:.1f} s; this driver {cpu['driver']:.1f} s")
    print(f"  server RSS            {rss_before:.1f} MiB before, peak {peak:.1f} MiB")
    if database is not None:
        print(event_log_line(database, len(ok), elapsed))
    for error, count in Counter(result.error for result in results if not result.ok).most_common(5):
        print(f"  failure x{count}: {error}")
    return failed == 0 and len(results) == planned


def main() -> int:
    """Start the fake and one server, hold the load, print; 1 if any turn failed or did not run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=500, help="conversations held open at once")
    parser.add_argument("--turns", type=int, default=2, help="streamed turns per conversation")
    parser.add_argument("--answer-tokens", type=int, default=50)
    parser.add_argument("--token-delay", type=float, default=0.02, help="seconds between streamed tokens")
    parser.add_argument("--vllm-max-concurrency", type=int,
                        help="the service's VLLM_MAX_CONCURRENCY (default: the service's own default)")
    parser.add_argument("--reference", action="store_true",
                        help="load bench/reference_app.py instead of the service (each turn a new conversation)")
    args = parser.parse_args()
    if args.conversations < 1 or args.turns < 1 or args.answer_tokens < 1 or args.token_delay < 0:
        parser.error("counts must be at least 1 and the delay not negative")
    with tempfile.TemporaryDirectory(prefix="agent-load-") as log_dir, ServerGroup(Path(log_dir)) as group:
        vllm = group.start_fake_vllm("--token-delay", str(args.token_delay),
                                     "--answer-tokens", str(args.answer_tokens))
        if args.reference:
            server, url = group.start_reference(vllm), "/chat/stream"
        else:
            settings = {} if args.vllm_max_concurrency is None else {
                "VLLM_MAX_CONCURRENCY": str(args.vllm_max_concurrency)}
            server, url = group.start_service(vllm, settings=settings), "/api/v1/chat/stream"
        rss_before = rss_mib(server.pid)
        with cpu_meter({"server": server.pid, "fake": vllm.pid, "driver": os.getpid()}) as cpu:
            stats, elapsed = asyncio.run(hold(server.url + url, args.conversations, args.turns))
        database = None if args.reference else group.work_dir / f"{server.name}.db"
        passed = report(args, stats, elapsed, cpu, rss_before, peak_rss_mib(server.pid), database)
        if not passed:
            print(f"  {server.name} log, first error lines:", *server.error_lines(), sep="\n    ")
    return 0 if passed else 1


if __name__ == "__main__":
    run_cli(main)

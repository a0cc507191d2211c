"""Issue 6 benchmark: the service's cost per agent turn against a bare hand-written loop, and its memory.

Starts tests/fake_vllm.py, bench/reference_app.py and the service (`uvicorn agent_app:app`), each its own
process with one worker on loopback; drives the turn "What is 12*7?" -> calculator -> answer from this
process; checks every answer; prints medians over interleaved rounds, then service/reference figures
against the issue's targets. Last, a memory run on a fresh service: 5 turns in each of 1,000 conversations.

    .venv/bin/python bench/run.py            # full run, about 80 seconds on 2 cores
    .venv/bin/python bench/run.py --quick    # smoke run, about 15 seconds
"""

import argparse
import asyncio
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from harness import (
    CALCULATOR_TOOL,
    MODEL,
    PROMPT,
    Server,
    ServerGroup,
    TurnResult,
    answered_84,
    answered_84_with_a_block,
    cpu_meter,
    peak_rss_mib,
    percentile,
    post_turn,
    rss_mib,
    run_cli,
)

REQUEST_TIMEOUT_S = 60.0
PHASE_TIMEOUT_S = 300.0
CPU_RATIO_LIMIT = 2.0
TTFT_LIMIT_MS = 2.0
LATENCY_LIMIT_MS = 1.5
V1_CPU_RATIO_LIMIT = 1.10  # /v1/chat/completions streaming against /api/v1/chat/stream, same service
RSS_LIMIT_MIB = 250.0
RSS_FLAT_MIB = 10.0

Turn = Callable[[aiohttp.ClientSession], Awaitable[TurnResult]]

# --- Driving ---


@dataclass(frozen=True)
class Target:
    """A system under test: its server and the paths of its endpoints (the service also has /v1)."""

    name: str
    server: Server
    chat_path: str
    stream_path: str
    openai_path: str = ""

    def turn(self, *, stream: bool, conversation_id: str | None = None) -> Turn:
        """The measured turn against this system, with the body encoded once."""
        url = self.server.url + (self.stream_path if stream else self.chat_path)
        body = {"content": PROMPT} | ({"conversation_id": conversation_id} if conversation_id else {})
        encoded = json.dumps(body).encode()
        return lambda session: post_turn(session, url, encoded, stream=stream, check=answered_84)

    def openai_turn(self) -> Turn:
        """The same turn through /v1/chat/completions, streamed."""
        url = self.server.url + self.openai_path
        encoded = json.dumps({"model": "vllm-agent", "stream": True,
                              "messages": [{"role": "user", "content": PROMPT}]}).encode()
        return lambda session: post_turn(session, url, encoded, stream=True, check=answered_84_with_a_block,
                                         openai_stream=True)


def direct_turn(vllm: Server) -> Turn:
    """The turn's two LLM calls made by the driver itself: the latency floor of any agent."""
    url = f"{vllm.url}/v1/chat/completions"
    question = {"role": "user", "content": PROMPT}
    first = json.dumps({"model": MODEL, "messages": [question], "tools": [CALCULATOR_TOOL]}).encode()

    def says_84(body: dict[str, Any]) -> bool:
        return "84" in str(body["choices"][0]["message"]["content"])

    async def turn(session: aiohttp.ClientSession) -> TurnResult:
        started = time.perf_counter()
        reply = await post_turn(session, url, first, stream=False, check=lambda body: True)
        if not reply.ok or reply.answer is None:
            return reply
        message = reply.answer["choices"][0]["message"]
        if not message.get("tool_calls"):
            return TurnResult(False, time.perf_counter() - started, error="the fake made no tool call")
        result = {"role": "tool", "tool_call_id": message["tool_calls"][0]["id"], "content": "84"}
        second = {"model": MODEL, "messages": [question, message, result], "tools": [CALCULATOR_TOOL]}
        answer = await post_turn(session, url, json.dumps(second).encode(), stream=False, check=says_84)
        return TurnResult(answer.ok, time.perf_counter() - started, error=answer.error)

    return turn


async def drive(turn: Turn, requests: int, concurrency: int) -> tuple[list[TurnResult], float]:
    """Run `requests` turns from `concurrency` workers on one keep-alive session; results and wall time."""
    results: list[TurnResult] = []

    async def worker(session: aiohttp.ClientSession, pending: Iterator[int]) -> None:
        for _ in pending:
            results.append(await turn(session))

    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session, \
            asyncio.timeout(PHASE_TIMEOUT_S):
        pending = iter(range(requests))
        started = time.perf_counter()
        await asyncio.gather(*(worker(session, pending) for _ in range(concurrency)))
        return results, time.perf_counter() - started


def cell(value: float, width: int, digits: int) -> str:
    """A right-aligned number, or blanks for a figure that does not apply (NaN)."""
    return " " * width if math.isnan(value) else f"{value:{width}.{digits}f}"


@dataclass(frozen=True)
class Phase:
    """One measured batch: N turns of one system and endpoint at concurrency C; CPU in ms per turn."""

    system: str
    endpoint: str
    requests: int
    concurrency: int
    failed: int
    server_cpu_ms: float
    fake_cpu_ms: float
    driver_cpu_ms: float
    rps: float
    p50_ms: float
    p99_ms: float
    ttft_p50_ms: float

    HEADER = ("  system     endpoint     N   C  server CPU  fake CPU  driver CPU    req/s   p50 ms   p99 ms"
              "  TTFT p50  failed\n  (CPU in ms per turn, times in ms)")

    def line(self) -> str:
        return (f"  {self.system:<10} {self.endpoint:<7} {self.requests:>5} {self.concurrency:>3} "
                f"{cell(self.server_cpu_ms, 11, 3)} {cell(self.fake_cpu_ms, 9, 3)} {self.driver_cpu_ms:11.3f} "
                f"{self.rps:8.1f} {self.p50_ms:8.2f} {self.p99_ms:8.2f} {cell(self.ttft_p50_ms, 9, 2)} "
                f"{self.failed:>7}").rstrip()


def measure(name: str, endpoint: str, turn: Turn, requests: int, concurrency: int,
            pids: dict[str, int], failures: list[str]) -> Phase:
    """Drive one batch, reading every process's CPU time around it; print and return its figures."""
    with cpu_meter({**pids, "driver": os.getpid()}) as cpu:
        results, elapsed = asyncio.run(drive(turn, requests, concurrency))
    bad = [result for result in results if not result.ok]
    failures.extend(f"{name} {endpoint}: {result.error}" for result in bad[:3])
    latencies = [result.latency_s * 1000 for result in results]
    ttfts = [result.ttft_s * 1000 for result in results if result.ttft_s is not None]
    per_turn = {process: seconds * 1000 / requests for process, seconds in cpu.items()}
    phase = Phase(name, endpoint, requests, concurrency, len(bad), per_turn.get("server", math.nan),
                  per_turn["fake"], per_turn["driver"], requests / elapsed, percentile(latencies, 0.5),
                  percentile(latencies, 0.99), percentile(ttfts, 0.5))
    print(phase.line(), flush=True)
    return phase


def run_rounds(args: argparse.Namespace, systems: list[Target], vllm: Server, failures: list[str]) -> list[Phase]:
    """Warm up, then rounds: each batch for each system back to back, the order flipping every round."""
    batches = [("chat", False, args.requests, args.concurrency), ("stream", True, args.requests, args.concurrency),
               ("chat", False, args.c1_requests, 1), ("stream", True, args.c1_requests, 1)]
    print(f"warm-up: {args.warmup} turns per system and endpoint", flush=True)
    for target in systems:
        for stream in (False, True):
            asyncio.run(drive(target.turn(stream=stream), args.warmup, args.concurrency))
        if target.openai_path:
            asyncio.run(drive(target.openai_turn(), args.warmup, args.concurrency))
    phases: list[Phase] = []
    for number in range(1, args.rounds + 1):
        print(f"\nround {number}/{args.rounds}\n{Phase.HEADER}", flush=True)
        order = systems if number % 2 else systems[::-1]
        for endpoint, stream, requests, concurrency in batches:
            for target in order:
                pids = {"server": target.server.pid, "fake": vllm.pid}
                phases.append(measure(target.name, endpoint, target.turn(stream=stream), requests, concurrency,
                                      pids, failures))
        for target in order:
            if target.openai_path:
                phases.append(measure(target.name, "v1 strm", target.openai_turn(), args.requests, args.concurrency,
                                      {"server": target.server.pid, "fake": vllm.pid}, failures))
        phases.append(measure("vLLM only", "chat", direct_turn(vllm), args.c1_requests, 1,
                              {"fake": vllm.pid}, failures))
    return phases


# --- Reporting ---


def figures(phases: list[Phase], system: str, endpoint: str, concurrency: int, metric: str) -> list[float]:
    """One figure per round, in round order."""
    return [getattr(phase, metric) for phase in phases
            if (phase.system, phase.endpoint, phase.concurrency) == (system, endpoint, concurrency)]


def median(phases: list[Phase], system: str, endpoint: str, concurrency: int, metric: str) -> float:
    """The median over rounds; NaN where the figure was not measured."""
    values = figures(phases, system, endpoint, concurrency, metric)
    return statistics.median(values) if values else math.nan


def print_medians(args: argparse.Namespace, phases: list[Phase], rss: dict[str, float]) -> None:
    """Every figure per system and endpoint, as medians over the rounds."""
    c = args.concurrency
    print(f"\n== medians of {args.rounds} round(s): {args.requests} turns at C={c}, {args.c1_requests} at C=1")
    print(f"  {'':<18} {'at C=' + str(c):-^55} | {'at C=1':-^43}\n"
          f"  system     endpoint  server CPU ms/turn   req/s   p50 ms   p99 ms  TTFT p50 |"
          f"      p50 ms  TTFT p50  server CPU ms/turn")
    rows = [(system, endpoint) for system in ("service", "reference") for endpoint in ("chat", "stream")]
    for system, endpoint in [*rows, ("service", "v1 strm"), ("vLLM only", "chat")]:
        at_c, at_1 = ({metric: median(phases, system, endpoint, concurrency, metric)
                       for metric in ("server_cpu_ms", "rps", "p50_ms", "p99_ms", "ttft_p50_ms")}
                      for concurrency in (c, 1))
        line = (f"  {system:<10} {endpoint:<7} {cell(at_c['server_cpu_ms'], 18, 3)} {cell(at_c['rps'], 7, 0)} "
                f"{cell(at_c['p50_ms'], 8, 2)} {cell(at_c['p99_ms'], 8, 2)} {cell(at_c['ttft_p50_ms'], 9, 2)} | "
                f"{cell(at_1['p50_ms'], 11, 2)} {cell(at_1['ttft_p50_ms'], 9, 2)} {cell(at_1['server_cpu_ms'], 19, 3)}")
        print(line.rstrip())
    print("  (vLLM only: the driver makes the turn's two LLM calls itself, the latency floor of any agent)")
    print("  peak RSS: " + ", ".join(f"{name} {value:.1f} MiB" for name, value in rss.items()))
    floor = median(phases, "vLLM only", "chat", 1, "p50_ms")
    added = {system: median(phases, system, "chat", 1, "p50_ms") - floor for system in ("service", "reference")}
    print(f"  latency added over vLLM alone at C=1 (p50): service {added['service']:.2f} ms, "
          f"reference {added['reference']:.2f} ms")


def target_rows(args: argparse.Namespace, phases: list[Phase]) -> list[tuple[str, ...]]:
    """Service against reference, each figure combined per round (the pair ran back to back), then the median."""
    c = args.concurrency
    rows: list[tuple[str, ...]] = []
    for label, endpoint, concurrency, metric, as_ratio, limit in (
        (f"chat CPU/turn, C={c}", "chat", c, "server_cpu_ms", True, CPU_RATIO_LIMIT),
        (f"stream CPU/turn, C={c}", "stream", c, "server_cpu_ms", True, CPU_RATIO_LIMIT),
        ("stream TTFT p50, C=1", "stream", 1, "ttft_p50_ms", False, TTFT_LIMIT_MS),
        ("chat latency p50, C=1", "chat", 1, "p50_ms", False, LATENCY_LIMIT_MS),
    ):
        service = figures(phases, "service", endpoint, concurrency, metric)
        reference = figures(phases, "reference", endpoint, concurrency, metric)
        per_round = [s / r if as_ratio else s - r for s, r in zip(service, reference, strict=True)]
        result = statistics.median(per_round)
        shown = f"{result:.2f}×" if as_ratio else f"{result:+.2f} ms"
        wanted = f"≤ {limit}×" if as_ratio else f"≤ +{limit} ms"
        rows.append((label, f"{statistics.median(service):.3f}", f"{statistics.median(reference):.3f}", shown,
                     wanted, "met" if result <= limit else "NOT MET",
                     "per round: " + ", ".join(f"{value:.2f}" for value in per_round)))
    service_v1 = figures(phases, "service", "v1 strm", c, "server_cpu_ms")
    service_stream = figures(phases, "service", "stream", c, "server_cpu_ms")
    per_round = [v1 / stream for v1, stream in zip(service_v1, service_stream, strict=True)]
    result = statistics.median(per_round)
    rows.append((f"v1 stream CPU/turn, C={c}", f"{statistics.median(service_v1):.3f}", "", f"{result:.2f}×",
                 f"≤ {V1_CPU_RATIO_LIMIT}×", "met" if result <= V1_CPU_RATIO_LIMIT else "NOT MET",
                 "service /v1/chat/completions against its own /api/v1/chat/stream, per round: "
                 + ", ".join(f"{value:.2f}" for value in per_round)))
    return rows


def memory_rows(samples: list[tuple[int, float]], peak: float) -> list[tuple[str, ...]]:
    """The two memory targets: peak RSS, and growth from the first sample to the last."""
    (first_turns, first), (last_turns, last) = samples[0], samples[-1]
    growth = last - first
    return [
        (f"peak RSS after {last_turns} turns", f"{peak:.1f}", "", f"{peak:.1f} MiB", f"≤ {RSS_LIMIT_MIB:.0f} MiB",
         "met" if peak <= RSS_LIMIT_MIB else "NOT MET", "fresh service, UI mounted"),
        (f"RSS growth {first_turns}→{last_turns} turns", f"{growth:+.1f}", "", f"{growth:+.1f} MiB",
         f"≤ +{RSS_FLAT_MIB:.0f} MiB", "met" if growth <= RSS_FLAT_MIB else "NOT MET",
         f"RSS {first:.1f} → {last:.1f} MiB"),
    ]


def print_targets(rows: list[tuple[str, ...]]) -> None:
    """The closing table: each figure next to its target."""
    print("\n== service vs reference: the targets of issue 6 (ms, except where marked)")
    print(f"  {'figure':<30} {'service':>9} {'reference':>9}  {'result':>10}  {'target':>10}  {'':<7}  detail")
    for label, service, reference, result, wanted, verdict, detail in rows:
        print(f"  {label:<30} {service:>9} {reference:>9}  {result:>10}  {wanted:>10}  {verdict:<7}  {detail}")


# --- Memory run ---


async def memory_run(service: Target, conversations: int, turns: int, concurrency: int,
                     failures: list[str]) -> list[tuple[int, float]]:
    """`turns` passes over `conversations` conversations, history passed back; the RSS after each pass."""
    ids: list[str | None] = [None] * conversations
    samples: list[tuple[int, float]] = []
    failed = 0

    async def worker(session: aiohttp.ClientSession, pending: Iterator[int]) -> None:
        nonlocal failed
        for index in pending:
            result = await service.turn(stream=False, conversation_id=ids[index])(session)
            if result.ok and result.answer is not None:
                ids[index] = result.answer["conversation_id"]
                continue
            failed += 1
            if failed <= 3:
                failures.append(f"memory run: {result.error}")

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)) \
            as session:
        for number in range(1, turns + 1):
            pending = iter(range(conversations))
            async with asyncio.timeout(PHASE_TIMEOUT_S):
                await asyncio.gather(*(worker(session, pending) for _ in range(concurrency)))
            samples.append((number * conversations, rss_mib(service.server.pid)))
            print(f"  after {number * conversations:>5} turns: RSS {samples[-1][1]:6.1f} MiB, "
                  f"peak {peak_rss_mib(service.server.pid):6.1f} MiB, failed so far {failed}", flush=True)
    return samples


# --- Main ---


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="turns per batch at --concurrency")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--c1-requests", type=int, default=300, help="turns per batch at concurrency 1")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; figures are their medians")
    parser.add_argument("--warmup", type=int, default=200, help="unmeasured turns per system and endpoint")
    parser.add_argument("--conversations", type=int, default=1000, help="memory run: conversations")
    parser.add_argument("--turns", type=int, default=5, help="memory run: turns per conversation")
    parser.add_argument("--skip-memory", action="store_true", help="no memory run")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1 round of 300 turns, 100 at C=1, memory run of 200 conversations")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.c1_requests, args.rounds, args.warmup, args.conversations = 300, 100, 1, 50, 200
    if min(args.requests, args.concurrency, args.c1_requests, args.rounds, args.conversations) < 1 or args.turns < 2:
        parser.error("counts must be at least 1, and --turns at least 2")
    return args


def main() -> int:
    """Start the three servers, run the rounds and the memory run, print; 1 if any turn failed."""
    args = parse_args()
    started = time.monotonic()
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="agent-bench-") as work_dir, ServerGroup(Path(work_dir)) as group:
        vllm = group.start_fake_vllm()
        service = Target("service", group.start_service(vllm), "/api/v1/chat", "/api/v1/chat/stream",
                         "/v1/chat/completions")
        reference = Target("reference", group.start_reference(vllm), "/chat", "/chat/stream")
        print(f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M')} · "
              f"pids: fake vLLM {vllm.pid}, service {service.server.pid}, reference {reference.server.pid}",
              flush=True)
        phases = run_rounds(args, [service, reference], vllm, failures)
        print_medians(args, phases, {target.name: peak_rss_mib(target.server.pid) for target in (service, reference)})
        rows = target_rows(args, phases)
        errors = [line for target in (service, reference) for line in target.server.error_lines()]
        if not args.skip_memory:
            group.stop(service.server)
            group.stop(reference.server)
            fresh = Target("service", group.start_service(vllm, "service-memory"), "/api/v1/chat", "")
            print(f"\n== memory run: {args.turns} turns in each of {args.conversations} conversations "
                  f"(fresh service, C={args.concurrency}, conversation_id passed back)", flush=True)
            samples = asyncio.run(memory_run(fresh, args.conversations, args.turns, args.concurrency, failures))
            rows += memory_rows(samples, peak_rss_mib(fresh.server.pid))
            errors += fresh.server.error_lines()
    print_targets(rows)
    failed = sum(phase.failed for phase in phases)
    if failures:
        print(f"\nFAILED TURNS: {failed} in the measured batches; first errors:", *failures[:10], sep="\n  ")
        print("server logs, first error lines:", *errors, sep="\n  ")
    print(f"\ntotal time {time.monotonic() - started:.0f} s", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    run_cli(main)

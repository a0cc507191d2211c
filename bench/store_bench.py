"""Store benchmark: load a 200-message conversation and store a turn, with 10,000 conversations present.

    python bench/store_bench.py                       # SQLite in a temporary file
    python bench/store_bench.py --postgres URL        # and PostgreSQL (postgresql+asyncpg://...)

Prints the median and p95 of each operation over --runs repetitions, for each database.
"""

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

from sqlalchemy import insert, text

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent_app import CONVERSATIONS, MESSAGES, ConversationStore

CALL = {"id": "chatcmpl-tool-1", "type": "function",
        "function": {"name": "calculator", "arguments": '{"expression": "12*7"}'}}
TURN = [
    {"role": "user", "content": "What is 12*7? " + "Some context. " * 10},
    {"role": "assistant", "content": "", "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "chatcmpl-tool-1", "content": "84"},
    {"role": "assistant", "content": "It is 84. " + "More words. " * 10},
]
USAGES = [None, {"prompt_tokens": 300, "completion_tokens": 20, "total_tokens": 320}, None,
          {"prompt_tokens": 340, "completion_tokens": 30, "total_tokens": 370}]


async def fill(store: ConversationStore, conversations: int) -> str:
    """Bulk-insert `conversations` two-message conversations and one of 200 messages; return its id."""
    now = time.time()
    async with store._engine.begin() as conn:
        for start in range(0, conversations, 1000):
            ids = [uuid.uuid4().hex for _ in range(start, min(start + 1000, conversations))]
            await conn.execute(insert(CONVERSATIONS), [
                {"id": cid, "title": "filler", "created_at": now, "updated_at": now + i, "message_count": 2}
                for i, cid in enumerate(ids)])
            await conn.execute(insert(MESSAGES), [
                {"conversation_id": cid, "position": p, "role": role, "content": "filler text " * 5,
                 "created_at": now} for cid in ids for p, role in enumerate(("user", "assistant"))])
    big = await store.open_turn(None)
    await store.commit_turn(big, TURN * 50, USAGES * 50)
    return big.conversation_id


def summary(samples: list[float]) -> str:
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))]
    return f"median {statistics.median(ordered) * 1000:7.2f} ms   p95 {p95 * 1000:7.2f} ms"


async def measure(name: str, url: str, conversations: int, runs: int) -> None:
    async with ConversationStore.open(url, lease_s=60) as store:
        big = await fill(store, conversations)
        first = await store.open_turn(None)
        await store.commit_turn(first, TURN, USAGES)
        loads, new_turns, next_turns = [], [], []
        for _ in range(runs):
            started = time.perf_counter()
            messages = await store.load_messages(big)
            loads.append(time.perf_counter() - started)
            assert len(messages) == 200
            started = time.perf_counter()
            await store.commit_turn(await store.open_turn(None), TURN, USAGES)
            new_turns.append(time.perf_counter() - started)
            started = time.perf_counter()
            await store.commit_turn(await store.open_turn(first.conversation_id), TURN, USAGES)
            next_turns.append(time.perf_counter() - started)
    print(f"{name:<11} load a 200-message conversation:           {summary(loads)}")
    print(f"{name:<11} store the first turn of a conversation:    {summary(new_turns)}")
    print(f"{name:<11} lease + load + store a turn of an existing: {summary(next_turns)}")


async def reset_postgres(url: str) -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(url)
    async with engine.begin() as conn:
        await conn.execute(text("DROP TABLE IF EXISTS messages, conversations"))
    await engine.dispose()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--postgres", help="postgresql+asyncpg:// URL of a scratch database (tables are dropped)")
    parser.add_argument("--conversations", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()
    print(f"{args.conversations:,} conversations in the database; {args.runs} runs each")
    with tempfile.TemporaryDirectory() as folder:
        await measure("SQLite", f"sqlite+aiosqlite:///{folder}/bench.db", args.conversations, args.runs)
    if args.postgres:
        await reset_postgres(args.postgres)
        await measure("PostgreSQL", args.postgres, args.conversations, args.runs)
        await reset_postgres(args.postgres)


if __name__ == "__main__":
    asyncio.run(main())

"""ConversationStore against SQLite and a real PostgreSQL: turns, leases, pagination, deletion."""

import asyncio
import os
import re
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import create_async_engine

from agent_app import (
    ConversationBusy,
    ConversationNotFound,
    ConversationStore,
    InvalidCursor,
    OpenTurn,
    Usage,
)

StoreFactory = Callable[..., AbstractAsyncContextManager[ConversationStore]]

CALL = {"id": "chatcmpl-tool-1", "type": "function",
        "function": {"name": "calculator", "arguments": '{"expression": "12*7"}'}}
TURN = [
    {"role": "user", "content": "What is 12*7?"},
    {"role": "assistant", "content": "", "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "chatcmpl-tool-1", "content": "84"},
    {"role": "assistant", "content": "It is 84."},
]
USAGES = [None, Usage(prompt_tokens=10, completion_tokens=5, total_tokens=15), None,
          Usage(prompt_tokens=20, completion_tokens=4, total_tokens=24)]


async def postgres_url() -> str:
    """TEST_POSTGRES_URL (set by .ci/run), emptied; without it CI fails and a local run skips, saying why."""
    url = os.environ.get("TEST_POSTGRES_URL")
    if not url:
        if os.environ.get("CI"):
            pytest.fail("TEST_POSTGRES_URL is not set: .ci/run must start PostgreSQL for these tests")
        pytest.skip("no PostgreSQL server: set TEST_POSTGRES_URL (bash .ci/run starts one on loopback)")
    engine = create_async_engine(url)
    async with engine.begin() as conn:
        await conn.execute(text("DROP TABLE IF EXISTS run_events, runs, messages, conversations"))
    await engine.dispose()
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'store.db'}"
    return await postgres_url()


@pytest.fixture
def open_store(database_url: str) -> StoreFactory:
    """Open a store on the test database; two opens are two service instances sharing it."""

    def opener(lease_s: float = 60.0) -> AbstractAsyncContextManager[ConversationStore]:
        return ConversationStore.open(database_url, lease_s=lease_s)

    return opener


@pytest.fixture
async def store(open_store: StoreFactory) -> AsyncIterator[ConversationStore]:
    async with open_store() as opened:
        yield opened


async def new_conversation(store: ConversationStore, messages: list[dict[str, Any]] = TURN) -> str:
    turn = await store.open_turn(None)
    await store.commit_turn(turn, messages, [None] * len(messages))
    await store.close_turn(turn)
    return turn.conversation_id


async def test_a_committed_turn_reads_back_in_vllm_shape(store: ConversationStore) -> None:
    turn = await store.open_turn(None)
    assert (turn.history, turn.is_new) == ([], True)
    await store.commit_turn(turn, TURN, USAGES)
    assert await store.load_messages(turn.conversation_id) == TURN


async def test_the_next_turn_appends_after_the_history(store: ConversationStore) -> None:
    conversation_id = await new_conversation(store)
    turn = await store.open_turn(conversation_id)
    assert turn.history == TURN
    more = [{"role": "user", "content": "thanks"}, {"role": "assistant", "content": "You're welcome."}]
    await store.commit_turn(turn, more, [None, None])
    detail = await store.get_conversation(conversation_id)
    assert [message.position for message in detail.messages] == list(range(6))
    assert (detail.message_count, detail.title) == (6, "What is 12*7?")
    assert await store.load_messages(conversation_id) == TURN + more


async def test_detail_carries_usage_and_tool_call_ids(store: ConversationStore) -> None:
    turn = await store.open_turn(None)
    await store.commit_turn(turn, TURN, USAGES)
    detail = await store.get_conversation(turn.conversation_id)
    assert [message.usage for message in detail.messages] == [usage and usage.model_dump() for usage in USAGES]
    assert detail.messages[2].tool_call_id == "chatcmpl-tool-1"
    assert detail.messages[1].tool_calls == [CALL]


async def test_conversation_ids_are_random_hex_that_grows_with_time(store: ConversationStore) -> None:
    """Unguessable (80 random bits after the time) and ordered by creation, for the index's sake."""
    first = [(await store.open_turn(None)).conversation_id for _ in range(20)]
    await asyncio.sleep(0.002)
    later = (await store.open_turn(None)).conversation_id
    assert len(set(first)) == 20
    assert all(re.fullmatch(r"[0-9a-f]{32}", conversation_id) for conversation_id in [*first, later])
    assert len({conversation_id[12:] for conversation_id in first}) == 20
    assert later > max(first)


async def test_unknown_ids_are_not_found_everywhere(store: ConversationStore) -> None:
    for action in (store.open_turn, store.load_messages, store.get_conversation, store.delete_conversation):
        with pytest.raises(ConversationNotFound) as caught:
            await action("missing")
        assert str(caught.value) == "conversation 'missing' not found"


async def test_a_second_instance_gets_409_while_a_turn_runs(open_store: StoreFactory) -> None:
    async with open_store() as first, open_store() as second:
        conversation_id = await new_conversation(first)
        running = await first.open_turn(conversation_id)
        with pytest.raises(ConversationBusy) as caught:
            await second.open_turn(conversation_id)
        assert str(caught.value) == (f"conversation {conversation_id!r} is busy with another turn; "
                                     "retry when that turn has finished")
        await first.close_turn(running)
        reopened = await second.open_turn(conversation_id)
        assert reopened.history == TURN


async def test_a_turn_that_is_not_committed_changes_nothing(store: ConversationStore) -> None:
    conversation_id = await new_conversation(store)
    before = await store.get_conversation(conversation_id)
    turn = await store.open_turn(conversation_id)
    await store.close_turn(turn)
    assert await store.get_conversation(conversation_id) == before
    new_turn = await store.open_turn(None)
    await store.close_turn(new_turn)
    with pytest.raises(ConversationNotFound):
        await store.get_conversation(new_turn.conversation_id)


async def test_commit_releases_the_lease(store: ConversationStore) -> None:
    conversation_id = await new_conversation(store)
    turn = await store.open_turn(conversation_id)
    await store.commit_turn(turn, [{"role": "user", "content": "x"}], [None])
    again: OpenTurn = await store.open_turn(conversation_id)
    assert len(again.history) == 5


async def test_a_commit_whose_caller_went_away_still_lands_and_frees_the_conversation(
    store: ConversationStore,
) -> None:
    """The agent releases a lease in its `finally`: that release must not overtake the turn's own write."""
    conversation_id = await new_conversation(store)
    turn = await store.open_turn(conversation_id)
    committing = asyncio.create_task(store.commit_turn(turn, [{"role": "user", "content": "late"}], [None]))
    await asyncio.sleep(0)  # the write is queued; its writer has not run yet
    committing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await committing
    await store.close_turn(turn)
    assert (await store.load_messages(conversation_id))[-1] == {"role": "user", "content": "late"}
    await store.close_turn(await store.open_turn(conversation_id))


def count_commits(store: ConversationStore) -> list[int]:
    """A list that grows by one for every transaction the store commits."""
    commits: list[int] = []
    event.listen(store.write_engine, "commit", lambda _conn: commits.append(1))
    return commits


async def test_turns_that_finish_together_share_one_commit(store: ConversationStore) -> None:
    commits = count_commits(store)
    turns = [await store.open_turn(None) for _ in range(8)]
    await asyncio.gather(*(store.commit_turn(turn, TURN, USAGES) for turn in turns))
    for turn in turns:
        assert await store.load_messages(turn.conversation_id) == TURN
    assert len(commits) < len(turns)


async def test_an_expired_lease_is_taken_over_and_the_late_turn_alone_writes_nothing(
    open_store: StoreFactory,
) -> None:
    async with open_store(lease_s=0.0) as store:
        conversation_id = await new_conversation(store)
        slow = await store.open_turn(conversation_id)
        fast = await store.open_turn(conversation_id)
        await store.commit_turn(fast, [{"role": "user", "content": "fast"}], [None])
        fresh = await store.open_turn(None)
        outcomes = await asyncio.gather(store.commit_turn(slow, [{"role": "user", "content": "slow"}], [None]),
                                        store.commit_turn(fresh, TURN, USAGES), return_exceptions=True)
        assert isinstance(outcomes[0], ConversationBusy) and outcomes[1] is None
        assert [m["content"] for m in await store.load_messages(conversation_id)][-1] == "fast"
        assert await store.load_messages(fresh.conversation_id) == TURN


async def test_a_failing_turn_in_a_batch_does_not_take_the_others_down(store: ConversationStore) -> None:
    commits = count_commits(store)
    good = [await store.open_turn(None) for _ in range(3)]
    clash = [OpenTurn("same-id", [], None), OpenTurn("same-id", [], None)]
    outcomes = await asyncio.gather(*(store.commit_turn(turn, TURN, USAGES) for turn in [*good, *clash]),
                                    return_exceptions=True)
    assert outcomes[:4] == [None] * 4
    assert isinstance(outcomes[4], IntegrityError)
    for turn in [*good, clash[0]]:
        assert await store.load_messages(turn.conversation_id) == TURN
    assert len(commits) == 4  # the batch of five rolled back; then each turn alone: four commits, one failure


async def test_sqlite_writes_run_on_the_writer_thread_off_the_event_loop(tmp_path: Path) -> None:
    async with ConversationStore.open(f"sqlite+aiosqlite:///{tmp_path / 'store.db'}", lease_s=60.0) as store:
        threads: set[str] = set()
        event.listen(store.write_engine, "before_cursor_execute",
                     lambda *_statement: threads.add(threading.current_thread().name))
        conversation_id = await new_conversation(store)
        await store.close_turn(await store.open_turn(conversation_id))
        await store.delete_conversation(conversation_id)
    assert threads == {"sqlite-writer_0"}  # ThreadPoolExecutor's name for its one thread


async def test_a_closed_sqlite_store_refuses_writes_instead_of_hanging(tmp_path: Path) -> None:
    async with ConversationStore.open(f"sqlite+aiosqlite:///{tmp_path / 'store.db'}", lease_s=60.0) as store:
        conversation_id = await new_conversation(store)
    with pytest.raises(RuntimeError, match="after shutdown"):
        await asyncio.wait_for(store.delete_conversation(conversation_id), timeout=5)


async def test_a_request_gone_while_its_lease_is_taken_leaves_the_conversation_free(tmp_path: Path) -> None:
    """The request is cancelled at each of open_turn's steps while the writer is held, so the lease is still
    queued (or not yet) when it goes away; once the writer runs, the conversation is free every time."""
    async with ConversationStore.open(f"sqlite+aiosqlite:///{tmp_path / 'store.db'}", lease_s=60.0) as store:
        conversation_id = await new_conversation(store)

        async def open_when_free() -> OpenTurn:
            while True:
                try:
                    return await store.open_turn(conversation_id)
                except ConversationBusy:
                    await asyncio.sleep(0.01)

        for steps in range(6):
            gate = threading.Event()
            writer_held = asyncio.ensure_future(store._write_op(lambda _conn, gate=gate: gate.wait(10)))
            opening = asyncio.ensure_future(store.open_turn(conversation_id))
            for _ in range(steps):
                await asyncio.sleep(0)  # one more step of the event loop before the request goes away
            opening.cancel()
            gate.set()
            await writer_held
            turn = await asyncio.wait_for(open_when_free(), timeout=2)
            assert opening.cancelled() and turn.lease is not None
            await store.close_turn(turn)


async def test_conversations_are_listed_newest_first_page_by_page(store: ConversationStore) -> None:
    ids = [await new_conversation(store, [{"role": "user", "content": f"question {n}"}]) for n in range(5)]
    first = await store.list_conversations(2, None)
    second = await store.list_conversations(2, first.next_cursor)
    third = await store.list_conversations(2, second.next_cursor)
    listed = [c.id for page in (first, second, third) for c in page.conversations]
    assert listed == ids[::-1]
    assert third.next_cursor is None
    assert [c.title for c in first.conversations] == ["question 4", "question 3"]


async def test_a_foreign_cursor_is_rejected(store: ConversationStore) -> None:
    with pytest.raises(InvalidCursor):
        await store.list_conversations(2, "not-a-cursor")


async def test_delete_removes_the_conversation_and_its_messages(store: ConversationStore) -> None:
    conversation_id = await new_conversation(store)
    await store.delete_conversation(conversation_id)
    with pytest.raises(ConversationNotFound):
        await store.load_messages(conversation_id)
    assert (await store.list_conversations(10, None)).conversations == []


async def test_long_titles_are_shortened(store: ConversationStore) -> None:
    conversation_id = await new_conversation(store, [{"role": "user", "content": "word " * 40}])
    title = (await store.get_conversation(conversation_id)).title
    assert len(title) == 80 and title.endswith("…")


async def test_conversations_survive_a_restart(open_store: StoreFactory) -> None:
    async with open_store() as store:
        conversation_id = await new_conversation(store)
    async with open_store() as reopened:
        assert await reopened.load_messages(conversation_id) == TURN


async def test_nul_from_a_model_or_tool_is_stored_as_a_replacement_character(store: ConversationStore) -> None:
    call = {"id": "call\x001", "type": "function", "function": {"name": "echo", "arguments": '{"text": "a\\u0000b"}'}}
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call\x001", "content": "out\x00put"},
                {"role": "assistant", "content": "done\x00"}]
    turn = await store.open_turn(None)
    await store.commit_turn(turn, messages, [None] * 4)
    stored = await store.load_messages(turn.conversation_id)
    assert [m["content"] for m in stored] == ["hi", "", "out\ufffdput", "done\ufffd"]
    assert stored[2]["tool_call_id"] == "call\ufffd1"
    assert stored[1]["tool_calls"] == [call]


async def test_a_database_from_before_reasoning_gets_the_column_and_keeps_its_messages(
        database_url: str, open_store: StoreFactory) -> None:
    engine = create_async_engine(database_url)
    async with engine.begin() as conn:
        await conn.execute(text("CREATE TABLE conversations (id VARCHAR(64) PRIMARY KEY, title VARCHAR(200) NOT NULL, "
                                "created_at FLOAT NOT NULL, updated_at FLOAT NOT NULL, message_count INTEGER NOT NULL, "
                                "lease_token VARCHAR(32), lease_expires_at FLOAT)"))
        await conn.execute(text("CREATE TABLE messages (conversation_id VARCHAR(64) REFERENCES conversations(id) "
                                "ON DELETE CASCADE, position INTEGER, role VARCHAR(16) NOT NULL, content TEXT, "
                                "tool_calls JSON, tool_call_id VARCHAR(128), usage JSON, created_at FLOAT NOT NULL, "
                                "PRIMARY KEY (conversation_id, position))"))
        await conn.execute(text("INSERT INTO conversations VALUES ('old', 'Hi', 1, 1, 1, NULL, NULL)"))
        await conn.execute(text("INSERT INTO messages VALUES ('old', 0, 'user', 'Hi', NULL, NULL, NULL, 1)"))
    await engine.dispose()
    thought = [{"role": "user", "content": "Hm?"}, {"role": "assistant", "content": "Yes.", "reasoning": "Easy."}]
    async with open_store() as store:
        conversation_id = await new_conversation(store, thought)
        old = await store.load_messages("old")
        new = await store.get_conversation(conversation_id)
        turn = await store.open_turn(conversation_id)
        await store.close_turn(turn)
    assert old == [{"role": "user", "content": "Hi"}]
    assert [message.reasoning for message in new.messages] == [None, "Easy."]
    assert turn.history == [{"role": "user", "content": "Hm?"}, {"role": "assistant", "content": "Yes."}]

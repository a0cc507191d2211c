"""Memory through the real app: restarts, atomic turns, concurrency, the conversations API, trimming."""

import asyncio
from typing import Any

import httpx
import pytest
from fake_vllm import FakeVLLM, Reply

import tools
from agent_app import split_turns


async def chat(http: httpx.AsyncClient, url: str, content: str, conversation_id: str | None = None) -> httpx.Response:
    return await http.post(f"{url}/api/v1/chat", json={"content": content, "conversation_id": conversation_id})


async def stored(http: httpx.AsyncClient, url: str, conversation_id: str) -> list[dict[str, Any]]:
    response = await http.get(f"{url}/api/v1/conversations/{conversation_id}")
    assert response.status_code == 200
    return response.json()["messages"]


async def test_a_new_instance_continues_a_conversation_with_its_full_history(
    fake_vllm: FakeVLLM, live_server: Any, http: httpx.AsyncClient
) -> None:
    async with live_server(vllm_base_url=fake_vllm.url) as first:
        conversation_id = (await chat(http, first.url, "what is 12*7?")).json()["conversation_id"]
    async with live_server(vllm_base_url=fake_vllm.url) as second:
        answer = await chat(http, second.url, "and now?", conversation_id)
    assert answer.json()["content"] == "You said: and now?"
    sent = fake_vllm.requests[-1].body["messages"]
    assert [m["role"] for m in sent] == ["system", "user", "assistant", "tool", "assistant", "user"]
    assert sent[2]["tool_calls"][0]["function"] == {"name": "calculator", "arguments": '{"expression": "12*7"}'}
    assert sent[3] == {"role": "tool", "tool_call_id": sent[2]["tool_calls"][0]["id"], "content": "84"}


async def test_conversations_api_lists_shows_and_deletes(fake_vllm: FakeVLLM, live_server: Any,
                                                         http: httpx.AsyncClient) -> None:
    async with live_server(vllm_base_url=fake_vllm.url) as server:
        ids = [(await chat(http, server.url, f"hello {n}")).json()["conversation_id"] for n in range(3)]
        page = (await http.get(f"{server.url}/api/v1/conversations", params={"limit": 2})).json()
        rest = (await http.get(f"{server.url}/api/v1/conversations",
                               params={"limit": 2, "cursor": page["next_cursor"]})).json()
        messages = await stored(http, server.url, ids[0])
        deleted = await http.delete(f"{server.url}/api/v1/conversations/{ids[0]}")
        again = await http.delete(f"{server.url}/api/v1/conversations/{ids[0]}")
        missing = await http.get(f"{server.url}/api/v1/conversations/{ids[0]}")
        bad_cursor = await http.get(f"{server.url}/api/v1/conversations", params={"cursor": "zz"})
    assert [c["id"] for c in page["conversations"] + rest["conversations"]] == ids[::-1]
    assert rest["next_cursor"] is None
    assert [(m["position"], m["role"], m["content"]) for m in messages] == [
        (0, "user", "hello 0"), (1, "assistant", "You said: hello 0")]
    assert messages[1]["usage"]["total_tokens"] > 0
    assert deleted.status_code == 204 and deleted.content == b""
    assert (again.status_code, again.json()) == (404, {"detail": f"conversation {ids[0]!r} not found"})
    assert missing.status_code == 404
    assert (bad_cursor.status_code, bad_cursor.json()) == (422, {"detail": "cursor is not one this service returned"})


TOO_LONG = Reply(status=400, error_message="This model's maximum context length is 32768 tokens. However, your "
                 "request has 40000 input tokens. Please reduce the length of the input messages.")
FAILURES = {  # the replies a failing turn consumes, the settings, the status
    "502": ([Reply(status=500, error_message="engine died")] * 2, {"vllm_max_retries": 1}, 502),
    "504": ([Reply(text="late", delay_s=2.0)], {"vllm_timeout_s": 0.3}, 504),
    "413": ([TOO_LONG, TOO_LONG], {}, 413),
}


@pytest.mark.parametrize("kind", sorted(FAILURES))
async def test_a_failed_turn_leaves_the_conversation_as_it_was(
    kind: str, fake_vllm: FakeVLLM, live_server: Any, http: httpx.AsyncClient
) -> None:
    replies, settings, status = FAILURES[kind]
    async with live_server(vllm_base_url=fake_vllm.url, **settings) as server:
        conversation_id = (await chat(http, server.url, "first")).json()["conversation_id"]
        before = await stored(http, server.url, conversation_id)
        fake_vllm.script(*replies)
        failed = await chat(http, server.url, "second", conversation_id)
        assert failed.status_code == status
        assert await stored(http, server.url, conversation_id) == before
        assert fake_vllm.remaining == 0
        assert (await chat(http, server.url, "third", conversation_id)).status_code == 200


async def test_an_unexpected_error_is_500_and_stores_nothing(
    fake_vllm: FakeVLLM, live_server: Any, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken_run(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("disk on fire at /secret/path")

    async with live_server(vllm_base_url=fake_vllm.url) as server:
        conversation_id = (await chat(http, server.url, "first")).json()["conversation_id"]
        before = await stored(http, server.url, conversation_id)
        monkeypatch.setattr(tools.REGISTRY, "run", broken_run)
        failed = await chat(http, server.url, "what is 1+1?", conversation_id)
        assert (failed.status_code, failed.json()) == (
            500, {"detail": "the tool 'calculator' could not be run; the service log has the details"})
        assert await stored(http, server.url, conversation_id) == before


async def wait_until_free(http: httpx.AsyncClient, url: str, conversation_id: str) -> httpx.Response:
    """Poll (bounded) until the conversation accepts a turn again."""
    for _ in range(200):
        response = await chat(http, url, "after", conversation_id)
        if response.status_code != 409:
            return response
        await asyncio.sleep(0.02)
    raise AssertionError("the conversation stayed busy")


async def test_parallel_turns_on_one_conversation_get_409_not_interleaved(
    fake_vllm: FakeVLLM, live_server: Any, http: httpx.AsyncClient
) -> None:
    async with live_server(vllm_base_url=fake_vllm.url) as server:
        conversation_id = (await chat(http, server.url, "first")).json()["conversation_id"]
        fake_vllm.script(Reply(text="slow answer", delay_s=0.5))
        slow = asyncio.create_task(chat(http, server.url, "slow", conversation_id))
        for _ in range(200):
            if len(fake_vllm.requests) == 2:
                break
            await asyncio.sleep(0.01)
        busy = await chat(http, server.url, "fast", conversation_id)
        assert (await slow).status_code == 200
        messages = await stored(http, server.url, conversation_id)
    assert (busy.status_code, busy.json()) == (409, {"detail": f"conversation {conversation_id!r} is busy with "
                                                               "another turn; retry when that turn has finished"})
    assert [m["content"] for m in messages] == ["first", "You said: first", "slow", "slow answer"]


def long_turn(n: int) -> str:
    return f"question {n}: " + "lorem ipsum dolor sit amet " * 40


def check_tool_pairs(messages: list[dict[str, Any]]) -> None:
    """Every tool message follows the assistant message that called it (directly or after its siblings)."""
    open_ids: set[str] = set()
    for message in messages:
        if message["role"] == "assistant":
            open_ids = {call["id"] for call in message.get("tool_calls") or []}
        elif message["role"] == "tool":
            assert message["tool_call_id"] in open_ids


async def test_long_conversations_are_trimmed_to_the_window_by_whole_turns(live_server: Any,
                                                                          http: httpx.AsyncClient) -> None:
    async with (
        FakeVLLM(max_model_len=2000) as fake,
        live_server(vllm_base_url=fake.url, context_reserve_tokens=200) as server,
    ):
        conversation_id = (await chat(http, server.url, "what is 12*7?")).json()["conversation_id"]
        for n in range(12):
            response = await chat(http, server.url, long_turn(n), conversation_id)
            assert response.status_code == 200
        stored_count = len(await stored(http, server.url, conversation_id))
        sent = fake.requests[-1]
        assert stored_count == 4 + 2 * 12
        messages = sent.body["messages"]
        assert messages[0]["role"] == "system" and "Today's date is" in messages[0]["content"]
        assert messages[-1] == {"role": "user", "content": long_turn(11)}
        assert len(messages) < stored_count
        assert all(turn[0]["role"] == "user" for turn in split_turns(messages[1:]))
        check_tool_pairs(messages)
        tokenized = await http.post(f"{fake.url}/tokenize", json={
            "messages": messages, "tools": sent.body.get("tools")})
        assert tokenized.json()["count"] <= 2000 - 200


async def test_vllm_saying_too_long_makes_the_agent_trim_harder_once(live_server: Any,
                                                                    http: httpx.AsyncClient) -> None:
    async with (
        FakeVLLM(max_model_len=1500) as fake,
        live_server(vllm_base_url=fake.url, max_model_len=1900, context_reserve_tokens=100) as server,
    ):
        conversation_id = (await chat(http, server.url, "hello")).json()["conversation_id"]
        statuses = [(await chat(http, server.url, long_turn(n), conversation_id)).status_code for n in range(8)]
    assert statuses == [200] * 8
    retried = [(a.body["messages"], b.body["messages"]) for a, b in zip(fake.requests, fake.requests[1:], strict=False)
               if a.body["messages"][-1] == b.body["messages"][-1]]
    assert retried, "vLLM never refused a prompt, so the retry path was not exercised"
    assert all(len(second) < len(first) for first, second in retried)


async def test_a_message_too_long_for_the_model_is_413(live_server: Any, http: httpx.AsyncClient) -> None:
    async with (
        FakeVLLM(max_model_len=500) as fake,
        live_server(vllm_base_url=fake.url, context_reserve_tokens=100) as server,
    ):
        response = await chat(http, server.url, "lorem ipsum " * 400)
        listing = (await http.get(f"{server.url}/api/v1/conversations")).json()
    assert response.status_code == 413
    assert response.json()["detail"].startswith("the message is too long for the model")
    assert listing["conversations"] == []

"""Upstream faults end to end: every row of issue 5's fault table, against the fake vLLM on loopback.

A failing row checks the answer (status and detail, or the stream's last `error` event), that the stored
conversation did not change, that the script ran out as expected (so retries are bounded), and that the
next request on the same conversation works.
"""

import asyncio
import json
import threading
from typing import Any

import httpx
import pytest
from conftest import stream_chat, tool_call_text
from fake_vllm import FakeVLLM, Reply
from test_memory_e2e import chat, stored

from agent_app import FINAL_ANSWER_NUDGE, STREAM_CUT
from tools import ToolRegistry

DIED = Reply(status=500, error_message="engine died")
FAILURES = [  # replies the failing turn consumes, settings, streamed?, (status, detail with {url})
    pytest.param([DIED] * 3, {"vllm_max_retries": 2}, False, (502, "vLLM answered 500: engine died"),
                 id="500-every-time"),
    pytest.param([DIED] * 3, {"vllm_max_retries": 2}, True, (502, "vLLM answered 500: engine died"),
                 id="500-every-time-stream"),
    pytest.param([Reply(fault="empty_500")] * 2, {"vllm_max_retries": 1}, False,
                 (502, "vLLM answered 500: empty response body"), id="dead-engine-empty-500-every-time"),
    pytest.param([Reply(fault="hang")], {"vllm_timeout_s": 0.3}, False, (504, "vLLM at {url} did not answer in time"),
                 id="slower-than-the-timeout"),
    pytest.param([Reply(fault="hang")], {"vllm_timeout_s": 0.3}, True, (504, "vLLM at {url} did not answer in time"),
                 id="slower-than-the-timeout-stream"),
    pytest.param([Reply(text="This answer stalls after a few words of it.", fault="stall")], {"vllm_timeout_s": 0.3},
                 True, (504, "vLLM at {url} stopped sending in the middle of a reply"), id="stalls-mid-stream"),
    pytest.param([Reply(fault="non_json")], {}, False, (502, "vLLM sent a reply that is not a chat completion"),
                 id="200-with-a-non-json-body"),
    pytest.param([Reply(fault="non_json")], {}, True, (502, STREAM_CUT), id="200-with-a-non-json-body-stream"),
    pytest.param([Reply(text="Some words and then garbage.", fault="garbage")], {}, True,
                 (502, "vLLM sent an unreadable stream chunk"), id="stream-with-garbage-lines"),
    pytest.param([Reply(text="This answer will be cut somewhere in the middle of it.", fault="cut")], {}, True,
                 (502, STREAM_CUT), id="stream-cut-before-done"),
    pytest.param([Reply(text="Some words first.", fault="stream_error", error_message="out of KV cache blocks")],
                 {}, True, (502, "vLLM reported an error: out of KV cache blocks"), id="error-event-in-stream"),
    pytest.param([tool_call_text("calculator", {"expression": "2+2"}), DIED, DIED], {"vllm_max_retries": 1}, True,
                 (502, "vLLM answered 500: engine died"), id="fails-after-a-tool-call-stream"),
]


@pytest.mark.parametrize(("replies", "settings", "stream", "expected"), FAILURES)
async def test_an_upstream_fault_fails_the_turn_and_changes_nothing(
    replies: list[Reply | str], settings: dict[str, Any], stream: bool, expected: tuple[int, str],
    fake_vllm: FakeVLLM, live_server: Any, http: httpx.AsyncClient,
) -> None:
    status, detail = expected[0], expected[1].format(url=fake_vllm.url)
    async with live_server(vllm_base_url=fake_vllm.url, **settings) as server:
        conversation_id = (await chat(http, server.url, "first")).json()["conversation_id"]
        before = await stored(http, server.url, conversation_id)
        sent = len(fake_vllm.requests)
        fake_vllm.script(*replies)
        body = {"content": "second", "conversation_id": conversation_id}
        if stream:
            events = await stream_chat(http, server.url, body)
            assert events[-1] == ("error", {"type": "error", "status": status, "detail": detail})
            assert {name for name, _ in events[:-1]} <= {"token", "tool_call", "tool_result"}
        else:
            response = await http.post(f"{server.url}/api/v1/chat", json=body)
            assert (response.status_code, response.json()) == (status, {"detail": detail})
        assert (fake_vllm.remaining, len(fake_vllm.requests) - sent) == (0, len(replies))
        assert await stored(http, server.url, conversation_id) == before
        after = await chat(http, server.url, "third", conversation_id)
        assert after.json()["content"] == "You said: third"
        assert [m["content"] for m in await stored(http, server.url, conversation_id)] == [
            "first", "You said: first", "third", "You said: third"]


@pytest.mark.parametrize("stream", [False, True], ids=["rest", "stream"])
@pytest.mark.parametrize("failure", [Reply(status=500), Reply(status=503, error_message="The model is currently "
                                     "scaling. Please try again later."), Reply(fault="empty_500")],
                         ids=["500", "503", "empty-500"])
async def test_a_5xx_once_is_retried_and_the_turn_succeeds(
    failure: Reply, stream: bool, fake_vllm: FakeVLLM, live_server: Any, http: httpx.AsyncClient
) -> None:
    fake_vllm.script(failure)
    async with live_server(vllm_base_url=fake_vllm.url, vllm_max_retries=1) as server:
        if stream:
            answer = (await stream_chat(http, server.url, {"content": "hi"}))[-1][1]
        else:
            answer = (await http.post(f"{server.url}/api/v1/chat", json={"content": "hi"})).json()
        messages = await stored(http, server.url, answer["conversation_id"])
    assert (answer["content"], answer["stop_reason"]) == ("You said: hi", "completed")
    first, second = (request.body for request in fake_vllm.requests)
    assert first == second
    assert [m["content"] for m in messages] == ["hi", "You said: hi"]


async def test_vllm_down_is_502_naming_the_url_and_the_service_recovers_when_it_is_back(
    live_server: Any, http: httpx.AsyncClient
) -> None:
    first = FakeVLLM()
    await first.start()
    url, port = first.url, int(first.url.rsplit(":", 1)[1])
    async with live_server(vllm_base_url=url) as server:
        conversation_id = (await chat(http, server.url, "first")).json()["conversation_id"]
        before = await stored(http, server.url, conversation_id)
        await first.stop()
        down = await chat(http, server.url, "second", conversation_id)
        degraded = (await http.get(f"{server.url}/api/v1/health")).json()
        unchanged = await stored(http, server.url, conversation_id)
        back = FakeVLLM()
        await back.start(port=port)
        try:
            healthy = (await http.get(f"{server.url}/api/v1/health")).json()
            again = await chat(http, server.url, "third", conversation_id)
        finally:
            await back.stop()
    assert down.status_code == 502
    assert down.json()["detail"].startswith(f"vLLM is not reachable at {url}: ")
    assert (degraded["status"], degraded["vllm"]["url"], degraded["vllm"]["reachable"]) == ("degraded", url, False)
    assert unchanged == before
    assert (healthy["status"], healthy["vllm"]["reachable"]) == ("ok", True)
    assert (again.status_code, again.json()["content"]) == (200, "You said: third")
    assert back.requests[-1].body["messages"][-1] == {"role": "user", "content": "third"}


BAD_CALLS = "\n".join([
    '<tool_call>\n{"name": "calculator", "arguments": {"expression": 12*7}}\n</tool_call>',
    tool_call_text("no_such_tool", {"x": 1}),
    tool_call_text("calculator", {"expression": "1+1"}),
])


@pytest.mark.parametrize("stream", [False, True], ids=["rest", "stream"])
async def test_unreadable_arguments_and_unknown_tools_go_back_to_the_model_and_the_turn_goes_on(
    stream: bool, fake_vllm: FakeVLLM, live_server: Any, http: httpx.AsyncClient
) -> None:
    fake_vllm.script(BAD_CALLS, "Only 1+1 worked: 2.")
    async with live_server(vllm_base_url=fake_vllm.url) as server:
        if stream:
            answer = (await stream_chat(http, server.url, {"content": "go"}))[-1][1]
        else:
            answer = (await http.post(f"{server.url}/api/v1/chat", json={"content": "go"})).json()
        messages = await stored(http, server.url, answer["conversation_id"])
    outcomes = [(call["name"], call["result"], call["error"]) for call in answer["tool_calls"]]
    assert outcomes[1:] == [
        ("no_such_tool", None, "unknown tool 'no_such_tool'; available tools: calculator, get_current_time"),
        ("calculator", "2", None),
    ]
    assert outcomes[0][:2] == ("calculator", None) and "not valid JSON" in outcomes[0][2]
    assert (answer["content"], answer["stop_reason"]) == ("Only 1+1 worked: 2.", "completed")
    sent_back = [m["content"] for m in fake_vllm.requests[-1].body["messages"] if m["role"] == "tool"]
    assert sent_back == [f"Error: {outcomes[0][2]}", f"Error: {outcomes[1][2]}", "2"]
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "tool", "tool", "assistant"]


async def test_arguments_nested_too_deep_go_back_to_the_model(
    fake_vllm: FakeVLLM, live_server: Any, http: httpx.AsyncClient
) -> None:
    """Arguments nested 300 deep would break the tool_call event's JSON; the model is told instead."""
    deep: Any = 1
    for _ in range(300):
        deep = {"a": deep}
    fake_vllm.script(tool_call_text("calculator", {"expression": deep}), "Sorry.")
    async with live_server(vllm_base_url=fake_vllm.url) as server:
        events = await stream_chat(http, server.url, {"content": "go"})
    assert [name for name, _ in events[:2]] == ["tool_call", "tool_result"]
    assert events[1][1]["error"] == "the arguments are not valid JSON (arguments nest more than 64 levels deep)"
    assert (events[-1][1]["type"], events[-1][1]["content"]) == ("done", "Sorry.")


class SlowTools:
    """Test tools that hang, get stuck in a thread, raise, or return 10 MB; they record what happened to them."""

    def __init__(self) -> None:
        self.hang_cancelled = False
        self.release_thread = threading.Event()
        self.thread_finished = False
        self.registry = ToolRegistry()
        for function in (self.hang, self.stuck, self.explode, self.huge):
            self.registry.register(function)

    async def hang(self) -> str:
        """Sleep for an hour, unless cancelled."""
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.hang_cancelled = True
            raise
        return "slept an hour"

    def stuck(self) -> str:
        """Block its worker thread until the test releases it."""
        self.release_thread.wait(timeout=60)
        self.thread_finished = True
        return "late"

    def explode(self) -> str:
        """Raise an error."""
        raise RuntimeError("tool exploded")

    def huge(self) -> str:
        """Return 10 MB of text."""
        return "x" * 10_000_000


async def test_tools_that_hang_raise_or_return_10_mb_become_results_and_the_service_stays_responsive(
    fake_vllm: FakeVLLM, live_server: Any, http: httpx.AsyncClient
) -> None:
    tools = SlowTools()
    calls = "\n".join(tool_call_text(name, {}) for name in ("hang", "stuck", "explode", "huge"))
    fake_vllm.script(calls, "Two timed out, one failed, one was cut.")
    try:
        async with live_server(vllm_base_url=fake_vllm.url, tool_timeout_s=0.3) as server:
            server.app.state.agent.registry = tools.registry
            events = await stream_chat(http, server.url, {"content": "go"})
            nxt = await chat(http, server.url, "still there?")
            stuck_during_next_turn = not tools.thread_finished
            messages = await stored(http, server.url, events[-1][1]["conversation_id"])
    finally:
        tools.release_thread.set()
    results = {data["name"]: (data["result"], data["error"]) for name, data in events if name == "tool_result"}
    assert results == {
        "hang": (None, "tool 'hang' timed out after 0.3 s"),
        "stuck": (None, "tool 'stuck' timed out after 0.3 s"),
        "explode": (None, "RuntimeError: tool exploded"),
        "huge": ("x" * 16_000 + "\n…[truncated 9984000 characters]", None),
    }
    assert tools.hang_cancelled
    assert stuck_during_next_turn and (nxt.status_code, nxt.json()["content"]) == (200, "You said: still there?")
    assert events[-1][1]["content"] == "Two timed out, one failed, one was cut."
    tool_messages = [m["content"] for m in messages if m["role"] == "tool"]
    assert tool_messages == ["Error: tool 'hang' timed out after 0.3 s", "Error: tool 'stuck' timed out after 0.3 s",
                             "Error: RuntimeError: tool exploded", results["huge"][0]]


async def test_the_same_call_again_and_again_trips_the_loop_guard_in_a_stream(
    fake_vllm: FakeVLLM, live_server: Any, http: httpx.AsyncClient
) -> None:
    same = tool_call_text("calculator", {"expression": "6*7"})
    fake_vllm.script(same, same, same, "It is 42, however often I ask.")
    async with live_server(vllm_base_url=fake_vllm.url) as server:
        events = await stream_chat(http, server.url, {"content": "go"})
        messages = await stored(http, server.url, events[-1][1]["conversation_id"])
    done = events[-1][1]
    assert (done["stop_reason"], done["content"]) == ("loop_detected", "It is 42, however often I ask.")
    assert [call["result"] for call in done["tool_calls"]] == ["42", "42"]
    assert fake_vllm.remaining == 0
    last = fake_vllm.requests[-1].body
    assert "tools" not in last
    assert last["messages"][-1] == {"role": "system", "content": FINAL_ANSWER_NUDGE}
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant", "tool", "assistant"]
    assert json.loads(messages[1]["tool_calls"][0]["function"]["arguments"]) == {"expression": "6*7"}

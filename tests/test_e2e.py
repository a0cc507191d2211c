"""End to end: the real app served by uvicorn, talking real HTTP to the fake vLLM on loopback."""

import json
import re
from typing import Any

import httpx
import pytest
from fake_vllm import FakeVLLM, Reply

QUESTION = "what is 12*7, and what time is it in Seoul?"
SEOUL_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+09:00 \(\w+, Asia/Seoul\)$")


def tool_call_text(name: str, arguments: dict[str, Any]) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


async def read_events(response: httpx.Response) -> list[tuple[str, dict[str, Any]]]:
    """Parse an SSE body into (event name, data) pairs, checking that every data `type` equals its name."""
    events, name = [], None
    async for line in response.aiter_lines():
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            data = json.loads(line[6:])
            assert data["type"] == name
            events.append((name, data))
    return events


async def stream_chat(http: httpx.AsyncClient, url: str, body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The turn's events after the `run` event that starts every stream."""
    async with http.stream("POST", f"{url}/api/v1/chat/stream", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = await read_events(response)
    assert events[0][0] == "run" and events[0][1]["run_id"] == response.headers["x-run-id"]
    return events[1:]


def check_seoul_answer(body: dict[str, Any]) -> None:
    calls = body["tool_calls"]
    assert [(c["name"], c["arguments"], c["error"]) for c in calls] == [
        ("calculator", {"expression": "12*7"}, None),
        ("get_current_time", {"timezone": "Asia/Seoul"}, None),
    ]
    assert calls[0]["result"] == "84"
    assert SEOUL_TIME.match(calls[1]["result"])
    assert body["content"] == f"The results: 84; {calls[1]['result']}."
    assert body["stop_reason"] == "completed"


@pytest.mark.parametrize("tool_call_format", ["native", "hermes"])
async def test_rest_answers_the_seoul_question_with_both_tools(
    tool_call_format: str, fake_vllm: FakeVLLM, live_server: Any, http: httpx.AsyncClient
) -> None:
    fake_vllm.tool_parser = tool_call_format == "native"
    async with live_server(vllm_base_url=fake_vllm.url, tool_call_format=tool_call_format) as server:
        response = await http.post(f"{server.url}/api/v1/chat", json={"content": QUESTION})
    assert response.status_code == 200
    body = response.json()
    check_seoul_answer(body)
    assert body["usage"]["prompt_tokens"] > 0
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    first, second = (request.body for request in fake_vllm.requests)
    assert first.get("tool_choice") == (None if tool_call_format == "native" else "none")  # text mode: none
    assert [m["role"] for m in second["messages"]] == ["system", "user", "assistant", "tool", "tool"]
    assistant, *results = second["messages"][2:]
    assert [call["id"] for call in assistant["tool_calls"]] == [result["tool_call_id"] for result in results]
    assert [json.loads(call["function"]["arguments"]) for call in assistant["tool_calls"]] == [
        {"expression": "12*7"}, {"timezone": "Asia/Seoul"}]


@pytest.mark.parametrize("tool_call_format", ["native", "hermes"])
async def test_sse_streams_tool_events_tokens_and_done(
    tool_call_format: str, fake_vllm: FakeVLLM, live_server: Any, http: httpx.AsyncClient
) -> None:
    fake_vllm.tool_parser = tool_call_format == "native"
    fake_vllm.token_delay_s = 0.002  # tokens arrive in separate network reads, as from a GPU
    async with live_server(vllm_base_url=fake_vllm.url, tool_call_format=tool_call_format) as server:
        events = await stream_chat(http, server.url, {"content": QUESTION})
    names = [name for name, _ in events]
    assert names[:4] == ["tool_call", "tool_call", "tool_result", "tool_result"]
    assert set(names[4:-1]) == {"token"} and len(names[4:-1]) > 3
    assert names[-1] == "done"
    done = events[-1][1]
    check_seoul_answer(done)
    assert "".join(data["content"] for name, data in events if name == "token") == done["content"]
    calls = {data["id"]: data for name, data in events if name == "tool_call"}
    results = [data for name, data in events if name == "tool_result"]
    assert {result["id"] for result in results} == set(calls)
    assert all(result["duration_s"] >= 0 for result in results)


async def test_hermes_prompt_renders_exactly_like_native_tools(
    fake_vllm: FakeVLLM, live_server: Any, http: httpx.AsyncClient
) -> None:
    """Qwen sees the same prompt whether vLLM parses its calls or leaves them in the text for us."""
    for tool_call_format in ("native", "hermes"):
        fake_vllm.tool_parser = tool_call_format == "native"
        async with live_server(vllm_base_url=fake_vllm.url, tool_call_format=tool_call_format) as server:
            assert (await http.post(f"{server.url}/api/v1/chat", json={"content": "hello"})).status_code == 200
    native, hermes = (request.prompt for request in fake_vllm.requests)
    assert native == hermes
    assert "<tools>\n{\"type\": \"function\", \"function\": {\"name\": \"calculator\"" in native


async def test_auto_switches_to_hermes_once_when_vllm_has_no_tool_parser(
    fake_vllm: FakeVLLM, live_server: Any, http: httpx.AsyncClient
) -> None:
    fake_vllm.tool_parser = False
    async with live_server(vllm_base_url=fake_vllm.url) as server:
        first = await http.post(f"{server.url}/api/v1/chat", json={"content": QUESTION})
        second = await http.post(f"{server.url}/api/v1/chat", json={"content": "what is 2**10?"})
        health = (await http.get(f"{server.url}/api/v1/health")).json()
    check_seoul_answer(first.json())
    assert second.json()["tool_calls"][0]["result"] == "1024"
    assert health["vllm"]["tool_call_format"] == "hermes"
    tool_choices = [request.body.get("tool_choice") for request in fake_vllm.requests]
    assert tool_choices == [None, "none", "none", "none", "none"]


async def test_streamed_hermes_tokens_never_carry_markup(
    fake_vllm: FakeVLLM, live_server: Any, http: httpx.AsyncClient
) -> None:
    fake_vllm.tool_parser = False
    fake_vllm.script(
        "Let me work that out. " + tool_call_text("calculator", {"expression": "6*7"}),
        "It is 42 <b>exactly</b> " + tool_call_text("calculator", {"expression": "1+1"}) + " trailing",
        "Done: 42 and 2.",
    )
    async with live_server(vllm_base_url=fake_vllm.url, tool_call_format="hermes") as server:
        events = await stream_chat(http, server.url, {"content": "hi"})
    tokens = "".join(data["content"] for name, data in events if name == "token")
    assert tokens == "Let me work that out. \n\nIt is 42 <b>exactly</b> \n\nDone: 42 and 2."
    assert events[-1][1]["content"] == tokens
    assert [data["result"] for name, data in events if name == "tool_result"] == ["42", "2"]


async def test_next_turn_sends_the_whole_history(fake_vllm: FakeVLLM, live_server: Any,
                                                 http: httpx.AsyncClient) -> None:
    async with live_server(vllm_base_url=fake_vllm.url) as server:
        first = (await http.post(f"{server.url}/api/v1/chat", json={"content": "what is 3*3?"})).json()
        second = await http.post(f"{server.url}/api/v1/chat",
                                 json={"content": "thanks", "conversation_id": first["conversation_id"]})
    assert second.json()["conversation_id"] == first["conversation_id"]
    assert second.json()["content"] == "You said: thanks"
    roles = [m["role"] for m in fake_vllm.requests[-1].body["messages"]]
    assert roles == ["system", "user", "assistant", "tool", "assistant", "user"]


@pytest.mark.parametrize("path", ["/api/v1/chat", "/api/v1/chat/stream"])
async def test_unknown_conversation_is_404(path: str, fake_vllm: FakeVLLM, live_server: Any,
                                           http: httpx.AsyncClient) -> None:
    async with live_server(vllm_base_url=fake_vllm.url) as server:
        response = await http.post(f"{server.url}{path}", json={"content": "hi", "conversation_id": "nope"})
    assert (response.status_code, response.json()) == (404, {"detail": "conversation 'nope' not found"})
    assert fake_vllm.requests == []


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        pytest.param({"content": ""}, "content: String should have at least 1 character", id="empty"),
        pytest.param({"content": "  \n "}, "content: Value error, must not be empty or only whitespace",
                     id="whitespace"),
        pytest.param({}, "content: Field required", id="missing"),
        pytest.param({"content": 5}, "content: Input should be a valid string", id="wrong-type"),
        pytest.param({"content": "hi", "extra": 1}, "extra: Extra inputs are not permitted", id="extra-field"),
        pytest.param({"content": "hi", "conversation_id": "../etc"},
                     "conversation_id: String should match pattern '^[A-Za-z0-9_-]{1,64}$'", id="bad-id"),
    ],
)
async def test_bad_requests_are_422_with_a_readable_detail(
    body: dict[str, Any], detail: str, fake_vllm: FakeVLLM, live_server: Any, http: httpx.AsyncClient
) -> None:
    async with live_server(vllm_base_url=fake_vllm.url) as server:
        response = await http.post(f"{server.url}/api/v1/chat", json=body)
    assert (response.status_code, response.json()) == (422, {"detail": detail})


async def test_content_over_the_limit_is_413(fake_vllm: FakeVLLM, live_server: Any, http: httpx.AsyncClient) -> None:
    async with live_server(vllm_base_url=fake_vllm.url, max_content_chars=10) as server:
        response = await http.post(f"{server.url}/api/v1/chat", json={"content": "x" * 11})
    assert (response.status_code, response.json()) == (413, {"detail": "content is 11 characters; the limit is 10"})


async def test_upstream_failure_is_502_and_the_conversation_is_unchanged(
    fake_vllm: FakeVLLM, live_server: Any, http: httpx.AsyncClient
) -> None:
    async with live_server(vllm_base_url=fake_vllm.url, vllm_max_retries=1) as server:
        first = (await http.post(f"{server.url}/api/v1/chat", json={"content": "hello"})).json()
        fake_vllm.script(Reply(status=500, error_message="boom"), Reply(status=500, error_message="boom"))
        failed = await http.post(f"{server.url}/api/v1/chat",
                                 json={"content": "lost", "conversation_id": first["conversation_id"]})
        after = await http.post(f"{server.url}/api/v1/chat",
                                json={"content": "again", "conversation_id": first["conversation_id"]})
    assert (failed.status_code, failed.json()) == (502, {"detail": "vLLM answered 500: boom"})
    assert after.status_code == 200
    contents = [m["content"] for m in fake_vllm.requests[-1].body["messages"][1:]]
    assert contents == ["hello", "You said: hello", "again"]


async def test_stream_cut_before_done_ends_with_an_error_event(
    fake_vllm: FakeVLLM, live_server: Any, http: httpx.AsyncClient
) -> None:
    fake_vllm.script(Reply(text="This answer will be cut somewhere in the middle of it.", fault="cut"))
    async with live_server(vllm_base_url=fake_vllm.url) as server:
        events = await stream_chat(http, server.url, {"content": "hi"})
    assert events[-1] == ("error", {"type": "error", "status": 502, "detail": "vLLM's stream ended before [DONE]"})
    assert [name for name, _ in events[:-1]] == ["token"] * (len(events) - 1)


async def test_max_steps_ends_with_a_final_answer_without_tools(
    fake_vllm: FakeVLLM, live_server: Any, http: httpx.AsyncClient
) -> None:
    fake_vllm.script(tool_call_text("calculator", {"expression": "1+1"}),
                     tool_call_text("calculator", {"expression": "2+2"}),
                     "Enough: 2 and 4.")
    async with live_server(vllm_base_url=fake_vllm.url, agent_max_steps=2) as server:
        body = (await http.post(f"{server.url}/api/v1/chat", json={"content": "go"})).json()
    assert (body["stop_reason"], body["content"]) == ("max_steps", "Enough: 2 and 4.")
    assert [call["result"] for call in body["tool_calls"]] == ["2", "4"]
    last = fake_vllm.requests[-1].body
    assert "tools" not in last
    assert last["messages"][-1]["role"] == "system"
    assert fake_vllm.remaining == 0


async def test_repeated_identical_calls_trip_the_loop_guard(
    fake_vllm: FakeVLLM, live_server: Any, http: httpx.AsyncClient
) -> None:
    same = tool_call_text("calculator", {"expression": "1+1"})
    fake_vllm.script(same, same, same, "I keep getting 2.")
    async with live_server(vllm_base_url=fake_vllm.url) as server:
        body = (await http.post(f"{server.url}/api/v1/chat", json={"content": "go"})).json()
    assert (body["stop_reason"], body["content"]) == ("loop_detected", "I keep getting 2.")
    assert len(body["tool_calls"]) == 2
    assert fake_vllm.remaining == 0


async def test_tool_problems_go_back_to_the_model(fake_vllm: FakeVLLM, live_server: Any,
                                                  http: httpx.AsyncClient) -> None:
    fake_vllm.tool_parser = False
    fake_vllm.script(
        tool_call_text("no_such_tool", {}) + '\n<tool_call>\n{"name": "calculator", "arguments": {oops}}\n</tool_call>'
        + "\n" + tool_call_text("calculator", {"expression": "1/0"}),
        "Sorry, I could not compute that.",
    )
    async with live_server(vllm_base_url=fake_vllm.url, tool_call_format="hermes") as server:
        body = (await http.post(f"{server.url}/api/v1/chat", json={"content": "go"})).json()
    errors = [(call["name"], call["error"]) for call in body["tool_calls"]]
    assert errors[0] == ("no_such_tool", "unknown tool 'no_such_tool'; available tools: calculator, get_current_time")
    assert errors[1][0] == "calculator" and errors[1][1].startswith("the tool call is not valid JSON")
    assert errors[2] == ("calculator", "division by zero")
    tool_messages = [m for m in fake_vllm.requests[-1].body["messages"] if m["role"] == "tool"]
    assert [m["content"] for m in tool_messages] == [f"Error: {error}" for _, error in errors]
    assert body["content"] == "Sorry, I could not compute that."


async def test_tools_health_docs_and_ui_routes(fake_vllm: FakeVLLM, live_server: Any, http: httpx.AsyncClient) -> None:
    async with live_server(vllm_base_url=fake_vllm.url) as server:
        tools = (await http.get(f"{server.url}/api/v1/tools")).json()
        healthy = (await http.get(f"{server.url}/api/v1/health")).json()
        await fake_vllm.stop()
        degraded = (await http.get(f"{server.url}/api/v1/health")).json()
        root = await http.get(f"{server.url}/")
        ui = await http.get(f"{server.url}/ui/")
        openapi = (await http.get(f"{server.url}/openapi.json")).json()
    assert [tool["name"] for tool in tools] == ["calculator", "get_current_time"]
    assert tools[0]["parameters"]["required"] == ["expression"]
    vllm = {"url": fake_vllm.url, "reachable": True, "model": "Qwen/Qwen2.5-7B-Instruct", "tool_call_format": "native"}
    assert healthy == {"status": "ok", "vllm": vllm, "mcp": {}}
    assert degraded == {"status": "degraded", "vllm": vllm | {"reachable": False}, "mcp": {}}
    assert (root.status_code, root.headers["location"]) == (307, "/ui")
    assert ui.status_code == 200 and "<html" in ui.text.lower()
    assert {"/api/v1/chat", "/api/v1/chat/stream", "/api/v1/tools", "/api/v1/health"} <= set(openapi["paths"])
    chat = openapi["paths"]["/api/v1/chat"]["post"]
    response_schema = chat["responses"]["200"]["content"]["application/json"]["schema"]
    assert response_schema == {"$ref": "#/components/schemas/ChatResponse"}


async def test_unreachable_vllm_is_502_naming_the_url(live_server: Any, http: httpx.AsyncClient) -> None:
    async with live_server(vllm_base_url="http://127.0.0.1:9", vllm_max_retries=0) as server:
        response = await http.post(f"{server.url}/api/v1/chat", json={"content": "hi"})
    assert response.status_code == 502
    assert response.json()["detail"].startswith("vLLM is not reachable at http://127.0.0.1:9")

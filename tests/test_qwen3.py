"""End to end against the fake vLLM 0.33: thinking models, XML tool calls and cut answers, through real HTTP.

Each setup of issue 14 runs non-streaming (POST /chat), streaming (SSE) and through the page's handler.
"""

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gradio as gr
import httpx
import pytest
from conftest import LiveServer, stream_chat
from fake_vllm import FakeVLLM, Reply

from ui import CUT_NOTE, CUT_THOUGHT_NOTE, ChatUI

TAB = gr.Request(session_hash="tab")
HERMES_CALL = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "12*7"}}\n</tool_call>'
XML_CALL = ("<tool_call>\n<function=calculator>\n<parameter=expression>\n12*7\n</parameter>\n</function>\n"
            "</tool_call>")
HYBRID = ("<think>\nI should calculate.\n</think>\n\n" + HERMES_CALL,
          "<think>\nI have the result.\n</think>\n\nThe result is 84.")
OPEN_THOUGHT = ("I should calculate.\n</think>\n\n" + XML_CALL, "I have the result.\n</think>\n\nThe result is 84.")
THOUGHTS = "I should calculate.\n\nI have the result."
TAGS = ("<think>", "</think>", "<tool_call>", "<function=", "<parameter=")


@dataclass(frozen=True)
class Setup:
    """A vLLM server (the fake's flags), the service's settings, and what the model writes in two steps."""
    fake: dict[str, Any]
    texts: tuple[str, str]
    reasoning: str | None = THOUGHTS
    settings: dict[str, Any] = field(default_factory=dict)


SETUPS = {
    "qwen2.5-hermes": Setup({"template": "qwen2.5", "tool_parser": "hermes"}, (HERMES_CALL, "The result is 84."),
                            reasoning=None),
    "qwen3-hermes-qwen3": Setup({"template": "qwen3", "tool_parser": "hermes", "reasoning_parser": "qwen3"}, HYBRID),
    "qwen3.5-qwen3_coder-qwen3": Setup({"template": "qwen3.5", "tool_parser": "qwen3_coder",
                                        "reasoning_parser": "qwen3"}, OPEN_THOUGHT, settings={"thinking": "on"}),
    "qwen3.5-no-parser": Setup({"template": "qwen3.5", "tool_parser": None}, OPEN_THOUGHT,
                               settings={"thinking": "on"}),
    "hybrid-think-text-mode": Setup({"template": "qwen3", "tool_parser": None}, HYBRID,
                                    settings={"tool_call_format": "hermes"}),
}


@pytest.fixture
async def served(live_server: Callable[..., LiveServer]) -> Callable[..., Any]:
    """`async with served(setup) as (fake, server):` a fake vLLM 0.33 with the setup's flags and the app on it."""

    class Both:
        def __init__(self, setup: Setup, **fake_overrides: Any) -> None:
            self.fake = FakeVLLM(version="0.33", **(setup.fake | fake_overrides))
            self.setup = setup

        async def __aenter__(self) -> tuple[FakeVLLM, LiveServer]:
            await self.fake.__aenter__()
            self.server = live_server(vllm_base_url=self.fake.url, vllm_model=self.fake.model, **self.setup.settings)
            return self.fake, await self.server.__aenter__()

        async def __aexit__(self, *exc_info: object) -> None:
            await self.server.__aexit__(*exc_info)
            await self.fake.__aexit__(*exc_info)

    return Both


async def page_turn(server: LiveServer, text: str, *, thinking: bool = True,
                    offered: bool = False) -> list[gr.ChatMessage]:
    """The messages the page shows at the end of a turn, as ChatInterface drives `ChatUI.respond`."""
    updates = [update async for update in ChatUI(server.app).respond(text, [], "", thinking, offered, TAB)]
    return updates[-1][0]


def shown(messages: list[gr.ChatMessage]) -> list[tuple[str, str]]:
    """(title, content) of each message: tool calls by title (their durations vary), the rest by content too."""
    return [(m.metadata.get("title", ""), "" if m.metadata.get("title", "").startswith("calculator") else m.content)
            for m in messages]


def check_requests(fake: FakeVLLM) -> None:
    """Every request: no `tool_choice: null`, arguments echoed as JSON objects; and the script ran out."""
    for request in fake.requests:
        assert request.body.get("tool_choice", "auto") in ("auto", "none")
        for message in request.body["messages"]:
            for call in message.get("tool_calls") or []:
                assert isinstance(json.loads(call["function"]["arguments"]), dict)
    assert fake.remaining == 0


@pytest.mark.parametrize("setup", SETUPS.values(), ids=SETUPS.keys())
async def test_rest_runs_the_call_and_returns_answer_and_thinking(
        setup: Setup, served: Callable[..., Any], http: httpx.AsyncClient) -> None:
    async with served(setup) as (fake, server):
        fake.script(*setup.texts)
        body = (await http.post(f"{server.url}/api/v1/chat", json={"content": "What is 12*7?"})).json()
        stored = (await http.get(f"{server.url}/api/v1/conversations/{body['conversation_id']}")).json()
    assert (body["content"], body["reasoning"], body["stop_reason"]) == ("The result is 84.", setup.reasoning,
                                                                         "completed")
    assert [(c["name"], c["arguments"], c["result"]) for c in body["tool_calls"]] == [
        ("calculator", {"expression": "12*7"}, "84")]
    thoughts = setup.reasoning.split("\n\n") if setup.reasoning else [None, None]
    assert [(m["role"], m["reasoning"]) for m in stored["messages"]] == [
        ("user", None), ("assistant", thoughts[0]), ("tool", None), ("assistant", thoughts[1])]
    check_requests(fake)


@pytest.mark.parametrize("setup", SETUPS.values(), ids=SETUPS.keys())
async def test_sse_streams_thinking_before_each_steps_calls_and_tokens(
        setup: Setup, served: Callable[..., Any], http: httpx.AsyncClient) -> None:
    async with served(setup, token_delay_s=0.001) as (fake, server):
        fake.script(*setup.texts)
        events = await stream_chat(http, server.url, {"content": "What is 12*7?"})
    names = [name for index, (name, _) in enumerate(events) if index == 0 or events[index - 1][0] != name]
    step = ["reasoning"] if setup.reasoning else []
    assert names == [*step, "tool_call", "tool_result", *step, "token", "done"]
    pieces = [data["content"] for name, data in events if name in ("reasoning", "token")]
    assert not any(tag in piece for piece in pieces for tag in TAGS)
    assert "".join(data["content"] for name, data in events if name == "token") == "The result is 84."
    thinking = "".join(data["content"] for name, data in events if name == "reasoning")
    assert thinking == (setup.reasoning or "").replace("\n\n", "")
    assert (events[-1][1]["reasoning"], events[-1][1]["content"]) == (setup.reasoning, "The result is 84.")
    check_requests(fake)


@pytest.mark.parametrize("setup", SETUPS.values(), ids=SETUPS.keys())
async def test_page_shows_each_steps_thinking_collapsed_above_its_call_and_answer(
        setup: Setup, served: Callable[..., Any]) -> None:
    async with served(setup, token_delay_s=0.001) as (fake, server):
        fake.script(*setup.texts)
        messages = await page_turn(server, "What is 12*7?")
    thoughts = [("Thinking", thought) for thought in setup.reasoning.split("\n\n")] if setup.reasoning else []
    expected = [("calculator(12\\*7) → 84", ""), ("", "The result is 84.")]
    if thoughts:
        expected = [thoughts[0], expected[0], thoughts[1], expected[1]]
    assert shown(messages) == expected
    assert {m.metadata.get("status") for m in messages if m.metadata} == {"done"}
    check_requests(fake)


async def test_thinking_goes_back_to_vllm_within_its_turn_only(
        served: Callable[..., Any], http: httpx.AsyncClient) -> None:
    async with served(SETUPS["qwen3-hermes-qwen3"]) as (fake, server):
        fake.script(*HYBRID, "<think>\nEasy.\n</think>\n\nHello.")
        first = (await http.post(f"{server.url}/api/v1/chat", json={"content": "What is 12*7?"})).json()
        await http.post(f"{server.url}/api/v1/chat", json={"content": "Hi", "thinking": False,
                                                          "conversation_id": first["conversation_id"]})
    within, later = fake.requests[1].body["messages"], fake.requests[2].body["messages"]
    assert [m.get("reasoning") for m in within if m["role"] == "assistant"] == ["I should calculate."]
    assert not any("reasoning" in m for m in later)
    assert [r.body.get("chat_template_kwargs") for r in fake.requests] == [None, None, {"enable_thinking": False}]


async def test_the_page_offers_thinking_only_for_a_model_that_thinks(served: Callable[..., Any]) -> None:
    offered = {}
    for name in ("qwen2.5-hermes", "qwen3-hermes-qwen3", "qwen3.5-no-parser"):
        async with served(SETUPS[name]) as (_, server):
            offered[name] = await ChatUI(server.app).model_thinks()
    assert offered == {"qwen2.5-hermes": False, "qwen3-hermes-qwen3": True, "qwen3.5-no-parser": True}


@pytest.mark.parametrize("toggle", [True, False])
async def test_the_pages_thinking_toggle_is_sent_as_enable_thinking(served: Callable[..., Any], toggle: bool) -> None:
    async with served(SETUPS["qwen3-hermes-qwen3"]) as (fake, server):
        fake.script("Hello.")
        await page_turn(server, "Hi", thinking=toggle, offered=True)
    assert fake.requests[-1].body["chat_template_kwargs"] == {"enable_thinking": toggle}


@pytest.mark.parametrize("setup", [SETUPS["qwen3.5-no-parser"], SETUPS["qwen3.5-qwen3_coder-qwen3"]],
                         ids=["no-parser", "qwen3-parsers"])
@pytest.mark.parametrize("stream", [False, True])
async def test_a_call_written_inside_the_thought_is_run(
        setup: Setup, stream: bool, served: Callable[..., Any], http: httpx.AsyncClient) -> None:
    async with served(setup) as (fake, server):
        fake.script("I will compute it.\n" + XML_CALL + "\n</think>\n\n", OPEN_THOUGHT[1])
        if stream:
            body = (await stream_chat(http, server.url, {"content": "What is 12*7?"}))[-1][1]
        else:
            body = (await http.post(f"{server.url}/api/v1/chat", json={"content": "What is 12*7?"})).json()
    assert [(c["name"], c["result"]) for c in body["tool_calls"]] == [("calculator", "84")]
    assert body["content"] == "The result is 84."


async def run_turn(server: LiveServer, http: httpx.AsyncClient, how: str) -> tuple[dict[str, Any], list[Any]]:
    """One turn "rest", "sse" or through the "page": the final body (the page: the stored turn) and page messages."""
    if how == "rest":
        return (await http.post(f"{server.url}/api/v1/chat", json={"content": "Tell me"})).json(), []
    if how == "sse":
        return (await stream_chat(http, server.url, {"content": "Tell me"}))[-1][1], []
    messages = await page_turn(server, "Tell me")
    return {}, messages


@pytest.mark.parametrize("how", ["rest", "sse", "page"])
async def test_an_answer_cut_at_the_token_limit_is_kept_and_said_to_be_cut(
        how: str, served: Callable[..., Any], http: httpx.AsyncClient) -> None:
    async with served(SETUPS["qwen2.5-hermes"]) as (fake, server):
        fake.script(Reply(text="The answer starts well but", finish_reason="length"))
        body, messages = await run_turn(server, http, how)
    if how == "page":
        assert [m.content for m in messages] == ["The answer starts well but", CUT_NOTE]
    else:
        assert (body["content"], body["stop_reason"], body["tool_calls"]) == ("The answer starts well but", "length",
                                                                               None)
    assert len(fake.requests) == 1


@pytest.mark.parametrize("how", ["rest", "sse"])
async def test_calls_in_a_step_cut_at_the_token_limit_are_not_run(
        how: str, served: Callable[..., Any], http: httpx.AsyncClient) -> None:
    async with served(SETUPS["qwen2.5-hermes"]) as (fake, server):
        fake.script(Reply(text=HERMES_CALL, finish_reason="length"))
        body, _ = await run_turn(server, http, how)
        stored = (await http.get(f"{server.url}/api/v1/conversations/{body['conversation_id']}")).json()
    assert (body["content"], body["stop_reason"], body["tool_calls"]) == ("", "length", None)
    assert [(m["role"], m["tool_calls"]) for m in stored["messages"]] == [("user", None), ("assistant", None)]
    assert len(fake.requests) == 1


@pytest.mark.parametrize("how", ["rest", "sse", "page"])
@pytest.mark.parametrize("setup", [SETUPS["qwen3-hermes-qwen3"], SETUPS["hybrid-think-text-mode"]],
                         ids=["reasoning-parser", "text-mode"])
async def test_a_thought_cut_at_the_token_limit_is_reported_not_shown_as_an_empty_answer(
        setup: Setup, how: str, served: Callable[..., Any], http: httpx.AsyncClient) -> None:
    async with served(setup) as (fake, server):
        fake.script(Reply(text="<think>\nLet me think about this carefully", finish_reason="length"))
        body, messages = await run_turn(server, http, how)
    if how == "page":
        assert shown(messages) == [("Thinking", "Let me think about this carefully"), ("", CUT_THOUGHT_NOTE)]
    else:
        assert (body["content"], body["reasoning"], body["stop_reason"]) == (
            "", "Let me think about this carefully", "length")


@pytest.mark.parametrize("message", [
    "This model's maximum context length is 4096 tokens. However, your prompt contains 5000 input tokens, which "
    "exceeds this limit even without any output tokens. Please reduce the length of the input prompt. "
    "(parameter=input_tokens, value=5000)",
    "max_tokens must be at least 1, got 0. (parameter=max_tokens, value=0)",
])
async def test_vllm_0_33_overflow_messages_trim_and_retry_then_413(
        message: str, served: Callable[..., Any], http: httpx.AsyncClient) -> None:
    async with served(SETUPS["qwen2.5-hermes"]) as (fake, server):
        fake.script(Reply(status=400, error_message=message), "Fits now.")
        retried = (await http.post(f"{server.url}/api/v1/chat", json={"content": "Hi"})).json()
        fake.script(Reply(status=400, error_message=message), Reply(status=400, error_message=message))
        refused = await http.post(f"{server.url}/api/v1/chat", json={"content": "Hi"})
    assert retried["content"] == "Fits now."
    assert refused.status_code == 413
    assert refused.json()["detail"].startswith("the conversation is too long for the model: ")
    assert len(fake.requests) == 4


async def test_a_prompt_over_the_window_is_refused_by_vllm_0_33_and_ends_in_413(
        served: Callable[..., Any], http: httpx.AsyncClient) -> None:
    setup = Setup({"template": "qwen2.5", "tool_parser": "hermes", "max_model_len": 1024}, ("", ""),
                  settings={"max_model_len": 100_000})  # the service believes the window is larger than it is
    async with served(setup) as (fake, server):
        response = await http.post(f"{server.url}/api/v1/chat", json={"content": "word " * 3000})
    assert response.status_code == 413
    assert "exceeds this limit even without any output tokens" in response.json()["detail"]
    assert len(fake.requests) == 2


async def test_keep_alive_comments_in_vllms_stream_are_skipped(
        served: Callable[..., Any], http: httpx.AsyncClient) -> None:
    async with served(SETUPS["qwen3-hermes-qwen3"], sse_keep_alive_s=0.001) as (fake, server):
        fake.script(Reply(text="<think>\nHm.\n</think>\n\nHello there.", token_delay_s=0.01))
        events = await stream_chat(http, server.url, {"content": "Hi"})
    assert (events[-1][1]["content"], events[-1][1]["reasoning"]) == ("Hello there.", "Hm.")



async def test_vllm_0_33_admission_503_is_retried_then_passed_on_as_503(
        served: Callable[..., Any], http: httpx.AsyncClient) -> None:
    busy = Reply(status=503, error_message="The engine is currently busy and cannot accept new requests. Please try "
                                           "again later or on a different instance.")
    async with served(SETUPS["qwen2.5-hermes"]) as (fake, server):
        fake.script(busy, "Hello.")
        retried = (await http.post(f"{server.url}/api/v1/chat", json={"content": "Hi"})).json()
        fake.script(busy, busy, busy)
        refused = await http.post(f"{server.url}/api/v1/chat", json={"content": "Hi"})
    assert retried["content"] == "Hello."
    assert (refused.status_code, refused.headers["retry-after"]) == (503, "1")
    assert refused.json()["detail"].startswith("vLLM is busy: The engine is currently busy")

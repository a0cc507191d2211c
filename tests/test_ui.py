"""The Gradio page's handlers without a browser: what the chat shows, event by event, against the fake vLLM."""

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from itertools import accumulate
from typing import Any

import gradio as gr
import pytest
from fake_vllm import FakeVLLM, Reply, tokenize

from agent_app import create_app
from ui import (
    PROGRESS_POLL_S,
    QUEUE_POLL_S,
    STOPPED_NOTE,
    ChatUI,
    code,
    header_html,
    messages_from_store,
    poll_queue_less,
    short_arguments,
    tool_message,
)

UIFactory = Callable[..., Any]
START_VLLM = "--enable-auto-tool-choice --tool-call-parser hermes"


def user(text: str) -> gr.ChatMessage:
    return gr.ChatMessage(role="user", content=text)


def answer(text: str) -> gr.ChatMessage:
    return gr.ChatMessage(content=text)


def tool_call_text(name: str, arguments: dict[str, Any]) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


def growing(prefix: list[gr.ChatMessage], text: str) -> list[list[gr.ChatMessage]]:
    """The chats a streamed answer passes through, one fake-vLLM token at a time."""
    return [[*prefix, answer(part)] for part in accumulate(tokenize(text))]


def without_durations(messages: list[Any]) -> list[Any]:
    """Tool durations are measured, so tests compare everything else and check them apart."""
    for message in messages:
        if message.metadata.get("status") == "done" and message.role == "assistant" and "duration" in message.metadata:
            assert isinstance(message.metadata["duration"], float)
    return [replace(m, metadata={k: v for k, v in m.metadata.items() if k != "duration"}) for m in messages]


async def chat(ui: ChatUI, text: str, conversation_id: str = "",
               history: list[Any] | None = None) -> tuple[list[list[Any]], list[str]]:
    """Send one message as the page does (the chat already ends with it); the chats and ids it yields."""
    updates = [update async for update in ui.respond(text, [*(history or []), user(text)], conversation_id)]
    return [messages for messages, _ in updates], [conversation_id for _, conversation_id in updates]


@pytest.fixture
def chat_ui(make_settings: Any) -> UIFactory:
    """`async with chat_ui(vllm_base_url=...) as ui:` gives the handlers of an app whose lifespan runs."""

    class Running:
        def __init__(self, **overrides: Any) -> None:
            self.app = create_app(make_settings(**overrides))
            self._lifespan = self.app.router.lifespan_context(self.app)

        async def __aenter__(self) -> ChatUI:
            await self._lifespan.__aenter__()
            return ChatUI(self.app)

        async def __aexit__(self, *exc_info: object) -> None:
            await self._lifespan.__aexit__(*exc_info)

    return Running


@pytest.fixture
async def ui(chat_ui: UIFactory, fake_vllm: FakeVLLM) -> AsyncIterator[ChatUI]:
    fake_vllm.token_delay_s = 0.02  # tokens arrive in separate network reads, as from a GPU
    async with chat_ui(vllm_base_url=fake_vllm.url) as handlers:
        yield handlers


# --- formatting ---


@pytest.mark.parametrize(("arguments", "expected"), [
    pytest.param({"expression": "12*7"}, "12*7", id="one-argument-bare"),
    pytest.param({"a": 1, "b": "x", "c": [1, 2]}, 'a=1, b=x, c=[1, 2]', id="several-as-pairs"),
    pytest.param({}, "", id="none"),
    pytest.param({"text": "a\n  very   long line " * 5}, "a very long line a very long line a ver…", id="one-line-40"),
])
def test_short_arguments_fit_one_line(arguments: dict[str, Any], expected: str) -> None:
    assert short_arguments(arguments) == expected


@pytest.mark.parametrize(("kwargs", "expected"), [
    pytest.param({}, gr.ChatMessage(content="**expression** `2**16 / 7`",
                                    metadata={"title": "calculator(2\\*\\*16 / 7)", "status": "pending"}),
                 id="pending"),
    pytest.param({"result": "9362.29", "duration_s": 0.41234},
                 gr.ChatMessage(content="**expression** `2**16 / 7`\n\n**Result** `9362.29`",
                                metadata={"title": "calculator(2\\*\\*16 / 7) → 9362.29", "status": "done",
                                          "duration": 0.412}),
                 id="done"),
    pytest.param({"error": "division by zero", "duration_s": 0.0},
                 gr.ChatMessage(content="**expression** `2**16 / 7`\n\n**Error** division by zero",
                                metadata={"title": "calculator(2\\*\\*16 / 7) → failed: division by zero",
                                          "status": "done", "duration": 0.0}),
                 id="error"),
    pytest.param({"result": "line 1\nline 2"},
                 gr.ChatMessage(content="**expression** `2**16 / 7`\n\n**Result**\n\n```\nline 1\nline 2\n```",
                                metadata={"title": "calculator(2\\*\\*16 / 7) → line 1 line 2", "status": "done"}),
                 id="multi-line-result-in-a-code-block"),
])
def test_tool_message_says_call_result_and_duration(kwargs: dict[str, Any], expected: gr.ChatMessage) -> None:
    assert tool_message("calculator", {"expression": "2**16 / 7"}, **kwargs) == expected


@pytest.mark.parametrize(("text", "is_block", "expected"), [
    pytest.param("x = 1", False, "`x = 1`", id="span"),
    pytest.param("a`b", False, "``a`b``", id="span-around-a-backtick"),
    pytest.param("`a`", False, "`` `a` ``", id="span-padded-at-backticks"),
    pytest.param("```\nx", True, "````\n```\nx\n````", id="block-longer-than-its-fences"),
])
def test_code_keeps_tool_text_literal(text: str, is_block: bool, expected: str) -> None:
    assert code(text, block=is_block) == expected


def test_stored_messages_become_the_chat_a_live_turn_shows() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "calculator", "arguments": '{"expression": "1/0"}'}}
    stored = [
        {"role": "user", "content": "1/0?"},
        {"role": "assistant", "content": "Let me see.", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "Error: division by zero"},
        {"role": "assistant", "content": "It is undefined."},
    ]
    failed = tool_message("calculator", {"expression": "1/0"}, error="division by zero")
    assert messages_from_store(stored) == [user("1/0?"), answer("Let me see."), failed, answer("It is undefined.")]


def test_header_names_model_server_reachability_and_tools() -> None:
    assert header_html("Qwen/Qwen2.5-7B-Instruct", "http://vllm:8000", False, ["calculator"]) == (
        '<div class="agent-bar"><span class="agent-name">vLLM Agent</span>'
        '<span class="agent-model"><code>Qwen/Qwen2.5-7B-Instruct</code> at http://vllm:8000</span>'
        '<span class="agent-status down">vLLM not reachable</span></div>'
        '<div class="agent-tools">Tools: <code>calculator</code></div>'
    )


def test_the_queue_polls_less_through_attributes_gradio_still_has() -> None:
    with gr.Blocks() as page:
        gr.Markdown("x")
    attributes = set(vars(page._queue))
    poll_queue_less(page)
    assert (page._queue.sleep_when_free, page._queue.progress_update_sleep_when_free) == (
        QUEUE_POLL_S, PROGRESS_POLL_S)
    assert set(vars(page._queue)) == attributes  # set, not added: Gradio still reads these two


def test_stop_settles_pending_calls_and_says_nothing_was_saved() -> None:
    pending = {"role": "assistant", "content": [{"type": "text", "text": "**city** Paris"}],
               "metadata": {"title": "weather(Paris)", "status": "pending"}}
    shown = ChatUI.mark_stopped([{"role": "user", "content": [{"type": "text", "text": "Paris?"}]}, pending])
    assert shown[1:] == [{**pending, "metadata": {"title": "weather(Paris) · stopped", "status": "done"}},
                         answer(STOPPED_NOTE)]
    assert ChatUI.mark_stopped([]) == []


# --- turns ---


async def test_plain_answer_streams_token_by_token_then_gets_its_conversation_id(
        ui: ChatUI, fake_vllm: FakeVLLM) -> None:
    fake_vllm.script("Hello there, how can I help?")
    chats, ids = await chat(ui, "Hi")
    expected = growing([user("Hi")], "Hello there, how can I help?")
    assert chats == [*expected, expected[-1]]
    assert ids[:-1] == [""] * len(expected) and ids[-1]
    assert await ui.agent.store.load_messages(ids[-1]) == [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there, how can I help?"}]


async def test_tool_call_shows_pending_then_its_result_then_the_answer(ui: ChatUI) -> None:
    chats, ids = await chat(ui, "What is 12*7?")
    pending = tool_message("calculator", {"expression": "12*7"})
    done = tool_message("calculator", {"expression": "12*7"}, result="84")
    expected = [[user("What is 12*7?"), pending], [user("What is 12*7?"), done],
                *growing([user("What is 12*7?"), done], "The results: 84.")]
    assert [without_durations(messages) for messages in chats] == [*expected, expected[-1]]
    assert pending.metadata == {"title": "calculator(12\\*7)", "status": "pending"}
    assert done.metadata["title"] == "calculator(12\\*7) → 84"
    assert ids[-1] and set(ids[:-1]) == {""}


async def test_parallel_calls_show_side_by_side_in_call_order(ui: ChatUI) -> None:
    question = "What time is it in Seoul and in New York?"
    chats, ids = await chat(ui, question)
    stored = await ui.agent.store.load_messages(ids[-1])
    results = [message["content"] for message in stored if message["role"] == "tool"]
    calls = [("get_current_time", {"timezone": "Asia/Seoul"}), ("get_current_time", {"timezone": "America/New_York"})]
    pending = [tool_message(name, arguments) for name, arguments in calls]
    done = [tool_message(name, arguments, result=result) for (name, arguments), result in zip(calls, results,
                                                                                            strict=True)]
    shown = [without_durations(messages) for messages in chats]
    assert shown[:2] == [[user(question), pending[0]], [user(question), *pending]]
    assert shown[2] in ([user(question), done[0], pending[1]], [user(question), pending[0], done[1]])
    assert shown[3] == [user(question), *done]
    assert shown[4:] == [*growing([user(question), *done], f"The results: {'; '.join(results)}."), shown[-1]]


async def test_tool_error_is_shown_as_a_failed_call_and_the_turn_goes_on(ui: ChatUI, fake_vllm: FakeVLLM) -> None:
    fake_vllm.script(tool_call_text("get_current_time", {"timezone": "Mars/Olympus"}))
    chats, ids = await chat(ui, "What time is it on Mars?")
    error = "unknown time zone 'Mars/Olympus'; use an IANA name such as 'Asia/Seoul'"
    failed = tool_message("get_current_time", {"timezone": "Mars/Olympus"}, error=error)
    assert failed.metadata["title"] == ("get\\_current\\_time(Mars/Olympus) → failed: unknown time zone "
                                        "'Mars/Olympus'; use a…")
    shown = [without_durations(messages) for messages in chats]
    question = user("What time is it on Mars?")
    assert shown == [[question, tool_message("get_current_time", {"timezone": "Mars/Olympus"})],
                     [question, failed], *growing([question, failed], f"The results: Error: {error}."), shown[-1]]
    assert ids[-1]


async def test_unreachable_vllm_becomes_a_readable_message(chat_ui: UIFactory) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"  # closed again before the turn: nothing listens
    async with chat_ui(vllm_base_url=url) as ui:
        chats, ids = await chat(ui, "Hi", history=[user("Earlier"), answer("Before.")])
    assert chats == [[user("Earlier"), answer("Before."), user("Hi"), answer(
        f"⚠ vLLM is not reachable at {url} — start it with `vllm serve Qwen/Qwen2.5-7B-Instruct {START_VLLM}`")]]
    assert ids == [""]


async def test_vllm_error_that_is_not_about_reachability_shows_the_agents_message(
        ui: ChatUI, fake_vllm: FakeVLLM) -> None:
    fake_vllm.script(Reply(status=400, error_message="top_p must be in (0, 1], got 7.0."))
    chats, ids = await chat(ui, "Hi")
    assert chats == [[user("Hi"), answer("⚠ vLLM answered 400: top_p must be in (0, 1], got 7.0.")]]
    assert ids == [""]


async def test_message_over_the_limit_is_refused_before_vllm_is_called(
        chat_ui: UIFactory, fake_vllm: FakeVLLM) -> None:
    async with chat_ui(vllm_base_url=fake_vllm.url, max_content_chars=10) as ui:
        chats, ids = await chat(ui, "x" * 11)
    assert chats == [[user("x" * 11), answer("⚠ Your message is 11 characters long; the limit is 10.")]]
    assert ids == [""] and fake_vllm.requests == []


async def test_next_turn_continues_the_same_conversation(ui: ChatUI, fake_vllm: FakeVLLM) -> None:
    fake_vllm.script("First.", "Second.")
    first, ids = await chat(ui, "One")
    second, next_ids = await chat(ui, "Two", ids[-1], history=first[-1])
    assert second[-1] == [user("One"), answer("First."), user("Two"), answer("Second.")]
    assert set(next_ids) == {ids[-1]}
    assert [message["content"] for message in fake_vllm.requests[-1].body["messages"][1:]] == ["One", "First.", "Two"]


async def test_deleted_conversation_starts_a_new_one_with_the_message(ui: ChatUI, fake_vllm: FakeVLLM) -> None:
    fake_vllm.script("Fresh start.")
    chats, ids = await chat(ui, "Hello?", "0123456789abcdef", history=[user("Old"), answer("Gone.")])
    assert chats[-1] == [user("Hello?"), answer("Fresh start.")]
    assert ids[-1] not in ("", "0123456789abcdef")


async def test_blank_message_changes_nothing(ui: ChatUI, fake_vllm: FakeVLLM) -> None:
    updates = [update async for update in ui.respond("  ", [answer("Hi.")], "abc")]
    assert updates == [([answer("Hi.")], "abc")]
    assert fake_vllm.requests == []


async def test_cancelled_turn_closes_the_vllm_stream_and_stores_nothing(ui: ChatUI, fake_vllm: FakeVLLM) -> None:
    fake_vllm.script("First.", Reply(text="A slow answer " * 50, token_delay_s=0.05))
    _, ids = await chat(ui, "One")
    first_token = asyncio.Event()

    async def second_turn() -> None:
        async for _ in ui.respond("Two", [user("Two")], ids[-1]):
            first_token.set()

    task = asyncio.create_task(second_turn())  # Gradio runs the handler as a task; Stop cancels it
    await first_token.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(500):  # the fake sees the closed connection on a later turn of its loop
        if fake_vllm.disconnects:
            break
        await asyncio.sleep(0.01)
    assert fake_vllm.disconnects == 1
    assert await ui.agent.store.load_messages(ids[-1]) == [
        {"role": "user", "content": "One"}, {"role": "assistant", "content": "First."}]


async def test_restore_rebuilds_the_chat_a_reload_shows(ui: ChatUI) -> None:
    chats, ids = await chat(ui, "What is 12*7?")
    restored, conversation_id = await ui.restore(ids[-1])
    assert restored == without_durations(chats[-1])
    assert conversation_id == ids[-1]


@pytest.mark.parametrize("conversation_id", ["", "0123456789abcdef"])
async def test_restore_without_a_known_conversation_starts_empty(ui: ChatUI, conversation_id: str) -> None:
    assert await ui.restore(conversation_id) == ([], "")


async def test_header_reports_reachable_vllm_and_the_agents_tools(ui: ChatUI, fake_vllm: FakeVLLM) -> None:
    assert await ui.header() == header_html("Qwen/Qwen2.5-7B-Instruct", fake_vllm.url, True,
                                            [tool.name for tool in ui.agent.registry.tools])

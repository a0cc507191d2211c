"""The Gradio page's handlers without a browser: what the chat shows, event by event, against the fake vLLM."""

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from itertools import accumulate
from typing import Any

import gradio as gr
import pytest
from conftest import tool_call_text
from fake_vllm import FakeVLLM, Reply, tokenize

from agent_app import DoneEvent, ErrorEvent, ReasoningEvent, TokenEvent, ToolCallEvent, ToolResultEvent, create_app
from ui import (
    BUSY_PLACEHOLDER,
    PLACEHOLDER,
    RESTARTED_NOTE,
    STOPPED_NOTE,
    ChatUI,
    TurnView,
    check_message,
    code,
    header_html,
    mark_stopped,
    messages_from_store,
    short_arguments,
    tool_message,
)

UIFactory = Callable[..., Any]
START_VLLM = "--enable-auto-tool-choice --tool-call-parser hermes"
TAB = gr.Request(session_hash="tab")


def user(text: str) -> gr.ChatMessage:
    return gr.ChatMessage(role="user", content=text)


def answer(text: str) -> gr.ChatMessage:
    return gr.ChatMessage(content=text)


def thinking(text: str, *, done: bool) -> gr.ChatMessage:
    return gr.ChatMessage(content=text, metadata={"title": "Thinking", "status": "done" if done else "pending"})



def growing(prefix: list[gr.ChatMessage], text: str) -> list[list[gr.ChatMessage]]:
    """The chats a streamed answer passes through, one fake-vLLM token at a time."""
    return [[*prefix, answer(part)] for part in accumulate(tokenize(text))]


def without_durations(messages: list[Any]) -> list[Any]:
    """Tool durations are measured, so tests compare everything else and check them apart."""
    for message in messages:
        if message.metadata.get("status") == "done" and message.role == "assistant" and "duration" in message.metadata:
            assert isinstance(message.metadata["duration"], float)
    return [replace(m, metadata={k: v for k, v in m.metadata.items() if k != "duration"}) for m in messages]


def as_handed_in(messages: list[gr.ChatMessage]) -> list[dict[str, Any]]:
    """A chat the way Gradio hands the Chatbot's value to a handler."""
    chatbot = gr.Chatbot()
    return chatbot.preprocess(chatbot.postprocess(messages))


def shown_after_each(events: list[Any]) -> list[list[gr.ChatMessage]]:
    """The messages a turn shows after each of its events."""
    view = TurnView()
    shown = []
    for event in events:
        view.apply(event)
        shown.append(list(view.messages))
    return shown


async def chat(ui: ChatUI, text: str, conversation_id: str = "", history: list[Any] | None = None,
               ) -> tuple[list[list[Any]], list[str], list[bool]]:
    """Send one message as ChatInterface does; the chats the page shows (the history, the message, then what the
    turn has added), the tab's conversation ids and whether the turn runs on, update by update."""
    history = history or []
    updates = [update async for update in ui.respond(text, as_handed_in(history), conversation_id, True, False, TAB)]
    return ([[*history, user(text), *turn] for turn, _, _ in updates], [update[1] for update in updates],
            [update[2] for update in updates])


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


def test_stored_thinking_shows_collapsed_before_its_messages_text_and_calls() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "calculator", "arguments": '{"expression": "12*7"}'}}
    stored = [
        {"role": "user", "content": "12*7?"},
        {"role": "assistant", "content": "", "reasoning": "\nA product.\n\n", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "84"},
        {"role": "assistant", "content": "It is 84.", "reasoning": "The tool said 84."},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "You're welcome.", "reasoning": "  "},
    ]
    assert messages_from_store(stored) == [
        user("12*7?"), thinking("A product.", done=True),
        tool_message("calculator", {"expression": "12*7"}, result="84"),
        thinking("The tool said 84.", done=True), answer("It is 84."),
        user("Thanks"), answer("You're welcome."),
    ]


def test_thinking_streams_open_then_collapses_when_its_step_moves_on() -> None:
    calculator = ToolCallEvent(id="c1", name="calculator", arguments={"expression": "12*7"})
    events = [
        ReasoningEvent(content="\n"), ReasoningEvent(content="Let me "), ReasoningEvent(content="compute.\n\n"),
        calculator, ToolResultEvent(id="c1", name="calculator", result="84", error=None, duration_s=0.5),
        ReasoningEvent(content="It is 84."), TokenEvent(content="12*7 is 84."),
    ]
    pending = tool_message("calculator", {"expression": "12*7"})
    done = tool_message("calculator", {"expression": "12*7"}, result="84", duration_s=0.5)
    first_step = thinking("Let me compute.", done=True)
    assert shown_after_each(events) == [
        [],
        [thinking("Let me ", done=False)],
        [thinking("Let me compute.\n\n", done=False)],
        [first_step, pending],
        [first_step, done],
        [first_step, done, thinking("It is 84.", done=False)],
        [first_step, done, thinking("It is 84.", done=True), answer("12*7 is 84.")],
    ]


@pytest.mark.parametrize("end", [
    pytest.param(ErrorEvent(status=504, detail="vLLM stopped sending"), id="error"),
    pytest.param(DoneEvent(conversation_id="c", content=""), id="done"),
])
def test_thinking_collapses_when_the_turn_ends_during_it(end: Any) -> None:
    assert shown_after_each([ReasoningEvent(content="Still thinking"), end])[-1] == [
        thinking("Still thinking", done=True)]


def test_header_names_model_server_reachability_and_tools() -> None:
    assert header_html("Qwen/Qwen2.5-7B-Instruct", "http://vllm:8000", False, [("calculator", "builtin")]) == (
        '<div class="agent-bar"><span class="agent-name">vLLM Agent</span>'
        '<span class="agent-model"><code>Qwen/Qwen2.5-7B-Instruct</code> at http://vllm:8000</span>'
        '<span class="agent-status down">vLLM not reachable</span></div>'
        '<div class="agent-tools">Tools: <code>calculator</code></div>'
    )


def test_header_groups_tools_by_source_built_ins_first() -> None:
    tools = [("files__read", "mcp:files"), ("calculator", "builtin"), ("web__get", "mcp:web"),
             ("get_current_time", "builtin")]
    assert header_html("m", "http://vllm:8000", True, tools).endswith(
        '<div class="agent-tools">Tools: <code>calculator</code> · <code>get_current_time</code> | '
        '<b>files:</b> <code>files__read</code> | <b>web:</b> <code>web__get</code></div>'
    )


def test_blank_message_is_not_sent() -> None:
    assert [check_message(" \n"), check_message("Hi")] == [
        gr.validate(False, "Type a message first."), gr.validate(True, "Type a message first.")]


def test_stop_settles_pending_calls_and_says_nothing_was_saved() -> None:
    pending = tool_message("weather", {"city": "Paris"})
    assert mark_stopped([thinking("Hmm", done=True), pending]) == [
        thinking("Hmm", done=True),
        gr.ChatMessage(content="**city** `Paris`", metadata={"title": "weather(Paris) · stopped", "status": "done"}),
        answer(STOPPED_NOTE),
    ]


# --- turns ---


async def test_plain_answer_streams_token_by_token_with_its_conversation_id_from_the_start(
        ui: ChatUI, fake_vllm: FakeVLLM) -> None:
    fake_vllm.script("Hello there, how can I help?")
    chats, ids, running = await chat(ui, "Hi")
    expected = growing([user("Hi")], "Hello there, how can I help?")
    assert chats == [[user("Hi")], *expected, expected[-1]]
    assert ids == [""] + [ids[-1]] * (len(expected) + 1) and ids[-1]  # the run's, so a reload reattaches
    assert running == [True] * (len(expected) + 1) + [False]
    assert await ui.agent.store.load_messages(ids[-1]) == [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there, how can I help?"}]


async def test_tool_call_shows_pending_then_its_result_then_the_answer(ui: ChatUI) -> None:
    chats, ids, _ = await chat(ui, "What is 12*7?")
    pending = tool_message("calculator", {"expression": "12*7"})
    done = tool_message("calculator", {"expression": "12*7"}, result="84")
    expected = [[user("What is 12*7?")], [user("What is 12*7?"), pending], [user("What is 12*7?"), done],
                *growing([user("What is 12*7?"), done], "The results: 84.")]
    assert [without_durations(messages) for messages in chats] == [*expected, expected[-1]]
    assert pending.metadata == {"title": "calculator(12\\*7)", "status": "pending"}
    assert done.metadata["title"] == "calculator(12\\*7) → 84"
    assert ids[0] == "" and set(ids[1:]) == {ids[-1]} and ids[-1]


async def test_parallel_calls_show_side_by_side_in_call_order(ui: ChatUI) -> None:
    question = "What time is it in Seoul and in New York?"
    chats, ids, _ = await chat(ui, question)
    stored = await ui.agent.store.load_messages(ids[-1])
    results = [message["content"] for message in stored if message["role"] == "tool"]
    calls = [("get_current_time", {"timezone": "Asia/Seoul"}), ("get_current_time", {"timezone": "America/New_York"})]
    pending = [tool_message(name, arguments) for name, arguments in calls]
    done = [tool_message(name, arguments, result=result) for (name, arguments), result in zip(calls, results,
                                                                                            strict=True)]
    shown = [without_durations(messages) for messages in chats]
    assert shown[:3] == [[user(question)], [user(question), pending[0]], [user(question), *pending]]
    assert shown[3] in ([user(question), done[0], pending[1]], [user(question), pending[0], done[1]])
    assert shown[4] == [user(question), *done]
    assert shown[5:] == [*growing([user(question), *done], f"The results: {'; '.join(results)}."), shown[-1]]


async def test_tool_error_is_shown_as_a_failed_call_and_the_turn_goes_on(ui: ChatUI, fake_vllm: FakeVLLM) -> None:
    fake_vllm.script(tool_call_text("get_current_time", {"timezone": "Mars/Olympus"}))
    chats, ids, _ = await chat(ui, "What time is it on Mars?")
    error = "unknown time zone 'Mars/Olympus'; use an IANA name such as 'Asia/Seoul'"
    failed = tool_message("get_current_time", {"timezone": "Mars/Olympus"}, error=error)
    assert failed.metadata["title"] == ("get\\_current\\_time(Mars/Olympus) → failed: unknown time zone "
                                        "'Mars/Olympus'; use a…")
    shown = [without_durations(messages) for messages in chats]
    question = user("What time is it on Mars?")
    assert shown == [[question], [question, tool_message("get_current_time", {"timezone": "Mars/Olympus"})],
                     [question, failed], *growing([question, failed], f"The results: Error: {error}."), shown[-1]]
    assert ids[-1]


async def test_unreachable_vllm_becomes_a_readable_message(chat_ui: UIFactory) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"  # closed again before the turn: nothing listens
    async with chat_ui(vllm_base_url=url) as ui:
        chats, ids, running = await chat(ui, "Hi", history=[user("Earlier"), answer("Before.")])
    before = [user("Earlier"), answer("Before."), user("Hi")]
    assert chats == [before, [*before, answer(
        f"⚠ vLLM is not reachable at {url} — start it with `vllm serve Qwen/Qwen2.5-7B-Instruct {START_VLLM}`")]]
    assert (ids, running) == (["", ""], [True, False])


async def test_vllm_error_that_is_not_about_reachability_shows_the_agents_message(
        ui: ChatUI, fake_vllm: FakeVLLM) -> None:
    fake_vllm.script(Reply(status=400, error_message="top_p must be in (0, 1], got 7.0."))
    chats, ids, running = await chat(ui, "Hi")
    assert chats == [[user("Hi")], [user("Hi"), answer("⚠ vLLM answered 400: top_p must be in (0, 1], got 7.0.")]]
    assert (ids, running) == (["", ""], [True, False])


async def test_message_over_the_limit_is_refused_before_vllm_is_called(
        chat_ui: UIFactory, fake_vllm: FakeVLLM) -> None:
    async with chat_ui(vllm_base_url=fake_vllm.url, max_content_chars=10) as ui:
        chats, ids, _ = await chat(ui, "x" * 11)
    assert chats[-1] == [user("x" * 11), answer("⚠ content is 11 characters; the limit is 10")]
    assert ids == ["", ""] and fake_vllm.requests == []


async def test_next_turn_continues_the_same_conversation(ui: ChatUI, fake_vllm: FakeVLLM) -> None:
    fake_vllm.script("First.", "Second.")
    first, ids, _ = await chat(ui, "One")
    second, next_ids, _ = await chat(ui, "Two", ids[-1], history=first[-1])
    assert second[-1] == [user("One"), answer("First."), user("Two"), answer("Second.")]
    assert set(next_ids) == {ids[-1]}
    assert [message["content"] for message in fake_vllm.requests[-1].body["messages"][1:]] == ["One", "First.", "Two"]


async def test_deleted_conversation_starts_a_new_one_with_the_message(ui: ChatUI, fake_vllm: FakeVLLM) -> None:
    fake_vllm.script("Fresh start.")
    chats, ids, _ = await chat(ui, "Hello?", "0123456789abcdef", history=[user("Old"), answer("Gone.")])
    assert chats[-1] == [user("Old"), answer("Gone."), user("Hello?"), answer("Fresh start."), answer(RESTARTED_NOTE)]
    assert ids[-1] not in ("", "0123456789abcdef")
    assert await ui.agent.store.load_messages(ids[-1]) == [
        {"role": "user", "content": "Hello?"}, {"role": "assistant", "content": "Fresh start."}]


@pytest.mark.parametrize(("toggle", "offered", "sent"), [
    pytest.param(True, True, True, id="on"),
    pytest.param(False, True, False, id="off"),
    pytest.param(True, False, None, id="hidden"),
])
async def test_thinking_toggle_reaches_the_agent_only_when_the_page_offers_it(
        ui: ChatUI, monkeypatch: pytest.MonkeyPatch, toggle: bool, offered: bool, sent: bool | None) -> None:
    calls: list[tuple[str, str, bool | None]] = []

    async def run_events(conversation_id: str, content: str, thinking: bool | None, tab: str) -> AsyncIterator[Any]:
        calls.append((conversation_id, content, thinking))
        yield DoneEvent(conversation_id="c1", content="")

    monkeypatch.setattr(ui, "run_events", run_events)
    assert [update async for update in ui.respond("Hi", [], "", toggle, offered, TAB)][-1] == ([], "c1", False)
    assert calls == [("", "Hi", sent)]


async def test_thinking_toggle_shows_only_for_a_model_that_thinks(ui: ChatUI, monkeypatch: pytest.MonkeyPatch) -> None:
    hidden, hidden_offered = await ui.thinking_toggle()

    async def model_thinks() -> bool:
        return True

    monkeypatch.setattr(ui.agent, "model_thinks", model_thinks, raising=False)
    shown, shown_offered = await ui.thinking_toggle()
    assert [(hidden.visible, hidden_offered), (shown.visible, shown_offered)] == [(False, False), (True, True)]


async def test_a_tab_that_goes_away_leaves_its_turn_running_and_a_reload_shows_the_rest(
        ui: ChatUI, fake_vllm: FakeVLLM) -> None:
    slow = "A slow answer " * 20
    fake_vllm.script("First.", Reply(text=slow, token_delay_s=0.02))
    chats, ids, _ = await chat(ui, "One")
    first_token = asyncio.Event()
    updates: list[Any] = []

    async def second_turn() -> None:
        async for update in ui.respond("Two", [], ids[-1], True, False, TAB):
            if update[0]:
                first_token.set()

    task = asyncio.create_task(second_turn())  # Gradio runs the handler as a task, and cancels it when the tab goes
    await first_token.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    async for update in ui.restore(ids[-1], gr.Request(session_hash="reloaded")):
        updates.append(update)
    assert updates[0] == ([*without_durations(chats[-1]), user("Two")], ids[-1], True)
    assert updates[-1] == ([*without_durations(chats[-1]), user("Two"), answer(slow)], ids[-1], False)
    assert fake_vllm.disconnects == 0
    assert await ui.agent.store.load_messages(ids[-1]) == [
        {"role": "user", "content": "One"}, {"role": "assistant", "content": "First."},
        {"role": "user", "content": "Two"}, {"role": "assistant", "content": slow}]


async def test_stop_ends_the_turn_as_stopped_closes_the_vllm_stream_and_stores_nothing(
        ui: ChatUI, fake_vllm: FakeVLLM) -> None:
    slow = "A slow answer " * 50
    fake_vllm.script(tool_call_text("calculator", {"expression": "1+1"}), Reply(text=slow, token_delay_s=0.05))
    updates = []
    async for update in ui.respond("Tell me", [], "", True, False, TAB):
        updates.append(update)
        if len(update[0]) == 2:  # the call's result, then the first piece of the answer
            ui.stop(TAB)
    done = tool_message("calculator", {"expression": "1+1"}, result="2")
    first = answer(tokenize(slow)[0])
    assert [without_durations(messages) for messages, _, _ in updates[-2:]] == [
        [done, first], [done, first, answer(STOPPED_NOTE)]]
    assert [running for _, _, running in updates[-2:]] == [True, False]
    assert updates[-1][1] == ""  # the run's id while it ran, the tab's own again now that nothing was stored
    for _ in range(500):  # the fake sees the closed connection on a later turn of its loop
        if fake_vllm.disconnects:
            break
        await asyncio.sleep(0.01)
    assert fake_vllm.disconnects == 1
    assert (await ui.agent.store.list_conversations(10, None)).conversations == []


async def test_stop_in_another_tab_leaves_this_one_alone(ui: ChatUI, fake_vllm: FakeVLLM) -> None:
    fake_vllm.script("Fine.")
    updates = []
    async for update in ui.respond("Hi", [], "", True, False, TAB):
        ui.stop(gr.Request(session_hash="another tab"))
        updates.append(update)
    assert updates[-1][0] == [answer("Fine.")] and updates[-1][2] is False


async def test_stop_takes_new_conversations_place_while_a_turn_runs(ui: ChatUI, fake_vllm: FakeVLLM) -> None:
    running = await ui.turn_changed(True)
    over = await ui.turn_changed(False)
    header = header_html("Qwen/Qwen2.5-7B-Instruct", fake_vllm.url, True,
                         [(tool.name, tool.source) for tool in ui.agent.registry.tools])
    assert [getattr(update, "constructor_args", update) for update in running] == [
        {"visible": True}, {"visible": False}, gr.skip(), {"placeholder": BUSY_PLACEHOLDER}]
    assert [getattr(update, "constructor_args", update) for update in over] == [
        {"visible": False}, {"visible": True}, header, {"placeholder": PLACEHOLDER}]


async def test_restore_rebuilds_the_chat_a_reload_shows(ui: ChatUI) -> None:
    chats, ids, _ = await chat(ui, "What is 12*7?")
    assert [update async for update in ui.restore(ids[-1], TAB)] == [(without_durations(chats[-1]), ids[-1], False)]


@pytest.mark.parametrize("conversation_id", ["", "0123456789abcdef"])
async def test_restore_without_a_known_conversation_starts_empty(ui: ChatUI, conversation_id: str) -> None:
    assert [update async for update in ui.restore(conversation_id, TAB)] == [([], "", False)]


async def test_header_reports_reachable_vllm_and_the_agents_tools(ui: ChatUI, fake_vllm: FakeVLLM) -> None:
    assert await ui.header() == header_html("Qwen/Qwen2.5-7B-Instruct", fake_vllm.url, True,
                                            [(tool.name, tool.source) for tool in ui.agent.registry.tools])

"""Gradio chat page at /ui: the agent the API uses, called in-process, with its tool calls shown as they run.

  1. Formatting  pure functions: tool calls -> collapsible messages; stored messages -> the chat
  2. Handlers    ChatUI: the page's event handlers over `app.state.agent` (made by the app's lifespan)
  3. Page        build_page(): layout and event wiring; mount_ui() mounts it with auth and an offline theme

One conversation per tab, kept across reloads: the page keeps the tab's conversation id in the browser's
sessionStorage, which belongs to one tab and survives a reload (localStorage, and so `gr.BrowserState`, is
shared by every tab of the browser: a second tab would open the first one's conversation, and Gradio's
BrowserState never writes an empty value, so "New conversation" could not clear it). On load a small JS
hook hands that id to `ChatUI.restore`, which rebuilds the chat from the store; an unknown id (deleted, or
another database) starts a fresh conversation. The id is only written once a turn has been stored.

Stop cancels the Gradio event: the handler's task is cancelled, `run_turn` is closed, and so is the
upstream vLLM request. The agent writes a turn only when it completes, so a stopped turn leaves the stored
conversation as it was; the page says so and stops any spinner.
"""

import html
import json
import logging
import re
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import gradio as gr
from fastapi import FastAPI
from gradio.events import Dependency

if TYPE_CHECKING:
    from agent_app import Agent, AgentError, Settings, StreamEvent

logger = logging.getLogger(__name__)

# --- 1. Formatting ---

EXAMPLES = ["What is 2**16 / 7?", "What time is it in Seoul and in New York?"]
TITLE_VALUE_CHARS = 40
INLINE_VALUE_CHARS = 80
MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]<>&|~#])")  # what can mark up text in the middle of a line
STOPPED_NOTE = "*Stopped. This turn was not saved, so the agent will not remember it.*"
INTERNAL_ERROR = "Something went wrong on the server; the service log has the details."
QUEUE_POLL_S = 0.01
PROGRESS_POLL_S = 0.1

Shown = dict[str, Any] | gr.ChatMessage  # a message as the Chatbot hands it in, or one we made


def escape_markdown(text: str) -> str:
    """Tool text is data, not markup: `2*3*4` must not turn into italics."""
    return MARKDOWN_SPECIAL.sub(r"\\\1", text)


def shorten(text: str, limit: int = TITLE_VALUE_CHARS) -> str:
    """One line of at most `limit` characters, so a title never wraps."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def plain(value: Any) -> str:
    """An argument value as a person writes it: strings bare, the rest as JSON."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def short_arguments(arguments: dict[str, Any]) -> str:
    """`12*7` for one argument, `a=1, b=x` for several: the collapsed line shows what was asked."""
    if len(arguments) == 1:
        return shorten(plain(next(iter(arguments.values()))))
    return shorten(", ".join(f"{key}={plain(value)}" for key, value in arguments.items()))


def code(text: str, *, block: bool) -> str:
    """Text as a code span or block, with a fence longer than any run of backticks inside it."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    if block:
        fence = "`" * max(3, longest + 1)
        return f"{fence}\n{text}\n{fence}"
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{'`' * (longest + 1)}{pad}{text}{pad}{'`' * (longest + 1)}"


def labelled(label: str, text: str) -> str:
    """`**label** value` for a short value, a code block under the label for a long or multi-line one."""
    if "\n" in text or len(text) > INLINE_VALUE_CHARS:
        return f"**{label}**\n\n{code(text, block=True)}"
    return f"**{label}** {code(text, block=False)}" if text else f"**{label}** *(empty)*"


def tool_message(name: str, arguments: dict[str, Any], *, result: str | None = None, error: str | None = None,
                 duration_s: float | None = None) -> gr.ChatMessage:
    """One tool call as a collapsible message: pending until it has a result or an error."""
    title = f"{name}({short_arguments(arguments)})"
    parts = [labelled(key, plain(value)) for key, value in arguments.items()] or ["*no arguments*"]
    if result is None and error is None:
        return gr.ChatMessage(content="\n\n".join(parts), metadata={"title": escape_markdown(title),
                                                                  "status": "pending"})
    if error is not None:
        title += f" → failed: {shorten(error)}"
        parts.append(f"**Error** {escape_markdown(error)}")
    else:
        title += f" → {shorten(result or '') or '(empty)'}"
        parts.append(labelled("Result", result or ""))
    metadata: dict[str, Any] = {"title": escape_markdown(title), "status": "done"}
    if duration_s is not None:
        metadata["duration"] = round(duration_s, 3)
    return gr.ChatMessage(content="\n\n".join(parts), metadata=metadata)


def stored_arguments(raw: str) -> dict[str, Any]:
    """A stored call's arguments; the agent always stores a JSON object, anything else is shown as is."""
    try:
        arguments = json.loads(raw)
    except ValueError:
        return {"arguments": raw}
    return arguments if isinstance(arguments, dict) else {"arguments": raw}


def messages_from_store(stored: list[dict[str, Any]]) -> list[gr.ChatMessage]:
    """The chat a stored conversation shows: the same messages a live turn built (durations are not stored)."""
    results = {message["tool_call_id"]: message["content"] or "" for message in stored if message["role"] == "tool"}
    shown: list[gr.ChatMessage] = []
    for message in stored:
        if message["role"] == "user":
            shown.append(gr.ChatMessage(role="user", content=message["content"]))
        elif message["role"] == "assistant":
            if message.get("content"):
                shown.append(gr.ChatMessage(content=message["content"]))
            for call in message.get("tool_calls") or []:
                text = results.get(call["id"], "")  # the agent stores a failed call's error as "Error: ..."
                error = text.removeprefix("Error: ") if text.startswith("Error: ") else None
                shown.append(tool_message(call["function"]["name"], stored_arguments(call["function"]["arguments"]),
                                          result=None if error is not None else text, error=error))
    return shown


class TurnView:
    """The messages one turn adds to the chat, rebuilt (never mutated) as the agent's events arrive."""

    def __init__(self) -> None:
        self.messages: list[gr.ChatMessage] = []
        self._calls: dict[str, tuple[int, dict[str, Any]]] = {}

    def apply(self, event: "StreamEvent") -> None:
        """Fold one event in: text grows the answer, a call adds a pending message, a result settles it."""
        if event.type == "token":
            self.add_text(event.content)
        elif event.type == "tool_call":
            self._calls[event.id] = (len(self.messages), event.arguments)
            self.messages.append(tool_message(event.name, event.arguments))
        elif event.type == "tool_result":
            index, arguments = self._calls[event.id]
            self.messages[index] = tool_message(event.name, arguments, result=event.result, error=event.error,
                                                duration_s=event.duration_s)

    def add_text(self, text: str) -> None:
        """Continue the answer, or start a new one after tool calls (the agent's blank line not shown)."""
        last = self.messages[-1] if self.messages else None
        if last is not None and not last.metadata:
            self.messages[-1] = gr.ChatMessage(content=f"{last.content}{text}")
        elif text.strip():
            self.messages.append(gr.ChatMessage(content=text.lstrip()))


def header_html(model: str, url: str, reachable: bool | None, tools: list[str]) -> str:
    """The line above the chat: which model on which server, whether it answers, which tools it has."""
    status = {None: ("checking", "checking vLLM…"), True: ("up", "vLLM reachable"),
              False: ("down", "vLLM not reachable")}[reachable]
    tool_list = " · ".join(f"<code>{html.escape(name)}</code>" for name in tools)
    return (
        '<div class="agent-bar"><span class="agent-name">vLLM Agent</span>'
        f'<span class="agent-model"><code>{html.escape(model)}</code> at {html.escape(url)}</span>'
        f'<span class="agent-status {status[0]}">{status[1]}</span></div>'
        + (f'<div class="agent-tools">Tools: {tool_list}</div>' if tools else "")
    )


# --- 2. Handlers ---


class ChatUI:
    """The page's event handlers, bound to the app whose lifespan creates the agent they call."""

    def __init__(self, app: FastAPI) -> None:
        self._app = app

    @property
    def agent(self) -> "Agent":
        """Looked up per call: the lifespan creates the agent after the page is built."""
        return self._app.state.agent

    async def respond(self, message: str, history: list[Shown],
                      conversation_id: str) -> AsyncIterator[tuple[list[Shown], str]]:
        """Run one turn; `history` already ends with `message`, shown by the page the moment it was sent.

        Yields the chat and the tab's conversation id, which changes only once the turn is stored.
        """
        from agent_app import AgentError, ConversationNotFound  # not at the top: agent_app imports this module

        limit = self.agent.settings.max_content_chars
        if not message.strip():
            yield history, conversation_id
            return
        if len(message) > limit:
            warning = f"⚠ Your message is {len(message)} characters long; the limit is {limit}."
            yield [*history, gr.ChatMessage(content=warning)], conversation_id
            return
        view = TurnView()
        try:
            try:
                turn = await self.agent.open_turn(conversation_id or None)
            except ConversationNotFound:  # deleted through the API since this tab showed it: start afresh
                history, turn = history[-1:], await self.agent.open_turn(None)
            async with aclosing(self.agent.run_turn(turn, message, stream=True)) as events:
                async for event in events:
                    view.apply(event)
                    if event.type == "done":
                        conversation_id = event.conversation_id
                    yield [*history, *view.messages], conversation_id
            return
        except AgentError as exc:
            view.add_text(f"⚠ {await self.explain(exc)}")
        except Exception:
            logger.exception("unexpected error in a chat turn")
            view.add_text(f"⚠ {INTERNAL_ERROR}")
        yield [*history, *view.messages], conversation_id

    async def explain(self, exc: "AgentError") -> str:
        """The agent's message, or how to start vLLM when that is why the turn failed."""
        from agent_app import LLMError  # not at the top: agent_app imports this module

        if isinstance(exc, LLMError) and not await self.agent.llm.is_reachable():
            settings = self.agent.settings
            return (f"vLLM is not reachable at {self.agent.llm.base_url} — start it with `vllm serve "
                    f"{settings.vllm_model} --enable-auto-tool-choice --tool-call-parser hermes`")
        return str(exc)

    async def restore(self, conversation_id: str) -> tuple[list[gr.ChatMessage], str]:
        """On page load: the tab's stored conversation, or a fresh one when the id is unknown."""
        from agent_app import ConversationNotFound  # not at the top: agent_app imports this module

        if not conversation_id:
            return [], ""
        try:
            stored = await self.agent.store.load_messages(conversation_id)
        except ConversationNotFound:
            return [], ""
        return messages_from_store(stored), conversation_id

    async def header(self) -> str:
        """Refreshed on load and after each turn, so the dot says how vLLM is now, not at startup."""
        agent = self.agent
        reachable = await agent.llm.is_reachable()
        return header_html(agent.settings.vllm_model, agent.llm.base_url, reachable,
                           [tool.name for tool in agent.registry.tools])

    @staticmethod
    def mark_stopped(history: list[Shown]) -> list[Shown]:
        """After Stop: no spinner keeps turning, and the chat says the turn was not saved."""
        if not history:
            return history
        shown: list[Shown] = []
        for message in history:
            metadata = (message.get("metadata") or {}) if isinstance(message, dict) else message.metadata
            if metadata.get("status") == "pending":
                message = {**message, "metadata": {**metadata, "status": "done",
                                                   "title": f"{metadata['title']} · stopped"}}
            shown.append(message)
        return [*shown, gr.ChatMessage(content=STOPPED_NOTE)]


# --- 3. Page ---

TAB_KEY = "vllm-agent.conversation"
# A browser that refuses storage (some private modes) still gets a working page, just no resume.
READ_TAB_CONVERSATION = (
    f"() => {{ try {{ return sessionStorage.getItem('{TAB_KEY}') ?? ''; }} catch {{ return ''; }} }}"
)
SAVE_TAB_CONVERSATION = f"(id) => {{ try {{ sessionStorage.setItem('{TAB_KEY}', id ?? ''); }} catch {{}} }}"
THEME = gr.themes.Default(
    primary_hue="indigo", neutral_hue="slate", radius_size="md", spacing_size="sm", text_size="md",
    font=["ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "Roboto", "sans-serif"],
    font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"],
)
CSS = """
.gradio-container { width: 100% !important; max-width: 1000px !important; margin: 0 auto !important; }
.agent-bar { display: flex; flex-wrap: wrap; align-items: baseline; gap: 0.4rem 0.9rem; }
.agent-name { font-weight: 700; font-size: 1.1rem; }
.agent-model { color: var(--body-text-color-subdued); }
.agent-status::before { content: "●"; margin-right: 0.3rem; }
.agent-status.up { color: #15803d; }
.agent-status.down { color: #b91c1c; }
.agent-status.checking { color: var(--body-text-color-subdued); }
.agent-tools { color: var(--body-text-color-subdued); font-size: 0.85rem; margin-top: 0.15rem; }
#new-conversation { align-self: center; }
#chat .thought-group .title { font-family: var(--font-mono); font-size: 0.8rem; color: var(--body-text-color); }
"""


def idle_textbox() -> gr.Textbox:
    return gr.Textbox(interactive=True, submit_btn=True, stop_btn=False, placeholder="Ask the agent…")


def busy_textbox() -> gr.Textbox:
    return gr.Textbox(value="", interactive=False, submit_btn=False, stop_btn=True,
                      placeholder="The agent is working… Stop cancels the turn.")


def start(text: str, history: list[Shown]) -> tuple[gr.Textbox, str, gr.Button, list[Shown]]:
    """Show the message at once and lock the input; the turn itself then runs in the queue."""
    if not text.strip():
        return idle_textbox(), text, gr.Button(), history
    return busy_textbox(), text, gr.Button(interactive=False), [*history, gr.ChatMessage(role="user", content=text)]


def pick(history: list[Shown], example: gr.SelectData) -> tuple[gr.Textbox, str, gr.Button, list[Shown]]:
    """An example prompt is sent as if typed."""
    return start(example.value["text"], history)


@dataclass(frozen=True)
class Widgets:
    """The page's components, named for the wiring."""

    conversation: gr.Textbox
    message: gr.State
    header: gr.HTML
    new: gr.Button
    chatbot: gr.Chatbot
    textbox: gr.Textbox


def layout(settings: "Settings") -> Widgets:
    """Header with the New conversation button, the chat with its examples, one input box."""
    conversation = gr.Textbox(visible=False)  # the tab's conversation id, mirrored into sessionStorage
    message = gr.State("")
    with gr.Row(equal_height=True):
        header = gr.HTML(header_html(settings.vllm_model, settings.vllm_base_url, None, []), scale=1)
        new = gr.Button("New conversation", size="sm", variant="secondary", scale=0, min_width=160,
                        elem_id="new-conversation")
    chatbot = gr.Chatbot(
        elem_id="chat", show_label=False, scale=1, height=None, min_height=300, layout="bubble", buttons=["copy"],
        feedback_options=None, examples=[{"text": text} for text in EXAMPLES], latex_delimiters=[],
        placeholder="**Ask anything.** The agent calls tools when they help, and shows each call as it runs.",
    )
    textbox = gr.Textbox(show_label=False, lines=1, max_lines=6, autofocus=True, submit_btn=True,
                         max_length=settings.max_content_chars, placeholder="Ask the agent…")
    return Widgets(conversation, message, header, new, chatbot, textbox)


def wire_turn(started: Dependency, ui: ChatUI, w: Widgets) -> Dependency:
    """After the input is taken: the streaming turn, then the idle input box; a stopped turn is marked."""
    turn = started.then(ui.respond, [w.message, w.chatbot, w.conversation], [w.chatbot, w.conversation],
                        concurrency_limit=None, show_progress="minimal", api_visibility="private")
    turn.failure(ui.mark_stopped, [w.chatbot], [w.chatbot], queue=False, api_visibility="private")
    finished = turn.then(lambda: (idle_textbox(), gr.Button(interactive=True)), None, [w.textbox, w.new],
                         queue=False, api_visibility="private")
    finished.then(ui.header, None, [w.header], concurrency_limit=None, api_visibility="private")
    return turn


def build_page(ui: ChatUI, settings: "Settings") -> gr.Blocks:
    """The chat page and its events; every event is private: the REST API is the API."""
    with gr.Blocks(title="vLLM Agent", fill_height=True, analytics_enabled=False) as page:
        w = layout(settings)
        taken = [w.textbox, w.message, w.new, w.chatbot]
        turns = [
            wire_turn(w.textbox.submit(start, [w.textbox, w.chatbot], taken, queue=False, api_visibility="private"),
                      ui, w),
            wire_turn(w.chatbot.example_select(pick, [w.chatbot], taken, queue=False, api_visibility="private"),
                      ui, w),
        ]
        w.textbox.stop(None, None, None, cancels=turns, api_visibility="private")
        w.new.click(lambda: ([], ""), None, [w.chatbot, w.conversation], queue=False, api_visibility="private")
        # The trash icon empties the chat, so it starts a new conversation too; during a turn the stream
        # puts the chat and its id back, which keeps the page and the store in step.
        w.chatbot.clear(lambda: "", None, [w.conversation], queue=False, api_visibility="private")
        w.conversation.change(None, [w.conversation], None, js=SAVE_TAB_CONVERSATION, api_visibility="private")
        page.load(ui.restore, [w.conversation], [w.chatbot, w.conversation], js=READ_TAB_CONVERSATION,
                  concurrency_limit=None, api_visibility="private")
        page.load(ui.header, None, [w.header], concurrency_limit=None, api_visibility="private")
    return page


def api_key_check(settings: "Settings") -> Callable[[str, str], bool] | None:
    """Gradio's login form: any user name, the service's API key as the password."""
    if settings.api_key is None:
        return None
    key = settings.api_key.get_secret_value().encode()

    def check(username: str, password: str) -> bool:
        return secrets.compare_digest(password.encode(), key)

    return check


def poll_queue_less(page: gr.Blocks) -> gr.Blocks:
    """Gradio's queue looks for work every 1 ms and for progress every 10 ms while idle (on Linux; 50 and
    100 ms on Windows): an idle service spent 18 ms of CPU a second on it (6 ms with these values), and the
    wakeups go on under API load. Gradio has no setting for it, so its two attributes are set here (a test
    checks that Gradio still has them); a queued UI event may start up to QUEUE_POLL_S later."""
    page._queue.sleep_when_free = QUEUE_POLL_S
    page._queue.progress_update_sleep_when_free = PROGRESS_POLL_S
    return page


def mount_ui(app: FastAPI, settings: "Settings") -> None:
    """Mount the page at /ui; behind a login when API_KEY is set, so it is no way around the API's auth."""
    gr.mount_gradio_app(
        app, poll_queue_less(build_page(ChatUI(app), settings)), path="/ui", auth=api_key_check(settings),
        auth_message="Sign in with any user name and the service's API key as the password.",
        footer_links=[], run_history=False, theme=THEME, css=CSS,
    )

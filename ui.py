"""Gradio chat page at /ui: the agent the API uses, called in-process, with its thinking and tool calls shown live.

  1. Formatting  pure functions: thinking and tool calls -> collapsible messages; stored messages -> the chat
  2. Handlers    ChatUI: the page's event handlers over `app.state.agent` (made by the app's lifespan)
  3. Page        build_page(): a gr.ChatInterface under a header; mount_ui() mounts it with auth and an offline theme

`gr.ChatInterface` runs the turns: it shows the message at once, streams `ChatUI.respond`, runs the examples,
locks the input meanwhile, and keeps the chat it shows as the history it hands `respond`. Stop is the page's
own button, not ChatInterface's: that one cancels the handler, which can then send nothing more, and no event
after a cancel is ordered after ChatInterface's own copy of the chat, so a stopped turn's note could vanish at
the next turn. Here a turn is a run of the service's (`agent_app.Run`), which `respond` follows: Stop cancels
the run, which closes the upstream vLLM request, and `respond` ends the turn itself: spinners stopped, a note
that the turn was not saved. The agent writes a turn only when it completes, so the stored conversation is as
it was. A tab that goes away (closed, reloaded) leaves its run going: the page's turns `continue`.

One conversation per tab, kept across reloads: the page keeps the tab's conversation id in the browser's
sessionStorage, which belongs to one tab and survives a reload (localStorage, and so `gr.BrowserState`, is
shared by every tab of the browser: a second tab would open the first one's conversation, and Gradio's
BrowserState never writes an empty value, so "New conversation" could not clear it). On load a small JS
hook hands that id to `ChatUI.restore`, which rebuilds the chat from the store; an unknown id (deleted, or
another database) starts a fresh conversation; a run of that conversation that is still going is shown to its
end, as it streams. The id goes to `respond` and back as ChatInterface's additional input and output: the run's
while it runs (so that a reload reattaches to it), and back to the one before if the turn was not stored.
Outside a turn, the chat changes only through ChatInterface's `chatbot_value`, which it keeps in step with the
history it hands `respond`.
"""

import html
import json
import re
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import gradio as gr
from fastapi import FastAPI

if TYPE_CHECKING:
    from agent_app import Agent, ErrorEvent, Run, RunEvent, RunRegistry, Settings, StreamEvent

# --- 1. Formatting ---

EXAMPLES = ["What is 2**16 / 7?", "What time is it in Seoul and in New York?"]
TITLE_VALUE_CHARS = 40
INLINE_VALUE_CHARS = 80
MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]<>&|~#])")  # what can mark up text in the middle of a line
THINKING_TITLE = "Thinking"
PLACEHOLDER = "Ask the agent…"
BUSY_PLACEHOLDER = "The agent is working… Stop cancels the turn."
STOPPED_NOTE = "*Stopped. This turn was not saved, so the agent will not remember it.*"
CUT_NOTE = "*The answer was cut at the token limit.*"
CUT_THOUGHT_NOTE = "*The model reached the token limit while thinking, so there is no answer.*"
RESTARTED_NOTE = "*This conversation had been deleted, so the agent answered in a new one without the messages above.*"

Shown = dict[str, Any]  # a chat message as Gradio hands it to a handler
Update = dict[str, Any]  # what gr.skip() returns: leave that output as it is


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


def thinking_message(text: str, *, done: bool) -> gr.ChatMessage:
    """A step's thinking as a collapsible message: open, with a spinner, while it streams; collapsed once done."""
    return gr.ChatMessage(content=text, metadata={"title": THINKING_TITLE, "status": "done" if done else "pending"})


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
            if (message.get("reasoning") or "").strip():
                shown.append(thinking_message(message["reasoning"].strip(), done=True))
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
        self._thinking: int | None = None  # where the step's Thinking message is, while it streams

    def apply(self, event: "StreamEvent") -> None:
        """Fold one event in: thinking and text grow their messages, a call adds a pending message, a result
        settles it. Any event but thinking ends the step's thinking; `done` and `error` add nothing else."""
        if event.type == "reasoning":
            self.add_thinking(event.content)
            return
        self.end_thinking()
        if event.type == "token":
            self.add_text(event.content)
        elif event.type == "tool_call":
            self._calls[event.id] = (len(self.messages), event.arguments)
            self.messages.append(tool_message(event.name, event.arguments))
        elif event.type == "tool_result":
            index, arguments = self._calls[event.id]
            self.messages[index] = tool_message(event.name, arguments, result=event.result, error=event.error,
                                                duration_s=event.duration_s)

    def add_thinking(self, text: str) -> None:
        """Continue the step's thinking, or open a Thinking message for it (blank lines before it not shown)."""
        if self._thinking is not None:
            so_far = self.messages[self._thinking].content
            self.messages[self._thinking] = thinking_message(f"{so_far}{text}", done=False)
        elif text.strip():
            self._thinking = len(self.messages)
            self.messages.append(thinking_message(text.lstrip(), done=False))

    def end_thinking(self) -> None:
        """Collapse the step's Thinking message: the step has moved on to its answer or calls, or the turn ended."""
        if self._thinking is not None:
            text = str(self.messages[self._thinking].content)
            self.messages[self._thinking] = thinking_message(text.rstrip(), done=True)
            self._thinking = None

    def add_text(self, text: str) -> None:
        """Continue the answer, or start a new one after tool calls (the agent's blank line not shown)."""
        last = self.messages[-1] if self.messages else None
        if last is not None and not last.metadata:
            self.messages[-1] = gr.ChatMessage(content=f"{last.content}{text}")
        elif text.strip():
            self.messages.append(gr.ChatMessage(content=text.lstrip()))

    def add_note(self, text: str) -> None:
        """A line of its own after what the turn has shown, such as why it failed."""
        self.messages.append(gr.ChatMessage(content=text))


def header_html(model: str, url: str, reachable: bool | None, tools: list[tuple[str, str]]) -> str:
    """The line above the chat: which model on which server, whether it answers, and its tools (name, source),
    the built-in ones first, then each MCP server's under its name."""
    status = {None: ("checking", "checking vLLM…"), True: ("up", "vLLM reachable"),
              False: ("down", "vLLM not reachable")}[reachable]
    sources = sorted({source for _, source in tools}, key=lambda source: (source != "builtin", source))
    groups = [(f"<b>{html.escape(source.removeprefix('mcp:'))}:</b> " if source != "builtin" else "")
              + " · ".join(f"<code>{html.escape(name)}</code>" for name, of in tools if of == source)
              for source in sources]
    return (
        '<div class="agent-bar"><span class="agent-name">vLLM Agent</span>'
        f'<span class="agent-model"><code>{html.escape(model)}</code> at {html.escape(url)}</span>'
        f'<span class="agent-status {status[0]}">{status[1]}</span></div>'
        + (f'<div class="agent-tools">Tools: {" | ".join(groups)}</div>' if tools else "")
    )


def mark_stopped(messages: list[gr.ChatMessage]) -> list[gr.ChatMessage]:
    """A turn cut short by Stop: no spinner keeps turning, and the chat says the turn was not saved."""
    shown = [replace(message, metadata={**message.metadata, "status": "done",
                                        "title": f"{message.metadata['title']} · stopped"})
             if message.metadata.get("status") == "pending" else message for message in messages]
    return [*shown, gr.ChatMessage(content=STOPPED_NOTE)]


# --- 2. Handlers ---

TurnUpdate = tuple[list[gr.ChatMessage], str, bool]  # the turn's messages, conversation id, whether it runs on


class ChatUI:
    """The page's event handlers, bound to the app whose lifespan creates the agent they call."""

    def __init__(self, app: FastAPI) -> None:
        self._app = app
        self._runs: dict[str, Run] = {}  # the run a tab shows, by Gradio session (one tab), for Stop

    @property
    def agent(self) -> "Agent":
        """Looked up per call: the lifespan creates the agent after the page is built."""
        return self._app.state.agent

    @property
    def runs(self) -> "RunRegistry":
        return self._app.state.runs

    async def run_events(self, conversation_id: str, content: str, thinking: bool | None,
                         tab: str) -> AsyncIterator["RunEvent | StreamEvent"]:
        """One turn as a run, its events as they come; a turn that cannot start is one `error` event.

        The run belongs to the service, not to the tab: it goes on when the tab goes away or reloads (the page's
        turns `continue`), and Stop cancels it. `thinking` (None: the service's THINKING setting) turns the
        model's thinking on or off for this turn.
        """
        import agent_app  # imported here: it imports this module at its top

        try:
            try:
                turn = await self.agent.open_turn(conversation_id or None, content)
            except agent_app.ConversationNotFound:  # deleted through the API since this tab showed it: start afresh
                turn = await self.agent.open_turn(None, content)
        except agent_app.AgentError as exc:
            yield agent_app.error_event(exc)
            return
        run = self.runs.start(turn, content, agent_app.TurnOptions(thinking=thinking))
        async for event in self.follow(run, tab):
            yield event

    async def follow(self, run: "Run", tab: str) -> AsyncIterator["RunEvent | StreamEvent"]:
        """A run's events from its first, while Stop in this tab would cancel it."""
        import agent_app  # imported here: it imports this module at its top

        self._runs[tab] = run
        try:
            async for logged in run.follow(0):
                if logged is not None:
                    yield agent_app.RUN_STREAM_EVENT.validate_json(logged[2])
        finally:
            if self._runs.get(tab) is run:  # an example clicked after the trash icon runs a second turn
                del self._runs[tab]

    async def respond(self, message: str, _history: list[Shown], conversation_id: str, thinking: bool,
                      thinking_offered: bool, request: gr.Request) -> AsyncIterator[TurnUpdate]:
        """ChatInterface's fn: the messages the turn adds, as they grow (the agent has the history in its store)."""
        yield [], conversation_id, True
        choice = thinking if thinking_offered else None
        async for update in self.updates(self.run_events(conversation_id, message, choice, request.session_hash),
                                         conversation_id):
            yield update

    async def updates(self, events: AsyncIterator["RunEvent | StreamEvent"], asked: str) -> AsyncIterator[TurnUpdate]:
        """A turn's messages as its events arrive, with the tab's conversation id and whether the turn runs on.

        The id is the run's while it runs, so that a reload reattaches to it, and stays the one `asked` for when
        the turn is not stored. A turn cut short by Stop ends here too, so ChatInterface keeps the chat that says so.
        """
        import agent_app  # imported here: it imports this module at its top

        view = TurnView()
        conversation_id, over = asked, False
        async for event in events:
            if event.type == "run":
                conversation_id = event.conversation_id
                continue
            if event.type == "error" and event.status == agent_app.RunCancelled.status_code:
                break
            view.apply(event)
            if event.type == "done":
                conversation_id = event.conversation_id
                if event.stop_reason == "length":
                    view.add_note(CUT_NOTE if event.content else CUT_THOUGHT_NOTE)
                if asked and event.conversation_id != asked:
                    view.add_note(RESTARTED_NOTE)
            elif event.type == "error":
                view.add_note(f"⚠ {await self.explain(event)}")
                conversation_id = asked
            over = event.type in ("done", "error")
            yield list(view.messages), conversation_id, not over
        if not over:
            yield mark_stopped(view.messages), asked, False

    def stop(self, request: gr.Request) -> None:
        """Stop: cancel the tab's run, which closes its vLLM request; `updates` then ends it as stopped."""
        run = self._runs.get(request.session_hash)
        if run is not None and run.status == "running":
            run.cancel()

    async def turn_changed(self, running: bool) -> tuple[gr.Button, gr.Button, str | Update, gr.Textbox]:
        """While a turn runs, Stop takes New conversation's place and the locked input says why; after it, the header
        says how vLLM is now. (ChatInterface locks and unlocks the input, and blanks its placeholder.)"""
        header = gr.skip() if running else await self.header()
        placeholder = BUSY_PLACEHOLDER if running else PLACEHOLDER
        return gr.Button(visible=running), gr.Button(visible=not running), header, gr.Textbox(placeholder=placeholder)

    async def explain(self, error: "ErrorEvent") -> str:
        """The error's detail, or how to start vLLM when that is why the turn failed."""
        if error.status in (502, 504) and not await self.agent.llm.is_reachable():
            settings = self.agent.settings
            return (f"vLLM is not reachable at {self.agent.llm.base_url} — start it with `vllm serve "
                    f"{settings.vllm_model} --enable-auto-tool-choice --tool-call-parser hermes`")
        if error.status == 500:
            return f"{error.detail}; the service log has the details."
        return error.detail

    async def restore(self, conversation_id: str, request: gr.Request) -> AsyncIterator[tuple[list[gr.ChatMessage],
                                                                                             str, bool]]:
        """On page load: the tab's stored conversation, or a fresh one when the id is unknown; with the rest of a
        turn that still runs (the page was reloaded during it) as it streams, and whether it runs on."""
        import agent_app  # imported here: it imports this module at its top

        run = self.runs.running(conversation_id) if conversation_id else None
        try:
            stored = await self.agent.store.load_messages(conversation_id) if conversation_id else []
        except agent_app.ConversationNotFound:  # deleted, another database, or a first turn still running
            stored = []
            conversation_id = conversation_id if run is not None else ""
        if run is None:
            yield messages_from_store(stored), conversation_id, False
            return
        shown = [*messages_from_store(stored[: len(run.turn.history)]),  # not the turn, if it was stored meanwhile
                 gr.ChatMessage(role="user", content=run.content)]
        yield shown, conversation_id, True
        async for messages, shown_id, running in self.updates(self.follow(run, request.session_hash), conversation_id):
            yield [*shown, *messages], shown_id, running

    async def header(self) -> str:
        """Refreshed on load and after each turn, so the dot says how vLLM is now, not at startup."""
        agent = self.agent
        reachable = await agent.llm.is_reachable()
        return header_html(agent.settings.vllm_model, agent.llm.base_url, reachable,
                           [(tool.name, tool.source) for tool in agent.registry.tools])

    async def model_thinks(self) -> bool:
        """Whether the served model thinks before it answers; an agent that cannot tell says it does not."""
        model_thinks = getattr(self.agent, "model_thinks", None)
        return model_thinks is not None and await model_thinks()

    async def thinking_toggle(self) -> tuple[gr.Checkbox, bool]:
        """On load: the Thinking toggle, shown only for a model that thinks, and whether it is shown."""
        offered = await self.model_thinks()
        return gr.Checkbox(visible=offered), offered


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
#new-conversation, #stop-turn, #thinking { align-self: center; }
#thinking { flex: 0 0 auto !important; width: max-content !important; }  /* as wide as its label, not a column */
#chat .thought-group .title { font-family: var(--font-mono); font-size: 0.8rem; color: var(--body-text-color); }
#chat { flex-basis: 0 !important; }  /* the chat scrolls, rather than grow and push the input below the fold */
/* ChatInterface offers these, but the agent keeps every turn it has stored: the page would show one thing and
   the agent remember another */
#chat button[aria-label="Retry"], #chat button[aria-label="Undo"] { display: none; }
"""


def check_message(message: str) -> dict[str, Any]:
    """ChatInterface's validator: a blank message is not sent (the API refuses one as well)."""
    return gr.validate(bool(message.strip()), "Type a message first.")


def build_page(ui: ChatUI, settings: "Settings") -> gr.Blocks:
    """The header row above a ChatInterface that runs the turns; every event is private: the REST API is the API."""
    with gr.Blocks(title="vLLM Agent", fill_height=True, analytics_enabled=False) as page:
        conversation = gr.Textbox(visible=False)  # the tab's conversation id, mirrored into sessionStorage
        running = gr.State(False)  # from a turn's first update to its last
        thinking_offered = gr.State(False)
        with gr.Row(equal_height=True):
            header = gr.HTML(header_html(settings.vllm_model, settings.vllm_base_url, None, []), scale=1)
            thinking = gr.Checkbox(True, label="Thinking", visible=False, container=False, elem_id="thinking")
            stop = gr.Button("Stop", size="sm", variant="stop", visible=False, scale=0, min_width=160,
                             elem_id="stop-turn")
            new = gr.Button("New conversation", size="sm", variant="secondary", scale=0, min_width=160,
                            elem_id="new-conversation")
        chat = gr.ChatInterface(
            ui.respond,
            chatbot=gr.Chatbot(
                elem_id="chat", show_label=False, scale=1, height=None, min_height=300, layout="bubble",
                buttons=["copy"], feedback_options=None, latex_delimiters=[],
                placeholder="**Ask anything.** The agent calls tools when they help, and shows each call as it runs.",
            ),
            textbox=gr.Textbox(label="Message", show_label=False, lines=1, max_lines=6, autofocus=True,
                               submit_btn=True, stop_btn=False, max_length=settings.max_content_chars,
                               placeholder=PLACEHOLDER),
            additional_inputs=[conversation, thinking, thinking_offered],
            additional_outputs=[conversation, running],
            examples=[[text] for text in EXAMPLES], validator=check_message,
            concurrency_limit=None, analytics_enabled=False, api_visibility="private",
        )
        stop.click(ui.stop, None, None, queue=False, api_visibility="private")
        running.change(ui.turn_changed, [running], [stop, new, header, chat.textbox], concurrency_limit=None,
                       api_visibility="private")
        new.click(lambda: ([], ""), None, [chat.chatbot_value, conversation], api_visibility="private")
        chat.chatbot.clear(lambda: "", None, [conversation], queue=False, api_visibility="private")
        conversation.change(None, [conversation], None, js=SAVE_TAB_CONVERSATION, api_visibility="private")
        page.load(ui.restore, [conversation], [chat.chatbot_value, conversation, running], js=READ_TAB_CONVERSATION,
                  concurrency_limit=None, api_visibility="private")
        page.load(ui.header, None, [header], concurrency_limit=None, api_visibility="private")
        page.load(ui.thinking_toggle, None, [thinking, thinking_offered], concurrency_limit=None,
                  api_visibility="private")
    return page


def api_key_check(settings: "Settings") -> Callable[[str, str], bool] | None:
    """Gradio's login form: any user name, the service's API key as the password."""
    if settings.api_key is None:
        return None
    key = settings.api_key.get_secret_value().encode()

    def check(username: str, password: str) -> bool:
        return secrets.compare_digest(password.encode(), key)

    return check


def mount_ui(app: FastAPI, settings: "Settings") -> None:
    """Mount the page at /ui; behind a login when API_KEY is set, so it is no way around the API's auth."""
    gr.mount_gradio_app(
        app, build_page(ChatUI(app), settings), path="/ui", auth=api_key_check(settings),
        auth_message="Sign in with any user name and the service's API key as the password.",
        footer_links=[], run_history=False, theme=THEME, css=CSS,
    )

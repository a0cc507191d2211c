"""/v1: the agent as an OpenAI-compatible model, driven by the official openai SDK over real HTTP against the
fake vLLM. Responses are parsed with strict validation into the SDK's own types."""

import asyncio
import html
import json
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import openai
import pytest
from conftest import LiveServer, tool_call_text
from fake_vllm import ADMISSION_MESSAGE, FakeVLLM, Reply
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletion, ChatCompletionChunk

import tools

KEY = "sk-test"
MODEL = "vllm-agent"
HOSTILE = 'He said "hi" & left </details><script>alert(1)</script> <details type="tool_calls">'
CHAT_ID = "5f0c1e9a-2b7d-4c61-9d0e-8a3b2c1d4e5f"


def call_text(*calls: tuple[str, dict[str, Any]]) -> str:
    """Qwen's hermes markup for tool calls, as the fake model writes them."""
    return "\n".join(f"<tool_call>\n{json.dumps({'name': name, 'arguments': args})}\n</tool_call>"
                     for name, args in calls)


def block(name: str, arguments: str, body: str) -> str:
    """Open WebUI's finished tool block, as the golden strings below spell it."""
    return (f'<details type="tool_calls" done="true" id="ID" name="{name}" arguments="{arguments}">\n'
            f"<summary>Tool Executed</summary>\n{body}\n</details>\n")


def without_ids(content: str) -> str:
    return re.sub(r' id="[^"]*"', ' id="ID"', content)


OPEN_CLIENTS: list[openai.AsyncOpenAI] = []


def sdk(server: LiveServer, **options: Any) -> openai.AsyncOpenAI:
    """The async SDK on the service; closed after the test, in the test's event loop."""
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY, _strict_response_validation=True,
                                **options)
    OPEN_CLIENTS.append(client)
    return client


@pytest.fixture(autouse=True)
async def close_clients() -> AsyncIterator[None]:
    yield
    while OPEN_CLIENTS:
        await OPEN_CLIENTS.pop().close()


def sync_sdk(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, _strict_response_validation=True)


@pytest.fixture
def serve(fake_vllm: FakeVLLM, live_server: Callable[..., LiveServer]) -> Callable[..., LiveServer]:
    """The service on the fake vLLM, with an API key: `async with serve(**settings) as server:`."""
    return lambda **settings: live_server(vllm_base_url=fake_vllm.url, api_key=KEY, **settings)


async def both_ways(client: openai.AsyncOpenAI, messages: list[dict[str, Any]],
                    **options: Any) -> tuple[ChatCompletion, list[ChatCompletionChunk]]:
    """The same request non-streamed and streamed (with usage)."""
    whole = await client.chat.completions.create(model=MODEL, messages=messages, **options)
    stream = await client.chat.completions.create(model=MODEL, messages=messages, stream=True,
                                                  stream_options={"include_usage": True}, **options)
    return whole, [chunk async for chunk in stream]


def streamed_content(chunks: list[ChatCompletionChunk]) -> str:
    return "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)


def check_stream_shape(chunks: list[ChatCompletionChunk]) -> None:
    """One id and timestamp, the role first, exactly one finish_reason, the usage chunk last."""
    assert len({(chunk.id, chunk.created, chunk.model) for chunk in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [choice.finish_reason for chunk in chunks for choice in chunk.choices if choice.finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert all(chunk.usage is None for chunk in chunks[:-1])
    assert not any(chunk.choices[0].delta.tool_calls for chunk in chunks if chunk.choices)


# --- The SDK, sync and async, streaming and not ---


async def test_models_list_and_retrieve_parse_into_sdk_types(serve: Callable[..., LiveServer]) -> None:
    async with serve() as server:
        client = sdk(server)
        models = [model async for model in client.models.list()]
        retrieved = await client.models.retrieve(MODEL)
        with pytest.raises(openai.NotFoundError) as missing:
            await client.models.retrieve("gpt-4o")
        sync_models = await asyncio.to_thread(lambda: list(sync_sdk(server).models.list()))
    assert [(model.id, model.object, model.owned_by) for model in models] == [(MODEL, "model", MODEL)]
    assert retrieved == models[0] == sync_models[0]
    assert missing.value.body["code"] == "model_not_found"


async def test_async_stream_and_whole_answer_agree(serve: Callable[..., LiveServer], fake_vllm: FakeVLLM) -> None:
    fake_vllm.token_delay_s = 0.001  # tokens in separate network reads, as from a GPU
    async with serve() as server:
        whole, chunks = await both_ways(sdk(server), [{"role": "user", "content": "what is 12*7?"}])
    assert isinstance(whole, ChatCompletion)
    assert whole.choices[0].finish_reason == "stop" and whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.tool_calls is None
    assert whole.usage is not None and whole.usage.prompt_tokens > 0
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    check_stream_shape(chunks)
    assert chunks[-1].usage == whole.usage
    state = ChatCompletionStreamState()
    for chunk in chunks:
        state.handle_chunk(chunk)
    rebuilt = state.get_final_completion()
    assert rebuilt.choices[0].message.content == streamed_content(chunks)
    assert without_ids(streamed_content(chunks)) == without_ids(whole.choices[0].message.content or "")
    assert whole.choices[0].message.content.endswith("</details>\nThe results: 84.")


async def test_sync_client_streams_and_answers_the_same(serve: Callable[..., LiveServer]) -> None:
    messages: list[Any] = [{"role": "user", "content": "what is 2**10?"}]

    def run(server: LiveServer) -> tuple[ChatCompletion, list[ChatCompletionChunk]]:
        client = sync_sdk(server)
        whole = client.chat.completions.create(model=MODEL, messages=messages)
        with client.chat.completions.create(model=MODEL, messages=messages, stream=True,
                                            stream_options={"include_usage": True}) as stream:
            return whole, list(stream)

    async with serve() as server:
        whole, chunks = await asyncio.to_thread(run, server)
    check_stream_shape(chunks)
    assert without_ids(streamed_content(chunks)) == without_ids(whole.choices[0].message.content or "")
    assert whole.choices[0].message.content.endswith("</details>\nThe results: 1024.")


async def test_without_include_usage_no_usage_chunk_is_sent(serve: Callable[..., LiveServer]) -> None:
    async with serve() as server:
        stream = await sdk(server).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hello"}], stream=True)
        chunks = [chunk async for chunk in stream]
    assert all(chunk.choices and chunk.usage is None for chunk in chunks)
    assert streamed_content(chunks) == "You said: hello"
    assert [chunk.choices[0].finish_reason for chunk in chunks][-1] == "stop"


# --- Open WebUI's rendering: golden content ---

GOLDEN = {
    "one call": (
        [Reply(text=call_text(("calculator", {"expression": "12*7"})))],
        block("calculator", "{&quot;expression&quot;: &quot;12*7&quot;}", "84") + "The results: 84.",
    ),
    "two parallel calls": (
        [Reply(text=call_text(("calculator", {"expression": "12*7"}), ("calculator", {"expression": "2**10"})))],
        block("calculator", "{&quot;expression&quot;: &quot;12*7&quot;}", "84")
        + block("calculator", "{&quot;expression&quot;: &quot;2**10&quot;}", "1024") + "The results: 84; 1024.",
    ),
    "tool error": (
        [Reply(text=call_text(("nope", {})))],
        block("nope", "{}", "Error: unknown tool &#x27;nope&#x27;; available tools: calculator, get_current_time")
        + "The results: Error: unknown tool 'nope'; available tools: calculator, get_current_time.",
    ),
    "text, then a call": (
        [Reply(text="Let me compute.\n" + call_text(("calculator", {"expression": "12*7"})))],
        "Let me compute.\n" + block("calculator", "{&quot;expression&quot;: &quot;12*7&quot;}", "84")
        + "The results: 84.",
    ),
}


@pytest.mark.parametrize("case", sorted(GOLDEN))
async def test_open_webui_rendering_golden(case: str, serve: Callable[..., LiveServer], fake_vllm: FakeVLLM) -> None:
    replies, expected = GOLDEN[case]
    async with serve() as server:
        fake_vllm.script(*replies)
        whole = await sdk(server).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "go"}])
        fake_vllm.script(*replies)
        stream = await sdk(server).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "go"}],
                                                           stream=True)
        chunks = [chunk async for chunk in stream]
    assert without_ids(whole.choices[0].message.content or "") == expected
    assert without_ids(streamed_content(chunks)) == expected
    deltas = [chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices]
    assert all(text.rstrip("\n").endswith("</details>") for text in deltas if "<details" in text)  # whole blocks


HERMES_CALL = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "12*7"}}\n</tool_call>'
QWEN3_STEPS = ("<think>\nI should calculate.\n</think>\n\n" + HERMES_CALL,
               "<think>\nI have the result.\n</think>\n\nThe result is 84.")


async def test_a_thinking_model_streams_its_thoughts_as_reasoning_content(
    live_server: Callable[..., LiveServer]
) -> None:
    """Qwen3 on vLLM 0.33 with `--reasoning-parser qwen3`: thinking as reasoning_content, never in content."""
    async with FakeVLLM(version="0.33", template="qwen3", tool_parser="hermes", reasoning_parser="qwen3") as fake:
        fake.script(*QWEN3_STEPS, *QWEN3_STEPS)
        async with live_server(vllm_base_url=fake.url, vllm_model=fake.model, api_key=KEY) as server:
            whole, chunks = await both_ways(sdk(server), [{"role": "user", "content": "what is 12*7?"}])
    expected = block("calculator", "{&quot;expression&quot;: &quot;12*7&quot;}", "84") + "The result is 84."
    message = whole.choices[0].message
    assert without_ids(message.content or "") == expected
    thought = message.reasoning_content  # type: ignore[attr-defined]
    assert thought.index("I should calculate.") < thought.index("I have the result.")
    deltas = [chunk.choices[0].delta for chunk in chunks if chunk.choices]
    reasoning = "".join(getattr(delta, "reasoning_content", None) or "" for delta in deltas)
    assert reasoning == thought
    first_thought = next(i for i, d in enumerate(deltas) if getattr(d, "reasoning_content", None))
    assert first_thought < next(i for i, d in enumerate(deltas) if d.content)  # thinking comes before the answer
    assert without_ids(streamed_content(chunks)) == expected
    assert not any(tag in (message.content or "") + streamed_content(chunks) for tag in ("<think>", "</think>"))
    check_stream_shape(chunks)


@pytest.fixture
def echo_tool() -> AsyncIterator[None]:
    """A tool that returns its argument: hostile output on demand."""

    async def echo(text: str) -> str:
        """Return the text unchanged.

        Args:
            text: Anything.
        """
        return text

    tools.REGISTRY.register(echo)
    yield
    tools.REGISTRY.remove("echo")


OPEN_WEBUI_BLOCK = re.compile(r'^<details(\s+[^>]*)?>\n<summary>Tool Executed</summary>\n(.*?)\n</details>\n',
                              re.DOTALL)


@pytest.mark.usefixtures("echo_tool")
async def test_hostile_tool_output_stays_inside_its_block(serve: Callable[..., LiveServer],
                                                          fake_vllm: FakeVLLM) -> None:
    fake_vllm.script(Reply(text=call_text(("echo", {"text": HOSTILE}))), Reply(text="Done."))
    async with serve() as server:
        whole = await sdk(server).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "go"}])
    content = without_ids(whole.choices[0].message.content or "")
    escaped = ("He said &quot;hi&quot; &amp; left &lt;/details&gt;&lt;script&gt;alert(1)&lt;/script&gt; "
               "&lt;details type=&quot;tool_calls&quot;&gt;")
    arguments = "{&quot;text&quot;: &quot;" + escaped.replace("&quot;", "\\&quot;") + "&quot;}"
    assert content == block("echo", arguments, escaped) + "Done."
    # Read back as Open WebUI 0.12.4 does: the tag ends at the first '>', values end at the next '"'.
    match = OPEN_WEBUI_BLOCK.match(content)
    assert match is not None and content.count("</details>") == 1 and "<script>" not in content
    attributes = dict(re.findall(r'(\w+)="(.*?)"', match.group(1)))
    assert json.loads(html.unescape(attributes["arguments"])) == {"text": HOSTILE}
    assert html.unescape(match.group(2)) == HOSTILE


@pytest.mark.parametrize(("display", "expected"), [
    ("markdown", "> 🔧 calculator({\"expression\": \"12*7\"}) → 84\n\nThe results: 84."),
    ("none", "The results: 84."),
])
async def test_tool_display_markdown_and_none(display: str, expected: str, serve: Callable[..., LiveServer]) -> None:
    async with serve(agent_tool_display=display) as server:
        whole, chunks = await both_ways(sdk(server), [{"role": "user", "content": "what is 12*7?"}])
    assert whole.choices[0].message.content == streamed_content(chunks) == expected


# --- Conversations ---


async def stored(http: httpx.AsyncClient, server: LiveServer, conversation_id: str) -> list[Any]:
    response = await http.get(f"{server.url}/api/v1/conversations/{conversation_id}",
                              headers={"Authorization": f"Bearer {KEY}"})
    return [(m["role"], m["content"]) for m in response.json()["messages"]] if response.status_code == 200 else []


@pytest.mark.parametrize("header", ["X-Conversation-ID", "X-OpenWebUI-Chat-Id"])
async def test_a_conversation_id_header_keeps_the_history(header: str, serve: Callable[..., LiveServer],
                                                          fake_vllm: FakeVLLM, http: httpx.AsyncClient) -> None:
    async with serve() as server:
        client = sdk(server, default_headers={header: CHAT_ID})
        first = await client.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "my name is Ada"}])
        answer = first.parse().choices[0].message.content
        second = await client.chat.completions.create(model=MODEL, stream=True, messages=[
            {"role": "user", "content": "my name is Ada"}, {"role": "assistant", "content": answer},
            {"role": "user", "content": "what is my name?"}])
        assert streamed_content([chunk async for chunk in second]) == "You said: what is my name?"
        messages = await stored(http, server, CHAT_ID)
    assert first.headers["x-conversation-id"] == CHAT_ID
    assert messages == [("user", "my name is Ada"), ("assistant", "You said: my name is Ada"),
                        ("user", "what is my name?"), ("assistant", "You said: what is my name?")]
    sent = fake_vllm.requests[-1].body["messages"]
    assert [(m["role"], m["content"]) for m in sent[1:]] == messages[:3]  # from the store, not the request


async def test_stateless_requests_use_the_request_history_and_store_nothing(
    serve: Callable[..., LiveServer], fake_vllm: FakeVLLM, http: httpx.AsyncClient
) -> None:
    earlier = block("calculator", "{&quot;expression&quot;: &quot;12*7&quot;}", "84") + "The results: 84."
    async with serve() as server:
        response = await sdk(server).chat.completions.with_raw_response.create(
            model=MODEL, extra_headers={"X-OpenWebUI-Chat-Id": "local:temporary-chat"}, messages=[
                {"role": "system", "content": "Talk like a pirate."},
                {"role": "user", "content": "what is 12*7?"},
                {"role": "assistant", "content": [{"type": "text", "text": earlier}]},
                {"role": "user", "content": "and now?"}])
        listing = (await http.get(f"{server.url}/api/v1/conversations",
                                  headers={"Authorization": f"Bearer {KEY}"})).json()
    assert response.parse().choices[0].message.content == "You said: and now?"
    assert "x-conversation-id" not in response.headers
    assert listing["conversations"] == []
    sent = fake_vllm.requests[-1].body["messages"]
    assert sent[0]["role"] == "system" and sent[0]["content"].endswith("answer concisely.\n\nTalk like a pirate.")
    assert sent[1:] == [{"role": "user", "content": "what is 12*7?"},
                        {"role": "assistant", "content": "The results: 84."},
                        {"role": "user", "content": "and now?"}]


async def test_two_requests_on_one_conversation_get_409_in_openai_shape(serve: Callable[..., LiveServer],
                                                                        fake_vllm: FakeVLLM) -> None:
    attempts: list[str] = []

    async def count(request: Any) -> None:
        attempts.append(request.url.path)

    async with serve() as server:
        client = sdk(server, default_headers={"X-Conversation-ID": "busy-chat"},
                     http_client=openai.DefaultAsyncHttpxClient(event_hooks={"request": [count]}))
        await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "first"}])
        fake_vllm.script(Reply(text="a very slow answer", fault="stall"))
        running = await client.chat.completions.create(model=MODEL, stream=True,
                                                       messages=[{"role": "user", "content": "slow"}])
        first_chunk = await anext(aiter(running))  # the response has started: the conversation is leased
        attempts.clear()
        with pytest.raises(openai.ConflictError) as busy:
            await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "fast"}])
        await running.close()
    assert first_chunk.choices[0].delta.role == "assistant"
    assert busy.value.status_code == 409 and attempts == ["/v1/chat/completions"]  # not retried by the SDK
    assert busy.value.response.headers["x-should-retry"] == "false"
    assert busy.value.body == {"message": "conversation 'busy-chat' is busy with another turn; retry when that "
                                          "turn has finished",
                               "type": "invalid_request_error", "param": None, "code": "conversation_busy"}


@pytest.mark.parametrize("marker", ["header", "shape"])
async def test_a_title_task_with_a_chat_id_is_not_stored(marker: str, serve: Callable[..., LiveServer],
                                                         fake_vllm: FakeVLLM, http: httpx.AsyncClient) -> None:
    prompt = "### Task:\nGenerate a concise title for the chat.\n<chat_history>USER: what is 12*7?</chat_history>"
    task = {"X-OpenWebUI-Task": "title_generation"} if marker == "header" else {}
    async with serve() as server:
        client = sdk(server, default_headers={"X-OpenWebUI-Chat-Id": CHAT_ID})
        await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello"}])
        before = await stored(http, server, CHAT_ID)
        title = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                                     extra_headers=task)
        after = await stored(http, server, CHAT_ID)
    assert title.choices[0].message.content == f"You said: {prompt}"
    assert len(before) == 2 and after == before
    sent = fake_vllm.requests[-1].body
    assert sent["messages"] == [{"role": "user", "content": prompt}] and "tools" not in sent


async def test_a_streamed_task_goes_straight_to_vllm(serve: Callable[..., LiveServer], fake_vllm: FakeVLLM) -> None:
    async with serve() as server:
        stream = await sdk(server, default_headers={"X-OpenWebUI-Task": "moa_response_generation"}).chat.completions \
            .create(model=MODEL, messages=[{"role": "user", "content": "combine these"}], stream=True,
                    stream_options={"include_usage": True}, temperature=0.2)
        chunks = [chunk async for chunk in stream]
    check_stream_shape(chunks)
    assert streamed_content(chunks) == "You said: combine these"
    assert fake_vllm.requests[-1].body["temperature"] == 0.2 and "tools" not in fake_vllm.requests[-1].body


# --- What clients send ---


async def test_client_tools_are_ignored_and_sampling_is_honoured(serve: Callable[..., LiveServer],
                                                                 fake_vllm: FakeVLLM) -> None:
    client_tool = {"type": "function", "function": {"name": "get_current_timestamp", "parameters": {}}}
    async with serve() as server:
        whole = await sdk(server).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hello", "name": "ada"}], tools=[client_tool],
            tool_choice="auto", temperature=0.3, max_completion_tokens=77, seed=5, user="u-1",
            metadata={"chat": "x"})
    assert whole.choices[0].message.content == "You said: hello"
    sent = fake_vllm.requests[-1].body
    assert [tool["function"]["name"] for tool in sent["tools"]] == ["calculator", "get_current_time"]
    assert (sent["temperature"], sent["max_tokens"], sent["seed"]) == (0.3, 77, 5)
    assert "user" not in sent and "metadata" not in sent


async def test_an_error_after_the_stream_started_is_a_final_error_frame(serve: Callable[..., LiveServer],
                                                                          fake_vllm: FakeVLLM) -> None:
    fake_vllm.script(Reply(text="partial answer that breaks", fault="stream_error"))
    async with serve() as server:
        stream = await sdk(server).chat.completions.create(model=MODEL, stream=True,
                                                           messages=[{"role": "user", "content": "hello"}])
        chunks = []
        with pytest.raises(openai.APIError) as failed:
            async for chunk in stream:
                chunks.append(chunk)
    assert not isinstance(failed.value, openai.APIStatusError)
    assert failed.value.body["type"] == "server_error" and failed.value.body["code"] == "upstream_error"
    assert all(choice.finish_reason is None for chunk in chunks for choice in chunk.choices)


@pytest.mark.parametrize("tool_ran", [False, True], ids=["before-a-tool", "after-a-tool"])
async def test_a_busy_vllm_is_retried_by_the_sdk_only_while_no_tool_has_run(
        tool_ran: bool, serve: Callable[..., LiveServer], fake_vllm: FakeVLLM) -> None:
    """vLLM's admission control answers 503: a turn that ran no tool yet may be sent again, one that ran tools
    may not (the SDK would run them again)."""
    busy = Reply(status=503, error_message=ADMISSION_MESSAGE)
    fake_vllm.script(*([tool_call_text("calculator", {"expression": "6*7"})] if tool_ran else []), busy,
                     "The answer is 42.")
    async with serve(vllm_max_retries=0) as server:
        client = sdk(server, max_retries=1)
        if tool_ran:
            with pytest.raises(openai.InternalServerError) as failed:
                await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "6*7?"}])
        else:
            answer = await client.chat.completions.create(model=MODEL,
                                                          messages=[{"role": "user", "content": "6*7?"}])
    if tool_ran:
        assert failed.value.status_code == 503 and failed.value.response.headers["x-should-retry"] == "false"
        assert len(fake_vllm.requests) == 2  # the tool's step and the refused one; nothing sent again
    else:
        assert answer.choices[0].message.content == "The answer is 42."
        assert len(fake_vllm.requests) == 2  # refused once, then answered on the SDK's retry


async def test_a_failed_turn_is_not_retried_by_the_sdk(serve: Callable[..., LiveServer], fake_vllm: FakeVLLM) -> None:
    fake_vllm.script(*[Reply(status=500, error_message="engine died")] * 3)
    async with serve(vllm_max_retries=0) as server:
        with pytest.raises(openai.InternalServerError) as failed:
            await sdk(server).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello"}])
    assert failed.value.status_code == 502 and failed.value.response.headers["x-should-retry"] == "false"
    assert len(fake_vllm.requests) == 1


def chat_body(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hello"}]} | fields


BAD_INPUT: dict[str, tuple[dict[str, Any], int, str | None]] = {  # request, status, param
    "another model": ({"json": chat_body(model="gpt-4o")}, 404, None),
    "n > 1": ({"json": chat_body(n=2)}, 400, "n"),
    "logprobs": ({"json": chat_body(logprobs=True)}, 400, "logprobs"),
    "top_logprobs": ({"json": chat_body(top_logprobs=3)}, 400, "logprobs"),
    "forced tool call": ({"json": chat_body(tool_choice="required")}, 400, "tool_choice"),
    "named tool call": ({"json": chat_body(tool_choice={"type": "function", "function": {"name": "x"}})}, 400,
                        "tool_choice"),
    "JSON output": ({"json": chat_body(response_format={"type": "json_object"})}, 400, "response_format"),
    "audio output": ({"json": chat_body(modalities=["text", "audio"])}, 400, "modalities"),
    "an image": ({"json": chat_body(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}]}])}, 400, "messages[0].content"),
    "last message from the assistant": ({"json": chat_body(messages=[{"role": "assistant", "content": "hi"}])}, 422,
                                        "messages"),
    "empty last message": ({"json": chat_body(messages=[{"role": "user", "content": "  "}])}, 422, "messages"),
    "NUL": ({"json": chat_body(messages=[{"role": "user", "content": "a\x00b"}])}, 422, "messages[0].content"),
    "no messages": ({"json": chat_body(messages=[])}, 422, None),
    "unknown role": ({"json": chat_body(messages=[{"role": "robot", "content": "hi"}])}, 422, None),
    "no model": ({"json": {"messages": [{"role": "user", "content": "hello"}]}}, 422, None),
    "temperature out of range": ({"json": chat_body(temperature=5)}, 422, None),
    "malformed JSON": ({"content": b'{"model": ', "headers": {"Content-Type": "application/json"}}, 422, None),
    "not JSON": ({"content": b"model=vllm-agent", "headers": {"Content-Type": "text/plain"}}, 415, None),
    "bad conversation id": ({"json": chat_body(), "headers": {"X-Conversation-ID": "../etc"}}, 422,
                            "X-Conversation-ID"),
    "message too long": ({"json": chat_body(messages=[{"role": "user", "content": "x" * 40_001}])}, 413, None),
    "body too large": ({"json": chat_body(messages=[{"role": "user", "content": "x" * 300_000}])}, 413, None),
    "no API key": ({"json": chat_body(), "headers": {"Authorization": ""}}, 401, None),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
async def test_bad_input_gets_its_status_in_openai_shape(case: str, serve: Callable[..., LiveServer],
                                                         http: httpx.AsyncClient) -> None:
    request, status, param = BAD_INPUT[case]
    headers = {"Authorization": f"Bearer {KEY}"} | request.get("headers", {})
    async with serve(max_content_chars=40_000) as server:
        response = await http.post(f"{server.url}/v1/chat/completions", headers=headers,
                                   **{k: v for k, v in request.items() if k != "headers"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param and error["message"]
    assert response.headers["x-should-retry"] == "false"


async def test_other_routes_and_methods_under_v1_answer_in_openai_shape(serve: Callable[..., LiveServer],
                                                                        http: httpx.AsyncClient) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    async with serve() as server:
        wrong_method = await http.get(f"{server.url}/v1/chat/completions", headers=auth)
        no_route = await http.post(f"{server.url}/v1/completions", headers=auth, json={})
        no_key = await http.get(f"{server.url}/v1/models")
        api_unchanged = await http.post(f"{server.url}/api/v1/chat", headers=auth, json={})
    assert (wrong_method.status_code, no_route.status_code, no_key.status_code) == (405, 404, 401)
    assert all(set(r.json()["error"]) == {"message", "type", "param", "code"}
               for r in (wrong_method, no_route, no_key))
    assert no_key.headers["www-authenticate"] == "Bearer"
    assert api_unchanged.status_code == 422 and "detail" in api_unchanged.json()


async def test_an_unexpected_error_is_a_500_in_openai_shape_that_is_not_retried(
    serve: Callable[..., LiveServer], http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with serve() as server:
        async def broken_turn(*_args: Any, **_options: Any) -> AsyncIterator[Any]:
            raise RuntimeError("a bug")
            yield

        monkeypatch.setattr(server.app.state.agent, "run_turn", broken_turn)
        response = await http.post(f"{server.url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                                   json=chat_body())
    assert response.status_code == 500
    assert response.json() == {"error": {"message": "internal error", "type": "server_error", "param": None,
                                         "code": "internal_error"}}
    assert response.headers["x-should-retry"] == "false" and response.headers["x-request-id"]


async def test_browser_pages_can_read_the_ids_and_retry_after(serve: Callable[..., LiveServer],
                                                              http: httpx.AsyncClient) -> None:
    async with serve() as server:
        response = await http.get(f"{server.url}/v1/models", headers={
            "Origin": "http://localhost:5173", "Authorization": f"Bearer {KEY}"})
    exposed = {name.strip().lower() for name in response.headers["access-control-expose-headers"].split(",")}
    assert {"x-request-id", "x-conversation-id", "retry-after"} <= exposed

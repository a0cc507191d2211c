"""The fake vLLM, driven over real HTTP, against /work/shared/vllm-protocol.md (section numbers refer to it)."""

import asyncio
import json
import re
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fake_vllm import FakeVLLM, Reply, tokenize

MODEL = "Qwen/Qwen2.5-7B-Instruct"
CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "hi"}]
TOOL_ID = re.compile(r"chatcmpl-tool-[0-9a-f]{32}")
WEATHER = {"type": "function", "function": {
    "name": "get_current_weather", "description": "Get the current weather in a given location",
    "parameters": {"type": "object", "properties": {"location": {"type": "string"}, "unit": {"type": "string"}},
                   "required": ["location"]}}}
CALCULATOR = {"type": "function", "function": {
    "name": "calculator", "description": "Evaluate an arithmetic expression.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}
CLOCK = {"type": "function", "function": {
    "name": "get_current_time", "description": "Return the current date and time in a time zone.",
    "parameters": {"type": "object", "properties": {"timezone": {"type": "string"}}}}}
SYSTEM_TOOLS_HEAD = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
SYSTEM_TOOLS_TAIL = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\n</tool_call><|im_end|>\n"
)


def hermes(name: str, arguments: dict[str, Any]) -> str:
    """A call exactly as Qwen2.5 writes it (section 6)."""
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}\n</tool_call>"


WEATHER_CALL = {"location": "Boston, MA", "unit": "fahrenheit"}
QWEN_PARALLEL = hermes("get_current_temperature", {"location": "San Francisco, CA, USA"}) + "\n" + hermes(
    "get_temperature_date", {"location": "San Francisco, CA, USA", "date": "2024-10-01"})


def request(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": HI, **fields}


def arguments_delta(fragment: str, index: int = 0) -> dict[str, Any]:
    return {"tool_calls": [{"index": index, "function": {"arguments": fragment}}]}


def name_delta(name: str, index: int = 0) -> dict[str, Any]:
    return {"tool_calls": [{"id": "TOOL-ID", "type": "function", "index": index, "function": {"name": name}}]}


def without_tool_ids(value: Any) -> Any:
    """Replace the random tool-call ids; only v0.11-shaped ones (32 hex digits) are replaced."""
    return json.loads(TOOL_ID.sub("TOOL-ID", json.dumps(value)))


def sse_payloads(text: str) -> list[str]:
    """The data of each event, checking the exact `data: <payload>\\n\\n` framing of section 3."""
    assert text.endswith("\n\n")
    events = text[:-2].split("\n\n")
    assert all(event.startswith("data: ") and "\n" not in event for event in events)
    return [event.removeprefix("data: ") for event in events]


def error(message: str, err_type: str = "BadRequestError", code: int = 400) -> dict[str, Any]:
    return {"error": {"message": message, "type": err_type, "param": None, "code": code}}


@asynccontextmanager
async def serving(**options: Any) -> AsyncIterator[tuple[FakeVLLM, httpx.AsyncClient]]:
    async with FakeVLLM(**options) as fake, httpx.AsyncClient(base_url=fake.url, timeout=5) as client:
        yield fake, client


@pytest.fixture
async def fake() -> AsyncIterator[FakeVLLM]:
    async with FakeVLLM() as server:
        yield server


@pytest.fixture
async def client(fake: FakeVLLM) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=fake.url, timeout=5) as http:
        yield http


async def prompt_tokens(client: httpx.AsyncClient, **fields: Any) -> int:
    response = await client.post("/tokenize", json={"model": MODEL, "messages": HI, **fields})
    return response.json()["count"]


async def stream(client: httpx.AsyncClient, payload: dict[str, Any]) -> list[Any]:
    """POST with stream=true; the parsed chunks, then the literal "[DONE]"."""
    response = await client.post(CHAT, json={**payload, "stream": True})
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
    return [data if data == "[DONE]" else json.loads(data) for data in sse_payloads(response.text)]


def deltas(chunks: list[Any]) -> list[dict[str, Any]]:
    """The deltas between the role chunk and the finish chunk, tool ids normalised."""
    finish = next(i for i, chunk in enumerate(chunks) if chunk["choices"][0]["finish_reason"])
    return without_tool_ids([chunk["choices"][0]["delta"] for chunk in chunks[1:finish]])


def finish_chunk(chunks: list[Any]) -> dict[str, Any]:
    return next(chunk for chunk in chunks if chunk["choices"] and chunk["choices"][0]["finish_reason"])


def streamed_calls(chunks: list[Any]) -> dict[int, tuple[str, str]]:
    """Rebuild calls by index, as clients must (section 3): name once, arguments concatenated."""
    names: dict[int, str] = {}
    arguments: dict[int, str] = {}
    for delta in deltas(chunks):
        for call in delta.get("tool_calls", []):
            if "name" in call["function"]:
                assert call["index"] not in names, "name sent twice"
                names[call["index"]] = call["function"]["name"]
            arguments[call["index"]] = arguments.get(call["index"], "") + call["function"].get("arguments", "")
    return {index: (name, arguments.get(index, "")) for index, name in names.items()}


async def poll(condition: Callable[[], bool]) -> None:
    """Wait up to 2 s for a server-side effect of something the client did."""
    for _ in range(200):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached in 2 s")


# Non-streaming answers (section 2).


async def test_plain_answer_has_every_v011_key_and_empty_tool_calls(client: httpx.AsyncClient) -> None:
    response = await client.post(CHAT, json=request())
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert re.fullmatch(r"chatcmpl-[0-9a-f]{32}", body["id"])
    prompt = await prompt_tokens(client)
    assert response.text == (
        f'{{"id":"{body["id"]}","object":"chat.completion","created":{body["created"]},"model":"{MODEL}",'
        '"choices":[{"index":0,"message":{"role":"assistant","content":"You said: hi","refusal":null,'
        '"annotations":null,"audio":null,"function_call":null,"tool_calls":[],"reasoning_content":null},'
        '"logprobs":null,"finish_reason":"stop","stop_reason":null,"token_ids":null}],"service_tier":null,'
        f'"system_fingerprint":null,"usage":{{"prompt_tokens":{prompt},"total_tokens":{prompt + 5},'
        '"completion_tokens":5,"prompt_tokens_details":null},"prompt_logprobs":null,"prompt_token_ids":null,'
        '"kv_transfer_params":null}'
    )


async def test_single_call_has_null_content_and_string_arguments(fake: FakeVLLM, client: httpx.AsyncClient) -> None:
    fake.script(hermes("get_current_weather", WEATHER_CALL))
    body = (await client.post(CHAT, json=request(tools=[WEATHER]))).json()
    assert without_tool_ids(body["choices"][0]) == {
        "index": 0, "logprobs": None, "finish_reason": "tool_calls", "stop_reason": None, "token_ids": None,
        "message": {"role": "assistant", "content": None, "refusal": None, "annotations": None, "audio": None,
                    "function_call": None, "reasoning_content": None, "tool_calls": [
                        {"id": "TOOL-ID", "type": "function",
                         "function": {"name": "get_current_weather", "arguments": json.dumps(WEATHER_CALL)}}]},
    }


async def test_parallel_calls_keep_generation_order_with_distinct_ids(fake: FakeVLLM,
                                                                      client: httpx.AsyncClient) -> None:
    fake.script(QWEN_PARALLEL)
    message = (await client.post(CHAT, json=request(tools=[WEATHER]))).json()["choices"][0]["message"]
    assert message["content"] is None
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]] == [
        ("get_current_temperature", '{"location": "San Francisco, CA, USA"}'),
        ("get_temperature_date", '{"location": "San Francisco, CA, USA", "date": "2024-10-01"}'),
    ]
    assert len({call["id"] for call in message["tool_calls"]}) == 2


async def test_text_before_the_first_call_is_content_and_text_after_is_dropped(
    fake: FakeVLLM, client: httpx.AsyncClient
) -> None:
    fake.script("Let me check.\n" + hermes("get_current_weather", WEATHER_CALL) + "\nDone.")
    message = (await client.post(CHAT, json=request(tools=[WEATHER]))).json()["choices"][0]["message"]
    assert (message["content"], len(message["tool_calls"])) == ("Let me check.\n", 1)


async def test_arguments_are_reserialized_with_spaces_and_raw_non_ascii(fake: FakeVLLM,
                                                                         client: httpx.AsyncClient) -> None:
    fake.script('<tool_call>\n{"name":"get_current_weather","arguments":{"location":"\\uc11c\\uc6b8","days":2}}'
                "\n</tool_call>")
    message = (await client.post(CHAT, json=request(tools=[WEATHER]))).json()["choices"][0]["message"]
    assert message["tool_calls"][0]["function"]["arguments"] == '{"location": "서울", "days": 2}'


@pytest.mark.parametrize("text", [
    pytest.param("<tool_call>\n{oops}\n</tool_call>", id="bad-json"),
    pytest.param('<tool_call>\n{"name": "get_current_weather", "parameters": {}}\n</tool_call>', id="parameters"),
    pytest.param('<tool_call>\n{"name": "a", "arguments": {}}\n{"name": "b", "arguments": {}}\n</tool_call>',
                 id="extra-data"),
    pytest.param(hermes("get_current_weather", WEATHER_CALL) + "\n<tool_call>\n{oops}\n</tool_call>",
                 id="one-bad-block-spoils-all"),
])
async def test_unparsable_call_leaves_the_whole_text_in_content(text: str, fake: FakeVLLM,
                                                               client: httpx.AsyncClient) -> None:
    fake.script(text)
    choice = (await client.post(CHAT, json=request(tools=[WEATHER]))).json()["choices"][0]
    assert (choice["message"]["content"], choice["message"]["tool_calls"], choice["finish_reason"]) == (
        text, [], "stop")


@pytest.mark.parametrize("fields", [
    pytest.param({}, id="no-tools"),
    pytest.param({"tools": [WEATHER], "tool_choice": "none"}, id="tool-choice-none"),
])
async def test_without_parsing_the_tags_come_back_verbatim(fields: dict[str, Any], fake: FakeVLLM,
                                                           client: httpx.AsyncClient) -> None:
    raw = hermes("get_current_weather", WEATHER_CALL)
    fake.script(raw)
    choice = (await client.post(CHAT, json=request(**fields))).json()["choices"][0]
    assert (choice["message"]["content"], choice["message"]["tool_calls"], choice["finish_reason"]) == (
        raw, [], "stop")


async def test_tool_choice_none_still_renders_the_tools(fake: FakeVLLM, client: httpx.AsyncClient) -> None:
    await client.post(CHAT, json=request(tools=[WEATHER], tool_choice="none"))
    assert SYSTEM_TOOLS_HEAD in (fake.requests[0].prompt or "")


@pytest.mark.parametrize("fields", [
    pytest.param({"tools": [WEATHER]}, id="implied-auto"),
    pytest.param({"tools": [WEATHER], "tool_choice": "auto"}, id="explicit-auto"),
])
async def test_without_tool_parser_auto_tool_choice_is_refused(fields: dict[str, Any]) -> None:
    async with serving(tool_parser=False) as (fake, client):
        response = await client.post(CHAT, json=request(**fields))
    assert (response.status_code, response.json()) == (400, error(
        '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set'))
    assert fake.remaining == 0 and fake.requests[0].prompt is None


async def test_flipping_tool_parser_off_at_runtime_passes_raw_text_through(fake: FakeVLLM,
                                                                          client: httpx.AsyncClient) -> None:
    raw = hermes("get_current_weather", WEATHER_CALL)
    fake.tool_parser = False
    fake.script(raw)
    assert (await client.post(CHAT, json=request(tools=[WEATHER], tool_choice="none"))).json()[
        "choices"][0]["message"]["content"] == raw


async def test_finish_reason_length_from_the_script_or_max_tokens(fake: FakeVLLM, client: httpx.AsyncClient) -> None:
    fake.script(Reply(text="cut short", finish_reason="length"), "one two three four five")
    scripted = (await client.post(CHAT, json=request())).json()
    capped = (await client.post(CHAT, json=request(max_tokens=3))).json()
    assert (scripted["choices"][0]["finish_reason"], scripted["usage"]["completion_tokens"]) == ("length", 2)
    assert (capped["choices"][0]["message"]["content"], capped["choices"][0]["finish_reason"],
            capped["usage"]["completion_tokens"]) == ("one two three", "length", 3)


async def test_call_cut_by_max_tokens_stays_content(fake: FakeVLLM, client: httpx.AsyncClient) -> None:
    fake.script(hermes("get_current_weather", WEATHER_CALL))
    choice = (await client.post(CHAT, json=request(tools=[WEATHER], max_tokens=12))).json()["choices"][0]
    assert choice["finish_reason"] == "length"
    assert choice["message"]["tool_calls"] == [] and choice["message"]["content"].startswith("<tool_call>\n{")


async def test_x_request_id_becomes_the_completion_id(client: httpx.AsyncClient) -> None:
    response = await client.post(CHAT, json=request(), headers={"X-Request-Id": "abc-123"})
    assert response.json()["id"] == "chatcmpl-abc-123"


async def test_prompt_tokens_override_only_changes_usage(fake: FakeVLLM, client: httpx.AsyncClient) -> None:
    fake.script(Reply(text="ok", prompt_tokens=7))
    assert (await client.post(CHAT, json=request())).json()["usage"] == {
        "prompt_tokens": 7, "total_tokens": 9, "completion_tokens": 2, "prompt_tokens_details": None}


# Streaming (section 3).


async def test_plain_stream_is_byte_exact(client: httpx.AsyncClient) -> None:
    response = await client.post(CHAT, json=request(stream=True, stream_options={"include_usage": True}))
    first = json.loads(sse_payloads(response.text)[0])
    head = (f'data: {{"id":"{first["id"]}","object":"chat.completion.chunk","created":{first["created"]},'
            f'"model":"{MODEL}","choices":')
    prompt = await prompt_tokens(client)
    tokens = ["You", " said", ":", " hi"]
    assert response.text == (
        head + '[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}],'
        '"prompt_token_ids":null}\n\n'
        + "".join(head + f'[{{"index":0,"delta":{{"content":"{token}"}},"logprobs":null,"finish_reason":null,'
                  '"token_ids":null}]}\n\n' for token in tokens)
        + head + '[{"index":0,"delta":{"content":""},"logprobs":null,"finish_reason":"stop","stop_reason":null,'
        '"token_ids":null}]}\n\n'
        + head + f'[],"usage":{{"prompt_tokens":{prompt},"total_tokens":{prompt + 5},"completion_tokens":5}}}}\n\n'
        "data: [DONE]\n\n"
    )


async def test_single_call_streams_like_section_3b(fake: FakeVLLM, client: httpx.AsyncClient) -> None:
    fake.script(hermes("get_current_weather", WEATHER_CALL))
    chunks = await stream(client, request(tools=[WEATHER], stream_options={"include_usage": True}))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert deltas(chunks) == [
        name_delta("get_current_weather"), arguments_delta('{"location": "'), arguments_delta("Boston"),
        arguments_delta(","), arguments_delta(" MA"), arguments_delta('",'), arguments_delta(' "'),
        arguments_delta("unit"), arguments_delta('":'), arguments_delta(' "'), arguments_delta("fahrenheit"),
        arguments_delta('"}'),
    ]
    assert finish_chunk(chunks)["choices"] == [{"index": 0, "delta": {"content": ""}, "logprobs": None,
                                                "finish_reason": "tool_calls", "stop_reason": None,
                                                "token_ids": None}]
    assert [chunks[-2]["choices"], chunks[-1]] == [[], "[DONE]"]
    assert {(c["id"], c["created"], c["model"]) for c in chunks[:-1]} == {
        (chunks[0]["id"], chunks[0]["created"], MODEL)}


async def test_parallel_calls_stream_like_section_3c(fake: FakeVLLM, client: httpx.AsyncClient) -> None:
    fake.script(QWEN_PARALLEL, QWEN_PARALLEL)
    chunks = await stream(client, request(tools=[WEATHER]))
    message = (await client.post(CHAT, json=request(tools=[WEATHER]))).json()["choices"][0]["message"]
    sent = deltas(chunks)
    assert sent[:3] == [name_delta("get_current_temperature"), arguments_delta('{"location": "'),
                        arguments_delta("San")]
    boundary = sent.index({"content": "\n"})
    assert sent[boundary - 1: boundary + 3] == [arguments_delta('"}'), {"content": "\n"},
                                                name_delta("get_temperature_date", 1),
                                                arguments_delta('{"location": "', 1)]
    assert [delta for delta in sent if "content" in delta] == [{"content": "\n"}]
    assert streamed_calls(chunks) == {
        index: (call["function"]["name"], call["function"]["arguments"])
        for index, call in enumerate(message["tool_calls"])}
    assert finish_chunk(chunks)["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[-1] == "[DONE]" and chunks[-2]["choices"]  # no usage chunk unless asked for


@pytest.mark.parametrize(("stream_options", "usage"), [
    pytest.param(None, False, id="absent"),
    pytest.param({"include_usage": False}, False, id="false"),
    pytest.param({}, True, id="empty-object-defaults-to-true-in-v0.11"),
    pytest.param({"include_usage": True}, True, id="true"),
])
async def test_usage_chunk_only_when_requested(stream_options: dict[str, Any] | None, usage: bool,
                                               client: httpx.AsyncClient) -> None:
    payload = request() if stream_options is None else request(stream_options=stream_options)
    chunks = await stream(client, payload)
    usage_chunks = [chunk for chunk in chunks[:-1] if not chunk["choices"]]
    assert [list(chunk) for chunk in usage_chunks] == ([["id", "object", "created", "model", "choices", "usage"]]
                                                       if usage else [])


async def test_stream_without_parser_streams_the_tags_as_content(client: httpx.AsyncClient, fake: FakeVLLM) -> None:
    raw = "Sure.\n" + hermes("get_current_weather", WEATHER_CALL)
    fake.script(raw)
    chunks = await stream(client, request())
    assert "".join(delta["content"] for delta in deltas(chunks)) == raw
    assert finish_chunk(chunks)["choices"][0]["finish_reason"] == "stop"


async def test_stream_content_before_and_after_calls_is_streamed(fake: FakeVLLM, client: httpx.AsyncClient) -> None:
    fake.script("Let me check.\n" + hermes("get_current_weather", WEATHER_CALL) + "\nDone.")
    sent = deltas(await stream(client, request(tools=[WEATHER])))
    assert "".join(delta.get("content", "") for delta in sent) == "Let me check.\n\nDone."


async def test_parameterless_call_streams_a_name_and_no_arguments(fake: FakeVLLM, client: httpx.AsyncClient) -> None:
    """The classic parser never sends `{}` (vllm#11392); clients must read "" as {}."""
    fake.script(hermes("get_current_time", {}))
    chunks = await stream(client, request(tools=[CLOCK]))
    assert deltas(chunks) == [name_delta("get_current_time")]
    assert finish_chunk(chunks)["choices"][0]["finish_reason"] == "tool_calls"


async def test_unparsable_block_vanishes_from_the_stream(fake: FakeVLLM, client: httpx.AsyncClient) -> None:
    """Non-streaming puts it in content; the classic streaming parser silently drops it."""
    fake.script("Hm.\n<tool_call>\n{oops}\n</tool_call>")
    chunks = await stream(client, request(tools=[WEATHER]))
    assert deltas(chunks) == [{"content": "Hm"}, {"content": ".\n"}]
    assert finish_chunk(chunks)["choices"][0]["finish_reason"] == "stop"


async def test_length_finish_carries_the_last_token(fake: FakeVLLM, client: httpx.AsyncClient) -> None:
    fake.script("one two three four")
    chunks = await stream(client, request(max_tokens=2))
    assert deltas(chunks) == [{"content": "one"}]
    assert finish_chunk(chunks)["choices"][0] == {"index": 0, "delta": {"content": " two"}, "logprobs": None,
                                                  "finish_reason": "length", "stop_reason": None,
                                                  "token_ids": None}


async def test_context_and_validation_errors_are_plain_json_even_when_streaming() -> None:
    async with serving(max_model_len=20) as (_, client):
        response = await client.post(CHAT, json=request(stream=True))
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"]["message"].startswith("This model's maximum context length is 20 tokens.")


# Errors (section 4).


@pytest.mark.parametrize(("shape", "body"), [
    pytest.param("new", error("warming up", "ServiceUnavailableError", 503), id="new"),
    pytest.param("old", {"object": "error", "message": "warming up", "type": "ServiceUnavailableError",
                         "param": None, "code": 503}, id="old"),
])
async def test_scripted_error_uses_the_configured_shape(shape: str, body: dict[str, Any]) -> None:
    async with serving(error_shape=shape) as (fake, client):
        fake.script(Reply(status=503, error_message="warming up"))
        response = await client.post(CHAT, json=request(stream=True))
    assert (response.status_code, response.json()) == (503, body)


async def test_api_key_guards_v1_only() -> None:
    async with serving(api_key="sekret") as (fake, client):
        missing = await client.post(CHAT, json=request())
        wrong = await client.get("/v1/models", headers={"Authorization": "Bearer nope"})
        good = await client.get("/v1/models", headers={"Authorization": "Bearer sekret"})
        open_paths = [(await client.get("/health")).status_code, (await client.get("/version")).status_code,
                      (await client.post("/tokenize", json={"prompt": "hi"})).status_code]
    assert [(r.status_code, r.text) for r in (missing, wrong)] == [(401, '{"error":"Unauthorized"}')] * 2
    assert (good.status_code, open_paths) == (200, [200, 200, 200])
    assert [record.body for record in fake.requests] == [request()]


async def test_unknown_model_is_404(fake: FakeVLLM, client: httpx.AsyncClient) -> None:
    response = await client.post(CHAT, json=request(model="gpt-4o"))
    assert (response.status_code, response.json()) == (
        404, error("The model `gpt-4o` does not exist.", "NotFoundError", 404))
    assert fake.requests[0].prompt is None


@pytest.mark.parametrize(("fields", "text"), [
    pytest.param({"tools": []}, "`tools` must not be an empty array. Either provide at least one tool or omit "
                 "the field entirely.", id="empty-tools"),
    pytest.param({"stream_options": {"include_usage": True}}, "Stream options can only be defined when "
                 "`stream=True`.", id="stream-options-without-stream"),
    pytest.param({"tool_choice": "auto"}, "When using `tool_choice`, `tools` must be set.", id="choice-no-tools"),
    pytest.param({"tools": [WEATHER], "tool_choice": "sometimes"}, 'Invalid value for `tool_choice`: sometimes! '
                 'Only named tools, "none", "auto" or "required" are supported.', id="bad-choice"),
    pytest.param({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
                 "The tool specified in `tool_choice` does not match any of the specified `tools`",
                 id="unknown-named-tool"),
    pytest.param({"messages": [{"role": "robot", "content": "hi"}]}, "Input should be 'system', 'user', "
                 "'assistant' or 'tool'", id="bad-role"),
    pytest.param({"messages": None}, "'msg': 'Field required'", id="no-messages"),
])
async def test_request_validation_is_400(fields: dict[str, Any], text: str, fake: FakeVLLM,
                                         client: httpx.AsyncClient) -> None:
    fake.script("unused")
    payload = {key: value for key, value in request(**fields).items() if value is not None}  # None drops a field
    response = await client.post(CHAT, json=payload)
    body = response.json()
    assert (response.status_code, body["error"]["type"], body["error"]["code"]) == (400, "Bad Request", 400)
    assert text in body["error"]["message"]
    assert fake.remaining == 1  # a refused request never reaches the model


@pytest.mark.parametrize(("content", "content_type", "message", "recorded"), [
    pytest.param(b'{"messages": []}', "text/plain",
                 "[\"Unsupported Media Type: Only 'application/json' is allowed\"]", {"messages": []},
                 id="content-type"),
    pytest.param(b"{not json", "application/json",
                 "[{'type': 'json_invalid', 'loc': ('body', 1), 'msg': 'JSON decode error', 'input': {}, "
                 "'ctx': {'error': 'Expecting property name enclosed in double quotes'}}]", {}, id="bad-json"),
    pytest.param(b"[1, 2]", "application/json",
                 "[{'type': 'model_attributes_type', 'loc': ('body',), 'msg': 'Input should be a valid dictionary "
                 "or object to extract fields from', 'input': [1, 2]}]", {}, id="not-an-object"),
])
async def test_body_must_be_a_json_object(content: bytes, content_type: str, message: str, recorded: dict[str, Any],
                                          fake: FakeVLLM, client: httpx.AsyncClient) -> None:
    response = await client.post(CHAT, content=content, headers={"Content-Type": content_type})
    assert (response.status_code, response.json()) == (400, error(message, "Bad Request"))
    assert (fake.requests[0].body, fake.requests[0].prompt) == (recorded, None)


async def test_unknown_fields_are_accepted(client: httpx.AsyncClient) -> None:
    assert (await client.post(CHAT, json=request(frobnicate=True, chat_template_kwargs={"x": 1}))).status_code == 200


@pytest.mark.parametrize(("arguments", "message"), [
    pytest.param("", "Expecting value: line 1 column 1 (char 0) None", id="empty"),
    pytest.param("{oops", "Expecting property name enclosed in double quotes: line 1 column 2 (char 1) None",
                 id="broken"),
])
async def test_echoed_arguments_must_be_json(arguments: str, message: str, fake: FakeVLLM,
                                             client: httpx.AsyncClient) -> None:
    history = [*HI, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call-1", "type": "function", "function": {"name": "get_current_weather", "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": "call-1", "content": "sunny"}]
    response = await client.post(CHAT, json=request(messages=history, tools=[WEATHER]))
    assert (response.status_code, response.json()) == (400, error(message))
    assert fake.requests[0].prompt is None


async def test_context_length_checks_use_the_rendered_prompt() -> None:
    async with serving(max_model_len=40) as (fake, client):
        count = await prompt_tokens(client)
        ok = await client.post(CHAT, json=request(max_tokens=40 - count))
        too_long = await client.post(CHAT, json=request(messages=[{"role": "user", "content": "hi " * 40}]))
        too_many = await client.post(CHAT, json=request(max_tokens=41 - count))
    long_count = len(tokenize(fake.requests[1].prompt or ""))
    assert ok.status_code == 200
    assert (too_long.status_code, too_long.json()) == (400, error(
        f"This model's maximum context length is 40 tokens. However, your request has {long_count} input "
        "tokens. Please reduce the length of the input messages. None"))
    assert (too_many.status_code, too_many.json()) == (400, error(
        f"'max_tokens' or 'max_completion_tokens' is too large: {41 - count}. This model's maximum context "
        f"length is 40 tokens and your request has {count} input tokens ({41 - count} > 40 - {count}). None"))


async def test_unknown_routes_answer_like_fastapi(client: httpx.AsyncClient) -> None:
    missing, wrong_method = await client.get("/v1/completions/x"), await client.get(CHAT)
    assert [(missing.status_code, missing.json()), (wrong_method.status_code, wrong_method.json())] == [
        (404, {"detail": "Not Found"}), (405, {"detail": "Method Not Allowed"})]


# Other endpoints (section 5).


async def test_models_lists_the_served_model_with_its_context(client: httpx.AsyncClient) -> None:
    body = (await client.get("/v1/models")).json()
    card = body["data"][0]
    permission = card["permission"][0]
    assert re.fullmatch(r"modelperm-[0-9a-f]{32}", permission["id"])
    assert body == {"object": "list", "data": [{
        "id": MODEL, "object": "model", "created": card["created"], "owned_by": "vllm", "root": MODEL,
        "parent": None, "max_model_len": 32768, "permission": [{
            "id": permission["id"], "object": "model_permission", "created": card["created"],
            "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True,
            "allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False,
            "organization": "*", "group": None, "is_blocking": False}]}]}


async def test_tokenize_counts_what_usage_reports(client: httpx.AsyncClient, fake: FakeVLLM) -> None:
    fields = {"messages": [{"role": "system", "content": "Be brief."}, *HI], "tools": [WEATHER, CALCULATOR]}
    tokenized = (await client.post("/tokenize", json={"model": MODEL, **fields, "return_token_strs": True})).json()
    usage = (await client.post(CHAT, json=request(**fields))).json()["usage"]
    assert tokenized["count"] == usage["prompt_tokens"] == len(tokenized["tokens"])
    assert "".join(tokenized["token_strs"]) == fake.requests[0].prompt
    assert tokenized["max_model_len"] == 32768


async def test_tokenize_a_plain_prompt(client: httpx.AsyncClient) -> None:
    response = await client.post("/tokenize", json={"prompt": "<|im_start|>hi there"})
    assert response.json() == {"count": 3, "max_model_len": 32768, "tokens": response.json()["tokens"],
                               "token_strs": None}
    assert response.json()["tokens"][0] == 151644


async def test_health_is_empty_and_version_is_0_11(client: httpx.AsyncClient) -> None:
    health, version = await client.get("/health"), await client.get("/version")
    assert (health.status_code, health.content) == (200, b"")
    assert version.json() == {"version": "0.11.0"}


# The rendered prompt (section 6).


async def test_prompt_with_tools_starts_with_the_system_prompt_and_tool_block(fake: FakeVLLM,
                                                                              client: httpx.AsyncClient) -> None:
    messages = [{"role": "system", "content": "You are terse."}, *HI]
    await client.post(CHAT, json=request(messages=messages, tools=[WEATHER, CALCULATOR]))
    assert fake.requests[0].prompt == (
        "<|im_start|>system\nYou are terse." + SYSTEM_TOOLS_HEAD + "\n"
        + json.dumps(WEATHER, ensure_ascii=False) + "\n" + json.dumps(CALCULATOR, ensure_ascii=False)
        + SYSTEM_TOOLS_TAIL + "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


async def test_tools_render_as_model_dump_with_null_description(fake: FakeVLLM, client: httpx.AsyncClient) -> None:
    bare = {"function": {"name": "ping", "strict": True}}
    await client.post(CHAT, json=request(tools=[bare]))
    expected = '{"type": "function", "function": {"name": "ping", "description": null, "parameters": null, ' \
               '"strict": true}}'
    assert f"<tools>\n{expected}\n</tools>" in (fake.requests[0].prompt or "")


async def test_tool_results_render_like_qwens_own_example(fake: FakeVLLM, client: httpx.AsyncClient) -> None:
    system = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.\n\nCurrent Date: 2024-09-30"
    question = "What's the temperature in San Francisco now? How about tomorrow?"
    messages = [
        {"role": "system", "content": system}, {"role": "user", "content": question},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call-1", "type": "function", "function": {
                "name": "get_current_temperature", "arguments": '{"location": "San Francisco, CA, USA"}'}},
            {"id": "call-2", "type": "function", "function": {
                "name": "get_temperature_date",
                "arguments": '{"location": "San Francisco, CA, USA", "date": "2024-10-01"}'}}]},
        {"role": "tool", "tool_call_id": "call-1",
         "content": '{"temperature": 26.1, "location": "San Francisco, CA, USA", "unit": "celsius"}'},
        {"role": "tool", "tool_call_id": "call-2", "content": '{"temperature": 25.9, "location": "San Francisco, '
                                                              'CA, USA", "date": "2024-10-01", "unit": "celsius"}'},
    ]
    await client.post(CHAT, json=request(messages=messages, tools=[WEATHER]))
    assert fake.requests[0].prompt == (
        f"<|im_start|>system\n{system}{SYSTEM_TOOLS_HEAD}\n{json.dumps(WEATHER)}{SYSTEM_TOOLS_TAIL}"
        f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n{QWEN_PARALLEL}<|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n"
        '{"temperature": 26.1, "location": "San Francisco, CA, USA", "unit": "celsius"}\n</tool_response>\n'
        "<tool_response>\n"
        '{"temperature": 25.9, "location": "San Francisco, CA, USA", "date": "2024-10-01", "unit": "celsius"}\n'
        "</tool_response><|im_end|>\n<|im_start|>assistant\n"
    )
    assert messages[2]["tool_calls"][0]["function"]["arguments"] == '{"location": "San Francisco, CA, USA"}'


@pytest.mark.parametrize("text", [
    "Hello,  world!\n\nDone.", hermes("calculator", {"expression": "2**16 / 7"}), "서울 <b>x</b> <|im_end|> \"\"}}",
])
def test_tokens_concatenate_back_exactly(text: str) -> None:
    assert "".join(tokenize(text)) == text


# The default responder.


async def test_default_responder_calls_calculator_and_clock(client: httpx.AsyncClient) -> None:
    question = [{"role": "user", "content": "what is 12*7, and what time is it in Seoul?"}]
    message = (await client.post(CHAT, json=request(messages=question, tools=[CALCULATOR, CLOCK]))).json()[
        "choices"][0]["message"]
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]] == [
        ("calculator", '{"expression": "12*7"}'), ("get_current_time", '{"timezone": "Asia/Seoul"}')]


@pytest.mark.parametrize(("question", "calls"), [
    pytest.param("2**16 / 7 please", [("calculator", {"expression": "2**16 / 7"})], id="power-and-division"),
    pytest.param("Time in new york and Paris?", [("get_current_time", {"timezone": "America/New_York"}),
                                                 ("get_current_time", {"timezone": "Europe/Paris"})], id="cities"),
    pytest.param("(3+4)*2 in Tokyo.", [("calculator", {"expression": "(3+4)*2"}),
                                      ("get_current_time", {"timezone": "Asia/Tokyo"})], id="parentheses"),
])
async def test_default_responder_writes_qwen_style_calls(question: str, calls: list[tuple[str, dict[str, Any]]],
                                                         fake: FakeVLLM, client: httpx.AsyncClient) -> None:
    fake.tool_parser = False
    messages = [{"role": "user", "content": question}]
    content = (await client.post(CHAT, json=request(messages=messages, tools=[CALCULATOR, CLOCK],
                                                    tool_choice="none"))).json()["choices"][0]["message"]["content"]
    assert content == "\n".join(hermes(name, arguments) for name, arguments in calls)


async def test_default_responder_only_calls_offered_tools(client: httpx.AsyncClient) -> None:
    question = [{"role": "user", "content": "12*7 in Tokyo"}]
    message = (await client.post(CHAT, json=request(messages=question, tools=[CLOCK]))).json()[
        "choices"][0]["message"]
    assert [call["function"]["name"] for call in message["tool_calls"]] == ["get_current_time"]


async def test_default_responder_answers_from_tool_results(client: httpx.AsyncClient) -> None:
    history = [{"role": "user", "content": "12*7 in Seoul?"}, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "calculator", "arguments": '{"expression": "12*7"}'}},
        {"id": "b", "type": "function", "function": {"name": "get_current_time",
                                                     "arguments": '{"timezone": "Asia/Seoul"}'}}]},
        {"role": "tool", "tool_call_id": "a", "content": "84"},
        {"role": "tool", "tool_call_id": "b", "content": "2026-11-25T17:50:03+09:00 (Wednesday, Asia/Seoul)"}]
    message = (await client.post(CHAT, json=request(messages=history, tools=[CALCULATOR, CLOCK]))).json()[
        "choices"][0]["message"]
    assert (message["content"], message["tool_calls"]) == (
        "The results: 84; 2026-11-25T17:50:03+09:00 (Wednesday, Asia/Seoul).", [])


async def test_default_responder_echoes_without_tools(client: httpx.AsyncClient) -> None:
    question = [{"role": "user", "content": "what is 12*7 in Seoul?"}]
    body = (await client.post(CHAT, json=request(messages=question))).json()
    assert body["choices"][0]["message"]["content"] == "You said: what is 12*7 in Seoul?"


async def test_default_responder_reads_tools_from_a_hermes_system_prompt() -> None:
    system = "You are helpful." + SYSTEM_TOOLS_HEAD + "\n" + json.dumps(CALCULATOR) + SYSTEM_TOOLS_TAIL
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "what is 2**10?"}]
    async with serving(tool_parser=False) as (_, client):
        body = (await client.post(CHAT, json=request(messages=messages))).json()
    assert body["choices"][0]["message"]["content"] == hermes("calculator", {"expression": "2**10"})


async def test_answer_tokens_makes_plain_answers_exactly_that_long() -> None:
    async with serving(answer_tokens=12) as (_, client):
        chunks = await stream(client, request())
    sent = deltas(chunks)
    assert len(sent) == 12
    assert "".join(delta["content"] for delta in sent) == "You said: hi" + " word" * 8


# Faults (each mirrors a failure of section 4 or 8).


async def test_fault_empty_500_has_no_body(fake: FakeVLLM, client: httpx.AsyncClient) -> None:
    fake.script(Reply(fault="empty_500"))
    response = await client.post(CHAT, json=request())
    assert (response.status_code, response.content) == (500, b"")


async def test_fault_non_json_is_html_labelled_json(fake: FakeVLLM, client: httpx.AsyncClient) -> None:
    fake.script(Reply(fault="non_json"))
    response = await client.post(CHAT, json=request())
    assert (response.status_code, response.headers["content-type"], response.text) == (
        200, "application/json", "<html>oops</html>")


async def test_fault_garbage_breaks_the_json_mid_stream(fake: FakeVLLM, client: httpx.AsyncClient) -> None:
    fake.script(Reply(text="one two three four", fault="garbage"))
    response = await client.post(CHAT, json=request(stream=True))
    payloads = sse_payloads(response.text)
    assert [json.loads(p)["choices"][0]["delta"] for p in payloads[:3]] == [
        {"role": "assistant", "content": ""}, {"content": "one"}, {"content": " two"}]
    assert payloads[3:] == ["{not json", '{"id":"chatcmpl-', "[DONE]"]


async def test_fault_cut_closes_the_connection_without_done(fake: FakeVLLM, client: httpx.AsyncClient) -> None:
    fake.script(Reply(text="one two three four five six", fault="cut"))
    received: list[str] = []
    with pytest.raises(httpx.RemoteProtocolError):
        async with client.stream("POST", CHAT, json=request(stream=True)) as response:
            async for line in response.aiter_lines():
                received += [line] if line else []
    assert len(received) == 4 and "data: [DONE]" not in received  # 9 events: role, 6 tokens, finish, DONE
    assert fake.disconnects == 0


@pytest.mark.parametrize(("shape", "payload"), [
    pytest.param("new", {"error": {"message": "boom", "type": "BadRequestError", "param": None, "code": 400}},
                 id="new"),
    pytest.param("old", {"error": {"object": "error", "message": "boom", "type": "BadRequestError", "param": None,
                                   "code": 400}}, id="old-v0.10.0"),
])
async def test_fault_stream_error_sends_an_error_event_then_done(shape: str, payload: dict[str, Any]) -> None:
    async with serving(error_shape=shape) as (fake, client):
        fake.script(Reply(text="one two three", fault="stream_error", error_message="boom"))
        response = await client.post(CHAT, json=request(stream=True, stream_options={"include_usage": True}))
    payloads = sse_payloads(response.text)
    assert payloads[3:] == [json.dumps(payload), "[DONE]"]  # json.dumps spacing, unlike the chunks


async def test_fault_stall_trips_the_read_timeout_and_counts_a_disconnect(fake: FakeVLLM,
                                                                          client: httpx.AsyncClient) -> None:
    fake.script(Reply(text="one two three four", fault="stall"))
    received: list[str] = []
    with pytest.raises(httpx.ReadTimeout):
        async with client.stream("POST", CHAT, json=request(stream=True), timeout=0.3) as response:
            async for line in response.aiter_lines():
                received += [line] if line else []
    assert len(received) == 3
    await poll(lambda: fake.disconnects == 1 and fake.open_streams == 0)


async def test_fault_drop_last_brace_loses_the_closing_brace(fake: FakeVLLM, client: httpx.AsyncClient) -> None:
    fake.script(Reply(text=QWEN_PARALLEL, fault="drop_last_brace"))
    calls = streamed_calls(await stream(client, request(tools=[WEATHER])))
    assert calls == {0: ("get_current_temperature", '{"location": "San Francisco, CA, USA"'),
                     1: ("get_temperature_date", '{"location": "San Francisco, CA, USA", "date": "2024-10-01"')}


async def test_fault_no_args_streams_names_only(fake: FakeVLLM, client: httpx.AsyncClient) -> None:
    fake.script(Reply(text=hermes("get_current_weather", WEATHER_CALL), fault="no_args"))
    chunks = await stream(client, request(tools=[WEATHER]))
    assert deltas(chunks) == [name_delta("get_current_weather")]
    assert finish_chunk(chunks)["choices"][0]["finish_reason"] == "tool_calls"


async def test_fault_hang_never_answers(fake: FakeVLLM, client: httpx.AsyncClient) -> None:
    fake.script(Reply(fault="hang"))
    with pytest.raises(httpx.ReadTimeout):
        await client.post(CHAT, json=request(), timeout=0.3)
    assert fake.disconnects == 0


@pytest.mark.parametrize("fault", ["garbage", "cut", "stream_error", "stall", "drop_last_brace", "no_args"])
async def test_stream_only_faults_leave_non_streaming_answers_alone(fault: str, fake: FakeVLLM,
                                                                   client: httpx.AsyncClient) -> None:
    fake.script(Reply(text=hermes("get_current_weather", WEATHER_CALL), fault=fault))
    message = (await client.post(CHAT, json=request(tools=[WEATHER]))).json()["choices"][0]["message"]
    assert message["tool_calls"][0]["function"]["arguments"] == json.dumps(WEATHER_CALL)


async def test_delay_s_holds_back_the_response_headers(fake: FakeVLLM, client: httpx.AsyncClient) -> None:
    fake.script(Reply(text="late", delay_s=60))
    with pytest.raises(httpx.ReadTimeout):
        await client.post(CHAT, json=request(stream=True), timeout=0.3)
    assert fake.open_streams == 0


async def test_token_delay_s_spaces_the_chunks_after_the_first(fake: FakeVLLM, client: httpx.AsyncClient) -> None:
    fake.script(Reply(text="one two", token_delay_s=60))
    received: list[str] = []
    with pytest.raises(httpx.ReadTimeout):
        async with client.stream("POST", CHAT, json=request(stream=True), timeout=0.3) as response:
            async for line in response.aiter_lines():
                received += [line] if line else []
    assert [json.loads(line.removeprefix("data: "))["choices"][0]["delta"] for line in received] == [
        {"role": "assistant", "content": ""}]
    await poll(lambda: fake.disconnects == 1)


def test_unknown_fault_fails_fast() -> None:
    with pytest.raises(ValueError, match="unknown fault 'stal'"):
        Reply(fault="stal")


# Recording and lifecycle.


async def test_requests_are_recorded_in_order_and_the_script_is_consumed(fake: FakeVLLM,
                                                                         client: httpx.AsyncClient) -> None:
    fake.script("first", Reply(text="second"))
    await client.post(CHAT, json=request(model="nope"))
    answers = [(await client.post(CHAT, json=request(messages=[{"role": "user", "content": text}]))).json()[
        "choices"][0]["message"]["content"] for text in ("a", "b", "c")]
    assert answers == ["first", "second", "You said: c"]
    assert fake.remaining == 0
    assert [(r.path, r.body["messages"][0]["content"], r.prompt) for r in fake.requests] == [
        (CHAT, "hi", None),
        *[(CHAT, text, f"<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
                       f"assistant.<|im_end|>\n<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n")
          for text in ("a", "b", "c")]]
    assert fake.requests[0].headers["content-type"] == "application/json"


async def test_stop_does_not_wait_for_a_stalled_stream() -> None:
    fake = FakeVLLM()
    await fake.start()
    fake.script(Reply(text="one two", fault="stall"))
    async with httpx.AsyncClient(base_url=fake.url, timeout=10) as client:
        pending = asyncio.create_task(client.post(CHAT, json=request(stream=True)))
        await poll(lambda: fake.open_streams == 1)
        await fake.stop()
        with pytest.raises(httpx.HTTPError):
            await pending
    assert (fake.open_streams, fake.disconnects) == (0, 0)


async def test_cli_serves_the_default_responder() -> None:
    script = Path(__file__).with_name("fake_vllm.py")
    process = await asyncio.create_subprocess_exec(sys.executable, str(script), "--port", "0", "--answer-tokens", "4",
                                                   stdout=asyncio.subprocess.PIPE)
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), 10)).decode()
        url = re.fullmatch(r"fake vLLM listening on (http://127\.0\.0\.1:\d+)\n", line)
        assert url is not None
        async with httpx.AsyncClient(base_url=url.group(1), timeout=5) as client:
            body = (await client.post(CHAT, json=request())).json()
        assert body["choices"][0]["message"]["content"] == "You said: hi"
    finally:
        process.terminate()
        await process.wait()

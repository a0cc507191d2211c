"""The fake vLLM, driven over real HTTP, against /work/shared/vllm-protocol.md (section numbers refer to it)."""

import asyncio
import json
import re
import sys
import zlib
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fake_vllm import ChatOptions, FakeVLLM, Parser, ParserConfig, Qwen3Parser, Reply, special_tokens, tokenize
from vllm_parser_cases import (
    ENGINE_TEST,
    REASONING_CASES,
    STREAMING_TEST,
    TOOL_CASES,
    Call,
    Contains,
    Expected,
    ReasoningCase,
    ToolCase,
)

MODEL = "Qwen/Qwen2.5-7B-Instruct"
CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "hi"}]
TOOL_ID = re.compile(r"chatcmpl-tool-(?:[0-9a-f]{32}|[0-9a-f]{16})")
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
    """Replace the random tool-call ids (32 hex digits in v0.11, 16 in 0.33)."""
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
    """A fake on loopback and a client for it; version 0.11 unless `options` say otherwise."""
    fake = FakeVLLM(**{"version": "0.11", **options})
    async with fake, httpx.AsyncClient(base_url=fake.url, timeout=5) as client:
        yield fake, client


@pytest.fixture
async def fake() -> AsyncIterator[FakeVLLM]:
    async with FakeVLLM(version="0.11") as server:
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
    fake = FakeVLLM(version="0.11")
    await fake.start()
    fake.script(Reply(text="one two", fault="stall"))
    async with httpx.AsyncClient(base_url=fake.url, timeout=10) as client:
        pending = asyncio.create_task(client.post(CHAT, json=request(stream=True)))
        await poll(lambda: fake.open_streams == 1)
        await fake.stop()
        with pytest.raises(httpx.HTTPError):
            await pending
    assert (fake.open_streams, fake.disconnects) == (0, 0)


@asynccontextmanager
async def fake_cli(*args: str) -> AsyncIterator[httpx.AsyncClient]:
    """The fake started from its command line (`python tests/fake_vllm.py --port 0 ...`), and a client on the URL
    it prints; stopped afterwards."""
    script = Path(__file__).with_name("fake_vllm.py")
    process = await asyncio.create_subprocess_exec(sys.executable, str(script), "--port", "0", *args,
                                                   stdout=asyncio.subprocess.PIPE)
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), 10)).decode()
        url = re.fullmatch(r"fake vLLM listening on (http://127\.0\.0\.1:\d+)\n", line)
        assert url is not None
        async with httpx.AsyncClient(base_url=url.group(1), timeout=5) as client:
            yield client
    finally:
        process.terminate()
        await process.wait()


async def test_cli_serves_the_default_responder() -> None:
    async with fake_cli("--answer-tokens", "4", "--version", "0.11") as client:
        body = (await client.post(CHAT, json=request())).json()
    assert body["choices"][0]["message"]["content"] == "You said: hi"



# vLLM 0.33 (protocol notes A.1-A.16, checklist A.14).

ID16 = re.compile(r"[0-9a-f]{16}")
QWEN35 = "Qwen/Qwen3.5-35B-A3B"
THINK_ON = {"enable_thinking": True}
FORECAST = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "days": {"type": "integer"}, "metric": {"type": "boolean"},
        "ratio": {"type": "number"}, "note": {"type": ["string", "null"]}, "tags": {"type": "array"},
        "where": {"type": "object"}}}}}


def xml(name: str, **parameters: str) -> str:
    """A call as Qwen3.5 writes it (A.7): each value between newlines."""
    body = "".join(f"<parameter={key}>\n{value}\n</parameter>\n" for key, value in parameters.items())
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


def fingerprint(model: str = MODEL) -> str:
    """The fake's stable stand-in for 0.33's `vllm-<version>-<config hash>`."""
    return f"vllm-0.33.0-{zlib.crc32(model.encode()):08x}"


def error33(message: str, param: str | None = None, err_type: str = "BadRequestError",
            code: int = 400) -> dict[str, Any]:
    """A 0.33 error body: `param` filled where vLLM knows it."""
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}


def ask(**fields: Any) -> dict[str, Any]:
    """A chat request for the served model, whatever its name (an omitted `model` means the served one)."""
    return {"messages": HI, **fields}


Serving = AbstractAsyncContextManager[tuple[FakeVLLM, httpx.AsyncClient]]


def serving33(**options: Any) -> Serving:
    """vLLM 0.33 serving Qwen2.5 with hermes, unless `options` say otherwise."""
    return serving(version="0.33", **options)


def qwen35(**options: Any) -> Serving:
    """vLLM 0.33 serving Qwen3.5 as its recipe says: qwen3_coder and the qwen3 reasoning parser (A.7)."""
    return serving(**{"version": "0.33", "template": "qwen3.5", "tool_parser": "qwen3_coder",
                      "reasoning_parser": "qwen3", **options})


def qwen3_hybrid(**options: Any) -> Serving:
    """vLLM 0.33 serving a hybrid Qwen3 with hermes and the qwen3 reasoning parser (A.7)."""
    return serving(**{"version": "0.33", "template": "qwen3", "tool_parser": "hermes", "reasoning_parser": "qwen3",
                      **options})


def all_deltas(chunks: list[Any]) -> list[dict[str, Any]]:
    """Every delta after the role chunk, the finish chunk's included, tool ids normalised."""
    return without_tool_ids([chunk["choices"][0]["delta"] for chunk in chunks[1:-1] if chunk["choices"]])


def rebuilt(chunks: list[Any]) -> dict[str, Any]:
    """What a client rebuilds from a stream: content and reasoning concatenated, calls by index."""
    fields: dict[str, Any] = {"content": None, "reasoning": None}
    calls: dict[int, dict[str, str]] = {}
    for delta in all_deltas(chunks):
        for key in ("content", "reasoning"):
            if isinstance(delta.get(key), str):
                fields[key] = (fields[key] or "") + delta[key]
        for entry in delta.get("tool_calls", []):
            call = calls.setdefault(entry["index"], {"name": "", "arguments": ""})
            call["name"] += entry["function"].get("name", "")
            call["arguments"] += entry["function"].get("arguments", "")
    return {**fields, "tool_calls": [(call["name"], call["arguments"]) for _, call in sorted(calls.items())]}


def message_of(body: dict[str, Any]) -> dict[str, Any]:
    """The message of a body, tool ids normalised."""
    return without_tool_ids(body["choices"][0]["message"])


def from_message(message: dict[str, Any]) -> dict[str, Any]:
    """The same three fields of a non-streaming message."""
    return {"content": message["content"], "reasoning": message["reasoning"], "tool_calls": [
        (call["function"]["name"], call["function"]["arguments"]) for call in message.get("tool_calls", [])]}


async def both_ways(client: httpx.AsyncClient, fake: FakeVLLM, text: str | Reply, payload: dict[str, Any],
                    stream_options: dict[str, Any] | None = None) -> tuple[dict[str, Any], list[Any]]:
    """The non-streaming body and the stream chunks for the same raw model output."""
    fake.script(text, text)
    body = (await client.post(CHAT, json=payload)).json()
    options = {} if stream_options is None else {"stream_options": stream_options}
    return body, await stream(client, {**payload, **options})


async def test_033_plain_answer_has_every_033_key() -> None:
    async with serving33() as (_, client):
        response = await client.post(CHAT, json=ask())
        prompt = await prompt_tokens(client)
    body = response.json()
    assert re.fullmatch(rf"chatcmpl-{ID16.pattern}", body["id"])
    assert response.text == (
        f'{{"id":"{body["id"]}","object":"chat.completion","created":{body["created"]},"model":"{MODEL}",'
        '"choices":[{"index":0,"message":{"role":"assistant","content":"You said: hi","refusal":null,'
        '"annotations":null,"audio":null,"function_call":null,"reasoning":null},"logprobs":null,'
        '"finish_reason":"stop","stop_reason":null,"token_ids":null,"routed_experts":null,"weight_versions":null}],'
        f'"service_tier":null,"system_fingerprint":"{fingerprint()}","usage":{{"prompt_tokens":{prompt},'
        f'"total_tokens":{prompt + 5},"completion_tokens":5,"prompt_tokens_details":null,'
        '"completion_tokens_details":null},"prompt_logprobs":null,"prompt_token_ids":null,"prompt_text":null,'
        '"kv_transfer_params":null,"ec_transfer_params":null,"metrics":null}'
    )


async def test_033_call_ids_have_16_hex_digits_and_empty_tool_calls_are_omitted() -> None:
    async with serving33() as (fake, client):
        fake.script(hermes("get_current_weather", WEATHER_CALL), "No call.")
        called = (await client.post(CHAT, json=ask(tools=[WEATHER]))).json()["choices"][0]
        plain = (await client.post(CHAT, json=ask(tools=[WEATHER]))).json()["choices"][0]
    assert re.fullmatch(rf"chatcmpl-tool-{ID16.pattern}", called["message"]["tool_calls"][0]["id"])
    assert (called["finish_reason"], without_tool_ids(called["message"]["tool_calls"])) == ("tool_calls", [
        {"id": "TOOL-ID", "type": "function",
         "function": {"name": "get_current_weather", "arguments": json.dumps(WEATHER_CALL)}}])
    assert "tool_calls" not in plain["message"] and plain["message"]["content"] == "No call."


async def test_033_plain_stream_without_parser_is_byte_exact() -> None:
    async with serving33(tool_parser=False) as (_, client):
        response = await client.post(CHAT, json=ask(stream=True))
    first = json.loads(sse_payloads(response.text)[0])
    head = (f'data: {{"id":"{first["id"]}","object":"chat.completion.chunk","created":{first["created"]},'
            f'"model":"{MODEL}","choices":')
    assert response.text == (
        head + '[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}],'
        '"prompt_token_ids":null,"prompt_text":null}\n\n'
        + "".join(head + f'[{{"index":0,"delta":{{"content":"{token}"}},"logprobs":null,"finish_reason":null,'
                  '"token_ids":null}],"kv_transfer_params":null}\n\n' for token in ["You", " said", ":", " hi"])
        + head + '[{"index":0,"delta":{"content":""},"logprobs":null,"finish_reason":"stop","stop_reason":null,'
        f'"token_ids":null,"weight_versions":null}}],"system_fingerprint":"{fingerprint()}",'
        '"kv_transfer_params":null}\n\n'
        "data: [DONE]\n\n"
    )


async def test_033_usage_chunk_carries_the_fingerprint_instead_of_the_finish_chunk() -> None:
    async with serving33() as (_, client):
        chunks = await stream(client, ask(stream_options={"include_usage": True}))
        prompt = await prompt_tokens(client)
    assert finish_chunk(chunks) == {**{key: chunks[0][key] for key in ("id", "object", "created", "model")},
                                    "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop",
                                                 "stop_reason": None, "token_ids": None, "weight_versions": None}],
                                    "kv_transfer_params": None}
    assert chunks[-2] == {**{key: chunks[0][key] for key in ("id", "object", "created", "model")}, "choices": [],
                          "usage": {"prompt_tokens": prompt, "total_tokens": prompt + 5, "completion_tokens": 5},
                          "system_fingerprint": fingerprint()}


@pytest.mark.parametrize(("stream_options", "usage"), [
    pytest.param(None, False, id="absent"),
    pytest.param({}, False, id="empty-object-defaults-to-false"),
    pytest.param({"include_usage": False}, False, id="false"),
    pytest.param({"include_usage": True}, True, id="true"),
])
async def test_033_usage_chunk_only_with_include_usage_true(stream_options: dict[str, Any] | None,
                                                             usage: bool) -> None:
    async with serving33() as (_, client):
        payload = ask() if stream_options is None else ask(stream_options=stream_options)
        chunks = await stream(client, payload)
    assert any(not chunk["choices"] for chunk in chunks[:-1]) is usage


async def test_033_hermes_streams_calls_without_newline_content_and_with_null_content() -> None:
    async with serving33() as (fake, client):
        body, chunks = await both_ways(client, fake, QWEN_PARALLEL, ask(tools=[WEATHER]))
    sent = all_deltas(chunks)
    assert sent[:3] == [{"content": None, **name_delta("get_current_temperature")},
                        {"content": None, **arguments_delta('{"')}, {"content": None, **arguments_delta("location")}]
    assert [delta for delta in sent if delta.get("content") is not None] == []
    assert sent[-1] == {} and finish_chunk(chunks)["choices"][0]["finish_reason"] == "tool_calls"
    assert rebuilt(chunks) == from_message(message_of(body))


@pytest.mark.parametrize(("options", "final"), [
    pytest.param({"tool_parser": "hermes"}, {}, id="hermes"),
    pytest.param({"tool_parser": "qwen3_coder", "template": "qwen3.5"}, {}, id="qwen3_coder"),
    pytest.param({"tool_parser": False, "reasoning_parser": "qwen3", "template": "qwen3.5"}, {"content": ""},
                 id="reasoning-parser-alone-after-the-thought"),
    pytest.param({"tool_parser": False}, {"content": ""}, id="no-parser"),
])
async def test_033_finish_delta_of_a_natural_stop(options: dict[str, Any], final: dict[str, Any]) -> None:
    """`{}` from a parser with nothing left to say; `{"content":""}` when the EOS step passes raw text on."""
    async with serving33(**options) as (fake, client):
        fake.script("Plain answer.")
        chunks = await stream(client, ask())
    assert finish_chunk(chunks)["choices"][0]["delta"] == final
    assert rebuilt(chunks)["content"] == "Plain answer."


async def test_033_parallel_tool_calls_false_keeps_the_first_call() -> None:
    async with serving33() as (fake, client):
        body, chunks = await both_ways(client, fake, QWEN_PARALLEL, ask(tools=[WEATHER],
                                                                            parallel_tool_calls=False))
    assert [call["function"]["name"] for call in body["choices"][0]["message"]["tool_calls"]] == [
        "get_current_temperature"]
    assert [name for name, _ in rebuilt(chunks)["tool_calls"]] == ["get_current_temperature"]


# Context rules (A.2) and finish reasons (A.3).


async def test_033_prompt_plus_max_tokens_over_the_window_is_clamped() -> None:
    words = " ".join(["word"] * 30)
    async with serving33(max_model_len=40) as (fake, client):
        room = 40 - await prompt_tokens(client)
        fake.script(words, words, "one two")
        clamped = (await client.post(CHAT, json=ask(max_tokens=39))).json()
        filled = (await client.post(CHAT, json=ask())).json()
        fits = (await client.post(CHAT, json=ask(max_tokens=39))).json()
    for body in (clamped, filled):
        assert (body["choices"][0]["message"]["content"], body["choices"][0]["finish_reason"],
                body["usage"]["completion_tokens"]) == ("".join(tokenize(words)[:room]), "length", room)
    assert (fits["choices"][0]["message"]["content"], fits["choices"][0]["finish_reason"]) == ("one two", "stop")


@pytest.mark.parametrize(("extra", "fields", "message", "param"), [
    pytest.param(5, {}, "This model's maximum context length is 40 tokens. However, your prompt contains 45 input "
                 "tokens, which exceeds this limit even without any output tokens. Please reduce the length of the "
                 "input prompt. (parameter=input_tokens, value=45)", "input_tokens", id="prompt-over-the-window"),
    pytest.param(1, {}, "This model's maximum context length is 40 tokens. However, your prompt contains at least 41 "
                 "input tokens, which exceeds this limit even without any output tokens. Please reduce the length of "
                 "the input prompt. (parameter=input_tokens, value=41)", "input_tokens", id="one-over"),
    pytest.param(0, {}, "max_tokens must be at least 1, got 0. (parameter=max_tokens, value=0)", "max_tokens",
                 id="prompt-fills-the-window"),
    pytest.param(-10, {"max_tokens": 41}, "max_tokens=41 cannot be greater than max_model_len=40. Please request "
                 "fewer output tokens. (parameter=max_tokens, value=41)", "max_tokens", id="max-tokens-over-N"),
    pytest.param(-10, {"max_completion_tokens": 50, "max_tokens": 5}, "max_completion_tokens=50 cannot be greater "
                 "than max_model_len=40. Please request fewer output tokens. (parameter=max_completion_tokens, "
                 "value=50)", "max_completion_tokens", id="max-completion-tokens-wins"),
    pytest.param(-10, {"max_tokens": 0}, "max_tokens must be at least 1, got 0. (parameter=max_tokens, value=0)",
                 "max_tokens", id="zero"),
])
async def test_033_context_refusals_are_400s(extra: int, fields: dict[str, Any], message: str, param: str) -> None:
    """A prompt of 40 + `extra` tokens in a 40-token window (digits are one token each)."""
    async with serving33(max_model_len=40) as (fake, client):
        base = await prompt_tokens(client, messages=[{"role": "user", "content": ""}])
        fake.script("unused")
        response = await client.post(CHAT, json=ask(
            messages=[{"role": "user", "content": "1" * (40 - base + extra)}], stream=True, **fields))
    assert (response.status_code, response.json()) == (400, error33(message, param))
    assert fake.remaining == 1


CUT_CALL = xml("get_weather", city="Paris", days="3")


@pytest.mark.parametrize(("reply", "fields"), [
    pytest.param(CUT_CALL, {"max_tokens": 20}, id="max-tokens"),
    pytest.param(Reply(text="".join(tokenize(CUT_CALL, "qwen3.5")[:20]), finish_reason="length"), {}, id="scripted"),
])
async def test_033_call_cut_by_the_limit_finishes_with_length_not_tool_calls(reply: str | Reply,
                                                                             fields: dict[str, Any]) -> None:
    async with qwen35() as (fake, client):
        body, chunks = await both_ways(client, fake, reply, ask(tools=[FORECAST], **fields))
    assert body["choices"][0]["finish_reason"] == finish_chunk(chunks)["choices"][0]["finish_reason"] == "length"
    assert message_of(body)["tool_calls"] == [
        {"id": "TOOL-ID", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]
    assert rebuilt(chunks)["tool_calls"] == [("get_weather", '{"city": "Paris"}')]


async def test_033_named_tool_choice_reports_stop() -> None:
    async with serving33() as (fake, client):
        fake.script(hermes("get_current_weather", WEATHER_CALL))
        body = (await client.post(CHAT, json=ask(tools=[WEATHER], tool_choice={
            "type": "function", "function": {"name": "get_current_weather"}}))).json()
    assert (body["choices"][0]["finish_reason"], body["choices"][0]["message"]["content"],
            len(body["choices"][0]["message"]["tool_calls"])) == ("stop", "", 1)


# Errors of 0.33 (A.4).


@pytest.mark.parametrize(("fields", "message", "param"), [
    pytest.param({"tools": []}, "`tools` must not be an empty array. Either provide at least one tool or omit the "
                 "field entirely. (parameter=tools)", "tools", id="empty-tools"),
    pytest.param({"stream_options": {"include_usage": True}}, "Stream options can only be defined when "
                 "`stream=True`. (parameter=stream_options)", "stream_options", id="stream-options-without-stream"),
    pytest.param({"tool_choice": "auto", "stream_options": {"include_usage": True}}, "When using `tool_choice`, "
                 "`tools` must be set. (parameter=tool_choice)", "tool_choice", id="tool-checks-come-first"),
    pytest.param({"tools": [WEATHER], "tool_choice": "sometimes"}, 'Invalid value for `tool_choice`: sometimes! Only '
                 'named tools, "none", "auto" or "required" are supported. (parameter=tool_choice)', "tool_choice",
                 id="bad-choice"),
    pytest.param({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
                 "The tool specified in `tool_choice` does not match any of the specified `tools` "
                 "(parameter=tool_choice)", "tool_choice", id="unknown-named-tool"),
    pytest.param({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {}}},
                 'Expected field `name` in `function` in `tool_choice`! Correct usage: `{"type": "function", '
                 '"function": {"name": "my_function"}}` (parameter=tool_choice.function.name)',
                 "tool_choice.function.name", id="named-without-name"),
])
async def test_033_validator_errors_name_the_parameter_and_do_not_echo_the_request(
    fields: dict[str, Any], message: str, param: str
) -> None:
    async with serving33() as (fake, client):
        fake.script("unused")
        response = await client.post(CHAT, json=ask(**fields))
    assert (response.status_code, response.json()) == (400, error33(message, param))
    assert fake.remaining == 1


@pytest.mark.parametrize(("content", "content_type", "message", "param"), [
    pytest.param(b'{"messages": []}', "text/plain",
                 "1 validation error:\n  Unsupported Media Type: Only 'application/json' is allowed", None,
                 id="content-type"),
    pytest.param(b"{not json", "application/json",
                 "1 validation error:\n  {'type': 'json_invalid', 'loc': 'body.1', 'msg': 'JSON decode error', "
                 "'input': '<dict of 0 items>', 'ctx': {'error': 'Expecting property name enclosed in double quotes'}}",
                 "body.1", id="bad-json"),
    pytest.param(b"[1, 2]", "application/json",
                 "1 validation error:\n  {'type': 'model_attributes_type', 'loc': 'body', 'msg': 'Input should be a "
                 "valid dictionary or object to extract fields from', 'input': '<list of 2 items>'}", "body",
                 id="not-an-object"),
    pytest.param(b'{"model": "m"}', "application/json",
                 "1 validation error:\n  {'type': 'missing', 'loc': 'body.messages', 'msg': 'Field required', "
                 "'input': '<dict of 1 items>'}", "body.messages", id="no-messages"),
    pytest.param(b'{"messages": [], "max_tokens": 1.5, "max_completion_tokens": "x"}', "application/json",
                 "2 validation errors:\n  {'type': 'int_from_float', 'loc': 'body.max_tokens', 'msg': 'Input should "
                 "be a valid integer, got a number with a fractional part', 'input': '1.5'}\n  {'type': "
                 "'int_parsing', 'loc': 'body.max_completion_tokens', 'msg': 'Input should be a valid integer, unable "
                 "to parse string as an integer', 'input': 'x'}", "body.max_tokens", id="two-errors"),
])
async def test_033_fastapi_validation_errors_use_the_new_format(content: bytes, content_type: str, message: str,
                                                                param: str | None) -> None:
    async with serving33() as (_, client):
        response = await client.post(CHAT, content=content, headers={"Content-Type": content_type})
    assert (response.status_code, response.json()) == (400, error33(message, param, "Bad Request"))


async def test_033_null_messages_trip_a_validator_before_pydantic() -> None:
    async with serving33() as (_, client):
        response = await client.post(CHAT, json={"messages": None})
    assert (response.status_code, response.json()) == (400, error33("'NoneType' object is not iterable"))


async def test_033_echoed_arguments_that_are_not_strings_fail_on_three_union_branches() -> None:
    history = [*HI, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call-1", "type": "function", "function": {"name": "get_current_weather", "arguments": {"a": 1}}}]}]
    async with serving33() as (_, client):
        response = await client.post(CHAT, json=ask(messages=history))
    assert (response.status_code, response.json()) == (400, error33(
        "3 validation errors:\n"
        "  {'type': 'string_type', 'loc': 'body.0.ChatCompletionMessageFunctionToolCallParam.function', 'msg': "
        "'Input should be a valid string', 'input': '<dict of 1 items>'}\n"
        "  {'type': 'missing', 'loc': 'body.0.ChatCompletionMessageCustomToolCallParam.custom', 'msg': 'Field "
        "required', 'input': '<dict of 3 items>'}\n"
        "  {'type': 'literal_error', 'loc': 'body.0.ChatCompletionMessageCustomToolCallParam.type', 'msg': \"Input "
        "should be 'custom'\", 'input': 'function', 'ctx': {'expected': \"'custom'\"}}",
        "body.0.ChatCompletionMessageFunctionToolCallParam.function", "Bad Request"))


async def test_033_unknown_model_lists_the_valid_aliases() -> None:
    async with serving33() as (fake, client):
        response = await client.post(CHAT, json=ask(model="gpt-4o"))
        tokenized = await client.post("/tokenize", json={"model": "gpt-4o", "prompt": "hi"})
    expected = error33(f"The model `gpt-4o` does not exist. Valid aliases: {MODEL}.", "model", "NotFoundError", 404)
    assert [(r.status_code, r.json()) for r in (response, tokenized)] == [(404, expected)] * 2
    assert fake.requests[0].prompt is None


@pytest.mark.parametrize(("tool_choice", "message"), [
    pytest.param(None, '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set',
                 id="implied-auto"),
    pytest.param("auto", '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set',
                 id="auto"),
    pytest.param("required", 'tool_choice="required" requires --tool-call-parser to be set', id="required"),
    pytest.param({"type": "function", "function": {"name": "get_current_weather"}},
                 'tool_choice=function "get_current_weather" requires --tool-call-parser to be set', id="named"),
])
async def test_033_tool_choices_need_a_tool_parser(tool_choice: Any, message: str) -> None:
    fields = {"tools": [WEATHER]} if tool_choice is None else {"tools": [WEATHER], "tool_choice": tool_choice}
    async with serving33(tool_parser=False) as (fake, client):
        response = await client.post(CHAT, json=ask(**fields))
        allowed = await client.post(CHAT, json=ask(tools=[WEATHER], tool_choice="none"))
    assert (response.status_code, response.json(), allowed.status_code) == (400, error33(message), 200)
    assert fake.requests[0].prompt is None


async def test_033_explicit_null_tool_choice_drops_the_calls() -> None:
    async with serving33() as (fake, client):
        body, chunks = await both_ways(client, fake, "Let me check.\n" + hermes("get_current_weather", WEATHER_CALL),
                                       ask(tools=[WEATHER], tool_choice=None))
    assert from_message(message_of(body)) == rebuilt(chunks) == {
        "content": "Let me check.\n", "reasoning": None, "tool_calls": []}
    assert body["choices"][0]["finish_reason"] == finish_chunk(chunks)["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("arguments", ["", "{oops", "[1, 2]", '"text"', "null"])
async def test_033_echoed_arguments_that_are_not_a_json_object_become_empty(arguments: str) -> None:
    history = [*HI, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call-1", "type": "function", "function": {"name": "get_current_weather", "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": "call-1", "content": "sunny"}]
    async with serving33() as (fake, client):
        response = await client.post(CHAT, json=ask(messages=history, tools=[WEATHER]))
    assert response.status_code == 200
    assert '<tool_call>\n{"name": "get_current_weather", "arguments": {}}\n</tool_call>' in (fake.requests[0].prompt
                                                                                             or "")


@pytest.mark.parametrize(("fault", "error"), [
    pytest.param("stream_error", {"message": "boom", "type": "InternalServerError", "param": None, "code": 500},
                 id="generation-error"),
    pytest.param("stream_error_503", {"message": "boom", "type": "ServiceUnavailableError", "param": None,
                                      "code": 503}, id="retryable"),
])
async def test_033_in_stream_errors_are_one_compact_frame_then_done(fault: str, error: dict[str, Any]) -> None:
    async with serving33() as (fake, client):
        fake.script(Reply(text="one two three", fault=fault, error_message="boom"))
        response = await client.post(CHAT, json=ask(stream=True, stream_options={"include_usage": True}))
    assert sse_payloads(response.text)[3:] == [json.dumps({"error": error}, separators=(",", ":")), "[DONE]"]


async def test_033_engine_dead_has_a_body() -> None:
    async with serving33() as (fake, client):
        fake.script(Reply(fault="engine_dead"))
        response = await client.post(CHAT, json=ask())
    assert (response.status_code, response.json()) == (500, error33(
        "The server had an error while processing your request.", None, "InternalServerError", 500))


async def test_033_version_models_and_tokenize() -> None:
    async with qwen35() as (_, client):
        version = (await client.get("/version")).json()
        card = (await client.get("/v1/models")).json()["data"][0]
        tokenized = (await client.post("/tokenize", json={"prompt": "<think>a</think><tool_call>",
                                                          "return_token_strs": True})).json()
    assert version == {"version": "0.33.0"}
    assert (card["id"], re.fullmatch(rf"modelperm-{ID16.pattern}", card["permission"][0]["id"]) is not None) == (
        QWEN35, True)
    assert (tokenized["token_strs"], tokenized["tokens"]) == (
        ["<think>", "a", "</think>", "<tool_call>"], [151667, tokenized["tokens"][1], 151668, 151657])


def test_033_qwen25_tokenizer_has_no_think_token() -> None:
    assert tokenize("<think>a</think>", "qwen2.5") == ["<", "think", ">", "a", "</", "think", ">"]
    assert tokenize("<think>a</think>", "qwen3") == ["<think>", "a", "</think>"]


# Admission control and keep-alive comments (A.1 rows 7 and 8).

ADMISSION = ("The engine is currently busy and cannot accept new requests. Please try again later or on a different "
             "instance.")


async def test_033_admission_control_refuses_past_max_num_queued_reqs() -> None:
    async with serving33(max_num_queued_reqs=1) as (fake, client):
        fake.script(Reply(text="one two", fault="stall"), "second")
        pending = asyncio.create_task(client.post(CHAT, json=ask(stream=True), timeout=30))
        await poll(lambda: fake.open_streams == 1)
        refused = await client.post(CHAT, json=ask(stream=True))
        pending.cancel()
        await poll(lambda: fake.running == 0)
        admitted = await client.post(CHAT, json=ask())
    assert (refused.status_code, refused.json()) == (503, error33(ADMISSION, None, "Service Unavailable", 503))
    assert (admitted.status_code, fake.remaining) == (200, 0)


async def test_033_busy_fault_answers_the_admission_body() -> None:
    async with serving33() as (fake, client):
        fake.script(Reply(fault="busy"))
        response = await client.post(CHAT, json=ask(stream=True))
    assert (response.status_code, response.json()) == (503, error33(ADMISSION, None, "Service Unavailable", 503))


async def test_033_keep_alive_comments_fill_idle_stream_gaps() -> None:
    async with serving33(sse_keep_alive_s=0.02) as (fake, client):
        fake.script(Reply(text="one two", delay_s=0.1, token_delay_s=0.1))
        response = await client.post(CHAT, json=ask(stream=True))
    events = response.text[:-2].split("\n\n")
    assert events[0] == ": keep-alive"  # the headers went out first, then comments while "prefill" ran
    data = [event for event in events if event != ": keep-alive"]
    assert [json.loads(event.removeprefix("data: "))["choices"][0]["delta"] for event in data[:-1]] == [
        {"role": "assistant", "content": ""}, {"content": "one"}, {"content": " two"}, {}]
    assert data[-1] == "data: [DONE]" and events.index(data[2]) + 1 < events.index(data[3])


def test_fake_vllm_version_env_sets_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_VLLM_VERSION", "0.33")
    assert (FakeVLLM().version, FakeVLLM(version="0.11").version) == ("0.33", "0.11")
    monkeypatch.delenv("FAKE_VLLM_VERSION")
    assert FakeVLLM().version == "0.11"
    monkeypatch.setenv("FAKE_VLLM_VERSION", "0.12")
    with pytest.raises(ValueError, match=re.escape("FAKE_VLLM_VERSION='0.12'")):
        FakeVLLM()


@pytest.mark.parametrize("options", [
    pytest.param({"version": "0.11", "tool_parser": "qwen3_coder"}, id="coder-on-0.11"),
    pytest.param({"version": "0.11", "reasoning_parser": "qwen3"}, id="reasoning-on-0.11"),
    pytest.param({"version": "0.11", "template": "qwen3.5"}, id="qwen35-on-0.11"),
    pytest.param({"version": "0.33", "error_shape": "old"}, id="old-errors-on-0.33"),
    pytest.param({"version": "0.33", "tool_parser": "pythonic"}, id="unknown-parser"),
    pytest.param({"version": "0.11", "sse_keep_alive_s": 1.0}, id="keep-alive-on-0.11"),
])
def test_impossible_profiles_fail_fast(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        FakeVLLM(**options)


# Reasoning with and without `--reasoning-parser qwen3` (A.8, A.9).

THOUGHT_AND_CALL = "The user wants the weather.\n</think>\n\n" + xml("get_weather", city="Paris", days="3")


async def test_033_qwen35_thought_and_xml_call_stream_in_the_order_of_a8() -> None:
    async with qwen35() as (fake, client):
        body, chunks = await both_ways(client, fake, THOUGHT_AND_CALL,
                                       ask(tools=[FORECAST], chat_template_kwargs=THINK_ON), {"include_usage": True})
    assert from_message(message_of(body)) == rebuilt(chunks) == {
        "content": None, "reasoning": "The user wants the weather.\n",
        "tool_calls": [("get_weather", '{"city": "Paris", "days": 3}')]}
    assert all_deltas(chunks) == [
        {"reasoning": "The"}, {"reasoning": " user"}, {"reasoning": " wants"}, {"reasoning": " the"},
        {"reasoning": " weather"}, {"reasoning": ".\n"}, name_delta("get_weather"), arguments_delta('{"city": "'),
        arguments_delta("Paris"), arguments_delta('", "days": '), arguments_delta("3}"), {}]
    assert body["choices"][0]["finish_reason"] == finish_chunk(chunks)["choices"][0]["finish_reason"] == "tool_calls"
    assert body["usage"]["completion_tokens_details"] == chunks[-2]["usage"]["completion_tokens_details"] == {
        "reasoning_tokens": 6}


async def test_033_qwen3_hybrid_thought_then_hermes_call() -> None:
    text = "<think>\nThe user wants the weather.\n</think>\n\n" + hermes("get_current_weather", WEATHER_CALL)
    async with qwen3_hybrid() as (fake, client):
        body, chunks = await both_ways(client, fake, text, ask(tools=[WEATHER]))
    assert from_message(message_of(body)) == {"content": None, "reasoning": "\nThe user wants the weather.\n",
                                              "tool_calls": [("get_current_weather", json.dumps(WEATHER_CALL))]}
    sent = all_deltas(chunks)
    first_call = sent.index({"content": None, **name_delta("get_current_weather")})
    # The "\n\n" after </think> goes to hermes, which sends it on before the call (A.8).
    assert (sent[:first_call][-3:], sent[-1]) == ([{"reasoning": ".\n"}, {"content": "\n"}, {"content": "\n"}], {})
    assert rebuilt(chunks) == {**from_message(message_of(body)), "content": "\n\n"}


@pytest.mark.parametrize(("text", "reasoning", "content"), [
    pytest.param("<think>\nThinking.\n</think>\n\nThe answer.", "\nThinking.\n", "\n\nThe answer.",
                 id="content-after-think-is-not-stripped"),
    pytest.param("Thinking.</think>The answer.", "Thinking.", "The answer.", id="opening-tag-optional"),
    pytest.param("<think>\nStill thinking", "\nStill thinking", None, id="no-end-tag-all-reasoning"),
    pytest.param("Reasoning.</think>Content.</think>More.", "Reasoning.", "Content.More.", id="duplicate-end-absorbed"),
    pytest.param("I will call it.\n\n" + hermes("get_current_weather", WEATHER_CALL), "I will call it.\n\n", None,
                 id="tool-call-ends-reasoning"),
])
async def test_033_reasoning_parser_splits_the_thought(text: str, reasoning: str, content: str | None) -> None:
    async with qwen3_hybrid() as (fake, client):
        fake.script(text)
        message = message_of((await client.post(CHAT, json=ask(tools=[WEATHER]))).json())
    assert (message["reasoning"], message["content"]) == (reasoning, content)


async def test_033_call_written_inside_the_thought_is_parsed() -> None:
    """`<tool_call>` ends the reasoning implicitly; the call goes on to the tool parser (vllm#39056, A.8)."""
    text = "I should check the weather.\n" + xml("get_weather", city="Paris") + "\n</think>\n\n"
    async with qwen35() as (fake, client):
        body, chunks = await both_ways(client, fake, text, ask(tools=[FORECAST], chat_template_kwargs=THINK_ON))
    assert from_message(message_of(body)) == {"content": None, "reasoning": "I should check the weather.\n",
                                              "tool_calls": [("get_weather", '{"city": "Paris"}')]}
    assert rebuilt(chunks) == from_message(message_of(body))


async def test_033_thought_cut_by_the_limit_is_all_reasoning() -> None:
    async with qwen35() as (fake, client):
        body, chunks = await both_ways(client, fake, "Let me think about this for a long while.",
                                       ask(chat_template_kwargs=THINK_ON, max_tokens=4))
    assert from_message(message_of(body)) == rebuilt(chunks) == {
        "content": None, "reasoning": "Let me think about", "tool_calls": []}
    assert (body["choices"][0]["finish_reason"], body["usage"]["completion_tokens_details"]) == (
        "length", {"reasoning_tokens": 4})
    assert finish_chunk(chunks)["choices"][0] == {"index": 0, "delta": {"reasoning": " about"}, "logprobs": None,
                                                  "finish_reason": "length", "stop_reason": None, "token_ids": None,
                                                  "weight_versions": None}


@pytest.mark.parametrize("kwargs", [
    pytest.param({}, id="qwen35-default-is-off"),
    pytest.param({"enable_thinking": False}, id="explicitly-off"),
])
async def test_033_prompt_closed_thought_makes_all_text_content(kwargs: dict[str, Any]) -> None:
    async with qwen35() as (fake, client):
        body, chunks = await both_ways(client, fake, "The answer.", ask(chat_template_kwargs=kwargs))
    assert fake.requests[0].prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # type: ignore[union-attr]
    assert from_message(message_of(body)) == rebuilt(chunks) == {
        "content": "The answer.", "reasoning": None, "tool_calls": []}
    assert body["usage"]["completion_tokens_details"] == {"reasoning_tokens": 0}


async def test_033_include_reasoning_false_hides_the_thought() -> None:
    async with qwen3_hybrid() as (fake, client):
        body, chunks = await both_ways(client, fake, "<think>\nHmm.\n</think>\n\nHi.", ask(include_reasoning=False))
    assert (message_of(body)["reasoning"], message_of(body)["content"]) == (None, "\n\nHi.")
    assert all_deltas(chunks) == [{"content": "\n", "reasoning": None}, {"content": "\n", "reasoning": None},
                                  {"content": "Hi", "reasoning": None}, {"content": ".", "reasoning": None}, {}]


async def test_033_without_parsers_qwen35_text_comes_back_raw() -> None:
    """A.9: the template opened `<think>`, so the raw output has no opening tag; tags and XML survive."""
    async with qwen35(tool_parser=False, reasoning_parser=None) as (fake, client):
        body, chunks = await both_ways(client, fake, THOUGHT_AND_CALL,
                                       ask(tools=[FORECAST], tool_choice="none", chat_template_kwargs=THINK_ON))
    assert fake.requests[0].prompt.endswith("<|im_start|>assistant\n<think>\n")  # type: ignore[union-attr]
    assert from_message(message_of(body)) == rebuilt(chunks) == {
        "content": THOUGHT_AND_CALL, "reasoning": None, "tool_calls": []}
    assert body["usage"]["completion_tokens_details"] is None
    assert "usage" not in finish_chunk(chunks)


# The qwen3_coder tool parser (A.10).


async def test_033_xml_arguments_are_coerced_by_the_requests_schema() -> None:
    text = xml("get_weather", city="42", days="3", metric="True", ratio="2.50", note="null", tags='["a", 1]',
               where='{"lat": 1.5}', extra="7")
    async with qwen35() as (fake, client):
        body, chunks = await both_ways(client, fake, text, ask(tools=[FORECAST]))
    expected = {"city": "42", "days": 3, "metric": True, "ratio": 2.5, "note": None, "tags": ["a", 1],
                "where": {"lat": 1.5}, "extra": "7"}
    [(name, arguments)] = rebuilt(chunks)["tool_calls"]
    assert (name, json.loads(arguments)) == ("get_weather", expected)
    assert from_message(message_of(body))["tool_calls"] == [("get_weather", json.dumps(expected))]


async def test_033_without_a_schema_xml_values_stay_strings() -> None:
    bare = {"type": "function", "function": {"name": "get_weather"}}
    async with qwen35() as (fake, client):
        fake.script(xml("get_weather", days="3", metric="true"))
        message = message_of((await client.post(CHAT, json=ask(tools=[bare]))).json())
    assert message["tool_calls"][0]["function"]["arguments"] == '{"days": "3", "metric": "true"}'


@pytest.mark.parametrize(("text", "content", "arguments"), [
    pytest.param("Sure! " + xml("get_weather", city="Paris"), "Sure!", '{"city": "Paris"}', id="content-stripped"),
    pytest.param("\n\n" + xml("get_weather", city="Paris"), None, '{"city": "Paris"}', id="whitespace-only-is-null"),
    pytest.param("<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>", None,
                 '{"city": "Paris"}', id="missing-tool-call-opener"),
    pytest.param("<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n<parameter=days>\n2\n</parameter>\n"
                 "</function>\n</tool_call>", None, '{"city": "Paris", "days": 2}', id="missing-parameter-end"),
    pytest.param("<tool_call>\n<function=get_weather>\n<parameter=city>\n\nNew\nYork\n\n</parameter>\n</function>\n"
                 "</tool_call>", None, '{"city": "\\nNew\\nYork\\n"}', id="one-newline-trimmed-each-side"),
])
async def test_033_xml_calls_as_vllm_reads_them(text: str, content: str | None, arguments: str) -> None:
    async with qwen35() as (fake, client):
        fake.script(text)
        message = message_of((await client.post(CHAT, json=ask(tools=[FORECAST]))).json())
    assert (message["content"], message["tool_calls"][0]["function"]["arguments"]) == (content, arguments)


async def test_033_string_values_stream_as_written_and_others_wait_until_complete() -> None:
    text = xml("get_weather", city="New York City", days="10")
    async with qwen35() as (fake, client):
        body, chunks = await both_ways(client, fake, text, ask(tools=[FORECAST]))
    fragments = [entry["function"]["arguments"] for delta in all_deltas(chunks) for entry in delta.get("tool_calls", [])
                 if "arguments" in entry["function"]]
    assert fragments == ['{"city": "', "New", " York", " City", '", "days": ', "10}"]
    assert "".join(fragments) == message_of(body)["tool_calls"][0]["function"]["arguments"]


@pytest.mark.parametrize(("options", "content"), [
    pytest.param({}, "Sure.\n", id="qwen3_coder-swallows-the-call"),
    pytest.param({"tool_parser": "hermes"}, "Sure.\n" + xml("get_weather", city="Paris"), id="hermes-passes-it-on"),
    pytest.param({"tool_parser": False}, "Sure.\n" + xml("get_weather", city="Paris"), id="no-parser-passes-it-on"),
])
async def test_033_tool_choice_none(options: dict[str, Any], content: str) -> None:
    """A.6: with "none" an engine parser consumes the call blocks; they show neither as calls nor as content."""
    async with qwen35(reasoning_parser=None, **options) as (fake, client):
        body, chunks = await both_ways(client, fake, "Sure.\n" + xml("get_weather", city="Paris"),
                                       ask(tools=[FORECAST], tool_choice="none"))
    assert from_message(message_of(body)) == rebuilt(chunks) == {"content": content, "reasoning": None,
                                                                  "tool_calls": []}
    assert body["choices"][0]["finish_reason"] == "stop"


# Templates and the default responder per family.


async def test_033_chat_template_kwargs_reach_the_template_in_chat_and_tokenize() -> None:
    async with serving33(template="qwen3", tool_parser=False) as (fake, client):
        await client.post(CHAT, json=ask(chat_template_kwargs={"enable_thinking": False}))
        await client.post(CHAT, json=ask())
        off = await client.post("/tokenize", json={**ask(chat_template_kwargs={"enable_thinking": False}),
                                                   "return_token_strs": True})
    assert [record.prompt for record in fake.requests] == [
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"]
    assert "".join(off.json()["token_strs"]) == fake.requests[0].prompt


async def test_033_qwen35_template_renders_tools_history_and_this_turns_thought() -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "", "reasoning": "Call the tool.", "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "get_weather",
                                                                  "arguments": '{"city": "Paris", "days": 2}'}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    async with qwen35() as (fake, client):
        await client.post(CHAT, json=ask(messages=messages, tools=[FORECAST], chat_template_kwargs=THINK_ON))
    prompt = fake.requests[0].prompt or ""
    assert prompt.startswith("<|im_start|>system\n# Tools\n\nYou have access to the following functions:\n\n<tools>\n"
                             + json.dumps(FORECAST, ensure_ascii=False) + "\n</tools>")
    assert prompt.endswith(
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n<think>\nCall the tool.\n</think>\n\n"
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n2\n"
        "</parameter>\n</function>\n</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\nsunny\n"
        "</tool_response><|im_end|>\n<|im_start|>assistant\n<think>\n")


async def test_033_template_errors_are_400s_with_the_templates_reason() -> None:
    async with qwen35() as (_, client):
        response = await client.post(CHAT, json=ask(messages=[{"role": "system", "content": "only a system"}]))
    assert (response.status_code, response.json()) == (400, error33("No user query found in messages."))


CALC_AND_CLOCK = [CALCULATOR, CLOCK]
QUESTION = [{"role": "user", "content": "what is 12*7, and what time is it in Seoul?"}]


@pytest.mark.parametrize(("options", "fields", "raw"), [
    pytest.param({"template": "qwen2.5"}, {}, hermes("calculator", {"expression": "12*7"}) + "\n"
                 + hermes("get_current_time", {"timezone": "Asia/Seoul"}), id="qwen2.5"),
    pytest.param({"template": "qwen3"}, {}, "<think>\nI should call calculator, get_current_time.\n</think>\n\n"
                 + hermes("calculator", {"expression": "12*7"}) + "\n"
                 + hermes("get_current_time", {"timezone": "Asia/Seoul"}), id="qwen3-thinking"),
    pytest.param({"template": "qwen3"}, {"chat_template_kwargs": {"enable_thinking": False}},
                 hermes("calculator", {"expression": "12*7"}) + "\n"
                 + hermes("get_current_time", {"timezone": "Asia/Seoul"}), id="qwen3-not-thinking"),
    pytest.param({"template": "qwen3.5"}, {"chat_template_kwargs": THINK_ON},
                 "I should call calculator, get_current_time.\n</think>\n\n" + xml("calculator", expression="12*7")
                 + "\n" + xml("get_current_time", timezone="Asia/Seoul"), id="qwen3.5-thinking"),
    pytest.param({"template": "qwen3.5"}, {}, xml("calculator", expression="12*7") + "\n"
                 + xml("get_current_time", timezone="Asia/Seoul"), id="qwen3.5-not-thinking"),
])
async def test_033_default_responder_writes_each_familys_raw_output(options: dict[str, Any], fields: dict[str, Any],
                                                                   raw: str) -> None:
    """Text mode: tools rendered by the model's own template (tool_choice "none"), no parser on the server."""
    async with serving33(tool_parser=False, **options) as (_, client):
        body = (await client.post(CHAT, json=ask(messages=QUESTION, tools=CALC_AND_CLOCK, tool_choice="none",
                                                 **fields))).json()
    assert body["choices"][0]["message"]["content"] == raw


@pytest.mark.parametrize("server", [qwen35, qwen3_hybrid])
async def test_033_default_responder_calls_through_the_recommended_parsers(server: Callable[..., Serving]) -> None:
    async with server() as (_, client):
        body = (await client.post(CHAT, json=ask(messages=QUESTION, tools=CALC_AND_CLOCK,
                                                 chat_template_kwargs=THINK_ON))).json()
    assert from_message(message_of(body)) == {
        "content": None, "reasoning": ("" if server is qwen35 else "\n") + "I should call calculator, "
        "get_current_time.\n", "tool_calls": [("calculator", '{"expression": "12*7"}'),
                                              ("get_current_time", '{"timezone": "Asia/Seoul"}')]}


async def test_033_default_responder_answers_tool_results_after_thinking() -> None:
    history = [*QUESTION, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "calculator", "arguments": '{"expression": "12*7"}'}}]},
        {"role": "tool", "tool_call_id": "a", "content": "84"}]
    async with qwen35() as (_, client):
        body = (await client.post(CHAT, json=ask(messages=history, tools=CALC_AND_CLOCK,
                                                 chat_template_kwargs=THINK_ON))).json()
    assert from_message(message_of(body)) == {"content": "\n\nThe results: 84.", "reasoning": "I have the results.\n",
                                              "tool_calls": []}


async def test_033_cli_serves_a_profile() -> None:
    async with fake_cli("--version", "0.33", "--template", "qwen3.5", "--tool-call-parser", "qwen3_coder",
                        "--reasoning-parser", "qwen3") as client:
        body = (await client.post(CHAT, json=ask(messages=QUESTION, tools=CALC_AND_CLOCK,
                                                 chat_template_kwargs=THINK_ON))).json()
        version = (await client.get("/version")).json()
    assert (version, body["model"], [call["function"]["name"] for call in body["choices"][0]["message"][
        "tool_calls"]]) == ({"version": "0.33.0"}, QWEN35, ["calculator", "get_current_time"])


# vLLM 0.33's own qwen3 reasoning-parser and qwen3_coder tool-parser cases (tests/vllm_parser_cases.py), run
# through the fake's parsers at the level each vLLM test drives: the parser engine alone (tests/reasoning,
# tests/tool_parsers, tests/parser/engine) or the composed server parser (tests/parser/test_streaming.py).
# Streamed cases run twice: fed the test's own pieces, and token by token with the fake's Qwen3 tokenizer.

QWEN3_MARKUP = special_tokens("qwen3")


def piece_tokens(test: str, piece: str, by_token: bool) -> list[str]:
    """The tokens a test's harness passes with a piece: all of them, as a tokenizer would, except in the tool
    engine tests, whose mock tokenizer gives ids only for markup a piece holds whole (and vLLM's scanner then
    anchors on those ids, dropping text after them)."""
    tokens = tokenize(piece, "qwen3")
    if test.startswith(ENGINE_TEST) and not by_token:
        return [token for token in tokens if token in QWEN3_MARKUP]
    return tokens


def pieces(case: ReasoningCase | ToolCase, by_token: bool) -> list[str]:
    return tokenize("".join(case.chunks), "qwen3") if by_token else list(case.chunks)


def agrees(actual: str | None, expected: Expected, streamed: bool) -> bool:
    """A Contains checks parts; a streamed "" (the test joined nothing) also accepts the fake's None."""
    if isinstance(expected, Contains):
        text = actual or ""
        return all(part in text for part in expected.parts) and not any(part in text for part in expected.absent)
    return actual == expected or (streamed and expected == "" and actual is None)


def collect(deltas_seen: list[dict[str, Any] | None]) -> tuple[str | None, str | None, list[tuple[str, str]]]:
    """Content and reasoning concatenated (None when never sent) and calls by index, from parser deltas."""
    fields: dict[str, str | None] = {"content": None, "reasoning": None}
    calls: dict[int, list[str]] = {}
    for delta in deltas_seen:
        for key in fields:
            if (delta or {}).get(key):
                fields[key] = (fields[key] or "") + delta[key]  # type: ignore[index]
        for entry in (delta or {}).get("tool_calls") or ():
            call = calls.setdefault(entry["index"], ["", ""])
            call[0] += entry["function"].get("name", "")
            call[1] += entry["function"].get("arguments", "")
    return fields["content"], fields["reasoning"], [(name, args) for _, (name, args) in sorted(calls.items())]


def engine(thinking: bool, tools: list[dict[str, Any]] | None = None, *, reasoning: bool = False) -> Qwen3Parser:
    """The qwen3 engine as vLLM's parser tests build it: the reasoning parser skips tool markup."""
    return Qwen3Parser("0.33", thinking=thinking, tools=tools, token_terminals=QWEN3_MARKUP,
                       skip_tool_parsing=reasoning)


def composed(case: ReasoningCase | ToolCase, tools: list[dict[str, Any]] | None) -> Parser:
    """The server's parser as tests/parser/test_streaming.py builds it, with an empty prompt."""
    tool_parser = case.tool_parser if isinstance(case, ToolCase) else None
    reasoning = not isinstance(case, ToolCase) or case.reasoning_parser == "qwen3"
    return Parser("0.33", ParserConfig(tool_parser, reasoning, "qwen3"),
                  ChatOptions(tools, "auto" if tools else "none", thinking=getattr(case, "thinking", True)), [])


def runs(cases: list[Any]) -> list[Any]:
    """Each case whole; a streamed case by its pieces and token by token."""
    return [pytest.param(case, by_token, id=f"{mode}-{case.test}") for case in cases
            for by_token, mode in ([(False, "pieces"), (True, "tokens")] if case.streamed else [(False, "whole")])]


def run_stream(case: ReasoningCase | ToolCase, step: Callable[[str, list[str], bool], dict[str, Any] | None],
               by_token: bool) -> tuple[str | None, str | None, list[tuple[str, str]]]:
    parts = pieces(case, by_token)
    return collect([step(piece, piece_tokens(case.test, piece, by_token), i == len(parts) - 1)
                    for i, piece in enumerate(parts)])


@pytest.mark.parametrize(("case", "by_token"), runs(REASONING_CASES))
def test_vllm_qwen3_reasoning_cases(case: ReasoningCase, by_token: bool) -> None:
    if not case.streamed:
        reasoning, content = engine(case.thinking, reasoning=True).extract_reasoning("".join(case.chunks))
    elif case.test.startswith(STREAMING_TEST):
        parser = composed(case, None)
        content, reasoning, _ = run_stream(case, parser.parse_delta, by_token)
    else:
        parser_engine = engine(case.thinking, reasoning=True)
        content, reasoning, _ = run_stream(case, lambda text, tokens, _: parser_engine.stream_reasoning(text, tokens),
                                           by_token)
    assert agrees(reasoning, case.reasoning, case.streamed), reasoning
    assert agrees(content, case.content, case.streamed), content


def calls_agree(actual: list[tuple[str, str]], case: ToolCase) -> bool:
    """Names, and arguments after json.loads where the test checks them, in the test's `calls_checked` mode."""
    def same(call: tuple[str, str], expected: Call) -> bool:
        return call[0] == expected.name and (expected.arguments is None or json.loads(call[1]) == expected.arguments)

    if case.calls_checked == "some":
        return all(any(same(call, expected) for call in actual) for expected in case.calls)
    checked = actual[len(actual) - len(case.calls):] if case.calls_checked == "last" else actual
    return len(checked) == len(case.calls) and all(map(same, checked, case.calls))


@pytest.mark.parametrize(("case", "by_token"), runs(TOOL_CASES))
def test_vllm_qwen3_coder_and_hermes_cases(case: ToolCase, by_token: bool) -> None:
    tools = [{"type": "function", "function": {"name": name, "parameters": parameters}}
             for name, parameters in case.tools.items()] or None
    reasoning: str | None = None
    if not case.streamed:
        parser = engine(False, tools)
        parser.check_request(tools, "auto")
        extracted = parser.extract_calls("".join(case.chunks))
        content, calls = extracted.content, [(name, arguments) for _, name, arguments in extracted.calls]
    elif case.reasoning_parser is not None or case.tool_parser == "hermes":
        content, reasoning, calls = run_stream(case, composed(case, tools).parse_delta, by_token)
    else:
        parser = engine(False, tools)
        parser.check_request(tools, "auto")
        content, _, calls = run_stream(case, lambda text, tokens, _: parser.stream_calls(text, tokens), by_token)
    assert calls_agree(calls, case), calls
    assert agrees(content, case.content, case.streamed), content
    if case.reasoning_parser is not None:
        assert agrees(reasoning, case.reasoning, case.streamed), reasoning

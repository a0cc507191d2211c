"""Client-level unit tests with respx: status mapping, retries, error bodies, stream assembly."""

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
import respx

from agent_app import (
    Completion,
    ContextTooLong,
    EncodedJson,
    FunctionCall,
    LLMError,
    LLMTimeout,
    NoToolParser,
    Settings,
    StreamAssembler,
    Usage,
    VLLMClient,
)

CHAT_URL = "http://vllm.test/v1/chat/completions"
PAYLOAD = {"messages": [{"role": "user", "content": "hi"}]}
COMPLETION_HEAD = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}


def completion_body(content: str | None = "Hello", tool_calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A v0.11-shaped non-streaming body, extra keys and nulls included."""
    return {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": content, "refusal": None, "annotations": None,
                        "audio": None, "function_call": None, "tool_calls": tool_calls or [],
                        "reasoning_content": None},
            "logprobs": None, "finish_reason": "tool_calls" if tool_calls else "stop", "stop_reason": None,
            "token_ids": None,
        }],
        "service_tier": None, "system_fingerprint": None,
        "usage": {"prompt_tokens": 30, "total_tokens": 38, "completion_tokens": 8, "prompt_tokens_details": None},
        "prompt_logprobs": None, "prompt_token_ids": None, "kv_transfer_params": None,
    }


def usage(prompt: int, completion: int, total: int) -> Usage:
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=total)


def sse(*chunks: dict[str, Any] | str, done: bool = True) -> bytes:
    """A vLLM stream body: `data: <compact json>` events, then `[DONE]`."""
    lines = [f"data: {c if isinstance(c, str) else json.dumps(c, separators=(',', ':'))}\n\n" for c in chunks]
    return ("".join(lines) + ("data: [DONE]\n\n" if done else "")).encode()


def delta(payload: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
    return {**COMPLETION_HEAD, "choices": [{"index": 0, "delta": payload, "logprobs": None,
                                            "finish_reason": finish_reason, "token_ids": None}]}


USAGE_CHUNK = {**COMPLETION_HEAD, "choices": [], "usage": {"prompt_tokens": 5, "total_tokens": 9,
                                                            "completion_tokens": 4}}


@pytest.fixture
def router() -> respx.MockRouter:
    return respx.MockRouter(assert_all_called=False)


@pytest.fixture
async def make_client(router: respx.MockRouter, make_settings: Callable[..., Settings]
                      ) -> AsyncIterator[Callable[..., VLLMClient]]:
    transport = httpx.MockTransport(router.async_handler)
    async with httpx.AsyncClient(transport=transport) as http:
        yield lambda **overrides: VLLMClient(http, transport, make_settings(**overrides))


async def test_complete_reads_a_plain_answer(router: respx.MockRouter, make_client: Callable[..., VLLMClient]) -> None:
    router.post(CHAT_URL).respond(json=completion_body("Paris."))
    assert await make_client().complete(PAYLOAD) == Completion("", "Paris.", [], "stop", usage(30, 8, 38))


async def test_complete_reads_tool_calls_and_sends_the_model(
    router: respx.MockRouter, make_client: Callable[..., VLLMClient]
) -> None:
    call = {"id": "chatcmpl-tool-1", "type": "function",
            "function": {"name": "calculator", "arguments": '{"expression": "12*7"}'}}
    route = router.post(CHAT_URL).respond(json=completion_body(None, [call]))
    completion = await make_client(vllm_model="Qwen/Qwen2.5-7B-Instruct").complete(PAYLOAD)
    assert completion.tool_calls == [FunctionCall("calculator", {"expression": "12*7"})]
    assert completion.tool_calls[0].id == "chatcmpl-tool-1"
    assert completion.content == ""
    assert json.loads(route.calls.last.request.content) == {**PAYLOAD, "model": "Qwen/Qwen2.5-7B-Instruct"}


async def test_chat_request_carries_its_own_headers_and_splices_encoded_json(
    router: respx.MockRouter, make_client: Callable[..., VLLMClient]
) -> None:
    """Built without httpx's header preparation, the request still says who it is for and how long it is,
    asks for no content encoding (the body is read raw), and takes EncodedJson values as JSON, not as text."""
    route = router.post(CHAT_URL).respond(json=completion_body())
    tools = [{"type": "function", "function": {"name": "wiki", "description": "Prüfen", "parameters": {}}}]
    await make_client(vllm_model="m").complete({**PAYLOAD, "tools": EncodedJson(json.dumps(tools))})
    request = route.calls.last.request
    assert request.headers["host"] == "vllm.test"
    assert request.headers["content-length"] == str(len(request.content))
    assert request.headers["accept-encoding"] == "identity"
    assert request.headers["content-type"] == "application/json"
    assert json.loads(request.content) == {**PAYLOAD, "tools": tools, "model": "m"}


@pytest.mark.parametrize("base_url", ["http://vllm.test", "http://vllm.test/", "http://vllm.test/v1",
                                      "http://vllm.test/v1/"])
async def test_base_url_tolerates_trailing_slash_and_v1(
    base_url: str, router: respx.MockRouter, make_client: Callable[..., VLLMClient]
) -> None:
    route = router.post(CHAT_URL).respond(json=completion_body())
    await make_client(vllm_base_url=base_url).complete(PAYLOAD)
    assert route.call_count == 1


async def test_api_key_is_sent_as_bearer_token(router: respx.MockRouter,
                                               make_client: Callable[..., VLLMClient]) -> None:
    route = router.post(CHAT_URL).respond(json=completion_body())
    await make_client(vllm_api_key="s3cret").complete(PAYLOAD)
    assert route.calls.last.request.headers["authorization"] == "Bearer s3cret"


@pytest.mark.parametrize(
    ("status", "body", "error", "detail"),
    [
        pytest.param(400, {"error": {"message": "bad thing", "type": "BadRequestError", "param": None, "code": 400}},
                     LLMError, "vLLM answered 400: bad thing", id="new-error-shape"),
        pytest.param(400, {"object": "error", "message": "old thing", "type": "BadRequestError", "param": None,
                           "code": 400}, LLMError, "vLLM answered 400: old thing", id="old-error-shape"),
        pytest.param(401, {"error": "Unauthorized"}, LLMError, "vLLM answered 401: Unauthorized", id="unauthorized"),
        pytest.param(404, {"error": {"message": "The model `x` does not exist.", "type": "NotFoundError",
                                     "param": None, "code": 404}},
                     LLMError, "vLLM answered 404: The model `x` does not exist.", id="unknown-model"),
        pytest.param(400, {"error": {"message": "This model's maximum context length is 32768 tokens. However, your "
                                                "request has 40000 input tokens. Please reduce the length of the "
                                                "input messages. None", "type": "BadRequestError", "param": None,
                                     "code": 400}},
                     ContextTooLong, "the conversation is too long for the model: This model's maximum context "
                     "length is 32768 tokens. However, your request has 40000 input tokens. Please reduce the "
                     "length of the input messages. None", id="context-length"),
        pytest.param(400, {"object": "error", "message": '"auto" tool choice requires --enable-auto-tool-choice '
                           "and --tool-call-parser to be set", "type": "BadRequestError", "param": None, "code": 400},
                     NoToolParser, '"auto" tool choice requires --enable-auto-tool-choice and '
                     "--tool-call-parser to be set", id="no-tool-parser"),
    ],
)
async def test_error_statuses_are_mapped_and_not_retried(
    status: int, body: dict[str, Any], error: type[LLMError], detail: str,
    router: respx.MockRouter, make_client: Callable[..., VLLMClient],
) -> None:
    route = router.post(CHAT_URL).respond(status, json=body)
    with pytest.raises(error) as caught:
        await make_client().complete(PAYLOAD)
    assert type(caught.value) is error
    assert str(caught.value) == detail
    assert route.call_count == 1


async def test_5xx_once_is_retried(router: respx.MockRouter, make_client: Callable[..., VLLMClient]) -> None:
    route = router.post(CHAT_URL).mock(side_effect=[httpx.Response(503, text=""),
                                                    httpx.Response(200, json=completion_body("ok"))])
    assert (await make_client().complete(PAYLOAD)).content == "ok"
    assert route.call_count == 2


async def test_5xx_every_time_gives_up_after_the_retries(router: respx.MockRouter,
                                                         make_client: Callable[..., VLLMClient]) -> None:
    route = router.post(CHAT_URL).respond(500, text="")
    with pytest.raises(LLMError) as caught:
        await make_client(vllm_max_retries=2).complete(PAYLOAD)
    assert str(caught.value) == "vLLM answered 500: empty response body"
    assert route.call_count == 3


async def test_connection_errors_are_retried_then_reported(router: respx.MockRouter,
                                                           make_client: Callable[..., VLLMClient]) -> None:
    route = router.post(CHAT_URL).mock(side_effect=httpx.ConnectError("Connection refused"))
    with pytest.raises(LLMError) as caught:
        await make_client(vllm_max_retries=1).complete(PAYLOAD)
    assert str(caught.value) == "vLLM is not reachable at http://vllm.test: Connection refused"
    assert route.call_count == 2


async def test_read_timeout_becomes_llm_timeout_without_retry(router: respx.MockRouter,
                                                               make_client: Callable[..., VLLMClient]) -> None:
    route = router.post(CHAT_URL).mock(side_effect=httpx.ReadTimeout("slow"))
    with pytest.raises(LLMTimeout) as caught:
        await make_client().complete(PAYLOAD)
    assert str(caught.value) == "vLLM at http://vllm.test did not answer in time"
    assert route.call_count == 1


async def test_non_json_200_is_an_llm_error(router: respx.MockRouter, make_client: Callable[..., VLLMClient]) -> None:
    router.post(CHAT_URL).respond(200, text="<html>oops</html>")
    with pytest.raises(LLMError) as caught:
        await make_client().complete(PAYLOAD)
    assert str(caught.value) == "vLLM sent a reply that is not a chat completion"


async def collect(client: VLLMClient) -> list[tuple[str, str] | Completion]:
    """The streamed (reasoning, content) pieces, then the Completion assembled from them."""
    assembler = StreamAssembler()
    return [piece async for piece in client.stream(PAYLOAD, assembler)] + [assembler.completion()]


async def test_stream_assembles_parallel_calls_by_index(router: respx.MockRouter,
                                                        make_client: Callable[..., VLLMClient]) -> None:
    route = router.post(CHAT_URL).respond(200, content=sse(
        delta({"role": "assistant", "content": ""}),
        delta({"tool_calls": [{"id": "call-a", "type": "function", "index": 0, "function": {"name": "calculator"}}]}),
        delta({"tool_calls": [{"index": 0, "function": {"arguments": '{"expression": "'}}]}),
        delta({"tool_calls": [{"index": 0, "function": {"arguments": '12*7"}'}}]}),
        delta({"content": "\n"}),
        delta({"tool_calls": [{"id": "call-b", "type": "function", "index": 1,
                               "function": {"name": "get_current_time"}}]}),
        delta({"content": ""}, finish_reason="tool_calls"),
        USAGE_CHUNK,
    ), headers={"content-type": "text/event-stream"})
    pieces = await collect(make_client())
    calls = [FunctionCall("calculator", {"expression": "12*7"}), FunctionCall("get_current_time", {})]
    assert pieces == [Completion("", "", calls, "tool_calls", usage(5, 4, 9))]
    assert [call.id for call in pieces[0].tool_calls] == ["call-a", "call-b"]
    sent = json.loads(route.calls.last.request.content)
    assert (sent["stream"], sent["stream_options"]) == (True, {"include_usage": True})


async def test_stream_yields_one_text_piece_per_network_read(router: respx.MockRouter,
                                                             make_client: Callable[..., VLLMClient]) -> None:
    body = sse(
        delta({"role": "assistant", "content": ""}), delta({"content": "Hel"}), delta({"content": "lo"}),
        "{\"choices\":[{\"index\":0,\"delta\":{\"content\":\" wörld\"},\"new_key\":1}]}",
        delta({}, finish_reason="stop"), USAGE_CHUNK,
    ).replace(b"data: {\"choices", b"data:{\"choices")
    split = body.index(b"w\xc3\xb6rld") + 2  # the second read starts inside a line and inside the 'ö'

    async def two_reads() -> AsyncIterator[bytes]:
        yield body[:split]
        yield body[split:]

    router.post(CHAT_URL).mock(side_effect=lambda request: httpx.Response(200, content=two_reads()))
    assert await collect(make_client()) == [("", "Hello"), ("", " wörld"),
                                           Completion("", "Hello wörld", [], "stop", usage(5, 4, 9))]


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        pytest.param(sse(delta({"content": "Hel"}), done=False), "vLLM's stream ended before [DONE]",
                     id="cut-before-done"),
        pytest.param(sse(delta({"content": "Hel"}), "{not json"), "vLLM sent an unreadable stream chunk",
                     id="garbage-line"),
        pytest.param(sse(delta({"content": "Hel"}), '{"error": {"message": "engine died", "type": "BadRequestError",'
                                                    ' "param": null, "code": 400}}'),
                     "vLLM reported an error: engine died", id="error-event"),
        pytest.param(sse('{"error": "Unauthorized"}'), "vLLM reported an error: Unauthorized",
                     id="error-event-string"),
    ],
)
async def test_broken_streams_are_llm_errors(body: bytes, detail: str, router: respx.MockRouter,
                                             make_client: Callable[..., VLLMClient]) -> None:
    router.post(CHAT_URL).respond(200, content=body)
    with pytest.raises(LLMError) as caught:
        await collect(make_client())
    assert str(caught.value) == detail


async def test_stream_status_errors_are_read_before_streaming(router: respx.MockRouter,
                                                              make_client: Callable[..., VLLMClient]) -> None:
    route = router.post(CHAT_URL).mock(side_effect=[httpx.Response(500), httpx.Response(200, content=sse(
        delta({"content": "ok"}), delta({}, finish_reason="stop")))])
    assert await collect(make_client()) == [("", "ok"), Completion("", "ok", [], "stop", None)]
    assert route.call_count == 2


async def test_max_model_len_is_read_once(router: respx.MockRouter, make_client: Callable[..., VLLMClient]) -> None:
    route = router.get("http://vllm.test/v1/models").respond(
        json={"object": "list", "data": [{"id": "m", "object": "model", "max_model_len": 4096}]})
    client = make_client(vllm_model="m")
    assert [await client.max_model_len() for _ in range(3)] == [4096] * 3
    assert route.call_count == 1


async def test_a_failed_max_model_len_is_asked_again_only_after_a_minute(
    router: respx.MockRouter, make_client: Callable[..., VLLMClient]
) -> None:
    route = router.get("http://vllm.test/v1/models").mock(side_effect=[
        httpx.Response(500, text="starting"),
        httpx.Response(200, json={"object": "list", "data": [{"id": "m", "max_model_len": 4096}]}),
    ])
    client = make_client(vllm_model="m")
    assert [await client.max_model_len() for _ in range(3)] == [32768] * 3
    assert route.call_count == 1
    client._max_model_len_asked_at -= 61  # a minute later
    assert await client.max_model_len() == 4096
    assert route.call_count == 2

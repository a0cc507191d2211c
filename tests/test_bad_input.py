"""Bad input: every class of bad request gets a 4xx with a clear `{"detail": str}`, never a 500; and the
text parsers, fed anything, fail only in their documented way and quickly (hypothesis).

Which status for what is too big:
  - content longer than MAX_CONTENT_CHARS                    -> 413 from the service's own check;
  - a body larger than 6 × MAX_CONTENT_CHARS + 64 KiB bytes  -> 413 from the request middleware, before the
    body is read (by Content-Length, or counted as a chunked body arrives);
  - pydantic's absolute bound on `content` (1,000,000 characters) gives 422, but it is reached first only
    when MAX_CONTENT_CHARS is set to that same maximum.
"""

import base64
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import pytest_asyncio
from conftest import LiveServer
from fake_vllm import FakeVLLM
from hypothesis import given, settings
from hypothesis import strategies as st

from agent_app import (
    CALL_START,
    CONVERSATION_ID_PATTERN,
    FunctionCall,
    Settings,
    ToolCallEvent,
    decode_arguments,
    parse_tool_calls,
)


@dataclass
class Service:
    """The app on loopback with its fake vLLM and a client."""

    fake: FakeVLLM
    url: str
    http: httpx.AsyncClient


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def service(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Service]:
    """One service for the table tests below: none of their requests may change anything, which each checks."""
    database = tmp_path_factory.mktemp("bad_input") / "conversations.db"
    async with FakeVLLM() as fake, httpx.AsyncClient(timeout=30) as http:
        settings = Settings(_env_file=None, vllm_base_url=fake.url, database_url=f"sqlite+aiosqlite:///{database}")
        async with LiveServer(settings) as server:
            yield Service(fake, server.url, http)


JSON = {"content-type": "application/json"}
ID_RULE = f"String should match pattern '{CONVERSATION_ID_PATTERN}'"
NOT_JSON = "the body must be JSON, sent with Content-Type: application/json"
BAD_BODIES = [  # httpx arguments, status, detail
    pytest.param({"content": b"", "headers": JSON}, 422, "body: Field required", id="empty-body"),
    pytest.param({"content": b" \n\t ", "headers": JSON}, 422, "body: invalid JSON at character 4: Expecting value",
                 id="whitespace-only-body"),
    pytest.param({"json": {"content": " \n\t "}}, 422, "content: Value error, must not be empty or only whitespace",
                 id="whitespace-only-content"),
    pytest.param({"content": b'{"content": "hi"', "headers": JSON}, 422,
                 "body: invalid JSON at character 16: Expecting ',' delimiter", id="malformed-json"),
    pytest.param({"content": b"[" * 50_000, "headers": JSON}, 400, "There was an error parsing the body",
                 id="json-nested-too-deep"),
    pytest.param({"content": b'{"content": "\xff"}', "headers": JSON}, 400, "There was an error parsing the body",
                 id="invalid-utf8"),
    pytest.param({"content": b'{"content": "\\ud800"}', "headers": JSON}, 422,
                 "content: Input should be a valid string, unable to parse raw data as a unicode string",
                 id="lone-surrogate"),
    pytest.param({"json": {"content": "a\x00b"}}, 422,
                 "content: Value error, must not contain NUL characters (\\u0000)", id="nul-character"),
    pytest.param({"json": ["hi"]}, 422, "body: Input should be a valid dictionary or object to extract fields from",
                 id="body-is-a-list"),
    pytest.param({"json": "hi"}, 422, "body: Input should be a valid dictionary or object to extract fields from",
                 id="body-is-a-string"),
    pytest.param({"json": {"content": None}}, 422, "content: Input should be a valid string", id="content-null"),
    pytest.param({"json": {"content": {"text": "hi"}}}, 422, "content: Input should be a valid string",
                 id="content-object"),
    pytest.param({"json": {"content": "hi", "conversation_id": 5}}, 422,
                 "conversation_id: Input should be a valid string", id="conversation-id-number"),
    pytest.param({"json": {"content": "hi", "role": "system"}}, 422, "role: Extra inputs are not permitted",
                 id="extra-field"),
    pytest.param({"json": {"content": "hi", "conversation_id": "a" * 65}}, 422, f"conversation_id: {ID_RULE}",
                 id="conversation-id-too-long"),
    pytest.param({"json": {"content": "hi", "conversation_id": "x'; DROP TABLE messages;--"}}, 422,
                 f"conversation_id: {ID_RULE}", id="conversation-id-sql"),
    pytest.param({"content": b'{"content": "hi"}', "headers": {"content-type": "text/plain"}}, 415,
                 f"{NOT_JSON}, not text/plain", id="text-plain"),
    pytest.param({"data": {"content": "hi"}}, 415, f"{NOT_JSON}, not application/x-www-form-urlencoded", id="form"),
    pytest.param({"files": {"content": ("a.txt", b"hi")}}, 415, f"{NOT_JSON}, not multipart/form-data",
                 id="multipart"),
    pytest.param({"content": b'{"content": "hi"}'}, 415, NOT_JSON, id="no-content-type"),
]


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("path", ["/api/v1/chat", "/api/v1/chat/stream"])
@pytest.mark.parametrize(("request_args", "status", "detail"), BAD_BODIES)
async def test_a_bad_chat_body_is_a_4xx_with_a_clear_detail(
    path: str, request_args: dict[str, Any], status: int, detail: str, service: Service
) -> None:
    response = await service.http.post(f"{service.url}{path}", **request_args)
    listing = (await service.http.get(f"{service.url}/api/v1/conversations")).json()
    assert (response.status_code, response.json()) == (status, {"detail": detail})
    assert (service.fake.requests, listing["conversations"]) == ([], [])


async def chunks(body: bytes) -> AsyncIterator[bytes]:
    """A body sent chunked, without Content-Length."""
    for start in range(0, len(body), 8192):
        yield body[start:start + 8192]


@pytest.mark.parametrize("path", ["/api/v1/chat", "/api/v1/chat/stream"])
async def test_too_much_content_is_413_from_the_service_and_a_too_big_body_413_from_the_middleware(
    path: str, fake_vllm: FakeVLLM, live_server: Any, http: httpx.AsyncClient
) -> None:
    huge = json.dumps({"content": "x" * 70_000}).encode()
    async with live_server(vllm_base_url=fake_vllm.url, max_content_chars=10) as server:
        url = f"{server.url}{path}"
        over_limit = await http.post(url, json={"content": "x" * 1000})
        declared = await http.post(url, content=huge, headers=JSON)
        chunked = await http.post(url, content=chunks(huge), headers=JSON)
        after = await http.post(f"{server.url}/api/v1/chat", json={"content": "x" * 10})
    limit = {"detail": "content is 1000 characters; the limit is 10"}
    assert (over_limit.status_code, over_limit.json()) == (413, limit)
    too_big = {"detail": "the request body is larger than 65596 bytes"}
    assert (declared.status_code, declared.json()) == (413, too_big)
    assert "content-length" not in chunked.request.headers
    assert (chunked.status_code, chunked.json()) == (413, too_big)
    assert after.json()["content"] == "You said: xxxxxxxxxx"
    assert len(fake_vllm.requests) == 1


def cursor(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode()


BAD_QUERIES = [  # method, path and query, status, detail
    pytest.param("GET", "/conversations/bad!id", 422, f"path.conversation_id: {ID_RULE}", id="get-bad-id"),
    pytest.param("DELETE", "/conversations/bad!id", 422, f"path.conversation_id: {ID_RULE}", id="delete-bad-id"),
    pytest.param("GET", f"/conversations/{'a' * 65}", 422, f"path.conversation_id: {ID_RULE}", id="id-too-long"),
    pytest.param("GET", "/conversations/a%00b", 422, f"path.conversation_id: {ID_RULE}", id="id-with-nul"),
    pytest.param("GET", "/conversations/a%2Fb", 404, "Not Found", id="id-with-slash-matches-no-route"),
    pytest.param("GET", "/conversations/unknown-id", 404, "conversation 'unknown-id' not found", id="unknown-id"),
    pytest.param("GET", "/conversations?limit=0", 422, "query.limit: Input should be greater than or equal to 1",
                 id="limit-0"),
    pytest.param("GET", "/conversations?limit=101", 422, "query.limit: Input should be less than or equal to 100",
                 id="limit-101"),
    pytest.param("GET", "/conversations?limit=-1", 422, "query.limit: Input should be greater than or equal to 1",
                 id="limit-negative"),
    pytest.param("GET", "/conversations?limit=ten", 422,
                 "query.limit: Input should be a valid integer, unable to parse string as an integer", id="limit-text"),
    pytest.param("GET", "/conversations?limit=1.5", 422,
                 "query.limit: Input should be a valid integer, unable to parse string as an integer",
                 id="limit-fraction"),
    pytest.param("GET", f"/conversations?cursor={'a' * 201}", 422,
                 "query.cursor: String should have at most 200 characters", id="cursor-too-long"),
    pytest.param("GET", "/conversations?cursor=%FF%FE", 422, "cursor is not one this service returned",
                 id="cursor-not-base64"),
    pytest.param("GET", f"/conversations?cursor={cursor(b'no separator')}", 422,
                 "cursor is not one this service returned", id="cursor-without-separator"),
    pytest.param("GET", f"/conversations?cursor={cursor(b'yesterday|abc')}", 422,
                 "cursor is not one this service returned", id="cursor-time-not-a-number"),
    pytest.param("GET", f"/conversations?cursor={cursor(bytes([0xFF]) + b'|abc')}", 422,
                 "cursor is not one this service returned", id="cursor-not-utf8"),
]


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize(("method", "target", "status", "detail"), BAD_QUERIES)
async def test_bad_ids_limits_and_cursors_are_4xx_with_a_clear_detail(
    method: str, target: str, status: int, detail: str, service: Service
) -> None:
    response = await service.http.request(method, f"{service.url}/api/v1{target}")
    assert (response.status_code, response.json()) == (status, {"detail": detail})


# Property tests. Text made of the pieces that matter to the parsers finds their corners; st.text() the rest.
PIECES = ["<tool_call>", "</tool_call>", "<tool", "<", "_call>", '{"name": "calculator", "arguments": ', '"name"',
          '"arguments"', '"parameters"', "{", "}", "[", "]", '"', "\\", ":", ",", " ", "\n", "1", "null", '"x"']
MARKUP_TEXT = st.lists(st.one_of(st.sampled_from(PIECES), st.text(max_size=3)), max_size=40).map("".join)
DEEP_JSON = st.tuples(st.sampled_from(["", '"', "<tool_call>", '<tool_call>{"name": "x", "arguments": ']),
                      st.sampled_from(["[", '{"a": ']), st.integers(min_value=1, max_value=20_000),
                      ).map(lambda parts: parts[0] + parts[1] * parts[2])
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=3), children, max_size=3),
    max_leaves=20,
)


@settings(max_examples=300, deadline=1000)
@given(text=st.one_of(MARKUP_TEXT, DEEP_JSON, st.text()))
def test_parse_tool_calls_takes_any_text(text: str) -> None:
    """No exception, whatever the model writes; the content is the text before the first call tag."""
    content, calls = parse_tool_calls(text, {})
    start = CALL_START.search(text)
    assert content == (text if start is None else text[: start.start()])
    for call in calls:
        assert isinstance(call, FunctionCall) and isinstance(call.name, str) and isinstance(call.arguments, dict)
        assert call.error is None or (call.arguments == {} and isinstance(call.error, str))


@settings(max_examples=300, deadline=1000)
@given(raw=st.one_of(MARKUP_TEXT, DEEP_JSON, st.text(), JSON_VALUES, JSON_VALUES.map(json.dumps),
                     JSON_VALUES.map(json.dumps).map(json.dumps)))
def test_decode_arguments_returns_an_object_that_can_be_sent_on_or_raises_value_error(raw: Any) -> None:
    try:
        arguments = decode_arguments(raw)
    except ValueError:
        return
    assert isinstance(arguments, dict)
    ToolCallEvent(id="call", name="tool", arguments=arguments).model_dump_json()

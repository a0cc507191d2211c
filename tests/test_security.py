"""Security: the API key, CORS, secrets kept out of every output, error details without internals, request ids.

Upstream error text: vLLM's own message is passed on (it is what an operator needs: "The model `x` does not
exist.", a template error, ...), cut to 500 characters and cut before any echo of the request. vLLM's
validation errors repeat the whole request body, so without the cut a detail would carry the prompt.
"""

import io
import json
import logging
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from conftest import stream_chat, tool_call_text
from fake_vllm import FakeVLLM, Reply

import agent_app
from agent_app import JsonLogFormatter
from tools import ToolRegistry, calculator

API_KEY = "api-key-4b1f9e77"
VLLM_KEY = "vllm-key-7c2d0a13"
WITH_KEY = {"Authorization": f"Bearer {API_KEY}"}
UNAUTHORIZED = {"detail": "missing or wrong API key: send the header Authorization: Bearer <API_KEY>"}
OPEN_WARNING = "API_KEY is not set: /api/v1 and /ui are open to anyone who can reach this port"
FRESH_ID = re.compile(r"^[0-9a-f]{32}$")


@pytest.fixture
def service_log() -> Iterator[io.StringIO]:
    """What the service's loggers (agent_app, agent_app.access) write during the test, as its JSON lines."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonLogFormatter())
    service_logger = logging.getLogger("agent_app")
    service_logger.addHandler(handler)
    yield stream
    service_logger.removeHandler(handler)


def log_entries(log: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.getvalue().splitlines() if line.startswith("{")]


ROUTES_WITH_KEY = {  # every /api/v1 route but /health, and its status with the right key (DELETE last)
    ("POST", "/api/v1/chat"): 200,
    ("POST", "/api/v1/chat/stream"): 200,
    ("GET", "/api/v1/conversations"): 200,
    ("GET", "/api/v1/conversations/{conversation_id}"): 200,
    ("GET", "/api/v1/tools"): 200,
    ("GET", "/api/v1/runs/{run_id}"): 404,  # an unknown run: the key let the request through
    ("GET", "/api/v1/runs/{run_id}/events"): 404,
    ("POST", "/api/v1/runs/{run_id}/cancel"): 404,
    ("DELETE", "/api/v1/conversations/{conversation_id}"): 204,
}


async def test_with_api_key_every_api_route_but_health_needs_the_bearer_key(
    fake_vllm: FakeVLLM, live_server: Any, http: httpx.AsyncClient, service_log: io.StringIO
) -> None:
    refusals: list[tuple[int, str, str, dict[str, str]]] = []
    statuses: dict[tuple[str, str], int] = {}
    async with live_server(vllm_base_url=fake_vllm.url, api_key=API_KEY) as server:
        routes = {(method.upper(), path) for path, operations in server.app.openapi()["paths"].items()
                  if path.startswith("/api/v1/") for method in operations}
        conversation_id = (await http.post(f"{server.url}/api/v1/chat", json={"content": "hi"},
                                           headers=WITH_KEY)).json()["conversation_id"]
        for method, path in ROUTES_WITH_KEY:
            url = server.url + path.format(conversation_id=conversation_id, run_id="0" * 32)
            body = {"content": "hello"} if method == "POST" else None
            for headers in ({}, {"Authorization": "Bearer wrong-key"}, {"Authorization": f"Basic {API_KEY}"},
                            {"Authorization": API_KEY}, {"X-API-Key": API_KEY}):
                response = await http.request(method, url, json=body, headers=headers)
                refusals.append((response.status_code, response.headers.get("www-authenticate", ""),
                                 response.headers.get("x-request-id", ""), response.json()))
            statuses[method, path] = (await http.request(method, url, json=body, headers=WITH_KEY)).status_code
        health = await http.get(f"{server.url}/api/v1/health")
    assert routes - {("GET", "/api/v1/health")} == set(ROUTES_WITH_KEY)
    assert [(status, scheme, bool(FRESH_ID.match(request_id)), body) for status, scheme, request_id, body
            in refusals] == [(401, "Bearer", True, UNAUTHORIZED)] * 5 * len(ROUTES_WITH_KEY)
    assert statuses == ROUTES_WITH_KEY
    assert (health.status_code, health.json()["status"]) == (200, "ok")
    assert OPEN_WARNING not in [entry["message"] for entry in log_entries(service_log)]


async def test_the_key_is_compared_in_constant_time(
    fake_vllm: FakeVLLM, live_server: Any, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    compared: list[tuple[bytes, bytes]] = []
    compare_digest = agent_app.hmac.compare_digest

    def recording_compare_digest(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return compare_digest(a, b)

    monkeypatch.setattr(agent_app.hmac, "compare_digest", recording_compare_digest)
    async with live_server(vllm_base_url=fake_vllm.url, api_key=API_KEY) as server:
        refused = await http.get(f"{server.url}/api/v1/tools", headers={"Authorization": "Bearer guess"})
        allowed = await http.get(f"{server.url}/api/v1/tools", headers=WITH_KEY)
    assert (refused.status_code, allowed.status_code) == (401, 200)
    assert compared == [(b"guess", API_KEY.encode()), (API_KEY.encode(), API_KEY.encode())]


async def test_without_api_key_the_api_is_open_and_a_startup_line_says_so(
    fake_vllm: FakeVLLM, live_server: Any, http: httpx.AsyncClient, service_log: io.StringIO
) -> None:
    async with live_server(vllm_base_url=fake_vllm.url) as server:
        chat = await http.post(f"{server.url}/api/v1/chat", json={"content": "hi"})
        listing = await http.get(f"{server.url}/api/v1/conversations")
    assert (chat.status_code, listing.status_code) == (200, 200)
    first = log_entries(service_log)[0]
    assert (first["level"], first["message"]) == ("WARNING", OPEN_WARNING)


GOOD, EVIL = "http://good.example", "http://evil.example"
PREFLIGHT = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}


def cors(response: httpx.Response) -> tuple[int, str | None, str | None]:
    return (response.status_code, response.headers.get("access-control-allow-origin"),
            response.headers.get("access-control-allow-credentials"))


@pytest.mark.parametrize(
    ("allowed", "expected"),
    [
        pytest.param([GOOD], {"get-good": (200, GOOD, "true"), "get-evil": (200, None, "true"),
                              "preflight-good": (200, GOOD, "true"), "preflight-evil": (400, None, "true")},
                     id="listed-origin"),  # Starlette always adds allow-credentials; without allow-origin it is moot
        pytest.param(["*"], {"get-good": (200, "*", None), "get-evil": (200, "*", None),
                             "preflight-good": (200, "*", None), "preflight-evil": (200, "*", None)},
                     id="wildcard-without-credentials"),
        pytest.param(["*", GOOD], {"get-good": (200, "*", None), "get-evil": (200, "*", None),
                                   "preflight-good": (200, "*", None), "preflight-evil": (200, "*", None)},
                     id="wildcard-among-others-without-credentials"),
    ],
)
async def test_cors_allows_only_allowed_origins_and_never_credentials_with_a_wildcard(
    allowed: list[str], expected: dict[str, tuple[int, str | None, str | None]], fake_vllm: FakeVLLM,
    live_server: Any, http: httpx.AsyncClient,
) -> None:
    async with live_server(vllm_base_url=fake_vllm.url, allowed_origins=allowed) as server:
        url = f"{server.url}/api/v1/conversations"
        seen = {
            "get-good": cors(await http.get(url, headers={"Origin": GOOD})),
            "get-evil": cors(await http.get(url, headers={"Origin": EVIL})),
            "preflight-good": cors(await http.options(f"{server.url}/api/v1/chat", headers={"Origin": GOOD,
                                                                                           **PREFLIGHT})),
            "preflight-evil": cors(await http.options(f"{server.url}/api/v1/chat", headers={"Origin": EVIL,
                                                                                           **PREFLIGHT})),
        }
    assert seen == expected


async def test_secrets_never_appear_in_logs_errors_health_openapi_or_docs(
    live_server: Any, http: httpx.AsyncClient, service_log: io.StringIO, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    outputs: list[str] = []

    def keep(response: httpx.Response) -> httpx.Response:
        outputs.append(f"{response.headers}\n{response.text}")
        return response

    async with (
        FakeVLLM(api_key=VLLM_KEY) as fake,
        live_server(vllm_base_url=fake.url, vllm_api_key=VLLM_KEY, api_key=API_KEY, log_level="DEBUG",
                    vllm_max_retries=0) as server,
    ):
        api = f"{server.url}/api/v1"
        ok = keep(await http.post(f"{api}/chat", json={"content": "what is 2*3?"}, headers=WITH_KEY))
        keep(await http.post(f"{api}/chat/stream", json={"content": "hi"}, headers=WITH_KEY))
        for path in ("/api/v1/health", "/openapi.json", "/docs", "/redoc", "/api/v1/tools"):
            keep(await http.get(f"{server.url}{path}", headers=WITH_KEY))
        keep(await http.get(f"{api}/conversations", headers={"Authorization": f"Bearer {API_KEY}x"}))
        keep(await http.post(f"{api}/chat", json={"content": ""}, headers=WITH_KEY))
        fake.script(Reply(status=500, error_message="engine died"))
        keep(await http.post(f"{api}/chat", json={"content": "hi"}, headers=WITH_KEY))
        fake.api_key = "rotated-key"
        rejected = keep(await http.post(f"{api}/chat", json={"content": "hi"}, headers=WITH_KEY))
    assert ok.status_code == 200
    assert (rejected.status_code, rejected.json()) == (502, {"detail": "vLLM answered 401: Unauthorized"})
    assert fake.requests[0].headers["authorization"] == f"Bearer {VLLM_KEY}"
    places = {"responses": "\n".join(outputs), "service log": service_log.getvalue(), "other logs": caplog.text}
    assert "vLLM answered 500: engine died" in places["responses"]
    leaks = [(place, secret) for place, text in places.items() for secret in (API_KEY, VLLM_KEY) if secret in text]
    assert leaks == []


class BrokenRegistry(ToolRegistry):
    """Offers the calculator, then fails to run it in a way no tool result covers."""

    async def run(self, name: str, arguments: dict[str, Any], *, timeout_s: float, max_result_chars: int) -> Any:
        raise RuntimeError("disk on fire at /srv/agent/secret/path.py")


async def test_a_tool_that_cannot_be_run_is_a_bare_500_with_its_request_id_and_the_trace_only_in_the_log(
    fake_vllm: FakeVLLM, live_server: Any, http: httpx.AsyncClient, service_log: io.StringIO
) -> None:
    registry = BrokenRegistry()
    registry.register(calculator)
    fake_vllm.script(tool_call_text("calculator", {"expression": "1+1"}), tool_call_text("calculator", {}))
    async with live_server(vllm_base_url=fake_vllm.url) as server:
        server.app.state.agent.registry = registry
        rest = await http.post(f"{server.url}/api/v1/chat", json={"content": "go"}, headers={"X-Request-ID": "r-1"})
        events = await stream_chat(http, server.url, {"content": "go"})
        listing = (await http.get(f"{server.url}/api/v1/conversations")).json()
    detail = "the tool 'calculator' could not be run; the service log has the details"
    assert (rest.status_code, rest.json(), rest.headers["x-request-id"]) == (500, {"detail": detail}, "r-1")
    assert events == [("tool_call", events[0][1]), ("error", {"type": "error", "status": 500, "detail": detail})]
    assert listing["conversations"] == []
    errors = [entry for entry in log_entries(service_log) if entry["level"] == "ERROR"]
    assert [(entry["request_id"] == "r-1", entry["message"]) for entry in errors] == [
        (True, "tool 'calculator' failed inside the service"), (False, "tool 'calculator' failed inside the service")]
    assert all("RuntimeError: disk on fire at /srv/agent/secret/path.py" in entry["error"] for entry in errors)


async def test_an_internal_error_outside_a_turn_is_a_bare_500_with_its_request_id(
    fake_vllm: FakeVLLM, live_server: Any, http: httpx.AsyncClient, service_log: io.StringIO,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def broken_list(*args: Any) -> None:
        raise RuntimeError("could not open /var/lib/agent/conversations.db")

    async with live_server(vllm_base_url=fake_vllm.url) as server:
        monkeypatch.setattr(server.app.state.agent.store, "list_conversations", broken_list)
        response = await http.get(f"{server.url}/api/v1/conversations", headers={"X-Request-ID": "r-2"})
        health = await http.get(f"{server.url}/api/v1/health")
    assert (response.status_code, response.json(), response.headers["x-request-id"]) == (
        500, {"detail": "internal error"}, "r-2")
    assert health.status_code == 200
    lines = [(entry["request_id"], entry["level"], entry["message"]) for entry in log_entries(service_log)
             if entry["request_id"] == "r-2"]
    assert [line[:2] for line in lines] == [("r-2", "ERROR"), ("r-2", "INFO")]
    assert lines[1][2].startswith("GET /api/v1/conversations 500 ")


PROMPT = "my private question about my neighbour"
ECHOING_MESSAGE = repr([{
    "type": "value_error", "loc": ("body",), "msg": "Value error, When using `tool_choice`, `tools` must be set.",
    "input": {"messages": [{"role": "system", "content": "You are a helpful assistant."},
                           {"role": "user", "content": PROMPT}]},
}])
CUT_MESSAGE = "[{'type': 'value_error', 'loc': ('body',), 'msg': 'Value error, When using `tool_choice`, `tools` " \
              "must be set.' …"


@pytest.mark.parametrize("stream", [False, True], ids=["rest", "stream"])
async def test_a_vllm_error_that_echoes_the_request_is_passed_on_without_the_prompt(
    stream: bool, fake_vllm: FakeVLLM, live_server: Any, http: httpx.AsyncClient, service_log: io.StringIO
) -> None:
    if stream:
        fake_vllm.script(Reply(text="Some words.", fault="stream_error", error_message=ECHOING_MESSAGE))
    else:
        fake_vllm.script(Reply(status=400, error_message=ECHOING_MESSAGE))
    async with live_server(vllm_base_url=fake_vllm.url) as server:
        if stream:
            detail = (await stream_chat(http, server.url, {"content": PROMPT}))[-1][1]["detail"]
        else:
            response = await http.post(f"{server.url}/api/v1/chat", json={"content": PROMPT})
            assert response.status_code == 502
            detail = response.json()["detail"]
    prefix = "vLLM reported an error: " if stream else "vLLM answered 400: "
    assert detail == prefix + CUT_MESSAGE
    assert PROMPT not in service_log.getvalue()


async def test_a_long_vllm_error_is_cut_to_500_characters(fake_vllm: FakeVLLM, live_server: Any,
                                                         http: httpx.AsyncClient) -> None:
    fake_vllm.script(Reply(status=500, error_message="x" * 5000))
    async with live_server(vllm_base_url=fake_vllm.url, vllm_max_retries=0) as server:
        response = await http.post(f"{server.url}/api/v1/chat", json={"content": "hi"})
    assert (response.status_code, response.json()) == (502, {"detail": "vLLM answered 500: " + "x" * 500})


REQUESTS = [  # method, path, request arguments, status
    pytest.param("GET", "/api/v1/health", {}, 200, id="health"),
    pytest.param("POST", "/api/v1/chat", {"json": {"content": "hi"}}, 200, id="chat"),
    pytest.param("POST", "/api/v1/chat/stream", {"json": {"content": "hi"}}, 200, id="stream"),
    pytest.param("POST", "/api/v1/chat", {"json": {"content": ""}}, 422, id="invalid"),
    pytest.param("POST", "/api/v1/chat", {"json": {"content": "x" * 200_000}}, 413, id="body-over-the-byte-cap"),
    pytest.param("GET", "/api/v1/conversations/nope", {}, 404, id="unknown-conversation"),
    pytest.param("GET", "/api/v1/nothing-here", {}, 404, id="unknown-route"),
    pytest.param("GET", "/openapi.json", {}, 200, id="openapi"),
    pytest.param("GET", "/docs", {}, 200, id="docs"),
    pytest.param("GET", "/", {}, 307, id="root-redirect"),
]


@pytest.mark.parametrize(("method", "path", "request_args", "status"), REQUESTS)
async def test_every_response_carries_the_request_id_and_so_does_its_access_log_line(
    method: str, path: str, request_args: dict[str, Any], status: int, fake_vllm: FakeVLLM, live_server: Any,
    http: httpx.AsyncClient, service_log: io.StringIO,
) -> None:
    async with live_server(vllm_base_url=fake_vllm.url, max_content_chars=10_000) as server:
        response = await http.request(method, f"{server.url}{path}", headers={"X-Request-ID": "req-42.a_b"},
                                      follow_redirects=False, **request_args)
    assert (response.status_code, response.headers["x-request-id"]) == (status, "req-42.a_b")
    lines = [entry["message"] for entry in log_entries(service_log) if entry["request_id"] == "req-42.a_b"]
    assert lines[-1].startswith(f"{method} {path} {status} ")


@pytest.mark.parametrize("given", [None, "has spaces", "x" * 65, "semi;colon"], ids=["none", "spaces", "too-long",
                                                                                   "semicolon"])
async def test_a_missing_or_unusable_request_id_is_replaced_by_a_fresh_one(
    given: str | None, fake_vllm: FakeVLLM, live_server: Any, http: httpx.AsyncClient
) -> None:
    headers = {} if given is None else {"X-Request-ID": given}
    async with live_server(vllm_base_url=fake_vllm.url) as server:
        ids = [(await http.get(f"{server.url}/api/v1/health", headers=headers)).headers["x-request-id"]
               for _ in range(2)]
    assert all(FRESH_ID.match(request_id) for request_id in ids) and ids[0] != ids[1]


async def test_the_log_lines_of_a_failing_turn_carry_its_request_id(
    fake_vllm: FakeVLLM, live_server: Any, http: httpx.AsyncClient, service_log: io.StringIO
) -> None:
    fake_vllm.script(Reply(status=500, error_message="boom"), Reply(status=500, error_message="boom"))
    async with live_server(vllm_base_url=fake_vllm.url, vllm_max_retries=1) as server:
        response = await http.post(f"{server.url}/api/v1/chat/stream", json={"content": "hi"},
                                   headers={"X-Request-ID": "turn-7"})
    assert response.text.startswith("event: run\n") and "event: error\n" in response.text
    lines = [(entry["level"], entry["message"]) for entry in log_entries(service_log)
             if entry["request_id"] == "turn-7"]
    assert lines[:2] == [("INFO", "vLLM call failed (attempt 1), retrying"),
                         ("INFO", "turn failed: 502 vLLM answered 500: boom")]
    assert lines[2][1].startswith("POST /api/v1/chat/stream 200 ")
    assert len(lines) == 3

"""vLLM agent service: REST, SSE and a Gradio page over one tool-using agent.

  1. Settings     Settings: env vars and .env, validated at startup
  2. Errors       AgentError tree; each class carries its HTTP status
  3. Schemas      request/response bodies and stream events
  4. vLLM client  VLLMClient: chat completions (plain and streamed); transport errors translated here
  5. Parsing      pure functions: Qwen/Hermes text and tool-call arguments -> calls; streaming text filter
  6. Memory       ConversationStore: SQLAlchemy Core on SQLite or PostgreSQL, one transaction a turn, leases;
                  SQLiteWriter: SQLite's writes on one thread of their own
  7. Agent        Agent.run_turn(): the loop, an async generator of events; context-window fitting
  8. App          create_app(), lifespan, auth, request ids, error handlers, /api/v1 routes and SSE framing
"""

import asyncio
import base64
import gc
import hmac
import json
import logging
import queue
import re
import secrets
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from types import TracebackType
from typing import Annotated, Any, Literal, TypeVar

import httpx
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi import Path as FastAPIPath
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, RedirectResponse, StreamingResponse
from fastapi.security import HTTPBearer
from fastapi.sse import KEEPALIVE_COMMENT, EventSourceResponse, format_sse_event
from httpx_aiohttp import AiohttpTransport
from pydantic import BaseModel, ConfigDict, Field, SecretStr, TypeAdapter, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import (
    JSON,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    and_,
    bindparam,
    delete,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy import event as sqlalchemy_event
from sqlalchemy.engine import URL, Connection, Dialect, Engine, create_engine, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tools import REGISTRY, ToolRegistry, ToolResult
from ui import mount_ui

logger = logging.getLogger("agent_app")
T = TypeVar("T")

# --- 1. Settings ---

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful assistant. Today's date is {date}. Use the tools when they help to answer "
    "the user's question, and answer concisely."
)
DEFAULT_DATABASE_URL = f"sqlite+aiosqlite:///{Path(__file__).resolve().parent / 'conversations.db'}"
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "repetition_penalty", "max_tokens", "seed")


class Settings(BaseSettings):
    """Every knob the service has; `agent_max_steps` is read from AGENT_MAX_STEPS, and so on."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    vllm_base_url: str = "http://localhost:8000"
    vllm_model: str = "Qwen/Qwen2.5-7B-Instruct"
    vllm_api_key: SecretStr | None = None
    vllm_connect_timeout_s: float = Field(default=5.0, gt=0)
    vllm_timeout_s: float = Field(default=120.0, gt=0)
    vllm_max_retries: int = Field(default=2, ge=0, le=10)
    vllm_retry_backoff_s: float = Field(default=0.5, ge=0, le=30)
    vllm_max_concurrency: int = Field(default=256, ge=1, le=10_000)
    vllm_queue_timeout_s: float = Field(default=10.0, ge=0)
    tool_call_format: Literal["auto", "native", "hermes"] = "auto"
    agent_max_steps: int = Field(default=8, ge=1, le=50)
    turn_timeout_s: float = Field(default=300.0, gt=0)
    tool_timeout_s: float = Field(default=30.0, gt=0)
    tool_result_max_chars: int = Field(default=16_000, ge=100)
    max_content_chars: int = Field(default=32_000, ge=1, le=1_000_000)
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    database_url: str = DEFAULT_DATABASE_URL
    max_model_len: int | None = Field(default=None, ge=256)
    context_reserve_tokens: int = Field(default=1024, ge=16)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1)
    repetition_penalty: float | None = Field(default=None, gt=0)
    max_tokens: int | None = Field(default=None, ge=1)
    seed: int | None = None
    allowed_origins: list[str] = ["http://localhost:5173"]
    api_key: SecretStr | None = None
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("vllm_base_url")
    @classmethod
    def _normalise_base_url(cls, value: str) -> str:
        """Accept `http://host:8000`, `.../` and `.../v1`: the client appends `/v1/...` itself."""
        url = value.strip().rstrip("/")
        url = url.removesuffix("/v1").rstrip("/")
        if not re.match(r"^https?://[^/\s]+", url):
            raise ValueError(f"must be an http(s) URL such as http://localhost:8000, got {value!r}")
        return url

    @field_validator("database_url")
    @classmethod
    def _async_driver(cls, value: str) -> str:
        """Only async drivers work here; say which URL forms are meant. A database in memory would lose
        every conversation on restart (and SQLite's writer thread would open a second, empty one)."""
        if not value.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")):
            raise ValueError("must start with sqlite+aiosqlite:// or postgresql+asyncpg://")
        if value.startswith("sqlite") and make_url(value).database in (None, "", ":memory:"):
            raise ValueError("must name a database file (sqlite+aiosqlite:///path/to/conversations.db), "
                             "not an in-memory database")
        return value

    def sampling(self) -> dict[str, Any]:
        """Sampling parameters that were set; unset ones are left to vLLM's generation config."""
        return {name: getattr(self, name) for name in SAMPLING_FIELDS if getattr(self, name) is not None}


class SettingsError(Exception):
    """A setting has a bad value; the message names the environment variable."""


def load_settings() -> Settings:
    """Read the settings, turning pydantic's report into one line per bad variable."""
    try:
        return Settings()
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']).upper()}: {error['msg']}" for error in exc.errors()
        )
        raise SettingsError(f"invalid settings: {problems}") from None


# --- 2. Errors ---


class AgentError(Exception):
    """Base for every failure a request can end with; `status_code` is the HTTP answer."""

    status_code = 500
    headers: dict[str, str] | None = None


class LLMError(AgentError):
    """vLLM was unreachable, answered with an error, or sent a reply we cannot read."""

    status_code = 502


class LLMTimeout(LLMError):
    """vLLM did not answer within the configured time."""

    status_code = 504


class ContextTooLong(LLMError):
    """vLLM refused the request because the prompt does not fit the model's context window."""

    status_code = 413


class AutoToolChoiceUnsupported(LLMError):
    """vLLM was started without `--enable-auto-tool-choice`, so it rejects a request with `tools`."""


class VLLMBusy(AgentError):
    """Every slot toward vLLM stayed taken for VLLM_QUEUE_TIMEOUT_S; the client should retry later."""

    status_code = 503

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.headers = {"Retry-After": str(retry_after_s)}


class Unauthorized(AgentError):
    """API_KEY is set and the request did not carry it."""

    status_code = 401
    headers = {"WWW-Authenticate": "Bearer"}  # noqa: RUF012 - constant header of every 401


class ToolExecutionError(AgentError):
    """A tool failed in a way that cannot be handed back to the model."""

    status_code = 500


class TurnTimeout(LLMTimeout):
    """A whole turn took longer than TURN_TIMEOUT_S."""


class ConversationNotFound(AgentError):
    """The conversation id is unknown (or was deleted)."""

    status_code = 404


class ConversationBusy(AgentError):
    """Another turn of the same conversation is still running."""

    status_code = 409


class InvalidCursor(AgentError):
    """A pagination cursor that this service did not hand out."""

    status_code = 422


class ContentTooLarge(AgentError):
    """The user message is longer than MAX_CONTENT_CHARS."""

    status_code = 413


# --- 3. Schemas ---

CONVERSATION_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
StopReason = Literal["completed", "max_steps", "loop_detected"]


class ChatRequest(BaseModel):
    """One user message; without `conversation_id` a new conversation starts."""

    model_config = ConfigDict(extra="forbid")

    content: str = Field(min_length=1, max_length=1_000_000, description="The user's message.")
    conversation_id: str | None = Field(
        default=None,
        pattern=CONVERSATION_ID_PATTERN,
        description="Id returned by an earlier turn; null starts a new conversation.",
    )

    @field_validator("content")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty or only whitespace")
        return value

    @field_validator("content")
    @classmethod
    def _no_nul(cls, value: str) -> str:
        """PostgreSQL text cannot hold NUL: refuse it here rather than fail the turn when it is stored."""
        if "\x00" in value:
            raise ValueError("must not contain NUL characters (\\u0000)")
        return value


class ToolCallRecord(BaseModel):
    """A tool call the model made in this turn, with what the tool returned."""

    id: str
    name: str
    arguments: dict[str, Any]
    result: str | None = None
    error: str | None = None


class Usage(BaseModel):
    """Token counts summed over every vLLM call of a turn."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class ChatResponse(BaseModel):
    """The outcome of one turn."""

    conversation_id: str
    content: str
    tool_calls: list[ToolCallRecord] | None = None
    usage: Usage | None = None
    stop_reason: StopReason = "completed"


class TokenEvent(BaseModel):
    """A piece of the visible answer; the pieces concatenate to the final `content`."""

    type: Literal["token"] = "token"
    content: str


class ToolCallEvent(BaseModel):
    """The model asked for a tool; the result follows as a `tool_result` event with the same id."""

    type: Literal["tool_call"] = "tool_call"
    id: str
    name: str
    arguments: dict[str, Any]


class ToolResultEvent(BaseModel):
    """What a tool returned (or why it failed)."""

    type: Literal["tool_result"] = "tool_result"
    id: str
    name: str
    result: str | None
    error: str | None
    duration_s: float


class DoneEvent(ChatResponse):
    """The turn finished and was stored; the same object `/chat` returns."""

    type: Literal["done"] = "done"


class ErrorEvent(BaseModel):
    """The turn failed after the stream had started; nothing of it was stored."""

    type: Literal["error"] = "error"
    status: int
    detail: str


StreamEvent = TokenEvent | ToolCallEvent | ToolResultEvent | DoneEvent | ErrorEvent


class ConversationSummary(BaseModel):
    """A stored conversation; times are Unix seconds."""

    id: str
    title: str
    created_at: float
    updated_at: float
    message_count: int


class StoredMessage(BaseModel):
    """One stored message, in vLLM's message shape plus its position, usage and time."""

    position: int
    role: Literal["user", "assistant", "tool"]
    content: str | None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    usage: dict[str, int] | None = None
    created_at: float


class ConversationDetail(ConversationSummary):
    """A conversation with its messages in order."""

    messages: list[StoredMessage]


class ConversationPage(BaseModel):
    """One page of conversations, newest first; pass `next_cursor` back as `cursor` for the next."""

    conversations: list[ConversationSummary]
    next_cursor: str | None


class ErrorBody(BaseModel):
    """Every error response."""

    detail: str


class ToolInfo(BaseModel):
    """A tool the agent can call."""

    name: str
    description: str
    parameters: dict[str, Any]


class VLLMStatus(BaseModel):
    """What the service knows about its vLLM server."""

    url: str
    reachable: bool
    model: str
    tool_call_format: Literal["native", "hermes"]


class Health(BaseModel):
    """Liveness of the service and reachability of vLLM."""

    status: Literal["ok", "degraded"]
    vllm: VLLMStatus


# --- 4. vLLM client ---

CONTEXT_LENGTH_MESSAGE = re.compile(r"maximum context length|max_model_len", re.IGNORECASE)
DEFAULT_MAX_MODEL_LEN = 32_768
MAX_MODEL_LEN_RETRY_S = 60.0  # after a failed GET /v1/models; not once per LLM call
STREAM_CUT = "vLLM's stream ended before [DONE]"
AUTO_TOOL_CHOICE_MESSAGE = re.compile(r"auto\W+tool choice requires --enable-auto-tool-choice")
REQUEST_ECHO = re.compile(r"""['"]input['"]\s*:""")  # where vLLM's validation errors start repeating the body
JSON_ENCODER = json.JSONEncoder(ensure_ascii=False)  # json.dumps with options builds an encoder per call


class EncodedJson(str):
    """A value's JSON text, encoded once: request bodies take it as it is (the tool list, on every call)."""


def encode_body(payload: dict[str, Any]) -> bytes:
    """The request body as JSON, EncodedJson values included as they are."""
    fields = []
    for key, value in payload.items():
        text = value if isinstance(value, EncodedJson) else JSON_ENCODER.encode(value)
        fields.append(f"{JSON_ENCODER.encode(key)}:{text}")
    return f"{{{','.join(fields)}}}".encode()


async def read_body(response: httpx.Response) -> bytes:
    """The whole body, straight off the transport's stream.

    Response.aread() would add a decoder and a chunker per call, for nothing: requests ask vLLM for no
    content encoding.
    """
    return b"".join([chunk async for chunk in response.stream])


@dataclass(frozen=True, slots=True)
class WireToolCall:
    """A tool call as vLLM sent it; `arguments` is the raw JSON text."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class Completion:
    """One chat completion: text before any tool call, the calls, and the token counts."""

    content: str
    tool_calls: list[WireToolCall]
    finish_reason: str | None
    usage: tuple[int, int, int] | None


def loads_json(text: str | bytes) -> Any:
    """json.loads whose only failure is ValueError: JSON nested too deep for Python's parser is invalid too."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def upstream_error_message(body: bytes) -> str:
    """vLLM's error text from either body shape, the 401 string form, or a bare body, at most 500 characters.

    vLLM's validation errors repeat the request body, prompt included: the text is cut where that starts.
    """
    text = body.decode("utf-8", errors="replace").strip()
    try:
        payload = loads_json(text)
    except ValueError:
        payload = None
    message = text
    if isinstance(payload, dict):
        error = payload.get("error")
        if isinstance(error, dict):
            message = str(error.get("message") or error)
        else:
            message = str(error or payload.get("message") or payload.get("detail") or text)
    if echo := REQUEST_ECHO.search(message):
        message = message[: echo.start()].rstrip(" ,") + " …"
    return message[:500] or "empty response body"


def read_usage(payload: Any) -> tuple[int, int, int] | None:
    """Token counts from a `usage` object, or None when vLLM sent none."""
    if not isinstance(payload, dict):
        return None
    prompt, completion = int(payload.get("prompt_tokens") or 0), int(payload.get("completion_tokens") or 0)
    return prompt, completion, int(payload.get("total_tokens") or prompt + completion)


def read_completion(body: bytes) -> Completion:
    """Turn a non-streaming response body into a Completion, whatever extra keys the version adds."""
    try:
        payload = loads_json(body)
        choice = payload["choices"][0]
        message = choice["message"]
        calls = [
            WireToolCall(
                call.get("id") or new_call_id(),
                call["function"]["name"],
                call["function"].get("arguments") or "",
            )
            for call in message.get("tool_calls") or []
        ]
        return Completion(message.get("content") or "", calls, choice.get("finish_reason"),
                          read_usage(payload.get("usage")))
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise LLMError("vLLM sent a reply that is not a chat completion") from exc


class StreamAssembler:
    """Rebuilds a Completion from streamed chunks: calls by index (never by id), content before calls."""

    def __init__(self) -> None:
        self.content: list[str] = []
        self.calls: dict[int, list[Any]] = {}
        self.finish_reason: str | None = None
        self.usage: tuple[int, int, int] | None = None
        self.done = False

    def feed(self, data: str) -> str:
        """Take one `data:` payload; return the new visible-candidate text (before any tool call)."""
        if data == "[DONE]":
            self.done = True
            return ""
        try:
            chunk = loads_json(data)
        except ValueError as exc:
            raise LLMError("vLLM sent an unreadable stream chunk") from exc
        if not isinstance(chunk, dict):
            raise LLMError("vLLM sent an unreadable stream chunk")
        if "error" in chunk:
            raise LLMError(f"vLLM reported an error: {upstream_error_message(data.encode())}")
        if chunk.get("usage"):
            self.usage = read_usage(chunk["usage"])
        text = ""
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0) == 0:
                text += self._feed_choice(choice)
        return text

    def _feed_choice(self, choice: dict[str, Any]) -> str:
        delta = choice.get("delta") or {}
        for call in delta.get("tool_calls") or ():
            slot = self.calls.setdefault(call.get("index", 0), [None, "", []])
            function = call.get("function") or {}
            slot[0] = call.get("id") or slot[0]
            slot[1] = function.get("name") or slot[1]
            if function.get("arguments"):
                slot[2].append(function["arguments"])
        if choice.get("finish_reason"):
            self.finish_reason = choice["finish_reason"]
        content = delta.get("content")
        if not content or self.calls:
            return ""
        self.content.append(content)
        return content

    def completion(self) -> Completion:
        calls = [
            WireToolCall(call_id or new_call_id(), name, "".join(arguments))
            for _, (call_id, name, arguments) in sorted(self.calls.items())
        ]
        return Completion("".join(self.content), calls, self.finish_reason, self.usage)


class TransportErrors:
    """`with` it: httpx's exceptions stop here, and what reaches the agent is an LLMError.

    One instance per client, entered several times a call: a @contextmanager would build a generator
    every time.
    """

    def __init__(self, url: str) -> None:
        self.url = url

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
            raise LLMError(f"vLLM is not reachable at {self.url}: {exc}") from exc
        if isinstance(exc, httpx.TimeoutException):
            raise LLMTimeout(f"vLLM at {self.url} did not answer in time") from exc
        if isinstance(exc, httpx.TransportError):
            raise LLMError(f"the connection to vLLM at {self.url} failed: {exc}") from exc


class ConcurrencySlots:
    """`async with` it: one of VLLM_MAX_CONCURRENCY slots, waited for at most VLLM_QUEUE_TIMEOUT_S.

    A class rather than an @asynccontextmanager: entered once per vLLM call, it builds nothing per use.
    """

    def __init__(self, slots: int, queue_timeout_s: float) -> None:
        self._slots = asyncio.Semaphore(slots)
        self._queue_timeout_s = queue_timeout_s

    async def __aenter__(self) -> None:
        try:
            if self._slots.locked():  # only a wait needs the timer; a free slot is taken without one
                async with asyncio.timeout(self._queue_timeout_s):
                    await self._slots.acquire()
            else:
                await self._slots.acquire()
        except TimeoutError:
            raise VLLMBusy("the service is at its limit of concurrent vLLM requests; retry shortly",
                           retry_after_s=max(1, round(self._queue_timeout_s))) from None

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        traceback: TracebackType | None) -> None:
        self._slots.release()


def error_for_status(status: int, body: bytes) -> LLMError:
    """Map a non-200 vLLM answer to the error type the agent acts on."""
    message = upstream_error_message(body)
    if status == 400 and CONTEXT_LENGTH_MESSAGE.search(message):
        return ContextTooLong(f"the conversation is too long for the model: {message}")
    if status == 400 and AUTO_TOOL_CHOICE_MESSAGE.search(message):
        return AutoToolChoiceUnsupported(message)
    return LLMError(f"vLLM answered {status}: {message}")


def vllm_timeout(settings: Settings) -> httpx.Timeout:
    """One definition for the shared client and for the chat requests sent straight to its transport."""
    return httpx.Timeout(settings.vllm_timeout_s, connect=settings.vllm_connect_timeout_s)


class VLLMClient:
    """Talks to vLLM's OpenAI-compatible API over the process's shared httpx client and its transport.

    Chat completions, the hot path, go straight to the client's transport as httpx Requests: vLLM uses
    none of the client's cookie, auth, redirect and hook layers, and they cost a third of each call.
    Their Requests come with every header set here (Host and Content-Length too) and the body as a stream,
    which spares httpx's header preparation, about half the cost of building one.
    """

    def __init__(self, http: httpx.AsyncClient, transport: httpx.AsyncBaseTransport, settings: Settings) -> None:
        self._http = http
        self._transport = transport
        self._timeout = {"timeout": vllm_timeout(settings).as_dict()}
        self.base_url = settings.vllm_base_url
        self.model = settings.vllm_model
        self._chat_url = httpx.URL(f"{settings.vllm_base_url}/v1/chat/completions")  # parsed once, not per call
        self._headers = {"content-type": "application/json"}
        if settings.vllm_api_key is not None:
            self._headers["authorization"] = f"Bearer {settings.vllm_api_key.get_secret_value()}"
        self._chat_headers = [(b"host", self._chat_url.netloc), (b"accept-encoding", b"identity"),
                              *((name.encode(), value.encode()) for name, value in self._headers.items())]
        self._max_model_len: int | None = None
        self._max_model_len_asked_at: float | None = None
        self._slot = ConcurrencySlots(settings.vllm_max_concurrency, settings.vllm_queue_timeout_s)
        self._transport_errors = TransportErrors(settings.vllm_base_url)
        self._retries = settings.vllm_max_retries
        self._backoff_s = settings.vllm_retry_backoff_s

    async def complete(self, payload: dict[str, Any]) -> Completion:
        """One non-streaming chat completion."""
        async with self._slot:
            response = await self._post(encode_body({**payload, "model": self.model}))
            try:
                with self._transport_errors:
                    body = await read_body(response)
            finally:
                await response.aclose()
        return read_completion(body)

    async def stream(self, payload: dict[str, Any]) -> AsyncIterator[str | Completion]:
        """Stream a chat completion: text pieces as they arrive, then the assembled Completion."""
        request = {**payload, "model": self.model, "stream": True, "stream_options": {"include_usage": True}}
        assembler = StreamAssembler()
        async with self._slot:
            response = await self._post(encode_body(request))
            try:
                pending = b""
                async for chunk in response.stream:
                    *lines, pending = (pending + chunk).split(b"\n")
                    # One piece per network read, not per event: under load a read holds many tokens.
                    text = "".join(assembler.feed(line[5:].strip().decode()) for line in lines
                                   if line.startswith(b"data:") and not assembler.done)
                    if text:
                        yield text
                    if assembler.done:
                        break
            except httpx.TimeoutException as exc:
                raise LLMTimeout(f"vLLM at {self.base_url} stopped sending in the middle of a reply") from exc
            except httpx.TransportError as exc:
                raise LLMError(STREAM_CUT) from exc
            finally:
                await response.aclose()
        if not assembler.done:
            raise LLMError(STREAM_CUT)
        yield assembler.completion()

    async def max_model_len(self) -> int:
        """The model's context window from GET /v1/models, asked once; 32768 while vLLM can't say.

        A failed answer is asked again at most once a minute, not on every call.
        """
        now = time.monotonic()
        asked_at = self._max_model_len_asked_at
        if self._max_model_len is None and (asked_at is None or now - asked_at >= MAX_MODEL_LEN_RETRY_S):
            self._max_model_len_asked_at = now
            try:
                response = await self._http.get(f"{self.base_url}/v1/models", headers=self._headers, timeout=5.0)
                cards = response.json()["data"] if response.status_code == 200 else []
                lengths = [card.get("max_model_len") for card in cards if card.get("id") == self.model]
                self._max_model_len = int(lengths[0]) if lengths and lengths[0] else None
            except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError):
                logger.info("could not read max_model_len from vLLM's /v1/models")
        return self._max_model_len or DEFAULT_MAX_MODEL_LEN

    async def count_tokens(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> int | None:
        """Exact prompt size from vLLM's POST /tokenize (chat template applied), or None if unavailable."""
        body: dict[str, Any] = {"model": self.model, "messages": messages, "add_generation_prompt": True}
        if tools:
            body["tools"] = tools
        try:
            response = await self._http.post(f"{self.base_url}/tokenize", json=body, headers=self._headers)
            return int(response.json()["count"]) if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return None

    async def is_reachable(self) -> bool:
        """True when vLLM's /health answers 200 within a second."""
        try:
            response = await self._http.get(f"{self.base_url}/health", timeout=1.0)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def _post(self, content: bytes) -> httpx.Response:
        """POST a chat completion, retrying connection errors and 5xx; the 200 response, for the caller to close."""
        attempt = 0
        while True:
            last = attempt == self._retries
            try:
                response = await self._send(content)
            except LLMTimeout:
                raise
            except LLMError:
                if last:
                    raise
            else:
                if response.status_code == 200:
                    return response
                try:
                    with self._transport_errors:
                        body = await read_body(response)
                finally:
                    await response.aclose()
                if last or response.status_code < 500:
                    raise error_for_status(response.status_code, body)
            logger.info("vLLM call failed (attempt %d), retrying", attempt + 1)
            await asyncio.sleep(self._backoff_s * 2**attempt)
            attempt += 1

    async def _send(self, content: bytes) -> httpx.Response:
        headers = [*self._chat_headers, (b"content-length", str(len(content)).encode())]
        request = httpx.Request("POST", self._chat_url, headers=headers, stream=httpx.ByteStream(content),
                                extensions=self._timeout)
        request.read()  # a stream Request is unread until then; transports and mocks read .content
        with self._transport_errors:
            return await self._transport.handle_async_request(request)


def new_call_id() -> str:
    """A tool-call id in vLLM's style, for calls that arrived without one."""
    return f"chatcmpl-tool-{secrets.token_hex(16)}"


# --- 5. Parsing ---

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.DOTALL)
TOOL_NAME_IN_TEXT = re.compile(r'"name"\s*:\s*"([^"\\]{1,100})"')
MAX_ARGUMENTS_DEPTH = 64  # deeper arguments could not even be echoed back in an event (pydantic stops near 250)
HERMES_TOOLS_HEADER = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
HERMES_TOOLS_FOOTER = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": '
    "<args-json-object>}\n</tool_call>"
)


@dataclass(frozen=True, slots=True)
class ParsedCall:
    """A tool call read from text; `error` says why it could not be read (the model is told)."""

    name: str
    arguments: dict[str, Any]
    error: str | None = None


@dataclass(frozen=True, slots=True)
class ParsedReply:
    """Model text split into what the user sees and the tool calls it holds."""

    content: str
    calls: tuple[ParsedCall, ...] = ()


def close_json(text: str) -> str:
    """Append the closers a truncated JSON text is missing (vLLM streams sometimes drop a `}`)."""
    stack: list[str] = []
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "{[":
            stack.append("}" if char == "{" else "]")
        elif char in "}]" and stack and stack[-1] == char:
            stack.pop()
    return text + ('"' if in_string else "") + "".join(reversed(stack))


def loads_lenient(text: str) -> Any:
    """json.loads, and when that fails, once more with missing closers appended."""
    try:
        return loads_json(text)
    except ValueError as exc:
        repaired = close_json(text)
        if repaired == text:
            raise
        try:
            return loads_json(repaired)
        except ValueError:
            raise exc from None


def nesting_depth(value: Any) -> int:
    """How many levels of objects and lists a JSON value has (a scalar has 0), counted without recursion."""
    depth, level = 0, [value]
    while containers := [item for item in level if isinstance(item, dict | list)]:
        depth += 1
        level = [child for item in containers for child in (item.values() if isinstance(item, dict) else item)]
    return depth


def decode_arguments(raw: Any) -> dict[str, Any]:
    """Tool arguments as a dict: empty means {}, a JSON string holding JSON is unwrapped."""
    if raw is None:
        return {}
    if isinstance(raw, str):
        if not raw.strip():
            return {}
        raw = loads_lenient(raw.strip())
        if isinstance(raw, str):
            raw = loads_lenient(raw) if raw.strip() else {}
    if not isinstance(raw, dict):
        raise ValueError(f"arguments must be a JSON object, not {type(raw).__name__}")
    if nesting_depth(raw) > MAX_ARGUMENTS_DEPTH:
        raise ValueError(f"arguments nest more than {MAX_ARGUMENTS_DEPTH} levels deep")
    return raw


def parse_call_block(body: str) -> list[ParsedCall]:
    """Read the JSON object(s) inside one <tool_call> block; unreadable text becomes an error call."""
    decoder = json.JSONDecoder()
    text, calls = body.strip(), []
    while text:
        try:
            payload, end = decoder.raw_decode(text)
        except (ValueError, RecursionError):
            payload, end = None, len(text)
            try:
                payload = loads_lenient(text)
            except ValueError as exc:
                guess = TOOL_NAME_IN_TEXT.search(text)
                calls.append(ParsedCall(guess.group(1) if guess else "", {},
                                        f"the tool call is not valid JSON ({exc}); send it again"))
                break
        calls.append(read_call_object(payload))
        text = text[end:].strip()
    return calls


def read_call_object(payload: Any) -> ParsedCall:
    """One `{"name": ..., "arguments": ...}` object (Qwen sometimes writes "parameters")."""
    if not isinstance(payload, dict) or not isinstance(payload.get("name"), str):
        return ParsedCall("", {}, 'a tool call must be a JSON object with a "name" string')
    raw = payload["arguments"] if "arguments" in payload else payload.get("parameters")
    try:
        return ParsedCall(payload["name"], decode_arguments(raw))
    except ValueError as exc:
        return ParsedCall(payload["name"], {}, f"the arguments are not a valid JSON object ({exc})")


def parse_hermes_reply(text: str) -> ParsedReply:
    """Split Qwen/Hermes output into the text before the first <tool_call> and the calls."""
    start = text.find(TOOL_CALL_OPEN)
    if start < 0:
        return ParsedReply(text)
    calls = [call for body in TOOL_CALL_BLOCK.findall(text, start) for call in parse_call_block(body)]
    return ParsedReply(text[:start], tuple(calls))


def render_hermes_tools(system_prompt: str, tools: list[dict[str, Any]]) -> str:
    """The system prompt with the tool list, exactly as Qwen2.5's chat template renders `tools`."""
    listing = "".join("\n" + json.dumps(tool, ensure_ascii=False) for tool in tools)
    return system_prompt + HERMES_TOOLS_HEADER + listing + HERMES_TOOLS_FOOTER


class VisibleTextFilter:
    """Passes streamed text on, holding back anything that may start <tool_call> markup."""

    def __init__(self) -> None:
        self._pending = ""
        self._closed = False

    def feed(self, delta: str) -> str:
        if self._closed:
            return ""
        text = self._pending + delta
        tag = text.find(TOOL_CALL_OPEN)
        if tag >= 0:
            self._closed, self._pending = True, ""
            return text[:tag]
        lt = text.rfind("<", max(0, len(text) - len(TOOL_CALL_OPEN)))
        if lt >= 0 and TOOL_CALL_OPEN.startswith(text[lt:]):
            self._pending = text[lt:]
            return text[:lt]
        self._pending = ""
        return text

    def flush(self) -> str:
        """End of the text: a lone held-back `<` was just text; a longer tag prefix is dropped."""
        pending, self._pending = self._pending, ""
        return pending if pending == "<" and not self._closed else ""


# --- 6. Memory ---

METADATA = MetaData()
CONVERSATIONS = Table(
    "conversations",
    METADATA,
    Column("id", String(64), primary_key=True),
    Column("title", String(200), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("message_count", Integer, nullable=False),
    Column("lease_token", String(32)),
    Column("lease_expires_at", Float),
    Index("ix_conversations_recent", "updated_at", "id"),
)
MESSAGES = Table(
    "messages",
    METADATA,
    Column("conversation_id", String(64), ForeignKey("conversations.id", ondelete="CASCADE"), primary_key=True),
    Column("position", Integer, primary_key=True),
    Column("role", String(16), nullable=False),
    Column("content", Text),
    Column("tool_calls", JSON),
    Column("tool_call_id", String(128)),
    Column("usage", JSON),
    Column("created_at", Float, nullable=False),
)
TITLE_CHARS = 80
# One pooled connection per engine (SQLiteWriter's for writes, the async engine's for reads): SQLite has one
# writer at a time, and writes queue in the service instead of in SQLite's busy handler (whose sleeps showed
# up as 100 ms steps and "database is locked"). No pool reset either: every connection is used through
# begin()/connect() blocks that end their own transaction, so the pool's extra ROLLBACK would only cost
# another thread hop per use.
SQLITE_POOL: dict[str, Any] = {"pool_size": 1, "max_overflow": 0, "pool_reset_on_return": None}
# Statements built once, so SQLAlchemy compiles and caches each a single time; values come as parameters.
TAKE_LEASE = (
    update(CONVERSATIONS)
    .where(CONVERSATIONS.c.id == bindparam("b_id"),
           or_(CONVERSATIONS.c.lease_expires_at.is_(None), CONVERSATIONS.c.lease_expires_at < bindparam("b_now")))
    .values(lease_token=bindparam("b_lease"), lease_expires_at=bindparam("b_expires"))
)
OWN_LEASE = and_(CONVERSATIONS.c.id == bindparam("b_id"), CONVERSATIONS.c.lease_token == bindparam("b_lease"))
END_TURN = update(CONVERSATIONS).where(OWN_LEASE).values(
    updated_at=bindparam("b_now"), message_count=bindparam("b_count"), lease_token=None, lease_expires_at=None)
RELEASE_LEASE = update(CONVERSATIONS).where(OWN_LEASE).values(lease_token=None, lease_expires_at=None)
CONVERSATION_EXISTS = select(CONVERSATIONS.c.id).where(CONVERSATIONS.c.id == bindparam("b_id"))
DELETE_MESSAGES = delete(MESSAGES).where(MESSAGES.c.conversation_id == bindparam("b_id"))
DELETE_CONVERSATION = delete(CONVERSATIONS).where(CONVERSATIONS.c.id == bindparam("b_id"))
LOAD_MESSAGES = select(MESSAGES).where(MESSAGES.c.conversation_id == bindparam("b_id")).order_by(MESSAGES.c.position)
LOAD_WIRE_MESSAGES = (
    select(MESSAGES.c.role, MESSAGES.c.content, MESSAGES.c.tool_calls, MESSAGES.c.tool_call_id)
    .where(MESSAGES.c.conversation_id == bindparam("b_id")).order_by(MESSAGES.c.position)
)


@dataclass
class OpenTurn:
    """A conversation reserved for one turn: its id, its stored messages, and the lease that guards it."""

    conversation_id: str
    history: list[dict[str, Any]]
    lease: str | None
    committed: bool = False
    writing: asyncio.Future[None] | None = None  # the commit, once it is queued

    @property
    def is_new(self) -> bool:
        return self.lease is None

    @property
    def holds_lease(self) -> bool:
        return self.lease is not None and not self.committed


def new_conversation_id() -> str:
    """32 hex digits: the creation time in milliseconds, then 80 random bits (UUIDv7's layout).

    Ids that grow with time are added at the end of the primary-key indexes, so a batch of new
    conversations writes a few index pages instead of one page per conversation and table at random
    places (about 4% of a turn's CPU, bench/README.md). 80 random bits keep them unguessable.
    """
    return f"{time.time_ns() // 1_000_000:012x}{secrets.token_hex(10)}"


def storable_text(text: str | None) -> str | None:
    """PostgreSQL text cannot hold NUL; a model or a tool that emits one gets U+FFFD in its place, not a 500.

    (JSON columns keep it: it is escaped as \\u0000 there.)
    """
    return text.replace("\x00", "\ufffd") if text and "\x00" in text else text


@dataclass(eq=False)  # compared by identity: the writer looks turns up in its lists
class TurnWrite:
    """A finished turn waiting for the store's writer; `done` resolves once it is committed."""

    turn: OpenTurn
    messages: list[dict[str, Any]]
    usages: list[dict[str, int] | None]
    done: asyncio.Future[None]

    def rows(self, now: float) -> list[dict[str, Any]]:
        first = len(self.turn.history)
        return [
            {"conversation_id": self.turn.conversation_id, "position": first + offset, "role": message["role"],
             "content": storable_text(message.get("content")), "tool_calls": message.get("tool_calls"),
             "tool_call_id": storable_text(message.get("tool_call_id")), "usage": usage, "created_at": now}
            for offset, (message, usage) in enumerate(zip(self.messages, self.usages, strict=True))
        ]

    def fail(self, exc: Exception) -> None:
        if not self.done.done():
            self.done.set_exception(exc)


@dataclass(frozen=True)
class CompiledInsert:
    """An INSERT of all a table's columns, compiled once per dialect and run as driver SQL.

    For the two inserts of every stored turn: Core's per-execution work (cache key, parameter processing)
    was about a quarter of the CPU a turn's write cost on SQLite (bench/README.md). The SQL and its column
    order still come from the Table, the row dicts are the ones Core would take, and errors, events and
    the transaction stay SQLAlchemy's. JSON columns are serialized here; None is stored as SQL NULL (Core
    stores JSON null): both read back as None.
    """

    sql: str
    columns: tuple[str, ...]
    json_columns: frozenset[str]

    @classmethod
    def of(cls, table: Table, dialect: Dialect) -> "CompiledInsert":
        compiled = insert(table).compile(dialect=dialect)
        return cls(str(compiled), tuple(compiled.positiontup or ()),
                   frozenset(column.name for column in table.columns if isinstance(column.type, JSON)))

    def run(self, conn: Connection, rows: list[dict[str, Any]]) -> None:
        conn.exec_driver_sql(self.sql, [tuple(self._param(name, row.get(name)) for name in self.columns)
                                        for row in rows])

    def _param(self, column: str, value: Any) -> Any:
        return json.dumps(value) if value is not None and column in self.json_columns else value


@lru_cache(maxsize=8)
def compiled_inserts(dialect: Dialect) -> tuple[CompiledInsert, CompiledInsert]:
    """(conversations, messages) INSERTs for an engine's dialect."""
    return CompiledInsert.of(CONVERSATIONS, dialect), CompiledInsert.of(MESSAGES, dialect)


def write_turns(conn: Connection, writes: list[TurnWrite], now: float) -> list[TurnWrite]:
    """Store finished turns in one transaction; return those not stored because their lease was lost."""
    lost = []
    with conn.begin():
        for write in writes:
            turn = write.turn
            if not turn.is_new:
                ended = conn.execute(END_TURN, {"b_id": turn.conversation_id, "b_lease": turn.lease, "b_now": now,
                                                "b_count": len(turn.history) + len(write.messages)})
                if ended.rowcount != 1:
                    lost.append(write)
        kept = [write for write in writes if write not in lost]
        add_conversations, add_messages = compiled_inserts(conn.dialect)
        if new := [write for write in kept if write.turn.is_new]:
            add_conversations.run(conn, [
                {"id": write.turn.conversation_id, "title": conversation_title(write.messages),
                 "created_at": now, "updated_at": now, "message_count": len(write.messages)} for write in new])
        if kept:
            add_messages.run(conn, [row for write in kept for row in write.rows(now)])
    return lost


def take_lease(conn: Connection, conversation_id: str, lease: str, now: float, expires: float) -> list[dict[str, Any]]:
    """Lease a conversation for a turn and read its history, in one transaction; 404 or 409 if not free."""
    with conn.begin():
        taken = conn.execute(TAKE_LEASE, {"b_id": conversation_id, "b_now": now, "b_lease": lease,
                                          "b_expires": expires})
        if taken.rowcount != 1:
            if conn.scalar(CONVERSATION_EXISTS, {"b_id": conversation_id}) is None:
                raise ConversationNotFound(f"conversation {conversation_id!r} not found")
            raise ConversationBusy(f"conversation {conversation_id!r} is busy with another turn; "
                                   "retry when that turn has finished")
        return [wire_message(row) for row in conn.execute(LOAD_WIRE_MESSAGES, {"b_id": conversation_id})]


def release_lease(conn: Connection, conversation_id: str, lease: str) -> None:
    with conn.begin():
        conn.execute(RELEASE_LEASE, {"b_id": conversation_id, "b_lease": lease})


def delete_rows(conn: Connection, conversation_id: str) -> None:
    with conn.begin():
        conn.execute(DELETE_MESSAGES, {"b_id": conversation_id})
        if conn.execute(DELETE_CONVERSATION, {"b_id": conversation_id}).rowcount != 1:
            raise ConversationNotFound(f"conversation {conversation_id!r} not found")


def wire_message(row: Any) -> dict[str, Any]:
    """A stored message as vLLM expects it in `messages`."""
    message: dict[str, Any] = {"role": row.role, "content": row.content}
    if row.tool_calls:
        message["tool_calls"] = row.tool_calls
    if row.tool_call_id is not None:
        message["tool_call_id"] = row.tool_call_id
    return message


def encode_cursor(updated_at: float, conversation_id: str) -> str:
    return base64.urlsafe_b64encode(f"{updated_at!r}|{conversation_id}".encode()).decode()


def decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        updated_at, conversation_id = base64.urlsafe_b64decode(cursor.encode()).decode().split("|", 1)
        return float(updated_at), conversation_id
    except (ValueError, UnicodeError) as exc:
        raise InvalidCursor("cursor is not one this service returned") from exc


def set_sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    """WAL lets readers work while a turn is written; busy_timeout makes writers queue, not fail."""
    cursor = dbapi_connection.cursor()
    for pragma in ("journal_mode=WAL", "busy_timeout=10000", "foreign_keys=ON", "synchronous=NORMAL"):
        cursor.execute(f"PRAGMA {pragma}")
    cursor.close()


WriterJob = tuple[asyncio.Future[Any], Callable[..., Any], tuple[Any, ...]]  # (answer, operation, arguments)


class SQLiteWriter:
    """SQLite's writes (turns, leases, deletes) on a sync engine, in one thread of their own.

    Through the async engine, aiosqlite makes three round trips to its thread per statement (cursor,
    execute, close) and one per commit, each wrapped in a greenlet switch: ~0.6 ms of CPU to store a
    turn, against ~0.3 ms here (bench/README.md). One writer connection also means writes queue here,
    never in SQLite's busy handler (whose sleeps cost whole milliseconds under load). Reads stay on the
    async engine, in parallel with the writer (WAL).
    """

    def __init__(self, async_url: URL) -> None:
        self.engine = create_engine(async_url.set(drivername="sqlite+pysqlite"), **SQLITE_POOL)
        sqlalchemy_event.listen(self.engine, "connect", set_sqlite_pragmas)
        self._jobs: queue.SimpleQueue[WriterJob | None] = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name="sqlite-writer", daemon=True)
        self._thread.start()

    async def run(self, operation: Callable[..., T], *args: Any) -> T:
        """operation(connection, *args) on the writer thread; its result or its exception comes back."""
        if self._closed:
            raise RuntimeError("the conversation store is closed")
        done: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._jobs.put((done, operation, args))
        return await done

    async def close(self) -> None:
        """Finish the jobs already sent, then stop the thread and close its connection."""
        self._closed = True
        self._jobs.put(None)
        await asyncio.to_thread(self._thread.join)

    def _serve(self) -> None:
        """The writer thread: a plain queue and call_soon_threadsafe, ~50 µs a write less than run_in_executor.

        One connection for the thread's life, opened by the first write (a pool checkout and return per
        write cost ~30 µs); every operation ends its own transaction, so it is clean between writes.
        """
        conn: Connection | None = None
        try:
            while (job := self._jobs.get()) is not None:
                done, operation, args = job
                result, error = None, None
                try:
                    conn = conn or self.engine.connect()
                    result = operation(conn, *args)
                except Exception as exc:
                    error = exc
                with suppress(RuntimeError):  # the loop is closed: nobody waits for this answer
                    done.get_loop().call_soon_threadsafe(settle, done, result, error)
        finally:
            if conn is not None:
                conn.close()
            self.engine.dispose()


def settle(future: asyncio.Future[Any], result: Any, error: Exception | None) -> None:
    """Resolve a future with another thread's outcome (unless its waiter has given up on it)."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class ConversationStore:
    """Conversations in SQLite or PostgreSQL (SQLAlchemy Core); one transaction per successful turn.

    A turn holds a lease on its conversation (a token and an expiry in the row), so a second turn on
    the same conversation gets 409 on every worker and instance that shares the database.
    """

    def __init__(self, engine: AsyncEngine, lease_s: float, sqlite_writer: SQLiteWriter | None = None) -> None:
        self._engine = engine
        self._lease_s = lease_s
        self._sqlite_writer = sqlite_writer
        self._queued: list[TurnWrite] = []
        self._writer_task: asyncio.Task[None] | None = None
        self._releases: set[asyncio.Task[None]] = set()

    @property
    def write_engine(self) -> Engine:
        """The engine whose transactions store turns (for tests and instrumentation)."""
        return self._sqlite_writer.engine if self._sqlite_writer else self._engine.sync_engine

    @classmethod
    @asynccontextmanager
    async def open(cls, url: str, *, lease_s: float) -> AsyncIterator["ConversationStore"]:
        """Connect, create the tables if missing, and dispose of the engine on exit."""
        sqlite = url.startswith("sqlite")
        engine = create_async_engine(url, **(SQLITE_POOL if sqlite else {}))
        if sqlite:
            sqlalchemy_event.listen(engine.sync_engine, "connect", set_sqlite_pragmas)
        sqlite_writer = SQLiteWriter(engine.url) if sqlite else None
        try:
            async with engine.begin() as conn:
                await conn.run_sync(METADATA.create_all)
            store = cls(engine, lease_s, sqlite_writer)
            try:
                yield store
            finally:
                pending = [*store._releases, *([store._writer_task] if store._writer_task else [])]
                await asyncio.gather(*pending, return_exceptions=True)  # their waiters already have the errors
        finally:
            if sqlite_writer is not None:
                await sqlite_writer.close()
            await engine.dispose()

    async def open_turn(self, conversation_id: str | None) -> OpenTurn:
        """Reserve a conversation for one turn (409 while another turn runs); None starts a new one."""
        if conversation_id is None:
            return OpenTurn(new_conversation_id(), [], None)
        lease, now = secrets.token_hex(16), time.time()
        taking = asyncio.ensure_future(self._write_op(take_lease, conversation_id, lease, now, now + self._lease_s))
        try:
            history = await asyncio.shield(taking)
        except asyncio.CancelledError:
            taking.add_done_callback(lambda _: self._release_abandoned(taking, conversation_id, lease))
            raise
        return OpenTurn(conversation_id, history, lease)

    def _release_abandoned(self, taking: asyncio.Future[Any], conversation_id: str, lease: str) -> None:
        """A request that went away while its lease was being taken must not leave the conversation locked."""
        if taking.cancelled() or taking.exception() is not None:
            return
        release = asyncio.ensure_future(self._write_op(release_lease, conversation_id, lease))
        self._releases.add(release)
        release.add_done_callback(self._releases.discard)

    async def commit_turn(self, turn: OpenTurn, messages: list[dict[str, Any]],
                          usages: list[dict[str, int] | None]) -> None:
        """Write the turn's messages and release the lease, all in one transaction.

        Group commit: turns that finish while a write is in flight queue up and go to the database
        together in the next transaction, so a busy service pays one commit (and one trip to the
        writer thread) for many turns. Each turn still succeeds or fails on its own. The write runs in
        the store's writer task: a caller cancelled while it waits (the client went away) doesn't stop it.
        """
        write = TurnWrite(turn, messages, usages, asyncio.get_running_loop().create_future())
        turn.writing = write.done
        self._queued.append(write)
        if self._writer_task is None or self._writer_task.done():
            self._writer_task = asyncio.create_task(self._write_queued())
        await asyncio.shield(write.done)

    async def _write_queued(self) -> None:
        """Write queued turns batch by batch; if a batch fails, write its turns one by one."""
        while self._queued:
            batch, self._queued = self._queued, []
            try:
                await self._write(batch)
            except Exception as exc:
                if len(batch) == 1:
                    batch[0].fail(exc)
                    continue
                for write in batch:
                    try:
                        await self._write([write])
                    except Exception as single_exc:
                        write.fail(single_exc)

    async def _write(self, batch: list[TurnWrite]) -> None:
        """One transaction for the batch; a turn whose lease was lost gets 409 and writes nothing."""
        writes = [write for write in batch if not write.done.done()]
        lost = await self._write_op(write_turns, writes, time.time())
        for write in writes:
            if write in lost:
                write.fail(ConversationBusy(f"conversation {write.turn.conversation_id!r} was deleted or taken "
                                            "over while this turn ran; the turn was not stored"))
            else:
                write.turn.committed = True
                write.done.set_result(None)

    async def close_turn(self, turn: OpenTurn) -> None:
        """Release the lease of a turn that was not committed (commit releases it itself).

        A commit still in flight (its caller went away while it was written) is waited for first, so the
        release cannot overtake it: the turn is then stored, or not, and the conversation is free either way.
        """
        if turn.writing is not None:
            with suppress(Exception):  # a failed commit: its caller has the error
                await asyncio.shield(turn.writing)
        if turn.holds_lease:
            await self._write_op(release_lease, turn.conversation_id, turn.lease)

    async def load_messages(self, conversation_id: str) -> list[dict[str, Any]]:
        """The stored messages of a conversation, oldest first, in vLLM's message shape."""
        async with self._engine.connect() as conn:
            await self._summary(conn, conversation_id)
            return [wire_message(row) for row in await self._messages(conn, conversation_id, wire_only=True)]

    async def get_conversation(self, conversation_id: str) -> ConversationDetail:
        async with self._engine.connect() as conn:
            summary = await self._summary(conn, conversation_id)
            rows = await self._messages(conn, conversation_id)
        return ConversationDetail(**summary.model_dump(), messages=[
            StoredMessage(position=row.position, role=row.role, content=row.content, tool_calls=row.tool_calls,
                          tool_call_id=row.tool_call_id, usage=row.usage, created_at=row.created_at)
            for row in rows
        ])

    async def list_conversations(self, limit: int, cursor: str | None) -> ConversationPage:
        """Newest first; `cursor` continues after the last conversation of the previous page."""
        query = select(*SUMMARY_COLUMNS).order_by(CONVERSATIONS.c.updated_at.desc(), CONVERSATIONS.c.id.desc())
        if cursor is not None:
            updated_at, conversation_id = decode_cursor(cursor)
            query = query.where(or_(CONVERSATIONS.c.updated_at < updated_at,
                                    and_(CONVERSATIONS.c.updated_at == updated_at,
                                         CONVERSATIONS.c.id < conversation_id)))
        async with self._engine.connect() as conn:
            rows = (await conn.execute(query.limit(limit + 1))).all()
        page = [ConversationSummary.model_validate(row._mapping) for row in rows[:limit]]
        more = len(rows) > limit
        return ConversationPage(conversations=page,
                                next_cursor=encode_cursor(page[-1].updated_at, page[-1].id) if more else None)

    async def delete_conversation(self, conversation_id: str) -> None:
        await self._write_op(delete_rows, conversation_id)

    async def _write_op(self, operation: Callable[..., T], *args: Any) -> T:
        """A write as one sync function on a connection: on SQLite's writer thread, else in one greenlet.

        (run_sync: awaiting each statement through the async engine cost about a sixth more CPU.)
        """
        if self._sqlite_writer is not None:
            return await self._sqlite_writer.run(operation, *args)
        async with self._engine.connect() as conn:
            return await conn.run_sync(operation, *args)

    @staticmethod
    async def _messages(conn: AsyncConnection, conversation_id: str, *, wire_only: bool = False) -> Sequence[Any]:
        """A conversation's message rows in order; `wire_only` reads just what vLLM is sent (no usage JSON)."""
        query = LOAD_WIRE_MESSAGES if wire_only else LOAD_MESSAGES
        return (await conn.execute(query, {"b_id": conversation_id})).all()

    @staticmethod
    async def _summary(conn: AsyncConnection, conversation_id: str) -> ConversationSummary:
        row = (await conn.execute(select(*SUMMARY_COLUMNS).where(CONVERSATIONS.c.id == conversation_id))).first()
        if row is None:
            raise ConversationNotFound(f"conversation {conversation_id!r} not found")
        return ConversationSummary.model_validate(row._mapping)



SUMMARY_COLUMNS = (CONVERSATIONS.c.id, CONVERSATIONS.c.title, CONVERSATIONS.c.created_at,
                   CONVERSATIONS.c.updated_at, CONVERSATIONS.c.message_count)


def conversation_title(messages: list[dict[str, Any]]) -> str:
    """The first line of the first user message, shortened: enough to recognise a conversation."""
    text = next((m["content"] for m in messages if m["role"] == "user"), "") or ""
    line = " ".join(text.split())
    return line if len(line) <= TITLE_CHARS else line[: TITLE_CHARS - 1] + "…"


# --- 7. Agent ---

REPEATED_CALL_LIMIT = 3
FINAL_ANSWER_NUDGE = (
    "Stop calling tools now. Answer the user's last message with what the tool results above "
    "already show, and say what is still unknown."
)


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A call the agent will run; `error` is set when the call itself could not be read."""

    id: str
    name: str
    arguments: dict[str, Any]
    error: str | None = None

    def wire(self) -> dict[str, Any]:
        """The call as vLLM expects it in history: arguments always a valid JSON string."""
        arguments = json.dumps(self.arguments, ensure_ascii=False)
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": arguments}}


@dataclass(slots=True)
class StepReply:
    """One LLM call's outcome: the assistant message to keep, the calls it asks for, its token counts."""

    message: dict[str, Any]
    calls: list[ToolCall]
    usage: tuple[int, int, int] | None


@dataclass
class TurnState:
    """What one turn has produced so far; `usages` runs parallel to `messages` (stored with them)."""

    messages: list[dict[str, Any]] = field(default_factory=list)
    usages: list[dict[str, int] | None] = field(default_factory=list)
    content: list[str] = field(default_factory=list)
    records: list[ToolCallRecord] = field(default_factory=list)
    usage: list[int] | None = None
    call_counts: Counter[str] = field(default_factory=Counter)

    def add(self, message: dict[str, Any], usage: tuple[int, int, int] | None = None) -> None:
        self.messages.append(message)
        self.usages.append(None if usage is None else dict(zip(USAGE_KEYS, usage, strict=True)))
        if usage is not None:
            self.usage = [a + b for a, b in zip(self.usage or [0, 0, 0], usage, strict=True)]


USAGE_KEYS = ("prompt_tokens", "completion_tokens", "total_tokens")


def calls_from_completion(completion: Completion) -> tuple[str, list[ToolCall]]:
    """Visible text and calls: vLLM's parsed calls, else any <tool_call> blocks left in the text."""
    if completion.tool_calls:
        calls = []
        for wire in completion.tool_calls:
            try:
                calls.append(ToolCall(wire.id, wire.name, decode_arguments(wire.arguments)))
            except ValueError as exc:
                calls.append(ToolCall(wire.id, wire.name, {}, f"the arguments are not valid JSON ({exc})"))
        return completion.content, calls
    parsed = parse_hermes_reply(completion.content)
    return parsed.content, [ToolCall(new_call_id(), call.name, call.arguments, call.error) for call in parsed.calls]


NO_TOOLS: list[dict[str, Any]] = []


@dataclass(frozen=True)
class PromptHead:
    """What every request starts with on a given day: the system message, the native tools (also as JSON text),
    their token estimate."""

    date: str
    schemas: list[dict[str, Any]]
    tool_format: str
    system: dict[str, Any]
    tools: list[dict[str, Any]]
    tools_json: EncodedJson
    tokens: int


def estimate_tokens(value: Any) -> int:
    """A cheap, deliberately high token estimate: UTF-8 bytes / 3 (Qwen averages ~4 bytes a token)."""
    return len(JSON_ENCODER.encode(value).encode()) // 3 + 1


def split_turns(history: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Stored messages grouped into turns, each starting at a user message, so a turn is dropped whole."""
    turns: list[list[dict[str, Any]]] = []
    for message in history:
        if message["role"] == "user" or not turns:
            turns.append([])
        turns[-1].append(message)
    return turns


class Agent:
    """The tool-calling loop over one vLLM server, a tool registry and a conversation store."""

    def __init__(self, llm: VLLMClient, registry: ToolRegistry, store: ConversationStore,
                 settings: Settings) -> None:
        self.llm = llm
        self.registry = registry
        self.store = store
        self.settings = settings
        self.tool_format: Literal["native", "hermes"] = (
            "hermes" if settings.tool_call_format == "hermes" else "native"
        )
        self._sampling = settings.sampling()
        self._background: set[asyncio.Task[Any]] = set()
        self._heads: dict[bool, PromptHead] = {}

    async def open_turn(self, conversation_id: str | None) -> OpenTurn:
        """Reserve the conversation before any output, so 404 and 409 are real HTTP answers."""
        return await self.store.open_turn(conversation_id)

    async def run_turn(self, turn: OpenTurn, content: str, *, stream: bool = False) -> AsyncIterator[StreamEvent]:
        """Run one user turn, yielding events as they happen; the last one is a DoneEvent.

        Nothing is written until the turn succeeds, so a failed turn leaves the history as it was.
        The whole turn is bounded by TURN_TIMEOUT_S, however many steps it takes.
        """
        events = self._turn_events(turn, content, stream=stream)
        deadline = asyncio.get_running_loop().time() + self.settings.turn_timeout_s
        try:
            while True:
                try:
                    async with asyncio.timeout_at(deadline):
                        event = await anext(events)
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    raise self._turn_timeout() from None
                yield event
        finally:
            await events.aclose()

    async def answer(self, turn: OpenTurn, content: str) -> DoneEvent:
        """Run one user turn to its DoneEvent, for a caller that needs no events on the way.

        One deadline around the whole turn: nothing outside the turn runs between its events, so the
        per-event timers run_turn needs (a stream's consumer runs in between) would be pure overhead.
        """
        done: DoneEvent | None = None
        try:
            async with asyncio.timeout(self.settings.turn_timeout_s):
                async for event in self._turn_events(turn, content, stream=False):
                    if isinstance(event, DoneEvent):
                        done = event
        except TimeoutError:
            raise self._turn_timeout() from None
        if done is None:
            raise RuntimeError("the turn ended without a DoneEvent")
        return done

    def _turn_timeout(self) -> TurnTimeout:
        return TurnTimeout(f"the turn did not finish within {self.settings.turn_timeout_s:g} s (TURN_TIMEOUT_S)")

    async def _turn_events(self, turn: OpenTurn, content: str, *, stream: bool) -> AsyncIterator[StreamEvent]:
        try:
            state = TurnState()
            state.add({"role": "user", "content": content})
            stop_reason: StopReason = "max_steps"
            for _ in range(self.settings.agent_max_steps):
                reply = None
                async for item in self._step(turn.history, state, stream=stream, tools=True):
                    if isinstance(item, StepReply):
                        reply = item
                    else:
                        yield item
                if not reply.calls:
                    state.add(reply.message, reply.usage)
                    stop_reason = "completed"
                    break
                if self._is_looping(reply.calls, state):
                    stop_reason = "loop_detected"
                    break
                state.add(reply.message, reply.usage)
                async for event in self._run_tools(reply.calls, state):
                    yield event
            if stop_reason != "completed":
                async for event in self._final_answer(turn, state, stream=stream):
                    yield event
            await self.store.commit_turn(turn, state.messages, state.usages)
            yield self._done(turn, state, stop_reason)
        finally:
            if turn.holds_lease:
                await self._finish(self.store.close_turn(turn))

    async def _finish(self, write: Any) -> None:
        """Complete a store write even when the turn is being cancelled (e.g. the client went away)."""
        task = asyncio.ensure_future(write)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        await asyncio.shield(task)

    async def _final_answer(self, turn: OpenTurn, state: TurnState, *, stream: bool) -> AsyncIterator[StreamEvent]:
        """One last call without tools, so a turn that ran out of steps still ends with an answer."""
        nudge = {"role": "system", "content": FINAL_ANSWER_NUDGE}
        async for item in self._step(turn.history, state, stream=stream, tools=False, nudge=nudge):
            if isinstance(item, StepReply):
                state.add(item.message, item.usage)
            else:
                yield item

    def _is_looping(self, calls: list[ToolCall], state: TurnState) -> bool:
        """True when a call repeats one already made REPEATED_CALL_LIMIT - 1 times this turn."""
        keys = [f"{call.name}:{json.dumps(call.arguments, sort_keys=True)}" for call in calls]
        if any(state.call_counts[key] >= REPEATED_CALL_LIMIT - 1 for key in keys):
            logger.warning("the model repeats the same tool call; asking it for a final answer")
            return True
        state.call_counts.update(keys)
        return False

    async def _step(self, history: list[dict[str, Any]], state: TurnState, *, stream: bool, tools: bool,
                    nudge: dict[str, Any] | None = None) -> AsyncIterator[TokenEvent | StepReply]:
        """One LLM call: visible text as TokenEvents, then the StepReply."""
        visible = VisibleTextFilter()
        pieces: list[str] = []
        completion: Completion | None = None
        current = state.messages if nudge is None else [*state.messages, nudge]
        async for piece in self._complete(history, current, stream=stream, tools=tools):
            if isinstance(piece, Completion):
                completion = piece
            elif text := visible.feed(piece):
                yield self._token(text, pieces, state)
        if completion is None:
            raise LLMError("vLLM's reply ended without a completion")
        content, calls = calls_from_completion(completion)
        tail = visible.flush() if stream else content
        if tail:
            yield self._token(tail, pieces, state)
        message: dict[str, Any] = {"role": "assistant", "content": "".join(pieces)}
        if calls and tools:
            message["tool_calls"] = [call.wire() for call in calls]
        yield StepReply(message, calls if tools else [], completion.usage)

    @staticmethod
    def _token(text: str, pieces: list[str], state: TurnState) -> TokenEvent:
        """A visible piece; a step's text is set off from an earlier step's by a blank line."""
        pieces.append(text)
        if len(pieces) == 1 and state.content and not state.content[-1].endswith("\n"):
            text = "\n\n" + text
        state.content.append(text)
        return TokenEvent(content=text)

    async def _complete(self, history: list[dict[str, Any]], current: list[dict[str, Any]], *, stream: bool,
                        tools: bool) -> AsyncIterator[str | Completion]:
        """Call vLLM; switch to Hermes once if vLLM has no tool parser; trim harder once if vLLM says too long."""
        harder = False
        while True:
            payload = await self._payload(history, current, tools=tools, harder=harder)
            try:
                if stream:
                    async for piece in self.llm.stream(payload):
                        yield piece
                else:
                    yield await self.llm.complete(payload)
                return
            except AutoToolChoiceUnsupported:
                if self.tool_format != "native" or self.settings.tool_call_format != "auto":
                    raise
                self.tool_format = "hermes"
                logger.warning(
                    "vLLM at %s has no tool-call parser (--enable-auto-tool-choice); "
                    "switching to Hermes tool calls in the prompt", self.llm.base_url,
                )
            except ContextTooLong:
                if harder:
                    raise
                harder = True

    async def _payload(self, history: list[dict[str, Any]], current: list[dict[str, Any]], *, tools: bool,
                       harder: bool) -> dict[str, Any]:
        """The request body: system prompt (with tools in Hermes mode), what fits of history, tools, sampling."""
        head = self._prompt_head(tools)
        messages = await self._fit(head, history, current, harder=harder)
        payload: dict[str, Any] = {"messages": messages, **self._sampling}
        if head.tools:
            payload["tools"] = head.tools_json
        return payload

    def _prompt_head(self, tools: bool) -> PromptHead:
        """Today's system message and native tool list, rebuilt only when the date, tools or format change."""
        schemas = self.registry.openai_schemas() if tools else NO_TOOLS
        today = datetime.now(UTC).date().isoformat()
        head = self._heads.get(tools)
        if head is None or head.schemas is not schemas or head.date != today or head.tool_format != self.tool_format:
            system_text = self.settings.system_prompt.replace("{date}", today)
            if schemas and self.tool_format == "hermes":
                system_text = render_hermes_tools(system_text, schemas)
            system = {"role": "system", "content": system_text}
            native_tools = schemas if self.tool_format == "native" else NO_TOOLS
            head = self._heads[tools] = PromptHead(today, schemas, self.tool_format, system, native_tools,
                                                   EncodedJson(JSON_ENCODER.encode(native_tools)),
                                                   estimate_tokens(system) + estimate_tokens(native_tools))
        return head

    async def _fit(self, head: PromptHead, history: list[dict[str, Any]], current: list[dict[str, Any]], *,
                   harder: bool) -> list[dict[str, Any]]:
        """System prompt, the newest whole turns of history that fit the window, and the current turn.

        Below half the budget a cheap estimate decides; nearer the limit vLLM's /tokenize counts.
        """
        budget = await self._token_budget()
        if harder:
            budget = budget * 3 // 4
        system, tools = head.system, head.tools
        messages = [system, *history, *current]
        estimate = head.tokens + estimate_tokens(history) + estimate_tokens(current)
        if estimate <= budget // 2:
            return messages
        turns = split_turns(history)
        sizes = [estimate_tokens(turn) for turn in turns]
        first = 0
        while True:
            count = estimate if estimate <= budget // 2 else await self.llm.count_tokens(messages, tools) or estimate
            if count <= budget:
                if first:
                    logger.info("sending the newest %d of %d turns to fit %d tokens", len(turns) - first,
                                len(turns), budget)
                return messages
            if first == len(turns):
                raise ContextTooLong(f"the message is too long for the model: about {count} tokens, and the "
                                     f"context window leaves {budget} for the prompt")
            excess, ratio = count - budget, count / estimate
            while first < len(turns) and excess > 0:
                excess -= sizes[first] * ratio
                estimate -= sizes[first]
                first += 1
            messages = [system, *(m for turn in turns[first:] for m in turn), *current]

    async def _token_budget(self) -> int:
        """Prompt tokens allowed: the model's window minus the room kept for the answer."""
        window = self.settings.max_model_len or await self.llm.max_model_len()
        reserve = self.settings.max_tokens or self.settings.context_reserve_tokens
        return max(window - reserve, window // 4)

    async def _run_tools(self, calls: list[ToolCall], state: TurnState) -> AsyncIterator[StreamEvent]:
        """Run a reply's calls concurrently; events as results come, messages in call order."""
        for call in calls:
            yield ToolCallEvent(id=call.id, name=call.name, arguments=call.arguments)
        results: list[ToolResult | None] = [None] * len(calls)
        async for index, result in self._results_as_completed(calls):
            results[index] = result
            call = calls[index]
            yield ToolResultEvent(id=call.id, name=call.name, result=result.result, error=result.error,
                                  duration_s=round(result.duration_s, 4))
        for call, result in zip(calls, results, strict=True):
            state.records.append(ToolCallRecord(id=call.id, name=call.name, arguments=call.arguments,
                                                result=result.result, error=result.error))
            text = result.result if result.error is None else f"Error: {result.error}"
            state.add({"role": "tool", "tool_call_id": call.id, "content": text})

    async def _results_as_completed(self, calls: list[ToolCall]) -> AsyncIterator[tuple[int, ToolResult]]:
        """(index, result) as each call finishes; a single call runs inline, without a task to schedule."""
        if len(calls) == 1:
            yield await self._run_tool(0, calls[0])
            return
        tasks = [asyncio.create_task(self._run_tool(index, call)) for index, call in enumerate(calls)]
        try:
            for next_done in asyncio.as_completed(tasks):
                yield await next_done
        finally:
            for task in tasks:
                task.cancel()

    async def _run_tool(self, index: int, call: ToolCall) -> tuple[int, ToolResult]:
        if call.error is not None:
            return index, ToolResult(None, call.error, 0.0)
        try:
            result = await self.registry.run(call.name, call.arguments, timeout_s=self.settings.tool_timeout_s,
                                             max_result_chars=self.settings.tool_result_max_chars)
        except Exception as exc:  # the registry turns every tool failure into a result; this is a bug in it
            logger.exception("tool %r failed inside the service", call.name)
            raise ToolExecutionError(f"the tool {call.name!r} could not be run; the service log has the "
                                     "details") from exc
        return index, result

    @staticmethod
    def _done(turn: OpenTurn, state: TurnState, stop_reason: StopReason) -> DoneEvent:
        usage = None
        if state.usage is not None:
            usage = Usage(prompt_tokens=state.usage[0], completion_tokens=state.usage[1],
                          total_tokens=state.usage[2])
        return DoneEvent(conversation_id=turn.conversation_id, content="".join(state.content),
                         tool_calls=state.records or None, usage=usage, stop_reason=stop_reason)


# --- 8. App ---

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody} for status in (401, 404, 409, 413, 415, 422, 500, 502, 503, 504)
}
SSE_PING_S = 15.0
YOUNG_GC_THRESHOLD = 10_000
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
SSE_RESPONSE: dict[int | str, dict[str, Any]] = {200: {
    "description": "Events `token`, `tool_call`, `tool_result`, then one `done` or `error`; each `data:` is "
                   "JSON whose `type` is the event name.",
    "content": {"text/event-stream": {"itemSchema": {"oneOf": [
        {key: value for key, value in model.model_json_schema(ref_template="#/components/schemas/{model}").items()
         if key != "$defs"}  # nested models (Usage, ToolCallRecord) are components already
        for model in (TokenEvent, ToolCallEvent, ToolResultEvent, DoneEvent, ErrorEvent)]}}},
}}
CHAT_RESPONSE_JSON = TypeAdapter(ChatResponse)  # a DoneEvent through it loses `type`, as the API documents
REQUEST_ID: ContextVar[str] = ContextVar("request_id", default="-")
REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
JSON_MEDIA_TYPE = re.compile(r"application/(?:[\w.-]+\+)?json")


async def get_agent(request: Request) -> Agent:
    """Async on purpose: FastAPI runs a plain `def` dependency in a worker thread."""
    return request.app.state.agent


AgentDep = Annotated[Agent, Depends(get_agent)]


class APIKeyBearer(HTTPBearer):
    """With API_KEY set, every /api/v1 route but /health needs `Authorization: Bearer <key>`.

    The check is the security scheme itself, so /docs still offers "Authorize" and a request solves one
    dependency for it, not two (a dependency level was ~1% of a turn's CPU).
    """

    async def __call__(self, request: Request) -> None:
        expected: bytes | None = request.app.state.api_key
        if expected is None:
            return
        credentials = await super().__call__(request)
        given = credentials.credentials.encode() if credentials is not None else b""
        if not hmac.compare_digest(given, expected):
            raise Unauthorized("missing or wrong API key: send the header Authorization: Bearer <API_KEY>")


require_api_key = APIKeyBearer(auto_error=False, scheme_name="HTTPBearer",
                               description="The service's API_KEY, when it is set.")


async def open_chat_turn(body: ChatRequest, agent: Agent) -> OpenTurn:
    """Check the request and reserve the conversation before a response starts (so 404/409 are real).

    Called from the endpoints rather than declared as a dependency: one dependency level less for FastAPI
    to solve per request, and an endpoint's exceptions become HTTP errors all the same.
    """
    limit = agent.settings.max_content_chars
    if len(body.content) > limit:
        raise ContentTooLarge(f"content is {len(body.content)} characters; the limit is {limit}")
    return await agent.open_turn(body.conversation_id)


ConversationId = Annotated[str, FastAPIPath(pattern=CONVERSATION_ID_PATTERN)]
router = APIRouter(prefix="/api/v1", responses=ERROR_RESPONSES, dependencies=[Depends(require_api_key)])
open_router = APIRouter(prefix="/api/v1")


@router.post("/chat", response_model=ChatResponse, summary="Run one agent turn and return the answer")
async def chat(body: ChatRequest, agent: AgentDep) -> Response:
    """Serialized here through ChatResponse's schema: FastAPI would validate the finished model again first."""
    turn = await open_chat_turn(body, agent)
    done = await agent.answer(turn, body.content)
    return Response(CHAT_RESPONSE_JSON.dump_json(done), media_type="application/json")


@router.post("/chat/stream", response_class=StreamingResponse, responses=SSE_RESPONSE,
             summary="Run one agent turn, streaming events as Server-Sent Events")
async def chat_stream(body: ChatRequest, agent: AgentDep) -> EventSourceResponse:
    turn = await open_chat_turn(body, agent)
    events = with_error_event(agent.run_turn(turn, body.content, stream=True))
    return EventSourceResponse(sse_frames(events), headers=SSE_HEADERS)


async def with_error_event(events: AsyncIterator[StreamEvent]) -> AsyncIterator[StreamEvent]:
    """Once the headers are sent the status can't change: a failure becomes the last event."""
    try:
        async for event in events:
            yield event
    except AgentError as exc:
        logger.info("turn failed: %s %s", exc.status_code, exc)
        yield ErrorEvent(status=exc.status_code, detail=str(exc))
    except Exception:
        logger.exception("unexpected error in a streamed turn")
        yield ErrorEvent(status=500, detail="internal error")


async def sse_frames(events: AsyncIterator[StreamEvent]) -> AsyncIterator[bytes]:
    """fastapi.sse's framing and keep-alive comments on plain asyncio.

    FastAPI's generator mode does the same with anyio memory streams and a fail_after per event, which
    the benchmark found to be about a third of a streamed turn's CPU. Here a producer task fills a
    queue, so waiting for the next event (a slow model, a long tool) can time out into a ping without
    disturbing the turn; closing this iterator (the client went away) cancels the turn. Frames that
    piled up while the last write was going out leave together, in one write.
    """
    frames: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=64)

    async def produce() -> None:
        async for event in events:
            await frames.put(format_sse_event(data_str=event.model_dump_json(), event=event.type))
        await frames.put(None)

    async def next_frame() -> bytes | None:
        try:
            async with asyncio.timeout(SSE_PING_S):
                return await frames.get()
        except TimeoutError:
            return KEEPALIVE_COMMENT

    producer = asyncio.create_task(produce())
    try:
        while True:
            ready = [frames.get_nowait() if frames.qsize() else await next_frame()]
            ready += [frames.get_nowait() for _ in range(frames.qsize())]  # frames that piled up: one write
            finished = ready[-1] is None
            if chunk := b"".join(ready[:-1] if finished else ready):
                yield chunk
            if finished:
                return
    finally:
        producer.cancel()


@router.get("/conversations", summary="List stored conversations, newest first")
async def list_conversations(
    agent: AgentDep,
    limit: Annotated[int, Query(ge=1, le=100, description="Conversations per page.")] = 20,
    cursor: Annotated[str | None, Query(max_length=200, description="`next_cursor` of the previous page.")] = None,
) -> ConversationPage:
    return await agent.store.list_conversations(limit, cursor)


@router.get("/conversations/{conversation_id}", summary="One conversation with its messages in order")
async def get_conversation(conversation_id: ConversationId, agent: AgentDep) -> ConversationDetail:
    return await agent.store.get_conversation(conversation_id)


@router.delete("/conversations/{conversation_id}", status_code=204, summary="Delete a conversation")
async def delete_conversation(conversation_id: ConversationId, agent: AgentDep) -> Response:
    await agent.store.delete_conversation(conversation_id)
    return Response(status_code=204)


@router.get("/tools", summary="List the tools the agent can call")
async def list_tools(agent: AgentDep) -> list[ToolInfo]:
    return [ToolInfo(name=tool.name, description=tool.description, parameters=tool.parameters)
            for tool in agent.registry.tools]


@open_router.get("/health", summary="Service status and whether vLLM is reachable (no API key needed)")
async def health(agent: AgentDep) -> Health:
    reachable = await agent.llm.is_reachable()
    status = VLLMStatus(url=agent.llm.base_url, reachable=reachable, model=agent.llm.model,
                        tool_call_format=agent.tool_format)
    return Health(status="ok" if reachable else "degraded", vllm=status)


async def agent_error_handler(request: Request, exc: AgentError) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=exc.status_code, headers=exc.headers)


async def validation_error_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 with one readable line per problem (415 for a body not sent as JSON); the input is never echoed."""
    errors = exc.errors()
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if any(error["loc"][:1] == ("body",) for error in errors) and not JSON_MEDIA_TYPE.fullmatch(media_type):
        wrong = f", not {media_type}" if media_type else ""
        return JSONResponse({"detail": f"the body must be JSON, sent with Content-Type: application/json{wrong}"},
                            status_code=415)
    problems = "; ".join(validation_problem(error) for error in errors)
    return JSONResponse({"detail": problems or "invalid request"}, status_code=422)


def validation_problem(error: Any) -> str:
    """One problem as `field: message`; FastAPI reports malformed JSON at a character position."""
    if error["type"] == "json_invalid":
        return f"body: invalid JSON at character {error['loc'][-1]}: {error['ctx']['error']}"
    return f"{'.'.join(str(part) for part in error['loc'] if part != 'body') or 'body'}: {error['msg']}"


class RequestContextMiddleware:
    """Per request: an id (X-Request-ID in and out, and in every log line), an access log line, a cap on API
    body size so a huge upload is refused with 413 before it is read into memory, and the 500 for any
    unexpected error (here, not in an exception handler, so that answer and its log line carry the id too)."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        incoming = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = incoming if REQUEST_ID_PATTERN.match(incoming) else secrets.token_hex(16)
        token = REQUEST_ID.set(request_id)
        started, status = time.perf_counter(), None

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            if not scope["path"].startswith("/api/"):
                await self.app(scope, receive, send_with_id)
            elif self._declared_too_large(headers.get(b"content-length")):
                await JSONResponse({"detail": self._too_large}, status_code=413)(scope, receive, send_with_id)
            else:
                await self.app(scope, self._limited(receive), send_with_id)
        except Exception:
            logger.exception("unexpected error on %s %s", scope["method"], scope["path"])
            if status is not None:
                raise
            await JSONResponse({"detail": "internal error"}, status_code=500)(scope, receive, send_with_id)
        finally:
            access_logger.info("%s %s %d %.1f ms", scope["method"], scope["path"], status or 500,
                               (time.perf_counter() - started) * 1000)
            REQUEST_ID.reset(token)

    @property
    def _too_large(self) -> str:
        return f"the request body is larger than {self.max_body_bytes} bytes"

    def _declared_too_large(self, content_length: bytes | None) -> bool:
        return content_length is not None and content_length.isdigit() and int(content_length) > self.max_body_bytes

    def _limited(self, receive: Receive) -> Receive:
        """A chunked body without Content-Length is counted as it arrives (FastAPI turns this into a 413)."""
        received = 0

        async def receive_limited() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body_bytes:
                raise HTTPException(413, self._too_large)
            return message

        return receive_limited


class JsonLogFormatter(logging.Formatter):
    """One JSON object a line, with the request id, so logs can be searched by request."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name,
                 "request_id": REQUEST_ID.get(), "message": record.getMessage()}
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return JSON_ENCODER.encode(entry)


access_logger = logging.getLogger("agent_app.access")


def configure_logging(level: str) -> None:
    """Give the service's logger a JSON handler of its own; uvicorn configures only its own loggers."""
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(JsonLogFormatter())
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level)


class CollectorTuning:
    """Two changes to the cyclic garbage collector while the service runs (timed with gc.callbacks over
    3,000 turns at C=16; the effect on bench/run.py is in bench/README.md):

    - freeze: the ~200,000 objects alive after startup (Gradio's mostly) stay out of its scans; before,
      every full collection walked them all (~70 ms each, ~0.07 ms of CPU per agent turn);
    - a young generation of 10,000 objects, not 700: a turn's objects are freed by reference counting,
      so the collector ran every ~7 turns for next to nothing (~0.04 ms a turn; at 10,000 it did not run).
    Garbage is collected before the freeze, so none is kept. The collector is the process's, not an app's:
    the first app to start tunes it and the last to stop restores it, so two apps in one process (tests,
    an embedding server) do not undo each other.
    """

    def __init__(self) -> None:
        self._running_apps = 0
        self._thresholds = gc.get_threshold()

    @contextmanager
    def applied(self) -> Iterator[None]:
        if self._running_apps == 0:
            self._thresholds = gc.get_threshold()
            gc.collect()
            gc.freeze()
            gc.set_threshold(YOUNG_GC_THRESHOLD, *self._thresholds[1:])
        self._running_apps += 1
        try:
            yield
        finally:
            self._running_apps -= 1
            if self._running_apps == 0:
                gc.set_threshold(*self._thresholds)
                gc.unfreeze()


COLLECTOR_TUNING = CollectorTuning()


def create_app(settings: Settings | None = None, *, transport: httpx.AsyncBaseTransport | None = None) -> FastAPI:
    """Build the service; tests pass their own settings and an httpx transport (e.g. respx's)."""
    settings = settings or load_settings()
    configure_logging(settings.log_level)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        limits = httpx.Limits(max_connections=settings.vllm_max_concurrency + 16, max_keepalive_connections=100)
        vllm_transport = transport or AiohttpTransport(limits=limits)
        async with (
            ConversationStore.open(settings.database_url, lease_s=settings.turn_timeout_s + 60) as store,
            httpx.AsyncClient(transport=vllm_transport, timeout=vllm_timeout(settings), limits=limits) as http,
        ):
            app.state.agent = Agent(VLLMClient(http, vllm_transport, settings), REGISTRY, store, settings)
            if settings.api_key is None:
                logger.warning("API_KEY is not set: /api/v1 and /ui are open to anyone who can reach this port")
            with COLLECTOR_TUNING.applied():
                yield

    app = FastAPI(title="vLLM Agent Service", version="1.0.0", lifespan=lifespan,
                  description="A tool-using agent on a self-hosted vLLM server: REST, SSE and a Gradio page.")
    app.state.settings = settings
    app.state.api_key = settings.api_key.get_secret_value().encode() if settings.api_key else None
    app.add_middleware(CORSMiddleware, allow_origins=settings.allowed_origins,
                       allow_credentials="*" not in settings.allowed_origins,
                       allow_methods=["GET", "POST", "DELETE"], allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(RequestContextMiddleware, max_body_bytes=6 * settings.max_content_chars + 65_536)
    app.add_exception_handler(AgentError, agent_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.include_router(router)
    app.include_router(open_router)

    @app.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse("/ui")

    mount_ui(app, settings)
    return app


app = create_app()

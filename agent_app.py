"""vLLM agent service: REST, SSE, a Gradio page and an OpenAI-compatible API over one tool-using agent.

  1. Settings     Settings: env vars and .env, validated at startup
  2. Errors       the AgentError tree below; each class carries its HTTP status
  3. Schemas      request/response bodies, stream events, FunctionCall (one tool call, wire to history)
  4. Parsing      pure functions: model text -> thinking, answer and calls (Hermes JSON, Qwen3 XML); arguments
  5. vLLM client  VLLMClient: one POST, retried; transport errors translated here; one marked hot path
  6. Memory       ConversationStore: Core tables, leases, one transaction per batch of finished turns and of
                  runs' events
  7. Agent        Agent.run_turn(): the loop, an async generator of events that every route consumes;
                  Run and RunRegistry: a streamed turn owned by the service, its events logged for resume
  8. API          auth, request context, error handlers, the /api/v1 routes (runs included) and SSE framing
  9. OpenAI API   /v1/models and /v1/chat/completions: the agent as a model for OpenAI clients and chat UIs
  10. App         create_app(): the lifespan (store, vLLM client, MCP servers, runs), middleware, routers, the page

  One POST /api/v1/chat, to read first: chat() -> Agent.open_turn (the conversation's lease) -> Agent.run_turn
  (the loop) -> Agent._call_model -> VLLMClient.complete -> ReplySplitter -> Agent._run_tools -> the tools'
  ToolRegistry.run -> ConversationStore.commit_turn (one transaction) -> the `done` event as the response.

  AgentError 500
  ├── ClientError 400: Unauthorized 401, ConversationNotFound 404, RunNotFound 404, ModelNotFound 404,
  │   │                ConversationBusy 409, RunFinished 409, ContentTooLarge 413, ContextTooLong 413,
  │   │                InvalidCursor 422, RunCancelled 499
  │   └── InvalidChatRequest 422 (an OpenAI chat request's messages) ── UnsupportedRequest 400
  ├── LLMError 502 ── LLMTimeout 504 ── TurnTimeout 504
  ├── VLLMBusy 503 (Retry-After) · StoreUnavailable 503 (Retry-After) · RunInterrupted 503
  └── ToolExecutionError 500
"""

import asyncio
import base64
import gc
import hmac
import html
import json
import logging
import math
import re
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal, Self, TypeVar

import httpx
from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Query, Request, Response
from fastapi import Path as FastAPIPath
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, RedirectResponse, StreamingResponse
from fastapi.security import HTTPBearer
from fastapi.sse import KEEPALIVE_COMMENT, EventSourceResponse, format_sse_event
from httpx_aiohttp import AiohttpTransport
from pydantic import BaseModel, ConfigDict, Field, SecretStr, TypeAdapter, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import event as sqlalchemy_event
from sqlalchemy import inspect
from sqlalchemy.engine import Connection, Engine, create_engine, make_url
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.schema import Column, ForeignKey, Index, MetaData, Table
from sqlalchemy.sql import and_, bindparam, delete, insert, or_, select, update
from sqlalchemy.sql import text as sql_text
from sqlalchemy.types import JSON, Boolean, Float, Integer, String, Text
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tools import REGISTRY, McpServers, McpServerStatus, ToolRegistry, ToolResult
from ui import mount_ui

logger = logging.getLogger("agent_app")
access_logger = logging.getLogger("agent_app.access")
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
    thinking: Literal["auto", "on", "off"] = "auto"  # auto: the chat template decides
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
    agent_model_name: str = Field(default="vllm-agent", min_length=1, max_length=200)
    agent_tool_display: Literal["details", "markdown", "none"] = "details"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    mcp_servers: Path | None = None
    run_retention_s: float = Field(default=3600.0, ge=0)

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


class ClientError(AgentError):
    """The request cannot be served as it is; sending it again unchanged will not help."""
    status_code = 400


class Unauthorized(ClientError):
    """API_KEY is set and the request did not carry it."""
    status_code = 401
    headers = {"WWW-Authenticate": "Bearer"}  # noqa: RUF012 - constant header of every 401


class ConversationNotFound(ClientError):
    """The conversation id is unknown (or was deleted)."""
    status_code = 404


class ConversationBusy(ClientError):
    """Another turn of the same conversation is still running."""
    status_code = 409


class RunNotFound(ClientError):
    """The run id is unknown, or its events were removed RUN_RETENTION_S after it ended."""
    status_code = 404


class RunFinished(ClientError):
    """A cancel came for a run that has already ended; nothing changed."""
    status_code = 409


class RunCancelled(ClientError):
    """The run was cancelled on request (the last event of its stream); 499 as nginx's "client closed request"."""
    status_code = 499


class ContentTooLarge(ClientError):
    """The user message is longer than MAX_CONTENT_CHARS."""
    status_code = 413


class ContextTooLong(ClientError):
    """The prompt does not fit the model's context window, even with the oldest turns left out."""
    status_code = 413


class InvalidCursor(ClientError):
    """A pagination cursor that this service did not hand out."""
    status_code = 422


class InvalidChatRequest(ClientError):
    """A chat request whose messages cannot make a turn (the last not from the user, empty, NUL, a bad id): 422, as
    /api/v1 answers the same mistakes."""
    status_code = 422

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class UnsupportedRequest(InvalidChatRequest):
    """A chat request this endpoint cannot honour (n > 1, logprobs, images, a forced tool call, ...)."""
    status_code = 400


class ModelNotFound(ClientError):
    """The request names a model other than the agent."""
    status_code = 404
    code = "model_not_found"


class LLMError(AgentError):
    """vLLM was unreachable, answered with an error, or sent a reply we cannot read."""
    status_code = 502


class LLMTimeout(LLMError):
    """vLLM did not answer within the configured time."""
    status_code = 504


class TurnTimeout(LLMTimeout):
    """A whole turn took longer than TURN_TIMEOUT_S."""


class VLLMBusy(AgentError):
    """Every slot toward vLLM stayed taken for VLLM_QUEUE_TIMEOUT_S; the client should retry later."""
    status_code = 503

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.headers = {"Retry-After": str(retry_after_s)}


class StoreUnavailable(AgentError):
    """The database that keeps the conversations cannot be reached; the client should retry later."""
    status_code = 503
    headers = {"Retry-After": "5"}  # noqa: RUF012 - constant header of every such 503


class RunInterrupted(AgentError):
    """The process that ran the run died (crash, kill -9, deploy) before it ended; the turn was not stored."""
    status_code = 503


class ToolExecutionError(AgentError):
    """A tool failed in a way that cannot be handed back to the model."""
    status_code = 500


# --- 3. Schemas ---

CONVERSATION_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
StopReason = Literal["completed", "max_steps", "loop_detected", "length"]


class ChatRequest(BaseModel):
    """One user message; without `conversation_id` a new conversation starts."""
    model_config = ConfigDict(extra="forbid")

    content: str = Field(min_length=1, max_length=1_000_000, description="The user's message.")
    conversation_id: str | None = Field(
        default=None,
        pattern=CONVERSATION_ID_PATTERN,
        description="Id returned by an earlier turn; null starts a new conversation.",
    )
    thinking: bool | None = Field(default=None, description="Let a thinking model think first (true) or not "
                                  "(false) in this turn; null follows the service's THINKING setting.")
    on_disconnect: Literal["cancel", "continue"] = Field(
        default="cancel", description="/chat/stream only: what a dropped connection does to the run: cancel it "
        "(nothing stored), or let it run to its end (stored as usual; resume with /runs/{run_id}/events).")

    @field_validator("content")
    @classmethod
    def _storable(cls, value: str) -> str:
        """Not blank, and no NUL (PostgreSQL text cannot hold one: refused here, not when the turn is stored)."""
        if not value.strip():
            raise ValueError("must not be empty or only whitespace")
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
    """Token counts of one vLLM call, or summed over every call of a turn."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    def __add__(self, other: "Usage") -> "Usage":
        return Usage(prompt_tokens=self.prompt_tokens + other.prompt_tokens,
                     completion_tokens=self.completion_tokens + other.completion_tokens,
                     total_tokens=self.total_tokens + other.total_tokens)


class ChatResponse(BaseModel):
    """The outcome of one turn; stop_reason "length": the last step was cut at the token limit."""
    conversation_id: str
    content: str
    reasoning: str | None = Field(default=None, description="The turn's thinking, steps set off by a blank line.")
    tool_calls: list[ToolCallRecord] | None = None
    usage: Usage | None = None
    stop_reason: StopReason = "completed"


class ReasoningEvent(BaseModel):
    """A piece of the model's thinking, streamed before that step's tokens or tool calls."""
    type: Literal["reasoning"] = "reasoning"
    content: str


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


StreamEvent = ReasoningEvent | TokenEvent | ToolCallEvent | ToolResultEvent | DoneEvent | ErrorEvent
RunStatus = Literal["running", "completed", "failed", "cancelled", "interrupted"]


class RunEvent(BaseModel):
    """The first event of a run's stream: where to resume it (/api/v1/runs/{run_id}/events)."""
    type: Literal["run"] = "run"
    run_id: str
    conversation_id: str


RUN_STREAM_EVENT: TypeAdapter["RunEvent | StreamEvent"] = TypeAdapter(
    Annotated[RunEvent | StreamEvent, Field(discriminator="type")])  # a logged event's JSON back into its model


class RunInfo(BaseModel):
    """A run: one streamed turn, owned by the service; times are Unix seconds; `done` or `error` once it ended."""
    id: str
    conversation_id: str
    status: RunStatus
    created_at: float
    finished_at: float | None = None
    done: ChatResponse | None = None
    error: ErrorEvent | None = None


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
    reasoning: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    usage: dict[str, int] | None = None
    created_at: float


class ConversationDetail(ConversationSummary):
    """A conversation with its messages in order, and the id of its run in progress, if one is."""
    messages: list[StoredMessage]
    run_id: str | None = None


class ConversationPage(BaseModel):
    """One page of conversations, newest first; pass `next_cursor` back as `cursor` for the next."""
    conversations: list[ConversationSummary]
    next_cursor: str | None


class ErrorBody(BaseModel):
    """Every error response."""
    detail: str


class ToolInfo(BaseModel):
    """A tool the agent can call; `source` is "builtin" or "mcp:<server>"."""
    name: str
    description: str
    parameters: dict[str, Any]
    source: str


class VLLMStatus(BaseModel):
    """What the service knows about its vLLM server."""
    url: str
    reachable: bool
    model: str
    tool_call_format: Literal["native", "hermes"]


class DatabaseStatus(BaseModel):
    """Whether the conversation store answers; its kind, never its URL (/health needs no API key)."""
    kind: Literal["SQLite", "PostgreSQL"]
    reachable: bool


class Health(BaseModel):
    """Liveness of the service, reachability of vLLM, the database and each MCP server (`degraded` if one is down)."""
    status: Literal["ok", "degraded"]
    vllm: VLLMStatus
    database: DatabaseStatus
    mcp: dict[str, McpServerStatus]



def new_call_id() -> str:
    """A tool-call id as vLLM 0.33 writes them (16 hex digits), for calls that arrive without one."""
    return f"chatcmpl-tool-{secrets.token_hex(8)}"


@dataclass(frozen=True, slots=True)
class FunctionCall:
    """One tool call, from vLLM's reply (or the model's text) to the stored history.

    `error` says why the call could not be read; the model is told instead of a tool being run. The id is
    left out of comparisons: a call read from text gets a fresh one.
    """

    name: str
    arguments: dict[str, Any]
    error: str | None = None
    id: str = field(default_factory=new_call_id, compare=False)

    @classmethod
    def from_wire(cls, call_id: str | None, name: str, arguments: str) -> Self:
        """A call vLLM parsed itself, its arguments still the JSON text it sent."""
        call_id = call_id or new_call_id()
        try:
            return cls(name, decode_arguments(arguments), id=call_id)
        except ValueError as exc:
            return cls(name, {}, f"the arguments are not valid JSON ({exc})", id=call_id)

    def wire(self) -> dict[str, Any]:
        """The call as vLLM expects it in history: arguments always a valid JSON string."""
        arguments = json.dumps(self.arguments, ensure_ascii=False)
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": arguments}}


# --- 4. Parsing ---
# What Qwen models write when the server leaves the text alone: thinking as `<think>…</think>`, or ending in
# `</think>` with no opening tag (Qwen3.5+, whose template opens it); Hermes JSON calls (Qwen2.5, Qwen3); XML calls
# (Qwen3-Coder, Qwen3.5+) read as vLLM 0.33's `qwen3_coder` parser reads them and typed by the tool's JSON Schema.

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
FUNCTION_OPEN = "<function="
FUNCTION_CLOSE = "</function>"
CALL_OPENERS = (TOOL_CALL_OPEN, FUNCTION_OPEN)  # vLLM's qwen3 grammar starts a call at either
MAX_ARGUMENTS_DEPTH = 64  # deeper arguments could not even be echoed back in an event (pydantic stops near 250)

CALL_START = re.compile(r"<tool_call>|<function=")
WHITESPACE = re.compile(r"\s*")
HERMES_PIECE_END = re.compile(r"</tool_call>|<tool_call>|<function=|\Z")
BLOCK_END = re.compile(r"</tool_call>|\Z")
FUNCTION_NAME_END = re.compile(r">|</function>|</tool_call>|<tool_call>|<function=|\Z")
FUNCTION_BODY_END = re.compile(r"</function>|<function=|\Z")  # a `<tool_call>` in a value is text, as in vLLM
# vLLM's _PARAM_RE, except that a parameter name stops at `<` too: with `[^>]*` a text of many unclosed
# `<parameter=` takes quadratic time.
XML_PARAMETER = re.compile(
    r"<\s*parameter\s*=\s*([^<>]*)>(.*?)(?:<\s*/\s*parameter\s*>|(?=<\s*parameter\s*=))", re.DOTALL
)
TOOL_NAME_IN_TEXT = re.compile(r'"name"\s*:\s*"([^"\\]{1,100})"')
JSON_DECODER = json.JSONDecoder()

# vLLM's _TYPE_ALIASES and its order of trial (coerce_to_schema_type in vllm/tool_parsers/utils.py)
TYPE_ALIASES = {
    "str": "string", "text": "string", "varchar": "string", "char": "string", "enum": "string",
    "int": "integer", "int32": "integer", "int64": "integer", "uint": "integer", "uint32": "integer",
    "uint64": "integer", "long": "integer", "short": "integer", "unsigned": "integer",
    "float": "number", "float32": "number", "float64": "number", "double": "number",
    "bool": "boolean", "dict": "object", "arr": "array", "list": "array", "sequence": "array",
}
TYPE_ORDER = ("null", "integer", "number", "boolean", "object", "array", "string")
ENUM_VALUE_TYPES = ((type(None), "null"), (bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"),
                    (list, "array"), (dict, "object"))  # bool before int: True is an int too


def loads_json(text: str | bytes) -> Any:
    """json.loads whose only failure is ValueError: JSON nested too deep for Python's parser is invalid too."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def json_closers(text: str) -> str:
    """The closers a truncated JSON text is missing: a `"` first when it ends inside a string."""
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
    return ('"' if in_string else "") + "".join(reversed(stack))


def close_json(text: str) -> str:
    """Append the closers a truncated JSON text is missing (vLLM streams sometimes drop a `}`)."""
    return text + json_closers(text)


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


def check_depth(arguments: dict[str, Any]) -> dict[str, Any]:
    """The arguments, or ValueError when they nest deeper than an event could carry them."""
    if nesting_depth(arguments) > MAX_ARGUMENTS_DEPTH:
        raise ValueError(f"arguments nest more than {MAX_ARGUMENTS_DEPTH} levels deep")
    return arguments


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
    return check_depth(raw)


def read_call_object(payload: Any) -> FunctionCall:
    """One Hermes `{"name": ..., "arguments": ...}` object (Qwen sometimes writes "parameters")."""
    if not isinstance(payload, dict) or not isinstance(payload.get("name"), str):
        return FunctionCall("", {}, 'a tool call must be a JSON object with a "name" string')
    raw = payload["arguments"] if "arguments" in payload else payload.get("parameters")
    try:
        return FunctionCall(payload["name"], decode_arguments(raw))
    except ValueError as exc:
        return FunctionCall(payload["name"], {}, f"the arguments are not a valid JSON object ({exc})")


def read_hermes_objects(piece: str) -> list[FunctionCall]:
    """The Hermes JSON object(s) in one piece of a `<tool_call>` block; text that does not decode is repaired, or
    becomes an error call."""
    calls: list[FunctionCall] = []
    pos = WHITESPACE.match(piece).end()
    while pos < len(piece):
        try:
            payload, pos = JSON_DECODER.raw_decode(piece, pos)
        except (ValueError, RecursionError):
            rest, pos = piece[pos:].rstrip(), len(piece)
            try:
                payload = loads_lenient(rest)
            except ValueError as exc:
                guess = TOOL_NAME_IN_TEXT.search(rest)
                calls.append(FunctionCall(guess.group(1) if guess else "", {},
                                      f"the tool call is not valid JSON ({exc}); send it again"))
                break
        calls.append(read_call_object(payload))
        pos = WHITESPACE.match(piece, pos).end()
    return calls


def hermes_piece_end(text: str, pos: int) -> int:
    """Where the Hermes JSON from pos ends at the latest: at the next tag, or, when that tag opens a call inside
    a JSON string, at the block's `</tool_call>`. Decoding a piece at a time keeps hostile text linear."""
    tag = HERMES_PIECE_END.search(text, pos)
    if tag.group() in CALL_OPENERS and json_closers(text[pos : tag.start()]).startswith('"'):
        return BLOCK_END.search(text, tag.start()).start()
    return tag.start()


def json_type(value: Any) -> str | None:
    """The JSON type of an enum value, as vLLM names it (None for a value of no JSON type)."""
    return next((name for kind, name in ENUM_VALUE_TYPES if isinstance(value, kind)), None)


def schema_types(schema: Any) -> set[str]:
    """The JSON types a schema allows, from `type`, `enum` values and anyOf/oneOf/allOf (vLLM's
    extract_types_from_schema); a schema that names none allows a string."""
    if not isinstance(schema, dict):
        return {"string"}
    types: set[str] = set()
    declared = schema.get("type")
    types.update(t for t in (declared if isinstance(declared, list) else [declared]) if isinstance(t, str))
    if isinstance(schema.get("enum"), list):
        types.update(kind for kind in map(json_type, schema["enum"]) if kind)
    for choice in ("anyOf", "oneOf", "allOf"):
        if isinstance(schema.get(choice), list):
            for option in schema[choice]:
                types |= schema_types(option)
    return types or {"string"}


def json_finite(value: Any) -> bool:
    """Whether a decoded value can be written back as JSON (json.loads reads 1e999 as inf)."""
    try:
        json.dumps(value, allow_nan=False)
    except (ValueError, RecursionError):
        return False
    return True


def read_as_type(value: str, kind: str) -> tuple[bool, Any]:
    """Try to read a parameter's text as one JSON type, exactly as vLLM's coerce_to_schema_type does."""
    if kind == "null":
        return value.lower() == "null", None
    if kind in ("integer", "number"):
        try:
            return True, int(value)
        except ValueError:
            if kind == "integer":
                return False, None
        try:
            number = float(value)
        except ValueError:
            return False, None
        return math.isfinite(number), (int(number) if number.is_integer() else number)
    if kind == "boolean":
        word = value.lower().strip()
        return word in ("true", "1", "false", "0"), word in ("true", "1")
    if kind in ("object", "array"):
        try:
            parsed = loads_json(value)
        except ValueError:
            return False, None
        return json_finite(parsed), parsed
    return kind == "string", value


def coerce_value(value: str, types: set[str]) -> Any:
    """A parameter's text as the first type in vLLM's order that reads it; else its JSON value, else the text."""
    wanted = {TYPE_ALIASES.get(kind.strip().lower(), kind.strip().lower()) for kind in types}
    for kind in TYPE_ORDER:
        if kind in wanted and (read := read_as_type(value, kind))[0]:
            return read[1]
    try:
        parsed = loads_json(value)
    except ValueError:
        return value
    return parsed if json_finite(parsed) else value


def trim_wrapping_newlines(value: str) -> str:
    """A parameter value without the one leading and one trailing newline that the template writes around it."""
    return value.removeprefix("\n").removesuffix("\n")


def xml_call(name: str, body: str, schemas: Mapping[str, dict[str, Any]]) -> FunctionCall:
    """One XML call from its `<parameter=…>` body, each value typed by the tool's schema for it; a value with no
    schema (unknown tool or parameter) stays a string. A string inside an object value stays a string too: vLLM
    0.33 applies nested `properties`/`items` only to values that are already objects, never to parsed text."""
    properties = (schemas.get(name) or {}).get("properties") or {}
    arguments: dict[str, Any] = {}
    for parameter in XML_PARAMETER.finditer(body):
        key, value = parameter.group(1), trim_wrapping_newlines(parameter.group(2))
        schema = properties.get(key)
        arguments[key] = coerce_value(value, schema_types(schema)) if isinstance(schema, dict) else value
    try:
        return FunctionCall(name, check_depth(arguments))
    except ValueError as exc:
        return FunctionCall(name, {}, f"the arguments are not a valid JSON object ({exc})")


def read_function(text: str, pos: int, schemas: Mapping[str, dict[str, Any]]) -> tuple[list[FunctionCall], int]:
    """The XML call whose name starts at pos (just after `<function=`), and where reading goes on.

    As in vLLM's grammar, the name ends at `>`, or, unclosed, at the next tag (#58227); the body ends at
    `</function>` or at the next `<function=`. A call with no name is dropped.
    """
    name_end = FUNCTION_NAME_END.search(text, pos)
    name, body, end = text[pos : name_end.start()].strip(), "", name_end
    if name_end.group() == ">":
        end = FUNCTION_BODY_END.search(text, name_end.end())
        body = text[name_end.end() : end.start()]
    resume = end.start() if end.group() in CALL_OPENERS else end.end()
    return ([xml_call(name, body, schemas)] if name else []), resume


def read_block(text: str, pos: int) -> tuple[list[FunctionCall], int]:
    """The Hermes calls of the `<tool_call>` block whose body starts at pos, and where reading goes on.

    Several JSON objects may share a block; an XML call or a new `<tool_call>` inside it is left to the caller.
    """
    calls: list[FunctionCall] = []
    while (pos := WHITESPACE.match(text, pos).end()) < len(text):
        if text.startswith(CALL_OPENERS, pos):
            break
        if text.startswith(TOOL_CALL_CLOSE, pos):
            return calls, pos + len(TOOL_CALL_CLOSE)
        end = hermes_piece_end(text, pos)
        calls.extend(read_hermes_objects(text[pos:end]))
        pos = end
    return calls, pos


def parse_tool_calls(text: str, schemas: Mapping[str, dict[str, Any]]) -> tuple[str, list[FunctionCall]]:
    """The text before the first tool-call markup, and the calls in order, Hermes JSON and XML alike.

    `schemas` maps a tool's name to its `parameters` JSON Schema, which types XML values. Text between and
    after calls is dropped, as vLLM drops it.
    """
    first = CALL_START.search(text)
    if first is None:
        return text, []
    calls: list[FunctionCall] = []
    pos = first.start()
    while tag := CALL_START.search(text, pos):
        if tag.group() == FUNCTION_OPEN:
            found, pos = read_function(text, tag.end(), schemas)
        else:
            found, pos = read_block(text, tag.end())
        calls.extend(found)
    return text[: first.start()], calls


SPLIT_TAGS = (THINK_OPEN, THINK_CLOSE, *CALL_OPENERS)
SPLIT_TAG = re.compile(f"({'|'.join(map(re.escape, SPLIT_TAGS))})")  # a group, so that re.split keeps the tags


def cut_at_tags(text: str) -> tuple[list[str], str]:
    """The text in pieces, each tag a piece of its own, and its end when that may still become a tag: held back
    until more text comes. Only the last `<` can start such an end, as no tag has a second `<`."""
    pieces = SPLIT_TAG.split(text)
    start = pieces[-1].rfind("<")
    if start < 0 or not any(tag.startswith(pieces[-1][start:]) for tag in SPLIT_TAGS):
        return pieces, ""
    held = pieces[-1][start:]
    pieces[-1] = pieces[-1][:start]
    return pieces, held


class SplitMode(Enum):
    """Where the content is, which decides what its text and tags do."""

    ANSWER = "answer"  # visible text
    THOUGHT = "thought"  # thinking, shown as such
    THOUGHT_CALLS = "thought_calls"  # call markup inside a thought: hidden, kept for parsing, until </think>
    CALLS = "calls"  # call markup and all that follows it: hidden, kept for parsing


class ThoughtNewlines:
    """A thought's text as shown: without its leading newlines, and its trailing ones held until more text
    follows. A new one for each thought, so that the newlines a thought ends with are dropped."""

    def __init__(self) -> None:
        self.started = False  # the thought has shown text: its leading newlines are behind
        self.tail = ""  # newlines at the end of its text so far, held

    def shown(self, text: str) -> str:
        """What to show now of the thought's next text."""
        if not self.started:
            text = text.lstrip("\n")
            self.started = bool(text)
        body = text.rstrip("\n")
        if not body:
            self.tail += text
            return ""
        shown, self.tail = self.tail + body, text[len(body) :]
        return shown


class AnswerLead:
    """An answer's text as shown: the whitespace before its first text is held, as a `<think>` may still follow
    it, and shown after a thought without its newlines. A new one for the answer after each thought."""

    def __init__(self) -> None:
        self.started = False  # the answer has shown text, or call markup has started
        self.lead = ""  # whitespace before its first text, held

    def shown(self, text: str, *, after_thought: bool) -> str:
        """What to show now of the answer's next text."""
        if self.started:
            return text
        body = text.lstrip()
        self.lead += text[: len(text) - len(body)]
        if not body:
            return ""
        return self.start(after_thought=after_thought) + body

    def start(self, *, after_thought: bool) -> str:
        """The answer starts (text or call markup follows, or the reply ends): its held whitespace, to show."""
        lead = self.lead.lstrip("\n") if after_thought else self.lead
        self.started, self.lead = True, ""
        return lead


@dataclass(frozen=True, slots=True)
class SplitReply:
    """One whole reply: the thinking and the answer exactly as they were shown, the calls (the answer's, or when it
    has none the thinking's), and whether the reply ended inside a thought that no `</think>` nor call closed."""

    reasoning: str
    content: str
    calls: list[FunctionCall]
    thought_open: bool


class ReplySplitter:
    """Splits one model reply, fed delta by delta or whole, into thinking, visible answer and tool calls.

    feed() returns what is safe to show now. No part of a `<think>`, `</think>`, `<tool_call>` or `<function=`
    tag is ever shown: a possible tag prefix at the end of a piece waits for the next piece. Call markup and
    all after it is hidden and kept for parsing, as vLLM drops text after calls.

    - The server's `reasoning` is thinking. Once it has sent some, `<think>` and `</think>` in `content` are
      dropped (vLLM 0.33 absorbs them) and `content` is the answer.
    - In `content`, a leading `<think>` (after optional whitespace) opens a thought and `</think>` closes it;
      with `in_thought` (the prompt opened the thought) the content starts inside one. Later think tags are
      dropped.
    - Call markup in a thought hides the rest of that thought and closes it as vLLM's grammar does (not cut
      off); its calls run only when the answer has none (Qwen3.x writes calls in its thought, vllm#39056).
    - A `</think>` with no thought before it makes the text of the same feed() before it thinking, since it
      was not returned yet: a whole reply fed at once splits right; a stream cannot take back what it showed.
    - Whitespace: a thought is shown without its leading and trailing newlines, the answer after a thought
      without its leading newlines, and whitespace before a leading `<think>` not at all. The rest of the
      answer passes through unchanged.
    """

    def __init__(self, schemas: Mapping[str, dict[str, Any]], *, in_thought: bool) -> None:
        self._schemas = schemas
        self._in_thought = in_thought  # the content, when it comes, starts inside a thought
        self._mode = SplitMode.ANSWER  # where the content is
        self._reasoning_calls = False  # call markup has started in the server's reasoning: the rest is markup
        self._held = self._reasoning_held = ""  # a possible tag at the end of the content and of the reasoning
        self._thought_seen = False  # a thought has ended or the server sent reasoning: think tags are dropped
        self._thought = ThoughtNewlines()
        self._answer = AnswerLead()
        self._new: tuple[list[str], list[str]] = ([], [])  # thinking and answer not returned yet
        self._shown: tuple[list[str], list[str]] = ([], [])  # thinking and answer returned
        self._answer_calls: list[str] = []  # call markup in the answer and all that follows it
        self._thought_calls: list[str] = []  # call markup in the thinking

    def feed(self, reasoning: str, content: str) -> tuple[str, str]:
        """One delta's `reasoning` and `content` -> the (thinking, answer) text to show now."""
        if reasoning:
            self._thought_seen = True
            pieces, self._reasoning_held = cut_at_tags(self._reasoning_held + reasoning)
            for piece in pieces:
                self._reasoning_piece(piece)
        if content:
            if self._in_thought and not self._thought_seen:
                self._mode = SplitMode.THOUGHT
            self._in_thought = False
            pieces, self._held = cut_at_tags(self._held + content)
            for piece in pieces:
                self._content_piece(piece)
        return self._release()

    def flush(self) -> tuple[str, str]:
        """End of the reply: what was held back is kept when call markup, shown when a lone `<`, else dropped."""
        if self._reasoning_held == "<" or self._reasoning_calls:
            self._reasoning_piece(self._reasoning_held)
        if self._held == "<" or self._mode in (SplitMode.THOUGHT_CALLS, SplitMode.CALLS):
            self._content_piece(self._held)
        self._held = self._reasoning_held = ""
        if self._answer.lead:
            self._new[1].append(self._answer.start(after_thought=self._thought_seen))
        self._thought = ThoughtNewlines()  # a thought still open shows no more: its held newlines are dropped
        return self._release()

    def finish(self) -> SplitReply:
        """The whole reply, flushed first (so flush() before, when the tail is to be shown)."""
        self.flush()
        thinking, answer = ("".join(pieces) for pieces in self._shown)
        calls = parse_tool_calls("".join(self._answer_calls), self._schemas)[1]
        calls = calls or parse_tool_calls("".join(self._thought_calls), self._schemas)[1]
        return SplitReply(thinking, answer, calls, self._mode is SplitMode.THOUGHT)

    def _release(self) -> tuple[str, str]:
        """What this call made showable, now part of what was shown."""
        thinking, answer = "".join(self._new[0]), "".join(self._new[1])
        self._shown[0].append(thinking)
        self._shown[1].append(answer)
        self._new = ([], [])
        return thinking, answer

    def _reasoning_piece(self, piece: str) -> None:
        """A text or tag of the server's thinking: think tags are dropped, call markup and all after it kept."""
        if piece in CALL_OPENERS and not self._reasoning_calls:
            self._reasoning_calls, self._thought = True, ThoughtNewlines()
        if self._reasoning_calls:
            self._thought_calls.append(piece)
        elif piece not in (THINK_OPEN, THINK_CLOSE):
            self._new[0].append(self._thought.shown(piece))

    def _content_piece(self, piece: str) -> None:
        """A text or tag of the content, acted on in the mode the content is in."""
        if self._mode is SplitMode.CALLS:
            self._answer_calls.append(piece)
        elif self._mode is SplitMode.THOUGHT_CALLS and piece != THINK_CLOSE:
            self._thought_calls.append(piece)
        elif piece in CALL_OPENERS:
            self._start_calls()
            self._content_piece(piece)  # as call markup now
        elif piece == THINK_OPEN:
            if self._mode is SplitMode.ANSWER and not self._answer.started and not self._thought_seen:
                self._mode, self._answer = SplitMode.THOUGHT, AnswerLead()  # the whitespace before it is dropped
        elif piece == THINK_CLOSE:
            self._close_thought()
        elif self._mode is SplitMode.THOUGHT:
            self._new[0].append(self._thought.shown(piece))
        else:
            self._new[1].append(self._answer.shown(piece, after_thought=self._thought_seen))

    def _start_calls(self) -> None:
        """Call markup starts: in a thought it hides the rest of the thought, in the answer all that follows."""
        if self._mode is SplitMode.THOUGHT:
            self._mode, self._thought = SplitMode.THOUGHT_CALLS, ThoughtNewlines()
        else:
            self._new[1].append(self._answer.start(after_thought=self._thought_seen))
            self._mode = SplitMode.CALLS

    def _close_thought(self) -> None:
        """A `</think>` ends the thought; with no thought before it, what the answer has not returned yet was
        thinking; after a thought it is dropped."""
        if self._mode is SplitMode.ANSWER:
            if self._thought_seen:
                return
            self._new[0].append(self._thought.shown("".join(self._new[1]) + self._answer.lead))
            self._new[1].clear()
        self._mode, self._thought_seen = SplitMode.ANSWER, True
        self._thought, self._answer = ThoughtNewlines(), AnswerLead()


# --- 5. vLLM client ---

# 0.33 clamps max_tokens instead; it refuses only a prompt that fills the window, with either message
CONTEXT_LENGTH_MESSAGE = re.compile(r"maximum context length|max_model_len|max_tokens must be at least 1",
                                    re.IGNORECASE)
DEFAULT_MAX_MODEL_LEN = 32_768
MAX_MODEL_LEN_RETRY_S = 60.0  # after a failed GET /v1/models; not once per LLM call
STREAM_CUT = "vLLM's stream ended before [DONE]"
AUTO_TOOL_CHOICE_MESSAGE = re.compile(r"auto\W+tool choice requires --enable-auto-tool-choice")
REQUEST_ECHO = re.compile(r"""['"]input['"]\s*:""")  # where vLLM's validation errors start repeating the body


class NoToolParser(Exception):
    """Internal signal, not an API error: vLLM was started without `--enable-auto-tool-choice`."""


@dataclass(frozen=True, slots=True)
class Completion:
    """One chat completion: the server's thinking (with a reasoning parser), the text, the calls it parsed, why it
    stopped ("length": cut at the token limit) and the token counts."""
    reasoning: str
    content: str
    tool_calls: list[FunctionCall]
    finish_reason: str | None
    usage: Usage | None


def reasoning_of(message: dict[str, Any]) -> str:
    """vLLM 0.33's `reasoning`, or `reasoning_content` from servers before 2026-01-30."""
    return message.get("reasoning") or message.get("reasoning_content") or ""


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


def error_for_status(status: int, body: bytes) -> Exception:
    """Map a non-200 vLLM answer to the error the agent acts on."""
    message = upstream_error_message(body)
    if status == 400 and CONTEXT_LENGTH_MESSAGE.search(message):
        return ContextTooLong(f"the conversation is too long for the model: {message}")
    if status == 400 and AUTO_TOOL_CHOICE_MESSAGE.search(message):
        return NoToolParser(message)
    if status == 503:  # 0.33's admission control, after our retries: the client may retry later
        return VLLMBusy(f"vLLM is busy: {message}", retry_after_s=1)
    return LLMError(f"vLLM answered {status}: {message}")


def read_usage(payload: Any) -> Usage | None:
    """Token counts from a `usage` object, or None when vLLM sent none."""
    if not isinstance(payload, dict):
        return None
    prompt, completion = int(payload.get("prompt_tokens") or 0), int(payload.get("completion_tokens") or 0)
    return Usage(prompt_tokens=prompt, completion_tokens=completion,
                 total_tokens=int(payload.get("total_tokens") or prompt + completion))


def read_completion(body: bytes) -> Completion:
    """Turn a non-streaming response body into a Completion, whatever extra keys the version adds."""
    try:
        payload = loads_json(body)
        choice = payload["choices"][0]
        message = choice["message"]
        calls = [FunctionCall.from_wire(call.get("id"), call["function"]["name"],
                                        call["function"].get("arguments") or "")
                 for call in message.get("tool_calls") or []]
        return Completion(reasoning_of(message), message.get("content") or "", calls, choice.get("finish_reason"),
                          read_usage(payload.get("usage")))
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise LLMError("vLLM sent a reply that is not a chat completion") from exc


class StreamAssembler:
    """Rebuilds a Completion from streamed chunks: calls by index (never by id), content before calls."""

    def __init__(self) -> None:
        self.reasoning: list[str] = []
        self.content: list[str] = []
        self.calls: dict[int, list[Any]] = {}  # index -> [id, name, argument pieces]
        self.finish_reason: str | None = None
        self.usage: Usage | None = None
        self.done = False

    def feed(self, data: str) -> tuple[str, str]:
        """Take one `data:` payload; return its new (reasoning, content), content only before any tool call."""
        if data == "[DONE]":
            self.done = True
            return "", ""
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
        choice = next((choice for choice in chunk.get("choices") or () if choice.get("index", 0) == 0), None)
        return self._feed_choice(choice) if choice is not None else ("", "")

    def _feed_choice(self, choice: dict[str, Any]) -> tuple[str, str]:
        delta = choice.get("delta") or {}
        if reasoning := reasoning_of(delta):
            self.reasoning.append(reasoning)
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
            return reasoning, ""
        self.content.append(content)
        return reasoning, content

    def completion(self) -> Completion:
        calls = [FunctionCall.from_wire(call_id, name, "".join(arguments))
                 for _, (call_id, name, arguments) in sorted(self.calls.items())]
        return Completion("".join(self.reasoning), "".join(self.content), calls, self.finish_reason, self.usage)


@contextmanager
def transport_errors(url: str) -> Iterator[None]:
    """httpx's exceptions stop here: what reaches the agent is an LLMError."""
    try:
        yield
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        raise LLMError(f"vLLM is not reachable at {url}: {exc}") from exc
    except httpx.TimeoutException as exc:
        raise LLMTimeout(f"vLLM at {url} did not answer in time") from exc
    except httpx.TransportError as exc:
        raise LLMError(f"the connection to vLLM at {url} failed: {exc}") from exc


def vllm_timeout(settings: Settings) -> httpx.Timeout:
    return httpx.Timeout(settings.vllm_timeout_s, connect=settings.vllm_connect_timeout_s)


# --- hot path: chat requests are built by hand and sent to the transport (bench/README.md) ---
JSON_ENCODER = json.JSONEncoder(ensure_ascii=False)


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
    """The whole body off the transport's stream (requests ask for no content encoding)."""
    return b"".join([chunk async for chunk in response.stream])


class ChatSender:
    """POSTs chat completions straight to the shared client's transport, with every header set here.

    vLLM needs none of the client's cookie, auth, redirect and hook layers, nor its header preparation.
    """

    def __init__(self, transport: httpx.AsyncBaseTransport, settings: Settings,
                 headers: dict[str, str]) -> None:
        self._transport = transport
        self._url = httpx.URL(f"{settings.vllm_base_url}/v1/chat/completions")
        self._headers = [(b"host", self._url.netloc), (b"accept-encoding", b"identity"),
                         *((name.encode(), value.encode()) for name, value in headers.items())]
        self._timeout = {"timeout": vllm_timeout(settings).as_dict()}

    async def send(self, body: bytes) -> httpx.Response:
        headers = [*self._headers, (b"content-length", str(len(body)).encode())]
        request = httpx.Request("POST", self._url, headers=headers, stream=httpx.ByteStream(body),
                                extensions=self._timeout)
        request.read()  # a stream Request is unread until then; transports and mocks read .content
        return await self._transport.handle_async_request(request)
# --- end of hot path ---


class VLLMClient:
    """vLLM's OpenAI-compatible API: chat completions (retried, at most VLLM_MAX_CONCURRENCY at once),
    the model's context window, token counts and health."""

    def __init__(self, http: httpx.AsyncClient, transport: httpx.AsyncBaseTransport, settings: Settings) -> None:
        self._http = http
        self.base_url = settings.vllm_base_url
        self.model = settings.vllm_model
        self._headers = {"content-type": "application/json"}
        if settings.vllm_api_key is not None:
            self._headers["authorization"] = f"Bearer {settings.vllm_api_key.get_secret_value()}"
        self._sender = ChatSender(transport, settings, self._headers)
        self._slots = asyncio.Semaphore(settings.vllm_max_concurrency)
        self._queue_timeout_s = settings.vllm_queue_timeout_s
        self._retries = settings.vllm_max_retries
        self._backoff_s = settings.vllm_retry_backoff_s
        self._max_model_len: int | None = None
        self._max_model_len_asked_at: float | None = None

    async def complete(self, payload: dict[str, Any]) -> Completion:
        """One non-streaming chat completion."""
        async with self._slot():
            response = await self._post(encode_body({**payload, "model": self.model}))
            try:
                with transport_errors(self.base_url):
                    body = await read_body(response)
            finally:
                await response.aclose()
        return read_completion(body)

    async def stream(self, payload: dict[str, Any], assembler: StreamAssembler) -> AsyncIterator[tuple[str, str]]:
        """Stream a chat completion: (reasoning, content) pieces as they arrive; the reply is assembled in
        `assembler`. Lines other than `data:` (0.33's `: keep-alive` comments) are skipped."""
        request = {**payload, "model": self.model, "stream": True, "stream_options": {"include_usage": True}}
        async with self._slot():
            response = await self._post(encode_body(request))
            try:
                pending = b""
                async for chunk in response.stream:
                    *lines, pending = (pending + chunk).split(b"\n")
                    pieces = [assembler.feed(line[5:].strip().decode()) for line in lines
                              if line.startswith(b"data:") and not assembler.done]
                    reasoning, content = "".join(p[0] for p in pieces), "".join(p[1] for p in pieces)
                    if reasoning or content:
                        yield reasoning, content  # one piece per network read
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

    async def max_model_len(self) -> int:
        """The model's context window from GET /v1/models; 32768 while vLLM can't say (asked again once a minute)."""
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

    async def count_tokens(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]],
                           template_kwargs: dict[str, Any]) -> int | None:
        """Exact prompt size from vLLM's POST /tokenize (chat template applied), or None if unavailable."""
        tokenized = await self._tokenize(messages, tools, template_kwargs, token_strs=False)
        return int(tokenized["count"]) if tokenized is not None else None

    async def prompt_end(self, template_kwargs: dict[str, Any]) -> tuple[int, str] | None:
        """A one-message prompt's size and its last tokens as text (what the generation prompt opens), or None."""
        tokenized = await self._tokenize([{"role": "user", "content": "Hi"}], [], template_kwargs, token_strs=True)
        if tokenized is None:
            return None
        return int(tokenized["count"]), "".join(map(str, (tokenized.get("token_strs") or [])[-3:]))

    async def _tokenize(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]],
                        template_kwargs: dict[str, Any], *, token_strs: bool) -> dict[str, Any] | None:
        """vLLM's POST /tokenize of a chat with its generation prompt; None when it cannot answer."""
        body: dict[str, Any] = {"model": self.model, "messages": messages, "add_generation_prompt": True}
        if tools:
            body["tools"] = tools
        if template_kwargs:
            body["chat_template_kwargs"] = template_kwargs
        if token_strs:
            body["return_token_strs"] = True
        try:
            response = await self._http.post(f"{self.base_url}/tokenize", json=body, headers=self._headers)
            payload = response.json() if response.status_code == 200 else None
            return payload if isinstance(payload, dict) and int(payload["count"]) >= 0 else None
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return None

    async def is_reachable(self) -> bool:
        """True when vLLM's /health answers 200 within a second."""
        try:
            response = await self._http.get(f"{self.base_url}/health", timeout=1.0)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    @asynccontextmanager
    async def _slot(self) -> AsyncIterator[None]:
        """One of VLLM_MAX_CONCURRENCY slots, waited for at most VLLM_QUEUE_TIMEOUT_S (then 503)."""
        try:
            async with asyncio.timeout(self._queue_timeout_s):
                await self._slots.acquire()
        except TimeoutError:
            raise VLLMBusy("the service is at its limit of concurrent vLLM requests; retry shortly",
                           retry_after_s=max(1, round(self._queue_timeout_s))) from None
        try:
            yield
        finally:
            self._slots.release()

    async def _post(self, body: bytes) -> httpx.Response:
        """POST a chat completion, retrying connection errors and 5xx; the 200 response, for the caller to close."""
        attempt = 0
        while True:
            last = attempt == self._retries
            try:
                with transport_errors(self.base_url):
                    response = await self._sender.send(body)
            except LLMTimeout:
                raise
            except LLMError:
                if last:
                    raise
            else:
                if response.status_code == 200:
                    return response
                try:
                    with transport_errors(self.base_url):
                        error_body = await read_body(response)
                finally:
                    await response.aclose()
                if last or response.status_code < 500:
                    raise error_for_status(response.status_code, error_body)
            logger.info("vLLM call failed (attempt %d), retrying", attempt + 1)
            await asyncio.sleep(self._backoff_s * 2**attempt)
            attempt += 1


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
    Column("reasoning", Text),
    Column("tool_calls", JSON),
    Column("tool_call_id", String(128)),
    Column("usage", JSON),
    Column("created_at", Float, nullable=False),
)
RUNS = Table(
    "runs",
    METADATA,
    Column("id", String(64), primary_key=True),
    Column("conversation_id", String(64), nullable=False),
    Column("status", String(16), nullable=False),
    Column("owner", String(32), nullable=False),  # the registry (one a process) that runs it
    Column("heartbeat_at", Float, nullable=False),
    Column("lease", String(32)),  # the conversation's, freed when the run is found interrupted
    Column("cancel_requested", Boolean, nullable=False, default=False),
    Column("created_at", Float, nullable=False),
    Column("finished_at", Float),
    Column("result", Text),  # the final event's JSON: `done` or `error`
    Index("ix_runs_status", "status", "heartbeat_at"),
    Index("ix_runs_conversation", "conversation_id", "status"),
)
RUN_EVENTS = Table(
    "run_events",
    METADATA,
    Column("run_id", String(64), ForeignKey("runs.id"), primary_key=True),
    Column("seq", Integer, primary_key=True),
    Column("type", String(16), nullable=False),
    Column("data", Text, nullable=False),
)
TITLE_CHARS = 80
# One connection per engine: SQLite has one writer at a time, so its writes queue in the service (on the
# writer thread) rather than in SQLite's busy handler; reads go through the async engine in parallel (WAL).
SQLITE_POOL: dict[str, Any] = {"pool_size": 1, "max_overflow": 0}
SUMMARY_COLUMNS = (CONVERSATIONS.c.id, CONVERSATIONS.c.title, CONVERSATIONS.c.created_at,
                   CONVERSATIONS.c.updated_at, CONVERSATIONS.c.message_count)
# Statements built once (SQLAlchemy caches their compiled form); values come as parameters.
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
LOAD_SUMMARY = select(*SUMMARY_COLUMNS).where(CONVERSATIONS.c.id == bindparam("b_id"))
LOAD_MESSAGES = select(MESSAGES).where(MESSAGES.c.conversation_id == bindparam("b_id")).order_by(MESSAGES.c.position)
DELETE_MESSAGES = delete(MESSAGES).where(MESSAGES.c.conversation_id == bindparam("b_id"))
DELETE_CONVERSATION = delete(CONVERSATIONS).where(CONVERSATIONS.c.id == bindparam("b_id"))
RUN_IS = RUNS.c.id == bindparam("b_id")
RUN_STATUS = select(RUNS.c.status).where(RUN_IS)
RUN_LOG = (select(RUN_EVENTS.c.seq, RUN_EVENTS.c.type, RUN_EVENTS.c.data)
          .where(RUN_EVENTS.c.run_id == bindparam("b_id")))
RUN_EVENTS_AFTER = RUN_LOG.where(RUN_EVENTS.c.seq > bindparam("b_after")).order_by(RUN_EVENTS.c.seq)
LAST_RUN_EVENT = RUN_LOG.order_by(RUN_EVENTS.c.seq.desc()).limit(1)
LoggedEvent = tuple[int, str, str]  # one event of a run: its id (1, 2, ... in the run), type and JSON


@dataclass(frozen=True)
class OpenTurn:
    """A conversation reserved for one turn: its id, its stored messages, and the lease that guards it.

    A new conversation has no lease: its row is created when the turn is stored.
    """

    conversation_id: str
    history: list[dict[str, Any]]
    lease: str | None

    @property
    def is_new(self) -> bool:
        return self.lease is None


@dataclass(eq=False)  # compared by identity: the writer looks writes up in its lists
class QueuedWrite:
    """Work for the store's writer, done in its next transaction; `done` tells the caller how it went."""
    done: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future(),
                                       kw_only=True)

    def fail(self, exc: Exception) -> None:
        if not self.done.done():
            self.done.set_exception(exc)


@dataclass(eq=False)
class PendingWrite(QueuedWrite):
    """A finished turn to store, or (without messages) a lease to release."""
    turn: OpenTurn
    messages: list[dict[str, Any]] | None
    usages: list[Usage | None]


@dataclass(eq=False)
class RunWrite(QueuedWrite):
    """A run's events since its last write, with its row: all of it on the first write, its end on the last."""
    run_id: str
    events: list[dict[str, Any]]
    row: dict[str, Any] | None
    first: bool


def new_conversation_id() -> str:
    """32 hex digits: the creation time in milliseconds, then 80 random bits (UUIDv7's layout).

    Ids that grow with time are appended to the primary-key indexes instead of landing at random pages;
    80 random bits keep them unguessable.
    """
    return f"{time.time_ns() // 1_000_000:012x}{secrets.token_hex(10)}"


def storable_text(text: str | None) -> str | None:
    """PostgreSQL text cannot hold NUL; a model or a tool that emits one gets U+FFFD in its place, not a 500."""
    return text.replace("\x00", "\ufffd") if text and "\x00" in text else text


def conversation_title(messages: list[dict[str, Any]]) -> str:
    """The first line of the first user message, shortened: enough to recognise a conversation."""
    text = next((m["content"] for m in messages if m["role"] == "user"), "") or ""
    line = " ".join(text.split())
    return line if len(line) <= TITLE_CHARS else line[: TITLE_CHARS - 1] + "…"


def message_rows(turn: OpenTurn, messages: list[dict[str, Any]], usages: list[Usage | None],
                 now: float) -> list[dict[str, Any]]:
    """A turn's messages as rows of MESSAGES, numbered after the conversation's history."""
    return [
        {"conversation_id": turn.conversation_id, "position": len(turn.history) + offset, "role": message["role"],
         "content": storable_text(message.get("content")), "reasoning": storable_text(message.get("reasoning")),
         "tool_calls": message.get("tool_calls"),
         "tool_call_id": storable_text(message.get("tool_call_id")),
         "usage": usage.model_dump() if usage else None, "created_at": now}
        for offset, (message, usage) in enumerate(zip(messages, usages, strict=True))
    ]


def write_batch(conn: Connection, writes: list[QueuedWrite], now: float) -> list[QueuedWrite]:
    """Store turns, release leases and log runs' events, in queue order, in the caller's transaction.

    Returns the turns not stored because their lease was lost (expired and taken over, or the conversation
    was deleted). Releasing a lease that is already gone changes nothing; a run that a sweep ended logs no more.
    """
    lost, conversations, rows, events = [], [], [], []
    for write in writes:
        if isinstance(write, RunWrite):
            if write.first:
                conn.execute(insert(RUNS), write.row)
            elif conn.execute(update(RUNS).where(RUNS.c.id == write.run_id, RUNS.c.status == "running"),
                              write.row or {"heartbeat_at": now}).rowcount != 1:
                continue  # another worker's sweep took its process for dead and ended it: its log is closed
            events += write.events
            continue
        assert isinstance(write, PendingWrite)
        turn = write.turn
        ids = {"b_id": turn.conversation_id, "b_lease": turn.lease}
        if write.messages is None:
            conn.execute(RELEASE_LEASE, ids)
            continue
        if turn.is_new:
            conversations.append({"id": turn.conversation_id, "title": conversation_title(write.messages),
                                  "created_at": now, "updated_at": now, "message_count": len(write.messages)})
        elif conn.execute(END_TURN, {**ids, "b_now": now,
                                     "b_count": len(turn.history) + len(write.messages)}).rowcount != 1:
            lost.append(write)
            continue
        rows += message_rows(turn, write.messages, write.usages, now)
    if conversations:
        conn.execute(insert(CONVERSATIONS), conversations)
    if rows:
        conn.execute(insert(MESSAGES), rows)
    if events:
        conn.execute(insert(RUN_EVENTS), events)
    return lost


def beat_runs(conn: Connection, owner: str, now: float) -> list[str]:
    """Mark the owner's running runs alive; return those that another worker was asked to cancel."""
    mine = and_(RUNS.c.owner == owner, RUNS.c.status == "running")
    conn.execute(update(RUNS).where(mine).values(heartbeat_at=now))
    return list(conn.scalars(select(RUNS.c.id).where(mine, RUNS.c.cancel_requested)))


def sweep_runs(conn: Connection, stale_before: float, expired_before: float, now: float) -> None:
    """Runs whose process stopped beating become interrupted, with a last error event and their lease freed; runs
    that ended before `expired_before` are removed with their events."""
    stale = conn.execute(select(RUNS.c.id, RUNS.c.conversation_id, RUNS.c.lease)
                         .where(RUNS.c.status == "running", RUNS.c.heartbeat_at < stale_before)).all()
    for run in stale:
        data = ErrorEvent(status=RunInterrupted.status_code, detail=f"run {run.id} was interrupted: the service "
                          "process running it stopped; the turn was not stored").model_dump_json()
        ended = conn.execute(update(RUNS).where(RUNS.c.id == run.id, RUNS.c.status == "running")
                             .values(status="interrupted", finished_at=now, result=data))
        if ended.rowcount == 1:  # not already ended by another worker's sweep
            last = conn.scalar(LAST_RUN_EVENT, {"b_id": run.id}) or 0  # its first column: the id
            conn.execute(insert(RUN_EVENTS).values(run_id=run.id, seq=last + 1, type="error", data=data))
            conn.execute(RELEASE_LEASE, {"b_id": run.conversation_id, "b_lease": run.lease})
    conn.execute(delete(RUN_EVENTS).where(RUN_EVENTS.c.run_id.in_(
        select(RUNS.c.id).where(RUNS.c.finished_at < expired_before))))
    conn.execute(delete(RUNS).where(RUNS.c.finished_at < expired_before))


def request_cancel(conn: Connection, run_id: str) -> None:
    """Ask the run's owner to cancel it (it looks each RUN_POLL_S); 404 for an unknown run, 409 for one that ended."""
    if conn.execute(update(RUNS).where(RUN_IS, RUNS.c.status == "running").values(cancel_requested=True),
                    {"b_id": run_id}).rowcount != 1:
        status = conn.scalar(RUN_STATUS, {"b_id": run_id})
        if status is None:
            raise RunNotFound(f"run {run_id!r} not found")
        raise RunFinished(f"run {run_id!r} has already ended ({status}); there is nothing to cancel")


def run_info(run: Any) -> RunInfo:
    """A run as the API shows it, from its row or its Run; `result` is the JSON of its last event, once it ended."""
    final = json.loads(run.result) if run.result else {}
    return RunInfo(id=run.id, conversation_id=run.conversation_id, status=run.status, created_at=run.created_at,
                   finished_at=run.finished_at, done=final if final.get("type") == "done" else None,
                   error=final if final.get("type") == "error" else None)


def take_lease(conn: Connection, conversation_id: str, lease: str, now: float, expires: float) -> list[dict[str, Any]]:
    """Lease a conversation for a turn and read its history; 404 or 409 if it is not free."""
    taken = conn.execute(TAKE_LEASE, {"b_id": conversation_id, "b_now": now, "b_lease": lease, "b_expires": expires})
    if taken.rowcount != 1:
        if conn.scalar(CONVERSATION_EXISTS, {"b_id": conversation_id}) is None:
            raise ConversationNotFound(f"conversation {conversation_id!r} not found")
        raise ConversationBusy(f"conversation {conversation_id!r} is busy with another turn; "
                               "retry when that turn has finished")
    return [wire_message(row, reasoning=False) for row in conn.execute(LOAD_MESSAGES, {"b_id": conversation_id})]


def delete_rows(conn: Connection, conversation_id: str) -> None:
    conn.execute(DELETE_MESSAGES, {"b_id": conversation_id})
    if conn.execute(DELETE_CONVERSATION, {"b_id": conversation_id}).rowcount != 1:
        raise ConversationNotFound(f"conversation {conversation_id!r} not found")


def wire_message(row: Any, *, reasoning: bool) -> dict[str, Any]:
    """A stored message in vLLM's shape; its thinking only on request: Qwen3's templates want none from earlier
    turns."""
    message: dict[str, Any] = {"role": row.role, "content": row.content}
    if reasoning and row.reasoning is not None:
        message["reasoning"] = row.reasoning
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


def create_tables(conn: Connection) -> None:
    """Create missing tables, and add the columns that later versions added to a database made before them."""
    METADATA.create_all(conn)
    if "reasoning" not in {column["name"] for column in inspect(conn).get_columns("messages")}:
        conn.execute(sql_text("ALTER TABLE messages ADD COLUMN reasoning TEXT"))


def set_sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    """WAL lets readers work while a turn is written; busy_timeout makes writers queue, not fail."""
    cursor = dbapi_connection.cursor()
    for pragma in ("journal_mode=WAL", "busy_timeout=10000", "foreign_keys=ON", "synchronous=NORMAL"):
        cursor.execute(f"PRAGMA {pragma}")
    cursor.close()


class ConversationStore:
    """Conversations in SQLite or PostgreSQL (SQLAlchemy Core); one transaction per batch of finished turns.

    A turn holds a lease on its conversation (a token and an expiry in the row), so a second turn on the
    same conversation gets 409 on every worker and instance that shares the database. Writes are sync
    functions run in one transaction each: on SQLite in a single writer thread of their own (one writer is
    what SQLite allows), on PostgreSQL through the async engine.
    """

    def __init__(self, url: str, *, lease_s: float) -> None:
        sqlite = url.startswith("sqlite")
        self._engine: AsyncEngine = create_async_engine(url, **(SQLITE_POOL if sqlite else {}))
        self._lease_s = lease_s
        self._sqlite: Engine | None = None
        self._sqlite_thread: ThreadPoolExecutor | None = None
        if sqlite:
            sqlalchemy_event.listen(self._engine.sync_engine, "connect", set_sqlite_pragmas)
            self._sqlite = create_engine(self._engine.url.set(drivername="sqlite+pysqlite"), **SQLITE_POOL)
            sqlalchemy_event.listen(self._sqlite, "connect", set_sqlite_pragmas)
            self._sqlite_thread = ThreadPoolExecutor(1, "sqlite-writer")
        self.kind: Literal["SQLite", "PostgreSQL"] = "SQLite" if sqlite else "PostgreSQL"
        self._queue: list[QueuedWrite] = []
        self._writer: asyncio.Task[None] | None = None

    @property
    def write_engine(self) -> Engine:
        """The engine whose transactions store turns (for tests and instrumentation)."""
        return self._sqlite or self._engine.sync_engine

    @classmethod
    @asynccontextmanager
    async def open(cls, url: str, *, lease_s: float) -> AsyncIterator["ConversationStore"]:
        """Connect, create the tables if missing; on exit finish the queued writes and close."""
        store = cls(url, lease_s=lease_s)
        try:
            async with store._engine.begin() as conn:
                await conn.run_sync(create_tables)
            yield store
            if store._writer is not None:
                await asyncio.gather(store._writer, return_exceptions=True)  # the waiters have the errors
        finally:
            if store._sqlite_thread is not None:
                await asyncio.get_running_loop().run_in_executor(store._sqlite_thread, store.write_engine.dispose)
                store._sqlite_thread.shutdown()
            await store._engine.dispose()

    async def open_turn(self, conversation_id: str | None) -> OpenTurn:
        """Reserve a conversation for one turn (409 while another turn runs); None starts a new one."""
        if conversation_id is None:
            return OpenTurn(new_conversation_id(), [], None)
        lease, now = secrets.token_hex(16), time.time()
        taking = asyncio.ensure_future(self._write_op(take_lease, conversation_id, lease, now, now + self._lease_s))
        try:
            history = await asyncio.shield(taking)
        except asyncio.CancelledError:  # the request went away: once the lease is taken, give it back
            taking.add_done_callback(lambda _: self._release_if_taken(taking, OpenTurn(conversation_id, [], lease)))
            raise
        return OpenTurn(conversation_id, history, lease)

    def _release_if_taken(self, taking: asyncio.Future[Any], turn: OpenTurn) -> None:
        if not taking.cancelled() and taking.exception() is None:
            self._queue_write(PendingWrite(turn, None, []))

    async def commit_turn(self, turn: OpenTurn, messages: list[dict[str, Any]], usages: list[Usage | None]) -> None:
        """Store the turn's messages and end its lease, in one transaction; 409 if the lease was lost.

        Group commit: turns that finish while a write is in flight go to the database together in the next
        transaction, each still stored or refused on its own. The write runs in the store's writer task, so a
        caller that goes away while it waits does not stop it: the turn is stored whole or not at all.
        """
        await asyncio.shield(self._queue_write(PendingWrite(turn, messages, usages)))

    async def close_turn(self, turn: OpenTurn) -> None:
        """Release the lease of a turn that was not stored.

        The release queues behind the turn's own commit, if one is in flight, so it can never undo it.
        """
        if not turn.is_new:
            await asyncio.shield(self._queue_write(PendingWrite(turn, None, [])))

    async def log_run(self, write: RunWrite) -> None:
        """Log a run's events (and its row) with the next group commit."""
        await asyncio.shield(self._queue_write(write))

    async def beat_runs(self, owner: str) -> list[str]:
        return await self._write_op(beat_runs, owner, time.time())

    async def sweep_runs(self, stale_s: float, retention_s: float) -> None:
        now = time.time()
        await self._write_op(sweep_runs, now - stale_s, now - retention_s, now)

    async def request_cancel(self, run_id: str) -> None:
        await self._write_op(request_cancel, run_id)

    async def run_info(self, run_id: str) -> RunInfo:
        async with self._connect() as conn:
            row = (await conn.execute(select(RUNS).where(RUN_IS), {"b_id": run_id})).first()
        if row is None:
            raise RunNotFound(f"run {run_id!r} not found")
        return run_info(row)

    async def run_log(self, run_id: str, after: int) -> tuple[RunStatus, list[LoggedEvent]]:
        """A run's status, then its logged events after id `after`: if it had ended, they are all there."""
        async with self._connect() as conn:
            status = await conn.scalar(RUN_STATUS, {"b_id": run_id})
            if status is None:
                raise RunNotFound(f"run {run_id!r} not found")
            return status, [tuple(row) for row in await conn.execute(RUN_EVENTS_AFTER,
                                                                     {"b_id": run_id, "b_after": after})]

    async def last_run_event(self, run_id: str) -> LoggedEvent:
        """A logged run's last logged event (its first, `run`, is logged with its row)."""
        async with self._connect() as conn:
            return tuple((await conn.execute(LAST_RUN_EVENT, {"b_id": run_id})).one())

    def _queue_write(self, write: QueuedWrite) -> asyncio.Future[None]:
        self._queue.append(write)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_queued())
        return write.done

    async def _write_queued(self) -> None:
        """Write the queue batch by batch; when a batch fails, its writes one by one."""
        while self._queue:
            batch, self._queue = self._queue, []
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

    async def _write(self, batch: list[QueuedWrite]) -> None:
        lost = await self._write_op(write_batch, batch, time.time())
        for write in batch:
            if write in lost:
                write.fail(ConversationBusy(f"conversation {write.turn.conversation_id!r} was deleted or taken "
                                            "over while this turn ran; the turn was not stored"))
            elif not write.done.done():
                write.done.set_result(None)

    async def load_messages(self, conversation_id: str) -> list[dict[str, Any]]:
        """The stored messages of a conversation, oldest first, in vLLM's message shape."""
        async with self._connect() as conn:
            await self._summary(conn, conversation_id)
            return [wire_message(row, reasoning=True)
                    for row in await conn.execute(LOAD_MESSAGES, {"b_id": conversation_id})]

    async def get_conversation(self, conversation_id: str) -> ConversationDetail:
        async with self._connect() as conn:
            summary = await self._summary(conn, conversation_id)
            rows = (await conn.execute(LOAD_MESSAGES, {"b_id": conversation_id})).all()
            run_id = await conn.scalar(select(RUNS.c.id).where(RUNS.c.conversation_id == conversation_id,
                                                               RUNS.c.status == "running")
                                       .order_by(RUNS.c.created_at.desc()).limit(1))
        messages = [StoredMessage.model_validate(row, from_attributes=True) for row in rows]
        return ConversationDetail(**summary.model_dump(), messages=messages, run_id=run_id)

    async def list_conversations(self, limit: int, cursor: str | None) -> ConversationPage:
        """Newest first; `cursor` continues after the last conversation of the previous page."""
        query = select(*SUMMARY_COLUMNS).order_by(CONVERSATIONS.c.updated_at.desc(), CONVERSATIONS.c.id.desc())
        if cursor is not None:
            updated_at, conversation_id = decode_cursor(cursor)
            query = query.where(or_(CONVERSATIONS.c.updated_at < updated_at,
                                    and_(CONVERSATIONS.c.updated_at == updated_at,
                                         CONVERSATIONS.c.id < conversation_id)))
        async with self._connect() as conn:
            rows = (await conn.execute(query.limit(limit + 1))).all()
        page = [ConversationSummary.model_validate(row, from_attributes=True) for row in rows[:limit]]
        more = len(rows) > limit
        return ConversationPage(conversations=page,
                                next_cursor=encode_cursor(page[-1].updated_at, page[-1].id) if more else None)

    async def delete_conversation(self, conversation_id: str) -> None:
        await self._write_op(delete_rows, conversation_id)

    async def is_reachable(self) -> bool:
        """True when the database answers a `SELECT 1` within two seconds."""
        try:
            async with asyncio.timeout(2), self._engine.connect() as conn:
                await conn.execute(select(1))
        except (TimeoutError, SQLAlchemyError, OSError):
            return False
        return True

    @asynccontextmanager
    async def _connect(self) -> AsyncIterator[AsyncConnection]:
        """A connection for reads; a database that cannot be reached is a StoreUnavailable."""
        with self._database_errors():
            async with self._engine.connect() as conn:
                yield conn

    async def _write_op(self, operation: Callable[..., T], *args: Any) -> T:
        """operation(connection, *args) in one transaction: on SQLite's writer thread, else in one greenlet."""
        with self._database_errors():
            if self._sqlite_thread is not None:
                return await asyncio.get_running_loop().run_in_executor(self._sqlite_thread, self._run_sqlite,
                                                                        operation, args)
            async with self._engine.begin() as conn:
                return await conn.run_sync(operation, *args)

    @contextmanager
    def _database_errors(self) -> Iterator[None]:
        """The database's connection failures stop here: a request gets a 503 that names the kind of database,
        never its URL. The pool replaces broken connections, so the store recovers once the database is back."""
        try:
            yield
        except (OperationalError, InterfaceError, OSError) as exc:
            raise StoreUnavailable(f"the conversation store ({self.kind}) is unavailable; retry shortly") from exc
        except DBAPIError as exc:
            if not exc.connection_invalidated:
                raise
            raise StoreUnavailable(f"the conversation store ({self.kind}) is unavailable; retry shortly") from exc

    def _run_sqlite(self, operation: Callable[..., T], args: tuple[Any, ...]) -> T:
        with self.write_engine.begin() as conn:
            return operation(conn, *args)

    @staticmethod
    async def _summary(conn: AsyncConnection, conversation_id: str) -> ConversationSummary:
        row = (await conn.execute(LOAD_SUMMARY, {"b_id": conversation_id})).first()
        if row is None:
            raise ConversationNotFound(f"conversation {conversation_id!r} not found")
        return ConversationSummary.model_validate(row, from_attributes=True)


# --- 7. Agent ---

REPEATED_CALL_LIMIT = 3
FINAL_ANSWER_NUDGE = (
    "Stop calling tools now. Answer the user's last message with what the tool results above "
    "already show, and say what is still unknown."
)
NO_TOOLS: list[dict[str, Any]] = []  # the final answer's tool list: always this object, so its PromptHead stays cached


@dataclass(frozen=True)
class TurnOptions:
    """How one turn differs from the service's defaults: the client's system text (after the service's prompt),
    sampling overrides, and whether the turn is stored (a stateless OpenAI request's is not)."""
    system: str | None = None
    sampling: dict[str, Any] = field(default_factory=dict)
    store: bool = True
    thinking: bool | None = None  # None: THINKING decides


@dataclass(slots=True)
class StepReply:
    """One LLM call's outcome: the assistant message to keep, the calls it asks for, its token counts, and
    whether the token limit cut it (then its calls are not run: their arguments may be incomplete)."""
    message: dict[str, Any]
    calls: list[FunctionCall]
    usage: Usage | None
    cut: bool = False


@dataclass
class TurnState:
    """One turn as it runs: its settings, then what it has produced so far (`usages` runs parallel to `messages`;
    both are stored)."""
    options: TurnOptions
    template_kwargs: dict[str, Any]  # the turn's chat_template_kwargs: its thinking choice
    in_thought: bool  # the generation prompt opens a thought, so a reply starts inside one
    messages: list[dict[str, Any]] = field(default_factory=list)
    usages: list[Usage | None] = field(default_factory=list)
    content: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)  # one entry a step that thought
    records: list[ToolCallRecord] = field(default_factory=list)
    usage: Usage | None = None
    call_counts: Counter[str] = field(default_factory=Counter)
    reply: StepReply | None = None  # the latest LLM call's, set by _call_model (an async generator returns nothing)

    def add(self, message: dict[str, Any], usage: Usage | None = None) -> None:
        self.messages.append(message)
        self.usages.append(usage)
        if usage is not None:
            self.usage = usage if self.usage is None else self.usage + usage

    def done(self, conversation_id: str, stop_reason: StopReason) -> DoneEvent:
        return DoneEvent(conversation_id=conversation_id, content="".join(self.content),
                         reasoning="\n\n".join(self.reasoning) or None, tool_calls=self.records or None,
                         usage=self.usage, stop_reason=stop_reason)


@dataclass(frozen=True)
class PromptHead:
    """What every request of a day starts with: the system message, the tools (also as JSON text), each tool's
    parameter schema by name (to type XML arguments) and the token estimate; made again when the day or the tool
    list changes."""

    date: str
    system: dict[str, Any]
    tools: list[dict[str, Any]]
    tools_json: EncodedJson
    parameters: dict[str, dict[str, Any]]
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


def error_event(exc: Exception) -> ErrorEvent:
    """A failure as the last event of a stream that has started, when its HTTP status can no longer change."""
    if isinstance(exc, AgentError):
        logger.info("turn failed: %s %s", exc.status_code, exc)
        return ErrorEvent(status=exc.status_code, detail=str(exc))
    logger.error("unexpected error in a streamed turn", exc_info=exc)
    return ErrorEvent(status=500, detail="internal error")


class Agent:
    """The tool-calling loop over one vLLM server, a tool registry and a conversation store."""

    def __init__(self, llm: VLLMClient, registry: ToolRegistry, store: ConversationStore,
                 settings: Settings) -> None:
        self.llm = llm
        self.registry = registry
        self.store = store
        self.settings = settings
        self.tool_format: Literal["native", "hermes"] = "hermes" if settings.tool_call_format == "hermes" else "native"
        self._sampling = settings.sampling()
        self._heads: dict[bool, PromptHead] = {}
        self._prompt_ends: dict[bool | None, tuple[int, str]] = {}

    async def open_turn(self, conversation_id: str | None, content: str, *, create: bool = False) -> OpenTurn:
        """Check the message and reserve the conversation before any output, so 413, 404 and 409 are real answers.

        With `create`, an unknown id starts a conversation under that id (the OpenAI API's chat ids).
        """
        limit = self.settings.max_content_chars
        if len(content) > limit:
            raise ContentTooLarge(f"content is {len(content)} characters; the limit is {limit}")
        try:
            return await self.store.open_turn(conversation_id)
        except ConversationNotFound:
            if not create or conversation_id is None:
                raise
            return OpenTurn(conversation_id, [], None)

    @asynccontextmanager
    async def deadline(self) -> AsyncIterator[None]:
        """TURN_TIMEOUT_S over a whole turn, however many steps it takes.

        Enter it in the task that drives `run_turn`, around all of it: the timeout cancels that task.
        """
        try:
            async with asyncio.timeout(self.settings.turn_timeout_s):
                yield
        except TimeoutError:
            raise TurnTimeout(f"the turn did not finish within {self.settings.turn_timeout_s:g} s "
                              "(TURN_TIMEOUT_S)") from None

    async def relay(self, events: AsyncIterator[StreamEvent], put: Callable[[StreamEvent], Awaitable[None]]) -> None:
        """Drive a streamed turn's events to their end in this task, each to `put`; a failure is the last event."""
        try:
            async with self.deadline():
                async for event in events:
                    await put(event)
        except Exception as exc:
            await put(error_event(exc))

    async def run_turn(self, turn: OpenTurn, content: str, *, stream: bool = False,
                       options: TurnOptions | None = None) -> AsyncIterator[StreamEvent]:
        """Run one user turn, yielding events as they happen; the last one is a DoneEvent.

        `options.thinking` overrides THINKING for this turn. A step cut at the token limit ends the turn, its calls
        not run. Nothing is written until the turn succeeds, so a failed or cancelled turn leaves the history as it
        was and its conversation free.
        """
        options = options or TurnOptions()
        template_kwargs = self._template_kwargs(options.thinking)
        state = TurnState(options, template_kwargs, await self._opens_thought(template_kwargs))
        state.add({"role": "user", "content": content})
        stop_reason: StopReason = "max_steps"
        stored = False
        try:
            for _ in range(self.settings.agent_max_steps):
                async for event in self._call_model(turn.history, state, stream=stream, tools=True):
                    yield event
                reply = state.reply
                if reply.cut or not reply.calls:
                    state.add(reply.message, reply.usage)
                    stop_reason = "length" if reply.cut else "completed"
                    break
                if self._is_looping(reply.calls, state):
                    stop_reason = "loop_detected"  # the looping reply is left out; the nudge asks for an answer
                    break
                state.add(reply.message, reply.usage)
                async for event in self._run_tools(reply.calls, state):
                    yield event
            if stop_reason in ("max_steps", "loop_detected"):
                async for event in self._call_model(turn.history, state, stream=stream, tools=False, nudge=True):
                    yield event
                reply = state.reply
                state.add(reply.message, reply.usage)
                if reply.cut:
                    stop_reason = "length"
            if state.options.store:
                await self.store.commit_turn(turn, state.messages, state.usages)
            stored = True
            yield state.done(turn.conversation_id, stop_reason)
        finally:
            if not stored:
                await self.store.close_turn(turn)

    async def model_thinks(self) -> bool:
        """Whether the served model thinks: its chat template renders the prompt differently with enable_thinking."""
        ends = [await self._prompt_end({"enable_thinking": value}) for value in (True, False)]
        return None not in ends and ends[0] != ends[1]

    def _template_kwargs(self, thinking: bool | None) -> dict[str, Any]:
        """chat_template_kwargs for a turn: its own thinking choice, else THINKING; with auto, the template decides."""
        if thinking is None and self.settings.thinking != "auto":
            thinking = self.settings.thinking == "on"
        return {} if thinking is None else {"enable_thinking": thinking}

    async def _opens_thought(self, template_kwargs: dict[str, Any]) -> bool:
        """Whether the generation prompt ends in an open `<think>` (Qwen3.5 and later): a server without a
        reasoning parser then sends a thought that has no opening tag. Ċ: a newline in byte-level token text."""
        end = await self._prompt_end(template_kwargs)
        return end is not None and end[1].rstrip("\nĊ ").endswith(THINK_OPEN)

    async def _prompt_end(self, template_kwargs: dict[str, Any]) -> tuple[int, str] | None:
        """The model's generation prompt, as VLLMClient.prompt_end gives it, asked once per thinking choice."""
        key = template_kwargs.get("enable_thinking")
        if key not in self._prompt_ends:
            end = await self.llm.prompt_end(template_kwargs)
            if end is None:
                return None
            self._prompt_ends[key] = end
        return self._prompt_ends[key]

    def _is_looping(self, calls: list[FunctionCall], state: TurnState) -> bool:
        """True when a call repeats one already made REPEATED_CALL_LIMIT - 1 times this turn; else counts the calls."""
        keys = [f"{call.name}:{json.dumps(call.arguments, sort_keys=True)}" for call in calls]
        if any(state.call_counts[key] >= REPEATED_CALL_LIMIT - 1 for key in keys):
            logger.warning("the model repeats the same tool call; asking it for a final answer")
            return True
        state.call_counts.update(keys)
        return False

    async def _call_model(self, history: list[dict[str, Any]], state: TurnState, *, stream: bool, tools: bool,
                          nudge: bool = False) -> AsyncIterator[ReasoningEvent | TokenEvent]:
        """One LLM call: thinking as ReasoningEvents, then visible text as TokenEvents; the reply lands in
        `state.reply`.

        Two refusals, which vLLM gives before any text, are retried once each: no tool parser (sent again in text
        mode) and a prompt too long (sent again trimmed harder).
        """
        head = self._prompt_head(tools)
        current = [*state.messages, {"role": "system", "content": FINAL_ANSWER_NUDGE}] if nudge else state.messages
        splitter = ReplySplitter(head.parameters, in_thought=state.in_thought)
        pieces: list[str] = []  # this step's visible text
        trim_harder = False
        while True:
            payload = await self._payload(head, history, current, state, trim_harder=trim_harder)
            try:
                if stream:
                    assembler = StreamAssembler()
                    async for reasoning, content in self.llm.stream(payload, assembler):
                        for event in self._shown(splitter.feed(reasoning, content), pieces, state):
                            yield event
                    completion = assembler.completion()
                else:
                    completion = await self.llm.complete(payload)
                    for event in self._shown(splitter.feed(completion.reasoning, completion.content), pieces, state):
                        yield event
                break
            except NoToolParser as exc:
                self._switch_to_text_mode(exc)
            except ContextTooLong:
                if trim_harder:
                    raise
                trim_harder = True
        for event in self._shown(splitter.flush(), pieces, state):
            yield event
        split = splitter.finish()
        if split.reasoning:
            state.reasoning.append(split.reasoning)
        state.reply = self._step_reply(completion, split, "".join(pieces), tools=tools)

    def _prompt_head(self, tools: bool) -> PromptHead:
        """The cached head of requests with or without tools; made again when the day changes or the registry's
        tool list does (the registry then hands out a new list)."""
        schemas = self.registry.openai_schemas() if tools else NO_TOOLS
        today = datetime.now(UTC).date().isoformat()
        head = self._heads.get(tools)
        if head is None or head.tools is not schemas or head.date != today:
            system = {"role": "system", "content": self.settings.system_prompt.replace("{date}", today)}
            parameters = {schema["function"]["name"]: schema["function"].get("parameters") or {} for schema in schemas}
            head = self._heads[tools] = PromptHead(today, system, schemas,
                                                   EncodedJson(JSON_ENCODER.encode(schemas)), parameters,
                                                   estimate_tokens(system) + estimate_tokens(schemas))
        return head

    async def _payload(self, head: PromptHead, history: list[dict[str, Any]], current: list[dict[str, Any]],
                       state: TurnState, *, trim_harder: bool) -> dict[str, Any]:
        """The request body: system prompt, what fits of history, tools, the thinking choice, sampling.

        In text mode the tools go with `tool_choice: "none"`: the model's own template renders them in the format
        it was trained on (Qwen3.5: XML), and vLLM leaves the calls in the text for us to read.
        """
        if state.options.system:
            system = {"role": "system", "content": f"{head.system['content']}\n\n{state.options.system}"}
            head = replace(head, system=system, tokens=head.tokens + estimate_tokens(state.options.system))
        messages = await self._fit(head, history, current, state.template_kwargs, trim_harder=trim_harder)
        payload: dict[str, Any] = {"messages": messages, **self._sampling, **state.options.sampling}
        if head.tools:
            payload["tools"] = head.tools_json
            if self.tool_format == "hermes":
                payload |= {"tool_choice": "none", "skip_special_tokens": False}  # keep the tags in the text
        if state.template_kwargs:
            payload["chat_template_kwargs"] = state.template_kwargs
        return payload

    async def _fit(self, head: PromptHead, history: list[dict[str, Any]], current: list[dict[str, Any]],
                   template_kwargs: dict[str, Any], *, trim_harder: bool) -> list[dict[str, Any]]:
        """System prompt, the newest whole turns of history that fit the window, and the current turn.

        A prompt whose cheap, high estimate is under half the budget goes whole. Otherwise vLLM's /tokenize counts
        it, and the oldest turns are dropped, their estimates scaled to that count, until it fits. `trim_harder`
        (vLLM found the prompt too long after all) leaves a quarter of the budget unused.
        """
        budget = await self._token_budget()
        if trim_harder:
            budget = budget * 3 // 4
        messages = [head.system, *history, *current]
        estimate = head.tokens + estimate_tokens(history) + estimate_tokens(current)
        if estimate <= budget // 2:
            return messages
        turns = split_turns(history)
        sizes = [estimate_tokens(turn) for turn in turns]
        dropped = 0  # the oldest turns left out
        while True:
            if estimate <= budget // 2:  # enough turns dropped that the estimate alone shows the rest fits
                count = estimate
            else:
                count = await self.llm.count_tokens(messages, head.tools, template_kwargs) or estimate
            if count <= budget:
                if dropped:
                    logger.info("sending the newest %d of %d turns to fit %d tokens", len(turns) - dropped,
                                len(turns), budget)
                return messages
            if dropped == len(turns):
                raise ContextTooLong(f"the message is too long for the model: about {count} tokens, and the "
                                     f"context window leaves {budget} for the prompt")
            excess = count - budget
            scale = count / estimate  # counted tokens per estimated token
            while dropped < len(turns) and excess > 0:
                excess -= sizes[dropped] * scale
                estimate -= sizes[dropped]
                dropped += 1
            messages = [head.system, *(m for turn in turns[dropped:] for m in turn), *current]

    async def _token_budget(self) -> int:
        """Prompt tokens allowed: the model's window minus the room kept for the answer."""
        window = self.settings.max_model_len or await self.llm.max_model_len()
        reserve = self.settings.max_tokens or self.settings.context_reserve_tokens
        return max(window - reserve, window // 4)

    @staticmethod
    def _shown(shown: tuple[str, str], pieces: list[str], state: TurnState) -> list[ReasoningEvent | TokenEvent]:
        """The events for what the splitter let through, thinking first. The answer text joins the step's `pieces`
        and the turn's content, where a step's text is set off from an earlier step's by a blank line."""
        thinking, answer = shown
        events: list[ReasoningEvent | TokenEvent] = [ReasoningEvent(content=thinking)] if thinking else []
        if answer:
            pieces.append(answer)
            if len(pieces) == 1 and state.content and not state.content[-1].endswith("\n"):
                answer = "\n\n" + answer
            state.content.append(answer)
            events.append(TokenEvent(content=answer))
        return events

    def _switch_to_text_mode(self, exc: NoToolParser) -> None:
        """From now on tool calls are read from the text, as TOOL_CALL_FORMAT=auto allows (else the turn fails)."""
        if self.tool_format != "native" or self.settings.tool_call_format != "auto":
            raise LLMError(str(exc)) from exc
        self.tool_format = "hermes"
        logger.warning("vLLM at %s has no tool-call parser (--enable-auto-tool-choice); "
                       "reading tool calls from the model's text", self.llm.base_url)

    @staticmethod
    def _step_reply(completion: Completion, split: SplitReply, content: str, *, tools: bool) -> StepReply:
        """The step's assistant message, with its thinking (sent back within this turn) and the calls to run: vLLM's,
        else those in the text; none when the step was cut at the token limit."""
        cut = completion.finish_reason == "length"
        calls = (completion.tool_calls or split.calls) if tools and not cut else []
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if split.reasoning:
            message["reasoning"] = split.reasoning
        if calls:
            message["tool_calls"] = [call.wire() for call in calls]
        return StepReply(message, calls, completion.usage, cut)

    async def _run_tools(self, calls: list[FunctionCall], state: TurnState) -> AsyncIterator[StreamEvent]:
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

    async def _results_as_completed(self, calls: list[FunctionCall]) -> AsyncIterator[tuple[int, ToolResult]]:
        """(index, result) as each call finishes: several run concurrently, a single one inline (no task)."""
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

    async def _run_tool(self, index: int, call: FunctionCall) -> tuple[int, ToolResult]:
        """One call's result beside its index (several finish in any order); a call that could not be read is not
        run, its error is the result."""
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


RUN_FLUSH_S = 0.1  # a run's events reach the database in batches, at most one write per run this often
RUN_POLL_S = 0.5  # heartbeats and cancel requests; followers of another worker's run read the database this often
RUN_LOG_LAG_S = 2.0  # the most the database's log of a running run is behind it, with time to spare
RUN_STALE_S = 10.0  # a running run whose heartbeat is older than this lost its process
RUN_SWEEP_S = 5.0  # how often each process looks for such runs, and for ended runs past RUN_RETENTION_S


class Run:
    """One streamed turn owned by the service, not by a connection: it runs in a task of its own to its end (or
    until cancelled) and keeps its events, with ids 1..n, for any number of followers: in memory while it runs
    here, and in the database, in batches, for followers on other workers and for RUN_RETENTION_S after its end.
    """

    def __init__(self, registry: "RunRegistry", turn: OpenTurn, content: str, options: TurnOptions) -> None:
        self.id = secrets.token_hex(16)  # 128 random bits: the only way to another conversation's run
        self.conversation_id = turn.conversation_id
        self.turn = turn
        self.content = content
        self.status: RunStatus = "running"
        self.created_at = time.time()
        self.finished_at: float | None = None
        self.events: list[LoggedEvent] = []
        self._registry = registry
        self._added = asyncio.Event()  # set, and replaced, at each event
        self._ending: RunStatus = "cancelled"  # what a cancelled task means: "interrupted" at shutdown
        self._add(RunEvent(run_id=self.id, conversation_id=self.conversation_id))
        self._task = asyncio.create_task(registry.agent.relay(
            registry.agent.run_turn(turn, content, stream=True, options=options), self._put))
        self._task.add_done_callback(self._end_if_cancelled)
        self._released: asyncio.Future[None] | None = None  # held: the loop keeps only weak references to tasks
        self.logged = asyncio.create_task(self._log())

    @property
    def result(self) -> str | None:
        """The JSON of the last event, `done` or `error`, once the run ended."""
        return None if self.status == "running" else self.events[-1][2]

    def cancel(self, ending: RunStatus = "cancelled") -> None:
        """Cancel the turn if it still runs: its vLLM request closes, its tools are cancelled, it is not stored, and
        its last event is an `error` that says why."""
        if self.status == "running":
            self._ending = ending
            self._task.cancel()

    async def follow(self, after: int, idle_s: float | None = None) -> AsyncIterator[LoggedEvent | None]:
        """The events after id `after` (an id past the last: from now on), then each as it comes, to the last one;
        None after `idle_s` without an event. An id past the end of an ended run gets its last event, numbered
        after that id, as the database's log answers it."""
        seen = min(after, len(self.events))
        if after > seen and self.status != "running":
            yield after + 1, *self.events[-1][1:]
            return
        while True:
            while seen < len(self.events):  # never a slice taken earlier: the run may end while this yields
                yield self.events[seen]
                seen += 1
            if self.status != "running":
                return
            try:
                async with asyncio.timeout(idle_s):
                    await self._added.wait()
            except TimeoutError:
                yield None

    def _add(self, event: RunEvent | StreamEvent, ending: RunStatus | None = None) -> None:
        self.events.append((len(self.events) + 1, event.type, event.model_dump_json()))
        if event.type in ("done", "error"):
            self.status = ending or ("completed" if event.type == "done" else "failed")
            self.finished_at = time.time()
        self._added.set()
        self._added = asyncio.Event()

    async def _put(self, event: StreamEvent) -> None:
        """`_add` as Agent.relay takes it: awaitable."""
        self._add(event)

    def _end_if_cancelled(self, _task: asyncio.Task[None]) -> None:
        """A cancelled run's last event, here rather than in the task: one cancelled before it started runs none
        of its code, and still holds the conversation's lease (giving back a lease twice changes nothing)."""
        if self.status == "running":  # the turn's own last event never came
            error = (RunCancelled(f"run {self.id} was cancelled; the turn was not stored")
                     if self._ending == "cancelled" else
                     RunInterrupted(f"run {self.id} was interrupted: the service stopped; the turn was not stored"))
            self._add(error_event(error), self._ending)
            self._released = asyncio.ensure_future(self._registry.store.close_turn(self.turn))

    async def _log(self) -> None:
        """Write the events to the database: those that came since the last write, at most one write each
        RUN_FLUSH_S. Then the run leaves the registry, and its followers from then on read the database."""
        written = 0
        while True:
            await asyncio.sleep(RUN_FLUSH_S)  # first too: a short run takes one write
            ended, count = self.status != "running", len(self.events)
            first = written == 0
            events = [{"run_id": self.id, "seq": seq, "type": kind, "data": data}
                      for seq, kind, data in self.events[written:count]]
            row = self._row(first) if first or ended else None  # all of it with the first write, its end the last
            try:
                await self._registry.store.log_run(RunWrite(self.id, events, row, first=first))
            except Exception as exc:
                logger.warning("could not log the events of run %s, retrying: %s", self.id, exc)
                await asyncio.sleep(RUN_POLL_S)
                continue
            if ended:
                break
            written = count
            if written == len(self.events):
                await self._added.wait()
        del self._registry.runs[self.id]

    def _row(self, first: bool) -> dict[str, Any]:
        row = {"status": self.status, "finished_at": self.finished_at, "result": self.result}
        if first:
            row |= {"id": self.id, "conversation_id": self.conversation_id, "owner": self._registry.owner,
                    "heartbeat_at": time.time(), "lease": self.turn.lease, "cancel_requested": False,
                    "created_at": self.created_at}
        return row


class RunRegistry:
    """This process's runs by id, and the upkeep of the runs table: heartbeats, cancel requests that reached
    another worker, runs whose process died (interrupted), and the removal of ended runs after RUN_RETENTION_S."""

    def __init__(self, agent: Agent, retention_s: float) -> None:
        self.agent = agent
        self.store = agent.store
        self.owner = secrets.token_hex(8)
        self.runs: dict[str, Run] = {}
        self._retention_s = retention_s

    @classmethod
    @asynccontextmanager
    async def open(cls, agent: Agent, retention_s: float) -> AsyncIterator["RunRegistry"]:
        """Keep the runs table up to date while the service runs; at shutdown, its runs end as interrupted."""
        registry = cls(agent, retention_s)
        upkeep = asyncio.create_task(registry._upkeep())
        try:
            yield registry
        finally:
            upkeep.cancel()
            runs = list(registry.runs.values())
            for run in runs:
                run.cancel("interrupted")
            if runs:
                await asyncio.wait([run.logged for run in runs], timeout=5)

    def start(self, turn: OpenTurn, content: str, options: TurnOptions) -> Run:
        run = Run(self, turn, content, options)
        self.runs[run.id] = run
        return run

    def running(self, conversation_id: str) -> Run | None:
        """This process's run of the conversation, if one is going on."""
        return next((run for run in self.runs.values()
                     if run.conversation_id == conversation_id and run.status == "running"), None)

    async def info(self, run_id: str) -> RunInfo:
        run = self.runs.get(run_id)
        return run_info(run) if run is not None else await self.store.run_info(run_id)

    async def cancel(self, run_id: str) -> RunInfo:
        """Cancel here if the run is this process's, else through the database (its owner looks each RUN_POLL_S)."""
        run = self.runs.get(run_id)
        if run is None:
            await self.store.request_cancel(run_id)
            return await self.store.run_info(run_id)
        if run.status != "running":
            raise RunFinished(f"run {run_id!r} has already ended ({run.status}); there is nothing to cancel")
        run.cancel()
        return run_info(run)

    async def follow(self, run_id: str, after: int, idle_s: float | None) -> AsyncIterator[LoggedEvent | None]:
        """A run's events after id `after`, live to its end: from memory if it runs here, else from the database
        (404 here, before any event, for an unknown run)."""
        run = self.runs.get(run_id)
        if run is not None:
            return run.follow(after, idle_s)
        await self.store.run_info(run_id)
        return self._follow_logged(run_id, after, idle_s)

    async def _follow_logged(self, run_id: str, after: int, idle_s: float | None) -> AsyncIterator[LoggedEvent | None]:
        """Poll the log. The log lags behind the run, so an id past its end counts as one from the future (then the
        live tail follows) only once the log had RUN_LOG_LAG_S to catch up; until then, an ended run answers it with
        its last event, numbered after it: a client that saw events the log never got (their process died) still
        hears the end."""
        began, in_log, quiet = time.monotonic(), False, 0.0  # in_log: `after` is known not to be from the future
        while True:
            status, events = await self.store.run_log(run_id, after)
            ended = status != "running"  # then the log is whole
            if ended and not events and not in_log:  # `after` is at or past its end
                seq, kind, data = await self.store.last_run_event(run_id)
                if after > seq or status == "interrupted":  # an interrupted run's log may lack the tail the client saw
                    events = [(after + 1, kind, data)]
            for event in events:
                yield event
            if ended:
                return
            if events:
                after, in_log, quiet = events[-1][0], True, 0.0
            else:
                quiet += RUN_POLL_S
                if not in_log and time.monotonic() - began >= RUN_LOG_LAG_S:
                    after, in_log = min(after, (await self.store.last_run_event(run_id))[0]), True
                if idle_s is not None and quiet >= idle_s:
                    quiet = 0.0
                    yield None
            await asyncio.sleep(RUN_POLL_S)

    async def _upkeep(self) -> None:
        swept = time.monotonic() - RUN_SWEEP_S
        while True:
            await asyncio.sleep(RUN_POLL_S)
            try:
                if self.runs:
                    for run_id in await self.store.beat_runs(self.owner):
                        if run_id in self.runs:
                            self.runs[run_id].cancel()
                if time.monotonic() - swept >= RUN_SWEEP_S:
                    swept = time.monotonic()
                    await self.store.sweep_runs(RUN_STALE_S, self._retention_s)
            except Exception as exc:
                logger.warning("run upkeep failed, retrying: %s", exc)


# --- 8. API ---

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody} for status in (401, 404, 409, 413, 415, 422, 500, 502, 503, 504)
}
SSE_PING_S = 15.0
YOUNG_GC_THRESHOLD = 10_000  # a turn's objects die by reference counting; the young collector found nothing
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
SSE_RESPONSE: dict[int | str, dict[str, Any]] = {200: {
    "description": "Events `run`, then `reasoning`, `token`, `tool_call`, `tool_result`, then one `done` or "
                   "`error`; each `data:` is JSON whose `type` is the event name, each `id:` its number in the "
                   "run (1, 2, ...): send it back as Last-Event-ID to /runs/{run_id}/events to resume.",
    "content": {"text/event-stream": {"itemSchema": {"oneOf": [
        {key: value for key, value in model.model_json_schema(ref_template="#/components/schemas/{model}").items()
         if key != "$defs"}  # nested models (Usage, ToolCallRecord) are components already
        for model in (RunEvent, ReasoningEvent, TokenEvent, ToolCallEvent, ToolResultEvent, DoneEvent, ErrorEvent)
    ]}}},
}}
CHAT_RESPONSE_JSON = TypeAdapter(ChatResponse)  # a DoneEvent through it loses `type`, as the API documents
REQUEST_ID: ContextVar[str] = ContextVar("request_id", default="-")
REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
JSON_MEDIA_TYPE = re.compile(r"application/(?:[\w.-]+\+)?json")


async def get_agent(request: Request) -> Agent:
    """Async on purpose: FastAPI runs a plain `def` dependency in a worker thread."""
    return request.app.state.agent


AgentDep = Annotated[Agent, Depends(get_agent)]


async def get_runs(request: Request) -> RunRegistry:
    return request.app.state.runs


RunsDep = Annotated[RunRegistry, Depends(get_runs)]


class APIKeyBearer(HTTPBearer):
    """With API_KEY set, every /api/v1 route but /health needs `Authorization: Bearer <key>`.

    The check is the security scheme itself, so /docs still offers "Authorize" and a request solves one
    dependency for it, not two.
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
ConversationId = Annotated[str, FastAPIPath(pattern=CONVERSATION_ID_PATTERN)]
RunId = Annotated[str, FastAPIPath(pattern=CONVERSATION_ID_PATTERN)]
router = APIRouter(prefix="/api/v1", responses=ERROR_RESPONSES, dependencies=[Depends(require_api_key)])
open_router = APIRouter(prefix="/api/v1")


@router.post("/chat", response_model=ChatResponse, summary="Run one agent turn and return the answer")
async def chat(body: ChatRequest, agent: AgentDep) -> Response:
    """The turn's events drained into its `done` event, serialized as ChatResponse (not validated again)."""
    turn = await agent.open_turn(body.conversation_id, body.content)
    async with agent.deadline():
        events = [event async for event in agent.run_turn(turn, body.content,
                                                           options=TurnOptions(thinking=body.thinking))]
    return Response(CHAT_RESPONSE_JSON.dump_json(events[-1]), media_type="application/json")


@router.post("/chat/stream", response_class=StreamingResponse, responses=SSE_RESPONSE,
             summary="Run one agent turn as a run, streaming its events as Server-Sent Events")
async def chat_stream(body: ChatRequest, agent: AgentDep, runs: RunsDep) -> EventSourceResponse:
    turn = await agent.open_turn(body.conversation_id, body.content)
    run = runs.start(turn, body.content, TurnOptions(thinking=body.thinking))
    return run_stream(run.follow(0, SSE_PING_S), run.id, cancel=run if body.on_disconnect == "cancel" else None)


@router.get("/runs/{run_id}", summary="A run's status, and its `done` payload or error once it ended")
async def get_run(run_id: RunId, runs: RunsDep) -> RunInfo:
    return await runs.info(run_id)


@router.get("/runs/{run_id}/events", response_class=StreamingResponse, responses=SSE_RESPONSE,
            summary="Replay a run's events after an id, then follow it live to its end")
async def follow_run(
    run_id: RunId, runs: RunsDep,
    last_event_id: Annotated[str | None, Header(pattern=r"^[0-9]{1,9}$", description="The id of the last event "
                                                "received; the replay starts after it.")] = None,
    after: Annotated[int, Query(ge=0, le=999_999_999, description="As Last-Event-ID, which wins if both "
                                "are sent.")] = 0,
) -> EventSourceResponse:
    start = int(last_event_id) if last_event_id is not None else after
    return run_stream(await runs.follow(run_id, start, SSE_PING_S), run_id)


@router.post("/runs/{run_id}/cancel", status_code=202, summary="Cancel a run, on whichever worker it runs")
async def cancel_run(run_id: RunId, runs: RunsDep) -> RunInfo:
    """202: the run ends within about a second with one `error` event; 409 if it had already ended."""
    return await runs.cancel(run_id)


def run_stream(events: AsyncIterator[LoggedEvent | None], run_id: str, *, cancel: Run | None = None
               ) -> EventSourceResponse:
    return EventSourceResponse(run_frames(events, cancel), headers={**SSE_HEADERS, "X-Run-ID": run_id})


async def run_frames(events: AsyncIterator[LoggedEvent | None], cancel: Run | None) -> AsyncIterator[bytes]:
    """A run's events as SSE frames, each with its id, and a keep-alive comment when one is due; with `cancel`, a
    client that goes away cancels that run (the default `on_disconnect`)."""
    try:
        async for event in events:
            yield KEEPALIVE_COMMENT if event is None else format_sse_event(
                data_str=event[2], event=event[1], id=str(event[0]))
    finally:
        if cancel is not None:
            cancel.cancel()


async def sse_frames(agent: Agent, events: AsyncIterator[StreamEvent], frame: Callable[[StreamEvent], bytes], *,
                     first: bytes = b"") -> AsyncIterator[bytes]:
    """A turn's events as SSE frames (`first`, then each non-empty `frame(event)`), with a keep-alive comment
    after SSE_PING_S without one.

    The turn runs in a task that only relays its events into a queue, so the turn's deadline covers all of it
    and a quiet spell can time out into a ping here without disturbing it. Closing this iterator (the client
    went away) cancels the turn.
    """
    frames: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=64)

    async def put(event: StreamEvent) -> None:
        if data := frame(event):
            await frames.put(data)

    async def produce() -> None:
        await agent.relay(events, put)
        await frames.put(None)

    async def next_frame() -> bytes | None:
        try:
            async with asyncio.timeout(SSE_PING_S):
                return await frames.get()
        except TimeoutError:
            return KEEPALIVE_COMMENT

    if first:
        yield first
    producer = asyncio.create_task(produce())
    try:
        while (data := await next_frame()) is not None:
            yield data
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
async def get_conversation(conversation_id: ConversationId, agent: AgentDep, runs: RunsDep) -> ConversationDetail:
    """With the id of its run in progress: this worker's, which may not be in the database yet, or another's."""
    detail = await agent.store.get_conversation(conversation_id)
    run = runs.running(conversation_id)
    return detail if run is None else detail.model_copy(update={"run_id": run.id})


@router.delete("/conversations/{conversation_id}", status_code=204, summary="Delete a conversation")
async def delete_conversation(conversation_id: ConversationId, agent: AgentDep) -> Response:
    await agent.store.delete_conversation(conversation_id)
    return Response(status_code=204)


@router.get("/tools", summary="List the tools the agent can call")
async def list_tools(agent: AgentDep) -> list[ToolInfo]:
    return [ToolInfo(name=tool.name, description=tool.description, parameters=tool.parameters, source=tool.source)
            for tool in agent.registry.tools]


@open_router.get("/health", summary="Service status and whether vLLM is reachable (no API key needed)")
async def health(request: Request, agent: AgentDep) -> Health:
    reachable = await agent.llm.is_reachable()
    status = VLLMStatus(url=agent.llm.base_url, reachable=reachable, model=agent.llm.model,
                        tool_call_format=agent.tool_format)
    database = DatabaseStatus(kind=agent.store.kind, reachable=await agent.store.is_reachable())
    mcp_servers: McpServers = request.app.state.mcp_servers
    healthy = reachable and database.reachable and not mcp_servers.unavailable()
    return Health(status="ok" if healthy else "degraded", vllm=status, database=database, mcp=mcp_servers.status())


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


def internal_error(_path: str) -> JSONResponse:
    """The 500 for an unexpected error: the detail says no more than that."""
    return JSONResponse({"detail": "internal error"}, status_code=500)


class RequestContextMiddleware:
    """Per request: an id (X-Request-ID in and out, and in every log line), an access log line, a cap on API
    body size so a huge upload is refused with 413 before it is read into memory, and the 500 for any
    unexpected error (here, not in an exception handler, so that answer and its log line carry the id too)."""

    def __init__(self, app: ASGIApp, max_body_bytes: int,
                 internal_error: Callable[[str], JSONResponse] = internal_error) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.internal_error = internal_error  # the 500's body for a path (the OpenAI API has its own shape)

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
            if not scope["path"].startswith(("/api/", "/v1/")):
                await self.app(scope, receive, send_with_id)
            elif scope["path"].startswith("/api/") and self._declared_too_large(headers.get(b"content-length")):
                # (/v1 refuses it from the byte count below, as an HTTPException answered in OpenAI's shape)
                await JSONResponse({"detail": self._too_large}, status_code=413)(scope, receive, send_with_id)
            else:
                await self.app(scope, self._limited(receive), send_with_id)
        except Exception:
            logger.exception("unexpected error on %s %s", scope["method"], scope["path"])
            if status is not None:
                raise
            await self.internal_error(scope["path"])(scope, receive, send_with_id)
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


def configure_logging(level: str) -> None:
    """Give the service's logger a JSON handler of its own; uvicorn configures only its own loggers."""
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(JsonLogFormatter())
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level)


# --- 9. OpenAI API ---
# The agent served as one model over OpenAI's Chat Completions API, for the openai SDKs and chat UIs (Open WebUI,
# LibreChat). Each request runs one agent turn through Agent.run_turn; the conventions it follows (chunk
# shapes, errors, Open WebUI's tool blocks and headers) and their sources are in ../shared/openai-compat.md.

OPENAI_PREFIX = "/v1/"
MODEL_CREATED = int(time.time())  # GET /v1/models needs a creation time: the process's start
TASK_PROMPT_PREFIX = "### Task:"  # how Open WebUI's title, tag and follow-up prompts begin
MARKDOWN_TOOL_CHARS = 200
CONVERSATION_ID = re.compile(CONVERSATION_ID_PATTERN)
# What our own renderings look like when a client sends an earlier answer back (and Open WebUI's reasoning
# and code blocks): removed, so the model sees its text and not HTML. Bodies are escaped: no nested </details>.
RENDERED_TOOL_CALLS = re.compile(
    r'<details type="(?:tool_calls|reasoning|code_interpreter)"[^>]*>.*?</details>\n?|^> 🔧 [^\n]*\n?\n?',
    re.DOTALL | re.MULTILINE,
)
OPENAI_ERROR_CODES = {400: "unsupported", 401: "invalid_api_key", 404: "not_found", 409: "conversation_busy",
                      413: "too_large", 415: "unsupported_media_type", 422: "invalid_request", 500: "internal_error",
                      502: "upstream_error", 503: "overloaded", 504: "timeout"}


class OpenAIMessage(BaseModel):
    """One message of a chat request; `content` is text, or parts of which only text parts are accepted."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class StreamOptions(BaseModel):
    """`stream_options`: with `include_usage`, the stream ends with a chunk carrying the turn's token counts."""

    model_config = ConfigDict(extra="allow")

    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """OpenAI's chat request. Unknown fields (`user`, `metadata`, penalties, ...) are ignored; `tools` sent by the
    client are ignored too, as the agent runs its own. What `check_supported` lists is refused with 400."""

    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[OpenAIMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    seed: int | None = None
    n: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None

    def check_supported(self) -> None:
        """Refuse what would change the answer in a way the agent cannot deliver; silently dropping it would
        hand the client something other than what it asked for."""
        if self.n not in (None, 1):
            raise UnsupportedRequest("n must be 1: the agent gives one answer per request", "n")
        if self.logprobs or self.top_logprobs:
            raise UnsupportedRequest("logprobs are not available from an agent turn", "logprobs")
        if self.tool_choice not in (None, "auto", "none"):
            raise UnsupportedRequest("tool_choice can only be auto or none: the agent runs its own tools, client "
                                     "tools are ignored", "tool_choice")
        if self.response_format is not None and self.response_format.get("type") != "text":
            raise UnsupportedRequest("response_format must be text", "response_format")
        if self.audio is not None or any(modality != "text" for modality in self.modalities or ()):
            raise UnsupportedRequest("only text output is supported", "modalities")

    def sampling(self) -> dict[str, Any]:
        """The sampling fields the client set, as vLLM names them; they apply to every LLM call of the turn."""
        values = {"temperature": self.temperature, "top_p": self.top_p, "seed": self.seed,
                  "max_tokens": self.max_completion_tokens or self.max_tokens}
        return {name: value for name, value in values.items() if value is not None}


class OpenAIModel(BaseModel):
    """The agent, as OpenAI's model object."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class OpenAIModelList(BaseModel):
    """GET /v1/models: the one model this service serves."""

    object: Literal["list"] = "list"
    data: list[OpenAIModel]


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIErrorBody(BaseModel):
    """Every error of /v1, in OpenAI's shape."""

    error: OpenAIErrorDetail


def message_text(message: OpenAIMessage, index: int) -> str:
    """The message's text; images, audio and files are refused rather than silently dropped."""
    content = message.content
    if content is None or isinstance(content, str):
        text = content or ""
    else:
        parts = []
        for part in content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise UnsupportedRequest(f"messages[{index}]: only text content is supported, not "
                                         f"{str(part.get('type'))[:40]!r} parts", f"messages[{index}].content")
            parts.append(part["text"])
        text = "\n".join(parts)
    if "\x00" in text:
        raise InvalidChatRequest(f"messages[{index}]: must not contain NUL characters (\\u0000)",
                                 f"messages[{index}].content")
    return text


def clean_rendered(text: str) -> str:
    """An earlier answer without the tool blocks we rendered into it: the model sees its text, not HTML."""
    return RENDERED_TOOL_CALLS.sub("", text).strip() if "<details" in text or "> 🔧 " in text else text


def wire_messages(body: ChatCompletionRequest) -> list[dict[str, Any]]:
    """The request's messages in vLLM's shape: system and developer as system, earlier answers cleaned. Tool
    results and tool calls belong to client-side tools, which this endpoint never asks for: they are left out."""
    messages = []
    for index, message in enumerate(body.messages):
        text = message_text(message, index)
        if message.role in ("system", "developer"):
            messages.append({"role": "system", "content": text})
        elif message.role == "user":
            messages.append({"role": "user", "content": text})
        elif message.role == "assistant":
            messages.append({"role": "assistant", "content": clean_rendered(text)})
    return messages


def read_chat_input(body: ChatCompletionRequest, max_chars: int) -> tuple[str, list[dict[str, Any]], str | None]:
    """The turn's user message, the earlier messages in vLLM's shape, and the client's system text."""
    if body.messages[-1].role != "user":
        raise InvalidChatRequest("the last message must be from the user", "messages")
    messages = wire_messages(body)
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system" and m["content"].strip())
    history = [message for message in messages if message["role"] != "system"]
    content = history.pop()["content"]
    if not content.strip():
        raise InvalidChatRequest("the last user message is empty", "messages")
    if len(content) > max_chars:
        raise ContentTooLarge(f"the last user message is {len(content)} characters; the limit is {max_chars}")
    return content, history, system or None


def is_background_task(request: Request, body: ChatCompletionRequest) -> bool:
    """Open WebUI's titles, tags and follow-ups: named by the X-OpenWebUI-Task header the README asks users to
    add, or recognised by shape (one user message starting "### Task:", not streamed)."""
    if request.headers.get("x-openwebui-task", "").strip():
        return True
    first = body.messages[0]
    return (not body.stream and len(body.messages) == 1 and first.role == "user"
            and isinstance(first.content, str) and first.content.lstrip().startswith(TASK_PROMPT_PREFIX))


def requested_conversation(request: Request) -> str | None:
    """The conversation id of X-Conversation-ID or Open WebUI's X-OpenWebUI-Chat-Id; None: stateless.

    A malformed X-Conversation-ID is the client's mistake (422); Open WebUI's temporary and channel chats
    (`temporary:…`, `local:…`, `channel:…`) are not stored, by Open WebUI either, so they run stateless.
    """
    explicit = request.headers.get("x-conversation-id", "").strip()
    if explicit:
        if not CONVERSATION_ID.match(explicit):
            raise InvalidChatRequest("X-Conversation-ID must be 1-64 letters, digits, '_' or '-'",
                                     "X-Conversation-ID")
        return explicit
    chat_id = request.headers.get("x-openwebui-chat-id", "").strip()
    return chat_id if CONVERSATION_ID.match(chat_id) else None


def check_model(model: str, served: str) -> None:
    """A request for any model but the agent is a 404, worded as OpenAI's."""
    if model != served:
        raise ModelNotFound(f"The model `{model[:200]}` does not exist; this service serves `{served}`")


def openai_error(status: int, message: str, exc: Exception | None = None, *, retry: bool = False) -> JSONResponse:
    """An error response in OpenAI's shape, with the `param`, `code` and headers the exception carries, if any.

    The openai SDKs re-send 409 and 5xx twice by default, which would run the turn and its tools again:
    `x-should-retry: false` stops them unless `retry` says a repeat is safe.
    """
    code = getattr(exc, "code", None) or OPENAI_ERROR_CODES.get(status, str(status))
    body = {"error": {"message": message, "type": "invalid_request_error" if status < 500 else "server_error",
                      "param": getattr(exc, "param", None), "code": code}}
    headers = getattr(exc, "headers", None) or {}
    return JSONResponse(body, status_code=status, headers=headers if retry else {**headers, "x-should-retry": "false"})


Handler = Callable[[Request, Any], Any]


def openai_errors_on_v1(handler: Handler) -> Handler:
    """Wrap one of the app's exception handlers: on /v1 paths its `{"detail": ...}` answer, status kept, is
    given in OpenAI's shape instead."""

    async def dispatch(request: Request, exc: Exception) -> Response:
        response = await handler(request, exc)
        if not request.url.path.startswith(OPENAI_PREFIX):
            return response
        detail = loads_json(response.body).get("detail")
        return openai_error(response.status_code, detail if isinstance(detail, str) else "invalid request", exc)

    return dispatch


class OpenAICompletion:
    """One answer in OpenAI's shapes. Agent events become deltas (text as `content`, thinking as
    `reasoning_content`, each finished tool call as one block appended to `content`), then either
    chat.completion.chunk frames or one chat.completion. Both go through `delta`, so the concatenated
    stream is the non-streamed answer. Tool calls are never sent as `tool_calls`: the client would run them.
    """

    def __init__(self, model: str, display: str, *, include_usage: bool = False) -> None:
        self.id = f"chatcmpl-{secrets.token_hex(12)}"
        self.created = int(time.time())
        self.model = model
        self.display = display
        self.include_usage = include_usage
        self._arguments: dict[str, dict[str, Any]] = {}
        self._line_start = True  # the content so far is empty or ends a line: a block may start here

    def delta(self, event: StreamEvent) -> dict[str, str] | None:
        """The delta an event adds to the message, if any."""
        kind = event.type
        if kind == "token":
            return self._content(event.content)
        if kind == "reasoning":
            return {"reasoning_content": event.content}
        if kind == "tool_call":
            self._arguments[event.id] = event.arguments
        elif kind == "tool_result" and (block := self._tool_block(event)):
            return self._content(block if self._line_start else "\n" + block)
        return None

    def _content(self, text: str) -> dict[str, str]:
        if text:
            self._line_start = text.endswith("\n")
        return {"content": text}

    def _tool_block(self, event: ToolResultEvent) -> str:
        """A finished call as AGENT_TOOL_DISPLAY says: Open WebUI's block, a quoted markdown line, or nothing.

        Every value is HTML-escaped (quotes too): a result holding `"`, `</details>` or `<script>` stays text
        inside its block. Only finished blocks are sent: the stream only appends, so a spinner would stay.
        """
        arguments = JSON_ENCODER.encode(self._arguments.get(event.id, {}))
        outcome = f"Error: {event.error}" if event.error is not None else event.result or ""
        if self.display == "details":
            return (f'<details type="tool_calls" done="true" id="{html.escape(event.id)}" '
                    f'name="{html.escape(event.name)}" arguments="{html.escape(arguments)}">\n'
                    f"<summary>Tool Executed</summary>\n{html.escape(outcome)}\n</details>\n")
        if self.display == "markdown":
            line = " ".join(f"{event.name}({arguments}) → {outcome}".split())
            if len(line) > MARKDOWN_TOOL_CHARS:
                line = line[: MARKDOWN_TOOL_CHARS - 1] + "…"
            return f"> 🔧 {html.escape(line, quote=False)}\n\n"
        return ""

    def _chunk(self, delta: dict[str, Any] | None, finish_reason: str | None = None,
               usage: Usage | None = None) -> str:
        """One chat.completion.chunk frame; the usage chunk (no delta) has an empty `choices`."""
        choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason}]
        chunk: dict[str, Any] = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                                 "model": self.model, "choices": choices}
        if self.include_usage:
            chunk["usage"] = usage.model_dump() if usage is not None else None
        return f"data: {JSON_ENCODER.encode(chunk)}\n\n"

    def frame(self, event: StreamEvent) -> bytes:
        """The SSE text an event adds to the stream: a chunk, the end (finish, usage, [DONE]), or nothing."""
        if event.type == "done":
            end = self._chunk({}, "stop")
            if self.include_usage and event.usage is not None:
                end += self._chunk(None, usage=event.usage)
            return f"{end}data: [DONE]\n\n".encode()
        if event.type == "error":
            return b"data: " + openai_error(event.status, event.detail).body + b"\n\ndata: [DONE]\n\n"
        delta = self.delta(event)
        return self._chunk(delta).encode() if delta else b""

    def role_chunk(self) -> bytes:
        """The stream's first chunk, sent at once: the assistant's role."""
        return self._chunk({"role": "assistant", "content": ""}).encode()

    def response(self, events: list[StreamEvent], headers: dict[str, str]) -> Response:
        """The finished turn's events as one chat.completion."""
        content: list[str] = []
        reasoning: list[str] = []
        for event in events:
            if delta := self.delta(event):
                content.append(delta.get("content", ""))
                reasoning.append(delta.get("reasoning_content", ""))
        message: dict[str, Any] = {"role": "assistant", "content": "".join(content)}
        if any(reasoning):
            message["reasoning_content"] = "".join(reasoning)
        choice = {"index": 0, "message": message, "finish_reason": "stop", "logprobs": None}
        body: dict[str, Any] = {"id": self.id, "object": "chat.completion", "created": self.created,
                                "model": self.model, "choices": [choice]}
        if (usage := events[-1].usage) is not None:
            body["usage"] = usage.model_dump()
        return JSONResponse(body, headers=headers)


async def plain_completion_events(llm: VLLMClient, payload: dict[str, Any], *,
                                  stream: bool) -> AsyncIterator[StreamEvent]:
    """A background task as one plain vLLM completion, in the agent's event shapes: no tools, no turn, nothing
    stored."""
    if stream:
        assembler = StreamAssembler()
        async for _thinking, text in llm.stream(payload, assembler):  # a task's thinking is not shown
            if text:
                yield TokenEvent(content=text)
        completion = assembler.completion()
    else:
        completion = await llm.complete(payload)
        yield TokenEvent(content=completion.content)
    yield DoneEvent(conversation_id="", content=completion.content, usage=completion.usage)


async def busy_on_clash(events: AsyncIterator[StreamEvent], conversation_id: str) -> AsyncIterator[StreamEvent]:
    """Two first turns under one new id: the second to be stored meets the first's row; that is a 409."""
    try:
        async for event in events:
            yield event
    except IntegrityError as exc:
        raise ConversationBusy(f"conversation {conversation_id!r} was started by another request at the same "
                               "time; this turn was not stored") from exc


OPENAI_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": OpenAIErrorBody} for status in OPENAI_ERROR_CODES
}
openai_router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"], responses=OPENAI_RESPONSES,
                          dependencies=[Depends(require_api_key)])


@openai_router.get("/models", summary="The agent, as the one model of this OpenAI-compatible API")
async def list_models(agent: AgentDep) -> OpenAIModelList:
    name = agent.settings.agent_model_name
    return OpenAIModelList(data=[OpenAIModel(id=name, created=MODEL_CREATED, owned_by=name)])


@openai_router.get("/models/{model}", summary="The agent's model object")
async def retrieve_model(model: str, agent: AgentDep) -> OpenAIModel:
    name = agent.settings.agent_model_name
    check_model(model, name)
    return OpenAIModel(id=name, created=MODEL_CREATED, owned_by=name)


@openai_router.post("/chat/completions", response_model=None,
                    summary="Run one agent turn as an OpenAI chat completion (streamed when `stream` is true)")
async def chat_completions(body: ChatCompletionRequest, request: Request, agent: AgentDep) -> Response:
    """Stateless unless a conversation id comes in a header; Open WebUI's background tasks skip the agent."""
    settings = agent.settings
    check_model(body.model, settings.agent_model_name)
    body.check_supported()
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    completion = OpenAICompletion(body.model, settings.agent_tool_display, include_usage=include_usage)
    headers: dict[str, str] = {}
    if is_background_task(request, body):
        messages = wire_messages(body)
        if not messages:
            raise InvalidChatRequest("the request has no system, user or assistant message", "messages")
        payload = {"messages": messages, **settings.sampling(), **body.sampling()}
        events = plain_completion_events(agent.llm, payload, stream=body.stream)
    else:
        content, history, system = read_chat_input(body, settings.max_content_chars)
        conversation_id = requested_conversation(request)
        options = TurnOptions(system=system, sampling=body.sampling(), store=conversation_id is not None)
        if conversation_id is None:
            turn = OpenTurn(new_conversation_id(), history, None)
        else:
            turn = await agent.open_turn(conversation_id, content, create=True)
            headers["X-Conversation-ID"] = conversation_id
        events = agent.run_turn(turn, content, stream=body.stream, options=options)
        if conversation_id is not None and turn.is_new:
            events = busy_on_clash(events, conversation_id)
    if body.stream:
        return EventSourceResponse(sse_frames(agent, events, completion.frame, first=completion.role_chunk()),
                                   headers={**SSE_HEADERS, **headers})
    finished: list[StreamEvent] = []
    try:
        async with agent.deadline():
            async for event in events:
                finished.append(event)
    except AgentError as exc:  # a 503 before any tool ran may be retried; anything later would run them again
        logger.info("turn failed: %s %s", exc.status_code, exc)
        tools_ran = any(event.type == "tool_call" for event in finished)
        return openai_error(exc.status_code, str(exc), exc, retry=isinstance(exc, VLLMBusy) and not tools_ran)
    return completion.response(finished, headers)


# --- 10. App ---


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
            McpServers.start(settings.mcp_servers, REGISTRY) as app.state.mcp_servers,
            AsyncExitStack() as stack,
        ):
            app.state.agent = Agent(VLLMClient(http, vllm_transport, settings), REGISTRY, store, settings)
            app.state.runs = await stack.enter_async_context(RunRegistry.open(app.state.agent,
                                                                              settings.run_retention_s))
            if settings.api_key is None:
                logger.warning("API_KEY is not set: /api/v1 and /ui are open to anyone who can reach this port")
            # The startup heap (Gradio's mostly) stays out of the collector's scans while the service runs.
            thresholds = gc.get_threshold()
            gc.collect(1)
            gc.freeze()
            gc.set_threshold(YOUNG_GC_THRESHOLD, *thresholds[1:])
            try:
                yield
            finally:
                gc.set_threshold(*thresholds)
                gc.unfreeze()

    app = FastAPI(title="vLLM Agent Service", version="1.0.0", lifespan=lifespan,
                  description="A tool-using agent on a self-hosted vLLM server: REST, SSE and a Gradio page.")
    app.state.settings = settings
    app.state.api_key = settings.api_key.get_secret_value().encode() if settings.api_key else None
    app.add_middleware(CORSMiddleware, allow_origins=settings.allowed_origins,
                       allow_credentials="*" not in settings.allowed_origins,
                       allow_methods=["GET", "POST", "DELETE"],
                       allow_headers=["Authorization", "Content-Type", "Last-Event-ID", "X-Conversation-ID",
                                      "X-OpenWebUI-Chat-Id", "X-OpenWebUI-Task"],
                       expose_headers=["X-Request-ID", "X-Conversation-ID", "X-Run-ID", "Retry-After"])
    app.add_middleware(RequestContextMiddleware, max_body_bytes=6 * settings.max_content_chars + 65_536,
                       internal_error=lambda path: openai_error(500, "internal error")
                       if path.startswith(OPENAI_PREFIX) else internal_error(path))
    app.add_exception_handler(AgentError, openai_errors_on_v1(agent_error_handler))
    app.add_exception_handler(RequestValidationError, openai_errors_on_v1(validation_error_handler))
    app.add_exception_handler(StarletteHTTPException, openai_errors_on_v1(http_exception_handler))
    app.include_router(router)
    app.include_router(open_router)
    app.include_router(openai_router)

    @app.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse("/ui")

    mount_ui(app, settings)
    return app


app = create_app()

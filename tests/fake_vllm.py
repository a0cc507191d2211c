"""Fake vLLM: the OpenAI wire protocol of `vllm serve Qwen/Qwen2.5-7B-Instruct` (v0.11, hermes), no GPU.

  1. Script      Reply, RecordedRequest: what a test scripts and what the fake saw
  2. Errors      ApiError and vLLM's two error-body shapes
  3. Prompt      the verbatim Qwen2.5 chat template and a fake tokenizer
  4. Validation  the checks vLLM runs before generating, in its order, with its messages
  5. Responder   the deterministic default "model" used when the script is empty
  6. Hermes      vLLM's tool-call extraction: non-streaming, and the classic streaming parser
  7. Wire        response bodies and SSE chunks, compact JSON like starlette/pydantic
  8. Server      FakeVLLM: aiohttp app, auth, faults, disconnect tracking
  9. CLI         python tests/fake_vllm.py --port 8000

Ground truth: /work/shared/vllm-protocol.md (section numbers below refer to it).
"""

import argparse
import asyncio
import contextlib
import json
import re
import time
import uuid
import zlib
from collections import deque
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Literal

import jinja2
from aiohttp import web
from aiohttp.typedefs import Handler
from jinja2.sandbox import ImmutableSandboxedEnvironment

# --- 1. Script ---

FAULTS = frozenset(
    {"empty_500", "non_json", "garbage", "cut", "stream_error", "stall", "drop_last_brace", "no_args", "hang"}
)


@dataclass
class Reply:
    """One scripted answer of the fake to one POST /v1/chat/completions."""

    text: str = ""
    status: int = 200
    error_message: str = "Internal server error"
    delay_s: float = 0.0
    token_delay_s: float | None = None
    fault: str | None = None
    finish_reason: str = "stop"
    prompt_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.fault is not None and self.fault not in FAULTS:
            raise ValueError(f"unknown fault {self.fault!r}; use one of {sorted(FAULTS)}")
        if self.finish_reason not in ("stop", "length"):
            raise ValueError(f"finish_reason must be 'stop' or 'length', not {self.finish_reason!r}")


@dataclass
class RecordedRequest:
    """A POST /v1/chat/completions as received; header names are lower-cased."""

    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    prompt: str | None = None


_RECORD = web.RequestKey("fake_vllm_record", RecordedRequest)

# --- 2. Errors ---

_ERROR_TYPES = {400: "BadRequestError", 404: "NotFoundError", 500: "InternalServerError",
                503: "ServiceUnavailableError"}


class ApiError(Exception):
    """A request vLLM refuses before generating; `validation` marks FastAPI/pydantic-level refusals."""

    def __init__(self, message: str, status: int = 400, *, validation: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.validation = validation


def error_type(status: int) -> str:
    """The OpenAI-style `type` vLLM puts in an error body for an HTTP status."""
    if status in _ERROR_TYPES:
        return _ERROR_TYPES[status]
    try:
        return HTTPStatus(status).phrase.replace(" ", "").replace("-", "") + "Error"
    except ValueError:
        return "InternalServerError" if status >= 500 else "BadRequestError"


def error_body(shape: Literal["new", "old"], message: str, status: int, err_type: str) -> dict[str, Any]:
    """`{"error": {...}}` from v0.10.1 on, `{"object": "error", ...}` before (section 4)."""
    info = {"message": message, "type": err_type, "param": None, "code": status}
    return {"error": info} if shape == "new" else {"object": "error", **info}


def _preprocessing_error(exc: Exception) -> ApiError:
    """v0.10.1-v0.13 format prompt-preprocessing failures as f"{e} {e.__cause__}": a trailing " None"."""
    return ApiError(f"{exc} {exc.__cause__}")


def _pydantic_error(kind: str, loc: tuple[Any, ...], msg: str, value: Any, ctx: Any = None) -> ApiError:
    """FastAPI's 400 for a body pydantic rejects: str() of the error list (section 4: do not parse it)."""
    error: dict[str, Any] = {"type": kind, "loc": loc, "msg": msg, "input": value}
    if ctx is not None:
        error["ctx"] = ctx
    return ApiError(repr([error]), validation=True)


def _value_error(text: str, body: dict[str, Any]) -> ApiError:
    """A ChatCompletionRequest model_validator raising ValueError(text)."""
    return _pydantic_error("value_error", ("body",), f"Value error, {text}", body, {"error": ValueError(text)})


# --- 3. Prompt ---

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"

# Qwen2.5-*-Instruct tokenizer_config.json chat_template, verbatim (section 6); lines are long as published.
QWEN25_CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""  # noqa: E501


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    """HF transformers' `tojson`: unlike Jinja's own it neither HTML-escapes nor escapes non-ASCII."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _compile_template() -> jinja2.Template:
    """Compile once, in the environment HF's apply_chat_template uses."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    return env.from_string(QWEN25_CHAT_TEMPLATE)


_CHAT_TEMPLATE = _compile_template()

_TAG = r"<\|im_start\|>|<\|im_end\|>|</?tool_call>"
_PUNCT = rf'(?:(?!{_TAG})[^\w\s"])'
# Special tokens whole, digits one by one (as Qwen2.5's BPE), words with one leading space, punctuation runs
# holding at most one quote (so `"}}\n` closes a call in one token, as in section 3b), then whitespace.
_TOKEN = re.compile(rf'{_TAG}|\d| ?[^\W\d]+| ?(?:{_PUNCT}+"?|"{_PUNCT}*)\n*|\s+(?!\S)|\s+')
_SPECIAL_IDS = {"<|im_start|>": 151644, "<|im_end|>": 151645, TOOL_CALL_START: 151657, TOOL_CALL_END: 151658}


def tokenize(text: str) -> list[str]:
    """Fake Qwen2.5 tokens: they concatenate back to `text` exactly."""
    return _TOKEN.findall(text)


def token_ids(tokens: list[str]) -> list[int]:
    """Stable ids: Qwen's own for the special tokens, a CRC of the text for the rest."""
    return [_SPECIAL_IDS.get(token) or zlib.crc32(token.encode()) % 151643 for token in tokens]


def render_prompt(conversation: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                  add_generation_prompt: bool = True) -> str:
    """The prompt vLLM sends the engine; template failures are 400s as in vLLM."""
    try:
        return _CHAT_TEMPLATE.render(messages=conversation, tools=tools, add_generation_prompt=add_generation_prompt)
    except (jinja2.TemplateError, TypeError, ValueError) as exc:
        raise _preprocessing_error(exc) from exc


# --- 4. Validation ---

_ROLES = ("system", "user", "assistant", "tool")
_JSON_TYPE = re.compile(r"application/(?:[\w.-]+\+)?json")


def parse_json_body(raw: bytes, content_type: str) -> dict[str, Any]:
    """FastAPI + vLLM's validate_json_request: JSON errors first, then the media type, then the shape."""
    media_type = content_type.split(";", 1)[0].strip().lower()
    body: Any = None
    if raw and (not media_type or _JSON_TYPE.fullmatch(media_type)):
        try:
            body = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise _pydantic_error("json_invalid", ("body", exc.pos), "JSON decode error", {},
                                  {"error": exc.msg}) from exc
        except UnicodeDecodeError as exc:
            raise _pydantic_error("json_invalid", ("body", exc.start), "JSON decode error", {},
                                  {"error": "Invalid UTF-8"}) from exc
    if media_type != "application/json":
        raise ApiError(repr(["Unsupported Media Type: Only 'application/json' is allowed"]), validation=True)
    if body is None:
        raise _pydantic_error("missing", ("body",), "Field required", None)
    if not isinstance(body, dict):
        raise _pydantic_error("model_attributes_type", ("body",),
                              "Input should be a valid dictionary or object to extract fields from", body)
    return body


def check_chat_request(body: dict[str, Any], model: str) -> None:
    """ChatCompletionRequest's validators (section 1), then the served-model check (404)."""
    if body.get("stream_options") and not body.get("stream"):
        raise _value_error("Stream options can only be defined when `stream=True`.", body)
    _check_tools(body)
    _check_tool_choice(body)
    _check_messages(body)
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise _pydantic_error("int_type", ("body", key), "Input should be a valid integer", value)
    check_model(body, model)


def check_model(body: dict[str, Any], model: str) -> None:
    """An omitted model means the served one; any other name is a 404."""
    requested = body.get("model")
    if requested and requested != model:
        raise ApiError(f"The model `{requested}` does not exist.", 404)


def _check_tools(body: dict[str, Any]) -> None:
    """ChatCompletionToolsParam's shape, and no empty list."""
    tools = body.get("tools")
    if tools is None:
        return
    if tools == []:
        # Stricter than v0.11 (accepted there, but parsing is silently skipped): main rejects it since 18013df6.
        raise _value_error("`tools` must not be an empty array. Either provide at least one tool or omit the "
                           "field entirely.", body)
    if not isinstance(tools, list):
        raise _pydantic_error("list_type", ("body", "tools"), "Input should be a valid list", tools)
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise _pydantic_error("missing", ("body", "tools", i, "function", "name"), "Field required", tool)
        if tool.get("type", "function") != "function":
            raise _pydantic_error("literal_error", ("body", "tools", i, "type"), "Input should be 'function'",
                                  tool["type"], {"expected": "'function'"})


def _check_tool_choice(body: dict[str, Any]) -> None:
    """check_tool_usage@v0.10.1/v0.11, message for message."""
    choice = body.get("tool_choice")
    if choice is None or choice == "none":
        return
    if body.get("tools") is None:
        raise _value_error("When using `tool_choice`, `tools` must be set.", body)
    if choice not in ("auto", "required") and not isinstance(choice, dict):
        raise _value_error(f'Invalid value for `tool_choice`: {choice}! Only named tools, "none", "auto" or '
                           '"required" are supported.', body)
    if not isinstance(choice, dict):
        return
    usage = 'Correct usage: `{"type": "function", "function": {"name": "my_function"}}`'
    function = choice.get("function")
    if not isinstance(function, dict):
        raise _value_error(f"Invalid value for `function`: `{function}` in `tool_choice`! {usage}", body)
    if "name" not in function:
        raise _value_error(f"Expected field `name` in `function` in `tool_choice`! {usage}", body)
    name = function["name"]
    if not isinstance(name, str) or not name:
        raise _value_error(f"Invalid `name` in `function`: `{name}` in `tool_choice`! {usage}", body)
    if all(tool["function"]["name"] != name for tool in body["tools"]):
        raise _value_error("The tool specified in `tool_choice` does not match any of the specified `tools`", body)


def _check_messages(body: dict[str, Any]) -> None:
    """The message fields the fake relies on; echoed arguments must be strings, as pydantic demands."""
    messages = body.get("messages")
    if messages is None:
        raise _pydantic_error("missing", ("body", "messages"), "Field required", body)
    if not isinstance(messages, list):
        raise _pydantic_error("list_type", ("body", "messages"), "Input should be a valid list", messages)
    expected = "'system', 'user', 'assistant' or 'tool'"
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _pydantic_error("dict_type", ("body", "messages", i), "Input should be a valid dictionary", message)
        if message.get("role") not in _ROLES:
            # Stricter than vLLM, which accepts any role string and lets the template drop the message.
            raise _pydantic_error("literal_error", ("body", "messages", i, "role"), f"Input should be {expected}",
                                  message.get("role"), {"expected": expected})
        for j, call in enumerate(message.get("tool_calls") or ()):
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                raise _pydantic_error("missing", ("body", "messages", i, "tool_calls", j, "function", "name"),
                                      "Field required", call)
            if not isinstance(function.get("arguments"), str):
                raise _pydantic_error("string_type", ("body", "messages", i, "tool_calls", j, "function",
                                                      "arguments"), "Input should be a valid string",
                                      function.get("arguments"))


def _text_content(content: Any) -> str:
    """vLLM's "string" content format: text parts joined by newlines, None as ""."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for part in content if isinstance(content, list) else [content]:
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise _preprocessing_error(ValueError(f"Unsupported content part type for a text-only model: {kind}"))
        texts.append(part["text"])
    return "\n".join(texts)


def _parsed_arguments(arguments: str) -> dict[str, Any]:
    """vLLM json.loads echoed arguments before templating; a non-object is refused here, stricter than vLLM."""
    try:
        value = json.loads(arguments)
    except json.JSONDecodeError as exc:
        raise _preprocessing_error(exc) from exc
    if not isinstance(value, dict):
        raise _preprocessing_error(ValueError(f"Tool call arguments must be a JSON object, got: {arguments}"))
    return value


def to_conversation(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """vLLM's ConversationMessages: string content, parsed tool-call arguments; never mutates the request."""
    conversation = []
    for message in messages:
        turn: dict[str, Any] = {"role": message["role"], "content": _text_content(message.get("content"))}
        if message["role"] == "assistant" and message.get("tool_calls") is not None:
            turn["tool_calls"] = [{**call, "function": {**call["function"], "arguments": _parsed_arguments(
                call["function"]["arguments"])}} for call in message["tool_calls"]]
        if message["role"] == "tool" and "tool_call_id" in message:
            turn["tool_call_id"] = message["tool_call_id"]
        if isinstance(message.get("name"), str):
            turn["name"] = message["name"]
        conversation.append(turn)
    return conversation


def tool_dumps(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`tool.model_dump()` of ChatCompletionToolsParam: declared fields in order (nulls too), then extras."""
    dumps = []
    for tool in tools:
        function = tool["function"]
        dumped_function = {"name": function["name"], "description": function.get("description"),
                           "parameters": function.get("parameters")}
        dumped_function.update(function)
        extras = {key: value for key, value in tool.items() if key not in ("type", "function")}
        dumps.append({"type": "function", "function": dumped_function, **extras})
    return dumps


def check_context_length(prompt_tokens: int, body: dict[str, Any], max_model_len: int) -> int | None:
    """vLLM's _validate_input@v0.10.1+; returns the requested max tokens (max_completion_tokens wins)."""
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    if max_tokens is None:
        if prompt_tokens >= max_model_len:
            raise _preprocessing_error(ValueError(
                f"This model's maximum context length is {max_model_len} tokens. However, your request has "
                f"{prompt_tokens} input tokens. Please reduce the length of the input messages."))
    elif prompt_tokens + max_tokens > max_model_len:
        raise _preprocessing_error(ValueError(
            f"'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. This model's maximum context "
            f"length is {max_model_len} tokens and your request has {prompt_tokens} input tokens "
            f"({max_tokens} > {max_model_len} - {prompt_tokens})."))
    if max_tokens is not None and max_tokens < 1:
        raise ApiError(f"max_tokens must be at least 1, got {max_tokens}.")
    return max_tokens


# --- 5. Responder ---

_EXPRESSION = re.compile(r"[\d(][\d\s+\-*/%().]*")
_HAS_OPERATOR = re.compile(r"[\d)]\s*(?:\*\*|[-+*/%])\s*[\d(.]")
_CITY = re.compile(r"\b(seoul|new york|tokyo|london|paris)\b", re.IGNORECASE)
_TIMEZONES = {"seoul": "Asia/Seoul", "new york": "America/New_York", "tokyo": "Asia/Tokyo",
              "london": "Europe/London", "paris": "Europe/Paris"}
_HERMES_TOOLS = re.compile(r"<tools>\n(.*?)\n</tools>", re.DOTALL)  # not the "<tools></tools>" in the prose


def offered_tools(body: dict[str, Any], conversation: list[dict[str, Any]]) -> list[str]:
    """Tool names the model can see: request `tools`, or a client-rendered `<tools>` system prompt."""
    names = [tool["function"]["name"] for tool in body.get("tools") or ()]
    system = conversation[0]["content"] if conversation and conversation[0]["role"] == "system" else ""
    block = _HERMES_TOOLS.search(system)
    for line in block.group(1).splitlines() if block else ():
        try:
            tool = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(tool, dict):
            name = (tool.get("function") if isinstance(tool.get("function"), dict) else tool).get("name")
            if isinstance(name, str):
                names.append(name)
    return names


def _expression(text: str) -> str | None:
    """The first arithmetic expression in a user message, e.g. `2**16 / 7`."""
    for match in _EXPRESSION.finditer(text):
        expression = match.group().strip().rstrip(".").strip()
        while expression.endswith(")") and expression.count(")") > expression.count("("):
            expression = expression[:-1].rstrip()
        while expression.startswith("(") and expression.count("(") > expression.count(")"):
            expression = expression[1:].lstrip()
        if _HAS_OPERATOR.search(expression):
            return expression
    return None


def _hermes_call(name: str, arguments: dict[str, Any]) -> str:
    """One call exactly as Qwen2.5 writes it (section 6)."""
    call = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"{TOOL_CALL_START}\n{call}\n{TOOL_CALL_END}"


def _pad(text: str, answer_tokens: int) -> str:
    """Make a plain answer exactly `answer_tokens` streamed tokens long, for load benchmarks."""
    if answer_tokens <= 0:
        return text
    tokens = tokenize(text)[:answer_tokens]
    return "".join(tokens) + " word" * (answer_tokens - len(tokens))


def default_reply_text(conversation: list[dict[str, Any]], tool_names: list[str], answer_tokens: int) -> str:
    """Raw Qwen2.5 output of the deterministic stand-in model used when the script is empty."""
    if conversation and conversation[-1]["role"] == "tool":
        results: list[str] = []
        for message in reversed(conversation):
            if message["role"] != "tool":
                break
            results.insert(0, message["content"])
        return _pad(f"The results: {'; '.join(results)}.", answer_tokens)
    user = next((m["content"] for m in reversed(conversation) if m["role"] == "user"), "")
    calls = []
    expression = _expression(user)
    if expression is not None and "calculator" in tool_names:
        calls.append(_hermes_call("calculator", {"expression": expression}))
    if "get_current_time" in tool_names:
        for city in _CITY.findall(user):
            calls.append(_hermes_call("get_current_time", {"timezone": _TIMEZONES[city.lower()]}))
    return "\n".join(calls) if calls else _pad(f"You said: {user}", answer_tokens)


# --- 6. Hermes ---

_TOOL_CALL_BLOCK = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)", re.DOTALL)
_NAME_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"')
_ARGUMENTS_KEY = re.compile(r'\s*,\s*"arguments"\s*:\s*')
_FIRST_KEY = re.compile(r'\{\s*"(?:[^"\\]|\\.)*"\s*:\s*')
_DECODER = json.JSONDecoder()


def tool_call_id() -> str:
    """make_tool_call_id@v0.11: 32 hex digits (16 only from db290610)."""
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


def extract_tool_calls(text: str) -> tuple[str | None, list[tuple[str, str]]] | None:
    """Hermes2ProToolParser.extract_tool_calls: (content, [(name, arguments)]), None if it all stays content."""
    if TOOL_CALL_START not in text:
        return None
    try:
        objects = [json.loads(closed or unclosed) for closed, unclosed in _TOOL_CALL_BLOCK.findall(text)]
        calls = [(obj["name"], json.dumps(obj["arguments"], ensure_ascii=False)) for obj in objects]
    except (ValueError, KeyError, TypeError):
        return None
    if not all(isinstance(name, str) for name, _ in calls):
        return None
    return text[: text.find(TOOL_CALL_START)] or None, calls


@dataclass(frozen=True)
class _BlockPlan:
    """Where, in a block body, the partial-JSON parses the classic parser relies on start to succeed."""

    name: str | None = None
    name_end: int = 0
    args_start: int = 0
    first_value: int | None = None
    json_end: int | None = None


def _plan_block(body: str) -> _BlockPlan:
    """Offsets for `{"name": "...", "arguments": {...}}`; another layout streams nothing, like a parse failure."""
    head = _NAME_HEAD.match(body)
    try:
        name = json.loads(f'"{head.group(1)}"') if head else None
    except json.JSONDecodeError:
        name = None
    if not head or not name:
        return _BlockPlan()
    try:
        json_end: int | None = _DECODER.raw_decode(body, len(body) - len(body.lstrip()))[1]
    except json.JSONDecodeError:
        json_end = None
    args = _ARGUMENTS_KEY.match(body, head.end())
    if args is None or args.end() >= len(body):
        return _BlockPlan(name, head.end(), json_end=json_end)
    first_value: int | None = args.end()
    if body[args.end()] == "{":
        key = _FIRST_KEY.match(body, args.end())
        first_value = key.end() if key and key.end() < len(body) else None
    return _BlockPlan(name, head.end(), args.end(), first_value, json_end)


class _BlockStream:
    """One <tool_call> block through the classic parser (hermes_tool_parser.py@v0.11), token by token."""

    def __init__(self, index: int, text: str, start: int) -> None:
        ends = [i for i in (text.find(TOOL_CALL_END, start), text.find(TOOL_CALL_START, start)) if i >= 0]
        self.body = text[start: min(ends, default=len(text))]
        self.start = start
        self.index = index
        self.plan = _plan_block(self.body)
        self.name_sent = False
        self.args_started = False

    def feed(self, token: str, end: int) -> dict[str, Any] | None:
        """The delta for the token ending at text offset `end`; None when the parser returns None."""
        end -= self.start
        plan = self.plan
        if plan.name is None or (not self.name_sent and end < plan.name_end):
            return None
        if not self.name_sent:
            self.name_sent = True
            return {"tool_calls": [{"id": tool_call_id(), "type": "function", "index": self.index,
                                    "function": {"name": plan.name}}]}
        if self.args_started:
            complete = plan.json_end is not None and end >= plan.json_end and not self.body[plan.json_end:end].strip()
            if complete and token.rstrip().endswith("}"):
                token = token.rstrip()[:-1]  # the outer brace closes the call, not the arguments
            return self._arguments(token)
        if plan.first_value is None or end <= plan.first_value:
            return None  # `{}` parses to falsy arguments: parameterless calls stream none (vllm#11392)
        so_far = self.body[plan.args_start:end].rstrip()
        if token not in so_far:
            return None
        self.args_started = True
        return self._arguments(so_far[: so_far.rindex(token) + len(token)])

    def _arguments(self, fragment: str) -> dict[str, Any]:
        return {"tool_calls": [{"index": self.index, "function": {"arguments": fragment}}]}


def stream_deltas(tokens: list[str], parse_tools: bool) -> list[dict[str, Any] | None]:
    """Per generated token, the delta vLLM streams for it (None: no chunk), section 3b/3c."""
    if not parse_tools:
        return [{"content": token} for token in tokens]
    text = "".join(tokens)
    deltas: list[dict[str, Any] | None] = []
    block: _BlockStream | None = None
    index, end = -1, 0
    for token in tokens:
        end += len(token)
        if token == TOOL_CALL_START:
            index += 1
            block = _BlockStream(index, text, end)
            deltas.append(None)
        elif token == TOOL_CALL_END:
            block = None
            deltas.append(None if index >= 0 else {"content": token})
        else:
            deltas.append(block.feed(token, end) if block else {"content": token})
    return deltas


def _is_arguments(delta: dict[str, Any] | None) -> bool:
    return delta is not None and "arguments" in delta.get("tool_calls", [{}])[0].get("function", {})


def apply_stream_fault(deltas: list[dict[str, Any] | None], fault: str | None) -> list[dict[str, Any] | None]:
    """`no_args` (vllm#11392) drops every argument delta; `drop_last_brace` (vllm#19056) a call's final `}`."""
    if fault == "no_args":
        return [None if _is_arguments(delta) else delta for delta in deltas]
    if fault != "drop_last_brace":
        return deltas
    last: dict[int, int] = {}
    for position, delta in enumerate(deltas):
        if delta is not None and _is_arguments(delta):
            last[delta["tool_calls"][0]["index"]] = position
    faulty = list(deltas)
    for position in last.values():
        call = deltas[position]["tool_calls"][0]
        fragment = call["function"]["arguments"].rstrip()
        fragment = fragment[:-1] if fragment.endswith("}") else fragment
        faulty[position] = {"tool_calls": [{**call, "function": {"arguments": fragment}}]} if fragment else None
    return faulty


# --- 7. Wire ---


def dumps(value: Any) -> str:
    """Compact JSON as starlette's JSONResponse and pydantic's model_dump_json write it."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def json_response(value: Any, status: int = 200) -> web.Response:
    """starlette's JSONResponse: `application/json` without a charset."""
    return web.Response(body=dumps(value).encode(), status=status, content_type="application/json")


def completion_body(completion_id: str, model: str, message: dict[str, Any], finish_reason: str,
                    prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """ChatCompletionResponse.model_dump()@v0.11: every key, nulls included (section 2a/2b)."""
    return {
        "id": completion_id, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason,
                     "stop_reason": None, "token_ids": None}],
        "service_tier": None, "system_fingerprint": None,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + completion_tokens,
                  "completion_tokens": completion_tokens, "prompt_tokens_details": None},
        "prompt_logprobs": None, "prompt_token_ids": None, "kv_transfer_params": None,
    }


def assistant_message(content: str | None, calls: list[tuple[str, str]]) -> dict[str, Any]:
    """ChatMessage@v0.11, `tool_calls: []` when there are none (omitted only from 6c427dd4)."""
    tool_calls = [{"id": tool_call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}
                  for name, arguments in calls]
    return {"role": "assistant", "content": content, "refusal": None, "annotations": None, "audio": None,
            "function_call": None, "tool_calls": tool_calls, "reasoning_content": None}


DONE = b"data: [DONE]\n\n"


class SseChunks:
    """ChatCompletionStreamResponse events of one stream (exclude_unset): same id, created and model."""

    def __init__(self, completion_id: str, model: str) -> None:
        self._head = (f'data: {{"id":{dumps(completion_id)},"object":"chat.completion.chunk",'
                      f'"created":{int(time.time())},"model":{dumps(model)},"choices":')

    def role(self) -> bytes:
        return (self._head + '[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,'
                '"finish_reason":null}],"prompt_token_ids":null}\n\n').encode()

    def delta(self, delta: dict[str, Any]) -> bytes:
        return (self._head + f'[{{"index":0,"delta":{dumps(delta)},"logprobs":null,"finish_reason":null,'
                '"token_ids":null}]}\n\n').encode()

    def final(self, delta: dict[str, Any], finish_reason: str) -> bytes:
        return (self._head + f'[{{"index":0,"delta":{dumps(delta)},"logprobs":null,"finish_reason":'
                f'{dumps(finish_reason)},"stop_reason":null,"token_ids":null}}]}}\n\n').encode()

    def usage(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + completion_tokens,
                 "completion_tokens": completion_tokens}
        return (self._head + f'[],"usage":{dumps(usage)}}}\n\n').encode()


def stream_error_event(shape: Literal["new", "old"], message: str) -> bytes:
    """The in-stream error of section 3e: json.dumps default spacing, always 400 through v0.11."""
    info = {"message": message, "type": "BadRequestError", "param": None, "code": 400}
    payload = {"error": info if shape == "new" else {"object": "error", **info}}
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()


GARBAGE = [b"data: {not json\n\n", b'data: {"id":"chatcmpl-\n\n']


# --- 8. Server ---

CHAT_PATH = "/v1/chat/completions"
STALL_S = 3600.0
_FEW_CHUNKS = 3  # the role chunk and two deltas: what a faulty stream sends before it goes wrong


@dataclass
class _Turn:
    """A chat request that passed every check: what generation and the response need."""

    body: dict[str, Any]
    conversation: list[dict[str, Any]]
    parse_tools: bool
    prompt_tokens: int
    max_tokens: int | None
    completion_id: str
    tool_names: list[str]

    @property
    def stream(self) -> bool:
        return self.body.get("stream") is True

    @property
    def include_usage(self) -> bool:
        options = self.body.get("stream_options")
        return isinstance(options, dict) and bool(options.get("include_usage", True))  # True by default in v0.11


class FakeVLLM:
    """A scripted, recording stand-in for `vllm serve` on the current event loop."""

    def __init__(self, *, model: str = "Qwen/Qwen2.5-7B-Instruct", tool_parser: bool = True,
                 error_shape: Literal["new", "old"] = "new", api_key: str | None = None,
                 max_model_len: int = 32768, token_delay_s: float = 0.0, answer_tokens: int = 0,
                 keep_requests: bool = True) -> None:
        self.model = model
        self.keep_requests = keep_requests  # the CLI (benchmarks) turns it off: a long run would grow without bound
        self.tool_parser = tool_parser
        self.error_shape = error_shape
        self.api_key = api_key
        self.max_model_len = max_model_len
        self.token_delay_s = token_delay_s
        self.answer_tokens = answer_tokens
        self.requests: list[RecordedRequest] = []
        self.disconnects = 0
        self.open_streams = 0
        self._script: deque[Reply] = deque()
        self._runner: web.AppRunner | None = None
        self._url: str | None = None
        self._handlers: set[asyncio.Task[Any]] = set()
        self._stopping = False

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        app = web.Application(middlewares=[self._guard], client_max_size=256 * 1024 * 1024)
        app.add_routes([
            web.post(CHAT_PATH, self._chat), web.get("/v1/models", self._models), web.get("/health", self._health),
            web.get("/version", self._version), web.post("/tokenize", self._tokenize),
        ])
        # handler_cancellation: a client that goes away cancels its handler, which is how disconnects are seen.
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()
        self._url = f"http://{host}:{self._runner.addresses[0][1]}"
        self._stopping = False

    async def stop(self) -> None:
        """Stop serving; stalled and hanging handlers are cancelled rather than waited for."""
        if self._runner is None:
            return
        self._stopping = True
        for task in list(self._handlers):
            task.cancel()
        await self._runner.cleanup()
        self._runner = None

    async def __aenter__(self) -> "FakeVLLM":
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def url(self) -> str:
        if self._url is None:
            raise RuntimeError("FakeVLLM is not started")
        return self._url

    def script(self, *replies: Reply | str) -> None:
        self._script.extend(Reply(text=reply) if isinstance(reply, str) else reply for reply in replies)

    @property
    def remaining(self) -> int:
        return len(self._script)

    # Requests in, errors out.

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Record chat requests (even refused ones), enforce the API key on /v1, answer unknown routes."""
        if request.path == CHAT_PATH and request.method == "POST":
            raw = await request.read()
            try:
                body = json.loads(raw)
            except ValueError:
                body = {}
            headers = {name.lower(): value for name, value in request.headers.items()}
            request[_RECORD] = RecordedRequest(request.path, headers, body if isinstance(body, dict) else {})
            if self.keep_requests:
                self.requests.append(request[_RECORD])
        if (self.api_key is not None and request.path.startswith("/v1") and request.method != "OPTIONS"
                and request.headers.get("Authorization") != f"Bearer {self.api_key}"):
            return json_response({"error": "Unauthorized"}, 401)
        try:
            return await handler(request)
        except web.HTTPException as exc:  # FastAPI's {"detail": ...} for 404/405
            return json_response({"detail": exc.reason}, exc.status)

    def _error(self, status: int, message: str, err_type: str | None = None) -> web.Response:
        body = error_body(self.error_shape, message, status, err_type or error_type(status))
        return json_response(body, status)

    def _api_error(self, exc: ApiError) -> web.Response:
        validation_type = "Bad Request" if self.error_shape == "new" else "BadRequestError"
        return self._error(exc.status, exc.message, validation_type if exc.validation else None)

    # Endpoints.

    async def _health(self, _: web.Request) -> web.Response:
        return web.Response(status=200)

    async def _version(self, _: web.Request) -> web.Response:
        return json_response({"version": "0.11.0"})

    async def _models(self, _: web.Request) -> web.Response:
        now = int(time.time())
        permission = {"id": f"modelperm-{uuid.uuid4().hex}", "object": "model_permission", "created": now,
                      "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True,
                      "allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False,
                      "organization": "*", "group": None, "is_blocking": False}
        card = {"id": self.model, "object": "model", "created": now, "owned_by": "vllm", "root": self.model,
                "parent": None, "max_model_len": self.max_model_len, "permission": [permission]}
        return json_response({"object": "list", "data": [card]})

    async def _tokenize(self, request: web.Request) -> web.Response:
        """POST /tokenize with `prompt`, or `messages` (+`tools`) rendered exactly as for a chat request."""
        try:
            body = parse_json_body(await request.read(), request.headers.get("Content-Type", ""))
            check_model(body, self.model)
            if isinstance(body.get("messages"), list):
                _check_tools(body)
                _check_messages(body)
                tools = tool_dumps(body["tools"]) if body.get("tools") else None
                text = render_prompt(to_conversation(body["messages"]), tools,
                                     body.get("add_generation_prompt") is not False)
            elif isinstance(body.get("prompt"), str):
                text = body["prompt"]
            else:
                raise _pydantic_error("missing", ("body", "prompt"), "Field required", body)
        except ApiError as exc:
            return self._api_error(exc)
        tokens = tokenize(text)
        return json_response({"count": len(tokens), "max_model_len": self.max_model_len, "tokens": token_ids(tokens),
                              "token_strs": tokens if body.get("return_token_strs") else None})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        handler = asyncio.current_task()
        if handler is not None:
            self._handlers.add(handler)
        try:
            try:
                turn = self._prepare(request, await request.read(), request[_RECORD])
            except ApiError as exc:
                return self._api_error(exc)
            return await self._answer(request, turn, self._next_reply(turn))
        finally:
            self._handlers.discard(handler)

    def _prepare(self, request: web.Request, raw: bytes, record: RecordedRequest) -> _Turn:
        """Everything vLLM does before the engine, in its order (section 1, 4); fills record.prompt."""
        body = parse_json_body(raw, request.headers.get("Content-Type", ""))
        check_chat_request(body, self.model)
        tools = body.get("tools")
        choice = body.get("tool_choice", "auto" if tools else "none")
        if choice == "auto" and tools and not self.tool_parser:
            raise ApiError('"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set')
        chat_template_kwargs = body.get("chat_template_kwargs")
        if body.get("chat_template") is not None or (
                isinstance(chat_template_kwargs, dict) and chat_template_kwargs.get("chat_template") is not None):
            raise ApiError("Chat template is passed with request, but --trust-request-chat-template is not set. "
                           "Refused request with untrusted chat template.")
        conversation = to_conversation(body["messages"])
        record.prompt = render_prompt(conversation, tool_dumps(tools) if tools else None,
                                      body.get("add_generation_prompt") is not False)
        prompt_tokens = len(tokenize(record.prompt))
        max_tokens = check_context_length(prompt_tokens, body, self.max_model_len)
        if choice is None:  # v0.11's two code paths disagree on an explicit null: only streaming parses
            parse = bool(tools) and self.tool_parser and body.get("stream") is True
        else:
            parse = bool(tools) and self.tool_parser and choice != "none"
        request_id = request.headers.get("X-Request-Id") or body.get("request_id") or uuid.uuid4().hex
        return _Turn(body, conversation, parse, prompt_tokens, max_tokens, f"chatcmpl-{request_id}",
                     offered_tools(body, conversation))

    def _next_reply(self, turn: _Turn) -> Reply:
        """The next scripted reply; only requests that reach the "engine" consume one."""
        if self._script:
            return self._script.popleft()
        return Reply(text=default_reply_text(turn.conversation, turn.tool_names, self.answer_tokens))

    # Answers.

    async def _answer(self, request: web.Request, turn: _Turn, reply: Reply) -> web.StreamResponse:
        if reply.delay_s > 0:
            await asyncio.sleep(reply.delay_s)
        if reply.fault == "hang":
            await asyncio.sleep(STALL_S)
        if reply.fault == "empty_500":
            return web.Response(status=500)  # v0.11's dead-engine handler: no body at all
        if reply.fault == "non_json":
            return web.Response(body=b"<html>oops</html>", content_type="application/json")
        if reply.status != 200:
            return self._error(reply.status, reply.error_message)
        tokens = tokenize(reply.text)
        finish_reason = reply.finish_reason
        limit = turn.max_tokens if turn.max_tokens is not None else self.max_model_len - turn.prompt_tokens
        if len(tokens) >= limit:  # no room left for the EOS token
            tokens, finish_reason = tokens[:limit], "length"
        completion_tokens = len(tokens) + (finish_reason == "stop")  # the EOS token counts, as in vLLM
        prompt_tokens = reply.prompt_tokens if reply.prompt_tokens is not None else turn.prompt_tokens
        if turn.stream:
            sse = SseChunks(turn.completion_id, self.model)
            chunks = self._stream_chunks(sse, turn, reply, tokens, finish_reason)
            tail = [sse.usage(prompt_tokens, completion_tokens)] if turn.include_usage else []
            return await self._stream(request, chunks, [*tail, DONE], reply)
        text = "".join(tokens)
        extracted = extract_tool_calls(text) if turn.parse_tools else None
        message = assistant_message(*extracted) if extracted else assistant_message(text, [])
        body = completion_body(turn.completion_id, self.model, message, "tool_calls" if extracted else finish_reason,
                               prompt_tokens, completion_tokens)
        return json_response(body)

    @staticmethod
    def _stream_chunks(sse: SseChunks, turn: _Turn, reply: Reply, tokens: list[str],
                       finish_reason: str) -> list[bytes]:
        """Role chunk, one chunk per token that yields a delta, then the finish chunk (section 3)."""
        deltas = apply_stream_fault(stream_deltas(tokens, turn.parse_tools), reply.fault)
        final: dict[str, Any] | None = {"content": ""}  # the EOS step: <|im_end|> detokenizes to ""
        if finish_reason == "length" and deltas:
            final = deltas.pop()  # no EOS step: the last token's delta rides on the finish chunk
        if any(delta and "id" in delta.get("tool_calls", [{}])[0] for delta in [*deltas, final]):
            finish_reason = "tool_calls"  # v0.11 says so whenever a call was streamed, even when cut by length
        return [sse.role(), *(sse.delta(d) for d in deltas if d is not None), sse.final(final or {}, finish_reason)]

    async def _stream(self, request: web.Request, chunks: list[bytes], tail: list[bytes],
                      reply: Reply) -> web.StreamResponse:
        """Send an SSE stream, faults included; count clients that leave early."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        delay = self.token_delay_s if reply.token_delay_s is None else reply.token_delay_s
        self.open_streams += 1
        try:
            await response.prepare(request)
            if reply.fault == "stall":
                await self._send(response, chunks[:_FEW_CHUNKS], delay)
                await asyncio.sleep(STALL_S)
            elif reply.fault in ("garbage", "stream_error"):
                await self._send(response, chunks[:_FEW_CHUNKS], delay)
                broken = GARBAGE if reply.fault == "garbage" else [
                    stream_error_event(self.error_shape, reply.error_message)]
                await self._send(response, [*broken, DONE], 0.0)
            elif reply.fault == "cut":
                events = [*chunks, *tail]
                await self._send(response, events[: max(1, len(events) // 2)], delay)
                if request.transport is not None:
                    request.transport.close()  # no terminating chunk: the client sees an incomplete body
            else:
                await self._send(response, chunks, delay)
                await self._send(response, tail, 0.0)
        except ConnectionResetError:
            self.disconnects += 1
        except asyncio.CancelledError:
            if not self._stopping:
                self.disconnects += 1
            raise
        finally:
            self.open_streams -= 1
        return response

    @staticmethod
    async def _send(response: web.StreamResponse, events: list[bytes], delay: float) -> None:
        """Write events, sleeping `delay` between them as a decoding step would."""
        for i, event in enumerate(events):
            if i and delay > 0:
                await asyncio.sleep(delay)
            await response.write(event)


# --- 9. CLI ---


async def _serve(args: argparse.Namespace) -> None:
    fake = FakeVLLM(model=args.model, tool_parser=args.tool_parser, api_key=args.api_key,
                    max_model_len=args.max_model_len, token_delay_s=args.token_delay, answer_tokens=args.answer_tokens,
                    keep_requests=False)
    await fake.start(args.host, args.port)
    print(f"fake vLLM listening on {fake.url}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await fake.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve the fake vLLM with its default responder.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--no-tool-parser", dest="tool_parser", action="store_false",
                        help="behave like vllm serve without --enable-auto-tool-choice --tool-call-parser hermes")
    parser.add_argument("--token-delay", type=float, default=0.0, help="seconds between streamed chunks")
    parser.add_argument("--answer-tokens", type=int, default=0, help="make plain answers exactly N tokens")
    parser.add_argument("--api-key")
    parser.add_argument("--model", default="Qwen/Qwen2.5-7B-Instruct")
    parser.add_argument("--max-model-len", type=int, default=32768)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is the normal way to stop it
        asyncio.run(_serve(parser.parse_args()))


if __name__ == "__main__":
    main()

"""Fake vLLM: the OpenAI wire protocol of `vllm serve` for Qwen models, no GPU.

Two versions, chosen per instance (default: $FAKE_VLLM_VERSION, else "0.11"):
  "0.11"  vLLM v0.11 serving Qwen/Qwen2.5-7B-Instruct with hermes (section 1-9 of the protocol notes)
  "0.33"  vLLM 0.33.0 (checklist A.14): Qwen2.5, hybrid Qwen3 or Qwen3.5 templates, hermes or qwen3_coder tool
          calls, the qwen3 reasoning parser, or no parser at all (raw text, A.9)

  1. Script      Reply, RecordedRequest: what a test scripts and what the fake saw
  2. Errors      ApiError and vLLM's error bodies, per version
  3. Prompt      the verbatim Qwen2.5 / Qwen3 / Qwen3.5 chat templates and a fake tokenizer
  4. Validation  the checks vLLM runs before generating, in its order, with its messages
  5. Responder   the deterministic default "model" used when the script is empty, per model family
  6. Hermes      vLLM's hermes tool-call extraction: v0.11's classic streaming parser, 0.33's rewrite
  7. Qwen3       0.33's qwen3 parser engine (vllm/parser/engine/*, vllm/parser/qwen3.py), ported
  8. Parsing     0.33's DelegatingParser and message assembly: raw text to reasoning, content and calls
  9. Wire        response bodies and SSE chunks, compact JSON like starlette/pydantic
 10. Server      FakeVLLM: aiohttp app, auth, admission, keep-alive, faults, disconnect tracking
 11. CLI         python tests/fake_vllm.py --port 8000 [--version 0.33 --template qwen3.5 ...]

The generator (a scripted Reply.text, or the default responder) only writes the raw text the model generates
after the prompt; the parsers of sections 6-8 turn it into the response, as the server would.
Ground truth: /work/shared/vllm-protocol.md (section numbers below refer to it).
"""

import argparse
import asyncio
import contextlib
import json
import math
import os
import re
import time
import uuid
import zlib
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Literal, cast

import jinja2
from aiohttp import web
from aiohttp.typedefs import Handler
from jinja2.sandbox import ImmutableSandboxedEnvironment

# --- 1. Script ---

Version = Literal["0.11", "0.33"]
Template = Literal["qwen2.5", "qwen3", "qwen3.5"]
ToolParserName = Literal["hermes", "qwen3_coder"]
VERSION_ENV = "FAKE_VLLM_VERSION"
VERSIONS: tuple[Version, ...] = ("0.11", "0.33")
TEMPLATES: tuple[Template, ...] = ("qwen2.5", "qwen3", "qwen3.5")
DEFAULT_MODELS: dict[Template, str] = {"qwen2.5": "Qwen/Qwen2.5-7B-Instruct", "qwen3": "Qwen/Qwen3-8B",
                                       "qwen3.5": "Qwen/Qwen3.5-35B-A3B"}

FAULTS = frozenset({"empty_500", "non_json", "garbage", "cut", "stream_error", "stream_error_503", "stall",
                    "drop_last_brace", "no_args", "hang", "busy", "engine_dead"})


@dataclass
class Reply:
    """One scripted answer of the fake to one POST /v1/chat/completions.

    `text` is the raw text the model generates after the prompt (a Qwen3.5 thought under an open `<think>`
    therefore starts without the tag); the configured parsers turn it into the response. `finish_reason`
    "length" ends generation after `text` without an end-of-sequence token; a request's max_tokens (or the
    context window) cuts `text` short the same way.
    """

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
# QueueOverflowError (--max-num-queued-reqs) and EngineDeadError.CLIENT_MESSAGE in vllm/exceptions.py@0.33.
ADMISSION_MESSAGE = ("The engine is currently busy and cannot accept new requests. Please try again later or on "
                     "a different instance.")
ENGINE_DEAD_MESSAGE = "The server had an error while processing your request."


class ApiError(Exception):
    """A request vLLM refuses before generating.

    `validation` marks FastAPI/pydantic-level refusals (type "Bad Request"); `param` is 0.33's `error.param`.
    """

    def __init__(self, message: str, status: int = 400, *, validation: bool = False, param: str | None = None,
                 err_type: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.validation = validation
        self.param = param
        self.err_type = err_type


def error_type(status: int) -> str:
    """The OpenAI-style `type` vLLM puts in an error body for an HTTP status."""
    if status in _ERROR_TYPES:
        return _ERROR_TYPES[status]
    try:
        return HTTPStatus(status).phrase.replace(" ", "").replace("-", "") + "Error"
    except ValueError:
        return "InternalServerError" if status >= 500 else "BadRequestError"


def error_body(shape: Literal["new", "old"], message: str, status: int, err_type: str,
               param: str | None = None) -> dict[str, Any]:
    """`{"error": {...}}` from v0.10.1 on, `{"object": "error", ...}` before (section 4)."""
    info = {"message": message, "type": err_type, "param": param, "code": status}
    return {"error": info} if shape == "new" else {"object": "error", **info}


def _validator_error(version: Version, text: str, param: str, body: dict[str, Any]) -> ApiError:
    """A ChatCompletionRequest model validator refusing: pydantic's wrapped ValueError in v0.11, in 0.33 a
    VLLMValidationError rendered with `param` and the ` (parameter=…)` suffix, without the request (A.4)."""
    if version == "0.33":
        return ApiError(f"{text} (parameter={param})", param=param)
    return _pydantic_error(version, "value_error", ("body",), f"Value error, {text}", body,
                           {"error": ValueError(text)})


def _preprocessing_error(version: Version, exc: Exception) -> ApiError:
    """v0.10.1-v0.13 format prompt-preprocessing failures as f"{e} {e.__cause__}": a trailing " None"."""
    return ApiError(f"{exc} {exc.__cause__}" if version == "0.11" else str(exc))


def _summary(value: Any) -> Any:
    """0.33's size-bounded stand-in for a validation error's `input` (exception_handling/handlers/validation.py)."""
    if isinstance(value, str):
        return value[:200] + "...[truncated]" if len(value) > 200 else value
    if isinstance(value, (list, tuple, set, frozenset, dict)):
        return f"<{type(value).__name__} of {len(value)} items>"
    text = str(value)
    return text[:200] + "...[truncated]" if len(text) > 200 else text


def _dotted(loc: tuple[Any, ...]) -> str:
    """0.33's clean_loc_for_param: a dotted path without pydantic's internal markers ("arguments" is one)."""
    return ".".join(str(part) for part in loc if part != "arguments")


@dataclass(frozen=True)
class FieldError:
    """One pydantic error as FastAPI's RequestValidationError lists it."""

    kind: str
    loc: tuple[Any, ...]
    msg: str
    value: Any
    ctx: Any = None

    def as_dict(self, version: Version) -> dict[str, Any]:
        """v0.11 shows the raw error; 0.33 joins `loc` into a dotted path and summarises `input`."""
        loc: Any = self.loc if version == "0.11" else _dotted(self.loc)
        error: dict[str, Any] = {"type": self.kind, "loc": loc, "msg": self.msg,
                                 "input": self.value if version == "0.11" else _summary(self.value)}
        if self.ctx is not None:
            error["ctx"] = self.ctx
        return error


def validation_error(version: Version, errors: list[FieldError]) -> ApiError:
    """FastAPI's 400 for a body pydantic rejects: str() of the list in v0.11 (section 4: do not parse it),
    "N validation error(s):" one per line in 0.33 with `param` the first error's location (A.4)."""
    if version == "0.11":
        return ApiError(repr([errors[0].as_dict(version)]), validation=True)
    label = "error" if len(errors) == 1 else "errors"
    lines = "".join(f"\n  {error.as_dict(version)}" for error in errors[:10])
    more = f"\n  ...and {len(errors) - 10} more {label}" if len(errors) > 10 else ""
    return ApiError(f"{len(errors)} validation {label}:{lines}{more}", validation=True,
                    param=_dotted(errors[0].loc))


def _pydantic_error(version: Version, kind: str, loc: tuple[Any, ...], msg: str, value: Any,
                    ctx: Any = None) -> ApiError:
    """A single pydantic error."""
    return validation_error(version, [FieldError(kind, loc, msg, value, ctx)])

# --- 3. Prompt ---

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
THINK_START = "<think>"
THINK_END = "</think>"

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


# vLLM 0.33.0's test copy of the Qwen3 (0.6B) template, verbatim (rust/src/chat/tests/templates/qwen3.jinja).
QWEN3_CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}
"""  # noqa: E501

# vLLM 0.33.0's test copy of the Qwen3.5-0.8B template, verbatim (rust/src/chat/tests/templates/qwen35.jinja).
QWEN35_CHAT_TEMPLATE = r"""{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- macro render_content(content, do_vision_count, is_system_content=false) %}
    {%- if content is string %}
        {{- content }}
    {%- elif content is iterable and content is not mapping %}
        {%- for item in content %}
            {%- if 'image' in item or 'image_url' in item or item.type == 'image' %}
                {%- if is_system_content %}
                    {{- raise_exception('System message cannot contain images.') }}
                {%- endif %}
                {%- if do_vision_count %}
                    {%- set image_count.value = image_count.value + 1 %}
                {%- endif %}
                {%- if add_vision_id %}
                    {{- 'Picture ' ~ image_count.value ~ ': ' }}
                {%- endif %}
                {{- '<|vision_start|><|image_pad|><|vision_end|>' }}
            {%- elif 'video' in item or item.type == 'video' %}
                {%- if is_system_content %}
                    {{- raise_exception('System message cannot contain videos.') }}
                {%- endif %}
                {%- if do_vision_count %}
                    {%- set video_count.value = video_count.value + 1 %}
                {%- endif %}
                {%- if add_vision_id %}
                    {{- 'Video ' ~ video_count.value ~ ': ' }}
                {%- endif %}
                {{- '<|vision_start|><|video_pad|><|vision_end|>' }}
            {%- elif 'text' in item %}
                {{- item.text }}
            {%- else %}
                {{- raise_exception('Unexpected item type in content.') }}
            {%- endif %}
        {%- endfor %}
    {%- elif content is none or content is undefined %}
        {{- '' }}
    {%- else %}
        {{- raise_exception('Unexpected content type.') }}
    {%- endif %}
{%- endmacro %}
{%- if not messages %}
    {{- raise_exception('No messages provided.') }}
{%- endif %}
{%- if tools and tools is iterable and tools is not mapping %}
    {{- '<|im_start|>system\n' }}
    {{- "# Tools\n\nYou have access to the following functions:\n\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>" }}
    {{- '\n\nIf you choose to call a function ONLY reply in the following format with NO suffix:\n\n<tool_call>\n<function=example_function_name>\n<parameter=example_parameter_1>\nvalue_1\n</parameter>\n<parameter=example_parameter_2>\nThis is the value for the second parameter\nthat can span\nmultiple lines\n</parameter>\n</function>\n</tool_call>\n\n<IMPORTANT>\nReminder:\n- Function calls MUST follow the specified format: an inner <function=...></function> block must be nested within <tool_call></tool_call> XML tags\n- Required parameters MUST be specified\n- You may provide optional reasoning for your function call in natural language BEFORE the function call, but NOT after\n- If there is no function call available, answer the question like normal with your current knowledge and do not tell the user about function calls\n</IMPORTANT>' }}
    {%- if messages[0].role == 'system' %}
        {%- set content = render_content(messages[0].content, false, true)|trim %}
        {%- if content %}
            {{- '\n\n' + content }}
        {%- endif %}
    {%- endif %}
    {{- '<|im_end|>\n' }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {%- set content = render_content(messages[0].content, false, true)|trim %}
        {{- '<|im_start|>system\n' + content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" %}
        {%- set content = render_content(message.content, false)|trim %}
        {%- if not(content.startswith('<tool_response>') and content.endswith('</tool_response>')) %}
            {%- set ns.multi_step_tool = false %}
            {%- set ns.last_query_index = index %}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if ns.multi_step_tool %}
    {{- raise_exception('No user query found in messages.') }}
{%- endif %}
{%- for message in messages %}
    {%- set content = render_content(message.content, true)|trim %}
    {%- if message.role == "system" %}
        {%- if not loop.first %}
            {{- raise_exception('System message must be at the beginning.') }}
        {%- endif %}
    {%- elif message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- set reasoning_content = reasoning_content|trim %}
        {%- if loop.index0 > ns.last_query_index %}
            {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content + '\n</think>\n\n' + content }}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls and message.tool_calls is iterable and message.tool_calls is not mapping %}
            {%- for tool_call in message.tool_calls %}
                {%- if tool_call.function is defined %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {%- if loop.first %}
                    {%- if content|trim %}
                        {{- '\n\n<tool_call>\n<function=' + tool_call.name + '>\n' }}
                    {%- else %}
                        {{- '<tool_call>\n<function=' + tool_call.name + '>\n' }}
                    {%- endif %}
                {%- else %}
                    {{- '\n<tool_call>\n<function=' + tool_call.name + '>\n' }}
                {%- endif %}
                {%- if tool_call.arguments is defined %}
                    {%- for args_name, args_value in tool_call.arguments|items %}
                        {{- '<parameter=' + args_name + '>\n' }}
                        {%- set args_value = args_value | tojson | safe if args_value is mapping or (args_value is sequence and args_value is not string) else args_value | string %}
                        {{- args_value }}
                        {{- '\n</parameter>\n' }}
                    {%- endfor %}
                {%- endif %}
                {{- '</function>\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.previtem and loop.previtem.role != "tool" %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if not loop.last and loop.nextitem.role != "tool" %}
            {{- '<|im_end|>\n' }}
        {%- elif loop.last %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- else %}
        {{- raise_exception('Unexpected message role.') }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is true %}
        {{- '<think>\n' }}
    {%- else %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}
"""  # noqa: E501


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    """HF transformers' `tojson`: unlike Jinja's own it neither HTML-escapes nor escapes non-ASCII."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    """HF's `raise_exception` template global: the template refuses the conversation."""
    raise jinja2.TemplateError(message)


def _compile_templates() -> dict[Template, jinja2.Template]:
    """Compile once, in the environment HF's apply_chat_template uses."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    return {"qwen2.5": env.from_string(QWEN25_CHAT_TEMPLATE), "qwen3": env.from_string(QWEN3_CHAT_TEMPLATE),
            "qwen3.5": env.from_string(QWEN35_CHAT_TEMPLATE)}


_CHAT_TEMPLATES = _compile_templates()


def _token_pattern(tags: list[str]) -> re.Pattern[str]:
    """Special tokens whole, digits one by one (as Qwen's BPE), words with one leading space, punctuation runs
    holding at most one quote (so `"}}\\n` closes a call in one token, as in section 3b), then whitespace."""
    tag = "|".join(re.escape(name) for name in tags)
    punct = rf'(?:(?!{tag})[^\w\s"])'
    return re.compile(rf'{tag}|\d| ?[^\W\d]+| ?(?:{punct}+"?|"{punct}*)\n*|\s+(?!\S)|\s+')


_QWEN25_SPECIAL = {"<|im_start|>": 151644, "<|im_end|>": 151645, TOOL_CALL_START: 151657, TOOL_CALL_END: 151658}
# Qwen3 and Qwen3.5 add <think> and </think> as single tokens (151667, 151668) to the same vocabulary.
_QWEN3_SPECIAL = {**_QWEN25_SPECIAL, THINK_START: 151667, THINK_END: 151668}
_SPECIAL_IDS: dict[Template, dict[str, int]] = {"qwen2.5": _QWEN25_SPECIAL, "qwen3": _QWEN3_SPECIAL,
                                                "qwen3.5": _QWEN3_SPECIAL}
_TOKEN_PATTERNS = {template: _token_pattern(list(special)) for template, special in _SPECIAL_IDS.items()}
EOS_ID = 151645


def tokenize(text: str, template: Template = "qwen2.5") -> list[str]:
    """Fake Qwen tokens for a template's tokenizer: they concatenate back to `text` exactly."""
    return _TOKEN_PATTERNS[template].findall(text)


def token_ids(tokens: list[str], template: Template = "qwen2.5") -> list[int]:
    """Stable ids: Qwen's own for the special tokens, a CRC of the text for the rest."""
    special = _SPECIAL_IDS[template]
    return [special.get(token) or zlib.crc32(token.encode()) % 151643 for token in tokens]


def special_tokens(template: Template) -> frozenset[str]:
    """The single-token markup of a template's tokenizer (ChatML turns, tool-call and thinking tags)."""
    return frozenset(_SPECIAL_IDS[template])


def render_prompt(version: Version, conversation: list[dict[str, Any]], tools: list[dict[str, Any]] | None, *,
                  template: Template = "qwen2.5", add_generation_prompt: bool = True,
                  kwargs: dict[str, Any] | None = None) -> str:
    """The prompt vLLM sends the engine; template failures are 400s as in vLLM.

    Args:
        version: Which vLLM words the 400 (0.33 passes the template's own reason through).
        conversation: Messages as `to_conversation` built them.
        tools: Tool dicts as `tool_dumps` built them, or None.
        template: Which model family's chat template renders.
        add_generation_prompt: The request field of that name.
        kwargs: The request's `chat_template_kwargs` (e.g. enable_thinking), visible to the template.
    """
    variables = {**(kwargs or {}), "messages": conversation, "tools": tools,
                 "add_generation_prompt": add_generation_prompt}
    try:
        return _CHAT_TEMPLATES[template].render(**variables)
    except jinja2.TemplateError as exc:
        raise (ApiError(str(exc)) if version == "0.33" else _preprocessing_error(version, exc)) from exc
    except (TypeError, ValueError) as exc:
        raise _preprocessing_error(version, exc) from exc


# --- 4. Validation ---

_ROLES = ("system", "user", "assistant", "tool")
_JSON_TYPE = re.compile(r"application/(?:[\w.-]+\+)?json")
_MEDIA_TYPE_ERROR = "Unsupported Media Type: Only 'application/json' is allowed"


def parse_json_body(version: Version, raw: bytes, content_type: str) -> dict[str, Any]:
    """FastAPI + vLLM's validate_json_request: JSON errors first, then the media type, then the shape."""
    media_type = content_type.split(";", 1)[0].strip().lower()
    body: Any = None
    if raw and (not media_type or _JSON_TYPE.fullmatch(media_type)):
        try:
            body = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise _pydantic_error(version, "json_invalid", ("body", exc.pos), "JSON decode error", {},
                                  {"error": exc.msg}) from exc
        except UnicodeDecodeError as exc:
            raise _pydantic_error(version, "json_invalid", ("body", exc.start), "JSON decode error", {},
                                  {"error": "Invalid UTF-8"}) from exc
    if media_type != "application/json":
        message = repr([_MEDIA_TYPE_ERROR]) if version == "0.11" else f"1 validation error:\n  {_MEDIA_TYPE_ERROR}"
        raise ApiError(message, validation=True)
    if body is None:
        raise _pydantic_error(version, "missing", ("body",), "Field required", None)
    if not isinstance(body, dict):
        raise _pydantic_error(version, "model_attributes_type", ("body",),
                              "Input should be a valid dictionary or object to extract fields from", body)
    return body


def check_chat_request(version: Version, body: dict[str, Any], aliases: list[str]) -> None:
    """ChatCompletionRequest's validators (section 1, A.4), then the served-model check (404)."""
    if version == "0.11":
        if body.get("stream_options") and not body.get("stream"):
            raise _validator_error(version, "Stream options can only be defined when `stream=True`.",
                                   "stream_options", body)
        _check_tools(version, body)
        _check_tool_choice(version, body)
        _check_messages(version, body)
        for key in ("max_tokens", "max_completion_tokens"):
            value = body.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise _pydantic_error(version, "int_type", ("body", key), "Input should be a valid integer", value)
    else:
        messages = body.get("messages", [])
        if messages is None or isinstance(messages, (int, float)):
            # check_system_message_content_type iterates `messages` before pydantic checks its type.
            raise ApiError(f"'{type(messages).__name__}' object is not iterable")
        # pydantic runs "before" validators last-defined first: check_tool_usage precedes the stream options check.
        if body.get("tools") == []:
            _check_tools(version, body)
        _check_tool_choice(version, body)
        if body.get("stream_options") and not body.get("stream"):
            raise _validator_error(version, "Stream options can only be defined when `stream=True`.",
                                   "stream_options", body)
        errors = [*_message_errors(body), *_int_errors(body), *_tool_errors(version, body)]
        if errors:
            raise validation_error(version, errors)
        _check_echoed_calls(version, body)  # tool_calls are validated lazily, after every field
    check_model(version, body, aliases)


def check_model(version: Version, body: dict[str, Any], aliases: list[str]) -> None:
    """An omitted or empty model means the served one; any other name is a 404."""
    requested = body.get("model")
    if requested and requested not in aliases:
        if version == "0.11":
            raise ApiError(f"The model `{requested}` does not exist.", 404)
        raise ApiError(f"The model `{requested}` does not exist. Valid aliases: {', '.join(aliases)}.", 404,
                       param="model")


def _check_tools(version: Version, body: dict[str, Any]) -> None:
    """ChatCompletionToolsParam's shape, and no empty list (v0.11 and /tokenize)."""
    tools = body.get("tools")
    if tools is None:
        return
    if tools == []:
        # Stricter than v0.11 (accepted there, but parsing is silently skipped): main rejects it since 18013df6.
        raise _validator_error(version, "`tools` must not be an empty array. Either provide at least one tool or "
                               "omit the field entirely.", "tools", body)
    errors = _tool_errors(version, body)
    if errors:
        raise validation_error(version, errors[:1])


def _tool_errors(version: Version, body: dict[str, Any]) -> list[FieldError]:
    """Field errors of `tools`, the first per tool as pydantic stops there (0.33 locates them more precisely)."""
    tools = body.get("tools")
    if tools is None:
        return []
    if not isinstance(tools, list):
        return [FieldError("list_type", ("body", "tools"), "Input should be a valid list", tools)]
    errors = []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if version == "0.33" and not isinstance(tool, dict):
            errors.append(FieldError("model_attributes_type", ("body", "tools", i), "Input should be a valid "
                                     "dictionary or object to extract fields from", tool))
        elif version == "0.33" and not isinstance(function, dict):
            errors.append(FieldError("missing", ("body", "tools", i, "function"), "Field required", tool))
        elif not isinstance(function, dict) or not isinstance(function.get("name"), str):
            errors.append(FieldError("missing", ("body", "tools", i, "function", "name"), "Field required",
                                     tool if version == "0.11" else function))
        elif tool.get("type", "function") != "function":
            errors.append(FieldError("literal_error", ("body", "tools", i, "type"), "Input should be 'function'",
                                     tool["type"], {"expected": "'function'"}))
    return errors


def _check_tool_choice(version: Version, body: dict[str, Any]) -> None:
    """check_tool_usage's `tool_choice` checks, message for message (v0.10.1/v0.11; 0.33 adds `param`)."""
    choice = body.get("tool_choice")
    if choice is None or choice == "none":
        return
    if body.get("tools") is None:
        raise _validator_error(version, "When using `tool_choice`, `tools` must be set.", "tool_choice", body)
    if choice not in ("auto", "required") and not isinstance(choice, dict):
        raise _validator_error(version, f'Invalid value for `tool_choice`: {choice}! Only named tools, "none", '
                               '"auto" or "required" are supported.', "tool_choice", body)
    if isinstance(choice, dict):
        _check_named_choice(version, choice, body)


def _check_named_choice(version: Version, choice: dict[str, Any], body: dict[str, Any]) -> None:
    """A named `tool_choice` must name one of `tools`."""
    usage = 'Correct usage: `{"type": "function", "function": {"name": "my_function"}}`'
    function = choice.get("function")
    if not isinstance(function, dict):
        raise _validator_error(version, f"Invalid value for `function`: `{function}` in `tool_choice`! {usage}",
                               "tool_choice.function", body)
    if "name" not in function:
        raise _validator_error(version, f"Expected field `name` in `function` in `tool_choice`! {usage}",
                               "tool_choice.function.name", body)
    name = function["name"]
    if not isinstance(name, str) or not name:
        raise _validator_error(version, f"Invalid `name` in `function`: `{name}` in `tool_choice`! {usage}",
                               "tool_choice.function.name", body)
    if all(not isinstance(tool, dict) or (tool.get("function") or {}).get("name") != name for tool in body["tools"]):
        raise _validator_error(version, "The tool specified in `tool_choice` does not match any of the specified "
                               "`tools`", "tool_choice", body)


def _check_messages(version: Version, body: dict[str, Any]) -> None:
    """The message fields the fake relies on; the first error only in v0.11."""
    errors = _message_errors(body)
    if errors:
        raise validation_error(version, errors[:1])
    _check_echoed_calls(version, body)


def _message_errors(body: dict[str, Any]) -> list[FieldError]:
    """`messages` must be a list of dicts with a known role (stricter than vLLM, which accepts any role)."""
    messages = body.get("messages")
    if messages is None:
        return [FieldError("missing", ("body", "messages"), "Field required", body)]
    if not isinstance(messages, list):
        return [FieldError("list_type", ("body", "messages"), "Input should be a valid list", messages)]
    expected = "'system', 'user', 'assistant' or 'tool'"
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            return [FieldError("dict_type", ("body", "messages", i), "Input should be a valid dictionary", message)]
        if message.get("role") not in _ROLES:
            return [FieldError("literal_error", ("body", "messages", i, "role"), f"Input should be {expected}",
                               message.get("role"), {"expected": expected})]
    return []


def _echoed_call_errors(body: dict[str, Any]) -> list[list[FieldError]]:
    """Echoed tool calls pydantic refuses: a function without a name, or arguments that are not a string.

    The first error of each list is v0.11's; 0.33 validates tool_calls lazily and reports all three union
    branches, with locations relative to the call (A.4).
    """
    found = []
    for i, message in enumerate(body["messages"]):
        for j, call in enumerate(message.get("tool_calls") or ()):
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                key, kind, msg, value = "name", "missing", "Field required", function
            elif not isinstance(function.get("arguments"), str):
                key, kind, msg, value = "arguments", "string_type", "Input should be a valid string", function.get(
                    "arguments")
            else:
                continue
            call_type = call.get("type") if isinstance(call, dict) else None
            found.append([
                FieldError(kind, ("body", "messages", i, "tool_calls", j, "function", key), msg, value),
                FieldError(kind, ("body", j, "ChatCompletionMessageFunctionToolCallParam", "function", key), msg,
                           value),
                FieldError("missing", ("body", j, "ChatCompletionMessageCustomToolCallParam", "custom"),
                           "Field required", call),
                FieldError("literal_error", ("body", j, "ChatCompletionMessageCustomToolCallParam", "type"),
                           "Input should be 'custom'", call_type, {"expected": "'custom'"})])
    return found


def _check_echoed_calls(version: Version, body: dict[str, Any]) -> None:
    """The first echoed call pydantic refuses: its field in v0.11, the three union branches in 0.33."""
    for errors in _echoed_call_errors(body):
        raise validation_error(version, errors[:1] if version == "0.11" else errors[1:])


def lax_int(value: Any) -> int | FieldError | None:
    """Pydantic's lax int: bools, integral floats and numeric strings pass; otherwise the error to report."""
    if value is None or isinstance(value, int):
        return None if value is None else int(value)
    if isinstance(value, float):
        if value.is_integer():
            return int(value)
        return FieldError("int_from_float", (), "Input should be a valid integer, got a number with a fractional "
                          "part", value)
    if isinstance(value, str):
        text = value.strip()
        if re.fullmatch(r"[+-]?\d+(?:\.0*)?", text):
            return int(float(text)) if "." in text else int(text)
        return FieldError("int_parsing", (), "Input should be a valid integer, unable to parse string as an "
                          "integer", value)
    return FieldError("int_type", (), "Input should be a valid integer", value)


def _int_errors(body: dict[str, Any]) -> list[FieldError]:
    """0.33's errors for `max_tokens` and `max_completion_tokens`, in field order."""
    errors = []
    for key in ("max_tokens", "max_completion_tokens"):
        checked = lax_int(body.get(key))
        if isinstance(checked, FieldError):
            errors.append(FieldError(checked.kind, ("body", key), checked.msg, checked.value))
    return errors


def requested_max_tokens(body: dict[str, Any]) -> tuple[int | None, str]:
    """0.33's TokenizeParams: max_completion_tokens wins whenever it is set, and names the parameter."""
    if body.get("max_completion_tokens") is not None:
        return cast(int, lax_int(body["max_completion_tokens"])), "max_completion_tokens"
    return cast(int | None, lax_int(body.get("max_tokens"))), "max_tokens"


def _text_content(version: Version, content: Any) -> str:
    """vLLM's "string" content format: text parts joined by newlines, None as ""."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for part in content if isinstance(content, list) else [content]:
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise _preprocessing_error(version, ValueError(
                f"Unsupported content part type for a text-only model: {kind}"))
        texts.append(part["text"])
    return "\n".join(texts)


def _parsed_arguments(version: Version, arguments: str) -> dict[str, Any]:
    """vLLM json.loads echoed arguments before templating.

    v0.11 refuses what is not JSON (a non-object is refused here, stricter than vLLM); 0.33 coerces anything
    that is not a JSON object, and an empty string, to {} with a server warning (A.6).
    """
    try:
        value = json.loads(arguments) if arguments or version == "0.11" else {}
    except json.JSONDecodeError as exc:
        if version == "0.33":
            return {}
        raise _preprocessing_error(version, exc) from exc
    if not isinstance(value, dict):
        if version == "0.33":
            return {}
        raise _preprocessing_error(version, ValueError(f"Tool call arguments must be a JSON object, got: {arguments}"))
    return value


def to_conversation(version: Version, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """vLLM's ConversationMessages: string content, parsed tool-call arguments; never mutates the request.

    0.33 also hands an assistant message's `reasoning` (or legacy `reasoning_content`) to the template under
    both names (A.11) and drops an empty `tool_calls` list.
    """
    conversation = []
    for message in messages:
        turn: dict[str, Any] = {"role": message["role"], "content": _text_content(version, message.get("content"))}
        calls = message.get("tool_calls")
        if message["role"] == "assistant" and calls is not None and (calls or version == "0.11"):
            turn["tool_calls"] = [{**call, "function": {**call["function"], "arguments": _parsed_arguments(
                version, call["function"]["arguments"])}} for call in calls]
        reasoning = message.get("reasoning", message.get("reasoning_content"))
        if version == "0.33" and message["role"] == "assistant" and reasoning is not None:
            turn["reasoning"] = turn["reasoning_content"] = reasoning
        if message["role"] == "tool" and "tool_call_id" in message:
            turn["tool_call_id"] = message["tool_call_id"]
        if isinstance(message.get("name"), str):
            turn["name"] = message["name"]
        conversation.append(turn)
    return conversation


def tool_dumps(version: Version, tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`tool.model_dump()` of ChatCompletionToolsParam as the template sees it.

    v0.11: declared fields in order (nulls too), then extras. 0.33 drops extras and leaves out `strict` and
    `defer_loading` unless set.
    """
    dumps = []
    for tool in tools:
        function = tool["function"]
        dumped = {"name": function["name"], "description": function.get("description"),
                  "parameters": function.get("parameters")}
        if version == "0.11":
            dumped.update(function)
            extras = {key: value for key, value in tool.items() if key not in ("type", "function")}
            dumps.append({"type": "function", "function": dumped, **extras})
            continue
        for key in ("strict", "defer_loading"):
            if function.get(key) is not None:
                dumped[key] = function[key]
        outer = {"defer_loading": tool["defer_loading"]} if tool.get("defer_loading") is not None else {}
        dumps.append({"type": "function", "function": dumped, **outer})
    return dumps


def check_context_length(prompt_tokens: int, body: dict[str, Any], max_model_len: int) -> int | None:
    """v0.11's _validate_input@v0.10.1+; returns the requested max tokens (max_completion_tokens wins)."""
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    if max_tokens is None:
        if prompt_tokens >= max_model_len:
            raise _preprocessing_error("0.11", ValueError(
                f"This model's maximum context length is {max_model_len} tokens. However, your request has "
                f"{prompt_tokens} input tokens. Please reduce the length of the input messages."))
    elif prompt_tokens + max_tokens > max_model_len:
        raise _preprocessing_error("0.11", ValueError(
            f"'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. This model's maximum context "
            f"length is {max_model_len} tokens and your request has {prompt_tokens} input tokens "
            f"({max_tokens} > {max_model_len} - {prompt_tokens})."))
    if max_tokens is not None and max_tokens < 1:
        raise ApiError(f"max_tokens must be at least 1, got {max_tokens}.")
    return max_tokens


def check_output_budget(body: dict[str, Any], max_model_len: int) -> int | None:
    """0.33's TokenizeParams check before templating: only K > N is refused (A.2); returns K."""
    requested, param = requested_max_tokens(body)
    if requested is not None and requested > max_model_len:
        raise ApiError(f"{param}={requested} cannot be greater than max_model_len={max_model_len}. Please request "
                       f"fewer output tokens. (parameter={param}, value={requested})", param=param)
    return requested


def clamp_max_tokens(prompt_tokens: int, requested: int | None, max_model_len: int) -> int:
    """0.33: a prompt over the window is refused; otherwise max_tokens = min(N - P, K), at least 1 (A.2)."""
    if prompt_tokens > max_model_len:
        qualifier = "at least " if prompt_tokens == max_model_len + 1 else ""
        raise ApiError(f"This model's maximum context length is {max_model_len} tokens. However, your prompt "
                       f"contains {qualifier}{prompt_tokens} input tokens, which exceeds this limit even without any "
                       "output tokens. Please reduce the length of the input prompt. "
                       f"(parameter=input_tokens, value={prompt_tokens})", param="input_tokens")
    limit = max_model_len - prompt_tokens if requested is None else min(max_model_len - prompt_tokens, requested)
    if limit < 1:
        raise ApiError(f"max_tokens must be at least 1, got {limit}. (parameter=max_tokens, value={limit})",
                       param="max_tokens")
    return limit


# --- 5. Responder ---

_EXPRESSION = re.compile(r"[\d(][\d\s+\-*/%().]*")
_HAS_OPERATOR = re.compile(r"[\d)]\s*(?:\*\*|[-+*/%])\s*[\d(.]")
_CITY = re.compile(r"\b(seoul|new york|tokyo|london|paris)\b", re.IGNORECASE)
_TIMEZONES = {"seoul": "Asia/Seoul", "new york": "America/New_York", "tokyo": "Asia/Tokyo",
              "london": "Europe/London", "paris": "Europe/Paris"}
_TOOLS_BLOCK = re.compile(r"<tools>\n(.*?)\n</tools>", re.DOTALL)  # not the "<tools></tools>" in the prose
_EMPTY_THOUGHT = f"{THINK_START}\n\n{THINK_END}\n\n"


def offered_tools(prompt: str) -> list[str]:
    """Tool names the model can see: the `<tools>` blocks of the rendered prompt, written by the chat template
    from the request's `tools` or by a client into its own system prompt."""
    names = []
    for block in _TOOLS_BLOCK.finditer(prompt):
        for line in block.group(1).splitlines():
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


def hermes_call(name: str, arguments: dict[str, Any]) -> str:
    """One call as Qwen2.5 and hybrid Qwen3 write it (section 6, A.9)."""
    call = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"{TOOL_CALL_START}\n{call}\n{TOOL_CALL_END}"


def xml_call(name: str, arguments: dict[str, Any]) -> str:
    """One call as Qwen3-Coder and Qwen3.5 write it: values as qwen35.jinja renders them (A.7, A.9)."""
    parameters = "".join(
        f"<parameter={key}>\n{value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)}\n"
        "</parameter>\n" for key, value in arguments.items())
    return f"{TOOL_CALL_START}\n<function={name}>\n{parameters}</function>\n{TOOL_CALL_END}"


def _pad(text: str, answer_tokens: int, template: Template) -> str:
    """Make a plain answer exactly `answer_tokens` streamed tokens long, for load benchmarks."""
    if answer_tokens <= 0:
        return text
    tokens = tokenize(text, template)[:answer_tokens]
    return "".join(tokens) + " word" * (answer_tokens - len(tokens))


def _planned_calls(user: str, tool_names: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """The calculator and clock calls a request asks for, among the offered tools."""
    calls: list[tuple[str, dict[str, Any]]] = []
    expression = _expression(user)
    if expression is not None and "calculator" in tool_names:
        calls.append(("calculator", {"expression": expression}))
    if "get_current_time" in tool_names:
        calls.extend(("get_current_time", {"timezone": _TIMEZONES[city.lower()]}) for city in _CITY.findall(user))
    return calls


def _answer_and_thought(conversation: list[dict[str, Any]], tool_names: list[str], template: Template,
                        answer_tokens: int) -> tuple[str, str]:
    """What the stand-in model answers (calls in its family's format, or text) and what it thinks first."""
    if conversation and conversation[-1]["role"] == "tool":
        results: list[str] = []
        for message in reversed(conversation):
            if message["role"] != "tool":
                break
            results.insert(0, message["content"])
        return _pad(f"The results: {'; '.join(results)}.", answer_tokens, template), "I have the results."
    user = next((m["content"] for m in reversed(conversation) if m["role"] == "user"), "")
    calls = _planned_calls(user, tool_names)
    if not calls:
        return _pad(f"You said: {user}", answer_tokens, template), "The user wants an echo."
    write = xml_call if template == "qwen3.5" else hermes_call
    thought = f"I should call {', '.join(dict.fromkeys(name for name, _ in calls))}."
    return "\n".join(write(name, arguments) for name, arguments in calls), thought


def default_reply_text(prompt: str, conversation: list[dict[str, Any]], template: Template,
                       answer_tokens: int) -> str:
    """Raw output of the deterministic stand-in model used when the script is empty, as each family writes it.

    Qwen2.5 answers or writes hermes JSON calls. Hybrid Qwen3 thinks in `<think>…</think>` first unless the
    template closed the thought in the prompt (thinking off). Qwen3.5 writes XML calls, and when the prompt
    opened `<think>` it writes its thought first, ending in `</think>` without an opening tag (A.9).
    """
    answer, thought = _answer_and_thought(conversation, offered_tools(prompt), template, answer_tokens)
    if template == "qwen3" and not prompt.endswith(_EMPTY_THOUGHT):
        return f"{THINK_START}\n{thought}\n{THINK_END}\n\n{answer}"
    if template == "qwen3.5" and prompt.endswith(f"{THINK_START}\n"):
        return f"{thought}\n{THINK_END}\n\n{answer}"
    return answer


# --- 6. Hermes ---

_TOOL_CALL_BLOCK = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)", re.DOTALL)
_NAME_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"')
_ARGUMENTS_KEY = re.compile(r'\s*,\s*"arguments"\s*:\s*')
_FIRST_KEY = re.compile(r'\{\s*"(?:[^"\\]|\\.)*"\s*:\s*')
_DECODER = json.JSONDecoder()


def random_id(version: Version) -> str:
    """random_uuid(): 32 hex digits in v0.11, 16 from db290610 on (A.1)."""
    return uuid.uuid4().hex if version == "0.11" else f"{uuid.uuid4().int & (2**64 - 1):016x}"


def tool_call_id(version: Version) -> str:
    """make_tool_call_id: `chatcmpl-tool-` and a random id."""
    return f"chatcmpl-tool-{random_id(version)}"


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
            return {"tool_calls": [{"id": tool_call_id("0.11"), "type": "function", "index": self.index,
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
    """v0.11: per generated token, the delta vLLM streams for it (None: no chunk), section 3b/3c."""
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


_HERMES_NAME = re.compile(r'"name"\s*:\s*"([^"]+)"')
_HERMES_ARGUMENTS = re.compile(r'"arguments"\s*:\s*')


def _partial_overlap(text: str, tag: str) -> int:
    """partial_tag_overlap: the longest proper prefix of `tag` that ends `text`."""
    return next((k for k in range(min(len(tag) - 1, len(text)), 0, -1) if text.endswith(tag[:k])), 0)


def _is_json(text: str) -> bool:
    """is_complete_json: whether the text parses as JSON."""
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def _hermes_bodies(text: str) -> list[tuple[str, bool]]:
    """(json text, complete) of each <tool_call> region; an unclosed last one is complete once it parses."""
    bodies = []
    position = 0
    while (start := text.find(TOOL_CALL_START, position)) != -1:
        body_start = start + len(TOOL_CALL_START)
        end = text.find(TOOL_CALL_END, body_start)
        if end != -1:
            bodies.append((text[body_start:end].strip(), True))
            position = end + len(TOOL_CALL_END)
            continue
        raw = text[body_start:]
        raw = raw[: len(raw) - _partial_overlap(raw, TOOL_CALL_END)].strip()
        bodies.append((raw, bool(raw) and _is_json(raw)))
        break
    return bodies


class HermesStream:
    """Hermes2ProToolParser.extract_tool_calls_streaming@0.33 (rewritten in aee4c146, section 3d).

    It re-parses the whole text each step and sends what is new: text before the first tag (holding back a
    partial `<tool_call>`), each call's name once, then the growth of its arguments text.
    """

    def __init__(self, version: Version) -> None:
        self.version = version
        self.sent = 0
        self.names: list[str | None] = []
        self.arguments: list[str | None] = []  # None until a call's arguments first grow

    def step(self, text: str) -> dict[str, Any] | None:
        """The delta for the whole text generated so far, or None."""
        content = self._content(text)
        entries: list[dict[str, Any]] = []
        for i, (body, complete) in enumerate(_hermes_bodies(text)):
            if i >= len(self.names):
                self.names.append(None)
                self.arguments.append(None)
            if self.names[i] is None:
                name = _HERMES_NAME.search(body)
                if name is None:
                    break  # call i+1 must wait for call i's name
                self.names[i] = name.group(1)
                entries.append({"id": tool_call_id(self.version), "type": "function", "index": i,
                                "function": {"name": name.group(1)}})
            arguments, sent = self._arguments(body, complete), self.arguments[i] or ""
            if arguments is not None and len(arguments) > len(sent):
                entries.append({"index": i, "function": {"arguments": arguments[len(sent):]}})
                self.arguments[i] = arguments
        return {"content": content, "tool_calls": entries} if content or entries else None

    def unstreamed_arguments(self) -> str:
        """get_remaining_unstreamed_args: `{}` for a last call whose arguments never grew, else nothing."""
        return "{}" if self.arguments and self.arguments[-1] is None else ""

    def _content(self, text: str) -> str | None:
        """_extract_content: unsent text before the first tag, holding back a partial `<tool_call>`."""
        start = text.find(TOOL_CALL_START)
        sendable = start if start != -1 else len(text) - _partial_overlap(text, TOOL_CALL_START)
        if sendable <= self.sent:
            return None
        content, self.sent = text[self.sent:sendable], sendable
        return content

    @staticmethod
    def _arguments(body: str, complete: bool) -> str | None:
        """The text after `"arguments":`; a complete call loses the brace that closes the outer object."""
        key = _HERMES_ARGUMENTS.search(body)
        if key is None:
            return None
        raw = body[key.end():]
        if complete:
            raw = raw.rstrip()
            raw = raw[:-1].rstrip() if raw.endswith("}") else raw
        return raw


# --- 7. Qwen3 ---
# A port of what vLLM 0.33 runs for `--reasoning-parser qwen3` and `--tool-call-parser qwen3_coder`: the literal
# lexer that holds back possible markup (incremental_lexer.py), the token-id scanner for single-token markup
# (token_id_scanner.py), the qwen3 grammar (qwen3.py), its event machine (streaming_parser_engine.py) and the
# events-to-delta logic with argument conversion and schema coercion (parser_engine.py, tool_parsers/utils.py).

_TERMINALS = {THINK_START: "THINK_START", THINK_END: "THINK_END", TOOL_CALL_START: "TOOL_START",
              TOOL_CALL_END: "TOOL_END", "<function=": "FUNC_PREFIX", "</function>": "FUNC_END",
              "<parameter=": "PARAM_START", "</parameter>": "PARAM_END", ">": "CLOSE_ANGLE"}
_PREFIXES = frozenset(literal[:i] for literal in _TERMINALS for i in range(1, len(literal)))
_FIRST_CHARS = frozenset(literal[0] for literal in _TERMINALS)
# (state, terminal) -> (next state, events); PREAMBLE, NAME, ARGS and BETWEEN are the tool-call states.
_TRANSITIONS: dict[tuple[str, str], tuple[str, tuple[str, ...]]] = {
    ("REASONING", "THINK_START"): ("REASONING", ()),
    ("REASONING", "THINK_END"): ("CONTENT", ("reasoning_end",)),
    ("CONTENT", "THINK_END"): ("CONTENT", ()),  # a duplicate </think> is absorbed
    ("REASONING", "TOOL_START"): ("PREAMBLE", ("reasoning_end", "call_start")),  # implicit end of reasoning
    ("CONTENT", "TOOL_START"): ("PREAMBLE", ("reasoning_end", "call_start")),
    ("CONTENT", "FUNC_PREFIX"): ("NAME", ("call_start",)),  # <function= without <tool_call>
    ("PREAMBLE", "TOOL_END"): ("CONTENT", ("call_end",)),
    ("PREAMBLE", "FUNC_PREFIX"): ("NAME", ()),
    ("NAME", "CLOSE_ANGLE"): ("ARGS", ()),
    ("NAME", "FUNC_END"): ("BETWEEN", ("call_end",)),
    ("NAME", "TOOL_END"): ("CONTENT", ("call_end",)),
    ("NAME", "TOOL_START"): ("PREAMBLE", ("call_end", "call_start")),
    ("NAME", "FUNC_PREFIX"): ("NAME", ("call_end", "call_start")),
    ("ARGS", "FUNC_END"): ("BETWEEN", ("call_end",)),
    ("ARGS", "FUNC_PREFIX"): ("NAME", ("call_end", "call_start")),
    ("ARGS", "PARAM_START"): ("ARGS", ("arg",)),
    ("ARGS", "PARAM_END"): ("ARGS", ("arg",)),
    ("BETWEEN", "TOOL_END"): ("CONTENT", ()),
    ("BETWEEN", "TOOL_START"): ("PREAMBLE", ("call_start",)),
    ("BETWEEN", "FUNC_PREFIX"): ("NAME", ("call_start",)),
}
_TOOL_STATES = frozenset({"PREAMBLE", "NAME", "ARGS", "BETWEEN"})
_TOOL_TERMINALS = frozenset(terminal for (state, terminal), (target, _) in _TRANSITIONS.items()
                            if state in _TOOL_STATES or target in _TOOL_STATES)
_TOOL_EXITS = frozenset(terminal for (state, terminal), (target, _) in _TRANSITIONS.items()
                        if state in _TOOL_STATES and target not in _TOOL_STATES)
_REASONING_MARKUP = frozenset({"THINK_START", "THINK_END"})
_CONTENT_EVENTS = {"CONTENT": "text", "REASONING": "reasoning", "NAME": "name", "ARGS": "arg"}


@dataclass
class Event:
    """A semantic event of the engine: text, reasoning, reasoning_end, call_start, name, arg or call_end."""

    kind: str
    value: str = ""
    index: int = -1
    tokens: int = 0


class Lexer:
    """Splits streamed text into terminals and content, holding back text that may still become a terminal."""

    def __init__(self) -> None:
        self.buffer = ""
        self.counts: list[int] = []

    def feed(self, text: str, token_texts: Iterable[str] = ()) -> list[tuple[str | None, str, int]]:
        """(terminal or None for content, text, tokens starting in it) for what is certain so far."""
        counts = [0] * len(text)
        position = 0
        for token in token_texts:
            found = text.find(token, position) if token else -1
            if found >= 0:
                counts[found] += 1
                position = found + len(token)
        self.buffer += text
        self.counts += counts
        return self._drain(final=False)

    def flush(self) -> list[tuple[str | None, str, int]]:
        """Everything still held back: terminals where complete, the rest as content."""
        lexed = self._drain(final=True)
        if self.buffer:
            lexed.append((None, self.buffer, sum(self.counts)))
            self.buffer, self.counts = "", []
        return lexed

    def _take(self, terminal: str | None, length: int) -> tuple[str | None, str, int]:
        taken = (terminal, self.buffer[:length], sum(self.counts[:length]))
        self.buffer, self.counts = self.buffer[length:], self.counts[length:]
        return taken

    def _drain(self, *, final: bool) -> list[tuple[str | None, str, int]]:
        """Lex the buffer; unless `final`, stop at text that is a proper prefix of a terminal."""
        lexed: list[tuple[str | None, str, int]] = []
        while self.buffer:
            if _FIRST_CHARS.isdisjoint(self.buffer):
                lexed.append(self._take(None, len(self.buffer)))
                break
            best = max((literal for literal in _TERMINALS if self.buffer.startswith(literal)), key=len, default=None)
            if self.buffer in _PREFIXES and not final:
                longer = best is not None and any(
                    len(literal) > len(best) and literal.startswith(self.buffer) for literal in _TERMINALS)
                if best is None or longer:
                    break  # may still grow into a (longer) terminal
            if best is not None:
                lexed.append(self._take(_TERMINALS[best], len(best)))
            else:
                lexed.append(self._take(None, max(1, self._content_end())))
        return lexed

    def _content_end(self) -> int:
        """Where content ends: the first later position that starts, or may start, a terminal."""
        for i in range(1, len(self.buffer)):
            rest = self.buffer[i:]
            if rest[0] in _FIRST_CHARS and any(rest[:len(literal)] == literal[:len(rest)] for literal in _TERMINALS):
                return i
        return len(self.buffer)


class Grammar:
    """StreamingParserEngine with the qwen3 config: text and token ids in, semantic events out.

    `token_terminals` is the markup the tokenizer has as single tokens (matched by id once ids were seen);
    `skip_tool_parsing` passes tool markup through as text (the reasoning parser's view) and
    `skip_reasoning_parsing` passes `<think>`/`</think>` through (a tool parser with no reasoning parser).
    """

    def __init__(self, *, thinking: bool, token_terminals: frozenset[str], skip_tool_parsing: bool = False,
                 skip_reasoning_parsing: bool = False) -> None:
        self.initial = "REASONING" if thinking else "CONTENT"
        self.token_terminals = token_terminals & frozenset(_TERMINALS)
        self.skip_tool_parsing = skip_tool_parsing
        self.skip_reasoning_parsing = skip_reasoning_parsing
        self.reset()

    def reset(self, initial: str | None = None) -> None:
        """Start over in `initial` (the configured state by default)."""
        self.state = initial or self.initial
        self.index = -1
        self.saw_token_ids = False
        self.reasoning_tokens = 0
        self.in_skipped_call = False
        self.lexer = Lexer()

    def feed(self, text: str, tokens: list[str]) -> list[Event]:
        """Events for one delta: its text and the texts of its tokens (none for a text-only parse)."""
        self.saw_token_ids = self.saw_token_ids or bool(tokens)
        events: list[Event] = []
        for terminal, chunk, chunk_tokens in self._scan(text, tokens):
            if terminal is None:
                events += self._lexed(self.lexer.feed(chunk, chunk_tokens))
            else:
                events += self._lexed(self.lexer.flush()) + self._on_terminal(terminal, chunk, 0)
        self.reasoning_tokens += sum(event.tokens for event in events if event.kind == "reasoning")
        return events

    def finish(self) -> list[Event]:
        """Flush held-back text and close an open call or thought."""
        events = self._lexed(self.lexer.flush())
        if self.state in _TOOL_STATES:
            events += [Event("call_end", index=self.index)] if self.index >= 0 else []
            self.state = "CONTENT"
        elif self.state == "REASONING":
            events.append(Event("reasoning_end", index=self.index))
            self.state = "CONTENT"
        self.reasoning_tokens += sum(event.tokens for event in events if event.kind == "reasoning")
        return events

    def _scan(self, text: str, tokens: list[str]) -> list[tuple[str | None, str, list[str]]]:
        """TokenIDScanner: split at single-token markup; text before the tokens (held back upstream) leads."""
        if not any(token in self.token_terminals for token in tokens):
            return [(None, text, tokens)] if text else []
        items: list[tuple[str | None, str, list[str]]] = []
        run: list[str] = []
        for token in tokens:
            if token in self.token_terminals:
                items += [(None, "".join(run), run)] if run else []
                items.append((_TERMINALS[token], token, []))
                run = []
            elif token:
                run.append(token)
        items += [(None, "".join(run), run)] if run else []
        lead = text.find("".join(tokens))
        return [(None, text[:lead], []), *items] if lead > 0 else items

    def _lexed(self, lexed: list[tuple[str | None, str, int]]) -> list[Event]:
        """_process_lex_tokens: lexed terminals through the state machine, content by state."""
        events: list[Event] = []
        strict = self.token_terminals if self.saw_token_ids else frozenset()
        for terminal, text, tokens in lexed:
            if terminal is None or text in strict:  # once ids were seen, id-matched markup written as text is text
                events += self._emit(text, tokens) if text else []
            else:
                events += self._on_terminal(terminal, text, tokens)
        return events

    def _emit(self, text: str, tokens: int = 0) -> list[Event]:
        """_emit_for_state: plain text is content, reasoning, a name or arguments, by state."""
        kind = _CONTENT_EVENTS.get(self.state)
        return [Event(kind, text, self.index, tokens)] if kind else []

    def _on_terminal(self, terminal: str, text: str, tokens: int) -> list[Event]:
        """A terminal: its transition's events, or text where it has no meaning in this state or is skipped."""
        transition = _TRANSITIONS.get((self.state, terminal))
        if transition is None:
            if self.skip_tool_parsing and terminal in _TOOL_EXITS:
                self.in_skipped_call = False
            return self._emit(text, tokens)
        if self.skip_reasoning_parsing and terminal in _REASONING_MARKUP:
            return self._emit(text, tokens)
        target, kinds = transition
        if self.skip_tool_parsing and terminal in _TOOL_TERMINALS:
            opener, exit_ = target in _TOOL_STATES, terminal in _TOOL_EXITS
            if opener or not exit_ or self.in_skipped_call:
                self.in_skipped_call = opener or (self.in_skipped_call and not exit_)
                if "reasoning_end" in kinds:
                    self.state = "CONTENT"
                    return [Event("reasoning_end", text, self.index), Event("text", text, self.index)]
                kind = _CONTENT_EVENTS.get(self.state)
                return [Event(kind, text, self.index)] if kind else []
        self.state = target
        events = []
        for kind in kinds:
            self.index += kind == "call_start"
            events.append(Event(kind, text, self.index, tokens))
        return events


_PARAM = re.compile(r"<\s*parameter\s*=\s*([^>]*)>(.*?)(?:<\s*/\s*parameter\s*>|(?=<\s*parameter\s*=))", re.DOTALL)
_PARTIAL_PARAM = re.compile(r"<\s*parameter\s*=\s*([^>]+)>(.*)$", re.DOTALL)
_PARAM_VALUE_END = re.compile(r"<\s*/\s*parameter\s*>|<\s*parameter\s*=")
_TYPE_ALIASES = {"str": "string", "text": "string", "varchar": "string", "char": "string", "enum": "string",
                 "int": "integer", "int32": "integer", "int64": "integer", "uint": "integer", "uint32": "integer",
                 "uint64": "integer", "long": "integer", "short": "integer", "unsigned": "integer",
                 "float": "number", "float32": "number", "float64": "number", "double": "number",
                 "bool": "boolean", "dict": "object", "arr": "array", "list": "array", "sequence": "array"}
_JSON_TYPES = {type(None): "null", bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
               dict: "object"}


def _trim_newlines(value: str) -> str:
    """One leading and one trailing newline are the template's markup around a parameter value (A.10)."""
    return value.removeprefix("\n").removesuffix("\n")


def xml_arguments(raw: str, partial: bool) -> str:
    """_qwen3_arg_converter: the `<parameter=…>` tags of a call body as a JSON object of strings.

    A missing `</parameter>` ends at the next `<parameter=`; `partial` also takes an unclosed last value.
    """
    params = {match.group(1): _trim_newlines(match.group(2)) for match in _PARAM.finditer(raw)}
    if partial:
        match = _PARTIAL_PARAM.search(_PARAM.sub("", raw))
        if match and match.group(1):
            params[match.group(1)] = _trim_newlines(match.group(2))
    return json.dumps(params, ensure_ascii=False)


def _prefixes_of(word: str, tail: str) -> str:
    """A pattern matching every prefix of `word` + `tail` (`tail` only after the whole word)."""
    return "".join(f"(?:{re.escape(char)}" for char in word) + tail + ")?" * len(word)


# Every text that may still grow into `</parameter>` or `<parameter=` (regex's fullmatch(partial=True) in vLLM).
_CLOSING_TAIL, _OPENING_TAIL = _prefixes_of("parameter", r"\s*"), _prefixes_of("parameter", r"\s*=?")
_VALUE_END_PREFIX = re.compile(rf"<\s*(?:/\s*{_CLOSING_TAIL}|{_OPENING_TAIL})?")


def _value_end_window(text: str) -> str:
    """The tail of a value that may still grow into `</parameter>` or `<parameter=`."""
    tail = text[text.rfind("<"):] if "<" in text else ""
    return tail if _VALUE_END_PREFIX.fullmatch(tail) else ""


class ValueExtender:
    """_param_value_extender: streams an open trailing string value exactly as `xml_arguments` would write it,
    holding back a trailing newline that may be markup, until a delta may close the value."""

    def __init__(self, value: str) -> None:
        self.window = _value_end_window(value)
        self.started = bool(value)
        self.held = "\n" if value.endswith("\n") and value != "\n" else ""

    @staticmethod
    def for_args(raw: str) -> "ValueExtender | None":
        """An extender when the call body ends in an open value whose key it has not closed before, else None."""
        match = _PARTIAL_PARAM.search(_PARAM.sub("", raw))
        if match is None or any(m.group(1) == match.group(1) for m in _PARAM.finditer(raw)):
            return None
        return ValueExtender(match.group(2))

    def extend(self, delta: str) -> str | None:
        """The JSON text `delta` adds to the value, or None when it may close it."""
        text = self.window + delta
        if _PARAM_VALUE_END.search(text):
            return None
        self.window = _value_end_window(text)
        text = self.held + delta
        if not self.started and text:
            self.started = True
            text = text.removeprefix("\n")
        self.held = "\n" if text.endswith("\n") else ""
        text = text[: len(text) - len(self.held)]
        return json.dumps(text, ensure_ascii=False)[1:-1]


def schema_types(schema: Any) -> list[str]:
    """extract_types_from_schema: `type` (string or list), `enum` values, and anyOf/oneOf/allOf, recursively."""
    if not isinstance(schema, dict):
        return ["string"]
    types: set[str] = set()
    declared = schema.get("type")
    types.update([declared] if isinstance(declared, str) else
                 [t for t in declared if isinstance(t, str)] if isinstance(declared, list) else [])
    if isinstance(schema.get("enum"), list):
        types.update(_JSON_TYPES[type(value)] for value in schema["enum"] if type(value) in _JSON_TYPES)
    for key in ("anyOf", "oneOf", "allOf"):
        for choice in schema.get(key) if isinstance(schema.get(key), list) else ():
            types.update(schema_types(choice))
    return list(types) if types else ["string"]


def _finite_json(value: Any) -> bool:
    """_is_json_finite: whether the value serialises as valid JSON (no inf or nan)."""
    try:
        json.dumps(value, allow_nan=False)
    except (ValueError, TypeError):
        return False
    return True


def coerce(value: str, types: list[str]) -> Any:
    """coerce_to_schema_type: the first fit in the order null > integer > number > boolean > object > array >
    string; when none fits, a JSON parse of the text, else the text (inf and nan stay text)."""
    wanted = {_TYPE_ALIASES.get(t.strip().lower(), t.strip().lower()) for t in types}
    for kind in ("null", "integer", "number", "boolean", "object", "array", "string"):
        if kind not in wanted:
            continue
        if kind == "null" and value.lower() == "null":
            return None
        if kind == "string":
            return value
        if kind in ("integer", "number"):
            with contextlib.suppress(ValueError):
                return int(value)
        if kind == "number":
            with contextlib.suppress(ValueError):
                number = float(value)
                if math.isfinite(number):
                    return number if number != int(number) else int(number)
        if kind == "boolean" and value.lower().strip() in ("true", "1", "false", "0"):
            return value.lower().strip() in ("true", "1")
        if kind in ("object", "array"):
            with contextlib.suppress(ValueError):
                parsed = json.loads(value)
                if _finite_json(parsed):
                    return parsed
    try:
        parsed = json.loads(value)
    except ValueError:
        return value
    return parsed if _finite_json(parsed) else value


def _coerce_value(value: Any, schema: dict[str, Any]) -> tuple[Any, bool]:
    """ParserEngine._coerce_value: strings by type, objects by `properties`, arrays by `items`."""
    if isinstance(value, str):
        coerced = coerce(value, schema_types(schema))
        return coerced, coerced is not value
    if isinstance(value, dict):
        properties = schema.get("properties")
        return value, isinstance(properties, dict) and _coerce_dict(value, properties)
    if isinstance(value, list):
        items = schema.get("items")
        changed = False
        for i, item in enumerate(value if isinstance(items, dict) else ()):
            coerced, item_changed = _coerce_value(item, cast(dict[str, Any], items))
            if item_changed:
                value[i], changed = coerced, True
        return value, changed
    coerced = coerce(json.dumps(value, ensure_ascii=False), schema_types(schema))
    return coerced, type(coerced) is not type(value) or coerced != value


def _coerce_dict(args: dict[str, Any], properties: dict[str, Any]) -> bool:
    """ParserEngine._coerce_dict: coerce the values that have a schema, in place; whether any changed."""
    changed = False
    for key, value in args.items():
        if isinstance(properties.get(key), dict):
            args[key], value_changed = _coerce_value(value, properties[key])
            changed = changed or value_changed
    return changed


def tool_properties(tools: list[dict[str, Any]] | None, name: str) -> dict[str, Any]:
    """find_tool_properties: the JSON Schema `properties` of the request's tool called `name`, or {}."""
    for tool in tools or ():
        function = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(function, dict) and function.get("name") == name:
            properties = (function.get("parameters") or {}).get("properties", {})
            return properties if isinstance(properties, dict) else {}
    return {}


def fix_arg_types(args_json: str, name: str, tools: list[dict[str, Any]] | None) -> str:
    """_fix_arg_types: coerce string values by the request's schema for the tool; unchanged without one."""
    properties = tool_properties(tools, name) if tools and name else {}
    try:
        args = json.loads(args_json)
    except ValueError:
        return args_json
    if not properties or not isinstance(args, dict) or not _coerce_dict(args, properties):
        return args_json
    return json.dumps(args, ensure_ascii=False)


def safe_prefix(json_text: str, string_keys: set[str] | None) -> tuple[str, bool]:
    """_safe_arg_prefix: the prefix of arguments JSON that later text cannot change.

    A trailing value is held back, except an open string of a key in `string_keys` (None: every key), which
    streams as written; the flag says the prefix stops inside that string.
    """
    last_colon, last_key, pending, in_string, escape, start, depth = -1, None, None, False, False, -1, 0
    for i, char in enumerate(json_text):
        if escape:
            escape = False
        elif in_string:
            escape = char == "\\"
            if char == '"':
                in_string = False
                pending = json_text[start + 1:i] if depth == 1 else pending
        elif char == '"':
            in_string, start = True, i
        elif char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
        elif char == ":" and depth == 1:
            last_colon, last_key, pending = i, pending, None
    if last_colon < 0:
        return "", False
    end = last_colon + 1
    while end < len(json_text) and json_text[end] in " \t\n\r":
        end += 1
    if end >= len(json_text) or json_text[end] != '"' or (string_keys is not None and last_key not in string_keys):
        return json_text[:end], False
    escape = False
    for i in range(end + 1, len(json_text)):
        if escape:
            escape = False
        elif json_text[i] == "\\":
            escape = True
        elif json_text[i] == '"':
            return json_text[:i], True
    return json_text, True


def streamable_keys(properties: dict[str, Any]) -> set[str] | None:
    """Keys whose open string values may stream: all without a schema, else those typed string only."""
    if not properties:
        return None
    return {key for key, schema in properties.items() if set(schema_types(schema)) == {"string"}}


@dataclass
class CallSlot:
    """One tool call as the engine assembles it: raw name and body text, and what has been streamed."""

    id: str = ""
    name: str = ""
    args: str = ""
    name_sent: bool = False
    string_keys: set[str] | None = None
    streamed: str = ""
    extender: ValueExtender | None = None
    value_streams: bool = False


@dataclass
class ExtractedCalls:
    """ExtractedToolCallInformation: calls as (id, name, arguments), and the content left around them."""

    calls: list[tuple[str, str, str]]
    content: str | None


class Qwen3Parser:
    """ParserEngine with the qwen3 grammar: events to reasoning, content and tool-call deltas.

    vLLM composes it twice: as the reasoning parser (`skip_tool_parsing`, starting in reasoning unless thinking
    is off or the prompt closed the thought) and as the qwen3_coder tool parser (starting in content, and with
    `skip_reasoning_parsing` when no reasoning parser is configured).
    """

    def __init__(self, version: Version, *, thinking: bool, tools: list[dict[str, Any]] | None,
                 token_terminals: frozenset[str], skip_tool_parsing: bool = False,
                 skip_reasoning_parsing: bool = False) -> None:
        self.version = version
        self.thinking = thinking
        self.tools = tools
        self.grammar = Grammar(thinking=thinking, token_terminals=token_terminals,
                               skip_tool_parsing=skip_tool_parsing, skip_reasoning_parsing=skip_reasoning_parsing)
        self.prompt_closes_reasoning = False
        self.suppress_calls = False
        self.streaming = False
        self.reset()

    def reset(self, initial: str | None = None) -> None:
        """_reset: a prompt that closed the thought starts the default parse in content."""
        closed = initial is None and self.prompt_closes_reasoning
        self.grammar.reset("CONTENT" if closed else initial)
        self.reasoning_ended = closed
        self.slots: list[CallSlot] = []
        self.deferred = ""
        self.content_seen = False

    def check_request(self, tools: list[dict[str, Any]] | None, tool_choice: Any) -> None:
        """_check_skip_tool_parsing: the request's tools; `tool_choice: "none"` with tools swallows calls."""
        self.tools = tools or self.tools
        if not self.grammar.skip_tool_parsing and tool_choice == "none" and tools:
            self.suppress_calls = True

    # Reasoning parser view.

    def extract_reasoning(self, text: str) -> tuple[str | None, str | None]:
        """Non-streaming: (reasoning, content); with thinking off the text is all content."""
        if not self.thinking:
            return None, text
        self.reset()
        events = self.grammar.feed(text, []) + self.grammar.finish()
        self.reasoning_ended = self.reasoning_ended or any(event.kind == "reasoning_end" for event in events)
        reasoning = "".join(event.value for event in events if event.kind == "reasoning")
        content = "".join(event.value for event in events if event.kind == "text")
        return reasoning or None, content or None

    def stream_reasoning(self, text: str, tokens: list[str]) -> dict[str, Any] | None:
        """extract_reasoning_streaming: the delta of one step."""
        if not self.streaming:
            self.streaming = True
            self.reset()
        return self.to_delta(self.grammar.feed(text, tokens))

    def finish_stream(self) -> dict[str, Any] | None:
        """finish_streaming: flush what the grammar and the whitespace deferral still hold."""
        events = self.grammar.finish()
        return self.to_delta(events, finished=True) if events or self.deferred else None

    # Tool parser view.

    def extract_calls(self, content: str) -> ExtractedCalls:
        """extract_tool_calls_from_content: one pass over reasoning-free content."""
        _, parsed, extracted = self.single_pass(content, [], "CONTENT")
        return ExtractedCalls(extracted.calls, extracted.content if extracted.content is not None else parsed)

    def stream_calls(self, text: str, tokens: list[str]) -> dict[str, Any] | None:
        """extract_tool_calls_streaming: the tool parser starts its stream in content."""
        if not self.streaming:
            self.streaming = True
            self.reset("CONTENT")
        return self.to_delta(self.grammar.feed(text, tokens))

    def single_pass(self, text: str, tokens: list[str],
                    initial: str | None = None) -> tuple[str | None, str | None, ExtractedCalls]:
        """_single_pass_parse: reasoning, content (stripped around calls) and the calls of a whole text."""
        self.reset(initial)
        delta = self.to_delta(self.grammar.feed(text, tokens) + self.grammar.finish(), finished=True) or {}
        extracted = self.extracted()
        content = delta.get("content")
        if content:
            content = strip_around_calls(content, bool(extracted.calls))
        return delta.get("reasoning"), content, extracted

    def reasoning_tokens(self, text: str, tokens: list[str]) -> int:
        """count_reasoning_tokens: output tokens the grammar reads as reasoning (markup excluded)."""
        self.single_pass(text, tokens)
        return self.grammar.reasoning_tokens

    # Events to deltas.

    def to_delta(self, events: list[Event], finished: bool = False) -> dict[str, Any] | None:
        """_events_to_delta: content, reasoning and tool-call entries; whitespace-only content waits (A.8)."""
        entries: list[dict[str, Any]] = []
        content: list[str] = []
        reasoning = "".join(event.value for event in events if event.kind == "reasoning")
        carried, seen_call = self.deferred, False
        for event in events:
            if event.kind == "text":
                if seen_call:
                    self.deferred += event.value
                else:
                    content.append(event.value)
            elif event.kind == "reasoning_end":
                self.reasoning_ended = True
            elif event.kind in ("call_start", "name", "arg", "call_end") and not self.suppress_calls:
                seen_call = True
                self._on_call_event(event, entries)
        entries = _coalesce(entries) if len(entries) > 1 else entries
        if self.deferred and (not seen_call or not entries):
            content = [carried, *content, self.deferred[len(carried):]]
            self.deferred = ""
        text = self._visible("".join(content), finished)
        delta: dict[str, Any] = {}
        if text:
            delta["content"] = text
        if reasoning:
            delta["reasoning"] = reasoning
        if entries:
            delta["tool_calls"] = entries
        return delta or None

    def _visible(self, text: str, finished: bool) -> str:
        """Content once non-whitespace was seen; before, whitespace is dropped before calls or deferred."""
        if self.content_seen or not text:
            return text
        if text.strip():
            self.content_seen = True
            return text
        if self.slots:
            return ""
        if not finished:
            self.deferred = text
            return ""
        return text

    def _on_call_event(self, event: Event, entries: list[dict[str, Any]]) -> None:
        """Tool-call events into slots and delta entries."""
        while len(self.slots) <= event.index:
            self.slots.append(CallSlot())
        slot = self.slots[event.index]
        if event.kind == "name":
            slot.name += event.value
        elif event.kind == "arg":
            self._on_arg(event, slot, entries)
        elif event.kind == "call_end":
            self._on_call_end(event.index, slot, entries)

    def _on_arg(self, event: Event, slot: CallSlot, entries: list[dict[str, Any]]) -> None:
        """_handle_arg_chunk: the name once known, then argument fragments."""
        slot.args += event.value
        if not slot.name_sent:
            name = slot.name or (_json_name(slot.args) if event.value else None)
            if name:
                entries.append(self._name_entry(event.index, slot, name))
        elif event.value and (fragment := self._arguments_delta(slot, event.value)):
            entries.append({"index": event.index, "function": {"arguments": fragment}})

    def _on_call_end(self, index: int, slot: CallSlot, entries: list[dict[str, Any]]) -> None:
        """_handle_tool_end: the rest of the arguments, with the name if it was never sent."""
        remaining = self._flush_arguments(slot)
        if not slot.name_sent:
            name = slot.name or _json_name(slot.args) or ""
            if name:
                entries.append(self._name_entry(index, slot, name, remaining or ""))
                return
        if remaining and slot.name_sent:
            entries.append({"index": index, "function": {"arguments": remaining}})

    def _name_entry(self, index: int, slot: CallSlot, name: str, arguments: str | None = None) -> dict[str, Any]:
        """_emit_name_delta: the call's id, type and name (and arguments when it ends at once)."""
        slot.name, slot.name_sent = name, True
        slot.string_keys = streamable_keys(tool_properties(self.tools, name))
        slot.id = slot.id or tool_call_id(self.version)
        function = {"name": name} if arguments is None else {"name": name, "arguments": arguments}
        return {"id": slot.id, "type": "function", "index": index, "function": function}

    def _arguments_delta(self, slot: CallSlot, raw: str) -> str | None:
        """_compute_arg_delta: extend an open string value, or convert the whole body and send what is safe."""
        if slot.extender is not None:
            fragment = slot.extender.extend(raw)
            if fragment is not None:
                if not fragment or not slot.value_streams:
                    return None
                slot.streamed += fragment
                return fragment
            slot.extender = None
        current = xml_arguments(slot.args, True)
        current = fix_arg_types(current, slot.name, self.tools) if slot.name else current
        safe, value_streams = safe_prefix(current, slot.string_keys)
        if not safe or (slot.streamed and not safe.startswith(slot.streamed)):
            return None
        fragment, slot.streamed = safe[len(slot.streamed):], safe
        slot.extender, slot.value_streams = ValueExtender.for_args(slot.args), value_streams
        return fragment or None

    def _flush_arguments(self, slot: CallSlot) -> str | None:
        """_flush_arg_converter: the final arguments JSON past what was streamed."""
        final = fix_arg_types(xml_arguments(slot.args, False), slot.name, self.tools)
        if len(final) <= len(slot.streamed) or (slot.streamed and not final.startswith(slot.streamed)):
            return None
        fragment, slot.streamed = final[len(slot.streamed):], final
        return fragment

    def extracted(self) -> ExtractedCalls:
        """_build_extracted_result: every named call with its converted, coerced arguments."""
        calls = []
        for slot in self.slots:
            name, body = slot.name.strip(), slot.args
            if not name and body.strip():
                name, arguments = _json_call(body)
            else:
                arguments = xml_arguments(body, False) if body.strip() else "{}"
            if name:
                slot.id = slot.id or tool_call_id(self.version)
                calls.append((slot.id, name, fix_arg_types(arguments, name, self.tools)))
        return ExtractedCalls(calls, None)


def strip_around_calls(content: str, calls: bool) -> str | None:
    """_strip_content_whitespace: content beside tool calls is stripped; empty content is None."""
    return (content.strip() if calls else content) or None


def _json_name(body: str) -> str | None:
    """_try_extract_name: a `"name": "…"` in a call body written as JSON."""
    match = re.search(r'"name"\s*:\s*"([^"]*)"', body)
    return match.group(1) if match and match.group(1) else None


def _json_call(body: str) -> tuple[str, str]:
    """_extract_name_and_args: a call body that is a JSON object with a name and arguments (or parameters)."""
    try:
        parsed = json.loads(body.strip())
    except json.JSONDecodeError:
        return "", body.strip()
    if not isinstance(parsed, dict):
        return "", body.strip()
    for key in ("arguments", "parameters"):
        if key in parsed:
            value = parsed[key]
            return parsed.get("name", ""), value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return parsed.get("name", ""), json.dumps({k: v for k, v in parsed.items() if k != "name"}, ensure_ascii=False)


def _coalesce(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """_coalesce_tool_call_deltas: one entry per call index, arguments concatenated."""
    merged: dict[int, dict[str, Any]] = {}
    for entry in entries:
        existing = merged.setdefault(entry["index"], entry)
        if existing is entry:
            continue
        for key in ("id", "type"):
            if key in entry and key not in existing:
                existing[key] = entry[key]
        function, target = entry.get("function", {}), existing.setdefault("function", {})
        if "name" in function and "name" not in target:
            target["name"] = function["name"]
        if "arguments" in function:
            target["arguments"] = target.get("arguments", "") + function["arguments"]
    return entries if len(merged) == len(entries) else list(merged.values())


# --- 8. Parsing ---

_TURN_BOUNDARIES = frozenset({"<|im_start|>", "<|im_end|>"})


@dataclass(frozen=True)
class ChatOptions:
    """What 0.33's parsers and message assembly read from a request."""

    tools: list[dict[str, Any]] | None
    tool_choice: Any  # "none", "auto", "required", a named-function dict, or None for an explicit null
    include_reasoning: bool = True
    parallel_tool_calls: bool | None = True
    thinking: bool = True  # chat_template_kwargs.enable_thinking

    @property
    def forces_calls(self) -> bool:
        """`required` or a named function: content is "" rather than null."""
        return self.tool_choice == "required" or isinstance(self.tool_choice, dict)


@dataclass(frozen=True)
class ParserConfig:
    """The server's flags: `--tool-call-parser` (with auto tool choice), `--reasoning-parser qwen3`, and the
    template whose tokenizer decides which markup is a single token."""

    tool_parser: ToolParserName | None
    reasoning: bool
    template: Template

    @property
    def any(self) -> bool:
        """Whether vLLM builds a parser at all."""
        return self.tool_parser is not None or self.reasoning


def _reasoning_end_tokens(template: Template) -> frozenset[str]:
    """_derive_reasoning_end_token_ids: </think> and <tool_call>, or none if </think> is not a single token."""
    return frozenset({THINK_END, TOOL_CALL_START}) if THINK_END in special_tokens(template) else frozenset()


def is_reasoning_end(tokens: list[str], *, thinking: bool, template: Template) -> bool:
    """ParserEngine.is_reasoning_end on the prompt: does it close the thought in the current turn?"""
    ends = _reasoning_end_tokens(template)
    for token in reversed(tokens):
        if token in ends:
            return True
        if token == THINK_START and THINK_START in special_tokens(template):
            if thinking:
                return False
            break
        if token in _TURN_BOUNDARIES:
            break
    return not thinking


def content_tokens(tokens: list[str], *, thinking: bool, template: Template) -> list[str]:
    """extract_content_ids: the tokens after the end of reasoning (an implicit `<tool_call>` end included)."""
    if not thinking:
        return tokens
    if THINK_END in special_tokens(template) and THINK_END in tokens:
        return tokens[len(tokens) - tokens[::-1].index(THINK_END):]
    ends = _reasoning_end_tokens(template)
    start = max((i + 1 for i, token in enumerate(tokens) if token in _TURN_BOUNDARIES), default=0)
    return next((tokens[i:] for i in range(start, len(tokens)) if tokens[i] in ends), tokens)


class Parser:
    """vLLM 0.33's DelegatingParser: the qwen3 reasoning parser and a hermes or qwen3_coder tool parser composed.

    One instance per parse or per stream, as in vLLM. `parse` splits a whole output; `parse_delta` is called
    once per streamed step and follows vLLM's phases: reasoning until its end, then the tool parser (or the
    raw text), with the whitespace and hand-over rules of A.8.
    """

    def __init__(self, version: Version, config: ParserConfig, options: ChatOptions, prompt: list[str]) -> None:
        terminals = special_tokens(config.template)
        self.config, self.options = config, options
        self.reasoning: Qwen3Parser | None = None
        self.xml: Qwen3Parser | None = None
        if config.reasoning:
            self.reasoning = Qwen3Parser(version, thinking=options.thinking, tools=options.tools,
                                         token_terminals=terminals, skip_tool_parsing=True)
        if config.tool_parser == "qwen3_coder":
            self.xml = Qwen3Parser(version, thinking=options.thinking, tools=options.tools, token_terminals=terminals,
                                   skip_reasoning_parsing=not config.reasoning)
        self.hermes = HermesStream(version) if config.tool_parser == "hermes" else None
        self.engine_based = config.tool_parser != "hermes"
        if self.reasoning is not None:
            self.reasoning.prompt_closes_reasoning = options.thinking and is_reasoning_end(
                prompt, thinking=True, template=config.template)
        self.reasoning_ended = self.reasoning is None or is_reasoning_end(
            prompt, thinking=options.thinking, template=config.template)
        self.calls_started = False
        self.previous_text = ""
        self.previous_tokens: list[str] = []

    def parse(self, text: str) -> tuple[str | None, str | None, list[tuple[str, str, str]] | None]:
        """Non-streaming: (reasoning, content, calls or None) of a whole output."""
        if self.reasoning is not None:
            reasoning, content = self.reasoning.extract_reasoning(text)
        else:
            reasoning, content = None, text
        calls, content = self._extract_calls(content)
        return reasoning, content, calls

    def reasoning_tokens(self, tokens: list[str]) -> int:
        """count_reasoning_tokens, on a fresh engine as vLLM's counting engine is."""
        if self.reasoning is None:
            return 0
        counter = Qwen3Parser(self.reasoning.version, thinking=self.options.thinking, tools=None,
                              token_terminals=special_tokens(self.config.template))
        counter.prompt_closes_reasoning = self.reasoning.prompt_closes_reasoning
        return counter.reasoning_tokens("".join(tokens), tokens)

    def _extract_calls(self, content: str | None) -> tuple[list[tuple[str, str, str]] | None, str | None]:
        """_extract_tool_calls: with both these parsers, required and named choices parse as auto does."""
        if self.hermes is None and self.xml is None:
            return [], content
        if self.options.tool_choice == "none":
            return [], self._tool_extract(content or "").content if self.engine_based else content
        extracted = self._tool_extract(content if content is not None else "")
        if extracted.calls:
            return extracted.calls, extracted.content if extracted.content and extracted.content.strip() else None
        if self.options.forces_calls and (content is None or not content.strip()):
            return [], None
        return None, (extracted.content or None) if self.engine_based else content

    def _tool_extract(self, content: str) -> ExtractedCalls:
        """The tool parser's non-streaming extraction: qwen3_coder's engine or hermes' regex."""
        if self.xml is not None:
            self.xml.check_request(self.options.tools, self.options.tool_choice)
            return self.xml.extract_calls(content)
        extracted = extract_tool_calls(content)
        if extracted is None:
            return ExtractedCalls([], content)
        return ExtractedCalls([("", name, arguments) for name, arguments in extracted[1]], extracted[0])

    def parse_delta(self, text: str, tokens: list[str], finished: bool) -> dict[str, Any] | None:
        """One streamed step: the delta vLLM sends for it, or None."""
        if self.engine_based:
            current_text, current_tokens = text, tokens
        else:
            current_text, current_tokens = self.previous_text + text, self.previous_tokens + tokens
        delta: dict[str, Any] | None = None
        transitioned = False
        if self.reasoning is not None and not self.reasoning_ended:
            delta = self.reasoning.stream_reasoning(text, tokens)
            if self.reasoning.reasoning_ended:
                self.reasoning_ended = transitioned = True
                current_tokens = content_tokens(tokens, thinking=self.options.thinking,
                                                template=self.config.template)
                flushed = self.reasoning.finish_stream() or {}
                current_text = ((delta or {}).get("content") or "") + (flushed.get("content") or "")
                if self.engine_based and self.xml is None and current_text:
                    delta = {**(delta or {}), "content": current_text}
                text = text if self.engine_based else current_text
        in_calls = self.reasoning_ended and (self.hermes is not None or self.xml is not None)
        if in_calls:
            delta = self._call_phase(delta, current_text, current_tokens, text, tokens)
        elif delta is None and not transitioned and self.reasoning_ended:
            delta = {"content": text}
        self.previous_text, self.previous_tokens = ("", []) if self.engine_based else (current_text, current_tokens)
        if finished:
            delta = self._finish(delta)
        if delta is not None and not self.options.include_reasoning:
            delta["reasoning"] = None
            if not delta.get("content") and not delta.get("tool_calls"):
                delta = None
        return delta

    def _call_phase(self, delta: dict[str, Any] | None, current_text: str, current_tokens: list[str], text: str,
                    tokens: list[str]) -> dict[str, Any] | None:
        """The tool-call phase of one step; reasoning from the same step rides along."""
        if not self.calls_started:
            self.calls_started = True
            self.previous_text, self.previous_tokens = "", []
            text, tokens = current_text, current_tokens
        reasoning = (delta or {}).get("reasoning")
        delta = self._stream_calls(current_text, text, tokens)
        if reasoning:
            if delta is None:
                delta = {"reasoning": reasoning}
            elif not delta.get("reasoning"):
                delta["reasoning"] = reasoning
        return delta

    def _stream_calls(self, current_text: str, text: str, tokens: list[str]) -> dict[str, Any] | None:
        """_extract_tool_calls_streaming: "none" passes hermes text through; the engine parses and drops calls."""
        if self.xml is not None:
            self.xml.check_request(self.options.tools, self.options.tool_choice)
            delta = self.xml.stream_calls(text, tokens)
            if delta is not None and self.options.tool_choice == "none":
                delta["tool_calls"] = []
            return delta
        if self.options.tool_choice == "none":
            return {"content": text} if text else None
        return cast(HermesStream, self.hermes).step(current_text)

    def _finish(self, delta: dict[str, Any] | None) -> dict[str, Any] | None:
        """finalize_generation and _flush_engine_parsers at the last step."""
        if delta is not None and delta.get("tool_calls") and "function" in delta["tool_calls"][-1]:
            function = delta["tool_calls"][-1]["function"]
            remaining = self.hermes.unstreamed_arguments() if self.hermes is not None else ""
            function["arguments"] = (function.get("arguments") or "") + remaining
        for engine in (self.reasoning, self.xml):
            if engine is None or (engine is self.reasoning and self.reasoning_ended):
                continue
            flushed = engine.finish_stream()
            if flushed is None:
                continue
            if delta is None:
                delta = flushed
                continue
            for key in ("content", "reasoning"):
                if flushed.get(key):
                    delta[key] = (delta.get(key) or "") + flushed[key]
            if flushed.get("tool_calls"):
                delta["tool_calls"] = [*(delta.get("tool_calls") or []), *flushed["tool_calls"]]
        return delta


def keeps_calls(config: ParserConfig, options: ChatOptions) -> bool:
    """keeps_tool_calls: forced choices, or "auto" with tools and a tool parser; `tool_choice: null` drops them."""
    if options.forces_calls:
        return True
    return config.tool_parser is not None and options.tool_choice == "auto" and bool(options.tools)


def finish_reason_for(engine_reason: str, options: ChatOptions, calls_made: bool) -> str:
    """resolve_finish_reason (A.3): "tool_calls" only for calls at a natural stop; named choices say "stop"."""
    if calls_made and engine_reason == "stop" and not isinstance(options.tool_choice, dict):
        return "tool_calls"
    return engine_reason


def assemble_message(version: Version, config: ParserConfig, options: ChatOptions, reasoning: str | None,
                     content: str | None, calls: list[tuple[str, str, str]] | None
                     ) -> tuple[str | None, str | None, list[tuple[str, str, str]]]:
    """assemble_chat_message_fields: reasoning, content and the calls kept, each with an id."""
    if not options.include_reasoning:
        reasoning = None
    if not keeps_calls(config, options):
        return reasoning, content, []
    if options.forces_calls:
        content = content or ""
    kept = (calls or [])[:1] if options.parallel_tool_calls is False else calls or []
    return reasoning, content, [(call_id or tool_call_id(version), name, args) for call_id, name, args in kept]


@dataclass
class StreamProcessor:
    """ChatStreamProcessor: one parser per stream, tool calls dropped unless kept, the finish reason resolved."""

    config: ParserConfig
    options: ChatOptions
    parser: Parser | None
    output_tokens: int = 0
    calls_streamed: bool = False

    def step(self, text: str, tokens: list[str], finish: str | None) -> tuple[dict[str, Any] | None, str | None]:
        """(delta or None, chat finish reason or None) for one engine step of `tokens` (EOS as "")."""
        delta: dict[str, Any] | None
        if not text and not tokens and not self.output_tokens:
            delta = {}
        elif self.parser is not None:
            delta = self.parser.parse_delta(text, tokens, finish is not None)
            if delta is not None and delta.get("tool_calls"):
                if keeps_calls(self.config, self.options):
                    self.calls_streamed = True
                else:
                    delta["tool_calls"] = []
                    delta = delta if delta.get("content") or delta.get("reasoning") else None
        else:
            delta = {"content": text}
        self.output_tokens += len(tokens)
        if delta is not None and delta.get("tool_calls") and self.options.parallel_tool_calls is False:
            delta["tool_calls"] = [entry for entry in delta["tool_calls"] if entry["index"] == 0]
        return delta, finish_reason_for(finish, self.options, self.calls_streamed) if finish else None


def _entries_without(delta: dict[str, Any], drop: Callable[[dict[str, Any]], bool]) -> dict[str, Any] | None:
    """A delta without some tool-call entries; None when nothing visible is left."""
    entries = [entry for entry in delta.get("tool_calls") or () if not drop(entry)]
    kept = {**delta, "tool_calls": entries} if "tool_calls" in delta else dict(delta)
    return kept if entries or kept.get("content") or kept.get("reasoning") or "tool_calls" not in delta else None


def apply_stream_fault(deltas: list[dict[str, Any] | None], fault: str | None) -> list[dict[str, Any] | None]:
    """`no_args` (vllm#11392) drops every argument fragment; `drop_last_brace` (vllm#19056) a call's final `}`."""
    def is_arguments(entry: dict[str, Any]) -> bool:
        return "arguments" in entry.get("function", {}) and "name" not in entry.get("function", {})

    if fault == "no_args":
        return [None if delta is None else _entries_without(delta, is_arguments) for delta in deltas]
    if fault != "drop_last_brace":
        return deltas
    last: dict[int, int] = {}
    for position, delta in enumerate(deltas):
        for entry in (delta or {}).get("tool_calls") or ():
            if is_arguments(entry):
                last[entry["index"]] = position
    faulty = list(deltas)
    for index, position in last.items():
        delta = cast(dict[str, Any], faulty[position])
        entries = []
        for entry in delta["tool_calls"]:
            if entry["index"] == index and is_arguments(entry):
                fragment = entry["function"]["arguments"].rstrip()
                fragment = fragment[:-1] if fragment.endswith("}") else fragment
                entry = {**entry, "function": {"arguments": fragment}}
            entries.append(entry)
        faulty[position] = _entries_without({**delta, "tool_calls": entries},
                                            lambda entry: is_arguments(entry) and not entry["function"]["arguments"])
    return faulty


# --- 9. Wire ---


def dumps(value: Any) -> str:
    """Compact JSON as starlette's JSONResponse and pydantic's model_dump_json write it."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def json_response(value: Any, status: int = 200) -> web.Response:
    """starlette's JSONResponse: `application/json` without a charset."""
    return web.Response(body=dumps(value).encode(), status=status, content_type="application/json")


@dataclass(frozen=True)
class Usage:
    """Token counts of one answer; `reasoning_tokens` is None unless the server runs a reasoning parser."""

    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int | None = None

    def as_dict(self, version: Version, *, stream: bool) -> dict[str, Any]:
        """UsageInfo: every key in a body; the stream's usage chunk leaves the null details out (A.1 row 11)."""
        usage: dict[str, Any] = {"prompt_tokens": self.prompt_tokens,
                                 "total_tokens": self.prompt_tokens + self.completion_tokens,
                                 "completion_tokens": self.completion_tokens}
        if not stream:
            usage["prompt_tokens_details"] = None
        if version == "0.33" and (self.reasoning_tokens is not None or not stream):
            details = None if self.reasoning_tokens is None else {"reasoning_tokens": self.reasoning_tokens}
            usage["completion_tokens_details"] = details
        return usage


def fingerprint(model: str) -> str:
    """0.33's default system_fingerprint: `vllm-<version>-<8 hex of the config hash>` (A.1 row 12)."""
    return f"vllm-0.33.0-{zlib.crc32(model.encode()):08x}"


def completion_body(version: Version, completion_id: str, model: str, message: dict[str, Any], finish_reason: str,
                    usage: Usage) -> dict[str, Any]:
    """ChatCompletionResponse.model_dump(): every key, nulls included (section 2a/2b, A.5)."""
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason, "stop_reason": None,
              "token_ids": None}
    body: dict[str, Any] = {"id": completion_id, "object": "chat.completion", "created": int(time.time()),
                            "model": model, "choices": [choice], "service_tier": None}
    if version == "0.11":
        return {**body, "system_fingerprint": None, "usage": usage.as_dict(version, stream=False),
                "prompt_logprobs": None, "prompt_token_ids": None, "kv_transfer_params": None}
    choice.update(routed_experts=None, weight_versions=None)
    return {**body, "system_fingerprint": fingerprint(model), "usage": usage.as_dict(version, stream=False),
            "prompt_logprobs": None, "prompt_token_ids": None, "prompt_text": None, "kv_transfer_params": None,
            "ec_transfer_params": None, "metrics": None}


def assistant_message(version: Version, content: str | None, calls: list[tuple[str, str, str]],
                      reasoning: str | None = None) -> dict[str, Any]:
    """ChatMessage: v0.11 always lists `tool_calls` and has `reasoning_content`; 0.33 omits an empty
    `tool_calls` (6c427dd4) and has `reasoning` (A.5)."""
    tool_calls = [{"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
                  for call_id, name, arguments in calls]
    message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None, "annotations": None,
                               "audio": None, "function_call": None}
    if version == "0.11":
        return {**message, "tool_calls": tool_calls, "reasoning_content": None}
    return {**message, **({"tool_calls": tool_calls} if tool_calls else {}), "reasoning": reasoning}


def delta_json(delta: dict[str, Any]) -> str:
    """DeltaMessage with exclude_unset: set fields in declaration order, an empty `tool_calls` left out."""
    ordered: dict[str, Any] = {key: delta[key] for key in ("role", "content", "reasoning") if key in delta}
    if delta.get("tool_calls"):
        ordered["tool_calls"] = [
            {**{key: entry[key] for key in ("id", "type") if key in entry}, "index": entry["index"],
             **({"function": {key: entry["function"][key] for key in ("name", "arguments")
                              if key in entry["function"]}} if "function" in entry else {})}
            for entry in delta["tool_calls"]]
    return dumps(ordered)


DONE = b"data: [DONE]\n\n"
KEEP_ALIVE = b": keep-alive\n\n"


class SseChunks:
    """ChatCompletionStreamResponse events of one stream (exclude_unset): same id, created and model."""

    def __init__(self, version: Version, completion_id: str, model: str, include_usage: bool) -> None:
        self.version = version
        self.model = model
        self.include_usage = include_usage
        self._head = (f'data: {{"id":{dumps(completion_id)},"object":"chat.completion.chunk",'
                      f'"created":{int(time.time())},"model":{dumps(model)},"choices":')

    def role(self) -> bytes:
        tail = ',"prompt_text":null' if self.version == "0.33" else ""
        return (self._head + '[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,'
                f'"finish_reason":null}}],"prompt_token_ids":null{tail}}}\n\n').encode()

    def delta(self, delta: dict[str, Any]) -> bytes:
        tail = ',"kv_transfer_params":null' if self.version == "0.33" else ""
        return (self._head + f'[{{"index":0,"delta":{delta_json(delta)},"logprobs":null,"finish_reason":null,'
                f'"token_ids":null}}]{tail}}}\n\n').encode()

    def final(self, delta: dict[str, Any], finish_reason: str) -> bytes:
        """The finish chunk; without a usage chunk to carry it, 0.33 stamps the fingerprint here."""
        choice = (f'[{{"index":0,"delta":{delta_json(delta)},"logprobs":null,"finish_reason":{dumps(finish_reason)},'
                  '"stop_reason":null,"token_ids":null')
        if self.version == "0.11":
            return (self._head + choice + "}]}\n\n").encode()
        stamp = "" if self.include_usage else f',"system_fingerprint":{dumps(fingerprint(self.model))}'
        return (self._head + choice + f',"weight_versions":null}}]{stamp},"kv_transfer_params":null}}\n\n').encode()

    def usage(self, usage: Usage) -> bytes:
        stamp = f',"system_fingerprint":{dumps(fingerprint(self.model))}' if self.version == "0.33" else ""
        return (self._head + f'[],"usage":{dumps(usage.as_dict(self.version, stream=True))}{stamp}}}\n\n').encode()


def stream_error_event(version: Version, shape: Literal["new", "old"], message: str, status: int) -> bytes:
    """An error inside a stream: v0.11 (section 3e) json.dumps spacing and always 400; 0.33 (A.4) one compact
    frame, 500 for a generation error and 503 for a retryable one."""
    if version == "0.33":
        err_type = "InternalServerError" if status == 500 else "ServiceUnavailableError"
        frame = {"error": {"message": message, "type": err_type, "param": None, "code": status}}
        return f"data: {dumps(frame)}\n\n".encode()
    info = {"message": message, "type": "BadRequestError", "param": None, "code": 400}
    payload = {"error": info if shape == "new" else {"object": "error", **info}}
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()


GARBAGE = [b"data: {not json\n\n", b'data: {"id":"chatcmpl-\n\n']


# --- 10. Server ---

CHAT_PATH = "/v1/chat/completions"
STALL_S = 3600.0
_FEW_CHUNKS = 3  # the role chunk and two deltas: what a faulty stream sends before it goes wrong
_HTTP_FAULTS = frozenset({"empty_500", "non_json", "busy", "engine_dead", "hang"})


def tool_parser_name(value: bool | str | None) -> ToolParserName | None:
    """`tool_parser=True/False` keep meaning hermes / none; `qwen3_xml` is vLLM's alias of qwen3_coder."""
    if value is True or value == "hermes":
        return "hermes"
    if value in ("qwen3_coder", "qwen3_xml"):
        return "qwen3_coder"
    if value is False or value is None or value == "none":
        return None
    raise ValueError(f"unknown tool parser {value!r}; use hermes, qwen3_coder, qwen3_xml or None")


def default_version() -> Version:
    """$FAKE_VLLM_VERSION, else "0.11" until the service is updated for 0.33."""
    value = os.environ.get(VERSION_ENV, "0.11")
    if value not in VERSIONS:
        raise ValueError(f"{VERSION_ENV}={value!r}; use one of {list(VERSIONS)}")
    return cast(Version, value)


def template_kwargs(body: dict[str, Any]) -> dict[str, Any]:
    """build_chat_params: the request's chat_template_kwargs; `reasoning_effort` sets enable_thinking unless
    the client did."""
    kwargs = dict(body["chat_template_kwargs"]) if isinstance(body.get("chat_template_kwargs"), dict) else {}
    effort = body.get("reasoning_effort")
    if effort is not None:
        kwargs["reasoning_effort"] = effort
        kwargs.setdefault("enable_thinking", effort != "none")
    return kwargs


@dataclass
class _Turn:
    """A chat request that passed every check: what generation and the response need."""

    body: dict[str, Any]
    conversation: list[dict[str, Any]]
    prompt: list[str]
    max_tokens: int
    completion_id: str
    parse_tools: bool = False  # v0.11: whether hermes parses the output
    options: ChatOptions | None = None  # 0.33: what the parsers read

    @property
    def stream(self) -> bool:
        return self.body.get("stream") is True


@dataclass(frozen=True)
class _Generation:
    """What the "engine" produced for a turn: tokens, why it stopped, and the usage."""

    tokens: list[str]
    finish_reason: str
    usage: Usage


class FakeVLLM:
    """A scripted, recording stand-in for `vllm serve` on the current event loop.

    Args:
        model: The served model name (default: a model of the template's family).
        version: "0.11" or "0.33" (default: $FAKE_VLLM_VERSION, else "0.11"). 0.11 plays Qwen2.5 with hermes.
        tool_parser: `--enable-auto-tool-choice --tool-call-parser X`: True or "hermes", "qwen3_coder" (alias
            "qwen3_xml"), or False/None for a server without a tool parser.
        reasoning_parser: "qwen3" for `--reasoning-parser qwen3` (0.33 only).
        template: The chat template and tokenizer: "qwen2.5", "qwen3" (hybrid thinking) or "qwen3.5".
        error_shape: v0.11 only: "old" for the `{"object": "error", ...}` body of v0.10.0 and before.
        api_key: `--api-key`: /v1 requires `Authorization: Bearer <key>`.
        max_model_len: The context window N.
        token_delay_s: Seconds between streamed chunks (a Reply may override it).
        answer_tokens: Make the default responder's plain answers exactly this many tokens (benchmarks).
        keep_requests: Record every chat request in `requests`.
        sse_keep_alive_s: 0.33's `--sse-keep-alive-interval`: `: keep-alive` comments while a stream is idle.
        max_num_queued_reqs: 0.33's `--max-num-queued-reqs`: a 503 when that many requests already run.
    """

    def __init__(self, *, model: str | None = None, version: Version | None = None,
                 tool_parser: bool | ToolParserName | Literal["qwen3_xml"] | None = True,
                 reasoning_parser: Literal["qwen3"] | None = None, template: Template = "qwen2.5",
                 error_shape: Literal["new", "old"] = "new", api_key: str | None = None, max_model_len: int = 32768,
                 token_delay_s: float = 0.0, answer_tokens: int = 0, keep_requests: bool = True,
                 sse_keep_alive_s: float = 0.0, max_num_queued_reqs: int | None = None) -> None:
        self.version: Version = version or default_version()
        self.tool_parser = tool_parser
        self.reasoning_parser = reasoning_parser
        self.template = template
        self.model = model or DEFAULT_MODELS.get(template, "")
        self.keep_requests = keep_requests  # the CLI (benchmarks) turns it off: a long run would grow without bound
        self.error_shape = error_shape
        self.api_key = api_key
        self.max_model_len = max_model_len
        self.token_delay_s = token_delay_s
        self.answer_tokens = answer_tokens
        self.sse_keep_alive_s = sse_keep_alive_s
        self.max_num_queued_reqs = max_num_queued_reqs
        self._check_profile(tool_parser_name(tool_parser), error_shape)
        self.requests: list[RecordedRequest] = []
        self.disconnects = 0
        self.open_streams = 0
        self.running = 0
        self._script: deque[Reply] = deque()
        self._runner: web.AppRunner | None = None
        self._url: str | None = None
        self._handlers: set[asyncio.Task[Any]] = set()
        self._stopping = False

    def _check_profile(self, parser: ToolParserName | None, error_shape: str) -> None:
        """Refuse combinations no real server had."""
        if self.version not in VERSIONS or self.template not in TEMPLATES:
            raise ValueError(f"version must be one of {list(VERSIONS)} and template one of {list(TEMPLATES)}")
        if self.reasoning_parser not in (None, "qwen3"):
            raise ValueError(f"unknown reasoning parser {self.reasoning_parser!r}; use qwen3 or None")
        if self.version == "0.11" and (parser == "qwen3_coder" or self.reasoning_parser or self.template != "qwen2.5"):
            raise ValueError("version 0.11 plays Qwen2.5 with hermes or no tool parser; use version 0.33")
        if self.version == "0.33" and error_shape != "new":
            raise ValueError("error_shape 'old' is v0.10.0's; vLLM 0.33 only has the new shape")
        if self.version == "0.11" and (self.sse_keep_alive_s or self.max_num_queued_reqs is not None):
            raise ValueError("keep-alive comments and admission control are 0.33's; use version 0.33")

    @property
    def parsers(self) -> ParserConfig:
        """The parser flags as they are now (tests may flip `tool_parser` at runtime)."""
        return ParserConfig(tool_parser_name(self.tool_parser), self.reasoning_parser == "qwen3", self.template)

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

    def _error(self, status: int, message: str, err_type: str | None = None, param: str | None = None) -> web.Response:
        body = error_body(self.error_shape, message, status, err_type or error_type(status), param)
        return json_response(body, status)

    def _api_error(self, exc: ApiError) -> web.Response:
        validation_type = "Bad Request" if self.error_shape == "new" else "BadRequestError"
        return self._error(exc.status, exc.message, validation_type if exc.validation else exc.err_type, exc.param)

    # Endpoints.

    async def _health(self, _: web.Request) -> web.Response:
        return web.Response(status=200)

    async def _version(self, _: web.Request) -> web.Response:
        return json_response({"version": f"{self.version}.0"})

    async def _models(self, _: web.Request) -> web.Response:
        now = int(time.time())
        permission = {"id": f"modelperm-{random_id(self.version)}", "object": "model_permission", "created": now,
                      "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True,
                      "allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False,
                      "organization": "*", "group": None, "is_blocking": False}
        card = {"id": self.model, "object": "model", "created": now, "owned_by": "vllm", "root": self.model,
                "parent": None, "max_model_len": self.max_model_len, "permission": [permission]}
        return json_response({"object": "list", "data": [card]})

    async def _tokenize(self, request: web.Request) -> web.Response:
        """POST /tokenize with `prompt`, or `messages` (+`tools`, chat_template_kwargs) rendered as for a chat."""
        version = self.version
        try:
            body = parse_json_body(version, await request.read(), request.headers.get("Content-Type", ""))
            check_model(version, body, [self.model])
            if isinstance(body.get("messages"), list):
                _check_tools(version, body)
                _check_messages(version, body)
                tools = tool_dumps(version, body["tools"]) if body.get("tools") else None
                text = render_prompt(version, to_conversation(version, body["messages"]), tools,
                                     template=self.template, kwargs=template_kwargs(body),
                                     add_generation_prompt=body.get("add_generation_prompt") is not False)
            elif isinstance(body.get("prompt"), str):
                text = body["prompt"]
            else:
                raise _pydantic_error(version, "missing", ("body", "prompt"), "Field required", body)
        except ApiError as exc:
            return self._api_error(exc)
        tokens = tokenize(text, self.template)
        return json_response({"count": len(tokens), "max_model_len": self.max_model_len,
                              "tokens": token_ids(tokens, self.template),
                              "token_strs": tokens if body.get("return_token_strs") else None})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        handler = asyncio.current_task()
        if handler is not None:
            self._handlers.add(handler)
        admitted = False
        try:
            try:
                turn, admitted = self._prepare(request, await request.read(), request[_RECORD])
            except ApiError as exc:
                return self._api_error(exc)
            return await self._answer(request, turn, self._next_reply(turn))
        finally:
            if admitted:
                self.running -= 1
            self._handlers.discard(handler)

    def _prepare(self, request: web.Request, raw: bytes, record: RecordedRequest) -> tuple[_Turn, bool]:
        """Everything vLLM does before the engine, in its order (section 1, 4, A.1); fills record.prompt.

        Returns the turn and whether it was admitted (counted in `running` until it ends).
        """
        body = parse_json_body(self.version, raw, request.headers.get("Content-Type", ""))
        check_chat_request(self.version, body, [self.model])
        request_id = request.headers.get("X-Request-Id") or body.get("request_id") or random_id(self.version)
        if self.version == "0.11":
            return self._prepare_011(body, record, f"chatcmpl-{request_id}"), False
        self._admit()
        self.running += 1
        try:
            return self._prepare_033(body, record, f"chatcmpl-{request_id}"), True
        except ApiError:
            self.running -= 1
            raise

    def _refuse_untrusted_template(self, body: dict[str, Any]) -> None:
        """A chat template in the request needs --trust-request-chat-template."""
        kwargs = body.get("chat_template_kwargs")
        in_kwargs = isinstance(kwargs, dict) and kwargs.get("chat_template") is not None
        if body.get("chat_template") is not None or in_kwargs:
            raise ApiError("Chat template is passed with request, but --trust-request-chat-template is not set. "
                           "Refused request with untrusted chat template.")

    def _prepare_011(self, body: dict[str, Any], record: RecordedRequest, completion_id: str) -> _Turn:
        """v0.11 after validation: auto without a parser, the template, the context check (section 4)."""
        tools = body.get("tools")
        choice = body.get("tool_choice", "auto" if tools else "none")
        parser = self.parsers.tool_parser
        if choice == "auto" and tools and not parser:
            raise ApiError('"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set')
        self._refuse_untrusted_template(body)
        conversation = to_conversation("0.11", body["messages"])
        record.prompt = render_prompt("0.11", conversation, tool_dumps("0.11", tools) if tools else None,
                                      add_generation_prompt=body.get("add_generation_prompt") is not False)
        prompt = tokenize(record.prompt)
        requested = check_context_length(len(prompt), body, self.max_model_len)
        if choice is None:  # v0.11's two code paths disagree on an explicit null: only streaming parses
            parse = bool(tools) and bool(parser) and body.get("stream") is True
        else:
            parse = bool(tools) and bool(parser) and choice != "none"
        limit = requested if requested is not None else self.max_model_len - len(prompt)
        return _Turn(body, conversation, prompt, limit, completion_id, parse_tools=parse)

    def _admit(self) -> None:
        """_preflight's admission control (--max-num-queued-reqs): 503 before anything is rendered."""
        if self.max_num_queued_reqs is not None and self.running + 1 > self.max_num_queued_reqs:
            raise ApiError(ADMISSION_MESSAGE, 503, err_type="Service Unavailable")

    def _prepare_033(self, body: dict[str, Any], record: RecordedRequest, completion_id: str) -> _Turn:
        """0.33 after admission: parser availability, K > N, the template, then P > N and the clamp (A.1, A.2)."""
        tools = body.get("tools")
        choice = body.get("tool_choice", "auto" if tools else "none")  # an explicit null stays None
        self._check_parser_available(choice)
        self._refuse_untrusted_template(body)
        requested = check_output_budget(body, self.max_model_len)
        kwargs = template_kwargs(body)
        conversation = to_conversation("0.33", body["messages"])
        record.prompt = render_prompt("0.33", conversation, tool_dumps("0.33", tools) if tools else None,
                                      template=self.template, kwargs=kwargs,
                                      add_generation_prompt=body.get("add_generation_prompt") is not False)
        prompt = tokenize(record.prompt, self.template)
        limit = clamp_max_tokens(len(prompt), requested, self.max_model_len)
        options = ChatOptions(tools, choice, body.get("include_reasoning") is not False,
                              body.get("parallel_tool_calls", True), bool(kwargs.get("enable_thinking", True)))
        return _Turn(body, conversation, prompt, limit, completion_id, options=options)

    def _check_parser_available(self, choice: Any) -> None:
        """render_chat: without a tool parser only "none" (or null) passes (A.4)."""
        if self.parsers.tool_parser is not None or choice in (None, "none"):
            return
        if choice == "auto":
            raise ApiError('"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set')
        described = f'function "{choice["function"]["name"]}"' if isinstance(choice, dict) else f'"{choice}"'
        raise ApiError(f"tool_choice={described} requires --tool-call-parser to be set")

    def _next_reply(self, turn: _Turn) -> Reply:
        """The next scripted reply; only requests that reach the "engine" consume one."""
        if self._script:
            return self._script.popleft()
        prompt = "".join(turn.prompt)
        return Reply(text=default_reply_text(prompt, turn.conversation, self.template, self.answer_tokens))

    # Answers.

    def _parser(self, turn: _Turn) -> Parser:
        """A fresh 0.33 parser for this request, as vLLM makes one per parse and per stream."""
        return Parser(self.version, self.parsers, cast(ChatOptions, turn.options), turn.prompt)

    def _generate(self, turn: _Turn, reply: Reply) -> _Generation:
        """The "engine": the reply's tokens up to the token limit, which leaves no room for EOS when it bites."""
        tokens = tokenize(reply.text, self.template)
        finish_reason = reply.finish_reason
        if len(tokens) >= turn.max_tokens:
            tokens, finish_reason = tokens[:turn.max_tokens], "length"
        prompt_tokens = reply.prompt_tokens if reply.prompt_tokens is not None else len(turn.prompt)
        reasoning = self._parser(turn).reasoning_tokens(tokens) if self.parsers.reasoning else None
        usage = Usage(prompt_tokens, len(tokens) + (finish_reason == "stop"), reasoning)  # the EOS token counts
        return _Generation(tokens, finish_reason, usage)

    async def _answer(self, request: web.Request, turn: _Turn, reply: Reply) -> web.StreamResponse:
        """Play a reply: delays and faults, then a body or a stream."""
        streams = turn.stream and reply.status == 200 and reply.fault not in _HTTP_FAULTS
        keep_alive = streams and self.sse_keep_alive_s > 0  # vLLM has sent the headers: the wait shows as comments
        if reply.delay_s > 0 and not keep_alive:
            await asyncio.sleep(reply.delay_s)
        if reply.fault == "hang":
            await asyncio.sleep(STALL_S)
        failed = self._failure(reply)
        if failed is not None:
            return failed
        generation = self._generate(turn, reply)
        if not turn.stream:
            return json_response(self._body_011(turn, generation) if self.version == "0.11" else
                                 self._body_033(turn, generation))
        sse = SseChunks(self.version, turn.completion_id, self.model, self._include_usage(turn))
        if self.version == "0.11":
            chunks = self._chunks_011(sse, turn, reply, generation)
        else:
            chunks = self._chunks_033(sse, turn, reply, generation)
        tail = [sse.usage(generation.usage)] if sse.include_usage else []
        return await self._stream(request, chunks, [*tail, DONE], reply, reply.delay_s if keep_alive else 0.0)

    def _failure(self, reply: Reply) -> web.Response | None:
        """Answers that are not a completion: scripted HTTP errors and faults."""
        if reply.fault == "empty_500" or (reply.fault == "engine_dead" and self.version == "0.11"):
            return web.Response(status=500)  # v0.11's dead-engine handler: no body at all
        if reply.fault == "engine_dead":
            return self._error(500, ENGINE_DEAD_MESSAGE)
        if reply.fault == "busy":
            return self._error(503, ADMISSION_MESSAGE, "Service Unavailable")
        if reply.fault == "non_json":
            return web.Response(body=b"<html>oops</html>", content_type="application/json")
        if reply.status != 200:
            return self._error(reply.status, reply.error_message)
        return None

    def _include_usage(self, turn: _Turn) -> bool:
        """`stream_options.include_usage`: true by default inside the object in v0.11, false in 0.33."""
        options = turn.body.get("stream_options")
        return isinstance(options, dict) and bool(options.get("include_usage", self.version == "0.11"))

    def _body_011(self, turn: _Turn, generation: _Generation) -> dict[str, Any]:
        """v0.11's body: hermes extraction when parsing, tool_calls whenever a call was parsed."""
        text = "".join(generation.tokens)
        extracted = extract_tool_calls(text) if turn.parse_tools else None
        content, calls = extracted if extracted else (text, [])
        message = assistant_message("0.11", content, [(tool_call_id("0.11"), *call) for call in calls])
        finish_reason = "tool_calls" if extracted else generation.finish_reason
        return completion_body("0.11", turn.completion_id, self.model, message, finish_reason, generation.usage)

    def _body_033(self, turn: _Turn, generation: _Generation) -> dict[str, Any]:
        """0.33's body: parse, assemble, resolve the finish reason (A.3, A.5)."""
        config, options = self.parsers, cast(ChatOptions, turn.options)
        text = "".join(generation.tokens)
        reasoning, content, calls = self._parser(turn).parse(text) if config.any else (None, text, [])
        reasoning, content, kept = assemble_message(self.version, config, options, reasoning, content, calls)
        finish_reason = finish_reason_for(generation.finish_reason, options, bool(kept))
        message = assistant_message(self.version, content, kept, reasoning)
        return completion_body(self.version, turn.completion_id, self.model, message, finish_reason, generation.usage)

    @staticmethod
    def _chunks_011(sse: SseChunks, turn: _Turn, reply: Reply, generation: _Generation) -> list[bytes]:
        """Role chunk, one chunk per token that yields a delta, then the finish chunk (section 3)."""
        deltas = apply_stream_fault(stream_deltas(generation.tokens, turn.parse_tools), reply.fault)
        final: dict[str, Any] | None = {"content": ""}  # the EOS step: <|im_end|> detokenizes to ""
        finish_reason = generation.finish_reason
        if finish_reason == "length" and deltas:
            final = deltas.pop()  # no EOS step: the last token's delta rides on the finish chunk
        if any(delta and "id" in delta.get("tool_calls", [{}])[0] for delta in [*deltas, final]):
            finish_reason = "tool_calls"  # v0.11 says so whenever a call was streamed, even when cut by length
        return [sse.role(), *(sse.delta(d) for d in deltas if d is not None), sse.final(final or {}, finish_reason)]

    def _chunks_033(self, sse: SseChunks, turn: _Turn, reply: Reply, generation: _Generation) -> list[bytes]:
        """Role chunk, one chunk per engine step that yields a delta, the finish chunk (A.5): the EOS step of a
        natural stop, or the last token's step when the limit cut generation."""
        config, options = self.parsers, cast(ChatOptions, turn.options)
        processor = StreamProcessor(config, options, self._parser(turn) if config.any else None)
        steps = [(token, [token]) for token in generation.tokens]
        steps += [("", [""])] if generation.finish_reason == "stop" else []  # EOS: a token without text
        deltas: list[dict[str, Any] | None] = []
        finish_reason: str | None = None
        for i, (text, tokens) in enumerate(steps or [("", [])]):
            last = i == len(steps or [None]) - 1
            delta, finish_reason = processor.step(text, tokens, generation.finish_reason if last else None)
            deltas.append(delta)
        deltas = apply_stream_fault(deltas, reply.fault)
        final = deltas.pop() or {}
        return [sse.role(), *(sse.delta(d) for d in deltas if d is not None),
                sse.final(final, finish_reason or generation.finish_reason)]

    async def _stream(self, request: web.Request, chunks: list[bytes], tail: list[bytes], reply: Reply,
                      first_delay: float) -> web.StreamResponse:
        """Send an SSE stream, faults included; count clients that leave early."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        delay = self.token_delay_s if reply.token_delay_s is None else reply.token_delay_s
        self.open_streams += 1
        try:
            await response.prepare(request)
            await self._pause(response, first_delay)
            await self._send_stream(request, response, chunks, tail, reply, delay)
        except ConnectionResetError:
            self.disconnects += 1
        except asyncio.CancelledError:
            if not self._stopping:
                self.disconnects += 1
            raise
        finally:
            self.open_streams -= 1
        return response

    async def _send_stream(self, request: web.Request, response: web.StreamResponse, chunks: list[bytes],
                           tail: list[bytes], reply: Reply, delay: float) -> None:
        """The chunks and tail, or what a fault makes of them."""
        if reply.fault == "stall":
            await self._send(response, chunks[:_FEW_CHUNKS], delay)
            await self._pause(response, STALL_S)
        elif reply.fault in ("garbage", "stream_error", "stream_error_503"):
            await self._send(response, chunks[:_FEW_CHUNKS], delay)
            status = 503 if reply.fault == "stream_error_503" else 500
            broken = GARBAGE if reply.fault == "garbage" else [
                stream_error_event(self.version, self.error_shape, reply.error_message, status)]
            await self._send(response, [*broken, DONE], 0.0)
        elif reply.fault == "cut":
            events = [*chunks, *tail]
            await self._send(response, events[: max(1, len(events) // 2)], delay)
            if request.transport is not None:
                request.transport.close()  # no terminating chunk: the client sees an incomplete body
        else:
            await self._send(response, chunks, delay)
            await self._send(response, tail, 0.0)

    async def _send(self, response: web.StreamResponse, events: list[bytes], delay: float) -> None:
        """Write events, pausing `delay` between them as a decoding step would."""
        for i, event in enumerate(events):
            if i:
                await self._pause(response, delay)
            await response.write(event)

    async def _pause(self, response: web.StreamResponse, seconds: float) -> None:
        """Wait `seconds`; with --sse-keep-alive-interval, a `: keep-alive` comment each idle interval (A.1)."""
        interval = self.sse_keep_alive_s
        while 0 < interval <= seconds:
            await asyncio.sleep(interval)
            seconds -= interval
            await response.write(KEEP_ALIVE)
        if seconds > 0:
            await asyncio.sleep(seconds)


# --- 11. CLI ---


async def _serve(args: argparse.Namespace) -> None:
    fake = FakeVLLM(model=args.model, version=args.version, tool_parser=None if args.tool_parser == "none" else
                    args.tool_parser, reasoning_parser=args.reasoning_parser, template=args.template,
                    api_key=args.api_key, max_model_len=args.max_model_len, token_delay_s=args.token_delay,
                    answer_tokens=args.answer_tokens, keep_requests=False, sse_keep_alive_s=args.sse_keep_alive,
                    max_num_queued_reqs=args.max_num_queued_reqs)
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
    parser.add_argument("--version", choices=VERSIONS, help=f"vLLM version to play (default: ${VERSION_ENV} or 0.11)")
    parser.add_argument("--template", choices=TEMPLATES, default="qwen2.5", help="model family: its chat template")
    parser.add_argument("--tool-call-parser", dest="tool_parser", default="hermes",
                        choices=("hermes", "qwen3_coder", "qwen3_xml", "none"),
                        help="with --enable-auto-tool-choice; none: a server without a tool parser")
    parser.add_argument("--no-tool-parser", dest="tool_parser", action="store_const", const="none",
                        help="same as --tool-call-parser none")
    parser.add_argument("--reasoning-parser", choices=("qwen3",), help="0.33 only")
    parser.add_argument("--token-delay", type=float, default=0.0, help="seconds between streamed chunks")
    parser.add_argument("--answer-tokens", type=int, default=0, help="make plain answers exactly N tokens")
    parser.add_argument("--sse-keep-alive", type=float, default=0.0, help="0.33: keep-alive comment interval, s")
    parser.add_argument("--max-num-queued-reqs", type=int, help="0.33: 503 when this many requests run")
    parser.add_argument("--api-key")
    parser.add_argument("--model", help="served model name (default: one of the template's family)")
    parser.add_argument("--max-model-len", type=int, default=32768)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is the normal way to stop it
        asyncio.run(_serve(parser.parse_args()))


if __name__ == "__main__":
    main()

"""Tools the agent can call: the @tool registry, its executor, the built-in tools, and tools from MCP servers.

  1. Definitions  ToolDefinitionError, ToolResult, Tool
  2. Schemas      pure functions: docstring -> descriptions; pydantic's JSON Schema -> a clean one
  3. Registry     ToolRegistry: @tool builds one pydantic model a tool; run() returns failures as text
  4. Calculator   a whitelisting AST walker with size limits, behind the calculator tool
  5. Built-ins    REGISTRY, tool, calculator, get_current_time
  6. MCP config   McpConfigError, McpServerConfig, load_mcp_config: the MCP_SERVERS file, checked whole
  7. MCP tools    pure functions: safe names, trimmed schemas, capped descriptions, results as text
  8. MCP servers  McpServer keeps one server connected and its tools registered; McpServers, for the lifespan

An MCP tool is a Tool like any other: the registry runs it with the same deadline, result cap and error
handling. Its function forwards the call to its McpServer, which turns every failure into an McpCallError.
"""

import ast
import asyncio
import inspect
import json
import logging
import math
import operator
import re
import time
import typing
from collections.abc import AsyncIterator, Callable, Collection
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import anyio
import httpx2
import pydantic
from mcp import Client, MCPError, StdioServerParameters
from mcp import types as mcp_types
from mcp.client.streamable_http import streamable_http_client
from pydantic_core import ErrorDetails

logger = logging.getLogger(__name__)

# --- 1. Definitions ---


class ToolDefinitionError(Exception):
    """A @tool definition cannot become a schema; raised at import time so it never reaches a model."""


@dataclass(frozen=True, slots=True)
class ToolResult:
    """What one tool call produced: `result` on success, otherwise `error` text for the model."""

    result: str | None
    error: str | None
    duration_s: float


@dataclass(frozen=True)
class Tool:
    """A registered tool; `arguments_model` is both its JSON Schema and its argument validator.

    An MCP tool has no `arguments_model` (its server validates the arguments against the schema it gave),
    its `source` is "mcp:<server>", and its `timeout_s`, when the server's entry sets one, replaces the
    caller's deadline.
    """

    name: str
    description: str
    function: Callable[..., Any]
    arguments_model: type[pydantic.BaseModel] | None
    parameters: dict[str, Any]
    is_async: bool  # asked once, at registration, not on every call
    source: str = "builtin"
    timeout_s: float | None = None

    def openai_schema(self) -> dict[str, Any]:
        """The tool in the shape the OpenAI-compatible `tools` request field expects."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }


# --- 2. Schemas ---

_ARG_ENTRY = re.compile(r"(?P<name>\w+)\s*(?:\([^)]*\))?\s*:\s*(?P<text>.*)")
_NAME_MAPS = {"properties", "$defs", "patternProperties"}  # keys here are names, not schema keywords
_LITERALS = {"default", "const", "enum", "examples"}


def _summary(doc: str) -> str:
    """The docstring's first paragraph on one line: the description the model reads."""
    return " ".join(doc.split("\n\n", 1)[0].split())


def _args_section(doc: str) -> dict[str, str]:
    """Map each entry of a Google-style `Args:` section to its text, continuation lines joined."""
    lines = doc.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == "Args:"), None)
    if start is None:
        return {}
    header_indent = len(lines[start]) - len(lines[start].lstrip())
    entries: dict[str, list[str]] = {}
    entry_indent: int | None = None
    for line in filter(str.strip, lines[start + 1 :]):
        indent = len(line) - len(line.lstrip())
        if indent <= header_indent:
            break
        entry_indent = indent if entry_indent is None else entry_indent
        match = _ARG_ENTRY.fullmatch(line.strip())
        if indent == entry_indent and match:
            entries[match["name"]] = [match["text"]]
        elif entries:
            entries[next(reversed(entries))].append(line)
    return {name: " ".join(" ".join(parts).split()) for name, parts in entries.items()}


def _without_titles(schema: Any) -> Any:
    """Drop pydantic's `title` keywords: noise in the prompt; a property *named* title is kept."""
    if isinstance(schema, list):
        return [_without_titles(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    cleaned: dict[str, Any] = {}
    for key, value in schema.items():
        if key in _NAME_MAPS:
            cleaned[key] = {name: _without_titles(sub) for name, sub in value.items()}
        elif key != "title":
            cleaned[key] = value if key in _LITERALS else _without_titles(value)
    return cleaned


# --- 3. Registry ---

F = TypeVar("F", bound=Callable[..., Any])
_TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # what OpenAI-compatible servers accept


class _CallError(Exception):
    """A failure the model can act on; its message becomes the ToolResult's `error`."""


def _definition_problems(
    function: Callable[..., Any], doc: str, hints: dict[str, Any], described: dict[str, str]
) -> list[str]:
    """Everything wrong with a @tool definition, so one error can list it all."""
    problems = [] if doc else ["has no docstring"]
    if not _TOOL_NAME.fullmatch(function.__name__):
        problems.append("the name must be 1-64 letters, digits, '_' or '-'")
    parameters = inspect.signature(function).parameters
    for name, parameter in parameters.items():
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            problems.append(f"parameter {name!r}: *args and **kwargs are not supported")
            continue
        if parameter.kind is parameter.POSITIONAL_ONLY:
            problems.append(f"parameter {name!r} is positional-only; arguments are passed by name")
        if name not in hints:
            problems.append(f"parameter {name!r} has no type hint")
        if not described.get(name):
            problems.append(f"parameter {name!r} has no description in the docstring's Args: section")
    unknown = [name for name in described if name not in parameters]
    problems += [f"the docstring's Args: section names no parameter {name!r}" for name in unknown]
    return problems


def _arguments_model(
    function: Callable[..., Any], hints: dict[str, Any], descriptions: dict[str, str]
) -> type[pydantic.BaseModel]:
    """One model from the signature: it yields the schema and validates calls, so they cannot drift."""
    fields: dict[str, Any] = {}
    for name, parameter in inspect.signature(function).parameters.items():
        default = ... if parameter.default is parameter.empty else parameter.default
        fields[name] = (hints[name], pydantic.Field(default, description=descriptions[name]))
    config = pydantic.ConfigDict(extra="forbid")
    return pydantic.create_model(function.__name__, __config__=config, **fields)


def _validation_message(name: str, exc: pydantic.ValidationError) -> str:
    """Name each bad field and what is wrong with it; pydantic's URLs mean nothing to a model."""
    problems = []
    for error in exc.errors(include_url=False):
        location = ".".join(str(part) for part in error["loc"])
        problems.append(f"{location}: {error['msg']}" if location else error["msg"])
    return f"invalid arguments for {name}: {'; '.join(problems)}"


def _exception_message(exc: Exception) -> str:
    """ValueError carries a message meant for the model; anything else also says what it was."""
    if isinstance(exc, ValueError) and str(exc):
        return str(exc)
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _checked_arguments(tool: Tool, arguments: Any) -> dict[str, Any]:
    """The keyword arguments for the call: validated by the tool's model, or (MCP) at least an object."""
    if tool.arguments_model is None:
        if not isinstance(arguments, dict):
            raise _CallError(f"invalid arguments for {tool.name}: Input should be an object")
        return arguments
    try:
        return dict(tool.arguments_model.model_validate(arguments))
    except pydantic.ValidationError as exc:
        raise _CallError(_validation_message(tool.name, exc)) from None


class ToolRegistry:
    """The tools one agent may call, in registration order."""

    def __init__(self) -> None:
        self._tools: dict[str, Tool] = {}
        self._schemas: list[dict[str, Any]] | None = None

    def register(self, function: F) -> F:
        """The @tool decorator: check the definition, build its model, return the function unchanged."""
        name = function.__name__
        doc = inspect.getdoc(function) or ""
        try:
            hints = typing.get_type_hints(function, include_extras=True)
        except (NameError, TypeError) as exc:
            raise ToolDefinitionError(f"@tool {name}: type hints cannot be resolved: {exc}") from exc
        descriptions = _args_section(doc)
        problems = _definition_problems(function, doc, hints, descriptions)
        if name in self._tools:
            problems.append(f"a tool named {name!r} is already registered")
        if problems:
            raise ToolDefinitionError(f"@tool {name}: {'; '.join(problems)}")
        try:
            model = _arguments_model(function, hints, descriptions)
            schema = _without_titles(model.model_json_schema())
        except (pydantic.PydanticUserError, pydantic.PydanticSchemaGenerationError, NameError) as exc:
            raise ToolDefinitionError(f"@tool {name}: cannot build an arguments schema: {exc}") from exc
        schema.setdefault("required", [])
        self.add(Tool(name, _summary(doc), function, model, schema, inspect.iscoroutinefunction(function)))
        return function

    def add(self, tool: Tool) -> None:
        """Register a ready-made tool (an MCP server's); its name must be valid and free."""
        if not _TOOL_NAME.fullmatch(tool.name):
            raise ToolDefinitionError(f"tool {tool.name!r}: the name must be 1-64 letters, digits, '_' or '-'")
        if tool.name in self._tools:
            raise ToolDefinitionError(f"a tool named {tool.name!r} is already registered")
        self._tools[tool.name] = tool
        self._schemas = None

    def remove(self, name: str) -> None:
        """Unregister a tool, when its MCP server's tool list changes or the server is closed."""
        del self._tools[name]
        self._schemas = None

    def get(self, name: str) -> Tool | None:
        """The tool called `name`, if there is one."""
        return self._tools.get(name)

    @property
    def tools(self) -> list[Tool]:
        """All tools, in registration order."""
        return list(self._tools.values())

    def openai_schemas(self) -> list[dict[str, Any]]:
        """Every tool's schema, cached until the tools change: it is sent with every vLLM request."""
        if self._schemas is None:
            self._schemas = [tool.openai_schema() for tool in self._tools.values()]
        return self._schemas

    async def run(
        self, name: str, arguments: dict[str, Any], *, timeout_s: float, max_result_chars: int
    ) -> ToolResult:
        """Call a tool for the model: every failure it can act on comes back as `error`, never raised.

        `timeout_s` is the deadline unless the tool has its own (an MCP server's `timeout_s`). A sync tool
        that times out keeps its worker thread until it returns; only the wait ends.
        """
        started = time.perf_counter()
        try:
            text = await self._call(name, arguments, timeout_s)
        except _CallError as exc:
            return ToolResult(None, str(exc), time.perf_counter() - started)
        if len(text) > max_result_chars:
            text = f"{text[:max_result_chars]}\n…[truncated {len(text) - max_result_chars} characters]"
        return ToolResult(text, None, time.perf_counter() - started)

    async def _call(self, name: str, arguments: dict[str, Any], timeout_s: float) -> str:
        """Validate, call within the deadline, and render the value as text; failures become _CallError."""
        tool = self._tools.get(name)
        if tool is None:
            raise _CallError(f"unknown tool {name!r}; available tools: {', '.join(self._tools) or 'none'}")
        kwargs = _checked_arguments(tool, arguments)
        limit_s = tool.timeout_s if tool.timeout_s is not None else timeout_s
        deadline = asyncio.timeout(limit_s)
        try:
            async with deadline:
                if tool.is_async:
                    value = await tool.function(**kwargs)
                else:
                    value = await asyncio.to_thread(tool.function, **kwargs)
            return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
        except Exception as exc:
            if isinstance(exc, TimeoutError) and deadline.expired():
                raise _CallError(f"tool {name!r} timed out after {float(limit_s)} s") from None
            raise _CallError(_exception_message(exc)) from None


# --- 4. Calculator ---


class CalculatorError(ValueError):
    """An expression the calculator refuses or cannot evaluate; the message tells the model why."""


_MAX_EXPRESSION_CHARS = 500
_MAX_NODES = 400
_MAX_DEPTH = 100
_MAX_EXPONENT = 10_000
_MAX_INT_BITS = 10_000  # bounds every intermediate int, so no operation can get slow
_MAX_RESULT_DIGITS = 1_000
_MAX_ROUND_DIGITS = 100  # round(1, -10**9) would build 10**(10**9)
_Number = int | float
_CONSTANTS: dict[str, _Number] = {"pi": math.pi, "e": math.e}


def _power(base: _Number, exponent: _Number) -> _Number:
    """`**` that refuses, before computing, an int result sure to be too large; _checked gets the rest."""
    if (
        isinstance(base, int)
        and isinstance(exponent, int)
        and (abs(exponent) > _MAX_EXPONENT or (base.bit_length() - 1) * exponent > _MAX_INT_BITS)
    ):
        raise CalculatorError("exponent too large")
    return base**exponent


def _round(number: _Number, ndigits: int | None = None) -> _Number:
    """`round` with ndigits bounded."""
    if ndigits is not None and abs(ndigits) > _MAX_ROUND_DIGITS:
        raise CalculatorError(f"round() takes at most {_MAX_ROUND_DIGITS} digits")
    return round(number, ndigits)


_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: _power,
}
_UNARY: dict[type[ast.unaryop], Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "sqrt": math.sqrt, "sin": math.sin, "cos": math.cos, "tan": math.tan, "log": math.log,
    "log10": math.log10, "exp": math.exp, "abs": abs, "round": _round, "floor": math.floor,
    "ceil": math.ceil, "min": min, "max": max,
}  # fmt: skip


def _checked(value: Any) -> _Number:
    """Let only finite real numbers of bounded size flow on; `(-8) ** 0.5` is complex, for one."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CalculatorError("result is not a real number")
    if isinstance(value, float) and not math.isfinite(value):
        raise CalculatorError("result is not a finite number")
    if isinstance(value, int) and value.bit_length() > _MAX_INT_BITS:
        raise CalculatorError("number too large")
    return value


def _apply(label: str, function: Callable[..., Any], *args: _Number) -> _Number:
    """Run one whitelisted operation, translating Python's arithmetic errors into CalculatorError."""
    try:
        return _checked(function(*args))
    except ZeroDivisionError:
        raise CalculatorError("division by zero") from None
    except OverflowError:
        raise CalculatorError("number too large") from None
    except CalculatorError:
        raise
    except (ValueError, TypeError) as exc:
        raise CalculatorError(f"{label}: {exc}") from None


def _evaluate(node: ast.AST, depth: int = 0) -> _Number:
    """Walk the whitelisted subset of the AST; anything else is refused by node type."""
    if depth > _MAX_DEPTH:
        raise CalculatorError(f"expression nested more than {_MAX_DEPTH} levels deep")
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, int | float):
            raise CalculatorError(f"unsupported value {node.value!r}: only numbers are allowed")
        return _checked(node.value)
    if isinstance(node, ast.Name) and node.id in _CONSTANTS:
        return _CONSTANTS[node.id]
    if isinstance(node, ast.Name):
        raise CalculatorError(f"unknown name {node.id!r}; constants: {', '.join(_CONSTANTS)}")
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _apply("unary operator", _UNARY[type(node.op)], _evaluate(node.operand, depth + 1))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left, depth + 1), _evaluate(node.right, depth + 1)
        return _apply(type(node.op).__name__, _BINARY[type(node.op)], left, right)
    if isinstance(node, ast.UnaryOp | ast.BinOp):
        raise CalculatorError(f"unsupported operator: {type(node.op).__name__}")
    if isinstance(node, ast.Call):
        return _call_function(node, depth)
    raise CalculatorError(f"unsupported expression: {type(node).__name__}")


def _call_function(node: ast.Call, depth: int) -> _Number:
    """Call a whitelisted math function with positional number arguments."""
    name = node.func.id if isinstance(node.func, ast.Name) else None
    if name not in _FUNCTIONS:
        called = f" to {name!r}" if name else ""
        raise CalculatorError(f"unsupported expression: Call{called}; functions: {', '.join(_FUNCTIONS)}")
    if node.keywords or any(isinstance(arg, ast.Starred) for arg in node.args):
        raise CalculatorError(f"{name}() takes positional numbers only")
    return _apply(f"{name}()", _FUNCTIONS[name], *(_evaluate(arg, depth + 1) for arg in node.args))


# --- 5. Built-ins ---

def evaluate_expression(expression: str) -> str:
    """Evaluate arithmetic by walking a whitelisted AST; every refusal is a CalculatorError (a ValueError)."""
    if len(expression) > _MAX_EXPRESSION_CHARS:
        raise CalculatorError(f"expression longer than {_MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as exc:
        raise CalculatorError(f"invalid expression: {exc.msg}") from None
    except (ValueError, RecursionError, MemoryError):
        raise CalculatorError("invalid expression: too complex to parse") from None
    if sum(1 for _ in ast.walk(tree)) > _MAX_NODES:
        raise CalculatorError(f"expression has more than {_MAX_NODES} parts")
    value = _evaluate(tree.body)
    if isinstance(value, int) and len(str(abs(value))) > _MAX_RESULT_DIGITS:
        raise CalculatorError(f"result has more than {_MAX_RESULT_DIGITS} digits")
    return repr(value)


REGISTRY = ToolRegistry()
tool = REGISTRY.register


@tool
async def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression and return the result; use it for any calculation.
    Supports numbers, + - * / // % **, parentheses, the functions sqrt, sin, cos, tan (radians), log,
    log10, exp, abs, round, floor, ceil, min, max, and the constants pi and e.

    Args:
        expression: One arithmetic expression in Python syntax, e.g. "(12 * 7) / sqrt(2) + 2**10".
    """
    # Async on purpose: the size limits keep the work too small to be worth a worker thread.
    return evaluate_expression(expression)


@tool
def get_current_time(timezone: str = "UTC") -> str:
    """Return the current date, time and weekday in a time zone.

    Args:
        timezone: IANA time zone name such as "Asia/Seoul" or "Europe/Paris". Defaults to "UTC".
    """
    try:
        zone = ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError, OSError) as exc:
        raise ValueError(f"unknown time zone {timezone!r}; use an IANA name such as 'Asia/Seoul'") from exc
    now = datetime.now(zone)
    return f"{now.isoformat(timespec='seconds')} ({now:%A}, {timezone})"


# --- 6. MCP config ---


class McpConfigError(Exception):
    """The MCP_SERVERS file cannot be used; raised at startup, naming the file, the server and the field."""


class McpServerConfig(pydantic.BaseModel):
    """One entry of `mcpServers`: a local server (`command`, over stdio) or a remote one (`url`, over HTTP)."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    command: str | None = pydantic.Field(default=None, min_length=1)
    args: list[str] = []
    env: dict[str, str] = {}
    cwd: Path | None = None
    url: str | None = pydantic.Field(default=None, pattern=r"^https?://\S+$")
    headers: dict[str, str] = {}
    allowed_tools: list[str] | None = None
    timeout_s: float | None = pydantic.Field(default=None, gt=0)
    enabled: bool = True

    @property
    def transport(self) -> Literal["stdio", "http"]:
        """How the service talks to the server: a subprocess's stdio, or Streamable HTTP."""
        return "stdio" if self.command is not None else "http"

    @pydantic.model_validator(mode="after")
    def _one_transport(self) -> "McpServerConfig":
        """Exactly one of command and url, and no field of the other kind of server."""
        if (self.command is None) == (self.url is None):
            raise ValueError('give either "command" (a local server, over stdio) or "url" (a remote one, over '
                             "Streamable HTTP)")
        kind, foreign = ("local", {"headers"}) if self.command else ("remote", {"args", "env", "cwd"})
        if misplaced := sorted(foreign & self.model_fields_set):
            raise ValueError(f"{', '.join(repr(name) for name in misplaced)} cannot be set for a {kind} server")
        return self


class _McpConfigFile(pydantic.BaseModel):
    """The whole file: `{"mcpServers": {name: entry}}`, as Claude Desktop and Qwen-Agent write it."""

    model_config = pydantic.ConfigDict(extra="forbid")

    servers: dict[Annotated[str, pydantic.Field(min_length=1)], McpServerConfig] = pydantic.Field(
        alias="mcpServers"
    )


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json's object hook that refuses a key given twice, which json.loads would silently overwrite."""
    keys = [key for key, _ in pairs]
    if duplicates := sorted({key for key in keys if keys.count(key) > 1}):
        raise McpConfigError(f"{', '.join(repr(key) for key in duplicates)} given twice in one object")
    return dict(pairs)


def _config_problem(error: ErrorDetails) -> str:
    """One pydantic error as `server 'files', field 'comand': …`."""
    location = [str(part) for part in error["loc"]]
    message = error["msg"].removeprefix("Value error, ")
    if location[:1] == ["mcpServers"] and len(location) >= 2:
        where = f"server {location[1]!r}"
        return f"{where}, field {'.'.join(location[2:])!r}: {message}" if location[2:] else f"{where}: {message}"
    return f"field {'.'.join(location)!r}: {message}" if location else message


def load_mcp_config(path: Path) -> dict[str, McpServerConfig]:
    """Read and check the whole MCP_SERVERS file, so a mistake stops the service rather than a server."""
    try:
        payload = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_unique_keys)
    except OSError as exc:
        raise McpConfigError(f"MCP_SERVERS file {str(path)!r} cannot be read: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise McpConfigError(f"MCP_SERVERS file {str(path)!r} is not valid JSON: {exc}") from None
    except McpConfigError as exc:
        raise McpConfigError(f"MCP_SERVERS file {str(path)!r}: {exc}") from None
    try:
        return _McpConfigFile.model_validate(payload).servers
    except pydantic.ValidationError as exc:
        problems = "; ".join(_config_problem(error) for error in exc.errors(include_url=False))
        raise McpConfigError(f"MCP_SERVERS file {str(path)!r}: {problems}") from None


# --- 7. MCP tools ---

_MAX_DESCRIPTION_CHARS = 1024  # a tool's description, as the model reads it
_MAX_PARAMETER_DESCRIPTION_CHARS = 256  # each description inside its input schema
_MAX_REF_EXPANSIONS = 64  # $refs inlined per schema; past that (and at a recursion) a $ref becomes an object
_SCHEMA_NOISE = {"$schema", "$id", "$comment", "title"}  # keywords that cost tokens and tell the model nothing
_SCHEMA_DEFINITIONS = ("$defs", "definitions")
_UNSAFE_NAME_CHARACTERS = re.compile(r"[^A-Za-z0-9_-]")
_MAX_TOOL_NAME_CHARS = 64


def _capped(text: str, limit: int) -> str:
    """The text, cut to `limit` characters with an ellipsis when longer."""
    return text if len(text) <= limit else f"{text[: limit - 1].rstrip()}…"


def mcp_tool_name(server: str, tool: str, taken: Collection[str]) -> str:
    """`<server>__<tool>` within OpenAI's name rules: other characters become '_', a long name is cut to
    64 characters, and a name already taken gets a numbered suffix."""
    base = _UNSAFE_NAME_CHARACTERS.sub("_", f"{server}__{tool}")[:_MAX_TOOL_NAME_CHARS]
    name, number = base, 1
    while name in taken:
        number += 1
        suffix = f"_{number}"
        name = f"{base[: _MAX_TOOL_NAME_CHARS - len(suffix)]}{suffix}"
    return name


def mcp_tool_description(tool: mcp_types.Tool) -> str:
    """The server's description (else its title, else its name), capped at _MAX_DESCRIPTION_CHARS."""
    return _capped((tool.description or tool.title or tool.name).strip(), _MAX_DESCRIPTION_CHARS)


def mcp_tool_parameters(schema: dict[str, Any]) -> dict[str, Any]:
    """A server's input schema as the model gets it, trimmed where small models stumble.

    Dropped: the keywords `$schema`, `$id`, `$comment` and `title` (a property *named* title stays).
    Inlined: local `$ref`s into `$defs`/`definitions`, which then go; a recursive reference, and any past
    the 64th, becomes `{"type": "object"}`. Capped: every `description` inside, at 256 characters. The
    root is always an object with `properties`. Everything else passes through unchanged.
    """
    definitions = {
        f"#/{key}/{name}": sub for key in _SCHEMA_DEFINITIONS for name, sub in (schema.get(key) or {}).items()
    }
    expansions = 0

    def trimmed(node: Any, expanding: frozenset[str]) -> Any:
        nonlocal expansions
        if isinstance(node, list):
            return [trimmed(item, expanding) for item in node]
        if not isinstance(node, dict):
            return node
        reference = node.get("$ref")
        if isinstance(reference, str) and reference in definitions:
            siblings = {key: value for key, value in node.items() if key != "$ref"}
            if reference in expanding or expansions == _MAX_REF_EXPANSIONS:
                return trimmed({"type": "object", **siblings}, expanding)
            expansions += 1
            return trimmed({**definitions[reference], **siblings}, expanding | {reference})
        cleaned: dict[str, Any] = {}
        for key, value in node.items():
            if key in _SCHEMA_NOISE or key in _SCHEMA_DEFINITIONS:
                continue
            if key in _NAME_MAPS and isinstance(value, dict):
                cleaned[key] = {name: trimmed(sub, expanding) for name, sub in value.items()}
            elif key == "description" and isinstance(value, str):
                cleaned[key] = _capped(value, _MAX_PARAMETER_DESCRIPTION_CHARS)
            else:
                cleaned[key] = value if key in _LITERALS else trimmed(value, expanding)
        return cleaned

    parameters = trimmed(schema, frozenset())
    parameters["type"] = "object"
    parameters.setdefault("properties", {})
    return parameters


def _size(byte_count: int) -> str:
    """A byte count for people: `812 bytes`, `12 KB`, `3.4 MB`."""
    if byte_count < 1024:
        return f"{byte_count} bytes"
    if byte_count < 1024 * 1024:
        return f"{round(byte_count / 1024)} KB"
    return f"{byte_count / (1024 * 1024):.1f} MB"


def _decoded_size(data: str) -> int:
    """The size of base64 data once decoded, without decoding it."""
    return len(data) * 3 // 4 - data[-2:].count("=")


def mcp_content_text(block: mcp_types.ContentBlock) -> str:
    """One content block as text: text as it is, anything binary as a one-line summary, never base64."""
    if isinstance(block, mcp_types.TextContent):
        return block.text
    if isinstance(block, mcp_types.ImageContent | mcp_types.AudioContent):
        return f"[{block.type}: {block.mime_type}, {_size(_decoded_size(block.data))}]"
    if isinstance(block, mcp_types.ResourceLink):
        return f"[resource link: {block.uri}" + (f", {block.mime_type}]" if block.mime_type else "]")
    resource = block.resource
    if isinstance(resource, mcp_types.TextResourceContents):
        return f"[resource: {resource.uri}]\n{resource.text}"
    kind = f"{resource.mime_type}, " if resource.mime_type else ""
    return f"[resource: {resource.uri}, {kind}{_size(_decoded_size(resource.blob))}]"


def mcp_result_text(result: mcp_types.CallToolResult) -> str:
    """A tool result's content blocks joined by newlines; its structured content when there are none."""
    if not result.content and result.structured_content is not None:
        return json.dumps(result.structured_content, ensure_ascii=False)
    return "\n".join(mcp_content_text(block) for block in result.content)


# --- 8. MCP servers ---

McpServerState = Literal["connecting", "connected", "down", "disabled"]
_MAX_RETRY_DELAY_S = 60.0
_MAX_TOOL_PAGES = 100  # a server whose tools/list never ends cannot hang startup
_MAX_HTTP_EVENT_BYTES = 64 * 1024 * 1024  # one message from a remote server; the SDK's default is 1 MiB


class McpCallError(ValueError):
    """An MCP tool call that failed; the message is for the model (the registry passes it on as `error`)."""


class McpServerStatus(pydantic.BaseModel):
    """One server as /api/v1/health shows it. Error details stay in the log: health needs no API key."""

    model_config = pydantic.ConfigDict(frozen=True)

    state: McpServerState
    transport: Literal["stdio", "http"]
    tools: int


def _describe(exc: BaseException) -> str:
    """An exception in one line; a task group's ExceptionGroup by its first leaf, which says what broke."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def _list_tools(client: Client) -> list[mcp_types.Tool]:
    """Every tool the server offers, page after page."""
    tools: list[mcp_types.Tool] = []
    cursor: str | None = None
    for _ in range(_MAX_TOOL_PAGES):
        page = await client.list_tools(cursor=cursor)
        tools += page.tools
        cursor = page.next_cursor
        if cursor is None:
            break
    return tools


class McpServer:
    """One configured server: a task keeps it connected, its tools sit in the registry, calls go through it.

    The supervising task owns the connection (the SDK's Client must be entered and left by one task). It
    connects, lists the tools and registers them, then holds the connection until a call finds it broken
    or close() is called. A broken connection is reopened at once; a failed attempt is retried after a
    delay that doubles up to a minute, or sooner when a call asks for the server.
    """

    def __init__(
        self, name: str, config: McpServerConfig, registry: ToolRegistry, *, connect_timeout_s: float,
        retry_delay_s: float,
    ) -> None:
        self.name = name
        self.config = config
        self._registry = registry
        self._connect_timeout_s = connect_timeout_s
        self._retry_delay_s = retry_delay_s
        self._state: McpServerState = "connecting"
        self._client: Client | None = None
        self._scope: anyio.CancelScope | None = None  # the current connection's, so it can be ended
        self._offered: list[tuple[str, str, dict[str, Any]]] = []  # (the server's name, description, schema)
        self._registered: list[str] = []  # their names in the registry
        self._attempts = 0
        self._attempted = asyncio.Condition()  # notified after each connection attempt
        self._wake = asyncio.Event()  # ends a retry delay early
        self._closing = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the supervising task; its first attempt to connect begins at once."""
        self._task = asyncio.create_task(self._supervise(), name=f"mcp-server-{self.name}")

    async def wait_for_first_attempt(self) -> None:
        """Return once the first attempt has connected or failed (within the connect timeout)."""
        async with self._attempted:
            await self._attempted.wait_for(lambda: self._attempts > 0)

    async def close(self) -> None:
        """Close the session (ending a stdio server's process) and take the server's tools away."""
        self._closing = True
        if self._scope is not None:
            self._scope.cancel()
        self._wake.set()
        if self._task is not None:
            await self._task
        for name in self._registered:
            self._registry.remove(name)
        self._registered = []
        await self._finish_attempt()  # calls still waiting for a connection learn there will be none

    def status(self) -> McpServerStatus:
        """The state of the connection and how many tools the server has in the registry."""
        return McpServerStatus(state=self._state, transport=self.config.transport, tools=len(self._registered))

    async def call_tool(self, tool: str, /, **arguments: Any) -> str:
        """Call one of the server's tools by its own name; every failure becomes an McpCallError."""
        client = await self._connected_client()
        try:
            result = await client.call_tool(tool, arguments)
        except MCPError as exc:
            if exc.code == mcp_types.CONNECTION_CLOSED:
                raise self._broken(client, "closed the connection") from None
            raise McpCallError(f"MCP server {self.name!r} refused the call: {exc.message}") from None
        except pydantic.ValidationError:
            raise McpCallError(f"MCP server {self.name!r} sent a result that breaks the protocol") from None
        except Exception as exc:  # the transport broke under the call (a reset connection, a dead process)
            logger.warning("MCP server %r failed during a call to %r: %s", self.name, tool, _describe(exc))
            raise self._broken(client, "failed") from None
        text = mcp_result_text(result)
        if result.is_error:
            raise McpCallError(text or f"the tool {tool!r} failed without saying why")
        return text

    async def _connected_client(self) -> Client:
        """The open session; when there is none, ask for an attempt now and wait for its outcome."""
        if self._client is None:
            attempts = self._attempts
            self._wake.set()
            async with self._attempted:
                await self._attempted.wait_for(lambda: self._client is not None or self._attempts > attempts)
        if self._client is None:
            raise McpCallError(f"MCP server {self.name!r} is unavailable; the service keeps trying to reach it")
        return self._client

    def _broken(self, client: Client, failure: str) -> McpCallError:
        """End the connection a call found broken (unless it is already replaced), and say so to the model."""
        if self._client is client and self._scope is not None:
            self._scope.cancel()
        return McpCallError(f"MCP server {self.name!r} {failure} during the call; the next call reconnects")

    async def _supervise(self) -> None:
        """Keep the server connected until close(); see the class docstring."""
        delay_s = self._retry_delay_s
        while not self._closing:
            error = None
            try:
                await self._serve()
            except Exception as exc:  # whatever the transport raised: the server is down, not the service
                error = _describe(exc)
            if self._closing:
                break
            if self._state == "connected":
                logger.warning("MCP server %r: the connection was lost (%s); reconnecting", self.name,
                               error or "closed")
                self._state, delay_s = "connecting", self._retry_delay_s
                continue
            self._state = "down"
            logger.warning("MCP server %r is unavailable (%s); retrying in %.1f s", self.name, error, delay_s)
            self._wake.clear()  # the calls that asked for this attempt get its outcome now
            await self._finish_attempt()
            with anyio.move_on_after(delay_s):
                await self._wake.wait()
            self._state, delay_s = "connecting", min(delay_s * 2, _MAX_RETRY_DELAY_S)

    async def _serve(self) -> None:
        """One connection: open it, register the tools, and hold it until it is ended."""
        with anyio.CancelScope(deadline=anyio.current_time() + self._connect_timeout_s) as scope:
            self._scope = scope
            async with self._open() as client:
                listed = await _list_tools(client)
                scope.deadline = math.inf
                self._register(listed)
                self._client, self._state = client, "connected"
                logger.info("MCP server %r connected with %d tools", self.name, len(self._registered))
                await self._finish_attempt()
                try:
                    await anyio.sleep_forever()
                finally:
                    self._client = None  # before the session closes, so no call picks up a closing one
        if self._state != "connected" and not self._closing:
            raise TimeoutError(f"no connection within {self._connect_timeout_s} s")

    @asynccontextmanager
    async def _open(self) -> AsyncIterator[Client]:
        """An initialised session: a subprocess over stdio, or Streamable HTTP with the entry's headers.

        A stdio server's environment is its entry's `env` over the SDK's short default list (PATH, HOME,
        USER, ...): the service's own variables, its secrets among them, are not passed on.
        """
        config = self.config
        match config.command, config.url:
            case str() as command, None:
                parameters = StdioServerParameters(command=command, args=config.args, env=config.env,
                                                   cwd=config.cwd)
                async with Client(parameters) as client:
                    yield client
            case None, str() as url:
                timeout = httpx2.Timeout(self._connect_timeout_s, read=None)  # the registry times each call
                async with (
                    httpx2.AsyncClient(headers=config.headers, timeout=timeout) as http,
                    Client(streamable_http_client(url, http_client=http, max_sse_event_size=_MAX_HTTP_EVENT_BYTES))
                    as client,
                ):
                    yield client

    async def _finish_attempt(self) -> None:
        """Count an attempt and wake the calls waiting for its outcome."""
        async with self._attempted:
            self._attempts += 1
            self._attempted.notify_all()

    def _register(self, listed: list[mcp_types.Tool]) -> None:
        """Put the allowed tools in the registry, under safe names; on a reconnect, only if they changed."""
        allowed = self.config.allowed_tools
        if unknown := sorted(set(allowed or ()) - {tool.name for tool in listed}):
            logger.warning("MCP server %r offers no tools named %s (allowed_tools)", self.name, unknown)
        offered = [
            (tool.name, mcp_tool_description(tool), mcp_tool_parameters(tool.input_schema))
            for tool in listed
            if allowed is None or tool.name in allowed
        ]
        if offered == self._offered:
            return
        for name in self._registered:
            self._registry.remove(name)
        self._registered = []
        for tool_name, description, parameters in offered:
            name = mcp_tool_name(self.name, tool_name, {tool.name for tool in self._registry.tools})
            if name != f"{self.name}__{tool_name}":
                logger.warning("MCP server %r: tool %r is registered as %r (names are 1-64 letters, digits, "
                               "'_' or '-', and unique)", self.name, tool_name, name)
            self._registry.add(Tool(
                name=name, description=description, function=partial(self.call_tool, tool_name),
                arguments_model=None, parameters=parameters, is_async=True, source=f"mcp:{self.name}",
                timeout_s=self.config.timeout_s,
            ))
            self._registered.append(name)
        self._offered = offered


class McpServers:
    """The servers of an MCP_SERVERS file, for the app's lifespan.

        async with McpServers.start(settings.mcp_servers, REGISTRY, connect_timeout_s=30) as mcp_servers:
            ...  # mcp_servers.status() for /api/v1/health
    """

    def __init__(self, servers: list[McpServer], disabled: dict[str, McpServerConfig]) -> None:
        self._servers = servers
        self._disabled = disabled

    @classmethod
    @asynccontextmanager
    async def start(
        cls, config_path: Path | None, registry: ToolRegistry, *, connect_timeout_s: float = 30.0,
        retry_delay_s: float = 1.0,
    ) -> AsyncIterator["McpServers"]:
        """Check the file, connect every enabled server, and on exit close them all and remove their tools.

        A bad file raises McpConfigError before anything starts. Startup waits for each server's first
        attempt (at most `connect_timeout_s`); a server that is not up by then is retried in the background,
        first after `retry_delay_s`, and its tools join the registry when it connects. No file: no servers.
        """
        config = load_mcp_config(config_path) if config_path is not None else {}
        servers = [
            McpServer(name, entry, registry, connect_timeout_s=connect_timeout_s, retry_delay_s=retry_delay_s)
            for name, entry in config.items()
            if entry.enabled
        ]
        try:
            for server in servers:
                server.start()
            await asyncio.gather(*(server.wait_for_first_attempt() for server in servers))
            yield cls(servers, {name: entry for name, entry in config.items() if not entry.enabled})
        finally:
            await asyncio.gather(*(server.close() for server in servers))

    def status(self) -> dict[str, McpServerStatus]:
        """Every configured server by name, disabled ones included."""
        statuses = {server.name: server.status() for server in self._servers}
        for name, config in self._disabled.items():
            statuses[name] = McpServerStatus(state="disabled", transport=config.transport, tools=0)
        return statuses

    def unavailable(self) -> list[str]:
        """The enabled servers that are not connected now: /api/v1/health is `degraded` while there are any."""
        return [server.name for server in self._servers if server.status().state != "connected"]

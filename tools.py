"""Tools the agent can call: the @tool registry, its executor, and the built-in tools.

  1. Definitions  ToolDefinitionError, ToolResult, Tool
  2. Schemas      pure functions: docstring -> descriptions; pydantic's JSON Schema -> a clean one
  3. Registry     ToolRegistry: @tool builds one pydantic model a tool; run() returns failures as text
  4. Calculator   a whitelisting AST walker with size limits, behind the calculator tool
  5. Built-ins    REGISTRY, tool, calculator, get_current_time
"""

import ast
import asyncio
import inspect
import json
import math
import operator
import re
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import pydantic

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
    """A registered tool; `arguments_model` is both its JSON Schema and its argument validator."""

    name: str
    description: str
    function: Callable[..., Any]
    arguments_model: type[pydantic.BaseModel]
    parameters: dict[str, Any]
    is_async: bool  # asked once, at registration, not on every call

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
        self._tools[name] = Tool(name, _summary(doc), function, model, schema, inspect.iscoroutinefunction(function))
        self._schemas = None
        return function

    def get(self, name: str) -> Tool | None:
        """The tool called `name`, if there is one."""
        return self._tools.get(name)

    @property
    def tools(self) -> list[Tool]:
        """All tools, in registration order."""
        return list(self._tools.values())

    def openai_schemas(self) -> list[dict[str, Any]]:
        """Every tool's schema, cached until the next register: it is sent with every vLLM request."""
        if self._schemas is None:
            self._schemas = [tool.openai_schema() for tool in self._tools.values()]
        return self._schemas

    async def run(
        self, name: str, arguments: dict[str, Any], *, timeout_s: float, max_result_chars: int
    ) -> ToolResult:
        """Call a tool for the model: every failure it can act on comes back as `error`, never raised.

        A sync tool that times out keeps its worker thread until it returns; only the wait ends.
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
        """Validate, call within the timeout, and render the value as text; failures become _CallError."""
        tool = self._tools.get(name)
        if tool is None:
            raise _CallError(f"unknown tool {name!r}; available tools: {', '.join(self._tools) or 'none'}")
        try:
            kwargs = dict(iter(tool.arguments_model.model_validate(arguments)))  # dict(model) probes .keys()
        except pydantic.ValidationError as exc:
            raise _CallError(_validation_message(name, exc)) from None
        deadline = asyncio.timeout(timeout_s)
        try:
            async with deadline:
                if tool.is_async:
                    value = await tool.function(**kwargs)
                else:
                    value = await asyncio.to_thread(tool.function, **kwargs)
            return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
        except Exception as exc:
            if isinstance(exc, TimeoutError) and deadline.expired():
                raise _CallError(f"tool {name!r} timed out after {float(timeout_s)} s") from None
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
    # Async on purpose: the size limits bound the work to well under a millisecond of CPU, far less
    # than the thread hop a sync tool costs.
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

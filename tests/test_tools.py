"""Tests for tools.py: the @tool decorator, ToolRegistry.run(), and the built-in tools."""

import asyncio
import re
import threading
from collections.abc import Callable
from datetime import date, datetime
from typing import Any, Literal

import pytest

from tools import REGISTRY, ToolDefinitionError, ToolRegistry, evaluate_expression, get_current_time

FUNCTION_NAMES = "sqrt, sin, cos, tan, log, log10, exp, abs, round, floor, ceil, min, max"


@pytest.fixture
def registry() -> ToolRegistry:
    return ToolRegistry()


def lookup(
    city: str, days: int = 3, units: Literal["metric", "imperial"] = "metric", title: str | None = None
) -> str:
    """Look up the weather
    forecast for a city.

    Uses a fake service.

    Args:
        city: City name,
            e.g. "Seoul".
        days (int): How many days to forecast.
        units: Unit system.
        title: Heading to print.

    Returns:
        The forecast.
    """
    return f"{title or city}: sunny for {days} days ({units})"


def greet(name: str, punctuation: str = "!") -> str:
    """Greet someone.

    Args:
        name: Who to greet.
        punctuation: What ends the greeting.
    """
    return f"Hello, {name}{punctuation}"


async def async_greet(name: str) -> str:
    """Greet someone, asynchronously.

    Args:
        name: Who to greet.
    """
    await asyncio.sleep(0)
    return f"Hi, {name}"


# --- @tool ---


def test_register_builds_the_whole_schema_from_hints_and_docstring(registry: ToolRegistry) -> None:
    registry.register(lookup)
    assert registry.get("lookup").openai_schema() == {
        "type": "function",
        "function": {
            "name": "lookup",
            "description": "Look up the weather forecast for a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": 'City name, e.g. "Seoul".'},
                    "days": {"type": "integer", "default": 3, "description": "How many days to forecast."},
                    "units": {
                        "type": "string",
                        "enum": ["metric", "imperial"],
                        "default": "metric",
                        "description": "Unit system.",
                    },
                    "title": {
                        "anyOf": [{"type": "string"}, {"type": "null"}],
                        "default": None,
                        "description": "Heading to print.",
                    },
                },
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    }


def test_register_returns_the_function_unchanged(registry: ToolRegistry) -> None:
    assert registry.register(greet) is greet


def test_a_tool_without_parameters_has_an_empty_object_schema(registry: ToolRegistry) -> None:
    def ping() -> str:
        """Check that tools work."""
        return "pong"

    registry.register(ping)
    assert registry.get("ping").parameters == {
        "type": "object",
        "properties": {},
        "required": [],
        "additionalProperties": False,
    }


def test_tools_keep_registration_order_and_get_finds_them_by_name(registry: ToolRegistry) -> None:
    registry.register(lookup)
    registry.register(greet)
    assert [tool.name for tool in registry.tools] == ["lookup", "greet"]
    tool = registry.get("greet")
    assert tool is registry.tools[1]
    assert (tool.name, tool.description, tool.function) == ("greet", "Greet someone.", greet)
    assert registry.get("missing") is None


def test_openai_schemas_are_cached_until_the_next_register(registry: ToolRegistry) -> None:
    registry.register(greet)
    first = registry.openai_schemas()
    assert registry.openai_schemas() is first
    registry.register(async_greet)
    assert [schema["function"]["name"] for schema in registry.openai_schemas()] == ["greet", "async_greet"]
    assert registry.openai_schemas() is registry.openai_schemas()


def no_hint(city, days: int) -> str:
    """Look up a city.

    Args:
        days: How many days.
    """
    return city


def no_docstring(city: str) -> str:
    return city


def var_args(*cities: str, **options: str) -> str:
    """Look up cities.

    Args:
        cities: The cities.
        options: Extra options.
    """
    return ",".join(cities)


def stale_args(city: str) -> str:
    """Look up a city.

    Args:
        city: The city.
        country: The country.
    """
    return city


def positional_only(city: str, /) -> str:
    """Look up a city.

    Args:
        city: The city.
    """
    return city


@pytest.mark.parametrize(
    ("function", "message"),
    [
        pytest.param(
            no_hint,
            "@tool no_hint: parameter 'city' has no type hint; "
            "parameter 'city' has no description in the docstring's Args: section",
            id="missing-hint-and-args-entry",
        ),
        pytest.param(
            no_docstring,
            "@tool no_docstring: has no docstring; "
            "parameter 'city' has no description in the docstring's Args: section",
            id="missing-docstring",
        ),
        pytest.param(
            var_args,
            "@tool var_args: parameter 'cities': *args and **kwargs are not supported; "
            "parameter 'options': *args and **kwargs are not supported",
            id="var-args",
        ),
        pytest.param(
            stale_args,
            "@tool stale_args: the docstring's Args: section names no parameter 'country'",
            id="args-entry-without-parameter",
        ),
        pytest.param(
            positional_only,
            "@tool positional_only: parameter 'city' is positional-only; arguments are passed by name",
            id="positional-only",
        ),
    ],
)
def test_bad_definitions_fail_with_every_problem_in_one_error(
    registry: ToolRegistry, function: Callable[..., Any], message: str
) -> None:
    with pytest.raises(ToolDefinitionError) as excinfo:
        registry.register(function)
    assert str(excinfo.value) == message
    assert registry.tools == []


def test_a_duplicate_name_fails(registry: ToolRegistry) -> None:
    registry.register(greet)
    with pytest.raises(ToolDefinitionError) as excinfo:
        registry.register(greet)
    assert str(excinfo.value) == "@tool greet: a tool named 'greet' is already registered"


def test_a_type_pydantic_cannot_describe_fails(registry: ToolRegistry) -> None:
    class Opaque:
        """A class pydantic knows nothing about."""

    def store(item: Opaque) -> str:
        """Store an item.

        Args:
            item: The item.
        """
        return "ok"

    with pytest.raises(ToolDefinitionError, match=r"^@tool store: cannot build an arguments schema: "):
        registry.register(store)


# --- run() ---


async def run(
    registry: ToolRegistry, name: str, arguments: Any, max_result_chars: int = 1000, timeout_s: float = 5.0
) -> tuple[str | None, str | None]:
    """Run a tool and keep what the model sees; the duration is checked to be a measurement."""
    result = await registry.run(name, arguments, timeout_s=timeout_s, max_result_chars=max_result_chars)
    assert result.duration_s >= 0
    return result.result, result.error


async def test_a_sync_tool_returns_its_text_with_defaults_applied(registry: ToolRegistry) -> None:
    registry.register(greet)
    assert await run(registry, "greet", {"name": "Ada"}) == ("Hello, Ada!", None)


async def test_an_async_tool_is_awaited(registry: ToolRegistry) -> None:
    registry.register(async_greet)
    assert await run(registry, "async_greet", {"name": "Ada"}) == ("Hi, Ada", None)


async def test_an_unknown_tool_lists_the_available_ones(registry: ToolRegistry) -> None:
    registry.register(greet)
    registry.register(lookup)
    assert await run(registry, "weather", {}) == (None, "unknown tool 'weather'; available tools: greet, lookup")


@pytest.mark.parametrize(
    ("arguments", "error"),
    [
        pytest.param({}, "invalid arguments for lookup: city: Field required", id="missing"),
        pytest.param(
            {"city": "Seoul", "days": "many"},
            "invalid arguments for lookup: days: Input should be a valid integer, unable to parse string as an "
            "integer",
            id="wrong-type",
        ),
        pytest.param(
            {"city": "Seoul", "units": "kelvin", "country": "KR"},
            "invalid arguments for lookup: units: Input should be 'metric' or 'imperial'; "
            "country: Extra inputs are not permitted",
            id="bad-enum-and-extra",
        ),
        pytest.param(
            ["Seoul"],
            "invalid arguments for lookup: Input should be a valid dictionary or instance of lookup",
            id="not-an-object",
        ),
    ],
)
async def test_invalid_arguments_name_each_bad_field(registry: ToolRegistry, arguments: Any, error: str) -> None:
    registry.register(lookup)
    assert await run(registry, "lookup", arguments) == (None, error)


def fails_with_value_error(city: str) -> str:
    """Fail as a tool should.

    Args:
        city: The city.
    """
    raise ValueError(f"no forecast for {city!r}; try a larger city")


def fails_unexpectedly(city: str) -> str:
    """Fail as a tool should not.

    Args:
        city: The city.
    """
    raise KeyError(city)


async def fails_with_own_timeout(city: str) -> str:
    """Fail with a TimeoutError of its own.

    Args:
        city: The city.
    """
    raise TimeoutError("upstream did not answer")


async def sleeps(city: str) -> str:
    """Take far longer than the timeout.

    Args:
        city: The city.
    """
    await asyncio.sleep(10)
    return city


@pytest.mark.parametrize(
    ("function", "error"),
    [
        pytest.param(fails_with_value_error, "no forecast for 'Oz'; try a larger city", id="value-error"),
        pytest.param(fails_unexpectedly, "KeyError: 'Oz'", id="unexpected"),
        pytest.param(fails_with_own_timeout, "TimeoutError: upstream did not answer", id="tool-timeout-error"),
    ],
)
async def test_failures_become_error_text(registry: ToolRegistry, function: Callable[..., Any], error: str) -> None:
    registry.register(function)
    assert await run(registry, function.__name__, {"city": "Oz"}) == (None, error)


async def test_a_tool_past_its_deadline_times_out(registry: ToolRegistry) -> None:
    registry.register(sleeps)
    assert await run(registry, "sleeps", {"city": "Oz"}, timeout_s=0.05) == (
        None,
        "tool 'sleeps' timed out after 0.05 s",
    )


async def test_a_non_str_value_is_returned_as_json(registry: ToolRegistry) -> None:
    def forecast(city: str) -> dict[str, Any]:
        """Forecast as data.

        Args:
            city: The city.
        """
        return {"city": city, "sky": "맑음", "on": date(2026, 11, 25), "temps": [3, 9.5]}

    registry.register(forecast)
    expected = '{"city": "Seoul", "sky": "맑음", "on": "2026-11-25", "temps": [3, 9.5]}'
    assert await run(registry, "forecast", {"city": "Seoul"}) == (expected, None)


@pytest.mark.parametrize(
    ("max_result_chars", "expected"),
    [
        pytest.param(11, "Hello, Ada!", id="at-limit"),
        pytest.param(5, "Hello\n…[truncated 6 characters]", id="over-limit"),
    ],
)
async def test_long_results_are_truncated_with_a_marker(
    registry: ToolRegistry, max_result_chars: int, expected: str
) -> None:
    registry.register(greet)
    assert await run(registry, "greet", {"name": "Ada"}, max_result_chars) == (expected, None)


async def test_a_sync_tool_runs_off_the_event_loop_thread(registry: ToolRegistry) -> None:
    def thread_id() -> int:
        """Report the thread the tool runs in."""
        return threading.get_ident()

    registry.register(thread_id)
    result, error = await run(registry, "thread_id", {})
    assert error is None
    assert int(result) != threading.get_ident()


async def test_cancellation_propagates_instead_of_becoming_a_result(registry: ToolRegistry) -> None:
    started = asyncio.Event()

    async def wait_forever() -> str:
        """Wait until cancelled."""
        started.set()
        await asyncio.Event().wait()
        return "unreachable"

    registry.register(wait_forever)
    task = asyncio.create_task(registry.run("wait_forever", {}, timeout_s=10, max_result_chars=100))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


# --- built-in tools ---


def test_the_built_in_registry_holds_calculator_and_get_current_time() -> None:
    assert [tool.name for tool in REGISTRY.tools] == ["calculator", "get_current_time"]
    assert REGISTRY.get("get_current_time").parameters == {
        "type": "object",
        "properties": {
            "timezone": {
                "type": "string",
                "default": "UTC",
                "description": 'IANA time zone name such as "Asia/Seoul" or "Europe/Paris". Defaults to "UTC".',
            }
        },
        "required": [],
        "additionalProperties": False,
    }


async def test_built_in_tools_run_through_the_registry() -> None:
    assert await run(REGISTRY, "calculator", {"expression": "12*7"}) == ("84", None)
    assert await run(REGISTRY, "calculator", {"expression": "1/0"}) == (None, "division by zero")


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        pytest.param("2 + 3 * 4", "14", id="precedence"),
        pytest.param("(2 + 3) * 4", "20", id="parentheses"),
        pytest.param("2**16 / 7", "9362.285714285714", id="true-division"),
        pytest.param("12*7", "84", id="int-stays-int"),
        pytest.param("  1 + 1 ", "2", id="surrounding-space"),
        pytest.param("-2**2", "-4", id="unary-minus-binds-looser-than-power"),
        pytest.param("- -3", "3", id="double-unary-minus"),
        pytest.param("+5", "5", id="unary-plus"),
        pytest.param("2**-1", "0.5", id="negative-exponent"),
        pytest.param("2**0.5", "1.4142135623730951", id="float-exponent"),
        pytest.param("7 // 2", "3", id="floor-division"),
        pytest.param("-7 // 2", "-4", id="floor-division-rounds-down"),
        pytest.param("7 % 3", "1", id="modulo"),
        pytest.param("-7 % 3", "2", id="modulo-takes-divisor-sign"),
        pytest.param("1.5e3", "1500.0", id="float-literal"),
        pytest.param("sqrt(16)", "4.0", id="sqrt"),
        pytest.param("log(e)", "1.0", id="log-and-e"),
        pytest.param("log(8, 2)", "3.0", id="log-with-base"),
        pytest.param("log10(1000)", "3.0", id="log10"),
        pytest.param("exp(0)", "1.0", id="exp"),
        pytest.param("cos(pi)", "-1.0", id="cos-and-pi"),
        pytest.param("sin(0) + tan(0)", "0.0", id="sin-tan"),
        pytest.param("abs(-3)", "3", id="abs"),
        pytest.param("round(2.567, 2)", "2.57", id="round-digits"),
        pytest.param("round(2.5)", "2", id="round-to-int"),
        pytest.param("floor(-1.5)", "-2", id="floor"),
        pytest.param("ceil(1.2)", "2", id="ceil"),
        pytest.param("max(1, 5, 3) - min(2, -1)", "6", id="min-max"),
        pytest.param("10**999", "1" + "0" * 999, id="thousand-digits"),
    ],
)
def test_calculator_evaluates_arithmetic(expression: str, expected: str) -> None:
    assert evaluate_expression(expression) == expected


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        pytest.param(
            "__import__('os')",
            f"unsupported expression: Call to '__import__'; functions: {FUNCTION_NAMES}",
            id="import",
        ),
        pytest.param(
            "os.system('ls')", f"unsupported expression: Call; functions: {FUNCTION_NAMES}", id="method-call"
        ),
        pytest.param("9**9**9**9", "exponent too large", id="power-tower"),
        pytest.param("10**100000", "exponent too large", id="huge-power"),
        pytest.param("2**-99999", "exponent too large", id="huge-negative-exponent-is-refused"),
        pytest.param("3**9999", "number too large", id="power-result-over-10000-bits"),
        pytest.param("2**9000 * 2**9000", "number too large", id="product-over-10000-bits"),
        pytest.param("10**1000", "result has more than 1000 digits", id="result-digits"),
        pytest.param("10**400 * 1.0", "number too large", id="int-to-float-overflow"),
        pytest.param("exp(1000)", "number too large", id="float-overflow"),
        pytest.param("1e999", "result is not a finite number", id="infinite-literal"),
        pytest.param("(-8) ** 0.5", "result is not a real number", id="complex-result"),
        pytest.param("1/0", "division by zero", id="division-by-zero"),
        pytest.param("1 // 0", "division by zero", id="floor-division-by-zero"),
        pytest.param("1 % 0", "division by zero", id="modulo-by-zero"),
        pytest.param("0 ** -1", "division by zero", id="zero-to-negative-power"),
        pytest.param("(1).__class__", "unsupported expression: Attribute", id="attribute"),
        pytest.param("'a'*10", "unsupported value 'a': only numbers are allowed", id="string"),
        pytest.param("True + 1", "unsupported value True: only numbers are allowed", id="boolean"),
        pytest.param("1j", "unsupported value 1j: only numbers are allowed", id="complex-literal"),
        pytest.param("[1,2]", "unsupported expression: List", id="list"),
        pytest.param("(1,2)[0]", "unsupported expression: Subscript", id="subscript"),
        pytest.param("[x for x in (1,)]", "unsupported expression: ListComp", id="comprehension"),
        pytest.param("lambda: 1", "unsupported expression: Lambda", id="lambda"),
        pytest.param("1 < 2", "unsupported expression: Compare", id="comparison"),
        pytest.param("1 << 3", "unsupported operator: LShift", id="shift"),
        pytest.param("not 1", "unsupported operator: Not", id="not"),
        pytest.param("x + 1", "unknown name 'x'; constants: pi, e", id="unknown-name"),
        pytest.param("sqrt(-1)", "sqrt(): math domain error", id="domain-error"),
        pytest.param("sqrt(1, 2)", "sqrt(): math.sqrt() takes exactly one argument (2 given)", id="arity"),
        pytest.param("max()", "max(): max expected at least 1 argument, got 0", id="no-arguments"),
        pytest.param("sqrt(x=4)", "sqrt() takes positional numbers only", id="keyword-argument"),
        pytest.param("max(*(1, 2))", "max() takes positional numbers only", id="starred-argument"),
        pytest.param("round(5, -10**9)", "round() takes at most 100 digits", id="round-digits"),
        pytest.param("", "invalid expression: invalid syntax", id="empty"),
        pytest.param("1 +", "invalid expression: invalid syntax", id="incomplete"),
        pytest.param("\x00", "invalid expression: source code string cannot contain null bytes", id="null"),
        pytest.param("1" * 501, "expression longer than 500 characters", id="long-input"),
        pytest.param("(" * 1000 + "1" + ")" * 1000, "expression longer than 500 characters", id="deep-parens"),
        pytest.param(
            "(" * 240 + "1" + ")" * 240, "invalid expression: too many nested parentheses", id="nested-parens"
        ),
        pytest.param("-" * 150 + "1", "expression nested more than 100 levels deep", id="deep-unary"),
        pytest.param("1+" * 200 + "1", "expression has more than 400 parts", id="many-nodes"),
    ],
)
def test_calculator_refuses_with_a_value_error(expression: str, message: str) -> None:
    with pytest.raises(ValueError) as excinfo:
        evaluate_expression(expression)
    assert str(excinfo.value) == message


WEEKDAYS = "Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday"


@pytest.mark.parametrize(
    ("timezone", "offset"),
    [pytest.param("Asia/Seoul", "+09:00", id="seoul"), pytest.param("UTC", "+00:00", id="utc")],
)
def test_get_current_time_gives_iso_time_weekday_and_zone(timezone: str, offset: str) -> None:
    text = get_current_time(timezone)
    match = re.fullmatch(rf"(\d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\d{re.escape(offset)}) \(({WEEKDAYS}), (.+)\)", text)
    assert match is not None, text
    assert (datetime.fromisoformat(match[1]).strftime("%A"), match[3]) == (match[2], timezone)


def test_get_current_time_defaults_to_utc() -> None:
    assert re.fullmatch(rf"\S+\+00:00 \(({WEEKDAYS}), UTC\)", get_current_time())


@pytest.mark.parametrize(
    "timezone",
    [
        pytest.param("Mars/Base", id="unknown"),
        pytest.param("../etc", id="path-escape"),
        pytest.param("", id="empty"),
        pytest.param("America", id="directory"),
        pytest.param("a\x00b", id="null-byte"),
    ],
)
def test_get_current_time_refuses_unknown_zones(timezone: str) -> None:
    with pytest.raises(ValueError) as excinfo:
        get_current_time(timezone)
    assert str(excinfo.value) == f"unknown time zone {timezone!r}; use an IANA name such as 'Asia/Seoul'"

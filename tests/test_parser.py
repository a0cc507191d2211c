"""Table tests for the Hermes text parser, argument decoding and the streaming text filter."""

from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent_app import (
    FunctionCall,
    ParsedReply,
    VisibleTextFilter,
    close_json,
    decode_arguments,
    parse_hermes_reply,
)

CALC = '{"name": "calculator", "arguments": {"expression": "12*7"}}'
TIME = '{"name": "get_current_time", "arguments": {"timezone": "Asia/Seoul"}}'
CALC_CALL = FunctionCall("calculator", {"expression": "12*7"})
TIME_CALL = FunctionCall("get_current_time", {"timezone": "Asia/Seoul"})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("The capital of France is Paris.", ParsedReply("The capital of France is Paris."),
                     id="plain-text"),
        pytest.param("a < b and b > c", ParsedReply("a < b and b > c"), id="angle-brackets-are-text"),
        pytest.param(f"<tool_call>\n{CALC}\n</tool_call>", ParsedReply("", (CALC_CALL,)), id="qwen-newlines"),
        pytest.param(f"<tool_call>{CALC}</tool_call>", ParsedReply("", (CALC_CALL,)), id="no-newlines"),
        pytest.param(f"Let me check.\n<tool_call>\n{CALC}\n</tool_call>",
                     ParsedReply("Let me check.\n", (CALC_CALL,)), id="text-before-tag"),
        pytest.param(f"<tool_call>\n{CALC}\n</tool_call>\n<tool_call>\n{TIME}\n</tool_call>",
                     ParsedReply("", (CALC_CALL, TIME_CALL)), id="two-calls-newline-separated"),
        pytest.param(f"<tool_call>{CALC}</tool_call><tool_call>{TIME}</tool_call>",
                     ParsedReply("", (CALC_CALL, TIME_CALL)), id="two-calls-no-separator"),
        pytest.param(f"<tool_call>{CALC}</tool_call> and <tool_call>{TIME}</tool_call>",
                     ParsedReply("", (CALC_CALL, TIME_CALL)), id="two-calls-text-separator"),
        pytest.param(f"<tool_call>\n{CALC}", ParsedReply("", (CALC_CALL,)), id="unclosed-last-tag"),
        pytest.param(f"<tool_call>{CALC}</tool_call><tool_call>\n{TIME}\n",
                     ParsedReply("", (CALC_CALL, TIME_CALL)), id="second-tag-unclosed"),
        pytest.param(f"<tool_call>\n{CALC}\n{TIME}\n</tool_call>",
                     ParsedReply("", (CALC_CALL, TIME_CALL)), id="two-objects-in-one-block"),
        pytest.param('<tool_call>{"name": "calculator", "parameters": {"expression": "12*7"}}</tool_call>',
                     ParsedReply("", (CALC_CALL,)), id="parameters-instead-of-arguments"),
        pytest.param('<tool_call>{"name": "calculator", "arguments": "{\\"expression\\": \\"12*7\\"}"}</tool_call>',
                     ParsedReply("", (CALC_CALL,)), id="arguments-as-json-string"),
        pytest.param('<tool_call>\n{"name": "calculator", "arguments": {"expression": "12*7"}\n</tool_call>',
                     ParsedReply("", (CALC_CALL,)), id="missing-closing-brace-repaired"),
        pytest.param('<tool_call>{"name": "get_current_time"}</tool_call>',
                     ParsedReply("", (FunctionCall("get_current_time", {}),)), id="no-arguments-means-empty"),
        pytest.param('<tool_call>{"name": "get_current_time", "arguments": ""}</tool_call>',
                     ParsedReply("", (FunctionCall("get_current_time", {}),)), id="empty-arguments-string"),
        pytest.param('<tool_call>{"name": "calc", "arguments": {"x": "ü"}}</tool_call>',
                     ParsedReply("", (FunctionCall("calc", {"x": "ü"}),)), id="non-ascii-raw"),
        pytest.param(
            '<tool_call>{"name": "calculator", "arguments": {"expression": 12*7}}</tool_call>',
            ParsedReply("", (FunctionCall(
                "calculator", {},
                "the tool call is not valid JSON (Expecting ',' delimiter: line 1 column 54 (char 53)); "
                "send it again"),)),
            id="malformed-json-goes-back-to-model",
        ),
        pytest.param(
            "<tool_call>{oops}</tool_call>",
            ParsedReply("", (FunctionCall(
                "", {},
                "the tool call is not valid JSON (Expecting property name enclosed in double quotes: "
                "line 1 column 2 (char 1)); send it again"),)),
            id="garbage-in-tag",
        ),
        pytest.param('<tool_call>["calculator"]</tool_call>',
                     ParsedReply("", (FunctionCall("", {}, 'a tool call must be a JSON object with a "name" string'),)),
                     id="not-an-object"),
        pytest.param(
            '<tool_call>{"name": "calculator", "arguments": [1, 2]}</tool_call>',
            ParsedReply("", (FunctionCall(
                "calculator", {}, "the arguments are not a valid JSON object (arguments must be a JSON object, "
                "not list)"),)),
            id="arguments-not-an-object",
        ),
    ],
)
def test_parse_hermes_reply(text: str, expected: ParsedReply) -> None:
    assert parse_hermes_reply(text) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param(None, {}, id="none"),
        pytest.param("", {}, id="empty-string"),
        pytest.param("  \n", {}, id="whitespace"),
        pytest.param('{"a": 1}', {"a": 1}, id="object-text"),
        pytest.param('{"a": 1}\n', {"a": 1}, id="trailing-whitespace-from-stream"),
        pytest.param('{"a": {"b": true', {"a": {"b": True}}, id="two-closers-missing"),
        pytest.param('"{\\"a\\": 1}"', {"a": 1}, id="double-encoded"),
        pytest.param({"a": 1}, {"a": 1}, id="already-a-dict"),
    ],
)
def test_decode_arguments(raw: object, expected: dict[str, object]) -> None:
    assert decode_arguments(raw) == expected


@pytest.mark.parametrize("raw", ["[1]", "12", '{"a": 1}}', "{not json"])
def test_decode_arguments_rejects_non_objects(raw: str) -> None:
    with pytest.raises(ValueError):
        decode_arguments(raw)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"a": "x', '{"a": "x"}'),
        ('{"a": [1, {"b": 2', '{"a": [1, {"b": 2}]}'),
        ('{"a": "}{"', '{"a": "}{"}'),
        ('{"a": "\\"', '{"a": "\\""}'),
        ('{"a": 1}', '{"a": 1}'),
    ],
)
def test_close_json(text: str, expected: str) -> None:
    assert close_json(text) == expected


def stream_through_filter(pieces: list[str]) -> str:
    text_filter = VisibleTextFilter()
    return "".join(text_filter.feed(piece) for piece in pieces) + text_filter.flush()


@pytest.mark.parametrize(
    ("pieces", "expected"),
    [
        pytest.param(["Hello", " world"], "Hello world", id="plain"),
        pytest.param(["Sure.", "<", "tool", "_call", ">", "{"], "Sure.", id="tag-split-into-tokens"),
        pytest.param(["Sure.<tool_call>\n{", "}</tool_call>"], "Sure.", id="tag-in-one-piece"),
        pytest.param(["a <", " b"], "a < b", id="lt-that-is-not-a-tag"),
        pytest.param(["x <tool", "box>"], "x <toolbox>", id="tag-prefix-that-is-not-a-tag"),
        pytest.param(["x <"], "x <", id="lone-lt-at-end-is-text"),
        pytest.param(["x <tool_c"], "x ", id="partial-tag-at-end-is-dropped"),
        pytest.param(["<tool_call>", "after"], "", id="nothing-after-a-tag"),
    ],
)
def test_visible_text_filter(pieces: list[str], expected: str) -> None:
    assert stream_through_filter(pieces) == expected


TEXTS = st.lists(st.sampled_from([*"ab <>/_{}\"\n", "<tool_call>", "</tool_call>", "<tool"])).map("".join)


@settings(max_examples=300, deadline=500)
@given(text=TEXTS, cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=10))
def test_streamed_text_never_shows_markup_and_matches_the_parse(text: str, cuts: list[int]) -> None:
    """However the text is split into tokens, the visible text is the parser's content (no markup)."""
    bounds = sorted({0, len(text), *(cut for cut in cuts if cut <= len(text))})
    pieces = [text[start:end] for start, end in pairwise(bounds)]
    visible = stream_through_filter(pieces)
    assert "<tool_call>" not in visible
    content = parse_hermes_reply(text).content
    held_back = content[len(visible):]
    assert content.startswith(visible)
    assert held_back == "" or "<tool_call>".startswith(held_back)


@settings(max_examples=300, deadline=500)
@given(text=st.text())
def test_parser_never_raises(text: str) -> None:
    reply = parse_hermes_reply(f"<tool_call>{text}</tool_call>")
    assert reply.content == ""
    assert all(isinstance(call, FunctionCall) and isinstance(call.arguments, dict) for call in reply.calls)

"""Table tests for the parsing section: Hermes JSON and XML tool calls, argument decoding and typing, and the
reply splitter, whole and streamed; vLLM 0.33's own qwen3 and qwen3_coder cases run through them too."""

import re
from collections.abc import Iterable, Mapping
from itertools import pairwise
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vllm_parser_cases import REASONING_CASES, TOOL_CASES, Call, Contains, Expected, ReasoningCase, ToolCase

from agent_app import (
    FunctionCall,
    ReplySplitter,
    SplitReply,
    close_json,
    coerce_value,
    decode_arguments,
    new_call_id,
    parse_tool_calls,
    schema_types,
)

CALC = '{"name": "calculator", "arguments": {"expression": "12*7"}}'
TIME = '{"name": "get_current_time", "arguments": {"timezone": "Asia/Seoul"}}'
CALC_CALL = FunctionCall("calculator", {"expression": "12*7"})
TIME_CALL = FunctionCall("get_current_time", {"timezone": "Asia/Seoul"})
TIME_XML = (
    "<tool_call>\n<function=get_current_time>\n<parameter=timezone>\nAsia/Seoul\n</parameter>\n</function>\n"
    "</tool_call>"
)
WEATHER_XML = "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>"
WEATHER_CALL = FunctionCall("get_weather", {"city": "Paris"})
SCHEMAS = {
    "calculator": {"type": "object", "properties": {"expression": {"type": "string"}}},
    "get_current_time": {"type": "object", "properties": {"timezone": {"type": "string"}}},
    "get_weather": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                                                      "filters": {"type": "object", "properties": {
                                                          "min_stars": {"type": "integer"}}}}},
}
TAGS = ("<think>", "</think>", "<tool_call>", "<function=")


def split(pieces: Iterable[tuple[str, str]], *, in_thought: bool,
          schemas: Mapping[str, dict[str, Any]] = SCHEMAS) -> SplitReply:
    """Feed (reasoning, content) pieces, flush, finish; what was shown must be exactly the reply's text."""
    splitter = ReplySplitter(schemas, in_thought=in_thought)
    shown = [splitter.feed(reasoning, content) for reasoning, content in pieces]
    shown.append(splitter.flush())
    reply = splitter.finish()
    assert ("".join(thinking for thinking, _ in shown), "".join(answer for _, answer in shown)) == (
        reply.reasoning, reply.content)
    return reply


def whole(reasoning: str, content: str) -> list[tuple[str, str]]:
    """The reply in one delta, as a non-streaming answer is fed."""
    return [(reasoning, content)]


def characters(reasoning: str, content: str) -> list[tuple[str, str]]:
    """One character a delta, the reasoning first, as a server with a reasoning parser sends them."""
    return [(char, "") for char in reasoning] + [("", char) for char in content]


def cut(text: str, cuts: list[int]) -> list[str]:
    """The text in pieces, cut at the given offsets."""
    bounds = sorted({0, len(text), *(point for point in cuts if point <= len(text))})
    return [text[start:end] for start, end in pairwise(bounds)]


# --- Hermes JSON calls (the cases of the former tests/test_parser.py)

@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("The capital of France is Paris.", ("The capital of France is Paris.", []), id="plain-text"),
        pytest.param("a < b and b > c", ("a < b and b > c", []), id="angle-brackets-are-text"),
        pytest.param(f"<tool_call>\n{CALC}\n</tool_call>", ("", [CALC_CALL]), id="qwen-newlines"),
        pytest.param(f"<tool_call>{CALC}</tool_call>", ("", [CALC_CALL]), id="no-newlines"),
        pytest.param(f"Let me check.\n<tool_call>\n{CALC}\n</tool_call>", ("Let me check.\n", [CALC_CALL]),
                     id="text-before-tag"),
        pytest.param(f"<tool_call>\n{CALC}\n</tool_call>\n<tool_call>\n{TIME}\n</tool_call>",
                     ("", [CALC_CALL, TIME_CALL]), id="two-calls-newline-separated"),
        pytest.param(f"<tool_call>{CALC}</tool_call><tool_call>{TIME}</tool_call>", ("", [CALC_CALL, TIME_CALL]),
                     id="two-calls-no-separator"),
        pytest.param(f"<tool_call>{CALC}</tool_call> and <tool_call>{TIME}</tool_call>",
                     ("", [CALC_CALL, TIME_CALL]), id="two-calls-text-separator"),
        pytest.param(f"<tool_call>\n{CALC}", ("", [CALC_CALL]), id="unclosed-last-tag"),
        pytest.param(f"<tool_call>{CALC}</tool_call><tool_call>\n{TIME}\n", ("", [CALC_CALL, TIME_CALL]),
                     id="second-tag-unclosed"),
        pytest.param(f"<tool_call>\n{CALC}\n<tool_call>\n{TIME}\n</tool_call>", ("", [CALC_CALL, TIME_CALL]),
                     id="first-tag-unclosed"),
        pytest.param(f"<tool_call>\n{CALC}\n{TIME}\n</tool_call>", ("", [CALC_CALL, TIME_CALL]),
                     id="two-objects-in-one-block"),
        pytest.param('<tool_call>{"name": "calculator", "parameters": {"expression": "12*7"}}</tool_call>',
                     ("", [CALC_CALL]), id="parameters-instead-of-arguments"),
        pytest.param('<tool_call>{"name": "calculator", "arguments": "{\\"expression\\": \\"12*7\\"}"}</tool_call>',
                     ("", [CALC_CALL]), id="arguments-as-json-string"),
        pytest.param('<tool_call>\n{"name": "calculator", "arguments": {"expression": "12*7"}\n</tool_call>',
                     ("", [CALC_CALL]), id="missing-closing-brace-repaired"),
        pytest.param('<tool_call>{"name": "get_current_time"}</tool_call>',
                     ("", [FunctionCall("get_current_time", {})]),
                     id="no-arguments-means-empty"),
        pytest.param('<tool_call>{"name": "get_current_time", "arguments": ""}</tool_call>',
                     ("", [FunctionCall("get_current_time", {})]), id="empty-arguments-string"),
        pytest.param('<tool_call>{"name": "calc", "arguments": {"x": "ü"}}</tool_call>',
                     ("", [FunctionCall("calc", {"x": "ü"})]), id="non-ascii-raw"),
        pytest.param('<tool_call>{"name": "write", "arguments": {"text": "use <tool_call> tags"}}</tool_call>',
                     ("", [FunctionCall("write", {"text": "use <tool_call> tags"})]), id="tag-inside-a-json-string"),
        pytest.param(
            '<tool_call>{"name": "calculator", "arguments": {"expression": 12*7}}</tool_call>',
            ("", [FunctionCall("calculator", {}, "the tool call is not valid JSON (Expecting ',' delimiter: line 1 "
                                             "column 54 (char 53)); send it again")]),
            id="malformed-json-goes-back-to-model",
        ),
        pytest.param(
            "<tool_call>{oops}</tool_call>",
            ("", [FunctionCall("", {}, "the tool call is not valid JSON (Expecting property name enclosed in double "
                                   "quotes: line 1 column 2 (char 1)); send it again")]),
            id="garbage-in-tag",
        ),
        pytest.param('<tool_call>["calculator"]</tool_call>',
                     ("", [FunctionCall("", {}, 'a tool call must be a JSON object with a "name" string')]),
                     id="not-an-object"),
        pytest.param(
            '<tool_call>{"name": "calculator", "arguments": [1, 2]}</tool_call>',
            ("", [FunctionCall("calculator", {}, "the arguments are not a valid JSON object (arguments must be a JSON "
                                             "object, not list)")]),
            id="arguments-not-an-object",
        ),
    ],
)
def test_parse_tool_calls_reads_hermes_json(text: str, expected: tuple[str, list[FunctionCall]]) -> None:
    assert parse_tool_calls(text, SCHEMAS) == expected


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


@pytest.mark.parametrize("raw", ["[1]", "12", '{"a": 1}}', "{not json", "[" * 100 + "]" * 100])
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


# --- FunctionCall

def test_a_call_vllm_parsed_keeps_its_id_and_decodes_its_arguments() -> None:
    call = FunctionCall.from_wire("chatcmpl-tool-1", "calculator", '{"expression": "12*7"}')
    assert (call, call.id) == (CALC_CALL, "chatcmpl-tool-1")


@pytest.mark.parametrize(
    ("arguments", "error"),
    [
        pytest.param("{not json", "the arguments are not valid JSON (Expecting property name enclosed in double "
                                  "quotes: line 1 column 2 (char 1))", id="not-json"),
        pytest.param("[" * 65 + "]" * 65, "the arguments are not valid JSON (arguments must be a JSON object, "
                                          "not list)", id="not-an-object"),
        pytest.param('{"a": ' * 65 + "1" + "}" * 65, "the arguments are not valid JSON (arguments nest more than "
                                                     "64 levels deep)", id="too-deep"),
    ],
)
def test_a_call_vllm_parsed_with_unreadable_arguments_carries_an_error(arguments: str, error: str) -> None:
    assert FunctionCall.from_wire("chatcmpl-tool-1", "calculator", arguments) == FunctionCall("calculator", {}, error)


def test_a_call_goes_back_to_vllm_with_its_arguments_as_json_text() -> None:
    call = FunctionCall("calc", {"x": "ü"}, id="chatcmpl-tool-1")
    assert call.wire() == {"id": "chatcmpl-tool-1", "type": "function",
                           "function": {"name": "calc", "arguments": '{"x": "ü"}'}}


def test_new_call_ids_look_like_vllm_0_33s() -> None:
    assert re.fullmatch(r"chatcmpl-tool-[0-9a-f]{16}", new_call_id())


# --- XML calls and their typing by schema

@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(WEATHER_XML, ("", [WEATHER_CALL]), id="one-call"),
        pytest.param("<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
                     "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>",
                     ("", [FunctionCall("get_weather", {"city": "Paris", "days": 3})]), id="integer-by-schema"),
        pytest.param("<tool_call>\n<function=unknown>\n<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>",
                     ("", [FunctionCall("unknown", {"days": "3"})]), id="unknown-tool-keeps-strings"),
        pytest.param("<tool_call>\n<function=get_weather>\n<parameter=hours>\n3\n</parameter>\n</function>\n"
                     "</tool_call>",
                     ("", [FunctionCall("get_weather", {"hours": "3"})]), id="unknown-parameter-keeps-a-string"),
        # vLLM 0.33 types nested `properties` only in values that are already objects, never in parsed text.
        pytest.param('<tool_call>\n<function=get_weather>\n<parameter=filters>\n{"min_stars": "100"}\n'
                     "</parameter>\n</function>\n</tool_call>",
                     ("", [FunctionCall("get_weather", {"filters": {"min_stars": "100"}})]),
                     id="a-string-inside-an-object-stays-a-string"),
        pytest.param("<tool_call>\n<function=get_weather>\n<parameter=city>\n\nParis\n\n</parameter>\n</function>\n"
                     "</tool_call>", ("", [FunctionCall("get_weather", {"city": "\nParis\n"})]),
                     id="only-one-newline-trimmed-each-side"),
        pytest.param("<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
                     "<parameter=city>\nLyon\n</parameter>\n</function>\n</tool_call>",
                     ("", [FunctionCall("get_weather", {"city": "Lyon"})]), id="a-repeated-parameter-keeps-the-last"),
        pytest.param("<tool_call>\n<function=>\n</function>\n</tool_call>", ("", []),
                     id="a-call-without-a-name-is-dropped"),
        pytest.param("Sure.\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>",
                     ("Sure.\n", [WEATHER_CALL]), id="no-tool-call-opener"),
        pytest.param(WEATHER_XML.removesuffix("</tool_call>") + TIME_XML, ("", [WEATHER_CALL, TIME_CALL]),
                     id="no-closer-between-calls"),
        pytest.param("<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n<parameter=days>\n2\n</parameter>\n"
                     "</function>\n</tool_call>",
                     ("", [FunctionCall("get_weather", {"city": "Paris", "days": 2})]), id="missing-parameter-closer"),
        pytest.param("<tool_call>\n<function=get_weather>\n<parameter=city>\nParis",
                     ("", [FunctionCall("get_weather", {})]), id="a-value-cut-off-is-dropped-as-vllm-drops-it"),
        pytest.param(f"<tool_call>\n{CALC}\n</tool_call>\n{TIME_XML}", ("", [CALC_CALL, TIME_CALL]),
                     id="hermes-then-xml"),
        pytest.param(f"{TIME_XML}\n<tool_call>{CALC}</tool_call>", ("", [TIME_CALL, CALC_CALL]), id="xml-then-hermes"),
        pytest.param("<tool_call>\n<function=get_weather>\n<parameter=city>\n" + "[" * 65 + "]" * 65
                     + "\n</parameter>\n</function>\n</tool_call>", ("", [FunctionCall("get_weather", {"city": "["
                     * 65 + "]" * 65})]), id="a-string-value-is-never-parsed"),
        pytest.param("<tool_call>\n<function=get_weather>\n<parameter=filters>\n" + "[" * 65 + "]" * 65
                     + "\n</parameter>\n</function>\n</tool_call>",
                     ("", [FunctionCall("get_weather", {}, "the arguments are not a valid JSON object (arguments nest "
                                                       "more than 64 levels deep)")]), id="a-value-too-deep"),
        # vLLM drops text between <tool_call> and <function=; we tell the model the text was not a call.
        pytest.param("<tool_call>:\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>",
                     ("", [FunctionCall("", {}, "the tool call is not valid JSON (Expecting value: line 1 column 1 "
                                            "(char 0)); send it again"), WEATHER_CALL]), id="text-before-the-function"),
    ],
)
def test_parse_tool_calls_reads_xml(text: str, expected: tuple[str, list[FunctionCall]]) -> None:
    assert parse_tool_calls(text, SCHEMAS) == expected


@pytest.mark.parametrize(
    ("value", "types", "expected"),
    [
        ("42", {"integer"}, 42),
        (" 42\n", {"integer"}, 42),
        ("4.0", {"number"}, 4),
        ("3.5", {"number"}, 3.5),
        ("inf", {"number"}, "inf"),
        ("NULL", {"null", "string"}, None),
        ("TRUE", {"boolean"}, True),
        ("0", {"boolean"}, False),
        ("yes", {"boolean"}, "yes"),
        ('{"a": 1}', {"object"}, {"a": 1}),
        ("[1e999]", {"array"}, "[1e999]"),
        ("42", {"string", "integer"}, 42),  # integer comes before string in vLLM's order
        ("hello", {"integer"}, "hello"),
        ("[1]", {"integer"}, [1]),  # nothing fits: the text's JSON value, as vLLM falls back
        ("42", {"Int "}, 42),
        ("3.5", {"double"}, 3.5),
        ("[" * 5000, {"array"}, "[" * 5000),
    ],
)
def test_coerce_value_follows_vllm(value: str, types: set[str], expected: Any) -> None:
    assert coerce_value(value, types) == expected


@pytest.mark.parametrize(
    ("schema", "expected"),
    [
        ({"type": ["integer", "null"]}, {"integer", "null"}),
        ({"enum": ["a", 1, None, True, 2.5, [1], {}]}, {"string", "integer", "null", "boolean", "number", "array",
                                                        "object"}),
        ({"anyOf": [{"type": "integer"}, {}]}, {"integer", "string"}),
        ({"oneOf": [{"type": "boolean"}], "allOf": [{"type": "null"}]}, {"boolean", "null"}),
        ({}, {"string"}),
        ("not a schema", {"string"}),
    ],
)
def test_schema_types_follow_vllm(schema: Any, expected: set[str]) -> None:
    assert schema_types(schema) == expected


def test_a_prose_mention_of_a_call_gives_calls_that_vllm_gives_and_one_error() -> None:
    """vllm#58227: vLLM gives the junk call and get_weather; our extra error call tells the model about ':'."""
    text = ("Use <tool_call>\n<function=function_name\nWait, let me call the real tool via <tool_call>:\n"
            "<tool_call>\n<function=get_weather>\n<parameter=city>Tokyo</parameter>\n</function>\n</tool_call>")
    assert parse_tool_calls(text, SCHEMAS) == ("Use ", [
        FunctionCall("function_name\nWait, let me call the real tool via", {}),
        FunctionCall("", {}, "the tool call is not valid JSON (Expecting value: line 1 column 1 (char 0)); "
                             "send it again"),
        FunctionCall("get_weather", {"city": "Tokyo"}),
    ])


# --- ReplySplitter

SPLITS = [
    pytest.param("", "<think>\nLet me see.\n</think>\n\nParis.", False, SplitReply("Let me see.", "Paris.", [], False),
                 id="hybrid-qwen3-thought"),
    pytest.param("", "Let me see.\n</think>\n\nParis.", True, SplitReply("Let me see.", "Paris.", [], False),
                 id="qwen3.5-thought-without-opener"),
    pytest.param("", f"The user wants the weather.\n</think>\n\n{WEATHER_XML}", True,
                 SplitReply("The user wants the weather.", "", [WEATHER_CALL], False), id="qwen3.5-xml-call"),
    pytest.param("", "<think>\n\n</think>\n\nHello", False, SplitReply("", "Hello", [], False),
                 id="empty-thought-of-thinking-off"),
    pytest.param("", "<think>one\n\ntwo\n</think>x", False, SplitReply("one\n\ntwo", "x", [], False),
                 id="newlines-inside-a-thought-kept"),
    pytest.param("", "\n\n<think>x</think>y", False, SplitReply("x", "y", [], False),
                 id="whitespace-before-a-leading-think-not-shown"),
    pytest.param("", "Hello\n", False, SplitReply("", "Hello\n", [], False), id="plain-answer-unchanged"),
    pytest.param("", "\n\nHello", False, SplitReply("", "\n\nHello", [], False), id="leading-newlines-without-thought"),
    pytest.param("", f"Let me check.\n<tool_call>\n{CALC}\n</tool_call>", False,
                 SplitReply("", "Let me check.\n", [CALC_CALL], False), id="text-before-a-hermes-call"),
    pytest.param("", f"<tool_call>\n{CALC}\n</tool_call>\n{TIME_XML}", False,
                 SplitReply("", "", [CALC_CALL, TIME_CALL], False), id="hermes-and-xml"),
    pytest.param("", f"<tool_call>{CALC}</tool_call> Done. <think>", False, SplitReply("", "", [CALC_CALL], False),
                 id="nothing-after-a-call-is-shown"),
    # vLLM 0.33 ends a thought at a call and runs the calls of thought and answer alike, dropping text after
    # them; we run the thought's calls only when the answer has none, so a call planned in the thought and then
    # made in the answer runs once.
    pytest.param("", f"<think>I'll call it.\n<tool_call>\n{CALC}\n</tool_call>\n</think>\n\nLet me check.", False,
                 SplitReply("I'll call it.", "Let me check.", [CALC_CALL], False), id="call-inside-the-thought-is-run"),
    pytest.param("", f"<think>maybe <tool_call>{TIME}</tool_call></think><tool_call>{CALC}</tool_call>", False,
                 SplitReply("maybe ", "", [CALC_CALL], False), id="answer-calls-win-over-thought-calls"),
    pytest.param("", f"I need the time.\n\n<tool_call>\n{TIME}\n</tool_call>", True,
                 SplitReply("I need the time.", "", [TIME_CALL], False), id="a-call-ends-an-open-thought"),
    pytest.param("", "Still thinking about", True, SplitReply("Still thinking about", "", [], True),
                 id="cut-off-thought"),
    pytest.param("", "<think>\nHmm\n", False, SplitReply("Hmm", "", [], True), id="cut-off-thought-with-opener"),
    pytest.param("", "", True, SplitReply("", "", [], False), id="an-empty-reply-is-no-cut-off-thought"),
    pytest.param("", "a</think>b</think>c", True, SplitReply("a", "bc", [], False), id="second-think-end-absorbed"),
    pytest.param("", "<think>a<think>b</think>c", False, SplitReply("ab", "c", [], False),
                 id="think-inside-a-thought-absorbed"),
    pytest.param("", "Hi <think>there", False, SplitReply("", "Hi there", [], False),
                 id="think-after-the-answer-started-dropped"),
    pytest.param("", "<think>x</think>\n\n", False, SplitReply("x", "", [], False),
                 id="whitespace-only-answer-after-a-thought"),  # vLLM keeps "\n\n" as content
    pytest.param("", "a <", False, SplitReply("", "a <", [], False), id="lone-lt-at-the-end-is-text"),
    pytest.param("", "a <tool_c", False, SplitReply("", "a ", [], False), id="tag-prefix-at-the-end-dropped"),
    pytest.param("", "a </thi", False, SplitReply("", "a ", [], False), id="think-end-prefix-at-the-end-dropped"),
    pytest.param("", "x <toolbox> y", False, SplitReply("", "x <toolbox> y", [], False), id="tag-like-text-shown"),
    pytest.param("", "<think>a <b</think>c <", False, SplitReply("a <b", "c <", [], False),
                 id="lt-in-thought-and-answer"),
    pytest.param("\nLet me see.\n", "\n\nParis.", True, SplitReply("Let me see.", "Paris.", [], False),
                 id="server-reasoning-and-content"),
    pytest.param("x", "</think>Hello<think>", False, SplitReply("x", "Hello", [], False),
                 id="think-tags-in-content-absorbed-after-server-reasoning"),
    pytest.param("I'll check.\n" + WEATHER_XML, "", True, SplitReply("I'll check.", "", [WEATHER_CALL], False),
                 id="call-in-server-reasoning-is-run"),  # vllm#39056
    pytest.param("I'll check.\n" + WEATHER_XML + "\nthen answer", "It rains.", False,
                 SplitReply("I'll check.", "It rains.", [WEATHER_CALL], False), id="answer-after-reasoning-call-shown"),
    pytest.param("thinking", "\n\n" + WEATHER_XML, True, SplitReply("thinking", "", [WEATHER_CALL], False),
                 id="reasoning-then-call-in-content"),
    pytest.param("a <", "b", False, SplitReply("a <", "b", [], False), id="lone-lt-ending-the-reasoning"),
]


@pytest.mark.parametrize(("reasoning", "content", "in_thought", "expected"), SPLITS)
def test_reply_splitter_splits_a_whole_reply(reasoning: str, content: str, in_thought: bool,
                                             expected: SplitReply) -> None:
    assert split(whole(reasoning, content), in_thought=in_thought) == expected


@pytest.mark.parametrize(("reasoning", "content", "in_thought", "expected"), SPLITS)
def test_reply_splitter_splits_a_reply_streamed_one_character_at_a_time(
    reasoning: str, content: str, in_thought: bool, expected: SplitReply
) -> None:
    assert split(characters(reasoning, content), in_thought=in_thought) == expected


@pytest.mark.parametrize(
    ("pieces", "expected"),
    [
        pytest.param(["Let me think.\n</think>\n\nParis."], SplitReply("Let me think.", "Paris.", [], False),
                     id="whole"),
        pytest.param(["Let me ", "think.\n</think>\n\nParis."], SplitReply("think.", "Let me Paris.", [], False),
                     id="cut-before-the-tag"),
        pytest.param(["Let me think.\n", "</think>", "\n\nParis."], SplitReply("", "Let me think.\nParis.", [], False),
                     id="tag-alone"),
    ],
)
def test_a_think_end_without_thought_makes_the_text_not_yet_shown_thinking(pieces: list[str],
                                                                           expected: SplitReply) -> None:
    assert split([("", piece) for piece in pieces], in_thought=False) == expected


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
        pytest.param(["x <func", "tion=f>"], "x ", id="xml-call-split-into-tokens"),
    ],
)
def test_streamed_answer_shows_no_call_markup(pieces: list[str], expected: str) -> None:
    assert split([("", piece) for piece in pieces], in_thought=False).content == expected


def test_each_feed_returns_what_is_safe_to_show_at_once() -> None:
    splitter = ReplySplitter(SCHEMAS, in_thought=True)
    shown = [splitter.feed("", "Let me"), splitter.feed("", " see.\n<"), splitter.feed("", "/think>\n\nPar"),
             splitter.feed("", "is. <"), splitter.flush()]
    assert shown == [("Let me", ""), (" see.", ""), ("", "Par"), ("", "is. "), ("", "<")]


# --- vLLM 0.33's own cases

CALL_ENDS_THOUGHT = "the call that ends the thought is run; vLLM hands its text on as content, to its tool parser"
NEWLINES = "a thought is shown without its wrapping newlines, the answer after it without its leading ones"
BASH_CAT = FunctionCall("bash", {"command": "cat /etc/hosts"})
READ_FILE = SplitReply("I need to read the file.", "", [BASH_CAT], False)
LS_FILE = SplitReply("I need to read the file.", "", [FunctionCall("bash", {"cmd": "ls"})], False)
# Where our split of the raw text deliberately differs from what vLLM's server returns: (ours, why).
OUR_SPLITS: dict[str, tuple[SplitReply, str]] = {
    "tests/reasoning/test_qwen3_reasoning_parser.py::test_reasoning[tool_call_no_think_end]":
        (READ_FILE, CALL_ENDS_THOUGHT),
    "tests/reasoning/test_qwen3_reasoning_parser.py::test_reasoning[tool_call_no_think_end_stream]":
        (READ_FILE, CALL_ENDS_THOUGHT),
    "tests/reasoning/test_qwen3_reasoning_parser.py::test_reasoning[tool_call_with_think_no_end]":
        (READ_FILE, CALL_ENDS_THOUGHT),
    "tests/reasoning/test_qwen3_reasoning_parser.py::test_reasoning[tool_call_with_think_no_end_stream]":
        (READ_FILE, CALL_ENDS_THOUGHT),
    "tests/reasoning/test_qwen3_reasoning_parser.py::test_reasoning_streaming_multi_token_deltas"
    "[tool_call_implicit_reasoning_end]":
        (SplitReply("I need to read the file.", "", [FunctionCall("bash", {})], False), CALL_ENDS_THOUGHT),
    "tests/reasoning/test_qwen3_reasoning_parser.py::test_reasoning_thinking_disabled"
    "[thinking_disabled_with_tool_call]":
        (SplitReply("", "I need to read the file.\n\n", [BASH_CAT], False),
         "call markup is parsed, not shown; vLLM's reasoning parser alone leaves it to the tool parser"),
    "tests/parser/engine/test_qwen3_reasoning.py::TestNonStreaming::test_tool_call_implicit_end":
        (LS_FILE, CALL_ENDS_THOUGHT),
    "tests/parser/engine/test_qwen3_reasoning.py::TestNonStreaming::test_tool_call_implicit_end_no_think":
        (LS_FILE, CALL_ENDS_THOUGHT),
    "tests/parser/engine/test_qwen3_reasoning.py::TestNonStreaming::test_live_scenario_think_end_before_tool_call":
        (SplitReply("The user wants to see what files are in the current directory and their contents. Let me "
                    "start by listing the directory.", "", [FunctionCall("read", {"filePath": "/Users/test/demo"})],
                    False), "the call after </think> is parsed, not shown"),
    "tests/parser/engine/test_qwen3_reasoning.py::TestStreaming::test_streaming_tool_call_implicit_end":
        (SplitReply("I need to check.", "", [FunctionCall("test", {})], False), CALL_ENDS_THOUGHT),
    "tests/parser/engine/test_qwen3_reasoning.py::TestStreaming::test_streaming_content_after_tool_call":
        (SplitReply("thinking", "", [FunctionCall("f", {})], False), CALL_ENDS_THOUGHT),
    "tests/parser/engine/test_qwen3_reasoning.py::TestStreaming::test_streaming_think_end_and_tool_call_same_delta":
        (SplitReply("Let me list the directory.", "", [FunctionCall("read", {"filePath": "/tmp"})], False),
         "the call after </think> is parsed, not shown"),
    "tests/parser/engine/test_qwen3_reasoning.py::TestWhitespaceStrippingDisabled"
    "::test_non_streaming_preserves_trailing_newline":
        (SplitReply("Reasoning here.", "Content.", [], False), NEWLINES),
    "tests/parser/engine/test_qwen3_reasoning.py::TestWhitespaceStrippingDisabled"
    "::test_streaming_preserves_trailing_newlines":
        (SplitReply("thinking.", "done", [], False), NEWLINES),
    "tests/parser/test_streaming.py::test_engine_reasoning_no_tool_batched_holdback_not_dropped[newlines]":
        (SplitReply("let me think", "<b>bold</b> done", [], False), NEWLINES),
    "tests/parser/test_streaming.py::test_engine_reasoning_no_tool_holdback_finished_and_hidden_reasoning"
    "[newlines at the end]":
        (SplitReply("let me think", "", [], False), NEWLINES + ": a whitespace-only answer is no answer"),
}
# vLLM returns these as reasoning with no content; we also say the thought was cut off (no </think>, no call).
CUT_OFF_THOUGHTS = {
    *(f"tests/reasoning/test_qwen3_reasoning_parser.py::test_reasoning[{case_id}{suffix}]"
      for case_id in ("without_think", "only_open_tag", "truncated_no_start_token") for suffix in ("", "_stream")),
    "tests/parser/engine/test_qwen3_reasoning.py::TestNonStreaming::test_no_end_tag_all_reasoning",
    "tests/parser/engine/test_qwen3_reasoning.py::TestStreaming::test_streaming_pure_content_no_think",
}


def assert_matches(actual: str, expected: Expected) -> None:
    """Our text against what vLLM's test asserts: its null is our "", a Contains is checked in part."""
    if isinstance(expected, Contains):
        assert ([part for part in expected.parts if part not in actual],
                [part for part in expected.absent if part in actual]) == ([], [])
    else:
        assert actual == (expected or "")


def raw_splits(chunks: tuple[str, ...], in_thought: bool, schemas: Mapping[str, dict[str, Any]]) -> SplitReply:
    """A parser-less server's reply split whole, in vLLM's chunks and one character at a time: always the same."""
    text = "".join(chunks)
    replies = [split(pieces, in_thought=in_thought, schemas=schemas)
               for pieces in (whole("", text), [("", chunk) for chunk in chunks], characters("", text))]
    assert replies[1:] == replies[:1] * 2
    return replies[0]


@pytest.mark.parametrize("case", REASONING_CASES, ids=lambda case: case.test)
def test_vllm_reasoning_cases_split_as_vllm_splits_them(case: ReasoningCase) -> None:
    reply = raw_splits(case.chunks, case.thinking, SCHEMAS)
    if case.test in OUR_SPLITS:
        assert reply == OUR_SPLITS[case.test][0]
        return
    assert_matches(reply.reasoning, case.reasoning)
    assert_matches(reply.content, case.content)
    assert (reply.calls, reply.thought_open) == ([], case.test in CUT_OFF_THOUGHTS)


@pytest.mark.parametrize("case", [case for case in REASONING_CASES if not isinstance(case.reasoning, Contains)
                                  and not isinstance(case.content, Contains)], ids=lambda case: case.test)
def test_vllm_reasoning_split_by_the_server_reads_as_the_raw_text(case: ReasoningCase) -> None:
    """A server with `--reasoning-parser qwen3` sends vLLM's split; we end with the split we make of the raw text
    (only a cut-off thought goes unnoticed: the server's reasoning gives no sign of it)."""
    ours = raw_splits(case.chunks, case.thinking, SCHEMAS)
    for pieces in whole(case.reasoning or "", case.content or ""), characters(case.reasoning or "", case.content or ""):
        reply = split(pieces, in_thought=case.thinking)
        assert (reply.reasoning, reply.content, reply.calls) == (ours.reasoning, ours.content, ours.calls)


def checked_calls(calls: list[FunctionCall], case: ToolCase) -> tuple[Call, ...]:
    """Our calls as vLLM's test sees them: the ones it checks, with arguments only where it checks them."""
    ours = [Call(call.name, call.arguments) for call in calls]
    if case.calls_checked == "last":
        ours = ours[len(ours) - len(case.calls):]
    elif case.calls_checked == "some":
        ours = [call for call in ours if call.name in {expected.name for expected in case.calls}]
    if len(ours) != len(case.calls):
        return tuple(ours)
    return tuple(Call(call.name, None if expected.arguments is None else call.arguments)
                 for call, expected in zip(ours, case.calls, strict=True))


@pytest.mark.parametrize("case", TOOL_CASES, ids=lambda case: case.test)
def test_vllm_tool_cases_give_the_calls_vllm_gives(case: ToolCase) -> None:
    reply = raw_splits(case.chunks, case.reasoning_parser is not None, case.tools)
    assert checked_calls(reply.calls, case) == case.calls
    assert all(call.error is None for call in reply.calls if call.name in {expected.name for expected in case.calls})
    assert_matches(reply.content, case.content)
    assert_matches(reply.reasoning, case.reasoning)


@pytest.mark.parametrize("case", [case for case in TOOL_CASES if case.reasoning_parser is None],
                         ids=lambda case: case.test)
def test_vllm_tool_cases_parse_alike_through_the_splitter_and_alone(case: ToolCase) -> None:
    reply = raw_splits(case.chunks, False, case.tools)
    assert parse_tool_calls("".join(case.chunks), case.tools) == (reply.content, reply.calls)


# --- Properties

WHOLE_REPLIES = (
    [(reasoning, content, in_thought, SCHEMAS) for reasoning, content, in_thought, _ in
     (param.values for param in SPLITS)]
    + [("", "".join(case.chunks), case.thinking, SCHEMAS) for case in REASONING_CASES]
    + [("", "".join(case.chunks), case.reasoning_parser is not None, case.tools) for case in TOOL_CASES]
)


@settings(max_examples=400, deadline=1000)
@given(reply=st.sampled_from(WHOLE_REPLIES), reasoning_cuts=st.lists(st.integers(0, 300), max_size=8),
       content_cuts=st.lists(st.integers(0, 300), max_size=12))
def test_a_reply_streamed_in_any_pieces_splits_as_the_whole_reply(
    reply: tuple[str, str, bool, Mapping[str, dict[str, Any]]], reasoning_cuts: list[int], content_cuts: list[int]
) -> None:
    reasoning, content, in_thought, schemas = reply
    pieces = ([(piece, "") for piece in cut(reasoning, reasoning_cuts)]
              + [("", piece) for piece in cut(content, content_cuts)])
    assert split(pieces, in_thought=in_thought, schemas=schemas) == split(whole(reasoning, content),
                                                                          in_thought=in_thought, schemas=schemas)


TEXTS = st.lists(st.sampled_from([*"ab <>/_{}\"\n", "<tool_call>", "</tool_call>", "<tool"])).map("".join)


@settings(max_examples=300, deadline=1000)
@given(text=TEXTS, cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=10))
def test_streamed_text_never_shows_markup_and_matches_the_parse(text: str, cuts: list[int]) -> None:
    """However the text is split into tokens, the answer shown is the parser's content (no markup)."""
    shown = split([("", piece) for piece in cut(text, cuts)], in_thought=False).content
    content = parse_tool_calls(text, SCHEMAS)[0]
    held_back = content[len(shown):]
    assert [tag for tag in TAGS if tag in shown] == []
    assert content.startswith(shown)
    assert held_back == "" or any(tag.startswith(held_back) for tag in TAGS)


@settings(max_examples=300, deadline=1000)
@given(text=st.text())
def test_parser_never_raises(text: str) -> None:
    content, calls = parse_tool_calls(f"<tool_call>{text}</tool_call>", SCHEMAS)
    assert content == ""
    assert all(isinstance(call, FunctionCall) and isinstance(call.arguments, dict) for call in calls)


MARKUP = st.lists(st.sampled_from([*TAGS, "</tool_call>", "</function>", "<parameter=city>", "</parameter>", ">",
                                   "<", "{", '"name": "x"', "}", "[", "\n", "a", "null", "1"])).map("".join)


@settings(max_examples=300, deadline=1000)
@given(reasoning=MARKUP, content=MARKUP, in_thought=st.booleans(), cuts=st.lists(st.integers(0, 200), max_size=8))
def test_the_splitter_takes_any_markup_without_showing_a_tag(reasoning: str, content: str, in_thought: bool,
                                                             cuts: list[int]) -> None:
    pieces = [(piece, "") for piece in cut(reasoning, cuts)] + [("", piece) for piece in cut(content, cuts)]
    reply = split(pieces, in_thought=in_thought)
    assert [tag for tag in TAGS if tag in reply.reasoning + reply.content] == []


@pytest.mark.parametrize(
    "content",
    [
        pytest.param("<tool_call>" + '{"name": "x", "arguments": ' + '{"a": ' * 20_000, id="deep-json"),
        pytest.param("<tool_call>\n<function=f>\n<parameter=a>\n" + "[" * 20_000 + "\n</parameter>", id="deep-value"),
        pytest.param("<tool_call>" + '{"name": "x", "arguments": {"a": "' + "x" * 1_000_000 + '"}}', id="huge-json"),
        pytest.param("<tool_call>\n<function=f>\n" + "<parameter=" * 100_000, id="unclosed-parameters"),
        pytest.param("<function=" * 100_000, id="unclosed-functions"),
        pytest.param("<tool_call>{" * 50_000, id="unclosed-blocks"),
        pytest.param('<tool_call>{"' * 50_000, id="unclosed-strings"),
        pytest.param('<tool_call>{"a": "<tool_call>' * 30_000, id="tags-in-strings"),
        pytest.param("<tool_call>" + '{"name": "x"}' * 50_000, id="many-objects-in-a-block"),
        pytest.param("<think>" * 100_000 + "</think>" * 100_000 + "<", id="think-tags"),
        pytest.param("<" * 100_000, id="lts"),
    ],
)
def test_hostile_replies_are_split_without_raising(content: str) -> None:
    reply = split(characters("", content[:2_000]) + whole("", content[2_000:]), in_thought=True)
    assert [tag for tag in TAGS if tag in reply.reasoning + reply.content] == []

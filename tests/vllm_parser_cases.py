"""vLLM 0.33.0's own test cases for its `qwen3` reasoning parser and `qwen3_coder` tool parser, as plain data.

Transcribed from the 0.33.0 sdist (/work/ref/vllm-0.33.0): each case is named `path::test[param]` after the test it
comes from, and holds the model's text and what that test asserts, no more. Where the test checks only a part, the
expected value is a `Contains`, call arguments it does not check are `None`, and `calls_checked` says which calls
it checks. These are facts about vLLM, for any code that plays or reads it; nothing here knows our parser.

`chunks` are the pieces the test feeds, one piece for the whole output when it tokenizes the text itself. Content
and reasoning are `None` where vLLM returns null; tests that collect streamed text get "" instead.
"""

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(frozen=True)
class Contains:
    """An expected text the test checks only in part: it holds every one of `parts` and none of `absent`."""

    parts: tuple[str, ...] = ()
    absent: tuple[str, ...] = ()


Expected = str | Contains | None


@dataclass(frozen=True)
class ReasoningCase:
    """The `qwen3` reasoning parser alone: the model's text in `chunks` -> (reasoning, content)."""

    test: str
    chunks: tuple[str, ...]
    reasoning: Expected
    content: Expected
    thinking: bool = True  # chat_template_kwargs.enable_thinking; off, the parser starts in content
    streamed: bool = False  # the test streams the text (token by token when `chunks` is one piece)


@dataclass(frozen=True)
class Call:
    """An expected tool call; `arguments` are compared after json.loads, `None` when the test checks only the name."""

    name: str
    arguments: dict[str, Any] | None


@dataclass(frozen=True)
class ToolCase:
    """A tool parser (with the reasoning parser when `reasoning_parser` is set) on the model's text in `chunks`."""

    test: str
    chunks: tuple[str, ...]
    calls: tuple[Call, ...]
    content: Expected
    tools: dict[str, dict[str, Any]] = field(default_factory=dict)  # tool name -> its `parameters` schema
    calls_checked: Literal["all", "last", "some"] = "all"  # exactly these, in order / the last ones / among them
    tool_parser: Literal["qwen3_coder", "hermes"] = "qwen3_coder"
    reasoning_parser: Literal["qwen3"] | None = None
    reasoning: Expected = None
    streamed: bool = False


# --- tests/reasoning/test_qwen3_reasoning_parser.py (tokenizers of Qwen3-0.6B, Qwen3.5-397B-A17B and
# Qwen3-4B-Thinking-2507)

REASONING_TEST = "tests/reasoning/test_qwen3_reasoning_parser.py"
TOOL_CALL_BODY = (
    "<tool_call>\n<function=bash>\n<parameter=command>"
    "\ncat /etc/hosts\n</parameter>\n</function>\n</tool_call>"
)
REASONING_OUTPUTS = {
    # id: (output, reasoning, content)
    "without_start_token": ("This is a reasoning section</think>This is the rest", "This is a reasoning section",
                            "This is the rest"),
    "without_start_token_complete_reasoning": ("This is a reasoning section</think>", "This is a reasoning section",
                                               None),
    "with_think": ("<think>This is a reasoning section</think>This is the rest", "This is a reasoning section",
                   "This is the rest"),
    "without_think": ("This is the rest", "This is the rest", None),
    "complete_reasoning": ("<think>This is a reasoning section</think>", "This is a reasoning section", None),
    "multiline_reasoning": ("<think>This is a reasoning\nsection</think>This is the rest\nThat",
                            "This is a reasoning\nsection", "This is the rest\nThat"),
    "only_open_tag": ("<think>This is a reasoning section", "This is a reasoning section", None),
    "truncated_no_start_token": ("This is a reasoning section", "This is a reasoning section", None),
    "tool_call_no_think_end": ("I need to read the file.\n\n" + TOOL_CALL_BODY, "I need to read the file.\n\n",
                               TOOL_CALL_BODY),
    "tool_call_with_think_no_end": ("<think>I need to read the file.\n\n" + TOOL_CALL_BODY,
                                    "I need to read the file.\n\n", TOOL_CALL_BODY),
}
REASONING_PARSER_CASES = [
    ReasoningCase(f"{REASONING_TEST}::test_reasoning[{case_id}{suffix}]", (output,), reasoning, content,
                  streamed=bool(suffix))
    for case_id, (output, reasoning, content) in REASONING_OUTPUTS.items()
    for suffix in ("", "_stream")
] + [
    ReasoningCase(f"{REASONING_TEST}::test_reasoning_streaming_multi_token_deltas[{case_id}]", chunks, reasoning,
                  content, streamed=True)
    for case_id, chunks, reasoning, content in [
        ("start_token_grouped_with_text", ("<think>This is a reasoning section", "</think>", "This is the rest"),
         "This is a reasoning section", "This is the rest"),
        ("end_token_grouped_with_content", ("reasoning section", "</think>This is the rest"), "reasoning section",
         "This is the rest"),
        ("start_and_end_in_one_delta_no_content", ("<think>reasoning</think>",), "reasoning", None),
        ("no_start_end_grouped_with_content", ("reasoning section", "</think>content"), "reasoning section",
         "content"),
        ("tool_call_implicit_reasoning_end", ("I need to read the file.\n\n", "<tool_call>\n<function=bash>"),
         "I need to read the file.\n\n", "<tool_call>\n<function=bash>"),
    ]
] + [
    ReasoningCase(f"{REASONING_TEST}::test_reasoning_thinking_disabled[{case_id}]", (output,), None, output,
                  thinking=False)
    for case_id, output in [
        ("thinking_disabled_plain_content", "This is plain content"),
        ("thinking_disabled_no_think_tokens", "Some output without think tokens"),
        ("thinking_disabled_with_tool_call", "I need to read the file.\n\n" + TOOL_CALL_BODY),
    ]
]

# --- tests/parser/engine/test_qwen3_reasoning.py (Qwen3Parser, mock tokenizer, default config: thinking on)

ENGINE_REASONING_TEST = "tests/parser/engine/test_qwen3_reasoning.py"
ENGINE_REASONING_CASES = [
    ReasoningCase(f"{ENGINE_REASONING_TEST}::{test}", chunks, reasoning, content)
    for test, chunks, reasoning, content in [
        ("TestNonStreaming::test_reasoning_then_content", ("<think>Let me analyze.</think>The answer is 42.",),
         "Let me analyze.", "The answer is 42."),
        ("TestNonStreaming::test_no_start_token_in_output", ("Let me think about this.</think>The answer is 42.",),
         "Let me think about this.", "The answer is 42."),
        ("TestNonStreaming::test_reasoning_only", ("<think>Still thinking...</think>",), "Still thinking...", None),
        ("TestNonStreaming::test_no_end_tag_all_reasoning", ("Hello, no reasoning here.",),
         "Hello, no reasoning here.", None),
        ("TestNonStreaming::test_multiline_reasoning",
         ("<think>Step 1: parse.\nStep 2: compute.\nStep 3: output.</think>Result: 7.",),
         Contains(("Step 1", "Step 3")), "Result: 7."),
        ("TestNonStreaming::test_tool_call_implicit_end",
         ("<think>I need to read the file.\n\n<tool_call>\n<function=bash>\n<parameter=cmd>ls</parameter>\n"
          "</function>\n</tool_call>",),
         "I need to read the file.\n\n", Contains()),
        ("TestNonStreaming::test_tool_call_implicit_end_no_think",
         ("I need to read the file.\n\n<tool_call>\n<function=bash>\n<parameter=cmd>ls</parameter>\n"
          "</function>\n</tool_call>",),
         "I need to read the file.\n\n", Contains()),
        ("TestNonStreaming::test_live_scenario_think_end_before_tool_call",
         ("The user wants to see what files are in the current directory and their contents. Let me start by "
          "listing the directory.</think><tool_call><function=read><parameter=filePath>/Users/test/demo"
          "</parameter></function></tool_call>",),
         "The user wants to see what files are in the current directory and their contents. Let me start by "
         "listing the directory.", Contains()),
        ("TestNonStreaming::test_no_terminal_text_in_reasoning", ("Reasoning here.</think>Content here.",),
         Contains(absent=("</think>", "<think>")), Contains()),
        ("TestNonStreaming::test_no_terminal_text_in_content", ("Reasoning here.</think>Content here.",),
         Contains(), Contains(absent=("</think>", "<think>"))),
        ("TestNonStreaming::test_duplicate_think_end_absorbed",
         ("Reasoning here.</think>Content here.</think>More content.",), "Reasoning here.",
         "Content here.More content."),
        ("TestWhitespaceStrippingDisabled::test_non_streaming_preserves_trailing_newline",
         ("Reasoning here.\n</think>Content.",), "Reasoning here.\n", "Content."),
    ]
] + [
    ReasoningCase(f"{ENGINE_REASONING_TEST}::{test}", chunks, reasoning, content, streamed=True)
    for test, chunks, reasoning, content in [
        ("TestStreaming::test_basic_streaming", ("<think>", "thinking", " hard", "</think>", "done"),
         "thinking hard", "done"),
        ("TestStreaming::test_streaming_no_start_token", ("reasoning ", "text", "</think>", "content"),
         "reasoning text", "content"),
        ("TestStreaming::test_streaming_start_token_stripped", ("<think>reasoning", "</think>", "content"),
         "reasoning", "content"),
        ("TestStreaming::test_streaming_tool_call_implicit_end",
         ("I need to check.", "<tool_call>", "\n<function=test>"), "I need to check.", Contains()),
        ("TestStreaming::test_streaming_content_after_think_end", ("reasoning", "</think>", "content1", " content2"),
         "reasoning", "content1 content2"),
        ("TestStreaming::test_streaming_content_after_tool_call", ("thinking", "<tool_call>", "<function=f>"),
         "thinking", Contains()),
        ("TestStreaming::test_streaming_end_grouped_with_content", ("reasoning", "</think>the answer"), "reasoning",
         "the answer"),
        ("TestStreaming::test_streaming_think_and_end_in_one_delta", ("<think>reasoning</think>",), "reasoning",
         ""),
        ("TestStreaming::test_streaming_pure_content_no_think", ("hello ", "world"), "hello world", ""),
        ("TestStreaming::test_streaming_think_end_and_tool_call_same_delta",
         ("Let me list the directory.", "</think><tool_call>", "<function=read>",
          "<parameter=filePath>/tmp</parameter>"),
         "Let me list the directory.", Contains()),
        ("TestStreaming::test_streaming_no_terminal_text_leaks", ("reasoning", "</think>", "content"),
         Contains(absent=("<think>", "</think>")), Contains(absent=("</think>",))),
        ("TestStreaming::test_streaming_duplicate_think_end_absorbed",
         ("reasoning", "</think>", "content", "</think>", "more"), "reasoning", "contentmore"),
        ("TestWhitespaceStrippingDisabled::test_streaming_preserves_trailing_newlines",
         ("thinking.\n", "\n", "</think>", "done"), "thinking.\n\n", "done"),
    ]
] + [
    ReasoningCase(f"{ENGINE_REASONING_TEST}::TestThinkingDisabled::test_thinking_disabled_streaming_content_only",
                  ("The answer", " is 42."), "", "The answer is 42.", thinking=False, streamed=True),
    ReasoningCase(f"{ENGINE_REASONING_TEST}::TestThinkingDisabled::test_thinking_disabled_non_streaming",
                  ("The answer is 42.",), None, "The answer is 42.", thinking=False),
]

# --- tests/parser/test_streaming.py: the qwen3 engine reasoning parser with no tool parser (tokenizer Qwen3-32B)

STREAMING_TEST = "tests/parser/test_streaming.py"
HOLDBACK_CASES = [
    ReasoningCase(f"{STREAMING_TEST}::{test}", chunks, reasoning, content, streamed=True)
    for test, chunks, reasoning, content in [
        ("test_engine_reasoning_no_tool_batched_content_passthrough",
         ("<think>let me think about this", "</think>The answer is 42."),
         Contains(("let me think about this",), ("</think>",)), "The answer is 42."),
        ("test_engine_reasoning_no_tool_batched_holdback_not_dropped[a <]", ("<think>let me think</think>a <", "x> b"),
         "let me think", "a <x> b"),
        ("test_engine_reasoning_no_tool_batched_holdback_not_dropped[newlines]",
         ("<think>let me think</think>\n\n", "<b>bold</b> done"), "let me think", "\n\n<b>bold</b> done"),
        ("test_engine_reasoning_no_tool_batched_holdback_not_dropped[held lt]",
         ("<think>let me think", "</think><", "b>bold</b> done"), "let me think", "<b>bold</b> done"),
        ("test_engine_reasoning_no_tool_holdback_finished_and_hidden_reasoning[lt at the end]",
         ("<think>let me think</think>a <",), "let me think", "a <"),
        ("test_engine_reasoning_no_tool_holdback_finished_and_hidden_reasoning[newlines at the end]",
         ("<think>let me think</think>\n\n",), "let me think", "\n\n"),
    ]
]

REASONING_CASES = REASONING_PARSER_CASES + ENGINE_REASONING_CASES + HOLDBACK_CASES

# --- tests/tool_parsers/test_qwen3coder_tool_parser.py (Qwen3EngineToolParser, tokenizer Qwen3-Coder-30B-A3B)

CODER_TEST = "tests/tool_parsers/test_qwen3coder_tool_parser.py"
WEATHER_PARAMS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "description": "The city name"},
        "state": {"type": "string", "description": "The state code"},
        "unit": {"type": "string", "enum": ["fahrenheit", "celsius"]},
    },
    "required": ["city", "state"],
}
AREA_PARAMS = {
    "type": "object",
    "properties": {"shape": {"type": "string"}, "dimensions": {"type": "object"}, "precision": {"type": "integer"}},
}
SAMPLE_TOOLS = {"get_current_weather": WEATHER_PARAMS, "calculate_area": AREA_PARAMS}


def weather_block(city: str, state: str, unit: str) -> str:
    """The test file's weather call, as its triple-quoted strings write it."""
    return (f"<tool_call>\n<function=get_current_weather>\n<parameter=city>\n{city}\n</parameter>\n"
            f"<parameter=state>\n{state}\n</parameter>\n<parameter=unit>\n{unit}\n</parameter>\n</function>\n"
            "</tool_call>")


def area_block(shape: str, dimensions: str, precision: str) -> str:
    """The test file's area call."""
    return (f"<tool_call>\n<function=calculate_area>\n<parameter=shape>\n{shape}\n</parameter>\n"
            f"<parameter=dimensions>\n{dimensions}\n</parameter>\n<parameter=precision>\n{precision}\n</parameter>\n"
            "</function>\n</tool_call>")


DALLAS = Call("get_current_weather", {"city": "Dallas", "state": "TX", "unit": "fahrenheit"})
DALLAS_TX = Call("get_current_weather", {"city": "Dallas", "state": "TX"})
RECTANGLE = Call("calculate_area", {"shape": "rectangle", "dimensions": {"width": 10, "height": 20}, "precision": 2})
CIRCLE = Call("calculate_area", {"shape": "circle", "dimensions": {"radius": 15.5}, "precision": 3})
WITH_CONTENT = "Sure! Let me check the weather for you."
AREA_CONTENT = "Let me calculate that area for you."
EXTRACT_OUTPUTS = {
    # id: (output, calls, non-streaming content)
    "single_tool": (weather_block("Dallas", "TX", "fahrenheit"), (DALLAS,), None),
    "single_tool_with_content": (WITH_CONTENT + weather_block("Dallas", "TX", "fahrenheit"), (DALLAS,), WITH_CONTENT),
    "single_tool_multiline_param": (area_block("rectangle", '{"width": 10, \n "height": 20}', "2"), (RECTANGLE,),
                                    None),
    "parallel_tools": (
        weather_block("Dallas", "TX", "fahrenheit") + "\n" + weather_block("Orlando", "FL", "fahrenheit"),
        (DALLAS, Call("get_current_weather", {"city": "Orlando", "state": "FL", "unit": "fahrenheit"})), None),
    "tool_with_typed_params": (AREA_CONTENT + area_block("circle", '{"radius": 15.5}', "3"), (CIRCLE,), AREA_CONTENT),
}
MISSING_CLOSING_PARAMETER = (
    "Let me check the weather for you:\n<tool_call>\n<function=get_current_weather>\n<parameter=city>\nDallas\n"
    "<parameter=state>\nTX\n</parameter>\n<parameter=unit>\nfahrenheit\n</parameter>\n</function>\n</tool_call>"
)
TYPE_CONVERSION_TOOLS = {"test_types": {"type": "object", "properties": {
    "int_param": {"type": "integer"}, "float_param": {"type": "float"}, "bool_param": {"type": "boolean"},
    "str_param": {"type": "string"}, "obj_param": {"type": "object"}}}}
ANYOF_TOOLS = {"test_anyof": {"type": "object", "properties": {
    "anyof_int": {"anyOf": [{"type": "integer"}, {"type": "null"}], "default": 5},
    "anyof_str": {"anyOf": [{"type": "string"}, {"type": "null"}]},
    "anyof_array": {"anyOf": [{"type": "array", "items": {"type": "string"}}, {"type": "null"}]},
    "anyof_obj": {"anyOf": [{"type": "object"}, {"type": "null"}]},
    "type_as_array": {"type": ["integer", "null"]},
    "multi_non_null": {"anyOf": [{"type": "string"}, {"type": "integer"}, {"type": "null"}]}}}}
SEARCH_WEB_TOOLS = {"search_web": {"type": "object", "properties": {
    "query": {"anyOf": [{"type": "string"}, {"type": "null"}]},
    "count": {"anyOf": [{"type": "integer"}, {"type": "null"}], "default": 5},
    "verbose": {"anyOf": [{"type": "boolean"}, {"type": "null"}]}}}}
UPDATE_RECORD_TOOLS = {"update_record": {"type": "object", "properties": {
    "data": {"anyOf": [{"type": "object"}, {"type": "null"}]}}}}
GREET_TOOLS = {"greet": {"type": "object", "properties": {"message": {"type": "string"}}}}
WRITE_FILE_TOOLS = {"write_file": {"type": "object", "properties": {"content": {"type": "string"}}}}
WRITE_FILE_OUTPUT = (
    "<tool_call>\n<function=write_file>\n<parameter=content>\n    def foo():\n        return 1\n\n"
    "</parameter>\n</function>\n</tool_call>"
)

CODER_CASES = [
    ToolCase(f"{CODER_TEST}::test_extract_tool_calls_no_tools", ("This is a test response without any tool calls",),
             (), "This is a test response without any tool calls", SAMPLE_TOOLS),
] + [
    ToolCase(f"{CODER_TEST}::test_extract_tool_calls[{case_id}]", (output,), calls, content, SAMPLE_TOOLS)
    for case_id, (output, calls, content) in EXTRACT_OUTPUTS.items()
] + [
    ToolCase(f"{CODER_TEST}::test_extract_tool_calls_streaming[{case_id}]", (output,), calls, content or "",
             SAMPLE_TOOLS, streamed=True)
    for case_id, (output, calls, content) in [
        ("no_tools", ("This is a test without tools", (), "This is a test without tools")),
        *(item for item in EXTRACT_OUTPUTS.items() if item[0] != "parallel_tools"),
        ("parallel_tools", (weather_block("Dallas", "TX", "fahrenheit") + "\n"
                            + weather_block("Orlando", "FL", "celsius"),
                            (DALLAS, Call("get_current_weather", {"city": "Orlando", "state": "FL",
                                                                  "unit": "celsius"})), None)),
    ]
] + [
    ToolCase(f"{CODER_TEST}::test_extract_tool_calls_fallback_no_tags",
             ("<function=get_current_weather>\n<parameter=city>\nDallas\n</parameter>\n<parameter=state>\nTX\n"
              "</parameter>\n</function>",),
             (Call("get_current_weather", None),), Contains(), SAMPLE_TOOLS),
    ToolCase(f"{CODER_TEST}::test_extract_tool_calls_type_conversion",
             ("<tool_call>\n<function=test_types>\n<parameter=int_param>\n42\n</parameter>\n<parameter=float_param>\n"
              "3.14\n</parameter>\n<parameter=bool_param>\ntrue\n</parameter>\n<parameter=str_param>\nhello world\n"
              '</parameter>\n<parameter=obj_param>\n{"key": "value"}\n</parameter>\n</function>\n</tool_call>',),
             (Call("test_types", {"int_param": 42, "float_param": 3.14, "bool_param": True, "str_param": "hello world",
                                  "obj_param": {"key": "value"}}),),
             Contains(), TYPE_CONVERSION_TOOLS),
    ToolCase(f"{CODER_TEST}::test_extract_tool_calls_anyof_type_conversion",
             ("<tool_call>\n<function=test_anyof>\n<parameter=anyof_int>\n5\n</parameter>\n<parameter=anyof_str>\n"
              'hello\n</parameter>\n<parameter=anyof_array>\n["a", "b", "c"]\n</parameter>\n<parameter=anyof_obj>\n'
              '{"key": "value"}\n</parameter>\n<parameter=type_as_array>\n42\n</parameter>\n'
              "<parameter=multi_non_null>\nsome text\n</parameter>\n</function>\n</tool_call>",),
             (Call("test_anyof", {"anyof_int": 5, "anyof_str": "hello", "anyof_array": ["a", "b", "c"],
                                  "anyof_obj": {"key": "value"}, "type_as_array": 42,
                                  "multi_non_null": "some text"}),),
             Contains(), ANYOF_TOOLS),
    ToolCase(f"{CODER_TEST}::test_extract_tool_calls_anyof_type_conversion_streaming",
             ("<tool_call>\n<function=search_web>\n<parameter=query>\nvllm tool parser\n</parameter>\n"
              "<parameter=count>\n10\n</parameter>\n<parameter=verbose>\ntrue\n</parameter>\n</function>\n"
              "</tool_call>",),
             (Call("search_web", {"query": "vllm tool parser", "count": 10, "verbose": True}),), Contains(),
             SEARCH_WEB_TOOLS, streamed=True),
    ToolCase(f"{CODER_TEST}::test_extract_tool_calls_missing_closing_parameter_tag", (MISSING_CLOSING_PARAMETER,),
             (DALLAS,), Contains(("Let me check the weather for you:",)), SAMPLE_TOOLS),
    ToolCase(f"{CODER_TEST}::test_extract_tool_calls_streaming_missing_closing_tag", (MISSING_CLOSING_PARAMETER,),
             (DALLAS,), Contains(("Let me check the weather for you:",)), SAMPLE_TOOLS, streamed=True),
    ToolCase(f"{CODER_TEST}::test_extract_tool_calls_streaming_incremental",
             ("I'll check the weather.<tool_call>\n<function=get_current_weather>\n<parameter=city>\nDallas\n"
              "</parameter>\n<parameter=state>\nTX\n</parameter>\n</function>\n</tool_call>",),
             (DALLAS_TX,), Contains(), SAMPLE_TOOLS, streamed=True),
    ToolCase(f"{CODER_TEST}::test_extract_tool_calls_streaming_missing_opening_tag",
             ("I'll check the weather for you.\n\n<function=get_current_weather>\n<parameter=city>\nDallas\n"
              "</parameter>\n<parameter=state>\nTX\n</parameter>\n<parameter=unit>\nfahrenheit\n</parameter>\n"
              "</function>\n</tool_call>",),
             (DALLAS,), Contains(("I'll check the weather for you.",)), SAMPLE_TOOLS, streamed=True),
    ToolCase(f"{CODER_TEST}::test_malformed_xml_no_gt_delimiter",
             ("<tool_call>\n<function=get_current_weather\n<parameter=city>Dallas</parameter>\n</function>\n"
              "</tool_call>",),
             (), Contains(), SAMPLE_TOOLS, calls_checked="some"),
    ToolCase(f"{CODER_TEST}::test_none_tool_calls_filtered",
             ("<tool_call>\n<function=bad_func_no_gt\n</function>\n</tool_call>\n<tool_call>\n"
              "<function=get_current_weather>\n<parameter=city>Dallas</parameter>\n<parameter=state>TX</parameter>\n"
              "</function>\n</tool_call>",),
             (DALLAS_TX,), Contains(), SAMPLE_TOOLS, calls_checked="some"),
    ToolCase(f"{CODER_TEST}::test_anyof_parameter_not_double_encoded",
             ('<tool_call>\n<function=update_record>\n<parameter=data>{"key": "value", "count": 42}</parameter>\n'
              "</function>\n</tool_call>",),
             (Call("update_record", {"data": {"key": "value", "count": 42}}),), Contains(), UPDATE_RECORD_TOOLS),
    ToolCase(f"{CODER_TEST}::test_streaming_multi_param_single_chunk",
             ("<tool_call>", "\n<function=get_current_weather>", "\n",
              "<parameter=city>\nDallas\n</parameter>\n<parameter=state>\nTX\n</parameter>\n<parameter=unit>\n"
              "fahrenheit\n</parameter>", "\n</function>", "\n</tool_call>"),
             (DALLAS,), Contains(), SAMPLE_TOOLS, streamed=True),
    ToolCase(f"{CODER_TEST}::test_streaming_complete_tool_call_single_delta",
             ("<tool_call>\n<function=get_current_weather>\n<parameter=city>\nDallas\n</parameter>\n"
              "<parameter=state>\nTX\n</parameter>\n</function>\n</tool_call>",),
             (DALLAS_TX,), Contains(), SAMPLE_TOOLS, streamed=True),
    ToolCase(f"{CODER_TEST}::test_streaming_next_tool_call_starts_in_close_delta",
             ("<tool_call>\n", "<function=get_current_weather>\n", "<parameter=city>\nDallas\n</parameter>\n",
              "<parameter=state>\nTX\n</parameter>\n", "</function>",
              "\n</tool_call>\n<tool_call>\n<function=get_current_weather>\n<parameter=city>\nOrlando\n</parameter>\n"
              "<parameter=state>\nFL\n</parameter>\n</function>\n</tool_call>"),
             (DALLAS_TX, Call("get_current_weather", {"city": "Orlando", "state": "FL"})), Contains(), SAMPLE_TOOLS,
             streamed=True),
    ToolCase(f"{CODER_TEST}::test_no_double_serialization_string_args",
             ("<tool_call>\n<function=greet>\n<parameter=message>hello world</parameter>\n</function>\n</tool_call>",),
             (Call("greet", {"message": "hello world"}),), Contains(), GREET_TOOLS),
    ToolCase(f"{CODER_TEST}::TestParameterWhitespace::test_whitespace_preserved", (WRITE_FILE_OUTPUT,),
             (Call("write_file", {"content": "    def foo():\n        return 1\n"}),), Contains(), WRITE_FILE_TOOLS),
    ToolCase(f"{CODER_TEST}::TestParameterWhitespace::test_whitespace_preserved_streaming", (WRITE_FILE_OUTPUT,),
             (Call("write_file", {"content": "    def foo():\n        return 1\n"}),), Contains(), WRITE_FILE_TOOLS,
             streamed=True),
]

# --- tests/parser/engine/test_qwen3.py (ParserEngine with qwen3_config(thinking=False), mock tokenizer, no tools
# unless the class defines them)

ENGINE_TEST = "tests/parser/engine/test_qwen3.py"
TOKYO = Call("get_weather", {"city": "Tokyo"})
ISSUE_58227 = (
    "Use <tool_call>\n{unclosed}\nWait, let me call the real tool via <tool_call>:\n<tool_call>\n"
    "<function=get_weather>\n<parameter=city>Tokyo</parameter>\n</function>\n</tool_call>"
)
TASK_TOOLS = {"TaskUpdate": {"type": "object", "properties": {
    "taskId": {"type": "string"}, "count": {"type": "integer"}, "ratio": {"type": "number"},
    "flag": {"type": "string"}}}}
SET_CONFIG_TOOLS = {"set_config": {"type": "object", "properties": {
    "port": {"anyOf": [{"type": "string"}, {"type": "null"}]}, "count": {"type": "integer"}}}}
CONFIGURE_TOOLS = {"configure": {"type": "object", "properties": {
    "enabled": {"type": "boolean"}, "ratio": {"type": "number"}, "count": {"type": "integer"},
    "value": {"type": ["integer", "null"]}, "label": {"type": "string"}}}}
SEARCH_TOOLS = {
    "search": {"type": "object", "properties": {
        "query": {"type": "string"},
        "filters": {"type": "object", "properties": {"language": {"type": "string"},
                                                     "min_stars": {"type": "integer"}}},
        "tags": {"type": "array", "items": {"type": "string"}},
        "limits": {"type": "array", "items": {"type": "integer"}},
        "verbose": {"type": "boolean"}}},
    "AskUserQuestion": {"type": "object", "properties": {"questions": {"type": "array", "items": {
        "type": "object", "properties": {"question": {"type": "string"}, "multiSelect": {"type": "boolean"},
                                         "answer": {"type": ["string", "null"]}}}}}},
}
QUESTIONS = '[{"question": "Pick a color", "multiSelect": false, "answer": null}]'


def call_text(function: str, *parameters: str) -> str:
    """A call as most of this file writes it: `<parameter=…>` lines without wrapping newlines."""
    return f"<tool_call>\n<function={function}>\n" + "".join(p + "\n" for p in parameters) + "</function>\n</tool_call>"


def configure(parameter: str) -> tuple[str, ...]:
    """One `configure` call with a single parameter, whole."""
    return (call_text("configure", parameter),)


ENGINE_CASES = [
    ToolCase(f"{ENGINE_TEST}::{test}", chunks, calls, content, tools, calls_checked, streamed=len(chunks) > 1)
    for test, chunks, calls, content, tools, calls_checked in [
        ("TestNonStreaming::test_no_tool_calls", ("This is a regular response without any tool calls.",), (),
         "This is a regular response without any tool calls.", {}, "all"),
        ("TestNonStreaming::test_single_tool_call", (call_text("get_weather", "<parameter=city>Tokyo</parameter>"),),
         (TOKYO,), Contains(), {}, "all"),
        ("TestNonStreaming::test_parallel_tool_calls",
         ("<tool_call>\n<function=get_weather>\n<parameter=city>Tokyo</parameter>\n</function>\n</tool_call>"
          "<tool_call>\n<function=get_time>\n<parameter=timezone>Asia/Tokyo</parameter>\n</function>\n</tool_call>",),
         (TOKYO, Call("get_time", {"timezone": "Asia/Tokyo"})), Contains(), {}, "all"),
        ("TestNonStreaming::test_various_data_types",
         (call_text("test_function", "<parameter=string_field>hello</parameter>", "<parameter=int_field>42</parameter>",
                    "<parameter=float_field>3.14</parameter>", "<parameter=bool_field>true</parameter>",
                    "<parameter=null_field>null</parameter>", '<parameter=array_field>["a", "b", "c"]</parameter>',
                    '<parameter=object_field>{"nested": "value"}</parameter>'),),
         (Call("test_function", {"string_field": "hello", "int_field": "42", "float_field": "3.14",
                                 "bool_field": "true", "null_field": "null", "array_field": '["a", "b", "c"]',
                                 "object_field": '{"nested": "value"}'}),),
         Contains(), {}, "all"),
        ("TestNonStreaming::test_empty_arguments", ("<tool_call>\n<function=refresh>\n</function>\n</tool_call>",),
         (Call("refresh", {}),), Contains(), {}, "all"),
        ("TestNonStreaming::test_surrounding_text",
         ("Let me check the weather for you.\n\n<tool_call>\n<function=get_weather>\n<parameter=city>Tokyo"
          "</parameter>\n</function>\n</tool_call>\n\nI will get that information.",),
         (Call("get_weather", None),), Contains(("Let me check the weather",)), {}, "all"),
        ("TestNonStreaming::test_escaped_strings",
         (call_text("test_function", '<parameter=quoted>He said "hello"</parameter>',
                    "<parameter=path>C:\\Users\\file.txt</parameter>", "<parameter=newline>line1\nline2</parameter>"),),
         (Call("test_function", {"quoted": 'He said "hello"', "path": "C:\\Users\\file.txt",
                                 "newline": "line1\nline2"}),),
         Contains(), {}, "all"),
        ("TestNonStreaming::test_multiple_parameters",
         (call_text("search", "<parameter=query>vllm parsing</parameter>", "<parameter=limit>10</parameter>",
                    "<parameter=exact_match>false</parameter>"),),
         (Call("search", {"query": "vllm parsing", "limit": "10", "exact_match": "false"}),), Contains(), {}, "all"),
        ("TestNonStreaming::test_multiline_param_values",
         (call_text("Bash", "<parameter=command>\nls -la /tmp\n</parameter>",
                    "<parameter=description>\nList files in /tmp directory\n</parameter>"),),
         (Call("Bash", {"command": "ls -la /tmp", "description": "List files in /tmp directory"}),), Contains(), {},
         "all"),
        ("TestNonStreaming::test_multiline_two_tool_calls",
         ("<tool_call>\n<function=Bash>\n<parameter=command>\nfind /workspace -name '*.py' | head -20\n</parameter>\n"
          "<parameter=description>\nFind Python files\n</parameter>\n</function>\n</tool_call><tool_call>\n"
          "<function=Read>\n<parameter=file_path>\n/workspace/main.py\n</parameter>\n</function>\n</tool_call>",),
         (Call("Bash", None), Call("Read", None)), Contains(), {}, "all"),
        ("TestNonStreaming::test_consecutive_tool_calls_without_tool_end",
         ("<tool_call>\n<function=get_weather>\n<parameter=city>Tokyo</parameter>\n</function>\n<tool_call>\n"
          "<function=get_weather>\n<parameter=city>Paris</parameter>\n</function>\n</tool_call>",),
         (TOKYO, Call("get_weather", {"city": "Paris"})), Contains(), {}, "all"),
        ("TestNonStreaming::test_nested_json_array_parameter",
         (f"<tool_call>\n<function=AskUserQuestion>\n<parameter=questions>{QUESTIONS}</parameter>\n</function>\n"
          "</tool_call>",),
         (Call("AskUserQuestion", {"questions": QUESTIONS}),), Contains(), {}, "all"),
        ("TestNonStreaming::test_regression_issue_58227[<function=function_name]",
         (ISSUE_58227.format(unclosed="<function=function_name"),), (TOKYO,), Contains(), {}, "last"),
        ("TestNonStreaming::test_regression_issue_58227[<function=function_name>]",
         (ISSUE_58227.format(unclosed="<function=function_name>"),), (TOKYO,), Contains(), {}, "last"),
        ("TestNonStreaming::test_tool_call_tag_is_ok_inside_parameter",
         (call_text("write_file", "<parameter=content>Document <tool_call> usage</parameter>"),),
         (Call("write_file", {"content": "Document <tool_call> usage"}),), Contains(), {}, "all"),
        ("TestStreaming::test_basic_streaming",
         ("<tool_call>\n", "<function=get_weather>\n", "<parameter=city>Tokyo", "</parameter>\n", "</function>\n",
          "</tool_call>"),
         (TOKYO,), Contains(), {}, "all"),
        ("TestStreaming::test_streaming_multi_param",
         ("<tool_call>\n", "<function=get_weather>\n", "<parameter=city>Tokyo</parameter>\n",
          "<parameter=unit>celsius</parameter>\n", "</function>\n", "</tool_call>"),
         (Call("get_weather", {"city": "Tokyo", "unit": "celsius"}),), Contains(), {}, "all"),
        ("TestStreaming::test_streaming_args_arrive_incrementally",
         ("<tool_call>\n", "<function=get_weather>\n", "<parameter=city>Tokyo</parameter>\n",
          "<parameter=unit>celsius</parameter>\n", "<parameter=days>5</parameter>\n", "</function>\n", "</tool_call>"),
         (Call("get_weather", {"city": "Tokyo", "unit": "celsius", "days": "5"}),), Contains(), {}, "all"),
        ("TestStreaming::test_streaming_long_string_arg_before_parameter_end",
         ("<tool_call>\n", "<function=write_report>\n", "<parameter=content>",
          "Artificial intelligence has rapidly transformed the way ",
          "developers build dynamic applications with external tools.", "</param", "eter>\n", "</function>\n",
          "</tool_call>"),
         (Call("write_report", {"content": "Artificial intelligence has rapidly transformed the way developers build "
                                           "dynamic applications with external tools."}),),
         Contains(), {}, "all"),
        ("TestStreaming::test_streaming_text_before_tool",
         ("Let me check ", "the weather. ", "<tool_call>\n", "<function=get_weather>\n",
          "<parameter=city>Tokyo</parameter>\n", "</function>\n", "</tool_call>"),
         (), Contains(("Let me check",)), {}, "some"),
        ("TestStreaming::test_streaming_empty_args",
         ("<tool_call>\n", "<function=refresh>\n", "</function>\n", "</tool_call>"),
         (Call("refresh", None),), Contains(), {}, "all"),
        ("TestStreaming::test_streaming_split_parameter_tag",
         ("<tool_call>\n", "<function=test>\n", "<parameter=", "name>Alice", "</parameter>\n", "</function>\n",
          "</tool_call>"),
         (Call("test", {"name": "Alice"}),), Contains(), {}, "all"),
        ("TestStreaming::test_streaming_split_next_parameter_tag_is_buffered",
         ("<tool_call>\n", "<function=search>\n", "<parameter=query>hello ", "<param", "eter=limit>10</parameter>\n",
          "</function>\n", "</tool_call>"),
         (Call("search", {"query": "hello ", "limit": "10"}),), Contains(), {}, "all"),
        ("TestStreaming::test_streaming_numeric_values",
         ("<tool_call>\n", "<function=set_config>\n", "<parameter=count>42</parameter>\n",
          "<parameter=active>true</parameter>\n", "</function>\n", "</tool_call>"),
         (Call("set_config", {"count": "42", "active": "true"}),), Contains(), {}, "all"),
        ("TestStreaming::test_streaming_parallel_calls",
         ("<tool_call>\n", "<function=get_weather>\n", "<parameter=city>Tokyo</parameter>\n", "</function>\n",
          "</tool_call>", "<tool_call>\n", "<function=get_time>\n", "<parameter=tz>JST</parameter>\n", "</function>\n",
          "</tool_call>"),
         (Call("get_weather", None), Call("get_time", None)), Contains(), {}, "some"),
        ("TestStreaming::test_streaming_value_split_across_chunks",
         ("<tool_call>\n", "<function=search>\n", "<parameter=query>hello ", "world", " test</parameter>\n",
          "</function>\n", "</tool_call>"),
         (Call("search", {"query": "hello world test"}),), Contains(), {}, "all"),
        ("TestStreaming::test_streaming_split_tool_call_tag",
         ("<tool_call>\n", "<function=test>\n", "<parameter=x>1", "</parameter>\n", "</function>\n", "</tool_call>"),
         (Call("test", {"x": "1"}),), Contains(), {}, "all"),
        ("TestStreaming::test_char_by_char_streaming",
         tuple("<tool_call>\n<function=echo>\n<parameter=msg>hi</parameter>\n</function>\n</tool_call>"),
         (Call("echo", {"msg": "hi"}),), Contains(), {}, "all"),
        ("TestStreaming::test_streaming_multiline_param_values",
         ("<tool_call>\n", "<function=Bash>\n", "<parameter=command>\n", "ls -la /tmp\n", "</parameter>\n",
          "<parameter=description>\n", "List files\n", "</parameter>\n", "</function>\n", "</tool_call>"),
         (Call("Bash", None),), Contains(), {}, "all"),
        ("TestStreaming::test_streaming_multiline_two_tool_calls",
         ("<tool_call>\n", "<function=Bash>\n", "<parameter=command>\n", "find /workspace -name '*.py' | head -20\n",
          "</parameter>\n", "<parameter=description>\n", "Find Python files\n", "</parameter>\n", "</function>\n",
          "</tool_call>", "<tool_call>\n", "<function=Read>\n", "<parameter=file_path>\n", "/workspace/main.py\n",
          "</parameter>\n", "</function>\n", "</tool_call>"),
         (Call("Bash", None), Call("Read", None)), Contains(), {}, "some"),
        *((f"TestStreaming::test_streaming_regression_issue_58227[{unclosed}]",
           ("Use <tool_call>\n", f"{unclosed}\n", "Wait, let me call the real tool via ", "<tool_call>", ":\n",
            "<tool_call>\n", "<function=get_weather>\n", "<parameter=city>Tokyo</parameter>\n", "</function>\n",
            "</tool_call>"),
           (TOKYO,), Contains(), {}, "last")
          for unclosed in ("<function=function_name", "<function=function_name>")),
        ("TestStreaming::test_streaming_tool_call_tag_is_ok_inside_parameter",
         ("<tool_call>\n", "<function=write_file>\n", "<parameter=content>Document ", "<tool_call>",
          " usage</parameter>\n", "</function>\n", "</tool_call>"),
         (Call("write_file", {"content": "Document <tool_call> usage"}),), Contains(), {}, "all"),
        ("TestSchemaAwareTypeCoercion::test_string_param_not_coerced_to_int",
         (call_text("TaskUpdate", "<parameter=taskId>1</parameter>"),), (Call("TaskUpdate", {"taskId": "1"}),),
         Contains(), TASK_TOOLS, "all"),
        ("TestSchemaAwareTypeCoercion::test_string_param_not_coerced_to_bool",
         (call_text("TaskUpdate", "<parameter=flag>true</parameter>"),), (Call("TaskUpdate", {"flag": "true"}),),
         Contains(), TASK_TOOLS, "all"),
        ("TestSchemaAwareTypeCoercion::test_int_param_still_coerced",
         (call_text("TaskUpdate", "<parameter=count>42</parameter>"),), (Call("TaskUpdate", {"count": 42}),),
         Contains(), TASK_TOOLS, "all"),
        ("TestSchemaAwareTypeCoercion::test_no_tools_keeps_strings",
         (call_text("TaskUpdate", "<parameter=taskId>1</parameter>"),), (Call("TaskUpdate", {"taskId": "1"}),),
         Contains(), {}, "all"),
        ("TestSchemaAwareTypeCoercion::test_streaming_string_param_not_coerced",
         ("<tool_call>\n", "<function=TaskUpdate>\n", "<parameter=taskId>1</parameter>\n", "</function>\n",
          "</tool_call>"),
         (Call("TaskUpdate", {"taskId": "1"}),), Contains(), TASK_TOOLS, "all"),
        ("TestAnyOfTypeCoercion::test_anyof_string_param_not_coerced",
         (call_text("set_config", "<parameter=port>8080</parameter>"),), (Call("set_config", {"port": "8080"}),),
         Contains(), SET_CONFIG_TOOLS, "all"),
        ("TestSchemaCoercionBoolNumberNull::test_bool_param_coerced",
         configure("<parameter=enabled>true</parameter>"), (Call("configure", {"enabled": True}),), Contains(),
         CONFIGURE_TOOLS, "all"),
        ("TestSchemaCoercionBoolNumberNull::test_number_param_whole_normalized",
         configure("<parameter=ratio>5.0</parameter>"), (Call("configure", {"ratio": 5}),), Contains(),
         CONFIGURE_TOOLS, "all"),
        ("TestSchemaCoercionBoolNumberNull::test_number_param_fractional",
         configure("<parameter=ratio>3.14</parameter>"), (Call("configure", {"ratio": 3.14}),), Contains(),
         CONFIGURE_TOOLS, "all"),
        ("TestSchemaCoercionBoolNumberNull::test_null_coerced_when_in_schema",
         configure("<parameter=value>null</parameter>"), (Call("configure", {"value": None}),), Contains(),
         CONFIGURE_TOOLS, "all"),
        ("TestSchemaCoercionBoolNumberNull::test_null_stays_string_without_null_schema",
         configure("<parameter=label>null</parameter>"), (Call("configure", {"label": "null"}),), Contains(),
         CONFIGURE_TOOLS, "all"),
        ("TestSchemaCoercionBoolNumberNull::test_streaming_bool_param_coerced",
         ("<tool_call>\n", "<function=configure>\n", "<parameter=enabled>true</parameter>\n", "</function>\n",
          "</tool_call>"),
         (Call("configure", {"enabled": True}),), Contains(), CONFIGURE_TOOLS, "all"),
        ("TestSchemaCoercionBoolNumberNull::test_streaming_number_param_coerced",
         ("<tool_call>\n", "<function=configure>\n", "<parameter=ratio>3.14</parameter>\n", "</function>\n",
          "</tool_call>"),
         (Call("configure", {"ratio": 3.14}),), Contains(), CONFIGURE_TOOLS, "all"),
        ("TestSchemaCoercionBoolNumberNull::test_streaming_matches_non_streaming_comprehensive",
         ("<tool_call>\n", "<function=configure>\n", "<parameter=enabled>true</parameter>\n",
          "<parameter=ratio>5.0</parameter>\n", "<parameter=count>42</parameter>\n",
          "<parameter=value>null</parameter>\n", "<parameter=label>hello</parameter>\n", "</function>\n",
          "</tool_call>\n"),
         (Call("configure", {"enabled": True, "ratio": 5, "count": 42, "value": None, "label": "hello"}),),
         Contains(), CONFIGURE_TOOLS, "all"),
        ("TestNestedSchemaCoercion::test_nested_object_coerced",
         (call_text("search", '<parameter=filters>{"language": "python", "min_stars": 100}</parameter>'),),
         (Call("search", {"filters": {"language": "python", "min_stars": 100}}),), Contains(), SEARCH_TOOLS, "all"),
        ("TestNestedSchemaCoercion::test_nested_array_items_coerced",
         (call_text("search", "<parameter=limits>[10, 20, 30]</parameter>"),),
         (Call("search", {"limits": [10, 20, 30]}),), Contains(), SEARCH_TOOLS, "all"),
        ("TestNestedSchemaCoercion::test_nested_string_array_not_coerced",
         (call_text("search", '<parameter=tags>["ml", "42"]</parameter>'),),
         (Call("search", {"tags": ["ml", "42"]}),), Contains(), SEARCH_TOOLS, "all"),
        ("TestNestedSchemaCoercion::test_array_of_objects_with_bool_and_null_coerced",
         (call_text("AskUserQuestion", f"<parameter=questions>{QUESTIONS}</parameter>"),),
         (Call("AskUserQuestion", {"questions": [{"question": "Pick a color", "multiSelect": False,
                                                  "answer": None}]}),),
         Contains(), SEARCH_TOOLS, "all"),
        ("TestNestedSchemaCoercion::test_streaming_array_of_objects_with_bool_and_null_coerced",
         ("<tool_call>\n", "<function=AskUserQuestion>\n", '<parameter=questions>[{"question": "Pick a color",',
          ' "multiSelect": false, "answer": null}]', "</parameter>\n", "</function>\n", "</tool_call>"),
         (Call("AskUserQuestion", {"questions": [{"question": "Pick a color", "multiSelect": False,
                                                  "answer": None}]}),),
         Contains(), SEARCH_TOOLS, "all"),
    ]
]

# --- tests/parser/test_streaming.py: the qwen3 engine reasoning parser with the hermes tool parser (Qwen3-32B)

HERMES_OUTPUT = (
    '<think>let me think about this</think><tool_call>\n{"name": "get_weather", "arguments": {"city": "Dallas"}}\n'
    "</tool_call>"
)
ASTRONAUT_CITY = "東京🧑\u200d🚀"
HERMES_TOOLS = {"get_weather": {"type": "object", "properties": {}}}
HERMES_CASES = [
    ToolCase(f"{STREAMING_TEST}::{test}", chunks, (Call("get_weather", {"city": city}),), content, HERMES_TOOLS,
             tool_parser="hermes", reasoning_parser="qwen3", reasoning=Contains(("let me think about this",)),
             streamed=True)
    for test, chunks, city, content in [
        ("test_engine_reasoning_hermes_tool_token_by_token", (HERMES_OUTPUT,), "Dallas", ""),
        ("test_engine_reasoning_hermes_tool_text_holdback",
         ("<think>let me think about this", "</think><", HERMES_OUTPUT.split("</think><", 1)[1]), "Dallas",
         Contains(absent=("tool_call",))),
        # the test feeds the third piece token by token, through the real incremental detokenizer
        ("test_engine_reasoning_hermes_tool_multibyte_holdback",
         ("<think>let me think about this", "</think><",
          HERMES_OUTPUT.split("</think><", 1)[1].replace("Dallas", ASTRONAUT_CITY)), ASTRONAUT_CITY, ""),
    ]
]

TOOL_CASES = CODER_CASES + ENGINE_CASES + HERMES_CASES

"""Parsing: one model reply -> thinking, the visible answer, and tool calls.

Pure functions and small classes, no I/O. They read what Qwen models write when the server leaves the text alone:

- thinking: `<think>…</think>`, or a thought with no opening tag that ends in `</think>` (Qwen3.5 and later,
  whose chat template opens the tag in the prompt), or vLLM's own `reasoning` field;
- Hermes JSON calls (Qwen2.5, Qwen3): `<tool_call>{"name": …, "arguments": {…}}</tool_call>`;
- Qwen3-Coder / Qwen3.5 XML calls: `<tool_call><function=NAME><parameter=P>VALUE</parameter></function></tool_call>`,
  read as vLLM 0.33's `qwen3_coder` parser reads them (vllm/parser/qwen3.py) and typed by the tool's JSON Schema
  as its coercion types them (vllm/tool_parsers/utils.py).

Both call formats may appear in one reply. `ReplySplitter` splits a reply, streamed or whole; `parse_tool_calls`
reads the calls out of a text; `ToolCall` is the one call type from vLLM's wire to stored history.
"""

import json
import math
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Self

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


def new_call_id() -> str:
    """A tool-call id as vLLM 0.33 writes them (16 hex digits), for calls that arrive without one."""
    return f"chatcmpl-tool-{secrets.token_hex(8)}"


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One tool call, parsed by vLLM or read from the text; `error` says why it could not be read (the model is
    told). The id does not take part in ==, so parsed calls compare by what they ask for."""

    name: str
    arguments: dict[str, Any]
    error: str | None = None
    id: str = field(default_factory=new_call_id, compare=False)

    @classmethod
    def from_wire(cls, call_id: str, name: str, arguments: str) -> Self:
        """A call vLLM parsed itself, its arguments still the JSON text it sent."""
        try:
            return cls(name, decode_arguments(arguments), id=call_id)
        except ValueError as exc:
            return cls(name, {}, f"the arguments are not valid JSON ({exc})", id=call_id)

    def wire(self) -> dict[str, Any]:
        """The call as vLLM expects it in history: arguments always a valid JSON string."""
        arguments = json.dumps(self.arguments, ensure_ascii=False)
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": arguments}}


def read_call_object(payload: Any) -> ToolCall:
    """One Hermes `{"name": ..., "arguments": ...}` object (Qwen sometimes writes "parameters")."""
    if not isinstance(payload, dict) or not isinstance(payload.get("name"), str):
        return ToolCall("", {}, 'a tool call must be a JSON object with a "name" string')
    raw = payload["arguments"] if "arguments" in payload else payload.get("parameters")
    try:
        return ToolCall(payload["name"], decode_arguments(raw))
    except ValueError as exc:
        return ToolCall(payload["name"], {}, f"the arguments are not a valid JSON object ({exc})")


def read_hermes_objects(piece: str) -> list[ToolCall]:
    """The Hermes JSON object(s) in one piece of a `<tool_call>` block; text that does not decode is repaired, or
    becomes an error call."""
    calls: list[ToolCall] = []
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
                calls.append(ToolCall(guess.group(1) if guess else "", {},
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


def xml_call(name: str, body: str, schemas: Mapping[str, dict[str, Any]]) -> ToolCall:
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
        return ToolCall(name, check_depth(arguments))
    except ValueError as exc:
        return ToolCall(name, {}, f"the arguments are not a valid JSON object ({exc})")


def read_function(text: str, pos: int, schemas: Mapping[str, dict[str, Any]]) -> tuple[list[ToolCall], int]:
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


def read_block(text: str, pos: int) -> tuple[list[ToolCall], int]:
    """The Hermes calls of the `<tool_call>` block whose body starts at pos, and where reading goes on.

    Several JSON objects may share a block; an XML call or a new `<tool_call>` inside it is left to the caller.
    """
    calls: list[ToolCall] = []
    while (pos := WHITESPACE.match(text, pos).end()) < len(text):
        if text.startswith(CALL_OPENERS, pos):
            break
        if text.startswith(TOOL_CALL_CLOSE, pos):
            return calls, pos + len(TOOL_CALL_CLOSE)
        end = hermes_piece_end(text, pos)
        calls.extend(read_hermes_objects(text[pos:end]))
        pos = end
    return calls, pos


def parse_tool_calls(text: str, schemas: Mapping[str, dict[str, Any]]) -> tuple[str, list[ToolCall]]:
    """The text before the first tool-call markup, and the calls in order, Hermes JSON and XML alike.

    `schemas` maps a tool's name to its `parameters` JSON Schema, which types XML values. Text between and
    after calls is dropped, as vLLM drops it.
    """
    first = CALL_START.search(text)
    if first is None:
        return text, []
    calls: list[ToolCall] = []
    pos = first.start()
    while tag := CALL_START.search(text, pos):
        if tag.group() == FUNCTION_OPEN:
            found, pos = read_function(text, tag.end(), schemas)
        else:
            found, pos = read_block(text, tag.end())
        calls.extend(found)
    return text[: first.start()], calls


class SplitMode(Enum):
    """Where a reply's text is: each mode listens for its own tags (MODE_TAGS)."""

    ANSWER = "answer"  # visible text
    THOUGHT = "thought"  # thinking, shown as such
    THOUGHT_CALLS = "thought_calls"  # call markup inside a thought: hidden, kept for parsing, until </think>
    CALLS = "calls"  # call markup and all that follows it: hidden, kept for parsing


MODE_TAGS = {
    SplitMode.ANSWER: (THINK_OPEN, THINK_CLOSE, *CALL_OPENERS),
    SplitMode.THOUGHT: (THINK_OPEN, THINK_CLOSE, *CALL_OPENERS),
    SplitMode.THOUGHT_CALLS: (THINK_CLOSE,),
    SplitMode.CALLS: (),
}
MODE_TAG_PATTERNS = {mode: re.compile("|".join(map(re.escape, tags))) for mode, tags in MODE_TAGS.items() if tags}


def next_tag(text: str, pos: int, mode: SplitMode) -> re.Match[str] | None:
    """The first tag at or after pos that matters in this mode."""
    pattern = MODE_TAG_PATTERNS.get(mode)
    return pattern.search(text, pos) if pattern else None


def undecided_from(text: str, pos: int, mode: SplitMode) -> int:
    """Where the end of text[pos:] may still be the start of a tag of this mode: held back until more comes."""
    tags = MODE_TAGS[mode]
    for start in range(max(pos, len(text) - max(map(len, tags), default=1) + 1), len(text)):
        if text[start] == "<" and any(tag.startswith(text[start:]) for tag in tags):
            return start
    return len(text)


@dataclass(frozen=True, slots=True)
class SplitReply:
    """One whole reply: the thinking and the answer exactly as they were shown, the calls (the answer's, or when it
    has none the thinking's), and whether the reply ended inside a thought that no `</think>` nor call closed."""

    reasoning: str
    content: str
    calls: list[ToolCall]
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
        self._starts_in_thought = in_thought  # the content, when it comes, starts inside a thought
        self._mode = SplitMode.ANSWER  # of the content; THOUGHT from its first piece when it starts in a thought
        self._reasoning_mode = SplitMode.THOUGHT  # THOUGHT, then CALLS once call markup starts in `reasoning`
        self._held = self._reasoning_held = ""  # undecided text at the end of the content and the reasoning
        self._thought_seen = False  # a thought has ended or the server sent reasoning: think tags are absorbed
        self._thought_started = False  # the current thought has shown text (its leading newlines are behind)
        self._thought_tail = ""  # newlines at the end of the thinking shown so far, held
        self._answer_started = False
        self._answer_lead = ""  # whitespace before the answer's first text, held
        self._now: tuple[list[str], list[str]] = ([], [])  # thinking and answer of the current call
        self._shown: tuple[list[str], list[str]] = ([], [])
        self._answer_calls: list[str] = []
        self._thought_calls: list[str] = []

    def feed(self, reasoning: str, content: str) -> tuple[str, str]:
        """One delta's `reasoning` and `content` -> the (thinking, answer) text to show now."""
        if reasoning:
            self._thought_seen = True
            self._feed_reasoning(reasoning)
        if content:
            self._feed_content(content)
        return self._release()

    def flush(self) -> tuple[str, str]:
        """End of the reply: what was held back and turned out to be text (a lone `<`; a tag prefix is dropped)."""
        if self._reasoning_held == "<":
            self._add_thinking("<")
        held, self._held, self._reasoning_held = self._held, "", ""
        if held == "<" or self._mode is SplitMode.THOUGHT_CALLS:
            self._content_text(held)
        if self._answer_lead:
            self._start_answer()
        self._end_thought()
        return self._release()

    def finish(self) -> SplitReply:
        """The whole reply, flushed first (so flush() before, when the tail is to be shown)."""
        self.flush()
        calls = self._read_calls(self._answer_calls) or self._read_calls(self._thought_calls)
        thinking, answer = ("".join(pieces) for pieces in self._shown)
        return SplitReply(thinking, answer, calls, self._mode is SplitMode.THOUGHT)

    def _read_calls(self, markup: list[str]) -> list[ToolCall]:
        """The calls in call markup kept from the answer or the thinking."""
        return parse_tool_calls("".join(markup), self._schemas)[1]

    def _release(self) -> tuple[str, str]:
        """What this call made showable, now part of what was shown."""
        thinking, answer = ("".join(pieces) for pieces in self._now)
        for shown, text in zip(self._shown, (thinking, answer), strict=True):
            shown.append(text)
        self._now = ([], [])
        return thinking, answer

    def _feed_reasoning(self, reasoning: str) -> None:
        """The server's thinking: think tags dropped, call markup hidden from where it starts."""
        text, pos = self._reasoning_held + reasoning, 0
        while tag := next_tag(text, pos, self._reasoning_mode):
            self._reasoning_text(text[pos : tag.start()])
            if tag.group() in CALL_OPENERS:
                self._reasoning_mode, pos = SplitMode.CALLS, tag.start()
                self._end_thought()
            else:
                pos = tag.end()
        keep = undecided_from(text, pos, self._reasoning_mode)
        self._reasoning_text(text[pos:keep])
        self._reasoning_held = text[keep:]

    def _reasoning_text(self, text: str) -> None:
        if self._reasoning_mode is SplitMode.CALLS:
            self._thought_calls.append(text)
        else:
            self._add_thinking(text)

    def _feed_content(self, content: str) -> None:
        """The content, text and tags in turn, in the mode each tag leaves; a possible tag at the end waits."""
        if self._starts_in_thought and not self._thought_seen:
            self._mode = SplitMode.THOUGHT  # the first content, and no reasoning from the server before it
        self._starts_in_thought = False
        text, pos = self._held + content, 0
        while tag := next_tag(text, pos, self._mode):
            self._content_text(text[pos : tag.start()])
            pos = self._content_tag(tag)
        keep = undecided_from(text, pos, self._mode)
        self._content_text(text[pos:keep])
        self._held = text[keep:]

    def _content_text(self, text: str) -> None:
        match self._mode:
            case SplitMode.ANSWER:
                self._add_answer(text)
            case SplitMode.THOUGHT:
                self._add_thinking(text)
            case SplitMode.THOUGHT_CALLS:
                self._thought_calls.append(text)
            case SplitMode.CALLS:
                self._answer_calls.append(text)

    def _content_tag(self, tag: re.Match[str]) -> int:
        """Act on one tag in the content; returns where to read on (a call opener is read again, as markup)."""
        if tag.group() in CALL_OPENERS:
            self._enter_calls()
            return tag.start()
        if tag.group() == THINK_OPEN:
            if self._mode is SplitMode.ANSWER and not self._answer_started and not self._thought_seen:
                self._mode, self._answer_lead = SplitMode.THOUGHT, ""
        elif self._mode is not SplitMode.ANSWER:
            self._close_thought()
        elif not self._thought_seen:
            self._close_stray_thought()
        return tag.end()

    def _close_stray_thought(self) -> None:
        """A `</think>` with no thought before it: the answer this feed() has not returned yet was thinking."""
        self._add_thinking("".join(self._now[1]) + self._answer_lead)
        self._now[1].clear()
        self._close_thought()

    def _enter_calls(self) -> None:
        """Call markup starts: in a thought it hides the rest of the thought, in the answer all that follows."""
        if self._mode is SplitMode.THOUGHT:
            self._mode = SplitMode.THOUGHT_CALLS
            self._end_thought()
            return
        if not self._answer_started:
            self._start_answer()
        self._mode = SplitMode.CALLS

    def _close_thought(self) -> None:
        self._mode, self._thought_seen = SplitMode.ANSWER, True
        self._answer_started, self._answer_lead = False, ""
        self._end_thought()

    def _add_answer(self, text: str) -> None:
        """Answer text; whitespace before the first text waits, as a `<think>` may still follow it."""
        if not self._answer_started:
            body = text.lstrip()
            self._answer_lead += text[: len(text) - len(body)]
            if not body:
                return
            self._start_answer()
            text = body
        self._now[1].append(text)

    def _start_answer(self) -> None:
        """The answer's first text is here: its held whitespace is shown, without newlines after a thought."""
        lead = self._answer_lead.lstrip("\n") if self._thought_seen else self._answer_lead
        self._answer_started, self._answer_lead = True, ""
        self._now[1].append(lead)

    def _add_thinking(self, text: str) -> None:
        """Thinking text, without the thought's leading newlines; trailing newlines wait for more text."""
        if not self._thought_started:
            text = text.lstrip("\n")
            self._thought_started = bool(text)
        body = text.rstrip("\n")
        if body:
            self._now[0].append(self._thought_tail + body)
            self._thought_tail = ""
        self._thought_tail += text[len(body) :]

    def _end_thought(self) -> None:
        """The current thought shows no more text: its held trailing newlines are dropped."""
        self._thought_started, self._thought_tail = False, ""

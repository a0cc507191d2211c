"""Reference agent for the benchmark: the bare hand-written loop, the limit the service is measured against.

One pooled aiohttp session to vLLM, the calculator tool, no store, no retries, no validation beyond the
body model. POST /chat {"content"} -> {"content", "tool_calls"}; POST /chat/stream -> the same turn with
upstream streaming, as hand-framed SSE events token / tool_call / tool_result / done.

    VLLM_BASE_URL=http://127.0.0.1:8000 python -m uvicorn reference_app:app --app-dir bench
"""

import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

from tools import evaluate_expression

from harness import CALCULATOR_TOOL, MODEL

CHAT_URL = os.environ.get("VLLM_BASE_URL", "http://127.0.0.1:8000").rstrip("/") + "/v1/chat/completions"
MAX_STEPS = 8
SYSTEM = {"role": "system", "content": "You are a helpful assistant. Use the tools when they help."}
TOOLS = [CALCULATOR_TOOL]


class ChatIn(BaseModel):
    """The user's message; extra fields (a conversation_id) are ignored: the reference keeps no history."""

    content: str


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """One pooled session for the process, as the service has one HTTP client."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1000)) as session:
        app.state.session = session
        yield


app = FastAPI(lifespan=lifespan)


def run_tool(call: dict[str, Any]) -> dict[str, Any]:
    """Run one wire tool call; a failure becomes the result's error text."""
    function = call["function"]
    record = {"id": call["id"], "name": function["name"], "arguments": {}, "result": None, "error": None}
    try:
        record["arguments"] = json.loads(function["arguments"] or "{}")
        if function["name"] != "calculator":
            raise ValueError(f"unknown tool {function['name']!r}")
        record["result"] = evaluate_expression(**record["arguments"])
    except (ValueError, TypeError) as exc:
        record["error"] = str(exc)
    return record


def tool_message(record: dict[str, Any]) -> dict[str, Any]:
    """The tool result as the next message to vLLM."""
    content = record["result"] if record["error"] is None else f"Error: {record['error']}"
    return {"role": "tool", "tool_call_id": record["id"], "content": content}


@app.post("/chat")
async def chat(body: ChatIn, request: Request) -> JSONResponse:
    """The loop: call vLLM, run the calls it asks for, call again, until it answers in text."""
    session: aiohttp.ClientSession = request.app.state.session
    messages = [SYSTEM, {"role": "user", "content": body.content}]
    records: list[dict[str, Any]] = []
    for _ in range(MAX_STEPS):
        payload = {"model": MODEL, "messages": messages, "tools": TOOLS}
        async with session.post(CHAT_URL, json=payload) as response:
            response.raise_for_status()
            message = (await response.json())["choices"][0]["message"]
        calls = message.get("tool_calls") or []
        if not calls:
            break
        messages.append({"role": "assistant", "content": message.get("content") or "", "tool_calls": calls})
        for call in calls:
            records.append(run_tool(call))
            messages.append(tool_message(records[-1]))
    return JSONResponse({"content": message.get("content") or "", "tool_calls": records})


def sse(event: str, data: dict[str, Any]) -> bytes:
    """One hand-framed Server-Sent Event."""
    return f"event: {event}\ndata: {json.dumps({'type': event, **data})}\n\n".encode()


async def stream_step(session: aiohttp.ClientSession, messages: list[dict[str, Any]],
                      content: list[str], calls: dict[int, dict[str, Any]]) -> AsyncIterator[bytes]:
    """One streamed vLLM call: token events as text arrives; text and tool calls collected in place."""
    payload = {"model": MODEL, "messages": messages, "tools": TOOLS, "stream": True}
    async with session.post(CHAT_URL, json=payload) as response:
        response.raise_for_status()
        async for line in response.content:
            if not line.startswith(b"data:") or (data := line[5:].strip()) == b"[DONE]":
                continue
            for choice in json.loads(data)["choices"]:
                delta = choice.get("delta") or {}
                if delta.get("content"):
                    content.append(delta["content"])
                    yield sse("token", {"content": delta["content"]})
                for part in delta.get("tool_calls") or ():
                    call = calls.setdefault(part["index"], {"id": "", "type": "function",
                                                            "function": {"name": "", "arguments": ""}})
                    call["id"] = part.get("id") or call["id"]
                    function = part.get("function") or {}
                    call["function"]["name"] += function.get("name") or ""
                    call["function"]["arguments"] += function.get("arguments") or ""


async def stream_turn(session: aiohttp.ClientSession, user: str) -> AsyncIterator[bytes]:
    """The same loop as /chat on streamed vLLM calls, as SSE bytes."""
    messages = [SYSTEM, {"role": "user", "content": user}]
    records: list[dict[str, Any]] = []
    for _ in range(MAX_STEPS):
        content: list[str] = []
        calls: dict[int, dict[str, Any]] = {}
        async for event in stream_step(session, messages, content, calls):
            yield event
        if not calls:
            break
        wire = [calls[index] for index in sorted(calls)]
        messages.append({"role": "assistant", "content": "".join(content), "tool_calls": wire})
        for call in wire:
            yield sse("tool_call", {"id": call["id"], "name": call["function"]["name"]})
            records.append(run_tool(call))
            messages.append(tool_message(records[-1]))
            yield sse("tool_result", records[-1])
    yield sse("done", {"content": "".join(content), "tool_calls": records})


@app.post("/chat/stream")
async def chat_stream(body: ChatIn, request: Request) -> StreamingResponse:
    """One turn as an SSE stream."""
    return StreamingResponse(stream_turn(request.app.state.session, body.content), media_type="text/event-stream")

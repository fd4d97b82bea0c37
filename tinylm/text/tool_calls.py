"""Read tool calls out of generated text: `<tool_call>{json}</tool_call>` blocks (Hermes / Qwen format).

The model writes calls as text; a block whose JSON is malformed, or lacks a function name or an object of
arguments, is NOT a call: it stays in the content as the model wrote it (vLLM's hermes parser does the
same), so a bad generation is a readable answer, never a server error.

`ToolCallStream` does the same incrementally for streaming: text outside blocks passes through at once,
a block is held until its closing tag and then comes out whole, as one call (its `arguments` string is
complete JSON) or, if malformed, as text.
"""

from __future__ import annotations

import json
import uuid

OPEN, CLOSE = "<tool_call>", "</tool_call>"


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def parse_call(body: str) -> dict | None:
    """`{"name": .., "arguments": {..}}` -> an OpenAI tool call (arguments as a JSON string), else None."""
    try:
        obj = json.loads(body)
    except (json.JSONDecodeError, RecursionError):
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return {"id": new_call_id(), "type": "function",
            "function": {"name": obj["name"], "arguments": json.dumps(args, ensure_ascii=False)}}


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-k:]):
            return k
    return 0


class ToolCallStream:
    """Split streamed content into text and complete tool calls. push()/flush() -> (text, [calls])."""

    def __init__(self) -> None:
        self.buffer, self.inside, self.n_calls = "", False, 0

    def push(self, text: str) -> tuple[str, list[dict]]:
        self.buffer += text
        out, calls = [], []
        while True:
            if not self.inside:
                i = self.buffer.find(OPEN)
                if i < 0:
                    cut = len(self.buffer) - _partial_suffix(self.buffer, OPEN)
                    out.append(self.buffer[:cut])
                    self.buffer = self.buffer[cut:]
                    break
                out.append(self.buffer[:i])
                self.buffer, self.inside = self.buffer[i:], True
            j = self.buffer.find(CLOSE)
            if j < 0:
                break
            block, self.buffer, self.inside = self.buffer[:j + len(CLOSE)], self.buffer[j + len(CLOSE):], False
            call = parse_call(block[len(OPEN):-len(CLOSE)])
            if call is None:
                out.append(block)
            else:
                calls.append(call)
                if self.buffer.startswith("\n"):  # the separator between consecutive calls
                    self.buffer = self.buffer[1:]
        self.n_calls += len(calls)
        text = "".join(out)
        if calls and not text.strip():
            text = ""
        return text, calls

    def flush(self) -> tuple[str, list[dict]]:
        """End of generation: an unterminated block is text."""
        out, self.buffer, self.inside = self.buffer, "", False
        return out, []


def split_tool_calls(text: str) -> tuple[str, list[dict]]:
    """Whole generated text -> (content without the valid call blocks, [OpenAI tool calls])."""
    s = ToolCallStream()
    a, calls = s.push(text)
    b, _ = s.flush()
    content = (a + b)
    return (content.strip() if calls else content), calls

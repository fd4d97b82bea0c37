"""Training-data formats: detect them, validate every record, normalise to three shapes.

People arrive with data shaped by whatever tutorial they followed: nanoGPT-style plain text,
MiniMind jsonl (`{"text"}`, `{"conversations"}`, `{"chosen","rejected"}`), Stanford Alpaca
(Taori et al. 2023), TRL's prompt/completion and preference rows (Rafailov et al. 2023, DPO).
Instead of asking them to convert, we read all of them and normalise each line into one of:

  pretrain    Record.text                    -> packed into fixed-length rows
  chat        Record.messages                -> one SFT row, loss on assistant turns
  preference  Record.prompt/.chosen/.rejected -> DPO pairs (lists of messages)

Messages are dicts `{"role", "content"}` with role in system/user/assistant/tool. Assistant
reasoning is normalised to a separate `reasoning_content` string (the DeepSeek-R1 / HF
convention); an inline `<think>...</think>` prefix in `content` is moved there. The chat encoder
renders it back as `<think>\\n{reasoning}\\n</think>\\n{content}`.

Bad data fails loudly: a `DataError` names file, line and field
(`data/x.jsonl:17: field 'messages[2].role': must be one of ...`). With `skip_invalid=True`
bad records are skipped and *counted* in a `ReadStats`, never dropped silently.
"""

from __future__ import annotations

import codecs
import json
import os
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

ROLES = ("system", "user", "assistant", "tool")
KINDS = ("pretrain", "chat", "preference")
# format name -> kind of the normalised record
FORMAT_KINDS = {
    "text": "pretrain",            # {"text": ...} jsonl
    "txt": "pretrain",             # plain .txt
    "messages": "chat",            # {"messages": [{role, content}, ...]}
    "conversations": "chat",       # MiniMind {"conversations": [...]} (also ShareGPT from/value)
    "alpaca": "chat",              # {"instruction", "input", "output", "system"?}
    "prompt_completion": "chat",   # {"prompt", "completion"}
    "preference": "preference",    # {"prompt", "chosen", "rejected"}
    "chosen_rejected": "preference",  # MiniMind {"chosen": [msgs], "rejected": [msgs]}
}
TXT_SEPARATOR = "<|endoftext|>"   # a line with only this splits documents in a .txt file
TXT_PIECE_CHARS = 1 << 20          # longer .txt documents are streamed in pieces of ~1 MB
_SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user",
                   "assistant": "assistant", "tool": "tool", "function_call": "assistant",
                   "observation": "tool"}


class DataError(ValueError):
    """A bad training record. str(): `path:line: field 'f': reason`."""

    def __init__(self, path: str, line: int | None, field: str | None, reason: str):
        self.path, self.line, self.field, self.reason = str(path), line, field, reason
        where = f"{self.path}:{line}" if line is not None else self.path
        what = f"field '{field}': " if field else ""
        super().__init__(f"{where}: {what}{reason}")

    def __reduce__(self):  # picklable across worker processes
        return (DataError, (self.path, self.line, self.field, self.reason))


@dataclass
class Record:
    """One normalised training record and where it came from."""

    kind: str                 # "pretrain" | "chat" | "preference"
    format: str               # a key of FORMAT_KINDS
    source: str               # file path
    line: int                 # 1-based line number (for .json arrays: line where the item starts)
    text: str | None = None   # pretrain
    eos: bool = True          # pretrain: False for a non-final piece of a long .txt document
    messages: list[dict] | None = None  # chat
    prompt: list[dict] | None = None    # preference: shared context messages
    chosen: list[dict] | None = None    # preference: preferred response messages
    rejected: list[dict] | None = None  # preference: dispreferred response messages
    tools: list[dict] | None = None     # chat: OpenAI function definitions offered to the model (tool_format.py)
    enable_thinking: bool | None = None  # chat: the thinking switch for this row (None = template default)


@dataclass
class ReadStats:
    """Counts filled while reading; pass one to `iter_records` to see what was skipped."""

    counts: Counter = field(default_factory=Counter)  # format -> valid records
    invalid: list[DataError] = field(default_factory=list)
    n_bytes: int = 0
    n_special: int = 0  # records whose text holds special-token strings
    special: list[str] = field(default_factory=list)  # the first few of them, "file:line: field"

    @property
    def n_valid(self) -> int:
        return sum(self.counts.values())

    @property
    def n_invalid(self) -> int:
        return len(self.invalid)


# ----------------------------------------------------------------------------- raw reading

def iter_raw(path: str) -> Iterator[tuple[int, object, int]]:
    """Yield (line, raw, n_bytes) lazily: a str per jsonl line, a parsed item of a .json array,
    or (for .txt) a text piece wrapped as ("__txt__", text, eos). JSON lines are not parsed here
    so that worker processes can do it."""
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such data file")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".txt":
        yield from _iter_txt(path)
        return
    if ext == ".json":
        with open(path, encoding="utf-8", errors="replace") as f:
            head = f.read(4096).lstrip()
        if head.startswith("["):
            yield from _iter_json_array(path)
            return
        if head.startswith("{"):  # one pretty-printed object, or really jsonl
            s = _read_text(path)
            try:
                obj = json.loads(s)
            except json.JSONDecodeError:
                obj = None
            if obj is not None:
                yield 1, obj, len(s.encode("utf-8"))
                return
    for i, line, n_bytes in _decoded_lines(path):
        if not isinstance(line, str) or line.strip():
            yield i, line, n_bytes


def _decoded_lines(path: str) -> Iterator[tuple[int, str | tuple, int]]:
    """(line number, text, bytes) per line, decoded one line at a time: a line that is not UTF-8
    becomes ("__bad__", reason), which parse_record turns into a DataError for that line only
    (so --skip-invalid can skip it and the error names the line)."""
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            if i == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            try:
                yield i, raw.decode("utf-8"), len(raw)
            except UnicodeDecodeError as e:
                yield i, ("__bad__", f"not valid UTF-8 (byte {e.start + 1} of the line: {e.reason})"), len(raw)


def _read_text(path: str) -> str:
    """A whole (.json) file as text; invalid UTF-8 is reported with its line number."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(path, data.count(b"\n", 0, e.start) + 1, None, f"not valid UTF-8 ({e.reason})") from None


def _iter_txt(path: str) -> Iterator[tuple[int, object, int]]:
    # A piece is held back until we know whether its document continues (eos=False) or ends.
    pending: tuple | None = None  # (start_line, text, n_bytes)
    buf: list[str] = []
    n, start = 0, 1

    def cut() -> tuple | None:
        text = "".join(buf)
        return (start, text, n) if text.strip() else None

    for i, line, n_line in _decoded_lines(path):
        if isinstance(line, tuple):  # undecodable line: reported (or skipped) on its own
            yield i, line, n_line
            continue
        if line.strip() == TXT_SEPARATOR:
            yield from _end_document(cut(), pending)
            pending, buf, n, start = None, [], 0, i + 1
            continue
        buf.append(line.replace("\r\n", "\n"))  # as text mode's universal newlines did
        n += n_line
        if n >= TXT_PIECE_CHARS:  # a long document: stream it in pieces cut at line ends
            if pending:
                yield pending[0], ("__txt__", pending[1], False), pending[2]
            pending, buf, n, start = cut(), [], 0, i + 1
    yield from _end_document(cut(), pending)


def _end_document(piece: tuple | None, pending: tuple | None) -> Iterator[tuple[int, object, int]]:
    """At a document's end: the held-back piece continues it (eos=False), the last piece ends it."""
    if piece and pending:
        yield pending[0], ("__txt__", pending[1], False), pending[2]
        pending = None
    last = piece or pending
    if last:
        yield last[0], ("__txt__", last[1], True), last[2]


def _iter_json_array(path: str) -> Iterator[tuple[int, object, int]]:
    """Parse a top-level JSON array item by item so errors get real line numbers."""
    s = _read_text(path)
    dec = json.JSONDecoder()
    pos = s.index("[") + 1
    n = len(s)

    def skip(p: int) -> int:
        while p < n and s[p] in " \t\r\n":
            p += 1
        return p

    pos = skip(pos)
    if pos < n and s[pos] == "]":
        return
    while True:
        line = s.count("\n", 0, pos) + 1
        try:
            item, end = dec.raw_decode(s, pos)
        except json.JSONDecodeError as e:
            raise DataError(path, s.count("\n", 0, e.pos) + 1, None, f"invalid JSON: {e.msg}") from None
        yield line, item, end - pos
        pos = skip(end)
        if pos < n and s[pos] == ",":
            pos = skip(pos + 1)
        elif pos < n and s[pos] == "]":
            return
        else:
            raise DataError(path, s.count("\n", 0, pos) + 1, None, "invalid JSON: expected ',' or ']'")


# ----------------------------------------------------------------------------- normalising

def classify(obj: dict) -> str | None:
    """Format name of one parsed JSON object, from its keys (None when unrecognised)."""
    if "messages" in obj:
        return "messages"
    if "conversations" in obj:
        return "conversations"
    if "chosen" in obj and "rejected" in obj:
        return "preference" if "prompt" in obj else "chosen_rejected"
    if "instruction" in obj and "output" in obj:
        return "alpaca"
    if "prompt" in obj and "completion" in obj:
        return "prompt_completion"
    if "text" in obj:
        return "text"
    return None


def parse_record(raw: object, path: str, line: int) -> Record:
    """Validate and normalise one raw item from `iter_raw`; raises DataError."""
    if isinstance(raw, tuple) and raw and raw[0] == "__txt__":
        return Record("pretrain", "txt", path, line, text=raw[1], eos=raw[2])
    if isinstance(raw, tuple) and raw and raw[0] == "__bad__":
        raise DataError(path, line, None, raw[1])
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as e:
            raise DataError(path, line, None, f"invalid JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(raw, dict):
        raise DataError(path, line, None, f"expected a JSON object, got {_tname(raw)}")
    fmt = classify(raw)
    err = _Err(path, line)
    if fmt is None:
        raise err(None, f"unrecognised record with keys {sorted(raw)[:8]}; expected one of "
                        "text | messages | conversations | instruction+output | prompt+completion | "
                        "chosen+rejected (see docs/data.md)")
    rec = Record(FORMAT_KINDS[fmt], fmt, path, line)
    if fmt == "text":
        rec.text = _nonempty_str(raw, "text", err)
    elif fmt in ("messages", "conversations"):
        rec.messages = _messages(raw[fmt], fmt, err)
        _need_assistant(rec.messages, fmt, err)
        rec.tools, rec.enable_thinking = _tool_fields(raw, rec.messages, fmt, err)
    elif fmt == "alpaca":
        instr = _nonempty_str(raw, "instruction", err)
        inp = raw.get("input") or ""
        if not isinstance(inp, str):
            raise err("input", f"must be a string, got {_tname(inp)}")
        msgs = []
        if raw.get("system"):
            msgs.append({"role": "system", "content": _nonempty_str(raw, "system", err)})
        for j, pair in enumerate(raw.get("history") or []):  # alpaca-style [[q, a], ...]
            if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
                raise err(f"history[{j}]", "must be a [user, assistant] pair of strings")
            msgs += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
        msgs.append({"role": "user", "content": f"{instr}\n\n{inp}" if inp.strip() else instr})
        msgs.append(_assistant(_nonempty_str(raw, "output", err), "output", err))
        rec.messages = msgs
    elif fmt == "prompt_completion":
        prompt = _prompt(raw["prompt"], "prompt", err)
        rec.messages = prompt + _response(raw["completion"], "completion", err)
    else:  # preference
        if fmt == "preference":
            prompt = _prompt(raw["prompt"], "prompt", err)
            chosen = _response(raw["chosen"], "chosen", err)
            rejected = _response(raw["rejected"], "rejected", err)
            # TRL "implicit prompt" rows repeat the prompt inside chosen/rejected: strip it
            if prompt and chosen[:len(prompt)] == prompt and rejected[:len(prompt)] == prompt:
                chosen, rejected = chosen[len(prompt):], rejected[len(prompt):]
        else:
            prompt, chosen, rejected = _split_shared_prompt(raw, err)
        for name, resp in (("chosen", chosen), ("rejected", rejected)):
            if not any(m["role"] == "assistant" for m in resp):
                raise err(name, "has no assistant message after the prompt")
        if _stripped(chosen) == _stripped(rejected):  # "Yes." vs "Yes.\n" is no preference either
            raise err("rejected", "is identical to 'chosen'; a preference pair needs two different answers")
        rec.prompt, rec.chosen, rec.rejected = prompt, chosen, rejected
    return rec


def _stripped(msgs: list[dict]) -> list[tuple]:
    """Messages with surrounding whitespace ignored (to compare two answers)."""
    return [(m["role"], m["content"].strip(), (m.get("reasoning_content") or "").strip(), m.get("tool_calls"))
            for m in msgs]


class _Err:
    def __init__(self, path: str, line: int):
        self.path, self.line = path, line

    def __call__(self, field: str | None, reason: str) -> DataError:
        return DataError(self.path, self.line, field, reason)


def _tname(x: object) -> str:
    return {dict: "an object", list: "a list", str: "a string", type(None): "null", bool: "a boolean",
            int: "a number", float: "a number"}.get(type(x), type(x).__name__)


def _nonempty_str(obj: dict, key: str, err: _Err) -> str:
    if key not in obj:
        raise err(key, "is missing")
    v = obj[key]
    if not isinstance(v, str):
        raise err(key, f"must be a string, got {_tname(v)}")
    if not v.strip():
        raise err(key, "is empty")
    return v


def split_think(content: str) -> tuple[str | None, str]:
    """'<think>r</think>answer' -> ('r', 'answer'); also a bare 'r</think>answer' (R1 style)."""
    if "</think>" not in content:
        return None, content
    head, _, answer = content.partition("</think>")
    s = head.lstrip()
    if s.startswith("<think>"):
        s = s[len("<think>"):]
    elif "<think>" in head:
        return None, content  # text before <think>: leave it alone
    return s.strip(), answer.strip()


def _message(m: object, name: str, err: _Err, sharegpt: bool) -> dict:
    if not isinstance(m, dict):
        raise err(name, f"must be an object with role and content, got {_tname(m)}")
    if sharegpt and "role" not in m and "from" in m:  # ShareGPT {"from": "human", "value": ...}
        role = _SHAREGPT_ROLES.get(m["from"], m["from"])
        m = {"role": role, "content": m.get("value")}
    if "role" not in m:
        raise err(f"{name}.role", "is missing")
    role = m["role"]
    if role not in ROLES:
        raise err(f"{name}.role", f"must be one of {'/'.join(ROLES)}, got {role!r}")
    content = m.get("content")
    if content is None and (m.get("tool_calls") or m.get("reasoning_content")):
        content = ""
    if not isinstance(content, str):
        raise err(f"{name}.content", "is missing" if "content" not in m else
                  f"must be a string, got {_tname(content)}")
    out = {"role": role, "content": content}
    reasoning = m.get("reasoning_content")
    if reasoning is not None and not isinstance(reasoning, str):
        raise err(f"{name}.reasoning_content", f"must be a string, got {_tname(reasoning)}")
    if role == "assistant":
        inline, answer = split_think(content)
        if inline is not None:
            if reasoning and reasoning.strip():
                raise err(f"{name}.content", "has inline <think>...</think> and a reasoning_content "
                                             "field; use only one")
            reasoning, out["content"] = inline, answer
        if reasoning and reasoning.strip():
            out["reasoning_content"] = reasoning.strip()
    elif reasoning:
        raise err(f"{name}.reasoning_content", f"only assistant messages may have reasoning, not {role!r}")
    if m.get("tool_calls"):
        if role != "assistant":
            raise err(f"{name}.tool_calls", f"only assistant messages may call tools, not {role!r}")
        out["tool_calls"] = _tool_calls(m["tool_calls"], f"{name}.tool_calls", err)
    if sharegpt and isinstance(m.get("tools"), (str, list)):  # MiniMind: tools on the system message
        out["tools"] = m["tools"]
    if not out["content"].strip() and not out.get("reasoning_content") and not out.get("tool_calls") \
            and role != "system":
        raise err(f"{name}.content", "is empty")
    return out


def _json_field(v: object, name: str, err: _Err) -> object:
    """A field given as JSON text (MiniMind, OpenAI `arguments`) or already parsed."""
    if isinstance(v, str):
        try:
            return json.loads(v) if v.strip() else {}
        except json.JSONDecodeError as e:
            raise err(name, f"is not valid JSON: {e.msg} (column {e.colno})") from None
    return v


def _tool_calls(v: object, name: str, err: _Err) -> list[dict]:
    """OpenAI `tool_calls` ({type, id?, function: {name, arguments}}, or {name, arguments}) -> canonical
    [{"type": "function", "function": {"name", "arguments": object}}] (tool_format.canonical_calls)."""
    v = _json_field(v, name, err)
    if not isinstance(v, list) or not v:
        raise err(name, f"must be a non-empty list of calls, got {_tname(v)}")
    out = []
    for j, c in enumerate(v):
        fn = c.get("function", c) if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise err(f"{name}[{j}]", "needs a function name ({'function': {'name': ..., 'arguments': {...}}})")
        args = _json_field(fn.get("arguments", {}), f"{name}[{j}].function.arguments", err)
        if not isinstance(args, dict):
            raise err(f"{name}[{j}].function.arguments", f"must be a JSON object, got {_tname(args)}")
        out.append({"type": "function", "function": {"name": fn["name"], "arguments": args}})
    return out


def _tool_fields(raw: dict, msgs: list[dict], fmt: str, err: _Err) -> tuple[list[dict] | None, bool | None]:
    """(tools, enable_thinking) of a chat row: `tools` beside the messages (OpenAI / TRL) or on the
    system message (MiniMind), as a list or JSON text."""
    tools, where = raw.get("tools"), "tools"
    for i, m in enumerate(msgs):
        if "tools" in m:
            tools, where = m.pop("tools"), f"{fmt}[{i}].tools"
    if tools is not None:
        tools = _json_field(tools, where, err)
        if not isinstance(tools, list):
            raise err(where, f"must be a list of function definitions, got {_tname(tools)}")
        for j, t in enumerate(tools):
            fn = t.get("function", t) if isinstance(t, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise err(f"{where}[{j}]", "must be {'type': 'function', 'function': {'name': ..., 'parameters': ...}}")
        tools = [t if "function" in t else {"type": "function", "function": t} for t in tools] or None
    think = raw.get("enable_thinking", (raw.get("chat_template_kwargs") or {}).get("enable_thinking"))
    if think is not None and not isinstance(think, bool):
        raise err("enable_thinking", f"must be true or false, got {_tname(think)}")
    return tools, think


def _assistant(text: str, name: str, err: _Err) -> dict:
    return _message({"role": "assistant", "content": text}, name, err, False)


def _messages(v: object, name: str, err: _Err) -> list[dict]:
    if not isinstance(v, list):
        raise err(name, f"must be a list of messages, got {_tname(v)}")
    if not v:
        raise err(name, "is empty")
    return [_message(m, f"{name}[{i}]", err, True) for i, m in enumerate(v)]


def _need_assistant(msgs: list[dict], name: str, err: _Err) -> None:
    if not any(m["role"] == "assistant" for m in msgs):
        raise err(name, "has no assistant turn (nothing to train on)")


def _prompt(v: object, name: str, err: _Err) -> list[dict]:
    if isinstance(v, str):
        if not v.strip():
            raise err(name, "is empty")
        return [{"role": "user", "content": v}]
    return _messages(v, name, err)


def _response(v: object, name: str, err: _Err) -> list[dict]:
    if isinstance(v, str):
        if not v.strip():
            raise err(name, "is empty")
        return [_assistant(v, name, err)]
    msgs = _messages(v, name, err)
    _need_assistant(msgs, name, err)
    return msgs


def _split_shared_prompt(raw: dict, err: _Err) -> tuple[list[dict], list[dict], list[dict]]:
    """MiniMind rows hold two full conversations; the shared part before the last assistant
    turn is the prompt."""
    chosen = _messages(raw["chosen"], "chosen", err)
    rejected = _messages(raw["rejected"], "rejected", err)
    _need_assistant(chosen, "chosen", err)
    _need_assistant(rejected, "rejected", err)
    k = max(i for i, m in enumerate(chosen) if m["role"] == "assistant")
    if rejected[:k] != chosen[:k]:
        raise err("rejected", "must start with the same messages as 'chosen' (the shared prompt)")
    return chosen[:k], chosen[k:], rejected[k:]


# ----------------------------------------------------------------------------- public API

def detect_format(path: str) -> str:
    """Format name (a key of FORMAT_KINDS) of a data file, from its extension and first record."""
    path = str(path)
    if os.path.splitext(path)[1].lower() == ".txt":
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such data file")
        return "txt"
    first: DataError | None = None
    for i, (line, raw, _) in enumerate(iter_raw(path)):
        try:
            return parse_record(raw, path, line).format
        except DataError as e:
            if isinstance(raw, dict) or (isinstance(raw, str) and raw.lstrip().startswith("{")):
                fmt = classify(raw) if isinstance(raw, dict) else _classify_str(raw)
                if fmt:
                    return fmt
            first = first or e
            if i >= 100:
                break
    if first is not None:
        raise first
    raise DataError(path, None, None, "file has no records")


def _classify_str(s: str) -> str | None:
    try:
        obj = json.loads(s)
    except json.JSONDecodeError:
        return None
    return classify(obj) if isinstance(obj, dict) else None


def check_kind(rec: Record, kind: str | None, path: str, line: int) -> None:
    """Raise DataError when a record's kind does not match the requested one."""
    if kind is None:
        return
    want = "chat" if kind == "sft" else kind
    if rec.kind != want:
        expect = {"pretrain": "pretraining text ({\"text\": ...} or .txt)",
                  "chat": "chat/SFT data (messages, conversations, alpaca or prompt/completion)",
                  "preference": "preference pairs (chosen/rejected)"}[want]
        raise DataError(path, line, None, f"expected {expect}, got a {rec.format!r} record ({rec.kind})")


def iter_records(path: str, kind: str | None = None, skip_invalid: bool = False,
                 stats: ReadStats | None = None) -> Iterator[Record]:
    """Yield normalised Records of one file, lazily.

    kind: "pretrain" | "chat" (alias "sft") | "preference" | None (= the kind of the first
    valid record; a file must not mix kinds). Invalid records raise DataError, or with
    skip_invalid are appended to `stats.invalid` (a warning is printed if no stats is given).
    """
    if kind is not None and kind not in (*KINDS, "sft"):
        raise ValueError(f"kind must be one of {KINDS} or 'sft', got {kind!r}")
    own = stats is None
    stats = stats if stats is not None else ReadStats()
    n_skipped = 0
    for line, raw, nbytes in iter_raw(path):
        stats.n_bytes += nbytes
        try:
            rec = parse_record(raw, str(path), line)
            check_kind(rec, kind, str(path), line)
        except DataError as e:
            if not skip_invalid:
                raise
            stats.invalid.append(e)
            n_skipped += 1
            continue
        kind = kind or rec.kind
        stats.counts[rec.format] += 1
        yield rec
    if own and n_skipped:
        print(f"warning: skipped {n_skipped} invalid records in {path}", file=sys.stderr)

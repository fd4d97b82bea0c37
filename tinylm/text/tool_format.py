"""Tool calls and the thinking switch in the chat template (Qwen3 / Hermes function-calling format).

The OpenAI message format carries tools in three places: the request's `tools` (JSON-schema function
definitions), an assistant message's `tool_calls`, and `tool` role messages with the results. We render
them as Qwen2.5/Qwen3 and NousResearch's Hermes-2-Pro do, so that vLLM's `hermes` tool parser, Ollama
and transformers' `apply_chat_template(tools=...)` all read an exported model the same way:

    <|im_start|>system\\n{system}\\n\\n# Tools ... <tools>\\n{tool json}\\n</tools> ... <|im_end|>
    <|im_start|>assistant\\n{content}\\n<tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call><|im_end|>
    <|im_start|>user\\n<tool_response>\\n{result}\\n</tool_response><|im_end|>     (consecutive results share a turn)

`enable_thinking=False` (Qwen3's switch) closes an empty `<think>\\n\\n</think>\\n` block at the start of
every assistant turn that has no reasoning, including the generation prompt: the model answers
directly, and training rows with the switch off teach exactly that prefix (mixed with thinking rows).
One newline after `</think>`, not Qwen3's two: byte-level BPE makes "\\n\\n" one token at the end of a
prompt but splits it before the answer's first word, so the inference prompt would not be a prefix of
the training tokens (tested); one newline tokenizes the same both ways, as tinylm's reasoning format.

TOOL_TEMPLATE renders a conversation without tools, tool calls or the switch byte-identically to
tinylm's ChatML template (tested), so it can replace it in a tool model's tokenizer_config.json.
Encoding goes through chat_format's generic template path: assistant spans by prefix diffs (loss on
the tool-call JSON too, never on tool results) and special-token strings found in message text, tool
results or tool definitions kept as plain text (special_tokens.py: tool output is untrusted).
"""

from __future__ import annotations

import json
import sys

TOOL_TEMPLATE = (
    "{%- set think_off = enable_thinking is defined and enable_thinking is not none and not enable_thinking %}"
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\"name\": <function-name>, "
    "\"arguments\": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if tools and loop.first and message['role'] == 'system' %}"
    "{%- elif message['role'] == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + (message['content'] if message['content'] is string else '') "
    "+ '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' and message['reasoning_content'] is defined"
    " and message['reasoning_content'] %}"
    "{{- '<think>\\n' + message['reasoning_content'] + '\\n</think>\\n' }}"
    "{%- elif message['role'] == 'assistant' and think_off %}{{- '<think>\\n\\n</think>\\n' }}"
    "{%- endif %}"
    "{{- message['content'] if message['content'] is string else '' }}"
    "{%- if message['role'] == 'assistant' and message['tool_calls'] is defined and message['tool_calls'] %}"
    "{%- for call in message['tool_calls'] %}"
    "{%- set fn = call['function'] if call['function'] is defined else call %}"
    "{%- if not loop.first or (message['content'] is string and message['content']) %}{{- '\\n' }}{%- endif %}"
    "{{- '<tool_call>\\n{\"name\": \"' + fn['name'] + '\", \"arguments\": ' }}"
    "{%- if fn['arguments'] is string %}{{- fn['arguments'] }}{%- else %}{{- fn['arguments'] | tojson }}{%- endif %}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if think_off %}{{- '<think>\\n\\n</think>\\n' }}{%- endif %}"
    "{%- endif %}"
)


def needs_tool_path(messages: list[dict], tools: list | None, enable_thinking: bool | None) -> bool:
    """True when the conversation uses anything beyond plain ChatML (tools, calls, results, the switch)."""
    return bool(tools) or enable_thinking is not None or any(
        m.get("tool_calls") or m.get("role") == "tool" for m in messages)


def template_for(tokenizer) -> str | None:
    """The template to render tool conversations with: TOOL_TEMPLATE for a ChatML tokenizer, and for one
    with ChatML tokens whose own template knows no tools (SmolLM2: a ChatML variant with a default system
    prompt, which would silently drop `tools` and `tool_calls`); else the tokenizer's own (Qwen3,
    SmolLM3, ... render tools themselves)."""
    from tinylm.text.chatml import IM_END, IM_START, is_chatml

    if is_chatml(tokenizer):
        return TOOL_TEMPLATE
    own = getattr(tokenizer, "chat_template", None) or ""
    cached = getattr(tokenizer, "_tinylm_tool_template", None)  # get_vocab() copies 50k entries: once only
    if cached is None or cached[0] != own:
        vocab = tokenizer.get_vocab()
        chatml_tokens = IM_START in vocab and IM_END in vocab
        cached = (own, TOOL_TEMPLATE if chatml_tokens and "tool" not in own else None)
        tokenizer._tinylm_tool_template = cached
    return cached[1]


def canonical_calls(calls: list[dict]) -> list[dict]:
    """OpenAI tool calls with `arguments` as a parsed object (one JSON spelling, trained and rendered)."""
    out = []
    for c in calls:
        fn = c.get("function", c)
        args = fn.get("arguments", {})
        if isinstance(args, str):  # JSON text -> object; text that is no JSON object is rendered as given
            try:
                parsed = json.loads(args) if args.strip() else {}
            except (json.JSONDecodeError, RecursionError):
                parsed = args
            args = parsed if isinstance(parsed, dict) else args
        out.append({"type": "function", "function": {"name": fn["name"], "arguments": args}})
    return out


def _prepared(messages: list[dict]) -> list[dict]:
    return [dict(m, tool_calls=canonical_calls(m["tool_calls"])) if m.get("tool_calls") else m for m in messages]


def render_text(tokenizer, messages: list[dict], add_generation_prompt: bool, tools: list | None = None,
                enable_thinking: bool | None = None) -> str:
    """The conversation as template text (no tokenization)."""
    kw = {"enable_thinking": enable_thinking} if enable_thinking is not None else {}
    template = template_for(tokenizer)
    if template is not None:
        kw["chat_template"] = template
    elif not getattr(tokenizer, "chat_template", None):
        raise ValueError("tokenizer has no chat_template and no <|im_start|>/<|im_end|> tokens; cannot render tools")
    return tokenizer.apply_chat_template(_prepared(messages), tools=tools or None, tokenize=False,
                                         add_generation_prompt=add_generation_prompt, **kw)


def _literals(tokenizer, messages: list[dict], tools: list | None, gen: bool, think, text: str,
              allow: frozenset[str]) -> list[tuple[int, int]]:
    """Special-token strings of `text` that come from messages or tool definitions (kept as plain text)."""
    from tinylm.text.special_tokens import template_literals

    def render(pair: list) -> str:
        return render_text(tokenizer, pair[1], gen, pair[0], think)

    return template_literals(tokenizer, [tools or [], _prepared(messages)], render, text, allow)


def encode(tokenizer, messages: list[dict], tools: list | None = None, enable_thinking: bool | None = None,
           first: int = 0, max_len: int | None = None, allow: frozenset[str] = frozenset()
           ) -> tuple[list[int], list[int]]:
    """(ids, loss mask) of a tool conversation: 1 on every assistant turn from message `first` on
    (content, tool-call JSON, end-of-turn token), 0 on the system/tools block, users and tool results."""
    from tinylm.text.chatml import _mask_from_spans
    from tinylm.text.special_tokens import encode_marked

    text = render_text(tokenizer, messages, False, tools, enable_thinking)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i < first:
            continue
        before = render_text(tokenizer, messages[:i], True, tools, enable_thinking) if i else ""
        upto = render_text(tokenizer, messages[:i + 1], False, tools, enable_thinking)
        if not (upto.startswith(before) and text.startswith(upto)):
            raise ValueError("the chat template is not prefix-stable for this tool conversation, so assistant "
                             "tokens cannot be located; use a ChatML tokenizer (tinylm's tool template)")
        spans.append((len(before), max(len(upto.rstrip()), len(before))))
    ids, offsets = encode_marked(tokenizer, text, _literals(tokenizer, messages, tools, False, enable_thinking,
                                                            text, allow))
    mask = _mask_from_spans(offsets, spans)
    if max_len is not None:
        ids, mask = ids[:max_len], mask[:max_len]
    return list(ids), mask


def render_ids(tokenizer, messages: list[dict], tools: list | None = None, enable_thinking: bool | None = None,
               add_generation_prompt: bool = True) -> list[int]:
    """Prompt ids of a tool conversation (ending with the assistant header, and the closed empty think
    block when enable_thinking is False)."""
    from tinylm.text.special_tokens import encode_marked

    text = render_text(tokenizer, messages, add_generation_prompt, tools, enable_thinking)
    literals = _literals(tokenizer, messages, tools, add_generation_prompt, enable_thinking, text, frozenset())
    return list(encode_marked(tokenizer, text, literals)[0])


def install_template(model_dir: str) -> None:
    """Write TOOL_TEMPLATE into `model_dir/tokenizer_config.json` (a ChatML tinylm tokenizer only), so that
    transformers / vLLM / exports render tools exactly as tinylm trained them."""
    from tinylm.text.tokenizer import load_tokenizer, make_tokenizer_config_portable

    if template_for(load_tokenizer(model_dir)) != TOOL_TEMPLATE:
        raise ValueError(f"{model_dir}: the tokenizer's chat template renders tools itself; it keeps its own")
    make_tokenizer_config_portable(model_dir, TOOL_TEMPLATE)


def main(argv: list[str] | None = None) -> int:
    """`python -m tinylm.text.tool_format MODEL_DIR`: store the tool template in a model's tokenizer_config.json."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m tinylm.text.tool_format",
                                 description="store the tool template in a model's tokenizer_config.json")
    ap.add_argument("model_dir")
    args = ap.parse_args(argv)
    try:
        install_template(args.model_dir)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.model_dir}/tokenizer_config.json: chat_template = tinylm tool template (tools, tool_calls, enable_thinking)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

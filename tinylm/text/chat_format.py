"""Turn conversations into token ids plus a loss mask that is 1 only on assistant tokens.

SFT trains the model to *answer*, not to imitate users (InstructGPT, Ouyang et al. 2022; the
"assistant-only loss" of TRL and MiniMind). Every assistant turn of a multi-turn conversation is
trained, including its end-of-turn token (`<|im_end|>`) so the model learns to stop; the
system prompt, user turns and the `<|im_start|>assistant\\n` header are context only.

How spans are found, for ANY Hugging Face tokenizer with a chat template:
  1. render the conversation to text with the tokenizer's own template;
  2. for assistant turn i, render messages[:i] with the generation prompt and messages[:i+1]:
     the text between the two is exactly what the template emits for that answer;
  3. tokenize the full text once (exactly as inference does) and mark the tokens whose
     character offsets fall in those spans.
Special-token strings that came from a message (`<|im_end|>` typed by a user, quoted in a data row)
are encoded as plain text, so only the template makes control tokens (special_tokens.py); trusted
pre-formatted data may opt in per string (`allow`).
For ChatML tokenizers (the bundled one) step 2 needs no Jinja: the text and spans are built
directly, which is much faster and gives byte-identical ids (tested).

Reasoning (`reasoning_content`, see formats.py) is rendered inline as
`<think>\\n{reasoning}\\n</think>\\n{content}` and trained like the rest of the answer.
"""

from __future__ import annotations

from tinylm.text import tool_format
from tinylm.text.chatml import _chatml_text, _mask_from_spans, is_chatml  # noqa: F401 (is_chatml: re-exported)
from tinylm.text.special_tokens import encode_marked, literals_in, template_literals


def with_inline_reasoning(messages: list[dict]) -> list[dict]:
    """Fold `reasoning_content` into assistant content as a <think> block (one representation)."""
    out = []
    for m in messages:
        r = m.get("reasoning_content")
        if r:
            m = {k: v for k, v in m.items() if k != "reasoning_content"}
            m["content"] = f"<think>\n{r}\n</think>\n{m.get('content') or ''}"
        out.append(m)
    return out


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(with_inline_reasoning(messages), tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def _template_spans(tokenizer, messages: list[dict], first: int, full: str) -> list[tuple[int, int]]:
    """Generic path: assistant spans of `full` (the whole render) by diffing renders of growing prefixes."""
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i < first:
            continue
        before = _render(tokenizer, messages[:i], True) if i else ""
        upto = _render(tokenizer, messages[:i + 1], False)
        if not (upto.startswith(before) and full.startswith(upto)):
            raise ValueError("the chat template is not prefix-stable (rendering a conversation changes "
                             "earlier turns), so assistant tokens cannot be located; use a ChatML tokenizer")
        end = len(upto.rstrip())  # keep the end-of-turn token, drop the newline after it
        spans.append((len(before), max(end, len(before))))
    return spans


def _uses_chatml(tokenizer, messages: list[dict]) -> bool:
    return is_chatml(tokenizer) and not any(m.get("tool_calls") for m in messages)


def _render_with_literals(tokenizer, messages: list[dict], add_generation_prompt: bool,
                          allow: frozenset[str]) -> tuple[str, list[tuple[int, int]], list[tuple[int, int]]]:
    """(text, assistant spans, literal spans): the spans of special-token strings that came from the
    messages, which must be encoded as plain text (see special_tokens.py)."""
    if _uses_chatml(tokenizer, messages):
        untrusted: list[tuple[int, int]] = []
        text, spans = _chatml_text(messages, add_generation_prompt, untrusted)
        return text, spans, literals_in(tokenizer, text, untrusted, allow)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat_template "
                         "and no <|im_start|>/<|im_end|> tokens; cannot encode chat data")
    text = _render(tokenizer, messages, add_generation_prompt)
    literals = template_literals(tokenizer, messages, lambda m: _render(tokenizer, m, add_generation_prompt),
                                 text, allow)
    return text, [], literals


def _encode(tokenizer, messages: list[dict], first: int, max_len: int | None,
            allow: frozenset[str]) -> tuple[list[int], list[int]]:
    text, spans, literals = _render_with_literals(tokenizer, messages, False, allow)
    if _uses_chatml(tokenizer, messages):
        spans = spans[sum(1 for m in messages[:first] if m["role"] == "assistant"):]
    else:
        spans = _template_spans(tokenizer, messages, first, text)
    ids, offsets = encode_marked(tokenizer, text, literals)
    mask = _mask_from_spans(offsets, spans)
    if max_len is not None:
        ids, mask = ids[:max_len], mask[:max_len]
    return list(ids), mask


def encode_chat(tokenizer, messages: list[dict], max_len: int | None = None,
                allow: frozenset[str] = frozenset(), tools: list | None = None,
                enable_thinking: bool | None = None) -> tuple[list[int], list[int]]:
    """Token ids of a whole conversation and a 0/1 loss mask (1 = assistant answer tokens and
    their end-of-turn token, every assistant turn). Truncated on the right to max_len.
    Special-token strings inside messages stay plain text unless listed in `allow`.
    Tools, tool calls/results and the thinking switch: tool_format.py."""
    if tool_format.needs_tool_path(messages, tools, enable_thinking):
        return tool_format.encode(tokenizer, messages, tools, enable_thinking, 0, max_len, allow)
    return _encode(tokenizer, messages, 0, max_len, allow)


def encode_preference(tokenizer, prompt_msgs: list[dict], response_msgs: list[dict],
                      max_len: int | None = None, allow: frozenset[str] = frozenset()) -> tuple[list[int], list[int]]:
    """ids of prompt+response and a mask that is 1 only on the response's assistant tokens
    (assistant turns inside the prompt are context). Used for DPO chosen/rejected."""
    return _encode(tokenizer, list(prompt_msgs) + list(response_msgs), len(prompt_msgs), max_len, allow)


def render_prompt(tokenizer, messages: list[dict], add_generation_prompt: bool = True,
                  tools: list | None = None, enable_thinking: bool | None = None) -> list[int]:
    """Token ids the model sees at inference, ending with the assistant header when
    add_generation_prompt (same tokenization as training). Message text never becomes a control token."""
    if tool_format.needs_tool_path(messages, tools, enable_thinking):
        return tool_format.render_ids(tokenizer, messages, tools, enable_thinking, add_generation_prompt)
    text, _, literals = _render_with_literals(tokenizer, messages, add_generation_prompt, frozenset())
    return encode_marked(tokenizer, text, literals)[0]

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
For ChatML tokenizers (the bundled one) step 2 needs no Jinja: the text and spans are built
directly, which is much faster and gives byte-identical ids (tested).

Reasoning (`reasoning_content`, see formats.py) is rendered inline as
`<think>\\n{reasoning}\\n</think>\\n{content}` and trained like the rest of the answer.
"""

from __future__ import annotations

IM_START, IM_END = "<|im_start|>", "<|im_end|>"


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


def _chatml_text(messages: list[dict], add_generation_prompt: bool) -> tuple[str, list[tuple[int, int]]]:
    """ChatML text and the (start, end) char spans of each assistant answer incl. <|im_end|>."""
    parts, spans, n = [], [], 0
    for m in messages:
        head = f"{IM_START}{m['role']}\n"
        body = f"{m.get('content') or ''}{IM_END}"
        if m["role"] == "assistant":
            spans.append((n + len(head), n + len(head) + len(body)))
        piece = head + body + "\n"
        parts.append(piece)
        n += len(piece)
    if add_generation_prompt:
        parts.append(f"{IM_START}assistant\n")
    return "".join(parts), spans


def is_chatml(tokenizer) -> bool:
    """True when the tokenizer's template renders plain ChatML (cached on the tokenizer)."""
    cached = getattr(tokenizer, "_tinylm_is_chatml", None)
    if cached is not None:
        return cached
    vocab = tokenizer.get_vocab()
    ok = IM_START in vocab and IM_END in vocab
    if ok and getattr(tokenizer, "chat_template", None):
        probes = [
            [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}],
            [{"role": "system", "content": "S"}, {"role": "user", "content": "a"},
             {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
        ]
        try:
            for p in probes:
                for gen in (False, True):
                    want = _chatml_text(p, gen)[0]
                    if tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=gen) != want:
                        ok = False
        except Exception:
            ok = False
    try:
        tokenizer._tinylm_is_chatml = ok
    except Exception:
        pass
    return ok


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _template_spans(tokenizer, messages: list[dict], first: int) -> tuple[str, list[tuple[int, int]]]:
    """Generic path: assistant spans by diffing renders of growing prefixes."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat_template "
                         "and no <|im_start|>/<|im_end|> tokens; cannot encode chat data")
    full = _render(tokenizer, messages, False)
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
    return full, spans


def _tokenize(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # the Rust tokenizer directly: same ids, no Python wrapper overhead
        enc = backend.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], enc["offset_mapping"]


def _mask_from_spans(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    mask = [0] * len(offsets)
    j = 0
    for t, (s, e) in enumerate(offsets):
        while j < len(spans) and spans[j][1] <= s:
            j += 1
        if j == len(spans):
            break
        a, b = spans[j]
        if (s < b and e > a) or (s == e and a <= s < b):
            mask[t] = 1
    return mask


def _encode(tokenizer, messages: list[dict], first: int = 0,
            max_len: int | None = None) -> tuple[list[int], list[int]]:
    messages = with_inline_reasoning(messages)
    if is_chatml(tokenizer) and not any(m.get("tool_calls") for m in messages):
        text, spans = _chatml_text(messages, False)
        spans = spans[sum(1 for m in messages[:first] if m["role"] == "assistant"):]
    else:
        text, spans = _template_spans(tokenizer, messages, first)
    ids, offsets = _tokenize(tokenizer, text)
    mask = _mask_from_spans(offsets, spans)
    if max_len is not None:
        ids, mask = ids[:max_len], mask[:max_len]
    return list(ids), mask


def encode_chat(tokenizer, messages: list[dict], max_len: int | None = None) -> tuple[list[int], list[int]]:
    """Token ids of a whole conversation and a 0/1 loss mask (1 = assistant answer tokens and
    their end-of-turn token, every assistant turn). Truncated on the right to max_len."""
    return _encode(tokenizer, messages, 0, max_len)


def encode_preference(tokenizer, prompt_msgs: list[dict], response_msgs: list[dict],
                      max_len: int | None = None) -> tuple[list[int], list[int]]:
    """ids of prompt+response and a mask that is 1 only on the response's assistant tokens
    (assistant turns inside the prompt are context). Used for DPO chosen/rejected."""
    return _encode(tokenizer, list(prompt_msgs) + list(response_msgs), len(prompt_msgs), max_len)


def render_prompt(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """Token ids the model sees at inference, ending with the assistant header when
    add_generation_prompt (same tokenization as training)."""
    messages = with_inline_reasoning(messages)
    if is_chatml(tokenizer) and not any(m.get("tool_calls") for m in messages):
        text = _chatml_text(messages, add_generation_prompt)[0]
    else:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("tokenizer has no chat_template")
        text = _render(tokenizer, messages, add_generation_prompt)
    return list(_tokenize(tokenizer, text)[0])
